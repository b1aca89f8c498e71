"""Density of paused workspaces (issue 13, part 5: "2,000 paused"): what N workspaces paused
in the saved tier (a stopped container, its memory checkpoint and its disk) cost Den, the
engine and the host, against the same measurements with one paused, in the same run.

    .venv/bin/python -m tests.benchmarks.bench_paused [--count 2000] [--concurrency 4]
        [--window 60] [--samples 40] [--wakes 5] [--work DIR] [--keep] [--json out.json]

Starts a real ``den serve`` (data dir and SQLite under ``--work`` or a new temporary one,
engine prefix ``denbench-paused-<random>``, warm pool off, the idle reaper on at its default
interval but with an idle timeout longer than the run, so that its passes over every
workspace are measured without it putting anything to sleep; each workspace 256 MiB, 1 CPU
and a 1 GiB disk of its own, as an operator's default disk enforcement makes it). Each
workspace is made from one small local repository (``POST /workspaces``, waited on until
``running``) and paused with ``POST .../pause``, which always saves the memory to disk (the
saved tier; only the idle reaper freezes), at most ``--concurrency`` at once: no more than
that many sandboxes ever run.

With one workspace paused, then with ``--count``, it measures:

* ``GET /api/v1/workspaces``: the first page (``?limit=100``) and all pages (following
  ``next``), and the whole list in one answer (no ``limit``), p50/p90 of ``--samples``;
* ``GET /api/v1/workspaces/{id}``, p50/p90; ``GET /metrics`` (an admin's token), p50/p90;
* wake on access: ``POST .../exec {"cmd": ["true"]}`` on the paused probe workspace until
  it answers, ``--wakes`` times, each paused again after;
* an idle ``--window``: ``den serve``'s CPU (``/proc/PID/stat``) and RSS, ``dockerd``'s and
  ``containerd``'s CPU and RSS, and the host's CPU, each CPU as % of the machine; the host's
  threads (each takes a pid) and the workspace disks mounted;
* a restart: SIGTERM -> exited, start -> the log's "reconciled with the database" line, and
  -> ``/healthz`` answering 200 (the server serves once reconcile is done);
* disk per paused workspace: the container's directory in the engine (its checkpoint) and its
  disk image under the data dir (allocated blocks, ``du``), over every workspace.

Creation is resumable: ``--work DIR --keep`` keeps the server's data and the engine objects
when the run ends (or is stopped), and a later run with the same ``--work`` goes on from the
workspaces already there (and measures them again: run it from another tree to compare two
versions of Den on the same workspaces); ``--work DIR --cleanup-only`` removes them.
Without ``--keep`` every workspace is deleted at the end and every container, volume and
network with the prefix removed, also after a failure or Ctrl-C. Creation stops early when the
disk passes ``--max-disk-percent``, after ``--fill-minutes`` or at ``--fill-until``; with
``--wait-for FILE`` it waits for that file before creating. Nothing asserts on time.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tests.benchmarks.bench_density import available_mb, host_busy, host_tasks, proc_cpu_ticks
from tests.benchmarks.bench_workspaces import (
    Server,
    cleanup_engine,
    ignore_interrupts,
    machine,
    make_repo,
    median,
    p90,
    restore_interrupts,
    sigterm_as_interrupt,
)

MEMORY_MB = 256
PAGE = 100
PROBE = "probe"  # the workspace woken and paused again for the wake samples


def stats(xs: list[float]) -> dict[str, float]:
    return {"p50_ms": round(median(xs) * 1000, 1), "p90_ms": round(p90(xs) * 1000, 1),
            "n": len(xs)}


def timed_samples(fn: Any, samples: int) -> list[float]:
    fn()  # warm
    out = []
    for _ in range(samples):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def pid_of(name: str) -> int | None:
    out = subprocess.run(["pidof", "-s", name], capture_output=True, text=True).stdout.strip()
    return int(out) if out else None


def disk_percent(path: Path) -> float:
    """Use of the filesystem holding ``path`` as ``df`` counts it (blocks reserved for root
    are neither used nor available)."""
    st = os.statvfs(path)
    used = st.f_blocks - st.f_bfree
    return used / max(1, used + st.f_bavail) * 100


def du_bytes(paths: list[Path]) -> int:
    """Allocated bytes under these paths (sparse files count what they hold)."""
    total = 0
    for chunk in range(0, len(paths), 200):
        part = [str(p) for p in paths[chunk:chunk + 200] if p.exists()]
        if part:
            out = subprocess.run(["du", "-s", "-B1", "-c", *part], capture_output=True,
                                 text=True).stdout.splitlines()
            total += int(out[-1].split()[0]) if out else 0
    return total


class Bench:
    """The server and the paused workspaces it holds."""

    def __init__(self, srv: Server, repo: Path, data_dir: Path) -> None:
        self.srv = srv
        self.repo = repo
        self.data_dir = data_dir
        self.failed = 0
        self.admin_token = srv._cli("admin", "token", "--user", "bench-admin", "--admin")
        self._lock = threading.Lock()

    def list_page(self, limit: int | None, after: str | None = None) -> dict[str, Any]:
        params: dict[str, Any] = {}
        if limit is not None:
            params["limit"] = limit
        if after is not None:
            params["after"] = after
        return self.srv._ok(self.srv.http.get("/api/v1/workspaces", params=params), 200)

    def list_all_pages(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        after = None
        while True:
            page = self.list_page(PAGE, after)
            out += page["workspaces"]
            after = page.get("next")
            if not after:
                return out

    def names(self) -> dict[str, dict[str, Any]]:
        return {w["name"]: w for w in self.list_all_pages()}

    def wait_state(self, wid: str, state: str, timeout_s: float = 600) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            ws = self.srv._ok(self.srv.http.get(f"/api/v1/workspaces/{wid}"), 200)
            if ws["state"] == state:
                return
            if ws["state"] == "error" or time.monotonic() > deadline:
                raise RuntimeError(f"workspace {wid} is {ws['state']}: {ws['state_reason']}")
            time.sleep(0.3)

    def make_paused(self, name: str) -> str | None:
        """Create, wait until running, pause (saved tier); None (and deleted) on failure."""
        wid = None
        try:
            wid = self.srv.create(name, self.repo)
            self.wait_state(wid, "running")
            ws = self.srv._ok(self.srv.http.post(f"/api/v1/workspaces/{wid}/pause"), 200)
            if ws["state"] != "paused" or ws["sleep"] != "saved":
                raise RuntimeError(f"pause left {name} {ws['state']} ({ws['sleep']})")
            return wid
        except Exception as exc:
            print(f"  {name}: {exc}", file=sys.stderr, flush=True)
            with self._lock:
                self.failed += 1
            if wid is not None:
                with contextlib.suppress(Exception):
                    self.srv.delete(wid)
            return None

    def fill(self, count: int, concurrency: int, max_disk_percent: float,
             deadline: float = float("inf")) -> tuple[int, str]:
        """Make paused workspaces ``p00001``... until ``count`` exist, or until the
        ``deadline`` (monotonic time) passes; (how many exist, why it stopped early)."""
        have = set(self.names())
        todo = [f"p{i:05d}" for i in range(1, count) if f"p{i:05d}" not in have]
        made, t0, stopped = len(have), time.monotonic(), ""
        shown = made
        with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
            pending: set[concurrent.futures.Future[str | None]] = set()
            names = iter(todo)
            while True:
                while len(pending) < concurrency and not stopped:
                    if disk_percent(self.data_dir) > max_disk_percent:
                        stopped = "disk"
                        break
                    if self.failed > 20 + made // 20:
                        stopped = "failures"
                        break
                    if time.monotonic() > deadline:
                        stopped = "time"
                        break
                    name = next(names, None)
                    if name is None:
                        break
                    pending.add(pool.submit(self.make_paused, name))
                if not pending:
                    break
                done, pending = concurrent.futures.wait(
                    pending, return_when=concurrent.futures.FIRST_COMPLETED)
                made += sum(1 for f in done if f.result() is not None)
                if made - shown >= 50 or not pending:
                    shown = made
                    rate = (made - len(have)) / max(1e-6, time.monotonic() - t0)
                    print(f"  {made} paused ({rate:.2f}/s, {self.failed} failed), disk "
                          f"{disk_percent(self.data_dir):.0f}%, load {os.getloadavg()[0]:.1f}",
                          flush=True)
        return made, stopped

    def measure(self, probe: str, *, samples: int, wakes: int, window: float) -> dict[str, Any]:
        srv = self.srv
        out: dict[str, Any] = {"loadavg_1m_before": round(os.getloadavg()[0], 2)}
        listed = self.list_page(None)["workspaces"]
        out["workspaces"] = len(listed)
        out["paused_saved"] = sum(1 for w in listed
                                  if w["state"] == "paused" and w["sleep"] == "saved")
        out["list_first_page"] = stats(timed_samples(lambda: self.list_page(PAGE), samples))
        out["list_all_pages"] = stats(timed_samples(self.list_all_pages,
                                                    max(5, samples // 4)))
        out["list_one_answer"] = stats(timed_samples(lambda: self.list_page(None),
                                                     max(5, samples // 4)))
        out["get_one"] = stats(timed_samples(
            lambda: srv._ok(srv.http.get(f"/api/v1/workspaces/{probe}"), 200), samples))
        admin = {"Authorization": f"Bearer {self.admin_token}"}
        out["metrics_scrape"] = stats(timed_samples(
            lambda: srv.http.get("/metrics", headers=admin).raise_for_status(),
            max(5, samples // 4)))
        wake: list[float] = []
        pause: list[float] = []
        for _ in range(wakes):
            t0 = time.perf_counter()
            srv.exec_true(probe)
            wake.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            srv.lifecycle(probe, "pause")
            pause.append(time.perf_counter() - t0)
        out["wake_exec"] = stats(wake)
        out["pause_again"] = stats(pause)
        out["idle"] = self.idle(window)
        out["restart"] = self.restart()
        out["get_one_after_restart"] = stats(timed_samples(
            lambda: srv._ok(srv.http.get(f"/api/v1/workspaces/{probe}"), 200), samples))
        out["disk"] = self.disk([w["id"] for w in listed])
        return out

    def idle(self, window: float) -> dict[str, Any]:
        assert self.srv.proc is not None
        pid, cores, hz = self.srv.proc.pid, os.cpu_count() or 1, os.sysconf("SC_CLK_TCK")
        daemons = {n: p for n in ("dockerd", "containerd") if (p := pid_of(n)) is not None}
        rss0 = rss_mb(pid)
        den0, (busy0, total0) = proc_cpu_ticks(pid), host_busy()
        d0 = {n: proc_cpu_ticks(p) for n, p in daemons.items()}
        t0 = time.monotonic()
        time.sleep(window)
        elapsed = time.monotonic() - t0
        den1, (busy1, total1) = proc_cpu_ticks(pid), host_busy()
        d1 = {n: proc_cpu_ticks(p) for n, p in daemons.items()}

        def pct(ticks: int) -> float:
            return round(ticks / hz / elapsed / cores * 100, 2)

        return {"window_s": round(elapsed, 1), "den_serve_percent": pct(den1 - den0),
                **{f"{n}_percent": pct(d1[n] - d0[n]) for n in daemons},
                "host_percent": round((busy1 - busy0) / max(1, total1 - total0) * 100, 2),
                "den_serve_rss_mb_before": rss0, "den_serve_rss_mb": rss_mb(pid),
                **{f"{n}_rss_mb": rss_mb(p) for n, p in daemons.items()},
                "loadavg_1m": round(os.getloadavg()[0], 2), "available_mb": available_mb(),
                "host_threads": host_tasks(), "disk_mounts": sum(
                    1 for line in Path("/proc/mounts").read_text().splitlines()
                    if f" {self.data_dir}/disks/" in line)}

    def restart(self) -> dict[str, float]:
        srv = self.srv
        t0 = time.perf_counter()
        srv.stop()
        stopped = time.perf_counter() - t0
        log_at = srv.log.stat().st_size
        marker = b"reconciled with the database"
        reconciled: list[float] = []

        def watch() -> None:  # the log line, seen as it is written
            with srv.log.open("rb") as f:
                f.seek(log_at)
                seen = b""
                while not reconciled and time.perf_counter() - t1 < 900:
                    seen = seen[-200:] + f.read()
                    if marker in seen:
                        reconciled.append(time.perf_counter() - t1)
                        return
                    time.sleep(0.02)

        t1 = time.perf_counter()
        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        srv.start(timeout_s=900)
        ready = time.perf_counter() - t1
        watcher.join(timeout=5)
        return {"stop_s": round(stopped, 2), "start_to_reconciled_s":
                round(reconciled[0], 2) if reconciled else float("nan"),
                "start_to_healthz_s": round(ready, 2)}

    def disk(self, ids: list[str]) -> dict[str, Any]:
        root = Path(subprocess.run(["docker", "info", "-f", "{{.DockerRootDir}}"],
                                   capture_output=True, text=True).stdout.strip())
        names = [f"{self.srv.prefix}-{wid}" for wid in ids]
        cids: list[str] = []
        for chunk in range(0, len(names), 200):
            out = subprocess.run(["docker", "inspect", "-f", "{{.Id}}", *names[chunk:chunk + 200]],
                                 capture_output=True, text=True).stdout.split()
            cids += out
        containers = du_bytes([root / "containers" / c for c in cids])
        disks = du_bytes(sorted((self.data_dir / "disks").glob("*.img")))
        n = max(1, len(ids))
        return {"workspaces": len(ids), "containers_mb_each": round(containers / n / 2**20, 2),
                "disk_images_mb_each": round(disks / n / 2**20, 2),
                "total_mb_each": round((containers + disks) / n / 2**20, 2),
                "disk_percent": round(disk_percent(self.data_dir), 1)}

    def delete_all(self, concurrency: int) -> None:
        try:
            ids = [w["id"] for w in self.list_all_pages()]
        except Exception as exc:  # cleanup_engine removes what is left
            print(f"bench: cannot list for cleanup: {exc}", file=sys.stderr)
            return
        print(f"bench: deleting {len(ids)} workspaces", flush=True)

        def one(wid: str) -> None:
            try:
                self.srv.delete(wid)
            except Exception as exc:
                print(f"delete {wid}: {exc}", file=sys.stderr)

        with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(one, ids))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.benchmarks.bench_paused",
                                 description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--count", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--window", type=float, default=60.0)
    ap.add_argument("--samples", type=int, default=40)
    ap.add_argument("--wakes", type=int, default=5)
    ap.add_argument("--max-disk-percent", type=float, default=85.0)
    ap.add_argument("--fill-minutes", type=float, default=0,
                    help="stop creating after this long and measure what exists (0: no limit)")
    ap.add_argument("--fill-until", help="HH:MM (UTC): stop creating then and measure")
    ap.add_argument("--wait-for", type=Path,
                    help="after measuring one paused, wait until this file exists to create "
                         "the others (the shared machine is quiet for the first part)")
    ap.add_argument("--work", type=Path, help="keep the server's data here (resumable)")
    ap.add_argument("--keep", action="store_true",
                    help="leave the workspaces and the data at the end (resume later)")
    ap.add_argument("--cleanup-only", action="store_true",
                    help="with --work: delete what an earlier --keep run left, and nothing else")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if args.cleanup_only:
        args.keep = False

    work = args.work or Path(tempfile.mkdtemp(prefix="den-bench-paused-"))
    work.mkdir(parents=True, exist_ok=True)
    state = work / "bench-paused.json"
    resumed = state.exists()
    prefix = (json.loads(state.read_text())["prefix"] if resumed
              else f"denbench-paused-{secrets.token_hex(3)}")
    repos, data = work / "repos", work / "data"
    if not resumed:
        repos.mkdir()
        (work / "tmp").mkdir()
        make_repo(repos, work / "tmp")
        state.write_text(json.dumps({"prefix": prefix}))
    repo = repos / "bench.git"
    result: dict[str, Any] = {"machine": machine(), "prefix": prefix, "count": args.count,
                              "memory_mb": MEMORY_MB, "tier": "saved", "resumed": resumed}
    srv: Server | None = None
    bench: Bench | None = None
    failed = 0
    print(f"bench: prefix {prefix}, work {work}", flush=True)
    try:
        with sigterm_as_interrupt():
            srv = Server(work, repos, prefix, default_memory_mb=MEMORY_MB, default_cpus=1.0,
                         default_disk_gb=1, pool_size=0, idle_timeout_s=86400,
                         stop_after_s=0, max_workspaces_per_user=100_000,
                         max_cpus_per_user=1_000_000, max_memory_mb_per_user=1_000_000_000,
                         max_disk_gb_per_user=10_000_000, ssh_port=0)
            srv.start(timeout_s=900)
            bench = Bench(srv, repo, data)
            if args.cleanup_only:
                return 0  # the finally below deletes everything
            known = bench.names()
            probe = known[PROBE]["id"] if PROBE in known else bench.make_paused(PROBE)
            if probe is None:
                raise RuntimeError("the probe workspace could not be made")
            if len(known) <= 1:
                print("bench: measuring with 1 paused", flush=True)
                result["one"] = bench.measure(probe, samples=args.samples, wakes=args.wakes,
                                              window=args.window)
                print(json.dumps(result["one"]), flush=True)
                if args.work:
                    state.write_text(json.dumps({"prefix": prefix, "one": result["one"]}))
            else:
                result["one"] = json.loads(state.read_text()).get("one")
            while args.wait_for is not None and not args.wait_for.exists():
                time.sleep(15)
            print(f"bench: making {args.count} paused workspaces, {args.concurrency} at once",
                  flush=True)
            t0 = time.monotonic()
            deadline = t0 + args.fill_minutes * 60 if args.fill_minutes > 0 else float("inf")
            if args.fill_until:
                hh, mm = (int(x) for x in args.fill_until.split(":"))
                now = datetime.now(UTC)
                until = now.replace(hour=hh, minute=mm, second=0, microsecond=0)
                deadline = min(deadline, t0 + (until - now).total_seconds())
            made, stopped = bench.fill(args.count, args.concurrency, args.max_disk_percent,
                                       deadline=deadline)
            result["fill"] = {"made": made, "stopped_by": stopped, "failed": bench.failed,
                              "seconds": round(time.monotonic() - t0, 1)}
            print(f"bench: measuring with {made} paused", flush=True)
            result["many"] = bench.measure(probe, samples=args.samples, wakes=args.wakes,
                                           window=args.window)
            print(json.dumps(result["many"]), flush=True)
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt):
            print("\nbench: interrupted", file=sys.stderr)
            failed = 130
        else:
            print(f"bench: failed: {exc!r}", file=sys.stderr)
            if srv is not None:
                print(f"--- server log (tail) ---\n{srv.log_tail()}", file=sys.stderr)
            failed = 1
    finally:
        ignore_interrupts()  # cleanup finishes
        if not args.keep:
            with contextlib.suppress(BaseException):
                if bench is not None and srv is not None and srv.proc is not None \
                        and srv.proc.poll() is None:
                    bench.delete_all(args.concurrency)
        if srv is not None:
            srv.close()
        if not args.keep:
            left = cleanup_engine(prefix)
            if left:
                print(f"bench: removed {len(left)} leftover engine objects", flush=True)
            shutil.rmtree(work, ignore_errors=True)
        restore_interrupts()
    if "one" in result and "many" in result and result["one"]:
        result["ratios"] = ratios(result["one"], result["many"])
        print(json.dumps(result["ratios"], indent=2))
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return failed


def ratios(one: dict[str, Any], many: dict[str, Any]) -> dict[str, float]:
    """Many paused against one, p50 to p50."""
    out: dict[str, float] = {}
    for key in ("list_first_page", "list_all_pages", "list_one_answer", "get_one",
                "metrics_scrape",
                "wake_exec", "pause_again", "get_one_after_restart"):
        if key in one and key in many:
            out[key] = round(many[key]["p50_ms"] / max(0.1, one[key]["p50_ms"]), 2)
    for key in ("start_to_reconciled_s", "start_to_healthz_s"):
        out[key] = round(many["restart"][key] / max(0.01, one["restart"][key]), 2)
    return out


if __name__ == "__main__":
    sys.exit(main())
