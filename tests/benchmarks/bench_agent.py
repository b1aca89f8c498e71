"""The workspace agent's paths (exec, streams, files) against the raw engine, in one run.

    .venv/bin/python -m tests.benchmarks.bench_agent [--quick] [--only 2,4,5] [--json out.json]

(``make bench`` runs it; docs/benchmarks.md explains the results.)

Starts a real ``den serve`` (temporary data dir, engine prefix ``denbench-agent-<random>``,
the agent built by scripts/build-agent.sh), creates one workspace through the API and one raw
runsc container with the flags Den would use (``bench_workspaces.Raw``), and does the same
work on both:

1. exec ``true``: ``POST .../exec`` vs the SDK's ``exec_run(["true"])``; p50/p90. And the
   floor under both: ``subprocess.run(["true"])`` timed inside the sandbox by one Python
   process (gVisor's cost of a new process, which every exec pays).
2. agent round trip: a ``ping`` on the agent's session, opened in this process with the
   server's own ``DockerRuntime`` (no raw equivalent). Opening it replaces den serve's session
   with the agent (a relay per session, the newest wins); den serve attaches again at its next
   call, which the next section's warm-up absorbs.
3. 100 concurrent execs of ``sleep 0.2; echo ok``: 100 threads, each with its own HTTP client,
   released together, vs 100 threads each with its own Docker client calling ``exec_run``.
4. streaming ``head -c N /dev/zero`` (1 GiB; 256 MiB with --quick) through ``WS
   .../exec/stream`` (JSON text messages; counted in UTF-8 bytes of ``data``), with den serve's
   RSS sampled every 20 ms by a thread, vs ``docker exec`` of the same on the SDK's socket
   (8-byte stream headers demultiplexed here). The server runs with exec_max_output_bytes
   raised above N: through the agent a streaming exec is cut at that limit (16 MiB by
   default) and still ends with exit code 0. Then once more with ``"binary": true`` and no
   permessage-deflate, as Den's Python client streams.
5. files: ``PUT`` then ``GET .../files`` of 100 MB of random bytes (checked by sha256) vs
   ``put_archive`` of a tar with the same file and ``get_archive`` of it, in /workspace.
6. pause + resume: not here (bench_pause.py measures it against raw checkpoint/restore).

Samples are interleaved den/raw where they are short. Every section has a sample count and a
deadline; everything named with the prefix is removed at the end. Nothing asserts on time.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import hashlib
import io
import json
import os
import re
import socket
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import httpx
from websockets.sync.client import connect

from tests.benchmarks.bench_workspaces import (
    CPUS,
    IMAGE,
    MEMORY_MB,
    PIDS,
    Raw,
    Results,
    Server,
    finish_run,
    machine,
    make_repo,
    median,
    ms,
    p90,
    report_failure,
    sigterm_as_interrupt,
    start_run,
)

MB = 1_000_000
MiB = 1 << 20
FILE_BYTES = 100 * MB
CONCURRENCY = 100
SLEEP_CMD = ["sh", "-c", "sleep 0.2; echo ok"]
SPAWN_FLOOR = ("import subprocess, sys, time\n"
               "for _ in range(int(sys.argv[1])):\n"
               "    t0 = time.perf_counter(); subprocess.run(['true'], check=True)\n"
               "    print(time.perf_counter() - t0)\n")


def p99(xs: list[float]) -> float:
    if len(xs) < 2:
        return xs[0] if xs else float("nan")
    return sorted(xs)[min(len(xs) - 1, round(0.99 * (len(xs) - 1)))]


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class RssPeak:
    """Samples a process's VmRSS every ``every_s`` in a thread: the baseline and the peak."""

    def __init__(self, pid: int, every_s: float = 0.02) -> None:
        self.pid, self.every_s = pid, every_s
        self.before = self.peak = rss_bytes(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.peak = max(self.peak, rss_bytes(self.pid))
            except OSError:
                return

    def __enter__(self) -> RssPeak:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.peak = max(self.peak, rss_bytes(self.pid))

    @property
    def growth(self) -> int:
        return self.peak - self.before


@dataclass
class Bench:
    srv: Server
    raw: Raw
    raw_name: str
    wid: str
    prefix: str
    res: Results
    notes: list[str]

    @property
    def ctr(self) -> Any:
        return self.raw.sdk.containers.get(self.raw_name)

    def den_exec(self, cmd: list[str], client: httpx.Client | None = None) -> dict[str, Any]:
        http = client or self.srv.http
        r = http.post(f"/api/v1/workspaces/{self.wid}/exec", json={"cmd": cmd})
        return self.srv._ok(r, 200)


def timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def check(cond: bool, what: str) -> None:
    if not cond:
        raise RuntimeError(what)


# --- 1. exec `true` ---------------------------------------------------------------------------


def bench_exec(b: Bench, samples: int, deadline_s: float) -> None:
    ctr = b.ctr

    def den() -> None:
        out = b.den_exec(["true"])
        check(out["exit_code"] == 0, f"den exec true exited {out['exit_code']}")

    def raw() -> None:
        code, _ = ctr.exec_run(["true"])
        check(code == 0, f"exec_run true exited {code}")

    for _ in range(3):
        den()
        raw()
    # The floor: the same `true` spawned inside the sandbox by a process already there (no
    # Den, no engine), timed in there. Under gVisor a new process costs most of an exec.
    floor = b.den_exec(["python3", "-c", SPAWN_FLOOR, str(samples)])
    check(floor["exit_code"] == 0, f"the spawn-floor script failed: {floor['stderr']}")
    for line in floor["stdout"].split():
        b.res.add("in-sandbox spawn of true", float(line))
    end = time.monotonic() + deadline_s
    for i in range(samples):
        pair = [("den exec true", den), ("raw exec true", raw)]
        for key, fn in pair if i % 2 == 0 else pair[::-1]:
            b.res.add(key, timed(fn))
        if time.monotonic() > end:
            b.notes.append(f"exec true: stopped at {i + 1}/{samples} samples (deadline)")
            break


# --- 2. agent ping ----------------------------------------------------------------------------


def bench_ping(b: Bench, data_dir: Path, samples: int, deadline_s: float) -> None:
    from server.runtime.base import WorkspaceSpec
    from server.runtime.docker import DockerRuntime
    from server.runtime.docker_specs import new_handle

    spec = WorkspaceSpec(workspace_id=b.wid, handle=new_handle(b.prefix, b.wid), image=IMAGE,
                         runtime="gvisor", cpus=CPUS, memory_mb=MEMORY_MB, pids_limit=PIDS,
                         hostname="bench", labels={})

    async def run() -> None:
        rt = DockerRuntime(agent_dir=data_dir / "agent")
        try:
            t0 = time.perf_counter()
            session = await rt.agent(spec)
            b.res.add("agent attach (relay exec + HELLO)", time.perf_counter() - t0)
            check(session is not None, "the workspace has no agent session (engine exec path)")
            assert session is not None
            for _ in range(10):
                await session.request({"op": "ping"}, timeout_s=5)
            end = time.monotonic() + deadline_s
            for i in range(samples):
                t0 = time.perf_counter()
                await session.request({"op": "ping"}, timeout_s=5)
                b.res.add("agent ping", time.perf_counter() - t0)
                if time.monotonic() > end:
                    b.notes.append(f"agent ping: stopped at {i + 1}/{samples} (deadline)")
                    break
            await session.close("benchmark done")
        finally:
            rt.close()

    asyncio.run(asyncio.wait_for(run(), deadline_s + 60))


# --- 3. 100 concurrent execs ------------------------------------------------------------------


def bench_concurrent(b: Bench, rounds: int, deadline_s: float) -> None:
    n = CONCURRENCY
    base = str(b.srv.http.base_url)
    headers = dict(b.srv.http.headers)
    clients = [httpx.Client(base_url=base, headers=headers, timeout=deadline_s) for _ in range(n)]
    sdks = [docker.from_env(timeout=int(deadline_s)) for _ in range(n)]
    ctrs = [s.containers.get(b.raw_name) for s in sdks]

    def den_one(i: int) -> tuple[float, bool, str]:
        t0 = time.perf_counter()
        try:
            r = clients[i].post(f"/api/v1/workspaces/{b.wid}/exec", json={"cmd": SLEEP_CMD})
            ok = r.status_code == 200 and r.json()["exit_code"] == 0 \
                and r.json()["stdout"] == "ok\n"
            why = "" if ok else f"{r.status_code} {r.text[:200]}"
        except Exception as exc:  # counted as a failure, reported below
            ok, why = False, repr(exc)
        return time.perf_counter() - t0, ok, why

    def raw_one(i: int) -> tuple[float, bool, str]:
        t0 = time.perf_counter()
        try:
            code, out = ctrs[i].exec_run(SLEEP_CMD)
            ok, why = code == 0 and out == b"ok\n", f"exit {code} {out[:200]!r}"
        except Exception as exc:
            ok, why = False, repr(exc)
        return time.perf_counter() - t0, ok, why

    def burst(name: str, one: Callable[[int], tuple[float, bool, str]]) -> None:
        barrier = threading.Barrier(n)

        def task(i: int) -> tuple[float, bool, str]:
            barrier.wait(timeout=30)
            return one(i)

        t0 = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(max_workers=n) as pool:
            futs = [pool.submit(task, i) for i in range(n)]
            done, pending = concurrent.futures.wait(futs, timeout=deadline_s)
        wall = time.perf_counter() - t0
        results = [f.result() for f in done]
        oks = [r for r in results if r[1]]
        fails = [r[2] for r in results if not r[1]]
        b.res.add(f"{name} 100x: succeeded (count)", float(len(oks)))
        b.res.add(f"{name} 100x: wall (all done)", wall)
        for lat, _ok, _why in results:
            b.res.add(f"{name} 100x: each", lat)
        if pending or fails:
            b.notes.append(f"{name} 100 concurrent: {len(oks)}/{n} ok, {len(pending)} not done "
                           f"in {deadline_s:.0f} s; first failures: {fails[:3]}")

    try:
        for _ in range(3):  # warm the HTTP connections a little (not timed)
            b.den_exec(SLEEP_CMD)
        for i in range(rounds):
            order = [("den", den_one), ("raw", raw_one)]
            for name, fn in order if i % 2 == 0 else order[::-1]:
                burst(name, fn)
    finally:
        for c in clients:
            c.close()
        for s in sdks:
            s.close()


# --- 4. streaming -----------------------------------------------------------------------------


@dataclass
class Streamed:
    seconds: float
    nbytes: int
    messages: int
    rss_growth: int  # den serve's, peak - before
    server_cpu_s: float  # den serve's user + system CPU
    client_cpu_s: float  # this process's (parsing the JSON messages)


def den_stream(b: Bench, nbytes: int, deadline_s: float, *, printable: bool = False,
               binary: bool = False) -> Streamed:
    """One streamed exec of ``nbytes`` zero bytes (``printable``: of 'a's, no JSON escapes;
    ``binary``: output as binary frames, the first byte naming the stream)."""
    assert b.srv.proc is not None
    url = f"ws://127.0.0.1:{b.srv.port}/api/v1/workspaces/{b.wid}/exec/stream"
    cmd = ["head", "-c", str(nbytes), "/dev/zero"]
    if printable:
        cmd = ["sh", "-c", f"head -c {nbytes} /dev/zero | tr '\\0' a"]
    got = msgs = 0
    code: int | None = None
    pid = b.srv.proc.pid
    with RssPeak(pid) as rss:
        cpu0, client0 = cpu_seconds(pid), time.process_time()
        t0 = time.perf_counter()
        # binary: as Den's Python client streams (binary frames, no permessage-deflate)
        with connect(url, additional_headers={"Authorization": f"Bearer {b.srv.token}"},
                     max_size=None, open_timeout=30,
                     compression=None if binary else "deflate") as ws:
            ws.send(json.dumps({"cmd": cmd, **({"binary": True} if binary else {})}))
            end = time.monotonic() + deadline_s
            while code is None:
                left = end - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"den stream: {got} of {nbytes} bytes in {deadline_s} s")
                raw = ws.recv(timeout=left)
                if isinstance(raw, bytes):
                    check(raw[:1] in (b"\x01", b"\x02"), "den stream: a bad binary frame")
                    if raw[0] == 1:
                        got += len(raw) - 1
                        msgs += 1
                    continue
                msg = json.loads(raw)
                kind = msg.get("type")
                if kind == "stdout":
                    got += len(msg["data"].encode())
                    msgs += 1
                elif kind == "exit":
                    code = int(msg["exit_code"])
                elif kind != "stderr":
                    raise RuntimeError(f"den stream: unexpected message {str(msg)[:300]}")
        dt = time.perf_counter() - t0
        cpu, client = cpu_seconds(pid) - cpu0, time.process_time() - client0
    check(code == 0 and got == nbytes, f"den stream: exit {code} after {got} of {nbytes} bytes "
          "(cut at the server's exec_max_output_bytes?)")
    return Streamed(dt, got, msgs, rss.growth, cpu, client)


