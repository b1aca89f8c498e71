"""Density (issue 13, part 5): what many idle running Den workspaces cost the host, and what
they do to an exec's latency.

    .venv/bin/python -m tests.benchmarks.bench_density [--counts 100,200] [--window 60]
        [--samples 40] [--batch 10] [--min-free-mb 3072] [--runtime runsc-ptrace]
        [--image den/workspace:latest] [--json out.json]

Starts a real ``den serve`` (temporary data dir, engine prefix ``denbench-dens-<random>``, the
gVisor runtime ``--runtime``: ``runsc-ptrace`` is how an operator picks the ptrace platform,
``DEN_GVISOR_RUNTIME``; idle reaper and warm pool off, so nothing is paused or frozen; each
workspace 256 MiB, 1 CPU and a 1 GiB disk of its own). Then:

1. one workspace: ``POST .../exec {"cmd": ["true"]}`` ``--samples`` times, p50 (the baseline);
2. more workspaces, created ``--batch`` at a time through the API and each waited on until
   ``running`` (and answering an exec), up to each of ``--counts``; creation stops early when
   the host's available memory falls below ``--min-free-mb`` or its threads pass
   ``--max-tasks`` of ``kernel.pid_max`` (each idle ptrace sandbox holds ~160 host threads;
   past pid_max a sandbox cannot clone and dies): the count that fit is reported;
3. at each count, after the workspaces have settled, one ``--window`` of idle: the CPU of
   every workspace's container cgroup (``cpuacct.usage``: the sandboxes alone), of ``den
   serve`` itself (``/proc/PID/stat``) and of the whole host (``/proc/stat``, which includes
   whatever else the shared machine runs: the same window before any workspace existed is
   reported as the baseline), each as % of the machine; then the exec p50 on the first
   workspace again, and its ratio to the baseline.

Every workspace is deleted at the end, and every container, volume and network with the prefix
is removed, also after a failure or Ctrl-C. Nothing asserts on time.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.benchmarks.bench_sleep import cpu_ns, full_id
from tests.benchmarks.bench_workspaces import IMAGE, Server, cleanup_engine, machine, make_repo

MEMORY_MB = 256  # each workspace's limit: idle, they use ~60 MB of host memory each


def available_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) // 1024
    return 0


def host_tasks() -> int:
    """Threads on the host now (every one takes a pid: ``kernel.pid_max`` bounds them)."""
    return int(Path("/proc/loadavg").read_text().split()[3].split("/")[1])


def pid_max() -> int:
    return int(Path("/proc/sys/kernel/pid_max").read_text())


def host_busy() -> tuple[int, int]:
    """(busy, total) jiffies of the whole host, from /proc/stat's first line."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def proc_cpu_ticks(pid: int) -> int:
    parts = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(parts[11]) + int(parts[12])  # utime + stime


def exec_p50(srv: Server, wid: str, samples: int) -> dict[str, float]:
    srv.exec_true(wid)  # warm
    times = []
    for _ in range(samples):
        t0 = time.perf_counter()
        srv.exec_true(wid)
        times.append(time.perf_counter() - t0)
    times.sort()
    return {"p50_ms": round(statistics.median(times) * 1000, 1),
            "p90_ms": round(times[int(len(times) * 0.9) - 1] * 1000, 1), "samples": samples}


