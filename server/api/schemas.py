"""Request and response bodies of the HTTP API (separate from ORM rows)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal, Self

from fastapi import Path
from pydantic import BaseModel, ConfigDict, Field, StrictInt, model_validator
from pydantic_core import PydanticCustomError

from server.config import Settings
from server.db.models import Event, ForgeAccount, Prebuild, Snapshot, SSHKey, Workspace
from server.gpus.allocation import idle_action
from server.runtime.base import ExecRequest, ProcessInfo
from server.ssh.target import ssh_endpoint
from server.workspaces.processes import LOG_BYTES_DEFAULT, LOG_BYTES_MAX, LOG_BYTES_MIN


class ErrorDetail(BaseModel):
    code: str = Field(description="A stable slug (docs/api.md lists them)")
    message: str = Field(description="For people; may change")
    limit: str | None = Field(None, description="`quota_exceeded`: the per-user limit passed "
                                               "(`workspaces`, `cpus`, `execs`, ...)")
    value: float | None = Field(None, description="`quota_exceeded`: that limit's value")


class ErrorOut(BaseModel):
    """Every error answer of the API."""

    error: ErrorDetail


_STATUS_TEXT = {
    400: "The HTTP layer refused the request",
    401: "No, unknown or revoked bearer token",
    403: "Not allowed (inside the workspace, or a path outside /workspace)",
    404: "No such object, or another user's",
    409: "Not possible in the current state, or a name or key already taken",
    413: "Too large",
    422: "Invalid input",
    429: "A per-user limit is reached (`quota_exceeded`), or too many requests "
         "(`rate_limited`, with Retry-After)",
    500: "A bug, or the workspace's disk is full",
    501: "The workspace's runtime backend has no agent",
    502: "The engine, a forge or the workspace's agent failed",
    503: "The engine cannot be reached",
    504: "The workspace's agent stopped answering",
}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """Route ``responses=`` for the error statuses an operation can answer, each with the
    error body's schema (401, 422 and 500 are added: every authenticated operation can
    answer them, and 429: the rate limits apply to every one)."""
    wanted = sorted({401, 422, 429, 500, *statuses})
    out: dict[int | str, dict[str, Any]] = {
        s: {"model": ErrorOut, "description": _STATUS_TEXT[s]} for s in wanted}
    out[429]["headers"] = {"Retry-After": {
        "description": "Seconds until a request is let in again (with `rate_limited`)",
        "schema": {"type": "integer"}}}
    return out


YEAR_S = 365 * 86400
ROW_ID_MAX = 2**31 - 1  # integer keys: 32-bit on PostgreSQL (64 on SQLite)

# The id of a token, SSH key or forge account in a path.
RowId = Annotated[int, Path(ge=1, le=ROW_ID_MAX, description="The id from the listing")]


def _lone_surrogate(value: Any) -> bool:
    """Whether a string in ``value`` holds a lone surrogate (JSON allows ``"\\ud800"``; it
    is no character and cannot be encoded as UTF-8)."""
    if isinstance(value, str):
        try:
            value.encode()
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, dict):
        return any(_lone_surrogate(k) or _lone_surrogate(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return any(_lone_surrogate(v) for v in value)
    return False


class _Strict(BaseModel):
    """A request body: unknown fields refused, no coercion (``"60"`` or ``true`` is not a
    number), every string valid Unicode."""

    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="after")
    def _valid_unicode(self) -> Self:
        for name, value in self:
            if _lone_surrogate(value):
                raise PydanticCustomError(
                    "invalid_unicode",
                    "{field}: text holds a lone surrogate (\\ud800-\\udfff), which is not "
                    "a character", {"field": name})
        return self


class RepoIn(_Strict):
    url: str = Field(max_length=2048, description="https, ssh, git, file:// URL or local path")
    branch: str | None = Field(None, max_length=255)


class ResourcesIn(_Strict):
    cpus: float | None = Field(default=None, ge=0.1, description="At most DEN_MAX_CPUS")
    memory_mb: int | None = Field(default=None, ge=128, description="At most DEN_MAX_MEMORY_MB")
    disk_gb: int | None = Field(
        default=None, ge=1, description="GiB for /workspace and the root filesystem together "
        "(writing past it is ENOSPC inside); at most DEN_MAX_DISK_GB")
    gpus: int = Field(default=0, ge=0, description="Whole GPUs, held while running; at most "
                      "DEN_MAX_GPUS")
    gpu_model: str | None = Field(
        default=None, max_length=255,
        description='Only GPUs whose model contains this (any case), e.g. "A100"')


class NetworkIn(_Strict):
    mode: str = Field(max_length=16, description='"none", "internet" or "allowlist"')
    allow: list[Annotated[str, Field(max_length=260)]] = Field(
        default_factory=list, max_length=64,
        description="Allowlist entries: CIDRs, addresses, domain names (`*.name`: its "
                    "subdomains), each optionally with :port")


class WorkspaceCreate(_Strict):
    name: str | None = Field(None, max_length=64)
    repo: RepoIn | None = None
    from_snapshot: str | None = Field(
        None, max_length=32, description="Fork: a snapshot id instead of a repo")
    image: str | None = Field(None, max_length=255)
    runtime: str | None = None
    resources: ResourcesIn = Field(default_factory=ResourcesIn)
    env: dict[str, str] = Field(default_factory=dict)
    idle_timeout_s: int | None = Field(
        None, ge=0, le=YEAR_S,
        description="Pause after this many idle seconds; 0 never; null the default")
    stop_after_s: int | None = Field(
        None, ge=0, le=YEAR_S,
        description="Stop after this many seconds paused; 0 never; null the default")
    keep_alive: bool = False
    network: NetworkIn | None = Field(
        None, description="Network policy; null: the server's default mode")
    devcontainer: bool = Field(
        True, description="Build the workspace from the repository's devcontainer.json "
                          "(.devcontainer/devcontainer.json or .devcontainer.json) when it has "
                          "one; false ignores the file (docs/devcontainer.md)")
    prebuild: bool = Field(
        True, description="Fork from your newest ready prebuild of the repository and branch "
                          "when there is one (docs/prebuilds.md); false builds from scratch")


class WorkspacePatch(_Strict):
    network: NetworkIn | None = Field(None, description="New network policy, applied at once")


class KeepaliveIn(_Strict):
    ttl_s: int = Field(ge=0, description="Seconds to keep the workspace awake (at most "
                       "DEN_MAX_KEEPALIVE_S); 0 ends the lease")


class SnapshotCreate(_Strict):
    name: str = Field(max_length=64)
    memory: bool = False


class SnapshotOut(BaseModel):
    id: str
    name: str
    workspace_id: str | None
    memory: bool
    size_bytes: int
    created_at: datetime

    @classmethod
    def of(cls, snap: Snapshot) -> SnapshotOut:
        return cls(id=snap.id, name=snap.name, workspace_id=snap.workspace_id,
                   memory=snap.memory, size_bytes=snap.size_bytes, created_at=snap.created_at)


class SnapshotList(BaseModel):
    snapshots: list[SnapshotOut]


class PrebuildCreate(_Strict):
    repo: str = Field(max_length=2048, description="The repository's URL, as for a create")
    branch: str | None = Field(None, max_length=255, description="null: the default branch")


class PrebuildOut(BaseModel):
    id: str
    repo: str
    branch: str | None = Field(description="null: the repository's default branch")
    state: str = Field(description='"building", "ready" or "failed"')
    reason: str = Field(description="Why it failed, with the tail of the log; else empty")
    commit: str = Field(description="The commit it holds, once ready")
    snapshot_id: str | None = Field(description="Its memory snapshot, once ready")
    workspace_id: str | None = Field(description="The workspace making it, while building")
    created_at: datetime
    finished_at: datetime | None
    fork_ready: bool = Field(False, description="A fork of it is made ahead and frozen: your "
                             "next create of the same repository and branch with the default "
                             "resources takes it (docs/prebuilds.md)")

    @classmethod
    def of(cls, pb: Prebuild, *, fork_ready: bool = False) -> PrebuildOut:
        return cls(id=pb.id, repo=pb.repo_url, branch=pb.branch or None, state=pb.state,
                   reason=pb.reason, commit=pb.commit, snapshot_id=pb.snapshot_id,
                   workspace_id=pb.workspace_id, created_at=pb.created_at,
                   finished_at=pb.finished_at, fork_ready=fork_ready)


class PrebuildList(BaseModel):
    prebuilds: list[PrebuildOut]


class RepoOut(BaseModel):
    url: str
    branch: str | None
    path: str


class ResourcesOut(BaseModel):
    cpus: float
    memory_mb: int
    disk_gb: int
    gpus: int
    gpu_model: str | None
    gpu_uuids: list[str] = Field(description="The GPUs its container is made with (held "
                                 "while it runs)")
    pids: int


class NetworkOut(BaseModel):
    mode: str
    allow: list[str]


class WorkspaceOut(BaseModel):
    id: str
    name: str
    owner: str
    state: str
    state_reason: str
    sleep: Literal["frozen", "saved"] | None = Field(
        None, description="How a paused workspace sleeps: frozen in place (memory kept, wakes "
                          "in milliseconds) or saved to disk (memory checkpointed); null "
                          "unless paused")
    repo: RepoOut
    image: str
    runtime: str
    resources: ResourcesOut
    env: dict[str, str]
    idle_timeout_s: int | None
    stop_after_s: int | None
    keep_alive: bool
    keepalive_until: datetime | None
    created_at: datetime
    updated_at: datetime
    last_activity_at: datetime
    network: NetworkOut
    idle_action: str = Field(description='What idling does: "pause" (memory kept) or "stop" '
                             '(disk kept: a GPU workspace, see docs/gpus.md)')
    ssh: dict[str, str | int] | None = None

    @classmethod
    def of(cls, ws: Workspace, settings: Settings | None = None) -> WorkspaceOut:
        """``settings`` fills ``ssh`` (where the SSH gateway is; null when it is off)."""
        return cls(
            id=ws.id, name=ws.name, owner=ws.owner.name, state=ws.state,
            state_reason=ws.state_reason,
            sleep=_sleep_of(ws),
            repo=RepoOut(url=ws.repo_url, branch=ws.repo_branch,
                         path=f"/workspace/{ws.repo_dir}"),
            image=ws.image, runtime=ws.runtime,
            resources=ResourcesOut(cpus=ws.cpus, memory_mb=ws.memory_mb, disk_gb=ws.disk_gb,
                                   gpus=ws.gpus, gpu_model=ws.gpu_model,
                                   gpu_uuids=list((ws.engine or {}).get("gpus", [])),
                                   pids=ws.pids_limit),
            env={str(k): str(v) for k, v in ws.env.items()},
            idle_timeout_s=ws.idle_timeout_s, stop_after_s=ws.stop_after_s,
            keep_alive=ws.keep_alive, keepalive_until=ws.keepalive_until,
            created_at=ws.created_at, updated_at=ws.updated_at,
            last_activity_at=ws.last_activity_at,
            network=NetworkOut(mode=str((ws.network or {}).get("mode") or (
                settings.network_default_mode if settings is not None else "internet")),
                               allow=[str(a) for a in (ws.network or {}).get("allow") or []]),
            idle_action=idle_action(ws.gpus, checkpoint=settings is not None
                                    and settings.gpu_checkpoint),
            ssh=ssh_endpoint(settings, ws.name) if settings is not None else None,
        )


def _sleep_of(ws: Workspace) -> Literal["frozen", "saved"] | None:
    if ws.state != "paused":
        return None
    return "frozen" if ws.sleep == "frozen" else "saved"


class WorkspaceList(BaseModel):
    workspaces: list[WorkspaceOut]
    next: str | None = Field(None, description="With `limit`: the cursor of the next page "
                             "(pass it as `after`); null on the last page")


class ExecIn(_Strict):
    cmd: list[str] | str
    cwd: str | None = Field(None, max_length=4096)
    env: dict[str, str] = Field(default_factory=dict)
    timeout_s: float | None = Field(None, gt=0, description="At most DEN_EXEC_MAX_TIMEOUT_S")
    stdin: str | None = None
    tty: bool = False
    cols: int = Field(80, ge=1, le=1000)
    rows: int = Field(24, ge=1, le=1000)


class ExecStreamIn(ExecIn):
    """The first message of ``WS .../exec/stream``."""

    binary: bool = Field(False, description="Output as binary frames (first byte 1: stdout, "
                         "2: stderr; the rest: the bytes) instead of JSON text messages")


class ExecOut(BaseModel):
    exit_code: int
    stdout: str
    stderr: str
    timed_out: bool
    duration_ms: int
    truncated: bool


# The names of server.runtime.base.SIGNALS (a test keeps the two equal).
SignalName = Literal["INT", "TERM", "KILL", "HUP", "QUIT", "USR1", "USR2", "WINCH", "STOP",
                     "CONT"]


class SpawnIn(_Strict):
    cmd: list[str] | str
    cwd: str | None = Field(None, max_length=4096)
    env: dict[str, str] = Field(default_factory=dict)
    log_bytes: StrictInt = Field(LOG_BYTES_DEFAULT, ge=LOG_BYTES_MIN, le=LOG_BYTES_MAX,
                                 description="Size of the ring buffer that keeps its output")


class SignalIn(_Strict):
    signal: SignalName = "TERM"


class ProcessOut(BaseModel):
    pid: int
    cmd: list[str]
    cwd: str
    user: str
    started_at: datetime
    running: bool
    exit_code: int | None
    signal: str | None

    @classmethod
    def of(cls, info: ProcessInfo) -> ProcessOut:
        return cls(pid=info.pid, cmd=list(info.argv), cwd=info.cwd, user=info.user,
                   started_at=datetime.fromtimestamp(info.started_at, UTC),
                   running=info.running, exit_code=info.exit_code, signal=info.signal)

    @classmethod
    def started(cls, pid: int, req: ExecRequest) -> ProcessOut:
        """A process just spawned from ``req``, as the server saw it start."""
        return cls(pid=pid, cmd=list(req.argv), cwd=req.cwd, user=req.user,
                   started_at=datetime.now(UTC), running=True, exit_code=None, signal=None)


class ProcessList(BaseModel):
    processes: list[ProcessOut]


class LogChunkOut(BaseModel):
    stream: Literal["stdout", "stderr"]
    data: str


class ProcessLogsOut(BaseModel):
    pid: int
    running: bool
    exit_code: int | None
    signal: str | None
    chunks: list[LogChunkOut]


class EventOut(BaseModel):
    id: int
    at: datetime
    kind: str
    from_state: str | None
    to_state: str | None
    actor: str
    message: str

    @classmethod
    def of(cls, e: Event) -> EventOut:
        return cls(id=e.id, at=e.at, kind=e.kind, from_state=e.from_state,
                   to_state=e.to_state, actor=e.actor, message=e.message)


class EventList(BaseModel):
    events: list[EventOut]


class FileEntryOut(BaseModel):
    name: str
    type: str
    size: int
    mtime: float
    mode: str


class FileList(BaseModel):
    path: str
    entries: list[FileEntryOut]
    truncated: bool = False  # entries were left out (a very large directory)


class FileRename(_Strict):
    model_config = ConfigDict(extra="forbid", strict=True)

    src: str = Field(alias="from", max_length=4096, description="The path to rename")
    to: str = Field(max_length=4096, description="Its new path, inside /workspace too")


class FileWritten(BaseModel):
    path: str
    size: int


class QuotaOut(BaseModel):
    limit: int | float = Field(description="The most the user may have (or have open)")
    used: int | float = Field(description="What the user has now")
    default: int | float = Field(description="The server's limit; `limit` differs where an "
                                             "admin set this user's own")


QUOTAS_DESCRIPTION = (
    "Each per-user limit with its use: `workspaces`, `cpus`, `memory_mb`, `disk_gb` (all "
    "workspaces, any state), `snapshots` (those of deleted workspaces too), and what is open "
    "now: `execs`, `streams`, `terminals`, `ssh_channels`")


class UserOut(BaseModel):
    id: int
    name: str
    is_admin: bool
    quotas: dict[str, QuotaOut] = Field(description=QUOTAS_DESCRIPTION)


class UserLimitsOut(BaseModel):
    user: str
    quotas: dict[str, QuotaOut] = Field(description=QUOTAS_DESCRIPTION)


_LIMIT_MAX = 1_000_000


class LimitsIn(_Strict):
    """A user's own limits, replacing those set before; a limit left out (or null) is the
    server's (`DEN_MAX_*_PER_USER`)."""

    workspaces: StrictInt | None = Field(None, ge=0, le=_LIMIT_MAX)
    cpus: float | None = Field(None, ge=0, le=_LIMIT_MAX)
    memory_mb: StrictInt | None = Field(None, ge=0, le=_LIMIT_MAX)
    disk_gb: StrictInt | None = Field(None, ge=0, le=_LIMIT_MAX)
    snapshots: StrictInt | None = Field(None, ge=0, le=_LIMIT_MAX)
    execs: StrictInt | None = Field(None, ge=0, le=_LIMIT_MAX)
    streams: StrictInt | None = Field(None, ge=0, le=_LIMIT_MAX)
    terminals: StrictInt | None = Field(None, ge=0, le=_LIMIT_MAX)
    ssh_channels: StrictInt | None = Field(None, ge=0, le=_LIMIT_MAX)


