"""Shared fixtures: settings in a temp dir, apps on the fake and the real engine, users with
tokens, local bare repositories, and a real PostgreSQL server.

Engine tests are marked ``engine``. When the Docker engine with runsc is missing they are
skipped on a developer machine but **fail** under ``CI=true``: a green run that skipped the
real runtime proves nothing. Every engine object a test run creates is named with this
run's prefix and removed at the end, even after failures.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from server.app import create_app
from server.auth.tokens import ensure_user, issue_token
from server.config import Settings
from server.db.migrate import ensure_schema
from server.db.session import make_engine, make_session_factory
from server.runtime.fake import FakeRuntime
from server.workspaces.service import CreateRequest, WorkspaceService

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
RUN_PREFIX = f"dentest-{secrets.token_hex(3)}"


# --- engine availability ------------------------------------------------------------------


def _engine_problem() -> str | None:
    if shutil.which("docker") is None:
        return "the docker CLI is not installed"
    try:
        out = subprocess.run(
            ["docker", "info", "--format", "{{json .Runtimes}}"],
            capture_output=True, text=True, timeout=20,
        )
    except subprocess.TimeoutExpired:
        return "docker info timed out"
    if out.returncode != 0:
        return f"the Docker engine is not running: {out.stderr.strip()[:200]}"
    if '"runsc"' not in out.stdout:
        return "the Docker engine has no runsc runtime (run scripts/setup-host.sh)"
    img = subprocess.run(["docker", "image", "inspect", "den/workspace:latest"],
                         capture_output=True, timeout=20)
    if img.returncode != 0:
        return "the image den/workspace:latest is not built (run workspace_images/build.sh)"
    return None


@pytest.fixture(scope="session")
def engine() -> Iterator[None]:
    """The real Docker engine with runsc; skip locally, fail in CI when it is missing."""
    problem = _engine_problem()
    if problem is not None:
        if IN_CI:
            pytest.fail(f"engine tests need the real engine under CI: {problem}")
        pytest.skip(problem)
    yield
    leftovers = engine_objects(RUN_PREFIX)
    for kind, name in leftovers:
        if kind == "container":  # a frozen sandbox cannot be force-removed
            thaw_container(name)
        cmd = ["docker", "rm", "-f", name] if kind == "container" else [
            "docker", "volume", "rm", "-f", name]
        subprocess.run(cmd, capture_output=True, timeout=60)
    images = subprocess.run(["docker", "images", "--format", "{{.Repository}}:{{.Tag}}"],
                            capture_output=True, text=True, timeout=60).stdout.split()
    for image in images:  # snapshot images
        if image.startswith(RUN_PREFIX):
            subprocess.run(["docker", "rmi", "-f", image], capture_output=True, timeout=60)
    # Untagged while a fork still used them: dangling now, and labelled as Den's.
    subprocess.run(["docker", "image", "prune", "-f", "--filter", "label=den.managed=true"],
                   capture_output=True, timeout=120)
    remove_networks(RUN_PREFIX)
    unmount_disks(RUN_PREFIX)


def unmount_disks(prefix: str) -> None:
    """Disk images of this run's volumes still mounted (their volumes are gone by now):
    detach them, so that nothing is left mounted under the tests' temporary directories."""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        mnt = Path(line.split()[4])
        if mnt.parent.name == "disks" and mnt.name.startswith(prefix):
            subprocess.run(["umount", "--lazy", str(mnt)], capture_output=True, timeout=60)


def remove_networks(prefix: str) -> None:
    """Den's networks named with ``prefix`` that no container uses (running or not), and
    their firewall chains. Each test server makes one: the engine's address pools hold
    about thirty networks, so they go after each test, not at the end of the run."""
    from server.network.firewall import Iptables, chain_prefix

    names = subprocess.run(
        ["docker", "network", "ls", "--filter", "label=den.managed=true", "--format",
         "{{.Name}}"], capture_output=True, text=True, timeout=30).stdout.split()
    for name in names:
        if not name.startswith(prefix):
            continue
        used = subprocess.run(["docker", "ps", "-aq", "--filter", f"network={name}"],
                              capture_output=True, text=True, timeout=30)
        if used.returncode != 0 or used.stdout.strip():
            continue
        Iptables(chain_prefix(name)).remove()
        subprocess.run(["docker", "network", "rm", name], capture_output=True, timeout=60)


