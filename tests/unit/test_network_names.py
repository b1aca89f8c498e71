"""Domain names in allowlists without the engine: matching, the DNS wire format, the pin
table, the forwarder on loopback against a stand-in upstream server, and the guard turning
pins into rules on the fake runtime."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from server.auth.tokens import ensure_user
from server.config import Settings
from server.network import dnswire, forwarder
from server.network.firewall import FirewallError
from server.network.guard import NetworkGuard
from server.network.names import NameEntry, ports_for
from server.network.pins import Operator, PinTable, pins_for
from server.network.policy import NetworkPolicy, parse_entry, parse_ranges
from server.workspaces.service import CreateRequest, WorkspaceService
from tests.unit.test_network import Recording, netsvc  # noqa: F401 (a fixture)

pytestmark = pytest.mark.anyio

BRIDGE = "172.30.0.0/16"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def test_names_match_exactly_and_wildcards_match_subdomains_only() -> None:
    exact, wild = NameEntry("pypi.org"), NameEntry("*.npmjs.org", 443)
    assert exact.matches("pypi.org") and exact.matches("PyPI.ORG.")
    assert not exact.matches("files.pypi.org") and not exact.matches("evilpypi.org")
    assert wild.matches("registry.npmjs.org") and wild.matches("a.b.npmjs.org")
    assert not wild.matches("npmjs.org") and not wild.matches("evilnpmjs.org")
    assert ports_for("registry.npmjs.org", [wild, NameEntry("registry.npmjs.org", 80)]) == {
        80, 443}
    assert ports_for("registry.npmjs.org", [wild, NameEntry("*.npmjs.org")]) == {0}
    assert ports_for("example.org", [exact, wild]) == set()


def _policy(*allow: str, mode: str = "allowlist") -> NetworkPolicy:
    return NetworkPolicy(mode, tuple(parse_entry(a) for a in allow))


def _pins(name: str, answers: list[tuple[str, int]], policy: NetworkPolicy,
          operator: Operator | None = None) -> list[str]:
    return [f"{p}@{ttl}" for p, ttl in pins_for(name, answers, policy, operator or Operator(),
                                                 BRIDGE)]


def test_only_allowed_names_pin_and_only_public_answers() -> None:
    policy = _policy("ok.example", "*.pkg.example:443", "203.0.113.0/24")
    assert _pins("ok.example", [("198.51.100.7", 30), ("198.51.100.8", 60)], policy) == [
        "198.51.100.7@30", "198.51.100.8@60"]
    assert _pins("a.pkg.example", [("198.51.100.7", 30)], policy) == ["198.51.100.7:443@30"]
    assert _pins("evil.example", [("198.51.100.7", 30)], policy) == []
    # Rebinding: an allowed name answering a private, loopback, metadata, CGNAT address,
    # another workspace's or the host's on the bridge, opens nothing.
    for bad in ("10.1.2.3", "127.0.0.1", "169.254.169.254", "100.64.0.1", "172.30.0.5",
                "192.168.1.1", "0.0.0.0", "224.0.0.1"):
        assert _pins("ok.example", [(bad, 30)], policy) == [], bad
    # Other modes: none pins nothing; internet needs no pins for public addresses.
    assert _pins("ok.example", [("198.51.100.7", 30)], _policy(mode="none")) == []
    assert _pins("ok.example", [("198.51.100.7", 30)], _policy(mode="internet")) == []


def test_the_operator_may_let_names_resolve_to_private_addresses() -> None:
    operator = Operator.from_entries(parse_ranges(["mirror.corp.example:8443"]),
                                     parse_ranges(["*.corp.example", "10.20.0.0/16"]))
    allow = _policy("git.corp.example", "ok.example")
    # A name the operator lets users list may be private (its own port), never loopback,
    # link-local or the bridge.
    assert _pins("git.corp.example", [("10.9.0.1", 5)], allow, operator) == ["10.9.0.1@5"]
    assert _pins("git.corp.example", [("169.254.169.254", 5)], allow, operator) == []
    assert _pins("git.corp.example", [("172.30.0.9", 5)], allow, operator) == []
    # ... but only when the user lists it.
    assert _pins("db.corp.example", [("10.9.0.1", 5)], allow, operator) == []
    # A private answer inside an operator's range is judged like a public one.
    assert _pins("ok.example", [("10.20.0.9", 5)], allow, operator) == ["10.20.0.9@5"]
    assert _pins("ok.example", [("10.21.0.9", 5)], allow, operator) == []
    # DEN_NETWORK_ALLOW names: every workspace with network, whatever it lists.
    for policy in (allow, _policy(mode="internet")):
        assert _pins("mirror.corp.example", [("10.9.0.2", 5)], policy, operator) == [
            "10.9.0.2:8443@5"]


def test_pin_table_extends_expires_rejudges_and_is_bounded() -> None:
    table = PinTable(grace_s=10, per_container=3)
    one = pins_for("ok.example", [("198.51.100.1", 20)], _policy("ok.example"), Operator(),
                   BRIDGE)
    assert table.add("c1", "ok.example", one, now=0)
    assert not table.add("c1", "ok.example", one, now=5)  # known: extended, no new rule
    assert [str(p) for p in table.of("c1")] == ["198.51.100.1"]
    assert not table.expire(now=34)  # 5 + 20 + 10
    assert table.expire(now=35) and table.of("c1") == ()
    many = [(parse_entry(f"198.51.100.{i}"), i) for i in range(1, 6)]
    table.add("c1", "ok.example", many, now=0)  # type: ignore[arg-type]
    assert [str(p) for p in table.of("c1")] == ["198.51.100.3", "198.51.100.4",
                                                "198.51.100.5"]  # the longest-lived
    table.add("c2", "ok.example", one, now=0)
    # A policy change judges every pin again: c1 no longer allows the name, c2 is gone.
    assert table.keep({"c1": _policy("other.example")}, Operator(), BRIDGE)
    assert len(table) == 0
    table.add("c1", "ok.example", one, now=0)
    assert not table.keep({"c1": _policy("ok.example", "x.example")}, Operator(), BRIDGE)
    assert len(table) == 1


def test_wire_format_round_trip_and_malformed_input() -> None:
    query = dnswire.build_query(0x1234, "Ok.Example")
    q = dnswire.question(query)
    assert (q.id, q.name, q.qtype) == (0x1234, "ok.example", dnswire.TYPE_A)
    answer = dnswire.build_answer(query, [("198.51.100.7", 300), ("198.51.100.8", 5)])
    assert dnswire.answers_a(answer) == [("198.51.100.7", 300), ("198.51.100.8", 5)]
    assert dnswire.question(dnswire.with_id(answer, 7), response=True).id == 7
    err = dnswire.error_answer(query, q, dnswire.SERVFAIL)
    assert dnswire.rcode(err) == dnswire.SERVFAIL and dnswire.answers_a(err) == []
    for bad in (b"", query[:14],  # truncated
                query[:12] + b"\xc0\x0c" + query[-4:],  # a pointer to itself
                query[:12] + b"\x40abc\x00" + query[-4:],  # an unknown label type
                answer):  # an answer is not a query
        with pytest.raises(dnswire.Malformed):
            dnswire.question(bad)
    with pytest.raises(dnswire.Malformed):
        dnswire.answers_a(answer[:-2])  # a record cut short


# --- the forwarder, on loopback --------------------------------------------------------------


class Upstream(asyncio.DatagramProtocol):
    """A stand-in name server: fixed A records per name; nothing for ``slow.example``."""

    def __init__(self, records: dict[str, list[tuple[str, int]]]) -> None:
        self.records = records
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:  # type: ignore[override]
        name = dnswire.question(data).name
        if name != "slow.example" and self.transport is not None:
            self.transport.sendto(dnswire.build_answer(data, self.records.get(name, [])), addr)


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _ask(port: int, name: str, ident: int = 99) -> bytes:
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        sock.connect(("127.0.0.1", port))
        await loop.sock_sendall(sock, dnswire.build_query(ident, name))
        async with asyncio.timeout(10):
            return await loop.sock_recv(sock, 4096)


async def _ask_tcp(port: int, name: str) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    query = dnswire.build_query(5, name)
    writer.write(len(query).to_bytes(2, "big") + query)
    async with asyncio.timeout(10):
        size = int.from_bytes(await reader.readexactly(2), "big")
        data = await reader.readexactly(size)
    writer.close()
    return data


async def _tcp_upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    size = int.from_bytes(await reader.readexactly(2), "big")
    answer = dnswire.build_answer(await reader.readexactly(size), [("198.51.100.7", 60)])
    writer.write(len(answer).to_bytes(2, "big") + answer)
    await writer.drain()
    writer.close()


async def test_forwarder_learns_before_it_answers_and_bounds_what_it_takes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    loop = asyncio.get_running_loop()
    up_port, port = _free_udp_port(), _free_udp_port()
    transport, _ = await loop.create_datagram_endpoint(
        lambda: Upstream({"ok.example": [("198.51.100.7", 60)]}),
        local_addr=("127.0.0.1", up_port))
    tcp_upstream = await asyncio.start_server(_tcp_upstream, "127.0.0.1", up_port)
    learned: list[tuple[str, str, list[tuple[str, int]]]] = []

    async def learn(source: str, name: str, answers: list[tuple[str, int]]) -> None:
        learned.append((source, name, answers))

    known = {"127.0.0.1"}
    fwd = forwarder.Forwarder(["127.0.0.1"], learn=learn, known=lambda a: a in known,
                              port=port, upstream_port=up_port)
    monkeypatch.setattr(forwarder, "UPSTREAM_TIMEOUT_S", 0.3)
    await fwd.start("127.0.0.1")
    try:
        reply = await _ask(port, "OK.example", ident=4242)
        assert dnswire.question(reply, response=True).id == 4242  # the client's id back
        assert dnswire.answers_a(reply) == [("198.51.100.7", 60)]
        assert learned == [("127.0.0.1", "ok.example", [("198.51.100.7", 60)])]
        # Over TCP (a resolver's retry after a truncated answer): the same, over TCP upstream.
        reply = await _ask_tcp(port, "ok.example")
        assert dnswire.answers_a(reply) == [("198.51.100.7", 60)]
        assert learned[-1] == ("127.0.0.1", "ok.example", [("198.51.100.7", 60)])
        del learned[1:]
        # No answer upstream: SERVFAIL, nothing learned.
        reply = await _ask(port, "slow.example")
        assert dnswire.rcode(reply) == dnswire.SERVFAIL and len(learned) == 1
        # Oversized queries and unknown sources are dropped unanswered.
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.sendto(b"\0" * (forwarder.QUERY_MAX + 1), ("127.0.0.1", port))
        known.clear()
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.5):
                await _ask(port, "ok.example")
        assert fwd.dropped == 2 and len(learned) == 1
        # A port someone else holds: a clear error (den serve refuses to start).
        other = forwarder.Forwarder([], learn=learn, known=lambda a: True, port=port)
        with pytest.raises(FirewallError, match=r"cannot listen on 127\.0\.0\.1"):
            await other.start("127.0.0.1")
    finally:
        fwd.close()
        transport.close()
        tcp_upstream.close()


# --- the guard: pins become rules ----------------------------------------------------------


@pytest.fixture
def guarded(netsvc: tuple[WorkspaceService, Recording]  # noqa: F811 (the imported fixture)
            ) -> tuple[WorkspaceService, NetworkGuard, Recording]:
    """test_network's service with its guard (recording the rules it applies)."""
    svc, rec = netsvc
    assert svc.network is not None
    return svc, svc.network, rec


