"""Background processes of a workspace, as ``ws.processes`` of the Python client::

    p = ws.processes.start("npm run dev", cwd="web")   # returns at once
    ws.processes.list()                                # [Process(pid=..., running=True, ...)]
    print(ws.processes.logs(p.pid))                    # the output kept so far
    for chunk in ws.processes.logs(p.pid, follow=True):
        print(chunk.stream, chunk.data)                # until the process exits
    ws.processes.kill(p.pid)                           # SIGTERM to its process group

They run on after the call, and across pause and resume; a stop ends them.
"""

from __future__ import annotations

import builtins
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, overload

from .api import JSON, Command, DenAPIError, _seg, command_body, stream_message

if TYPE_CHECKING:
    from .api import Workspace

__all__ = ["LogChunk", "Process", "ProcessLogs", "Processes"]


@dataclass(frozen=True)
class Process:
    """A background process. ``cmd`` is its argv (a shell string runs as ``bash -c``);
    ``started_at`` is ISO 8601, UTC; ``exit_code`` is 128 + n when signal n ended it, and
    ``signal`` names that signal."""

    pid: int
    cmd: tuple[str, ...]
    cwd: str
    user: str
    started_at: str
    running: bool
    exit_code: int | None = None
    signal: str | None = None
    raw: JSON = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Process:
        """Build one from the server's JSON."""
        code, signal = data.get("exit_code"), data.get("signal")
        return cls(pid=int(data["pid"]), cmd=tuple(str(a) for a in data.get("cmd") or ()),
                   cwd=str(data.get("cwd", "")), user=str(data.get("user", "")),
                   started_at=str(data.get("started_at") or ""),
                   running=bool(data.get("running")),
                   exit_code=None if code is None else int(code),
                   signal=None if signal is None else str(signal), raw=dict(data))


@dataclass(frozen=True)
class LogChunk:
    """A piece of a process's output; ``stream`` is "stdout" or "stderr"."""

    stream: str
    data: str


@dataclass(frozen=True)
class ProcessLogs:
    """The output the workspace keeps for a process (its last ``log_bytes`` per process),
    and whether it still runs."""

    pid: int
    running: bool
    exit_code: int | None
    signal: str | None
    chunks: tuple[LogChunk, ...]

    @property
    def text(self) -> str:
        """stdout and stderr interleaved as they were written."""
        return "".join(c.data for c in self.chunks)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ProcessLogs:
        code, signal = data.get("exit_code"), data.get("signal")
        return cls(pid=int(data["pid"]), running=bool(data.get("running")),
                   exit_code=None if code is None else int(code),
                   signal=None if signal is None else str(signal),
                   chunks=tuple(LogChunk(str(c["stream"]), str(c["data"]))
                                for c in data.get("chunks") or ()))


class Processes:
    """``ws.processes``: start, list, read, follow and signal background processes. Like
    exec, every call wakes a paused or stopped workspace. A server whose runtime has no
    agent answers DenAPIError 501 ``no_agent``; an unknown pid is 404 ``not_found``."""

    def __init__(self, workspace: Workspace) -> None:
        self.workspace = workspace

    @property
    def _path(self) -> str:
        return f"/api/v1/workspaces/{_seg(self.workspace.id)}/processes"

    def start(self, cmd: Command, *, cwd: str | None = None, env: Mapping[str, str] | None = None,
              log_bytes: int | None = None) -> Process:
        """Start ``cmd`` (argv list, or a string for ``bash -c``) in the background; returns
        at once. ``log_bytes`` sizes the buffer that keeps its output (default 1 MiB)."""
        body = command_body(cmd, cwd=cwd, env=env)
        if log_bytes is not None:
            body["log_bytes"] = log_bytes
        return Process.from_json(self.workspace.den.request_json("POST", self._path,
                                                                 json_body=body))

    def list(self) -> builtins.list[Process]:
        """The processes started here that the workspace remembers: running ones and the
        last exited ones."""
        data = self.workspace.den.request_json("GET", self._path)
        return [Process.from_json(item) for item in data["processes"]]

    def read_logs(self, pid: int) -> ProcessLogs:
        """The output kept so far, by stream, and the process's state."""
        return ProcessLogs.from_json(
            self.workspace.den.request_json("GET", f"{self._path}/{int(pid)}/logs"))

    @overload
    def logs(self, pid: int, *, follow: Literal[False] = False) -> str: ...

    @overload
    def logs(self, pid: int, *, follow: Literal[True]) -> Iterator[LogChunk]: ...

    def logs(self, pid: int, *, follow: bool = False) -> str | Iterator[LogChunk]:
        """The output kept so far (stdout and stderr interleaved); with ``follow``, an
        iterator of chunks, the kept ones first, that ends when the process exits."""
        if follow:
            return self._follow(int(pid))
        return self.read_logs(pid).text

    def _follow(self, pid: int) -> Iterator[LogChunk]:
        den = self.workspace.den
        url = self.workspace.ws_url(f"processes/{pid}/logs")
        with den.websocket(url, what="log stream") as conn:
            for message in conn:
                msg = stream_message(message, "log stream")
                kind = msg.get("type")
                if kind in ("stdout", "stderr"):
                    yield LogChunk(str(kind), str(msg.get("data", "")))
                elif kind == "exit":
                    return
        raise DenAPIError(0, "stream_closed", "log stream ended without an exit message")

    def kill(self, pid: int, signal: str = "TERM") -> None:
        """Send ``signal`` (INT, TERM, KILL, HUP, QUIT, USR1, USR2, WINCH, STOP or CONT) to
        the process's group."""
        self.workspace.den.request("POST", f"{self._path}/{int(pid)}/signal",
                                   json_body={"signal": signal})


