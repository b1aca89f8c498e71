"""Den against the raw engine, measured in the same run and reported as ratios.

    .venv/bin/python -m tests.benchmarks.bench_workspaces [--rounds N] [--exec-samples M]
        [--poll-ms MS] [--json out.json] [--no-breakdown]

(``make bench`` runs it with the defaults; docs/benchmarks.md explains the results.)

Starts a real ``den serve`` on a free loopback port (temporary data dir, its own engine
prefix ``denbench-<random>``, a small local bare repository) and drives it over HTTP with
httpx, the way an agent does. Each Den operation is paired with the raw engine doing the same
work on the same image under runsc, interleaved round by round so that drift hits both:

1. create -> first exec: ``git clone`` on the host, ``docker volume create``, ``docker run -d
   --runtime=runsc``, ``docker cp`` of the clone into the volume, ``docker exec C true``
   vs ``POST /workspaces``, poll until ``running``, ``POST .../exec {"cmd": ["true"]}``.
2. exec round trip: ``docker exec C true`` (CLI) and the SDK's ``exec_run`` vs ``POST .../exec``.
3. stop: ``docker stop -t 2`` vs ``POST .../stop`` (the server runs with DEN_STOP_TIMEOUT_S=2).
4. start: ``docker start`` vs ``POST .../start``.

Then (unless ``--no-breakdown``) it times, in this process, the pieces the server runs for
those operations with the server's own code (``server.git.clone``, ``DockerRuntime``, the
Docker SDK calls it makes) to show where Den's time goes.

Every container and volume it makes is named with its prefix and removed at the end, also
after a failure or Ctrl-C; the server is stopped. Nothing here asserts on time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import docker
import httpx

from tests.server_process import DenServer

IMAGE = "den/workspace:latest"
MEMORY_MB = 512
CPUS = 2.0  # Den's default_cpus; raw containers get the sandbox spec Den builds for these
PIDS = 1024
STOP_TIMEOUT_S = 2
POLL_S = 0.01  # how often the client polls GET /workspaces/{id} while it is creating
REPO = "bench"  # the repository's name: Den clones it into /workspace/bench


# --- small helpers ---------------------------------------------------------------------------


def sh(*argv: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    """Run a command; raise with its stderr when it fails."""
    p = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({p.returncode}): {p.stderr.strip()}")
    return p.stdout


def timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def p90(xs: list[float]) -> float:
    if len(xs) < 2:
        return xs[0] if xs else float("nan")
    return statistics.quantiles(xs, n=10, method="inclusive")[8]


def ms(x: float) -> str:
    if x < 0.01:
        return f"{x * 1000:.1f} ms"
    return f"{x * 1000:.0f} ms" if x < 10 else f"{x:.1f} s"


def make_repo(root: Path, work: Path) -> Path:
    """A bare repository ``bench.git`` under ``root``: a few files over a few commits."""
    env = {**os.environ, "GIT_AUTHOR_NAME": "Bench", "GIT_AUTHOR_EMAIL": "b@example.com",
           "GIT_COMMITTER_NAME": "Bench", "GIT_COMMITTER_EMAIL": "b@example.com"}
    src = work / "repo-src"
    src.mkdir()
    sh("git", "init", "-q", "-b", "main", cwd=src, env=env)
    commits = [
        {"README.md": "# bench\n", "pyproject.toml": "[project]\nname = 'bench'\n"},
        {"src/bench/__init__.py": "", "src/bench/app.py": "def main():\n    return 1\n"},
        {"tests/test_app.py": "from bench.app import main\n\n\ndef test():\n"
                              "    assert main() == 1\n", "docs/index.md": "Docs.\n" * 50},
        {"src/bench/app.py": "def main():\n    return 1  # v2\n", "Makefile": "all:\n\ttrue\n"},
    ]
    for i, files in enumerate(commits):
        for rel, text in files.items():
            p = src / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(text)
        sh("git", "add", "-A", cwd=src, env=env)
        sh("git", "commit", "-q", "-m", f"commit {i}", cwd=src, env=env)
    bare = root / f"{REPO}.git"
    sh("git", "clone", "-q", "--bare", str(src), str(bare))
    return bare


def machine() -> dict[str, Any]:
    def first_line(*argv: str) -> str:
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=20)
            return (out.stdout or out.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return "unknown"

    pretty = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                pretty = line.split("=", 1)[1].strip('"')
    return {
        "cpus": os.cpu_count(),
        "os": pretty,
        "kernel": platform.release(),
        "docker": first_line("docker", "version", "--format", "{{.Server.Version}}"),
        "runsc": first_line("runsc", "--version"),
        "python": platform.python_version(),
        "runtimes": first_line("docker", "info", "--format", "{{json .Runtimes}}"),
        "git": first_line("git", "describe", "--always", "--dirty"),
        "loadavg_1m": round(os.getloadavg()[0], 2),
    }


# --- the server under test ---------------------------------------------------------------------


# A benchmark measures Den's speed, one user firing as fast as it can: the per-user limits and
# the API rate limits (which would answer 429 to a burst of 100 execs) are out of the way.
BENCH_LIMITS = {"rate_limit_per_token": 0, "rate_limit_per_address": 0,
                "max_execs_per_user": 100000, "max_streams_per_user": 100000,
                "max_terminals_per_user": 100000, "max_ssh_channels_per_user": 100000}


class Server(DenServer):
    """``den serve`` for the benchmark, with the API calls it makes, each checked."""

    def __init__(self, work: Path, repos_root: Path, prefix: str, **settings: Any) -> None:
        """``settings``: further server settings (``file_max_bytes=...``), as DenServer's."""
        super().__init__(work / "data", repos_root, prefix, user="bench", http_timeout_s=120,
                         own_session=True,  # Ctrl-C reaches the benchmark, which stops it
                         **{"default_memory_mb": MEMORY_MB, "default_cpus": CPUS,
                            "default_pids": PIDS, "stop_timeout_s": STOP_TIMEOUT_S,
                            **BENCH_LIMITS, **settings})

    # API calls, each checked ---------------------------------------------------------------

    def _ok(self, r: httpx.Response, *codes: int) -> dict[str, Any]:
        if r.status_code not in codes:
            raise RuntimeError(f"{r.request.method} {r.request.url.path} -> {r.status_code}: "
                               f"{r.text[:500]}")
        return r.json() if r.content else {}

    def create(self, name: str, repo: Path) -> str:
        r = self.http.post("/api/v1/workspaces", json={"name": name, "repo": {"url": str(repo)}})
        return str(self._ok(r, 202)["id"])

    def wait_running(self, wid: str, *, poll_s: float = POLL_S, timeout_s: float = 120
                     ) -> list[float]:
        """Poll until ``running``; the latency of every GET."""
        deadline = time.monotonic() + timeout_s
        latencies: list[float] = []
        while True:
            t0 = time.perf_counter()
            ws = self._ok(self.http.get(f"/api/v1/workspaces/{wid}"), 200)
            latencies.append(time.perf_counter() - t0)
            if ws["state"] == "running":
                return latencies
            if ws["state"] == "error" or time.monotonic() > deadline:
                raise RuntimeError(f"workspace {wid} is {ws['state']}: {ws['state_reason']}")
            time.sleep(poll_s)

    def exec_true(self, wid: str) -> dict[str, Any]:
        out = self._ok(self.http.post(f"/api/v1/workspaces/{wid}/exec", json={"cmd": ["true"]}),
                       200)
        if out["exit_code"] != 0:
            raise RuntimeError(f"exec true in {wid} exited {out['exit_code']}: {out['stderr']}")
        return out

    def lifecycle(self, wid: str, op: str) -> None:
        self._ok(self.http.post(f"/api/v1/workspaces/{wid}/{op}"), 200)

    def delete(self, wid: str) -> None:
        self._ok(self.http.delete(f"/api/v1/workspaces/{wid}"), 204, 202)

    def events(self, wid: str) -> list[dict[str, Any]]:
        return list(self._ok(self.http.get(f"/api/v1/workspaces/{wid}/events"), 200)["events"])


