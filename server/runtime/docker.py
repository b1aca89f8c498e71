"""The Docker engine backend, running workspaces under gVisor (``runsc``).

Every blocking Docker SDK call goes through :meth:`DockerRuntime._call`, which runs it on
one of the backend's two bounded executors (long calls, short calls) and translates
``docker.errors`` into Den's errors. The
server never talks to a workspace by its IP: commands, files and processes go through the
workspace's agent (reached by an engine exec of ``den-agent relay``), or through the engine's
exec for a workspace without one.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import docker
import docker.errors
import docker.types
import requests.exceptions

from server import faults
from server.agent import ops as agent_ops
from server.agent.direct import DirectPaths
from server.agent.protocol import DockerDemux
from server.agent.session import AgentOpError, AgentSession
from server.errors import DenError
from server.gpus.container import GpuSandbox
from server.runtime import (
    cgroup_cpu,
    cgroup_freezer,
    cgroup_memory,
    containerd_tmp,
    disk_quota,
    docker_engine,
    docker_specs,
    host_seed,
    inflight,
)
from server.runtime.base import (
    LABEL_INSTANCE,
    LABEL_MANAGED,
    LABEL_ROLE,
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
    ProcessInfo,
    ResourceUsage,
    SnapshotSpec,
    StreamChunk,
    WorkspaceSpec,
)
from server.runtime.disk_quota import Disks
from server.runtime.docker_rename import ArmedRename
from server.runtime.docker_specs import container_of, snapshot_volume, volume_of
from server.runtime.errors import (
    AgentTimeout,
    AgentUnavailable,
    EngineConflict,
    EngineError,
    EngineUnavailable,
    ObjectMissing,
)
from server.runtime.output import Captured

log = logging.getLogger(__name__)
T = TypeVar("T")

_STDOUT, _STDERR = 1, 2
EXEC_GRACE_S = 30
OCI_FAILED = b"OCI runtime exec failed"  # the engine could not start an exec's process
QUIESCE_WAIT_S = 5.0
SETTLE_AFTER_EXEC_S = 2.0  # a pause this soon after an exec waits for descriptors to drop
CHECKPOINT_TIMEOUT_S = 600
SHORT_THREADS = 16  # the pool of short engine calls (state reads, inspects, start, stop)
AGENT_ATTEMPTS = 4  # to reach an agent before the engine's exec serves a call instead
AGENT_RETRY_S = 30  # how long the engine's exec then serves the workspace
# Checkpoint images, beside the engine's checkpoints/ in each container's directory.
IMAGES_DIR = "den-checkpoints"
WATCH_QUEUE = 1024  # engine events waiting for the service; more are dropped (then RESYNC)
WATCH_RETRY_MAX_S = 30.0
# A container's State in the engine's list, as reconcile needs it (others: ask ``status``).
LISTED_STATUS = {"running": ContainerStatus.RUNNING, "paused": ContainerStatus.FROZEN,
                 "exited": ContainerStatus.STOPPED, "created": ContainerStatus.STOPPED}
EXIT_WAIT_S = 10.0  # the engine sees a checkpointed sandbox exit a moment after runsc ends


def _translate(exc: Exception, what: str) -> Exception:
    """Map a docker/requests exception onto Den's runtime errors (the one seam)."""
    if isinstance(exc, docker.errors.NotFound):
        return ObjectMissing(f"{what}: not found in the engine", detail=str(exc))
    if isinstance(exc, docker.errors.APIError):
        if exc.status_code == 409:
            return EngineConflict(f"{what}: {exc.explanation or exc}", detail=str(exc))
        return EngineError(f"{what}: {exc.explanation or exc}", detail=str(exc))
    if isinstance(exc, requests.exceptions.ConnectionError | docker.errors.DockerException):
        return EngineUnavailable("the Docker engine is not reachable", detail=str(exc))
    if isinstance(exc, requests.exceptions.RequestException):
        # An answer that is cut short or not JSON (the object went away while the engine
        # answered), a timeout: the engine failed this call.
        return EngineError(f"{what}: the engine's answer was unusable ({type(exc).__name__})",
                           detail=str(exc))
    return exc


# What scripts/setup-host.sh registers runsc with, and what goes wrong without each.
REQUIRED_RUNSC_FLAGS = {
    "--overlay2=none": "changes outside /workspace are lost at every stop",
    "--net-disconnect-ok": "a TCP connection open at a pause makes the checkpoint fail and "
                           "the workspace loses its processes",
}


