"""``Workspace.engine`` holds the backend's handle of the workspace (server/runtime/base.py
``Handle``: the names of its engine objects, which only the backend reads) and, beside it,
the keys below that the service and the GPU pool keep; and the name of the one memory
checkpoint a paused workspace has."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

CHECKPOINT = "den-pause"  # the one memory checkpoint a paused workspace has
RESTORING = "restoring"  # the key of a restore in progress (server/workspaces/restore.py)
FROZEN_BYTES = "frozen_bytes"  # the key of the memory a frozen workspace holds
GPUS = "gpus"  # the key of the GPUs it holds (server/gpus/allocation.py)
SERVICE_KEYS = frozenset({RESTORING, FROZEN_BYTES, GPUS})


def restore_handles(pending: Mapping[str, Any], current: Mapping[str, Any]
                    ) -> tuple[dict[str, Any], dict[str, Any]]:
    """The handles (switched to, replaced) of a restore in progress. A record written before
    backends named their own objects (Docker only) has the two volume
    names instead."""
    if "handle" in pending:
        return dict(pending["handle"]), dict(pending.get("old") or current)
    return ({**current, "volume": pending.get("volume")},
            {**current, "volume": pending.get("old_volume") or current.get("volume")})


def backend_handle(engine: Mapping[str, Any]) -> dict[str, Any]:
    """The backend's part of ``Workspace.engine``."""
    return {k: v for k, v in engine.items() if k not in SERVICE_KEYS}


def without_restore(engine: Mapping[str, Any]) -> dict[str, Any]:
    """The handle with its restore-in-progress record removed."""
    return {k: v for k, v in engine.items() if k != RESTORING}
