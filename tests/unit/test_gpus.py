"""GPU inventory parsing (real nvidia-smi reports), DEN_GPUS, the driver files, the container
configuration of an allocation (compared for equality) and the pure allocation rules."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from server.gpus import container as gc
from server.gpus.allocation import change, idle_action, pick
from server.gpus.inventory import (
    Gpu,
    InventoryError,
    discover,
    from_nvml,
    inventory_from_setting,
    nvml_utilization,
    parse_described,
    parse_nvidia_smi_utilization,
    parse_nvidia_smi_xml,
)
from server.runtime import docker_specs
from server.runtime.base import WorkspaceSpec
from server.workspaces.states import State

FIXTURES = Path(__file__).parent / "fixtures" / "gpus"  # origin: fixtures/gpus/ORIGIN.md

P100 = Gpu(index=0, uuid="GPU-d3da8716-eaab-75db-efc1-60e88e1cd55e",
           model="Tesla P100-PCIE-16GB", memory_mb=16384, minor=0)
A100 = Gpu(index=0, uuid="GPU-27b94a00-ed54-5c24-b1fd-1054085de32a",
           model="NVIDIA A100-SXM4-40GB", memory_mb=40960, minor=0)
RTX4090 = Gpu(index=0, uuid="GPU-71d1acc2-662d-2166-bf9f-65272d2fc437",
              model="NVIDIA GeForce RTX 4090", memory_mb=24564, minor=0)


@pytest.mark.parametrize(("name", "gpu"), [("tesla-p100", P100), ("a100-sxm4-mig", A100),
                                           ("rtx-4090-driver-535", RTX4090)])
def test_real_nvidia_smi_reports_parse(name: str, gpu: Gpu) -> None:
    text = (FIXTURES / f"{name}.xml").read_text()
    assert parse_nvidia_smi_xml(text) == [gpu]
    assert gpu.device == "/dev/nvidia0"
    # The MIG devices' own <fb_memory_usage> is not taken for the GPU's.
    assert parse_nvidia_smi_utilization(text) == {gpu.uuid: 0}


def test_two_gpus_keep_the_driver_order_and_their_minor_numbers() -> None:
    gpu = (FIXTURES / "tesla-p100.xml").read_text().split("<gpu id=")[1].split("</gpu>")[0]
    second = gpu.replace("d3da8716", "00000000").replace("<minor_number>0<",
                                                         "<minor_number>3<")
    text = ('<nvidia_smi_log><gpu id=' + gpu + '</gpu><gpu id=' + second +
            '</gpu></nvidia_smi_log>')
    got = parse_nvidia_smi_xml(text)
    assert [(g.index, g.uuid[:12], g.device) for g in got] == [
        (0, "GPU-d3da8716", "/dev/nvidia0"), (1, "GPU-00000000", "/dev/nvidia3")]


@pytest.mark.parametrize(("text", "words"), [
    ("<nvidia_smi_log", "not readable"),
    ("<other/>", "not an nvidia-smi report"),
    ("<nvidia_smi_log><gpu><minor_number>0</minor_number></gpu></nvidia_smi_log>", "no UUID"),
    ("<nvidia_smi_log><gpu><uuid>GPU-x</uuid><minor_number>N/A</minor_number></gpu>"
     "</nvidia_smi_log>", "no device minor number"),
])
def test_unreadable_reports_say_why(text: str, words: str) -> None:
    with pytest.raises(InventoryError, match=words):
        parse_nvidia_smi_xml(text)


class StandInNvml:
    """A stand-in for nvidia-ml-py's pynvml answering with the P100 report's values."""

    def __init__(self, gpus: list[Gpu], util: int = 0) -> None:
        self.gpus, self.util = gpus, util
        self.calls: list[str] = []

    def nvmlInit(self) -> None:
        self.calls.append("init")

    def nvmlShutdown(self) -> None:
        self.calls.append("shutdown")

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> Gpu:
        return self.gpus[i]

    def nvmlDeviceGetHandleByUUID(self, uuid: bytes) -> Gpu:
        return next(g for g in self.gpus if g.uuid == uuid.decode())

    def nvmlDeviceGetUUID(self, h: Gpu) -> str:
        return h.uuid

    def nvmlDeviceGetName(self, h: Gpu) -> bytes:
        return h.model.encode()  # older nvidia-ml-py releases answer bytes

    def nvmlDeviceGetMemoryInfo(self, h: Gpu) -> Any:
        return SimpleNamespace(total=h.memory_mb * 1024 * 1024)

    def nvmlDeviceGetMinorNumber(self, h: Gpu) -> int:
        return h.minor

    def nvmlDeviceGetUtilizationRates(self, h: Gpu) -> Any:
        return SimpleNamespace(gpu=self.util, memory=0)


def test_nvml_gives_the_same_gpus_and_always_shuts_down() -> None:
    nvml = StandInNvml([P100], util=87)
    assert from_nvml(nvml) == [P100]
    assert nvml_utilization(nvml, [P100.uuid]) == {P100.uuid: 87}
    assert nvml.calls == ["init", "shutdown", "init", "shutdown"]


def test_discover_prefers_nvml_then_nvidia_smi_then_none() -> None:
    report = (FIXTURES / "tesla-p100.xml").read_text()

    class Broken(StandInNvml):
        def nvmlInit(self) -> None:
            raise RuntimeError("NVML Shared Library Not Found")

    assert discover(nvml=lambda: StandInNvml([A100]), nvidia_smi=lambda: report) == [A100]
    assert discover(nvml=lambda: Broken([]), nvidia_smi=lambda: report) == [P100]
    assert discover(nvml=lambda: None, nvidia_smi=lambda: None) == []


def test_den_gpus_setting() -> None:
    two = [P100, Gpu(index=1, uuid="GPU-b", model="m", memory_mb=1, minor=1)]
    assert inventory_from_setting("none", discover=lambda: two) == ([], False)
    assert inventory_from_setting("auto", discover=lambda: two) == (two, True)
    assert inventory_from_setting(" GPU-b ", discover=lambda: two) == ([two[1]], True)
    with pytest.raises(InventoryError, match="does not have: GPU-c"):
        inventory_from_setting("GPU-b,GPU-c", discover=lambda: two)
    described = json.dumps([{"uuid": "GPU-x", "model": "A100", "memory_mb": 40960,
                             "minor": 2}])
    assert inventory_from_setting(described, discover=lambda: pytest.fail("asked")) == (
        [Gpu(index=0, uuid="GPU-x", model="A100", memory_mb=40960, minor=2)], False)


@pytest.mark.parametrize(("value", "words"), [
    ("[", "not valid JSON"), ('{"uuid": "GPU-x"}', "JSON array"),
    ('[{"model": "x"}]', "uuid"), ('[{"uuid": "GPU-x", "minor": "two"}]', "entry 0"),
    ('[{"uuid": "GPU-x"}, {"uuid": "GPU-x"}]', "twice"),
])
def test_bad_described_inventories_say_why(value: str, words: str) -> None:
    with pytest.raises(InventoryError, match=words):
        parse_described(value)


LDCONFIG = """\
1234 libs found in cache `/etc/ld.so.cache'
\tlibz.so.1 (libc6,x86-64) => /lib/x86_64-linux-gnu/libz.so.1
\tlibnvidia-ml.so.1 (libc6,x86-64) => /lib/x86_64-linux-gnu/libnvidia-ml.so.1
\tlibnvidia-ml.so.1 (libc6) => /lib/i386-linux-gnu/libnvidia-ml.so.1
\tlibnvidia-ml.so (libc6,x86-64) => /lib/x86_64-linux-gnu/libnvidia-ml.so
\tlibcuda.so.1 (libc6,x86-64) => /usr/lib/x86_64-linux-gnu/libcuda.so.1
\tlibnvidia-ptxjitcompiler.so.1 (libc6,x86-64) => /usr/lib/nvidia/libnvidia-ptxjitcompiler.so.1
\tlibnvidia-nvvm.so.4 (libc6,x86-64) => /usr/lib/x86_64-linux-gnu/libnvidia-nvvm.so.4
\tlibnvidia-egl-wayland.so.1 (libc6,x86-64) => /usr/lib/libnvidia-egl-wayland.so.1
"""


def test_driver_libraries_are_found_by_versioned_soname_of_the_host_arch() -> None:
    assert gc.parse_ldconfig(LDCONFIG) == [
        "/lib/x86_64-linux-gnu/libnvidia-ml.so.1",
        "/usr/lib/x86_64-linux-gnu/libcuda.so.1",
        "/usr/lib/nvidia/libnvidia-ptxjitcompiler.so.1",
        "/usr/lib/x86_64-linux-gnu/libnvidia-nvvm.so.4",
    ]
    found = gc.find_driver_files(run=lambda argv: LDCONFIG,
                                 which=lambda b: "/usr/bin/nvidia-smi"
                                 if b == "nvidia-smi" else None)
    assert found.binaries == ("/usr/bin/nvidia-smi",) and len(found.libraries) == 4


DRIVER = gc.DriverFiles(libraries=("/lib/x86_64-linux-gnu/libcuda.so.1",
                                   "/opt/nvidia/libnvidia-ml.so.1"),
                        binaries=("/usr/local/bin/nvidia-smi",))
G1 = Gpu(index=1, uuid="GPU-1", model="A100", memory_mb=40960, minor=1)


def spec(runtime: str = "gvisor", gpus: tuple[Gpu, ...] = (G1,)) -> WorkspaceSpec:
    return WorkspaceSpec(workspace_id="w1", handle={"container": "den-w1", "volume": "den-w1-v"},
                         image="den/workspace:latest", runtime=runtime, cpus=1, memory_mb=1024,
                         pids_limit=512, hostname="api", labels={}, gpus=gpus)


def test_gvisor_container_gets_nvproxy_exactly_its_gpu_nodes_and_the_driver_read_only() -> None:
    cfg = docker_specs.container_config(spec(), gvisor_runtime="runsc",
                                        gpu=gc.GpuSandbox(driver=DRIVER))
    plain = docker_specs.container_config(spec(gpus=()), gvisor_runtime="runsc")
    host = cfg["host_config"]
    assert host["runtime"] == "runsc-gpu" and plain["host_config"]["runtime"] == "runsc"
    assert host["devices"] == ["/dev/nvidia1:/dev/nvidia1:rwm",
                               "/dev/nvidiactl:/dev/nvidiactl:rwm",
                               "/dev/nvidia-uvm:/dev/nvidia-uvm:rwm",
                               "/dev/nvidia-uvm-tools:/dev/nvidia-uvm-tools:rwm"]
    assert host["binds"] == {
        "den-w1-v": {"bind": "/workspace", "mode": "rw"},
        "/lib/x86_64-linux-gnu/libcuda.so.1": {"bind": "/usr/lib/x86_64-linux-gnu/libcuda.so.1",
                                               "mode": "ro"},
        "/opt/nvidia/libnvidia-ml.so.1": {"bind": "/usr/lib/x86_64-linux-gnu/libnvidia-ml.so.1",
                                          "mode": "ro"},
        "/usr/local/bin/nvidia-smi": {"bind": "/usr/bin/nvidia-smi", "mode": "ro"},
    }
    assert cfg["environment"]["NVIDIA_VISIBLE_DEVICES"] == "GPU-1"
    # Nothing else changes: no privilege, capabilities or security options for a GPU.
    for key in ("privileged", "cap_add", "cap_drop", "security_opt", "mem_limit"):
        assert host[key] == plain["host_config"][key], key
    assert "devices" not in plain["host_config"]


def test_runc_gets_the_same_nodes_or_a_device_request_with_the_toolkit() -> None:
    host, env = gc.gpu_config([G1], runtime="runc", sandbox=gc.GpuSandbox(driver=DRIVER))
    assert "runtime" not in host and len(host["devices"]) == 4 and len(host["binds"]) == 3
    host, env = gc.gpu_config([G1], runtime="runc",
                              sandbox=gc.GpuSandbox(device_requests=True, driver=DRIVER))
    assert host == {"device_requests": [{"driver": "nvidia", "device_ids": ["GPU-1"],
                                         "capabilities": [["gpu", "compute", "utility"]]}]}
    assert env == {"NVIDIA_VISIBLE_DEVICES": "GPU-1",
                   "NVIDIA_DRIVER_CAPABILITIES": "compute,utility"}
    assert gc.gpu_config([], runtime="gvisor", sandbox=gc.GpuSandbox()) == ({}, {})


def test_allocation_rules() -> None:
    assert change(None, State.CREATING) == "take"
    assert change(State.STOPPED, State.STARTING) == "take"
    assert change(State.ERROR, State.STARTING) == "take"
    assert change(State.PAUSED, State.RESUMING) == "take"
    assert change(State.STOPPED, State.RUNNING) == "take"  # reconcile found it running
    for dst in (State.STOPPED, State.PAUSED, State.ERROR, State.DELETING):
        assert change(State.RUNNING, dst) == "release"
    assert change(State.PAUSED, State.STOPPING) is None  # a paused one holds none
    assert change(State.RUNNING, State.PAUSING) is None
    assert change(State.STARTING, State.RUNNING) is None
    gpus = [Gpu(index=i, uuid=f"GPU-{i}", model=m, memory_mb=1, minor=i)
            for i, m in enumerate(["NVIDIA A100-SXM4-40GB", "NVIDIA L4", "NVIDIA A100-PCIE"])]
    assert pick(gpus, set(), count=1, model="a100") == [gpus[0]]
    assert pick(gpus, {"GPU-0"}, count=1, model="A100") == [gpus[2]]
    assert pick(gpus, {"GPU-0"}, count=2, model="A100") is None
    assert pick(gpus, set(), count=3, model=None) == gpus
    assert idle_action(1, checkpoint=False) == "stop"
    assert idle_action(1, checkpoint=True) == idle_action(0, checkpoint=False) == "pause"


@pytest.mark.parametrize(("runtime", "requests"), [("gvisor", False), ("runc", False),
                                                   ("runc", True)])
def test_docker_py_takes_the_gpu_host_config(runtime: str, requests: bool) -> None:
    import docker.types

    cfg = docker_specs.container_config(
        spec(runtime), gvisor_runtime="runsc",
        gpu=gc.GpuSandbox(device_requests=requests, driver=DRIVER))
    hc = docker.types.HostConfig(version="1.43", **cfg["host_config"])
    if requests:
        assert hc["DeviceRequests"] == [{"Driver": "nvidia", "Count": 0,
                                         "DeviceIDs": ["GPU-1"], "Options": {},
                                         "Capabilities": [["gpu", "compute", "utility"]]}]
    else:
        assert hc["Devices"][0] == {"PathOnHost": "/dev/nvidia1",
                                    "PathInContainer": "/dev/nvidia1",
                                    "CgroupPermissions": "rwm"}
        assert "/usr/local/bin/nvidia-smi:/usr/bin/nvidia-smi:ro" in hc["Binds"]
