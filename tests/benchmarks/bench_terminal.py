"""Keystroke-to-echo latency of the web terminal against ``docker exec -it``, in one run.

    .venv/bin/python -m tests.benchmarks.bench_terminal [--keys N] [--rounds R] [--json out.json]

(``make bench-terminal``; docs/benchmarks.md explains the results.)

Starts a real ``den serve`` on a free loopback port (temporary data dir, engine prefix
``denbench-<random>``), creates one workspace under runsc, and types into four terminals of
that same sandbox, one key at a time, timing from the key's send to its echo on the screen:

1. **den**: ``WS /api/v1/workspaces/{id}/terminal`` with a bearer token, the way xterm.js
   uses it (a binary frame per key; output as JSON messages): the WebSocket, Den, the
   engine's exec stream, the workspace's PTY, tmux and bash's line editor, and back; through
   a minimal client that reads its socket in the measuring thread, as a browser does. Also
   **den (websockets client)**: the same through the ``websockets`` sync client, whose reader
   thread adds its own hand-off (shown for comparison, not in the ratio).
2. **raw tmux**: ``docker exec -it -u dev CONTAINER bash -lc 'tmux new-session -A -s ...'``
   on a local pseudo-terminal: the same shell stack as Den's terminal without Den (the
   ratio den / raw tmux is Den's own cost).
3. **raw bash**: ``docker exec -it -u dev CONTAINER bash -l``: no tmux either.

The four are interleaved round by round so that drift hits all of them. A key counts as
echoed when it appears in the output outside escape sequences. Nothing here asserts on time.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import pty
import re
import select
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from websockets.sync.client import ClientConnection, connect

from tests.benchmarks.bench_workspaces import (
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

KEYS = "abcdefgijknopqstuvwxyz"  # letters; 'h', 'l', 'm' and 'r' end common escape sequences
ANSI = re.compile(rb"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(\x07|\x1b\\)|\x1b[()][0-9A-Za-z]"
                  rb"|\x1b[=>78DEHMc]")
CLEAR_EVERY = 30  # keys per line before Ctrl-U clears it (not timed)
COLS, ROWS = 120, 40


class Terminal:
    """One terminal under test: send bytes, read output with a deadline."""

    name = ""

    def send(self, data: bytes) -> None:
        raise NotImplementedError

    def read(self, timeout_s: float) -> bytes:
        """Output available within ``timeout_s`` (b"" when none)."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def drain(self, quiet_s: float = 0.3, max_s: float = 10) -> bytes:
        """Read until the output has been quiet for ``quiet_s``."""
        out = bytearray()
        deadline = time.monotonic() + max_s
        while time.monotonic() < deadline:
            chunk = self.read(quiet_s)
            if not chunk:
                break
            out += chunk
        return bytes(out)

    def wait_for(self, needle: bytes, timeout_s: float = 60) -> None:
        out = bytearray()
        deadline = time.monotonic() + timeout_s
        while needle not in ANSI.sub(b"", bytes(out)):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: no {needle!r} in {bytes(out[-300:])!r}")
            out += self.read(0.5)

    def keystroke(self, key: str, timeout_s: float = 10) -> float:
        """Seconds from sending ``key`` until it is echoed."""
        want = key.encode()
        out = bytearray()
        t0 = time.perf_counter()
        self.send(want)
        while True:
            out += self.read(timeout_s)
            if want in ANSI.sub(b"", bytes(out)):
                return time.perf_counter() - t0
            if time.perf_counter() - t0 > timeout_s:
                raise RuntimeError(f"{self.name}: {key!r} not echoed: {bytes(out[-200:])!r}")


