"""containerd's temp dir: the copies of checkpoints it leaves there at every restore
(the Docker backend's housekeeping, run by the idle reaper)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

RESTORE_COPY_MAX_AGE_S = 600


def sweep_restore_copies(tmp_dir: Path, *, max_age_s: float = RESTORE_COPY_MAX_AGE_S) -> int:
    """Remove the copies of checkpoints containerd leaves in its temp dir at every restore
    (``ctrd-checkpoint*``, never deleted by containerd 1.6: a full memory image each) once
    they are older than any restore in progress. Returns how many it removed."""
    removed = 0
    cutoff = time.time() - max_age_s
    for path in tmp_dir.glob("ctrd-checkpoint*"):
        try:
            if path.stat().st_mtime < cutoff:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
                removed += 1
        except OSError:
            continue
    return removed