def idle_window(srv: Server, containers: list[str], window: float) -> dict[str, Any]:
    cores = os.cpu_count() or 1
    assert srv.proc is not None
    cg0, den0, (busy0, total0) = cpu_ns(containers), proc_cpu_ticks(srv.proc.pid), host_busy()
    t0 = time.monotonic()
    time.sleep(window)
    elapsed = time.monotonic() - t0
    cg1, den1, (busy1, total1) = cpu_ns(containers), proc_cpu_ticks(srv.proc.pid), host_busy()
    hz = os.sysconf("SC_CLK_TCK")
    return {
        "window_s": round(elapsed, 1),
        "sandboxes_percent": round((cg1 - cg0) / 1e9 / elapsed / cores * 100, 2),
        "den_serve_percent": round((den1 - den0) / hz / elapsed / cores * 100, 2),
        "host_percent": round((busy1 - busy0) / max(1, total1 - total0) * 100, 2),
        "loadavg_1m": round(os.getloadavg()[0], 2),
        "available_mb": available_mb(),
        "host_tasks": host_tasks(),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.benchmarks.bench_density")
    ap.add_argument("--counts", default="100,200")
    ap.add_argument("--window", type=float, default=60.0)
    ap.add_argument("--settle", type=float, default=20.0)
    ap.add_argument("--samples", type=int, default=40)
    ap.add_argument("--batch", type=int, default=10)
    ap.add_argument("--min-free-mb", type=int, default=3072)
    ap.add_argument("--max-tasks", type=float, default=0.88,
                    help="stop creating past this fraction of kernel.pid_max in host threads")
    ap.add_argument("--runtime", default="runsc-ptrace")
    ap.add_argument("--image", default=IMAGE)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    counts = sorted(int(c) for c in args.counts.split(","))
    prefix = f"denbench-dens-{secrets.token_hex(3)}"
    result: dict[str, Any] = {"machine": machine(), "runtime": args.runtime,
                              "image": args.image, "memory_mb": MEMORY_MB, "rows": []}
    work = Path(tempfile.mkdtemp(prefix="den-bench-density-"))
    (work / "repos").mkdir()
    (work / "tmp").mkdir()
    repo = make_repo(work / "repos", work / "tmp")
    srv = Server(work, work / "repos", prefix, gvisor_runtime=args.runtime,
                 default_image=args.image, default_memory_mb=MEMORY_MB, default_cpus=1.0,
                 reaper_interval_s=0, pool_size=0, max_workspaces_per_user=10_000,
                 max_cpus_per_user=100_000, max_memory_mb_per_user=100_000_000,
                 max_disk_gb_per_user=1_000_000,
                 default_disk_gb=1, ssh_port=0)
    ids: list[str] = []
    try:
        srv.start()
        print(f"baseline: host idle window ({args.window:.0f} s, no workspace)...", flush=True)
        result["no_workspace"] = idle_window(srv, [], args.window)
        ids.append(srv.create("w0", repo))
        srv.wait_running(ids[0], poll_s=0.2)
        result["one"] = exec_p50(srv, ids[0], args.samples)
        print(f"one workspace: exec p50 {result['one']['p50_ms']} ms", flush=True)
        stopped_early = False
        for target in counts:
            while len(ids) < target and not stopped_early:
                if available_mb() < args.min_free_mb:
                    stopped_early, result["stopped_by"] = True, "memory"
                    break
                if host_tasks() > args.max_tasks * pid_max():
                    stopped_early, result["stopped_by"] = True, "pids"
                    break
                batch: list[str] = []
                for _ in range(min(args.batch, target - len(ids))):
                    batch.append(srv.create(f"w{len(ids)}", repo))
                    ids.append(batch[-1])  # deleted at the end whatever happens next
                for wid in batch:
                    srv.wait_running(wid, poll_s=0.2, timeout_s=600)
                    srv.exec_true(wid)
                print(f"  {len(ids)} running, {available_mb()} MB available, {host_tasks()} "
                      f"host threads (pid_max {pid_max()}), load {os.getloadavg()[0]:.1f}",
                      flush=True)
            time.sleep(args.settle)  # the last ones' boots are not idle CPU
            containers = [full_id(f"{prefix}-{wid}") for wid in ids]
            row: dict[str, Any] = {"workspaces": len(ids), "target": target,
                                   **idle_window(srv, containers, args.window)}
            row["exec"] = exec_p50(srv, ids[0], args.samples)
            row["exec_ratio_to_one"] = round(row["exec"]["p50_ms"] / result["one"]["p50_ms"], 2)
            result["rows"].append(row)
            print(json.dumps(row), flush=True)
            if stopped_early:
                break
        result["fit"] = len(ids)
    finally:
        for wid in ids:
            try:
                srv.delete(wid)
            except Exception as exc:  # cleanup_engine below removes what is left
                print(f"delete {wid}: {exc}", file=sys.stderr)
        srv.close()
        left = cleanup_engine(prefix)
        if left:
            print(f"removed leftovers: {left}", file=sys.stderr)
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
