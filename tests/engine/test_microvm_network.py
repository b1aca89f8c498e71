"""MicroVM networking on the real host (DEN_BACKEND=microvm, docs/microvm.md#networking),
from inside real QEMU guests (black box), with the stand-ins of tests/netlab.py routed for
this server's microVM bridge: the "internet" (``public``, and ``other``), a "LAN" address and
the metadata address in a network namespace the test makes, a DNS stand-in on ``public`` that
Den's forwarder asks (the records of tests/engine/test_network_dns.py), and an HTTP server of
the host's on 0.0.0.0.

Two VMs in the default mode (``a``, and ``b`` serving HTTP on port 9000) and one with
``network: none`` share the tests, in order (each boot takes seconds under TCG); the last
ones kill ``b``'s QEMU and restart Den (``Lab.serve``) under it. Every
refusal is paired with a control: the same service answers the host (or the namespace), and
the refused VM reaches ``public`` by the same route, so a refusal is the policy's.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.config import Settings
from server.network.firewall import Iptables, chain_prefix
from server.runtime.microvm import process
from server.runtime.microvm.argv import VmFiles
from server.runtime.microvm.net import VmNetwork, link_exists, mac_for, tap_name
from tests.conftest import (
    RUN_PREFIX,
    ApiClient,
    bare_repo,
    free_port,
    microvm_subnet,
    remove_microvm_network,
    users,
)
from tests.engine.test_microvm import BOOT_DIR, _require_setup, vm_dir
from tests.engine.test_network import _host_http
from tests.engine.test_network_dns import OWN_RESOLVER
from tests.netlab import METADATA, PORT, StandIns, sh, stand_ins, wait_for

pytestmark = pytest.mark.engine


@dataclass
class Lab:
    api: ApiClient
    settings: Settings
    public: str
    other: str
    host_link: str
    lan: str
    host_port: int
    servers: contextlib.ExitStack
    ids: dict[str, str] = field(default_factory=dict)

    @property
    def net(self) -> VmNetwork:
        return VmNetwork.named(self.settings.resolved_network_name(),
                               self.settings.microvm_subnet)

    def serve(self) -> None:
        """(Re)start Den on this lab's data dir: the running one, if any, goes first."""
        self.servers.close()
        app = create_app(self.settings)
        client = self.servers.enter_context(TestClient(app))
        api = ApiClient(client, users(app))
        api.repo = getattr(self.api, "repo", None)  # type: ignore[attr-defined]
        self.api = api

    def exec(self, name: str, cmd: str) -> dict[str, Any]:
        return self.api.exec(self.ids[name], cmd, timeout_s=60)

    def reach(self, name: str, addr: str, port: int = PORT) -> bool:
        """Whether VM ``name`` gets an HTTP answer from ``addr:port``. A refusal is at once
        (a reset or an ICMP error); the long limit is for the guest: under TCG on a loaded
        host, the first commands after a resume or a fork run from a cold translation cache
        (seen: over 5 s for curl's first answer)."""
        r = self.exec(name, f"curl -s -o /dev/null -w '%{{http_code}}' --max-time 30 "
                            f"http://{addr}:{port}/")
        return bool(r["stdout"] == "200")

    def address(self, name: str) -> str:
        out = str(self.exec(name, "ip -4 -o addr show dev eth0")["stdout"]).split()
        return out[out.index("inet") + 1].split("/")[0]

    def resolve(self, name: str, host: str) -> str:
        """The first address ``getent`` gives (the guest's resolv.conf: Den's forwarder)."""
        return str(self.exec(name, f"getent ahostsv4 {host} | head -n 1")["stdout"]
                   ).split(" ")[0].strip()

    def patch(self, name: str, network: dict[str, Any]) -> None:
        r = self.api.client.patch(f"/api/v1/workspaces/{self.ids[name]}",
                                  headers=self.api.h(), json={"network": network})
        assert r.status_code == 200, r.text

    def denied(self, name: str) -> list[str]:
        return [e["message"] for e in self.api.get(f"/api/v1/workspaces/{self.ids[name]}"
                                                   "/events").json()["events"]
                if e["message"].startswith("denied")]