class TokenCreate(_Strict):
    name: str = Field("", max_length=128)
    expires_in_s: StrictInt | None = Field(
        None, ge=60, le=10 * 365 * 86400,
        description="The token stops working this many seconds from now; null: never")


class TokenOut(BaseModel):
    id: int
    name: str
    created_at: datetime
    last_used_at: datetime | None = None
    expires_at: datetime | None = None


class IdentityOut(BaseModel):
    id: int
    issuer: str
    subject: str
    email: str
    created_at: datetime
    last_login_at: datetime


class IdentityList(BaseModel):
    identities: list[IdentityOut]


class WebSessionOut(BaseModel):
    id: int
    method: str = Field(description="how it was opened: `token` or `oidc`")
    token_id: int | None = Field(description="the API token it was opened with")
    created_at: datetime
    expires_at: datetime


class WebSessionList(BaseModel):
    sessions: list[WebSessionOut]


class TokenCreated(TokenOut):
    token: str


class TokenList(BaseModel):
    tokens: list[TokenOut]


class ForgeLink(_Strict):
    kind: str = Field(description="github, gitlab or gitea (Gitea also covers Forgejo)")
    base_url: str = Field(max_length=512, description="The forge's web address, e.g. "
                          "https://github.com or https://gitlab.example.com")
    token: str = Field(max_length=4096, description="A personal access token (write-only)")
    api_url: str | None = Field(None, max_length=512,
                                description="REST root; derived from base_url when null")
    author_name: str = Field("", max_length=255,
                             description="Commit author name; the forge profile's when empty")
    author_email: str = Field("", max_length=255,
                              description="Commit author email; the forge profile's when empty")


