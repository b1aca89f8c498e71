"""ORM rows. Request and response schemas live in ``server/api/schemas.py``, not here."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    false,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite drops the zone otherwise)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, datetime: UTCDateTime}


class Meta(Base):
    """Installation-wide key/value facts (the instance id that labels engine objects)."""

    __tablename__ = "den_meta"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(String(255))


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # An admin's overrides of the server's per-user limits ({"workspaces": 5, ...};
    # server/quotas/limits.py names them); absent ones are the server's.
    limits: Mapped[dict[str, Any]] = mapped_column(default=dict, server_default=text("'{}'"))


class ApiToken(Base):
    """An API token; only its SHA-256 is stored, the token itself is shown once."""

    __tablename__ = "api_tokens"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(128), default="")
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(default=None)
    expires_at: Mapped[datetime | None] = mapped_column(default=None)  # None: never

    user: Mapped[User] = relationship(lazy="joined")


class Workspace(Base):
    __tablename__ = "workspaces"
    __table_args__ = (UniqueConstraint("owner_id", "name", name="uq_workspaces_owner_name"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(63))
    repo_url: Mapped[str] = mapped_column(Text)
    repo_branch: Mapped[str | None] = mapped_column(String(255), default=None)
    repo_dir: Mapped[str] = mapped_column(String(255))
    image: Mapped[str] = mapped_column(String(255))
    runtime: Mapped[str] = mapped_column(String(32))
    cpus: Mapped[float] = mapped_column(Float)
    memory_mb: Mapped[int] = mapped_column(Integer)
    disk_gb: Mapped[int] = mapped_column(Integer)
    gpus: Mapped[int] = mapped_column(Integer, default=0)
    gpu_model: Mapped[str | None] = mapped_column(String(255), default=None)
    pids_limit: Mapped[int] = mapped_column(Integer)
    env: Mapped[dict[str, Any]] = mapped_column(default=dict)
    idle_timeout_s: Mapped[int | None] = mapped_column(Integer, default=None)
    stop_after_s: Mapped[int | None] = mapped_column(Integer, default=None)
    keep_alive: Mapped[bool] = mapped_column(Boolean, default=False)
    keepalive_until: Mapped[datetime | None] = mapped_column(default=None)
    state: Mapped[str] = mapped_column(String(16), index=True)
    state_reason: Mapped[str] = mapped_column(Text, default="")
    # How a paused workspace sleeps: "frozen" (in place) or "saved" (to disk); None otherwise.
    sleep: Mapped[str | None] = mapped_column(String(8), default=None)
    # Opaque runtime handle (container and volume names), persisted before any engine call.
    engine: Mapped[dict[str, Any]] = mapped_column(default=dict)
    # Network policy: {"mode": "none" | "internet" | "allowlist", "allow": [...]}
    network: Mapped[dict[str, Any]] = mapped_column(default=dict)
    # What it keeps of its devcontainer.json (server/devcontainer/): empty when none.
    devcontainer: Mapped[dict[str, Any]] = mapped_column(default=dict)
    # The prebuild this workspace is made for (server/prebuilds/): such a workspace is not
    # listed, but counts toward its owner's limits as any other.
    prebuild_id: Mapped[str | None] = mapped_column(String(32), default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_activity_at: Mapped[datetime] = mapped_column(default=utcnow)

    owner: Mapped[User] = relationship(lazy="joined")


class GpuAllocation(Base):
    """A GPU held by a workspace. The primary key is the GPU: a second holder cannot be
    written, whatever the database's isolation level (server/gpus/allocation.py)."""

    __tablename__ = "gpu_allocations"
    gpu_uuid: Mapped[str] = mapped_column(String(64), primary_key=True)
    workspace_id: Mapped[str] = mapped_column(
        ForeignKey("workspaces.id", ondelete="CASCADE"), index=True
    )
    allocated_at: Mapped[datetime] = mapped_column(default=utcnow)


