"""Linked forge accounts: tokens encrypted at rest, matched to repository URLs.

Tokens are encrypted with Fernet (AES-128-CBC + HMAC-SHA256). The keys come from
``DEN_FORGE_KEYS`` (comma-separated; the first encrypts, every one decrypts) or, when that is
empty, from ``<data_dir>/forge.key``, generated with mode 0600 on first use. Rotation: put a new
key first and run ``den admin rotate-forge-key``, which re-encrypts every token with it (with
the key file, the command also generates the new key and drops the old ones once done).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from server.config import Settings
from server.db.models import ForgeAccount, User
from server.errors import DenError, NotFound, ValidationFailed
from server.forges.base import Profile
from server.urls import split_url

KEY_FILE = "forge.key"


class ForgeKeyError(DenError):
    """The forge keys are missing or wrong (an operator problem)."""

    status_code = 500
    code = "forge_key_error"


def _key_file(settings: Settings) -> Path:
    return settings.data_dir / KEY_FILE


def load_keys(settings: Settings, *, create: bool = True) -> list[bytes]:
    """The Fernet keys, primary first: from settings, else the key file (made if missing)."""
    configured = [k.strip() for k in settings.forge_keys.get_secret_value().split(",")
                  if k.strip()]
    if configured:
        return [k.encode() for k in configured]
    path = _key_file(settings)
    if not path.exists():
        if not create:
            raise ForgeKeyError(f"no forge key: {path} is missing and DEN_FORGE_KEYS is empty")
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(Fernet.generate_key().decode() + "\n")
    return [line.strip().encode() for line in path.read_text().splitlines() if line.strip()]


class TokenCipher:
    """Encrypts with the first key, decrypts with any."""

    def __init__(self, keys: list[bytes]) -> None:
        try:
            self._fernets = [Fernet(k) for k in keys]
        except (ValueError, TypeError) as exc:
            raise ForgeKeyError("a forge key is not a valid Fernet key (32 url-safe base64 "
                            "bytes; make one with `den admin rotate-forge-key`)") from exc
        if not self._fernets:
            raise ForgeKeyError("no forge key configured")
        self._multi = MultiFernet(self._fernets)

    def encrypt(self, token: str) -> str:
        return self._multi.encrypt(token.encode()).decode()

    def decrypt(self, blob: str) -> str:
        try:
            return self._multi.decrypt(blob.encode()).decode()
        except InvalidToken as exc:
            raise ForgeKeyError("a stored forge token cannot be decrypted with the configured "
                            "keys (was a key removed before rotating?)") from exc

    def rotate(self, blob: str) -> str:
        """The same token encrypted with the primary key."""
        try:
            return self._multi.rotate(blob.encode()).decode()
        except InvalidToken as exc:
            raise ForgeKeyError("a stored forge token cannot be decrypted with the configured "
                            "keys") from exc


def normalize_base_url(url: str, *, allowed_schemes: list[str], what: str = "base_url") -> str:
    """``scheme://host[:port][/prefix]`` with no trailing slash, query or credentials
    (``what`` names the field in messages)."""
    url = url.strip()
    parts = split_url(url, what=what)
    scheme = parts.scheme.lower()
    if scheme not in ("https", "http"):
        raise ValidationFailed(f"{what} must be an https URL (the forge's web address)")
    if scheme not in allowed_schemes:
        raise ValidationFailed(f"{what} scheme {scheme!r} is not allowed on this server "
                               "(tokens are only sent over allowed schemes)")
    if not parts.hostname or parts.username or parts.password:
        raise ValidationFailed(f"{what} needs a host and must not contain credentials")
    if parts.query or parts.fragment:
        raise ValidationFailed(f"{what} must not have a query or fragment")
    return urlunsplit((scheme, parts.netloc.lower(), parts.path.rstrip("/"), "", ""))


def validate_token(token: str) -> str:
    """A forge token as sent in an HTTP header: printable ASCII, no spaces."""
    token = token.strip()
    if not token or len(token) > 4096:
        raise ValidationFailed("token is empty or too long")
    if not all(0x21 <= ord(c) <= 0x7e for c in token):
        raise ValidationFailed("token may contain only printable ASCII characters, "
                               "no spaces (as forges issue them)")
    return token


def serves(account_base_url: str, repo_url: str) -> bool:
    """Whether ``repo_url`` (http or https) lives on the forge at ``account_base_url``."""
    base, repo = urlsplit(account_base_url), urlsplit(repo_url.strip())
    if repo.scheme.lower() != base.scheme or repo.netloc.lower() != base.netloc:
        return False
    prefix = base.path.rstrip("/")
    return repo.path.startswith(prefix + "/")


@dataclass(frozen=True)
class Credential:
    """A decrypted account, for one operation; never stored or logged."""

    account_id: int
    kind: str
    base_url: str
    api_url: str
    username: str
    author_name: str
    author_email: str
    token: str

    def __repr__(self) -> str:  # keep the token out of tracebacks and logs
        return f"Credential(account_id={self.account_id}, base_url={self.base_url!r})"


class ForgeAccounts:
    """The encrypted token store. Every read of a token goes through :meth:`credential_for`."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session]) -> None:
        self.settings = settings
        self.sessions = sessions
        self._cipher: TokenCipher | None = None

    @property
    def cipher(self) -> TokenCipher:
        if self._cipher is None:
            self._cipher = TokenCipher(load_keys(self.settings))
        return self._cipher

    def link(self, user: User, *, kind: str, base_url: str, api_url: str, token: str,
             profile: Profile, author_name: str = "", author_email: str = "") -> ForgeAccount:
        """Store (or replace, for the same base URL) a verified account."""
        with self.sessions.begin() as s:
            row = s.scalar(select(ForgeAccount).where(ForgeAccount.user_id == user.id,
                                                      ForgeAccount.base_url == base_url))
            if row is None:
                row = ForgeAccount(user_id=user.id, base_url=base_url)
                s.add(row)
            row.kind = kind
            row.api_url = api_url
            row.username = profile.username
            row.author_name = author_name or profile.name
            row.author_email = author_email or profile.email
            row.token_encrypted = self.cipher.encrypt(token)
            row.token_hint = token[-4:] if len(token) >= 12 else ""
            row.created_at = datetime.now(UTC)
            s.flush()
            return row

    def list_for(self, user: User) -> list[ForgeAccount]:
        with self.sessions() as s:
            return list(s.scalars(select(ForgeAccount).where(ForgeAccount.user_id == user.id)
                                  .order_by(ForgeAccount.id)))

    def get_for(self, user: User, account_id: int) -> ForgeAccount:
        with self.sessions() as s:
            row = s.get(ForgeAccount, account_id)
            if row is None or row.user_id != user.id:
                raise NotFound(f"no linked forge account {account_id}")
            return row

    def delete(self, user: User, account_id: int) -> None:
        row = self.get_for(user, account_id)
        with self.sessions.begin() as s:
            s.delete(s.get(ForgeAccount, row.id))

    def account_for(self, user_id: int, repo_url: str) -> ForgeAccount | None:
        """The account whose base URL serves ``repo_url`` (the longest prefix wins)."""
        with self.sessions() as s:
            rows = list(s.scalars(select(ForgeAccount).where(ForgeAccount.user_id == user_id)))
        matching = [r for r in rows if serves(r.base_url, repo_url)]
        return max(matching, key=lambda r: len(r.base_url)) if matching else None

    def credential(self, row: ForgeAccount) -> Credential:
        token = self.cipher.decrypt(row.token_encrypted)
        with self.sessions.begin() as s:
            s.execute(update(ForgeAccount).where(ForgeAccount.id == row.id)
                      .values(last_used_at=datetime.now(UTC)))
        return Credential(account_id=row.id, kind=row.kind, base_url=row.base_url,
                          api_url=row.api_url, username=row.username,
                          author_name=row.author_name, author_email=row.author_email,
                          token=token)

    def credential_for(self, user_id: int, repo_url: str) -> Credential | None:
        row = self.account_for(user_id, repo_url)
        return self.credential(row) if row is not None else None

    def rotate_all(self) -> int:
        """Re-encrypt every stored token with the primary key; returns how many."""
        with self.sessions.begin() as s:
            rows = list(s.scalars(select(ForgeAccount)))
            for row in rows:
                row.token_encrypted = self.cipher.rotate(row.token_encrypted)
        return len(rows)


def rotate_key_file(settings: Settings, sessions: sessionmaker[Session]) -> tuple[int, str]:
    """Rotate the forge key: with ``DEN_FORGE_KEYS`` set, re-encrypt with its first key; with
    the key file, generate a new key, re-encrypt every token with it, then keep only it.
    Returns (tokens re-encrypted, what was done)."""
    if settings.forge_keys.get_secret_value().strip():
        count = ForgeAccounts(settings, sessions).rotate_all()
        return count, "re-encrypted with the first key of DEN_FORGE_KEYS"
    old = load_keys(settings)
    new = Fernet.generate_key()
    path = _key_file(settings)
    tmp = path.with_suffix(".tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()

    def write(keys: list[bytes]) -> None:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("".join(k.decode() + "\n" for k in keys))
        os.replace(tmp, path)

    write([new, *old])  # both decrypt while tokens are re-encrypted
    accounts = ForgeAccounts(settings, sessions)
    count = accounts.rotate_all()
    write([new])
    return count, f"generated a new key in {path} and dropped the old one"

