"""The microVM backend's optional protocols (server/runtime/base.py): Checkpoints (pause and
resume with memory, memory snapshots) over :mod:`.checkpoint`, and DiskSnapshots (snapshots,
forks, restores) over :mod:`.snapshots`. Mixed into :class:`~.backend.MicroVmRuntime`; they
use only the few helpers :class:`_Vm` names.

A fork made from a memory snapshot wakes with the memory of another VM: its host name is set
to its own, and its kernel's random pool is stirred with fresh bytes from the host, before
anything else runs in it. The agent's session is a new one (a fresh hello nonce; the secret
of direct connections is sent fresh per session, docs/agent.md).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

from server import faults
from server.agent import ops as agent_ops
from server.agent.session import AgentSession
from server.runtime.base import (
    LABEL_SNAPSHOT,
    ExecRequest,
    ExecResult,
    Handle,
    SnapshotSpec,
    WorkspaceSpec,
)
from server.runtime.errors import EngineConflict, EngineError
from server.runtime.microvm import checkpoint as ckpt
from server.runtime.microvm import disks, net, process, recover, snapshots
from server.runtime.microvm import images as vm_images
from server.runtime.microvm.argv import VmFiles
from server.runtime.microvm.qmp import Qmp, QmpError

log = logging.getLogger(__name__)
T = TypeVar("T")

SNAPSHOT_KIND = "vm-snapshot"  # EngineObject.kind of a snapshot's directory
IDENTITY_TIMEOUT_S = 30.0
SYNC_TIMEOUT_S = 10.0


class _Vm(Protocol):
    """What the mixins use of the backend."""

    vms_dir: Path
    prefix: str
    images: vm_images.RootImages
    image: str
    boot_timeout_s: float

    def files(self, spec_or_handle: WorkspaceSpec | Handle) -> VmFiles: ...

    async def _io(self, fn: Callable[..., T], *args: Any) -> T: ...

    def _argv(self, spec: WorkspaceSpec, files: VmFiles, *, cpus: float, memory_mb: int,
              nic: bool) -> list[str]: ...

    async def _guest_network(self, spec: WorkspaceSpec, session: AgentSession) -> None: ...

    async def _guest_network_argv(self, spec: WorkspaceSpec) -> list[str]: ...

    async def _launch(self, spec: WorkspaceSpec, files: VmFiles, argv: list[str], *,
                      cpus: float, memory_mb: int, boot: bool = False) -> None: ...

    async def _session(self, spec: WorkspaceSpec, *, boot: bool = False) -> AgentSession: ...

    async def _drop_agent(self, files: VmFiles, reason: str) -> None: ...


def launched_with(cmdline: list[str]) -> tuple[float, int]:
    """(vCPUs, memory in MiB) of a QEMU command line (``-smp N``, ``-m NM``): what its
    migration stream holds, and so what a QEMU loading it must be started with."""
    cpus = float(cmdline[cmdline.index("-smp") + 1])
    memory = cmdline[cmdline.index("-m") + 1]
    return cpus, int(memory.removesuffix("M"))


def fork_identity_argv(hostname: str, then: Sequence[str] = ()) -> list[str]:
    """What a VM woken from another's memory runs first (as root, stdin: 64 random bytes):
    its own host name, the random bytes mixed into its kernel's pool, then ``then`` (its
    own network address: one round trip through the agent for all of it)."""
    if not then:
        return ["sh", "-c", 'hostname "$1" && cat > /dev/urandom', "den-fork", hostname]
    return ["sh", "-c", 'hostname "$1" && cat > /dev/urandom && shift && exec "$@"',
            "den-fork", hostname, *then]


class VmCheckpoints:
    """:class:`~server.runtime.base.Checkpoints` for microVMs: QEMU's memory saved to a file
    in the VM's directory; no QEMU (no CPU, no RAM) while paused."""

    async def pause(self: _Vm, spec: WorkspaceSpec, *, checkpoint: str) -> None:
        """The agent's session is closed first (its open streams end with "paused"); the
        agent and everything it started are in the guest's memory and saved with it."""
        files = self.files(spec)
        pid = await self._io(process.running, files)
        if pid is None:
            raise EngineConflict(f"workspace {spec.workspace_id} is not running")
        cmdline = await self._io(process.cmdline, pid)
        cpus, memory_mb = launched_with(cmdline)
        await _sync(self, spec)  # the disks then hold what the memory does (a disk snapshot)
        await self._drop_agent(files, "paused")
        record = await self._io(disks.read_record, files) or {}
        meta = {"vm": files.dir.name, "hostname": spec.hostname, "cpus": cpus,
                "memory_mb": memory_mb, "nic": net.has_nic(cmdline),
                "address": record.get("address"), "saved_at": time.time()}
        size = await self._io(functools.partial(ckpt.save, files, checkpoint, meta=meta))
        log.info("workspace %s: microVM memory saved (%d MiB)", spec.workspace_id, size >> 20)

    async def resume(self: _Vm, spec: WorkspaceSpec, *, checkpoint: str) -> None:
        """QEMU is started from the checkpoint with the memory and vCPUs it was saved with
        (a fork's spec may ask for others: they apply at its next cold start). The
        checkpoint is removed once the guest runs and its agent answers: QEMU has read all
        of it."""
        files = self.files(spec)
        if await self._io(process.running, files) is not None:
            return
        meta = await self._io(ckpt.read_meta, ckpt.directory(files, checkpoint))
        cpus, memory_mb = float(meta["cpus"]), int(meta["memory_mb"])
        # The devices are the saved ones: a NIC only where the saved VM had one.
        argv = await self._io(functools.partial(self._argv, spec, files, cpus=cpus,
                                                memory_mb=memory_mb,
                                                nic=bool(meta.get("nic"))))
        await self._launch(spec, files, ckpt.incoming_argv(argv), cpus=cpus, memory_mb=memory_mb)
        await self._io(ckpt.feed, files, checkpoint)
        faults.point("resume.session")  # the guest runs; reconcile finds it running
        try:
            session = await self._session(spec, boot=True)
            nic = net.has_nic(argv)
            if meta.get("vm") != files.dir.name:  # another VM's memory, and its address
                await _take_identity(session, spec, then=await self._guest_network_argv(
                    spec) if nic else [])
            elif nic and meta.get("address") != await self._io(net.recorded_address, files):
                await self._guest_network(spec, session)
        except BaseException:
            await self._drop_agent(files, "the restore failed")
            await self._io(functools.partial(process.end, files, timeout_s=0.0))
            raise
        await self._io(ckpt.delete, files, checkpoint)

    async def recover_running(self: _Vm, spec: WorkspaceSpec) -> str | None:
        """A VM whose CPUs a dead Den stopped (a snapshot's copy) runs again (recover.py)."""
        files = self.files(spec)
        try:
            halted = await self._io(recover.cont_if_halted, files)
        except QmpError as exc:
            raise EngineError(f"QEMU's monitor did not answer: {exc.message}") from exc
        return ("its microVM's CPUs were left stopped by a restart of Den mid-operation; "
                "it runs again") if halted else None

    async def delete_checkpoint(self: _Vm, spec: WorkspaceSpec, *, checkpoint: str) -> None:
        await self._io(ckpt.delete, self.files(spec), checkpoint)

    async def settle_checkpoint(self: _Vm, spec: WorkspaceSpec, *, checkpoint: str,
                                wait_s: float) -> bool:
        return await self._io(functools.partial(ckpt.settle, self.files(spec),
                                                checkpoint, wait_s=wait_s))

    async def export_checkpoint(self: _Vm, spec: WorkspaceSpec, *, checkpoint: str,
                                dest: Path) -> int:
        return await self._io(_files_op, "copying the saved memory",
                              functools.partial(ckpt.export, self.files(spec), checkpoint, dest))

    async def import_checkpoint(self: _Vm, spec: WorkspaceSpec, *, checkpoint: str,
                                src: Path) -> None:
        await self._io(_files_op, "installing the saved memory",
                       functools.partial(ckpt.install, self.files(spec), checkpoint, src))

    def checkpoint_dirs(self: _Vm) -> list[Path]:
        return sorted(self.vms_dir.glob("*/checkpoints"))


