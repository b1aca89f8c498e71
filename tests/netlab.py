"""Network stand-ins for the network isolation test and benchmark (not a test module).

A network namespace joined to the host by a veth pair on a random /30 of TEST-NET-2
(198.51.100.0/24, a documentation range no real host uses). One HTTP server in it answers on
four addresses: the namespace's end of the link (``public``: the "internet"), ``other`` (a
second "internet" address, in TEST-NET-3, 203.0.113.0/24), ``lan`` (in 10.213.0.0/16) and
the metadata address 169.254.169.254, the last three on the namespace's loopback. Only
packets that come in from ``bridge`` (one Den network's interface) are routed to those three,
by a policy-routing rule on that interface, so nothing else on the machine sees them.
With ``dns`` a DNS stand-in answers on ``public``:53 (UDP) with those records. Everything is
removed on exit.
"""

from __future__ import annotations

import contextlib
import json
import random
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

PORT = 8080  # the namespace's HTTP server, on all its addresses
METADATA = "169.254.169.254"


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=60, check=check)


def bench_repo(repos: Path, name: str = "r") -> Path:
    """A one-commit repository ``repos/name`` for the network benchmarks' workspaces."""
    repo = repos / name
    repo.mkdir(parents=True)
    sh("git", "init", "-q", "-b", "main", str(repo))
    (repo / "README.md").write_text("bench\n")
    sh("git", "-C", str(repo), "add", ".")
    sh("git", "-C", str(repo), "-c", "user.name=b", "-c", "user.email=b@e", "commit",
       "-q", "-m", "init")
    return repo


def wait_for(cond: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@dataclass(frozen=True)
class StandIns:
    ns: str
    public: str  # the namespace's end of the link: the "internet"
    host_link: str  # the host's end (a host address on a "public" range)
    lan: str
    other: str  # a second "public" address


def _ns_answers(ns: str, addr: str) -> bool:
    return sh("ip", "netns", "exec", ns, "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
              "--max-time", "2", f"http://{addr}:{PORT}/", check=False).stdout == "200"


# The DNS stand-in: a UDP and TCP server in the namespace answering A queries from a JSON map
# of name -> addresses (TTL 60), with no records for any other name.
DNS_SERVER = """
import json, socket, sys, threading
from server.network import dnswire
records = json.loads(sys.argv[1])

def answer(data):
    q = dnswire.question(data)
    found = records.get(q.name, []) if q.qtype == dnswire.TYPE_A else []
    return dnswire.build_answer(data, [(a, 60) for a in found])

def tcp():
    server = socket.create_server(("0.0.0.0", 53))
    while True:
        conn, _ = server.accept()
        with conn:
            try:
                size = int.from_bytes(conn.recv(2, socket.MSG_WAITALL), "big")
                data = conn.recv(size, socket.MSG_WAITALL)
                out = answer(data)
                conn.sendall(len(out).to_bytes(2, "big") + out)
            except (OSError, dnswire.Malformed):
                pass

threading.Thread(target=tcp, daemon=True).start()
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind(("0.0.0.0", 53))
while True:
    data, peer = sock.recvfrom(4096)
    try:
        sock.sendto(answer(data), peer)
    except dnswire.Malformed:
        pass
"""


def dns_answers(ns: str, addr: str, name: str) -> bool:
    probe = ("import socket, sys; from server.network import dnswire; "
             "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(2); "
             f"s.sendto(dnswire.build_query(7, {name!r}), ({addr!r}, 53)); "
             "print(dnswire.answers_a(s.recv(4096)))")
    return bool(sh("ip", "netns", "exec", ns, sys.executable, "-c", probe, check=False
                   ).stdout.strip() not in ("", "[]"))


@contextlib.contextmanager
def stand_ins(name: str, bridge: str, serve_dir: Path,
              dns: Callable[[StandIns], dict[str, list[str]]] | None = None
              ) -> Iterator[StandIns]:
    """The namespace ``<name>-ns`` and its server (serving ``serve_dir``), routed for
    packets from ``bridge``; with ``dns``, a DNS stand-in answering the records it gives
    for these stand-ins."""
    tag = secrets.token_hex(2)
    base = 4 * random.randint(1, 62)
    host_link, public = f"198.51.100.{base + 1}", f"198.51.100.{base + 2}"
    lan = f"10.213.{random.randint(0, 255)}.{random.randint(2, 250)}"
    other = f"203.0.113.{random.randint(100, 250)}"  # .80: the test mirror (security.md)
    ns, host_if, ns_if = f"{name}-ns", f"dtv{tag}h", f"dtv{tag}n"
    table, pref = str(random.randint(20000, 29999)), str(random.randint(20000, 29999))
    undo: list[list[str]] = []
    servers: list[subprocess.Popen[bytes]] = []
    try:
        for argv, back in [
            (["ip", "netns", "add", ns], ["ip", "netns", "del", ns]),
            (["ip", "link", "add", host_if, "type", "veth", "peer", "name", ns_if, "netns", ns],
             ["ip", "link", "del", host_if]),
            (["ip", "addr", "add", f"{host_link}/30", "dev", host_if], None),
            (["ip", "link", "set", host_if, "up"], None),
            (["ip", "-n", ns, "link", "set", "lo", "up"], None),
            (["ip", "-n", ns, "addr", "add", f"{public}/30", "dev", ns_if], None),
            (["ip", "-n", ns, "link", "set", ns_if, "up"], None),
            (["ip", "-n", ns, "addr", "add", f"{lan}/32", "dev", "lo"], None),
            (["ip", "-n", ns, "addr", "add", f"{METADATA}/32", "dev", "lo"], None),
            (["ip", "-n", ns, "addr", "add", f"{other}/32", "dev", "lo"], None),
            (["ip", "-n", ns, "route", "add", "default", "via", host_link], None),
            (["ip", "route", "add", f"{lan}/32", "via", public, "dev", host_if, "table", table],
             ["ip", "route", "flush", "table", table]),
            (["ip", "route", "add", f"{METADATA}/32", "via", public, "dev", host_if, "table",
              table], None),
            (["ip", "route", "add", f"{other}/32", "via", public, "dev", host_if, "table",
              table], None),
            (["ip", "rule", "add", "iif", bridge, "lookup", table, "pref", pref],
             ["ip", "rule", "del", "pref", pref]),
        ]:
            sh(*argv)
            if back is not None:
                undo.append(back)
        servers.append(subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-m",
                                         "http.server", str(PORT), "--bind", "0.0.0.0",
                                         "--directory", str(serve_dir)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        # Control: the server answers on every address, seen from inside the namespace.
        for addr in (public, other, lan, METADATA):
            wait_for(lambda a=addr: _ns_answers(ns, a),  # type: ignore[misc]
                     30, f"the namespace's server on {addr}")
        found = StandIns(ns=ns, public=public, host_link=host_link, lan=lan, other=other)
        if dns is not None:
            records = dns(found)
            servers.append(subprocess.Popen(
                ["ip", "netns", "exec", ns, sys.executable, "-c", DNS_SERVER,
                 json.dumps(records)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                cwd=Path(__file__).resolve().parent.parent))
            first = next(iter(records))
            wait_for(lambda: dns_answers(ns, public, first), 30, "the DNS stand-in")
        yield found
    finally:
        for server in servers:
            server.kill()
            server.wait(timeout=30)
        for back in reversed(undo):
            sh(*back, check=False)
