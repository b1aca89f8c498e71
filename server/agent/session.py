"""One session with a workspace's agent: channels multiplexed over one byte stream.

A backend supplies a :class:`Transport` (the Docker backend: an attach to the container's
main process) and :meth:`AgentSession.connect` does the hello. Everything the agent sends is
untrusted: each channel holds at most one window of unread data per stream and a few unread
messages; more is a protocol violation that drops the session. Nothing here waits on the
agent without a deadline chosen by the caller.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from server.agent.protocol import (
    PAD,
    VERSION,
    WINDOW,
    Frame,
    FrameReader,
    ProtocolError,
    Type,
    encode,
    encode_json,
    window,
)
from server.runtime.errors import AgentTimeout, AgentUnavailable

log = logging.getLogger(__name__)

HELLO_TIMEOUT_S = 1.0
HEARTBEAT_S = 5.0  # while channels are open, a ping this often ...
# ... answered within this, or the session is declared dead. Generous: a sandbox under a
# fork storm answers late but does answer (a 10 s limit cut a timed-out exec short).
HEARTBEAT_TIMEOUT_S = 30.0
MAX_CHANNELS = 1024
MAX_PENDING_MESSAGES = 64
CHUNK = 65536
MERGE_BYTES = 262144  # queued data of one stream handed over as one event, at most


class Transport(Protocol):
    """A byte stream to the agent. ``read`` returns b"" at the end."""

    async def read(self) -> bytes: ...

    async def write(self, data: bytes) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Event:
    """What a channel received: ``msg`` (JSON from the agent), ``data`` and ``eof`` (on
    ``stream``), or ``end`` (the channel is over: the agent closed it, or the session died,
    ``reason`` saying which)."""

    kind: str
    stream: int = 0
    data: bytes = b""
    msg: Any = None
    reason: str = ""


class Channel:
    """One operation in flight. Read events with :meth:`next`; acknowledge consumed data
    with :meth:`consumed` (that is the flow control back to the agent)."""

    def __init__(self, session: AgentSession, chan: int) -> None:
        self._session = session
        self.chan = chan
        self._events: deque[Event] = deque()
        self._ready = asyncio.Event()
        self._unread = [0, 0]  # data bytes received but not yet consumed, per stream
        self._unacked = [0, 0]  # consumed but not yet granted back
        self._credit = [WINDOW, WINDOW]  # what we may still send, per stream
        self._window = [WINDOW, WINDOW]  # what the agent may send us unread, per stream
        self._credit_changed = asyncio.Event()
        self._messages = 0
        self.ended = False
        self.end_reason = ""
        self._closed_by_us = False

    # --- from the session's reader -----------------------------------------------------

    def _push(self, event: Event) -> None:
        self._events.append(event)
        self._ready.set()

    def _on_frame(self, frame: Frame) -> None:
        stream = 1 if frame.flags == 1 else 0
        if frame.type is Type.DATA:
            self._unread[stream] += len(frame.payload)
            if self._unread[stream] > self._window[stream]:
                raise ProtocolError(f"channel {self.chan}: data beyond the window")
            self._push(Event("data", stream, data=frame.payload))
        elif frame.type is Type.EOF:
            self._push(Event("eof", stream))
        elif frame.type is Type.MSG:
            self._messages += 1
            if self._messages > MAX_PENDING_MESSAGES:
                raise ProtocolError(f"channel {self.chan}: too many messages")
            self._push(Event("msg", msg=frame.json()))
        elif frame.type is Type.WINDOW:
            if len(frame.payload) != 4:
                raise ProtocolError("a WINDOW frame without a 4-byte count")
            self._credit[stream] = min(self._credit[stream] + struct.unpack(">I", frame.payload)[0],
                                       1 << 40)
            self._credit_changed.set()
        elif frame.type is Type.CLOSE:
            self._end("closed")
        else:
            raise ProtocolError(f"an unexpected {frame.type.name} frame on channel {self.chan}")

    def _end(self, reason: str) -> None:
        if not self.ended:
            self.ended = True
            self.end_reason = reason
            self._push(Event("end", reason=reason))
            self._credit_changed.set()

    # --- for the caller ------------------------------------------------------------------

    async def next(self, timeout_s: float | None = None) -> Event:
        """The next event; AgentTimeout when none comes within ``timeout_s``."""
        while not self._events:
            self._ready.clear()
            try:
                await asyncio.wait_for(self._ready.wait(), timeout_s)
            except TimeoutError:
                raise AgentTimeout("the workspace's agent stopped answering") from None
        event = self._events.popleft()
        if event.kind == "data" and self._events:
            event = self._merge(event)
        if event.kind == "msg":
            self._messages -= 1
        elif event.kind == "end":
            self._events.appendleft(event)  # the end stays the last thing a channel says
        return event

    def _merge(self, first: Event) -> Event:
        """``first`` and the data of the same stream queued right behind it, as one event
        (up to MERGE_BYTES): a consumer that fell behind catches up in a few large writes
        instead of one per frame (the agent sends what each read of a pipe returned)."""
        parts, size = [first.data], len(first.data)
        while (self._events and size < MERGE_BYTES and self._events[0].kind == "data"
               and self._events[0].stream == first.stream):
            data = self._events.popleft().data
            parts.append(data)
            size += len(data)
        return first if len(parts) == 1 else Event("data", first.stream, data=b"".join(parts))

    async def consumed(self, stream: int, n: int) -> None:
        """``n`` bytes of ``stream`` have been delivered: grant them back to the agent
        (batched, a quarter window at a time)."""
        self._unread[stream] -= n
        self._unacked[stream] += n
        if self._unacked[stream] >= self._window[stream] // 4 and not self.ended:
            grant, self._unacked[stream] = self._unacked[stream], 0
            await self._session.send(window(self.chan, stream, grant))

    async def widen(self, stream: int, size: int) -> None:
        """Let the agent send up to ``size`` unread bytes on ``stream`` (more than the
        protocol's initial window: a bulk stream whose round trip through the engine would
        otherwise leave the agent waiting for credit). Never narrows."""
        extra = size - self._window[stream]
        if extra > 0 and not self.ended:
            self._window[stream] = size
            await self._session.send(window(self.chan, stream, extra))

    async def write(self, data: bytes, *, stream: int = 0) -> None:
        """Send ``data`` as the agent's window allows; raises once the channel is over."""
        view = memoryview(data)
        while view:
            while self._credit[stream] <= 0:
                if self.ended:
                    raise AgentUnavailable("the channel to the workspace's agent is closed")
                self._credit_changed.clear()
                await self._credit_changed.wait()
            if self.ended:
                raise AgentUnavailable("the channel to the workspace's agent is closed")
            n = min(len(view), CHUNK, self._credit[stream])
            self._credit[stream] -= n
            await self._session.send(encode(Type.DATA, self.chan, bytes(view[:n]), flags=stream))
            view = view[n:]

    async def eof(self, stream: int = 0) -> None:
        if not self.ended:
            await self._session.send(encode(Type.EOF, self.chan, flags=stream))

    async def control(self, msg: dict[str, Any]) -> None:
        if not self.ended:
            await self._session.send(encode_json(Type.MSG, self.chan, msg))

    async def close(self) -> None:
        """End the channel from our side (the agent ends what it runs). Idempotent."""
        if self._closed_by_us:
            return
        self._closed_by_us = True
        was_open = not self.ended
        self._session._forget(self.chan)
        self._end("closed by Den")
        if was_open:
            with contextlib.suppress(AgentUnavailable):
                await self._session.send(encode(Type.CLOSE, self.chan))


