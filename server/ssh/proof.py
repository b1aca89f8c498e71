"""Proof of possession for SSH key registration (issue 11, finding 3).

A public key is public: without proof, anyone could register someone else's key and receive
that person's SSH sessions (the key names its owner at the gateway). So registration takes
a signed challenge: Den hands out a short-lived challenge bound to the user, the user signs
it with ``ssh-keygen -Y sign -n den-ssh-key`` (OpenSSH's SSHSIG format, PROTOCOL.sshsig), and
Den checks the signature with the key being registered.

Challenges are stateless: ``den-ssh-key:<user id>:<expiry>:<nonce>:<mac>``, authenticated
with a key this process makes at start, so nothing is stored and a restart only voids the
challenges in flight (valid ``CHALLENGE_TTL_S``).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import struct
import time

import asyncssh

from server.errors import ValidationFailed

NAMESPACE = "den-ssh-key"
CHALLENGE_TTL_S = 600
MAGIC = b"SSHSIG"
ARMOR_BEGIN = "-----BEGIN SSH SIGNATURE-----"
ARMOR_END = "-----END SSH SIGNATURE-----"
HASHES = {"sha256": hashlib.sha256, "sha512": hashlib.sha512}
MAX_SIGNATURE_TEXT = 16 * 1024


class Challenges:
    """Issues and checks challenges bound to a user id."""

    def __init__(self, key: bytes | None = None) -> None:
        self._key = key or secrets.token_bytes(32)

    def _mac(self, body: str) -> str:
        return hmac.new(self._key, body.encode(), hashlib.sha256).hexdigest()[:32]

    def issue(self, user_id: int, *, now: float | None = None) -> tuple[str, int]:
        """A challenge for ``user_id`` and when it expires (unix seconds)."""
        expires = int(now if now is not None else time.time()) + CHALLENGE_TTL_S
        body = f"{NAMESPACE}:{user_id}:{expires}:{secrets.token_hex(16)}"
        return f"{body}:{self._mac(body)}", expires

    def check(self, user_id: int, challenge: str, *, now: float | None = None) -> None:
        """ValidationFailed unless ``challenge`` is one of ours, for ``user_id``, unexpired."""
        body, _, mac = challenge.strip().rpartition(":")
        parts = body.split(":")
        if (len(parts) != 4 or parts[0] != NAMESPACE
                or not hmac.compare_digest(mac.encode(), self._mac(body).encode())
                or parts[1] != str(user_id)):
            raise ValidationFailed("the challenge is not one this server gave you; ask for a "
                                   "new one (POST /api/v1/users/me/ssh-keys/challenge)")
        if int(parts[2]) < (now if now is not None else time.time()):
            raise ValidationFailed("the challenge has expired; ask for a new one")


def _string(buf: bytes, pos: int) -> tuple[bytes, int]:
    if pos + 4 > len(buf):
        raise ValueError("truncated")
    (n,) = struct.unpack(">I", buf[pos:pos + 4])
    end = pos + 4 + n
    if end > len(buf):
        raise ValueError("truncated")
    return buf[pos + 4:end], end


def _pack(b: bytes) -> bytes:
    return struct.pack(">I", len(b)) + b


def _signed_data(namespace: str, hash_alg: str, message: bytes) -> bytes:
    digest = HASHES[hash_alg](message).digest()
    return MAGIC + _pack(namespace.encode()) + _pack(b"") + _pack(hash_alg.encode()) + \
        _pack(digest)


def sign(key: asyncssh.SSHKey, message: bytes, *, namespace: str = NAMESPACE) -> str:
    """What ``ssh-keygen -Y sign -n namespace`` makes of ``message`` (for tests and tools
    that hold the key in Python)."""
    algorithm = key.get_algorithm()
    alg = b"rsa-sha2-512" if algorithm == "ssh-rsa" else algorithm.encode()
    sig = key.sign(_signed_data(namespace, "sha512", message), alg)
    blob = (MAGIC + struct.pack(">I", 1) + _pack(key.public_data) + _pack(namespace.encode())
            + _pack(b"") + _pack(b"sha512") + _pack(sig))
    text = base64.b64encode(blob).decode()
    lines = [text[i:i + 70] for i in range(0, len(text), 70)]
    return "\n".join([ARMOR_BEGIN, *lines, ARMOR_END]) + "\n"


def verify(public_key: asyncssh.SSHKey, armored: str, message: bytes, *,
           namespace: str = NAMESPACE) -> bool:
    """Whether ``armored`` is an SSHSIG signature of ``message`` by ``public_key`` in
    ``namespace``. Anything malformed is simply False."""
    text = armored.strip()
    if len(text) > MAX_SIGNATURE_TEXT or not text.startswith(ARMOR_BEGIN) \
            or not text.endswith(ARMOR_END):
        return False
    try:
        blob = base64.b64decode("".join(text[len(ARMOR_BEGIN):-len(ARMOR_END)].split()),
                                validate=True)
        if blob[:6] != MAGIC or struct.unpack(">I", blob[6:10])[0] != 1:
            return False
        pos = 10
        signer, pos = _string(blob, pos)
        ns, pos = _string(blob, pos)
        _reserved, pos = _string(blob, pos)
        hash_alg, pos = _string(blob, pos)
        sig, pos = _string(blob, pos)
        if pos != len(blob) or ns != namespace.encode() or hash_alg.decode() not in HASHES:
            return False
        if signer != public_key.public_data:
            return False
        return bool(public_key.verify(_signed_data(namespace, hash_alg.decode(), message),
                                      sig))
    except (ValueError, UnicodeDecodeError, struct.error, asyncssh.KeyImportError):
        return False
