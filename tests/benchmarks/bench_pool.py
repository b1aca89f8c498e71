"""Create → first exec from the warm pool, against Den without the pool and the raw engine, in
one run.

    .venv/bin/python -m tests.benchmarks.bench_pool [--rounds N] [--json out.json]

(docs/benchmarks.md explains the results.)

Two ``den serve`` (engine prefixes ``denbench-pool-<random>-{warm,cold}``, removed at the end,
also after a failure), the same settings but ``DEN_POOL_SIZE`` (1 and 0), and the raw engine,
interleaved round by round on the same small repository (7 files over 4 commits):

* **warm**: a create through Den's Python client (``POST /workspaces``, then it waits on the
  workspace's event stream until ``running``; ``--poll-ms N``: a GET every N ms instead),
  ``POST .../exec true``; timed from the POST to the exec's answer, once the pool has a
  sandbox waiting (the wait is not counted); the event log must say the create took it.
* **cold**: the same on the server without a pool.
* **raw**: ``docker run -d`` (Den's own container spec as flags) and ``docker exec C true``;
  and the raw create as bench_workspaces times it (clone, volume, run, cp, first exec).
* **thaw**: Den's runtime thawing the raw sandbox after freezing it (cgroup freezer and
  ``docker unpause``): what a claim pays for keeping pooled sandboxes frozen.

Workspaces are deleted after each round (not counted). Nothing asserts on time.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import secrets
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.benchmarks.bench_workspaces import (
    Raw,
    Server,
    machine,
    make_repo,
    sh,
    timed,
)
from tests.conftest import remove_engine_objects

METRICS_TOKEN = "bench-pool"


def summary(xs: list[float]) -> dict[str, float]:
    ordered = sorted(xs)
    return {"p50_s": round(statistics.median(ordered), 3),
            "p90_s": round(ordered[max(0, int(len(ordered) * 0.9) - 1)], 3), "n": len(xs)}


def waiting(srv: Server) -> int:
    text = srv.http.get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}).text
    return int(sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("den_pool_sandboxes{")))


def thaw_time(container: str) -> float:
    """Seconds Den's runtime takes to thaw a frozen sandbox (what a claim pays for keeping
    pooled sandboxes frozen instead of running)."""
    from server.runtime.base import WorkspaceSpec
    from server.runtime.docker import DockerRuntime

    rt = DockerRuntime()
    spec = WorkspaceSpec(workspace_id=container, handle={"container": container, "volume": ""},
                         image="", runtime="gvisor", cpus=1, memory_mb=512, pids_limit=1,
                         hostname="", labels={})

    async def run() -> float:
        await rt.freeze(spec)
        t = time.perf_counter()
        await rt.thaw(spec)
        return time.perf_counter() - t

    try:
        return asyncio.run(run())
    finally:
        rt.close()


def den_create(srv: Server, name: str, repo: Path, *, poll_ms: float = 0
               ) -> tuple[float, bool]:
    """Seconds from the create's POST to the first exec's answer; whether the pool served it.
    The create as Den's Python client makes it (it waits on the workspace's event stream), or,
    with ``poll_ms``, a GET every ``poll_ms``."""
    from server.client import Den

    t = time.perf_counter()
    if poll_ms:
        wid = srv.create(name, repo)
        srv.wait_running(wid, poll_s=poll_ms / 1000)
    else:
        with Den(f"http://127.0.0.1:{srv.port}", srv.token) as den:
            wid = den.create(str(repo), name=name, timeout_s=120).id
    srv.exec_true(wid)
    took = time.perf_counter() - t
    hit = any(e["kind"] == "pool" and "took a sandbox" in e["message"] for e in srv.events(wid))
    srv.delete(wid)
    return took, hit


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--poll-ms", type=float, default=0,
                    help="wait for running with a GET every N ms (default: as Den's Python "
                         "client does, on the workspace's event stream)")
    args = ap.parse_args()
    prefix = f"denbench-pool-{secrets.token_hex(2)}"
    work = Path(tempfile.mkdtemp(prefix="den-bench-pool-"))
    repos = work / "repos"
    repos.mkdir()
    repo = make_repo(repos, work)
    load_before = os.getloadavg()
    servers = {kind: Server(work / kind, repos, f"{prefix}-{kind}", pool_size=size,
                            reaper_interval_s=0, ssh_port=0, metrics_token=METRICS_TOKEN)
               for kind, size in (("warm", 1), ("cold", 0))}
    raw = Raw(f"{prefix}-raw", work, repo)
    samples: dict[str, list[float]] = {"warm": [], "cold": [], "raw_run_exec": [],
                                       "raw_create": [], "thaw": []}
    misses = 0
    try:
        for srv in servers.values():
            srv.start()
        den_create(servers["cold"], "warmup", repo)  # first create of each: not counted
        deadline = time.monotonic() + 120
        while waiting(servers["warm"]) < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        den_create(servers["warm"], "warmup", repo)
        for i in range(args.rounds):
            deadline = time.monotonic() + 120
            while waiting(servers["warm"]) < 1 and time.monotonic() < deadline:
                time.sleep(0.05)  # refilled: not counted
            took, hit = den_create(servers["warm"], f"w{i}", repo, poll_ms=args.poll_ms)
            if hit:
                samples["warm"].append(took)
            else:
                misses += 1
            samples["cold"].append(den_create(servers["cold"], f"c{i}", repo,
                                              poll_ms=args.poll_ms)[0])
            name = f"{prefix}-raw-{i}"
            run = timed(functools.partial(sh, *raw.run_args(name, f"{name}-vol")))
            first = timed(functools.partial(sh, "docker", "exec", name, "true"))
            samples["raw_run_exec"].append(run + first)
            samples["thaw"].append(thaw_time(name))
            raw.remove(name)
            subprocess.run(["docker", "volume", "rm", "-f", f"{name}-vol"], capture_output=True)
            samples["raw_create"].append(raw.create(f"{prefix}-rawc-{i}")["total"])
            raw.remove(f"{prefix}-rawc-{i}")
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip()
        result: dict[str, Any] = {
            "commit": commit, "machine": machine(), "poll_ms": args.poll_ms,
            "load_before": [round(x, 2) for x in load_before],
            "load_after": [round(x, 2) for x in os.getloadavg()],
            "pool_misses": misses,
            **{k: summary(v) for k, v in samples.items() if v}}
        warm = statistics.median(samples["warm"]) if samples["warm"] else float("nan")
        result["ratios"] = {
            "warm_vs_raw_run_exec": round(warm / statistics.median(samples["raw_run_exec"]), 2),
            "warm_vs_cold": round(warm / statistics.median(samples["cold"]), 2),
            "warm_vs_raw_create": round(warm / statistics.median(samples["raw_create"]), 2)}
        print(json.dumps(result, indent=2))
        if args.json:
            args.json.write_text(json.dumps(result, indent=2))
    finally:
        for srv in servers.values():
            srv.close()
        remove_engine_objects(prefix)  # the pool's frozen sandbox too
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