# --- the raw engine ------------------------------------------------------------------------


def raw_run_flags(volume: str, *, image: str = IMAGE, cpus: float = CPUS,
                  memory_mb: int = MEMORY_MB, pids: int = PIDS) -> list[str]:
    """``docker run`` flags for the sandbox Den itself would create for a workspace with
    these resources: built from the server's own pure spec builder, so that the raw container
    gets the same runtime, limits, ulimits and environment (DEN_MEMORY_MB, for example) and
    the comparison stays fair as the spec changes."""
    from server.runtime import docker_specs
    from server.runtime.base import WorkspaceSpec

    spec = WorkspaceSpec(workspace_id="raw", handle={"container": "raw", "volume": volume},
                         image=image, runtime="gvisor", cpus=cpus, memory_mb=memory_mb,
                         pids_limit=pids, hostname="raw", labels={})
    cfg = docker_specs.container_config(spec, gvisor_runtime="runsc")
    hc: dict[str, Any] = dict(cfg["host_config"])
    flags = [f"--runtime={hc.pop('runtime')}", "--hostname", str(cfg["hostname"]),
             "-w", str(cfg["working_dir"])]
    for vol, bind in hc.pop("binds", {}).items():
        flags += ["-v", f"{vol}:{bind['bind']}:{bind.get('mode', 'rw')}"]
    if (nano := hc.pop("nano_cpus", None)) is not None:
        flags += ["--cpus", f"{nano / 1e9:g}"]
    for key, flag in (("mem_limit", "--memory"), ("memswap_limit", "--memory-swap"),
                      ("pids_limit", "--pids-limit")):
        if (value := hc.pop(key, None)) is not None:
            flags += [flag, str(value)]
    for u in hc.pop("ulimits", None) or []:
        flags += ["--ulimit", f"{u['Name']}={u['Soft']}:{u['Hard']}"]
    log = hc.pop("log_config", None) or {}
    if log:
        flags += ["--log-driver", log["type"]]
        for k, v in (log.get("config") or {}).items():
            flags += ["--log-opt", f"{k}={v}"]
    for k, v in (cfg.get("environment") or {}).items():
        flags += ["-e", f"{k}={v}"]
    # Defaults of docker run already: not privileged, no extra capabilities, no init, no restart.
    for key, default in (("privileged", False), ("cap_add", None), ("init", False)):
        if hc.pop(key, default) != default:
            raise RuntimeError(f"bench: Den's container spec sets {key}; mirror it here")
    hc.pop("restart_policy", None)
    if hc:
        print(f"bench: raw containers do not mirror Den's {sorted(hc)}", file=sys.stderr)
    return flags


