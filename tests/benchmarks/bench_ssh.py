"""Den's SSH gateway against OpenSSH's own sshd in the same workspace, in the same run.

    .venv/bin/python -m tests.benchmarks.bench_ssh [--rounds N] [--mb M] [--json out.json]

(``make bench`` runs it with the defaults; docs/benchmarks.md explains the results.)

Starts a real ``den serve`` (free loopback ports for HTTP and SSH, temporary data dir, its
own engine prefix ``denbench-ssh-<random>``), registers a fresh ed25519 key, and creates one
workspace. Inside that same workspace it starts OpenSSH's ``sshd`` as root on 127.0.0.1:2022
(a throwaway config and host key under /tmp, the same public key authorized for dev), reached
from the host through the engine only: ``ssh -o ProxyCommand="docker exec -i C python3 relay
127.0.0.1 2022"`` -- the same kind of in-workspace relay the gateway uses for ``ssh -L``. That
path is the physical limit of this design (no container IP, everything through the engine);
the gateway is compared with it, round by round, the two alternating which goes first:

1. first command output: a new ``ssh`` process (no connection sharing) running ``echo ready``;
   the time from starting it to the first byte of its stdout (process start, TCP, key
   exchange, authentication, session, the command). Den runs commands as ``bash -lc`` (a
   login shell, like its web terminal); sshd runs the user's shell as ``bash -c``.
2. SFTP: ``sftp -b`` putting a file of ``--mb`` MiB of random bytes, then getting it back
   (checked); MB/s of each direction.

For context it also times ``docker exec C echo ready`` (the engine alone). Nothing asserts on
time. Every engine object it makes carries its prefix and is removed at the end, also after a
failure or Ctrl-C; the server is stopped.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from server.ssh.target import RELAY_SCRIPT
from tests.benchmarks.bench_workspaces import (
    Results,
    Server,
    finish_run,
    machine,
    make_repo,
    median,
    ms,
    p90,
    report_failure,
    sh,
    sigterm_as_interrupt,
    start_run,
)

SSHD_DIR = "/tmp/bench-sshd"
SSHD_PORT = 2022
LATENCY_GOAL = 1.5  # Den's first output at most 1.5x the sshd path
THROUGHPUT_GOAL = 0.5  # Den's SFTP at least half of the sshd path

SSHD_CONFIG = f"""\
Port {SSHD_PORT}
ListenAddress 127.0.0.1
HostKey {SSHD_DIR}/host_ed25519
AuthorizedKeysFile {SSHD_DIR}/authorized_keys
PidFile {SSHD_DIR}/sshd.pid
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PrintMotd no
UseDNS no
LogLevel ERROR
Subsystem sftp /usr/lib/openssh/sftp-server
"""


def start_sshd(container: str, public_key: str) -> None:
    """sshd as root inside the workspace, on 127.0.0.1:2022, authorizing ``public_key``."""
    script = (
        f"set -e; mkdir -p {SSHD_DIR} /run/sshd; chmod 0755 /run/sshd {SSHD_DIR}; "
        f"cat > {SSHD_DIR}/sshd_config <<'EOF'\n{SSHD_CONFIG}EOF\n"
        f"ssh-keygen -q -t ed25519 -N '' -f {SSHD_DIR}/host_ed25519; "
        f"echo {shlex.quote(public_key)} > {SSHD_DIR}/authorized_keys; "
        f"chmod 0644 {SSHD_DIR}/authorized_keys; "
        "usermod -p '*' dev; "  # useradd's '!' (locked) is refused by sshd without PAM
        f"cat > {SSHD_DIR}/relay.py <<'EOF'\n{RELAY_SCRIPT}EOF\n"
        f"/usr/sbin/sshd -f {SSHD_DIR}/sshd_config"
    )
    sh("docker", "exec", "-u", "root", container, "sh", "-c", script)


class Clients:
    """OpenSSH client command lines for both paths, sharing one key and options."""

    def __init__(self, work: Path, key: Path, ssh_port: int, container: str) -> None:
        self.key = key
        self.base = ["-F", "/dev/null", "-o", "StrictHostKeyChecking=no",
                     "-o", f"UserKnownHostsFile={work / 'known_hosts'}", "-o", "BatchMode=yes",
                     "-o", "IdentitiesOnly=yes", "-o", "LogLevel=ERROR", "-i", str(key)]
        proxy = (f"docker exec -i -u dev {container} python3 -I -S {SSHD_DIR}/relay.py "
                 f"127.0.0.1 {SSHD_PORT}")
        self.paths: dict[str, dict[str, Any]] = {
            "den": {"opts": [*self.base, "-o", f"Port={ssh_port}"],
                    "target": "bench@127.0.0.1"},
            "sshd": {"opts": [*self.base, "-o", f"ProxyCommand={proxy}",
                              "-o", "HostKeyAlias=bench-sshd"],
                     "target": "dev@bench-sshd"},
        }

    def ssh(self, path: str, *cmd: str) -> list[str]:
        p = self.paths[path]
        return ["ssh", *p["opts"], p["target"], *cmd]

    def sftp(self, path: str, batch: Path) -> list[str]:
        p = self.paths[path]
        return ["sftp", *p["opts"], "-b", str(batch), p["target"]]


def first_output(argv: list[str]) -> float:
    """Seconds from starting ``argv`` to the first byte on its stdout; it must exit 0."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    first = os.read(proc.stdout.fileno(), 1)  # unbuffered: communicate() reads the rest
    elapsed = time.perf_counter() - t0
    rest, err = proc.communicate(timeout=60)
    if proc.returncode != 0 or first + rest != b"ready\n":
        raise RuntimeError(f"{argv[-3:]} -> {proc.returncode}: {first + rest!r} "
                           f"{err.decode(errors='replace')[-500:]}")
    return elapsed


