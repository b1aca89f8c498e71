"""The importable Python client for Den's HTTP API (synchronous, built on httpx).

::

    den = Den("http://127.0.0.1:8080", token="den_...")   # or Den.from_config()
    ws = den.create("https://forge/acme/api.git", branch="main")
    r = ws.exec("pytest -q")
    snap = ws.snapshot("before-upgrade")                  # disk (and, with memory=True, memory)
    fork = den.fork(snap.id, name="try-upgrade")          # a new workspace from the snapshot

Every failure surfaces as :class:`DenAPIError`; httpx and websockets exceptions are translated in
exactly two places (:meth:`Den.request` and :meth:`Den.websocket`). ``status`` is the HTTP
status of the error response, or 0 when no HTTP error response was involved:

- ``unreachable`` (0): the server could not be reached; the message names the URL.
- ``timeout`` (0): an HTTP request, or waiting for a workspace to settle, took too long.
- ``workspace_error`` (0): a workspace being waited on went to state ``error``.
- ``unexpected_state`` (0): a workspace being waited on settled in another state than wanted.
- ``exec_failed`` (0): :meth:`ExecResult.check` on a non-zero exit.
- ``stream_closed`` (0): a streaming exec or log follow ended without an exit message.
- ``not_logged_in`` (0): :meth:`Den.from_config` found no URL or token.
- anything else: the server's ``{"error": {"code", "message"}}`` for a non-2xx response.
"""

from __future__ import annotations

import codecs
import contextlib
import enum
import functools
import json
import re
import ssl
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import httpx
import websockets.exceptions
from websockets.sync.client import ClientConnection
from websockets.sync.client import connect as ws_connect

from .config import load_config

if TYPE_CHECKING:
    from .processes import Processes

__all__ = [
    "Den", "DenAPIError", "ExecResult", "FileEntry", "Prebuild", "PullRequest", "Snapshot",
    "Workspace",
    "default_name",
]

JSON = dict[str, Any]
Command = str | Sequence[str]

TRANSITIONAL_STATES = frozenset(
    {"creating", "starting", "stopping", "pausing", "resuming", "deleting"}
)
_STDIN_CHUNK = 64 * 1024
# Taking or restoring a snapshot copies the workspace's files; the server gives a copy an hour.
_SNAPSHOT_TIMEOUT_S = 3600.0
# A pull request commits, exports, fetches and pushes: minutes for a big change.
_PULL_REQUEST_TIMEOUT_S = 1800.0


class _Default(enum.Enum):
    TIMEOUT = enum.auto()  # "use the client's timeout", distinct from None ("no read timeout")

_NAME_MAX = 40


class DenAPIError(Exception):
    """An error answered by the Den server, or a client-side failure talking to it."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(status, code, message)
        self.status = status
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.message} ({self.code}, HTTP {self.status})"


@dataclass(frozen=True)
class ExecResult:
    """The outcome of a command run with :meth:`Workspace.exec`."""

    exit_code: int
    stdout: str
    stderr: str
    timed_out: bool = False
    duration_ms: int = 0

    @property
    def ok(self) -> bool:
        """True when the command exited 0 and did not time out."""
        return self.exit_code == 0 and not self.timed_out

    def check(self) -> ExecResult:
        """Return self if :attr:`ok`, else raise DenAPIError with code ``exec_failed``."""
        if self.ok:
            return self
        what = "timed out" if self.timed_out else f"exited with {self.exit_code}"
        tail = self.stderr.strip()[-500:]
        raise DenAPIError(0, "exec_failed", f"command {what}" + (f": {tail}" if tail else ""))


@dataclass(frozen=True)
class FileEntry:
    """One entry of a directory listing inside a workspace."""

    name: str
    type: str  # "file" | "dir" | "symlink" | "other"
    size: int
    mtime: float
    mode: str

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> FileEntry:
        """Build an entry from the server's JSON."""
        return cls(
            name=str(data["name"]),
            type=str(data.get("type", "other")),
            size=int(data.get("size") or 0),
            mtime=float(data.get("mtime") or 0.0),
            mode=str(data.get("mode", "")),
        )


@dataclass(frozen=True)
class Snapshot:
    """A snapshot of a workspace, as :meth:`Workspace.snapshot` and :meth:`Workspace.snapshots`
    return it. ``workspace_id`` is None once the workspace it was taken of is deleted (it can
    still be forked, not restored). ``created_at`` is ISO 8601, UTC. ``raw`` is the JSON."""

    id: str
    name: str
    workspace_id: str | None
    memory: bool
    size_bytes: int
    created_at: str
    raw: JSON = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Snapshot:
        """Build a snapshot from the server's JSON."""
        workspace_id = data.get("workspace_id")
        return cls(
            id=str(data["id"]),
            name=str(data.get("name", "")),
            workspace_id=None if workspace_id is None else str(workspace_id),
            memory=bool(data.get("memory", False)),
            size_bytes=int(data.get("size_bytes") or 0),
            created_at=str(data.get("created_at") or ""),
            raw=dict(data),
        )


@dataclass(frozen=True)
class PullRequest:
    """A pull request (GitLab: merge request) opened or updated by
    :meth:`Workspace.pull_request`. ``created`` is False when an open one for the branch
    already existed (its branch was updated). ``push`` says how the branch was updated:
    ``create``, ``fast-forward``, ``force-own`` (over Den's own last push) or ``up-to-date``."""

    number: int
    url: str
    branch: str
    base: str
    head_sha: str
    created: bool
    push: str
    forge: str
    raw: JSON = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PullRequest:
        """Build one from the server's JSON."""
        return cls(number=int(data["number"]), url=str(data["url"]),
                   branch=str(data.get("branch", "")), base=str(data.get("base", "")),
                   head_sha=str(data.get("head_sha", "")), created=bool(data.get("created")),
                   push=str(data.get("push", "")), forge=str(data.get("forge", "")),
                   raw=dict(data))