class ForgeOut(BaseModel):
    id: int
    kind: str
    base_url: str
    api_url: str
    username: str
    author_name: str
    author_email: str
    token_hint: str = Field(description="The token's last 4 characters (empty for short ones)")
    created_at: datetime
    last_used_at: datetime | None

    @classmethod
    def of(cls, row: ForgeAccount) -> ForgeOut:
        return cls(id=row.id, kind=row.kind, base_url=row.base_url, api_url=row.api_url,
                   username=row.username, author_name=row.author_name,
                   author_email=row.author_email, token_hint=row.token_hint,
                   created_at=row.created_at, last_used_at=row.last_used_at)


class ForgeList(BaseModel):
    forges: list[ForgeOut]


class PullRequestCreate(_Strict):
    title: str = Field(min_length=1, max_length=256)
    body: str = Field("", max_length=65536)
    branch: str | None = Field(None, max_length=255,
                               description="The head branch; den/<workspace> when null")
    base: str | None = Field(None, max_length=255,
                             description="The target branch; the workspace's branch when null")
    commit_message: str | None = Field(None, max_length=65536,
                                       description="For uncommitted changes; the title if null")
    draft: bool = False


class PullRequestOut(BaseModel):
    number: int
    url: str
    branch: str
    base: str
    head_sha: str
    created: bool = Field(description="False when an open pull request already existed")
    push: str = Field(description="create, fast-forward, force-own or up-to-date")
    forge: str