def raw_stream(b: Bench, nbytes: int, deadline_s: float) -> tuple[float, int]:
    from server.runtime.docker import _raw_socket

    api = b.raw.sdk.api
    t0 = time.perf_counter()
    ex = api.exec_create(b.raw_name, ["head", "-c", str(nbytes), "/dev/zero"], stdout=True,
                         stderr=True, stdin=False, tty=False)
    resp = api.exec_start(ex["Id"], socket=True)
    sock: socket.socket = _raw_socket(resp)
    sock.settimeout(deadline_s)
    buf = bytearray(4 * MiB)
    view = memoryview(buf)
    have = pos = 0  # bytes in buf; where the next header starts
    need = 0  # payload bytes of the current frame still to come
    got = {1: 0, 2: 0}
    stream = 1
    end = time.monotonic() + deadline_s
    try:
        while True:
            if time.monotonic() > end:
                raise TimeoutError(f"raw stream: {got[1]} of {nbytes} bytes in {deadline_s} s")
            if pos == have:
                pos = have = 0
            elif pos > len(buf) // 2:  # keep a partial header at the front
                buf[: have - pos] = buf[pos:have]
                have, pos = have - pos, 0
            n = sock.recv_into(view[have:])
            if n == 0:
                break
            have += n
            while pos < have:
                if need:
                    take = min(need, have - pos)
                    got[stream] += take
                    need -= take
                    pos += take
                    continue
                if have - pos < 8:
                    break
                stream = buf[pos]
                need = int.from_bytes(buf[pos + 4: pos + 8], "big")
                got.setdefault(stream, 0)
                pos += 8
    finally:
        sock.close()
        if hasattr(resp, "close"):
            resp.close()
    dt = time.perf_counter() - t0
    check(got[1] == nbytes, f"raw stream: {got} of {nbytes} bytes")
    return dt, got[1]


