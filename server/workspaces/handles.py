"""What the workspace service keeps in a workspace's engine handle (``Workspace.engine``)
besides the backend's own identifiers, and the name of the one memory checkpoint a paused
workspace has."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

CHECKPOINT = "den-pause"  # the one memory checkpoint a paused workspace has
RESTORING = "restoring"  # the key of a restore in progress (server/workspaces/restore.py)
FROZEN_BYTES = "frozen_bytes"  # the key of the memory a frozen workspace holds


def without_restore(engine: Mapping[str, Any]) -> dict[str, Any]:
    """The handle with its restore-in-progress record removed."""
    return {k: v for k, v in engine.items() if k != RESTORING}
