"""The server-owned bare mirror a workspace's commits are pushed from.

The host never runs git against the workspace's ``.git``: commits leave the sandbox as a git
bundle (plain data), are fetched into this mirror, checked, and pushed from here. The mirror
is created by Den with no hook templates, and every git command on it runs with no system or
global config, hooks disabled, fsmonitor off, only the transport it needs allowed, fsck on
fetched objects, and the forge credential passed as an in-memory ``http.<base>.extraHeader``
through ``GIT_CONFIG_COUNT`` (never written to a file).

Blocking: call these from a worker thread.
"""

from __future__ import annotations

import base64
import logging
import shutil
import subprocess
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

from server.config import Settings
from server.errors import DenError
from server.forges.accounts import Credential
from server.forges.errors import (
    BranchConflict,
    ForgeForbidden,
    ForgeNotFound,
    ForgeRejected,
    ForgeTokenInvalid,
    ForgeUnavailable,
)
from server.forges.policy import BadBundle, PushMode, is_sha
from server.forges.providers import provider
from server.git.clone import _git_env
from server.outbound import PUBLIC_ONLY, GitPin, OutboundPolicy, git_pin

log = logging.getLogger(__name__)

FORGE_REFS = "refs/remotes/forge"
DEN_REFS = "refs/den/heads"

# Written into the mirror's config; the same values are also passed with -c on every call.
MIRROR_CONFIG = {
    "core.hooksPath": "/dev/null",
    "core.fsmonitor": "false",
    "core.sshCommand": "false",
    "core.askPass": "/bin/false",
    "credential.helper": "",
    "protocol.allow": "never",
    "transfer.fsckObjects": "true",
    "fetch.fsckObjects": "true",
    "http.followRedirects": "false",
    "submodule.recurse": "false",
    "gc.auto": "0",
}


def mirror_path(settings: Settings, workspace_id: str) -> Path:
    return settings.data_dir / "mirrors" / f"{workspace_id}.git"


def credential_env(cred: Credential) -> dict[str, str]:
    """Environment that makes git send the token to the account's forge only (URL-scoped
    ``http.<base_url>/.extraHeader``), as Basic auth the way each forge documents it."""
    user = provider(cred.kind).git_username(cred.username)
    basic = base64.b64encode(f"{user}:{cred.token}".encode()).decode()
    return {
        "GIT_CONFIG_COUNT": "1",
        "GIT_CONFIG_KEY_0": f"http.{cred.base_url}/.extraHeader",
        "GIT_CONFIG_VALUE_0": f"Authorization: Basic {basic}",
    }


def _redact(text: str, cred: Credential | None) -> str:
    if cred is not None and cred.token:
        text = text.replace(cred.token, "***")
    return text


def _reason(stderr: str) -> str:
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    useful = [ln for ln in lines if ln.startswith(("fatal:", "error:", "remote:", " !", "!"))]
    return "; ".join(useful or lines[-3:])[:500] or "git exited with an error"


def translate(stderr: str, *, what: str) -> DenError:
    """A forge's refusal, as git reported it, as a Den error. What the forge said (its
    ``remote:`` lines, an error page) goes to the server's log, not to the user."""
    low = stderr.lower()
    log.warning("git failed while %s: %s", what, _reason(stderr))
    reason = "details in the server log"
    if "stale info" in low or "fetch first" in low or "non-fast-forward" in low:
        return BranchConflict(f"the branch moved on the forge while {what}; try again "
                              f"({reason})")
    if "authentication failed" in low or "http 401" in low or "error: 401" in low \
            or "could not read username" in low:
        return ForgeTokenInvalid(f"the forge rejected the linked token while {what}; link "
                                 "the account again with a valid token")
    if "http 403" in low or "error: 403" in low or "permission" in low or "denied" in low \
            or "protected branch" in low or "pre-receive hook declined" in low:
        return ForgeForbidden(f"the forge refused {what}: {reason}")
    if "not found" in low or "http 404" in low or "error: 404" in low:
        return ForgeNotFound(f"the repository was not found while {what}: the URL is wrong "
                             "or the linked token cannot see it")
    if "could not resolve" in low or "failed to connect" in low or "timed out" in low \
            or "connection refused" in low or "http 5" in low or "error: 5" in low:
        return ForgeUnavailable(f"the forge could not be reached while {what}: {reason}")
    return ForgeRejected(f"git failed while {what}: {reason}")