class SSHKeyIn(_Strict):
    public_key: str = Field(
        max_length=16384,
        description="one OpenSSH public key line: `ssh-ed25519 AAAA... comment`",
    )
    name: str | None = Field(None, max_length=128,
                             description="a label; defaults to the key's comment")
    challenge: str = Field(max_length=256, description=(
        "a challenge from `POST /api/v1/users/me/ssh-keys/challenge`"))
    signature: str = Field(max_length=16384, description=(
        "the challenge signed with the key's private key: the output of "
        "`ssh-keygen -Y sign -n den-ssh-key -f KEY` (an SSH SIGNATURE block)"))


class SSHKeyChallengeOut(BaseModel):
    challenge: str
    namespace: str
    expires_at: datetime
    command: str = Field(description="how to sign it with OpenSSH")


class SSHKeyOut(BaseModel):
    id: int
    name: str
    type: str
    fingerprint: str
    public_key: str
    created_at: datetime
    last_used_at: datetime | None = None
    verified: bool = Field(description=(
        "registered with proof of possession; false for keys registered before Den asked "
        "for one (they still work: remove and add them again to prove them)"))

    @classmethod
    def of(cls, key: SSHKey) -> SSHKeyOut:
        return cls(id=key.id, name=key.name, type=key.key_type, fingerprint=key.fingerprint,
                   public_key=key.public_key, created_at=key.created_at,
                   last_used_at=key.last_used_at, verified=key.verified)


