"""What a microVM host can usefully run (TCG: no more vCPUs than host cores, a clear 422 at
create) and the event saying how each VM runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.errors import ValidationFailed
from server.runtime.base import ResourceFit
from server.runtime.fake import FakeRuntime
from server.runtime.microvm.backend import MicroVmRuntime, accel_note, host_cores
from server.workspaces import validation


def _runtime(accel: str) -> MicroVmRuntime:
    return MicroVmRuntime(boot_dir=Path("/nonexistent"), vms_dir=Path("/nonexistent/vms"),
                          image="den/workspace:latest", accel=accel)


def test_tcg_refuses_more_vcpus_than_the_host_has_cores() -> None:
    rt = _runtime("tcg")
    assert isinstance(rt, ResourceFit)
    cores = host_cores()
    assert rt.unfit(cpus=cores, memory_mb=512) is None
    assert rt.unfit(cpus=cores - 0.5, memory_mb=512) is None  # rounds up to `cores` vCPUs
    why = rt.unfit(cpus=cores + 0.5, memory_mb=512)
    assert why is not None and "TCG" in why and f"at most {cores} vCPUs" in why
    with pytest.raises(ValidationFailed, match="more than this host can emulate") as info:
        validation.fits(rt, cpus=cores + 1, memory_mb=512)
    assert info.value.code == "resources_unfit" and info.value.status_code == 422


def test_kvm_and_other_backends_take_any_size_the_operator_allows() -> None:
    assert _runtime("kvm").unfit(cpus=host_cores() + 8, memory_mb=512) is None
    validation.fits(FakeRuntime(), cpus=1000, memory_mb=512)  # no ResourceFit: not asked


def test_the_event_names_the_accelerator() -> None:
    assert "KVM" in accel_note("kvm")
    assert "TCG" in accel_note("tcg") and "software emulation" in accel_note("tcg")