class Raw:
    """The same work done directly with the docker CLI (and SDK), on the same image."""

    def __init__(self, prefix: str, work: Path, repo: Path) -> None:
        self.prefix = prefix
        self.work = work
        self.repo = repo
        self.sdk = docker.from_env(timeout=120)

    def run_args(self, name: str, volume: str) -> list[str]:
        return ["docker", "run", "-d", "--name", name, *raw_run_flags(volume),
                "--label", f"denbench={self.prefix}", IMAGE, *self.command]

    @property
    def command(self) -> list[str]:
        from server.runtime import docker_specs

        return list(docker_specs.INIT_COMMAND)

    def create(self, name: str) -> dict[str, float]:
        """clone, volume, run, cp, first exec; returns each step's seconds and the total."""
        volume, dest = f"{name}-data", self.work / f"{name}-clone"
        steps = {
            # --no-local: copy objects like Den's clone does, instead of hard-linking them
            "clone": lambda: sh("git", "clone", "-q", "--no-local", str(self.repo), str(dest)),
            "volume create": lambda: sh("docker", "volume", "create", "--label",
                                        f"denbench={self.prefix}", volume),
            "run -d": lambda: sh(*self.run_args(name, volume)),
            "cp": lambda: sh("docker", "cp", str(dest), f"{name}:/workspace/{REPO}"),
            "first exec": lambda: sh("docker", "exec", name, "true"),
        }
        out = {k: timed(fn) for k, fn in steps.items()}
        out["total"] = sum(out.values())
        shutil.rmtree(dest, ignore_errors=True)
        return out

    def check_seeded(self, name: str) -> None:
        sh("docker", "exec", name, "test", "-f", f"/workspace/{REPO}/README.md")

    def remove(self, name: str) -> None:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True)
        subprocess.run(["docker", "volume", "rm", "-f", f"{name}-data"], capture_output=True)


def cleanup_engine(prefix: str) -> list[str]:
    """Remove every container, then every volume and network (with its firewall chains),
    whose name starts with ``prefix``."""
    removed: list[str] = []
    ps = subprocess.run(["docker", "ps", "-a", "--filter", f"name={prefix}",
                         "--format", "{{.Names}}"], capture_output=True, text=True)
    for n in ps.stdout.split():
        if n.startswith(prefix):
            subprocess.run(["docker", "rm", "-f", n], capture_output=True)
            removed.append(n)
    vols = subprocess.run(["docker", "volume", "ls", "-q", "--filter", f"name={prefix}"],
                          capture_output=True, text=True)
    for n in vols.stdout.split():
        if n.startswith(prefix):
            subprocess.run(["docker", "volume", "rm", "-f", n], capture_output=True)
            removed.append(n)
    # Den's network (`<prefix>-net`) and its firewall chains, once its containers are gone.
    from server.network.firewall import Iptables, chain_prefix

    nets = subprocess.run(["docker", "network", "ls", "--format", "{{.Name}}"],
                          capture_output=True, text=True)
    for n in nets.stdout.split():
        if n.startswith(prefix):
            Iptables(chain_prefix(n)).remove()
            subprocess.run(["docker", "network", "rm", n], capture_output=True)
            removed.append(n)
    return removed


