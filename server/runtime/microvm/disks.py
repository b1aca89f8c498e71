"""A VM's disks and its record, made in its directory. Blocking (qemu-img, mkfs.ext4).

Each file is made under a temporary name and renamed into place, so that a crash leaves no
half-made disk that a later ``create`` would take for a finished one.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from server.runtime.errors import EngineError
from server.runtime.microvm.argv import VmFiles

TOOL_TIMEOUT_S = 120.0
WORKSPACE_LABEL = "den-workspace"  # the initramfs mounts the disk with this label
DEV_UID = 1000  # the image's `dev` user owns /workspace, as in a container


def make(files: VmFiles, *, rootfs: Path, workspace_gb: int, record: Mapping[str, Any]) -> None:
    """The directory, its record, the root overlay and the /workspace disk; what exists is
    kept (idempotent). The overlay names the build ``rootfs`` links to now (a later setup
    links a new build and leaves this one in place)."""
    files.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not files.record.exists():
        _atomic_write(files.record, json.dumps(dict(record), sort_keys=True).encode())
    if not files.root.exists():
        tmp = files.root.with_name(".root.qcow2.tmp")
        run_tool(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(rootfs.resolve()),
                  "-F", "raw", str(tmp)])
        os.replace(tmp, files.root)
    if not files.workspace.exists():
        tmp = files.workspace.with_name(".workspace.img.tmp")
        tmp.unlink(missing_ok=True)
        with tmp.open("wb") as f:
            f.truncate(workspace_gb << 30)  # sparse: the host pays for what is written
        run_tool(["mkfs.ext4", "-q", "-F", "-L", WORKSPACE_LABEL, "-m", "0",
                  "-E", f"root_owner={DEV_UID}:{DEV_UID}", str(tmp)])
        os.replace(tmp, files.workspace)


def read_record(files: VmFiles) -> dict[str, Any] | None:
    """The VM's record, or None when it is missing or unreadable (not Den's)."""
    try:
        data = json.loads(files.record.read_bytes()[:65536])
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_record(files: VmFiles, record: Mapping[str, Any]) -> None:
    """Replace the VM's record (atomically)."""
    _atomic_write(files.record, json.dumps(dict(record), sort_keys=True).encode())


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def run_tool(argv: list[str], *, timeout_s: float = TOOL_TIMEOUT_S, what: str = "") -> None:
    """Run a host tool on a VM's files; EngineError with the end of its stderr when it fails
    (``what`` names the step, else the tool)."""
    what = what or argv[0]
    try:
        out = subprocess.run(argv, capture_output=True, timeout=timeout_s, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise EngineError(f"{what} failed: {exc}") from exc
    if out.returncode != 0:
        raise EngineError(f"{what} failed: "
                          f"{out.stderr[-1000:].decode(errors='replace').strip()}")


def own(files: VmFiles) -> None:
    """The VM's directory and its files root's, the directory 0700: QEMU gets its disks as
    descriptors and opens nothing in it by path (jail.py), so its uid owns nothing there
    (a directory an earlier Den gave to the VM's uid is taken back)."""
    for path in (files.dir, *files.dir.iterdir()):
        st = path.lstat()
        if (st.st_uid, st.st_gid) != (0, 0):
            os.chown(path, 0, 0, follow_symlinks=False)
    files.dir.chmod(0o700)
