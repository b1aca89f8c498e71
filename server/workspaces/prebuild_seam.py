"""The seam through which a create forks from a prebuild (server/prebuilds/ implements it):
the workspace service asks a :class:`PrebuildFinder` after validating a create, and a
:class:`PrebuildUse` it answers makes the create a fork of the prebuild's snapshot, or the
claim of a fork of it made ahead (server/prebuilds/ahead.py)."""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from server.db.models import Snapshot, User
from server.runtime.base import WorkspaceSpec

if TYPE_CHECKING:
    from server.workspaces.service import CreateRequest


@dataclass(frozen=True)
class PrebuildUse:
    """A prebuild a create forks from: its snapshot, the row's fields it sets (over the
    request's), the first event's words, and what runs after the boot, before ``running``
    (under the workspace's lock; raising makes the create fail). ``claim``, when set, is
    tried first: given the owner, the name and the row's fields, it takes a fork made ahead
    (synchronously, one ledger transaction) and answers its id and the work that brings it
    up in the background; None: the create forks as usual."""

    snapshot: Snapshot
    fields: Mapping[str, Any]
    message_prefix: str
    then: Callable[[str, WorkspaceSpec], Coroutine[Any, Any, None]]
    claim: Callable[[User, str, Mapping[str, Any]],
                    tuple[str, Coroutine[Any, Any, None]] | None] | None = None


class PrebuildFinder(Protocol):
    async def find(self, user: User, fields: Mapping[str, Any], req: CreateRequest
                   ) -> PrebuildUse | None:
        """The prebuild a create of these validated ``fields`` should fork from, or None
        (the create is then built as usual). Called once per create; no side effects."""
        ...
