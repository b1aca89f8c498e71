"""Issue 11, finding 7: no blind SSRF from the host.

Clones, mirror pushes and forge API calls go only to public addresses unless the operator
allows more; the check is on the resolved address and the connection goes to exactly that
address; what git or the forge answered is not echoed to the user.

The stand-in forge listens on 127.0.0.1. To show that git and httpx connect to the address
Den checked (not to whatever the name resolves to when they connect), tests name it
``forge.test``, a name only Den's own resolver (patched here) knows: git and curl cannot
resolve it themselves, so a clone that works went to the pinned address.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.config import Settings
from server.errors import DenError
from server.forges.base import RepoRef
from server.forges.client import ForgeClient
from server.forges.errors import ForgeUnavailable
from server.forges.mirror import credential_env
from server.forges.providers import PROVIDERS
from server.git.clone import CloneFailed, RepoSource, clone
from server.outbound import (
    PUBLIC_ONLY,
    DestinationRefused,
    GuardedTransport,
    OutboundPolicy,
    git_pin,
)
from server.runtime.fake import FakeRuntime
from tests.conftest import ApiClient, users
from tests.forge_server import ForgeServer, make_forge_repo
from tests.unit.test_forge_parts import cred_for

TOKEN = "fgt_outbound_0123456789abcdef"
MiB = 1024 * 1024


@pytest.mark.parametrize("address", [
    "127.0.0.1", "10.1.2.3", "172.17.0.1", "192.168.1.1", "169.254.169.254", "100.64.0.1",
    "0.0.0.0", "224.0.0.1", "::1", "fd00::1", "fe80::1", "::ffff:127.0.0.1", "::ffff:10.0.0.1",
])
def test_non_public_addresses_are_refused_by_default(address: str) -> None:
    assert not PUBLIC_ONLY.allows("h", ipaddress.ip_address(address))


@pytest.mark.parametrize("address", ["8.8.8.8", "140.82.112.3", "2606:4700::1111"])
def test_public_addresses_are_allowed(address: str) -> None:
    assert PUBLIC_ONLY.allows("h", ipaddress.ip_address(address))


def test_the_operator_allows_networks_and_hosts() -> None:
    policy = OutboundPolicy.of(["10.20.0.0/16", "git.corp.example", "::1"])
    assert policy.allows("x", ipaddress.ip_address("10.20.3.4"))
    assert not policy.allows("x", ipaddress.ip_address("10.21.0.1"))
    assert policy.allows("GIT.corp.example.", ipaddress.ip_address("10.99.0.1"))
    assert policy.allows("x", ipaddress.ip_address("::1"))
    with pytest.raises(ValueError):
        OutboundPolicy.of(["http://x/"])
    with pytest.raises(ValueError):
        Settings(outbound_allow=["10.0.0.0/8", "not a host"])


@pytest.fixture
def fake_dns(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Names only Den's resolver knows (socket.getaddrinfo in this process)."""
    names: dict[str, str] = {}
    real = socket.getaddrinfo

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host in names:
            return real(names[host], port, *args, **kwargs)
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return names


def test_a_name_resolving_to_a_private_address_is_refused(fake_dns: dict[str, str]) -> None:
    fake_dns["inside.test"] = "10.0.0.7"
    with pytest.raises(DestinationRefused) as info:
        git_pin("https://inside.test/a/b.git", "https", PUBLIC_ONLY)
    assert info.value.status_code == 422
    with pytest.raises(DestinationRefused):
        git_pin("git@localhost:a/b.git", "ssh", PUBLIC_ONLY)
    with pytest.raises(DestinationRefused):  # does not resolve: the same answer
        git_pin("https://nothing.invalid/a.git", "https", PUBLIC_ONLY)