class Snapshot(Base):
    """A point-in-time copy of a workspace's disk (Docker: its container filesystem as an
    image and its /workspace volume as a volume). It outlives the workspace unless deleted
    with it."""

    __tablename__ = "snapshots"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    workspace_id: Mapped[str | None] = mapped_column(
        ForeignKey("workspaces.id", ondelete="SET NULL"), index=True, default=None
    )
    name: Mapped[str] = mapped_column(String(64))
    memory: Mapped[bool] = mapped_column(Boolean, default=False)
    image: Mapped[str] = mapped_column(String(255))  # what a fork of it runs
    # The backend's names of its engine objects (server/runtime/base.py, Handle).
    engine: Mapped[dict[str, Any]] = mapped_column(default=dict)
    repo_url: Mapped[str] = mapped_column(Text)
    repo_branch: Mapped[str | None] = mapped_column(String(255), default=None)
    repo_dir: Mapped[str] = mapped_column(String(255))
    runtime: Mapped[str] = mapped_column(String(32))
    network: Mapped[dict[str, Any]] = mapped_column(default=dict)  # the origin's, for forks
    devcontainer: Mapped[dict[str, Any]] = mapped_column(default=dict)  # the origin's, for forks
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Event(Base):
    """One entry of a workspace's event log: a state change, or something worth telling."""

    __tablename__ = "events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    workspace_id: Mapped[str] = mapped_column(
        ForeignKey("workspaces.id", ondelete="CASCADE"), index=True
    )
    at: Mapped[datetime] = mapped_column(default=utcnow)
    kind: Mapped[str] = mapped_column(String(32))
    from_state: Mapped[str | None] = mapped_column(String(16), default=None)
    to_state: Mapped[str | None] = mapped_column(String(16), default=None)
    actor: Mapped[str] = mapped_column(String(64), default="system")
    message: Mapped[str] = mapped_column(Text, default="")


