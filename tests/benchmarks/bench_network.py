"""What the network policy costs: TCP connect latency and bulk download throughput from a
gVisor workspace, with Den's rules and without them, in one run.

    .venv/bin/python -m tests.benchmarks.bench_network [--connects N] [--mib N]

Starts a real ``den serve`` (prefix ``denbench-net-<random>``, network isolation on), the
stand-ins of tests/netlab.py (an HTTP server in a network namespace at a "public" address),
and one workspace in mode ``internet``. In rounds, alternating: with the rules (Den's jumps
from DOCKER-USER and INPUT in place) and without them (the two jumps removed for the round, so
packets skip Den's chains; the workspace, its container and the path stay the same), the
workspace makes ``N`` TCP connections to the server, timing each ``connect()`` in Python
inside the sandbox, then downloads a file of ``--mib`` MiB with curl. Prints medians per
setting and the ratios. Nothing asserts on time. Everything it made is removed at the end.
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
from tests.netlab import PORT, bench_repo, sh, stand_ins
from tests.server_process import DenServer

CONNECT_SCRIPT = """
import socket, sys, time, json
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
out = []
for _ in range(n):
    s = socket.socket()
    t = time.perf_counter()
    s.connect((host, port))
    out.append((time.perf_counter() - t) * 1000)
    s.close()
print(json.dumps(out))
"""


def _jumps(prefix: str, bridge: str, *, on: bool) -> None:
    for chain in ("DOCKER-USER", "INPUT"):
        rule = ["-i", bridge, "-j", f"{prefix}-FWD"]
        present = sh("iptables", "-w", "-C", chain, *rule, check=False).returncode == 0
        if on and not present:
            sh("iptables", "-w", "-I", chain, "1", *rule)
        elif not on and present:
            sh("iptables", "-w", "-D", chain, *rule)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--connects", type=int, default=300)
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    prefix = f"denbench-net-{secrets.token_hex(3)}"
    network = f"{prefix}-net"
    chains, bridge = chain_prefix(network), bridge_name(network)
    work = Path(tempfile.mkdtemp(prefix="denbench-net-"))
    repos = work / "repos"
    bench_repo(repos)
    with (work / "blob").open("wb") as fh:
        fh.truncate(args.mib * 1024 * 1024)  # zeros: the network is measured, not the disk
    srv = DenServer(work / "data", repos, prefix, user="bench", http_timeout_s=600,
                    ssh_port=0, default_memory_mb=1024, default_cpus=1.0)
    results: dict[str, dict[str, list[float]]] = {"rules": {"connect_ms": [], "MBps": []},
                                                 "none": {"connect_ms": [], "MBps": []}}
    try:
        with stand_ins(prefix, bridge, work) as net:
            srv.start()
            r = srv.http.post("/api/v1/workspaces",
                              json={"name": "b", "repo": {"url": str(repos / "r")}})
            r.raise_for_status()
            wid = r.json()["id"]
            deadline = time.monotonic() + 300
            while srv.http.get(f"/api/v1/workspaces/{wid}").json()["state"] != "running":
                if time.monotonic() > deadline:
                    raise RuntimeError("the workspace did not start")
                time.sleep(0.2)

            def run(cmd: list[str] | str) -> dict[str, Any]:
                out = srv.http.post(f"/api/v1/workspaces/{wid}/exec",
                                    json={"cmd": cmd, "timeout_s": 600})
                out.raise_for_status()
                result: dict[str, Any] = out.json()
                if result["exit_code"] != 0:
                    raise RuntimeError(f"{cmd!r} failed: {result}")
                return result

            run(["python3", "-c", CONNECT_SCRIPT, net.public, str(PORT), "20"])  # warm-up
            for _ in range(args.rounds):
                for setting in ("rules", "none"):
                    _jumps(chains, bridge, on=setting == "rules")
                    times = json.loads(run(["python3", "-c", CONNECT_SCRIPT, net.public,
                                            str(PORT), str(args.connects)])["stdout"])
                    results[setting]["connect_ms"] += times
                    speed = run(["curl", "-s", "-o", "/dev/null", "-w", "%{speed_download}",
                                 f"http://{net.public}:{PORT}/blob"])["stdout"]
                    results[setting]["MBps"].append(float(speed) / 1e6)
            _jumps(chains, bridge, on=True)
            srv.http.delete(f"/api/v1/workspaces/{wid}")
    finally:
        srv.close()
        Iptables(chains).remove()
        subprocess.run(["docker", "network", "rm", network], capture_output=True)
        sh("rm", "-rf", str(work), check=False)
    summary: dict[str, Any] = {}
    for setting, values in results.items():
        c = sorted(values["connect_ms"])
        summary[setting] = {
            "connect_ms_p50": round(statistics.median(c), 3),
            "connect_ms_p90": round(c[int(len(c) * 0.9)], 3),
            "download_MBps_median": round(statistics.median(values["MBps"]), 1),
            "samples": len(c), "downloads": len(values["MBps"]),
        }
    summary["connect_p50_added_ms"] = round(summary["rules"]["connect_ms_p50"]
                                            - summary["none"]["connect_ms_p50"], 3)
    summary["throughput_ratio"] = round(summary["rules"]["download_MBps_median"]
                                        / summary["none"]["download_MBps_median"], 3)
    summary["loadavg"] = Path("/proc/loadavg").read_text().split()[:3]
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
