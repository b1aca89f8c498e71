"""The memory guard's decisions (server/workspaces/memory_guard.py), over plain files standing
for a cgroup and a fake workspace answering its listing and its signals. The real cgroup's
eventfd and a real hog: tests/engine/test_access_and_input.py."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from server.runtime.base import ExecRequest, ExecResult, WorkspaceSpec
from server.runtime.cgroup_memory import memory_dir, working_set
from server.runtime.fake import FakeRuntime
from server.workspaces import memory_guard
from server.workspaces.memory_guard import (
    LIST_SCRIPT,
    MemoryGuard,
    Proc,
    parse_processes,
    pick_victim,
)
from server.workspaces.service import WorkspaceService
from server.workspaces.states import State
from tests.unit.test_service_fake import create, user

pytestmark = pytest.mark.anyio
MiB = 1024 * 1024
SPEC = WorkspaceSpec(workspace_id="ws1", handle={}, image="img", runtime="gvisor", cpus=1,
                     memory_mb=256, pids_limit=100, hostname="h", labels={})
LISTING = (b"1 900 den-agent\n7 800 den-init\n9 100000 den-sudo-broke\n12 700 tmux: server\n"
           b"40 2000 bash\n41 70000 python3\n42 30 sleep\n")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class FakeAlarm:
    """A UsageAlarm over plain files: the test says when a threshold is crossed."""

    def __init__(self, directory: Path, thresholds: Sequence[int]) -> None:
        self.directory = directory
        self.thresholds = list(thresholds)
        self.efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.closed = False

    def fileno(self) -> int:
        return self.efd

    def drain(self) -> int:
        try:
            return os.eventfd_read(self.efd)
        except BlockingIOError:
            return 0

    def usage(self) -> int | None:
        return working_set(self.directory)

    def cross(self) -> None:
        os.eventfd_write(self.efd, 1)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            os.close(self.efd)


class Sandbox:
    """One workspace: its cgroup's files, its process listing, the signals it got."""

    def __init__(self, directory: Path, *, listing: bytes = LISTING) -> None:
        self.dir = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.listing = listing
        self.signals: list[tuple[str, int]] = []
        self.alarms: list[FakeAlarm] = []
        self.on_signal: Callable[[str, int], None] = lambda sig, pid: None
        self.set_usage(10 * MiB)
        (directory / "memory.limit_in_bytes").write_text(str(512 * MiB))

    def set_usage(self, value: int) -> None:
        (self.dir / "memory.usage_in_bytes").write_text(f"{value}\n")

    def alarm(self, directory: Path, thresholds: Sequence[int]) -> FakeAlarm:
        made = FakeAlarm(directory, thresholds)
        self.alarms.append(made)
        return made

    async def memory_cgroup(self, spec: WorkspaceSpec) -> Path | None:
        return self.dir

    async def exec(self, spec: WorkspaceSpec, req: ExecRequest) -> ExecResult:
        assert req.user == "root" and req.short
        argv = list(req.argv)
        if argv == ["sh", "-c", LIST_SCRIPT]:
            return ExecResult(0, self.listing)
        assert argv[:3] == ["sh", "-c", 'kill -s "$1" "$2"'], argv
        self.signals.append((argv[4], int(argv[5])))
        self.on_signal(argv[4], int(argv[5]))
        return ExecResult(0)


def guard_of(box: Sandbox, notes: list[str], *, grace_s: float = 5.0) -> MemoryGuard:
    return MemoryGuard(box, box, spec_of=lambda wid: SPEC if wid == "ws1" else None,  # type: ignore[arg-type]
                       note=lambda wid, kind, msg: notes.append(f"{wid} {kind} {msg}"),
                       grace_s=grace_s, alarm_type=box.alarm)  # type: ignore[arg-type]


