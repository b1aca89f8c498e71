"""Network isolation on the real engine, from inside real gVisor workspaces (black box).

The stand-ins (tests/netlab.py): a network namespace this test creates, joined to the host by
a veth pair on a /30 of TEST-NET-2 (198.51.100.0/24, a documentation range that no real host
uses). Inside it one HTTP server answers on three addresses: the namespace's end of the link
(the "internet": an address the policy treats as public, like any address outside the blocked
ranges), a "LAN" address in 10.213.0.0/16 and the metadata address 169.254.169.254 (both on
the namespace's loopback). Only packets that come in from this test's own Den bridge are
routed to the last two (a policy-routing rule on that bridge's interface), so nothing else on
the machine sees them. A plain HTTP server on the host listens on 0.0.0.0.

Why this is honest: every "unreachable" is paired with a control that the same service at the
same address answers (from the host or from the namespace), and the workspace that is
refused one address reaches the "internet" one through the same route, so a refusal is the
policy's and not a broken route. The live change is shown both ways on one running workspace
(the LAN address becomes reachable, the public one not, and back), with a background process
that keeps its pid throughout. What this cannot show: a real internet destination (none is
reachable from these machines); the public stand-in stands for it.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import re
import secrets
import shlex
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from server.agent import direct
from server.app import create_app
from server.config import Settings
from server.network import firewall
from server.network.firewall import Iptables, bridge_name, chain_prefix
from tests.conftest import RUN_PREFIX, ApiClient, free_port, git, users
from tests.netlab import METADATA, PORT, sh, stand_ins, wait_for

pytestmark = pytest.mark.engine


@dataclass
class Lab:
    api: ApiClient
    settings: Settings
    ns: str
    public: str  # the namespace's end of the link: the "internet"
    host_link: str  # the host's end of the link (a host address on a "public" range)
    lan: str
    host_port: int  # the host's HTTP server on 0.0.0.0
    ssh_port: int
    key: Path
    ids: dict[str, str] = field(default_factory=dict)  # name -> workspace id

    def exec(self, name: str, cmd: str, **kw: Any) -> dict[str, Any]:
        return self.api.exec(self.ids[name], cmd, **kw)

    def reach(self, name: str, addr: str, port: int = PORT) -> bool:
        """Whether workspace ``name`` gets an HTTP answer from ``addr:port``."""
        r = self.exec(name, f"curl -s -o /dev/null -w '%{{http_code}}' --max-time 5 "
                            f"http://{addr}:{port}/")
        return bool(r["stdout"] == "200")

    def patch(self, name: str, network: dict[str, Any]) -> Any:
        return self.api.client.patch(f"/api/v1/workspaces/{self.ids[name]}",
                                     headers=self.api.h(), json={"network": network})


def _host_http(port: int) -> http.server.ThreadingHTTPServer:
    class Quiet(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"host\n")

        def log_message(self, *args: Any) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("0.0.0.0", port), Quiet)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


@pytest.fixture(scope="module")
def lab(engine: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    tmp = tmp_path_factory.mktemp("net")
    prefix = f"{RUN_PREFIX}-net{secrets.token_hex(2)}"
    ssh_port = free_port()
    repos = tmp / "repos"
    (repos / "api").mkdir(parents=True)
    git("init", "-q", "-b", "main", cwd=repos / "api")
    (repos / "api" / "README.md").write_text("# api\n")
    git("add", ".", cwd=repos / "api")
    git("commit", "-q", "-m", "init", cwd=repos / "api")
    lan_probe = "10.213.0.0/16"  # the stand-ins' LAN range; each run picks one address in it
    settings = Settings(data_dir=tmp / "data", local_repo_roots=[repos], engine_prefix=prefix,
                        default_memory_mb=512, default_cpus=1.0, stop_timeout_s=2,
                        reaper_interval_s=0, ssh_port=ssh_port, network_user_allow=[lan_probe])
    host_srv = _host_http(free_port())
    try:
        with stand_ins(prefix, bridge_name(settings.resolved_network_name()), tmp) as net:
            # Control: the host's server answers on the host's end of the link, seen from
            # the namespace (its neighbour).
            assert sh("ip", "netns", "exec", net.ns, "curl", "-s", "--max-time", "5",
                      f"http://{net.host_link}:{host_srv.server_port}/").stdout == "host\n"
            key = tmp / "key"
            sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key))
            app = create_app(settings)
            with TestClient(app) as client:
                api = ApiClient(client, users(app))
                r = api.add_key(key)
                assert r.status_code == 201, r.text
                lab = Lab(api, settings, net.ns, net.public, net.host_link, net.lan,
                          host_srv.server_port, ssh_port, key)
                yield lab
                for wid in lab.ids.values():
                    with contextlib.suppress(Exception):
                        client.delete(f"/api/v1/workspaces/{wid}", headers=api.h("root"),
                                      params={"snapshots": "true"})
    finally:
        host_srv.shutdown()
        Iptables(chain_prefix(settings.resolved_network_name())).remove()
        sh("docker", "network", "rm", settings.resolved_network_name(), check=False)


@pytest.fixture(scope="module")
def two(lab: Lab) -> Lab:
    """Workspace ``a`` in the default mode and ``b`` with ``network: none``, serving HTTP on
    port 9000 (the host reaches it: the port is open)."""
    for name, network in (("a", None), ("b", {"mode": "none"})):
        body: dict[str, Any] = {"name": name, "repo": {"url": str(
            lab.settings.local_repo_roots[0] / "api")}}
        if network is not None:
            body["network"] = network
        r = lab.api.post("/api/v1/workspaces", json=body)
        assert r.status_code == 202, r.text
        lab.ids[name] = r.json()["id"]
    for name in ("a", "b"):
        assert lab.api.wait_state(lab.ids[name])["state"] == "running"
    r = lab.api.post(f"/api/v1/workspaces/{lab.ids['b']}/processes",
                     json={"cmd": ["python3", "-m", "http.server", "9000"]})
    assert r.status_code == 201, r.text
    return lab


def _address(lab: Lab, name: str) -> str:
    out = sh("docker", "inspect", "-f", "{{json .NetworkSettings.Networks}}",
             f"{lab.settings.engine_prefix}-{lab.ids[name]}").stdout
    nets = json.loads(out)
    return str(nets[lab.settings.resolved_network_name()]["IPAddress"])


def _host_reaches(addr: str, port: int) -> bool:
    return sh("curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "2",
              f"http://{addr}:{port}/", check=False).stdout == "200"


def _port_connections(lab: Lab) -> dict[str, float]:
    text = lab.api.get("/metrics", user="root").text
    return {m[1]: float(m[2]) for m in
            re.finditer(r'^den_port_connections_total\{path="(\w+)"\} (\S+)$', text, re.M)}


def test_the_direct_path_works_in_none_mode_and_no_workspace_reaches_another_agent(
        two: Lab) -> None:
    """The direct path (server/agent/direct.py): the host opens the connection to the
    agent's listener on the workspace's address, so it works under ``network: none`` (the
    replies pass Den's firewall as replies), while no workspace reaches another's listener.
    An impostor that took the listener's port first gets nothing: Den relays instead."""
    lab = two
    b_addr = _address(lab, "b")
    wait_for(lambda: _host_reaches(b_addr, 9000), 60, "b's HTTP server")
    before = _port_connections(lab)
    r = lab.api.get(f"/preview/{lab.ids['b']}/9000/")
    assert r.status_code == 200, r.text
    after = _port_connections(lab)
    assert after.get("direct", 0) > before.get("direct", 0), (before, after)
    assert after.get("relay", 0) == before.get("relay", 0), (before, after)
    # The host reaches b's listener (control); workspace a does not.
    with socket.create_connection((b_addr, direct.PORT), timeout=5):
        pass
    probe = (f"python3 -c \"import socket; socket.create_connection(('{b_addr}', "
             f"{direct.PORT}), timeout=5)\"")
    assert lab.exec("a", probe)["exit_code"] != 0
    assert lab.exec("b", probe)["exit_code"] == 0  # the same probe works where it may

    # In a, before Den ever connects into it, a process of the user's takes the port.
    impostor = ("import socket\n"
                "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
                f"s.bind(('0.0.0.0', {direct.PORT})); s.listen()\n"
                "open('/tmp/impostor.ready', 'w').close()\n"
                "while True:\n"
                "    c, _ = s.accept(); open('/tmp/impostor.hit', 'a').write('x'); c.close()\n")
    r = lab.api.put(f"/api/v1/workspaces/{lab.ids['a']}/files",
                    params={"path": "/workspace/impostor.py"}, content=impostor.encode())
    assert r.status_code in (200, 201), r.text
    r = lab.api.post(f"/api/v1/workspaces/{lab.ids['a']}/processes",
                     json={"cmd": ["python3", "/workspace/impostor.py"]})
    assert r.status_code == 201, r.text
    r = lab.api.post(f"/api/v1/workspaces/{lab.ids['a']}/processes",
                     json={"cmd": ["python3", "-m", "http.server", "9001"]})
    assert r.status_code == 201, r.text
    wait_for(lambda: lab.exec("a", "test -e /tmp/impostor.ready")["exit_code"] == 0, 30,
             "the impostor")
    wait_for(lambda: lab.exec("a", "curl -s -o /dev/null http://127.0.0.1:9001/")[
        "exit_code"] == 0, 30, "a's HTTP server")
    before = _port_connections(lab)
    r = lab.api.get(f"/preview/{lab.ids['a']}/9001/")
    assert r.status_code == 200, r.text  # served all the same, through the agent session
    after = _port_connections(lab)
    assert after.get("relay", 0) == before.get("relay", 0) + 1, (before, after)
    assert after.get("direct", 0) == before.get("direct", 0), (before, after)
    assert lab.exec("a", "test -e /tmp/impostor.hit")["exit_code"] != 0  # never contacted


def test_default_mode_reaches_the_internet_and_nothing_else(two: Lab) -> None:
    lab = two
    assert lab.api.get(f"/api/v1/workspaces/{lab.ids['a']}").json()["network"] == {
        "mode": "internet", "allow": []}
    # Names resolve (the host's resolver is allowed on port 53) and the public stand-in
    # answers: the workspace has a network, and the route to the namespace works.
    r = lab.exec("a", "getent hosts deb.debian.org")
    assert r["exit_code"] == 0, r
    assert lab.reach("a", lab.public)
    # The LAN and metadata addresses sit behind the same route, in the same namespace.
    assert not lab.reach("a", lab.lan)
    assert not lab.reach("a", METADATA)
    # Refusals are events on the workspace that tried ("why can't I reach X?").

    def denied() -> list[str]:
        return [e["message"] for e in lab.api.get(f"/api/v1/workspaces/{lab.ids['a']}/events")
                .json()["events"] if e["message"].startswith("denied")]

    wait_for(lambda: any(f"TCP to {lab.lan}:{PORT} (network policy internet" in m
                         for m in denied()), 30, "the denial event")
    wait_for(lambda: any(f"TCP to {METADATA}:{PORT}" in m for m in denied()), 30,
             "the metadata denial event")
    # The host's server on 0.0.0.0: not on the bridge's gateway, not on another host address.
    gateway = sh("docker", "network", "inspect", "-f", "{{(index .IPAM.Config 0).Gateway}}",
                 lab.settings.resolved_network_name()).stdout.strip()
    assert _host_reaches("127.0.0.1", lab.host_port)
    assert not lab.reach("a", gateway, lab.host_port)
    assert not lab.reach("a", lab.host_link, lab.host_port)
    # Where bridged packets pass iptables, a's rules also name its port on the bridge, so
    # that another container cannot send as a's address (the positive control above shows
    # that the port match lets a's own packets through).
    if firewall.bridge_filtering():
        rules = sh("iptables", "-S", f"{chain_prefix(lab.settings.resolved_network_name())}-FWD"
                   ).stdout
        assert f"-s {_address(lab, 'a')}/32 -m physdev --physdev-in veth" in rules, rules
    # Another workspace's open port: the host reaches it, the workspace does not.
    b_addr = _address(lab, "b")
    wait_for(lambda: _host_reaches(b_addr, 9000), 60, "b's HTTP server")
    assert not lab.reach("a", b_addr, 9000)


IPV6_PROBE = """
import errno, socket, sys
for addr in sys.argv[1:]:
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.settimeout(5)
    try:
        s.connect((addr, int(%d)))
        print(addr, "connected")
    except OSError as e:
        print(addr, errno.errorcode.get(e.errno, e.errno))
"""


def test_workspaces_have_no_ipv6_and_mapped_addresses_are_ipv4_under_the_policy(
        two: Lab) -> None:
    lab = two
    # No IPv6 address (not even ::1) and no IPv6 route; IPv4 has its default route.
    r = lab.exec("a", "ip -6 addr; ip -6 route; echo ---; ip -4 route")
    v6, _, v4 = r["stdout"].partition("---")
    assert r["exit_code"] == 0 and v6.strip() == "", r
    assert "default via" in v4
    # Every IPv6 destination fails at once: global (documentation range), ULA, link-local,
    # the host's loopback. (::/0 has no route, so nothing leaves the sandbox.)
    probe = f"python3 -c {shlex.quote(IPV6_PROBE % PORT)}"
    r = lab.exec("a", f"{probe} 2001:db8::1 2606:4700:4700::1111 fd00::1 fe80::1 ::1")
    results = dict(line.split() for line in r["stdout"].splitlines())
    assert set(results.values()) <= {"EHOSTUNREACH", "ENETUNREACH", "EADDRNOTAVAIL"}, results
    assert len(results) == 5, r
    # An IPv4-mapped address is IPv4 on the wire, under the IPv4 policy: the public stand-in
    # answers through it, the LAN and metadata stand-ins do not.
    r = lab.exec("a", f"{probe} ::ffff:{lab.public} ::ffff:{lab.lan} ::ffff:{METADATA}")
    results = dict(line.split() for line in r["stdout"].splitlines())
    assert results[f"::ffff:{lab.public}"] == "connected", results
    assert results[f"::ffff:{lab.lan}"] != "connected", results
    assert results[f"::ffff:{METADATA}"] != "connected", results


def test_none_mode_has_no_network_but_exec_files_terminal_and_ssh_work(two: Lab) -> None:
    lab = two
    wid = lab.ids["b"]
    assert lab.api.get(f"/api/v1/workspaces/{wid}").json()["network"]["mode"] == "none"
    assert not lab.reach("b", lab.public)
    assert lab.exec("b", "getent hosts deb.debian.org")["exit_code"] != 0
    # Files
    r = lab.api.put(f"/api/v1/workspaces/{wid}/files", params={"path": "/workspace/n.txt"},
                    content=b"offline\n")
    assert r.status_code in (200, 201), r.text
    assert lab.api.get(f"/api/v1/workspaces/{wid}/files",
                       params={"path": "/workspace/n.txt"}).content == b"offline\n"
    # The web terminal
    with lab.api.client.websocket_connect(f"/api/v1/workspaces/{wid}/terminal",
                                          headers=lab.api.h()) as sock:
        sock.send_json({"type": "stdin", "data": "echo TERM-$((6*7))\r"})
        out = ""
        deadline = time.monotonic() + 60
        while "TERM-42" not in out and time.monotonic() < deadline:
            msg = sock.receive_json()
            out += msg.get("data", "") if msg.get("type") == "stdout" else ""
        assert "TERM-42" in out, out
    # SSH
    p = subprocess.run(
        ["ssh", "-F", "/dev/null", "-o", "StrictHostKeyChecking=no", "-o",
         "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
         "-o", "LogLevel=ERROR", "-i", str(lab.key), "-p", str(lab.ssh_port), "b@127.0.0.1",
         "cat /workspace/n.txt"], capture_output=True, timeout=120)
    assert p.returncode == 0 and p.stdout == b"offline\n", p


def test_policy_changes_live_without_a_restart(two: Lab) -> None:
    lab = two
    wid = lab.ids["a"]
    r = lab.api.post(f"/api/v1/workspaces/{wid}/processes",
                     json={"cmd": ["sleep", "100000"]})
    assert r.status_code == 201, r.text
    pid = r.json()["pid"]

    # Refused: what is no address nor domain name, private ranges the operator did not allow,
    # unknown modes; nothing changes.
    refusals: list[tuple[dict[str, Any], int, str]] = [
        ({"mode": "allowlist", "allow": ["pypi"]}, 422, "invalid"),
        ({"mode": "allowlist", "allow": ["10.0.0.0/8"]}, 403, "network_not_allowed"),
        ({"mode": "everything"}, 422, "invalid"),
    ]
    for body, status, code in refusals:
        r = lab.patch("a", body)
        assert r.status_code == status, r.text
        assert r.json()["error"]["code"] == code, r.text
    assert lab.api.get(f"/api/v1/workspaces/{wid}").json()["network"]["mode"] == "internet"

    r = lab.patch("a", {"mode": "allowlist", "allow": [f"{lab.lan}:{PORT}"]})
    assert r.status_code == 200, r.text
    assert r.json()["network"] == {"mode": "allowlist", "allow": [f"{lab.lan}:{PORT}"]}
    assert lab.reach("a", lab.lan)
    assert not lab.reach("a", lab.public)
    assert not lab.reach("a", METADATA)
    assert lab.exec("a", "getent hosts deb.debian.org")["exit_code"] == 0

    r = lab.patch("a", {"mode": "internet"})
    assert r.status_code == 200, r.text
    assert lab.reach("a", lab.public)
    assert not lab.reach("a", lab.lan)

    # Same container, same process: nothing restarted.
    procs = lab.api.get(f"/api/v1/workspaces/{wid}/processes").json()["processes"]
    assert [p["running"] for p in procs if p["pid"] == pid] == [True]
    events = [e["message"] for e in lab.api.get(f"/api/v1/workspaces/{wid}/events").json()[
        "events"] if e["kind"] == "network" and e["message"].startswith("network policy")]
    assert events[-2:] == [f"network policy set to allowlist ({lab.lan}:{PORT})",
                           "network policy set to internet"]


def test_pause_resume_fork_and_restore_keep_the_policy(two: Lab) -> None:
    """On a workspace of its own, created with an allowlist: its pause and its memory
    snapshot come before it makes any connection (the pause right after connections is the
    next test's)."""
    lab = two
    allow = {"mode": "allowlist", "allow": [f"{lab.lan}:{PORT}"]}
    r = lab.api.post("/api/v1/workspaces", json={
        "name": "p", "repo": {"url": str(lab.settings.local_repo_roots[0] / "api")},
        "network": allow})
    assert r.status_code == 202, r.text
    wid = lab.ids["p"] = r.json()["id"]
    assert lab.api.wait_state(wid)["state"] == "running"
    r = lab.api.post(f"/api/v1/workspaces/{wid}/pause")
    assert r.status_code == 200 and r.json()["state"] == "paused", r.text
    r = lab.api.post(f"/api/v1/workspaces/{wid}/resume")
    assert r.status_code == 200 and r.json()["state"] == "running", r.text
    r = lab.api.post(f"/api/v1/workspaces/{wid}/snapshots", json={"name": "s1", "memory": True})
    assert r.status_code in (200, 201), r.text
    snap = r.json()["id"]
    r = lab.api.post("/api/v1/workspaces", json={"name": "f", "from_snapshot": snap})
    assert r.status_code in (201, 202), r.text
    lab.ids["f"] = r.json()["id"]
    assert r.json()["network"] == allow
    assert lab.api.wait_state(lab.ids["f"])["state"] == "running"
    events = lab.api.get(f"/api/v1/workspaces/{lab.ids['f']}/events").json()["events"]
    assert "with its memory and processes" in events[-1]["message"], events[-1]

    # A restore replaces the workspace's container: the new one is on Den's network too.
    r = lab.api.post(f"/api/v1/snapshots/{snap}/restore")
    assert r.status_code == 200 and r.json()["state"] == "running", r.text

    for name in ("p", "f"):
        assert lab.reach(name, lab.lan)
        assert not lab.reach(name, lab.public)
        assert not lab.reach(name, METADATA)
    # The fork's sandbox, restored from its origin's memory, sends from its own address
    # (the rules are per address).
    inside = lab.exec("f", "ip -4 -o addr show")["stdout"]
    assert f" {_address(lab, 'f')}/" in inside, inside
    assert f" {_address(lab, 'p')}/" not in inside, inside


def test_a_pause_right_after_network_use_keeps_every_process(two: Lab) -> None:
    """A TCP connection open at the pause, and one the workspace closed a moment before
    (TIME_WAIT), made runsc refuse the checkpoint, which left the container exited and its
    processes lost. With --net-disconnect-ok (the host setup) they are reset instead."""
    lab = two
    holder = ("import socket,time\n"
              f"c=socket.create_connection(({lab.public!r},{PORT}))\n"
              f"d=socket.create_connection(({lab.public!r},{PORT})); d.close()\n"
              "print('connected',flush=True)\n"
              "time.sleep(3600)\n")
    r = lab.api.post(f"/api/v1/workspaces/{lab.ids['a']}/processes",
                     json={"cmd": ["python3", "-c", holder]})
    assert r.status_code == 201, r.text
    pid = r.json()["pid"]
    logs = f"/api/v1/workspaces/{lab.ids['a']}/processes/{pid}/logs"
    wait_for(lambda: "connected" in lab.api.get(logs).text, 30, "the connections")
    r = lab.api.post(f"/api/v1/workspaces/{lab.ids['a']}/pause")
    assert r.status_code == 200 and r.json()["state"] == "paused", r.text
    r = lab.api.post(f"/api/v1/workspaces/{lab.ids['a']}/resume")
    assert r.status_code == 200 and r.json()["state"] == "running", r.text
    events = lab.api.get(f"/api/v1/workspaces/{lab.ids['a']}/events").json()["events"]
    assert "restored from memory" in events[-1]["message"], events[-1]
    procs = lab.api.get(f"/api/v1/workspaces/{lab.ids['a']}/processes").json()["processes"]
    assert any(p["pid"] == pid and p["running"] for p in procs), procs
    assert lab.reach("a", lab.public)  # the network works after the restore


def test_startup_and_reconcile_recreate_the_network_and_the_rules(
        engine: None, make_settings: Callable[..., Settings]) -> None:
    settings = make_settings()
    net = settings.resolved_network_name()
    chains = chain_prefix(net)

    def present() -> tuple[bool, bool, bool]:
        return (sh("docker", "network", "inspect", net, check=False).returncode == 0,
                f"-N {chains}-FWD" in sh("iptables", "-S").stdout,
                f"-j {chains}-FWD" in sh("iptables", "-S", "DOCKER-USER").stdout)

    def remove() -> None:
        sh("docker", "network", "rm", net, check=False)
        Iptables(chains).remove()

    with TestClient(create_app(settings)) as client:
        assert present() == (True, True, True)
        remove()
        assert present() == (False, False, False)
        app: Any = client.app
        assert client.portal is not None
        client.portal.call(app.state.workspaces.reconcile)
        assert present() == (True, True, True)
    remove()
    with TestClient(create_app(settings)):
        assert present() == (True, True, True)
    remove()
