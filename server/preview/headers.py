"""What goes to the app and what comes back: header rewriting, pure.

To the app: the request head with ``Host`` as the browser sent it, the hop-by-hop headers
(RFC 9110 7.6.1, and whatever ``Connection`` names) removed, Den's own cookies and Den API
tokens removed, and ``X-Forwarded-For/-Proto/-Host`` and ``Forwarded`` (RFC 7239) set from what
Den saw (a client's own values are dropped, not trusted). Back to the browser: hop-by-hop
headers removed, any ``Set-Cookie`` for Den's cookie names dropped (an app must not overwrite
or shadow Den's session), and on the path form root-relative redirects and cookie paths
moved under the ``/preview/<workspace>/<port>`` prefix.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

Headers = list[tuple[bytes, bytes]]

HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"proxy-authenticate",
    b"proxy-authorization", b"te", b"trailer", b"transfer-encoding", b"upgrade",
})
FORWARDING = frozenset({
    b"forwarded", b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host",
    b"x-forwarded-prefix", b"x-real-ip",
})
DEN_COOKIE_PREFIX = "den_"  # den_session (Den's origin) and den_preview (a preview origin)


def _connection_tokens(headers: Iterable[tuple[bytes, bytes]]) -> set[bytes]:
    tokens: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            tokens |= {t.strip().lower() for t in value.split(b",") if t.strip()}
    return tokens


def without_den_cookies(cookie_header: str) -> str:
    """A Cookie header without Den's cookies (``den_*``); "" when nothing is left."""
    kept = [part.strip() for part in cookie_header.split(";")
            if part.strip() and not part.strip().lower().startswith(DEN_COOKIE_PREFIX)]
    return "; ".join(kept)


def _quote_for(ip: str) -> str:
    return f'"[{ip}]"' if ":" in ip else ip


def request_headers(headers: Sequence[tuple[bytes, bytes]], *, client_ip: str, proto: str,
                    host: str, prefix: str | None = None) -> Headers:
    """The head to send to the app for a client request with ``headers`` (no
    ``Connection``: the caller adds what its upstream connection needs)."""
    drop = HOP_BY_HOP | FORWARDING | _connection_tokens(headers)
    out: Headers = []
    for name, value in headers:
        low = name.lower()
        if low in drop:
            continue
        if low == b"cookie":
            kept = without_den_cookies(value.decode("latin-1"))
            if kept:
                out.append((b"cookie", kept.encode("latin-1")))
            continue
        if low == b"authorization" and value[:11].lower() == b"bearer den_":
            continue  # a Den API token authenticated this request to Den, not to the app
        out.append((low, value))
    out += [
        (b"x-forwarded-for", client_ip.encode("latin-1")),
        (b"x-forwarded-proto", proto.encode("latin-1")),
        (b"x-forwarded-host", host.encode("latin-1")),
        (b"forwarded",
         f'for={_quote_for(client_ip)};proto={proto};host="{host}"'.encode("latin-1")),
    ]
    if prefix:
        out.append((b"x-forwarded-prefix", prefix.encode("latin-1")))
    return out


def _set_cookie_name(value: bytes) -> str:
    return value.split(b"=", 1)[0].strip().decode("latin-1").lower()


def _prefixed_location(location: str, *, prefix: str, origin: str) -> str:
    if origin and location.startswith(origin + "/"):
        location = location[len(origin):]
    if location.startswith("/") and not location.startswith("//") \
            and not location.startswith(prefix + "/") and location != prefix:
        return prefix + location
    return location


def _prefixed_cookie(value: str, prefix: str) -> str:
    parts = [p.strip() for p in value.split(";")]
    out = []
    for part in parts:
        key, _, val = part.partition("=")
        if key.strip().lower() == "path" and val.startswith("/") \
                and not val.startswith(prefix + "/"):
            part = f"Path={prefix}{val}"
        out.append(part)
    if not any(p.split("=", 1)[0].strip().lower() == "path" for p in parts[1:]):
        out.append(f"Path={prefix}/")
    return "; ".join(out)


def response_headers(headers: Iterable[tuple[bytes, bytes]], *, prefix: str | None = None,
                     origin: str = "") -> Headers:
    """The app's response headers as the browser gets them. ``prefix`` (path form) moves
    root-relative redirects (and absolute ones to ``origin``, Den's own) and cookie paths
    under it."""
    headers = list(headers)
    drop = HOP_BY_HOP | _connection_tokens(headers)
    out: Headers = []
    for name, value in headers:
        low = name.lower()
        if low in drop:
            continue
        if low == b"set-cookie":
            if _set_cookie_name(value).startswith(DEN_COOKIE_PREFIX):
                continue
            if prefix:
                value = _prefixed_cookie(value.decode("latin-1"), prefix).encode("latin-1")
        elif low == b"location" and prefix:
            value = _prefixed_location(value.decode("latin-1"), prefix=prefix,
                                       origin=origin).encode("latin-1")
        out.append((low, value))
    return out