async def test_guard_pins_answers_for_allowed_names_and_drops_them_on_a_change(
        guarded: tuple[WorkspaceService, NetworkGuard, Recording],
        make_repo: Callable[..., Path]) -> None:
    svc, guard, rec = guarded
    with svc.sessions.begin() as s:
        alice = ensure_user(s, "alice")
    ws = await svc.create(alice, CreateRequest(name=None, repo_url=str(make_repo("api")),
                                               network_mode="allowlist",
                                               network_allow=("ok.example:443",)))
    task: Any = svc._tasks.get(ws.id)
    if task is not None:
        await task
    pin = "-s 10.88.0.2/32 -d 198.51.100.7/32 -p tcp --dport 443 -j RETURN"
    assert pin not in rec.applied[-1]
    count = len(rec.applied)
    await guard.learn("10.88.0.2", "evil.example", [("198.51.100.7", 60)])
    await guard.learn("10.88.0.99", "ok.example", [("198.51.100.7", 60)])  # nobody's
    assert len(rec.applied) == count  # nothing to change
    await guard.learn("10.88.0.2", "ok.example", [("198.51.100.7", 60), ("10.0.0.1", 60)])
    assert pin in rec.applied[-1] and "10.0.0.1" not in rec.applied[-1]
    count = len(rec.applied)
    await guard.learn("10.88.0.2", "ok.example", [("198.51.100.7", 60)])
    assert len(rec.applied) == count  # a known pin: no rebuild
    # The pin sits before the workspace's final refusal.
    fwd = [r for r in rec.applied[-1].splitlines() if "-s 10.88.0.2/32" in r]
    assert fwd.index(f"-A DEN-T-FWD {pin}") < fwd.index("-A DEN-T-FWD -s 10.88.0.2/32 -j "
                                                        "DEN-T-REJ")
    # A pause takes the container off the network: its processes keep the addresses they
    # resolved, so the pin waits for the resume rather than go.
    await svc.pause(ws.id, actor="alice")
    assert "10.88.0.2" not in rec.applied[-1]
    await svc.resume(ws.id, actor="alice")
    assert pin in rec.applied[-1]
    # A live change that still allows the name keeps the pin; one that does not drops it.
    await svc.networks.set(ws.id, "allowlist", ["ok.example:443", "x.example"], actor="alice")
    assert pin in rec.applied[-1]
    await svc.networks.set(ws.id, "allowlist", ["x.example"], actor="alice")
    assert "198.51.100.7" not in rec.applied[-1]


def test_operator_settings_may_name_domains(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, network_allow=["mirror.corp.example:8443"],
                        network_user_allow=["*.corp.example", "10.20.0.0/16"])
    operator = Operator.from_entries(parse_ranges(settings.network_allow),
                                     parse_ranges(settings.network_user_allow))
    assert operator.names == (NameEntry("mirror.corp.example", 8443),)
    assert operator.user_names == (NameEntry("*.corp.example"),)
    assert [str(r) for r in operator.ranges] == ["10.20.0.0/16"]
    with pytest.raises(ValueError, match="neither an address"):
        Settings(data_dir=tmp_path, network_allow=["localhost"])
