"""Keeps the host firewall in step with the workspaces: which container has which address
(the engine) and which policy (the database). The workspace service calls :meth:`sync`
after every change of either; each call rebuilds Den's chains whole (a few ms), so there is
no incremental state to drift."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from pathlib import Path

from server.config import Settings
from server.network import firewall
from server.network.policy import NetworkPolicy, parse_ranges
from server.runtime.base import ManagedNetwork

log = logging.getLogger(__name__)


def resolvers(settings: Settings, host_resolv_conf: Path = Path("/etc/resolv.conf")
              ) -> list[str]:
    if settings.network_dns:
        return list(settings.network_dns)
    try:
        return firewall.host_resolvers(host_resolv_conf.read_text())
    except OSError:
        return []


def write_resolv_conf(settings: Settings, servers: list[str]) -> Path:
    """The /etc/resolv.conf Den mounts into its workspaces."""
    path = settings.data_dir / "network" / "resolv.conf"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"nameserver {s}\n" for s in servers))
    path.chmod(0o644)
    return path


class NetworkGuard:
    """Applies the policies of the running workspaces to the host's firewall."""

    def __init__(self, *, runtime: ManagedNetwork, settings: Settings,
                 iptables: firewall.Iptables | None = None,
                 resolver_addresses: list[str] | None = None) -> None:
        name = settings.resolved_network_name()
        self.runtime = runtime
        self.iptables = (iptables if iptables is not None
                         else firewall.Iptables(firewall.chain_prefix(name)))
        self.prefix = self.iptables.prefix
        self.resolvers = (resolver_addresses if resolver_addresses is not None
                          else resolvers(settings))
        self.operator_allow = parse_ranges(settings.network_allow)
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

    async def sync(self, policies: Callable[[], Mapping[str, NetworkPolicy]]) -> None:
        """Rebuild the rules from the engine's addresses and ``policies()`` (container name ->
        policy), both read under the lock, so that a sync never applies policies older than
        the previous one's. Raises FirewallError when the host's firewall refuses them."""
        async with self._lock:
            current = policies()
            info = await self.runtime.network()
            bridge = firewall.Bridge(interface=info.interface, subnet=info.subnet)
            members = firewall.members_of(info.addresses, current,
                                          info.ports if self.by_port else None)
            v4 = firewall.ruleset(self.prefix, bridge, members, resolvers=self.resolvers,
                                  operator_allow=self.operator_allow,
                                  log_denied=self.log_denied)
            await asyncio.to_thread(self.iptables.apply, v4, firewall.ruleset_v6(self.prefix),
                                    bridge)
            self.applied = v4
            self._containers = {addr: name for name, addr in info.addresses.items()}
            log.debug("network rules applied for %d workspaces", len(members))
