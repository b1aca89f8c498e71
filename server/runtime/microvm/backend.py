"""The microVM runtime: a workspace is a QEMU ``microvm`` guest (server/runtime/base.py's
Lifecycle, Execs, Inventory, AgentChannel and ProcessControl). Every command runs through
Den's agent in the guest; there is no engine exec to fall back on, so an agent that does not
answer is an error.

Every VM gets a NIC on Den's bridge for microVMs (net.py), and the backend is then a
:class:`~server.runtime.base.ManagedNetwork`: the host's firewall judges its packets with the
same rules as gVisor workspaces', ``none`` included (nothing passes), so a policy changed on
a running VM applies at once, as it does for a gVisor workspace (the ``microvm`` machine has
no hotplug: a NIC cannot be added to a running VM).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import pwd
import shutil
import subprocess
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar

from server import faults
from server.agent import ops as agent_ops
from server.agent.session import AgentSession
from server.runtime import docker_specs, inflight
from server.runtime.base import (
    LABEL_INSTANCE,
    LABEL_SNAPSHOT,
    LABEL_WORKSPACE,
    ContainerStatus,
    EngineEvent,
    EngineEventKind,
    EngineObject,
    ExecRequest,
    ExecResult,
    ExecStream,
    Handle,
    NetworkInfo,
    ResourceUsage,
    WorkspaceSpec,
    names,
)
from server.runtime.errors import (
    AgentTimeout,
    AgentUnavailable,
    EngineConflict,
    EngineError,
    EngineUnavailable,
    ObjectMissing,
)
from server.runtime.microvm import cgroup, disks, guest, jail, net, process, snapshots, vmusers
from server.runtime.microvm import images as vm_images
from server.runtime.microvm.argv import (
    BootFiles,
    VmFiles,
    host_tsc_khz,
    probe_argv,
    qemu_argv,
    vcpus,
)
from server.runtime.microvm.cgroup import Cgroups
from server.runtime.microvm.events import QemuExits
from server.runtime.microvm.features import SNAPSHOT_KIND, VmCheckpoints, VmDiskSnapshots
from server.runtime.microvm.processes import VmProcesses
from server.runtime.microvm.transport import PortTransport

log = logging.getLogger(__name__)
T = TypeVar("T")

KIND = "vm"  # EngineObject.kind of a VM directory
SYNC_TIMEOUT_S = 10.0  # QEMU's own exit (its disks flushed) after the guest's stop
PROBE_TIMEOUT_S = 15.0
AGENT_ATTEMPT_S = 1.0  # one hello's wait while the guest boots
GUEST_NET_TIMEOUT_S = 30  # the guest's `ip` commands (under TCG, on a loaded host)
DEFAULT_WORKSPACE_GB = 10  # /workspace of a spec without disk_gb (0: a row made before it)


def host_cores() -> int:
    return len(os.sched_getaffinity(0))


def accel_note(accel: str) -> str:
    """The workspace's event saying how its VM runs."""
    if accel == "kvm":
        return "the microVM booted with KVM (hardware virtualization)"
    return ("the microVM booted with TCG (QEMU's software emulation: this host has no usable "
            "KVM): the guest's CPU is several times slower than the host's")


