"""API rate limits (issue 11 §2): token buckets per API token and per source address.

A bucket holds up to ``burst`` requests and refills at ``rate`` a second; a request takes one,
and a request that finds its bucket empty is refused with 429 ``rate_limited`` and a
``Retry-After`` of the whole seconds until one is back. Three kinds of bucket:

- per token: every ``/api/`` request carrying ``Authorization: Bearer`` (or a browser's
  session cookie), keyed by a hash of it, valid or not;
- per source address: every ``/api/`` request and every sign-in page, whatever it carries
  (what floods without a token, or with many);

A WebSocket opened under ``/api/`` (streaming exec, terminal, events, process logs) takes
from the same buckets as a request, and is refused before the upgrade: an HTTP 429 with
``Retry-After`` and the JSON error, through the ASGI WebSocket denial response (uvicorn has
it); a server without that extension accepts and closes with 4429, as the API's other
WebSocket errors (4000 + status) do.
- per source address for sign-ins (``/login/token``, ``/login/oidc``, ``/auth/callback``):
  a much slower rate, against guessing tokens.

The check runs before authentication (a flood never reaches the database) and costs a dict
lookup. Buckets live in this process's memory, at most ``MAX_KEYS`` of each kind (the least
recently used go first: a forgotten bucket is a full one).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from starlette.datastructures import Headers
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from server.config import Settings
from server.web.sessions import COOKIE

MAX_KEYS = 100_000
LOGIN_PATHS = ("/login/token", "/login/oidc", "/auth/callback")


@dataclass
class Bucket:
    tokens: float
    at: float


class Buckets:
    """Token buckets of one rate and burst, by key."""

    def __init__(self, *, rate: float, burst: int, max_keys: int = MAX_KEYS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self._clock = clock
        self._buckets: OrderedDict[str, Bucket] = OrderedDict()

    def take(self, key: str) -> float:
        """Take one request from ``key``'s bucket: 0 when there was one, else the seconds
        until there is."""
        now = self._clock()
        bucket = self._buckets.pop(key, None)
        if bucket is None:
            bucket = Bucket(tokens=float(self.burst), at=now)
        bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.at) * self.rate)
        bucket.at = now
        self._buckets[key] = bucket  # most recently used last
        if len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        if bucket.tokens >= 1:
            bucket.tokens -= 1
            return 0.0
        return (1 - bucket.tokens) / self.rate


def limited_paths(path: str) -> tuple[bool, bool]:
    """(an API request, a sign-in) for ``path``."""
    return path.startswith("/api/"), path in LOGIN_PATHS


def credential_key(headers: Headers) -> str | None:
    """A hash of the request's bearer token or session cookie (never the secret itself)."""
    auth = headers.get("authorization", "")
    scheme, _, value = auth.partition(" ")
    secret = value.strip() if scheme.lower() == "bearer" else ""
    if not secret:
        for part in headers.get("cookie", "").split(";"):
            name, _, cookie = part.strip().partition("=")
            if name == COOKIE and cookie:
                secret = "cookie:" + cookie
                break
    return hashlib.sha256(secret.encode()).hexdigest()[:32] if secret else None


class RateLimit:
    """ASGI middleware applying the three buckets to HTTP requests and WebSocket opens."""

    def __init__(self, app: ASGIApp, *, settings: Settings) -> None:
        self.app = app
        st = settings
        self.per_token = (Buckets(rate=st.rate_limit_per_token, burst=st.rate_limit_token_burst)
                          if st.rate_limit_per_token > 0 else None)
        self.per_address = (Buckets(rate=st.rate_limit_per_address,
                                    burst=st.rate_limit_address_burst)
                            if st.rate_limit_per_address > 0 else None)
        self.logins = (Buckets(rate=st.rate_limit_login_per_address,
                               burst=st.rate_limit_login_burst)
                       if st.rate_limit_login_per_address > 0 else None)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            wait = self.wait_s(scope)
            if wait > 0:
                if scope["type"] == "websocket":
                    await refuse_websocket(scope, receive, send, wait)
                else:
                    await refusal(scope, wait)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def wait_s(self, scope: Scope) -> float:
        """0 when the request may pass (and it is counted), else seconds to wait."""
        api, login = limited_paths(scope["path"])
        if not (api or login):
            return 0.0
        client = scope.get("client")
        address = client[0] if client else "unknown"
        waits = []
        if login and self.logins is not None:
            waits.append(self.logins.take(address))
        if self.per_address is not None:
            waits.append(self.per_address.take(address))
        if api and self.per_token is not None:
            key = credential_key(Headers(scope=scope))
            if key is not None:
                waits.append(self.per_token.take(key))
        return max(waits, default=0.0)


def _retry(wait_s: float) -> tuple[int, str]:
    retry = max(1, math.ceil(wait_s))
    return retry, f"too many requests; try again in {retry} s"


def refusal(scope: Scope, wait_s: float) -> Response:
    """The 429: Den's JSON error under ``/api/``, a plain page for the sign-in pages (no
    template: it would read the session and the database this limit protects)."""
    retry, message = _retry(wait_s)
    headers = {"Retry-After": str(retry)}
    if scope["path"].startswith("/api/"):
        return JSONResponse({"error": {"code": "rate_limited", "message": message}},
                            status_code=429, headers=headers)
    return PlainTextResponse(f"Too many sign-in attempts from your address: {message}.\n",
                             status_code=429, headers=headers)


async def refuse_websocket(scope: Scope, receive: Receive, send: Send, wait_s: float) -> None:
    """Refuse a WebSocket before it opens: the 429 as an HTTP answer to the upgrade where
    the server can send one, else an accepted socket closed at once with the error and
    close code 4429."""
    if "websocket.http.response" in scope.get("extensions", {}):
        await refusal(scope, wait_s)(scope, receive, send)
        return
    if (await receive())["type"] != "websocket.connect":
        return  # the client went away first
    error = {"code": "rate_limited", "message": _retry(wait_s)[1]}
    await send({"type": "websocket.accept"})
    await send({"type": "websocket.send", "text": json.dumps({"type": "error", "error": error})})
    await send({"type": "websocket.close", "code": 4429})
