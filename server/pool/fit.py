"""Which create a pooled sandbox can serve, and what the budget allows: pure functions.

What a claim can change in a made sandbox was measured on the engine (Docker 20.10, runsc
20240729): the host name, through a privileged exec (~0.1 s); nothing else. ``docker update``
of CPU or memory fails under runsc ("runsc did not terminate successfully": runsc has no
``update``); the environment, the labels, the mounts and the disk image (server/runtime/
disk_quota.py, one per volume, sized at creation) are fixed when the container is made. So a
request fits only a sandbox made with exactly its image, runtime and resources.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

MIB = 1024 * 1024
# What a sandbox is assumed to hold before the first one is measured (an idle Den workspace
# holds ~62 MB of host memory: /work/shared/RUNTIME.md).
FIRST_ESTIMATE_BYTES = 64 * MIB


@dataclass(frozen=True)
class PoolKey:
    """The shape of a sandbox: what cannot change after it is made."""

    image: str
    runtime: str
    cpus: float
    memory_mb: int
    disk_gb: int
    pids_limit: int


def request_key(*, image: str, runtime: str, cpus: float, memory_mb: int, disk_gb: int,
                pids_limit: int, gpus: int, env: Mapping[str, str]) -> PoolKey | None:
    """The key of a validated create request; None when no pooled sandbox can serve it (a
    GPU is given at creation, and the environment is baked into the container)."""
    if gpus or env or runtime != "gvisor":
        return None
    return PoolKey(image=image, runtime=runtime, cpus=cpus, memory_mb=memory_mb,
                   disk_gb=disk_gb, pids_limit=pids_limit)


def estimate_bytes(measured: Iterable[int]) -> int:
    """What the next sandbox will hold: the most any measured one held (or a first guess)."""
    return max(measured, default=FIRST_ESTIMATE_BYTES)


def room_for_one(*, held_bytes: int, estimate: int, budget_bytes: int) -> bool:
    """Whether one more sandbox fits the budget (0: no budget)."""
    return budget_bytes <= 0 or held_bytes + estimate <= budget_bytes


def over_budget(*, held_bytes: int, budget_bytes: int) -> bool:
    return budget_bytes > 0 and held_bytes > budget_bytes


def short_of_memory(*, available_bytes: int | None, floor_bytes: int) -> bool:
    """The host's available memory is below the floor (the sleep tier's, DEN_HOST_MIN_
    AVAILABLE_MB): the pool gives back a sandbox and makes none."""
    return floor_bytes > 0 and available_bytes is not None and available_bytes < floor_bytes