def _rules(prefix: str = "") -> str:
    """The host's IPv4 rules; with ``prefix``, only the lines of that server's chains (other
    servers, of other tests, may run at the same time)."""
    text = sh("iptables-save").stdout + sh("iptables-save", "-t", "nat").stdout
    return "\n".join(line for line in text.splitlines() if prefix in line)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    _require_setup()
    tmp = tmp_path_factory.mktemp("vmnet")
    repos = tmp / "repos"
    repos.mkdir()
    repo = bare_repo(repos, tmp / "src", files={"README.md": "# api\n"})
    prefix = f"{RUN_PREFIX}-vn{secrets.token_hex(2)}"
    lan_probe = "10.213.0.0/16"  # the stand-ins' LAN range (tests/netlab.py)
    settings = Settings(data_dir=tmp / "data", local_repo_roots=[repos], backend="microvm",
                        microvm_dir=BOOT_DIR, engine_prefix=prefix, default_memory_mb=512,
                        default_cpus=1.0, default_disk_gb=1, stop_timeout_s=2,
                        reaper_interval_s=0, ssh_port=0, gpus="none",
                        network_user_allow=[lan_probe], microvm_subnet=microvm_subnet())
    net = VmNetwork.named(settings.resolved_network_name(), settings.microvm_subnet)
    host_srv = _host_http(free_port())

    def records(s: StandIns) -> dict[str, list[str]]:  # as tests/engine/test_network_dns.py
        return {"ok.den.test": [s.public], "evil.den.test": [s.other],
                "rebind.den.test": [METADATA]}

    try:
        with stand_ins(prefix, net.interface, tmp, dns=records) as ns, \
                contextlib.ExitStack() as servers:
            # Den's forwarder asks the DNS stand-in (as DEN_NETWORK_DNS would).
            settings = settings.model_copy(update={"network_dns": [ns.public]})
            lab = Lab(None, settings, ns.public, ns.other,  # type: ignore[arg-type]
                      ns.host_link, ns.lan, host_srv.server_port, servers)
            lab.serve()
            lab.api.repo = repo  # type: ignore[attr-defined]
            try:
                yield lab
            finally:
                for wid in lab.ids.values():
                    with contextlib.suppress(Exception):
                        lab.api.client.delete(f"/api/v1/workspaces/{wid}",
                                              headers=lab.api.h(),
                                              params={"snapshots": "true"})
    finally:
        host_srv.shutdown()
        for d in (BOOT_DIR / "vms").glob(f"{prefix}-*"):
            process.end(VmFiles(d), timeout_s=0)
            subprocess.run(["rm", "-rf", str(d)], check=False)
        remove_microvm_network(settings)


@pytest.fixture(scope="module")
def vms(lab: Lab) -> Lab:
    """``a`` (default mode), ``b`` (serving HTTP on 9000) and ``n`` (``network: none``),
    booted side by side."""
    for name, network in (("a", None), ("b", None), ("n", {"mode": "none"})):
        extra: dict[str, Any] = {"network": network} if network else {}
        ws = lab.api.create(lab.api.repo, name=name, wait=False,  # type: ignore[attr-defined]
                            **extra)
        lab.ids[name] = ws["id"]
    for name in lab.ids:
        assert lab.api.wait_state(lab.ids[name], timeout_s=300)["state"] == "running"
    # A server in b that outlives the exec (its own session).
    r = lab.exec("b", "setsid python3 -m http.server 9000 --directory / "
                      ">/dev/null 2>&1 < /dev/null & echo started")
    assert r["stdout"] == "started\n", r
    return lab