# --- the measurements --------------------------------------------------------------------------


@dataclass
class Results:
    samples: dict[str, list[float]] = field(default_factory=dict)

    def add(self, key: str, value: float) -> None:
        self.samples.setdefault(key, []).append(value)

    def summary(self) -> dict[str, dict[str, float]]:
        return {k: {"median_s": median(v), "p90_s": p90(v), "n": len(v)}
                for k, v in sorted(self.samples.items())}


def _ts(event: dict[str, Any]) -> float:
    at = datetime.fromisoformat(event["at"])
    return (at if at.tzinfo else at.replace(tzinfo=UTC)).timestamp()


def bench_create(srv: Server, raw: Raw, repo: Path, rounds: int, res: Results, *,
                 poll_s: float) -> None:
    def den_round(i: int) -> None:
        t0, wall0 = time.perf_counter(), time.time()
        wid = srv.create(f"create-{i}", repo)
        t_post = time.perf_counter()
        polls = srv.wait_running(wid, poll_s=poll_s)
        t_run, wall_run = time.perf_counter(), time.time()
        out = srv.exec_true(wid)
        t1 = time.perf_counter()
        if i >= 0:
            res.add("den create total", t1 - t0)
            for p in polls:
                res.add("den create: each poll GET while creating", p)
            res.add("den create: POST (202)", t_post - t0)
            res.add("den create: 202 -> seen running", t_run - t_post)
            res.add("den create: first exec", t1 - t_run)
            res.add("den create: first exec, server engine time", out["duration_ms"] / 1000)
            # The server's own timeline from its events (same clock: same machine).
            ev = srv.events(wid)
            clone = next((e for e in ev if e["kind"] == "clone"), None)
            running = next((e for e in ev if e.get("to_state") == "running"), None)
            created = next((e for e in ev if e.get("to_state") == "creating"), None)
            if clone and running and created:
                res.add("den create: server, row -> cloned+packed", _ts(clone) - _ts(created))
                res.add("den create: server, cloned -> running (engine)",
                        _ts(running) - _ts(clone))
                res.add("den create: client saw running after", wall_run - _ts(running))
                res.add("den create: POST sent -> row", _ts(created) - wall0)
        srv.delete(wid)

    def raw_round(i: int) -> None:
        name = f"{raw.prefix}-raw-create{i}"
        try:
            steps = raw.create(name)
            raw.check_seeded(name)
        finally:
            raw.remove(name)
        if i >= 0:
            for k, v in steps.items():
                res.add("raw create total" if k == "total" else f"raw create: {k}", v)

    raw_round(-1)  # warm-up, not recorded (page cache, first runsc start)
    den_round(-1)
    for i in range(rounds):
        first, second = (raw_round, den_round) if i % 2 == 0 else (den_round, raw_round)
        first(i)
        second(i)
        print(f"  create round {i + 1}/{rounds}: raw {ms(res.samples['raw create total'][-1])}"
              f", den {ms(res.samples['den create total'][-1])}", flush=True)


def bench_exec(srv: Server, raw: Raw, raw_name: str, wid: str, samples: int,
               res: Results) -> None:
    ctr = raw.sdk.containers.get(raw_name)

    def cli() -> None:
        sh("docker", "exec", raw_name, "true")

    def sdk() -> None:
        code, _ = ctr.exec_run(["true"])
        if code != 0:
            raise RuntimeError(f"exec_run true exited {code}")

    den_server_ms: list[float] = []

    def den() -> None:
        den_server_ms.append(srv.exec_true(wid)["duration_ms"] / 1000)

    def get_ws() -> None:
        srv._ok(srv.http.get(f"/api/v1/workspaces/{wid}"), 200)

    def healthz() -> None:
        srv._ok(srv.http.get("/healthz"), 200)

    methods = {"raw exec (CLI)": cli, "raw exec (SDK exec_run)": sdk, "den exec (API)": den,
               "den GET workspace (auth+DB)": get_ws, "den GET /healthz": healthz}
    for fn in methods.values():  # warm-up
        for _ in range(3):
            fn()
    den_server_ms.clear()
    keys = list(methods)
    for j in range(samples):
        rot = keys[j % len(keys):] + keys[: j % len(keys)]
        for k in rot:
            res.add(k, timed(methods[k]))
    for v in den_server_ms:
        res.add("den exec: server engine time (duration_ms)", v)


