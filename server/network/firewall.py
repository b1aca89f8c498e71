"""Host firewall rules that enforce workspaces' network policies (iptables; pure builder
plus a thin I/O shell).

Every packet a workspace sends leaves its gVisor sandbox through Den's bridge, so the host
decides, whatever the workspace does inside. Den owns a few chains named after its network
(``DEN-<hash>-FWD`` for forwarded traffic and traffic to the host, ``DEN-<hash>-INET`` for
the internet mode) and one jump to them from ``DOCKER-USER`` (traffic leaving the bridge)
and from ``INPUT`` (traffic to the host itself), each matching ``-i <bridge>`` only. The
chains are rewritten whole, atomically, with ``iptables-restore --noflush`` (which leaves
every other chain alone) each time a workspace starts, stops or changes its policy. Rules
match the source address of each container, and every packet is judged (no "established"
shortcut for what a workspace sends), so a tighter policy cuts open connections at once.
A source Den does not know (a container that has just started) is rejected: fail closed.

A bridge Den makes itself (the microVM backend's, ``Bridge.own``) has no engine behind it
that accepts and masquerades what leaves it (Docker's ``FORWARD`` policy is ``DROP``): the
same rules then sit in ``DEN-<hash>-OWN``, jumped to first from ``FORWARD``, which sends the
bridge's traffic through ``-FWD`` and accepts what that lets through, accepts the replies,
and refuses anything else bound for the bridge; ``DEN-<hash>-NAT`` (``POSTROUTING``)
masquerades what leaves for other networks. The policy rules are the same for both.

IPv6: Den's network has none; an ip6tables chain rejects anything from the bridge anyway
(link-local addresses of the host's bridge).
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from server.errors import DenError
from server.network.policy import BLOCKED_V4, AllowEntry, Entry, NetworkPolicy, addresses

log = logging.getLogger(__name__)

# Refusals go through a chain of their own: TCP gets a reset, so that the workspace's socket
# fails at once and closes (a gVisor endpoint left waiting for an answer that never comes,
# e.g. a close cut short by a tighter policy, counts as connected and makes a pause's
# checkpoint fail: measured), anything else an ICMP "administratively prohibited".
REJECT_TCP = ["-p", "tcp", "-j", "REJECT", "--reject-with", "tcp-reset"]


class FirewallError(DenError):
    status_code = 503
    code = "firewall_unavailable"


def chain_prefix(network: str) -> str:
    """``DEN-<8 hex>``: iptables chain names are short (28 characters)."""
    return "DEN-" + hashlib.sha256(network.encode()).hexdigest()[:8].upper()


def bridge_name(network: str) -> str:
    """The host interface of Den's bridge (at most 15 characters)."""
    return "den-" + hashlib.sha256(network.encode()).hexdigest()[:10]


@dataclass(frozen=True)
class Bridge:
    """Den's network as the host sees it."""

    interface: str
    subnet: str  # e.g. 172.18.0.0/16
    own: bool = False  # made by Den, not the engine: Den accepts and masquerades (module doc)


@dataclass(frozen=True)
class Member:
    """A running workspace container on the bridge, and the policy it gets."""

    address: str
    policy: NetworkPolicy
    port: str = ""  # its port on the bridge; "" matches by address only
    # addresses its allowed domain names resolved to through Den's forwarder (pins.py)
    pins: tuple[AllowEntry, ...] = ()


def _match(entry: AllowEntry) -> list[list[str]]:
    dest = ["-d", str(entry.network)]
    if not entry.port:
        return [dest]
    return [[*dest, "-p", proto, "--dport", str(entry.port)] for proto in ("tcp", "udp")]


def _dns(resolvers: Sequence[str]) -> list[list[str]]:
    return [["-d", f"{r}/32", "-p", proto, "--dport", "53"]
            for r in resolvers for proto in ("udp", "tcp")]


def log_tag(prefix: str) -> str:
    """What Den's refusals are logged with in the kernel log (at most 29 characters)."""
    return f"{prefix}-DENY "