def test_a_vm_reaches_the_internet_and_not_the_host_lan_metadata_or_another_vm(
        vms: Lab) -> None:
    lab = vms
    a, b = lab.address("a"), lab.address("b")
    assert a != b and {a, b} <= {str(h) for h in lab.net.subnet.hosts()}
    assert lab.exec("a", "cat /etc/resolv.conf")["stdout"] == f"nameserver {lab.net.gateway}\n"
    assert lab.reach("a", lab.public)  # the "internet", through the host's NAT
    # Controls: each refused service answers someone.
    wait_for(lambda: sh("curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time",
                        "2", f"http://{b}:9000/", check=False).stdout == "200", 60,
             "b's server, from the host")
    assert sh("ip", "netns", "exec", f"{lab.settings.engine_prefix}-ns", "curl", "-s",
              "--max-time", "5", f"http://{lab.host_link}:{lab.host_port}/").stdout == "host\n"
    assert not lab.reach("a", b, 9000)  # another VM
    assert not lab.reach("a", lab.lan)
    assert not lab.reach("a", METADATA)
    for host in (lab.net.gateway, lab.host_link, "172.17.0.1"):  # the host, any address
        assert not lab.reach("a", host, lab.host_port), host
    assert lab.exec("a", "cat /proc/sys/net/ipv6/conf/all/disable_ipv6")["stdout"] == "1\n"
    # The gateway's MAC is the bridge's own, fixed: VMs come and go, it stays (a resumed
    # guest's ARP cache keeps it).
    assert Path(f"/sys/class/net/{lab.net.interface}/address").read_text().strip() \
        == mac_for(lab.net.gateway)
    # Refusals are events on the VM that tried, as for a gVisor workspace (the kernel log's
    # lines, matched by the VM's address).
    wait_for(lambda: any(f"TCP to {lab.lan}:{PORT} (network policy internet" in m
                         for m in lab.denied("a")), 30, "the denial event")
    wait_for(lambda: any(f"TCP to {METADATA}:{PORT}" in m for m in lab.denied("a")), 30,
             "the metadata denial event")
    assert not any(f"TCP to {lab.public}:" in m for m in lab.denied("a"))


def test_a_policy_change_applies_to_the_running_vm(vms: Lab) -> None:
    lab = vms
    r = lab.exec("a", "setsid sleep 600 >/dev/null 2>&1 < /dev/null & echo $!")
    pid = r["stdout"].strip()
    r = lab.api.client.patch(f"/api/v1/workspaces/{lab.ids['a']}", headers=lab.api.h(),
                             json={"network": {"mode": "allowlist", "allow": [lab.lan]}})
    assert r.status_code == 200, r.text
    assert lab.reach("a", lab.lan)
    assert not lab.reach("a", lab.public)
    r = lab.api.client.patch(f"/api/v1/workspaces/{lab.ids['a']}", headers=lab.api.h(),
                             json={"network": {"mode": "internet"}})
    assert r.status_code == 200, r.text
    assert lab.reach("a", lab.public)
    assert not lab.reach("a", lab.lan)
    assert lab.exec("a", f"kill -0 {pid} && echo alive")["stdout"] == "alive\n"  # no restart


def test_names_open_what_den_resolved_and_nothing_else(vms: Lab) -> None:
    """A domain name in an allowlist, as tests/engine/test_network_dns.py asserts it for a
    gVisor workspace: the guest's own lookup (the DNS stand-in, asked directly) opens
    nothing; the same name through Den's forwarder (the guest's resolv.conf) opens its
    address; a name the policy does not list resolves and opens nothing."""
    lab = vms
    lab.patch("a", {"mode": "allowlist", "allow": ["ok.den.test:8080", f"{lab.public}:53"]})
    r = lab.exec("a", f"python3 -c '{OWN_RESOLVER}' ok.den.test {lab.public}")
    assert r["stdout"].strip() == lab.public, r
    assert not lab.reach("a", lab.public)
    assert lab.resolve("a", "ok.den.test") == lab.public
    assert lab.reach("a", lab.public)
    assert lab.resolve("a", "evil.den.test") == lab.other
    assert not lab.reach("a", lab.other)
    wait_for(lambda: any(f"TCP to {lab.other}:{PORT} (network policy allowlist" in m
                         for m in lab.denied("a")), 30, "the denial event")
    # Rebinding: an allowed name answering the metadata address opens nothing (the LAN is
    # this server's ceiling here: network_user_allow), and a change that keeps a name keeps
    # its pins.
    lab.patch("a", {"mode": "allowlist",
                    "allow": ["ok.den.test:8080", "rebind.den.test", f"{lab.public}:53"]})
    assert lab.resolve("a", "rebind.den.test") == METADATA
    assert not lab.reach("a", METADATA)
    assert lab.reach("a", lab.public)
    # A dropped name closes at once; a new one opens once resolved through Den (over TCP).
    lab.patch("a", {"mode": "allowlist", "allow": ["evil.den.test:8080"]})
    assert not lab.reach("a", lab.public)
    r = lab.exec("a", f"python3 -c '{OWN_RESOLVER}' evil.den.test {lab.net.gateway} tcp")
    assert r["stdout"].strip() == lab.other, r
    assert lab.reach("a", lab.other)
    lab.patch("a", {"mode": "internet"})
    assert lab.reach("a", lab.public)


