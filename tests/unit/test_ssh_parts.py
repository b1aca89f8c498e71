"""The SSH gateway's pure parts and keys: key checks against ssh-keygen's own keys and
fingerprints, the failure limiter, workspace names, forwarding rules, the session
environment, the API's ssh field, and the client's ssh-config and ssh command line."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from server.client.commands import render_ssh_config, ssh_argv, ssh_host
from server.config import Settings
from server.errors import ValidationFailed
from server.ssh import target
from server.ssh.keys import parse_public_key
from server.ssh.ratelimit import FailureLimiter


def _keygen(tmp_path: Path, kind: str, *bits: str) -> Path:
    path = tmp_path / f"k-{kind}-{'-'.join(bits) or 'default'}"
    subprocess.run(["ssh-keygen", "-q", "-t", kind, *bits, "-N", "", "-C", "me@laptop",
                    "-f", str(path)], check=True)
    return path.with_suffix(".pub")


@pytest.mark.parametrize(("kind", "bits", "key_type"), [
    ("ed25519", (), "ssh-ed25519"),
    ("ecdsa", ("-b", "256"), "ecdsa-sha2-nistp256"),
    ("ecdsa", ("-b", "521"), "ecdsa-sha2-nistp521"),
    ("rsa", ("-b", "2048"), "ssh-rsa"),
])
def test_accepted_keys_match_ssh_keygen(tmp_path: Path, kind: str, bits: tuple[str, ...],
                                        key_type: str) -> None:
    pub = _keygen(tmp_path, kind, *bits)
    parsed = parse_public_key("  " + pub.read_text() + "\n")
    listed = subprocess.run(["ssh-keygen", "-l", "-E", "sha256", "-f", str(pub)],
                            capture_output=True, text=True, check=True).stdout.split()
    assert parsed.fingerprint == listed[1]
    assert parsed.key_type == key_type
    assert parsed.comment == "me@laptop"
    assert parsed.public_key == " ".join(pub.read_text().split()[:2])


def test_refused_keys_say_why(tmp_path: Path) -> None:
    def reason(text: str) -> str:
        with pytest.raises(ValidationFailed) as exc:
            parse_public_key(text)
        return exc.value.message

    assert "at least 2048 bits" in reason(_keygen(tmp_path, "rsa", "-b", "1024").read_text())
    assert "not accepted" in reason(_keygen(tmp_path, "dsa").read_text())
    private = _keygen(tmp_path, "ed25519").with_suffix("").read_text()
    assert "private key" in reason(private)
    line = _keygen(tmp_path, "ecdsa").read_text()
    assert "options" in reason('command="true" ' + line)
    assert "one line" in reason(line + line)
    assert "empty" in reason("  \n")
    assert "cannot read" in reason("ssh-ed25519 AAAAnotbase64!! x")
    assert "certificates" in reason("ssh-ed25519-cert-v01@openssh.com AAAA x")


def test_failure_limiter_blocks_after_the_limit_for_the_window() -> None:
    lim = FailureLimiter(max_failures=3, window_s=60)
    for t in (0.0, 1.0, 2.0):
        assert not lim.blocked("1.2.3.4", t)
        lim.record_failure("1.2.3.4", t)
    assert lim.blocked("1.2.3.4", 2.5)
    assert lim.retry_after_s("1.2.3.4", 10.0) == pytest.approx(50.0)
    assert not lim.blocked("5.6.7.8", 10.0)  # per address
    lim.record_failure("1.2.3.4", 30.0)  # not counted while blocked
    assert lim.blocked("1.2.3.4", 59.9)
    assert not lim.blocked("1.2.3.4", 60.0)  # the oldest failure left the window
    lim.record_failure("1.2.3.4", 60.0)
    assert lim.blocked("1.2.3.4", 60.5)  # failures at 1, 2 and 60 are within a window
    assert not lim.blocked("1.2.3.4", 61.0)


def test_failure_limiter_off_and_bounded() -> None:
    off = FailureLimiter(max_failures=0, window_s=60)
    for t in range(100):
        off.record_failure("a", float(t))
    assert not off.blocked("a", 100.0)
    small = FailureLimiter(max_failures=1, window_s=60, max_addresses=2)
    for addr in ("a", "b", "c"):
        small.record_failure(addr, 0.0)
    assert not small.blocked("a", 1.0)  # dropped: least recently failed
    assert small.blocked("b", 1.0) and small.blocked("c", 1.0)


def test_workspace_refs_and_forwarding_rules() -> None:
    assert target.workspace_refs("api") == ["api"]
    assert target.workspace_refs("den-api") == ["den-api", "api"]
    assert target.workspace_refs("den-") == ["den-"]
    for host in ("localhost", "127.0.0.1", "127.1.2.3", "::1", "[::1]", "LocalHost", "api"):
        assert target.forward_allowed(host, 3000, workspace_name="api"), host
    for host, port in (("10.0.0.1", 80), ("example.com", 443), ("0.0.0.0", 80),
                       ("localhost", 0), ("localhost", 70000), ("other", 22)):
        assert not target.forward_allowed(host, port, workspace_name="api"), host
    assert target.relay_argv("localhost", 8000)[-2:] == ["127.0.0.1", "8000"]
    assert target.relay_argv("[::1]", 8000)[-2:] == ["::1", "8000"]


def test_session_env_keeps_locale_and_term_only() -> None:
    env = target.session_env(
        {"LANG": "de_DE.UTF-8", "LC_ALL": "C", "LD_PRELOAD": "/x.so", "PATH": "/evil",
         "COLORTERM": "truecolor", "LC_TIME": "x" * 5000},
        term="screen-256color", client=("10.1.1.1", 5555), server=("10.0.0.2", 2222))
    assert env == {"LANG": "de_DE.UTF-8", "LC_ALL": "C", "COLORTERM": "truecolor",
                   "TERM": "screen-256color",
                   "SSH_CONNECTION": "10.1.1.1 5555 10.0.0.2 2222",
                   "SSH_CLIENT": "10.1.1.1 5555 2222"}


def test_ssh_endpoint_and_client_command_lines() -> None:
    settings = Settings(host="0.0.0.0", ssh_port=2222)
    assert target.ssh_endpoint(Settings(ssh_port=0), "api") is None
    endpoint = target.ssh_endpoint(settings, "api")
    assert endpoint == {"host": "0.0.0.0", "port": 2222, "user": "api",
                        "command": "ssh -p 2222 api@0.0.0.0"}
    public = target.ssh_endpoint(Settings(public_host="den.example", ssh_port=22), "api")
    assert public is not None and public["command"] == "ssh api@den.example"

    assert ssh_host(endpoint, "https://den.example:8443") == "den.example"
    assert ssh_host({"host": "ssh.example"}, "https://den.example") == "ssh.example"
    ws = {"name": "api", "ssh": endpoint}
    assert ssh_argv(ws, "http://den.example:8080", []) == [
        "ssh", "-p", "2222", "--", "api@den.example"]
    assert ssh_argv(ws, "http://h", ["ls", "-la"], identity="~/.ssh/k") == [
        "ssh", "-p", "2222", "-i", "~/.ssh/k", "--", "api@h", "ls", "-la"]

    text = render_ssh_config([ws, {"name": "off", "ssh": None}], api_host="den.example",
                             identity="/k")
    assert "Host den-api\n  HostName den.example\n  Port 2222\n  User api\n  IdentityFile /k\n" \
        in text
    assert "# off: the server's SSH gateway is off" in text