@dataclass(frozen=True)
class Prebuild:
    """A prebuild, as :meth:`Den.prebuild` and :meth:`Den.prebuilds` return it. ``state`` is
    ``building``, ``ready`` or ``failed`` (then ``reason`` says why, with the log's tail);
    ``branch`` is None for the repository's default branch. ``raw`` is the JSON."""

    id: str
    repo: str
    branch: str | None
    state: str
    reason: str
    commit: str
    snapshot_id: str | None
    created_at: str
    raw: JSON = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Prebuild:
        """Build one from the server's JSON."""
        branch, snap = data.get("branch"), data.get("snapshot_id")
        return cls(id=str(data["id"]), repo=str(data.get("repo", "")),
                   branch=None if branch is None else str(branch),
                   state=str(data.get("state", "")), reason=str(data.get("reason") or ""),
                   commit=str(data.get("commit") or ""),
                   snapshot_id=None if snap is None else str(snap),
                   created_at=str(data.get("created_at") or ""), raw=dict(data))


def _snapshot_id(snapshot: Snapshot | str) -> str:
    return snapshot.id if isinstance(snapshot, Snapshot) else str(snapshot)


def default_name(repo_url: str) -> str:
    """Derive a workspace name from a repo URL: ``https://f/acme/My_API.git`` -> ``my-api``."""
    tail = re.split(r"[/:]", repo_url.rstrip("/"))[-1]
    tail = tail.removesuffix(".git").lower()
    name = re.sub(r"[^a-z0-9-]", "-", tail)[:_NAME_MAX].strip("-")
    return name or "workspace"


def stream_message(message: str | bytes, what: str) -> JSON:
    """One JSON message of a Den WebSocket; its ``error`` message raised as DenAPIError."""
    try:
        msg = json.loads(message)
    except ValueError as exc:
        raise DenAPIError(0, "bad_response", f"{what} sent non-JSON") from exc
    if not isinstance(msg, dict):
        raise DenAPIError(0, "bad_response", f"{what} sent a non-object")
    if msg.get("type") == "error":
        err = msg.get("error") or {}
        raise DenAPIError(0, str(err.get("code", "stream_error")),
                          str(err.get("message", f"{what} failed")))
    return msg


def _seg(value: str) -> str:
    return quote(value, safe="")


def command_body(cmd: Command, *, cwd: str | None, env: Mapping[str, str] | None) -> JSON:
    """The ``cmd``, ``cwd`` and ``env`` fields that exec, the exec stream and background
    processes share (the unset ones left out)."""
    body: JSON = {"cmd": cmd if isinstance(cmd, str) else list(cmd)}
    if cwd is not None:
        body["cwd"] = cwd
    if env is not None:
        body["env"] = dict(env)
    return body


def _error_from_response(response: httpx.Response) -> DenAPIError:
    try:
        err = response.json()["error"]
        return DenAPIError(response.status_code, str(err["code"]), str(err["message"]))
    except (ValueError, KeyError, TypeError):
        status = response.status_code
        text = response.text.strip()[:200] or response.reason_phrase
        return DenAPIError(status, "http_error", f"HTTP {status}: {text}")


@functools.cache
def _tls() -> ssl.SSLContext:
    """The certificate checks of every client this process makes (the system's trust store,
    ``SSL_CERT_FILE``/``SSL_CERT_DIR`` as httpx reads them), built once: httpx builds one for
    each client otherwise, ~20 ms of reading certificates, even for an ``http://`` URL."""
    return httpx.create_ssl_context()