def test_network_none_passes_nothing_until_a_policy_opens_it_live(vms: Lab) -> None:
    """``network: none`` as on a gVisor workspace: the VM has its NIC (the ``microvm``
    machine has no hotplug, so every VM gets one at boot) and the firewall passes nothing,
    not even Den's DNS forwarder; a policy opened on the running VM applies at once, and
    closing it again cuts it off, its processes living on (the agent needs no network)."""
    lab = vms
    pid = lab.exec("n", "setsid sleep 600 >/dev/null 2>&1 < /dev/null & echo $!")["stdout"]
    assert lab.exec("n", "ls /sys/class/net")["stdout"].split() == ["eth0", "lo"]
    assert link_exists(tap_name(vm_dir(lab.api, lab.ids["n"]).name))
    assert not lab.reach("n", lab.public)
    no_dns = lab.exec("n", "timeout 5 getent ahostsv4 ok.den.test; echo rc=$?")["stdout"]
    assert no_dns.startswith("rc=") and no_dns != "rc=0\n", no_dns  # Den's forwarder neither
    wait_for(lambda: any(f"TCP to {lab.public}:{PORT} (network policy none" in m
                         for m in lab.denied("n")), 30, "the denial event")
    lab.patch("n", {"mode": "internet"})
    assert lab.reach("n", lab.public)
    assert lab.resolve("n", "ok.den.test") == lab.public  # the control of the lookup above
    lab.patch("n", {"mode": "none"})
    assert not lab.reach("n", lab.public)
    assert lab.exec("n", f"kill -0 {pid.strip()} && echo alive")["stdout"] == "alive\n"


def test_a_resumed_vm_and_a_fork_reach_what_they_may(vms: Lab) -> None:
    lab = vms
    before = lab.address("a")
    wid = lab.ids["a"]
    r = lab.api.post(f"/api/v1/workspaces/{wid}/pause")
    assert r.status_code in (200, 202), r.text
    assert lab.api.wait_state(wid, settled=("paused", "error"))["state"] == "paused"
    assert not link_exists(tap_name(vm_dir(lab.api, wid).name))  # no QEMU, no TAP
    assert lab.reach("a", lab.public)  # wakes it
    assert lab.address("a") == before
    # A fork of its memory: the origin's address and MAC in its memory, replaced by its own.
    r = lab.api.post(f"/api/v1/workspaces/{wid}/snapshots", json={"name": "m", "memory": True})
    assert r.status_code in (200, 201), r.text
    r = lab.api.post("/api/v1/workspaces", json={"name": "twin",
                                                 "from_snapshot": r.json()["id"]})
    assert r.status_code in (201, 202), r.text
    lab.ids["twin"] = r.json()["id"]
    assert lab.api.wait_state(lab.ids["twin"], timeout_s=300)["state"] == "running"
    twin = lab.address("twin")
    assert twin != before
    mac = lab.exec("twin", "cat /sys/class/net/eth0/address")["stdout"]
    assert mac != lab.exec("a", "cat /sys/class/net/eth0/address")["stdout"]
    assert lab.reach("twin", lab.public)
    assert lab.reach("a", lab.public)
    assert not lab.reach("twin", lab.address("b"), 9000)


def test_delete_leaves_no_tap_and_no_rule(vms: Lab) -> None:
    lab = vms
    gone = {}
    for name in ("twin", "a"):
        gone[name] = (vm_dir(lab.api, lab.ids[name]).name, lab.address(name))
        r = lab.api.delete(f"/api/v1/workspaces/{lab.ids.pop(name)}")
        assert r.status_code in (200, 202, 204), r.text
    prefix = chain_prefix(lab.settings.resolved_network_name())
    wait_for(lambda: all(not link_exists(tap_name(vm)) for vm, _ in gone.values()), 60,
             "the deleted VMs' TAPs to go")
    rules = _rules(prefix)
    assert f"-s {lab.address('b')}/32" in rules  # the remaining VM's rules are there
    for vm, address in gone.values():
        assert tap_name(vm) not in rules and f"{address}/32" not in rules
    assert prefix in rules