class Mirror:
    """One workspace's bare mirror under ``<data_dir>/mirrors``."""

    def __init__(self, path: Path, *, timeout_s: float,
                 outbound: OutboundPolicy = PUBLIC_ONLY) -> None:
        self.path = path
        self.timeout_s = timeout_s
        self.outbound = outbound

    def _remote(self, url: str) -> GitPin:
        """``url`` checked against the outbound policy, its addresses pinned for git."""
        return git_pin(url, _scheme(url), self.outbound)

    def _git(self, *args: str, cred: Credential | None = None, allow: tuple[str, ...] = (),
             what: str, check: bool = True, pin: GitPin | None = None
             ) -> subprocess.CompletedProcess[str]:
        home = Path(tempfile.mkdtemp(prefix="den-git-home-"))
        env = _git_env(home, home / "known_hosts")
        env.update({"GIT_DIR": str(self.path), "GIT_CONFIG_GLOBAL": "/dev/null",
                    "GIT_NO_REPLACE_OBJECTS": "1"})
        if cred is not None:
            env.update(credential_env(cred))
        opts: list[str] = []
        for key, value in MIRROR_CONFIG.items():
            opts += ["-c", f"{key}={value}"]
        for scheme in allow:
            opts += ["-c", f"protocol.{scheme}.allow=always"]
        for key, value in (pin.config if pin is not None else {}).items():
            opts += ["-c", f"{key}={value}"]
        try:
            proc = subprocess.run(["git", *opts, *args], env=env, capture_output=True,
                                  text=True, timeout=self.timeout_s, stdin=subprocess.DEVNULL,
                                  check=False)
        except subprocess.TimeoutExpired as exc:
            raise ForgeUnavailable(f"git took longer than {self.timeout_s:g} s while {what}"
                                   ) from exc
        finally:
            shutil.rmtree(home, ignore_errors=True)
        if check and proc.returncode != 0:
            # push --porcelain reports why a ref was rejected on stdout
            stderr = _redact(proc.stderr + "\n" + proc.stdout, cred)
            raise translate(stderr, what=what)
        return proc

    def ensure(self) -> None:
        """Create the mirror if needed, and (re)write the config Den controls."""
        if not (self.path / "HEAD").exists():
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            subprocess.run(["git", "init", "--quiet", "--bare", "--template=", str(self.path)],
                           env=_git_env(self.path.parent, self.path.parent / "kh"),
                           capture_output=True, check=True, timeout=60)
        cfg = self.path / "config"
        lines = ["[core]", "\trepositoryformatversion = 0", "\tbare = true"]
        sections: dict[str, list[str]] = {}
        for key, value in MIRROR_CONFIG.items():
            section, name = key.rsplit(".", 1)
            sections.setdefault(section, []).append(f'\t{name} = "{value}"')
        for section, entries in sections.items():
            if section == "core":
                lines += entries
            else:
                lines += [f"[{section}]", *entries]
        cfg.write_text("\n".join(lines) + "\n")
        hooks = self.path / "hooks"
        if hooks.exists():
            shutil.rmtree(hooks)

    def remote_heads(self, url: str, branches: list[str], cred: Credential) -> dict[str, str]:
        """``{branch: sha}`` of those of ``branches`` that exist on the forge."""
        pin = self._remote(url)
        proc = self._git("ls-remote", "--refs", "--", pin.url,
                         *[f"refs/heads/{b}" for b in branches], cred=cred,
                         allow=(_scheme(url),), what="reading the forge's branches", pin=pin)
        out: dict[str, str] = {}
        for line in proc.stdout.splitlines():
            sha, _, ref = line.partition("\t")
            if ref.startswith("refs/heads/") and is_sha(sha):
                out[ref[len("refs/heads/"):]] = sha
        return out

    def fetch(self, url: str, branches: list[str], cred: Credential) -> None:
        """Fetch ``branches`` from the forge into ``refs/remotes/forge/*``."""
        if not branches:
            return
        specs = [f"+refs/heads/{b}:{FORGE_REFS}/{b}" for b in branches]
        pin = self._remote(url)
        self._git("fetch", "--quiet", "--no-tags", "--no-write-fetch-head", "--", pin.url,
                  *specs, cred=cred, allow=(_scheme(url),), what="fetching from the forge",
                  pin=pin)

    def known_tips(self, limit: int = 50) -> list[str]:
        """Commits the mirror has at ref tips (the workspace's bundle can leave them out)."""
        proc = self._git("for-each-ref", f"--count={limit}", "--sort=-committerdate",
                         "--format=%(objectname)", FORGE_REFS, DEN_REFS, what="listing refs")
        return [s for s in dict.fromkeys(proc.stdout.split()) if is_sha(s)]

    def import_bundle(self, bundle: Path, branch: str) -> None:
        """Fetch ``refs/heads/<branch>`` from a bundle into ``refs/den/heads/<branch>``."""
        proc = self._git("fetch", "--quiet", "--no-tags", "--no-write-fetch-head", "--",
                         str(bundle), f"+refs/heads/{branch}:{DEN_REFS}/{branch}",
                         allow=("file",), what="reading the workspace's commits", check=False)
        if proc.returncode != 0:
            raise BadBundle(f"the workspace's commits could not be read: {_reason(proc.stderr)}")

    def set_ref(self, branch: str, sha: str) -> None:
        self._git("update-ref", f"{DEN_REFS}/{branch}", sha, what="recording the branch")

    def ref(self, branch: str) -> str | None:
        proc = self._git("rev-parse", "--verify", "--quiet", f"{DEN_REFS}/{branch}^{{commit}}",
                         what="reading the branch", check=False)
        sha = proc.stdout.strip()
        return sha if proc.returncode == 0 and is_sha(sha) else None

    def has_commit(self, sha: str) -> bool:
        return self._git("cat-file", "-e", f"{sha}^{{commit}}", what="looking up a commit",
                         check=False).returncode == 0

    def is_ancestor(self, ancestor: str, descendant: str) -> bool:
        return self._git("merge-base", "--is-ancestor", ancestor, descendant,
                         what="comparing commits", check=False).returncode == 0

    def push(self, url: str, branch: str, *, mode: PushMode, remote_tip: str | None,
             cred: Credential) -> None:
        """Push ``refs/den/heads/<branch>`` to the forge's ``<branch>``, with a lease on the
        tip Den saw (an absent branch must still be absent), so nobody's work is lost."""
        if mode is PushMode.UP_TO_DATE:
            return
        lease = f"--force-with-lease=refs/heads/{branch}:{remote_tip or ''}"
        pin = self._remote(url)
        self._git("push", "--quiet", "--porcelain", "--no-verify", lease, "--", pin.url,
                  f"{DEN_REFS}/{branch}:refs/heads/{branch}", cred=cred,
                  allow=(_scheme(url),), what=f"pushing branch {branch!r}", pin=pin)


def _scheme(url: str) -> str:
    return urlsplit(url).scheme.lower() or "https"
