"""The light sleep tier and the cost of idling, through Den against the raw engine, in one run.

    .venv/bin/python -m tests.benchmarks.bench_sleep [--rounds N] [--idle N] [--window S]
        [--json out.json]

(docs/benchmarks.md, "Sleep tiers and idle cost", explains the results.)

Starts a real ``den serve`` (temporary data dir, its own engine prefix ``denbench-sleep-*``,
the idle reaper every 0.2 s) and drives it over HTTP, the way an agent does.

1. **Wake from the frozen tier to the first exec.** One Den workspace with
   ``idle_timeout_s=1`` (the reaper freezes it a second after its last call) and one raw runsc
   container with the same sandbox (``raw_run_flags``). Each round: wait until the workspace
   is ``paused`` with ``"sleep": "frozen"``, then time ``POST .../exec {"cmd": ["true"]}``
   (the wake is part of the call); ``docker pause`` the raw container, then time
   ``docker unpause C && docker exec C true`` (CLI) and, in the next round, the same through
   the SDK (``unpause`` + ``exec_run``), which is how Den talks to the engine.
2. **What idle costs.** N raw runsc containers running Den's init (``den-init``, as a
   workspace) and then N Den workspaces with ``keep_alive`` (never put to sleep), then the
   same N workspaces frozen: the CPU their cgroups use over a window (``cpuacct.usage`` of
   each container, read on the host, so that other work on the machine does not count), as a
   percentage of the whole machine; and exec p50 (``POST .../exec true``) on one workspace
   alone against the same with the N others idle.

Every engine object it makes carries its prefix and is removed at the end (frozen ones are
thawed first: the engine cannot remove a frozen gVisor sandbox). Nothing asserts on time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.benchmarks.bench_workspaces import (
    IMAGE,
    Server,
    finish_run,
    machine,
    make_repo,
    raw_run_flags,
    report_failure,
    sigterm_as_interrupt,
    start_run,
)
from tests.conftest import thaw_container

CPUACCT = Path("/sys/fs/cgroup/cpuacct/docker")


def sh(*argv: str) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=True, timeout=120).stdout


def timed(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def p50(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def wait(cond: Any, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise RuntimeError("timed out waiting")
        time.sleep(0.05)


def cpu_ns(container_ids: list[str]) -> int:
    """CPU used so far by these containers' cgroups (cgroup v1 cpuacct), nanoseconds."""
    total = 0
    for cid in container_ids:
        with contextlib.suppress(OSError, ValueError):
            total += int((CPUACCT / cid / "cpuacct.usage").read_text())
    return total


def machine_percent(container_ids: list[str], window_s: float) -> float:
    """Their CPU over ``window_s`` as a percentage of the whole machine (all cores)."""
    before, t0 = cpu_ns(container_ids), time.monotonic()
    time.sleep(window_s)
    used, elapsed = cpu_ns(container_ids) - before, time.monotonic() - t0
    return used / (elapsed * 1e9 * (os.cpu_count() or 1)) * 100


def full_id(name: str) -> str:
    return sh("docker", "inspect", "-f", "{{.Id}}", name).strip()


def bench_wake(srv: Server, prefix: str, repo: Path, rounds: int) -> dict[str, list[float]]:
    import docker

    wid = srv.create("wake", repo)
    srv.wait_running(wid, poll_s=0.05)
    srv._ok(srv.http.post(f"/api/v1/workspaces/{wid}/exec",
                          json={"cmd": "tmux new-session -d -s idle 'sleep 100000'"}), 200)
    raw = f"{prefix}-raw-wake"
    from server.runtime import docker_specs
    sh("docker", "run", "-d", "--name", raw, *raw_run_flags(f"{raw}-data"), IMAGE,
       *docker_specs.INIT_COMMAND)
    sh("docker", "exec", raw, "true")
    api = docker.from_env(timeout=120).api
    from server.runtime.cgroup_freezer import set_frozen
    raw_pid = int(sh("docker", "inspect", "-f", "{{.State.Pid}}", raw).strip())
    out: dict[str, list[float]] = {"den: frozen -> exec true": [],
                                   "raw CLI: unpause + exec true": [],
                                   "raw SDK: unpause + exec_run true": []}
    for i in range(rounds):
        wait(lambda: (lambda w: (w["state"], w.get("sleep")))(
            srv._ok(srv.http.get(f"/api/v1/workspaces/{wid}"), 200)) == ("paused", "frozen"),
            60)
        out["den: frozen -> exec true"].append(timed(lambda: srv.exec_true(wid)))
        freeze_container(raw)
        if i % 2 == 0:
            out["raw CLI: unpause + exec true"].append(timed(lambda: (
                set_frozen(raw_pid, False), sh("docker", "unpause", raw),
                sh("docker", "exec", raw, "true"))))
        else:
            def sdk() -> None:
                set_frozen(raw_pid, False)
                api.unpause(raw)
                exec_id = api.exec_create(raw, ["true"])["Id"]
                api.exec_start(exec_id)
                assert api.exec_inspect(exec_id)["ExitCode"] == 0
            out["raw SDK: unpause + exec_run true"].append(timed(sdk))
    srv.delete(wid)
    subprocess.run(["docker", "rm", "-f", raw], capture_output=True)
    return out


