"""Which prebuild a create uses, and which prebuilds retention removes: pure functions over
rows, tested by equality (tests/unit/test_prebuilds.py)."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from server.db.models import Prebuild

BUILDING, READY, FAILED = "building", "ready", "failed"
COMMIT = re.compile(r"[0-9a-f]{40}([0-9a-f]{24})?")  # sha1 or sha256, as git prints them




def usable(fields: Mapping[str, Any], *, default_image: str, devcontainer: bool) -> str | None:
    """Why a create with these validated fields cannot use a prebuild, or None when it can.
    A prebuild is made with the default image, no GPUs, gVisor and the repository's own
    devcontainer.json: a create that asks otherwise is built as usual."""
    if not devcontainer:
        return "devcontainer.json turned off"
    if fields.get("image") != default_image:
        return "an image of its own"
    if fields.get("gpus"):
        return "GPUs"
    if fields.get("runtime") != "gvisor":
        return f"runtime {fields.get('runtime')}"
    return None


def pick(rows: Sequence[Prebuild], *, repo_url: str, branch: str | None,
         snapshots: set[str]) -> Prebuild | None:
    """The newest ready prebuild of ``repo_url`` and ``branch`` (None: the default branch)
    whose snapshot still exists. ``rows`` are the owner's, oldest first."""
    for row in reversed(rows):
        if (row.repo_url == repo_url and row.branch == (branch or "") and row.state == READY
                and row.snapshot_id in snapshots):
            return row
    return None


def building(rows: Sequence[Prebuild], *, repo_url: str, branch: str | None) -> Prebuild | None:
    """The prebuild of ``repo_url`` and ``branch`` being made now, if any."""
    for row in rows:
        if row.repo_url == repo_url and row.branch == (branch or "") and row.state == BUILDING:
            return row
    return None


def expired(rows: Sequence[Prebuild], *, repo_url: str, branch: str, keep: int) -> list[str]:
    """The prebuilds of ``repo_url`` and ``branch`` that retention removes, once a newer one
    has finished: ready ones beyond the ``keep`` newest, and failed ones older than the
    newest that finished (its log is the one worth reading). ``rows`` oldest first."""
    mine = [r for r in rows if r.repo_url == repo_url and r.branch == branch]
    finished = [r for r in mine if r.state in (READY, FAILED)]
    if not finished:
        return []
    newest = finished[-1]
    ready = [r for r in finished if r.state == READY]
    gone = {r.id for r in ready[: max(0, len(ready) - keep)]}
    gone |= {r.id for r in finished if r.state == FAILED and r is not newest}
    return [r.id for r in mine if r.id in gone]


def is_commit(text: str) -> bool:
    return COMMIT.fullmatch(text) is not None
