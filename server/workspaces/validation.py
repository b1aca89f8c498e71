"""Checks of what a create (or a fork) asks for, against the operator's settings: the
runtime, the image, the resources and the idle timers. Each refusal is a ValidationFailed
(422) whose message says what to change. No state is written here."""

from __future__ import annotations

from server.config import Settings
from server.errors import ValidationFailed
from server.gpus.allocation import GpuPool
from server.runtime.base import ResourceFit, Runtime
from server.workspaces import image_policy

RUNTIMES = ("gvisor", "runc", "microvm")
MAX_TIMER_S = 365 * 86400


def runtime_name(settings: Settings, runtime: str | None) -> str:
    """The sandbox a workspace runs under (default gVisor), if this server allows it."""
    if runtime is not None and runtime not in RUNTIMES:
        raise ValidationFailed(f"unknown runtime {runtime!r}; use one of {', '.join(RUNTIMES)}")
    if settings.backend == "microvm":  # every workspace of this server is a microVM
        if runtime not in (None, "microvm"):
            raise ValidationFailed(f"runtime {runtime!r} is not available on this server: it "
                                   "runs microVMs (DEN_BACKEND=microvm); use runtime 'microvm' "
                                   "or leave it out")
        return "microvm"
    runtime = runtime or "gvisor"
    if runtime == "microvm":
        raise ValidationFailed(f"runtime 'microvm' needs a server started with "
                               f"DEN_BACKEND=microvm (docs/microvm.md); this one runs "
                               f"{settings.backend}")
    if runtime == "runc" and not settings.allow_insecure_runc:
        raise ValidationFailed(
            "runtime 'runc' is disabled: it runs workspaces without the gVisor sandbox "
            "(the operator can allow it with DEN_ALLOW_INSECURE_RUNC=true)"
        )
    return runtime


async def image(settings: Settings, runtime: Runtime, name: str | None) -> str:
    """The image (default: the operator's), allowed by policy and present on the engine."""
    name = name or settings.default_image
    image_policy.check(settings, name)
    if not await runtime.image_exists(name):
        raise ValidationFailed(
            f"image {name!r} is not built on this server (run `make images`)",
            code="image_missing",
        )
    return name


def resources(settings: Settings, gpus: GpuPool, *, cpus: float | None, memory_mb: int | None,
              disk_gb: int | None, gpu_count: int, gpu_model: str | None
              ) -> tuple[float, int, int]:
    """CPUs, memory and disk (defaults filled in) within the operator's maxima; GPUs that
    this host can give."""
    st = settings
    cpus = st.default_cpus if cpus is None else cpus
    memory_mb = st.default_memory_mb if memory_mb is None else memory_mb
    disk_gb = st.default_disk_gb if disk_gb is None else disk_gb
    if not 0.1 <= cpus <= st.max_cpus:
        raise ValidationFailed(f"resources.cpus must be between 0.1 and {st.max_cpus:g}")
    if not 128 <= memory_mb <= st.max_memory_mb:
        raise ValidationFailed(
            f"resources.memory_mb must be between 128 and {st.max_memory_mb}"
        )
    if not 1 <= disk_gb <= st.max_disk_gb:
        raise ValidationFailed(f"resources.disk_gb must be between 1 and {st.max_disk_gb}")
    gpus.validate(gpu_count, gpu_model, max_gpus=st.max_gpus)
    return cpus, memory_mb, disk_gb


def fits(runtime: Runtime, *, cpus: float, memory_mb: int) -> None:
    """The backend can usefully run this size here (server/runtime/base.py's ResourceFit)."""
    if isinstance(runtime, ResourceFit) and (why := runtime.unfit(cpus=cpus,
                                                                   memory_mb=memory_mb)):
        raise ValidationFailed(why, code="resources_unfit")


def timers(**values: int | None) -> None:
    """``idle_timeout_s`` and ``stop_after_s``: 0 (never) to a year."""
    for name, value in values.items():
        if value is not None and not 0 <= value <= MAX_TIMER_S:
            raise ValidationFailed(f"{name} must be between 0 (never) and a year")
