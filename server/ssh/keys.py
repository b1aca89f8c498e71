"""Users' SSH public keys: parse and check them, and the service behind the API and the gateway.

A key identifies exactly one user at the gateway, so a key (its SHA-256 fingerprint) can be
registered by one user only, and only by whoever holds its private key: registration takes a
signed challenge (:mod:`server.ssh.proof`). Nothing about an existing registration is said
before that proof, so the API does not tell strangers whether a key is registered.

Accepted: Ed25519, ECDSA (NIST P-256/384/521), RSA of at least
2048 bits, and the FIDO security-key forms of Ed25519 and ECDSA. Refused: DSA, short RSA,
certificates, and lines with ``authorized_keys`` options.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import asyncssh
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from server.db.models import SSHKey, User
from server.errors import Conflict, NotFound, QuotaExceeded, ValidationFailed
from server.ssh import proof

log = logging.getLogger(__name__)

ALLOWED_TYPES = frozenset({
    "ssh-ed25519",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "ssh-rsa",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
})
MIN_RSA_BITS = 2048
MAX_KEY_TEXT = 16 * 1024
MAX_KEYS_PER_USER = 100
LAST_USED_DEBOUNCE = timedelta(minutes=1)


@dataclass(frozen=True)
class ParsedKey:
    """A checked public key: ``public_key`` is ``"<type> <base64>"`` (no comment)."""

    key_type: str
    fingerprint: str
    public_key: str
    comment: str


def fingerprint(key: asyncssh.SSHKey) -> str:
    """``SHA256:<base64>``, as ``ssh-keygen -l`` prints it."""
    return str(key.get_fingerprint("sha256"))


def canonical(key: asyncssh.SSHKey) -> str:
    """``"<type> <base64>"``: the key's public blob in OpenSSH's one-line form."""
    text = key.export_public_key("openssh").decode().split()
    return f"{text[0]} {text[1]}"


def parse_public_key(text: str) -> ParsedKey:
    """Check one OpenSSH public key line (``ssh-ed25519 AAAA... comment``); ValidationFailed
    with the reason when it is not an acceptable key."""
    text = text.strip()
    if not text:
        raise ValidationFailed("the public key is empty")
    if "PRIVATE KEY" in text:
        raise ValidationFailed("that is a private key: give the public one (the .pub file)")
    if len(text) > MAX_KEY_TEXT or "\n" in text or "\r" in text:
        raise ValidationFailed("give exactly one public key, on one line")
    first = text.split(None, 1)[0]
    if first.endswith("-cert-v01@openssh.com"):
        raise ValidationFailed("certificates are not accepted: give the plain public key")
    if first not in ALLOWED_TYPES and first != "ssh-dss":
        raise ValidationFailed(
            f"not a public key line (it starts with {first[:40]!r}; authorized_keys options "
            "such as command= are not accepted)"
        )
    try:
        key = asyncssh.import_public_key(text)
    except (asyncssh.KeyImportError, ValueError) as exc:
        raise ValidationFailed(f"cannot read the public key: {exc}") from exc
    key_type = key.get_algorithm()
    if isinstance(key_type, bytes):
        key_type = key_type.decode()
    if key_type not in ALLOWED_TYPES:
        raise ValidationFailed(
            f"key type {key_type} is not accepted; use ed25519, ECDSA or RSA (2048 bits or more)"
        )
    if key_type == "ssh-rsa":
        bits = int(getattr(key.pyca_key, "key_size", 0))
        if bits < MIN_RSA_BITS:
            raise ValidationFailed(
                f"RSA keys need at least {MIN_RSA_BITS} bits (this one has {bits})"
            )
    comment = key.get_comment() or ""
    if isinstance(comment, bytes):
        comment = comment.decode(errors="replace")
    return ParsedKey(key_type=key_type, fingerprint=fingerprint(key),
                     public_key=canonical(key), comment=comment[:128])


class SSHKeyService:
    """Registering, listing and removing keys, and finding a key's owner for the gateway."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions
        self.challenges = proof.Challenges()

    def challenge(self, user: User) -> tuple[str, int]:
        """A challenge for ``user`` to sign, and when it expires (unix seconds)."""
        return self.challenges.issue(user.id)

    def add(self, user: User, text: str, *, challenge: str, signature: str,
            name: str | None = None) -> SSHKey:
        """Register a key whose holder signed ``challenge`` with it (``ssh-keygen -Y sign -n
        den-ssh-key``). A registration of the same key without proof, by another user (made
        before proofs were required), gives way to the proven one."""
        parsed = parse_public_key(text)
        label = (name if name is not None else parsed.comment).strip()
        if len(label) > 128:
            raise ValidationFailed("the key's name is longer than 128 characters")
        self.challenges.check(user.id, challenge)
        key = asyncssh.import_public_key(parsed.public_key)
        message = challenge.strip().encode()
        if not any(proof.verify(key, signature, m) for m in (message, message + b"\n")):
            raise ValidationFailed(
                "the signature does not prove that you hold this key: sign the challenge "
                f"with its private key (ssh-keygen -Y sign -n {proof.NAMESPACE} -f KEY)")
        with self.sessions.begin() as s:
            existing = s.scalar(select(SSHKey).where(SSHKey.fingerprint == parsed.fingerprint))
            if existing is not None and existing.user_id == user.id:
                if existing.verified:
                    raise Conflict(f"this key ({parsed.fingerprint}) is already registered "
                                   "by you", code="key_exists")
                existing.verified = True  # proven now
                s.flush()
                s.refresh(existing)
                s.expunge(existing)
                return existing
            if existing is not None and existing.verified:
                # Only a holder of the private key gets this far.
                raise Conflict(f"this key ({parsed.fingerprint}) is already registered by "
                               "another user", code="key_exists")
            if existing is not None:
                log.warning("ssh key %s: unproven registration by user %s replaced by %s, "
                            "who proved possession", parsed.fingerprint, existing.user_id,
                            user.name)
                s.delete(existing)
                s.flush()
            count = s.scalar(select(func.count()).select_from(SSHKey)
                             .where(SSHKey.user_id == user.id)) or 0
            if count >= MAX_KEYS_PER_USER:
                raise QuotaExceeded(f"at most {MAX_KEYS_PER_USER} SSH keys per user")
            row = SSHKey(user_id=user.id, name=label, key_type=parsed.key_type,
                         fingerprint=parsed.fingerprint, public_key=parsed.public_key,
                         verified=True)
            s.add(row)
            s.flush()
            s.refresh(row)
            s.expunge(row)
            return row

    def list_for(self, user: User) -> list[SSHKey]:
        with self.sessions() as s:
            return list(s.scalars(select(SSHKey).where(SSHKey.user_id == user.id)
                                  .order_by(SSHKey.id)))

    def delete(self, user: User, key_id: int) -> None:
        """Remove one of ``user``'s keys; another user's key is a 404 like a missing one.
        Connections already authenticated with it stay open."""
        with self.sessions.begin() as s:
            row = s.get(SSHKey, key_id)
            if row is None or row.user_id != user.id:
                raise NotFound(f"no SSH key {key_id}")
            s.delete(row)

    def owner_of(self, key: asyncssh.SSHKey) -> tuple[User, SSHKey] | None:
        """The user who registered ``key`` (and the key's row), or None."""
        fp = fingerprint(key)
        with self.sessions() as s:
            row = s.scalar(select(SSHKey).where(SSHKey.fingerprint == fp))
            if row is None or row.public_key != canonical(key):
                return None
            user = row.user
            s.expunge_all()
            return user, row

    def mark_used(self, key_id: int) -> None:
        now = datetime.now(UTC)
        with self.sessions.begin() as s:
            s.execute(update(SSHKey).where(
                SSHKey.id == key_id,
                (SSHKey.last_used_at.is_(None)) | (SSHKey.last_used_at < now - LAST_USED_DEBOUNCE),
            ).values(last_used_at=now))
