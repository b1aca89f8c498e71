"""What other services do at points of a workspace's life, without the workspace service
knowing them: they register an object with these methods (``WorkspaceService.add_hooks``).
The forges (server/forges/) are the one user today: a clone's credentials, Den's git hooks in
a fresh clone, and clean-up of a deleted workspace's mirror."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

from server.db.models import Workspace


class WorkspaceHooks(Protocol):
    def clone_env(self, ws: Workspace) -> Mapping[str, str] | None:
        """Extra git environment for the host-side clone of ``ws``'s repository (its
        credentials, in memory only), or None. Called off the event loop."""
        ...

    def prepare_clone(self, ws: Workspace, repo: Path, head: str) -> None:
        """Change a fresh clone (on the host, files only) before it is packed into the
        workspace. Called off the event loop."""
        ...

    def deleted(self, workspace_id: str) -> None:
        """The workspace and its engine objects are gone."""
        ...


def clone_env(hooks: list[WorkspaceHooks], ws: Workspace) -> dict[str, str] | None:
    """The environments of every hook, merged (None when none gives one)."""
    merged: dict[str, str] = {}
    found = False
    for hook in hooks:
        env = hook.clone_env(ws)
        if env is not None:
            merged.update(env)
            found = True
    return merged if found else None
