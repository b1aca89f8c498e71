"""Denied connections, as events the user and the agent can read ("why can't I reach X?").

Den's refusal chain logs each refused packet (rate-limited by iptables itself: ``-m limit``)
to the kernel log with a tag of Den's; a thread reads ``/dev/kmsg`` and hands the lines with
that tag to the event loop, where the service turns them into workspace events, at most one
per workspace and destination a minute. Everything here is fed by workspaces: lines are read
one record at a time (bounded by the kernel), parsed strictly, and dropped when the loop is
behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import select
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

KMSG = "/dev/kmsg"
RECORD_BYTES = 8192  # a kmsg record is at most ~1 KiB; read() returns one record
PENDING_MAX = 256  # denials handed to the loop and not yet handled; more are dropped
EVENT_EVERY_S = 60.0  # one event per workspace and destination per minute at most
KEYS_MAX = 4096  # destinations remembered for that


@dataclass(frozen=True)
class Denial:
    source: str
    destination: str
    protocol: str  # TCP, UDP, ICMP, ...
    port: int | None  # destination port (TCP, UDP)

    def describe(self) -> str:
        where = f"{self.destination}:{self.port}" if self.port else self.destination
        return f"{self.protocol} to {where}"


_FIELD = re.compile(r"\b(SRC|DST|PROTO|DPT)=([0-9A-Za-z.]{1,40})(?=\s|$)")


def parse(line: str, tag: str) -> Denial | None:
    """A denial from one kernel log line with ``tag`` in it (else None)."""
    if tag not in line:
        return None
    fields = dict(_FIELD.findall(line.split(tag, 1)[1]))
    src, dst, proto = fields.get("SRC"), fields.get("DST"), fields.get("PROTO")
    if not (src and dst and proto):
        return None
    port = fields.get("DPT")
    return Denial(source=src, destination=dst, protocol=proto,
                  port=int(port) if port and port.isdigit() else None)


class RateLimit:
    """At most one event per (workspace, destination) every ``every_s``; bounded."""

    def __init__(self, every_s: float = EVENT_EVERY_S, keys_max: int = KEYS_MAX) -> None:
        self.every_s = every_s
        self.keys_max = keys_max
        self._last: OrderedDict[tuple[str, str], float] = OrderedDict()

    def allow(self, workspace_id: str, what: str, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        key = (workspace_id, what)
        last = self._last.get(key)
        if last is not None and now - last < self.every_s:
            return False
        self._last[key] = now
        self._last.move_to_end(key)
        while len(self._last) > self.keys_max:
            self._last.popitem(last=False)
        return True


class KmsgWatcher:
    """Reads the kernel log on a thread of its own and calls ``on_denial`` on the loop."""

    def __init__(self, tag: str, on_denial: Callable[[Denial], None], *, path: str = KMSG
                 ) -> None:
        self.tag = tag
        self.on_denial = on_denial
        self.path = path
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pending = 0
        self._lock = threading.Lock()  # _pending: the reader adds, the loop takes away
        self.dropped = 0

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)
            os.lseek(fd, 0, os.SEEK_END)  # only what is logged from now on
        except OSError as exc:
            log.warning("denied connections will not be recorded: %s cannot be read (%s)",
                        self.path, exc)
            return
        self._thread = threading.Thread(target=self._read, args=(fd, loop), daemon=True,
                                        name="den-denials")
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _deliver(self, denial: Denial) -> None:  # on the loop
        with self._lock:
            self._pending -= 1
        try:
            self.on_denial(denial)
        except Exception:
            log.exception("recording a denied connection failed")

    def _read(self, fd: int, loop: asyncio.AbstractEventLoop) -> None:
        try:
            while not self._stop.is_set():
                ready, _, _ = select.select([fd], [], [], 1.0)
                if not ready:
                    continue
                try:
                    record = os.read(fd, RECORD_BYTES)
                except BlockingIOError:
                    continue
                except OSError:  # EPIPE: records were overwritten before we read them
                    continue
                denial = parse(record.decode(errors="replace"), self.tag)
                if denial is None:
                    continue
                with self._lock:
                    if self._pending >= PENDING_MAX:
                        self.dropped += 1
                        continue
                    self._pending += 1
                try:
                    loop.call_soon_threadsafe(self._deliver, denial)
                except RuntimeError:  # the loop is closed
                    return
        finally:
            with contextlib.suppress(OSError):
                os.close(fd)
