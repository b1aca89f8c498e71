"""Pause with memory for microVMs: QEMU's migration to a file and back. Blocking; the backend
calls these off the event loop.

A pause stops the guest's CPUs (QMP ``stop``: QEMU drains and flushes the disks), passes a
file it opened to QEMU (``getfd``) and migrates into it (``migrate fd:``), then tells QEMU
to quit: no CPU, no RAM held. A resume starts QEMU with ``-incoming defer`` on the same
disks, feeds it the file (``migrate-incoming fd:``) and lets the guest run (``cont``). The
guest writes nothing between the two, so its disks are what its saved memory expects.

QEMU 7.2 has no ``file:`` migration; ``fd:`` and ``exec:cat > FILE`` were measured here
(TCG, 512 MB idle guest, about 80 MB saved): 0.15-0.5 s to save either way, 0.25-1.1 s to
load to a stopped guest; ``fd:`` needs no shell and no path quoting, so it is used.

A checkpoint is a directory ``<vm>/checkpoints/<name>/`` holding ``state`` (QEMU's
migration stream) and ``meta.json`` (what QEMU must be started with to load it: memory,
vCPUs; the VM and host name it was saved from). It is written as ``.<name>.tmp`` and renamed
into place once QEMU says the migration completed: a checkpoint that exists is complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from server import faults
from server.runtime.errors import EngineError, ObjectMissing
from server.runtime.microvm import process
from server.runtime.microvm.argv import VmFiles
from server.runtime.microvm.qmp import Qmp, QmpError

STATE = "state"
META = "meta.json"
SAVE_TIMEOUT_S = 300.0  # a large, busy guest's memory at disk speed
LOAD_TIMEOUT_S = 300.0
QUIT_TIMEOUT_S = 10.0
MAX_BANDWIDTH = 1 << 40  # bytes/s: QEMU's default (32 MiB/s) throttles a save to a file
MIGRATION_FD = "den-migration"


def directory(files: VmFiles, name: str) -> Path:
    return files.dir / "checkpoints" / name


def partial(files: VmFiles, name: str) -> Path:
    """Where a checkpoint is written until it is complete."""
    return files.dir / "checkpoints" / f".{name}.tmp"


def read_meta(path: Path) -> dict[str, Any]:
    """A checkpoint's ``meta.json``; ObjectMissing when there is none (or it is not ours)."""
    try:
        meta = json.loads((path / META).read_bytes()[:65536])
    except (OSError, ValueError) as exc:
        raise ObjectMissing(f"no checkpoint at {path}") from exc
    if not isinstance(meta, dict) or not (path / STATE).is_file():
        raise ObjectMissing(f"no checkpoint at {path}")
    return meta


def incoming_argv(argv: list[str]) -> list[str]:
    """QEMU's command line to load a checkpoint: the VM's own, waiting for its state."""
    return [*argv, "-incoming", "defer"]


def save(files: VmFiles, name: str, *, meta: dict[str, Any]) -> int:
    """Save the running VM's memory and device state as checkpoint ``name`` and end QEMU;
    returns the state's size in bytes. On failure nothing partial is left, and a QEMU still
    there runs on (raises EngineError); one that died meanwhile is gone (the VM is
    stopped, its disks as QEMU last flushed them)."""
    tmp = partial(files, name)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(exist_ok=True, mode=0o700)  # the guest's memory: Den's eyes only
    tmp.mkdir(mode=0o700)
    (tmp / META).write_text(json.dumps(meta, sort_keys=True))
    stopped = False
    try:
        with Qmp(files.qmp) as qmp:
            qmp.execute("migrate-set-parameters", {"max-bandwidth": MAX_BANDWIDTH})
            qmp.execute("stop")
            stopped = True
            fd = os.open(tmp / STATE, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC,
                         0o600)
            try:
                qmp.execute("getfd", {"fdname": MIGRATION_FD}, fds=[fd])
            finally:
                os.close(fd)
            qmp.execute("migrate", {"uri": f"fd:{MIGRATION_FD}"})
            faults.point("pause.checkpoint")  # Den dies here: reconcile's settle() finishes
            status = qmp.wait_for("query-migrate", _settled, timeout_s=SAVE_TIMEOUT_S)
            if status.get("status") != "completed":
                with contextlib.suppress(QmpError):
                    qmp.execute("migrate_cancel")
                raise EngineError(f"QEMU could not save the VM's memory: "
                                  f"{status.get('error-desc') or status.get('status')}")
            _fsync(tmp / STATE)
            with contextlib.suppress(QmpError):
                qmp.execute("quit")
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if stopped and process.running(files) is not None:
            with contextlib.suppress(QmpError), Qmp(files.qmp) as qmp:
                qmp.execute("cont")  # the guest runs on, as if nothing was asked
        if isinstance(exc, QmpError) and process.running(files) is None:
            raise EngineError("QEMU exited while saving the VM's memory; the workspace is "
                              "stopped and starts cold from its disk") from exc
        if isinstance(exc, OSError):
            raise EngineError(f"saving the VM's memory failed: {exc}") from exc
        raise
    if not process.wait_gone(files, QUIT_TIMEOUT_S):
        process.end(files, timeout_s=0.0)
    final = directory(files, name)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return (final / STATE).stat().st_size


