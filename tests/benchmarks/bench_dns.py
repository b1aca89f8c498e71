"""What Den's DNS forwarder adds to a lookup: the same queries from a gVisor workspace, through
Den's forwarder and directly to the name server behind it, in one run.

    .venv/bin/python -m tests.benchmarks.bench_dns [--names N] [--rounds R]

Starts a real ``den serve`` (prefix ``denbench-dns-<random>``) whose forwarder's upstream is
the DNS stand-in of tests/netlab.py (in a network namespace; ``DEN_NETWORK_DNS``), and one
workspace in mode ``allowlist`` with ``*.den.test`` and the stand-in's port 53. The stand-in
answers ``n<i>.den.test`` with a distinct "public" address each. Inside the workspace, a Python
client times UDP queries (A) for the ``N`` names: first through Den's forwarder, where each
answer adds a pin (a rule rebuild) before it is returned ("first"); then, alternating rounds,
through the forwarder again (pins known: no rebuild, "pinned") and directly to the stand-in
("direct"). Prints medians and p90 per kind and the added latency. Nothing asserts on time.
"""

from __future__ import annotations

import argparse
import json
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from server.network.firewall import Iptables, bridge_name, chain_prefix
from tests.netlab import bench_repo, sh, stand_ins
from tests.server_process import DenServer

QUERY_SCRIPT = """
import json, socket, struct, sys, time
server, names = sys.argv[1], sys.argv[2:]
out = []
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(5)
s.connect((server, 53))
for i, name in enumerate(names):
    q = struct.pack("!HHHHHH", i, 0x100, 1, 0, 0, 0)
    q += b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\\0"
    q += struct.pack("!HH", 1, 1)
    t = time.perf_counter()
    s.send(q)
    while struct.unpack("!H", s.recv(4096)[:2])[0] != i:
        pass
    out.append((time.perf_counter() - t) * 1000)
print(json.dumps(out))
"""


def _stats(values: list[float]) -> dict[str, float]:
    v = sorted(values)
    return {"p50_ms": round(statistics.median(v), 3), "p90_ms": round(v[int(len(v) * 0.9)], 3),
            "samples": len(v)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--names", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    prefix = f"denbench-dns-{secrets.token_hex(3)}"
    network = f"{prefix}-net"
    chains, bridge = chain_prefix(network), bridge_name(network)
    work = Path(tempfile.mkdtemp(prefix="denbench-dns-"))
    repos = work / "repos"
    bench_repo(repos)
    names = [f"n{i}.den.test" for i in range(min(args.names, 200))]
    records = {n: [f"203.0.113.{20 + i}"] for i, n in enumerate(names)}  # TEST-NET-3
    times: dict[str, list[float]] = {"first": [], "pinned": [], "direct": []}
    srv: DenServer | None = None
    try:
        with stand_ins(prefix, bridge, work, dns=lambda _s: records) as net:
            srv = DenServer(work / "data", repos, prefix, user="bench", http_timeout_s=600,
                            ssh_port=0, default_memory_mb=1024, default_cpus=1.0,
                            network_dns=json.dumps([net.public]))
            srv.start()
            r = srv.http.post("/api/v1/workspaces", json={
                "name": "b", "repo": {"url": str(repos / "r")},
                "network": {"mode": "allowlist", "allow": ["*.den.test", f"{net.public}:53"]}})
            r.raise_for_status()
            wid = r.json()["id"]
            deadline = time.monotonic() + 300
            while srv.http.get(f"/api/v1/workspaces/{wid}").json()["state"] != "running":
                if time.monotonic() > deadline:
                    raise RuntimeError("the workspace did not start")
                time.sleep(0.2)

            def run(cmd: list[str]) -> dict[str, Any]:
                out = srv.http.post(f"/api/v1/workspaces/{wid}/exec",  # type: ignore[union-attr]
                                    json={"cmd": cmd, "timeout_s": 600})
                out.raise_for_status()
                result: dict[str, Any] = out.json()
                if result["exit_code"] != 0:
                    raise RuntimeError(f"{cmd!r} failed: {result}")
                return result

            gateway = run(["sh", "-c", "cut -d' ' -f2 /etc/resolv.conf"])["stdout"].strip()

            def query(server: str) -> list[float]:
                out: list[float] = json.loads(
                    run(["python3", "-c", QUERY_SCRIPT, server, *names])["stdout"])
                return out

            query(net.public)  # warm-up (the stand-in, the sandbox's Python)
            times["first"] = query(gateway)
            for _ in range(args.rounds):
                times["pinned"] += query(gateway)
                times["direct"] += query(net.public)
            srv.http.delete(f"/api/v1/workspaces/{wid}")
    finally:
        if srv is not None:
            srv.close()
        Iptables(chains).remove()
        subprocess.run(["docker", "network", "rm", network], capture_output=True)
        sh("rm", "-rf", str(work), check=False)
    summary: dict[str, Any] = {k: _stats(v) for k, v in times.items()}
    for kind in ("first", "pinned"):
        summary[f"{kind}_added_p50_ms"] = round(summary[kind]["p50_ms"]
                                                - summary["direct"]["p50_ms"], 3)
    with open("/proc/loadavg") as fh:
        summary["loadavg"] = fh.read().split()[:3]
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