def _vm_rules(lab: Lab, tap: str, address: str) -> bool:
    """Whether this server's chains name the VM (its TAP or its address)."""
    rules = _rules(chain_prefix(lab.settings.resolved_network_name()))
    return tap in rules or f"{address}/32" in rules


def test_qemu_killed_leaves_no_tap_or_rule_and_a_start_brings_the_nic_back(vms: Lab) -> None:
    lab = vms
    wid = lab.ids["b"]
    files = VmFiles(vm_dir(lab.api, wid))
    tap, address = tap_name(files.dir.name), lab.address("b")
    assert link_exists(tap) and _vm_rules(lab, tap, address)
    pid = process.running(files)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    # Den hears the ``die`` (microvm/events.py): the state follows, the rules go.
    ws = lab.api.wait_state(wid, settled=("stopped", "error"), timeout_s=60)
    assert ws["state"] in ("stopped", "error"), ws
    wait_for(lambda: not link_exists(tap) and not _vm_rules(lab, tap, address), 30,
             "the killed VM's TAP and rules to go")
    r = lab.api.post(f"/api/v1/workspaces/{wid}/start")
    assert r.status_code in (200, 202), r.text
    assert lab.api.wait_state(wid, timeout_s=300)["state"] == "running"
    assert link_exists(tap) and _vm_rules(lab, tap, address)
    assert lab.address("b") == address
    assert lab.reach("b", lab.public)
    assert not lab.reach("b", lab.lan)


def test_a_restarted_den_puts_the_rules_back_and_the_policy_holds(vms: Lab) -> None:
    """Den down, its chains gone meanwhile (a firewall reload): the new server's first sync
    brings the running VM's rules back, and its forwarder answers the VM again."""
    lab = vms
    files = VmFiles(vm_dir(lab.api, lab.ids["b"]))
    tap, address = tap_name(files.dir.name), lab.address("b")
    pid = process.running(files)
    lab.servers.close()
    Iptables(chain_prefix(lab.settings.resolved_network_name())).remove()
    assert not _vm_rules(lab, tap, address)
    lab.serve()
    assert process.running(files) == pid  # the same VM, never restarted
    assert link_exists(tap) and _vm_rules(lab, tap, address)
    assert lab.reach("b", lab.public)
    assert not lab.reach("b", lab.lan)
    assert not lab.reach("b", METADATA)
    lab.patch("b", {"mode": "allowlist", "allow": ["ok.den.test:8080"]})
    assert not lab.reach("b", lab.public)
    assert lab.resolve("b", "ok.den.test") == lab.public  # the new forwarder, pinning
    assert lab.reach("b", lab.public)


def test_the_fixture_removes_the_bridge_and_chains() -> None:
    """What the module's teardown relies on (conftest.remove_microvm_network), checked on a
    bridge and chains made for this test alone."""
    from server.network.firewall import Bridge, Iptables, nat_ruleset, ruleset, ruleset_v6
    from server.runtime.microvm.net import ensure_bridge

    settings = Settings(engine_prefix=f"{RUN_PREFIX}-vx{secrets.token_hex(2)}",
                        microvm_subnet=microvm_subnet())
    name = settings.resolved_network_name()
    net = VmNetwork.named(name, settings.microvm_subnet)
    prefix = chain_prefix(name)
    ensure_bridge(net)
    bridge = Bridge(interface=net.interface, subnet=str(net.subnet), own=True)
    try:
        Iptables(prefix).apply(ruleset(prefix, bridge, [], resolvers=[], operator_allow=[]),
                               ruleset_v6(prefix), bridge)
        assert prefix in _rules() and link_exists(net.interface)
        assert nat_ruleset(prefix, bridge).split("\n")[2] in sh("iptables-save", "-t", "nat").stdout
    finally:
        remove_microvm_network(settings)
    assert prefix not in _rules() and prefix not in sh("ip6tables-save").stdout
    assert not link_exists(net.interface)