def test_git_is_pinned_to_the_checked_addresses(fake_dns: dict[str, str]) -> None:
    fake_dns["forge.test"] = "127.0.0.1"
    policy = OutboundPolicy.of(["127.0.0.1"])
    pin = git_pin("https://forge.test/a/b.git", "https", policy)
    assert pin.config == {"http.curloptResolve": "forge.test:443:127.0.0.1",
                          "http.followRedirects": "false"}
    pin = git_pin("ssh://git@forge.test:2200/a/b.git", "ssh", policy)
    assert pin.ssh_options == "-o HostName=127.0.0.1 -o HostKeyAlias=[forge.test]:2200"
    assert git_pin("git://forge.test/a.git", "git", policy).url == "git://127.0.0.1/a.git"


@pytest.fixture
def forge(tmp_path: Path) -> Iterator[ForgeServer]:
    with ForgeServer("github", tmp_path / "forge") as f:
        f.add_user("alice", TOKEN)
        make_forge_repo(f, "acme/api", {"README.md": "# api\n"})
        yield f


def test_a_clone_connects_to_the_address_den_checked(
        forge: ForgeServer, fake_dns: dict[str, str], tmp_path: Path) -> None:
    fake_dns["forge.test"] = "127.0.0.1"
    base = forge.url.replace("127.0.0.1", "forge.test")
    cred = cred_for(forge, TOKEN)
    env = credential_env(type(cred)(**{**cred.__dict__, "base_url": base}))
    source = RepoSource(url=f"{base}/acme/api.git", kind="http")
    head = clone(source, branch=None, dest=tmp_path / "out", timeout_s=60, max_bytes=MiB,
                 extra_env=env, outbound=OutboundPolicy.of(["127.0.0.1"]))
    assert head == "main" and (tmp_path / "out" / "README.md").exists()
    # Refused by default, before git runs: the forge sees nothing more.
    seen = len(forge.log)
    with pytest.raises(DestinationRefused):
        clone(source, branch=None, dest=tmp_path / "out2", timeout_s=60, max_bytes=MiB,
              extra_env=env)
    assert len(forge.log) == seen


def _pkt(text: str) -> bytes:
    return b"%04x" % (len(text) + 4) + text.encode()


class _TalkativeRemote(BaseHTTPRequestHandler):
    """A smart-HTTP git remote that answers every clone with an error of its own words."""

    def do_GET(self) -> None:
        body = (_pkt("# service=git-upload-pack\n") + b"0000"
                + _pkt("ERR INTERNAL-SECRET-PAGE from the inside\n"))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-git-upload-pack-advertisement")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_a_failed_clone_does_not_echo_the_remote(tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _TalkativeRemote)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        source = RepoSource(url=f"http://127.0.0.1:{httpd.server_address[1]}/a.git",
                            kind="http")
        with pytest.raises(CloneFailed) as info:
            clone(source, branch=None, dest=tmp_path / "out", timeout_s=60, max_bytes=MiB,
                  outbound=OutboundPolicy.of(["127.0.0.1"]))
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert "INTERNAL-SECRET" not in info.value.message
    assert "INTERNAL-SECRET" in caplog.text  # the operator sees it


@pytest.mark.anyio
async def test_forge_api_calls_connect_to_the_checked_address(
        forge: ForgeServer, fake_dns: dict[str, str]) -> None:
    fake_dns["forge.test"] = "127.0.0.1"
    api = PROVIDERS["github"].default_api_url(forge.url.replace("127.0.0.1", "forge.test"))
    allowed = ForgeClient(PROVIDERS["github"], api_url=api, token=TOKEN, timeout_s=10,
                          transport=GuardedTransport(OutboundPolicy.of(["127.0.0.1"])))
    assert (await allowed.profile(base_url=api)).username == "alice"
    refused = ForgeClient(PROVIDERS["github"], api_url=api, token=TOKEN, timeout_s=10,
                          transport=GuardedTransport(PUBLIC_ONLY))
    seen = len(forge.log)
    with pytest.raises(DestinationRefused):
        await refused.profile(base_url=api)
    assert len(forge.log) == seen


