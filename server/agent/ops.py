"""Operations over an agent session: one-shot exec, streams, background processes.

Each function opens one channel, speaks the operation of docs/agent.md on it and closes
it. Deadlines are the host's own: an agent that stops answering costs a caller at most its
deadline (AgentTimeout, 504), never a thread or a wedged workspace.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

from server.agent.session import AgentOpError, AgentSession, Channel, ok_or_raise
from server.errors import DenError, ValidationFailed
from server.runtime.base import ExecRequest, ExecResult, ProcessInfo, StreamChunk
from server.runtime.errors import AgentTimeout, AgentUnavailable, EngineConflict, ObjectMissing
from server.runtime.output import Captured

log = logging.getLogger(__name__)

START_TIMEOUT_S = 10.0  # from OPEN to "started": the agent forks and execs
EXEC_GRACE_S = 30.0  # past the command's own deadline, which the agent enforces
REQUEST_TIMEOUT_S = 30.0
# What a TCP connection into the workspace (`connect`) may have in flight towards Den, unread:
# 4x the protocol's initial window, so that a download is not held to one window per round
# trip through the engine. Bounded per connection (previews cap connections per workspace).
CONNECT_WINDOW = 1 << 20
STREAMS = ("stdout", "stderr")


class NotStarted(AgentUnavailable):
    """The agent did not start the command (it stopped answering first): nothing ran."""


class StreamEnded(DenError):
    """A stream ended because the workspace went to sleep or stopped (``reason``)."""

    status_code = 409
    code = "stream_ended"

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def exec_request(req: ExecRequest, env: Mapping[str, str], *, stdin: bool) -> dict[str, Any]:
    """The ``exec`` operation for ``req`` with its complete environment ``env``."""
    cols, rows = req.size or (80, 24)
    return {
        "op": "exec", "argv": list(req.argv), "env": dict(env), "cwd": req.cwd,
        "user": req.user, "tty": req.tty, "cols": cols, "rows": rows, "stdin": stdin,
        "timeout_ms": int(req.timeout_s * 1000) if req.timeout_s else 0,
        "max_output": req.max_output_bytes if not req.tty else 0,
    }


def start_failure(err: AgentOpError, argv0: str) -> ExecResult | None:
    """What a shell would answer when the command cannot be started, or None to raise."""
    if err.code == "enoent":
        return ExecResult(exit_code=127, stdout=b"",
                          stderr=f"{argv0}: command not found\n".encode())
    if err.code == "eacces":
        return ExecResult(exit_code=126, stdout=b"",
                          stderr=f"{argv0}: permission denied (or a directory)\n".encode())
    return None


def raise_op_error(err: AgentOpError) -> None:
    if err.code == "bad_cwd":
        raise ValidationFailed(f"the working directory is not usable: {err.message}",
                               code="bad_cwd")
    if err.code == "no_user":
        raise EngineConflict(f"the workspace's image has no such user: {err.message}")
    if err.code == "invalid":
        raise ValidationFailed(err.message)
    raise EngineConflict(f"the agent could not do it: {err.message}")


async def _started(ch: Channel, argv0: str) -> ExecResult | None:
    """Wait for ``started``; a start failure as a result (127/126) or raised."""
    while True:
        try:
            event = await ch.next(START_TIMEOUT_S)
        except AgentTimeout as exc:
            raise NotStarted(f"the workspace's agent did not start the command: {exc}") from exc
        if event.kind == "end":
            raise NotStarted(f"the workspace's agent went away: {event.reason}")
        if event.kind != "msg":
            continue  # data cannot come before "started"; ignore it
        if isinstance(event.msg, dict) and "started" in event.msg:
            return None
        try:
            ok_or_raise(event.msg)
        except AgentOpError as err:
            result = start_failure(err, argv0)
            if result is None:
                raise_op_error(err)
            return result


def _exit_fields(msg: Any) -> tuple[int, bool, bool] | None:
    if isinstance(msg, dict) and isinstance(msg.get("exit"), dict):
        e = msg["exit"]
        code = e.get("code")
        return (int(code) if isinstance(code, int) else -1, bool(e.get("timed_out")),
                bool(e.get("truncated")))
    return None


def without_bash(req: ExecRequest) -> ExecRequest | None:
    """A shell-string command (``bash -c STRING``) for an image that has no bash: the same
    string run by ``sh -c``. None for any other command."""
    if list(req.argv[:2]) == ["bash", "-c"]:
        return dataclasses.replace(req, argv=["sh", "-c", *req.argv[2:]])
    return None


async def run(session: AgentSession, req: ExecRequest, env: Mapping[str, str]) -> ExecResult:
    """A command to completion (a shell string falls back to ``sh`` without bash)."""
    try:
        return await _run(session, req, env)
    except _NotFound as missing:
        fallback = without_bash(req)
        if fallback is None:
            return missing.result
        try:
            return await _run(session, fallback, env)
        except _NotFound as still:
            return still.result


class _NotFound(Exception):
    """argv[0] is not in the image; ``result`` is what a shell answers (127)."""

    def __init__(self, result: ExecResult) -> None:
        self.result = result


async def _run(session: AgentSession, req: ExecRequest, env: Mapping[str, str]) -> ExecResult:
    """A command to completion: the agent enforces the deadline and the output cap; the
    host collects at most ``max_output_bytes`` per stream whatever the agent sends."""
    started = time.monotonic()
    ch = await session.open(exec_request(req, env, stdin=req.stdin is not None))
    feeder: asyncio.Task[None] | None = None
    outs = (Captured(req.max_output_bytes, spool_dir=req.spool_dir),
            Captured(req.max_output_bytes, spool_dir=req.spool_dir))
    done = False
    try:
        failed = await _started(ch, req.argv[0] if req.argv else "")
        if failed is not None:
            if failed.exit_code == 127:
                raise _NotFound(failed)
            return failed
        if req.stdin is not None:
            feeder = asyncio.create_task(_feed(ch, req.stdin))
        deadline = None if req.timeout_s is None else started + req.timeout_s + EXEC_GRACE_S
        while True:
            left = None if deadline is None else max(0.01, deadline - time.monotonic())
            event = await ch.next(left)
            if event.kind == "data":
                await outs[event.stream].add_async(event.data)
                await ch.consumed(event.stream, len(event.data))
            elif event.kind == "msg":
                fields = _exit_fields(event.msg)
                if fields is not None:
                    code, timed_out, cut = fields
                    if timed_out:  # as coreutils' timeout answers, which the API documents
                        code = 137 if code == 137 else 124
                    done = True
                    return ExecResult(
                        exit_code=code, stdout=outs[0], stderr=outs[1], timed_out=timed_out,
                        truncated=outs[0].truncated or outs[1].truncated or cut,
                        duration_ms=int((time.monotonic() - started) * 1000))
            elif event.kind == "end":
                raise AgentUnavailable(f"the command's channel ended: {event.reason}")
    finally:
        if not done:  # failed or cancelled: nothing will read the output
            for out in outs:
                out.close()
        if feeder is not None:
            feeder.cancel()
        await ch.close()


async def _feed(ch: Channel, data: bytes) -> None:
    with contextlib.suppress(AgentUnavailable):
        await ch.write(data)
        await ch.eof()


class AgentExecStream:
    """A process with open pipes (``ExecStream``) over an agent channel. Output is pulled:
    the agent gets window credit back only as the consumer takes chunks, so a slow client
    slows the process rather than growing a buffer."""

    def __init__(self, ch: Channel, *, tty: bool, failed: ExecResult | None = None,
                 connection: bool = False) -> None:
        self._ch = ch
        self._tty = tty
        self._code: int | None = None
        self._exited = asyncio.Event()
        self._ended_reason = ""
        self._failed = failed  # could not start: says why, then exits with its code
        self._connection = connection  # a `connect` channel: exit 0 once both sides are done

    @classmethod
    async def start(cls, session: AgentSession, req: ExecRequest, env: Mapping[str, str]
                    ) -> AgentExecStream:
        op = exec_request(req, env, stdin=True)
        # A stream has no output cap: its reader sets the pace (the window), and the cap of
        # one-shot exec would silently cut `ssh ws 'cat big' > copy` at 16 MiB.
        op["max_output"] = 0
        ch = await session.open(op)
        try:
            failed = await _started(ch, req.argv[0] if req.argv else "")
        except BaseException:
            await ch.close()
            raise
        if failed is not None:  # behave like a process that printed why and exited
            await ch.close()
        return cls(ch, tty=req.tty, failed=failed)

    @classmethod
    async def connect(cls, session: AgentSession, host: str, port: int) -> AgentExecStream:
        """A TCP connection from inside the workspace to ``host:port`` (its loopback only),
        as a stream: output is what the port sends, ``write`` what it receives; the exit
        code is 0 once both directions are done."""
        ch = await session.open({"op": "connect", "host": host, "port": port})
        try:
            while True:
                event = await ch.next(START_TIMEOUT_S)
                if event.kind == "end":
                    raise AgentUnavailable(f"the workspace's agent went away: {event.reason}")
                if event.kind == "msg":
                    try:
                        ok_or_raise(event.msg)
                    except AgentOpError as err:
                        raise EngineConflict(f"cannot connect to {host}:{port} in the "
                                             f"workspace: {err.message}") from err
                    break
            await ch.widen(0, CONNECT_WINDOW)
        except BaseException:
            await ch.close()
            raise
        return cls(ch, tty=False, connection=True)

    async def output(self) -> AsyncIterator[StreamChunk]:
        if self._failed is not None:
            if self._failed.stderr:
                yield StreamChunk("stdout" if self._tty else "stderr", self._failed.stderr)
            self._code = self._failed.exit_code
            self._exited.set()
            return
        while True:
            event = await self._ch.next()
            if event.kind == "data":
                yield StreamChunk(STREAMS[event.stream], event.data)
                await self._ch.consumed(event.stream, len(event.data))
            elif event.kind == "msg":
                fields = _exit_fields(event.msg)
                if fields is not None:
                    code, timed_out, _ = fields
                    self._code = (137 if code == 137 else 124) if timed_out else code
                    self._exited.set()
                    return
            elif event.kind == "end":
                if self._connection and event.reason == "closed":
                    self._code = 0
                self._ended_reason = event.reason
                self._exited.set()
                return

    async def write(self, data: bytes) -> None:
        with contextlib.suppress(AgentUnavailable):
            await self._ch.write(data)

    async def close_stdin(self) -> None:
        with contextlib.suppress(AgentUnavailable):
            await self._ch.eof()

    async def resize(self, cols: int, rows: int) -> None:
        if self._tty:
            try:
                await self._ch.control({"resize": {"cols": cols, "rows": rows}})
            except AgentUnavailable as exc:  # the stream is ending too; said for the record
                log.info("resize to %dx%d not sent: %s", cols, rows, exc)

    async def signal(self, name: str) -> None:
        with contextlib.suppress(AgentUnavailable):
            await self._ch.control({"signal": name})

    async def wait(self) -> int:
        await self._exited.wait()
        if self._code is None:
            raise StreamEnded(f"the stream ended: {self._ended_reason}",
                              reason=self._ended_reason)
        return self._code

    async def kill(self) -> None:
        await self._ch.close()


# --- background processes ---------------------------------------------------------------


def _info(row: Any) -> ProcessInfo:
    if not isinstance(row, dict):
        raise AgentOpError("failed", "a process entry that is not an object")
    argv = row.get("argv")
    return ProcessInfo(
        pid=int(row.get("pid") or 0),
        argv=tuple(str(a)[:4096] for a in argv[:256]) if isinstance(argv, list) else (),
        cwd=str(row.get("cwd", ""))[:4096],
        user=str(row.get("user", ""))[:64],
        started_at=float(row.get("started_at") or 0.0),
        running=bool(row.get("running")),
        exit_code=int(row["exit_code"]) if isinstance(row.get("exit_code"), int) else None,
        signal=str(row["signal"])[:16] if isinstance(row.get("signal"), str) else None,
    )


async def spawn(session: AgentSession, req: ExecRequest, env: Mapping[str, str], *,
                log_bytes: int) -> int:
    op = exec_request(req, env, stdin=False)
    for key in ("tty", "cols", "rows", "stdin", "timeout_ms", "max_output"):
        op.pop(key)
    op.update(op="spawn", log_bytes=log_bytes)
    try:
        ok = await session.request(op, timeout_s=START_TIMEOUT_S)
    except AgentOpError as err:
        fallback = without_bash(req) if err.code == "enoent" else None
        if fallback is not None:
            return await spawn(session, fallback, env, log_bytes=log_bytes)
        if err.code in ("enoent", "eacces"):
            raise ValidationFailed(f"{req.argv[0]}: cannot be run ({err.message})",
                                   code="exec_failed") from err
        raise_op_error(err)
        raise
    return int(ok.get("pid") or 0)


async def processes(session: AgentSession) -> list[ProcessInfo]:
    ok = await session.request({"op": "ps"}, timeout_s=REQUEST_TIMEOUT_S)
    rows = ok.get("processes") if isinstance(ok, dict) else None
    return [_info(r) for r in rows[:1000]] if isinstance(rows, list) else []


async def signal(session: AgentSession, pid: int, name: str) -> None:
    try:
        await session.request({"op": "signal", "pid": pid, "signal": name},
                              timeout_s=REQUEST_TIMEOUT_S)
    except AgentOpError as err:
        if err.code == "not_found":
            raise ObjectMissing(f"no process {pid} started through Den") from err
        raise_op_error(err)


async def logs(session: AgentSession, pid: int, *, follow: bool) -> AsyncIterator[StreamChunk]:
    ch = await session.open({"op": "logs", "pid": pid, "follow": follow})
    try:
        while True:
            event = await ch.next(None if follow else REQUEST_TIMEOUT_S)
            if event.kind == "data":
                yield StreamChunk(STREAMS[event.stream], event.data)
                await ch.consumed(event.stream, len(event.data))
            elif event.kind == "msg":
                if _exit_fields(event.msg) is not None:
                    return  # followed to the process's exit
                try:
                    ok_or_raise(event.msg)  # without follow: the ok; the ring came before
                except AgentOpError as err:
                    if err.code == "not_found":
                        raise ObjectMissing(f"no process {pid} started through Den") from err
                    raise_op_error(err)
            elif event.kind == "end":
                if event.reason != "closed":
                    raise StreamEnded(f"the log stream ended: {event.reason}",
                                      reason=event.reason)
                return
    finally:
        await ch.close()


async def status(session: AgentSession) -> dict[str, Any]:
    ok = await session.request({"op": "status"}, timeout_s=5.0)
    return ok if isinstance(ok, dict) else {}


