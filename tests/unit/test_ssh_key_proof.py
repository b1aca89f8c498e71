"""Issue 11, finding 3: an SSH key is registered only by whoever holds its private key.

The attack: bob registers alice's public key (it is public) and names a workspace like hers;
alice's ``ssh api@den`` then authenticates as bob and lands in bob's workspace, where he sees
what she types and uploads. Now registration takes a challenge signed with the key
(``ssh-keygen -Y sign -n den-ssh-key``), and says nothing about existing registrations to
anyone who cannot sign.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncssh
import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.client.commands import sign_challenge
from server.config import Settings
from server.db.models import SSHKey, User
from server.errors import ValidationFailed
from server.runtime.fake import FakeRuntime
from server.ssh import proof
from server.ssh.keys import parse_public_key
from tests.conftest import ApiClient, free_port, users

KEYS = "/api/v1/users/me/ssh-keys"


@pytest.fixture
def api(make_settings: Callable[..., Settings]) -> Iterator[tuple[ApiClient, int]]:
    port = free_port()
    app = create_app(make_settings(ssh_port=port), runtime=FakeRuntime())
    with TestClient(app) as client:
        yield ApiClient(client, users(app)), port


def _challenge(api: ApiClient, user: str) -> str:
    r = api.post(f"{KEYS}/challenge", user=user)
    assert r.status_code == 200, r.text
    assert r.json()["namespace"] == "den-ssh-key"
    assert "ssh-keygen -Y sign -n den-ssh-key" in r.json()["command"]
    return str(r.json()["challenge"])


def _try(api: ApiClient, user: str, public: str, signer: asyncssh.SSHKey,
         challenge: str | None = None) -> Any:
    challenge = challenge or _challenge(api, user)
    return api.post(KEYS, user=user, json={
        "public_key": public, "challenge": challenge,
        "signature": proof.sign(signer, challenge.encode())})


def test_nobody_registers_a_key_they_do_not_hold(api: tuple[ApiClient, int]) -> None:
    client, _ = api
    alice = asyncssh.generate_private_key("ssh-ed25519")
    bob = asyncssh.generate_private_key("ssh-ed25519")
    alice_public = alice.export_public_key().decode()
    # Bob signs with his own key: refused, and the same answer before and after alice
    # registered hers (no oracle for "is this key registered").
    before = _try(client, "bob", alice_public, bob)
    assert client.add_key(alice, user="alice").status_code == 201
    after = _try(client, "bob", alice_public, bob)
    assert before.status_code == after.status_code == 422
    assert before.json() == after.json()
    # No proof at all is a 422 naming what is missing.
    r = client.post(KEYS, user="bob", json={"public_key": alice_public})
    assert r.status_code == 422 and "challenge" in r.json()["error"]["message"]
    # Alice's own challenge and signature, replayed by bob: the challenge is alice's.
    challenge = _challenge(client, "alice")
    replay = _try(client, "bob", alice_public, alice, challenge=challenge)
    assert replay.status_code == 422 and "challenge" in replay.json()["error"]["message"]
    # Another namespace (a signature made for something else) does not count.
    other = client.post(KEYS, user="bob", json={
        "public_key": bob.export_public_key().decode(), "challenge": (c := _challenge(
            client, "bob")), "signature": proof.sign(bob, c.encode(), namespace="git")})
    assert other.status_code == 422
    keys = client.get(KEYS, user="alice").json()["ssh_keys"]
    assert [k["verified"] for k in keys] == [True]
    assert client.get(KEYS, user="bob").json()["ssh_keys"] == []


def test_challenges_expire_and_are_bound_to_their_user() -> None:
    challenges = proof.Challenges()
    text, expires = challenges.issue(7, now=1000)
    challenges.check(7, text, now=1000)
    with pytest.raises(ValidationFailed, match="expired"):
        challenges.check(7, text, now=expires + 1)
    with pytest.raises(ValidationFailed):
        challenges.check(8, text, now=1000)
    with pytest.raises(ValidationFailed):
        challenges.check(7, text.replace(":7:", ":8:"), now=1000)
    with pytest.raises(ValidationFailed):  # another server's (or a restarted one's)
        proof.Challenges().check(7, text, now=1000)


def test_the_cli_signs_with_ssh_keygen(tmp_path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "k")],
                   check=True)
    text, _ = proof.Challenges().issue(1)
    signature = sign_challenge(text, str(tmp_path / "k"))
    public = asyncssh.read_public_key(str(tmp_path / "k.pub"))
    assert proof.verify(public, signature, text.encode())
    assert not proof.verify(public, signature, text.encode() + b"x")


def _connect(port: int, user: str, key: asyncssh.SSHKey) -> Any:
    async def go() -> Any:
        async with asyncssh.connect("127.0.0.1", port, username=user, client_keys=[key],
                                    known_hosts=None, agent_path=None) as conn:
            return (await conn.run("echo hi", check=False)).exit_status

    return asyncio.run(go())


def _ssh_events(client: ApiClient, user: str) -> list[str]:
    ws_id = client.get("/api/v1/workspaces/api", user=user).json()["id"]
    return [e["message"] for e in client.get(f"/api/v1/workspaces/{ws_id}/events",
                                             user=user).json()["events"] if e["kind"] == "ssh"]


def test_a_squatted_key_from_before_goes_to_whoever_proves_it(
        api: tuple[ApiClient, int], make_repo: Callable[..., Path]) -> None:
    client, port = api
    alice = asyncssh.generate_private_key("ssh-ed25519", comment="alice")
    parsed = parse_public_key(alice.export_public_key().decode())
    sessions = client.app.state.sessions
    with sessions.begin() as s:  # bob registered alice's key before proofs were required
        bob_id = s.query(User).filter_by(name="bob").one().id
        s.add(SSHKey(user_id=bob_id, name="squat", key_type=parsed.key_type,
                     fingerprint=parsed.fingerprint, public_key=parsed.public_key))
    client.create(make_repo(), name="api", user="bob")
    client.create(make_repo("mine"), name="api", user="alice")
    listed = client.get(KEYS, user="bob").json()["ssh_keys"]
    assert [k["verified"] for k in listed] == [False]  # the list says so
    assert _connect(port, "api", alice) == 0  # old keys keep working: into bob's workspace
    assert any("opened by bob" in m for m in _ssh_events(client, "bob"))

    r = client.add_key(alice, user="alice")  # alice proves she holds it
    assert r.status_code == 201, r.text
    assert client.get(KEYS, user="bob").json()["ssh_keys"] == []
    assert _connect(port, "api", alice) == 0
    assert any("opened by alice" in m for m in _ssh_events(client, "alice"))
