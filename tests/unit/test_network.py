"""Network policies without the engine: parsing and the ceiling, the firewall rule set as
plain data, and the service keeping the rules in step on the fake runtime."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from server.auth.tokens import ensure_user
from server.config import Settings
from server.db.migrate import ensure_schema
from server.db.models import User
from server.db.session import make_engine, make_session_factory
from server.errors import Forbidden, ValidationFailed
from server.network import denials, firewall
from server.network.guard import NetworkGuard
from server.network.names import NameEntry
from server.network.policy import NetworkPolicy, parse_entry, validate
from server.runtime import docker_specs
from server.runtime.fake import FakeRuntime
from server.workspaces.service import CreateRequest, WorkspaceService
from tests.conftest import ApiClient

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# --- policy -------------------------------------------------------------------------------


def test_entries_parse_and_print_back() -> None:
    assert str(parse_entry("203.0.113.7")) == "203.0.113.7"
    assert str(parse_entry(" 203.0.113.7:443 ")) == "203.0.113.7:443"
    assert str(parse_entry("198.51.100.9/24")) == "198.51.100.0/24"
    assert str(parse_entry("10.20.0.0/16:5432")) == "10.20.0.0/16:5432"
    assert parse_entry(" PyPI.org. ") == NameEntry("pypi.org")
    assert str(parse_entry("*.npmjs.org")) == "*.npmjs.org"
    assert parse_entry("git.corp.example:443") == NameEntry("git.corp.example", 443)


@pytest.mark.parametrize("entry, words", [
    ("localhost", "neither an address, a CIDR range nor a domain name"),
    ("*.org", "neither an address"),
    ("a.*.example", "neither an address"),
    ("-bad.example", "neither an address"),
    ("1.2.3", "neither an address"),
    ("999.1.1.1", "neither an address"),
    ("pypi.org:x", "port must be 1-65535"),
    ("a" * 64 + ".example", "neither an address"),
    ("203.0.113.7:0", "port must be 1-65535"),
    ("203.0.113.7:http", "port must be 1-65535"),
    ("2001:db8::1", "IPv6 is not supported yet"),
    ("", "empty or too long"),
])
def test_bad_entries_are_refused_clearly(entry: str, words: str) -> None:
    with pytest.raises(ValidationFailed, match=words):
        parse_entry(entry)


def test_the_ceiling_and_private_ranges() -> None:
    ops = [parse_entry("10.9.0.0/16")]
    users = [parse_entry("192.168.5.0/24")]

    def check(mode: str, allow: list[str], ceiling: str = "internet") -> NetworkPolicy:
        return validate(mode, allow, ceiling=ceiling, user_ranges=users, operator=ops)

    assert check("allowlist", ["203.0.113.0/24", "10.9.1.2:80", "192.168.5.7"]).to_json() == {
        "mode": "allowlist", "allow": ["203.0.113.0/24", "10.9.1.2:80", "192.168.5.7"]}
    # Names are accepted in order, mixed with addresses; what they open is judged later.
    mixed = check("allowlist", ["pypi.org", "203.0.113.0/24", "*.npmjs.org:443"])
    assert mixed.to_json()["allow"] == ["pypi.org", "203.0.113.0/24", "*.npmjs.org:443"]
    assert NetworkPolicy.from_json(mixed.to_json()) == mixed
    assert mixed.names == (NameEntry("pypi.org"), NameEntry("*.npmjs.org", 443))
    assert [str(e) for e in mixed.addresses] == ["203.0.113.0/24"]
    for private in ("10.0.0.0/8", "169.254.169.254", "127.0.0.1:22", "172.17.0.1",
                    "100.64.0.1", "192.168.6.1", "0.0.0.0/0"):
        with pytest.raises(Forbidden, match="operator's permission"):
            check("allowlist", [private])
    with pytest.raises(Forbidden, match="'allowlist' at most"):
        check("internet", [], ceiling="allowlist")
    assert check("none", [], ceiling="none").mode == "none"
    with pytest.raises(ValidationFailed, match="one of"):
        check("open", [])
    with pytest.raises(ValidationFailed, match="with mode \"allowlist\" only"):
        check("internet", ["203.0.113.1"])
    with pytest.raises(ValidationFailed, match="at most 64"):
        check("allowlist", [f"203.0.113.{i}" for i in range(65)])


# --- the rule set -------------------------------------------------------------------------


def test_ruleset_judges_each_member_by_its_policy() -> None:
    bridge = firewall.Bridge(interface="den-abc", subnet="172.30.0.0/16")
    members = [
        firewall.Member("172.30.0.2", NetworkPolicy("internet")),
        firewall.Member("172.30.0.3", NetworkPolicy("none")),
        firewall.Member("172.30.0.4", NetworkPolicy("allowlist",
                                                    (parse_entry("203.0.113.7:443"),))),
    ]
    rules = firewall.ruleset("DEN-X", bridge, members, resolvers=["10.255.255.53"],
                             operator_allow=[parse_entry("10.9.0.0/16")]).splitlines()
    rej = "-j DEN-X-REJ"
    fwd = [r for r in rules if r.startswith("-A DEN-X-FWD")]
    assert fwd == [
        "-A DEN-X-FWD -m conntrack --ctstate ESTABLISHED,RELATED --ctdir REPLY -j RETURN",
        "-A DEN-X-FWD -s 172.30.0.2/32 -g DEN-X-INET",
        f"-A DEN-X-FWD -s 172.30.0.3/32 {rej}",
        "-A DEN-X-FWD -s 172.30.0.4/32 -d 10.255.255.53/32 -p udp --dport 53 -j RETURN",
        "-A DEN-X-FWD -s 172.30.0.4/32 -d 10.255.255.53/32 -p tcp --dport 53 -j RETURN",
        f"-A DEN-X-FWD -s 172.30.0.4/32 -d 172.30.0.0/16 {rej}",
        "-A DEN-X-FWD -s 172.30.0.4/32 -d 10.9.0.0/16 -j RETURN",
        f"-A DEN-X-FWD -s 172.30.0.4/32 -m addrtype --dst-type LOCAL {rej}",
        "-A DEN-X-FWD -s 172.30.0.4/32 -d 203.0.113.7/32 -p tcp --dport 443 -j RETURN",
        "-A DEN-X-FWD -s 172.30.0.4/32 -d 203.0.113.7/32 -p udp --dport 443 -j RETURN",
        f"-A DEN-X-FWD -s 172.30.0.4/32 {rej}",
        f"-A DEN-X-FWD {rej}",
    ]
    inet = [r for r in rules if r.startswith("-A DEN-X-INET")]
    assert inet[:4] == [
        "-A DEN-X-INET -d 10.255.255.53/32 -p udp --dport 53 -j RETURN",
        "-A DEN-X-INET -d 10.255.255.53/32 -p tcp --dport 53 -j RETURN",
        f"-A DEN-X-INET -d 172.30.0.0/16 {rej}",
        "-A DEN-X-INET -d 10.9.0.0/16 -j RETURN",
    ]
    for blocked in ("10.0.0.0/8", "169.254.0.0/16", "100.64.0.0/10", "127.0.0.0/8",
                    "172.16.0.0/12", "192.168.0.0/16"):
        assert f"-A DEN-X-INET -d {blocked} {rej}" in inet
    assert inet[-2:] == [f"-A DEN-X-INET -m addrtype --dst-type LOCAL {rej}",
                         "-A DEN-X-INET -j RETURN"]
    assert rules[:4] == ["*filter", ":DEN-X-FWD - [0:0]", ":DEN-X-INET - [0:0]",
                         ":DEN-X-REJ - [0:0]"]
    # TCP is refused with a reset (the socket fails and closes at once), the rest by ICMP.
    assert rules[-3:] == ["-A DEN-X-REJ -p tcp -j REJECT --reject-with tcp-reset",
                          "-A DEN-X-REJ -j REJECT --reject-with icmp-admin-prohibited",
                          "COMMIT"]


def test_a_members_rules_also_match_its_bridge_port() -> None:
    bridge = firewall.Bridge(interface="den-abc", subnet="172.30.0.0/16")
    members = firewall.members_of({"c1": "172.30.0.2", "c2": "172.30.0.3"},
                                  {"c1": NetworkPolicy("internet")}, {"c1": "veth1"})
    assert members == [firewall.Member("172.30.0.2", NetworkPolicy("internet"), "veth1"),
                       firewall.Member("172.30.0.3", NetworkPolicy("none"))]  # no row: none
    rules = firewall.ruleset("DEN-X", bridge, members, resolvers=[], operator_allow=[])
    assert ("-A DEN-X-FWD -s 172.30.0.2/32 -m physdev --physdev-in veth1 -g DEN-X-INET"
            in rules.splitlines())
    assert docker_specs.veth_peer_index(
        "4451: eth0@if4452: <BROADCAST,MULTICAST,UP> mtu 1500\n") == 4452
    assert docker_specs.veth_peer_index("Device \"eth0\" does not exist.") is None


def test_names_and_resolvers() -> None:
    assert firewall.chain_prefix("den-net") == firewall.chain_prefix("den-net")
    assert len(firewall.chain_prefix("x" * 200) + "-INET") <= 28
    assert len(firewall.bridge_name("x" * 200)) <= 15
    assert firewall.host_resolvers(
        "# c\nnameserver 127.0.0.53\nnameserver 10.255.255.53\nnameserver ::1\n"
        "nameserver fd00::1\nsearch x\nnameserver 203.0.113.53\n") == [
        "10.255.255.53", "203.0.113.53"]


# --- denied connections --------------------------------------------------------------------


def test_kernel_log_lines_become_denials() -> None:
    tag = firewall.log_tag("DEN-X")
    line = (f"6,31848,14419511287,-;{tag}IN=den-abc OUT=eth0 PHYSIN=veth1 SRC=172.30.0.2 "
            "DST=10.0.0.5 LEN=60 TOS=0x00 TTL=64 ID=1 DF PROTO=TCP SPT=41502 DPT=5432 SYN")
    assert denials.parse(line, tag) == denials.Denial("172.30.0.2", "10.0.0.5", "TCP", 5432)
    assert denials.parse(line, tag).describe() == "TCP to 10.0.0.5:5432"  # type: ignore[union-attr]
    icmp = f"{tag}IN=den-abc SRC=172.30.0.2 DST=169.254.169.254 PROTO=ICMP TYPE=8"
    assert denials.parse(icmp, tag) == denials.Denial("172.30.0.2", "169.254.169.254",
                                                      "ICMP", None)
    assert denials.parse(line.replace(tag, "DEN-Y-DENY "), tag) is None  # another Den's
    assert denials.parse(f"{tag}SRC=1.2.3.4", tag) is None
    # A workspace controls nothing in these lines but numbers; odd values are left out.
    assert denials.parse(f"{tag}SRC=172.30.0.2 DST=10.0.0.5 PROTO=TCP DPT=x;rm", tag) == \
        denials.Denial("172.30.0.2", "10.0.0.5", "TCP", None)
    rules = firewall.ruleset("DEN-X", firewall.Bridge("den-abc", "172.30.0.0/16"), [],
                             resolvers=[], operator_allow=[], log_denied=True).splitlines()
    assert ('-A DEN-X-REJ -m limit --limit 20/second --limit-burst 50 -j LOG --log-level 6 '
            '--log-prefix "DEN-X-DENY "') in rules


def test_denial_events_are_rate_limited_and_bounded() -> None:
    limit = denials.RateLimit(every_s=60, keys_max=3)
    assert limit.allow("ws1", "TCP to 10.0.0.5:5432", now=0)
    assert not limit.allow("ws1", "TCP to 10.0.0.5:5432", now=30)
    assert limit.allow("ws2", "TCP to 10.0.0.5:5432", now=30)
    assert limit.allow("ws1", "TCP to 10.0.0.6:5432", now=30)
    assert limit.allow("ws1", "TCP to 10.0.0.5:5432", now=61)
    for i in range(10):
        limit.allow("ws3", f"UDP to 10.0.0.{i}", now=70)
    assert len(limit._last) == 3


# --- the service keeps the rules in step ---------------------------------------------------


class Recording(firewall.Iptables):
    def __init__(self) -> None:
        super().__init__("DEN-T")
        self.applied: list[str] = []

    def apply(self, v4: str, v6: str, bridge: firewall.Bridge) -> None:
        self.applied.append(v4)

    def apply_v4(self, v4: str) -> None:
        self.applied.append(v4)


@pytest.fixture
def netsvc(make_settings: Callable[..., Settings], fake_runtime: FakeRuntime
           ) -> Iterator[tuple[WorkspaceService, Recording]]:
    settings = make_settings(network_user_allow=["10.20.0.0/16"])
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    url = settings.resolved_database_url()
    engine = make_engine(url)
    ensure_schema(engine, url, auto_migrate=True)
    rec = Recording()
    guard = NetworkGuard(runtime=fake_runtime, settings=settings, iptables=rec,
                         resolver_addresses=["10.255.255.53"])
    yield WorkspaceService(settings=settings, sessions=make_session_factory(engine),
                           runtime=fake_runtime, instance_id="i", network=guard), rec
    engine.dispose()


async def _running(svc: WorkspaceService, owner: User, repo: Path, **kw: Any) -> str:
    ws = await svc.create(owner, CreateRequest(name=None, repo_url=str(repo), **kw))
    task = svc._tasks.get(ws.id)
    if task is not None:
        await task
    assert svc.get(ws.id).state == "running"
    return ws.id


async def test_rules_follow_start_stop_and_live_changes(
        netsvc: tuple[WorkspaceService, Recording], make_repo: Callable[..., Path]) -> None:
    svc, rec = netsvc
    with svc.sessions.begin() as s:
        alice = ensure_user(s, "alice")
    ws_id = await _running(svc, alice, make_repo("api"), network_mode="none")
    assert svc.networks.policy(svc.get(ws_id)) == NetworkPolicy("none")
    assert "-A DEN-T-FWD -s 10.88.0.2/32 -j DEN-T-REJ" in rec.applied[-1]

    await svc.networks.set(ws_id, "allowlist", ["10.20.1.1:5432"], actor="alice")
    assert "-s 10.88.0.2/32 -d 10.20.1.1/32 -p tcp --dport 5432 -j RETURN" in rec.applied[-1]
    assert svc.events(ws_id)[-1].message == "network policy set to allowlist (10.20.1.1:5432)"

    with pytest.raises(Forbidden):
        await svc.networks.set(ws_id, "allowlist", ["10.30.0.1"], actor="alice")
    assert svc.networks.policy(svc.get(ws_id)).mode == "allowlist"  # unchanged

    svc.networks.record_denial(denials.Denial("10.88.0.2", "10.30.0.1", "TCP", 22))
    svc.networks.record_denial(denials.Denial("10.88.0.2", "10.30.0.1", "TCP", 22))  # a minute
    svc.networks.record_denial(denials.Denial("10.88.0.99", "10.30.0.1", "TCP", 22))  # nobody's
    assert [e.message for e in svc.events(ws_id) if e.message.startswith("denied")] == [
        "denied TCP to 10.30.0.1:22 (network policy allowlist; further denials of it are not "
        "recorded for a minute)"]

    await svc.stop(ws_id, actor="alice")
    assert "10.88.0.2" not in rec.applied[-1]  # a stopped container's address is forgotten
    await svc.start(ws_id, actor="alice")
    assert "-s 10.88.0.2/32 -d 10.20.1.1/32" in rec.applied[-1]


# --- the API --------------------------------------------------------------------------------


def test_api_create_patch_and_errors(fake_api: ApiClient, make_repo: Callable[..., Path]
                                     ) -> None:
    ws = fake_api.create(make_repo(), network={"mode": "allowlist",
                                                "allow": ["203.0.113.7:443"]})
    assert ws["network"] == {"mode": "allowlist", "allow": ["203.0.113.7:443"]}
    url = f"/api/v1/workspaces/{ws['id']}"
    r = fake_api.client.patch(url, headers=fake_api.h(), json={"network": {"mode": "none"}})
    assert r.status_code == 200 and r.json()["network"] == {"mode": "none", "allow": []}
    for body, status, code in [
        ({"network": {"mode": "allowlist", "allow": ["pypi"]}}, 422, "invalid"),
        ({"network": {"mode": "allowlist", "allow": ["192.168.1.1"]}}, 403,
         "network_not_allowed"),
        ({"network": {"mode": "internet", "extra": 1}}, 422, "invalid"),
        ({"name": "x"}, 422, "invalid"),
    ]:
        r = fake_api.client.patch(url, headers=fake_api.h(), json=body)
        assert r.status_code == status, r.text
        assert r.json()["error"]["code"] == code, r.text
    assert fake_api.get(url).json()["network"]["mode"] == "none"
    # Another user's workspace is not found.
    r = fake_api.client.patch(url, headers=fake_api.h("bob"), json={"network": {"mode": "none"}})
    assert r.status_code == 404
    # Default mode for a create without network.
    assert fake_api.create(make_repo("web"), name="web")["network"] == {
        "mode": "internet", "allow": []}


def test_an_own_bridge_gets_the_same_rules_plus_accept_and_masquerade() -> None:
    """The microVMs' bridge (Den's, no engine behind it): the member rules are those of the
    engine's bridge, reached from FORWARD through -OWN, which accepts what -FWD lets back."""
    members = [firewall.Member("10.88.0.2", NetworkPolicy("internet"), port="dvtabc")]
    engine = firewall.Bridge(interface="den-abc", subnet="10.88.0.0/16")
    own = firewall.Bridge(interface="den-abc", subnet="10.88.0.0/16", own=True)
    plain = firewall.ruleset("DEN-X", engine, members, resolvers=["10.88.0.1"],
                             operator_allow=[]).splitlines()
    rules = firewall.ruleset("DEN-X", own, members, resolvers=["10.88.0.1"],
                             operator_allow=[]).splitlines()
    assert [r for r in rules if "DEN-X-OWN" not in r] == plain
    assert [r for r in rules if r.startswith("-A DEN-X-OWN")] == [
        "-A DEN-X-OWN -i den-abc -j DEN-X-FWD",
        "-A DEN-X-OWN -i den-abc -j ACCEPT",
        "-A DEN-X-OWN -o den-abc -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
        "-A DEN-X-OWN -o den-abc -j DEN-X-REJ",
    ]
    assert ":DEN-X-OWN - [0:0]" in rules
    assert firewall.nat_ruleset("DEN-X", own) == (
        "*nat\n:DEN-X-NAT - [0:0]\n-A DEN-X-NAT -s 10.88.0.0/16 ! -o den-abc -j MASQUERADE\n"
        "COMMIT\n")
    assert firewall.jumps("DEN-X", engine) == [
        ("DOCKER-USER", ["-i", "den-abc", "-j", "DEN-X-FWD"]),
        ("INPUT", ["-i", "den-abc", "-j", "DEN-X-FWD"])]
    assert firewall.jumps("DEN-X", own) == [
        ("FORWARD", ["-j", "DEN-X-OWN"]), ("INPUT", ["-i", "den-abc", "-j", "DEN-X-FWD"]),
        ("POSTROUTING", ["-t", "nat", "-j", "DEN-X-NAT"])]
