"""QEMU's monitor (QMP) over a VM's ``qmp.sock``: the messages (pure) and a small blocking
client (the backend calls it off the event loop). QEMU serves one monitor client at a time;
Den connects for one operation and closes.

Everything QEMU sends is read line by line with a bound on the line's length; events that
arrive between a command and its answer are skipped.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from server.runtime.errors import EngineError

MAX_LINE = 1 << 20  # one QMP message; QEMU's answers to Den's commands are small


class QmpError(EngineError):
    """QEMU answered a command with an error, or the monitor went away."""


def command(name: str, **arguments: Any) -> bytes:
    """One QMP command as the bytes to send."""
    msg: dict[str, Any] = {"execute": name}
    if arguments:
        msg["arguments"] = arguments
    return json.dumps(msg, sort_keys=True).encode() + b"\n"


def answer(line: bytes) -> tuple[str, Any]:
    """What one line from QEMU is: ``("return", value)``, ``("error", description)``,
    ``("event", name)`` or ``("greeting", version)``."""
    try:
        msg = json.loads(line)
    except ValueError as exc:
        raise QmpError(f"QEMU's monitor sent something that is not JSON: {line[:200]!r}"
                       ) from exc
    if not isinstance(msg, dict):
        raise QmpError(f"QEMU's monitor sent {line[:200]!r}")
    if "return" in msg:
        return "return", msg["return"]
    if "error" in msg:
        err = msg["error"] if isinstance(msg["error"], dict) else {}
        return "error", str(err.get("desc") or msg["error"])[:1000]
    if "event" in msg:
        return "event", str(msg["event"])
    if "QMP" in msg:
        return "greeting", msg["QMP"]
    raise QmpError(f"QEMU's monitor sent {line[:200]!r}")


class Qmp:
    """One connection to a VM's monitor, capabilities negotiated. A context manager."""

    def __init__(self, path: Path, *, timeout_s: float = 10.0) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout_s)
        self._buf = b""
        try:
            self._sock.connect(str(path))
            kind, _ = answer(self._line())
            if kind != "greeting":
                raise QmpError("QEMU's monitor did not greet")
            self.execute("qmp_capabilities")
        except OSError as exc:
            self.close()
            raise QmpError(f"QEMU's monitor does not answer: {exc}") from exc
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Qmp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._sock.close()

    def execute(self, name: str, arguments: Mapping[str, Any] | None = None, *,
                fds: list[int] | None = None) -> Any:
        """Send a command (with file descriptors passed along, for ``getfd``) and return its
        answer; QmpError when QEMU refuses it or goes away."""
        data = command(name, **(arguments or {}))
        try:
            if fds:
                socket.send_fds(self._sock, [data], fds)
            else:
                self._sock.sendall(data)
            while True:
                kind, value = answer(self._line())
                if kind == "return":
                    return value
                if kind == "error":
                    raise QmpError(f"QEMU refused {name}: {value}")
        except OSError as exc:
            raise QmpError(f"QEMU's monitor went away during {name}: {exc}") from exc

    def wait_for(self, name: str, done: Callable[[Any], bool], *, timeout_s: float) -> Any:
        """Repeat the query ``name`` until ``done(answer)`` is true (at most ``timeout_s``);
        returns the last answer."""
        deadline = time.monotonic() + timeout_s
        delay = 0.005
        while True:
            value = self.execute(name)
            if done(value) or time.monotonic() >= deadline:
                return value
            time.sleep(delay)
            delay = min(delay * 2, 0.1)

    def _line(self) -> bytes:
        while b"\n" not in self._buf:
            if len(self._buf) > MAX_LINE:
                raise QmpError("QEMU's monitor sent an over-long message")
            chunk = self._sock.recv(65536)
            if not chunk:
                raise QmpError("QEMU's monitor closed the connection")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line
