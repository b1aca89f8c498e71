"""Pull requests from a workspace, with the forge credential kept on the host.

The flow (``ForgeService.open_pull_request``), each step recorded in the workspace's event log:

1. **Check** the request: branch names, the push policy (not the base, not protected), a
   linked account serving the workspace's repository.
2. **Commit** inside the sandbox, as ``dev``: switch to (or create) the branch, ``git add -A``,
   commit with the user's forge profile as author (Den's commit-msg hook adds the trailer).
3. **Export** the branch from the sandbox as a git bundle on the exec's stdout, leaving out
   what the server's mirror already has. The host reads it only as data.
4. **Mirror**: fetch the base (and the branch, if it exists) from the forge into the
   server-owned bare mirror, then the bundle (fsck'd); check size, fast-forward and ownership.
5. **Push** from the mirror with a lease, the token passed to git in memory only.
6. **Open** the pull request through the forge's REST API, or return the open one.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

import httpx
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from server.config import Settings
from server.db.models import ForgeAccount, PullRequest, User, Workspace
from server.errors import Conflict, DenError, ValidationFailed
from server.forges import policy
from server.forges.accounts import (
    Credential,
    ForgeAccounts,
    normalize_base_url,
    validate_token,
)
from server.forges.base import repo_ref
from server.forges.client import ForgeClient
from server.forges.errors import BaseMissing, ForgeNotLinked, PushTooLarge
from server.forges.hooks import install_hooks
from server.forges.mirror import Mirror, credential_env, mirror_path
from server.forges.providers import provider
from server.forges.spool import spool_stdout
from server.outbound import GuardedTransport
from server.workspaces.service import WorkspaceService

log = logging.getLogger(__name__)

# Run in the sandbox as dev, in the repository. Exit codes are the contract with _commit.
COMMIT_SCRIPT = r"""
b="$1"; msg="$2"
git rev-parse --git-dir >/dev/null 2>&1 || exit 20
cur=$(git symbolic-ref --quiet --short HEAD 2>/dev/null) || cur=""
if [ "$cur" != "$b" ]; then
    if git show-ref --verify --quiet "refs/heads/$b"; then
        git checkout --quiet "$b" 1>&2 || exit 21
    else
        git checkout --quiet -b "$b" 1>&2 || exit 21
    fi
fi
git add -A 1>&2 || exit 22
if ! git diff --cached --quiet; then
    git commit --quiet -m "$msg" 1>&2 || exit 23
fi
git rev-parse --verify --quiet HEAD || exit 24
"""

BUNDLE_SCRIPT = r"""
b="$1"; shift
tip=$(git rev-parse --verify --quiet "refs/heads/$b^{commit}") || exit 30
ex=""
for s in "$@"; do
    git cat-file -e "$s^{commit}" 2>/dev/null && ex="$ex ^$s"
done
if [ -n "$ex" ] && [ -z "$(git rev-list -n 1 "$tip" $ex)" ]; then
    echo "$tip"; exit 31