def microvm_subnet() -> str:
    """A /24 of DEN_MICROVM_SUBNET's default range that no route of the host uses yet, for
    one test server's microVM bridge (several test servers, of this run and of others, may
    run at once, each with a bridge of its own)."""
    import random

    routes = subprocess.run(["ip", "-4", "route", "show", "table", "all"], capture_output=True,
                            text=True, timeout=30).stdout
    free = [n for n in range(1, 255) if f"10.88.{n}." not in routes]
    return f"10.88.{random.choice(free)}.0/24"


def remove_microvm_network(settings: Any) -> None:
    """A test server's microVM bridge and its firewall chains (after its VMs are gone)."""
    from server.network.firewall import Iptables, chain_prefix
    from server.runtime.microvm.net import VmNetwork, remove_bridge

    name = settings.resolved_network_name()
    Iptables(chain_prefix(name)).remove()
    remove_bridge(VmNetwork.named(name, settings.microvm_subnet))


@pytest.fixture(autouse=True)
def _networks_go_after_engine_tests(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "engine" in request.keywords:
        remove_networks(RUN_PREFIX)


def container_state(name: str) -> str:
    """"frozen" (its cgroup frozen: how Den freezes a sandbox, server/runtime/
    cgroup_freezer.py; or paused by the engine), "running", "exited", ... as the engine and
    the kernel say."""
    from server.runtime.cgroup_freezer import is_frozen

    out = subprocess.run(["docker", "inspect", "-f", "{{.State.Status}} {{.State.Pid}}", name],
                         capture_output=True, text=True, timeout=60, check=True).stdout.split()
    status, pid = out[0], int(out[1])
    return "frozen" if status == "paused" or (status == "running" and is_frozen(pid)) \
        else status


def thaw_container(name: str) -> None:
    """Thaw a workspace container Den froze (its cgroup, then ``docker unpause``)."""
    from server.runtime.cgroup_freezer import set_frozen

    pid = subprocess.run(["docker", "inspect", "-f", "{{.State.Pid}}", name],
                         capture_output=True, text=True, timeout=60).stdout.strip()
    if pid.isdigit():
        set_frozen(int(pid), False)
    subprocess.run(["docker", "unpause", name], capture_output=True, timeout=60)


def engine_objects(prefix: str) -> list[tuple[str, str]]:
    """(kind, name) of every container and volume whose name starts with ``prefix``."""
    found: list[tuple[str, str]] = []
    ps = subprocess.run(["docker", "ps", "-a", "--format", "{{.Names}}"],
                        capture_output=True, text=True, timeout=30)
    found += [("container", n) for n in ps.stdout.split() if n.startswith(prefix)]
    vols = subprocess.run(["docker", "volume", "ls", "--format", "{{.Name}}"],
                          capture_output=True, text=True, timeout=30)
    found += [("volume", n) for n in vols.stdout.split() if n.startswith(prefix)]
    return found


def remove_engine_objects(prefix: str) -> None:
    """Every container, volume, image and network whose name starts with ``prefix`` (what a
    benchmark made), removed."""
    for kind, name in engine_objects(prefix):
        if kind == "container":  # a frozen sandbox (a warm pool's) cannot be force-removed
            thaw_container(name)
        subprocess.run(["docker", "rm", "-f", name] if kind == "container"
                       else ["docker", "volume", "rm", "-f", name], capture_output=True)
    images = subprocess.run(["docker", "images", "--format", "{{.Repository}}:{{.Tag}}"],
                            capture_output=True, text=True).stdout.split()
    for image in images:
        if image.startswith(prefix):
            subprocess.run(["docker", "rmi", "-f", image], capture_output=True)
    remove_networks(prefix)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that restart the shared engine run after every other test."""
    items.sort(key=lambda item: "engine_restart" in item.keywords)  # stable: order kept


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any) -> Iterator[None]:
    outcome: Any = yield
    rep = outcome.get_result()
    if rep.when == "call" and rep.failed and "engine" in item.keywords:
        ps = subprocess.run(
            ["docker", "ps", "-a", "--filter", f"name={RUN_PREFIX}",
             "--format", "{{.Names}} {{.Status}} {{.Labels}}"],
            capture_output=True, text=True, timeout=30,
        )
        rep.sections.append(("engine state (docker ps -a)", ps.stdout + ps.stderr))


# --- settings, apps, users ---------------------------------------------------------------


@pytest.fixture
def repos_root(tmp_path: Path) -> Path:
    root = tmp_path / "repos"
    root.mkdir()
    return root


@pytest.fixture
def make_settings(tmp_path: Path, repos_root: Path) -> Callable[..., Settings]:
    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "data_dir": tmp_path / "data",
            "local_repo_roots": [repos_root],
            "engine_prefix": f"{RUN_PREFIX}-{secrets.token_hex(2)}",
            "default_memory_mb": 512,
            "default_cpus": 1.0,
            "stop_timeout_s": 2,
            "reaper_interval_s": 0,  # tests that want the idle reaper turn it on
            "ssh_port": 0,  # tests that want the SSH gateway give it a free port
            # The stand-in forges and git servers listen on loopback, which Den refuses by
            # default (tests of that refusal pass outbound_allow=[]).
            "outbound_allow": ["127.0.0.0/8", "::1"],
            # No GPU unless a test describes some (a GPU host runs the same tests).
            "gpus": "none",
        }
        values.update(overrides)
        return Settings(**values)

    return make


@dataclass
class ApiClient:
    """A TestClient plus the tokens of two ordinary users and an admin."""

    client: TestClient
    tokens: dict[str, str]

    def h(self, user: str = "alice") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[user]}"}

    def get(self, url: str, user: str = "alice", **kw: Any) -> Any:
        return self.client.get(url, headers=self.h(user), **kw)

    def post(self, url: str, user: str = "alice", **kw: Any) -> Any:
        return self.client.post(url, headers=self.h(user), **kw)

    def put(self, url: str, user: str = "alice", **kw: Any) -> Any:
        return self.client.put(url, headers=self.h(user), **kw)

    def delete(self, url: str, user: str = "alice", **kw: Any) -> Any:
        return self.client.delete(url, headers=self.h(user), **kw)

    @property
    def app(self) -> Any:
        return self.client.app

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` run on the app's event loop (a coroutine function is awaited)."""
        assert self.client.portal is not None, "the TestClient is not started"
        return self.client.portal.call(fn, *args)

    def create(self, repo: Path | str, *, name: str = "api", user: str = "alice",
               wait: bool = True, **extra: Any) -> dict[str, Any]:
        body = {"name": name, "repo": {"url": str(repo)}, **extra}
        r = self.post("/api/v1/workspaces", user=user, json=body)
        assert r.status_code == 202, r.text
        ws: dict[str, Any] = r.json()
        return self.wait_state(ws["id"], user=user) if wait else ws

    def wait_state(self, ws_id: str, *, user: str = "alice", timeout_s: float = 120,
                   settled: tuple[str, ...] = ("running", "error", "stopped")) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            ws: dict[str, Any] = self.get(f"/api/v1/workspaces/{ws_id}", user=user).json()
            if ws.get("state") in settled or time.monotonic() > deadline:
                return ws
            time.sleep(0.05)

    def exec(self, ws_id: str, cmd: Any, user: str = "alice", **kw: Any) -> dict[str, Any]:
        r = self.post(f"/api/v1/workspaces/{ws_id}/exec", user=user, json={"cmd": cmd, **kw})
        assert r.status_code == 200, r.text
        out: dict[str, Any] = r.json()
        return out


    def add_key(self, key: Any, *, user: str = "alice", name: str | None = None,
                public: str | None = None) -> Any:
        """Register ``key`` (an asyncssh private key, or a private key file) for ``user``,
        proving possession as ``den ssh-key add`` does; the response."""
        return add_ssh_key(lambda m, u, **kw: self.client.request(m, u, headers=self.h(user),
                                                                   **kw),
                           key, name=name, public=public)


def add_ssh_key(request: Callable[..., Any], key: Any, *, name: str | None = None,
                public: str | None = None) -> Any:
    """Register an SSH key through ``request(method, url, json=...)`` with a signed challenge;
    ``key`` is an asyncssh private key or the path of a private key file."""
    import asyncssh

    from server.ssh.proof import sign

    private = key if isinstance(key, asyncssh.SSHKey) else asyncssh.read_private_key(str(key))
    r = request("POST", "/api/v1/users/me/ssh-keys/challenge")
    assert r.status_code == 200, r.text
    challenge = r.json()["challenge"]
    body: dict[str, Any] = {
        "public_key": public or private.export_public_key().decode(),
        "challenge": challenge, "signature": sign(private, challenge.encode())}
    if name is not None:
        body["name"] = name
    return request("POST", "/api/v1/users/me/ssh-keys", json=body)


def users(app: Any) -> dict[str, str]:
    """Tokens of alice and bob (ordinary users) and root (an admin)."""
    tokens: dict[str, str] = {}
    with app.state.sessions.begin() as s:
        for name, admin in (("alice", False), ("bob", False), ("root", True)):
            user = ensure_user(s, name, admin=admin)
            tokens[name] = issue_token(s, user)[1]
    return tokens


@pytest.fixture
def fake_runtime() -> FakeRuntime:
    return FakeRuntime()


@pytest.fixture
def make_service(make_settings: Callable[..., Settings], fake_runtime: FakeRuntime
                 ) -> Iterator[Callable[..., WorkspaceService]]:
    """``make(**settings)``: a WorkspaceService on the fake runtime and a fresh SQLite database;
    ``service_kw`` (``instance_id``, ``network``, ``runtime``) go to the service."""
    engines = []

    def make(*, service_kw: dict[str, Any] | None = None, **overrides: Any
             ) -> WorkspaceService:
        settings = make_settings(**overrides)
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        url = settings.resolved_database_url()
        engine = make_engine(url)
        engines.append(engine)
        ensure_schema(engine, url, auto_migrate=True)
        kw: dict[str, Any] = {"instance_id": "inst-test", "runtime": fake_runtime,
                              **(service_kw or {})}
        return WorkspaceService(settings=settings, sessions=make_session_factory(engine), **kw)

    yield make
    for engine in engines:
        engine.dispose()


class FakeClock:
    """A monotonic clock the test moves by hand (``clock.now += seconds``)."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def sessions(tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    """A session factory on a migrated SQLite database of the test's own."""
    url = f"sqlite:///{tmp_path / 'den.db'}"
    engine = make_engine(url)
    ensure_schema(engine, url, auto_migrate=True)
    yield make_session_factory(engine)
    engine.dispose()


async def running_workspace(svc: WorkspaceService, repo: Path, *, owner: str = "alice",
                            name: str = "api") -> str:
    """The id of a workspace created by ``svc`` (the fake runtime) and running."""
    with svc.sessions.begin() as s:
        user = ensure_user(s, owner)
    ws = await svc.create(user, CreateRequest(name=name, repo_url=str(repo)))
    await asyncio.wait({svc._tasks[ws.id]}, timeout=60)
    assert svc.get(ws.id).state == "running"
    return ws.id


@pytest.fixture
def fake_api(make_settings: Callable[..., Settings], fake_runtime: FakeRuntime
             ) -> Iterator[ApiClient]:
    app = create_app(make_settings(), runtime=fake_runtime)
    with TestClient(app) as client:
        yield ApiClient(client, users(app))


@pytest.fixture
def real_api(engine: None, make_settings: Callable[..., Settings]) -> Iterator[ApiClient]:
    settings = make_settings()
    app = create_app(settings)
    with TestClient(app) as client:
        api = ApiClient(client, users(app))
        yield api
        for ws in app.state.workspaces.list_for(_admin(app)):
            # Whatever this misses, the engine fixture removes by name at the end.
            with contextlib.suppress(Exception):
                client.delete(f"/api/v1/workspaces/{ws.id}", headers=api.h("root"),
                              params={"snapshots": "true"})


def _admin(app: Any) -> Any:
    with app.state.sessions() as s:
        from sqlalchemy import select

        from server.db.models import User

        return s.scalar(select(User).where(User.is_admin.is_(True)))


# --- repositories ---------------------------------------------------------------------------


def git(*args: str, cwd: Path | None = None) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "Test", "GIT_AUTHOR_EMAIL": "t@example.com",
           "GIT_COMMITTER_NAME": "Test", "GIT_COMMITTER_EMAIL": "t@example.com"}
    out = subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True,
                         check=True)
    return out.stdout


