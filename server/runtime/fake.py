"""An in-memory runtime for fast unit tests of the service and the API. Never for users.

Exec understands a tiny command set (``true``, ``false``, ``echo``, ``cat``, ``pwd``,
``sh -c 'exit N'``), enough for contract tests that also run on the real engine. Spawned
background processes run until a signal ends them; their output is what exec would print.
"""

from __future__ import annotations

import asyncio
import dataclasses
import signal as signals
import time
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server.runtime import docker_specs
from server.runtime.base import (
    ContainerStatus,
    EngineEvent,
    EngineEventKind,
    EngineObject,
    ExecRequest,
    ExecResult,
    Handle,
    NetworkInfo,
    ProcessInfo,
    ResourceUsage,
    SnapshotSpec,
    StreamChunk,
    WorkspaceSpec,
)
from server.runtime.docker_specs import container_of, snapshot_volume, volume_of
from server.runtime.errors import (
    AgentUnavailable,
    EngineConflict,
    EngineUnavailable,
    ObjectMissing,
)
from server.runtime.output import Captured

# Signals whose default action does not end a process.
_HARMLESS = frozenset({"WINCH", "CONT", "STOP"})


@dataclass
class _Process:
    info: ProcessInfo
    output: list[StreamChunk]
    exited: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class _Container:
    spec: WorkspaceSpec
    running: bool = False
    frozen: bool = False  # running, but stopped by the freezer (``freeze``)
    memory_bytes: int = 64 << 20  # what ``freeze`` and ``usage`` report it holds
    seeded: bool = False
    hostname: str = ""  # set by ``set_hostname`` (else the spec's)
    armed: bool = False  # ``arm_hostname`` made its rename ready (``set_hostname`` uses it)
    renamed_armed: bool = False  # the last ``set_hostname`` completed the armed rename
    checkpoints: set[str] = field(default_factory=set)
    restored: int = 0
    cpu_ns: int = 0  # tests advance it to look busy
    processes: dict[int, _Process] = field(default_factory=dict)  # spawned, by pid

    @property
    def status(self) -> ContainerStatus:
        if self.frozen:
            return ContainerStatus.FROZEN
        return ContainerStatus.RUNNING if self.running else ContainerStatus.STOPPED


