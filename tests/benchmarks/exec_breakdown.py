"""Where an API exec's time goes.

``python -m tests.benchmarks.exec_breakdown [-n N] [--profile F]``

Starts a real ``den serve`` (the benchmark's ``Server``) with one workspace and times, n samples
each, interleaved: ``POST .../exec {"cmd": ["true"]}``; ``GET .../workspaces/{id}`` (the route
floor: auth and the workspace lookup, no agent); ``GET /healthz`` (no auth; one database
ping). Then den serve's CPU time per exec and per GET (2n calls each, from /proc: less moved
by the machine's load than the latencies). Then, in this process through the server's own
``DockerRuntime`` (which replaces den serve's agent session, so it comes last; den serve's
own next use of the agent can end it, reported as a failure of this part only): the agent's
``ping`` and its exec of ``true``; and the in-sandbox floor, ``true`` spawned by a Python
process already in the workspace. With ``--profile F`` it also records den serve under
py-spy (``--idle``, 500 Hz) during a further 300 API execs and writes the flame graph to F.
Medians and p90, in ms. No raw engine run here: bench_agent.py gives the ratio against
``exec_run``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.benchmarks.bench_agent import SPAWN_FLOOR
from tests.benchmarks.bench_workspaces import (
    CPUS,
    IMAGE,
    MEMORY_MB,
    PIDS,
    Server,
    finish_run,
    machine,
    make_repo,
    start_run,
)


def stats(xs: list[float]) -> str:
    s = sorted(xs)
    p50, p90 = s[len(s) // 2] * 1000, s[len(s) * 9 // 10] * 1000
    return f"p50 {p50:6.2f} ms  p90 {p90:6.2f} ms  n={len(s)}"


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def agent_side(wid: str, prefix: str, data_dir: Path, n: int) -> dict[str, list[float]]:
    from server.agent import ops
    from server.runtime.base import ExecRequest, WorkspaceSpec
    from server.runtime.docker import DockerRuntime
    from server.runtime.docker_specs import new_handle

    spec = WorkspaceSpec(workspace_id=wid, handle=new_handle(prefix, wid), image=IMAGE,
                         runtime="gvisor", cpus=CPUS, memory_mb=MEMORY_MB, pids_limit=PIDS,
                         hostname="bench", labels={})
    out: dict[str, list[float]] = {"agent ping": [], "agent exec true": []}

    async def run() -> None:
        rt = DockerRuntime(agent_dir=data_dir / "agent")
        try:
            session = await rt.agent(spec)
            assert session is not None, "no agent session"
            req = ExecRequest(argv=["true"])
            for _ in range(5):
                await session.request({"op": "ping"}, timeout_s=5)
                await ops.run(session, req, {})
            for _ in range(n):
                t0 = time.perf_counter()
                await session.request({"op": "ping"}, timeout_s=5)
                out["agent ping"].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                r = await ops.run(session, req, {})
                out["agent exec true"].append(time.perf_counter() - t0)
                assert r.exit_code == 0, r
            await session.close("breakdown done")
        finally:
            rt.close()

    asyncio.run(asyncio.wait_for(run(), 300))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.benchmarks.exec_breakdown")
    ap.add_argument("-n", type=int, default=60, help="samples of each (default 60)")
    ap.add_argument("--profile", type=Path, help="py-spy flame graph of den serve (SVG)")
    args = ap.parse_args(argv)
    run = start_run("execbd")
    if run is None:
        return 2
    srv: Server | None = None
    res: dict[str, list[float]] = {}
    cpu: dict[str, float] = {}
    try:
        repo = make_repo(run.repos_root, run.work)
        srv = Server(run.work, run.repos_root, run.prefix)
        srv.start()
        wid = srv.create("bd", repo)
        srv.wait_running(wid)
        http = srv.http

        def api_exec() -> None:
            r = http.post(f"/api/v1/workspaces/{wid}/exec", json={"cmd": ["true"]})
            assert r.status_code == 200 and r.json()["exit_code"] == 0, r.text

        def api_get() -> None:
            assert http.get(f"/api/v1/workspaces/{wid}").status_code == 200

        def health() -> None:
            assert http.get("/healthz").status_code == 200

        probes = {"API exec true": api_exec, "API GET workspace": api_get,
                  "GET /healthz (no auth)": health}
        for fn in probes.values():
            for _ in range(5):
                fn()
        for _ in range(args.n):
            for name, fn in probes.items():
                res.setdefault(name, []).append(timed(fn))
        # den serve's CPU per call (user + system, from /proc): what the route itself costs,
        # much less moved by the machine's load than the latencies above.
        assert srv.proc is not None
        for name, fn in (("API exec true", api_exec), ("API GET workspace", api_get)):
            before = cpu_s(srv.proc.pid)
            for _ in range(args.n * 2):
                fn()
            cpu[name] = (cpu_s(srv.proc.pid) - before) / (args.n * 2)
        if args.profile:
            assert srv.proc is not None
            spy = subprocess.Popen(["py-spy", "record", "--pid", str(srv.proc.pid), "--rate",
                                    "500", "-o", str(args.profile), "--idle"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            time.sleep(1)  # py-spy attaches
            for _ in range(300):
                api_exec()
            spy.send_signal(2)
            spy.wait(60)
        r = http.post(f"/api/v1/workspaces/{wid}/exec",
                      json={"cmd": ["python3", "-c", SPAWN_FLOOR, str(args.n)]})
        res["in-sandbox spawn of true (python)"] = [float(x) for x in r.json()["stdout"].split()]
        try:
            res.update(agent_side(wid, run.prefix, run.work / "data", args.n))
        except Exception as exc:  # the API numbers above still stand
            print(f"exec_breakdown: the agent's side failed: {exc!r}", file=sys.stderr)
    finally:
        finish_run(run.prefix, run.work, srv)
    info = machine()
    print(f"\nexec breakdown, {run.started:%Y-%m-%d %H:%M} UTC, load {run.load_before} -> "
          f"{info['loadavg_1m']}")
    for name, xs in res.items():
        print(f"  {name:36s} {stats(xs)}")
    for name, secs in cpu.items():
        print(f"  den serve CPU per {name:18s} {secs * 1000:6.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