def bench_stream(b: Bench, nbytes: int, rounds: int, deadline_s: float) -> None:
    den_stream(b, 4 * MiB, deadline_s)  # warm-up (and den serve's session with the agent)
    raw_stream(b, 4 * MiB, deadline_s)
    for i in range(rounds):
        order = ["den", "raw"] if i % 2 == 0 else ["raw", "den"]
        for which in order:
            if which == "den":
                st = den_stream(b, nbytes, deadline_s)
                dt, got = st.seconds, st.nbytes
                b.res.add("den stream MB/s", got / dt / MB)
                b.res.add("den stream: den serve RSS growth (MB)", st.rss_growth / MB)
                b.res.add("den stream: bytes per message", got / max(1, st.messages))
                b.res.add("den stream: den serve CPU s per 100 MB", st.server_cpu_s * 100 * MB
                          / got)
                b.res.add("den stream: client CPU s per 100 MB", st.client_cpu_s * 100 * MB / got)
            else:
                dt, got = raw_stream(b, nbytes, deadline_s)
                b.res.add("raw stream MB/s", got / dt / MB)
            print(f"  stream {i + 1}/{rounds} {which}: {got / dt / MB:.0f} MB/s", flush=True)
    st = den_stream(b, nbytes, deadline_s, binary=True)
    b.res.add("den stream MB/s, binary frames", st.nbytes / st.seconds / MB)
    b.res.add("den stream, binary: den serve CPU s per 100 MB",
              st.server_cpu_s * 100 * MB / st.nbytes)
    b.res.add("den stream, binary: client CPU s per 100 MB",
              st.client_cpu_s * 100 * MB / st.nbytes)
    print(f"  stream binary den: {st.nbytes / st.seconds / MB:.0f} MB/s", flush=True)
    # Not in the table: the same through JSON without escapes (NUL is \u0000, 6 bytes).
    st = den_stream(b, nbytes // 4, deadline_s, printable=True)
    b.res.add("den stream MB/s, printable 'a's (1/4 of N, tr)", st.nbytes / st.seconds / MB)
    b.res.add("den stream, printable: den serve CPU s per 100 MB",
              st.server_cpu_s * 100 * MB / st.nbytes)


METRICS_TOKEN = "bench-agent-metrics"


def _by_path(b: Bench, metric: str) -> dict[str, float]:
    """A counter of den serve's /metrics by its ``path`` label."""
    text = b.srv.http.get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}).text
    return {m[1]: float(m[2]) for m in
            re.finditer(rf'^{metric}\{{path="(\w+)"\}} (\S+)$', text, re.M)}