def bench_lifecycle(srv: Server, raw: Raw, raw_name: str, wid: str, rounds: int,
                    res: Results) -> None:
    def raw_cycle() -> None:
        res.add("raw stop", timed(lambda: sh("docker", "stop", "-t", str(STOP_TIMEOUT_S),
                                              raw_name)))
        res.add("raw start", timed(lambda: sh("docker", "start", raw_name)))
        sh("docker", "exec", raw_name, "true")  # up and ready before the next stop

    def den_cycle() -> None:
        res.add("den stop", timed(lambda: srv.lifecycle(wid, "stop")))
        res.add("den start", timed(lambda: srv.lifecycle(wid, "start")))
        srv.exec_true(wid)

    for i in range(rounds):
        first, second = (raw_cycle, den_cycle) if i % 2 == 0 else (den_cycle, raw_cycle)
        first()
        second()


# --- where Den's time goes: the server's own pieces, timed in this process -----------------


def breakdown(prefix: str, work: Path, repo: Path, rounds: int) -> Results:
    """Time the steps ``WorkspaceService._build`` and ``DockerRuntime.exec`` take, one by one,
    with the server's own code and the same Docker SDK calls."""
    import docker.errors

    from server.git import clone as git_clone
    from server.runtime import docker_specs
    from server.runtime.base import ExecRequest, WorkspaceSpec
    from server.runtime.docker import DockerRuntime, _collect, _raw_socket
    from server.runtime.docker_specs import container_of, volume_of
    from server.runtime.output import Captured

    res = Results()
    rt = DockerRuntime(gvisor_runtime="runsc")
    api = docker.APIClient(timeout=120)
    source = git_clone.validate_repo_url(str(repo), allowed_schemes=[], local_roots=[repo.parent])

    def spec(i: int) -> WorkspaceSpec:
        name = f"{prefix}-bd{i}"
        return WorkspaceSpec(workspace_id=f"bd{i}",
                             handle={"container": name, "volume": f"{name}-data"},
                             image=IMAGE, runtime="gvisor",
                             cpus=CPUS, memory_mb=MEMORY_MB, pids_limit=PIDS, hostname="bd",
                             labels={"denbench": prefix})

    def create_steps(i: int) -> dict[str, float]:
        """One create, as ``_build`` does it: each step's seconds."""
        d = work / f"bd{i}"
        d.mkdir()
        s = spec(i)
        cfg = docker_specs.container_config(s, gvisor_runtime="runsc")
        hc = cfg.pop("host_config")
        tar = d / "seed.tar"

        def clone() -> None:
            git_clone.clone(source, branch=None, dest=d / "repo", timeout_s=60,
                            max_bytes=1 << 30)

        def plain_clone() -> None:
            sh("git", *git_clone._safe_config("file"), "clone", "--quiet",
               "--no-recurse-submodules", "--no-local", "--", str(repo), str(d / "plain"))

        def create_volume() -> None:
            with contextlib.suppress(docker.errors.NotFound):
                api.inspect_volume(volume_of(s))
            api.create_volume(**docker_specs.volume_config(s))

        def create_container() -> None:
            with contextlib.suppress(docker.errors.NotFound):
                api.inspect_container(container_of(s))
            api.create_container(**cfg, host_config=api.create_host_config(**hc))

        def put() -> None:
            with tar.open("rb") as fh:
                api.put_archive(container_of(s), docker_specs.WORKSPACE_MOUNT, fh)

        try:
            return {
                "server clone (git_clone.clone, 0.1 s poll loop)": timed(clone),
                "same git clone, plain subprocess": timed(plain_clone),
                "pack_for_workspace (tar)": timed(
                    lambda: git_clone.pack_for_workspace(d / "repo", arcname=REPO, out=tar)),
                "inspect_image (create validation)": timed(lambda: api.inspect_image(IMAGE)),
                "volume: inspect + create": timed(create_volume),
                "container: inspect + create": timed(create_container),
                "put_archive (seed tar)": timed(put),
                "start (inspect + start)": timed(lambda: loop.run_until_complete(rt.start(s))),
                "first exec (DockerRuntime.exec, timeout wrapper)": timed(
                    lambda: loop.run_until_complete(rt.exec(s, first))),
            }
        finally:
            shutil.rmtree(d, ignore_errors=True)

    first = ExecRequest(argv=["true"], cwd=f"/workspace/{REPO}", timeout_s=600)
    loop = asyncio.new_event_loop()
    try:
        for i in range(rounds + 1):  # round 0 warms up
            steps = create_steps(i)
            if i > 0:
                for k, v in steps.items():
                    res.add(f"create: {k}", v)
            if i < rounds:  # keep the last one running for the exec pieces
                loop.run_until_complete(rt.destroy(spec(i)))

        # Exec pieces, on the last (running) container.
        s = spec(rounds)
        base_req = ExecRequest(argv=["true"], cwd=f"/workspace/{REPO}", timeout_s=600)
        env = docker_specs.exec_env("dev", {}, {})
        sdk = docker.from_env(timeout=120)
        ctr = sdk.containers.get(container_of(s))
        polls: list[int] = []

        def by_hand() -> None:
            # DockerRuntime.exec, step by step: create, start + read to EOF, inspect until done
            t0 = time.perf_counter()
            ex = api.exec_create(container_of(s), list(base_req.argv),
                                 stdout=True, stderr=True, stdin=False, tty=False, user="dev",
                                 workdir=base_req.cwd, environment=env)
            t1 = time.perf_counter()
            sock = api.exec_start(ex["Id"], socket=True)
            _collect(_raw_socket(sock), Captured(1 << 20), Captured(1 << 20), None)
            sock.close()
            t2 = time.perf_counter()
            n = 0
            while True:
                info = api.exec_inspect(ex["Id"])
                n += 1
                if not info.get("Running") and info.get("ExitCode") is not None:
                    break
                time.sleep(0.02)
            t3 = time.perf_counter()
            polls.append(n)
            res.add("exec by hand: exec_create", t1 - t0)
            res.add("exec by hand: exec_start + read to EOF", t2 - t1)
            res.add("exec by hand: exec_inspect until exited", t3 - t2)

        variants: dict[str, Callable[[], Any]] = {
            "exec: DockerRuntime.exec, timeout 600 (Den's default)": lambda: loop
            .run_until_complete(rt.exec(s, base_req)),
            "exec: DockerRuntime.exec, no deadline": lambda: loop.run_until_complete(
                rt.exec(s, ExecRequest(argv=["true"], cwd=base_req.cwd, timeout_s=None))),
            "exec: SDK exec_run(true)": lambda: ctr.exec_run(["true"]),
            "exec: SDK exec_run(true) as dev, cwd, env": lambda: ctr.exec_run(
                ["true"], user="dev", workdir=base_req.cwd, environment=env),
            "exec: SDK exec_run(timeout -k 2 600 true) as dev": lambda: ctr.exec_run(
                docker_specs.exec_argv(base_req), user="dev", workdir=base_req.cwd,
                environment=env),
            # What other wrappers would cost: each extra program run in the sandbox costs.
            "exec: SDK exec_run(env X=1 true) as dev": lambda: ctr.exec_run(
                ["env", "X=1", "true"], user="dev", workdir=base_req.cwd, environment=env),
            "exec: SDK exec_run(sh -c 'echo $$ >pidfile; exec true') as dev": lambda: ctr
            .exec_run(docker_specs.stream_argv(["true"], "/tmp/.bench-pid"), user="dev",
                      workdir=base_req.cwd, environment=env),
            "exec: by hand (sum of the three below)": by_hand,
        }
        for fn in variants.values():
            fn()
        polls.clear()
        for k in [k for k in res.samples if k.startswith("exec by hand:")]:
            del res.samples[k]
        for _j in range(max(20, rounds * 4)):
            for k, fn in variants.items():
                res.add(k, timed(fn))
        res.samples["exec by hand: exec_inspect calls (count)"] = [float(n) for n in polls]
        sdk.close()
        loop.run_until_complete(rt.destroy(s))
    finally:
        loop.close()
        rt.close()
        api.close()
    return res


