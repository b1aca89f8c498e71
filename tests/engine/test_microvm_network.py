"""MicroVM networking on the real host (DEN_BACKEND=microvm, docs/microvm.md#networking),
from inside real QEMU guests (black box), with the stand-ins of tests/netlab.py routed for
this server's microVM bridge: the "internet" (``public``), a "LAN" address and the metadata
address in a network namespace the test makes, and an HTTP server of the host's on 0.0.0.0.

Two VMs with a NIC (``a`` in the default mode, ``b`` serving HTTP on port 9000) and one with
``network: none`` share the tests, in order (each boot takes seconds under TCG). Every
refusal is paired with a control: the same service answers the host (or the namespace), and
the refused VM reaches ``public`` by the same route, so a refusal is the policy's.
"""

from __future__ import annotations

import contextlib
import secrets
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.config import Settings
from server.network.firewall import chain_prefix
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
from tests.netlab import METADATA, PORT, sh, stand_ins, wait_for

pytestmark = pytest.mark.engine


@dataclass
class Lab:
    api: ApiClient
    settings: Settings
    public: str
    host_link: str
    lan: str
    host_port: int
    ids: dict[str, str] = field(default_factory=dict)

    @property
    def net(self) -> VmNetwork:
        return VmNetwork.named(self.settings.resolved_network_name(),
                               self.settings.microvm_subnet)

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


def _rules() -> str:
    return sh("iptables-save").stdout + sh("iptables-save", "-t", "nat").stdout


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
    try:
        with stand_ins(prefix, net.interface, tmp) as ns:
            app = create_app(settings)
            with TestClient(app) as client:
                api = ApiClient(client, users(app))
                lab = Lab(api, settings, ns.public, ns.host_link, ns.lan, host_srv.server_port)
                api.repo = repo  # type: ignore[attr-defined]
                try:
                    yield lab
                finally:
                    for wid in lab.ids.values():
                        with contextlib.suppress(Exception):
                            client.delete(f"/api/v1/workspaces/{wid}", headers=api.h(),
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


def test_network_none_has_no_nic(vms: Lab) -> None:
    lab = vms
    assert lab.exec("n", "ls /sys/class/net")["stdout"].split() == ["lo"]
    assert not link_exists(tap_name(vm_dir(lab.api, lab.ids["n"]).name))
    assert lab.exec("n", "echo works")["stdout"] == "works\n"  # the agent needs no network


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
    rules = _rules()
    assert f"-s {lab.address('b')}/32" in rules  # the remaining VM's rules are there
    for vm, address in gone.values():
        assert tap_name(vm) not in rules and f"{address}/32" not in rules
    assert prefix in rules


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