fi
exec git bundle create --quiet - "refs/heads/$b" $ex
"""


@dataclass(frozen=True)
class PullRequestRequest:
    title: str
    body: str = ""
    branch: str | None = None
    base: str | None = None
    commit_message: str | None = None
    draft: bool = False


@dataclass(frozen=True)
class PullRequestResult:
    number: int
    url: str
    branch: str
    base: str
    head_sha: str
    created: bool
    push: str  # a policy.PushMode value
    forge: str


def script_argv(script: str, *args: str) -> list[str]:
    return ["/bin/sh", "-c", script, "den-forge", *args]


class ForgeService:
    """Linked accounts, private clones and pull requests (the only user of forge tokens)."""

    def __init__(self, *, settings: Settings, sessions: sessionmaker[Session],
                 workspaces: WorkspaceService,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.settings = settings
        self.sessions = sessions
        self.workspaces = workspaces
        self.accounts = ForgeAccounts(settings, sessions)
        self._transport = transport
        self._locks: dict[str, asyncio.Lock] = {}

    def attach(self) -> None:
        """Register with the workspace service as its hooks (server/workspaces/hooks.py):
        clone credentials, Den's git hooks, and the clean-up of mirrors after a delete."""
        self.workspaces.add_hooks(self)

    # --- accounts -----------------------------------------------------------------------

    def client(self, cred: Credential) -> ForgeClient:
        return ForgeClient(provider(cred.kind), api_url=cred.api_url, token=cred.token,
                           timeout_s=self.settings.forge_api_timeout_s,
                           transport=self._transport
                           or GuardedTransport(self.workspaces.outbound))

    async def link(self, user: User, *, kind: str, base_url: str, token: str,
                   api_url: str | None = None, author_name: str = "",
                   author_email: str = "") -> ForgeAccount:
        """Check the token against the forge (its user API) and store it encrypted."""
        prov = provider(kind)
        schemes = self.settings.allowed_git_schemes
        base = normalize_base_url(base_url, allowed_schemes=schemes)
        api = (normalize_base_url(api_url, allowed_schemes=schemes, what="api_url") if api_url
               else prov.default_api_url(base))
        token = validate_token(token)
        probe = Credential(account_id=0, kind=kind, base_url=base, api_url=api, username="",
                           author_name="", author_email="", token=token)
        profile = await self.client(probe).profile(base_url=base)
        return self.accounts.link(user, kind=kind, base_url=base, api_url=api, token=token,
                                  profile=profile, author_name=author_name,
                                  author_email=author_email)

    # --- clones -------------------------------------------------------------------------

    def clone_env(self, ws: Workspace) -> dict[str, str] | None:
        """Git environment that authenticates a host-side clone of ``ws``'s repository with
        its owner's linked account (None when no account serves the URL)."""
        if urlsplit(ws.repo_url).scheme.lower() not in ("http", "https"):
            return None
        cred = self.accounts.credential_for(ws.owner_id, ws.repo_url)
        return credential_env(cred) if cred is not None else None

    def prepare_clone(self, ws: Workspace, repo: Path, head: str) -> None:
        """Install Den's git hooks into a fresh clone of ``head`` (on the host, files only),
        with the owner's forge profile as the clone's commit identity."""
        protected = list(self.settings.forge_protected_branches)
        cloned = ws.repo_branch or head
        if cloned and cloned not in protected:
            protected.append(cloned)
        account = self.accounts.account_for(ws.owner_id, ws.repo_url)
        author = (account.author_name, account.author_email) if account else None
        git_dir = repo / ".git"
        if git_dir.is_dir():
            install_hooks(git_dir, workspace=ws.name, protected=protected, author=author)

    def deleted(self, workspace_id: str) -> None:
        """A deleted workspace's mirror goes with it."""
        shutil.rmtree(mirror_path(self.settings, workspace_id), ignore_errors=True)

    def reconcile(self, known: set[str]) -> None:
        """Remove the mirrors of workspaces that no longer exist."""
        root = self.settings.data_dir / "mirrors"
        for path in root.glob("*.git") if root.is_dir() else []:
            if path.name[:-4] not in known:
                shutil.rmtree(path, ignore_errors=True)

    # --- pull requests --------------------------------------------------------------------

    def _last_pushed(self, owner_id: int, repo_url: str, branch: str) -> PullRequest | None:
        with self.sessions() as s:
            return s.scalar(select(PullRequest).where(
                PullRequest.owner_id == owner_id, PullRequest.repo_url == repo_url,
                PullRequest.branch == branch))

    def _record_push(self, user: User, ws: Workspace, cred: Credential, *, branch: str,
                     base: str, sha: str) -> None:
        now = datetime.now(UTC)
        with self.sessions.begin() as s:
            row = s.scalar(select(PullRequest).where(
                PullRequest.owner_id == user.id, PullRequest.repo_url == ws.repo_url,
                PullRequest.branch == branch))
            if row is None:
                row = PullRequest(owner_id=user.id, repo_url=ws.repo_url, branch=branch,
                                  created_at=now)
                s.add(row)
            row.workspace_id = ws.id
            row.account_id = cred.account_id
            row.base = base
            row.head_sha = sha
            row.updated_at = now

    def _record_pr(self, user: User, ws: Workspace, *, branch: str, number: int, url: str
                   ) -> None:
        with self.sessions.begin() as s:
            row = s.scalar(select(PullRequest).where(
                PullRequest.owner_id == user.id, PullRequest.repo_url == ws.repo_url,
                PullRequest.branch == branch))
            if row is not None:
                row.number, row.url = number, url

    async def open_pull_request(self, user: User, ws: Workspace, req: PullRequestRequest
                                ) -> PullRequestResult:
        """Commit, push and open (or find) the pull request; see the module docstring."""
        title = req.title.strip()
        if not title:
            raise ValidationFailed("title is empty")
        branch = policy.check_branch_name(req.branch or f"den/{ws.name}")
        base = req.base or ws.repo_branch
        if not base:
            raise ValidationFailed("base is missing and the workspace's branch is unknown")
        policy.check_branch_name(base, field="base")
        policy.check_target(branch, base=base,
                            protected=list(self.settings.forge_protected_branches))
        account = self.accounts.account_for(user.id, ws.repo_url)
        if account is None:
            raise ForgeNotLinked(
                f"no linked forge account serves {ws.repo_url}; link one with "
                "POST /api/v1/users/me/forges (base_url and token)")
        repo = repo_ref(account.base_url, ws.repo_url)
        cred = self.accounts.credential(account)
        lock = self._locks.setdefault(ws.id, asyncio.Lock())
        async with lock:
            try:
                tip, mode = await self._push(user, ws, cred, branch=branch, base=base,
                                             message=req.commit_message or title)
            except DenError as exc:
                self.workspaces.note(ws.id, "push_failed",
                                     f"push of branch {branch} failed: {exc.message}",
                                     actor=user.name)
                raise
            try:
                info, created = await self.client(cred).open(
                    repo, branch=branch, base=base, title=title, body=req.body,
                    draft=req.draft)
            except DenError as exc:
                exc.message = (f"branch {branch!r} was pushed ({tip[:12]}), but opening the "
                               f"pull request failed: {exc.message}")
                self.workspaces.note(ws.id, "pull_request_failed", exc.message,
                                     actor=user.name)
                raise
            self._record_pr(user, ws, branch=branch, number=info.number, url=info.url)
            verb = "opened" if created else "updated"
            self.workspaces.note(ws.id, "pull_request",
                                 f"{verb} pull request #{info.number} {branch} -> {base}: "
                                 f"{info.url}", actor=user.name)
        return PullRequestResult(number=info.number, url=info.url, branch=branch, base=base,
                                 head_sha=tip, created=created, push=mode.value,
                                 forge=cred.kind)

    async def _push(self, user: User, ws: Workspace, cred: Credential, *, branch: str,
                    base: str, message: str) -> tuple[str, policy.PushMode]:
        await self._commit(user, ws, cred, branch=branch, message=message)
        mirror = Mirror(mirror_path(self.settings, ws.id),
                        timeout_s=self.settings.forge_git_timeout_s,
                        outbound=self.workspaces.outbound)
        await asyncio.to_thread(mirror.ensure)
        url = ws.repo_url
        heads = await asyncio.to_thread(mirror.remote_heads, url, [base, branch], cred)
        if base not in heads:
            raise BaseMissing(f"the base branch {base!r} does not exist on the forge")
        await asyncio.to_thread(mirror.fetch, url, [b for b in (base, branch) if b in heads],
                                cred)
        known = await asyncio.to_thread(mirror.known_tips)
        tip = await self._export(user, ws, mirror, branch=branch, known=known)
        if await asyncio.to_thread(mirror.is_ancestor, tip, heads[base]):
            raise ValidationFailed(f"branch {branch!r} has no commits that {base!r} does not "
                                   "have: nothing to open a pull request for",
                                   code="no_changes")
        remote_tip = heads.get(branch)
        fast_forward = remote_tip is not None and await asyncio.to_thread(
            mirror.is_ancestor, remote_tip, tip)
        last = self._last_pushed(user.id, ws.repo_url, branch)
        mode = policy.decide_push(remote_tip=remote_tip, new_tip=tip, fast_forward=fast_forward,
                                  den_pushed=last.head_sha if last else None, branch=branch)
        await asyncio.to_thread(mirror.push, url, branch, mode=mode, remote_tip=remote_tip,
                                cred=cred)
        self._record_push(user, ws, cred, branch=branch, base=base, sha=tip)
        self.workspaces.note(ws.id, "push", f"pushed {branch} at {tip[:12]} to {url} "
                             f"({mode.value})", actor=user.name)
        return tip, mode

    async def _commit(self, user: User, ws: Workspace, cred: Credential, *, branch: str,
                      message: str) -> None:
        svc = self.workspaces
        env = {"GIT_AUTHOR_NAME": cred.author_name or user.name,
               "GIT_AUTHOR_EMAIL": cred.author_email or f"{user.name}@den.invalid",
               "GIT_COMMITTER_NAME": cred.author_name or user.name,
               "GIT_COMMITTER_EMAIL": cred.author_email or f"{user.name}@den.invalid"}
        req = svc.exec_request(ws, script_argv(COMMIT_SCRIPT, branch, message), env=env,
                               timeout_s=self.settings.forge_git_timeout_s)
        result = await svc.exec(ws.id, req, actor=user.name)
        err = result.stderr.decode(errors="replace").strip()[-800:]
        if result.timed_out:
            raise Conflict("committing in the workspace timed out", code="commit_failed")
        code = result.exit_code
        if code == 20:
            raise ValidationFailed(f"{svc.repo_path(ws)} is not a git repository",
                                   code="not_a_repository")
        if code == 21:
            raise Conflict(f"could not switch the workspace to branch {branch!r}: {err}",
                           code="checkout_failed")
        if code in (22, 23):
            raise ValidationFailed(f"git could not commit in the workspace: {err}",
                                   code="commit_failed")
        if code != 0:
            raise ValidationFailed(f"the workspace's repository has no commit to push: {err}",
                                   code="commit_failed")
        svc.note(ws.id, "commit", f"{branch} at {result.stdout.decode().strip()[:12]}",
                 actor=user.name)

    async def _export(self, user: User, ws: Workspace, mirror: Mirror, *, branch: str,
                      known: list[str]) -> str:
        """Bring the branch's new commits from the sandbox into the mirror; returns the tip."""
        svc = self.workspaces
        limit = self.settings.forge_max_push_mb * 1024 * 1024
        req = svc.exec_request(ws, script_argv(BUNDLE_SCRIPT, branch, *known),
                               timeout_s=self.settings.forge_git_timeout_s)
        tmp = Path(tempfile.mkdtemp(prefix="den-bundle-", dir=self._tmpdir()))
        try:  # the bundle goes to a file as it comes, never whole into memory
            bundle = tmp / "branch.bundle"
            result = await spool_stdout(svc, ws.id, req, dest=bundle, limit=limit,
                                        timeout_s=self.settings.forge_git_timeout_s,
                                        actor=user.name)
            if result.timed_out:
                raise Conflict("exporting the commits from the workspace timed out",
                               code="export_failed")
            if result.too_large:
                raise PushTooLarge(
                    f"the new commits on {branch!r} are larger than the "
                    f"{self.settings.forge_max_push_mb} MiB this server pushes at once")
            head = await asyncio.to_thread(_head, bundle, policy.MAX_HEADER_BYTES)
            if result.exit_code == 31:  # nothing new: the tip is already in the mirror
                tip = head.decode(errors="replace").strip()
                if not policy.is_sha(tip) or not await asyncio.to_thread(mirror.has_commit,
                                                                         tip):
                    raise policy.BadBundle("the workspace reported a commit Den does not have")
                await asyncio.to_thread(mirror.set_ref, branch, tip)
                return tip
            if result.exit_code != 0:
                err = result.stderr.decode(errors="replace").strip()[-500:]
                raise ValidationFailed(f"could not export branch {branch!r} from the "
                                       f"workspace: {err or 'exit ' + str(result.exit_code)}",
                                       code="export_failed")
            tip = policy.bundle_tip(policy.parse_bundle_header(head), branch)
            await asyncio.to_thread(mirror.import_bundle, bundle, branch)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        got = await asyncio.to_thread(mirror.ref, branch)
        if got != tip:
            raise policy.BadBundle("the bundle's branch did not arrive in the mirror intact")
        return tip

    def _tmpdir(self) -> Path:
        path = self.settings.data_dir / "tmp"
        path.mkdir(parents=True, exist_ok=True)
        return path


def _head(path: Path, n: int) -> bytes:
    with path.open("rb") as f:
        return f.read(n)
