"""The forge provider contract and its value objects.

A provider is pure: it builds :class:`ApiRequest` values and reads JSON answers; it never does
I/O. :class:`server.forges.client.ForgeClient` sends the requests (httpx) and turns HTTP
failures into Den's errors. One module per forge (``github.py``, ``gitlab.py``, ``gitea.py``),
registered in ``providers.PROVIDERS``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import quote, urlsplit

from server.errors import DenError, ValidationFailed


@dataclass(frozen=True)
class ApiRequest:
    """One REST call, relative to the account's API URL."""

    method: str
    path: str
    params: Mapping[str, str] = field(default_factory=dict)
    json: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class RepoRef:
    """A repository on a forge: ``path`` is ``owner/name`` (GitLab: ``group/sub/name``)."""

    path: str

    @property
    def owner(self) -> str:
        return self.path.rsplit("/", 1)[0]

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[1]

    @property
    def repos_path(self) -> str:
        """``/repos/{owner}/{name}``, quoted: the resource GitHub's and Gitea's APIs share."""
        return f"/repos/{quote(self.owner, safe='')}/{quote(self.name, safe='')}"


@dataclass(frozen=True)
class Profile:
    """Who a token belongs to: the login, and the commit author Den uses for them."""

    username: str
    name: str
    email: str


@dataclass(frozen=True)
class PullRequestInfo:
    number: int
    url: str


class Provider(Protocol):
    """A forge's REST API as pure request builders and parsers.

    Every method is pure and idempotent. ``create_error`` is consulted when creating a pull
    request fails: it returns the Den error for forge-specific answers (an existing request
    for the branch is ``ALREADY_EXISTS``, a missing base ``BaseMissing``) or None to let the
    client's generic status mapping decide.
    """

    kind: str

    def default_api_url(self, base_url: str) -> str:
        """The REST root for a forge whose web and git URLs start with ``base_url``."""
        ...

    def auth_headers(self, token: str) -> dict[str, str]:
        """Headers that authenticate a REST call with ``token``, as the forge documents."""
        ...

    def git_username(self, username: str) -> str:
        """The user name to pair with the token for git over HTTPS (Basic auth)."""
        ...

    def profile_request(self) -> ApiRequest: ...

    def parse_profile(self, data: Any, *, base_url: str) -> Profile: ...

    def find_request(self, repo: RepoRef, *, branch: str, base: str) -> ApiRequest:
        """List the open pull requests from ``branch`` into ``base``."""
        ...

    def parse_found(self, data: Any, *, branch: str, base: str) -> PullRequestInfo | None: ...

    def create_request(self, repo: RepoRef, *, branch: str, base: str, title: str, body: str,
                       draft: bool) -> ApiRequest: ...

    def parse_created(self, data: Any) -> PullRequestInfo: ...

    def create_error(self, status: int, data: Any) -> DenError | None: ...


class AlreadyExists(DenError):
    """A provider's answer that an open request for the branch exists (the client then
    finds and returns it); never reaches a user."""

    status_code = 409
    code = "pull_request_exists"


def repo_ref(base_url: str, repo_url: str) -> RepoRef:
    """``owner/name`` of ``repo_url`` on the forge at ``base_url`` (which must be its prefix)."""
    base, repo = urlsplit(base_url), urlsplit(repo_url)
    prefix = base.path.rstrip("/")
    path = repo.path
    if not path.startswith(prefix + "/"):
        raise ValidationFailed(f"{repo_url} is not on the forge at {base_url}")
    path = path[len(prefix) + 1:].strip("/")
    if path.endswith(".git"):
        path = path[:-4]
    if path.count("/") < 1 or any(not p or p in (".", "..") for p in path.split("/")):
        raise ValidationFailed(f"{repo_url} does not name a repository (owner/name)")
    return RepoRef(path)


def message_of(data: Any) -> str:
    """A forge's error message from its JSON body (GitHub, GitLab and Gitea shapes)."""
    if isinstance(data, dict):
        parts: list[str] = []
        msg = data.get("message") or data.get("error") or ""
        if isinstance(msg, list):
            parts += [str(m) for m in msg]
        elif isinstance(msg, dict):
            parts += [f"{k}: {v}" for k, v in msg.items()]
        elif msg:
            parts.append(str(msg))
        for err in data.get("errors") or []:
            if isinstance(err, dict):
                parts.append(str(err.get("message") or
                                 f"{err.get('field', '')} {err.get('code', '')}".strip()))
            else:
                parts.append(str(err))
        return "; ".join(p for p in parts if p)[:500]
    if isinstance(data, str):
        return data[:500]
    return ""
