"""The operator's ceiling on the domain names users may allow (``DEN_NETWORK_USER_DOMAINS``;
pure, no I/O).

Users list domain names in an allowlist (``pypi.org``, ``*.npmjs.org``, ``git.corp:443``).
An operator may restrict which: each user entry must fall within one of the ceiling's
patterns, or be one the operator allows every workspace already (``DEN_NETWORK_ALLOW``).

- ``*`` (the default): any name.
- ``host.example``: that name exactly; ``*.example``: any name under it, at any depth, and
  patterns under it (``*.a.example``), not ``example`` itself (as in allowlists).
- ``:port`` limits the pattern to that port: a user entry must then name the same port (an
  entry without a port means every port, which is more).

An empty list lets users allow no domain names at all (addresses only).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from server.errors import Forbidden, ValidationFailed
from server.network.names import NameEntry, parse_name

ANY = "*"


def parse_pattern(text: str) -> NameEntry:
    """A ceiling pattern: ``*``, a name, or ``*.name``, optionally with ``:port``."""
    raw = text.strip()
    host, port = raw, 0
    if raw.count(":") == 1:
        host, _, port_text = raw.partition(":")
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ValidationFailed(f"domain pattern {raw!r}: the port must be 1-65535")
        port = int(port_text)
    if host == ANY:
        return NameEntry(pattern=ANY, port=port)
    entry = parse_name(host, port)
    if entry is None:
        raise ValidationFailed(f"domain pattern {raw!r} is neither * nor a domain name "
                               "(like pypi.org or *.corp.example, optionally with :port)")
    return entry


def covers(pattern: NameEntry, entry: NameEntry) -> bool:
    """Whether a user's ``entry`` opens nothing that ``pattern`` does not."""
    if pattern.port and entry.port != pattern.port:
        return False
    if pattern.pattern == ANY or pattern.pattern == entry.pattern:
        return True
    if not pattern.pattern.startswith("*."):
        return False
    suffix = pattern.pattern[1:]  # ".example": names strictly under it
    bare = entry.pattern[2:] if entry.pattern.startswith("*.") else entry.pattern
    return bare.endswith(suffix)


@dataclass(frozen=True)
class DomainCeiling:
    patterns: tuple[NameEntry, ...]  # the setting's: named in refusals
    operator: tuple[NameEntry, ...] = ()  # DEN_NETWORK_ALLOW's names: allowed, not named

    @classmethod
    def parse(cls, patterns: Iterable[str], *, operator: Iterable[NameEntry] = ()
              ) -> DomainCeiling:
        return cls(tuple(parse_pattern(p) for p in patterns), tuple(operator))

    def allows(self, entry: NameEntry) -> bool:
        return any(covers(p, entry) for p in (*self.patterns, *self.operator))

    def check(self, entries: Iterable[NameEntry]) -> None:
        """403 ``network_not_allowed`` naming the first entry the ceiling refuses."""
        for entry in entries:
            if not self.allows(entry):
                allowed = ", ".join(str(p) for p in self.patterns) or "none"
                raise Forbidden(
                    f"network allow entry {str(entry)!r}: this server lets users allow these "
                    f"domain names only: {allowed} (DEN_NETWORK_USER_DOMAINS)",
                    code="network_not_allowed")