class MicroVmRuntime(VmCheckpoints, VmDiskSnapshots, VmProcesses):
    """Workspaces as QEMU microVMs, each in a directory of ``vms_dir`` (its handle: ``vm``)."""

    name = "microvm"

    def __init__(self, *, boot_dir: Path, vms_dir: Path, image: str, prefix: str = "den",
                 qemu: str = "qemu-system-x86_64", accel: str = "auto",
                 boot_timeout_s: float = 120.0, console_log: bool = False,
                 user: str = "", uids: vmusers.UidRange | None = None,
                 cgroups: Cgroups | None = None,
                 network: net.VmNetwork | None = None,
                 engine_url: str = "", image_max_mb: int = 4096) -> None:
        """``network``: Den's bridge for the VMs' NICs (None: no VM gets one)."""
        self.boot = BootFiles.under(boot_dir)
        self.images = vm_images.RootImages(  # the root filesystems of other images
            default_rootfs=self.boot.rootfs, default_image=image, vms_dir=vms_dir,
            images_dir=vms_dir.parent / "images", prefix=prefix, engine_url=engine_url,
            max_mb=image_max_mb)
        self.vms_dir = vms_dir
        self.jail = vms_dir.parent / "jail"  # QEMU's empty root (jail.py)
        self.image = image
        self.prefix = prefix
        self.qemu = qemu
        self._accel_setting = accel
        self.accelerator = "" if accel == "auto" else accel  # decided by check()
        self.boot_timeout_s = boot_timeout_s
        self.console_log = console_log
        self.user = user  # QEMU's -runas when VMs have no uids of their own; "" stays root
        self.uids = uids  # a uid of its own per VM (vmusers.py)
        self.cgroups = cgroups or Cgroups()
        self.vm_network = network
        self.tsc_khz = 0
        self._agents: dict[str, AgentSession] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._listeners: list[Callable[[str, str], None]] = []
        self._exits = QemuExits(self._running, self._serves)

    # --- helpers ------------------------------------------------------------------------

    def files(self, spec_or_handle: WorkspaceSpec | Handle) -> VmFiles:
        handle = spec_or_handle.handle if isinstance(spec_or_handle, WorkspaceSpec) \
            else spec_or_handle
        return VmFiles(self.vms_dir / str(handle["vm"]))

    async def _io(self, fn: Callable[..., T], *args: Any) -> T:
        # Through inflight: a delete waits for a call (a fork's disk copy) that its cancelled
        # caller left running.
        return await inflight.to_thread(fn, *args)

    # --- Lifecycle ----------------------------------------------------------------------

    def new_handle(self, workspace_id: str) -> dict[str, Any]:
        return {"vm": f"{self.prefix}-vm-{workspace_id}"}

    async def check(self) -> None:
        if shutil.which(self.qemu) is None:
            raise EngineUnavailable(f"{self.qemu} is not installed: run scripts/setup-microvm.sh")
        missing = [p.name for p in (self.boot.kernel, self.boot.initramfs, self.boot.rootfs)
                   if not p.is_file()]
        if missing:
            raise EngineUnavailable(f"the microVM boot files are not built ({', '.join(missing)} "
                                    f"missing in {self.boot.kernel.parent}): run "
                                    "scripts/setup-microvm.sh")
        if not self.accelerator:
            self.accelerator = await self._io(self._detect_accel)
            log.warning("microVMs run with %s", "KVM" if self.accelerator == "kvm" else
                        "TCG (software emulation, no usable KVM here): guest CPU is several "
                        "times slower")
        if self.accelerator == "tcg" and not self.tsc_khz:
            with contextlib.suppress(OSError):
                self.tsc_khz = host_tsc_khz(Path("/proc/cpuinfo").read_text())
            if not self.tsc_khz:
                raise EngineUnavailable("cannot read the host's TSC frequency (/proc/cpuinfo "
                                        "has no `cpu MHz`): TCG guests cannot keep time")
        if self.user and self.uids is None:
            try:
                pwd.getpwnam(self.user)
            except KeyError:
                raise EngineUnavailable(f"the user microVMs run as ({self.user}, "
                                        "DEN_MICROVM_USER) does not exist: run "
                                        "scripts/setup-microvm.sh") from None
        await self._io(self.cgroups.version)  # a hierarchy with cpu, memory and pids
        self.vms_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.vms_dir.chmod(0o700)  # Den's alone: QEMU reaches nothing in it by path (jail.py)
        await self._io(jail.root, self.jail)

    def _detect_accel(self) -> str:
        """KVM when /dev/kvm boots a guest (a paravirtual /dev/kvm may exist and fail),
        else TCG."""
        if not os.access("/dev/kvm", os.R_OK | os.W_OK):
            return "tcg"
        try:
            out = subprocess.run(probe_argv(self.qemu, self.boot), capture_output=True,
                                 timeout=PROBE_TIMEOUT_S, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return "tcg"
        return "kvm" if b"den-probe-ok" in out.stdout else "tcg"

    def unfit(self, *, cpus: float, memory_mb: int) -> str | None:
        """:class:`~server.runtime.base.ResourceFit`: under TCG each vCPU is a host thread
        emulating a CPU; more vCPUs than the host has cores never run at once, and the
        guest's kernel stalls waiting for the ones descheduled (its RCU and IPIs assume
        CPUs that run). KVM: any size the operator allows."""
        if self.accelerator != "tcg":
            return None
        cores = host_cores()
        if vcpus(cpus) > cores:
            return (f"resources.cpus {cpus:g} is more than this host can emulate: microVMs "
                    f"here run under TCG (software emulation, no usable KVM), at most {cores} "
                    f"vCPUs (the host's cores); ask for {cores} or fewer")
        return None

    async def image_exists(self, image: str) -> bool:
        """The setup's image, or a local engine image within the size limit (converted into
        a root filesystem at create: images.py)."""
        return await self._io(self.images.exists, image)

    async def create(self, spec: WorkspaceSpec) -> None:
        record = {"labels": dict(spec.labels), "workspace_id": spec.workspace_id,
                  "created": time.time()}
        await self._io(self._make, spec, record)

    def _make(self, spec: WorkspaceSpec, record: dict[str, Any]) -> None:
        with self.images.base(spec.image) as rootfs:  # converted on first use
            disks.make(self.files(spec), rootfs=rootfs,
                       workspace_gb=spec.disk_gb or DEFAULT_WORKSPACE_GB, record=record)

    async def seed(self, spec: WorkspaceSpec, tar: Path) -> None:
        """Unpack ``tar`` into /workspace through the agent (``tar -x`` as root, owners kept)."""
        req = ExecRequest(argv=["tar", "-x", "--same-owner", "-C", "/workspace", "-f", "-"],
                          user="root", cwd="/")
        stream = await self.exec_stream(spec, req)
        err = bytearray()

        async def drain() -> None:
            async for chunk in stream.output():
                if len(err) < 4096:
                    err.extend(chunk.data[:4096])

        reader = asyncio.create_task(drain())
        try:
            with tar.open("rb") as f:
                while block := await self._io(f.read, 1 << 20):
                    await stream.write(block)
            await stream.close_stdin()
            await reader
            code = await stream.wait()
        finally:
            reader.cancel()
            await stream.kill()
        if code != 0:
            raise EngineError(f"unpacking into /workspace failed ({code}): "
                              f"{err.decode(errors='replace')[:1000]}")

    async def start(self, spec: WorkspaceSpec) -> None:
        files = self.files(spec)
        if await self._io(process.running, files) is not None:
            return
        if not files.root.exists() or not files.workspace.exists():
            raise ObjectMissing(f"the VM of workspace {spec.workspace_id} is missing")
        await self.check()
        argv = await self._io(functools.partial(
            self._argv, spec, files, cpus=spec.cpus, memory_mb=spec.memory_mb, nic=True))
        started = time.monotonic()
        await self._launch(spec, files, argv, cpus=spec.cpus, memory_mb=spec.memory_mb,
                           boot=True)
        try:
            session = await self._session(spec, boot=True)
            if net.has_nic(argv):
                await self._guest_network(spec, session)
        except BaseException:
            await self._io(functools.partial(process.end, files, timeout_s=0.0))
            raise
        log.info("workspace %s: microVM booted (%s) in %.1f s", spec.workspace_id,
                 self.accelerator, time.monotonic() - started)

    async def _launch(self, spec: WorkspaceSpec, files: VmFiles, argv: list[str], *,
                      cpus: float, memory_mb: int, boot: bool = False) -> None:
        """Start the VM's QEMU (daemonized): a cold start (``boot``: its event says which
        accelerator it runs with), or a resume's QEMU waiting for its memory (features.py);
        as the unprivileged user, in the VM's cgroup sized for the ``cpus`` and ``memory_mb``
        it runs with, watched for its exit; with ``uids``, as the VM's own uid; in its jail
        (jail.py: namespaces of its own, an empty root), its TAP handed over as a descriptor.
        What every QEMU of a workspace needs around it goes here."""
        for sock in (files.agent, files.qmp):
            sock.unlink(missing_ok=True)
        await self._io(disks.own, files)
        if self.uids is not None:
            argv = [*argv, *vmusers.runas(await self._io(vmusers.uid_of, files, self.uids))]
        procs = await self._io(self.cgroups.make, files.dir.name,
                               cgroup.limits(cpus=cpus, memory_mb=memory_mb))
        nic = self.vm_network if net.has_nic(argv) else None
        await self._io(vm_images.check_overlay, files.root,
                       (self.boot.rootfs.resolve().parent, self.images.dir.resolve()))
        disk_argv, fds = await self._io(jail.disks, files)
        try:
            if nic is not None:
                await self._io(net.ensure_bridge, nic)
                tap = await self._io(net.open_tap, files.dir.name)
                fds += (tap,)
                argv = net.with_tap(argv, tap)
            await self._io(functools.partial(
                process.launch, cgroup.wrap(jail.confine([*argv, *disk_argv], self.jail),
                                            procs), pass_fds=fds))
        finally:
            for fd in fds:  # QEMU holds them now (or it failed: the TAP goes with this)
                os.close(fd)
        if nic is not None:  # onto the bridge before the guest uses it
            try:
                address = await self._io(net.address_of, files, nic)
                await self._io(net.attach, nic, files.dir.name, address)
            except BaseException:
                await self._io(functools.partial(process.end, files, timeout_s=0.0))
                raise
        self._exits.launched(EngineEvent(EngineEventKind.NOTE, workspace_id=spec.workspace_id,
                                         container=files.dir.name,
                                         detail=accel_note(self.accelerator))
                             if boot else None)

    def _argv(self, spec: WorkspaceSpec, files: VmFiles, *, cpus: float, memory_mb: int,
              nic: bool) -> list[str]:
        """QEMU's command line for the VM (a cold start, or a resume with the memory,
        vCPUs and NIC its checkpoint was saved with: features.py). Blocking: a VM's first
        start with a NIC assigns its address (net.address_of)."""
        argv = qemu_argv(self.qemu, self.boot, files, accel=self.accelerator, cpus=cpus,
                         memory_mb=memory_mb, hostname=spec.hostname, tsc_khz=self.tsc_khz,
                         console_log=self.console_log,
                         runas=self.user if self.uids is None else "",
                         pids_limit=spec.pids_limit)
        if nic and self.vm_network is not None:
            address = net.address_of(files, self.vm_network)
            at = argv.index("-daemonize")
            argv[at:at] = net.netdev_argv(address)
        return argv

    async def _guest_network(self, spec: WorkspaceSpec, session: AgentSession) -> None:
        """The guest takes its address, route and resolver (as root, through the agent):
        after a cold boot, and in a VM woken from another's memory (its origin's)."""
        req = ExecRequest(argv=await self._guest_network_argv(spec), user="root", cwd="/",
                          timeout_s=GUEST_NET_TIMEOUT_S)
        out = await agent_ops.run(session, req, {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
        if out.exit_code != 0:
            raise EngineError(f"the microVM could not configure its network: "
                              f"{out.stderr.decode(errors='replace')[:300]}")

    async def _guest_network_argv(self, spec: WorkspaceSpec) -> list[str]:
        assert self.vm_network is not None
        address = await self._io(net.address_of, self.files(spec), self.vm_network)
        return net.guest_setup_argv(self.vm_network, address)

    # --- ManagedNetwork -----------------------------------------------------------------

    async def network(self) -> NetworkInfo:
        """Den's bridge for the VMs (made when missing) and every running VM of this server
        with a NIC: its address, and its TAP as its port (what the firewall matches it by)."""
        if self.vm_network is None:
            raise EngineUnavailable("this microVM server has no network for its VMs "
                                    "(DEN_NETWORK_ISOLATION is off)")
        return await self._io(self._network_info, self.vm_network)

    def _network_info(self, vm_net: net.VmNetwork) -> NetworkInfo:
        net.ensure_bridge(vm_net)
        addresses, ports = {}, {}
        with contextlib.suppress(FileNotFoundError):
            for d in sorted(self.vms_dir.iterdir()):
                if not net.serves(self.prefix, d.name):
                    continue
                record = disks.read_record(VmFiles(d))
                tap = net.tap_name(d.name)
                if record and isinstance(record.get("address"), str) \
                        and net.link_exists(tap) and process.running(VmFiles(d)) is not None:
                    addresses[d.name] = str(record["address"])
                    ports[d.name] = tap
        return NetworkInfo(interface=vm_net.interface, subnet=str(vm_net.subnet),
                           gateway=vm_net.gateway, addresses=addresses, ports=ports,
                           own_bridge=True)

    def sandbox_name(self, spec: WorkspaceSpec) -> str:
        return self.files(spec).dir.name

    async def stop(self, spec: WorkspaceSpec, *, timeout_s: int) -> None:
        files = self.files(spec)
        if await self._io(process.running, files) is None:
            return
        with contextlib.suppress(Exception):  # SIGTERM to the guest's processes, then sync
            session = await self._session(spec)
            req = guest.stop_request(timeout_s)
            await asyncio.wait_for(agent_ops.run(session, req, {}),
                                   (req.timeout_s or 0) + AGENT_ATTEMPT_S)
        await self._drop_agent(files, "the workspace stopped")
        await self._io(functools.partial(process.end, files, timeout_s=SYNC_TIMEOUT_S))
        await self._io(self.cgroups.remove, files.dir.name)

    async def destroy(self, spec: WorkspaceSpec) -> None:
        await self._remove(self.files(spec))

    async def _remove(self, files: VmFiles) -> None:
        await self._drop_agent(files, "the workspace was deleted")
        await self._io(functools.partial(process.end, files, timeout_s=0.0))
        await self._io(self.cgroups.remove, files.dir.name)
        faults.point("delete.volume")  # QEMU ended, its disks not yet removed
        backing = await self._io(vm_images.backing_file, files.root)
        await self._io(snapshots.remove, files)  # and a copy left half-made
        await self._io(self.images.collect, backing)  # a converted base this was the last of

    async def status(self, spec: WorkspaceSpec) -> ContainerStatus:
        files = self.files(spec)
        if await self._io(process.running, files) is not None:
            return ContainerStatus.RUNNING
        return ContainerStatus.STOPPED if files.record.exists() else ContainerStatus.MISSING

    async def usage(self, spec: WorkspaceSpec) -> ResourceUsage | None:
        pid = await self._io(process.running, self.files(spec))
        if pid is None:
            return None
        cpu = process.cpu_ns(pid)
        return None if cpu is None else ResourceUsage(cpu_ns=cpu,
                                                      memory_bytes=process.rss_bytes(pid))

    # --- Execs (all through the agent) ---------------------------------------------------

    def _env(self, spec: WorkspaceSpec, req: ExecRequest) -> dict[str, str]:
        return docker_specs.exec_env(req.user, spec.env, req.env)

    async def exec(self, spec: WorkspaceSpec, req: ExecRequest) -> ExecResult:
        async with self._answering(spec):
            return await agent_ops.run(await self._session(spec), req, self._env(spec, req))

    async def exec_stream(self, spec: WorkspaceSpec, req: ExecRequest) -> ExecStream:
        async with self._answering(spec):
            return await agent_ops.AgentExecStream.start(await self._session(spec), req,
                                                         self._env(spec, req))

    @contextlib.asynccontextmanager
    async def _answering(self, spec: WorkspaceSpec) -> AsyncIterator[None]:
        """A guest that stopped answering (its agent did not start a command in time while
        QEMU runs: a hung kernel, a stopped agent) is a 504 naming the way back, a restart;
        its session is dropped, so the next call tries a fresh hello rather than waiting."""
        try:
            yield
        except agent_ops.NotStarted as exc:
            files = self.files(spec)
            await self._drop_agent(files, "the guest stopped answering")
            if await self._io(process.running, files) is None:
                raise
            raise AgentTimeout(f"the microVM of workspace {spec.workspace_id} stopped "
                               f"answering ({exc.message}); restart the workspace (stop, then "
                               "start)") from exc

    # --- AgentChannel ---------------------------------------------------------------------

    async def agent(self, spec: WorkspaceSpec) -> AgentSession | None:
        return await self._session(spec)

    async def connect(self, spec: WorkspaceSpec, host: str, port: int) -> ExecStream | None:
        return await agent_ops.AgentExecStream.connect(await self._session(spec), host, port)

    def on_fallback(self, listener: Callable[[str, str], None]) -> None:
        self._listeners.append(listener)  # never called: a VM has no other way in

    async def _session(self, spec: WorkspaceSpec, *, boot: bool = False) -> AgentSession:
        """The live session with the VM's agent. ``boot``: wait for the guest to come up
        (at most the boot timeout) instead of failing at once."""
        files = self.files(spec)
        key = files.dir.name
        session = self._agents.get(key)
        if session is not None and session.alive:
            return session
        async with self._locks.setdefault(key, asyncio.Lock()):
            session = self._agents.get(key)
            if session is not None and session.alive:
                return session
            deadline = time.monotonic() + (self.boot_timeout_s if boot else 2 * AGENT_ATTEMPT_S)
            while True:
                if await self._io(process.running, files) is None:
                    raise EngineConflict(f"workspace {spec.workspace_id} is not running")
                try:
                    transport = await PortTransport.open(files.agent)
                    session = await AgentSession.connect(transport, name=spec.workspace_id,
                                                         timeout_s=AGENT_ATTEMPT_S)
                    break
                except (OSError, AgentUnavailable) as exc:
                    if time.monotonic() >= deadline:
                        # QEMU runs but its guest does not answer (a hung kernel, an agent
                        # that died): a gateway timeout, and the way back is a restart.
                        raise AgentTimeout(
                            f"the microVM of workspace {spec.workspace_id} runs but its agent "
                            f"does not answer ({'boot' if boot else 'call'}: {exc}); restart "
                            "the workspace (stop, then start)") from exc
                    await asyncio.sleep(0.05)  # the guest is booting: its port is not open
            session.on_end = functools.partial(self._forget, key)
            self._agents[key] = session
            return session

    def _forget(self, key: str, session: AgentSession) -> None:
        if self._agents.get(key) is session:
            del self._agents[key]

    async def _drop_agent(self, files: VmFiles, reason: str) -> None:
        session = self._agents.pop(files.dir.name, None)
        if session is not None:
            await session.close(reason)

    # --- Inventory ----------------------------------------------------------------------

    async def list_objects(self, instance: str) -> list[EngineObject]:
        return await self._io(self._list, instance)

    def _list(self, instance: str) -> list[EngineObject]:
        found = []
        with contextlib.suppress(FileNotFoundError):
            for d in sorted(self.vms_dir.iterdir()):
                half = snapshots.unfinished(d.name, self.prefix)
                if half is not None:  # a copy Den died making: no record yet, only our name
                    found.append(EngineObject(
                        kind=SNAPSHOT_KIND if half[0] == "snap" else KIND, name=d.name,
                        workspace_id="" if half[0] == "snap" else half[1],
                        snapshot_id=half[1] if half[0] == "snap" else ""))
                    continue
                files = VmFiles(d)
                record = disks.read_record(files)
                labels = record.get("labels") if record else None
                if not isinstance(labels, dict) or labels.get(LABEL_INSTANCE) != instance:
                    continue
                if labels.get(LABEL_SNAPSHOT):
                    found.append(EngineObject(kind=SNAPSHOT_KIND, name=d.name, workspace_id="",
                                              snapshot_id=str(labels[LABEL_SNAPSHOT])))
                    continue
                found.append(EngineObject(kind=KIND, name=d.name,
                                          workspace_id=str(labels.get(LABEL_WORKSPACE, "")),
                                          running=process.running(files) is not None))
        return found

    def _running(self, instance: str) -> list[tuple[EngineObject, int]]:
        found = []
        for obj in self._list(instance):
            pid = process.running(VmFiles(self.vms_dir / obj.name)) if obj.running else None
            if pid is not None:
                found.append((obj, pid))
        return found

    def _serves(self, obj: EngineObject, pid: int) -> bool:
        return process.running(VmFiles(self.vms_dir / obj.name)) == pid

    # --- EngineEvents -------------------------------------------------------------------

    def watch(self, instance: str) -> AsyncGenerator[EngineEvent, None]:
        """A QEMU process that ends is a ``die`` as it happens (microvm/events.py)."""
        return self._exits.watch(instance)

    def stale(self, obj: EngineObject, handle: Handle) -> bool:
        return obj.name not in names(handle)

    async def remove_object(self, obj: EngineObject) -> None:
        if obj.kind in (KIND, SNAPSHOT_KIND) and obj.name and "/" not in obj.name \
                and obj.name not in (".", ".."):
            await self._remove(VmFiles(self.vms_dir / obj.name))