def ruleset(prefix: str, bridge: Bridge, members: Sequence[Member], *,
            resolvers: Sequence[str], operator_allow: Sequence[Entry],
            log_denied: bool = False) -> str:
    """The ``iptables-restore --noflush`` input that replaces Den's IPv4 chains. With
    ``log_denied`` each refusal is also logged (at most 20 a second, bursts of 50, for all
    workspaces together) with :func:`log_tag`, for the denial events."""
    fwd, inet, rej = f"{prefix}-FWD", f"{prefix}-INET", f"{prefix}-REJ"
    lines = ["*filter", f":{fwd} - [0:0]", f":{inet} - [0:0]", f":{rej} - [0:0]"]
    deny = ["-j", rej]
    operator_allow = addresses(operator_allow)  # names are pinned per member

    def add(chain: str, *parts: list[str]) -> None:
        lines.append(" ".join(["-A", chain, *[p for part in parts for p in part]]))

    # Replies of connections someone else opened to a workspace (the host reaching it).
    add(fwd, ["-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "--ctdir", "REPLY",
              "-j", "RETURN"])
    for m in members:
        src = ["-s", f"{m.address}/32"]
        if m.port:  # a packet with this address from another port is forged: rejected below
            src += ["-m", "physdev", "--physdev-in", m.port]
        if m.policy.mode == "internet":
            if m.pins:  # private answers of names the operator allows; never the host's
                add(fwd, src, ["-m", "addrtype", "--dst-type", "LOCAL"], ["-g", inet])
                for entry in m.pins:
                    for match in _match(entry):
                        add(fwd, src, match, ["-j", "RETURN"])
            add(fwd, src, ["-g", inet])
        elif m.policy.mode == "allowlist":
            for dns in _dns(resolvers):
                add(fwd, src, dns, ["-j", "RETURN"])
            add(fwd, src, ["-d", bridge.subnet], deny)
            for entry in operator_allow:
                for match in _match(entry):
                    add(fwd, src, match, ["-j", "RETURN"])
            add(fwd, src, ["-m", "addrtype", "--dst-type", "LOCAL"], deny)
            for entry in (*m.policy.addresses, *m.pins):
                for match in _match(entry):
                    add(fwd, src, match, ["-j", "RETURN"])
            add(fwd, src, deny)
        else:
            add(fwd, src, deny)
    add(fwd, deny)  # an address Den does not know: fail closed

    for dns in _dns(resolvers):
        add(inet, dns, ["-j", "RETURN"])
    add(inet, ["-d", bridge.subnet], deny)  # other workspaces and the bridge's gateway
    for entry in operator_allow:
        for match in _match(entry):
            add(inet, match, ["-j", "RETURN"])
    for net in BLOCKED_V4:
        add(inet, ["-d", net], deny)
    add(inet, ["-m", "addrtype", "--dst-type", "LOCAL"], deny)  # any address of the host
    add(inet, ["-j", "RETURN"])
    if bridge.own:
        own = f"{prefix}-OWN"
        lines.insert(1, f":{own} - [0:0]")
        iface = ["-i", bridge.interface]
        add(own, iface, ["-j", fwd])  # refused there, or back here: allowed
        add(own, iface, ["-j", "ACCEPT"])
        add(own, ["-o", bridge.interface, "-m", "conntrack", "--ctstate",
                  "RELATED,ESTABLISHED", "-j", "ACCEPT"])
        add(own, ["-o", bridge.interface], deny)  # nobody else opens connections to it
    if log_denied:
        add(rej, ["-m", "limit", "--limit", "20/second", "--limit-burst", "50", "-j", "LOG",
                  "--log-level", "6", "--log-prefix", f'"{log_tag(prefix)}"'])
    add(rej, REJECT_TCP)
    add(rej, ["-j", "REJECT", "--reject-with", "icmp-admin-prohibited"])
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def nat_ruleset(prefix: str, bridge: Bridge) -> str:
    """The ``iptables-restore --noflush`` input of an own bridge's masquerading (nat table):
    what its members send to other networks leaves with the host's address."""
    chain = f"{prefix}-NAT"
    return (f"*nat\n:{chain} - [0:0]\n-A {chain} -s {bridge.subnet} ! -o {bridge.interface} "
            f"-j MASQUERADE\nCOMMIT\n")


def ruleset_v6(prefix: str) -> str:
    chain = f"{prefix}-FWD"
    return (f"*filter\n:{chain} - [0:0]\n-A {chain} {' '.join(REJECT_TCP)}\n"
            f"-A {chain} -j REJECT --reject-with icmp6-adm-prohibited\nCOMMIT\n")


def jumps(prefix: str, bridge: Bridge) -> list[tuple[str, list[str]]]:
    """(built-in chain, rule) pairs that send the bridge's traffic into Den's chains (a
    rule may name its table first: ``-t nat``)."""
    rule = ["-i", bridge.interface, "-j", f"{prefix}-FWD"]
    if bridge.own:
        return [("FORWARD", ["-j", f"{prefix}-OWN"]), ("INPUT", rule),
                ("POSTROUTING", ["-t", "nat", "-j", f"{prefix}-NAT"])]
    return [("DOCKER-USER", rule), ("INPUT", rule)]


def jumps_v6(prefix: str, bridge: Bridge) -> list[tuple[str, list[str]]]:
    rule = ["-i", bridge.interface, "-j", f"{prefix}-FWD"]
    return [("FORWARD", rule), ("INPUT", rule)]