async def until(check: Callable[[], Any], timeout_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "condition not met"
        await asyncio.sleep(0.005)


# --- what the workspace says: bounded, validated --------------------------------------------


def test_the_listing_is_parsed_strictly_and_bounded() -> None:
    out = (b"5 10 ok\nnot a line\n-3 10 neg\n0 10 zero\n6 x bad\n7 99999999999999 huge\n"
           b"8 20 two words\n9 30 \x1b[31mred\n" + b"10 1 filler\n" * 10_000)
    procs = parse_processes(out)
    assert procs[:4] == [Proc(5, 10 * 4096, "ok"), Proc(8, 20 * 4096, "two words"),
                         Proc(9, 30 * 4096, "?[31mred"), Proc(10, 4096, "filler")]
    assert len(procs) == memory_guard.MAX_PROCESSES
    assert parse_processes(b"1 2 " + b"c" * 10_000)[0].comm == "c" * 64


def test_the_victim_is_the_biggest_process_that_is_not_spared() -> None:
    procs = parse_processes(LISTING)
    assert pick_victim(procs) == Proc(41, 70000 * 4096, "python3")
    # PID 1 whatever its name, the agent, den-init, the broker, dev's tmux server: never.
    assert pick_victim([Proc(1, 10**9, "python3"), *procs[:4], procs[6]]) is None
    assert pick_victim([]) is None


def test_memory_dir_reads_the_v1_memory_controller_of_the_process(tmp_path: Path) -> None:
    proc, root = tmp_path / "proc", tmp_path / "cg"
    (proc / "77").mkdir(parents=True)
    (proc / "77" / "cgroup").write_text("5:freezer:/docker/abc\n4:memory:/docker/abc\n"
                                        "0::/system.slice\n")
    assert memory_dir(77, proc=proc, root=root) is None  # no such cgroup (v2 only, gone)
    (root / "memory" / "docker" / "abc").mkdir(parents=True)
    (root / "memory" / "docker" / "abc" / "cgroup.event_control").write_text("")
    assert memory_dir(77, proc=proc, root=root) == root / "memory" / "docker" / "abc"
    assert memory_dir(78, proc=proc, root=root) is None
    assert memory_dir(0, proc=proc, root=root) is None


# --- acting ---------------------------------------------------------------------------------


async def test_a_hog_gets_sigterm_and_nothing_more_once_memory_falls(tmp_path: Path) -> None:
    box, notes = Sandbox(tmp_path / "cg"), list[str]()
    guard = guard_of(box, notes)
    guard.on_state("ws1", State.RUNNING)
    await until(lambda: guard.watched() == {"ws1"})
    # Thresholds at memory_mb and at memory_mb plus half the headroom (limit 512 MiB).
    assert box.alarms[0].thresholds == [256 * MiB, 384 * MiB]

    def freed(sig: str, pid: int) -> None:
        box.set_usage(20 * MiB)
        box.alarms[0].cross()
    box.on_signal = freed
    box.alarms[0].cross()  # a crossing below the limit is nothing to act on
    await asyncio.sleep(0.05)
    assert box.signals == []
    box.set_usage(300 * MiB)
    box.alarms[0].cross()
    await until(lambda: notes)
    await asyncio.sleep(0.05)
    assert box.signals == [("TERM", 41)]
    assert notes == ["ws1 memory memory guard: the workspace used 300 MiB, past its limit of "
                     "256 MiB: sent SIGTERM to process 41 (python3, 273 MiB)"]
    await guard.close()
    assert box.alarms[0].closed


async def test_a_process_that_ignores_sigterm_gets_sigkill_after_the_grace(
        tmp_path: Path) -> None:
    box, notes = Sandbox(tmp_path / "cg"), list[str]()
    guard = guard_of(box, notes, grace_s=0.05)
    box.set_usage(300 * MiB)  # already past the limit when armed: acts at once
    guard.on_state("ws1", State.RUNNING)
    await until(lambda: len(box.signals) == 2)
    assert box.signals == [("TERM", 41), ("KILL", 41)]
    box.set_usage(10 * MiB)
    await asyncio.sleep(0.2)
    assert len(box.signals) == 2 and len(notes) == 2, notes
    await guard.close()


async def test_past_the_hard_point_the_victim_gets_sigkill_at_once(tmp_path: Path) -> None:
    box, notes = Sandbox(tmp_path / "cg"), list[str]()
    guard = guard_of(box, notes)
    guard.on_state("ws1", State.RUNNING)
    await until(lambda: guard.watched() == {"ws1"})
    box.set_usage(400 * MiB)
    box.on_signal = lambda sig, pid: box.set_usage(10 * MiB)
    box.alarms[0].cross()
    await until(lambda: box.signals)
    assert box.signals == [("KILL", 41)]
    await guard.close()


async def test_page_cache_is_not_the_workspaces_memory(tmp_path: Path) -> None:
    """A big file written (its page cache charged to the sandbox's cgroup, the kernel's to
    take back) is no reason to end a process: the engine test saw a 1.3 GB ``dd`` into
    /workspace killed when the raw usage counted. The cache gone, the same usage is."""
    box, notes = Sandbox(tmp_path / "cg"), list[str]()
    guard = guard_of(box, notes)
    guard.on_state("ws1", State.RUNNING)
    await until(lambda: guard.watched() == {"ws1"})
    box.set_usage(450 * MiB)
    (box.dir / "memory.stat").write_text(
        f"cache {440 * MiB}\nrss {10 * MiB}\ntotal_active_file {100 * MiB}\n"
        f"total_inactive_file {340 * MiB}\n")
    assert working_set(box.dir) == 10 * MiB
    box.alarms[0].cross()
    await asyncio.sleep(0.1)
    assert box.signals == [] and notes == []
    (box.dir / "memory.stat").write_text("total_active_file 0\ntotal_inactive_file 0\n")
    box.on_signal = lambda sig, pid: box.set_usage(10 * MiB)
    box.alarms[0].cross()  # the cgroup reclaims (or crosses): now it is the workspace's
    await until(lambda: box.signals)
    assert box.signals == [("KILL", 41)]
    await guard.close()


async def test_a_workspace_that_lies_only_hurts_itself(tmp_path: Path) -> None:
    """Garbage and only spared names: nothing is signalled (the host's limit is left),
    the event says so, and the guard keeps working for the next crossing."""
    box, notes = Sandbox(tmp_path / "cg", listing=b"\x00" * 300_000 + b"\n1 9 x\n"), list[str]()
    guard = guard_of(box, notes, grace_s=0.05)
    guard.on_state("ws1", State.RUNNING)
    await until(lambda: guard.watched() == {"ws1"})
    box.set_usage(300 * MiB)
    box.alarms[0].cross()
    await until(lambda: notes)
    assert box.signals == []
    assert notes == ["ws1 memory memory guard: the workspace uses 300 MiB, past its limit of "
                     "256 MiB, and has no process to end"]
    box.listing = b"66 99999 den-agent\n67 5 make\n"  # a hog named like the agent is spared
    box.alarms[0].cross()
    await until(lambda: box.signals)
    assert box.signals == [("TERM", 67)]  # after the grace: memory stayed past the limit
    await guard.close()


async def test_memory_still_being_freed_is_not_blamed_on_a_small_process(
        tmp_path: Path) -> None:
    """Usage still past the limit just after the hog ended (the sandbox frees its memory
    within a second): the biggest process left explains none of the excess, so the guard
    looks again at the next crossing or after the grace instead of ending it (seen on the
    real engine: a 4 MiB bash got SIGTERM while a killed hog's memory was being freed)."""
    box, notes = Sandbox(tmp_path / "cg", listing=b"1 900 den-agent\n19 1000 bash\n"), list[str]()
    guard = guard_of(box, notes, grace_s=5.0)
    guard.on_state("ws1", State.RUNNING)
    await until(lambda: guard.watched() == {"ws1"})
    box.set_usage(300 * MiB)
    box.alarms[0].cross()
    await asyncio.sleep(0.1)
    assert box.signals == [] and notes == []
    box.set_usage(20 * MiB)  # freed: the kernel signals the crossing back under the limit
    box.alarms[0].cross()
    await asyncio.sleep(0.1)
    assert box.signals == [] and notes == []
    assert guard.watched() == {"ws1"}
    # Past the hard point there is no waiting: the sandbox is about to be killed whole.
    box.set_usage(400 * MiB)
    box.on_signal = lambda sig, pid: box.set_usage(10 * MiB)
    box.alarms[0].cross()
    await until(lambda: box.signals)
    assert box.signals == [("KILL", 19)]
    await guard.close()


async def test_leaving_running_disarms_and_a_gone_cgroup_disarms(tmp_path: Path) -> None:
    box, notes = Sandbox(tmp_path / "cg"), list[str]()
    guard = guard_of(box, notes)
    guard.on_state("ws1", State.RUNNING)
    await until(lambda: guard.watched() == {"ws1"})
    for state in (State.PAUSED, State.STOPPED, State.DELETING):
        guard.on_state("ws1", state)
        assert guard.watched() == set() and box.alarms[-1].closed
        guard.on_state("ws1", State.RUNNING)
        await until(lambda: guard.watched() == {"ws1"})
    (box.dir / "memory.usage_in_bytes").unlink()  # the sandbox stopped: the kernel signals
    box.alarms[-1].cross()
    await until(lambda: guard.watched() == set())
    assert box.signals == [] and notes == []
    # A state change that arrives while arming wins: stopped before the cgroup was found.
    guard.on_state("ws1", State.RUNNING)
    guard.on_state("ws1", State.STOPPED)
    await asyncio.sleep(0.05)
    assert guard.watched() == set()
    await guard.close()


async def test_registering_with_the_kernel_does_not_hold_up_the_loop(tmp_path: Path) -> None:
    """Each threshold the kernel registers waits for an RCU grace period (8-40 ms measured):
    the registration runs in a thread; a stop that comes meanwhile leaves nothing watched."""
    box, notes = Sandbox(tmp_path / "cg"), list[str]()
    loop_thread = threading.get_ident()
    opened_on: list[int] = []
    release = threading.Event()
    made = box.alarm

    def slow_alarm(directory: Path, thresholds: Sequence[int]) -> FakeAlarm:
        opened_on.append(threading.get_ident())
        release.wait(5)
        return made(directory, thresholds)

    box.alarm = slow_alarm  # type: ignore[method-assign]
    guard = guard_of(box, notes)
    guard.on_state("ws1", State.RUNNING)
    await until(lambda: opened_on)  # the loop runs this while the registration waits
    assert opened_on == [opened_on[0]] and opened_on[0] != loop_thread
    guard.on_state("ws1", State.STOPPED)
    release.set()
    await until(lambda: box.alarms and box.alarms[-1].closed)
    assert guard.watched() == set()
    await guard.close()


# --- wired into the service: the ledger arms it, reconcile re-arms it -----------------------


class CgroupFake(FakeRuntime):
    """The fake runtime with a memory cgroup (plain files) for each running sandbox."""

    def __init__(self, root: Path) -> None:
        super().__init__()
        self.root = root

    async def memory_cgroup(self, spec: WorkspaceSpec) -> Path | None:
        if not self._get(spec).running:
            return None
        found = self.root / spec.workspace_id
        found.mkdir(parents=True, exist_ok=True)
        for name in ("memory.usage_in_bytes", "memory.pressure_level", "cgroup.event_control"):
            (found / name).touch()
        (found / "memory.limit_in_bytes").write_text(str(768 * MiB))
        return found


async def test_the_service_watches_exactly_its_running_workspaces(
        make_service: Callable[..., WorkspaceService], make_repo: Callable[..., Path],
        tmp_path: Path) -> None:
    runtime = CgroupFake(tmp_path / "cgroups")
    svc = make_service(service_kw={"runtime": runtime})
    guard = svc.memory_guard
    assert guard is not None
    ws = await create(svc, user(svc), make_repo())
    await until(lambda: guard.watched() == {ws.id})
    # The real alarm registered memory_mb and the hard point with the cgroup (a plain file).
    control = (tmp_path / "cgroups" / ws.id / "cgroup.event_control").read_text()
    assert f" {512 * MiB}" in control and f" {640 * MiB}" in control, control
    await svc.stop(ws.id, actor="alice")
    assert guard.watched() == set()
    await svc.start(ws.id, actor="alice")
    await until(lambda: guard.watched() == {ws.id})
    await svc.shutdown()
    assert guard.watched() == set()
    # Den restarts: its reconcile re-arms the running workspace.
    again = make_service(service_kw={"runtime": runtime})
    assert again.memory_guard is not None and again.memory_guard.watched() == set()
    await again.reconcile()
    await until(lambda: again.memory_guard.watched() == {ws.id})  # type: ignore[union-attr]
    await again.shutdown()


async def test_a_backend_without_memory_cgroups_has_no_guard(
        make_service: Callable[..., WorkspaceService]) -> None:
    assert make_service().memory_guard is None