@pytest.fixture
def make_repo(repos_root: Path, tmp_path: Path) -> Callable[..., Path]:
    """Make a bare repo ``<name>.git`` under the allowed root with the given files."""

    def make(name: str = "api", files: dict[str, str] | None = None,
             branch: str = "main") -> Path:
        return bare_repo(repos_root, tmp_path / f"src-{name}-{secrets.token_hex(2)}",
                         name=name, files=files, branch=branch)

    return make


def bare_repo(repos: Path, src: Path, *, name: str = "api",
              files: dict[str, str] | None = None, branch: str = "main") -> Path:
    """A bare repo ``repos/<name>.git`` of one commit with ``files``, made from ``src``."""
    src.mkdir(parents=True)
    git("init", "-q", "-b", branch, cwd=src)
    for rel, content in (files or {"README.md": f"# {name}\n"}).items():
        p = src / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(content)
    git("add", "-A", cwd=src)
    git("commit", "-q", "-m", "initial", cwd=src)
    bare = repos / f"{name}.git"
    git("clone", "-q", "--bare", str(src), str(bare))
    return bare


# --- PostgreSQL ------------------------------------------------------------------------------


def _pg_bin() -> Path | None:
    for version in ("17", "16", "15"):
        p = Path(f"/usr/lib/postgresql/{version}/bin")
        if (p / "initdb").exists():
            return p
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A real PostgreSQL server started for this test session (as the postgres user)."""
    bindir = _pg_bin()
    if bindir is None:
        if IN_CI:
            pytest.fail("PostgreSQL server binaries are missing (apt-get install postgresql)")
        pytest.skip("PostgreSQL server binaries are missing")
    # Not under pytest's tmp dirs: those are private to root, and postgres refuses to run
    # as root, so the server runs as the postgres user in a directory it can reach.
    base = Path(tempfile.mkdtemp(prefix="den-pg-"))
    os.chmod(base, 0o777)
    datadir, sockdir = base / "data", base / "sock"
    sockdir.mkdir()
    os.chmod(sockdir, 0o777)
    as_pg = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    subprocess.run([*as_pg, str(bindir / "initdb"), "-D", str(datadir), "-U", "den",
                    "--auth=trust", "-E", "UTF8"], check=True, capture_output=True)
    port = free_port()
    subprocess.run(
        [*as_pg, str(bindir / "pg_ctl"), "-D", str(datadir), "-l", str(base / "log"), "-w",
         "-o", f"-p {port} -k {sockdir} -c listen_addresses=127.0.0.1 -c fsync=off",
         "start"], check=True, capture_output=True,
    )
    try:
        subprocess.run([*as_pg, str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port),
                        "-U", "den", "den"], check=True, capture_output=True)
        yield f"postgresql+psycopg://den@127.0.0.1:{port}/den"
    finally:
        subprocess.run([*as_pg, str(bindir / "pg_ctl"), "-D", str(datadir), "-m", "immediate",
                        "stop"], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)