def feed(files: VmFiles, name: str) -> None:
    """Give checkpoint ``name`` to the VM's QEMU, started with :func:`incoming_argv` (and
    the checkpoint's memory and vCPUs), and let the guest run. On failure QEMU is ended and
    the checkpoint kept (raises EngineError, ObjectMissing when there is none)."""
    path = directory(files, name)
    try:
        with Qmp(files.qmp) as qmp:
            fd = os.open(path / STATE, os.O_RDONLY | os.O_CLOEXEC)
            try:
                qmp.execute("getfd", {"fdname": MIGRATION_FD}, fds=[fd])
            finally:
                os.close(fd)
            qmp.execute("migrate-incoming", {"uri": f"fd:{MIGRATION_FD}"})
            status = qmp.wait_for("query-status", lambda s: s.get("status") != "inmigrate",
                                  timeout_s=LOAD_TIMEOUT_S)
            if status.get("status") not in ("paused", "running"):
                raise EngineError(f"QEMU could not load the VM's memory (it is "
                                  f"{status.get('status')})")
            qmp.execute("cont")
    except BaseException as exc:
        process.end(files, timeout_s=0.0)
        if isinstance(exc, QmpError):
            raise EngineError(f"QEMU could not load the VM's memory: {exc.message}") from exc
        if isinstance(exc, OSError):
            raise EngineError(f"QEMU could not load the VM's memory: {exc}") from exc
        raise


def settle(files: VmFiles, name: str, *, wait_s: float) -> bool:
    """After Den died during a save: a QEMU still migrating is waited for (at most
    ``wait_s``); a completed migration is installed as checkpoint ``name`` and QEMU ended
    (True); anything else is removed and a QEMU still there runs on (False)."""
    tmp = partial(files, name)
    if process.running(files) is None:
        shutil.rmtree(tmp, ignore_errors=True)
        return directory(files, name).is_dir()
    completed = False
    try:
        with Qmp(files.qmp) as qmp:
            status = qmp.wait_for("query-migrate", _settled, timeout_s=wait_s)
            completed = status.get("status") == "completed" and (tmp / STATE).is_file()
            if completed:
                _fsync(tmp / STATE)
                qmp.execute("quit")
            elif qmp.execute("query-status").get("status") != "running":
                qmp.execute("cont")
    except QmpError:
        completed = False
    if not completed:
        shutil.rmtree(tmp, ignore_errors=True)
        return False
    if not process.wait_gone(files, QUIT_TIMEOUT_S):
        process.end(files, timeout_s=0.0)
    shutil.rmtree(directory(files, name), ignore_errors=True)
    os.replace(tmp, directory(files, name))
    return True


def delete(files: VmFiles, name: str) -> None:
    shutil.rmtree(partial(files, name), ignore_errors=True)
    shutil.rmtree(directory(files, name), ignore_errors=True)


def export(files: VmFiles, name: str, dest: Path) -> int:
    """Copy checkpoint ``name`` to ``dest`` (a memory snapshot); returns its size. A hard link
    where ``dest`` is on the same filesystem: a checkpoint's state is never written again
    once complete (a new save writes a new file)."""
    src = directory(files, name)
    read_meta(src)
    shutil.rmtree(dest, ignore_errors=True)
    _link_tree(src, dest)
    return sum(p.stat().st_size for p in dest.iterdir() if p.is_file())


def install(files: VmFiles, name: str, src: Path) -> None:
    """Make the checkpoint exported to ``src`` this VM's checkpoint ``name`` (a fork's)."""
    read_meta(src)
    tmp = partial(files, name)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    _link_tree(src, tmp)
    shutil.rmtree(directory(files, name), ignore_errors=True)
    os.replace(tmp, directory(files, name))


def _link_tree(src: Path, dest: Path) -> None:
    dest.mkdir(parents=True, mode=0o700)
    for f in src.iterdir():
        if f.is_file():
            try:
                os.link(f, dest / f.name)
            except OSError:
                shutil.copy2(f, dest / f.name)


def _settled(status: Any) -> bool:
    return isinstance(status, dict) and status.get("status") in (
        "completed", "failed", "cancelled", None)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

