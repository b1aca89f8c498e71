"""Request ids (X-Request-ID) and the request and workspace ids on every log line, in the text
and the JSON format."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from server import logs
from server.app import create_app
from server.config import Settings
from server.runtime.fake import FakeRuntime
from tests.conftest import ApiClient, users

WS = "/api/v1/workspaces"


@pytest.fixture
def running(fake_api: ApiClient, make_repo: Callable[..., Path]) -> dict[str, Any]:
    ws = fake_api.create(make_repo("api"), name="api")
    assert ws["state"] == "running", ws
    return ws


def _capture(fmt: str) -> Iterator[io.StringIO]:
    out = io.StringIO()
    h = logs.handler(fmt, out)
    root = logging.getLogger()
    level = root.level
    root.addHandler(h)
    root.setLevel(logging.INFO)
    try:
        yield out
    finally:
        root.removeHandler(h)
        root.setLevel(level)


@pytest.fixture
def text_log() -> Iterator[io.StringIO]:
    yield from _capture("text")


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    yield from _capture("json")


def test_every_response_has_a_request_id(fake_api: ApiClient) -> None:
    a = fake_api.client.get("/healthz").headers["x-request-id"]
    b = fake_api.get(f"{WS}/nope").headers["x-request-id"]  # an error answer too
    assert re.fullmatch(r"[0-9a-f]{16}", a) and re.fullmatch(r"[0-9a-f]{16}", b) and a != b


@pytest.mark.parametrize("given,kept", [
    ("trace-42.a:b_c", True),
    ("x" * 64, True),
    ("x" * 65, False),
    ("bad id", False),
    ("<script>", False),
    ("", False),
])
def test_a_client_request_id_is_kept_only_when_sane(fake_api: ApiClient, given: str,
                                                    kept: bool) -> None:
    got = fake_api.client.get("/healthz", headers={"X-Request-ID": given}).headers[
        "x-request-id"]
    assert (got == given) is kept
    if not kept:
        assert re.fullmatch(r"[0-9a-f]{16}", got)


def test_log_lines_carry_the_request_and_workspace_ids(
        fake_api: ApiClient, running: dict[str, Any], text_log: io.StringIO) -> None:
    ws_id = running["id"]
    r = fake_api.client.post(f"{WS}/{ws_id}/stop", headers={"X-Request-ID": "req-stop-1",
                                                     **fake_api.h()})
    assert r.status_code == 200 and r.headers["x-request-id"] == "req-stop-1"
    lines = text_log.getvalue().splitlines()
    transition = [ln for ln in lines if "running -> stopping" in ln]
    assert transition, lines
    assert f"[req=req-stop-1 ws={ws_id}]" in transition[0]
    access = [ln for ln in lines if "den.access" in ln and f"/{ws_id}/stop" in ln]
    assert access and "req=req-stop-1" in access[0] and " 200 " in access[0], lines
    # A request about no workspace says so.
    fake_api.client.get("/healthz", headers={"X-Request-ID": "req-health"})
    health = [ln for ln in text_log.getvalue().splitlines() if "req=req-health" in ln]
    assert health and all("ws=-]" in ln for ln in health), health


def test_json_log_lines(fake_api: ApiClient, running: dict[str, Any],
                        json_log: io.StringIO) -> None:
    ws_id = running["id"]
    fake_api.client.post(f"{WS}/{ws_id}/pause",
                         headers={"X-Request-ID": "req-json", **fake_api.h()})
    records = [json.loads(line) for line in json_log.getvalue().splitlines()]
    assert records and all(set(r) >= {"time", "level", "logger", "message", "request_id",
                                      "workspace_id"} for r in records)
    mine = [r for r in records if r["request_id"] == "req-json"]
    assert any(r["workspace_id"] == ws_id and "running -> pausing" in r["message"]
               for r in mine), mine
    assert any(r["logger"] == "den.access" and r["level"] == "info" for r in mine)
    assert all(r["time"].endswith("Z") for r in records)


def test_json_formatter_outside_a_request_and_with_a_traceback() -> None:
    out = io.StringIO()
    log = logging.getLogger("den.test.json")
    h = logs.handler("json", out)
    log.addHandler(h)
    log.propagate = False
    try:
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("it failed: %s", "really")
    finally:
        log.removeHandler(h)
        log.propagate = True
    record = json.loads(out.getvalue())
    assert record["message"] == "it failed: really"
    assert record["level"] == "error"
    assert record["request_id"] is None and record["workspace_id"] is None
    assert "ValueError: boom" in record["exc"]


def test_configure_routes_every_logger_through_one_handler() -> None:
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        logs.configure(level="warning", fmt="json")
        assert len(root.handlers) == 1 and root.level == logging.WARNING
        assert isinstance(root.handlers[0].formatter, logs.JsonFormatter)
        assert logging.getLogger("uvicorn.error").propagate
        assert not logging.getLogger("uvicorn.access").handlers
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])


def test_an_unexpected_error_is_logged_and_answered_with_the_request_id(
        make_settings: Callable[..., Settings], make_repo: Callable[..., Path],
        text_log: io.StringIO) -> None:
    runtime = FakeRuntime()
    app = create_app(make_settings(), runtime=runtime)
    with TestClient(app, raise_server_exceptions=False) as client:
        api = ApiClient(client, users(app))
        ws_id = api.create(make_repo("api"), name="api")["id"]
        runtime.fail_next["exec"] = RuntimeError("a bug")
        r = client.post(f"{WS}/{ws_id}/exec", json={"cmd": ["true"]},
                        headers={"X-Request-ID": "req-bug", **api.h()})
    assert r.status_code == 500 and r.json()["error"]["code"] == "internal"
    assert r.headers["x-request-id"] == "req-bug"
    crash = [ln for ln in text_log.getvalue().splitlines() if "unhandled error" in ln]
    assert crash and f"[req=req-bug ws={ws_id}]" in crash[0], crash
