"""A workspace's network policy as plain data, and its validation (pure, no I/O).

``none``: no network at all (exec, files, terminals and SSH go through the agent, which
needs none). ``internet``: public addresses, plus what the operator allows; never the host,
other workspaces, private, loopback, link-local, CGNAT or multicast ranges. ``allowlist``:
only the entries listed (CIDRs, ``ip`` or ``ip:port``, domain names ``name``, ``*.name`` or
``name:port``), plus DNS. A name is enforced by DNS-pinned rules: the addresses Den's own
forwarder answers for it are opened for that workspace (server/network/pins.py).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from server.errors import Forbidden, ValidationFailed
from server.network.ceiling import DomainCeiling
from server.network.names import NameEntry, parse_name

if TYPE_CHECKING:
    from server.config import Settings

MODES = ("none", "allowlist", "internet")  # from least to most open: the ceiling's order
MAX_ENTRIES = 64

# Never reachable in ``internet`` mode unless the operator allows a range (DEN_NETWORK_ALLOW).
BLOCKED_V4 = (
    "0.0.0.0/8",  # "this network"
    "10.0.0.0/8",  # private
    "100.64.0.0/10",  # carrier-grade NAT
    "127.0.0.0/8",  # loopback
    "169.254.0.0/16",  # link-local, cloud metadata (169.254.169.254)
    "172.16.0.0/12",  # private (Docker's bridges)
    "192.0.0.0/24",  # IETF protocol assignments
    "192.168.0.0/16",  # private
    "198.18.0.0/15",  # benchmarking
    "224.0.0.0/4",  # multicast
    "240.0.0.0/4",  # reserved, broadcast
)


@dataclass(frozen=True)
class AllowEntry:
    """One allowlist entry: a network, and a TCP/UDP port or every port (0)."""

    network: ipaddress.IPv4Network
    port: int = 0

    def __str__(self) -> str:
        net = (str(self.network.network_address) if self.network.prefixlen == 32
               else str(self.network))
        return f"{net}:{self.port}" if self.port else net


Entry = AllowEntry | NameEntry


@dataclass(frozen=True)
class NetworkPolicy:
    mode: str = "internet"
    allow: tuple[Entry, ...] = ()

    @property
    def addresses(self) -> tuple[AllowEntry, ...]:
        return addresses(self.allow)

    @property
    def names(self) -> tuple[NameEntry, ...]:
        return names(self.allow)

    def to_json(self) -> dict[str, Any]:
        return {"mode": self.mode, "allow": [str(e) for e in self.allow]}

    @classmethod
    def from_json(cls, data: Any, *, default: str = "internet") -> NetworkPolicy:
        """A stored policy (trusted: it was validated before it was stored)."""
        if not isinstance(data, dict) or data.get("mode") not in MODES:
            return cls(mode=default)
        return cls(mode=str(data["mode"]),
                   allow=tuple(parse_entry(str(e)) for e in data.get("allow") or []))


def addresses(entries: Iterable[Entry]) -> tuple[AllowEntry, ...]:
    return tuple(e for e in entries if isinstance(e, AllowEntry))


def names(entries: Iterable[Entry]) -> tuple[NameEntry, ...]:
    return tuple(e for e in entries if isinstance(e, NameEntry))


def parse_entry(text: str) -> Entry:
    """``10.20.0.0/16``, ``203.0.113.7``, ``203.0.113.7:443``, ``198.51.100.0/24:53``,
    ``pypi.org``, ``*.npmjs.org``, ``git.corp.example:443``."""
    raw = text.strip()
    if not raw or len(raw) > 260:
        raise ValidationFailed(f"network allow entry {text[:64]!r} is empty or too long")
    host, port = raw, 0
    if raw.count(":") == 1:
        host, _, port_text = raw.partition(":")
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ValidationFailed(f"network allow entry {raw!r}: the port must be 1-65535")
        port = int(port_text)
    elif ":" in raw or raw.startswith("["):
        raise ValidationFailed(f"network allow entry {raw!r}: IPv6 is not supported yet "
                               "(workspaces have no IPv6)")
    try:
        network = ipaddress.ip_network(host, strict=False)
    except ValueError:
        name = parse_name(host, port)
        if name is None:
            raise ValidationFailed(
                f"network allow entry {raw!r} is neither an address, a CIDR range nor a "
                "domain name (like pypi.org or *.npmjs.org, optionally with :port)") from None
        return name
    if not isinstance(network, ipaddress.IPv4Network):
        raise ValidationFailed(f"network allow entry {raw!r}: IPv6 is not supported yet")
    return AllowEntry(network=network, port=port)


def parse_ranges(values: Iterable[str]) -> tuple[Entry, ...]:
    return tuple(parse_entry(v) for v in values)


def _blocked() -> list[ipaddress.IPv4Network]:
    return [ipaddress.IPv4Network(n) for n in BLOCKED_V4]


def _covered(net: ipaddress.IPv4Network, by: Sequence[Entry]) -> bool:
    return any(net.subnet_of(e.network) for e in addresses(by))


def validate(mode: str, allow: Sequence[str], *, ceiling: str,
             user_ranges: Sequence[Entry], operator: Sequence[Entry],
             domains: DomainCeiling | None = None) -> NetworkPolicy:
    """A user's requested policy, checked against the operator's ceiling: the mode may be at
    most ``ceiling`` (403 beyond it), and allowlist entries may name public addresses, or
    private ones inside the operator's ranges (``operator`` or ``user_ranges``). Domain
    names must fall within ``domains`` (403; None: any name); what they open is checked
    when they are resolved (public addresses only, unless the operator lists the name or
    the address)."""
    if mode not in MODES:
        raise ValidationFailed(f"network mode must be one of {', '.join(MODES)}")
    if MODES.index(mode) > MODES.index(ceiling):
        raise Forbidden(f"this server allows network mode {ceiling!r} at most",
                        code="network_not_allowed")
    if mode != "allowlist" and allow:
        raise ValidationFailed("network allow entries go with mode \"allowlist\" only")
    if len(allow) > MAX_ENTRIES:
        raise ValidationFailed(f"at most {MAX_ENTRIES} network allow entries")
    entries = tuple(dict.fromkeys(parse_entry(e) for e in allow))
    for entry in addresses(entries):
        private = any(entry.network.overlaps(b) for b in _blocked())
        if private and not _covered(entry.network, [*user_ranges, *operator]):
            raise Forbidden(
                f"network allow entry {entry}: private, loopback, link-local and other "
                "non-public ranges need the operator's permission (DEN_NETWORK_USER_ALLOW)",
                code="network_not_allowed")
    if domains is not None:
        domains.check(names(entries))
    return NetworkPolicy(mode=mode, allow=entries)


def user_domains(settings: Settings) -> DomainCeiling:
    """The operator's ceiling on domain names (``DEN_NETWORK_USER_DOMAINS``), the names of
    ``DEN_NETWORK_ALLOW`` included."""
    return DomainCeiling.parse(settings.network_user_domains,
                               operator=names(parse_ranges(settings.network_allow)))


def within(policy: NetworkPolicy, domains: DomainCeiling) -> NetworkPolicy:
    """``policy`` less the domain names ``domains`` no longer allows (a fork of a snapshot
    taken under a looser ceiling)."""
    kept = tuple(e for e in policy.allow
                 if not isinstance(e, NameEntry) or domains.allows(e))
    return NetworkPolicy(mode=policy.mode, allow=kept)