def host_resolvers(resolv_conf: str, *, loopback: bool = False) -> list[str]:
    """IPv4 name servers of a resolv.conf's text that a workspace can reach (not loopback:
    the workspace's loopback is its own; ``loopback``: the host's forwarder can)."""
    found = []
    for line in resolv_conf.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            try:
                addr = ipaddress.ip_address(parts[1])
            except ValueError:
                continue
            if isinstance(addr, ipaddress.IPv4Address) and (loopback or not addr.is_loopback):
                found.append(str(addr))
    return found


class Iptables:
    """Applies rule sets with the host's ``iptables``/``ip6tables`` (nft or legacy backend,
    whichever the host's binaries use). Blocking: call it off the event loop."""

    def __init__(self, prefix: str, *, iptables: str = "iptables",
                 ip6tables: str = "ip6tables") -> None:
        self.prefix = prefix
        self._v4 = iptables
        self._v6 = ip6tables if shutil.which(ip6tables) else None

    def _run(self, argv: list[str], *, stdin: str | None = None, check: bool = True
             ) -> subprocess.CompletedProcess[str]:
        try:
            done = subprocess.run(argv, input=stdin, capture_output=True, text=True,
                                  timeout=30)
        except (OSError, subprocess.SubprocessError) as exc:
            raise FirewallError("the host firewall (iptables) cannot be changed",
                                detail=f"{argv[0]}: {exc}") from exc
        if check and done.returncode != 0:
            raise FirewallError("the host firewall (iptables) refused Den's rules",
                                detail=f"{' '.join(argv)}: {done.stderr.strip()[-500:]}")
        return done

    def apply(self, v4: str, v6: str, bridge: Bridge) -> None:
        """Replace Den's chains and make sure the jumps to them exist (idempotent)."""
        self._run([f"{self._v4}-restore", "--noflush"], stdin=v4)
        if bridge.own:
            self._run([f"{self._v4}-restore", "--noflush"],
                      stdin=nat_ruleset(self.prefix, bridge))
        self._ensure_jumps(self._v4, jumps(self.prefix, bridge))
        if self._v6 is not None:
            self._run([f"{self._v6}-restore", "--noflush"], stdin=v6)
            self._ensure_jumps(self._v6, jumps_v6(self.prefix, bridge))

    def apply_v4(self, v4: str) -> None:
        """Replace Den's IPv4 chains only (a new DNS pin: the jumps and the IPv6 chain are
        in place since the last :meth:`apply`)."""
        self._run([f"{self._v4}-restore", "--noflush"], stdin=v4)

    def _ensure_jumps(self, tool: str, wanted: list[tuple[str, list[str]]]) -> None:
        for chain, rule in wanted:
            if self._run([tool, "-w", "-C", chain, *rule], check=False).returncode != 0:
                self._run([tool, "-w", "-I", chain, "1", *rule])

    def remove(self) -> None:
        """Remove Den's jumps and chains (uninstall, tests); what is missing is fine."""
        ours = {f"{self.prefix}-{c}" for c in ("FWD", "OWN", "NAT")}
        tables = [(self._v4, ["-t", "filter"]), (self._v4, ["-t", "nat"]),
                  *([(self._v6, ["-t", "filter"])] if self._v6 else [])]
        for tool, table in tables:
            listing = self._run([tool, "-w", *table, "-S"], check=False).stdout.splitlines()
            for line in listing:
                parts = line.split()
                if (len(parts) > 2 and parts[0] == "-A" and not parts[1].startswith(self.prefix)
                        and ours & set(parts)):
                    self._run([tool, "-w", *table, "-D", *parts[1:]], check=False)
            for line in listing:
                parts = line.split()
                if len(parts) == 2 and parts[0] == "-N" and parts[1].startswith(self.prefix):
                    self._run([tool, "-w", *table, "-F", parts[1]], check=False)
            for line in listing:
                parts = line.split()
                if len(parts) == 2 and parts[0] == "-N" and parts[1].startswith(self.prefix):
                    self._run([tool, "-w", *table, "-X", parts[1]], check=False)


def members_of(by_name: Mapping[str, str], policies: Mapping[str, NetworkPolicy],
               ports: Mapping[str, str] | None = None,
               pins: Mapping[str, tuple[AllowEntry, ...]] | None = None) -> list[Member]:
    """Members from container name -> address and -> bridge port (the engine), container
    name -> policy (the database) and -> pinned addresses; containers without a row get no
    network."""
    return [Member(address=addr, policy=policies.get(name, NetworkPolicy(mode="none")),
                   port=(ports or {}).get(name, ""), pins=(pins or {}).get(name, ()))
            for name, addr in sorted(by_name.items())]


def bridge_filtering(proc: Path = Path("/proc/sys/net/bridge/bridge-nf-call-iptables")
                     ) -> bool:
    """Whether bridged packets pass iptables (br_netfilter): then rules can match the
    bridge port a packet came in by."""
    try:
        return proc.read_text().strip() == "1"
    except OSError:
        return False
