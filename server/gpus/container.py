"""The container configuration of a GPU allocation, as plain data (tested by equality).

What nvidia-container-toolkit does for a GPU container, done by Den from its inventory
(the toolkit is not in Debian): the device nodes of exactly the allocated GPUs, the driver's
control nodes, and the host's driver libraries and tools bind-mounted read-only, found the
way ``nvidia-container-cli`` finds them (``ldconfig -p`` and the PATH).

- gVisor: the ``runsc-gpu`` runtime (runsc with ``--nvproxy``, registered by
  scripts/setup-host.sh only on a host with GPUs). nvproxy serves the device nodes that the
  container's spec lists, so the sandbox sees the allocated GPUs and no other.
- runc: the same nodes and mounts, or, where the NVIDIA toolkit is installed
  (``DEN_GPU_DEVICE_REQUESTS``), a Docker device request for the allocated UUIDs.

None of this has run on a GPU host yet (docs/gpus.md): scripts/gpu-check.sh is the check.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from server.config import Settings
from server.gpus.inventory import Gpu

CONTROL_DEVICES = ("/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools")
# nvidia-container-cli's "utility" and "compute" libraries (libnvidia-container, src/nvc_info.c).
DRIVER_LIBRARIES = (
    "libnvidia-ml", "libnvidia-cfg", "libcuda", "libcudadebugger", "libnvidia-opencl",
    "libnvidia-ptxjitcompiler", "libnvidia-fatbinaryloader", "libnvidia-allocator",
    "libnvidia-compiler", "libnvidia-nvvm", "libnvidia-gpucomp",
)
DRIVER_BINARIES = ("nvidia-smi", "nvidia-debugdump")
LIB_DIR = "/usr/lib/x86_64-linux-gnu"  # where Debian's loader looks (the workspace images)
BIN_DIR = "/usr/bin"
CAPABILITIES = "compute,utility"


@dataclass(frozen=True)
class DriverFiles:
    """Host paths of the driver's libraries (by soname) and tools."""

    libraries: tuple[str, ...] = ()
    binaries: tuple[str, ...] = ()


@dataclass(frozen=True)
class GpuSandbox:
    """How this host gives a container GPUs (settings and what was found at start)."""

    gvisor_runtime: str = "runsc-gpu"
    device_requests: bool = False  # runc through the NVIDIA toolkit's Docker device requests
    driver: DriverFiles = field(default_factory=DriverFiles)


_LDCONFIG_LINE = re.compile(r"^\s*(\S+)\s+\(([^)]*)\)\s+=>\s+(\S+)\s*$")


def parse_ldconfig(text: str, *, names: Sequence[str] = DRIVER_LIBRARIES,
                   arch: str = "x86-64") -> list[str]:
    """The paths ``ldconfig -p`` gives for the driver's libraries, by versioned soname
    (``libcuda.so.1``, not the development link ``libcuda.so``), of ``arch`` only."""
    out: list[str] = []
    for line in text.splitlines():
        m = _LDCONFIG_LINE.match(line)
        if m is None or arch not in m.group(2).split(","):
            continue
        soname, path = m.group(1), m.group(3)
        base, _, version = soname.partition(".so.")
        if base in names and version and path not in out:
            out.append(path)
    return out


def find_driver_files(*, run: Callable[[list[str]], str] | None = None,
                      which: Callable[[str], str | None] = shutil.which) -> DriverFiles:
    """The host's driver files (I/O: runs ``ldconfig -p``)."""
    def _run(argv: list[str]) -> str:
        return subprocess.run(argv, capture_output=True, text=True, timeout=20,
                              check=False).stdout

    try:
        text = (run or _run)(["ldconfig", "-p"])
    except (OSError, subprocess.SubprocessError):
        text = ""
    binaries = tuple(p for p in (which(b) for b in DRIVER_BINARIES) if p)
    return DriverFiles(libraries=tuple(parse_ldconfig(text)), binaries=binaries)


def gpu_sandbox(settings: Settings) -> GpuSandbox:
    """This host's way of giving containers GPUs (I/O: finds the driver's files)."""
    return GpuSandbox(gvisor_runtime=settings.gpu_runtime,
                      device_requests=settings.gpu_device_requests,
                      driver=find_driver_files())


def device_nodes(gpus: Sequence[Gpu]) -> list[str]:
    """The nodes a container with ``gpus`` gets: each GPU's, then the driver's controls."""
    return [g.device for g in gpus] + list(CONTROL_DEVICES)


def driver_binds(driver: DriverFiles) -> dict[str, dict[str, str]]:
    """Read-only mounts of the driver's files at the paths the image's loader searches."""
    binds = {p: {"bind": f"{LIB_DIR}/{PurePosixPath(p).name}", "mode": "ro"}
             for p in driver.libraries}
    binds.update({p: {"bind": f"{BIN_DIR}/{PurePosixPath(p).name}", "mode": "ro"}
                  for p in driver.binaries})
    return binds


def gpu_config(gpus: Sequence[Gpu], *, runtime: str, sandbox: GpuSandbox
               ) -> tuple[dict[str, Any], dict[str, str]]:
    """What a container with ``gpus`` adds to its host config, and to its environment.
    ``runtime`` is the workspace's ("gvisor" or "runc"). Nothing for no GPU."""
    if not gpus:
        return {}, {}
    uuids = [g.uuid for g in gpus]
    env = {"NVIDIA_VISIBLE_DEVICES": ",".join(uuids),
           "NVIDIA_DRIVER_CAPABILITIES": CAPABILITIES}
    if runtime == "runc" and sandbox.device_requests:
        return {"device_requests": [{"driver": "nvidia", "device_ids": uuids,
                                     "capabilities": [["gpu", "compute", "utility"]]}]}, env
    host: dict[str, Any] = {
        "devices": [f"{d}:{d}:rwm" for d in device_nodes(gpus)],
        "binds": driver_binds(sandbox.driver),
    }
    if runtime == "gvisor":
        host["runtime"] = sandbox.gvisor_runtime
    return host, env


def merge(host_config: dict[str, Any], environment: dict[str, str],
          gpu_host: dict[str, Any], gpu_env: dict[str, str]) -> None:
    """Add a GPU configuration to a container's (binds are merged, not replaced)."""
    for key, value in gpu_host.items():
        if key == "binds":
            host_config["binds"] = {**host_config.get("binds", {}), **value}
        else:
            host_config[key] = value
    environment.update(gpu_env)