class DockerRuntime:
    """Workspaces as Docker containers with a named volume at ``/workspace``."""

    name = "docker"

    def __init__(self, *, base_url: str = "", gvisor_runtime: str = "runsc", threads: int = 32,
                 helper_image: str = "den/workspace:latest", runsc: str = "runsc",
                 runsc_root: str = "/run/docker/runtime-runc/moby", agent_dir: Path | None = None,
                 network: str = "", network_interface: str = "", network_subnet: str = "",
                 resolv_conf: Path | None = None, disks: Disks | None = None,
                 gpu: GpuSandbox | None = None, containerd_tmp_dir: Path | None = None,
                 prefix: str = "den"):
        """``network``: the bridge network every new workspace joins (created when missing,
        its host interface named ``network_interface``); empty keeps the engine's default
        bridge. ``resolv_conf`` is mounted as the workspaces' /etc/resolv.conf. ``disks``
        enforces each workspace's ``disk_gb`` (None: not enforced). ``containerd_tmp_dir``:
        where containerd leaves a copy of each restored checkpoint (:meth:`sweep`).
        ``prefix`` begins the name of every container, volume and image this backend makes
        (``DEN_ENGINE_PREFIX``)."""
        self._prefix = prefix
        self._disks = disks
        self._containerd_tmp = containerd_tmp_dir
        self._agent_dir = agent_dir
        self._network = network
        self._network_interface = network_interface
        self._network_subnet = network_subnet
        self._resolv_conf = resolv_conf
        self._gpu = gpu  # how containers get GPUs (None: this host hands out none)
        # Den's memory guard can watch sandboxes' cgroups here (v1); else earlyoom inside.
        self._host_memory_guard = cgroup_memory.thresholds_available()
        self._network_lock = threading.Lock()
        self._ports: dict[str, str] = {}  # endpoint id -> the host's end of its veth
        self._agents: dict[str, AgentSession] = {}  # container -> live session
        self.direct = DirectPaths()  # connections into workspaces without the exec stream
        self._relays: dict[str, str] = {}  # container -> the exec id of its session's relay
        self._agent_info: dict[str, tuple[bool, dict[str, str]]] = {}  # has agent, its env
        self._agent_locks: dict[str, asyncio.Lock] = {}
        # container -> until when the engine's exec serves it (its agent did not answer)
        self._broken_agents: dict[str, float] = {}
        self._fallback_listeners: list[Callable[[str, str], None]] = []
        self._runsc = runsc
        self._runsc_root = runsc_root
        self._base_url = base_url
        self._gvisor_runtime = gvisor_runtime
        self._warned: set[str] = set()  # runsc flags found missing and logged
        self._helper_image = helper_image
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="docker")
        self._short = ThreadPoolExecutor(max_workers=SHORT_THREADS,
                                         thread_name_prefix="docker-short")
        self._client: docker.DockerClient | None = None
        self._docker_root: Path | None = None
        self._runsc_cmd: list[str] | None = None
        self._last_exec: dict[str, float] = {}  # container -> when an exec last started/ended
        self._armed: dict[str, ArmedRename] = {}  # container -> its rename made ready
        self._client_lock = threading.Lock()

    # --- the seam ---------------------------------------------------------------------

    def _api(self) -> Any:
        with self._client_lock:
            if self._client is None:
                try:
                    if self._base_url:
                        self._client = docker.DockerClient(base_url=self._base_url, timeout=120)
                    else:
                        self._client = docker.from_env(timeout=120)
                except docker.errors.DockerException as exc:
                    raise EngineUnavailable(
                        "the Docker engine is not reachable", detail=str(exc)
                    ) from exc
            return self._client.api

    async def _call(self, what: str, fn: Callable[..., T], *args: Any, slow: bool = False,
                    **kwargs: Any) -> T:
        """Run ``fn`` on an executor: ``slow`` calls (execs through the engine, checkpoints,
        copies) on the long pool, every other call on the short pool, so that a state read
        never waits behind a minute-long exec."""
        def run() -> T:
            try:
                return fn(*args, **kwargs)
            except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
                raise _translate(exc, what) from exc

        # Through inflight: a delete waits for a call its cancelled caller left running.
        return await inflight.run(self._executor if slow else self._short, run)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._short.shutdown(wait=False, cancel_futures=True)
        if self._client is not None:
            self._client.close()

    # --- engine facts -----------------------------------------------------------------

    def new_handle(self, workspace_id: str) -> dict[str, Any]:
        return docker_specs.new_handle(self._prefix, workspace_id)

    def sandbox_name(self, spec: WorkspaceSpec) -> str:
        return container_of(spec)

    async def check(self) -> None:
        info = await self._call("engine info", lambda: self._api().info())
        runtimes = info.get("Runtimes") or {}
        if self._gvisor_runtime not in runtimes:
            raise EngineUnavailable(
                f"the Docker engine has no runtime named {self._gvisor_runtime!r}; "
                "run scripts/setup-host.sh (or `make setup`) to install gVisor"
            )
        args = (runtimes[self._gvisor_runtime] or {}).get("runtimeArgs") or []
        for flag, without in REQUIRED_RUNSC_FLAGS.items():
            if flag not in args and flag not in self._warned:
                self._warned.add(flag)  # once: the check runs every interval
                log.warning("the engine's runtime %r runs without %s: %s; run "
                            "scripts/setup-host.sh (or `make setup`)", self._gvisor_runtime,
                            flag, without)

    async def image_exists(self, image: str) -> bool:
        try:
            await self._call(f"image {image}", lambda: self._api().inspect_image(image))
        except ObjectMissing:
            return False
        return True

    # --- lifecycle --------------------------------------------------------------------

    async def create(self, spec: WorkspaceSpec) -> None:
        what = f"create workspace {spec.workspace_id}"
        self._agent_info.pop(container_of(spec), None)

        def run() -> None:
            api = self._api()
            try:
                api.inspect_volume(volume_of(spec))
            except docker.errors.NotFound:
                api.create_volume(**self._volume_config(spec))
            cfg = self._container_config(spec)
            host_config = api.create_host_config(**cfg.pop("host_config"))
            try:
                api.inspect_container(container_of(spec))
            except docker.errors.NotFound:
                api.create_container(**cfg, host_config=host_config)

        await self._call(what, run)

    def _volume_config(self, spec: WorkspaceSpec, name: str | None = None) -> dict[str, Any]:
        """A new volume of the workspace, on a disk image of its own when disks are enforced
        (blocking: makes and mounts the image)."""
        name = name or volume_of(spec)
        opts = (self._disks.create(name, size_gb=spec.disk_gb, workspace_id=spec.workspace_id)
                if self._disks is not None and spec.disk_gb > 0 else None)
        return docker_specs.volume_config(spec, name=name, driver_opts=opts)

    def _disk_ready(self, spec: WorkspaceSpec, inspect: dict[str, Any]) -> None:
        """Before the container starts or is committed: its disk image mounted and its
        writable layer on it (again, after a host reboot). Blocking."""
        if self._disks is not None:
            self._disks.ready(volume_of(spec), disk_quota.layer_dir(inspect))

    def _remove_disk(self, volume: str) -> None:
        if self._disks is not None:
            self._disks.remove(volume)

    def _container_config(self, spec: WorkspaceSpec) -> dict[str, Any]:
        if self._network:
            self._ensure_network()
        return docker_specs.container_config(
            spec, gvisor_runtime=self._gvisor_runtime,
            agent_dir=str(self._agent_dir) if self._agent_dir is not None else None,
            network=self._network or None,
            resolv_conf=str(self._resolv_conf) if self._network and self._resolv_conf else None,
            gpu=self._gpu, host_memory_guard=self._host_memory_guard)

    def _ensure_network(self) -> dict[str, Any]:
        """Inspect Den's network, creating it first when it is missing (blocking)."""
        api = self._api()
        with self._network_lock:
            try:
                return dict(api.inspect_network(self._network))
            except docker.errors.NotFound:
                pass
            cfg = docker_specs.network_config(self._network, interface=self._network_interface,
                                              subnet=self._network_subnet)
            subnet = cfg.pop("subnet")
            ipam = (docker.types.IPAMConfig(pool_configs=[docker.types.IPAMPool(subnet=subnet)])
                    if subnet else None)
            try:
                api.create_network(**cfg, ipam=ipam)
            except docker.errors.APIError as exc:
                if exc.status_code != 409:
                    raise
            log.info("created network %s (bridge %s)", self._network, self._network_interface)
            return dict(api.inspect_network(self._network))

    async def network(self) -> NetworkInfo:
        """:class:`~server.runtime.base.ManagedNetwork`."""
        if not self._network:
            raise EngineError("this server puts workspaces on no network of its own")

        def run() -> NetworkInfo:
            inspect = self._ensure_network()
            subnet, addresses = docker_specs.network_addresses(inspect)
            return NetworkInfo(interface=self._network_interface, subnet=subnet,
                               gateway=docker_specs.network_gateway(inspect),
                               addresses=addresses, ports=self._bridge_ports(inspect))

        return await self._call(f"network {self._network}", run)

    def _bridge_ports(self, inspect: dict[str, Any]) -> dict[str, str]:
        """Container name -> the host's end of its veth (blocking). The engine does not say;
        the container's end names its peer's interface index (``eth0@if<n>``), read in the
        container's network namespace. Cached per endpoint (a new one at each start)."""
        found: dict[str, str] = {}
        live: set[str] = set()
        for cid, c in (inspect.get("Containers") or {}).items():
            endpoint, name = str(c.get("EndpointID") or ""), str(c.get("Name") or "")
            if not endpoint or not name:
                continue
            live.add(endpoint)
            if endpoint not in self._ports:
                port = self._find_port(str(cid))
                if port is None:
                    continue
                self._ports[endpoint] = port
            found[name] = self._ports[endpoint]
        for gone in set(self._ports) - live:
            del self._ports[gone]
        return found

    def _find_port(self, cid: str) -> str | None:
        try:
            pid = int(self._api().inspect_container(cid)["State"].get("Pid") or 0)
            if pid <= 0:
                return None
            out = subprocess.run(["nsenter", "-t", str(pid), "-n", "ip", "-o", "link", "show",
                                  "eth0"], capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError, docker.errors.NotFound):
            return None
        index = docker_specs.veth_peer_index(out)
        for entry in Path("/sys/class/net").iterdir() if index is not None else []:
            with contextlib.suppress(OSError, ValueError):
                if int((entry / "ifindex").read_text()) == index:
                    return entry.name
        log.warning("container %s: its port on Den's bridge was not found; its rules match "
                    "its address only", cid[:12])
        return None

    async def seed(self, spec: WorkspaceSpec, tar: Path) -> None:
        """Written into the volume's directory from the host (server/runtime/host_seed.py), or,
        when that fails, through the engine's archive API, which overwrites a partial seed."""
        def run() -> None:
            path = self._volume_path(spec)
            if path is not None:
                try:
                    host_seed.extract(tar, path)
                    return
                except (OSError, host_seed.SeedRefused) as exc:
                    log.info("%s: seeding from the host failed (%s); the engine seeds",
                             container_of(spec), exc)
            with tar.open("rb") as fh:
                self._api().put_archive(container_of(spec), docker_specs.WORKSPACE_MOUNT, fh)

        await self._call(f"seed workspace {spec.workspace_id}", run, slow=True)

    def _volume_path(self, spec: WorkspaceSpec) -> Path | None:
        """The host directory the workspace's volume binds: on its disk (Den's image), else
        the local driver's; None when the engine names none this host has (blocking)."""
        volume = volume_of(spec)
        if self._disks is not None and self._disks.has(volume):
            mounted = os.path.ismount(self._disks.mountpoint(volume))
            return self._disks.data_dir(volume) if mounted else None
        try:
            info = self._api().inspect_volume(volume)
        except docker.errors.NotFound:
            return None
        where = info.get("Mountpoint") if info.get("Driver") == "local" else None
        return Path(where) if where and os.path.isdir(where) else None

    async def workspace_dir(self, spec: WorkspaceSpec) -> Path | None:
        return await self._call(f"find the volume of workspace {spec.workspace_id}",
                                self._volume_path, spec)

    async def start(self, spec: WorkspaceSpec) -> None:
        self._broken_agents.pop(container_of(spec), None)

        def run() -> None:
            api = self._api()
            info = api.inspect_container(container_of(spec))
            if not info["State"].get("Running"):
                self._disk_ready(spec, info)
                api.start(container_of(spec))

        await self._call(f"start workspace {spec.workspace_id}", run)

    async def stop(self, spec: WorkspaceSpec, *, timeout_s: int) -> None:
        await self._drop_agent(spec, "stopped")

        def run() -> None:
            api = self._api()
            try:
                _thaw(api, container_of(spec))
                api.stop(container_of(spec), timeout=timeout_s)
            except docker.errors.NotFound:
                return

        await self._call(f"stop workspace {spec.workspace_id}", run)

    async def destroy(self, spec: WorkspaceSpec) -> None:
        await self._drop_agent(spec, "stopped")
        self._agent_info.pop(container_of(spec), None)
        self._agent_locks.pop(container_of(spec), None)
        if (armed := self._armed.pop(container_of(spec), None)) is not None:
            armed.close()

        def run() -> None:
            api = self._api()
            self._last_exec.pop(container_of(spec), None)
            with contextlib.suppress(docker.errors.NotFound):
                _thaw(api, container_of(spec))
                api.remove_container(container_of(spec), force=True, v=False)
            faults.point("delete.volume")
            _remove_volume(api, volume_of(spec))
            self._remove_disk(volume_of(spec))

        await self._call(f"destroy workspace {spec.workspace_id}", run)

    async def pause(self, spec: WorkspaceSpec, *, checkpoint: str) -> None:
        """Checkpoint with runsc itself, not through the engine's checkpoint API, which copies
        and hashes the image two or three times each way (1 GiB: 35 s to pause, 24 s to
        resume, against 3 s and 1.5 s; docs/benchmarks.md). The image is written uncompressed
        beside the engine's checkpoint directory, which holds symlinks to it; the engine's
        ``start --checkpoint`` then copies links, and runsc follows them.

        The agent's session is closed first (its open streams end with the reason "paused");
        the agent and everything it started are in PID 1's tree and are saved with it."""
        await self._drop_agent(spec, "paused")

        def run() -> None:
            api = self._api()
            name = container_of(spec)
            info = api.inspect_container(name)
            if not info["State"].get("Running"):
                raise EngineConflict(f"container {name} is not running")
            cid = str(info["Id"])
            _thaw(api, name)  # a frozen sandbox neither answers the settle exec nor saves
            self._delete_checkpoint(cid, checkpoint)
            self._quiesce(spec, cid)
            home = self._home(cid)
            image = home / IMAGES_DIR / checkpoint
            image.mkdir(parents=True)
            # runsc's output goes to a file, not a pipe: runsc outlives a Den that dies
            # meanwhile (reconcile then finds it), and a pipe with no reader would fail it.
            out = image.with_name(image.name + ".log")
            try:
                with out.open("wb") as fh:
                    proc = subprocess.Popen(
                        docker_specs.checkpoint_argv(self._runsc_command(), image=image,
                                                     cid=cid),
                        stdin=subprocess.DEVNULL, stdout=fh, stderr=fh)
                faults.point("pause.checkpoint")
                code = proc.wait(timeout=CHECKPOINT_TIMEOUT_S)
            except (OSError, subprocess.SubprocessError) as exc:
                self._delete_checkpoint(cid, checkpoint)
                raise EngineError(f"checkpoint of {name} failed: {exc}") from exc
            said = out.read_text(errors="replace").strip()
            out.unlink(missing_ok=True)
            if code != 0 or not docker_specs.checkpoint_marker(image).exists():
                self._delete_checkpoint(cid, checkpoint)
                raise EngineError(f"checkpoint of {name} failed: "
                                  f"{docker_specs.runsc_failure(said) or code}",
                                  detail=said[-4000:])
            if not _wait_exited(api, name, EXIT_WAIT_S):
                self._delete_checkpoint(cid, checkpoint)
                raise EngineError(f"container {name} still runs after its checkpoint")
            _link_image(image, home / "checkpoints" / checkpoint)

        await self._call(f"pause workspace {spec.workspace_id}", run, slow=True)

    def _runsc_command(self) -> list[str]:
        """runsc as the engine runs it (the registered runtime's path and its global flags)
        with the engine's state root: the command that can checkpoint its sandboxes."""
        if self._runsc_cmd is None:
            runtime = (self._api().info().get("Runtimes") or {}).get(self._gvisor_runtime) or {}
            self._runsc_cmd = [str(runtime.get("path") or self._runsc),
                               *[str(a) for a in runtime.get("runtimeArgs") or []],
                               "--root", self._runsc_root]
        return self._runsc_cmd

    def _quiesce(self, spec: WorkspaceSpec, cid: str) -> None:
        """Make the sandbox restorable: end the processes started by exec (found and killed
        from the host with runsc, which costs the sandbox nothing) and, after recent exec
        activity, let the processes that received their descriptors drop them."""
        strays = docker_specs.exec_processes(self._sandbox_processes(cid) or [])
        if strays:
            log.info("container %s: ending exec'd processes %s before a checkpoint", cid[:12],
                     strays)
        for pid in strays:
            subprocess.run([self._runsc, "--root", self._runsc_root, "kill", "--pid", str(pid),
                            cid, "KILL"], capture_output=True, timeout=10, check=False)
        if strays:
            self._wait_for_exec_processes(cid)
        if strays or self._exec_recently(container_of(spec)):
            settle = ExecRequest(argv=docker_specs.settle_argv(), user="root", cwd="/")
            if self._exec_blocking(spec, settle) != 0:
                log.warning("container %s: host descriptors still held after the settle wait; "
                            "checkpointing anyway", cid[:12])
            self._wait_for_exec_processes(cid)

    def _exec_recently(self, container: str) -> bool:
        last = self._last_exec.get(container)
        return last is not None and time.monotonic() - last < SETTLE_AFTER_EXEC_S

    def _note_exec(self, container: str) -> None:
        self._last_exec[container] = time.monotonic()

    def _sandbox_processes(self, cid: str) -> list[tuple[int, int]] | None:
        """(pid, parent) of every process in the sandbox, read on the host (~30 ms)."""
        try:
            out = subprocess.run(
                [self._runsc, "--root", self._runsc_root, "ps", cid],
                capture_output=True, text=True, timeout=5, check=True).stdout
        except (OSError, subprocess.SubprocessError):
            return None
        return docker_specs.parse_runsc_ps(out)

    def _wait_for_exec_processes(self, cid: str) -> None:
        """Wait until the sandbox holds no process started by exec any more: the sandbox
        reaps one a moment after it is killed or the engine reports it done, and one still
        there at checkpoint time fails the restore."""
        deadline = time.monotonic() + QUIESCE_WAIT_S
        while time.monotonic() < deadline:
            rows = self._sandbox_processes(cid)
            if rows is None or not docker_specs.exec_processes(rows):
                return
            time.sleep(0.02)
        log.warning("container %s: exec'd processes still there after %s s; checkpointing "
                    "anyway", cid[:12], QUIESCE_WAIT_S)

    async def resume(self, spec: WorkspaceSpec, *, checkpoint: str) -> None:
        self._broken_agents.pop(container_of(spec), None)

        def run() -> None:
            api = self._api()
            name = container_of(spec)
            info = api.inspect_container(name)
            if info["State"].get("Running"):
                return
            self._disk_ready(spec, info)
            docker_engine.start_from_checkpoint(api, name, checkpoint)

        await self._call(f"resume workspace {spec.workspace_id}", run, slow=True)

    async def delete_checkpoint(self, spec: WorkspaceSpec, *, checkpoint: str) -> None:
        def run() -> None:
            try:
                cid = str(self._api().inspect_container(container_of(spec))["Id"])
            except docker.errors.NotFound:
                return  # the image went with the container's directory
            self._delete_checkpoint(cid, checkpoint)

        await self._call(f"delete checkpoint of workspace {spec.workspace_id}", run)

    def _delete_checkpoint(self, cid: str, checkpoint: str) -> None:
        """The engine's checkpoint (its directory of links) and the image beside it."""
        docker_engine.delete_checkpoint(self._api(), cid, checkpoint)
        image = self._home(cid) / IMAGES_DIR / checkpoint
        docker_specs.checkpoint_marker(image).unlink(missing_ok=True)
        image.with_name(image.name + ".log").unlink(missing_ok=True)
        shutil.rmtree(image, ignore_errors=True)

    async def settle_checkpoint(self, spec: WorkspaceSpec, *, checkpoint: str, wait_s: float
                                ) -> bool:
        """A checkpoint still being written (its runsc, or the shell that marks it complete,
        outlived the Den that started it) is waited for, at most ``wait_s``, then ended.
        Complete (its marker exists) and the sandbox gone: installed for ``resume``. No
        marker: the partial image is removed. A sandbox still running with a marked image
        and no writer keeps it: that is the image it was resumed from (gVisor may still read
        it), not this pause's."""

        def run() -> bool:
            api = self._api()
            name = container_of(spec)
            try:
                cid = str(api.inspect_container(name)["Id"])
            except docker.errors.NotFound:
                return False
            home = self._home(cid)
            image = home / IMAGES_DIR / checkpoint
            writers = processes_naming(str(image))
            wrote = bool(writers)
            deadline = time.monotonic() + wait_s
            while writers and time.monotonic() < deadline:
                time.sleep(0.1)
                writers = processes_naming(str(image))
            for pid in writers:  # past the bound: end it, its image is incomplete
                log.warning("container %s: ending checkpoint writer %d after %s s", name, pid,
                            wait_s)
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            complete = not writers and docker_specs.checkpoint_marker(image).exists()
            running = not _wait_exited(api, name, EXIT_WAIT_S if complete and wrote else 0)
            if complete and not running:
                _link_image(image, home / "checkpoints" / checkpoint)
                return True
            if not complete:  # partial: a pause deletes the image it was resumed from first
                self._delete_checkpoint(cid, checkpoint)
            return False

        return await self._call(f"settle checkpoint of workspace {spec.workspace_id}", run,
                                slow=True)

    async def status(self, spec: WorkspaceSpec) -> ContainerStatus:
        def run() -> ContainerStatus:
            try:
                state = self._api().inspect_container(container_of(spec))["State"]
            except docker.errors.NotFound:
                return ContainerStatus.MISSING
            if not state.get("Running"):
                return ContainerStatus.STOPPED
            return ContainerStatus.FROZEN if _frozen(state) else ContainerStatus.RUNNING

        return await self._call(f"status of workspace {spec.workspace_id}", run)

    # --- Freezer: the light sleep tier (docker pause: the cgroup freezer) ---------------

    async def freeze(self, spec: WorkspaceSpec) -> int | None:
        """Freeze the sandbox (~50 ms), then read what memory it holds (stable now). The
        agent's session is kept: a request on it waits until the thaw, and the first call
        after a wake needs no new relay."""
        def run() -> int | None:
            api = self._api()
            state = api.inspect_container(container_of(spec))["State"]
            if not state.get("Running"):
                raise EngineConflict(f"container {container_of(spec)} is not running")
            # the cgroup alone (server/runtime/cgroup_freezer.py); the engine's pause only
            # where it cannot be written (the sandbox then keeps some CPU)
            if not cgroup_freezer.set_frozen(int(state.get("Pid") or 0), True) \
                    and not state.get("Paused"):
                api.pause(container_of(spec))
            return _stats_memory_bytes(api, container_of(spec))

        return await self._call(f"freeze workspace {spec.workspace_id}", run)

    async def thaw(self, spec: WorkspaceSpec) -> None:
        def run() -> None:
            api = self._api()
            state = api.inspect_container(container_of(spec))["State"]
            if not state.get("Running"):
                raise EngineConflict(f"container {container_of(spec)} is not running")
            _thaw(api, container_of(spec), state)

        await self._call(f"thaw workspace {spec.workspace_id}", run)

    async def settle(self, spec: WorkspaceSpec, *, timeout_s: float) -> bool:
        """:class:`~server.runtime.base.Freezer`: the sandbox's cgroup CPU use, measured
        until it is idle (server/runtime/cgroup_cpu.py)."""
        def run() -> bool:
            state = self._api().inspect_container(container_of(spec))["State"]
            if not state.get("Running"):
                raise EngineConflict(f"container {container_of(spec)} is not running")
            path = cgroup_cpu.usage_file(int(state.get("Pid") or 0))
            return path is not None and cgroup_cpu.wait_idle(
                functools.partial(cgroup_cpu.usage_ns, path), timeout_s=timeout_s)

        return await self._call(f"settle workspace {spec.workspace_id}", run, slow=True)

    async def memory_cgroup(self, spec: WorkspaceSpec) -> Path | None:
        """:class:`~server.runtime.base.MemoryCgroups`: the running sandbox's memory cgroup."""
        def run() -> Path | None:
            state = self._api().inspect_container(container_of(spec))["State"]
            if not state.get("Running"):
                return None
            return cgroup_memory.memory_dir(int(state.get("Pid") or 0))

        return await self._call(f"memory cgroup of workspace {spec.workspace_id}", run)

    async def arm_hostname(self, spec: WorkspaceSpec) -> None:
        """:class:`~server.runtime.base.ArmedRehost`: the privileged script of
        :meth:`set_hostname`, started now and waiting for the name
        (server/runtime/docker_rename.py)."""
        def run() -> None:
            self._armed[container_of(spec)] = ArmedRename(self._api(), container_of(spec),
                                                           was=spec.hostname)

        await self._call(f"arm the host name of workspace {spec.workspace_id}", run)

    async def set_hostname(self, spec: WorkspaceSpec, hostname: str, *, was: str) -> None:
        """:class:`~server.runtime.base.Rehost`: a privileged exec of Den's own script (the
        engine's update cannot change a hostname; measured ~0.1 s under gVisor alone), or
        the one :meth:`arm_hostname` started."""
        if (armed := self._armed.pop(container_of(spec), None)) is not None:
            await self._call(f"name the host of workspace {spec.workspace_id}", armed.fire,
                             hostname)
            return

        def run() -> None:
            api = self._api()
            exec_id = str(api.exec_create(
                container_of(spec), docker_specs.set_hostname_argv(hostname, was=was),
                stdout=True, stderr=True, user="root", workdir="/", privileged=True)["Id"])
            out = api.exec_start(exec_id)
            if api.exec_inspect(exec_id).get("ExitCode") != 0:
                raise EngineError(f"could not name the host of {container_of(spec)}",
                                  detail=bytes(out or b"")[-500:].decode(errors="replace"))

        await self._call(f"name the host of workspace {spec.workspace_id}", run)

    # --- events -----------------------------------------------------------------------

    async def watch(self, instance: str) -> AsyncGenerator[EngineEvent, None]:
        """:class:`~server.runtime.base.EngineEvents`: Docker's event stream, filtered by the
        engine to this instance's containers, read by a thread of its own (it blocks for
        good; not one of the executor's). On reconnect it asks for the events since the
        last one it saw, and yields RESYNC: the engine may have restarted and forgotten."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[EngineEvent] = asyncio.Queue(maxsize=WATCH_QUEUE)
        dropped = False
        stop = threading.Event()
        streams: list[Any] = []  # the open stream, closed from here to end the thread

        def put(event: EngineEvent) -> None:  # on the loop
            nonlocal dropped
            try:
                queue.put_nowait(event)
            except asyncio.QueueFull:
                dropped = True

        def deliver(event: EngineEvent) -> bool:  # on the thread
            try:
                loop.call_soon_threadsafe(put, event)
            except RuntimeError:  # the loop is closed
                return False
            return True

        def read() -> None:
            since: str | None = None
            delay = 0.5
            connected_before = False
            while not stop.is_set():
                try:
                    stream = self._api().events(decode=True, since=since, filters={
                        "type": "container", "event": ["start", "die", "oom"],
                        "label": [f"{LABEL_MANAGED}=true", f"{LABEL_INSTANCE}={instance}"]})
                    streams[:] = [stream]
                    if connected_before and not deliver(EngineEvent(EngineEventKind.RESYNC)):
                        return
                    connected_before = True
                    delay = 0.5
                    for raw in stream:
                        if stop.is_set():
                            return
                        if isinstance(raw, dict) and raw.get("timeNano"):
                            since = f"{int(raw['timeNano']) / 1e9:.9f}"
                        event = engine_event(raw)
                        if event is not None and not deliver(event):
                            return
                except Exception as exc:  # any break: reconnect (the thread must not die)
                    if stop.is_set():
                        return
                    # Once per outage at WARNING; the supervisor reports the engine's state.
                    log.log(logging.WARNING if delay == 0.5 else logging.DEBUG,
                            "engine events: %s; reconnecting in %.1f s",
                            type(exc).__name__, delay)
                if stop.wait(delay):
                    return
                delay = min(delay * 2, WATCH_RETRY_MAX_S)

        reader = threading.Thread(target=read, name="docker-events", daemon=True)
        reader.start()
        try:
            while True:
                event = await queue.get()
                if dropped and queue.empty():
                    dropped = False
                    yield event
                    yield EngineEvent(EngineEventKind.RESYNC)
                    continue
                yield event
        finally:
            stop.set()
            for stream in streams:
                with contextlib.suppress(Exception):
                    stream.close()

    # --- snapshots --------------------------------------------------------------------

    def _copy_volume(self, src: str, dst: str, *, wipe: bool, labels: dict[str, str],
                     workspace_id: str, fault: str) -> int:
        api = self._api()
        cfg = docker_specs.copy_volume_config(
            image=self._helper_image, runtime=self._gvisor_runtime, src=src, dst=dst,
            wipe=wipe, labels=docker_specs.copy_helper_labels(labels, workspace_id=workspace_id))
        host_config = api.create_host_config(**cfg.pop("host_config"))
        if inflight.abandoned():  # a delete of the workspace waits for this thread
            raise EngineError("the copy was not started: its operation was cancelled")
        helper = api.create_container(**cfg, host_config=host_config)["Id"]
        try:
            api.start(helper)
            faults.point(fault)
            code = api.wait(helper, timeout=3600).get("StatusCode", -1)
            logs = api.logs(helper, stdout=True, stderr=True).decode(errors="replace")
            if code != 0:
                raise EngineError(f"copying the workspace's files failed: {logs.strip()[-300:]}")
            last = logs.strip().splitlines()[-1:] or ["0"]
            return int(last[0]) if last[0].isdigit() else 0
        finally:
            with contextlib.suppress(docker.errors.DockerException):
                api.remove_container(helper, force=True)

    def new_snapshot(self, snapshot_id: str, labels: Mapping[str, str]) -> SnapshotSpec:
        return docker_specs.new_snapshot(self._prefix, snapshot_id, labels)

    async def snapshot(self, spec: WorkspaceSpec, snap: SnapshotSpec) -> int:
        def run() -> int:
            api = self._api()
            repository, _, tag = str(snap.handle["image"]).rpartition(":")
            self._disk_ready(spec, api.inspect_container(container_of(spec)))
            image = api.commit(container_of(spec), repository=repository, tag=tag,
                               conf={"Labels": dict(snap.labels)}, pause=False)
            size = int(api.inspect_image(image["Id"]).get("Size") or 0)
            try:
                api.inspect_volume(snapshot_volume(snap))
            except docker.errors.NotFound:
                api.create_volume(**docker_specs.snapshot_volume_config(snap))
            faults.point("snapshot.commit")
            return size + self._copy_volume(volume_of(spec), snapshot_volume(snap), wipe=True,
                                            labels=dict(snap.labels),
                                            workspace_id=spec.workspace_id,
                                            fault="snapshot.copy")

        return await self._call(f"snapshot of workspace {spec.workspace_id}", run, slow=True)

    async def load_snapshot(self, spec: WorkspaceSpec, snap: SnapshotSpec) -> None:
        await self._drop_agent(spec, "stopped")
        self._agent_info.pop(container_of(spec), None)

        def run() -> None:
            api = self._api()
            with contextlib.suppress(docker.errors.NotFound):
                api.remove_container(container_of(spec), force=True, v=False)
            try:
                api.inspect_volume(volume_of(spec))
            except docker.errors.NotFound:
                api.create_volume(**self._volume_config(spec))
            cfg = self._container_config(spec)
            host_config = api.create_host_config(**cfg.pop("host_config"))
            api.create_container(**cfg, host_config=host_config)
            self._copy_volume(snapshot_volume(snap), volume_of(spec), wipe=True,
                              labels=dict(spec.labels), workspace_id=spec.workspace_id,
                              fault="fork.copy")

        await self._call(f"load snapshot into workspace {spec.workspace_id}", run, slow=True)

    def restore_handle(self, spec: WorkspaceSpec) -> dict[str, Any]:
        return docker_specs.restore_handle(spec, self._prefix)

    async def copy_snapshot(self, spec: WorkspaceSpec, snap: SnapshotSpec, *, into: Handle
                            ) -> None:
        volume = str(into["volume"])

        def run() -> None:
            api = self._api()
            try:
                api.inspect_volume(volume)
            except docker.errors.NotFound:
                api.create_volume(**self._volume_config(spec, volume))
            self._copy_volume(snapshot_volume(snap), volume, wipe=True, labels=dict(spec.labels),
                              workspace_id=spec.workspace_id, fault="restore.copy")

        await self._call(f"copy snapshot {snap.snapshot_id} for workspace "
                         f"{spec.workspace_id}", run, slow=True)

    async def replace_container(self, spec: WorkspaceSpec, *, old: Handle) -> None:
        old_volume = str(old.get("volume") or volume_of(spec))

        await self._drop_agent(spec, "stopped")
        self._agent_info.pop(container_of(spec), None)

        def run() -> None:
            api = self._api()
            with contextlib.suppress(docker.errors.NotFound):
                api.remove_container(container_of(spec), force=True, v=False)
            # The same configuration as a create: Den's network (and so its policy), the
            # agent, the resolver (a restored container left Den's network before).
            cfg = self._container_config(spec)
            host_config = api.create_host_config(**cfg.pop("host_config"))
            api.create_container(**cfg, host_config=host_config)
            if old_volume != volume_of(spec):
                _remove_volume(api, old_volume)
                self._remove_disk(old_volume)

        await self._call(f"replace container of workspace {spec.workspace_id}", run)

    def _container_dir(self, container: str) -> Path:
        """The container's directory under the engine's root. Docker 20.10 keeps checkpoints
        in it (``checkpoints/<name>``) and refuses --checkpoint-dir, so Den works there
        directly (it runs on the engine's host); what Den keeps there goes with the
        container."""
        return self._home(str(self._api().inspect_container(container)["Id"]))

    def _home(self, cid: str) -> Path:
        """:meth:`_container_dir` of a container whose full id is known."""
        if self._docker_root is None:
            self._docker_root = Path(str(self._api().info()["DockerRootDir"]))
        return self._docker_root / "containers" / cid

    async def sweep(self) -> int:
        """Housekeeping: the checkpoint copies containerd 1.6 leaves in its temp dir at every
        restore (a full memory image each), once older than any restore in progress."""
        if self._containerd_tmp is None:
            return 0
        return await asyncio.to_thread(containerd_tmp.sweep_restore_copies,
                                       self._containerd_tmp)

    def checkpoint_dirs(self) -> list[Path]:
        """Where this backend keeps pause checkpoints on the host (for the checkpoint disk
        use metric; blocking, called at scrape time off the event loop)."""
        try:
            with self._client_lock:
                known = self._docker_root
            root = known or Path(str(self._api().info()["DockerRootDir"]))
        except (DenError, docker.errors.DockerException, requests.exceptions.RequestException):
            return []
        self._docker_root = root
        return sorted((root / "containers").glob(f"*/{IMAGES_DIR}"))

    async def export_checkpoint(self, spec: WorkspaceSpec, *, checkpoint: str, dest: Path
                                ) -> int:
        def run() -> int:
            src = self._container_dir(container_of(spec)) / "checkpoints" / checkpoint
            if not src.is_dir():
                raise ObjectMissing(f"checkpoint {checkpoint} of {container_of(spec)}")
            shutil.rmtree(dest, ignore_errors=True)
            shutil.copytree(src, dest)  # the image itself, not the links to it
            return sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())

        return await self._call(f"export checkpoint of workspace {spec.workspace_id}", run,
                                slow=True)

    async def import_checkpoint(self, spec: WorkspaceSpec, *, checkpoint: str, src: Path
                                ) -> None:
        def run() -> None:
            if not src.is_dir():
                raise ObjectMissing(f"saved memory at {src}")
            home = self._container_dir(container_of(spec))
            image = home / IMAGES_DIR / checkpoint
            shutil.rmtree(image, ignore_errors=True)
            shutil.copytree(src, image)
            _link_image(image, home / "checkpoints" / checkpoint)

        await self._call(f"import checkpoint into workspace {spec.workspace_id}", run,
                         slow=True)

    async def delete_snapshot(self, snap: SnapshotSpec) -> None:
        def run() -> None:
            api = self._api()
            with contextlib.suppress(docker.errors.NotFound):
                # Untags even while a fork's container uses it; layers go with the last user.
                api.remove_image(str(snap.handle["image"]), force=True, noprune=False)
            with contextlib.suppress(docker.errors.NotFound):
                api.remove_volume(snapshot_volume(snap), force=True)

        await self._call(f"delete snapshot {snap.snapshot_id}", run, slow=True)

    async def usage(self, spec: WorkspaceSpec) -> ResourceUsage | None:
        """From the agent when the workspace has one (what the workspace's own processes and
        files use inside the sandbox, without gVisor's overhead on the host, and without
        asking the engine); else from the engine's stats (the sandbox's cgroup on the host)."""
        session = await self._agent_or_fallback(spec)
        if session is not None:
            with contextlib.suppress(AgentUnavailable, AgentTimeout, AgentOpError):
                status = await agent_ops.status(session)
                used, memory = status.get("cpu_ns"), status.get("memory_bytes")
                if isinstance(used, int) and used >= 0:
                    return ResourceUsage(used, memory if isinstance(memory, int)
                                         and memory >= 0 else None)

        return await self._call(f"usage of workspace {spec.workspace_id}",
                                lambda: _stats_usage(self._api(), container_of(spec)))

    async def list_objects(self, instance: str) -> list[EngineObject]:
        def run() -> list[EngineObject]:
            api = self._api()
            label = f"{LABEL_INSTANCE}={instance}"
            found: list[EngineObject] = []
            for c in api.containers(all=True, filters={"label": label}):
                name = c["Names"][0].lstrip("/") if c.get("Names") else c["Id"]
                found.append(
                    EngineObject(
                        kind="container",
                        name=name,
                        workspace_id=c["Labels"].get(LABEL_WORKSPACE, ""),
                        running=c.get("State") == "running",
                        role=c["Labels"].get(LABEL_ROLE, ""),
                        status=LISTED_STATUS.get(str(c.get("State"))),
                    )
                )
            for v in api.volumes(filters={"label": label}).get("Volumes") or []:
                labels = v.get("Labels") or {}
                found.append(
                    EngineObject(
                        kind="volume",
                        name=v["Name"],
                        workspace_id=labels.get(LABEL_WORKSPACE, ""),
                        snapshot_id=labels.get(LABEL_SNAPSHOT, ""),
                    )
                )
            if self._disks is not None:  # disk images whose volume is gone (a crash)
                names = {str(v["Name"]) for v in api.volumes().get("Volumes") or []}
                found += [EngineObject(kind="volume", name=volume, workspace_id=owner)
                          for volume, owner in self._disks.orphans(names)]
            for image in api.images(all=False, filters={"label": label}):
                labels = image.get("Labels") or {}
                tags = [t for t in image.get("RepoTags") or [] if t != "<none>:<none>"]
                found.append(  # snapshot images; untagged ones once their snapshot is gone
                    EngineObject(
                        kind="image",
                        name=tags[0] if tags else str(image["Id"]),
                        workspace_id=labels.get(LABEL_WORKSPACE, ""),
                        snapshot_id=labels.get(LABEL_SNAPSHOT, ""),
                    )
                )
            return found

        return await self._call("list engine objects", run)

    def stale(self, obj: EngineObject, handle: Handle) -> bool:
        return obj.kind == "volume" and obj.name != handle.get("volume")

    async def remove_object(self, obj: EngineObject) -> None:
        def run() -> None:
            api = self._api()
            with contextlib.suppress(docker.errors.NotFound):
                if obj.kind == "container":
                    _thaw(api, obj.name)  # a frozen one (the warm pool's) cannot be removed
                    api.remove_container(obj.name, force=True, v=False)
                elif obj.kind == "image":
                    try:
                        api.remove_image(obj.name)
                    except docker.errors.APIError as exc:
                        if exc.status_code != 409:
                            raise
                        # A fork's container still uses it: untag it now; the untagged image
                        # goes at a later start, once no container uses it.
                        if not obj.name.startswith("sha256:"):
                            api.remove_image(obj.name, force=True)
                else:
                    api.remove_volume(obj.name, force=True)
            if obj.kind == "volume":
                self._remove_disk(obj.name)

        await self._call(f"remove {obj.kind} {obj.name}", run)

    # --- processes --------------------------------------------------------------------

    def _exec_create(self, spec: WorkspaceSpec, argv: list[str], req: ExecRequest,
                     *, stdin: bool, marker: str = "") -> str:
        self._note_exec(container_of(spec))
        env = docker_specs.exec_env(req.user, spec.env, req.env)
        if marker:
            env[docker_specs.EXEC_MARKER] = marker
        created = self._api().exec_create(
            container_of(spec),
            argv,
            stdout=True,
            stderr=True,
            stdin=stdin,
            tty=req.tty,
            user=req.user,
            workdir=req.cwd,
            environment=env,
        )
        return str(created["Id"])

    async def exec(self, spec: WorkspaceSpec, req: ExecRequest) -> ExecResult:
        """Through the workspace's agent when it has one; else through the engine."""
        session = await self._agent_or_fallback(spec)
        if session is not None:
            try:
                return await agent_ops.run(session, req, self._agent_env(spec, req))
            except agent_ops.NotStarted as exc:
                self._agent_broken(spec, exc.message)
        return await self._engine_exec(spec, req)

    async def _engine_exec(self, spec: WorkspaceSpec, req: ExecRequest) -> ExecResult:
        """Run the command as it is (no wrapper process: each one costs ~25 ms under gVisor)
        and keep the deadline here; at the deadline, every process carrying this call's
        marker in its environment (the command and its children) is killed."""

        def run() -> ExecResult:
            started = time.monotonic()
            marker = secrets.token_hex(8)
            exec_id = self._exec_create(spec, list(req.argv), req, stdin=req.stdin is not None,
                                        marker=marker)
            sock = self._api().exec_start(exec_id, socket=True)
            raw = _raw_socket(sock)
            writer: threading.Thread | None = None
            if req.stdin is not None:
                writer = threading.Thread(target=_feed, args=(raw, req.stdin), daemon=True)
                writer.start()
            deadline = None if req.timeout_s is None else started + req.timeout_s
            out = Captured(req.max_output_bytes, spool_dir=req.spool_dir)
            err = Captured(req.max_output_bytes, spool_dir=req.spool_dir)
            try:
                timed_out = _collect(raw, out, err, deadline)
                if timed_out:
                    kill = ExecRequest(argv=docker_specs.kill_marked_argv(marker),
                                       user="root", cwd="/")
                    self._exec_blocking(spec, kill)
                    if not _drain(raw, time.monotonic() + EXEC_GRACE_S):
                        sock.close()
                        raise EngineError(
                            "the command did not finish and the workspace stopped answering"
                        )
                if writer is not None:
                    writer.join(timeout=5)
                with contextlib.suppress(OSError):
                    sock.close()
                exit_code = _exit_code(self._api(), exec_id)
                self._note_exec(container_of(spec))
                failed = out.head(len(OCI_FAILED))
                if exit_code in (126, 128) and failed == OCI_FAILED:
                    # The engine could not start the process: the sandbox is gone or full.
                    raise EngineConflict(out.read().decode(errors="replace").strip())
            except BaseException:
                out.close()
                err.close()
                with contextlib.suppress(OSError):
                    sock.close()
                raise
            return ExecResult(
                exit_code=exit_code,
                stdout=out,
                stderr=err,
                timed_out=timed_out,
                duration_ms=int((time.monotonic() - started) * 1000),
                truncated=out.truncated or err.truncated,
            )

        return await self._call(f"exec in workspace {spec.workspace_id}", run,
                                slow=not req.short)

    def _exec_blocking(self, spec: WorkspaceSpec, req: ExecRequest) -> int:
        """A short helper command (no stdin, output discarded); returns its exit code."""
        exec_id = self._exec_create(spec, list(req.argv), req, stdin=False)
        self._api().exec_start(exec_id)
        return _exit_code(self._api(), exec_id)

    async def exec_stream(self, spec: WorkspaceSpec, req: ExecRequest) -> ExecStream:
        session = await self._agent_or_fallback(spec)
        if session is not None:
            try:
                return await agent_ops.AgentExecStream.start(session, req,
                                                             self._agent_env(spec, req))
            except agent_ops.NotStarted as exc:
                self._agent_broken(spec, exc.message)
        return await self._engine_exec_stream(spec, req)

    async def _engine_exec_stream(self, spec: WorkspaceSpec, req: ExecRequest
                                  ) -> DockerExecStream:
        pidfile = f"/tmp/.den-exec-{secrets.token_hex(8)}"
        # The engine's API (1.41) has no initial console size: the wrapper sets it with stty.
        argv = docker_specs.stream_argv(docker_specs.exec_argv(req), pidfile,
                                        req.size if req.tty else None)

        def run() -> tuple[str, Any]:
            exec_id = self._exec_create(spec, argv, req, stdin=True)
            return exec_id, self._api().exec_start(exec_id, socket=True, tty=req.tty)

        exec_id, sock = await self._call(f"exec in workspace {spec.workspace_id}", run)
        return DockerExecStream(self, spec, exec_id, sock, pidfile, tty=req.tty)

    # --- the agent ------------------------------------------------------------------------

    async def _agent_facts(self, spec: WorkspaceSpec) -> tuple[bool, dict[str, str]]:
        """Whether the container runs Den's agent, and its environment (the image's and the
        container's variables, which an engine exec would inherit)."""
        facts = self._agent_info.get(container_of(spec))
        if facts is None:
            info = await self._call(f"inspect workspace {spec.workspace_id}",
                                    lambda: self._api().inspect_container(container_of(spec)))
            config = info.get("Config") or {}
            env = dict(e.split("=", 1) for e in config.get("Env") or [] if "=" in e)
            has = (config.get("Labels") or {}).get(docker_specs.LABEL_AGENT) == "1"
            facts = (has, env)
            self._agent_info[container_of(spec)] = facts
        return facts

    def _agent_env(self, spec: WorkspaceSpec, req: ExecRequest) -> dict[str, str]:
        base = self._agent_info.get(container_of(spec), (True, {}))[1]
        return {**base, **docker_specs.exec_env(req.user, spec.env, req.env)}

    async def _agent(self, spec: WorkspaceSpec) -> AgentSession | None:
        """A live session with the workspace's agent (starting a relay when there is none), or
        None for a container made without one (the engine's exec serves it then)."""
        name = container_of(spec)
        session = self._agents.get(name)
        if session is not None and session.alive:
            return session
        has, _ = await self._agent_facts(spec)
        if not has:
            return None
        lock = self._agent_locks.setdefault(name, asyncio.Lock())
        async with lock:
            session = self._agents.get(name)
            if session is not None and session.alive:
                return session

            def relay() -> tuple[str, Any]:
                exec_id = str(self._api().exec_create(
                    name, [docker_specs.AGENT_COMMAND[0], "relay"], stdin=True, stdout=True,
                    stderr=True, tty=False, user="root", workdir="/")["Id"])
                return exec_id, self._api().exec_start(exec_id, socket=True)

            try:
                exec_id, sock = await self._call(f"reach the agent of {spec.workspace_id}",
                                                 relay)
            except EngineError as exc:  # Docker answers 500 when the sandbox has just died
                if await self.status(spec) is not ContainerStatus.RUNNING:
                    raise EngineConflict(f"container {name} is not running") from exc
                raise
            transport = RelayTransport(sock, name=spec.workspace_id, exec_id=exec_id)
            try:
                session = await AgentSession.connect(transport, name=spec.workspace_id)
            except AgentUnavailable:
                if await self.status(spec) is not ContainerStatus.RUNNING:
                    raise EngineConflict(f"container {name} is not running") from None
                raise
            session.on_end = functools.partial(self._forget_agent, name)
            self._agents[name] = session
            self._relays[name] = exec_id
            log.info("workspace %s: agent %s (pid %s) reached", spec.workspace_id,
                     str(session.hello.get("version", "?"))[:40],
                     str(session.hello.get("pid", "?"))[:12])
            return session

    def _forget_agent(self, name: str, session: AgentSession) -> None:
        if self._agents.get(name) is session:
            del self._agents[name]

    def on_fallback(self, listener: Callable[[str, str], None]) -> None:
        self._fallback_listeners.append(listener)

    def _agent_broken(self, spec: WorkspaceSpec, why: str) -> None:
        """Use the engine's exec for this container for a while (or until it starts again)."""
        log.warning("workspace %s: %s; the engine's exec serves it for the next %d s",
                    spec.workspace_id, why, AGENT_RETRY_S)
        self._broken_agents[container_of(spec)] = time.monotonic() + AGENT_RETRY_S
        for listener in self._fallback_listeners:
            listener(spec.workspace_id, f"{why}; commands run through the engine's exec "
                                        f"for the next {AGENT_RETRY_S} s")
        session = self._agents.pop(container_of(spec), None)
        if session is not None:
            session._shutdown(why)

    async def agent(self, spec: WorkspaceSpec) -> AgentSession | None:
        """:class:`~server.runtime.base.AgentChannel`."""
        return await self._agent_or_fallback(spec)

    async def _agent_or_fallback(self, spec: WorkspaceSpec) -> AgentSession | None:
        """The agent's session; None (the engine's exec then) for a workspace without one, or
        whose agent cannot be reached (logged: the workspace stays usable, more slowly)."""
        if self._broken_agents.get(container_of(spec), 0.0) > time.monotonic():
            return None
        for attempt in range(AGENT_ATTEMPTS):  # a restarting agent is back within ~0.3 s
            try:
                return await self._agent(spec)
            except AgentUnavailable as exc:
                if attempt == AGENT_ATTEMPTS - 1:
                    self._agent_broken(spec, exc.message)
                    return None
                await asyncio.sleep(0.25)
        return None

    async def _drop_agent(self, spec: WorkspaceSpec, reason: str) -> None:
        """End the session; its relay then exits (waited for, briefly: a checkpoint must not
        find it, as it holds the engine's descriptors)."""
        session = self._agents.pop(container_of(spec), None)
        if session is None:
            return
        await session.close(reason)
        exec_id = self._relays.pop(container_of(spec), "")
        if exec_id:
            def wait() -> None:
                for _ in range(100):
                    if not self._api().exec_inspect(exec_id).get("Running"):
                        return
                    time.sleep(0.02)

            with contextlib.suppress(DenError):
                await self._call("agent relay", wait)

    async def _require_agent(self, spec: WorkspaceSpec) -> AgentSession:
        session = await self._agent_or_fallback(spec)
        if session is not None:
            return session
        if not (await self._agent_facts(spec))[0]:
            raise AgentUnavailable(
                f"workspace {spec.workspace_id} was created without Den's agent; background "
                "processes need one (recreate the workspace, or fork it from a snapshot)")
        raise AgentUnavailable(f"the agent of workspace {spec.workspace_id} does not answer; "
                               "try again in a minute, or stop and start the workspace")

    async def spawn(self, spec: WorkspaceSpec, req: ExecRequest, *, log_bytes: int) -> int:
        session = await self._require_agent(spec)
        return await agent_ops.spawn(session, req, self._agent_env(spec, req),
                                     log_bytes=log_bytes)

    async def processes(self, spec: WorkspaceSpec) -> list[ProcessInfo]:
        return await agent_ops.processes(await self._require_agent(spec))

    async def process_logs(self, spec: WorkspaceSpec, pid: int, *, follow: bool
                           ) -> AsyncIterator[StreamChunk]:
        session = await self._require_agent(spec)
        async for chunk in agent_ops.logs(session, pid, follow=follow):
            yield chunk

    async def signal(self, spec: WorkspaceSpec, pid: int, signal: str) -> None:
        await agent_ops.signal(await self._require_agent(spec), pid, signal)

    async def connect(self, spec: WorkspaceSpec, host: str, port: int) -> ExecStream | None:
        """A connection to ``host:port`` inside the workspace made by its agent, or None
        when the workspace has no agent (the caller then relays through exec)."""
        session = await self._agent_or_fallback(spec)
        if session is None:
            return None
        stream = await self.direct.connect(container_of(spec), session,
                                           lambda: self._address(spec), host, port)
        return stream or await agent_ops.AgentExecStream.connect(session, host, port)

    async def _address(self, spec: WorkspaceSpec) -> str | None:
        """The container's address on Den's network, asked of the engine now."""
        return (await self.network()).addresses.get(container_of(spec))


    def _resize(self, exec_id: str, cols: int, rows: int) -> None:
        with contextlib.suppress(docker.errors.APIError):  # the process may have just exited
            self._api().exec_resize(exec_id, height=rows, width=cols)


