"""Domain names in network allowlists on the real engine, from inside one real gVisor
workspace (black box).

The stand-ins (tests/netlab.py): this test's own network namespace, with an HTTP server on a
"public" address (TEST-NET-2), a second "public" one (TEST-NET-3), a "LAN" address and the
metadata address, and a DNS stand-in on the public address that Den's forwarder uses as its
upstream server (``DEN_NETWORK_DNS``). Its records: ``ok.den.test`` -> public,
``evil.den.test`` -> the second public address, ``rebind.den.test`` -> the LAN and metadata
addresses. No real name or address outside these namespaces is used.

Why this is honest: the workspace reaches each "refused" address after a change that allows
it (or the namespace's server answers on it: netlab's control), and it is refused the same
address, learnt from the same DNS stand-in, when the answer did not come through Den: so a
refusal is the pin's absence, not a broken route or a failed lookup.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.config import Settings
from server.network.firewall import Iptables, bridge_name, chain_prefix
from tests.conftest import RUN_PREFIX, ApiClient, git, users
from tests.netlab import METADATA, PORT, StandIns, dns_answers, sh, stand_ins, wait_for

pytestmark = pytest.mark.engine

# A workspace's own DNS client: asks ``server`` directly (over UDP, or TCP with a third
# argument ``tcp``), prints the last A record.
OWN_RESOLVER = """
import socket, struct, sys
name, server = sys.argv[1], sys.argv[2]
q = struct.pack("!HHHHHH", 7, 0x100, 1, 0, 0, 0)
q += b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\\0"
q += struct.pack("!HH", 1, 1)
if sys.argv[3:] == ["tcp"]:
    s = socket.create_connection((server, 53), timeout=5)
    s.sendall(len(q).to_bytes(2, "big") + q)
    d = b""
    while len(d) < 2 or len(d) < 2 + int.from_bytes(d[:2], "big"):
        chunk = s.recv(4096)
        if not chunk:
            break
        d += chunk
else:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(5)
    s.sendto(q, (server, 53))
    d = s.recv(512)
