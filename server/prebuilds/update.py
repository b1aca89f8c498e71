"""Bringing a workspace forked from a prebuild up to its branch's head.

The branch is cloned again on the host, as a create clones (the same safe git, the owner's
forge credential in memory only, never in the sandbox), and its commit compared with the
prebuild's. When the branch has moved, the new clone is copied into the workspace beside its
repository and fetched from there by git running inside the sandbox, as the workspace's user,
then fast-forwarded: the sandbox needs no network and no credential, and its untrusted
``.git`` is only ever touched inside it.
"""

from __future__ import annotations

import asyncio
import shutil

import git

from server.db.models import Prebuild, Workspace
from server.errors import DenError
from server.git import clone as git_clone
from server.runtime.base import ExecRequest, WorkspaceSpec
from server.workspaces import hooks
from server.workspaces.service import WorkspaceService

UPDATE_DIR = ".den-prebuild-update"  # under /workspace, removed again by the same command
# Fetch the fresh clone's HEAD into origin's branch and fast-forward to it; remove the copy.
_FETCH = ('git fetch --quiet --no-tags "/workspace/$1" "+HEAD:refs/remotes/origin/$2" '
          '&& git merge --quiet --ff-only "refs/remotes/origin/$2"; rc=$?; '
          'rm -rf "/workspace/$1"; exit $rc')


async def bring_up_to_date(svc: WorkspaceService, ws: Workspace, spec: WorkspaceSpec, *,
                           prebuild: Prebuild) -> str:
    """Fetch the branch's newer commits into the fork. Returns the branch's head commit
    ("" when it could not be read); what happened is in the workspace's events."""
    st = svc.settings
    work = st.data_dir / "tmp" / f"{ws.id}-prebuild"
    branch = ws.repo_branch or None
    try:
        source = git_clone.validate_repo_url(ws.repo_url, allowed_schemes=st.allowed_git_schemes,
                                             local_roots=st.local_repo_roots)
        work.mkdir(parents=True, exist_ok=True)
        repo = work / "repo"
        await asyncio.to_thread(
            git_clone.clone, source, branch=branch, dest=repo, timeout_s=st.clone_timeout_s,
            max_bytes=st.clone_max_mb * 1024 * 1024,
            known_hosts=st.data_dir / "ssh_known_hosts",
            extra_env=hooks.clone_env(svc.hooks, ws), outbound=svc.outbound)
        head = await asyncio.to_thread(_head_commit, repo)
        if head == prebuild.commit:
            svc.note(ws.id, "prebuild", f"prebuild {prebuild.id} is at the head of "
                                        f"{branch or 'the default branch'} ({head[:12]})")
            return head
        tar = work / "update.tar"
        await asyncio.to_thread(git_clone.pack_for_workspace, repo, arcname=UPDATE_DIR, out=tar)
        await svc.runtime.seed(spec, tar)
        result = await svc.runtime.exec(spec, ExecRequest(
            argv=["/bin/sh", "-c", _FETCH, "den-prebuild", UPDATE_DIR, branch or "HEAD"],
            cwd=svc.repo_path(ws), timeout_s=float(st.clone_timeout_s),
            max_output_bytes=64 * 1024))
        said = (result.stdout + result.stderr)[-2048:].decode(errors="replace").strip()
        if result.exit_code != 0:
            svc.note(ws.id, "prebuild", f"prebuild {prebuild.id} is at "
                                        f"{prebuild.commit[:12] or '?'}; the branch is at "
                                        f"{head[:12]}, but it could not be fast-forwarded "
                                        f"(exit code {result.exit_code}): {said}")
        else:
            svc.note(ws.id, "prebuild", f"prebuild {prebuild.id} is at "
                                        f"{prebuild.commit[:12] or '?'}; fetched the branch's "
                                        f"newer commits up to {head[:12]}")
        return head
    except DenError as exc:  # the workspace is whole at the prebuild's commit: say so
        svc.note(ws.id, "prebuild", f"prebuild {prebuild.id}: newer commits not fetched: "
                                    f"{exc.message}")
        return ""
    finally:
        await asyncio.to_thread(shutil.rmtree, work, ignore_errors=True)  # off the loop


def _head_commit(repo: object) -> str:
    """The commit a clone Den just made has checked out (read from its refs, no hooks)."""
    try:
        return str(git.Repo(str(repo)).head.commit.hexsha)
    except (ValueError, git.exc.GitError):
        return ""
