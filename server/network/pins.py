"""DNS-pinned rules (pure): which answered addresses a query opens for a workspace, and the
bounded table of those openings with their expiry.

When Den's forwarder answers a workspace's query for a name its policy allows, the answer's
IPv4 addresses are *pinned* for that workspace (and port, for ``name:port``) until the
record's TTL plus a grace has passed; the firewall then lets the workspace reach them.
Addresses the workspace learns any other way (its own DNS server, DNS over HTTPS, a
hard-coded address) open nothing. Answers are still judged like addresses: a name resolving
to a private, loopback, link-local, CGNAT or metadata address, the host's or another
workspace's (DNS rebinding), is not pinned unless the operator allows that range or that
name (``DEN_NETWORK_ALLOW``, ``DEN_NETWORK_USER_ALLOW``).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from server.network.names import NameEntry, ports_for
from server.network.policy import BLOCKED_V4, AllowEntry, Entry, NetworkPolicy, addresses, names

GRACE_S = 3600  # rules judge every packet: a pin outlives its record, for open connections
TTL_MAX_S = 86400
PINS_MAX = 256  # per workspace; the ones that expire first make room
# Never pinned, whoever allows the name (the operator's ranges still open them explicitly).
NEVER_V4 = ("0.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16", "224.0.0.0/4", "240.0.0.0/4")


@dataclass(frozen=True)
class Operator:
    """What the operator's settings say about names and ranges."""

    names: tuple[NameEntry, ...] = ()  # DEN_NETWORK_ALLOW names: every workspace, any address
    user_names: tuple[NameEntry, ...] = ()  # DEN_NETWORK_USER_ALLOW names: may be private
    ranges: tuple[AllowEntry, ...] = ()  # both settings' ranges

    @classmethod
    def from_entries(cls, allow: Sequence[Entry], user_allow: Sequence[Entry]) -> Operator:
        return cls(names=names(allow), user_names=names(user_allow),
                   ranges=(*addresses(allow), *addresses(user_allow)))


def _in(addr: ipaddress.IPv4Address, nets: Iterable[str]) -> bool:
    return any(addr in ipaddress.IPv4Network(n) for n in nets)


def pins_for(name: str, answers: Sequence[tuple[str, int]], policy: NetworkPolicy,
             operator: Operator, bridge_subnet: str) -> list[tuple[AllowEntry, int]]:
    """(pin, TTL) for each address of ``answers`` (address, TTL) to a query for ``name``
    that ``policy`` and ``operator`` let the workspace reach and that it could not reach
    without a pin."""
    if policy.mode == "none":
        return []
    own = ports_for(name, policy.names) if policy.mode == "allowlist" else set()
    granted = ports_for(name, operator.names)  # the operator's names: any address
    private_ok = bool(granted) or bool(ports_for(name, operator.user_names))
    found: list[tuple[AllowEntry, int]] = []
    for text, ttl in answers:
        try:
            addr = ipaddress.IPv4Address(text)
        except ValueError:
            continue
        if addr in ipaddress.IPv4Network(bridge_subnet) or _in(addr, NEVER_V4):
            ports: set[int] = set()  # another workspace, the host, metadata: never by name
        else:
            private = _in(addr, BLOCKED_V4) and not any(addr in e.network
                                                       for e in operator.ranges)
            if not private:
                ports = own | granted
                if policy.mode == "internet":
                    ports = set()  # public addresses are open anyway
            else:
                ports = (own | granted) if private_ok else set()
        if 0 in ports:
            ports = {0}
        net = ipaddress.IPv4Network(f"{addr}/32")
        found += [(AllowEntry(network=net, port=p), ttl) for p in sorted(ports)]
    return found


class PinTable:
    """Pins per container, each with its expiry and the name it was learned for (to judge
    it again when the policy changes). Bounded: :data:`PINS_MAX` per container."""

    def __init__(self, *, grace_s: float = GRACE_S, per_container: int = PINS_MAX) -> None:
        self.grace_s = grace_s
        self.per_container = per_container
        self._pins: dict[str, dict[AllowEntry, tuple[float, str]]] = {}

    def add(self, container: str, name: str, pins: Iterable[tuple[AllowEntry, int]],
            now: float) -> bool:
        """Pin or extend; True when a pin is new (the firewall must learn it)."""
        table = self._pins.setdefault(container, {})
        new = False
        for pin, ttl in pins:
            until = now + min(max(ttl, 0), TTL_MAX_S) + self.grace_s
            old = table.get(pin)
            if old is None:
                new = True
            table[pin] = (max(until, old[0]) if old else until, name)
        while len(table) > self.per_container:
            del table[min(table, key=lambda p: table[p][0])]
        if not table:
            del self._pins[container]
        return new

    def expire(self, now: float) -> bool:
        """Drop expired pins; True when some were dropped."""
        dropped = False
        for container in list(self._pins):
            table = self._pins[container]
            for pin in [p for p, (until, _) in table.items() if until <= now]:
                del table[pin]
                dropped = True
            if not table:
                del self._pins[container]
        return dropped

    def keep(self, policies: Mapping[str, NetworkPolicy], operator: Operator,
             bridge_subnet: str) -> bool:
        """Judge every pin again with the current policies (a container gone or a policy
        changed); True when some were dropped."""
        dropped = False
        for container in list(self._pins):
            policy = policies.get(container)
            table = self._pins[container]
            for pin, (_, name) in list(table.items()):
                addr = str(pin.network.network_address)
                still = policy is not None and pin in {
                    p for p, _ in pins_for(name, [(addr, 0)], policy, operator, bridge_subnet)}
                if not still:
                    del table[pin]
                    dropped = True
            if not table:
                del self._pins[container]
        return dropped

    def of(self, container: str) -> tuple[AllowEntry, ...]:
        return tuple(sorted(self._pins.get(container, {}), key=str))

    def by_container(self) -> dict[str, tuple[AllowEntry, ...]]:
        return {c: self.of(c) for c in self._pins}

    def __len__(self) -> int:
        return sum(len(t) for t in self._pins.values())