class Den:
    """A connection to a Den server, authenticated with an API token.

    ``transport`` (e.g. ``httpx.MockTransport``) or a ready ``http_client`` may be given for tests
    or custom TLS; a client passed in is not closed by :meth:`close`.
    """

    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        timeout_s: float = 30.0,
        poll_interval_s: float = 0.25,
        transport: httpx.BaseTransport | None = None,
        http_client: httpx.Client | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.timeout_s = timeout_s
        self.poll_interval_s = poll_interval_s
        self._owns_client = http_client is None
        self._http = http_client or httpx.Client(transport=transport, timeout=timeout_s,
                                                 verify=_tls())

    @classmethod
    def from_config(cls, **kwargs: Any) -> Den:
        """Build a client from ``den login``'s config file and ``DEN_URL``/``DEN_TOKEN``."""
        config = load_config()
        if config is None:
            raise DenAPIError(0, "not_logged_in", "not logged in; run: den login URL --token TOKEN")
        return cls(config.url, config.token, **kwargs)

    def __repr__(self) -> str:
        return f"Den({self.url!r})"

    def __enter__(self) -> Den:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the underlying HTTP client if this object created it."""
        if self._owns_client:
            self._http.close()

    def headers(self) -> dict[str, str]:
        """The headers every request carries (authorization)."""
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    @contextlib.contextmanager
    def websocket(self, url: str, *, what: str, deflate: bool = True
                  ) -> Iterator[ClientConnection]:
        """A WebSocket to ``url`` (``ws://`` or ``wss://``) with this client's token; every
        websockets failure while it is open becomes DenAPIError, ``what`` naming the
        stream in messages. ``deflate=False`` offers no compression (bulk output: the
        server's CPU, not the network, is what limits it)."""
        try:
            with ws_connect(url, additional_headers=self.headers(),
                            open_timeout=self.timeout_s, max_size=None,
                            compression="deflate" if deflate else None) as conn:
                yield conn
        except websockets.exceptions.InvalidStatus as exc:
            response = exc.response
            fake = httpx.Response(response.status_code, content=bytes(response.body or b""))
            raise _error_from_response(fake) from exc
        except websockets.exceptions.ConnectionClosed as exc:
            raise DenAPIError(0, "stream_closed", f"{what} closed: {exc}") from exc
        except (websockets.exceptions.InvalidHandshake, websockets.exceptions.InvalidURI) as exc:
            raise DenAPIError(0, "unreachable", f"cannot open {url}: {exc}") from exc
        except TimeoutError as exc:
            raise DenAPIError(0, "timeout", f"opening {url} timed out") from exc
        except OSError as exc:
            raise DenAPIError(0, "unreachable", f"cannot reach Den at {self.url}: {exc}") from exc

    def request(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        params: Mapping[str, str] | None = None,
        content: bytes | None = None,
        timeout_s: float | _Default | None = _Default.TIMEOUT,
    ) -> httpx.Response:
        """Send one request; return the 2xx response or raise DenAPIError.

        ``timeout_s`` overrides the client's timeout for this request (None: no read timeout).
        """
        url = self.url + path
        headers = self.headers()
        if content is not None:
            headers["Content-Type"] = "application/octet-stream"
        timeout: Any = httpx.USE_CLIENT_DEFAULT
        if not isinstance(timeout_s, _Default):
            timeout = httpx.Timeout(self.timeout_s, read=timeout_s)
        try:
            response = self._http.request(
                method, url, json=json_body, params=params, content=content,
                headers=headers, timeout=timeout,
            )
        except httpx.TimeoutException as exc:
            raise DenAPIError(0, "timeout", f"request to {url} timed out") from exc
        except httpx.TransportError as exc:
            raise DenAPIError(0, "unreachable", f"cannot reach Den at {self.url}: {exc}") from exc
        if not response.is_success:
            raise _error_from_response(response)
        return response

    def request_json(self, method: str, path: str, **kwargs: Any) -> JSON:
        """Like :meth:`request`, returning the response body as a JSON object."""
        response = self.request(method, path, **kwargs)
        try:
            data = response.json()
        except ValueError as exc:
            raise DenAPIError(response.status_code, "bad_response", f"{path}: not JSON") from exc
        if not isinstance(data, dict):
            raise DenAPIError(response.status_code, "bad_response", f"{path}: not a JSON object")
        return data

    # --- users and tokens -------------------------------------------------------------------

    def health(self) -> JSON:
        """``GET /healthz``."""
        return self.request_json("GET", "/healthz")

    def me(self) -> JSON:
        """The authenticated user: ``{"id", "name", "is_admin", "quotas"}`` (each limit with
        ``limit``, ``used`` and the server's ``default``)."""
        return self.request_json("GET", "/api/v1/users/me")

    def user_limits(self, name: str) -> JSON:
        """A user's limits and use (admins): ``{"user", "quotas"}``."""
        return self.request_json("GET", f"/api/v1/users/{quote(name, safe='')}/limits")

    def set_user_limits(self, name: str, limits: Mapping[str, float | None]) -> JSON:
        """Set a user's own limits (admins), replacing those set before; a limit left out
        or None is the server's."""
        return self.request_json("PUT", f"/api/v1/users/{quote(name, safe='')}/limits",
                                 json_body=dict(limits))

    def create_token(self, name: str, *, expires_in_s: int | None = None) -> JSON:
        """Create an API token; the returned ``token`` is shown only this once. With
        ``expires_in_s`` it stops working that many seconds from now."""
        body: JSON = {"name": name}
        if expires_in_s is not None:
            body["expires_in_s"] = expires_in_s
        return self.request_json("POST", "/api/v1/users/me/tokens", json_body=body)

    def tokens(self) -> list[JSON]:
        """The user's API tokens (without their secrets)."""
        return list(self.request_json("GET", "/api/v1/users/me/tokens")["tokens"])

    def delete_token(self, token_id: str) -> None:
        """Revoke an API token."""
        self.request("DELETE", f"/api/v1/users/me/tokens/{_seg(str(token_id))}")

    # --- forge accounts ---------------------------------------------------------------------

    def link_forge(self, kind: str, base_url: str, token: str, *, api_url: str | None = None,
                   author_name: str = "", author_email: str = "") -> JSON:
        """Link a GitHub, GitLab or Gitea/Forgejo account (``kind``) at ``base_url``.

        The server checks the token with the forge and stores it encrypted; it is never
        returned. Linking the same base URL again replaces the token. Returns the account
        (``id``, ``kind``, ``base_url``, ``username``, ``author_name``, ``author_email``, ...).
        """
        body: JSON = {"kind": kind, "base_url": base_url, "token": token,
                      "author_name": author_name, "author_email": author_email}
        if api_url:
            body["api_url"] = api_url
        return self.request_json("POST", "/api/v1/users/me/forges", json_body=body)

    def forges(self) -> list[JSON]:
        """The user's linked forge accounts (without tokens)."""
        return list(self.request_json("GET", "/api/v1/users/me/forges")["forges"])

    def unlink_forge(self, account_id: int | str) -> None:
        """Forget a linked forge account and its token."""
        self.request("DELETE", f"/api/v1/users/me/forges/{_seg(str(account_id))}")

    # --- SSH keys -----------------------------------------------------------------------------

    def ssh_key_challenge(self) -> str:
        """A challenge to sign with the key to register (``ssh-keygen -Y sign -n
        den-ssh-key``): proof that you hold it."""
        return str(self.request_json("POST", "/api/v1/users/me/ssh-keys/challenge")
                   ["challenge"])

    def add_ssh_key(self, public_key: str, *, challenge: str, signature: str,
                    name: str | None = None) -> JSON:
        """Register an SSH public key (one OpenSSH line) for the SSH gateway, with
        ``challenge`` (:meth:`ssh_key_challenge`) signed by its private key."""
        body: JSON = {"public_key": public_key, "challenge": challenge,
                      "signature": signature}
        if name is not None:
            body["name"] = name
        return self.request_json("POST", "/api/v1/users/me/ssh-keys", json_body=body)

    def gpus(self) -> JSON:
        """The server's GPUs: ``total``, ``free``, ``models`` (free per model),
        ``idle_action``; ``gpus`` (each with its holder) for admins, else None."""
        return dict(self.request_json("GET", "/api/v1/gpus"))

    def reclaim_gpu(self, uuid: str) -> JSON:
        """(admin) Stop the workspace holding GPU ``uuid``; the GPU as it then is."""
        return dict(self.request_json("POST", f"/api/v1/gpus/{_seg(uuid)}/reclaim"))

    def ssh_keys(self) -> list[JSON]:
        """The user's SSH keys: ``id, name, type, fingerprint, public_key, created_at, ...``."""
        return list(self.request_json("GET", "/api/v1/users/me/ssh-keys")["ssh_keys"])

    def delete_ssh_key(self, key_id: int | str) -> None:
        """Remove an SSH key."""
        self.request("DELETE", f"/api/v1/users/me/ssh-keys/{_seg(str(key_id))}")

    # --- workspaces -------------------------------------------------------------------------

    def create(
        self,
        repo_url: str,
        *,
        name: str | None = None,
        branch: str | None = None,
        image: str | None = None,
        runtime: str | None = None,
        cpus: float | None = None,
        memory_mb: int | None = None,
        disk_gb: int | None = None,
        gpus: int | None = None,
        gpu_model: str | None = None,
        env: Mapping[str, str] | None = None,
        idle_timeout_s: int | None = None,
        stop_after_s: int | None = None,
        keep_alive: bool | None = None,
        network: str | None = None,
        allow: Sequence[str] | None = None,
        devcontainer: bool = True,
        prebuild: bool = True,
        wait: bool = True,
        timeout_s: float = 300.0,
    ) -> Workspace:
        """Create a workspace from a repo; with ``wait`` (default), return once it is running.

        A repository with a devcontainer.json is built from it; ``devcontainer=False``
        ignores the file. When you have a ready prebuild of the repo and branch the
        workspace forks from it; ``prebuild=False`` builds it from scratch.

        ``network`` is the network mode (``none``, ``internet`` or ``allowlist`` with
        ``allow``: CIDRs, addresses, domain names, each optionally with ``:port``); None takes
        the server's default.

        ``idle_timeout_s`` (pause after that long idle) and ``stop_after_s`` (stop after that
        long paused) override the server's defaults, 0 meaning never; ``keep_alive=True``
        exempts the workspace from the idle reaper.

        Raises DenAPIError ``workspace_error`` if it ends in state error, ``timeout`` if it is
        not running after ``timeout_s``.
        """
        body: JSON = {
            "name": name or default_name(repo_url),
            "repo": {"url": repo_url, "branch": branch},
        }
        resources = {"cpus": cpus, "memory_mb": memory_mb, "disk_gb": disk_gb, "gpus": gpus,
                     "gpu_model": gpu_model}
        optional: JSON = {
            "image": image,
            "runtime": runtime,
            "resources": {k: v for k, v in resources.items() if v is not None} or None,
            "env": dict(env) if env is not None else None,
            "idle_timeout_s": idle_timeout_s,
            "stop_after_s": stop_after_s,
            "keep_alive": keep_alive,
            "network": ({"mode": network, "allow": list(allow or [])}
                        if network is not None else None),
        }
        body.update({k: v for k, v in optional.items() if v is not None})
        if not devcontainer:
            body["devcontainer"] = False
        if not prebuild:
            body["prebuild"] = False
        ws = Workspace(self, self.request_json("POST", "/api/v1/workspaces", json_body=body))
        if wait:
            ws.wait_for("running", timeout_s=timeout_s)
        return ws

    def workspaces(self, *, page_size: int = 500) -> list[Workspace]:
        """The workspaces visible to the user (all of them for an admin), in creation order,
        asked for ``page_size`` at a time (``limit`` and ``next``)."""
        out: list[Workspace] = []
        params = {"limit": str(page_size)}
        while True:
            data = self.request_json("GET", "/api/v1/workspaces", params=params)
            out += [Workspace(self, item) for item in data["workspaces"]]
            cursor = data.get("next")
            if not cursor:
                return out
            params = {"limit": str(page_size), "after": str(cursor)}

    def workspace(self, id_or_name: str) -> Workspace:
        """One workspace, by id or name."""
        return Workspace(self, self.request_json("GET", f"/api/v1/workspaces/{_seg(id_or_name)}"))

    # --- snapshots and forks ----------------------------------------------------------------

    def fork(
        self,
        snapshot_id: Snapshot | str,
        *,
        name: str | None = None,
        wait: bool = True,
        timeout_s: float = 300.0,
    ) -> Workspace:
        """Create a new, independent workspace from a snapshot; with ``wait`` (default), return
        once it is running.

        The fork gets the snapshot's files (and, for a memory snapshot, its processes) and the
        server's default resources. ``name`` defaults on the server to ``<snapshot name>-fork``.
        Raises like :meth:`create`; another user's snapshot is a 404 ``not_found``.
        """
        body: JSON = {"from_snapshot": _snapshot_id(snapshot_id)}
        if name is not None:
            body["name"] = name
        ws = Workspace(self, self.request_json("POST", "/api/v1/workspaces", json_body=body))
        if wait:
            ws.wait_for("running", timeout_s=timeout_s)
        return ws

    def restore_snapshot(
        self, snapshot_id: Snapshot | str, *, timeout_s: float = _SNAPSHOT_TIMEOUT_S
    ) -> Workspace:
        """Roll the snapshot's workspace back to it (stop, replace its files, start); return the
        workspace once it is running again.

        Raises DenAPIError 409 ``workspace_gone`` when that workspace was deleted (fork the
        snapshot instead), 409 ``conflict`` when it is in a transition.
        """
        path = f"/api/v1/snapshots/{_seg(_snapshot_id(snapshot_id))}/restore"
        return Workspace(self, self.request_json("POST", path, timeout_s=timeout_s))

    def delete_snapshot(self, snapshot_id: Snapshot | str) -> None:
        """Delete a snapshot (its image, volume and saved memory); forks made from it stay."""
        self.request("DELETE", f"/api/v1/snapshots/{_seg(_snapshot_id(snapshot_id))}")

    # --- prebuilds --------------------------------------------------------------------------

    def prebuild(self, repo_url: str, *, branch: str | None = None, wait: bool = False,
                 timeout_s: float = 1800.0) -> Prebuild:
        """Start a prebuild of ``repo_url`` at ``branch`` (None: its default branch); the
        server answers the one in progress when there is one. With ``wait``, return once it
        is ``ready`` or ``failed``."""
        body: JSON = {"repo": repo_url}
        if branch is not None:
            body["branch"] = branch
        pb = Prebuild.from_json(self.request_json("POST", "/api/v1/prebuilds", json_body=body))
        return self.wait_prebuild(pb.id, timeout_s=timeout_s) if wait else pb

    def prebuilds(self) -> list[Prebuild]:
        """Your prebuilds, oldest first (every user's for an admin)."""
        data = self.request_json("GET", "/api/v1/prebuilds")
        return [Prebuild.from_json(item) for item in data["prebuilds"]]

    def get_prebuild(self, prebuild_id: str) -> Prebuild:
        return Prebuild.from_json(
            self.request_json("GET", f"/api/v1/prebuilds/{_seg(prebuild_id)}"))

    def wait_prebuild(self, prebuild_id: str, *, timeout_s: float = 1800.0) -> Prebuild:
        """Poll until the prebuild is no longer ``building``; DenAPIError ``timeout``."""
        deadline = time.monotonic() + timeout_s
        delay = 0.2
        while True:
            pb = self.get_prebuild(prebuild_id)
            if pb.state != "building":
                return pb
            if time.monotonic() + delay > deadline:
                raise DenAPIError(0, "timeout", f"prebuild {prebuild_id} still building "
                                                f"after {timeout_s:g} s")
            time.sleep(delay)
            delay = min(delay * 1.5, 2.0)

    def delete_prebuild(self, prebuild_id: str) -> None:
        """Delete a prebuild and its snapshot; workspaces made from it keep running."""
        self.request("DELETE", f"/api/v1/prebuilds/{_seg(prebuild_id)}")


class Workspace:
    """A thin handle on one workspace: the client plus the last JSON seen from the server."""

    def __init__(self, den: Den, data: Mapping[str, Any]) -> None:
        self.den = den
        self._data: JSON = dict(data)

    def __repr__(self) -> str:
        return f"Workspace(name={self.name!r}, id={self.id!r}, state={self.state!r})"

    @property
    def raw(self) -> JSON:
        """A copy of the last workspace JSON seen."""
        return dict(self._data)

    @property
    def id(self) -> str:
        return str(self._data["id"])

    @property
    def name(self) -> str:
        return str(self._data.get("name", ""))

    @property
    def state(self) -> str:
        """The state when last seen; call :meth:`refresh` to update it."""
        return str(self._data.get("state", ""))

    @property
    def sleep(self) -> str | None:
        """How a paused workspace sleeps: "frozen" (in place) or "saved" (to disk)."""
        sleep = self._data.get("sleep")
        return None if sleep is None else str(sleep)

    @property
    def state_reason(self) -> str | None:
        reason = self._data.get("state_reason")
        return None if reason is None else str(reason)

    @property
    def repo_url(self) -> str | None:
        url = (self._data.get("repo") or {}).get("url")
        return None if url is None else str(url)

    @property
    def repo_path(self) -> str | None:
        """Where the repo is checked out inside the workspace, e.g. ``/workspace/api``."""
        path = (self._data.get("repo") or {}).get("path")
        return None if path is None else str(path)

    @property
    def ssh(self) -> JSON | None:
        """Where the SSH gateway reaches this workspace: ``host, port, user, command``; None
        when the server's gateway is off."""
        value = self._data.get("ssh")
        return dict(value) if isinstance(value, dict) else None

    @property
    def keepalive_until(self) -> str | None:
        """When the keepalive lease ends (ISO 8601, UTC), or None without a lease."""
        until = self._data.get("keepalive_until")
        return None if until is None else str(until)

    @property
    def _path(self) -> str:
        return f"/api/v1/workspaces/{_seg(self.id)}"

    # --- lifecycle --------------------------------------------------------------------------

    def refresh(self) -> Workspace:
        """Re-read the workspace from the server; return self."""
        self._data = self.den.request_json("GET", self._path)
        return self

    def wait_for(self, state: str = "running", *, timeout_s: float = 300.0) -> Workspace:
        """Wait until the workspace is in ``state``; return self. It follows the workspace's
        event stream (``WS .../events/stream``) and so returns as soon as the state changes;
        where the stream cannot be opened (a proxy without WebSockets) it polls every
        ``poll_interval_s``.

        Raises DenAPIError ``workspace_error`` (state error), ``unexpected_state`` (settled in
        another state) or ``timeout``.
        """
        deadline = time.monotonic() + timeout_s
        if self._settled(state, timeout_s, deadline):
            return self
        outcome: DenAPIError | None = None
        try:
            with self.den.websocket(self.ws_url("events/stream"), what="event stream") as conn:
                try:
                    self.refresh()  # what changed before the stream opened
                    while not self._settled(state, timeout_s, deadline):
                        if self._next_state(conn, deadline) is not None:
                            self.refresh()
                except DenAPIError as exc:  # the workspace's outcome, not the stream's
                    outcome = exc
        except DenAPIError:
            pass  # no stream (a proxy without WebSockets), or it broke: poll
        else:
            if outcome is not None:
                raise outcome
            return self
        while not self._settled(state, timeout_s, deadline):
            time.sleep(max(0.0, min(self.den.poll_interval_s, deadline - time.monotonic())))
            self.refresh()
        return self

    def _settled(self, state: str, timeout_s: float, deadline: float) -> bool:
        """Whether the workspace (as last read) is in ``state``; raises when it never will
        be, or when ``deadline`` has passed."""
        if self.state == state:
            return True
        if self.state == "error":
            raise DenAPIError(0, "workspace_error", self.state_reason or "workspace failed")
        if self.state not in TRANSITIONAL_STATES:
            raise DenAPIError(0, "unexpected_state",
                              f"workspace {self.name} is {self.state}, not {state}")
        if time.monotonic() >= deadline:
            raise DenAPIError(0, "timeout",
                              f"workspace {self.name} still {self.state} after {timeout_s:g}s")
        return False

    def _next_state(self, conn: ClientConnection, deadline: float) -> str | None:
        """The state the next event of the stream moved the workspace to (None: an event of
        another kind, or none before ``deadline``); DenAPIError ``not_found`` when the
        workspace was deleted."""
        try:
            raw = conn.recv(timeout=max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            return None
        msg = json.loads(raw)
        if msg.get("type") == "deleted":
            raise DenAPIError(404, "not_found", f"workspace {self.name} was deleted")
        if msg.get("type") == "error":
            err = msg.get("error") or {}
            raise DenAPIError(int(err.get("status") or 0), str(err.get("code") or "error"),
                              str(err.get("message") or "event stream error"))
        event = msg.get("event") or {}
        # The stream starts with the log's last events: a change older than the workspace
        # as last read (its ``updated_at``, the last state change) is no news.
        if not event.get("to_state") or str(event.get("at") or "") < str(
                self._data.get("updated_at") or ""):
            return None
        return str(event["to_state"])

    def _lifecycle(self, action: str, timeout_s: float) -> Workspace:
        self._data = self.den.request_json("POST", f"{self._path}/{action}", timeout_s=timeout_s)
        return self

    def start(self, *, timeout_s: float = 300.0) -> Workspace:
        """Start a stopped workspace (a paused one is resumed); returns when it is running."""
        return self._lifecycle("start", timeout_s)

    def stop(self, *, timeout_s: float = 300.0) -> Workspace:
        """Stop the workspace (processes end, the disk stays)."""
        return self._lifecycle("stop", timeout_s)

    def pause(self, *, timeout_s: float = 300.0) -> Workspace:
        """Checkpoint memory and processes and free CPU and RAM; returns when it is paused.

        Processes started by exec are ended first; those in dev's tmux survive. Pausing a
        paused or stopped workspace changes nothing.
        """
        return self._lifecycle("pause", timeout_s)

    def resume(self, *, timeout_s: float = 300.0) -> Workspace:
        """Restore a paused workspace from its checkpoint; returns when it is running.

        When the restore fails the server starts it cold from its disk (see :meth:`events`).
        Resuming a running workspace changes nothing; a stopped one is a 409 ``conflict``.
        """
        return self._lifecycle("resume", timeout_s)

    def keepalive(self, ttl_s: int, *, timeout_s: float = 300.0) -> Workspace:
        """Keep the workspace awake for ``ttl_s`` seconds (0 ends the lease); return self.

        The idle reaper does not pause it while the lease lasts; a paused or stopped workspace
        is woken first. Each call replaces the previous lease; see :attr:`keepalive_until`.
        """
        self._data = self.den.request_json(
            "POST", f"{self._path}/keepalive", json_body={"ttl_s": ttl_s}, timeout_s=timeout_s
        )
        return self

    @property
    def network(self) -> JSON:
        """The network policy: ``{"mode": ..., "allow": [...]}``."""
        return dict(self._data.get("network") or {})

    def set_network(self, mode: str, allow: Sequence[str] = ()) -> Workspace:
        """Change the network policy (``none``, ``internet``, ``allowlist`` with ``allow``);
        a running workspace gets it at once, without a restart. Returns self."""
        self._data = self.den.request_json(
            "PATCH", self._path, json_body={"network": {"mode": mode, "allow": list(allow)}})
        return self

    def delete(self, *, snapshots: bool = False) -> bool:
        """Delete the workspace and its disk; True if done, False if still in progress (202).

        Its snapshots are kept (they can still be forked) unless ``snapshots=True``.
        """
        params = {"snapshots": "true"} if snapshots else None
        response = self.den.request("DELETE", self._path, params=params)
        if response.status_code == 202:
            self._data["state"] = "deleting"
            return False
        return True

    def events(self) -> list[JSON]:
        """The event log: ``{"id", "at", "kind", "from_state", "to_state", "actor", "message"}``."""
        return list(self.den.request_json("GET", f"{self._path}/events")["events"])

    # --- preview ports ----------------------------------------------------------------------

    def ports(self) -> list[JSON]:
        """Listening ports and ports with a share level: ``{"port", "listening" (None while
        not running), "share", "url" (the preview origin, or None), "path_url"}``."""
        return list(self.den.request_json("GET", f"{self._path}/ports")["ports"])

    def share_port(self, port: int, share: str) -> JSON:
        """Set the share level of ``port``: ``private`` (you), ``users`` (anyone signed in to
        this Den) or ``public`` (anyone with the URL, when the server allows it)."""
        return dict(self.den.request_json("PUT", f"{self._path}/ports/{int(port)}",
                                          json_body={"share": share}))

    def share_link(self, port: int, *, ttl_s: int = 3600) -> JSON:
        """A signed link that opens ``port`` for ``ttl_s`` seconds without signing in:
        ``{"url", "path_url", "expires_at"}``."""
        return dict(self.den.request_json("POST", f"{self._path}/ports/{int(port)}/links",
                                          json_body={"ttl_s": ttl_s}))

    def share_links(self, port: int) -> list[JSON]:
        """The live share links of ``port``: ``{"id", "port", "created_by", "created_at",
        "expires_at"}`` (the links themselves are shown only when made)."""
        return list(self.den.request_json("GET", f"{self._path}/ports/{int(port)}/links")
                    ["links"])

    def revoke_share_link(self, port: int, link_id: str) -> None:
        """End a share link before it expires; it is then refused like a tampered one."""
        self.den.request("DELETE", f"{self._path}/ports/{int(port)}/links/"
                                   f"{quote(link_id, safe='')}")

    @property
    def processes(self) -> Processes:
        """Background processes: ``start``, ``list``, ``logs``, ``kill``."""
        from .processes import Processes  # that module builds on this one

        return Processes(self)

    # --- pull requests ----------------------------------------------------------------------

    def pull_request(
        self,
        title: str,
        *,
        body: str = "",
        branch: str | None = None,
        base: str | None = None,
        commit_message: str | None = None,
        draft: bool = False,
        timeout_s: float = _PULL_REQUEST_TIMEOUT_S,
    ) -> PullRequest:
        """Commit what is uncommitted, push ``branch`` and open a pull request into ``base``.

        The server commits in the workspace (author from the linked forge profile), pushes
        from its own mirror with the user's linked forge token (which never enters the
        workspace) and opens the pull request, or returns the open one for the branch.
        ``branch`` defaults to ``den/<workspace name>``, ``base`` to the workspace's branch.
        Refusals are DenAPIError: ``push_refused`` (403, base or protected branch),
        ``branch_conflict`` (409, commits Den did not push), ``push_too_large`` (413),
        ``forge_not_linked``, ``forge_token_invalid``, ``base_missing`` (422),
        ``forge_rate_limited`` (429), ``forge_unavailable`` (502).
        """
        payload: JSON = {"title": title, "body": body, "draft": draft}
        for key, value in (("branch", branch), ("base", base),
                           ("commit_message", commit_message)):
            if value is not None:
                payload[key] = value
        data = self.den.request_json("POST", f"{self._path}/pull-requests", json_body=payload,
                                     timeout_s=timeout_s)
        return PullRequest.from_json(data)

    # --- snapshots --------------------------------------------------------------------------

    def snapshot(
        self, name: str, *, memory: bool = False, timeout_s: float = _SNAPSHOT_TIMEOUT_S
    ) -> Snapshot:
        """Take a snapshot of the workspace's disk (container filesystem and /workspace).

        ``memory=True`` also saves its memory and processes: the workspace is paused for the
        moment of the snapshot (ending processes started by exec, as any pause does) and
        resumed afterwards if it was running. A stopped workspace cannot take one (409
        ``conflict``). Taking more than the server keeps per workspace deletes the oldest.
        """
        data = self.den.request_json(
            "POST", f"{self._path}/snapshots", json_body={"name": name, "memory": memory},
            timeout_s=timeout_s,
        )
        return Snapshot.from_json(data)

    def snapshots(self) -> list[Snapshot]:
        """The workspace's snapshots, oldest first."""
        data = self.den.request_json("GET", f"{self._path}/snapshots")
        return [Snapshot.from_json(item) for item in data["snapshots"]]

    # --- exec -------------------------------------------------------------------------------

    def exec(
        self,
        cmd: Command,
        *,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        timeout_s: float | None = None,
        stdin: str | bytes | None = None,
        check: bool = False,
    ) -> ExecResult:
        """Run a command (argv list, or a string for ``bash -c``, ``sh -c`` in an image
        without bash) and wait for it to finish."""
        body = command_body(cmd, cwd=cwd, env=env)
        if timeout_s is not None:
            body["timeout_s"] = timeout_s
        if stdin is not None:
            body["stdin"] = stdin.decode("utf-8") if isinstance(stdin, bytes) else stdin
        # the server enforces timeout_s; give it a margin to answer before the client gives up
        http_timeout = None if timeout_s is None else timeout_s + 30.0
        data = self.den.request_json(
            "POST", f"{self._path}/exec", json_body=body, timeout_s=http_timeout
        )
        result = ExecResult(
            exit_code=int(data["exit_code"]),
            stdout=str(data.get("stdout", "")),
            stderr=str(data.get("stderr", "")),
            timed_out=bool(data.get("timed_out", False)),
            duration_ms=int(data.get("duration_ms") or 0),
        )
        return result.check() if check else result

    def ws_url(self, suffix: str) -> str:
        """The ws(s):// URL of a WebSocket endpoint under this workspace."""
        base = self.den.url
        if base.startswith("https://"):
            base = "wss://" + base.removeprefix("https://")
        elif base.startswith("http://"):
            base = "ws://" + base.removeprefix("http://")
        return f"{base}{self._path}/{suffix}"

    def exec_stream(
        self,
        cmd: Command,
        *,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        stdin: bytes | str | None = None,
        on_stdout: Callable[[str], None] | None = None,
        on_stderr: Callable[[str], None] | None = None,
        tty: bool = False,
    ) -> int:
        """Run a command over the streaming WebSocket and return its exit code.

        Output is passed to ``on_stdout``/``on_stderr`` as it arrives (discarded if None),
        decoded as UTF-8 (a character split between two pieces arrives whole; bytes that are
        not UTF-8 become U+FFFD). ``stdin`` is sent in full and then closed (bytes as they
        are, text as UTF-8); None means empty stdin. The output comes as binary frames
        (``"binary": true``): no JSON escaping on either side.
        """
        first = {**command_body(cmd, cwd=cwd, env=env), "tty": tty, "binary": True}
        data = stdin.encode("utf-8") if isinstance(stdin, str) else (stdin or b"")
        decoders = {n: codecs.getincrementaldecoder("utf-8")("replace") for n in (1, 2)}
        sinks = {1: on_stdout, 2: on_stderr}

        def deliver(stream: int, piece: bytes, *, final: bool = False) -> None:
            sink = sinks.get(stream)
            text = decoders[stream].decode(piece, final=final) if stream in decoders else ""
            if sink is not None and text:
                sink(text)

        with self.den.websocket(self.ws_url("exec/stream"), what="exec stream",
                                deflate=False) as conn:
            conn.send(json.dumps(first))
            for start in range(0, len(data), _STDIN_CHUNK):
                conn.send(data[start : start + _STDIN_CHUNK])
            conn.send(json.dumps({"type": "close_stdin"}))
            for message in conn:
                if isinstance(message, bytes):
                    deliver(message[0] if message else 0, message[1:])
                    continue
                msg = stream_message(message, "exec stream")
                if msg.get("type") == "exit":
                    for stream in decoders:
                        deliver(stream, b"", final=True)
                    return int(msg["exit_code"])
        raise DenAPIError(0, "stream_closed", "exec stream ended without an exit status")

    # --- files ------------------------------------------------------------------------------

    def read_file(self, path: str) -> bytes:
        """The contents of a file under /workspace (relative paths are relative to it)."""
        return self.den.request("GET", f"{self._path}/files", params={"path": path}).content

    def write_file(self, path: str, data: bytes | str) -> int:
        """Create or replace a file (parents are created by the server); return its size."""
        content = data.encode("utf-8") if isinstance(data, str) else data
        body = self.den.request_json(
            "PUT", f"{self._path}/files", params={"path": path}, content=content, timeout_s=None
        )
        return int(body.get("size", len(content)))

    def list_files(self, path: str = ".") -> list[FileEntry]:
        """The entries of a directory under /workspace."""
        data = self.den.request_json("GET", f"{self._path}/files/list", params={"path": path})
        return [FileEntry.from_json(entry) for entry in data["entries"]]

    def delete_file(self, path: str, *, recursive: bool = False) -> None:
        """Delete a file, or a directory with ``recursive=True``."""
        params = {"path": path, "recursive": "true" if recursive else "false"}
        self.den.request("DELETE", f"{self._path}/files", params=params)

    def stat_file(self, path: str) -> FileEntry:
        """What a path under /workspace is (a symlink itself, not its target)."""
        data = self.den.request_json("GET", f"{self._path}/files/stat", params={"path": path})
        return FileEntry.from_json(data)

    def make_dir(self, path: str, *, parents: bool = True) -> FileEntry:
        """Make a directory (with ``parents``, its parents too, and one that exists is fine)."""
        params = {"path": path, "parents": "true" if parents else "false"}
        data = self.den.request_json("POST", f"{self._path}/files/mkdir", params=params)
        return FileEntry.from_json(data)

    def rename_file(self, src: str, dst: str) -> FileEntry:
        """Rename a file, directory or symlink inside /workspace; the entry at ``dst``."""
        data = self.den.request_json("POST", f"{self._path}/files/rename",
                                     json_body={"from": src, "to": dst})
        return FileEntry.from_json(data)