@dataclass
class FakeRuntime:
    """Containers and volumes as dict entries. ``fail_next`` makes the next call of that
    method raise, ``fail_for`` every call of a method about one workspace (methods that pass
    their spec to ``_enter``), to test failure paths."""

    images: set[str] = field(default_factory=lambda: {"den/workspace:latest"})
    containers: dict[str, _Container] = field(default_factory=dict)
    volumes: dict[str, dict[str, str]] = field(default_factory=dict)
    fail_next: dict[str, Exception] = field(default_factory=dict)
    # (method, workspace id) -> what every such call about that workspace raises
    fail_for: dict[tuple[str, str], Exception] = field(default_factory=dict)
    available: bool = True
    calls: list[str] = field(default_factory=list)
    # Files by volume name (tests write them directly) and their copies by snapshot id.
    files: dict[str, dict[str, bytes]] = field(default_factory=dict)
    snapshot_files: dict[str, dict[str, bytes]] = field(default_factory=dict)
    next_pid: int = 100
    # The queues of the watchers of the event stream (``watch``); ``emit`` feeds them.
    watchers: list[asyncio.Queue[EngineEvent]] = field(default_factory=list)
    # An exec of exactly ["block"] waits until this is set (tests fill the exec queue).
    release: asyncio.Event = field(default_factory=asyncio.Event)
    # Ports "listening inside" every workspace: workspace port -> a real (host, port) on the
    # test machine that ``connect`` dials (tests run a server there).
    listening: dict[int, tuple[str, int]] = field(default_factory=dict)

    name = "fake"
    prefix = "den"  # begins the names it gives (as DEN_ENGINE_PREFIX does for Docker)

    def new_handle(self, workspace_id: str) -> dict[str, Any]:
        return docker_specs.new_handle(self.prefix, workspace_id)

    def sandbox_name(self, spec: WorkspaceSpec) -> str:
        return container_of(spec)

    def _enter(self, method: str, spec: WorkspaceSpec | None = None) -> None:
        self.calls.append(method)
        if not self.available:
            raise EngineUnavailable("the fake engine is down")
        exc = self.fail_next.pop(method, None)
        if exc is None and spec is not None:
            exc = self.fail_for.get((method, spec.workspace_id))
        if exc is not None:
            raise exc

    def _get(self, spec: WorkspaceSpec) -> _Container:
        c = self.containers.get(container_of(spec))
        if c is None:
            raise ObjectMissing(f"container {container_of(spec)}: not found in the engine")
        return c

    async def check(self) -> None:
        self._enter("check")

    async def network(self) -> NetworkInfo:
        """Running containers get addresses in 10.88.0.0/16, in order of their names."""
        self._enter("network")
        running = sorted(n for n, c in self.containers.items() if c.running)
        return NetworkInfo(interface="den-fake", subnet="10.88.0.0/16", gateway="10.88.0.1",
                           addresses={n: f"10.88.0.{i + 2}" for i, n in enumerate(running)})

    async def image_exists(self, image: str) -> bool:
        self._enter("image_exists")
        return image in self.images

    async def create(self, spec: WorkspaceSpec) -> None:
        self._enter("create")
        self.volumes.setdefault(volume_of(spec), dict(spec.labels))
        self.containers.setdefault(container_of(spec), _Container(spec))

    async def seed(self, spec: WorkspaceSpec, tar: Path) -> None:
        self._enter("seed")
        self._get(spec).seeded = tar.exists()

    async def start(self, spec: WorkspaceSpec) -> None:
        self._enter("start")
        self._get(spec).running = True

    async def stop(self, spec: WorkspaceSpec, *, timeout_s: int) -> None:
        self._enter("stop")
        c = self.containers.get(container_of(spec))
        if c is not None:
            c.running = c.frozen = False
            c.processes.clear()  # a stop ends every process; a pause keeps them

    async def destroy(self, spec: WorkspaceSpec) -> None:
        self._enter("destroy")
        self.containers.pop(container_of(spec), None)
        self.volumes.pop(volume_of(spec), None)

    async def pause(self, spec: WorkspaceSpec, *, checkpoint: str) -> None:
        self._enter("pause")
        c = self._get(spec)
        if not c.running:
            raise EngineConflict(f"container {container_of(spec)} is not running")
        c.checkpoints.add(checkpoint)
        c.running = c.frozen = False

    async def resume(self, spec: WorkspaceSpec, *, checkpoint: str) -> None:
        self._enter("resume")
        c = self._get(spec)
        if c.running:
            return
        if checkpoint not in c.checkpoints:
            raise ObjectMissing(f"checkpoint {checkpoint}: not found in the engine")
        c.running = True
        c.restored += 1

    async def delete_checkpoint(self, spec: WorkspaceSpec, *, checkpoint: str) -> None:
        self._enter("delete_checkpoint")
        c = self.containers.get(container_of(spec))
        if c is not None:
            c.checkpoints.discard(checkpoint)

    async def status(self, spec: WorkspaceSpec) -> ContainerStatus:
        self._enter("status")
        c = self.containers.get(container_of(spec))
        return ContainerStatus.MISSING if c is None else c.status

    async def freeze(self, spec: WorkspaceSpec) -> int | None:
        self._enter("freeze", spec)
        c = self._get(spec)
        if not c.running:
            raise EngineConflict(f"container {container_of(spec)} is not running")
        c.frozen = True
        return c.memory_bytes

    async def thaw(self, spec: WorkspaceSpec) -> None:
        self._enter("thaw", spec)
        c = self._get(spec)
        if not c.running:
            raise EngineConflict(f"container {container_of(spec)} is not running")
        c.frozen = False

    async def settle(self, spec: WorkspaceSpec, *, timeout_s: float) -> bool:
        self._enter("settle", spec)
        c = self._get(spec)
        if not c.running or c.frozen:
            raise EngineConflict(f"container {container_of(spec)} is not running")
        return True

    async def arm_hostname(self, spec: WorkspaceSpec) -> None:
        self._enter("arm_hostname", spec)
        c = self._get(spec)
        if not c.running or c.frozen:
            raise EngineConflict(f"container {container_of(spec)} is not running")
        c.armed = True

    async def set_hostname(self, spec: WorkspaceSpec, hostname: str, *, was: str) -> None:
        self._enter("set_hostname", spec)
        c = self._get(spec)
        if not c.running or c.frozen:
            raise EngineConflict(f"container {container_of(spec)} is not running")
        c.hostname = hostname
        c.renamed_armed, c.armed = c.armed, False

    async def exec(self, spec: WorkspaceSpec, req: ExecRequest) -> ExecResult:
        self._enter("exec")
        if not self._get(spec).running:
            raise EngineConflict(f"container {container_of(spec)} is not running")
        if self._get(spec).frozen:  # as the engine answers (409)
            raise EngineConflict(f"container {container_of(spec)} is paused")
        if list(req.argv) == ["block"]:
            await self.release.wait()
            return ExecResult(0, b"released\n", b"")
        if list(req.argv) == ["cat", "/proc/net/tcp", "/proc/net/tcp6"]:
            return ExecResult(0, _proc_net_tcp(self.listening), b"")
        return _run(req)

    async def connect(self, spec: WorkspaceSpec, host: str, port: int) -> _FakeConnection:
        self._enter("connect")
        if not self._get(spec).running:
            raise EngineConflict(f"container {container_of(spec)} is not running")
        where = self.listening.get(port)
        if where is None:
            raise EngineConflict(f"connect {host}:{port}: connection refused")
        reader, writer = await asyncio.open_connection(*where)
        return _FakeConnection(reader, writer)

    async def exec_stream(self, spec: WorkspaceSpec, req: ExecRequest) -> _FakeStream:
        result = await self.exec(spec, req)
        return _FakeStream(result, req.argv)

    # --- EngineEvents ---------------------------------------------------------------------

    async def watch(self, instance: str) -> AsyncGenerator[EngineEvent, None]:
        queue: asyncio.Queue[EngineEvent] = asyncio.Queue()
        self.watchers.append(queue)
        try:
            while True:
                yield await queue.get()
        finally:
            self.watchers.remove(queue)

    def emit(self, event: EngineEvent) -> None:
        for queue in self.watchers:
            queue.put_nowait(event)

    def kill(self, spec: WorkspaceSpec, *, exit_code: int = 137, oom: bool = False) -> None:
        """What ``docker kill`` (or the OOM killer) does from outside Den: the container
        stops, and the engine says so."""
        self._get(spec).running = False
        if oom:
            self.emit(EngineEvent(EngineEventKind.OOM, spec.workspace_id, container_of(spec)))
        self.emit(EngineEvent(EngineEventKind.DIE, spec.workspace_id, container_of(spec),
                              exit_code=exit_code))

    # --- ProcessControl -------------------------------------------------------------------

    def _agent(self, spec: WorkspaceSpec) -> _Container:
        c = self._get(spec)
        if not c.running:
            raise AgentUnavailable(f"the agent of {container_of(spec)} is not running")
        return c

    def _process(self, spec: WorkspaceSpec, pid: int) -> _Process:
        proc = self._agent(spec).processes.get(pid)
        if proc is None:
            raise ObjectMissing(f"process {pid}: not found in the workspace")
        return proc

    async def spawn(self, spec: WorkspaceSpec, req: ExecRequest, *, log_bytes: int) -> int:
        self._enter("spawn")
        c = self._agent(spec)
        pid, self.next_pid = self.next_pid, self.next_pid + 1
        result = _run(req)
        output = [StreamChunk(name, data) for name, data in
                  (("stdout", result.stdout), ("stderr", result.stderr)) if data]
        info = ProcessInfo(pid=pid, argv=tuple(req.argv), cwd=req.cwd, user=req.user,
                           started_at=time.time(), running=True)
        c.processes[pid] = _Process(info, output)
        return pid

    async def processes(self, spec: WorkspaceSpec) -> list[ProcessInfo]:
        self._enter("processes")
        return [p.info for _, p in sorted(self._agent(spec).processes.items())]

    async def process_logs(self, spec: WorkspaceSpec, pid: int, *, follow: bool
                           ) -> AsyncIterator[StreamChunk]:
        self._enter("process_logs")
        proc = self._process(spec, pid)
        for chunk in list(proc.output):
            yield chunk
        if follow:
            await proc.exited.wait()

    async def signal(self, spec: WorkspaceSpec, pid: int, signal: str) -> None:
        self._enter("signal")
        proc = self._process(spec, pid)
        if proc.info.running and signal not in _HARMLESS:
            number = signals.Signals[f"SIG{signal}"].value
            proc.info = dataclasses.replace(proc.info, running=False, exit_code=128 + number,
                                            signal=signal)
            proc.exited.set()

    # --- snapshots --------------------------------------------------------------------

    async def snapshot(self, spec: WorkspaceSpec, snap: SnapshotSpec) -> int:
        self._enter("snapshot")
        self._get(spec)
        self.images.add(str(snap.handle["image"]))
        self.volumes[snapshot_volume(snap)] = dict(snap.labels)
        self.snapshot_files[snap.snapshot_id] = dict(self.files.get(volume_of(spec), {}))
        return 4096

    async def load_snapshot(self, spec: WorkspaceSpec, snap: SnapshotSpec) -> None:
        self._enter("load_snapshot")
        if not self._has_snapshot(snap):
            raise ObjectMissing(f"snapshot {snap.snapshot_id}: not found in the engine")
        self.containers[container_of(spec)] = _Container(spec)
        self.volumes.setdefault(volume_of(spec), dict(spec.labels))
        self.files[volume_of(spec)] = dict(self.snapshot_files.get(snap.snapshot_id, {}))

    def _has_snapshot(self, snap: SnapshotSpec) -> bool:
        return str(snap.handle["image"]) in self.images and snapshot_volume(snap) in self.volumes

    def new_snapshot(self, snapshot_id: str, labels: Mapping[str, str]) -> SnapshotSpec:
        return docker_specs.new_snapshot(self.prefix, snapshot_id, labels)

    def restore_handle(self, spec: WorkspaceSpec) -> dict[str, Any]:
        return docker_specs.restore_handle(spec, self.prefix)

    async def copy_snapshot(self, spec: WorkspaceSpec, snap: SnapshotSpec, *, into: Handle
                            ) -> None:
        self._enter("copy_snapshot", spec)
        volume = str(into["volume"])
        if not self._has_snapshot(snap):
            raise ObjectMissing(f"snapshot {snap.snapshot_id}: not found in the engine")
        self.volumes[volume] = dict(spec.labels)
        self.files[volume] = dict(self.snapshot_files.get(snap.snapshot_id, {}))

    async def replace_container(self, spec: WorkspaceSpec, *, old: Handle) -> None:
        self._enter("replace_container", spec)
        old_volume = str(old.get("volume") or volume_of(spec))
        self.containers[container_of(spec)] = _Container(spec)
        if old_volume != volume_of(spec):
            self.volumes.pop(old_volume, None)
            self.files.pop(old_volume, None)

    async def settle_checkpoint(self, spec: WorkspaceSpec, *, checkpoint: str, wait_s: float
                                ) -> bool:
        self._enter("settle_checkpoint", spec)
        c = self.containers.get(container_of(spec))
        return c is not None and not c.running and checkpoint in c.checkpoints

    def checkpoint_dirs(self) -> list[Path]:
        return []  # checkpoints live in memory here

    async def export_checkpoint(self, spec: WorkspaceSpec, *, checkpoint: str, dest: Path
                                ) -> int:
        self._enter("export_checkpoint")
        if checkpoint not in self._get(spec).checkpoints:
            raise ObjectMissing(f"checkpoint {checkpoint}: not found in the engine")
        dest.mkdir(parents=True, exist_ok=True)
        (dest / "pages").write_bytes(b"memory")
        return 6

    async def import_checkpoint(self, spec: WorkspaceSpec, *, checkpoint: str, src: Path
                                ) -> None:
        self._enter("import_checkpoint")
        if not src.is_dir():
            raise ObjectMissing(f"saved memory at {src}")
        self._get(spec).checkpoints.add(checkpoint)

    async def delete_snapshot(self, snap: SnapshotSpec) -> None:
        self._enter("delete_snapshot")
        self.images.discard(str(snap.handle["image"]))
        self.volumes.pop(snapshot_volume(snap), None)
        self.snapshot_files.pop(snap.snapshot_id, None)

    async def usage(self, spec: WorkspaceSpec) -> ResourceUsage | None:
        self._enter("usage", spec)
        c = self.containers.get(container_of(spec))
        return ResourceUsage(c.cpu_ns, c.memory_bytes) if c is not None and c.running else None

    async def list_objects(self, instance: str) -> list[EngineObject]:
        self._enter("list_objects")
        found = [
            EngineObject("container", name, c.spec.workspace_id, c.running,
                         role=c.spec.labels.get("den.role", ""), status=c.status)
            for name, c in self.containers.items()
            if c.spec.labels.get("den.instance") == instance
        ]
        found += [
            EngineObject("volume", name, labels.get("den.workspace", ""),
                         snapshot_id=labels.get("den.snapshot", ""))
            for name, labels in self.volumes.items()
            if labels.get("den.instance") == instance
        ]
        return found

    def stale(self, obj: EngineObject, handle: Handle) -> bool:
        return obj.kind == "volume" and obj.name != handle.get("volume")

    async def remove_object(self, obj: EngineObject) -> None:
        self._enter("remove_object")
        if obj.kind == "container":
            self.containers.pop(obj.name, None)
        else:
            self.volumes.pop(obj.name, None)


