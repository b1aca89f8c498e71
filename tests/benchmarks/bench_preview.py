"""Preview URLs against the same servers reached directly inside the workspace, in one run.

    .venv/bin/python -m tests.benchmarks.bench_preview [--quick] [--json out.json] [--agent BIN]

Starts a real ``den serve`` (temporary data dir, engine prefix ``denbench-preview-<random>``)
and one workspace running ``python3 -m http.server 8000 --protocol HTTP/1.1`` (a page and a
100 MB file; HTTP/1.1 so that it offers keep-alive, as dev servers do) and the
tests' tiny WebSocket echo app (tests/preview_app.py) on port 9000. Then, through the path
form (``/preview/<id>/<port>/``, a bearer token, one keep-alive connection from this
process) and directly (a Python client run inside the workspace against 127.0.0.1):

1. request latency: GET of the page, p50 and p90 of N requests (and, for context, an
   authenticated ``GET /api/v1/workspaces/{id}`` on the same server); directly both with a
   new connection per request and on one keep-alive connection (the fairer of the two: the
   benchmark's client keeps its connection to Den, and Den its connections to the app);
2. throughput: GET of the 100 MB file, read and discarded, best of 3;
3. WebSocket echo round trip: 16-byte text messages on one connection, p50 and p90.

The direct client runs in the workspace's Python (inside gVisor), the preview client here on
the host: the ratio is what a user sees through Den against what the app itself sees. For
the raw engine doing the same work from the same side (``bridge``), the same servers also
listen on every address (ports 8001 and 9001) and this process reaches them at the
container's address on Den's bridge with the same clients, and reads the 100 MB file through
the engine's exec stream (``docker exec cat``). ``--agent`` runs another agent binary in the
workspace (one without the direct path measures the relay through the agent session in the
same machine state). Nothing asserts on time; everything named with the prefix is removed at
the end.
"""

from __future__ import annotations

import argparse
import json
import secrets
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from websockets.sync.client import connect

from server.client import Den
from tests.conftest import remove_networks
from tests.preview_app import APP
from tests.server_process import DenServer

BIG_MB = 100

# Run inside the workspace: the same three measurements against 127.0.0.1.
DIRECT = r'''
import base64, json, os, socket, statistics, struct, sys, time, urllib.request
n, rounds = int(sys.argv[1]), int(sys.argv[2])
lat = []
for _ in range(n):
    t = time.perf_counter()
    urllib.request.urlopen("http://127.0.0.1:8000/index.html").read()
    lat.append(time.perf_counter() - t)
import http.client
conn = http.client.HTTPConnection("127.0.0.1", 8000)
lat_ka = []  # one keep-alive connection, as a browser (and Den, to the app) holds one
for _ in range(n):
    t = time.perf_counter()
    conn.request("GET", "/index.html")
    conn.getresponse().read()
    lat_ka.append(time.perf_counter() - t)
conn.close()
rates = []
for _ in range(3):
    t = time.perf_counter()
    size = 0
    with urllib.request.urlopen("http://127.0.0.1:8000/big.bin") as r:
        while chunk := r.read(1 << 16):
            size += len(chunk)
    rates.append(size / (time.perf_counter() - t) / 1e6)
s = socket.create_connection(("127.0.0.1", 9000))
key = base64.b64encode(os.urandom(16)).decode()
s.sendall(("GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
buf = b""
while b"\r\n\r\n" not in buf:
    buf += s.recv(4096)
def recv_exact(k):
    out = b""
    while len(out) < k:
        out += s.recv(k - len(out))
    return out
rtt = []
msg = b"0123456789abcdef"
for _ in range(rounds):
    mask = os.urandom(4)
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(msg))
    frame = bytes([0x81, 0x80 | len(msg)]) + mask + body
    t = time.perf_counter()
    s.sendall(frame)
    head = recv_exact(2)
    recv_exact(head[1] & 0x7F)
    rtt.append(time.perf_counter() - t)
print(json.dumps({"lat": lat, "lat_ka": lat_ka, "rates": rates, "rtt": rtt}))
'''


def pct(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, int(q * len(values)))]


def git(*args: str, cwd: Path) -> None:
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True)