@pytest.mark.anyio
async def test_a_forge_error_does_not_echo_its_body(forge: ForgeServer) -> None:
    client = ForgeClient(PROVIDERS["github"], api_url=f"{forge.url}/api/v3", token=TOKEN,
                         timeout_s=10, transport=GuardedTransport(OutboundPolicy.of(
                             ["127.0.0.1"])))
    forge.fail_next(503, {"message": "INTERNAL-SECRET-PAGE"})
    with pytest.raises(ForgeUnavailable) as info:
        await client.find_open(RepoRef("acme/api"), branch="x", base="main")
    assert "INTERNAL-SECRET" not in info.value.message
    forge.fail_next(422, {"message": "INTERNAL-SECRET-PAGE"}, method="POST")
    with pytest.raises(DenError) as refused:  # the provider's reading of a refused create
        await client.open(RepoRef("acme/api"), branch="x", base="main", title="t", body="",
                          draft=False)
    assert refused.value.status_code == 422
    assert "INTERNAL-SECRET" not in refused.value.message


@pytest.fixture
def strict_api(make_settings: Callable[..., Settings]) -> Iterator[ApiClient]:
    app = create_app(make_settings(allowed_git_schemes=["http", "https", "git", "ssh"],
                                   outbound_allow=[]), runtime=FakeRuntime())
    with TestClient(app) as client:
        yield ApiClient(client, users(app))


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:9/a.git", "https://localhost/a.git", "git://169.254.169.254/a.git",
    "ssh://git@[::1]/a.git", "git@10.0.0.1:a/b.git",
])
def test_creating_from_a_private_address_is_refused(strict_api: ApiClient, url: str) -> None:
    r = strict_api.post("/api/v1/workspaces", json={"name": "x", "repo": {"url": url}})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == "destination_refused"
    assert strict_api.get("/api/v1/workspaces").json()["workspaces"] == []


def test_linking_a_forge_on_a_private_address_is_refused(strict_api: ApiClient,
                                                         forge: ForgeServer) -> None:
    r = strict_api.post("/api/v1/users/me/forges",
                        json={"kind": "github", "base_url": forge.url, "token": TOKEN})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == "destination_refused"
    assert forge.log == []


def test_local_repositories_still_clone(strict_api: ApiClient,
                                        make_repo: Callable[..., Path]) -> None:
    r = strict_api.post("/api/v1/workspaces", json={"name": "x",
                                                    "repo": {"url": str(make_repo())}})
    assert r.status_code == 202, r.text


def test_a_private_clone_does_not_follow_a_redirect_with_the_credential(
        tmp_path: Path) -> None:
    """Issue 11, finding 8: the credential header went wherever the forge redirected."""
    seen: list[dict[str, str]] = []

    class Elsewhere(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(dict(self.headers.items()))
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    other = ThreadingHTTPServer(("127.0.0.1", 0), Elsewhere)

    class Redirecting(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(301)
            self.send_header("Location", f"http://127.0.0.1:{other.server_address[1]}{self.path}")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    forge = ThreadingHTTPServer(("127.0.0.1", 0), Redirecting)
    for server in (other, forge):
        threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{forge.server_address[1]}"
    env = {"GIT_CONFIG_COUNT": "1", "GIT_CONFIG_KEY_0": f"http.{base}/.extraHeader",
           "GIT_CONFIG_VALUE_0": "Authorization: Basic c2VjcmV0"}
    try:
        with pytest.raises(CloneFailed) as info:
            clone(RepoSource(url=f"{base}/a.git", kind="http"), branch=None,
                  dest=tmp_path / "out", timeout_s=60, max_bytes=MiB, extra_env=env,
                  outbound=OutboundPolicy.of(["127.0.0.1"]))
    finally:
        for server in (other, forge):
            server.shutdown()
            server.server_close()
    assert "redirect" in info.value.message
    assert seen == []
