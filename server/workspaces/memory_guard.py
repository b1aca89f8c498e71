"""The memory guard: a memory hog dies and its workspace lives on, and an idle workspace pays
nothing for it.

The host kills a whole sandbox at its cgroup's limit, which the backend sets above the
workspace's own ``memory_mb`` (docker_specs.memory_headroom_mb). The guard ends the biggest
process before that happens: once the sandbox's memory cgroup passes ``memory_mb`` it sends
that process SIGTERM, and SIGKILL when memory still stays past the limit after a grace, or
passes the hard point (``memory_mb`` plus half the headroom) at any time. A biggest process
smaller than the excess waits one grace first (the sandbox may still be freeing what a process
that just ended held). It spares PID 1,
the agent, den-init, the sudo broker and dev's tmux server, as earlyoom did inside the
sandbox before it (earlyoom reread /proc/meminfo every 100 ms to 1 s: the one poller left in
an idle workspace). Every signal goes in the workspace's event log (kind ``memory``).

Nothing ticks: one eventfd per running workspace, which the kernel signals when the cgroup's
usage crosses a threshold (server/runtime/cgroup_memory.py), read by the event loop. Only then
does the guard ask the workspace, through an exec as root (the agent's session), for its
processes and sizes. That answer is untrusted: it is bounded, parsed strictly, and a
workspace that lies (a hog named ``den-agent``, sizes made up) only picks the wrong victim
among its own processes or reaches the host's limit and loses its own sandbox.

Armed when a workspace becomes ``running`` (the ledger tells :meth:`MemoryGuard.on_state`),
disarmed when it leaves ``running`` (pause, freeze, stop, delete, a crash) and re-armed for
every running workspace after each reconcile (a restart of Den).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import select

from server.db.models import Workspace
from server.runtime.base import ExecRequest, Execs, MemoryCgroups, WorkspaceSpec
from server.runtime.cgroup_memory import UsageAlarm, read_bytes
from server.workspaces.states import State

if TYPE_CHECKING:
    from server.workspaces.service import WorkspaceService

log = logging.getLogger(__name__)

MiB = 1024 * 1024
# Processes the guard never ends (their /proc comm): PID 1 is spared by number.
SPARED = frozenset({"den-agent", "den-init", "den-sudo-broke", "den-sudo-broker",
                    "tmux: server", "sleep"})
MAX_PROCESSES = 4096  # lines of the listing read; the rest is ignored
LIST_BYTES = 256 * 1024  # the listing's output is cut there
MAX_ROUNDS = 16  # signals sent for one crossing, at most
GRACE_S = 2.0  # between a SIGTERM and the next look
EXEC_TIMEOUT_S = 10.0
PAGE = 4096
# Every process of the sandbox: "pid resident-pages comm", one a line, in any POSIX sh.
LIST_SCRIPT = ('cd /proc && for p in [0-9]*; do { read -r _ r _ < "$p/statm" && '
               'read -r c < "$p/comm" && echo "$p $r $c"; } 2>/dev/null; done')


@dataclass(frozen=True)
class Proc:
    pid: int
    rss_bytes: int
    comm: str


def parse_processes(out: bytes) -> list[Proc]:
    """The listing of :data:`LIST_SCRIPT`, validated: lines that are not ``pid pages comm``
    with sane numbers are dropped, at most :data:`MAX_PROCESSES` are kept."""
    procs: list[Proc] = []
    for raw in out[:LIST_BYTES].split(b"\n"):
        if len(procs) >= MAX_PROCESSES:
            break
        parts = raw.decode("utf-8", "replace").split(" ", 2)
        if len(parts) != 3 or not parts[0].isdigit() or not parts[1].isdigit():
            continue
        pid, pages = int(parts[0]), int(parts[1])
        if not 0 < pid < 1 << 22 or pages >= 1 << 40:
            continue
        comm = "".join(c if c.isprintable() else "?" for c in parts[2][:64])
        procs.append(Proc(pid=pid, rss_bytes=pages * PAGE, comm=comm))
    return procs


def pick_victim(procs: list[Proc]) -> Proc | None:
    """The biggest process that may be ended (not PID 1 nor one of :data:`SPARED`)."""
    fair = [p for p in procs if p.pid != 1 and p.comm not in SPARED and p.rss_bytes > 0]
    return max(fair, key=lambda p: (p.rss_bytes, p.pid), default=None)


@dataclass
class _Watch:
    spec: WorkspaceSpec
    alarm: UsageAlarm
    soft: int  # bytes: the workspace's memory_mb
    hard: int  # bytes: memory_mb plus half the headroom
    fired: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None


class MemoryGuard:
    """One watcher for every running workspace of a backend with :class:`MemoryCgroups`;
    ``execs`` runs its commands in a workspace, ``spec_of`` gives a workspace's spec (None
    when it is gone or not running), ``note(id, kind, message)`` records an event."""

    def __init__(self, runtime: MemoryCgroups, execs: Execs, *,
                 spec_of: Callable[[str], WorkspaceSpec | None],
                 note: Callable[[str, str, str], None],
                 max_watched: int = 8192, grace_s: float = GRACE_S,
                 alarm_type: Callable[[Path, list[int]], UsageAlarm] = UsageAlarm) -> None:
        self.runtime = runtime
        self.execs = execs  # how it lists and signals the workspace's processes
        self.spec_of = spec_of
        self.note = note
        self.max_watched = max_watched
        self.grace_s = grace_s
        self.alarm_type = alarm_type  # tests give one over plain files
        self._watches: dict[str, _Watch] = {}
        self._want: dict[str, bool] = {}  # the last state seen: running or not
        self._arming: dict[str, asyncio.Task[None]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._warned = False

    def watched(self) -> set[str]:
        return set(self._watches)

    # --- arming ------------------------------------------------------------------------
    def on_state(self, workspace_id: str, state: State) -> None:
        """The ledger moved ``workspace_id`` to ``state`` (from any thread)."""
        loop = self._loop
        try:
            here: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            here = None
        if loop is None:
            loop = self._loop = here
        if loop is None:
            return
        if here is loop:
            self._changed(workspace_id, state is State.RUNNING)
        else:
            with contextlib.suppress(RuntimeError):  # the loop is closed
                loop.call_soon_threadsafe(self._changed, workspace_id, state is State.RUNNING)

    def _changed(self, workspace_id: str, running: bool) -> None:
        self._want[workspace_id] = running
        if not running:
            self._want.pop(workspace_id, None)
            self.disarm(workspace_id)
            return
        spec = self.spec_of(workspace_id)
        if spec is not None:
            self._arm_soon(spec)

    def _arm_soon(self, spec: WorkspaceSpec) -> None:
        wid = spec.workspace_id
        self._want[wid] = True
        if wid in self._arming:
            return
        task = asyncio.get_running_loop().create_task(self.arm(spec))
        self._arming[wid] = task
        task.add_done_callback(lambda _t: self._arming.pop(wid, None))

    async def sync(self, running: list[WorkspaceSpec]) -> None:
        """After a reconcile: watch exactly ``running`` (Den's restart re-arms here)."""
        self._loop = asyncio.get_running_loop()
        ids = {spec.workspace_id for spec in running}
        for wid in list(self._watches):
            if wid not in ids:
                self.disarm(wid)
        for spec in running:
            if spec.workspace_id not in self._watches:
                self._arm_soon(spec)

    async def arm(self, spec: WorkspaceSpec) -> None:
        """Watch ``spec``'s sandbox (again: its cgroup changes at every start)."""
        wid = spec.workspace_id
        self._loop = asyncio.get_running_loop()
        try:
            directory = await self.runtime.memory_cgroup(spec)
        except Exception as exc:  # the engine is down, the container gone: reconcile re-arms
            log.info("memory guard: workspace %s not watched (%s)", wid, exc)
            return
        if not self._want.get(wid):
            return  # it left running meanwhile
        if directory is None:
            self._warn(wid, "no v1 memory cgroup found for its sandbox")
            return
        if len(self._watches) >= self.max_watched and wid not in self._watches:
            self._warn(wid, f"{self.max_watched} workspaces are watched already")
            return
        try:
            # in a thread: each threshold the kernel registers waits for an RCU grace period
            # (measured 8-40 ms each), which would hold up every request on the loop
            watch = await asyncio.to_thread(self._open, spec, directory)
        except OSError as exc:
            self._warn(wid, f"its cgroup cannot be watched: {exc}")
            return
        if not self._want.get(wid):  # it left running meanwhile
            watch.alarm.close()
            return
        self.disarm(wid)
        self._watches[wid] = watch
        self._loop.add_reader(watch.alarm.fileno(), self._fired, wid)
        log.debug("memory guard: watching workspace %s (%s)", wid, directory)
        if (watch.alarm.usage() or 0) >= watch.soft:  # already past it when armed
            self._fired(wid)

    def _open(self, spec: WorkspaceSpec, directory: Path) -> _Watch:
        soft = spec.memory_mb * MiB
        limit = read_bytes(directory / "memory.limit_in_bytes") or 0
        hard = soft + (limit - soft) // 2 if limit > soft else soft
        return _Watch(spec=spec, alarm=self.alarm_type(directory, sorted({soft, hard})),
                      soft=soft, hard=hard)

    def disarm(self, workspace_id: str) -> None:
        watch = self._watches.pop(workspace_id, None)
        if watch is None:
            return
        if self._loop is not None:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(watch.alarm.fileno())
        if watch.task is not None:
            watch.task.cancel()
        watch.alarm.close()

    async def close(self) -> None:
        for task in list(self._arming.values()):
            task.cancel()
        for wid in list(self._watches):
            self.disarm(wid)

    def _warn(self, workspace_id: str, why: str) -> None:
        if not self._warned:
            self._warned = True
            log.warning("memory guard: workspace %s is not watched: %s (past memory_mb "
                        "only the host's cgroup limit acts, and ends the whole sandbox)",
                        workspace_id, why)

    # --- acting ------------------------------------------------------------------------
    def _fired(self, workspace_id: str) -> None:
        watch = self._watches.get(workspace_id)
        if watch is None:
            return
        watch.alarm.drain()
        watch.fired.set()
        if watch.task is None or watch.task.done():
            watch.task = asyncio.get_running_loop().create_task(self._act(workspace_id, watch))

    async def _act(self, workspace_id: str, watch: _Watch) -> None:
        termed: set[int] = set()
        patient = True
        for _ in range(MAX_ROUNDS):
            watch.fired.clear()
            if (usage := self._usage(workspace_id, watch)) is None or usage < watch.soft:
                return
            try:
                procs = parse_processes(await self._run(watch.spec, ["sh", "-c", LIST_SCRIPT]))
            except Exception as exc:
                log.info("memory guard: workspace %s did not list its processes (%s)",
                         workspace_id, exc)
                return
            # Again: what a process that just ended held may be gone now.
            if (usage := self._usage(workspace_id, watch)) is None or usage < watch.soft:
                return
            victim = pick_victim(procs)
            if victim is None:
                self.note(workspace_id, "memory",
                          f"memory guard: the workspace uses {usage // MiB} MiB, past its "
                          f"limit of {watch.spec.memory_mb} MiB, and has no process to end")
                return
            if patient and usage < watch.hard and victim.rss_bytes < usage - watch.soft:
                # No process explains the excess: most likely the sandbox is still freeing
                # what a process that just ended held (measured: up to a second). Ending a
                # small one would not help; look again at the next crossing or the grace.
                patient = False
                await self._next_look(watch)
                continue
            patient = True
            kill = usage >= watch.hard or victim.pid in termed
            sig = "KILL" if kill else "TERM"
            try:
                await self._run(watch.spec, ["sh", "-c", 'kill -s "$1" "$2"', "sh", sig,
                                             str(victim.pid)])
            except Exception as exc:
                log.info("memory guard: workspace %s: kill failed (%s)", workspace_id, exc)
            termed.add(victim.pid)
            self.note(workspace_id, "memory",
                      f"memory guard: the workspace used {usage // MiB} MiB, past its limit "
                      f"of {watch.spec.memory_mb} MiB: sent SIG{sig} to process {victim.pid} "
                      f"({victim.comm}, {victim.rss_bytes // MiB} MiB)")
            await self._next_look(watch)

    def _usage(self, workspace_id: str, watch: _Watch) -> int | None:
        """The cgroup's usage; None, and the watch dropped, once the sandbox is gone."""
        usage = watch.alarm.usage()
        if usage is None:
            self.disarm(workspace_id)
        return usage

    async def _next_look(self, watch: _Watch) -> None:
        """Until the next crossing (past the hard point, or back under the limit) or the
        grace, whichever is first."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(watch.fired.wait(), self.grace_s)

    async def _run(self, spec: WorkspaceSpec, argv: list[str]) -> bytes:
        res = await self.execs.exec(spec, ExecRequest(
            argv=argv, user="root", cwd="/", timeout_s=EXEC_TIMEOUT_S,
            max_output_bytes=LIST_BYTES, short=True))
        try:
            return bytes(res.stdout)
        finally:
            res.close()


def attach(svc: WorkspaceService) -> MemoryGuard | None:
    """The guard of ``svc``'s workspaces, told of their states by the ledger; None for a
    backend without memory cgroups (a microVM's own kernel ends its hogs)."""
    runtime = svc.runtime
    if not isinstance(runtime, MemoryCgroups):
        return None

    def spec_of(workspace_id: str) -> WorkspaceSpec | None:
        with svc.sessions() as s:
            ws = s.get(Workspace, workspace_id)
            return svc.spec_for(ws) if ws is not None and ws.state == State.RUNNING else None

    guard = MemoryGuard(runtime, runtime, spec_of=spec_of,
                        note=lambda wid, kind, message: svc.ledger.note(wid, kind, message))
    svc.ledger.watchers.append(guard.on_state)
    return guard


async def resync(svc: WorkspaceService, guard: MemoryGuard | None) -> None:
    """Watch every workspace recorded ``running`` (after each reconcile)."""
    if guard is None:
        return
    with svc.sessions() as s:
        rows = s.scalars(select(Workspace).where(Workspace.state == State.RUNNING.value)).all()
        specs = [svc.spec_for(ws) for ws in rows]
    await guard.sync(specs)
