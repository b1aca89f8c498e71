"""Under load: many concurrent long execs, and short calls made meanwhile.

    .venv/bin/python -m tests.benchmarks.bench_load [--execs 200] [--sleep 2] [--json out.json]

For each configuration of the exec gate (``unbounded``: DEN_EXEC_CONCURRENCY=100000, as Den
was before the gate; ``default``: 64 running, 256 waiting; ``small``: 32 running, 32 waiting)
it starts a real ``den serve`` (temporary data dir, engine prefix ``denbench-load-<random>``),
creates one workspace, fires ``--execs`` concurrent ``sleep N`` execs at once, and meanwhile
reads a file and the workspace's state every 50 ms. It reports how long the execs took in all,
how many got 200 and 503, and the latency of the short calls made while the execs ran. Nothing
asserts on time; everything named with the prefix is removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

from tests.benchmarks.bench_workspaces import Server, finish_run, make_repo, start_run

CONFIGS = {
    "unbounded": {"exec_concurrency": 100000, "exec_queue_max": 0},
    "default": {},
    "small": {"exec_concurrency": 32, "exec_queue_max": 32},
}


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


async def load(srv: Server, ws_id: str, execs: int, sleep_s: float) -> dict[str, Any]:
    base = f"http://127.0.0.1:{srv.port}"
    headers = {"Authorization": f"Bearer {srv.token}"}
    limits = httpx.Limits(max_connections=execs + 10, max_keepalive_connections=execs + 10)
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=600,
                                 limits=limits) as client:
        done = asyncio.Event()
        short: dict[str, list[float]] = {"files": [], "state": []}

        async def one() -> int:
            r = await client.post(f"/api/v1/workspaces/{ws_id}/exec",
                                  json={"cmd": ["sleep", str(sleep_s)], "timeout_s": 600})
            return r.status_code

        async def reader() -> None:
            while not done.is_set():
                t = time.monotonic()
                r = await client.get(f"/api/v1/workspaces/{ws_id}/files",
                                     params={"path": "bench/README.md"})
                short["files"].append(time.monotonic() - t)
                assert r.status_code == 200, r.text
                t = time.monotonic()
                r = await client.get(f"/api/v1/workspaces/{ws_id}")
                short["state"].append(time.monotonic() - t)
                await asyncio.sleep(0.05)

        read = asyncio.create_task(reader())
        started = time.monotonic()
        codes = await asyncio.gather(*(one() for _ in range(execs)))
        wall = time.monotonic() - started
        done.set()
        await read
    out: dict[str, Any] = {"wall_s": round(wall, 2), "status": dict(Counter(codes))}
    for name, xs in short.items():
        out[name] = {"n": len(xs), "p50_ms": round(pct(xs, 0.5) * 1000, 1),
                     "p90_ms": round(pct(xs, 0.9) * 1000, 1),
                     "max_ms": round(max(xs, default=float("nan")) * 1000, 1)}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.benchmarks.bench_load")
    ap.add_argument("--execs", type=int, default=200)
    ap.add_argument("--sleep", type=float, default=2.0)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    results: dict[str, Any] = {"load_before": os.getloadavg()[0], "cpus": os.cpu_count()}
    for name in args.configs.split(","):
        run = start_run("load")
        if run is None:
            return 1
        srv: Server | None = None
        try:
            srv = Server(run.work, run.repos_root, run.prefix, ssh_port=0, **CONFIGS[name])
            srv.start()
            repo = make_repo(run.repos_root, run.work)
            ws_id = srv.create("bench", repo)
            srv.wait_running(ws_id)
            srv.http.post(f"/api/v1/workspaces/{ws_id}/exec", json={"cmd": ["true"]})
            results[name] = asyncio.run(load(srv, ws_id, args.execs, args.sleep))
            print(name, json.dumps(results[name]), flush=True)
        finally:
            finish_run(run.prefix, run.work, srv)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