class SSHKeyList(BaseModel):
    ssh_keys: list[SSHKeyOut]


class PortShareIn(_Strict):
    share: Literal["private", "users", "public"] = Field(
        description="private: the owner; users: anyone signed in to this Den; public: anyone "
                    "with the URL")


class PortOut(BaseModel):
    port: int
    listening: bool | None = Field(
        description="Whether something listens on it now; null while the workspace is not "
                    "running")
    share: str
    url: str | None = Field(description="The preview origin (null without DEN_PREVIEW_DOMAIN, "
                                        "or when the name does not fit a DNS label)")
    path_url: str = Field(description="The path form on Den's own origin")
    label: str = Field("", description="The port's label from the repository's "
                                      "devcontainer.json (portsAttributes), else empty")


class PortList(BaseModel):
    ports: list[PortOut]


class ShareLinkIn(_Strict):
    ttl_s: int = Field(3600, description="Seconds the link works for")


class ShareLinkOut(BaseModel):
    id: str = Field(description="The link's id, to revoke it before it expires")
    url: str | None
    path_url: str
    expires_at: datetime


class ShareLinkInfo(BaseModel):
    """A live share link (the link itself is shown only when it is made)."""

    id: str
    port: int
    created_by: str
    created_at: datetime
    expires_at: datetime


class ShareLinkList(BaseModel):
    links: list[ShareLinkInfo]


class UsageOut(BaseModel):
    """What a workspace uses now against its limits; the figures are null while it is not
    running (reading them never wakes it)."""

    state: str
    cpu_ns: int | None = Field(description="CPU time used so far, in nanoseconds: the rate "
                                           "is the difference of two readings over their "
                                           "interval")
    memory_bytes: int | None = Field(description="Memory held now")
    cpus: float = Field(description="The CPU limit, in cores")
    memory_limit_bytes: int
    at: datetime = Field(description="When it was read")