def _unwrap(argv: list[str]) -> list[str]:
    """A login shell's command (``sh -c <login shell> den-shell -c CMD``) as ``bash -lc``."""
    if argv[:2] == ["/bin/sh", "-c"] and argv[3:4] == ["den-shell"]:
        return ["bash", "-l", *argv[4:5]] if len(argv) == 4 else ["bash", "-lc", *argv[5:]]
    return argv


def _run(req: ExecRequest) -> ExecResult:
    argv = _unwrap(list(req.argv))
    if argv[:2] in (["bash", "-c"], ["sh", "-c"], ["bash", "-lc"]):
        argv = argv[2].split()
    match argv:
        case ["true"]:
            return ExecResult(0, b"", b"")
        case ["false"]:
            return ExecResult(1, b"", b"")
        case ["pwd"]:
            return ExecResult(0, req.cwd.encode() + b"\n", b"")
        case ["echo", *words]:
            return ExecResult(0, " ".join(words).encode() + b"\n", b"")
        case ["cat"]:
            return ExecResult(0, req.stdin or b"", b"")
        case ["exit", code]:
            return ExecResult(int(code), b"", b"")
        case ["head", "-c", size] if size.isdigit():  # "a" x size on stdout, "e" on stderr
            out = Captured(req.max_output_bytes, spool_dir=req.spool_dir)
            err = Captured(req.max_output_bytes, spool_dir=req.spool_dir)
            for start in range(0, int(size), 65536):
                n = min(65536, int(size) - start)
                out.add(b"a" * n)
                err.add(b"e" * n)
            return ExecResult(0, out, err, truncated=out.truncated or err.truncated)
    return ExecResult(127, b"", f"fake runtime: {argv[0]}: command not found\n".encode())