class DockerExecStream:
    """A process started by ``exec_stream``. Its output goes into a queue: a terminal's read
    on the event loop, framed stdout/stderr by a reader thread. The queue holds at most about
    ``QUEUE_BYTES``: past that the reading stops (the thread waits, the terminal's reader is
    removed) until the consumer takes chunks, so a client that reads slowly slows the
    process (the engine's socket fills) instead of growing Den."""

    QUEUE_BYTES = 1 << 20

    def __init__(self, rt: DockerRuntime, spec: WorkspaceSpec, exec_id: str, sock: Any,
                 pidfile: str, *, tty: bool = False) -> None:
        self._rt = rt
        self._tty = tty
        self._spec = spec
        self._exec_id = exec_id
        self._sock = sock
        self._raw = _raw_socket(sock)
        self._pidfile = pidfile
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[StreamChunk | None] = asyncio.Queue()
        self._queued = 0  # bytes in the queue, under _room's lock
        self._room = threading.Condition()
        self._reading_paused = False  # a terminal's reader removed while the queue is full
        self._closed = False
        self._exited = False
        self._eof = asyncio.Event()
        self._reader: threading.Thread | None = None
        if tty:
            # A terminal's output is unframed: read it on the event loop as it arrives, with
            # no reader thread to hand each keystroke's echo over (interactive latency).
            self._raw.setblocking(False)
            self._loop.add_reader(self._raw.fileno(), self._on_readable)
        else:
            self._reader = threading.Thread(target=self._pump, daemon=True)
            self._reader.start()

    def _on_readable(self) -> None:
        try:
            data = self._raw.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if data:
            if self._closed:
                return  # being killed: drained into nothing (see kill)
            self._queue.put_nowait(StreamChunk("stdout", data))
            with self._room:
                self._queued += len(data)
                full = self._queued > self.QUEUE_BYTES
            if full and not self._reading_paused:
                self._reading_paused = True
                self._loop.remove_reader(self._raw.fileno())
            return
        self._stop_reading()

    def _stop_reading(self) -> None:
        if not self._eof.is_set():
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self._raw.fileno())
            self._eof.set()
            self._rt._note_exec(container_of(self._spec))
            self._queue.put_nowait(None)

    def _pump(self) -> None:
        try:
            for stream, data in _frames(self._raw):
                name = "stdout" if stream == _STDOUT else "stderr"
                with self._room:
                    while self._queued > self.QUEUE_BYTES and not self._closed:
                        self._room.wait()
                    if self._closed:
                        continue  # being killed: drained into nothing (see kill)
                    self._queued += len(data)
                self._loop.call_soon_threadsafe(self._queue.put_nowait, StreamChunk(name, data))
        except OSError:
            pass
        finally:
            self._rt._note_exec(container_of(self._spec))
            self._loop.call_soon_threadsafe(self._queue.put_nowait, None)
            self._loop.call_soon_threadsafe(self._eof.set)  # wait() holds no thread

    async def output(self) -> AsyncIterator[StreamChunk]:
        while True:
            chunk = await self._queue.get()
            if chunk is None:
                return
            with self._room:
                self._queued -= len(chunk.data)
                self._room.notify()
                resume = self._reading_paused and self._queued <= self.QUEUE_BYTES // 2
            if resume and not self._eof.is_set():
                self._reading_paused = False
                self._loop.add_reader(self._raw.fileno(), self._on_readable)
            yield chunk

    async def write(self, data: bytes) -> None:
        if self._tty:  # non-blocking socket, on the loop
            with contextlib.suppress(OSError):
                await self._loop.sock_sendall(self._raw, data)
            return
        await asyncio.to_thread(self._raw.sendall, data)

    async def close_stdin(self) -> None:
        with contextlib.suppress(OSError):
            await asyncio.to_thread(self._raw.shutdown, socket.SHUT_WR)

    async def resize(self, cols: int, rows: int) -> None:
        if self._tty:
            await self._rt._call("resize", self._rt._resize, self._exec_id, cols, rows)

    async def wait(self) -> int:
        await self._eof.wait()  # set by the reader, thread or loop: no pool thread waits
        code = await self._rt._call(
            "exec status", lambda: _exit_code(self._rt._api(), self._exec_id)
        )
        self._exited = True
        return code

    async def signal(self, name: str) -> None:
        if self._closed or self._exited:
            return
        argv = docker_specs.signal_argv(self._pidfile, name)
        with contextlib.suppress(Exception):
            await self._rt._engine_exec(self._spec, ExecRequest(argv=argv, user="root", cwd="/"))

    async def kill(self) -> None:
        if self._closed:
            return
        # Drain what is left into nothing: the engine starts no further exec in a container
        # while one's output is stuck (the kill below would hang).
        with self._room:
            self._closed = True
            self._room.notify()
        if self._reading_paused and not self._eof.is_set():
            self._reading_paused = False
            self._loop.add_reader(self._raw.fileno(), self._on_readable)
        if self._exited:  # nothing left to end (an SSH channel's usual end): close the stream
            with contextlib.suppress(OSError):
                self._sock.close()
            return
        kill = ExecRequest(argv=docker_specs.kill_argv(self._pidfile), user="root", cwd="/")
        with contextlib.suppress(Exception):
            await self._rt.exec(self._spec, kill)
        if self._reader is None:
            self._stop_reading()
        with contextlib.suppress(OSError):
            self._sock.close()


