"""The operator's ceiling on the domain names users may allow (DEN_NETWORK_USER_DOMAINS)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from server.app import create_app
from server.auth.tokens import ensure_user
from server.config import Settings
from server.errors import Forbidden, ValidationFailed
from server.network.ceiling import DomainCeiling, covers, parse_pattern
from server.network.names import NameEntry
from server.network.policy import parse_entry, validate
from server.runtime.fake import FakeRuntime
from server.snapshots.service import SnapshotService
from server.workspaces.service import CreateRequest, WorkspaceService
from tests.conftest import ApiClient, users
from tests.unit.test_service_fake import settle


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def name(text: str) -> NameEntry:
    entry = parse_entry(text)
    assert isinstance(entry, NameEntry)
    return entry


@pytest.mark.parametrize(("pattern", "entry", "covered"), [
    ("*", "pypi.org", True),
    ("*", "*.npmjs.org:443", True),
    ("pypi.org", "pypi.org", True),
    ("pypi.org", "files.pypi.org", False),
    ("pypi.org", "*.pypi.org", False),
    ("*.corp.example", "git.corp.example", True),
    ("*.corp.example", "a.b.corp.example:22", True),
    ("*.corp.example", "*.corp.example", True),
    ("*.corp.example", "*.git.corp.example", True),
    ("*.corp.example", "corp.example", False),  # *. is subdomains only, as in allowlists
    ("*.corp.example", "evilcorp.example", False),
    ("*.corp.example", "corp.example.evil.org", False),
    ("git.corp.example:443", "git.corp.example:443", True),
    ("git.corp.example:443", "git.corp.example:22", False),
    ("git.corp.example:443", "git.corp.example", False),  # every port is more than 443
    ("*:443", "anything.example:443", True),
    ("*:443", "anything.example", False),
])
def test_what_a_pattern_covers(pattern: str, entry: str, covered: bool) -> None:
    assert covers(parse_pattern(pattern), name(entry)) is covered


@pytest.mark.parametrize("bad", ["", "pypi", "10.0.0.1", "*.", "**.x.org", "x.org:0",
                                 "x.org:http", "*x.org"])
def test_bad_patterns_are_refused(bad: str) -> None:
    with pytest.raises(ValidationFailed):
        parse_pattern(bad)


def test_the_setting_is_checked_at_startup(make_settings: Callable[..., Settings]) -> None:
    with pytest.raises(ValidationError, match="neither"):
        make_settings(network_user_domains=["not a name"])
    assert make_settings().network_user_domains == ["*"]  # the default: any name


def test_validate_refuses_names_outside_the_ceiling_and_names_the_entry() -> None:
    ceiling = DomainCeiling.parse(["pypi.org", "*.corp.example"],
                                  operator=[name("mirror.internal.example")])

    def check(*allow: str) -> None:
        validate("allowlist", list(allow), ceiling="internet", user_ranges=[], operator=[],
                 domains=ceiling)

    check("pypi.org", "git.corp.example:443", "mirror.internal.example", "203.0.113.7")
    with pytest.raises(Forbidden) as refused:
        check("pypi.org", "evil.example", "x.org")
    assert refused.value.code == "network_not_allowed"
    assert "'evil.example'" in refused.value.message
    assert "pypi.org, *.corp.example" in refused.value.message
    assert "mirror.internal" not in refused.value.message  # the operator's own stay unsaid
    with pytest.raises(Forbidden, match="domain names only: none"):
        validate("allowlist", ["pypi.org"], ceiling="internet", user_ranges=[], operator=[],
                 domains=DomainCeiling.parse([]))
    # Addresses are not names: the ceiling does not touch them.
    validate("allowlist", ["203.0.113.7"], ceiling="internet", user_ranges=[], operator=[],
             domains=DomainCeiling.parse([]))


def test_create_and_patch_are_refused_with_403(
        make_settings: Callable[..., Settings], make_repo: Callable[..., Path]) -> None:
    app = create_app(make_settings(network_user_domains=["*.corp.example", "pypi.org"]),
                     runtime=FakeRuntime())
    with TestClient(app) as client:
        api = ApiClient(client, users(app))
        r = api.post("/api/v1/workspaces", json={
            "name": "api", "repo": {"url": str(make_repo())},
            "network": {"mode": "allowlist", "allow": ["pypi.org", "github.com"]}})
        assert r.status_code == 403, r.text
        assert r.json()["error"]["code"] == "network_not_allowed"
        assert "'github.com'" in r.json()["error"]["message"]
        assert api.get("/api/v1/workspaces").json()["workspaces"] == []  # nothing half-made
        ws = api.create(make_repo("web"), name="web", network={
            "mode": "allowlist", "allow": ["pypi.org", "git.corp.example:443"]})
        url = f"/api/v1/workspaces/{ws['id']}"
        r = client.patch(url, headers=api.h(), json={
            "network": {"mode": "allowlist", "allow": ["*.evil.example"]}})
        assert r.status_code == 403 and "'*.evil.example'" in r.json()["error"]["message"]
        assert api.get(url).json()["network"]["allow"] == ["pypi.org", "git.corp.example:443"]


@pytest.mark.anyio
async def test_a_fork_keeps_only_the_names_todays_ceiling_allows(
        make_service: Callable[..., WorkspaceService], make_repo: Callable[..., Path]) -> None:
    svc = make_service()
    with svc.sessions.begin() as s:
        alice = ensure_user(s, "alice")
    ws = await svc.create(alice, CreateRequest(
        name="api", repo_url=str(make_repo()), network_mode="allowlist",
        network_allow=("pypi.org", "github.com", "203.0.113.7")))
    ws = await settle(svc, ws.id)
    snaps = SnapshotService(svc)
    snap = await snaps.create(ws.id, name="one", memory=False, actor="alice")
    svc.settings.network_user_domains = ["pypi.org"]  # the operator lowered the ceiling
    fork = await settle(svc, (await snaps.fork(alice, snap, name="fork")).id)
    assert svc.networks.policy(fork).to_json() == {"mode": "allowlist",
                                                  "allow": ["pypi.org", "203.0.113.7"]}
