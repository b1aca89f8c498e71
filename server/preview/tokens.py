"""Signed, expiring tokens for previews: share links, the one-time grant that carries a
sign-in from Den's origin to a preview origin, and the preview origin's own cookie. Pure.

A token is ``base64url(json payload) "." base64url(HMAC-SHA256)``; the MAC covers a purpose
string too, so a token made for one use is never accepted for another. Anything wrong with a
token (shape, MAC, purpose, expiry) reads the same: None. The payload is not secret (it
names a workspace id and a port), only unforgeable.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
from typing import Any

MAX_TOKEN = 1024
_SHAPE = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")  # unpadded base64url, one dot

SHARE = "share"  # {"w": workspace id, "p": port, "i": link id (its row), "e": expiry}
GRANT = "grant"  # {"h": preview host, "s": web session hash, "e": expiry} (a minute)
COOKIE = "cookie"  # {"h": host or path prefix, "s": session hash | "w"+"p" of a link, "e"}


def derive_key(secret: str) -> bytes:
    """The previews' own key, derived from the server secret (never the secret itself)."""
    return hmac.new(secret.encode(), b"den-preview-v1", hashlib.sha256).digest()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(key: bytes, purpose: str, body: str) -> bytes:
    return hmac.new(key, f"{purpose}.{body}".encode(), hashlib.sha256).digest()


def sign(key: bytes, purpose: str, payload: dict[str, Any], *, expires_at: int) -> str:
    body = _b64(json.dumps({**payload, "e": int(expires_at)}, separators=(",", ":"),
                           sort_keys=True).encode())
    return f"{body}.{_b64(_mac(key, purpose, body))}"


def verify(key: bytes, purpose: str, token: str, *, now: float) -> dict[str, Any] | None:
    """The payload of a valid, unexpired ``token`` made for ``purpose``; None otherwise."""
    if len(token) > MAX_TOKEN or _SHAPE.fullmatch(token) is None:
        return None
    body, mac = token.split(".")
    try:
        given = _unb64(mac)
        if not hmac.compare_digest(given, _mac(key, purpose, body)):
            return None
        payload = json.loads(_unb64(body))
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(payload, dict) or not isinstance(payload.get("e"), int):
        return None
    if payload["e"] <= now:
        return None
    return payload


def share_link(key: bytes, *, workspace_id: str, port: int, link_id: str,
               expires_at: int) -> str:
    return sign(key, SHARE, {"w": workspace_id, "p": port, "i": link_id},
                expires_at=expires_at)


def share_link_id(payload: dict[str, Any] | None, *, workspace_id: str, port: int
                  ) -> str | None:
    """The link id of a verified share-link payload for this workspace and port; None when
    it is for another, or names no link (made before links could be revoked)."""
    if payload is None or payload.get("w") != workspace_id or payload.get("p") != port:
        return None
    link_id = payload.get("i")
    return link_id if isinstance(link_id, str) and link_id else None
