"""Domain names in network allowlists (pure): ``pypi.org``, ``*.npmjs.org``,
``git.corp.example:443``.

A name is matched against the question of a DNS query a workspace sends to Den's forwarder
(server/network/forwarder.py); the addresses the answer gives are then opened for that
workspace alone (server/network/pins.py). ``*.`` matches subdomains only, at any depth:
``*.npmjs.org`` matches ``registry.npmjs.org`` and ``a.b.npmjs.org``, not ``npmjs.org``
(list both for both). Names compare without case and without a trailing dot.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

_LABEL = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)$")
MAX_NAME = 253


def normalise(name: str) -> str:
    return name.strip().rstrip(".").lower()


def valid_name(name: str) -> bool:
    """A host name of at least two labels (letters, digits, ``-``, ``_``; no IP address)."""
    labels = name.split(".")
    return (0 < len(name) <= MAX_NAME and len(labels) >= 2
            and all(_LABEL.match(label) for label in labels)
            and not labels[-1].isdigit())


@dataclass(frozen=True)
class NameEntry:
    """One allowlist entry naming a domain: ``pattern`` is ``host.example`` or
    ``*.example``; ``port`` a TCP/UDP port or every port (0)."""

    pattern: str
    port: int = 0

    def __str__(self) -> str:
        return f"{self.pattern}:{self.port}" if self.port else self.pattern

    def matches(self, name: str) -> bool:
        name = normalise(name)
        if self.pattern.startswith("*."):
            return name.endswith(self.pattern[1:])
        return name == self.pattern


def parse_name(host: str, port: int) -> NameEntry | None:
    """A name entry from an entry's host part, or None when it is not a valid name or
    pattern."""
    pattern = normalise(host)
    bare = pattern[2:] if pattern.startswith("*.") else pattern
    if not valid_name(bare):
        return None
    return NameEntry(pattern=pattern, port=port)


def ports_for(name: str, entries: Iterable[NameEntry]) -> set[int]:
    """The ports ``name`` may be reached on by the entries that match it: empty when none
    matches, ``{0}`` when one allows every port."""
    ports = {e.port for e in entries if e.matches(name)}
    return {0} if 0 in ports else ports