class ForgeAccount(Base):
    """A user's linked GitHub, GitLab or Gitea/Forgejo account. The token is stored only
    encrypted (Fernet, keys from settings); the API never returns it."""

    __tablename__ = "forge_accounts"
    __table_args__ = (UniqueConstraint("user_id", "base_url", name="uq_forge_accounts_user_url"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(16))  # "github" | "gitlab" | "gitea"
    base_url: Mapped[str] = mapped_column(String(512))  # web and git URL, no trailing slash
    api_url: Mapped[str] = mapped_column(String(512))
    username: Mapped[str] = mapped_column(String(255), default="")
    author_name: Mapped[str] = mapped_column(String(255), default="")
    author_email: Mapped[str] = mapped_column(String(255), default="")
    token_encrypted: Mapped[str] = mapped_column(Text)
    token_hint: Mapped[str] = mapped_column(String(16), default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(default=None)


class PullRequest(Base):
    """A branch Den pushed for a user, and the pull request opened for it (number and url
    are empty when the push went through and opening the request did not)."""

    __tablename__ = "pull_requests"
    __table_args__ = (
        UniqueConstraint("owner_id", "repo_url", "branch", name="uq_pull_requests_branch"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    workspace_id: Mapped[str | None] = mapped_column(
        ForeignKey("workspaces.id", ondelete="SET NULL"), index=True, default=None
    )
    account_id: Mapped[int | None] = mapped_column(
        ForeignKey("forge_accounts.id", ondelete="SET NULL"), default=None
    )
    repo_url: Mapped[str] = mapped_column(Text)
    branch: Mapped[str] = mapped_column(String(255))
    base: Mapped[str] = mapped_column(String(255))
    head_sha: Mapped[str] = mapped_column(String(64))  # the last commit Den pushed
    number: Mapped[int | None] = mapped_column(Integer, default=None)
    url: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class SSHKey(Base):
    """A user's SSH public key: the key identifies its owner at the SSH gateway, so a key
    (its SHA-256 fingerprint) belongs to at most one user."""

    __tablename__ = "ssh_keys"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(128), default="")
    key_type: Mapped[str] = mapped_column(String(64))
    fingerprint: Mapped[str] = mapped_column(String(64), unique=True)
    # "<type> <base64>" without options or comment: what the gateway compares.
    public_key: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(default=None)
    # Registered with a signed challenge (proof of possession). Keys from before proofs
    # were required are False: they keep working, and the list says so.
    verified: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())

    user: Mapped[User] = relationship(lazy="joined")


class Identity(Base):
    """A login at an OIDC / OAuth provider, linked to one user (a user may have several)."""

    __tablename__ = "identities"
    __table_args__ = (UniqueConstraint("issuer", "subject", name="uq_identities_issuer_subject"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    issuer: Mapped[str] = mapped_column(String(255))
    subject: Mapped[str] = mapped_column(String(255))
    email: Mapped[str] = mapped_column(String(255), default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_login_at: Mapped[datetime] = mapped_column(default=utcnow)


class WebSession(Base):
    """A browser session. The cookie carries the random id; only its SHA-256 is stored, and
    deleting the row (logout) ends the session wherever the cookie is."""

    __tablename__ = "web_sessions"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    session_hash: Mapped[str] = mapped_column(String(64), unique=True)
    method: Mapped[str] = mapped_column(String(16))  # "token" or "oidc"
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime] = mapped_column()
    # The API token a "token" session was opened with: revoking it ends the session.
    token_id: Mapped[int | None] = mapped_column(Integer, default=None, index=True)


class PreviewPort(Base):
    """A workspace port's share level for preview URLs (docs/preview.md). No row means
    ``private``: only the owner (and admins) may open it."""

    __tablename__ = "preview_ports"
    __table_args__ = (UniqueConstraint("workspace_id", "port", name="uq_preview_ports_ws_port"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    workspace_id: Mapped[str] = mapped_column(
        ForeignKey("workspaces.id", ondelete="CASCADE"), index=True
    )
    port: Mapped[int] = mapped_column(Integer)
    share: Mapped[str] = mapped_column(String(16))  # "private" | "users" | "public"
    label: Mapped[str] = mapped_column(String(64), default="")  # devcontainer portsAttributes
    updated_by: Mapped[str] = mapped_column(String(64), default="")
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class PreviewLink(Base):
    """A signed share link of a workspace port (docs/preview.md): the token names this row,
    and a link works only while its row exists, so deleting the row revokes it. Rows of
    expired links are removed when the workspace's links are listed or made."""

    __tablename__ = "preview_links"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    workspace_id: Mapped[str] = mapped_column(
        ForeignKey("workspaces.id", ondelete="CASCADE"), index=True
    )
    port: Mapped[int] = mapped_column(Integer)
    created_by: Mapped[str] = mapped_column(String(64), default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime] = mapped_column()


class Prebuild(Base):
    """A repository and branch made ready ahead of time (docs/prebuilds.md): a memory snapshot
    of a workspace that cloned it, built its devcontainer and ran its create commands. New
    workspaces of the same owner, repository and branch fork from the newest ``ready`` one."""

    __tablename__ = "prebuilds"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    repo_url: Mapped[str] = mapped_column(Text)
    branch: Mapped[str] = mapped_column(String(255), default="")  # "": the default branch
    state: Mapped[str] = mapped_column(String(16))  # building, ready, failed
    reason: Mapped[str] = mapped_column(Text, default="")  # why it failed, with the log tail
    commit: Mapped[str] = mapped_column(String(64), default="")
    snapshot_id: Mapped[str | None] = mapped_column(String(32), default=None)
    workspace_id: Mapped[str | None] = mapped_column(String(32), default=None)  # while building
    env: Mapped[dict[str, Any]] = mapped_column(default=dict)  # the devcontainer's, for forks
    devcontainer: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