def sftp_round(clients: Clients, path: str, work: Path, src: Path, size: int
               ) -> tuple[float, float]:
    """(put MB/s, get MB/s) of one SFTP round trip, checked."""
    back = work / f"back-{path}"
    back.unlink(missing_ok=True)
    rates = []
    for what, line in (("put", f"put {src} bench.bin\n"), ("get", f"get bench.bin {back}\n")):
        batch = work / f"batch-{path}-{what}"
        batch.write_text(line)
        t0 = time.perf_counter()
        p = subprocess.run(clients.sftp(path, batch), capture_output=True, timeout=600)
        elapsed = time.perf_counter() - t0
        if p.returncode != 0:
            raise RuntimeError(f"sftp {what} via {path}: {p.stderr.decode()[-500:]}")
        rates.append(size / 1e6 / elapsed)
    if hashlib.sha256(back.read_bytes()).digest() != hashlib.sha256(src.read_bytes()).digest():
        raise RuntimeError(f"sftp via {path}: the file came back different")
    return rates[0], rates[1]


def bench(srv: Server, work: Path, repo: Path, rounds: int, mb: int, res: Results) -> None:
    key = work / "id_ed25519"
    sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "bench", "-f", str(key))
    public = key.with_suffix(".pub").read_text().strip()
    challenge = srv.http.post("/api/v1/users/me/ssh-keys/challenge").json()["challenge"]
    signature = subprocess.run(["ssh-keygen", "-Y", "sign", "-n", "den-ssh-key", "-f", str(key)],
                               input=challenge.encode(), capture_output=True,
                               check=True).stdout.decode()
    r = srv.http.post("/api/v1/users/me/ssh-keys", json={
        "public_key": public, "challenge": challenge, "signature": signature})
    if r.status_code != 201:
        raise RuntimeError(f"registering the key: {r.status_code} {r.text}")
    wid = srv.create("bench", repo)
    srv.wait_running(wid)
    container = f"{srv.prefix}-{wid}"
    start_sshd(container, public)
    clients = Clients(work, key, srv.ssh_port, container)
    for path in ("den", "sshd"):  # warm up both (host keys, caches)
        first_output(clients.ssh(path, "echo", "ready"))

    print(f"bench: first command output, {rounds} rounds", flush=True)
    for i in range(rounds):
        order = ("den", "sshd") if i % 2 == 0 else ("sshd", "den")
        for path in order:
            res.add(f"first output: {path}", first_output(clients.ssh(path, "echo", "ready")))
        t0 = time.perf_counter()
        sh("docker", "exec", "-u", "dev", container, "echo", "ready")
        res.add("first output: docker exec (engine alone)", time.perf_counter() - t0)

    src = work / "bench.bin"
    size = mb * 1024 * 1024
    with src.open("wb") as f:
        f.write(os.urandom(size))
    sftp_rounds = max(1, rounds // 4)
    print(f"bench: SFTP {mb} MiB, {sftp_rounds} rounds", flush=True)
    for i in range(sftp_rounds):
        order = ("den", "sshd") if i % 2 == 0 else ("sshd", "den")
        for path in order:
            up, down = sftp_round(clients, path, work, src, size)
            res.add(f"sftp put MB/s: {path}", up)
            res.add(f"sftp get MB/s: {path}", down)


def report(res: Results) -> tuple[str, dict[str, Any]]:
    s = res.samples
    den_first, sshd_first = median(s["first output: den"]), median(s["first output: sshd"])
    lines = [
        "| measure | Den gateway | sshd via docker exec | ratio (Den / sshd) | goal |",
        "|---|---|---|---|---|",
        f"| first command output, median | {ms(den_first)} | {ms(sshd_first)} | "
        f"{den_first / sshd_first:.2f}x | <= {LATENCY_GOAL}x |",
        f"| first command output, p90 | {ms(p90(s['first output: den']))} | "
        f"{ms(p90(s['first output: sshd']))} | | |",
    ]
    ratios: dict[str, float] = {"first_output": den_first / sshd_first}
    for what in ("put", "get"):
        den_r = median(s[f"sftp {what} MB/s: den"])
        sshd_r = median(s[f"sftp {what} MB/s: sshd"])
        ratios[f"sftp_{what}"] = den_r / sshd_r
        lines.append(f"| SFTP {what}, median | {den_r:.1f} MB/s | {sshd_r:.1f} MB/s | "
                     f"{den_r / sshd_r:.2f}x | >= {THROUGHPUT_GOAL}x |")
    engine = median(s["first output: docker exec (engine alone)"])
    lines.append(f"| `docker exec C echo ready` (engine alone), median | {ms(engine)} | | | |")
    met = (ratios["first_output"] <= LATENCY_GOAL
           and min(ratios["sftp_put"], ratios["sftp_get"]) >= THROUGHPUT_GOAL)
    lines.append("")
    lines.append(f"Goals {'met' if met else 'NOT met'}.")
    return "\n".join(lines), {"ratios": ratios, "goals_met": met}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.benchmarks.bench_ssh",
                                 description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--rounds", type=int, default=12,
                    help="first-output rounds (12); SFTP runs a quarter as many, at least 1")
    ap.add_argument("--mb", type=int, default=64, help="SFTP file size in MiB (64)")
    ap.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = ap.parse_args(argv)
    run = start_run("ssh")
    if run is None:
        return 2
    prefix, work, repos_root, started = run.prefix, run.work, run.repos_root, run.started
    load_before = run.load_before
    res = Results()
    srv: Server | None = None
    failed = 0
    print(f"bench: prefix {prefix}", flush=True)
    try:
        with sigterm_as_interrupt():
            repo = make_repo(repos_root, work)
            srv = Server(work, repos_root, prefix)
            srv.start()
            bench(srv, work, repo, max(1, args.rounds), args.mb, res)
    except BaseException as exc:
        failed = report_failure(exc, srv)
    finally:
        finish_run(prefix, work, srv)
    if failed:
        return failed
    text, summary = report(res)
    info = machine()
    info["loadavg_1m_before"] = load_before
    print()
    print(f"SSH, Den gateway vs sshd in the workspace via docker exec, "
          f"{started:%Y-%m-%d %H:%M} UTC, {info['cpus']} CPUs, {info['os']}, Docker "
          f"{info['docker']}, {info['runsc']}, load {load_before} -> {info['loadavg_1m']}")
    print(text)
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "summary": summary,
                                         "samples": res.summary()}, indent=2))
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
