"""Where an idle gVisor sandbox's CPU goes: per process and per thread, with wakeups.

    .venv/bin/python -m tests.benchmarks.bench_idle [--window S] [--runtimes runsc,runsc-ptrace]
        [--image den/workspace:latest] [--payloads sleep,den-init,...] [--json out.json]

(docs/benchmarks.md, "Where an idle sandbox's CPU goes", explains the results.)

For each runtime it starts three raw sandboxes with the spec Den builds for a workspace
(``raw_run_flags``; only the runtime and the main process differ): one running ``sleep
infinity``, one running Den's init and agent (``INIT_COMMAND``), and one running them without
earlyoom (``DEN_MEMORY_MB`` emptied: den-init then does not start it). All of them idle at the same
time; over one window it reads, on the host, the CPU of each container's cgroup
(``cpuacct.usage``: other work on the shared machine does not count) and, for every thread in
that cgroup, its run time and context switches (``/proc/PID/task/TID/schedstat`` and
``status``), grouped by process (the sentry ``runsc-sandbox``, the ``runsc-gofer``, systrap's
stub processes). Context switches a second are the sandbox's wakeups.

Den's memory guard watches each running workspace from the host (server/workspaces/
memory_guard.py): during the window every sandbox's memory cgroup is armed the same way (an
eventfd on ``memory.usage_in_bytes`` at the workspace's ``memory_mb`` and at the hard point),
and the signals it got are counted: an idle workspace should get none, and the guard's thread
(the server's event loop) has nothing to do. Since den-init no longer starts earlyoom, an image
built from this tree makes ``den-init`` and ``den-init-no-earlyoom`` the same workload.

Every container and volume it makes carries the prefix ``denbench-idle-*`` and is removed at
the end. Nothing asserts on time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.benchmarks.bench_sleep import CPUACCT, cpu_ns, full_id
from tests.benchmarks.bench_workspaces import IMAGE, MEMORY_MB, machine, raw_run_flags

# What each sandbox runs: its main process (None: Den's INIT_COMMAND) and extra docker flags.
# den-init starts earlyoom only when DEN_MEMORY_MB is set: the third one shows what it costs.
PAYLOADS: dict[str, tuple[list[str] | None, list[str]]] = {
    "sleep": (["sleep", "infinity"], []),
    "den-init": (None, []),
    "den-init-no-earlyoom": (None, ["-e", "DEN_MEMORY_MB="]),
}


def sh(*argv: str) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=True,
                          timeout=120).stdout


def start(name: str, runtime: str, payload: str, image: str = IMAGE) -> str:
    from server.runtime import docker_specs

    flags = [f if not f.startswith("--runtime=") else f"--runtime={runtime}"
             for f in raw_run_flags(f"{name}-data", image=image)]
    main, extra = PAYLOADS[payload]
    cmd = main or list(docker_specs.INIT_COMMAND)
    sh("docker", "run", "-d", "--name", name, *flags, *extra, image, *cmd)
    return name


def arm(container_id: str) -> Any:
    """The memory guard's alarm on the container's cgroup (None where it cannot be armed)."""
    from server.runtime.cgroup_memory import UsageAlarm, read_bytes

    directory = Path("/sys/fs/cgroup/memory/docker") / container_id
    soft = MEMORY_MB * 1024 * 1024
    limit = read_bytes(directory / "memory.limit_in_bytes") or soft
    try:
        return UsageAlarm(directory, sorted({soft, soft + max(0, limit - soft) // 2}))
    except OSError as exc:
        print(f"bench: cannot arm {container_id[:12]}: {exc}", file=sys.stderr)
        return None


def role(pid: str) -> str:
    """What a sandbox process is, from its command line."""
    with contextlib.suppress(OSError):
        argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
        if argv0 in ("runsc-sandbox", "runsc-gofer"):
            return argv0
        return "stub" if argv0 in ("", "exe") or "runsc" not in argv0 else argv0
    return "gone"


def threads(container_id: str) -> dict[tuple[str, str], tuple[int, int]]:
    """(pid, tid) -> (run time ns, context switches) for every thread in the cgroup."""
    out: dict[tuple[str, str], tuple[int, int]] = {}
    pids: list[str] = []
    with contextlib.suppress(OSError):
        pids = (CPUACCT / container_id / "cgroup.procs").read_text().split()
    for pid in pids:
        with contextlib.suppress(OSError):
            for tid in os.listdir(f"/proc/{pid}/task"):
                with contextlib.suppress(OSError, ValueError, IndexError):
                    ns = int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
                    status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
                    sw = sum(int(line.split()[1]) for line in status.splitlines()
                             if "ctxt_switches:" in line)
                    out[(pid, tid)] = (ns, sw)
    return out


def breakdown(cid: str, before: dict[tuple[str, str], tuple[int, int]],
              after: dict[tuple[str, str], tuple[int, int]], window: float) -> dict[str, Any]:
    per_role: dict[str, dict[str, float]] = {}
    busiest: list[tuple[float, float, str]] = []
    for key, (ns, sw) in after.items():
        if key not in before:
            continue
        d_ms, d_sw = (ns - before[key][0]) / 1e6 / window, (sw - before[key][1]) / window
        r = role(key[0])
        agg = per_role.setdefault(r, {"ms_per_s": 0.0, "wakeups_per_s": 0.0, "threads": 0})
        agg["ms_per_s"] += d_ms
        agg["wakeups_per_s"] += d_sw
        agg["threads"] += 1
        busiest.append((d_ms, d_sw, r))
    busiest.sort(reverse=True)
    return {"roles": {r: {k: round(v, 3) for k, v in a.items()} for r, a in per_role.items()},
            "busiest_threads": [{"role": r, "ms_per_s": round(ms, 3),
                                 "wakeups_per_s": round(sw, 1)} for ms, sw, r in busiest[:4]]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.benchmarks.bench_idle")
    ap.add_argument("--window", type=float, default=15.0)
    ap.add_argument("--runtimes", default="runsc,runsc-ptrace")
    ap.add_argument("--image", default=IMAGE)
    ap.add_argument("--payloads", default=",".join(PAYLOADS))
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    runtimes = args.runtimes.split(",")
    payloads = args.payloads.split(",")
    known = json.loads(sh("docker", "info", "--format", "{{json .Runtimes}}"))
    if missing := [r for r in runtimes if r not in known]:
        print(f"bench: runtimes {missing} are not registered with the engine", file=sys.stderr)
        return 2
    prefix = f"denbench-idle-{secrets.token_hex(3)}"
    made: list[str] = []
    result: dict[str, Any] = {"machine": machine(), "window_s": args.window,
                              "image": args.image, "sandboxes": {}}
    alarms: dict[str, Any] = {}
    try:
        for rt in runtimes:
            for payload in payloads:
                made.append(start(f"{prefix}-{rt}-{payload}", rt, payload, args.image))
        for n in made:
            sh("docker", "exec", n, "true")
        time.sleep(5)  # booted: boot CPU is not idle CPU
        ids = {n: full_id(n) for n in made}
        alarms = {n: arm(cid) for n, cid in ids.items()}
        for alarm in alarms.values():
            if alarm is not None:
                alarm.drain()
        cg0 = {n: cpu_ns([cid]) for n, cid in ids.items()}
        th0 = {n: threads(cid) for n, cid in ids.items()}
        t0 = time.monotonic()
        time.sleep(args.window)
        elapsed = time.monotonic() - t0
        cg1 = {n: cpu_ns([cid]) for n, cid in ids.items()}
        th1 = {n: threads(cid) for n, cid in ids.items()}
        cores = os.cpu_count() or 1
        for n in made:
            label = n.removeprefix(prefix + "-")
            used_ms = (cg1[n] - cg0[n]) / 1e6 / elapsed
            result["sandboxes"][label] = {
                "cgroup_ms_per_s": round(used_ms, 3),
                "machine_percent": round(used_ms / (10 * cores), 3),
                "guard_signals": (alarms[n].drain() if alarms[n] is not None else None),
                **breakdown(ids[n], th0[n], th1[n], elapsed)}
    finally:
        for alarm in alarms.values():
            if alarm is not None:
                alarm.close()
        for n in made:
            subprocess.run(["docker", "rm", "-f", n], capture_output=True)
            subprocess.run(["docker", "volume", "rm", "-f", f"{n}-data"], capture_output=True)
    print(json.dumps(result, indent=2))
    print()
    for label, r in result["sandboxes"].items():
        roles = ", ".join(f"{k} {v['ms_per_s']:.2f} ms/s {v['wakeups_per_s']:.0f} wakeups/s"
                          for k, v in sorted(r["roles"].items()))
        print(f"{label}: {r['cgroup_ms_per_s']:.2f} ms/s ({r['machine_percent']:.2f}% of the "
              f"machine), guard signals {r['guard_signals']}; {roles}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