class DenTerminal(Terminal):
    name = "den (websockets client)"

    def __init__(self, port: int, token: str, wid: str) -> None:
        url = (f"ws://127.0.0.1:{port}/api/v1/workspaces/{wid}/terminal"
               f"?cols={COLS}&rows={ROWS}&session=bench")
        self._stack = contextlib.ExitStack()
        self.sock: ClientConnection = self._stack.enter_context(connect(
            url, additional_headers={"Authorization": f"Bearer {token}"}, open_timeout=60))

    def send(self, data: bytes) -> None:
        self.sock.send(data)  # binary frame, as xterm.js sends keys

    def read(self, timeout_s: float) -> bytes:
        out = bytearray()
        try:
            raw = self.sock.recv(timeout=timeout_s)
        except TimeoutError:
            return b""
        if isinstance(raw, bytes):
            return raw
        msg = json.loads(raw)
        if msg["type"] in ("stdout", "stderr"):
            out += msg["data"].encode()
        elif msg["type"] in ("exit", "error"):
            raise RuntimeError(f"den terminal ended: {msg}")
        return bytes(out)

    def close(self) -> None:
        self._stack.close()


class PlainDenTerminal(Terminal):
    """The same terminal WebSocket through a minimal RFC 6455 client on a blocking socket, read
    in this thread, as a browser does it: the ``websockets`` sync client above hands every
    frame from its own reader thread to this one, and that hop (with the GIL) is a cost of the
    measuring client, not of Den."""

    name = "den"

    def __init__(self, port: int, token: str, wid: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        key = base64.b64encode(os.urandom(16)).decode()
        path = (f"/api/v1/workspaces/{wid}/terminal?cols={COLS}&rows={ROWS}"
                "&session=bench-plain")
        self.sock.sendall((f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                           "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                           f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                           f"Authorization: Bearer {token}\r\n\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise RuntimeError("den: the terminal WebSocket was refused")
            head += chunk
        head, _, self.buf = head.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 101"):
            raise RuntimeError(f"den: no WebSocket upgrade: {head[:200]!r}")

    def send(self, data: bytes) -> None:
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
        assert len(data) < 126
        self.sock.sendall(bytes([0x82, 0x80 | len(data)]) + mask + masked)

    def _take(self, n: int, deadline: float) -> bytes | None:
        while len(self.buf) < n:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.sock], [], [], left)[0]:
                return None
            chunk = self.sock.recv(65536)
            if not chunk:
                raise RuntimeError("den: the terminal WebSocket closed")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def read(self, timeout_s: float) -> bytes:
        deadline = time.monotonic() + timeout_s
        head = self._take(2, deadline)
        if head is None:
            return b""
        size, extra = head[1] & 0x7F, {126: 2, 127: 8}.get(head[1] & 0x7F, 0)
        if extra:
            ext = self._take(extra, deadline + 10)
            assert ext is not None
            size = int.from_bytes(ext, "big")
        payload = self._take(size, deadline + 10) if size else b""
        assert payload is not None
        if head[0] & 0x0F != 0x1:  # only text frames (JSON) carry output
            return b""
        msg = json.loads(payload)
        if msg["type"] in ("exit", "error"):
            raise RuntimeError(f"den terminal ended: {msg}")
        return str(msg.get("data", "")).encode() if msg["type"] in ("stdout", "stderr") else b""

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


class DockerTerminal(Terminal):
    """``docker exec -it`` on a local pseudo-terminal, like a person's terminal emulator."""

    def __init__(self, name: str, container: str, command: list[str]) -> None:
        self.name = name
        master, slave = pty.openpty()
        os.set_blocking(master, False)
        subprocess.run(["stty", "-F", os.ttyname(slave), "cols", str(COLS), "rows", str(ROWS)],
                       check=True)
        self.master = master
        self.proc = subprocess.Popen(
            ["docker", "exec", "-it", "-u", "dev", "-w", "/workspace/bench",
             "-e", "TERM=xterm-256color", container, *command],
            stdin=slave, stdout=slave, stderr=slave, start_new_session=True, close_fds=True)
        os.close(slave)

    def send(self, data: bytes) -> None:
        os.write(self.master, data)

    def read(self, timeout_s: float) -> bytes:
        ready, _, _ = select.select([self.master], [], [], timeout_s)
        if not ready:
            return b""
        try:
            return os.read(self.master, 65536)
        except OSError:
            return b""

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self.master, b"\x04")
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        os.close(self.master)


def ready(term: Terminal) -> None:
    """Wait for the prompt, then clear whatever tmux or bash printed."""
    term.wait_for(b"$ ")
    term.drain()