def bench_idle(srv: Server, prefix: str, repo: Path, n: int, window_s: float,
               exec_samples: int) -> dict[str, Any]:
    from server.runtime import docker_specs

    res: dict[str, Any] = {"n": n, "window_s": window_s}
    # one workspace alone: exec p50
    probe = str(srv._ok(srv.http.post("/api/v1/workspaces", json={
        "name": "probe", "repo": {"url": str(repo)}, "keep_alive": True}), 202)["id"])
    srv.wait_running(probe, poll_s=0.05)
    srv.exec_true(probe)
    res["exec p50, alone (s)"] = p50([timed(lambda: srv.exec_true(probe))
                                      for _ in range(exec_samples)])
    # N raw sandboxes running den-init
    raws = [f"{prefix}-raw-idle{i}" for i in range(n)]
    for name in raws:
        sh("docker", "run", "-d", "--name", name, *raw_run_flags(f"{name}-data"), IMAGE,
           *docker_specs.INIT_COMMAND)
    ids = [full_id(r) for r in raws]
    time.sleep(5)  # let them finish booting: boot CPU is not idle CPU
    res["raw: N idle sandboxes, % of machine"] = machine_percent(ids, window_s)
    for name in raws:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True)
        subprocess.run(["docker", "volume", "rm", "-f", f"{name}-data"], capture_output=True)
    # N Den workspaces, never put to sleep
    wids = []
    for i in range(n):
        r = srv.http.post("/api/v1/workspaces", json={"name": f"idle{i}",
                                                      "repo": {"url": str(repo)},
                                                      "keep_alive": True})
        wids.append(str(srv._ok(r, 202)["id"]))
    for wid in wids:
        srv.wait_running(wid, poll_s=0.2, timeout_s=600)
    ids = [full_id(f"{srv.prefix}-{w}") for w in wids]
    time.sleep(5)
    res["den: N idle running workspaces, % of machine"] = machine_percent(ids, window_s)
    res["exec p50, with N idle running (s)"] = p50([timed(lambda: srv.exec_true(probe))
                                                    for _ in range(exec_samples)])
    for w in wids:  # what the frozen tier does: docker pause, then the cgroup freezer
        freeze_container(f"{srv.prefix}-{w}")
    res["den: N frozen workspaces, % of machine"] = machine_percent(ids, window_s)
    res["exec p50, with N frozen (s)"] = p50([timed(lambda: srv.exec_true(probe))
                                              for _ in range(exec_samples)])
    for w in wids:
        thaw_container(f"{srv.prefix}-{w}")
    for w in [*wids, probe]:
        srv.delete(w)
    return res


def freeze_container(name: str) -> None:
    from server.runtime.cgroup_freezer import set_frozen

    sh("docker", "pause", name)
    set_frozen(int(sh("docker", "inspect", "-f", "{{.State.Pid}}", name).strip()), True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.benchmarks.bench_sleep")
    ap.add_argument("--rounds", type=int, default=20, help="wake rounds (20)")
    ap.add_argument("--idle", type=int, default=10, help="idle workspaces (10)")
    ap.add_argument("--window", type=float, default=20.0, help="CPU window, seconds (20)")
    ap.add_argument("--exec-samples", type=int, default=30)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    run = start_run("sleep")
    if run is None:
        return 2
    srv: Server | None = None
    with sigterm_as_interrupt():
        try:
            repo = make_repo(run.repos_root, run.work)
            srv = Server(run.work, run.repos_root, run.prefix, reaper_interval_s=0.2,
                         idle_timeout_s=1, frozen_max_s=3600, max_workspaces_per_user=1000)
            srv.start()
            wake = bench_wake(srv, run.prefix, repo, args.rounds)
            idle = (bench_idle(srv, run.prefix, repo, args.idle, args.window, args.exec_samples)
                    if args.idle else {})
        except BaseException as exc:
            code = report_failure(exc, srv)
            thaw(run.prefix)
            finish_run(run.prefix, run.work, srv)
            return code
        thaw(run.prefix)
        finish_run(run.prefix, run.work, srv)
    result = {"machine": machine(), "load_before": run.load_before,
              "wake": {k: {"p50_s": p50(v), "n": len(v)} for k, v in wake.items()},
              "idle": idle}
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    raw_cli = p50(wake["raw CLI: unpause + exec true"])
    raw_sdk = p50(wake["raw SDK: unpause + exec_run true"])
    den = p50(wake["den: frozen -> exec true"])
    print(f"\nwake from frozen -> first exec: Den p50 {den * 1000:.0f} ms; raw CLI "
          f"{raw_cli * 1000:.0f} ms ({den / raw_cli:.2f}x), raw SDK {raw_sdk * 1000:.0f} ms "
          f"({den / raw_sdk:.2f}x)")
    if not idle:
        return 0
    print(f"exec p50 with {idle['n']} idle running / alone: "
          f"{idle['exec p50, with N idle running (s)'] / idle['exec p50, alone (s)']:.2f}x; "
          f"with {idle['n']} frozen / alone: "
          f"{idle['exec p50, with N frozen (s)'] / idle['exec p50, alone (s)']:.2f}x")
    return 0


def thaw(prefix: str) -> None:
    """Thaw every frozen container of the run, so that cleanup can remove it."""
    ps = subprocess.run(["docker", "ps", "--format", "{{.Names}}"],  # thaws only what is
                        capture_output=True, text=True)  # frozen (its cgroup or paused)
    for name in ps.stdout.split():
        if name.startswith(prefix):
            thaw_container(name)


if __name__ == "__main__":
    sys.exit(main())