def db_breakdown(srv: Server, work: Path, prefix: str, wid: str, samples: int,
                 res: Results) -> None:
    """Time the database work the exec route does before and after the engine call, on the
    running server's own SQLite database (WAL, so reading it alongside the server is fine)."""
    from server.auth.tokens import authenticate
    from server.config import Settings
    from server.db.session import make_engine, make_session_factory
    from server.runtime.fake import FakeRuntime
    from server.workspaces.service import WorkspaceService

    settings = Settings(data_dir=work / "data", engine_prefix=prefix)
    engine = make_engine(settings.resolved_database_url())
    sessions = make_session_factory(engine)
    svc = WorkspaceService(settings=settings, sessions=sessions, runtime=FakeRuntime(),
                           instance_id="bench")
    user = authenticate(sessions, srv.token)
    assert user is not None
    row = svc.get(wid)

    def pure() -> None:
        svc.exec_request(row, ["true"])
        svc.spec_for(row)

    loop = asyncio.new_event_loop()
    steps: dict[str, Callable[[], Any]] = {
        "authenticate (bearer token -> user)": lambda: authenticate(sessions, srv.token),
        "get_for (workspace row)": lambda: svc.get_for(user, wid),
        "ensure_running (row read)": lambda: loop.run_until_complete(
            svc.ensure_running(wid, actor="bench")),
        "exec_request + spec_for (no I/O)": pure,
        "touch (write txn; the route does 2)": lambda: svc.touch(wid),
    }
    try:
        for _ in range(3):
            for fn in steps.values():
                fn()
        for _ in range(samples):
            for k, fn in steps.items():
                res.add(f"exec route, DB: {k}", timed(fn))
    finally:
        loop.close()
        engine.dispose()