# --- 5. files ---------------------------------------------------------------------------------


def bench_files(b: Bench, rounds: int, deadline_s: float) -> None:
    data = os.urandom(FILE_BYTES)
    digest = hashlib.sha256(data).hexdigest()
    tar_buf = io.BytesIO()
    with tarfile.open(fileobj=tar_buf, mode="w") as tar:
        info = tarfile.TarInfo("blob.bin")
        info.size, info.mode = len(data), 0o644
        tar.addfile(info, io.BytesIO(data))
    tar_bytes = tar_buf.getvalue()
    http = httpx.Client(base_url=str(b.srv.http.base_url), headers=dict(b.srv.http.headers),
                        timeout=deadline_s)
    ctr = b.ctr
    path = f"/api/v1/workspaces/{b.wid}/files"

    def den_put() -> None:
        b.srv._ok(http.put(path, params={"path": "blob.bin"}, content=data), 200)

    def den_get() -> None:
        r = http.get(path, params={"path": "blob.bin"})
        if r.status_code != 200:
            b.srv._ok(r, 200)  # raises with the answer
        check(hashlib.sha256(r.content).hexdigest() == digest, "den GET: wrong contents")

    def raw_put() -> None:
        check(ctr.put_archive("/workspace", tar_bytes), "put_archive failed")

    def raw_get() -> None:
        chunks, _stat = ctr.get_archive("/workspace/blob.bin")
        body = b"".join(chunks)
        with tarfile.open(fileobj=io.BytesIO(body)) as tar:
            member = tar.extractfile("blob.bin")
            assert member is not None
            check(hashlib.sha256(member.read()).hexdigest() == digest, "get_archive: wrong")

    try:
        end = time.monotonic() + deadline_s
        for i in range(rounds):
            order = ["den", "raw"] if i % 2 == 0 else ["raw", "den"]
            for which in order:
                put, get = (den_put, den_get) if which == "den" else (raw_put, raw_get)
                t_put, t_get = timed(put), timed(get)
                b.res.add(f"{which} file PUT MB/s", FILE_BYTES / t_put / MB)
                b.res.add(f"{which} file GET MB/s", FILE_BYTES / t_get / MB)
                print(f"  files {i + 1}/{rounds} {which}: PUT {FILE_BYTES / t_put / MB:.0f}, "
                      f"GET {FILE_BYTES / t_get / MB:.0f} MB/s", flush=True)
            if time.monotonic() > end:
                b.notes.append(f"files: stopped at {i + 1}/{rounds} rounds (deadline)")
                break
        b.notes.append(f"files by path: {_by_path(b, 'den_file_transfers_total')}")
    finally:
        http.close()
        subprocess.run(["docker", "exec", b.raw_name, "rm", "-f", "/workspace/blob.bin"],
                       capture_output=True)