async def _sync(vm: _Vm, spec: WorkspaceSpec) -> None:
    """Write the guest's page cache to its disks (best effort: a guest whose agent does not
    answer is copied as a power cut would leave it)."""
    with contextlib.suppress(Exception):
        await agent_ops.run(await vm._session(spec), ExecRequest(
            argv=["sync"], user="root", cwd="/", timeout_s=SYNC_TIMEOUT_S), {})


async def _take_identity(session: AgentSession, spec: WorkspaceSpec, *,
                         then: Sequence[str] = ()) -> None:
    req = ExecRequest(argv=fork_identity_argv(spec.hostname, then), user="root", cwd="/",
                      stdin=secrets.token_bytes(64), timeout_s=IDENTITY_TIMEOUT_S)
    out: ExecResult = await agent_ops.run(session, req, {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
    if out.exit_code != 0:
        raise EngineError(f"the fork could not take its own host name or address: "
                          f"{out.stderr.decode(errors='replace')[:300]}")


class VmDiskSnapshots:
    """:class:`~server.runtime.base.DiskSnapshots` for microVMs: copies of a VM's disks in a
    directory of their own (:mod:`.snapshots`)."""

    def new_snapshot(self: _Vm, snapshot_id: str, labels: Mapping[str, str]) -> SnapshotSpec:
        return SnapshotSpec(snapshot_id=snapshot_id, image=self.image,
                            handle={"snapshot": f"{self.prefix}-snap-{snapshot_id}"},
                            labels={**labels, LABEL_SNAPSHOT: snapshot_id})

    async def snapshot(self: _Vm, spec: WorkspaceSpec, snap: SnapshotSpec) -> int:
        """A running VM's CPUs are stopped for the copy (QMP ``stop`` drains and flushes its
        disks: the copy is what a power cut would leave), then run on."""
        files = self.files(spec)
        if await self._io(process.running, files) is not None:
            await _sync(self, spec)
        dst = VmFiles(self.vms_dir / str(snap.handle["snapshot"]))
        record = {"labels": dict(snap.labels), "snapshot_id": snap.snapshot_id,
                  "created": time.time()}
        return await self._io(_files_op, "copying the disks",
                              functools.partial(_copy_live, files, dst, record=record))

    async def load_snapshot(self: _Vm, spec: WorkspaceSpec, snap: SnapshotSpec) -> None:
        files = self.files(spec)
        await self._drop_agent(files, "stopped")
        await self._io(functools.partial(process.end, files, timeout_s=0.0))
        src = VmFiles(self.vms_dir / str(snap.handle["snapshot"]))
        await self._io(_files_op, "copying the snapshot's disks", functools.partial(
            snapshots.copy_disks, src, files, record=_vm_record(spec), fault="fork.copy"))

    def restore_handle(self: _Vm, spec: WorkspaceSpec) -> dict[str, Any]:
        return {**spec.handle,
                "vm": f"{self.prefix}-vm-{spec.workspace_id}-{secrets.token_hex(3)}"}

    async def copy_snapshot(self: _Vm, spec: WorkspaceSpec, snap: SnapshotSpec, *,
                            into: Handle) -> None:
        src = VmFiles(self.vms_dir / str(snap.handle["snapshot"]))
        await self._io(_files_op, "copying the snapshot's disks", functools.partial(
            snapshots.copy_disks, src, self.files(into), record=_vm_record(spec),
            fault="restore.copy"))

    async def replace_container(self: _Vm, spec: WorkspaceSpec, *, old: Handle) -> None:
        """The VM is its directory: the new one holds the copy, the old one goes."""
        old_files = self.files(old)
        await self._drop_agent(old_files, "stopped")
        await self._io(functools.partial(process.end, old_files, timeout_s=0.0))
        if old_files.dir != self.files(spec).dir:
            await self._io(snapshots.remove, old_files)

    async def delete_snapshot(self: _Vm, snap: SnapshotSpec) -> None:
        files = VmFiles(self.vms_dir / str(snap.handle["snapshot"]))
        backing = await self._io(vm_images.backing_file, files.root)
        await self._io(snapshots.remove, files)
        await self._io(self.images.collect, backing)  # a converted base this was the last of


def _files_op(what: str, fn: Callable[[], T]) -> T:
    """``fn`` with the host's file errors (a full disk) as EngineError."""
    try:
        return fn()
    except OSError as exc:
        raise EngineError(f"{what} failed: {exc}") from exc


def _vm_record(spec: WorkspaceSpec) -> dict[str, Any]:
    return {"labels": dict(spec.labels), "workspace_id": spec.workspace_id,
            "created": time.time()}


def _copy_live(files: VmFiles, dst: VmFiles, *, record: Mapping[str, Any]) -> int:
    if process.running(files) is None:
        return snapshots.copy_disks(files, dst, record=record, fault="snapshot.copy")
    with Qmp(files.qmp) as qmp:
        was = qmp.execute("query-status").get("status")
        qmp.execute("stop")
        try:
            return snapshots.copy_disks(files, dst, record=record, fault="snapshot.copy")
        finally:
            if was == "running":
                with contextlib.suppress(QmpError):
                    qmp.execute("cont")