def bridge_baseline(prefix: str, n: int, rounds: int, cwd: str) -> dict[str, float]:
    """The raw engine doing the same work, from this process on the host: the same servers
    (on 8001 and 9001, bound to every address) reached at the container's address on Den's
    bridge with the same clients, and the 100 MB file read through the engine's exec stream
    (``docker exec cat``), the path every preview byte took before the direct path."""
    import docker

    client = docker.from_env()
    try:
        (container,) = client.containers.list(filters={"name": prefix})
        nets = container.attrs["NetworkSettings"]["Networks"]
        addr = next(v["IPAddress"] for v in nets.values() if v.get("IPAddress"))
        out: dict[str, float] = {}
        with httpx.Client(base_url=f"http://{addr}:8001", timeout=120) as c:
            for _ in range(10):
                c.get("/index.html")
            lat = []
            for _ in range(n):
                t = time.perf_counter()
                c.get("/index.html").raise_for_status()
                lat.append(time.perf_counter() - t)
            rates = []
            for _ in range(3):
                t = time.perf_counter()
                size = 0
                with c.stream("GET", "/big.bin") as r:
                    for chunk in r.iter_raw(1 << 16):
                        size += len(chunk)
                rates.append(size / (time.perf_counter() - t) / 1e6)
        rtt = []
        with connect(f"ws://{addr}:9001/ws") as sock:
            for _ in range(rounds):
                t = time.perf_counter()
                sock.send("0123456789abcdef")
                sock.recv(timeout=30)
                rtt.append(time.perf_counter() - t)
        exec_rates = []
        for _ in range(3):
            t = time.perf_counter()
            exec_id = client.api.exec_create(container.id, ["cat", "big.bin"], user="dev",
                                             workdir=cwd)["Id"]
            size = 0
            for chunk in client.api.exec_start(exec_id, stream=True):
                size += len(chunk)
            exec_rates.append(size / (time.perf_counter() - t) / 1e6)
        out = {"latency_p50_ms": pct(lat, 0.5) * 1e3, "latency_p90_ms": pct(lat, 0.9) * 1e3,
               "download_best_MBps": max(rates), "download_median_MBps": statistics.median(rates),
               "ws_rtt_p50_ms": pct(rtt, 0.5) * 1e3, "ws_rtt_p90_ms": pct(rtt, 0.9) * 1e3,
               "exec_download_best_MBps": max(exec_rates)}
        return out
    finally:
        client.close()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json")
    ap.add_argument("--agent", default="", help="the den-agent binary to run in the workspace "
                    "(an agent without the direct path measures the relay through the agent "
                    "session; default: build/agent/den-agent)")
    args = ap.parse_args()
    n, rounds = (100, 100) if args.quick else (500, 500)
    root = Path(tempfile.mkdtemp(prefix="denbench-preview-"))
    src, repos = root / "src", root / "repos"
    src.mkdir()
    repos.mkdir()
    (src / "index.html").write_text("<h1>hello</h1>\n")
    (src / "app.py").write_text(APP)
    (src / "direct.py").write_text(DIRECT)
    git("init", "-q", "-b", "main", cwd=src)
    git("add", "-A", cwd=src)
    git("-c", "user.name=b", "-c", "user.email=b@b", "commit", "-q", "-m", "b", cwd=src)
    git("clone", "-q", "--bare", str(src), str(repos / "site.git"), cwd=root)
    prefix = f"denbench-preview-{secrets.token_hex(2)}"
    extra = {"agent_binary": args.agent} if args.agent else {}
    # no API rate limit: the full run reads the workspace 500 times in a row (a 429 otherwise)
    srv = DenServer(root / "data", repos, prefix, user="alice", ssh_port=0, reaper_interval_s=0,
                    rate_limit_per_token=0, **extra)
    srv.start()
    results: dict[str, Any] = {}
    try:
        with Den(f"http://127.0.0.1:{srv.port}", srv.token) as den:
            ws = den.create(str(repos / "site.git"), name="site").wait_for("running")
            ws.exec(f"head -c {BIG_MB}000000 /dev/urandom > big.bin").check()
            ws.processes.start("exec python3 -m http.server 8000 --bind 127.0.0.1 "
                               "--protocol HTTP/1.1")
            ws.processes.start("exec python3 app.py 9000")
            # The same two servers on every address, for the raw baseline from the host.
            ws.processes.start("exec python3 -m http.server 8001 --bind 0.0.0.0 "
                               "--protocol HTTP/1.1")
            ws.processes.start("sed s/127.0.0.1/0.0.0.0/ app.py > app_any.py && "
                               "exec python3 app_any.py 9001")
            deadline = time.monotonic() + 60
            while {8000, 9000, 8001, 9001} - {p["port"] for p in ws.ports() if p["listening"]}:
                assert time.monotonic() < deadline
                time.sleep(0.2)
            base = f"/preview/{ws.id}"
            auth = {"Authorization": f"Bearer {srv.token}"}
            with httpx.Client(base_url=f"http://127.0.0.1:{srv.port}", headers=auth,
                              timeout=120) as c:
                for _ in range(10):
                    c.get(f"{base}/8000/index.html")
                lat = []
                for _ in range(n):
                    t = time.perf_counter()
                    c.get(f"{base}/8000/index.html").raise_for_status()
                    lat.append(time.perf_counter() - t)
                api = []  # context: an authenticated API read on the same server
                for _ in range(n):
                    t = time.perf_counter()
                    c.get(f"/api/v1/workspaces/{ws.id}").raise_for_status()
                    api.append(time.perf_counter() - t)
                rates = []
                for _ in range(3):
                    t = time.perf_counter()
                    size = 0
                    with c.stream("GET", f"{base}/8000/big.bin") as r:
                        for chunk in r.iter_raw(1 << 16):
                            size += len(chunk)
                    rates.append(size / (time.perf_counter() - t) / 1e6)
            rtt = []
            with connect(f"ws://127.0.0.1:{srv.port}{base}/9000/ws",
                         additional_headers=auth) as sock:
                for _ in range(rounds):
                    t = time.perf_counter()
                    sock.send("0123456789abcdef")
                    sock.recv(timeout=30)
                    rtt.append(time.perf_counter() - t)
            raw = bridge_baseline(prefix, n, rounds, ws.exec("pwd").check().stdout.strip())
            out = ws.exec(["python3", "direct.py", str(n), str(rounds)],
                          timeout_s=600).check().stdout
            direct = json.loads(out)
            results = {
                "latency_ms": {"preview_p50": pct(lat, 0.5) * 1e3,
                               "preview_p90": pct(lat, 0.9) * 1e3,
                               "direct_p50": pct(direct["lat"], 0.5) * 1e3,
                               "direct_p90": pct(direct["lat"], 0.9) * 1e3,
                               "direct_keepalive_p50": pct(direct["lat_ka"], 0.5) * 1e3,
                               "api_get_p50": pct(api, 0.5) * 1e3},
                "download_MBps": {"preview_best": max(rates), "direct_best": max(direct["rates"]),
                                  "preview_median": statistics.median(rates),
                                  "direct_median": statistics.median(direct["rates"])},
                "ws_rtt_ms": {"preview_p50": pct(rtt, 0.5) * 1e3,
                              "preview_p90": pct(rtt, 0.9) * 1e3,
                              "direct_p50": pct(direct["rtt"], 0.5) * 1e3,
                              "direct_p90": pct(direct["rtt"], 0.9) * 1e3},
            }
            results["bridge"] = raw
            lm, dm, wm = results["latency_ms"], results["download_MBps"], results["ws_rtt_ms"]
            results["ratios"] = {
                "latency_p50": lm["preview_p50"] / lm["direct_p50"],
                "latency_p50_keepalive": lm["preview_p50"] / lm["direct_keepalive_p50"],
                "download_best": dm["preview_best"] / dm["direct_best"],
                "ws_rtt_p50": wm["preview_p50"] / wm["direct_p50"],
                "latency_p50_vs_bridge": lm["preview_p50"] / raw["latency_p50_ms"],
                "download_best_vs_bridge": dm["preview_best"] / raw["download_best_MBps"],
                "ws_rtt_p50_vs_bridge": wm["preview_p50"] / raw["ws_rtt_p50_ms"],
            }
            print(json.dumps(results, indent=2))
            ws.delete()
    finally:
        for w in srv.http.get("/api/v1/workspaces").json().get("workspaces", []):
            srv.http.delete(f"/api/v1/workspaces/{w['id']}")  # also when a measure failed
        srv.close()
        remove_networks(prefix)  # Den's network and its firewall chains (it kept them)
        subprocess.run(["rm", "-rf", str(root)], check=False)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
