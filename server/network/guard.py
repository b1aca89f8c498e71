"""Keeps the host firewall in step with the workspaces: which container has which address
(the engine), which policy (the database) and which addresses its allowed domain names
resolved to (the DNS forwarder's pins). The workspace service calls :meth:`sync` after every
change of the first two, the forwarder :meth:`learn` before it answers; each call rebuilds
Den's chains whole (a few ms), so there is no incremental state to drift."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from server.config import Settings
from server.network import firewall
from server.network.forwarder import Forwarder
from server.network.pins import Operator, PinTable, pins_for
from server.network.policy import NetworkPolicy, parse_ranges
from server.runtime.base import ManagedNetwork, NetworkInfo

log = logging.getLogger(__name__)


def resolvers(settings: Settings, host_resolv_conf: Path = Path("/etc/resolv.conf")
              ) -> list[str]:
    if settings.network_dns:
        return list(settings.network_dns)
    try:
        return firewall.host_resolvers(host_resolv_conf.read_text())
    except OSError:
        return []


def upstream_resolvers(settings: Settings, host_resolv_conf: Path = Path("/etc/resolv.conf")
                       ) -> list[str]:
    """The forwarder's name servers: DEN_NETWORK_DNS, else the host's own (loopback ones
    included: the forwarder runs on the host)."""
    if settings.network_dns:
        return list(settings.network_dns)
    try:
        return firewall.host_resolvers(host_resolv_conf.read_text(), loopback=True)
    except OSError:
        return []


def write_resolv_conf(settings: Settings, servers: list[str]) -> Path:
    """The /etc/resolv.conf Den mounts into its workspaces (rewritten in place, so that the
    file the engine mounts stays the same one)."""
    path = settings.data_dir / "network" / "resolv.conf"
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(f"nameserver {s}\n" for s in servers)
    if not path.exists() or path.read_text() != text:
        path.write_text(text)
    path.chmod(0o644)
    return path


def resolv_conf(settings: Settings) -> Path:
    """The path of that file, created empty when missing: its content (Den's forwarder) is
    written once the bridge exists; a restart leaves what running workspaces read alone."""
    path = settings.data_dir / "network" / "resolv.conf"
    if not path.exists():
        write_resolv_conf(settings, [])
    return path


SWEEP_S = 30.0  # how often expired pins are dropped


class NetworkGuard:
    """Applies the policies of the running workspaces to the host's firewall."""

    def __init__(self, *, runtime: ManagedNetwork, settings: Settings,
                 iptables: firewall.Iptables | None = None,
                 resolver_addresses: list[str] | None = None,
                 forwarder: bool = False) -> None:
        """``forwarder``: run Den's DNS forwarder on the bridge's gateway and name it in the
        workspaces' resolv.conf (domain names in allowlists need it); without it the
        workspaces use ``resolver_addresses`` directly and names open nothing."""
        name = settings.resolved_network_name()
        self.runtime = runtime
        self.iptables = (iptables if iptables is not None
                         else firewall.Iptables(firewall.chain_prefix(name)))
        self.prefix = self.iptables.prefix
        self.resolvers = (resolver_addresses if resolver_addresses is not None
                          else resolvers(settings))
        self.settings = settings
        self.operator_allow = parse_ranges(settings.network_allow)
        self.operator = Operator.from_entries(self.operator_allow,
                                              parse_ranges(settings.network_user_allow))
        self.pins = PinTable()
        self.dns = (Forwarder(upstream_resolvers(settings), learn=self.learn,
                              known=self._known) if forwarder else None)
        self._sweeper: asyncio.Task[None] | None = None
        self._info: NetworkInfo | None = None
        self._policies: Mapping[str, NetworkPolicy] = {}
        self._lock = asyncio.Lock()
        self.log_denied = settings.network_log_denied
        self._containers: dict[str, str] = {}  # address -> container, as of the last sync
        self.by_port = firewall.bridge_filtering()
        if not self.by_port:
            log.warning("bridged packets do not pass iptables (br_netfilter off): network rules "
                        "match workspaces by address only, which a root user in a workspace "
                        "can forge")
        self.applied = ""  # the last rule set (tests, debugging)

    @property
    def log_tag(self) -> str:
        return firewall.log_tag(self.prefix)

    def container_at(self, address: str) -> str | None:
        """The container that had ``address`` at the last sync."""
        return self._containers.get(address)

    def _known(self, address: str) -> bool:
        return address in self._containers

    async def sync(self, policies: Callable[[], Mapping[str, NetworkPolicy]]) -> None:
        """Rebuild the rules from the engine's addresses and ``policies()`` (container name ->
        policy), both read under the lock, so that a sync never applies policies older than
        the previous one's. Raises FirewallError when the host's firewall refuses them."""
        async with self._lock:
            self._policies = policies()
            self._info = info = await self.runtime.network()
            self._containers = {addr: name for name, addr in info.addresses.items()}
            # Pins follow the workspace, not its presence on the network: a paused
            # container's processes keep the addresses they resolved, and get the pins back
            # at the resume. Only a policy change or a deleted workspace drops them.
            self.pins.keep(self._policies, self.operator, info.subnet)
            await self._apply()
            if self.dns is not None and info.gateway:
                await self.dns.start(info.gateway)
                write_resolv_conf(self.settings, [info.gateway])
                if self._sweeper is None:
                    self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    async def learn(self, source: str, name: str, answers: list[tuple[str, int]]) -> None:
        """Pin what the answer to ``source``'s query for ``name`` opens (the forwarder
        calls this before it answers); the rules are rebuilt when a pin is new."""
        async with self._lock:
            container = self._containers.get(source)
            policy = self._policies.get(container or "")
            if container is None or policy is None or self._info is None:
                return
            found = pins_for(name, answers, policy, self.operator, self._info.subnet)
            if self.pins.add(container, name, found, time.monotonic()):
                await self._apply(pins_only=True)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_S)
            async with self._lock:
                if self.pins.expire(time.monotonic()):
                    with contextlib.suppress(firewall.FirewallError):
                        await self._apply(pins_only=True)

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        if self.dns is not None:
            self.dns.close()

    async def _apply(self, *, pins_only: bool = False) -> None:
        """Rebuild the rules from the last sync's state and the pins (under the lock);
        ``pins_only``: only the pins changed since the last full apply."""
        info = self._info
        assert info is not None
        bridge = firewall.Bridge(interface=info.interface, subnet=info.subnet,
                                 own=info.own_bridge)
        members = firewall.members_of(info.addresses, self._policies,
                                      info.ports if self.by_port else None,
                                      self.pins.by_container())
        dns = [info.gateway] if self.dns is not None and info.gateway else self.resolvers
        v4 = firewall.ruleset(self.prefix, bridge, members, resolvers=dns,
                              operator_allow=self.operator_allow, log_denied=self.log_denied)
        if pins_only:
            await asyncio.to_thread(self.iptables.apply_v4, v4)
        else:
            await asyncio.to_thread(self.iptables.apply, v4, firewall.ruleset_v6(self.prefix),
                                    bridge)
        self.applied = v4
        log.debug("network rules applied for %d workspaces, %d pins", len(members),
                  len(self.pins))