# --- report ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    operation: str
    raw_key: str
    den_key: str
    goal: float | None


ROWS = [
    Row("create -> first exec (vs raw CLI)", "raw create total", "den create total", 1.3),
    Row("exec `true` (vs raw CLI)", "raw exec (CLI)", "den exec (API)", 1.2),
    Row("exec `true` (vs SDK exec_run)", "raw exec (SDK exec_run)", "den exec (API)", None),
    Row("stop (docker stop -t 2)", "raw stop", "den stop", 1.2),
    Row("start (docker start)", "raw start", "den start", 1.2),
]


def table(res: Results) -> tuple[str, list[dict[str, Any]]]:
    header = ["operation", "raw median (p90)", "Den median (p90)", "ratio", "goal", "met?"]
    lines, rows = [], []
    for row in ROWS:
        r, d = res.samples.get(row.raw_key, []), res.samples.get(row.den_key, [])
        if not r or not d:
            continue
        ratio = median(d) / median(r)
        met = None if row.goal is None else ratio <= row.goal
        rows.append({"operation": row.operation, "raw_median_s": median(r), "raw_p90_s": p90(r),
                     "den_median_s": median(d), "den_p90_s": p90(d), "ratio": ratio,
                     "goal": row.goal, "met": met, "n": min(len(r), len(d))})
        lines.append([row.operation, f"{ms(median(r))} ({ms(p90(r))})",
                      f"{ms(median(d))} ({ms(p90(d))})", f"{ratio:.2f}x",
                      "-" if row.goal is None else f"<= {row.goal}x",
                      "-" if met is None else ("yes" if met else "NO")])
    widths = [max(len(x) for x in col) for col in zip(header, *lines, strict=False)]
    fmt = "| " + " | ".join(f"{{:<{w}}}" for w in widths) + " |"
    out = [fmt.format(*header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [fmt.format(*line) for line in lines]
    return "\n".join(out), rows


def details(res: Results, title: str) -> str:
    out = [title]
    width = max((len(k) for k in res.samples), default=0)
    for k, v in sorted(res.samples.items()):
        if k.endswith("(count)"):
            out.append(f"  {k:<{width}}  median {median(v):.1f}  max {max(v):.0f}  n={len(v)}")
        else:
            out.append(f"  {k:<{width}}  median {ms(median(v)):>8}  p90 {ms(p90(v)):>8}  "
                       f"n={len(v)}")
    return "\n".join(out)


# --- main ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    def handler(_sig: int, _frame: object) -> None:
        raise KeyboardInterrupt

    # SIGINT too: a shell starts background jobs with SIGINT ignored, and Python then keeps
    # it ignored; a benchmark should always stop (and clean up) on Ctrl-C or kill -INT.
    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


def report_failure(exc: BaseException, srv: DenServer | None) -> int:
    """Say why a run stopped (with the server's log when it failed); its exit code."""
    if isinstance(exc, KeyboardInterrupt):
        print("\nbench: interrupted; cleaning up", file=sys.stderr)
        return 130
    print(f"bench: failed: {exc!r}", file=sys.stderr)
    if srv is not None:
        print(f"--- server log (tail) ---\n{srv.log_tail()}", file=sys.stderr)
    return 1


def ignore_interrupts() -> None:
    with contextlib.suppress(BaseException):
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def restore_interrupts() -> None:
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


@dataclass(frozen=True)
class Run:
    """One benchmark run: its engine prefix, work directory (with ``repos/``), start time and
    the load average then."""

    prefix: str
    work: Path
    repos_root: Path
    started: datetime
    load_before: float


def start_run(name: str = "") -> Run | None:
    """A new run named ``denbench[-name]-<random>``; None, after saying why, when the
    workspace image is missing."""
    if subprocess.run(["docker", "image", "inspect", IMAGE], capture_output=True).returncode:
        print(f"bench: image {IMAGE} is missing (run `make images`)", file=sys.stderr)
        return None
    prefix = f"denbench-{name + '-' if name else ''}{secrets.token_hex(3)}"
    work = Path(tempfile.mkdtemp(prefix=f"{prefix}-"))
    (work / "repos").mkdir()
    return Run(prefix, work, work / "repos", datetime.now(UTC), round(os.getloadavg()[0], 2))


def finish_run(prefix: str, work: Path, srv: DenServer | None,
               *first: Callable[[], object]) -> None:
    """Clean up after a run, also after a failure, Ctrl-C or SIGTERM (ignored meanwhile, so
    that cleanup finishes): ``first`` (each may fail), then stop the server, remove every
    engine object named ``prefix*`` and the work directory."""
    ignore_interrupts()
    try:
        for step in first:
            with contextlib.suppress(Exception):
                step()
        if srv is not None:
            srv.close()
        left = cleanup_engine(prefix)
        shutil.rmtree(work, ignore_errors=True)
    finally:
        restore_interrupts()
    if left:
        print(f"bench: removed {len(left)} engine objects named {prefix}*", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.benchmarks.bench_workspaces",
                                 description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--rounds", type=int, default=5, help="rounds of create/stop/start (5)")
    ap.add_argument("--exec-samples", type=int, default=40,
                    help="samples of each exec variant (40; at least 20)")
    ap.add_argument("--poll-ms", type=float, default=POLL_S * 1000,
                    help="client poll interval while a workspace is creating (10)")
    ap.add_argument("--json", type=Path, help="also write the results to this JSON file")
    ap.add_argument("--no-breakdown", action="store_true",
                    help="skip timing the server's own steps in-process")
    args = ap.parse_args(argv)
    rounds, exec_samples = max(1, args.rounds), max(20, args.exec_samples)

    run = start_run()
    if run is None:
        return 2
    prefix, work, repos_root, started = run.prefix, run.work, run.repos_root, run.started
    load_before = run.load_before
    res, bd = Results(), Results()
    srv: Server | None = None
    failed: int = 0
    print(f"bench: prefix {prefix}, {rounds} rounds, {exec_samples} exec samples", flush=True)
    try:
        with sigterm_as_interrupt():
            repo = make_repo(repos_root, work)
            raw = Raw(prefix, work, repo)
            srv = Server(work, repos_root, prefix)
            srv.start()

            print("bench: create -> first exec", flush=True)
            bench_create(srv, raw, repo, rounds, res, poll_s=args.poll_ms / 1000)

            raw_name = f"{prefix}-raw-exec"
            raw.create(raw_name)
            wid = srv.create("exec", repo)
            srv.wait_running(wid)
            print("bench: exec round trips", flush=True)
            bench_exec(srv, raw, raw_name, wid, exec_samples, res)
            print("bench: stop and start", flush=True)
            bench_lifecycle(srv, raw, raw_name, wid, rounds, res)
            if not args.no_breakdown:
                db_breakdown(srv, work, prefix, wid, exec_samples, bd)
            srv.delete(wid)
            raw.remove(raw_name)

            if not args.no_breakdown:
                print("bench: breakdown of the server's steps (in-process)", flush=True)
                bd.samples.update(breakdown(prefix, work, repo, rounds).samples)
    except BaseException as exc:
        failed = report_failure(exc, srv)
    finally:
        finish_run(prefix, work, srv)
    if failed:
        return failed

    text, rows = table(res)
    info = machine()
    info["loadavg_1m_before"] = load_before
    print()
    print(f"Den vs raw engine, {started:%Y-%m-%d %H:%M} UTC, {info['cpus']} CPUs, {info['os']}, "
          f"Docker {info['docker']}, {info['runsc']}, load {load_before} -> "
          f"{info['loadavg_1m']}, client poll {args.poll_ms:g} ms, code {info['git']}")
    print(f"runtimes: {info['runtimes']}")
    print(text)
    print()
    print(details(res, "Details (medians and p90 per sample):"))
    if bd.samples:
        print()
        print(details(bd, "Where Den's time goes (server code, timed in-process):"))
    if args.json:
        args.json.write_text(json.dumps({
            "started_at": started.isoformat(), "machine": info, "rounds": rounds,
            "exec_samples": exec_samples, "table": rows, "details": res.summary(),
            "breakdown": bd.summary(), "samples": res.samples,
            "breakdown_samples": bd.samples,
        }, indent=2))
        print(f"\nbench: wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
