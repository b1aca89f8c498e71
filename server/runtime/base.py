"""The Runtime protocol every backend implements, and its value objects.

A backend turns a :class:`WorkspaceSpec` into engine objects (for Docker: a container and a
volume mounted at ``/workspace``) and runs processes in them. The workspace service is the
only caller. Rules for every method:

* Blocking work never runs on the event loop; backends push it to their own executor.
* Lifecycle calls are idempotent: ``start`` of a running workspace, ``stop`` of a stopped one
  and ``destroy`` of a missing one succeed and change nothing.
* Every engine object carries the labels of :func:`labels_for`; ``list_objects`` finds them
  again after a crash, which is how the service reconciles.
* Errors are :mod:`server.runtime.errors` (or other ``DenError``); foreign exceptions never
  leave a backend.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from server.runtime.output import Captured

if TYPE_CHECKING:
    from server.agent.session import AgentSession
    from server.gpus.inventory import Gpu

LABEL_MANAGED = "den.managed"
LABEL_INSTANCE = "den.instance"
LABEL_WORKSPACE = "den.workspace"
LABEL_OWNER = "den.owner"
LABEL_SNAPSHOT = "den.snapshot"
# What a short-lived object is for: "copy" marks a helper container copying a volume. Such a
# helper is never the workspace's own container, and one left by a crash holds its volumes.
LABEL_ROLE = "den.role"
ROLE_COPY = "copy"
# A sandbox the warm pool made (server/pool/): it has no row until a create claims it, and
# keeps the label after (labels are immutable), so the role says nothing about ownership.
ROLE_POOL = "pool"


def labels_for(*, instance: str, workspace_id: str, owner: str) -> dict[str, str]:
    return {
        LABEL_MANAGED: "true",
        LABEL_INSTANCE: instance,
        LABEL_WORKSPACE: workspace_id,
        LABEL_OWNER: owner,
    }


Handle = Mapping[str, Any]
"""A backend's own record of a workspace's (or a snapshot's) engine objects: made by the
backend (:meth:`Lifecycle.new_handle`, :meth:`DiskSnapshots.new_snapshot`, a restore's
:meth:`DiskSnapshots.copy_snapshot`), stored by the service with the row and handed back in
every spec, never read by the service (JupyterHub's ``Spawner.get_state``/``load_state``).
Its string values name the engine objects that are the workspace's now (:func:`names`); the
service may keep keys of its own beside them (server/workspaces/handles.py)."""


def names(handle: Handle) -> set[str]:
    """The engine objects a handle names: its string values."""
    return {v for v in handle.values() if isinstance(v, str)}


@dataclass(frozen=True)
class WorkspaceSpec:
    """Everything a backend needs to create a workspace; plain data, no I/O."""

    workspace_id: str
    handle: Handle  # the backend's names of its engine objects (new_handle)
    image: str
    runtime: str  # "gvisor" or "runc"
    cpus: float
    memory_mb: int
    pids_limit: int
    hostname: str
    labels: Mapping[str, str]
    env: Mapping[str, str] = field(default_factory=dict)
    disk_gb: int = 0  # /workspace and the root filesystem together; 0: not enforced
    gpus: tuple[Gpu, ...] = ()  # the GPUs its container is made with (server/gpus)
    network: str = "internet"  # its network policy's mode at start ("none": no NIC, microVMs)


@dataclass(frozen=True)
class SnapshotSpec:
    """A snapshot, as the backend that made it (:meth:`DiskSnapshots.new_snapshot`) names
    it: ``image`` is what a workspace made from it runs (its ``image``), ``handle`` the
    backend's own record of the snapshot's engine objects."""

    snapshot_id: str
    image: str
    handle: Handle
    labels: Mapping[str, str]


class ContainerStatus(StrEnum):
    RUNNING = "running"
    FROZEN = "frozen"  # running, its processes stopped by the engine's freezer (Freezer)
    STOPPED = "stopped"
    MISSING = "missing"

    @property
    def alive(self) -> bool:
        """Running or frozen: the sandbox and its memory are there."""
        return self in (ContainerStatus.RUNNING, ContainerStatus.FROZEN)


@dataclass(frozen=True)
class EngineObject:
    """A labelled engine object found by ``list_objects``."""

    kind: str  # "container", "volume" or "image" (a snapshot's committed filesystem)
    name: str
    workspace_id: str
    running: bool = False
    snapshot_id: str = ""
    role: str = ""  # LABEL_ROLE: "copy" for a volume-copy helper, "" for the rest
    # A container's status as listed (None: not said; reconcile then asks ``status``)
    status: ContainerStatus | None = None


@dataclass(frozen=True)
class ResourceUsage:
    """What a running workspace has used: CPU time so far, and memory now (None when the
    backend cannot tell)."""

    cpu_ns: int
    memory_bytes: int | None = None


@dataclass(frozen=True)
class ExecRequest:
    argv: Sequence[str]
    user: str = "dev"
    cwd: str = "/workspace"
    env: Mapping[str, str] = field(default_factory=dict)
    stdin: bytes | None = None
    timeout_s: float | None = None
    max_output_bytes: int = 16 * 1024 * 1024
    # Streams only: run on a pseudo-terminal (stdout and stderr merge into "stdout"), sized
    # ``size`` (columns, rows) from the start.
    tty: bool = False
    size: tuple[int, int] | None = None
    # A short call (a files operation through exec): not admitted through the gate of long
    # calls, and run on a backend's pool of short calls where it has one.
    short: bool = False
    # Where output past 256 KiB per stream is spooled (one-shot exec of the API); None: all
    # of it is kept in memory.
    spool_dir: Path | None = None


class ExecResult:
    """A finished one-shot exec. Its output is held as :class:`Captured` streams (``out``,
    ``err``): in memory, or, for a request with ``spool_dir``, past 256 KiB in a private
    temporary file that :meth:`close` removes (the API's exec answer is streamed from it).
    ``stdout`` and ``stderr`` read a stream whole, as bytes: for callers that asked for small
    output (files, devcontainer hooks, port scans, pull requests)."""

    __slots__ = ("duration_ms", "err", "exit_code", "out", "timed_out", "truncated")

    def __init__(self, exit_code: int, stdout: bytes | Captured = b"",
                 stderr: bytes | Captured = b"", timed_out: bool = False,
                 duration_ms: int = 0, truncated: bool = False) -> None:
        self.exit_code = exit_code
        self.out = stdout if isinstance(stdout, Captured) else Captured.of(stdout)
        self.err = stderr if isinstance(stderr, Captured) else Captured.of(stderr)
        self.timed_out = timed_out
        self.duration_ms = duration_ms
        self.truncated = truncated

    @property
    def stdout(self) -> bytes:
        return self.out.read()

    @property
    def stderr(self) -> bytes:
        return self.err.read()

    def close(self) -> None:
        """Free the output's spool files (idempotent)."""
        self.out.close()
        self.err.close()

    def __repr__(self) -> str:
        return (f"ExecResult(exit_code={self.exit_code}, stdout={len(self.out)} bytes, "
                f"stderr={len(self.err)} bytes, timed_out={self.timed_out})")


@dataclass(frozen=True)
class StreamChunk:
    """One piece of a streaming exec: stream is "stdout" or "stderr"."""

    stream: str
    data: bytes


class ExecStream(Protocol):
    """A running process with open pipes (``WS .../exec/stream``)."""

    def output(self) -> AsyncIterator[StreamChunk]:
        """Chunks of stdout/stderr until both close."""
        ...

    async def write(self, data: bytes) -> None: ...

    async def close_stdin(self) -> None: ...

    async def resize(self, cols: int, rows: int) -> None:
        """Set the terminal size of a ``tty`` stream (the process gets SIGWINCH); ignored
        without a terminal."""
        ...

    async def wait(self) -> int:
        """The exit code, once the process has exited."""
        ...

    async def kill(self) -> None:
        """End the process (the client went away). Idempotent."""
        ...

    async def signal(self, name: str) -> None:
        """Send the signal ``name`` (one of :data:`SIGNALS`) to the process's group; ignored
        once it has exited."""
        ...


@dataclass(frozen=True)
class ProcessInfo:
    """A background process started through the workspace's agent (``spawn``)."""

    pid: int
    argv: tuple[str, ...]
    cwd: str
    user: str
    started_at: float  # unix seconds
    running: bool
    exit_code: int | None = None
    signal: str | None = None  # the signal that ended it, e.g. "KILL"


SIGNALS = ("INT", "TERM", "KILL", "HUP", "QUIT", "USR1", "USR2", "WINCH", "STOP", "CONT")


@runtime_checkable
class ProcessControl(Protocol):
    """Background processes, for backends whose workspaces run Den's agent
    (:mod:`server.agent`). A process started here is a child of the agent, inside PID 1's
    tree, so it keeps running (same pid, same memory) across pause and resume; its output
    goes into a bounded ring buffer in the agent. Raise ``AgentUnavailable`` when the
    workspace's agent does not answer, ``ObjectMissing`` for an unknown pid. The service
    asks ``isinstance(runtime, ProcessControl)`` (structural: it checks that the methods
    exist) to learn whether a backend has them."""

    async def spawn(self, spec: WorkspaceSpec, req: ExecRequest, *, log_bytes: int) -> int:
        """Start ``req`` detached (no stdin, no deadline); returns its pid at once."""
        ...

    async def processes(self, spec: WorkspaceSpec) -> list[ProcessInfo]:
        """The processes started by ``spawn`` that the agent still remembers (running ones
        and the last exited ones)."""
        ...

    def process_logs(self, spec: WorkspaceSpec, pid: int, *, follow: bool
                     ) -> AsyncIterator[StreamChunk]:
        """The output kept in the ring buffer, then, with ``follow``, new output until the
        process exits."""
        ...

    async def signal(self, spec: WorkspaceSpec, pid: int, signal: str) -> None:
        """Send ``signal`` (one of :data:`SIGNALS`) to the process's group."""
        ...


class EngineEventKind(StrEnum):
    START = "start"  # a workspace's container started
    DIE = "die"  # it exited (whatever the cause: a stop, a kill, a crash, out of memory)
    OOM = "oom"  # the kernel's OOM killer hit it (a ``die`` follows)
    RESYNC = "resync"  # events may have been missed (the stream broke): reconcile
    NOTE = "note"  # something the workspace's event log should say (``detail``)


@dataclass(frozen=True)
class EngineEvent:
    """One thing the engine says happened to a workspace's container (from
    :meth:`EngineEvents.watch`). ``RESYNC`` carries no workspace."""

    kind: EngineEventKind
    workspace_id: str = ""
    container: str = ""  # the engine object's name (one of the workspace's handle names)
    exit_code: int | None = None  # DIE only
    detail: str = ""  # DIE: why, where the backend knows better than an exit code


@runtime_checkable
class EngineEvents(Protocol):
    """Backends that can tell what happens to workspaces as it happens (KubeSpawner's
    reflector; Docker's event stream), so that Den learns that a sandbox died from the
    engine rather than from the next failing exec."""

    def watch(self, instance: str) -> AsyncGenerator[EngineEvent, None]:
        """Events about the containers labelled with this Den ``instance``, until the
        caller stops iterating. Never ends by itself: when the engine's stream breaks it
        reconnects (backing off), then yields ``RESYNC``, as it does when it had to drop
        events (its buffer is bounded). Events may repeat or come late: the caller checks
        them against the engine's current status before acting."""
        ...


@runtime_checkable
class ResourceFit(Protocol):
    """Backends that cannot serve every size the operator's maxima allow (a microVM under
    software emulation): asked at create, before anything is written."""

    def unfit(self, *, cpus: float, memory_mb: int) -> str | None:
        """Why this host cannot usefully run a workspace of this size (a 422 says it), or
        None."""
        ...


@dataclass(frozen=True)
class NetworkInfo:
    """The network a backend puts its workspaces on, as the host's firewall sees it."""

    interface: str  # the host's bridge interface
    subnet: str  # IPv4 CIDR
    gateway: str = ""  # the host's address on the bridge ("" where unknown)
    addresses: Mapping[str, str] = field(default_factory=dict)  # running container -> IPv4
    # running container -> its port on the bridge (the host's end of its veth), where known:
    # unlike an address, a workspace cannot forge the port its packets come in by.
    ports: Mapping[str, str] = field(default_factory=dict)
    own_bridge: bool = False  # Den made the bridge, not the engine (firewall.Bridge.own)


@runtime_checkable
class ManagedNetwork(Protocol):
    """Backends that put every workspace on one bridge network of Den's own, so that the
    host's firewall can judge what each workspace sends (server/network/)."""

    async def network(self) -> NetworkInfo:
        """The network, created when it is missing (idempotent), with the address of each
        running container on it."""
        ...

    def sandbox_name(self, spec: WorkspaceSpec) -> str:
        """The name :class:`NetworkInfo` knows this workspace's sandbox by."""
        ...


@runtime_checkable
class Freezer(Protocol):
    """Backends that can freeze a running workspace in place (the light sleep tier): its
    processes stop at once and use no CPU, its memory stays where it is, and a thaw takes
    milliseconds (a memory checkpoint to disk and its restore take a second or more). A
    frozen workspace's ``status`` is ``FROZEN``. Its other lifecycle calls (``stop``,
    ``destroy``, ``pause``, ``snapshot``) work on it as on a running one: the backend thaws
    it first where the engine needs that. The service asks ``isinstance(runtime, Freezer)``.
    """

    async def freeze(self, spec: WorkspaceSpec) -> int | None:
        """Freeze a running workspace; returns the memory it holds while frozen (bytes; None
        when unknown). A frozen one is left alone. Raises ``EngineConflict`` when it is not
        running."""
        ...

    async def thaw(self, spec: WorkspaceSpec) -> None:
        """Let a frozen workspace run again, as it was. One that is not frozen is left
        alone; raises ``EngineConflict`` when it is not running at all."""
        ...

    async def settle(self, spec: WorkspaceSpec, *, timeout_s: float) -> bool:
        """Wait until a running workspace is idle (what its boot started has settled: the
        warm pool freezes a sandbox only then, so that a claim does not pay for it); False
        when it is still busy after ``timeout_s`` or its use cannot be measured."""
        ...


@runtime_checkable
class MemoryCgroups(Protocol):
    """Backends whose sandboxes each have a host memory cgroup Den may watch: the memory
    guard (server/workspaces/memory_guard.py) waits on it, without polling, for the
    workspace to pass ``memory_mb``."""

    async def memory_cgroup(self, spec: WorkspaceSpec) -> Path | None:
        """The host directory of the running sandbox's memory cgroup (cgroup v1), or None
        when there is none to watch (not running, another cgroup layout)."""
        ...


@runtime_checkable
class Recovers(Protocol):
    """Backends whose running sandbox can be left halted by a Den that died mid-operation
    (a microVM whose CPUs were stopped for a snapshot's copy). Reconcile asks
    ``isinstance(runtime, Recovers)`` for each workspace it finds running and idle."""

    async def recover_running(self, spec: WorkspaceSpec) -> str | None:
        """Let a running sandbox that a dead Den left halted run again; returns what was
        done (for the event log), None when there was nothing to do. Called only while no
        operation of this Den holds the workspace. Raises ``EngineError``."""
        ...


@runtime_checkable
class Rehost(Protocol):
    """Backends whose sandboxes can take a new host name after boot, so that a sandbox made
    ahead of demand (the warm pool, server/pool/) can become a named workspace, and a fork
    woken from saved memory answers with its own name. The service asks
    ``isinstance(runtime, Rehost)``."""

    async def set_hostname(self, spec: WorkspaceSpec, hostname: str, *, was: str) -> None:
        """Make ``hostname`` the running sandbox's host name (the kernel's, /etc/hostname and
        its /etc/hosts entry, which said ``was``). Called by Den only: on a pooled sandbox
        before any user code runs in it, and on a fork just woken from its origin's memory
        (whose processes run already: the sandbox is the fork owner's own, who has root in
        it anyway). Raises ``EngineError`` when it could not."""
        ...


@runtime_checkable
class ArmedRehost(Protocol):
    """:class:`Rehost` backends that can make a rename ready ahead of time: the warm pool
    arms each sandbox it makes (before freezing it), and a later ``set_hostname`` on it
    completes the armed rename instead of starting one (measured: a privileged exec at
    claim time cost 0.3-0.7 s of a pooled create under load). The pool asks
    ``isinstance(runtime, ArmedRehost)``."""

    async def arm_hostname(self, spec: WorkspaceSpec) -> None:
        """Make ready the rename of the running, never-used sandbox from its current host
        name (``spec.hostname``). Raises ``EngineError`` when it could not (the sandbox is
        then renamed the ordinary way). ``destroy`` drops what this holds."""
        ...


@runtime_checkable
class PortConnector(Protocol):
    """Backends that can open a TCP connection to a port on a workspace's own loopback
    (``ssh -L``, preview URLs). The service asks ``isinstance(runtime, PortConnector)``."""

    async def connect(self, spec: WorkspaceSpec, host: str, port: int) -> ExecStream | None:
        """A connection to ``host:port`` inside the workspace, as a stream (output: what the
        port sends; ``write``: what it receives; ``close_stdin``: half-close; ``kill``:
        close). None when this workspace cannot be reached that way (the caller relays
        through exec then). Raises ``EngineConflict`` when nothing listens there."""
        ...


@runtime_checkable
class AgentChannel(Protocol):
    """Backends whose workspaces run Den's agent (docs/agent.md) hand out its session; the
    protocol above it (:mod:`server.agent`) is the same for every backend."""

    async def agent(self, spec: WorkspaceSpec) -> AgentSession | None:
        """The live session with the workspace's agent, or None when the workspace has none
        (or its agent cannot be reached: the caller then uses the engine's exec)."""
        ...

    async def connect(self, spec: WorkspaceSpec, host: str, port: int) -> ExecStream | None:
        """A TCP connection made by the agent to ``host:port`` on the workspace's own
        loopback, as a stream (output: what the port sends; ``write``: what it receives); None
        when the workspace has no agent."""
        ...

    def on_fallback(self, listener: Callable[[str, str], None]) -> None:
        """Call ``listener(workspace_id, reason)`` each time a workspace's agent cannot be
        reached and its calls go through the engine's exec for a while instead (at most
        once per such spell), so that the event log can say why."""
        ...


@runtime_checkable
class HostVolumes(Protocol):
    """Backends whose workspace's ``/workspace`` is a directory on this host (Docker's
    volumes; not a microVM's disk): the files API reads and writes it from the host, as the
    workspace user (server/runtime/host_files.py)."""

    async def workspace_dir(self, spec: WorkspaceSpec) -> Path | None:
        """The host directory that the workspace's ``/workspace`` binds, or None when this
        host has none for it (its disk not mounted, a volume driver without a directory)."""
        ...


@runtime_checkable
class Lifecycle(Protocol):
    """What every backend does: make, start, stop and remove a workspace's sandbox and its
    disk, and say what state it is in. ``name`` names the backend (``/healthz``)."""

    name: str

    def new_handle(self, workspace_id: str) -> dict[str, Any]:
        """The names the engine objects of a new workspace will have (its :data:`Handle`):
        the service stores them with the row before anything is made, so that reconcile can
        find what a crash left half-made."""
        ...

    async def check(self) -> None:
        """Raise EngineUnavailable unless the engine answers and has what Den needs."""
        ...

    async def image_exists(self, image: str) -> bool: ...

    async def create(self, spec: WorkspaceSpec) -> None:
        """Create the volume and the container (not started). Idempotent by name: objects
        that already exist are reused."""
        ...

    async def seed(self, spec: WorkspaceSpec, tar: Path) -> None:
        """Unpack ``tar`` into ``/workspace`` (the volume), keeping owners and modes from the
        archive. Works on a created or a running container; the service seeds right after
        the first start, so that copying overlaps nothing and the sandbox boots first."""
        ...

    async def start(self, spec: WorkspaceSpec) -> None:
        """Start the container; a running one is left alone."""
        ...

    async def stop(self, spec: WorkspaceSpec, *, timeout_s: int) -> None:
        """Stop the container (SIGTERM, then SIGKILL after ``timeout_s``); keep all data.
        A stopped or missing container is success."""
        ...

    async def destroy(self, spec: WorkspaceSpec) -> None:
        """Remove the container and the volume. Missing objects are success."""
        ...

    async def status(self, spec: WorkspaceSpec) -> ContainerStatus: ...

    async def usage(self, spec: WorkspaceSpec) -> ResourceUsage | None:
        """CPU time the workspace has used so far and the memory it holds now, or None when
        it is not running. The idle reaper differences two CPU readings to see whether it is
        busy; the metrics export both."""
        ...


@runtime_checkable
class Execs(Protocol):
    """Processes in a running workspace, through the engine (or the agent: AgentChannel)."""

    async def exec(self, spec: WorkspaceSpec, req: ExecRequest) -> ExecResult:
        """Run a process to completion. A timeout kills it and its children and sets
        ``timed_out``. Raises ObjectMissing/Conflict when the container is not running."""
        ...

    async def exec_stream(self, spec: WorkspaceSpec, req: ExecRequest) -> ExecStream:
        """Start a process with open stdin/stdout/stderr."""
        ...


@runtime_checkable
class Inventory(Protocol):
    """The engine objects a backend made, found again by their labels (reconcile)."""

    async def list_objects(self, instance: str) -> list[EngineObject]:
        """Every container, volume and image labelled with this Den ``instance``."""
        ...

    def stale(self, obj: EngineObject, handle: Handle) -> bool:
        """Whether ``obj``, labelled as the workspace's, is no longer part of it (data a
        restore replaced or left half-copied): reconcile removes it."""
        ...

    async def remove_object(self, obj: EngineObject) -> None:
        """Remove one object found by ``list_objects`` (orphan cleanup). Idempotent."""
        ...


@runtime_checkable
class Checkpoints(Protocol):
    """Backends that can save a running workspace's memory and processes and start it again
    from them: pause and resume, and memory snapshots. Without them a workspace cannot be
    paused (its idle action is a stop) and snapshots are disk only."""

    async def pause(self, spec: WorkspaceSpec, *, checkpoint: str) -> None:
        """Save the memory and processes of a running workspace as ``checkpoint`` and stop
        its container, freeing CPU and RAM. Processes that cannot be restored (those started
        by exec, which hold host descriptors) are ended first; processes descending from the
        container's main process survive. An older checkpoint of the same name is replaced.
        On failure the container is left running or stopped, never half-saved."""
        ...

    async def resume(self, spec: WorkspaceSpec, *, checkpoint: str) -> None:
        """Start the container from ``checkpoint``. Raises (and leaves the container
        stopped) when the checkpoint is missing or the restore fails; the caller then
        starts it cold. A running container is left alone."""
        ...

    async def delete_checkpoint(self, spec: WorkspaceSpec, *, checkpoint: str) -> None:
        """Remove ``checkpoint``; a missing one is success."""
        ...

    async def settle_checkpoint(self, spec: WorkspaceSpec, *, checkpoint: str, wait_s: float
                                ) -> bool:
        """After a crash during ``pause``: wait (at most ``wait_s``) for a checkpoint still
        being written, then True when ``checkpoint`` is complete and installed for
        ``resume`` (the container has exited), False when there is none or it was
        incomplete (it is removed; the container may still run)."""
        ...

    async def export_checkpoint(self, spec: WorkspaceSpec, *, checkpoint: str, dest: Path
                                ) -> int:
        """Copy the memory checkpoint out to the host directory ``dest`` (a memory snapshot);
        returns its size in bytes."""
        ...

    def checkpoint_dirs(self) -> list[Path]:
        """Where pause checkpoints are kept on the host (the checkpoint disk-use metric;
        blocking: called at scrape time off the event loop)."""
        ...

    async def import_checkpoint(self, spec: WorkspaceSpec, *, checkpoint: str, src: Path
                                ) -> None:
        """Install a checkpoint exported by ``export_checkpoint`` (from this workspace or
        another made from the same snapshot) as ``checkpoint``, for ``resume``."""
        ...


@runtime_checkable
class Housekeeping(Protocol):
    """Backends that leave files of the engine's on the host to tidy now and then (the idle
    reaper calls it on each pass)."""

    async def sweep(self) -> int:
        """Remove what the engine left behind and no operation uses any more; returns how
        many things it removed."""
        ...


@runtime_checkable
class DiskSnapshots(Protocol):
    """Backends that can copy a workspace's disk into a snapshot and make workspaces from one:
    snapshots, forks and restores."""

    def new_snapshot(self, snapshot_id: str, labels: Mapping[str, str]) -> SnapshotSpec:
        """The names of a new snapshot's engine objects (stored with its row before
        :meth:`snapshot` makes them)."""
        ...

    async def snapshot(self, spec: WorkspaceSpec, snap: SnapshotSpec) -> int:
        """Copy the workspace's disk into the objects ``snap`` names (Docker: the container's
        filesystem committed as ``snap.image``, the volume copied). The workspace keeps
        running (a running one is copied as it is at that moment). Returns the bytes
        copied."""
        ...

    async def load_snapshot(self, spec: WorkspaceSpec, snap: SnapshotSpec) -> None:
        """Make a new workspace (a fork) a copy of ``snap``: its sandbox is (re)created from
        ``snap.image`` (``spec.image`` names it) and its data replaced by the snapshot's. It
        is left created, not started."""
        ...

    def restore_handle(self, spec: WorkspaceSpec) -> dict[str, Any]:
        """The handle a restore of this workspace will switch to: its current one with a new
        name for the copy of the snapshot's data (:meth:`copy_snapshot` makes it). The
        service stores it before the copy starts, so that reconcile can remove a partial
        copy after a crash."""
        ...

    async def copy_snapshot(self, spec: WorkspaceSpec, snap: SnapshotSpec, *, into: Handle
                            ) -> None:
        """The first half of a restore: the data object that ``into`` names and ``spec``'s
        handle does not (a new volume, for Docker), labelled as the workspace's, filled with
        a copy of ``snap``'s. The workspace's container and its current data are not
        touched, so a crash here loses nothing (reconcile removes the unused copy).
        Idempotent: an existing copy is emptied first."""
        ...

    async def replace_container(self, spec: WorkspaceSpec, *, old: Handle) -> None:
        """The second half of a restore: the sandbox is recreated from ``spec`` (its image
        and its handle: the snapshot's image and the copy made by ``copy_snapshot``), then
        what ``old`` names and ``spec``'s handle does not (the replaced data) is removed.
        Left created, not started. Idempotent (a crash in it is finished by calling it
        again)."""
        ...

    async def delete_snapshot(self, snap: SnapshotSpec) -> None:
        """Remove the snapshot's image and volume; missing ones are success."""
        ...


class Runtime(Lifecycle, Execs, Inventory, Protocol):
    """A workspace backend: what every backend implements. What some can do besides
    (Checkpoints, DiskSnapshots, Freezer, AgentChannel, ProcessControl, PortConnector,
    ManagedNetwork, EngineEvents) the service asks with ``isinstance``; :func:`features`
    names them for ``/healthz``."""


FEATURES: dict[str, type] = {}  # filled below: feature name -> protocol


def features(runtime: object) -> list[str]:
    """The optional protocols ``runtime`` implements, by name."""
    return [name for name, proto in FEATURES.items() if isinstance(runtime, proto)]


FEATURES.update({
    "checkpoints": Checkpoints, "disk_snapshots": DiskSnapshots, "freezer": Freezer,
    "agent": AgentChannel, "processes": ProcessControl, "port_connect": PortConnector,
    "managed_network": ManagedNetwork, "engine_events": EngineEvents,
})
