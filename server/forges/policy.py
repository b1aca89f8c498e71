"""Push policy and the parsing of what a workspace hands out, as pure functions.

The same rules run in the workspace's ``pre-push`` hook (``git_hooks/pre-push``) for early
feedback; only these, enforced on the server, count.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from enum import StrEnum

from server.errors import ValidationFailed
from server.forges.errors import BranchConflict, PushRefused

_SHA = re.compile(r"^[0-9a-f]{40}(?:[0-9a-f]{24})?$")
_BAD_CHARS = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]")
MAX_BRANCH = 200
MAX_HEADER_BYTES = 1024 * 1024


def is_sha(value: str) -> bool:
    return _SHA.match(value) is not None


def check_branch_name(branch: str, *, field: str = "branch") -> str:
    """``branch`` if it is a valid, unambiguous branch name (git check-ref-format rules)."""
    problem = None
    if not branch:
        problem = "is empty"
    elif len(branch) > MAX_BRANCH:
        problem = f"is longer than {MAX_BRANCH} characters"
    elif _BAD_CHARS.search(branch) or ".." in branch or "@{" in branch or "//" in branch:
        problem = "contains a character or sequence git does not allow in branch names"
    elif branch.startswith(("-", "/")) or branch.endswith(("/", ".")) or branch in ("@", "HEAD"):
        problem = "is not a valid branch name"
    elif any(part.startswith(".") or part.endswith(".lock") for part in branch.split("/")):
        problem = "has a part starting with '.' or ending with '.lock'"
    elif branch.startswith("refs/"):
        problem = "must be a short branch name, not a ref (drop 'refs/heads/')"
    if problem:
        raise ValidationFailed(f"{field} {branch!r} {problem}", code="invalid_branch")
    return branch


def check_target(branch: str, *, base: str, protected: list[str]) -> None:
    """Refuse pushing to the base or to a protected branch (403 ``push_refused``)."""
    if branch == base:
        raise PushRefused(
            f"branch {branch!r} is the pull request's base; push to a new branch and open a "
            "pull request into the base instead")
    for pattern in protected:
        if fnmatch.fnmatchcase(branch, pattern):
            raise PushRefused(
                f"branch {branch!r} is protected on this server (pattern {pattern!r}); "
                "pick another branch name")


class PushMode(StrEnum):
    CREATE = "create"  # the branch is new on the forge
    FAST_FORWARD = "fast-forward"
    FORCE_OWN = "force-own"  # rewrites only commits Den itself pushed last time
    UP_TO_DATE = "up-to-date"


def decide_push(*, remote_tip: str | None, new_tip: str, fast_forward: bool,
                den_pushed: str | None, branch: str) -> PushMode:
    """How to update ``branch`` on the forge; BranchConflict when that would throw away
    commits Den did not push."""
    if remote_tip is None:
        return PushMode.CREATE
    if remote_tip == new_tip:
        return PushMode.UP_TO_DATE
    if fast_forward:
        return PushMode.FAST_FORWARD
    if den_pushed is not None and remote_tip == den_pushed:
        return PushMode.FORCE_OWN
    raise BranchConflict(
        f"branch {branch!r} on the forge has commits Den did not push (it is at "
        f"{remote_tip[:12]}); Den only force-pushes over its own pushes. Pull them into the "
        "workspace (git pull) or use another branch name")


@dataclass(frozen=True)
class BundleHeader:
    version: int
    prerequisites: tuple[str, ...]
    refs: tuple[tuple[str, str], ...]  # (sha, refname)


class BadBundle(ValidationFailed):
    code = "bad_bundle"


def parse_bundle_header(data: bytes) -> BundleHeader:
    """The header of a git bundle (v2 or v3); BadBundle when it is not one."""
    end = data.find(b"\n\n", 0, MAX_HEADER_BYTES)
    if end < 0:
        raise BadBundle("the workspace did not produce a git bundle")
    lines = data[:end].decode("utf-8", errors="replace").split("\n")
    sig = {"# v2 git bundle": 2, "# v3 git bundle": 3}.get(lines[0])
    if sig is None:
        raise BadBundle("the workspace did not produce a git bundle")
    prereqs: list[str] = []
    refs: list[tuple[str, str]] = []
    for line in lines[1:]:
        if sig == 3 and line.startswith("@"):
            if line not in ("@object-format=sha1", "@object-format=sha256"):
                raise BadBundle(f"unsupported bundle capability {line[:60]!r}")
            continue
        if line.startswith("-"):
            sha = line[1:].split(" ", 1)[0]
            if not is_sha(sha):
                raise BadBundle("malformed prerequisite in the bundle")
            prereqs.append(sha)
            continue
        sha, _, ref = line.partition(" ")
        if not is_sha(sha) or not ref:
            raise BadBundle("malformed ref line in the bundle")
        refs.append((sha, ref))
    return BundleHeader(version=sig, prerequisites=tuple(prereqs), refs=tuple(refs))


def bundle_tip(header: BundleHeader, branch: str) -> str:
    """The commit the bundle carries for ``refs/heads/<branch>``, which must be its only ref."""
    want = f"refs/heads/{branch}"
    if [ref for _, ref in header.refs] != [want]:
        raise BadBundle(f"the workspace's bundle should carry exactly {want}")
    return header.refs[0][0]
