"""The host's NVIDIA GPUs: from NVML (``nvidia-ml-py``, imported lazily), else from
``nvidia-smi -q -x``, else none; ``DEN_GPUS`` restricts or describes them.

``DEN_GPUS`` is one of: ``auto`` (discover, the default), ``none`` (Den hands out no GPU),
a comma-separated list of UUIDs (discover, then keep only these), or a JSON array of GPUs
(``[{"uuid": ..., "model": ..., "memory_mb": ..., "minor": 0}]``) that describes the
inventory without asking the driver (a host whose driver Den cannot query, and tests).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

NVIDIA_SMI_TIMEOUT_S = 20
_MAX_XML_BYTES = 8 * 1024 * 1024  # one big host: 8 GPUs at ~75 KiB each, with room to spare


class InventoryError(ValueError):
    """DEN_GPUS or a driver's answer that Den cannot read."""


@dataclass(frozen=True)
class Gpu:
    """One whole GPU Den may hand out."""

    index: int  # the driver's enumeration order (nvidia-smi's and NVML's index)
    uuid: str
    model: str
    memory_mb: int
    minor: int  # its device node is /dev/nvidia<minor>

    @property
    def device(self) -> str:
        return f"/dev/nvidia{self.minor}"

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "uuid": self.uuid, "model": self.model,
                "memory_mb": self.memory_mb, "device": self.device}


def _mib(text: str | None) -> int:
    m = re.fullmatch(r"\s*(\d+)\s*MiB\s*", text or "")
    return int(m.group(1)) if m else 0


def parse_nvidia_smi_xml(text: str) -> list[Gpu]:
    """The GPUs of an ``nvidia-smi -q -x`` report (any driver since the v11 DTD)."""
    # The DOCTYPE names a DTD file; ElementTree does not fetch it.
    try:
        root = ET.fromstring(text)
    except ET.ParseError as exc:
        raise InventoryError(f"nvidia-smi's XML is not readable: {exc}") from exc
    if root.tag != "nvidia_smi_log":
        raise InventoryError(f"not an nvidia-smi report (root element <{root.tag}>)")
    gpus = []
    for index, el in enumerate(root.findall("gpu")):
        uuid = (el.findtext("uuid") or "").strip()
        minor = (el.findtext("minor_number") or "").strip()
        if not uuid.startswith("GPU-"):
            raise InventoryError(f"GPU {index} has no UUID in nvidia-smi's report")
        if not minor.isdigit():  # Windows (WDDM) says N/A: no device node to pass on
            raise InventoryError(f"GPU {uuid} has no device minor number ({minor or 'none'})")
        gpus.append(Gpu(index=index, uuid=uuid,
                        model=(el.findtext("product_name") or "").strip(),
                        memory_mb=_mib(el.findtext("fb_memory_usage/total")),
                        minor=int(minor)))
    return gpus


def parse_nvidia_smi_utilization(text: str) -> dict[str, int]:
    """UUID -> GPU utilization in percent, from an ``nvidia-smi -q -x`` report (N/A: 0)."""
    root = ET.fromstring(text)
    out = {}
    for el in root.findall("gpu"):
        m = re.fullmatch(r"\s*(\d+)\s*%\s*", el.findtext("utilization/gpu_util") or "")
        out[(el.findtext("uuid") or "").strip()] = int(m.group(1)) if m else 0
    return out


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def from_nvml(nvml: Any) -> list[Gpu]:
    """The GPUs NVML reports (``nvml`` is the ``pynvml`` module of ``nvidia-ml-py``)."""
    nvml.nvmlInit()
    try:
        gpus = []
        for index in range(nvml.nvmlDeviceGetCount()):
            h = nvml.nvmlDeviceGetHandleByIndex(index)
            gpus.append(Gpu(index=index, uuid=_text(nvml.nvmlDeviceGetUUID(h)),
                            model=_text(nvml.nvmlDeviceGetName(h)),
                            memory_mb=int(nvml.nvmlDeviceGetMemoryInfo(h).total) // (1 << 20),
                            minor=int(nvml.nvmlDeviceGetMinorNumber(h))))
        return gpus
    finally:
        nvml.nvmlShutdown()