def measure(term: Terminal, n: int, offset: int) -> list[float]:
    samples = []
    for i in range(n):
        if i and i % CLEAR_EVERY == 0:
            term.send(b"\x15")  # Ctrl-U: clear the line, untimed
            term.drain(0.15)
        samples.append(term.keystroke(KEYS[(offset + i) % len(KEYS)]))
    term.send(b"\x15")
    term.drain(0.15)
    return samples


def container_of(wid: str) -> str:
    out = subprocess.run(["docker", "ps", "--filter", f"label=den.workspace={wid}",
                          "--format", "{{.Names}}"], capture_output=True, text=True, check=True)
    names = out.stdout.split()
    if len(names) != 1:
        raise RuntimeError(f"expected one container for {wid}, found {names}")
    return names[0]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.benchmarks.bench_terminal",
                                 description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--keys", type=int, default=60, help="keystrokes per terminal per round (60)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (5)")
    ap.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = ap.parse_args(argv)
    run = start_run()
    if run is None:
        return 2
    prefix, work, repos_root, started = run.prefix, run.work, run.repos_root, run.started
    load_before = run.load_before
    samples: dict[str, list[float]] = {"den": [], "den (websockets client)": [],
                                       "raw tmux": [], "raw bash": []}
    srv: Server | None = None
    terms: list[Terminal] = []
    failed = 0
    print(f"bench: prefix {prefix}, {args.rounds} rounds of {args.keys} keys", flush=True)
    try:
        with sigterm_as_interrupt():
            repo = make_repo(repos_root, work)
            srv = Server(work, repos_root, prefix)
            srv.start()
            wid = srv.create("term", repo)
            srv.wait_running(wid)
            container = container_of(wid)
            makers: dict[str, Callable[[], Terminal]] = {
                "den": lambda: PlainDenTerminal(srv.port, srv.token, wid),  # type: ignore[union-attr]
                "den (websockets client)": lambda: DenTerminal(
                    srv.port, srv.token, wid),  # type: ignore[union-attr]
                "raw tmux": lambda: DockerTerminal(
                    "raw tmux", container,
                    ["bash", "-lc", "exec tmux new-session -A -s bench-raw"]),
                "raw bash": lambda: DockerTerminal("raw bash", container, ["bash", "-l"]),
            }
            opened: dict[str, Terminal] = {}
            for name, make in makers.items():
                opened[name] = make()
                terms.append(opened[name])
                ready(opened[name])
                measure(opened[name], 10, 0)  # warm up
            for r in range(args.rounds):
                for name, term in opened.items():
                    samples[name] += measure(term, args.keys, r * args.keys)
                print(f"bench: round {r + 1}: " + ", ".join(
                    f"{k} {ms(median(v[-args.keys:]))}" for k, v in samples.items()),
                    flush=True)
    except BaseException as exc:
        failed = report_failure(exc, srv)
    finally:
        finish_run(prefix, work, srv, *(term.close for term in terms))
    if failed:
        return failed

    info = machine()
    info["loadavg_1m_before"] = load_before
    base = median(samples["raw tmux"])
    rows: list[dict[str, Any]] = []
    print()
    print(f"Keystroke to echo, {started:%Y-%m-%d %H:%M} UTC, {info['cpus']} CPUs, {info['os']},"
          f" Docker {info['docker']}, {info['runsc']}, load {load_before} -> "
          f"{info['loadavg_1m']}, {len(samples['den'])} keys each, code {info['git']}")
    print()
    print("| terminal | median | p90 | vs raw tmux |")
    print("|---|---|---|---|")
    for name, xs in samples.items():
        ratio = median(xs) / base
        rows.append({"terminal": name, "median_s": median(xs), "p90_s": p90(xs),
                     "ratio_vs_raw_tmux": ratio, "n": len(xs)})
        print(f"| {name} | {ms(median(xs))} | {ms(p90(xs))} | {ratio:.2f}x |")
    if args.json:
        args.json.write_text(json.dumps({"started_at": started.isoformat(), "machine": info,
                                         "rows": rows, "samples": samples}, indent=2))
        print(f"\nbench: wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