class RelayTransport:
    """The agent's byte streams through an engine exec of ``den-agent relay`` (a hijacked
    stream): we write its stdin; its stdout and stderr come back with the engine's 8-byte
    headers. stderr is the relay's own log, passed to Den's log a line at a time (bounded)."""

    MAX_LOG_LINE = 1000
    MAX_LOG_LINES = 200  # per session; an agent that talks more is not heard

    def __init__(self, sock: Any, *, name: str, exec_id: str = "") -> None:
        self.exec_id = exec_id
        self._sock = sock
        self._raw = _raw_socket(sock)
        self._raw.setblocking(False)
        self._loop = asyncio.get_running_loop()
        self._demux = DockerDemux()
        self._name = name
        self._log = bytearray()
        self._lines = 0

    async def read(self) -> bytes:
        while True:
            data = await self._loop.sock_recv(self._raw, 262144)
            if not data:
                return b""
            out = bytearray()
            for stream, piece in self._demux.feed(data):
                if stream == _STDERR:
                    self._agent_log(piece)
                else:
                    out += piece
            if out:
                return bytes(out)

    def _agent_log(self, piece: bytes) -> None:
        self._log += piece[: self.MAX_LOG_LINE * 4]
        while b"\n" in self._log or len(self._log) > self.MAX_LOG_LINE:
            line, _, rest = bytes(self._log).partition(b"\n")
            self._log = bytearray(rest)
            self._lines += 1
            if self._lines <= self.MAX_LOG_LINES:
                log.info("workspace %s: agent: %s", self._name,
                         line[: self.MAX_LOG_LINE].decode(errors="replace"))

    async def write(self, data: bytes) -> None:
        await self._loop.sock_sendall(self._raw, data)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.close()
        with contextlib.suppress(OSError):
            self._raw.close()


