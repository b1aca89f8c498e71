"""Parsing user-supplied URLs without surprises: one pure helper for repository and forge URLs.

``urllib.parse.urlsplit`` raises ``ValueError`` on some inputs (``https://[::1``), parses a
port only when asked (``.port`` raises for ``abc`` or ``99999``) and accepts any host text
(``%zz``). :func:`split_url` does all of that up front and answers ``ValidationFailed``
naming the field, so that a bad URL is a 422 wherever it is given.
"""

from __future__ import annotations

import re
from urllib.parse import SplitResult, urlsplit

from server.errors import ValidationFailed

# A DNS name or IPv4 address (letters, digits, '.', '-', '_'), or an IPv6 literal in brackets.
_HOST = re.compile(r"^(?:[A-Za-z0-9_][A-Za-z0-9._-]*|\[[0-9A-Fa-f:.]+\])$")


def split_url(url: str, *, what: str) -> SplitResult:
    """``url`` split, its host and port checked (``what`` names the field in messages)."""
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise ValidationFailed(f"{what} is not a valid URL: {exc}") from exc
    hostport = parts.netloc.rpartition("@")[2]
    host, port = hostport, ""
    if hostport.startswith("["):
        end = hostport.find("]")
        host, rest = hostport[: end + 1], hostport[end + 1:]
        if rest:
            if not rest.startswith(":"):
                raise ValidationFailed(f"{what} has an invalid host {hostport!r}")
            port = rest[1:]
    elif ":" in hostport:
        host, _, port = hostport.partition(":")
    if host.startswith("-"):
        raise ValidationFailed(f"{what} has a host name starting with '-'")
    if host and not _HOST.match(host):
        raise ValidationFailed(f"{what} has an invalid host name {host!r}")
    if ":" in hostport.rpartition("]")[2] and not (
            port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
        raise ValidationFailed(f"{what} has an invalid port {port!r} (1 to 65535)")
    return parts


def check_host(host: str, *, what: str) -> None:
    """A host name as in :func:`split_url` (for scp-like ``user@host:path``)."""
    if not _HOST.match(host) or host.startswith("["):
        raise ValidationFailed(f"{what} has an invalid host name {host!r}")
