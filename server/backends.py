"""The workspace backends Den can run on, chosen by configuration (``DEN_BACKEND``).

A backend is a factory that, from the settings, makes a :class:`Backend`: the runtime that
runs workspaces (server/runtime/base.py), the guard that enforces network policies on its
network (or None), and the builder of devcontainer images (or None when the backend cannot
build images). ``create_app`` asks :func:`load` for one; nothing else names a backend.
A new backend registers itself in :data:`BACKENDS`.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from server.config import Settings
from server.devcontainer.build import ImageMaker
from server.devcontainer.setup import DevContainers
from server.errors import ValidationFailed
from server.gpus.allocation import GpuPool
from server.gpus.container import gpu_sandbox
from server.network.firewall import bridge_name
from server.network.guard import NetworkGuard, resolv_conf, upstream_resolvers
from server.runtime.base import Runtime
from server.workspaces import image_policy

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Backend:
    runtime: Runtime
    network: NetworkGuard | None = None  # None: no network policy enforced
    devcontainers: DevContainers | None = None  # None: devcontainer.json refused


def docker(settings: Settings, *, gpus: GpuPool | None = None) -> Backend:
    """The Docker engine with gVisor (runsc), Den's own bridge network and its firewall
    when isolation is on, and devcontainer images built by the engine."""
    from server.agent.install import install_agent
    from server.runtime.disk_quota import Disks
    from server.runtime.docker import DockerRuntime

    network: dict[str, Any] = {}
    if settings.network_isolation:
        name = settings.resolved_network_name()
        if not upstream_resolvers(settings):
            log.warning("no name server for workspaces' DNS forwarder (the host's "
                        "/etc/resolv.conf names none): set DEN_NETWORK_DNS")
        # Names Den's DNS forwarder, on the bridge's gateway, once the bridge exists (guard).
        network = {"network": name, "network_interface": bridge_name(name),
                   "network_subnet": settings.network_subnet,
                   "resolv_conf": resolv_conf(settings)}
    rt = DockerRuntime(base_url=settings.docker_url, gvisor_runtime=settings.gvisor_runtime,
                       threads=settings.engine_threads, helper_image=settings.default_image,
                       runsc=settings.runsc_path, runsc_root=settings.runsc_root,
                       agent_dir=install_agent(settings),
                       disks=Disks(settings.data_dir / "disks") if settings.enforce_disk_gb
                       else None,
                       gpu=gpu_sandbox(settings) if gpus is not None and gpus.gpus else None,
                       containerd_tmp_dir=settings.containerd_tmp_dir,
                       prefix=settings.engine_prefix,
                       **network)
    guard = (NetworkGuard(runtime=rt, settings=settings, resolver_addresses=[], forwarder=True)
             if settings.network_isolation else None)
    return Backend(runtime=rt, network=guard, devcontainers=docker_devcontainers(settings))


def docker_devcontainers(settings: Settings) -> DevContainers:
    """Workspaces from devcontainer.json, with images built on the Docker engine."""
    from server.runtime.docker_build import DockerImageBuilder

    maker = ImageMaker(DockerImageBuilder(base_url=settings.docker_url,
                                          gvisor_runtime=settings.gvisor_runtime),
                       prefix=settings.engine_prefix, helper_image=settings.default_image,
                       check_image=functools.partial(image_policy.check, settings),
                       timeout_s=settings.devcontainer_build_timeout_s,
                       context_max_mb=settings.devcontainer_context_max_mb,
                       builds=settings.devcontainer_builds)
    return DevContainers(maker, command_timeout_s=settings.devcontainer_command_timeout_s)


def microvm(settings: Settings, *, gpus: GpuPool | None = None) -> Backend:
    """QEMU microVMs (docs/microvm.md): with isolation on, a bridge of Den's own for their
    NICs and the same network guard (firewall and DNS forwarder) as the Docker backend's;
    devcontainer images built on the Docker engine, as the docker backend's, then converted
    into a root filesystem (server/runtime/microvm/images.py)."""
    from server.runtime.microvm import vmusers
    from server.runtime.microvm.backend import MicroVmRuntime
    from server.runtime.microvm.net import VmNetwork

    vm_network = (VmNetwork.named(settings.resolved_network_name(), settings.microvm_subnet)
                  if settings.network_isolation else None)
    root = settings.microvm_dir or settings.data_dir / "microvm"
    rt = MicroVmRuntime(boot_dir=root, vms_dir=root / "vms", image=settings.default_image,
                        prefix=settings.engine_prefix, qemu=settings.microvm_qemu,
                        accel=settings.microvm_accel,
                        boot_timeout_s=settings.microvm_boot_timeout_s,
                        console_log=settings.microvm_console_log,
                        user=settings.microvm_user, engine_url=settings.docker_url,
                        image_max_mb=settings.microvm_image_max_mb,
                        uids=vmusers.UidRange(settings.microvm_uid_base,
                                              settings.microvm_uid_count)
                        if settings.microvm_uid_base else None,
                        network=vm_network)
    guard = (NetworkGuard(runtime=rt, settings=settings, resolver_addresses=[], forwarder=True)
             if vm_network is not None else None)
    return Backend(runtime=rt, network=guard, devcontainers=docker_devcontainers(settings))


BACKENDS: dict[str, Callable[..., Backend]] = {"docker": docker, "microvm": microvm}


def load(settings: Settings, *, gpus: GpuPool | None = None) -> Backend:
    """The backend the settings name."""
    factory = BACKENDS.get(settings.backend)
    if factory is None:
        raise ValidationFailed(f"unknown backend {settings.backend!r} (DEN_BACKEND); "
                               f"this server has {', '.join(sorted(BACKENDS))}")
    return factory(settings, gpus=gpus)
