"""The SSH gateway on the fake runtime, driven by asyncssh's client: keys through the API,
authentication and refusals, the failure limit, commands, activity, events, forwarding
refusals and the persistent host key. (The real engine and OpenSSH: tests/engine/test_ssh.py.)"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import asyncssh
import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.config import Settings
from server.runtime.fake import FakeRuntime
from tests.conftest import ApiClient, free_port, users


@dataclass
class Env:
    api: ApiClient
    port: int
    keys: dict[str, asyncssh.SSHKey]


def _start(make_settings: Callable[..., Settings], **overrides: Any) -> tuple[Any, int]:
    port = free_port()
    return create_app(make_settings(ssh_port=port, **overrides), runtime=FakeRuntime()), port


@pytest.fixture
def env(make_settings: Callable[..., Settings], make_repo: Callable[..., Any]) -> Iterator[Env]:
    app, port = _start(make_settings, ssh_max_auth_failures=3)
    keys = {name: asyncssh.generate_private_key("ssh-ed25519", comment=name)
            for name in ("alice", "bob", "stranger")}
    with TestClient(app) as client:
        api = ApiClient(client, users(app))
        for name in ("alice", "bob"):
            r = api.add_key(keys[name], user=name)
            assert r.status_code == 201, r.text
        assert api.create(make_repo(), user="alice")["state"] == "running"
        assert api.create(make_repo("other"), name="other", user="bob")["state"] == "running"
        yield Env(api, port, keys)


async def _connect(env: Env, user: str, key: str, **kw: Any) -> asyncssh.SSHClientConnection:
    return await asyncssh.connect("127.0.0.1", env.port, username=user,
                                  client_keys=[env.keys[key]], known_hosts=None,
                                  agent_path=None, **kw)


def _run(aw: Any) -> Any:
    async def wrap() -> Any:
        return await aw

    return asyncio.run(wrap())


def test_key_api_add_list_delete(fake_api: ApiClient) -> None:
    key = asyncssh.generate_private_key("ssh-ed25519", comment="laptop")
    line = key.export_public_key().decode()
    r = fake_api.add_key(key)
    assert r.status_code == 201, r.text
    out = r.json()
    assert out["name"] == "laptop" and out["type"] == "ssh-ed25519" and out["verified"]
    assert out["fingerprint"] == key.get_fingerprint("sha256")
    assert out["public_key"] == " ".join(line.split()[:2])

    again = fake_api.add_key(key)
    assert (again.status_code, again.json()["error"]["code"]) == (409, "key_exists")
    theirs = fake_api.add_key(key, user="bob", name="x")  # bob holds the same private key
    assert theirs.status_code == 409 and "another user" in theirs.json()["error"]["message"]
    bad = fake_api.post("/api/v1/users/me/ssh-keys", json={
        "public_key": "ssh-dss AAAA", "challenge": "x", "signature": "y"})
    assert bad.status_code == 422

    assert [k["id"] for k in fake_api.get("/api/v1/users/me/ssh-keys").json()["ssh_keys"]] \
        == [out["id"]]
    assert fake_api.get("/api/v1/users/me/ssh-keys", user="bob").json()["ssh_keys"] == []
    assert fake_api.delete(f"/api/v1/users/me/ssh-keys/{out['id']}", user="bob").status_code \
        == 404
    assert fake_api.delete(f"/api/v1/users/me/ssh-keys/{out['id']}").status_code == 204
    assert fake_api.get("/api/v1/users/me/ssh-keys").json()["ssh_keys"] == []
    assert fake_api.get("/api/v1/workspaces").json()["workspaces"] == []  # gateway off: ok


def test_command_exit_status_activity_and_events(env: Env) -> None:
    svc = env.api.app.state.workspaces
    ws_id = env.api.get("/api/v1/workspaces/api").json()["id"]
    assert env.api.get("/api/v1/workspaces/api").json()["ssh"]["port"] == env.port

    async def go() -> tuple[Any, Any, bool]:
        async with await _connect(env, "api", "alice") as conn:
            hello = await conn.run("echo hello", check=False)
            failing = await conn.run("exit 3", check=False)
            # an open channel holds the workspace busy
            proc = await conn.create_process("cat")
            deadline = time.monotonic() + 15  # a loaded machine is slow to open it
            while not svc.activity.busy(ws_id) and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            busy = svc.activity.busy(ws_id)
            proc.stdin.write_eof()
            await proc.wait()
            return hello, failing, busy
        raise AssertionError("unreachable: the connection's exit swallowed an error")

    hello, failing, busy = _run(go())
    assert (hello.stdout, hello.exit_status) == ("hello\n", 0)
    assert failing.exit_status == 3
    assert busy
    assert not svc.activity.busy(ws_id)

    def ssh_events() -> list[str]:
        return [e["message"] for e in
                env.api.get(f"/api/v1/workspaces/{ws_id}/events").json()["events"]
                if e["kind"] == "ssh"]

    deadline = time.monotonic() + 30  # the closing event is written on a worker thread
    while len(events := ssh_events()) < 2:
        assert time.monotonic() < deadline, events
        time.sleep(0.01)
    assert events[0].startswith("ssh connection opened by alice from 127.0.0.1:")
    assert events[0].endswith("(key 'alice')")
    assert "closed after" in events[1] and "(3 sessions)" in events[1], events
    keys = env.api.get("/api/v1/users/me/ssh-keys").json()["ssh_keys"]
    assert keys[0]["last_used_at"] is not None


@pytest.mark.parametrize(("user", "key"), [("nope", "alice"), ("other", "alice"),
                                           ("api", "stranger"), ("api", "bob")])
def test_refusals_are_all_the_same(env: Env, user: str, key: str) -> None:
    with pytest.raises(asyncssh.PermissionDenied) as exc:
        _run(_connect(env, user, key))
    assert exc.value.reason == f"Permission denied for user {user} on host 127.0.0.1"


def test_only_public_keys_are_offered(env: Env) -> None:
    with pytest.raises(asyncssh.PermissionDenied):
        _run(asyncssh.connect("127.0.0.1", env.port, username="api", password="x",
                              client_keys=None, known_hosts=None, agent_path=None,
                              preferred_auth="password,keyboard-interactive"))


def test_failed_connections_are_limited_per_address(env: Env) -> None:
    for _ in range(3):
        with pytest.raises(asyncssh.PermissionDenied):
            _run(_connect(env, "api", "stranger"))
    with pytest.raises(asyncssh.DisconnectError) as exc:
        _run(_connect(env, "api", "alice"))  # even a good key, while the address is refused
    assert "too many failed attempts from 127.0.0.1" in exc.value.reason


def test_forwarding_refusals(env: Env) -> None:
    async def go() -> tuple[Exception | None, Exception | None]:
        async with await _connect(env, "api", "alice") as conn:
            remote: Exception | None = None
            try:
                await conn.forward_remote_port("127.0.0.1", 0, "127.0.0.1", 9)
            except asyncssh.ChannelListenError as e:
                remote = e
            outside: Exception | None = None
            try:
                await conn.open_connection("10.1.2.3", 80)
            except asyncssh.ChannelOpenError as e:
                outside = e
            return remote, outside
        raise AssertionError("unreachable: the connection's exit swallowed an error")

    remote, outside = _run(go())
    assert remote is not None
    assert isinstance(outside, asyncssh.ChannelOpenError)
    assert "only the workspace itself" in outside.reason


def test_host_key_is_kept_in_the_data_dir(make_settings: Callable[..., Settings]) -> None:
    seen = []
    for _ in range(2):
        app, port = _start(make_settings)
        with TestClient(app):
            async def key(port: int = port) -> str:
                conn, _ = await asyncssh.create_connection(
                    asyncssh.SSHClient, "127.0.0.1", port, known_hosts=None,
                    username="x", client_keys=None, agent_path=None,
                    preferred_auth="none")
                host_key = conn.get_server_host_key()
                assert host_key is not None
                return str(host_key.get_fingerprint())
            with pytest.raises(asyncssh.PermissionDenied):
                _run(key())
            seen.append(sorted(p.name for p in app.state.settings.data_dir.glob("ssh_host_*")))
            mode = (app.state.settings.data_dir / "ssh_host_ed25519_key").stat().st_mode
            assert mode & 0o077 == 0
    assert seen[0] == seen[1] == ["ssh_host_ed25519_key", "ssh_host_ed25519_key.pub",
                                  "ssh_host_rsa_key", "ssh_host_rsa_key.pub"]



def test_open_ssh_connections_are_a_gauge(env: Env) -> None:
    from tests.unit.test_metrics import parse, value

    def open_now() -> float | None:
        m = parse(env.api.get("/metrics", user="root").text)
        return value(m, "den_open_sessions", kind="ssh")

    async def go() -> float | None:
        async with await _connect(env, "api", "alice") as conn:
            assert (await conn.run("true", check=False)).exit_status == 0
            return await asyncio.to_thread(open_now)
        raise AssertionError("unreachable: the connection's exit swallowed an error")

    assert open_now() == 0
    assert _run(go()) == 1
    deadline = time.monotonic() + 30  # the server sees the close on its own loop, soon after
    while open_now() != 0:
        assert time.monotonic() < deadline, "the ssh gauge did not go back to 0"
        time.sleep(0.02)


def test_unauthenticated_connections_are_limited(make_settings: Callable[..., Settings],
                                                 make_repo: Callable[..., Any]) -> None:
    """Issue 11, finding 8: any number of connections could sit in authentication."""
    import socket
    import time

    app, port = _start(make_settings, ssh_max_preauth_per_address=2)
    key = asyncssh.generate_private_key("ssh-ed25519")
    with TestClient(app) as client:
        api = ApiClient(client, users(app))
        assert api.add_key(key).status_code == 201
        api.create(make_repo())
        gateway = app.state.ssh_gateway

        async def ssh() -> int:
            async with asyncssh.connect("127.0.0.1", port, username="api", client_keys=[key],
                                        known_hosts=None, agent_path=None) as conn:
                return (await conn.run("true", check=False)).exit_status or 0

        def pending() -> int:
            return sum(1 for c in gateway._connections if c.auth is None)

        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]
        try:
            deadline = time.monotonic() + 30
            while pending() < 2:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            with pytest.raises((asyncssh.Error, OSError)):
                _run(ssh())
        finally:
            for s in idle:
                s.close()
        deadline = time.monotonic() + 30
        while pending():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert _run(ssh()) == 0


def test_key_checks_do_not_run_on_the_event_loop() -> None:
    """The database is read on a worker thread while a client authenticates."""
    import inspect

    from server.ssh.gateway import _Connection

    assert inspect.iscoroutinefunction(_Connection.validate_public_key)