def _link_image(image: Path, target: Path) -> None:
    """Make ``target`` (an engine checkpoint directory) a directory of absolute symlinks to
    the files of the checkpoint ``image``."""
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    for f in image.iterdir():
        (target / f.name).symlink_to(f.resolve())


def engine_event(raw: Any) -> EngineEvent | None:
    """One decoded Docker event as an :class:`EngineEvent`, or None when it is not about a
    workspace's container (or not one Den follows). Untrusted shape: checked, never assumed."""
    if not isinstance(raw, dict) or raw.get("Type") != "container":
        return None
    try:
        kind = EngineEventKind(str(raw.get("Action") or raw.get("status") or ""))
    except ValueError:
        return None
    if kind in (EngineEventKind.RESYNC, EngineEventKind.NOTE):  # not Docker's words
        return None
    actor = raw.get("Actor")
    attributes = actor.get("Attributes") if isinstance(actor, dict) else None
    if not isinstance(attributes, dict):
        return None
    workspace_id = str(attributes.get(LABEL_WORKSPACE) or "")
    if not workspace_id:
        return None
    exit_code = None
    if kind is EngineEventKind.DIE:
        with contextlib.suppress(TypeError, ValueError):
            exit_code = int(str(attributes.get("exitCode")))
    return EngineEvent(kind, workspace_id=workspace_id[:64],
                       container=str(attributes.get("name") or "")[:256], exit_code=exit_code)


