"""Bad input is a clear 4xx, never a 500, and changes nothing (issue 16, section 3).

Each case here was a 500, or accepted and broken later, before it was fixed.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from server.errors import ValidationFailed
from server.runtime.base import ExecResult
from server.urls import split_url
from server.workspaces import limits
from server.workspaces.files import _raise_for
from tests.conftest import ApiClient
from tests.unit.test_api_fake import assert_error, running

__all__ = ["running"]  # a fixture, imported to be used here

WS = "/api/v1/workspaces"


@pytest.fixture
def api(fake_api: ApiClient) -> ApiClient:
    """The app on the fake runtime (a 500 would raise in the test: none may happen)."""
    return fake_api


def _json(api: ApiClient, method: str, url: str, raw: bytes) -> Any:
    return api.client.request(method, url, content=raw,
                              headers={**api.h(), "Content-Type": "application/json"})


# --- 500s --------------------------------------------------------------------------------------


@pytest.mark.parametrize("what", ["tokens", "ssh-keys", "forges"])
def test_ids_out_of_the_databases_range_are_422_not_500(api: ApiClient, what: str) -> None:
    for bad in (2**31, 2**63, 2**64, 10**30, 0, -1):
        err = assert_error(api.delete(f"/api/v1/users/me/{what}/{bad}"), 422, "invalid")
        assert "id" in err["message"], err
    assert_error(api.delete(f"/api/v1/users/me/{what}/{2**31 - 1}"), 404, "not_found")


BAD_REPO_URLS = [
    ("https://[::1/x.git", "not a valid URL"),
    ("ssh://git@[::1/x.git", "not a valid URL"),
    ("https://forge.example:99999/x.git", "port"),
    ("https://forge.example:-1/x.git", "port"),
    ("https://forge.example:abc/x.git", "port"),
    ("https://forge.example:/x.git", "port"),
    ("ssh://git@forge.example:0/x.git", "port"),
    ("https://%zz/x.git", "host"),
    ("https://a%2fb/x.git", "host"),
    ("https://-forge.example/x.git", "'-'"),
    ("git@-host:x", "'-'"),
    ("-git@host:x", "'-'"),
]


def test_bad_repo_urls_are_422_and_create_nothing(api: ApiClient, fake_runtime: Any) -> None:
    for url, words in BAD_REPO_URLS:
        err = assert_error(api.post(WS, json={"name": "u", "repo": {"url": url}}), 422,
                           "invalid")
        assert words in err["message"], (url, err)
    assert api.get(WS).json()["workspaces"] == []
    assert "create" not in fake_runtime.calls


def test_good_urls_still_pass_the_url_checks() -> None:
    for url in ("https://forge.example:8443/x.git", "ssh://git@[::1]:2222/x.git",
                "https://[::1]/x.git", "git://forge_1.example/x.git"):
        split_url(url, what="repo.url")


def test_a_file_url_with_a_component_over_255_bytes_is_422(
        api: ApiClient, repos_root: Path) -> None:
    long = "a" * 300
    for url in (f"file://{repos_root}/{long}/x.git", f"{repos_root}/{long}.git",
                f"file://{repos_root}/{'é' * 200}.git"):
        err = assert_error(api.post(WS, json={"name": "u", "repo": {"url": url}}), 422,
                           "invalid")
        assert "255" in err["message"], err


BAD_FORGES = [
    ({"token": "ghp_tök"}, "ASCII"),
    ({"token": "ghp_\u2028x"}, "ASCII"),
    ({"base_url": "https://[::1"}, "not a valid URL"),
    ({"base_url": "https://forge.example:abc"}, "port"),
    ({"base_url": "https://forge.example:99999"}, "port"),
    ({"base_url": "https://%zz"}, "host"),
    ({"api_url": "https://[::1"}, "api_url is not a valid URL"),
    ({"api_url": "https://api.example:abc"}, "api_url has an invalid port"),
    ({"api_url": "ftp://api.example"}, "api_url must be"),
]


def test_bad_forge_links_are_422(api: ApiClient) -> None:
    for extra, words in BAD_FORGES:
        body = {"kind": "github", "base_url": "https://github.com", "token": "ghp_x", **extra}
        err = assert_error(api.post("/api/v1/users/me/forges", json=body), 422, "invalid")
        assert words in err["message"], (extra, err)
    assert api.get("/api/v1/users/me/forges").json() == {"forges": []}


def test_a_lone_surrogate_in_any_string_is_422(api: ApiClient, running: dict[str, Any],
                                               fake_runtime: Any) -> None:
    calls = len(fake_runtime.calls)
    for raw, field in [
        (b'{"cmd": "cat", "stdin": "\\ud800"}', "stdin"),
        (b'{"cmd": ["echo", "\\udfff"]}', "cmd"),
        (b'{"cmd": "true", "env": {"A": "x\\ud800"}}', "env"),
        (b'{"cmd": "true", "cwd": "\\ud83d"}', "cwd"),
    ]:
        err = assert_error(_json(api, "POST", f"{WS}/api/exec", raw), 422, "invalid")
        assert field in err["message"], (raw, err)
        assert "surrogate" in err["message"] or "unicode" in err["message"], (raw, err)
    raw = b'{"name": "x", "repo": {"url": "https://forge.example/\\ud800.git"}}'
    assert_error(_json(api, "POST", WS, raw), 422, "invalid")
    # A proper pair is one character, and fine.
    r = _json(api, "POST", f"{WS}/api/exec", b'{"cmd": "cat", "stdin": "\\ud83d\\ude00"}')
    assert r.status_code == 200 and r.json()["stdout"] == "\U0001F600", r.text
    assert [c for c in fake_runtime.calls[calls:] if c == "exec"] == ["exec"]


# --- refused -------------------------------------------------------------------------------------


def test_an_env_that_cannot_fit_a_command_is_refused_at_create(
        api: ApiClient, make_repo: Callable[..., Path], fake_runtime: Any) -> None:
    repo = str(make_repo())
    env = {f"V{i}": "x" * 32768 for i in range(20)}  # within the old per-variable limits
    err = assert_error(api.post(WS, json={"name": "e", "repo": {"url": repo}, "env": env}),
                       422, "invalid")
    assert str(limits.ENV_MAX_BYTES) in err["message"], err
    # The 200 x 32 KB is over the body cap (DEN_MAX_BODY_BYTES) before any of that.
    env = {f"V{i}": "x" * 32768 for i in range(200)}
    assert_error(api.post(WS, json={"name": "e", "repo": {"url": repo}, "env": env}),
                 413, "too_large")
    assert "create" not in fake_runtime.calls
    fits = {"A": "x" * 32768}
    assert api.post(WS, json={"name": "e", "repo": {"url": repo}, "env": fits}
                    ).status_code == 202


def test_a_command_too_large_for_the_engine_is_422_before_the_engine(
        api: ApiClient, running: dict[str, Any], fake_runtime: Any) -> None:
    url = f"{WS}/api/exec"
    calls = len(fake_runtime.calls)
    big_env = {f"V{i}": "x" * 30000 for i in range(2)}
    for body, words in [
        ({"cmd": ["echo", *(["y" * 100_000] * 2)]}, "at most"),
        ({"cmd": ["echo", "y" * 140_000]}, "Linux"),
        ({"cmd": ["echo", "\x01" * 40_000], "env": big_env}, "as JSON"),
        ({"cmd": "true", "env": {f"V{i}": "x" * 32768 for i in range(3)}}, "env"),
    ]:
        err = assert_error(api.post(url, json=body), 422, "invalid")
        assert words in err["message"], (str(body)[:80], err)
    # Over the engine's 4 MiB message limit: over the body cap first (413).
    assert_error(api.post(url, json={"cmd": ["echo", "y" * 4_500_000]}), 413, "too_large")
    assert "exec" not in fake_runtime.calls[calls:]
    r = api.post(url, json={"cmd": ["echo", "y" * 100_000]})
    assert r.status_code == 200 and len(r.json()["stdout"]) == 100_001


def test_command_limits_are_pure() -> None:
    limits.check_command(["a" * 100_000], {"B": "c" * 60_000})
    with pytest.raises(ValidationFailed):
        limits.check_command(["a" * 100_000], {"B": "c" * 31_000, "D": "e" * 70_000})
    with pytest.raises(ValidationFailed, match="name"):
        limits.validate_env({"É": "x"})


@pytest.mark.parametrize(("url", "body", "field"), [
    ("/api/v1/workspaces/api/keepalive", {"ttl_s": True}, "ttl_s"),
    ("/api/v1/workspaces/api/keepalive", {"ttl_s": "60"}, "ttl_s"),
    ("/api/v1/workspaces/api/keepalive", {"ttl_s": 60.0}, "ttl_s"),
    ("/api/v1/workspaces/api/keepalive", {"ttl_s": -1}, "ttl_s"),
    ("/api/v1/workspaces/api/exec", {"cmd": "true", "timeout_s": "5"}, "timeout_s"),
    ("/api/v1/workspaces/api/exec", {"cmd": "true", "tty": 1}, "tty"),
    ("/api/v1/workspaces/api/exec", {"cmd": "true", "cols": "80"}, "cols"),
    ("/api/v1/workspaces/api/snapshots", {"name": "s", "memory": "true"}, "memory"),
    ("/api/v1/workspaces/api/processes", {"cmd": "true", "log_bytes": "4096"}, "log_bytes"),
    ("/api/v1/workspaces", {"name": "x", "repo": {"url": "/r"}, "keep_alive": 1},
     "keep_alive"),
    ("/api/v1/workspaces", {"name": "x", "repo": {"url": "/r"}, "idle_timeout_s": "60"},
     "idle_timeout_s"),
    ("/api/v1/workspaces", {"name": "x", "repo": {"url": "/r"}, "idle_timeout_s": 10**12},
     "idle_timeout_s"),
    ("/api/v1/workspaces", {"name": "x", "repo": {"url": "/r"},
                            "resources": {"memory_mb": "4096"}}, "memory_mb"),
    ("/api/v1/workspaces", {"name": 5, "repo": {"url": "/r"}}, "name"),
    ("/api/v1/users/me/tokens", {"name": 5}, "name"),
])
def test_no_lax_coercion_on_the_api(api: ApiClient, running: dict[str, Any], url: str,
                                    body: dict[str, Any], field: str) -> None:
    before = api.get(f"{WS}/api").json()
    err = assert_error(api.post(url, json=body), 422, "invalid")
    assert field in err["message"], err
    assert api.get(f"{WS}/api").json() == before


def test_numbers_where_numbers_are_expected_still_work(api: ApiClient,
                                                       running: dict[str, Any]) -> None:
    assert api.post(f"{WS}/api/keepalive", json={"ttl_s": 60}).status_code == 200
    r = api.post(f"{WS}/api/exec", json={"cmd": "true", "timeout_s": 5})
    assert r.status_code == 200, r.text


# --- wrong meaning -------------------------------------------------------------------------------


def test_bad_cwd_and_long_names_are_422(api: ApiClient, running: dict[str, Any],
                                        fake_runtime: Any) -> None:
    calls = len(fake_runtime.calls)
    for body, words in [
        ({"cmd": "true", "cwd": "a\x00b"}, "NUL"),
        ({"cmd": "true", "cwd": "a" * 256}, "255"),
    ]:
        err = assert_error(api.post(f"{WS}/api/exec", json=body), 422)
        assert words in err["message"], err
    for method in ("GET", "PUT", "DELETE"):
        r = api.client.request(method, f"{WS}/api/files", params={"path": "d/" + "n" * 256},
                               headers=api.h(), content=b"x" if method == "PUT" else None)
        err = assert_error(r, 422, "name_too_long")
        assert "255" in err["message"], err
    assert "exec" not in fake_runtime.calls[calls:]


def test_a_file_operation_killed_by_a_signal_is_a_conflict_not_a_422() -> None:
    for code in (137, 143):
        with pytest.raises(Exception) as info:
            _raise_for(ExecResult(exit_code=code, stdout=b"", stderr=b""), "/workspace/x")
        assert getattr(info.value, "status_code", None) == 409, info.value
        assert "stopped" in str(info.value)


# --- error shape everywhere ---------------------------------------------------------------------


def test_bodies_that_are_not_utf8_or_nest_too_deeply_are_422_invalid(
        api: ApiClient, running: dict[str, Any], fake_runtime: Any) -> None:
    calls = len(fake_runtime.calls)
    url = f"{WS}/api/exec"
    for raw, words in [
        (b'{"cmd": "\xff"}', "UTF-8"),
        (b'{"cmd":' + b"[" * 5000 + b"]" * 5000 + b"}", "nests too deeply"),
        (b'{"cmd":' + b'{"a":' * 3000 + b"1" + b"}" * 3000 + b"}", "nests too deeply"),
    ]:
        err = assert_error(_json(api, "POST", url, raw), 422, "invalid")
        assert words in err["message"], (raw[:20], err)
    # Deep but parseable: the model refuses it, in the same shape.
    raw = b'{"cmd":' + b"[" * 900 + b"]" * 900 + b"}"
    assert_error(_json(api, "POST", url, raw), 422, "invalid")
    assert "exec" not in fake_runtime.calls[calls:]


def test_405_names_the_allowed_methods(api: ApiClient, running: dict[str, Any]) -> None:
    for method, url, allowed in [
        ("PUT", "/healthz", {"GET"}),
        ("PATCH", f"{WS}/api/exec", {"POST"}),
        ("POST", "/api/v1/users/me", {"GET"}),
    ]:
        r = api.client.request(method, url, headers=api.h())
        assert_error(r, 405, "method_not_allowed")
        assert set(r.headers["allow"].replace(" ", "").split(",")) >= allowed, r.headers


def test_the_exec_stream_refuses_bad_first_messages_and_survives_bad_input(
        api: ApiClient, running: dict[str, Any]) -> None:
    for text in ('{"cmd":' + "[" * 5000 + "]" * 5000 + "}", '{"cmd": "cat", "cwd": "\\ud800"}'):
        with api.client.websocket_connect(f"{WS}/api/exec/stream", headers=api.h()) as ws:
            ws.send_text(text)
            msg = ws.receive_json()
            assert (msg["type"], msg["error"]["code"]) == ("error", "invalid"), msg
    with api.client.websocket_connect(f"{WS}/api/exec/stream", headers=api.h()) as ws:
        ws.send_json({"cmd": ["cat"]})
        ws.send_text("[" * 5000 + "]" * 5000)  # ignored
        ws.send_text('{"type": "stdin", "data": "a\\ud800b"}')
        ws.send_json({"type": "close_stdin"})
        out = b""
        while (msg := ws.receive_json())["type"] == "stdout":
            out += msg["data"].encode()
        assert msg == {"type": "exit", "exit_code": 0}
        assert out == b"a?b"