def _proc_net_tcp(listening: dict[int, tuple[str, int]]) -> bytes:
    head = "  sl  local_address rem_address   st tx_queue rx_queue\n"
    rows = [f"   {i}: 0100007F:{port:04X} 00000000:0000 0A 00000000:00000000\n"
            for i, port in enumerate(sorted(listening))]
    return (head + "".join(rows)).encode()


class _FakeConnection:
    """A real TCP connection on the test machine standing in for one inside a workspace."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    async def output(self) -> AsyncIterator[StreamChunk]:
        while data := await self._reader.read(65536):
            yield StreamChunk("stdout", data)

    async def write(self, data: bytes) -> None:
        self._writer.write(data)
        await self._writer.drain()

    async def close_stdin(self) -> None:
        if self._writer.can_write_eof():
            self._writer.write_eof()

    async def resize(self, cols: int, rows: int) -> None:
        """A connection has no terminal."""

    async def wait(self) -> int:
        return 0

    async def signal(self, name: str) -> None:
        """A connection has no process."""

    async def kill(self) -> None:
        self._writer.close()


class _FakeStream:
    def __init__(self, result: ExecResult, argv: object) -> None:
        self._result = result
        self._stdin = bytearray()
        self._cat = (_unwrap(list(argv)) in (["cat"], ["bash", "-lc", "cat"])
                     if isinstance(argv, list | tuple) else False)
        self._stdin_closed = asyncio.Event()
        self.signals: list[str] = []

    async def output(self) -> AsyncIterator[StreamChunk]:
        if self._cat:
            await self._stdin_closed.wait()
            yield StreamChunk("stdout", bytes(self._stdin))
            return
        if self._result.stdout:
            yield StreamChunk("stdout", self._result.stdout)
        if self._result.stderr:
            yield StreamChunk("stderr", self._result.stderr)

    async def write(self, data: bytes) -> None:
        self._stdin += data

    async def close_stdin(self) -> None:
        self._stdin_closed.set()

    async def resize(self, cols: int, rows: int) -> None:
        """The fake has no terminal."""

    async def wait(self) -> int:
        return self._result.exit_code

    async def signal(self, name: str) -> None:
        self.signals.append(name)
        if name in ("INT", "TERM", "KILL", "HUP", "QUIT"):
            self._stdin_closed.set()

    async def kill(self) -> None:
        self._stdin_closed.set()