print(".".join(str(b) for b in d[-4:]))
"""


@dataclass
class Dns:
    api: ApiClient
    net: StandIns
    wid: str
    network: str

    def exec(self, cmd: str) -> dict[str, Any]:
        return self.api.exec(self.wid, cmd)

    def resolve(self, name: str) -> str:
        """The first address ``getent`` gives (the workspace's resolv.conf: Den's forwarder)."""
        r = self.exec(f"getent ahostsv4 {name} | head -n 1")
        return str(r["stdout"]).split(" ")[0].strip()

    def reach(self, addr: str) -> bool:
        r = self.exec(f"curl -s -o /dev/null -w '%{{http_code}}' --max-time 5 "
                      f"http://{addr}:{PORT}/")
        return bool(r["stdout"] == "200")

    def patch(self, *allow: str) -> None:
        r = self.api.client.patch(f"/api/v1/workspaces/{self.wid}", headers=self.api.h(),
                                  json={"network": {"mode": "allowlist", "allow": list(allow)}})
        assert r.status_code == 200, r.text

    def gateway(self) -> str:
        """Den's bridge's gateway, where its DNS forwarder listens (the engine says)."""
        return sh("docker", "network", "inspect", "-f", "{{(index .IPAM.Config 0).Gateway}}",
                  self.network).stdout.strip()

    def denied(self) -> list[str]:
        return [e["message"] for e in self.api.get(f"/api/v1/workspaces/{self.wid}/events")
                .json()["events"] if e["message"].startswith("denied")]


@pytest.fixture(scope="module")
def dns(engine: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dns]:
    tmp = tmp_path_factory.mktemp("dns")
    prefix = f"{RUN_PREFIX}-dns{secrets.token_hex(2)}"
    repo = tmp / "repos" / "api"
    repo.mkdir(parents=True)
    git("init", "-q", "-b", "main", cwd=repo)
    (repo / "README.md").write_text("# api\n")
    git("add", ".", cwd=repo)
    git("commit", "-q", "-m", "init", cwd=repo)
    name = f"{prefix}-net"

    def records(s: StandIns) -> dict[str, list[str]]:
        return {"ok.den.test": [s.public], "evil.den.test": [s.other],
                "rebind.den.test": [s.lan, METADATA]}

    try:
        with stand_ins(prefix, bridge_name(name), tmp, dns=records) as net:
            settings = Settings(data_dir=tmp / "data", local_repo_roots=[repo.parent],
                                engine_prefix=prefix, default_memory_mb=512, default_cpus=1.0,
                                stop_timeout_s=2, reaper_interval_s=0, ssh_port=0,
                                network_dns=[net.public])
            app = create_app(settings)
            with TestClient(app) as client:
                api = ApiClient(client, users(app))
                r = api.post("/api/v1/workspaces", json={
                    "name": "d", "repo": {"url": str(repo)},
                    "network": {"mode": "allowlist",
                                "allow": ["ok.den.test:8080", f"{net.public}:53"]}})
                assert r.status_code == 202, r.text
                wid = r.json()["id"]
                try:
                    assert api.wait_state(wid)["state"] == "running"
                    yield Dns(api, net, wid, name)
                finally:
                    with contextlib.suppress(Exception):
                        client.delete(f"/api/v1/workspaces/{wid}", headers=api.h("root"),
                                      params={"snapshots": "true"})
    finally:
        Iptables(chain_prefix(name)).remove()
        sh("docker", "network", "rm", name, check=False)


def test_names_open_what_den_resolved_and_nothing_else(dns: Dns) -> None:
    net = dns.net
    # The workspace's own resolver (the DNS stand-in, asked directly) gives it the allowed
    # name's address, but an address Den did not resolve opens nothing.
    r = dns.exec(f"python3 -c '{OWN_RESOLVER}' ok.den.test {net.public}")
    assert r["stdout"].strip() == net.public, r
    assert not dns.reach(net.public)
    # Through Den's forwarder (the workspace's resolv.conf) the same name opens it.
    assert dns.exec("cat /etc/resolv.conf")["stdout"] == f"nameserver {dns.gateway()}\n"
    assert dns.resolve("ok.den.test") == net.public
    assert dns.reach(net.public)
    # A name the policy does not list resolves, and opens nothing; the refusal is an event.
    assert dns.resolve("evil.den.test") == net.other
    assert not dns.reach(net.other)
    wait_for(lambda: any(f"TCP to {net.other}:{PORT}" in m for m in dns.denied()), 30,
             "the denial event")
    # Rebinding: an allowed name answering the LAN and metadata addresses opens neither.
    dns.patch("ok.den.test:8080", "rebind.den.test", f"{net.public}:53")
    assert dns.resolve("rebind.den.test") in (net.lan, METADATA)
    assert not dns.reach(net.lan)
    assert not dns.reach(METADATA)
    assert dns.reach(net.public)  # a change that keeps a name keeps its pins


def test_a_live_change_drops_and_adds_names(dns: Dns) -> None:
    net = dns.net
    dns.patch("ok.den.test:8080")
    assert dns.resolve("ok.den.test") == net.public
    assert dns.reach(net.public)
    # Swap the names: the dropped name's address closes at once, the new one opens when the
    # workspace resolves it through Den.
    dns.patch("*.den.test:8080")
    assert dns.reach(net.public)  # ok.den.test matches the wildcard: the pin is kept
    dns.patch("evil.den.test:8080")
    assert not dns.reach(net.public)
    assert not dns.reach(net.other)
    # Resolved over TCP this time (what a resolver does after a truncated answer).
    r = dns.exec(f"python3 -c '{OWN_RESOLVER}' evil.den.test {dns.gateway()} tcp")
    assert r["stdout"].strip() == net.other, r
    assert dns.reach(net.other)
    # The port is part of the rule: the DNS stand-in answers on that address's port 53
    # (control, from its namespace), and the workspace cannot ask it there.
    assert dns_answers(net.ns, net.other, "ok.den.test")
    r = dns.exec(f"python3 -c '{OWN_RESOLVER}' ok.den.test {net.other}")
    assert r["exit_code"] != 0 and net.public not in r["stdout"], r