class AgentSession:
    """A live session. Build it with :meth:`connect`; it ends when the transport ends, when
    the agent breaks the protocol, or on :meth:`close`, and every open channel then gets an
    ``end`` event with the reason."""

    def __init__(self, transport: Transport, *, name: str) -> None:
        self._transport = transport
        self.name = name
        self._reader = FrameReader()
        self._channels: dict[int, Channel] = {}
        self._next_chan = 1
        self._write_lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._beat: asyncio.Task[None] | None = None
        self.hello: dict[str, Any] = {}
        self.alive = False
        self.end_reason = ""
        self.on_end: Callable[[AgentSession], None] | None = None
        self._end_listeners: list[Callable[[], None]] = []

    @classmethod
    async def connect(cls, transport: Transport, *, name: str,
                      timeout_s: float = HELLO_TIMEOUT_S) -> AgentSession:
        """Say hello (twice, with a pad in between, if the first goes unanswered: bytes of
        an earlier session may be in the way). AgentUnavailable when the agent stays silent."""
        session = cls(transport, name=name)
        try:
            for attempt in range(2):
                nonce = secrets.token_hex(16)
                session._reader.sync(nonce)
                if attempt:
                    await transport.write(PAD)
                await transport.write(encode_json(Type.HELLO, 0, {"v": VERSION, "nonce": nonce}))
                if await session._await_hello(timeout_s):
                    break
            else:
                raise AgentUnavailable(f"workspace {name}: the agent did not answer")
        except BaseException:
            transport.close()
            raise
        session.alive = True
        session._task = asyncio.get_running_loop().create_task(session._read_loop())
        session._beat = asyncio.get_running_loop().create_task(session._heartbeat())
        return session

    async def _heartbeat(self) -> None:
        """A stuck agent (a frozen sandbox, a broken channel) must not hold a call that has
        no deadline of its own: while channels are open, ping; no answer drops the session
        and every channel ends with the reason."""
        while self.alive:
            await asyncio.sleep(HEARTBEAT_S)
            if not self._channels:
                continue
            try:
                await self.request({"op": "ping"}, timeout_s=HEARTBEAT_TIMEOUT_S)
            except (AgentTimeout, AgentUnavailable, AgentOpError):
                if self.alive:
                    log.warning("workspace %s: the agent stopped answering", self.name)
                    self._shutdown("the agent stopped answering")
                return

    async def _await_hello(self, timeout_s: float) -> bool:
        deadline = asyncio.get_running_loop().time() + timeout_s
        while self._reader.hello is None:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                return False
            try:
                data = await asyncio.wait_for(self._transport.read(), left)
            except TimeoutError:
                return False
            except OSError as exc:
                raise AgentUnavailable(f"workspace {self.name}: {exc}") from exc
            if not data:
                raise AgentUnavailable(f"workspace {self.name}: the agent's stream ended")
            frames = self._reader.feed(data)
            if self._reader.hello is not None:
                self.hello = self._reader.hello
                for frame in frames:
                    self._dispatch(frame)
                return True
        return True

    async def _read_loop(self) -> None:
        reason = "the agent's stream ended"
        try:
            while True:
                data = await self._transport.read()
                if not data:
                    break
                for frame in self._reader.feed(data):
                    self._dispatch(frame)
        except ProtocolError as exc:
            reason = f"the agent broke the protocol: {exc}"
            log.warning("workspace %s: %s", self.name, reason)
        except OSError as exc:
            reason = f"the agent's stream failed: {exc}"
        except asyncio.CancelledError:
            reason = "closed by Den"
        finally:
            self._shutdown(reason)

    def _dispatch(self, frame: Frame) -> None:
        ch = self._channels.get(frame.chan)
        if ch is None:
            return  # a channel we have already closed; what it still says is dropped
        ch._on_frame(frame)
        if ch.ended:
            self._channels.pop(frame.chan, None)

    def _shutdown(self, reason: str) -> None:
        if not self.alive and self.end_reason:
            return
        self.alive = False
        self.end_reason = reason
        self._transport.close()
        for ch in list(self._channels.values()):
            ch._end(reason)
        self._channels.clear()
        if self.on_end is not None:
            self.on_end(self)
        for listener in self._end_listeners:
            listener()
        self._end_listeners.clear()

    def when_ended(self, listener: Callable[[], None]) -> None:
        """Call ``listener()`` once the session is over (at once if it is)."""
        if not self.alive and self.end_reason:
            listener()
        else:
            self._end_listeners.append(listener)

    async def send(self, data: bytes) -> None:
        if not self.alive:
            raise AgentUnavailable(f"workspace {self.name}: {self.end_reason or 'no agent'}")
        async with self._write_lock:
            try:
                await self._transport.write(data)
            except OSError as exc:
                self._shutdown(f"the agent's stream failed: {exc}")
                raise AgentUnavailable(f"workspace {self.name}: {exc}") from exc

    async def open(self, request: dict[str, Any]) -> Channel:
        if len(self._channels) >= MAX_CHANNELS:
            raise AgentUnavailable(f"workspace {self.name}: too many open agent channels")
        chan = self._next_chan
        self._next_chan = self._next_chan % 0xFFFFFFF0 + 1
        ch = Channel(self, chan)
        self._channels[chan] = ch
        try:
            await self.send(encode_json(Type.OPEN, chan, request))
        except BaseException:
            self._channels.pop(chan, None)
            raise
        return ch

    def _forget(self, chan: int) -> None:
        self._channels.pop(chan, None)

    async def close(self, reason: str = "closed by Den") -> None:
        if self._beat is not None:
            self._beat.cancel()
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._shutdown(reason)

    async def request(self, request: dict[str, Any], *, timeout_s: float) -> Any:
        """A one-answer operation: the ``ok`` payload, or the agent's error raised."""
        ch = await self.open(request)
        try:
            while True:
                event = await ch.next(timeout_s)
                if event.kind == "msg":
                    return ok_or_raise(event.msg)
                if event.kind == "end":
                    raise AgentUnavailable(f"workspace {self.name}: {event.reason}")
        finally:
            await ch.close()


class AgentOpError(Exception):
    """The agent answered an operation with an error (``code`` from docs/agent.md)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def ok_or_raise(msg: Any) -> Any:
    if isinstance(msg, dict):
        if "ok" in msg:
            return msg["ok"] if msg["ok"] is not None else {}
        err = msg.get("error")
        if isinstance(err, dict):
            raise AgentOpError(str(err.get("code", "failed"))[:64],
                               str(err.get("message", ""))[:1000])
    raise AgentOpError("failed", "the agent sent an answer Den does not understand")