def nvml_utilization(nvml: Any, uuids: Sequence[str]) -> dict[str, int]:
    """UUID -> GPU utilization in percent over NVML's last sample period."""
    nvml.nvmlInit()
    try:
        out = {}
        for uuid in uuids:
            h = nvml.nvmlDeviceGetHandleByUUID(uuid.encode())
            out[uuid] = int(nvml.nvmlDeviceGetUtilizationRates(h).gpu)
        return out
    finally:
        nvml.nvmlShutdown()


def parse_described(value: str) -> list[Gpu]:
    """A JSON array of GPUs (DEN_GPUS) as the inventory."""
    try:
        items = json.loads(value)
    except json.JSONDecodeError as exc:
        raise InventoryError(f"DEN_GPUS is not valid JSON: {exc}") from exc
    if not isinstance(items, list):
        raise InventoryError("DEN_GPUS must be a JSON array of GPUs")
    gpus: list[Gpu] = []
    for index, item in enumerate(items):
        if not isinstance(item, dict) or not str(item.get("uuid", "")).startswith("GPU-"):
            raise InventoryError(f"DEN_GPUS entry {index} needs a \"uuid\" starting GPU-")
        try:
            gpus.append(Gpu(index=index, uuid=str(item["uuid"]),
                            model=str(item.get("model", "unknown")),
                            memory_mb=int(item.get("memory_mb", 0)),
                            minor=int(item.get("minor", index))))
        except (TypeError, ValueError) as exc:
            raise InventoryError(f"DEN_GPUS entry {index}: {exc}") from exc
    if len({g.uuid for g in gpus}) != len(gpus):
        raise InventoryError("DEN_GPUS names a UUID twice")
    return gpus


def _import_nvml() -> Any | None:
    try:
        import pynvml  # type: ignore[import-not-found]  # nvidia-ml-py, optional
    except ImportError:
        return None
    return pynvml


def _nvidia_smi_xml() -> str | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "-q", "-x"], capture_output=True,
                             timeout=NVIDIA_SMI_TIMEOUT_S, check=True).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("gpus: nvidia-smi failed: %s", exc)
        return None
    return out[:_MAX_XML_BYTES].decode(errors="replace")


def discover(*, nvml: Callable[[], Any | None] = _import_nvml,
             nvidia_smi: Callable[[], str | None] = _nvidia_smi_xml) -> list[Gpu]:
    """The host's GPUs: NVML first, then nvidia-smi; none without a driver."""
    module = nvml()
    if module is not None:
        try:
            return from_nvml(module)
        except Exception as exc:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
            log.info("gpus: NVML unavailable (%s); trying nvidia-smi", exc)
    text = nvidia_smi()
    return parse_nvidia_smi_xml(text) if text else []


def inventory_from_setting(value: str, *, discover: Callable[[], list[Gpu]] = discover
                           ) -> tuple[list[Gpu], bool]:
    """The inventory DEN_GPUS gives, and whether it was discovered from the driver
    (utilization can be asked of NVML then)."""
    value = value.strip()
    if value.lower() == "none":
        return [], False
    if value.startswith("["):
        return parse_described(value), False
    found = discover()
    if value.lower() in ("", "auto"):
        return found, True
    wanted = [u.strip() for u in value.split(",") if u.strip()]
    by_uuid = {g.uuid: g for g in found}
    missing = [u for u in wanted if u not in by_uuid]
    if missing:
        raise InventoryError(f"DEN_GPUS names GPUs this host does not have: "
                             f"{', '.join(missing)}")
    return [by_uuid[u] for u in wanted], True