def _stats_usage(api: Any, container: str) -> ResourceUsage | None:
    """The container's CPU time and memory from the engine's stats; None when it is not
    running or gone. A container removed while the engine gathers its stats gets an empty or
    cut answer (not JSON): that is "gone" too when the container is no longer there."""
    try:
        stats = api.stats(container, stream=False, one_shot=True)
    except docker.errors.NotFound:
        return None
    except ValueError as exc:  # requests' JSONDecodeError is one
        try:
            api.inspect_container(container)
        except docker.errors.NotFound:
            return None
        raise EngineError(f"stats of container {container}: the engine's answer was not "
                          "JSON", detail=str(exc)) from exc
    if not isinstance(stats, dict):
        return None
    usage = (stats.get("cpu_stats") or {}).get("cpu_usage") or {}
    total = usage.get("total_usage") if isinstance(usage, dict) else None
    if not isinstance(total, int) or total <= 0:
        return None
    return ResourceUsage(total, _stats_memory(stats.get("memory_stats")))


def _stats_memory(memory: Any) -> int | None:
    """Memory in use as `docker stats` shows it: the cgroup's usage less its inactive file
    cache (cgroup v1 calls it total_inactive_file, v2 inactive_file)."""
    if not isinstance(memory, dict) or not isinstance(memory.get("usage"), int):
        return None
    stats = memory.get("stats")
    if not isinstance(stats, dict):
        stats = {}
    inactive = stats.get("total_inactive_file", stats.get("inactive_file", 0))
    inactive = inactive if isinstance(inactive, int) else 0
    return max(0, int(memory["usage"]) - inactive)