# --- report -----------------------------------------------------------------------------------


def mbs(x: float) -> str:
    return f"{x:.0f} MB/s"


def table(res: Results) -> tuple[str, list[dict[str, Any]]]:
    s = res.samples

    def get(k: str) -> list[float]:
        return s.get(k, [])

    lines: list[list[str]] = []
    rows: list[dict[str, Any]] = []

    def add(op: str, raw: str, den: str, ratio: float | None, goal: str,
            met: bool | None) -> None:
        lines.append([op, raw, den, "-" if ratio is None else f"{ratio:.2f}x", goal,
                      "-" if met is None else ("yes" if met else "NO")])
        rows.append({"operation": op, "raw": raw, "den": den, "ratio": ratio, "goal": goal,
                     "met": met})

    r, d = get("raw exec true"), get("den exec true")
    if r and d:
        add(f"exec `true` p50 (p90), n={len(d)}", f"{ms(median(r))} ({ms(p90(r))})",
            f"{ms(median(d))} ({ms(p90(d))})", median(d) / median(r), "<= 10 ms p50",
            median(d) <= 0.010)
    f = get("in-sandbox spawn of true")
    if f and d:
        add(f"exec `true` p50 against spawning it inside the sandbox, n={len(f)}",
            f"{ms(median(f))} ({ms(p90(f))})", f"{ms(median(d))} ({ms(p90(d))})",
            median(d) / median(f), "-", None)
    if d := get("agent ping"):
        add(f"agent ping p50 (p90), n={len(d)}", "-",
            f"{median(d) * 1e3:.2f} ms ({p90(d) * 1e3:.2f} ms)", None, "<= 2 ms",
            median(d) <= 0.002)
    r, d = get("raw 100x: each"), get("den 100x: each")
    if r and d:
        rok, dok = get("raw 100x: succeeded (count)"), get("den 100x: succeeded (count)")
        bursts = len(dok)
        add(f"100 concurrent execs, p50 (p99), {bursts} burst(s)",
            f"{int(sum(rok))}/{CONCURRENCY * len(rok)} ok, {ms(median(r))} ({ms(p99(r))})",
            f"{int(sum(dok))}/{CONCURRENCY * bursts} ok, {ms(median(d))} ({ms(p99(d))})",
            median(d) / median(r), "all succeed", sum(dok) == CONCURRENCY * bursts)
    r, d = get("raw stream MB/s"), get("den stream MB/s")
    if r and d:
        add(f"stream /dev/zero over WS, median of {len(d)}", mbs(median(r)), mbs(median(d)),
            median(d) / median(r), ">= 200 MB/s", median(d) >= 200)
    if d := get("den stream: den serve RSS growth (MB)"):
        add("den serve RSS growth while streaming (max)", "-", f"{max(d):.1f} MB", None,
            "< 50 MB", max(d) < 50)
    for way in ("PUT", "GET"):
        r, d = get(f"raw file {way} MB/s"), get(f"den file {way} MB/s")
        if r and d:
            add(f"files {way} 100 MB, median of {len(d)}", mbs(median(r)), mbs(median(d)),
                median(d) / median(r), ">= 100 MB/s", median(d) >= 100)
    add("pause + resume", "-", "skipped: see bench_pause.py", None, "-", None)
    header = ["operation", "raw engine", "Den", "Den/raw", "goal", "met?"]
    widths = [max(len(x) for x in col) for col in zip(header, *lines, strict=False)]
    fmt = "| " + " | ".join(f"{{:<{w}}}" for w in widths) + " |"
    out = [fmt.format(*header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [fmt.format(*line) for line in lines]
    return "\n".join(out), rows


def details(res: Results) -> str:
    out = ["Details (median, p90, n):"]
    width = max((len(k) for k in res.samples), default=0)
    for k, v in sorted(res.samples.items()):
        if "MB" in k or "(count)" in k or "per message" in k:  # not times
            out.append(f"  {k:<{width}}  median {median(v):10.1f}  p90 {p90(v):10.1f}  "
                       f"n={len(v)}")
        else:
            out.append(f"  {k:<{width}}  median {ms(median(v)):>8}  p90 {ms(p90(v)):>8}  "
                       f"n={len(v)}")
    return "\n".join(out)


def git_head() -> str:
    p = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return p.stdout.strip() or "unknown"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.benchmarks.bench_agent",
                                 description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true",
                    help="fewer samples and a 256 MiB stream (a smoke run)")
    ap.add_argument("--json", type=Path, help="also write the results to this JSON file")
    ap.add_argument("--only", default="", metavar="N,N",
                    help="run only these sections (numbers, e.g. 4,5)")
    ap.add_argument("--agent", default="", help="the den-agent binary to run in the workspace "
                    "(default: this tree's build); an older one measures the paths it had")
    args = ap.parse_args(argv)
    quick = args.quick
    exec_samples, ping_samples = (20, 200) if quick else (50, 200)
    bursts, stream_rounds, file_rounds = (1, 1, 1) if quick else (3, 2, 3)
    stream_bytes = 256 * MiB if quick else 1024 * MiB

    run = start_run("agent")
    if run is None:
        return 2
    res, notes = Results(), list[str]()
    srv: Server | None = None
    raw: Raw | None = None
    failed = 0
    print(f"bench: prefix {run.prefix}{' (quick)' if quick else ''}", flush=True)
    try:
        with sigterm_as_interrupt():
            repo = make_repo(run.repos_root, run.work)
            raw = Raw(run.prefix, run.work, repo)
            # Room for the 100 MB file (the default limit is 64 MiB), and for the stream: the
            # agent applies exec_max_output_bytes (16 MiB by default) to a streaming exec too,
            # which then ends early with exit code 0 and no sign of the cut.
            srv = Server(run.work, run.repos_root, run.prefix, file_max_bytes=256 * MiB,
                         exec_max_output_bytes=2 * stream_bytes, metrics_token=METRICS_TOKEN,
                         **({"agent_binary": args.agent} if args.agent else {}))
            srv.start()
            raw_name = f"{run.prefix}-raw"
            raw.create(raw_name)
            wid = srv.create("agent", repo)
            srv.wait_running(wid)
            b = Bench(srv, raw, raw_name, wid, run.prefix, res, notes)
            sections: list[tuple[str, Callable[[], None]]] = [
                (f"1. exec true ({exec_samples} samples each)",
                 lambda: bench_exec(b, exec_samples, 120)),
                (f"2. agent ping ({ping_samples} samples)",
                 lambda: bench_ping(b, run.work / "data", ping_samples, 60)),
                (f"3. {CONCURRENCY} concurrent execs ({bursts} burst(s) each)",
                 lambda: bench_concurrent(b, bursts, 120)),
                (f"4. stream {stream_bytes // MiB} MiB ({stream_rounds} round(s) each)",
                 lambda: bench_stream(b, stream_bytes, stream_rounds, 600)),
                (f"5. files PUT/GET 100 MB ({file_rounds} round(s) each)",
                 lambda: bench_files(b, file_rounds, 300)),
            ]
            only = {int(n) for n in args.only.split(",") if n.strip()}
            for title, fn in sections:
                if only and int(title.split(".")[0]) not in only:
                    continue
                print(f"bench: {title}", flush=True)
                t0 = time.perf_counter()
                fn()
                print(f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
    except BaseException as exc:
        failed = report_failure(exc, srv)
    finally:
        finish_run(run.prefix, run.work, srv)
    if failed and not res.samples:
        return failed

    text, rows = table(res)
    info = machine()
    print()
    print(f"Den's agent vs raw engine, {run.started:%Y-%m-%d %H:%M} UTC, {info['cpus']} CPUs, "
          f"Docker {info['docker']}, {info['runsc']}, load {run.load_before} -> "
          f"{info['loadavg_1m']}{', --quick' if quick else ''}")
    print(f"commit: {git_head()}")
    print(text)
    print("Den/raw: time ratio for latencies (lower is better), throughput ratio for MB/s "
          "(higher is better).")
    for note in notes:
        print(f"note: {note}")
    print()
    print(details(res))
    if args.json:
        args.json.write_text(json.dumps({
            "started_at": run.started.isoformat(), "machine": info, "quick": quick,
            "commit": git_head(), "table": rows, "notes": notes, "samples": res.samples,
        }, indent=2))
        print(f"\nbench: wrote {args.json}")
    return failed


if __name__ == "__main__":
    sys.exit(main())