def _stats_memory_bytes(api: Any, container: str) -> int | None:
    """The memory a container holds, as ``docker stats`` counts it (usage less inactive
    file cache); None when the engine does not say."""
    stats = api.stats(container, stream=False, one_shot=True)
    mem = stats.get("memory_stats") if isinstance(stats, dict) else None
    usage = mem.get("usage") if isinstance(mem, dict) else None
    if not isinstance(usage, int):
        return None
    detail = mem.get("stats") if isinstance(mem, dict) else None
    inactive = detail.get("total_inactive_file", 0) if isinstance(detail, dict) else 0
    return max(0, usage - inactive) if isinstance(inactive, int) else usage


def _frozen(state: dict[str, Any]) -> bool:
    """Whether a running container is frozen: its cgroup (server/runtime/cgroup_freezer.py),
    or the engine's pause (where the cgroup could not be written, or by an older Den)."""
    return bool(state.get("Paused")) or cgroup_freezer.is_frozen(int(state.get("Pid") or 0))


def _thaw(api: Any, container: str, state: dict[str, Any] | None = None) -> None:
    """Unfreeze a frozen container (:func:`_frozen`); others are left alone. The engine
    cannot stop, remove or checkpoint a frozen gVisor sandbox: a stop waits out its timeout
    and leaves runsc's state behind (the next start: "id already in use"), a forced remove
    fails ("zombie")."""
    state = state if state is not None else api.inspect_container(container)["State"]
    pid = int(state.get("Pid") or 0)
    if cgroup_freezer.is_frozen(pid):
        cgroup_freezer.set_frozen(pid, False)  # first: a paused runsc must answer the unpause
    if state.get("Paused"):
        with contextlib.suppress(docker.errors.APIError):  # thawed meanwhile: "not paused"
            api.unpause(container)


def _remove_volume(api: Any, volume: str) -> None:
    """Remove a volume; a missing one is success."""
    for attempt in range(10):
        try:
            api.remove_volume(volume, force=True)
            return
        except docker.errors.NotFound:
            return
        except docker.errors.APIError as exc:
            # The engine can briefly report the volume in use after a forced remove.
            if exc.status_code != 409 or attempt == 9:
                raise
            time.sleep(0.2)


def _wait_exited(api: Any, container: str, wait_s: float) -> bool:
    """Whether ``container`` is not running (gone counts), waiting at most ``wait_s``."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            running = api.inspect_container(container)["State"].get("Running")
        except docker.errors.NotFound:
            return True
        if not running:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def processes_naming(arg: str) -> list[int]:
    """The host processes with ``arg`` as one of their arguments (a checkpoint's writers:
    runsc and the shell that marks it complete both name its image directory)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if arg.encode() in argv:
            found.append(int(proc.name))
    return found


# --- the Docker attach protocol: 8-byte frame headers (stream, 0, 0, 0, size) --------------


def _raw_socket(sock: Any) -> socket.socket:
    return sock._sock if hasattr(sock, "_sock") else sock  # type: ignore[no-any-return]


def _feed(raw: socket.socket, data: bytes) -> None:
    with contextlib.suppress(OSError):
        raw.sendall(data)
        raw.shutdown(socket.SHUT_WR)


def _read_exact(raw: socket.socket, n: int, deadline: float | None = None) -> bytes | None:
    """``n`` bytes, or None at the end of the stream; TimeoutError past ``deadline``."""
    buf = bytearray()
    while len(buf) < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("exec deadline")
            raw.settimeout(left)
        chunk = raw.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def _frames(raw: socket.socket, deadline: float | None = None) -> Any:
    """Yield (stream, data) frames until the engine closes the stream."""
    while True:
        header = _read_exact(raw, 8, deadline)
        if header is None:
            return
        stream, size = header[0], struct.unpack(">I", header[4:])[0]
        if size == 0:
            continue
        data = _read_exact(raw, size, deadline)
        if data is None:
            return
        yield stream, data


def _collect(raw: socket.socket, out: Captured, err: Captured, deadline: float | None
             ) -> bool:
    """Read stdout into ``out`` and stderr into ``err`` (each cut at its limit); True when
    ``deadline`` (a monotonic time) passed before the stream ended."""
    try:
        for stream, data in _frames(raw, deadline):
            (out if stream == _STDOUT else err).add(data)
    except TimeoutError:
        return True
    return False


def _drain(raw: socket.socket, deadline: float) -> bool:
    """Read and drop what is left of a stream; False when it has not ended by ``deadline``."""
    try:
        while True:
            raw.settimeout(max(0.001, deadline - time.monotonic()))
            if not raw.recv(65536):
                return True
    except TimeoutError:
        return False
    except OSError:
        return True


def _exit_code(api: Any, exec_id: str) -> int:
    for _ in range(50):
        info = api.exec_inspect(exec_id)
        if not info.get("Running") and info.get("ExitCode") is not None:
            return int(info["ExitCode"])
        time.sleep(0.02)
    return int(api.exec_inspect(exec_id).get("ExitCode") or -1)
