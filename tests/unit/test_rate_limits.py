"""API rate limits (issue 11 §2): token buckets per token, per source address and for sign-ins,
429 ``rate_limited`` with Retry-After, checked before authentication."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from starlette.types import Message, Scope
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect as ws_connect

from server.app import create_app
from server.client import Den, DenAPIError
from server.config import Settings
from server.quotas.rates import Buckets, credential_key, refuse_websocket
from server.runtime.fake import FakeRuntime
from tests.conftest import ApiClient, FakeClock, users
from tests.server_process import DenServer
from tests.unit.test_api_fake import assert_error

ME = "/api/v1/users/me"
SLOW = 0.001  # one request back every 1,000 s: none comes back during a test
WAIT_S = 30


def test_a_bucket_lets_its_burst_through_then_refills_at_its_rate() -> None:
    clock = FakeClock(100.0)
    buckets = Buckets(rate=2.0, burst=3, clock=clock)
    assert [buckets.take("a") for _ in range(3)] == [0, 0, 0]
    assert buckets.take("a") == pytest.approx(0.5)  # one back in half a second
    assert buckets.take("b") == 0  # another key has its own
    clock.now += 0.5
    assert buckets.take("a") == 0
    assert buckets.take("a") > 0
    clock.now += 100  # refills up to the burst, no more
    assert [buckets.take("a") for _ in range(4)][:3] == [0, 0, 0]
    assert buckets.take("a") > 0


def test_buckets_are_bounded() -> None:
    buckets = Buckets(rate=SLOW, burst=1, max_keys=2, clock=FakeClock(100.0))
    for key in ("a", "b", "c"):
        assert buckets.take(key) == 0
    assert buckets.take("c") > 0 and buckets.take("b") > 0
    assert buckets.take("a") == 0  # the least recently used was forgotten (a full bucket)


def test_the_key_is_a_hash_never_the_secret() -> None:
    from starlette.datastructures import Headers

    key = credential_key(Headers({"authorization": "Bearer den_secret"}))
    assert key is not None and "den_secret" not in key
    assert credential_key(Headers({"cookie": "x=1; den_session=abc"})) is not None
    assert credential_key(Headers({})) is None


@pytest.fixture
def limited(make_settings: Callable[..., Settings]) -> Iterator[Callable[..., ApiClient]]:
    clients: list[TestClient] = []

    def make(**overrides: Any) -> ApiClient:
        client = TestClient(create_app(make_settings(**overrides), runtime=FakeRuntime()))
        client.__enter__()
        clients.append(client)
        return ApiClient(client, users(client.app))

    yield make
    for client in clients:
        client.__exit__(None, None, None)


def test_a_token_past_its_burst_is_429_with_retry_after_and_others_pass(
        limited: Callable[..., ApiClient]) -> None:
    api = limited(rate_limit_per_token=SLOW, rate_limit_token_burst=3)
    assert [api.get(ME).status_code for _ in range(3)] == [200, 200, 200]
    r = api.get(ME)
    assert_error(r, 429, "rate_limited")
    assert int(r.headers["retry-after"]) >= 900
    assert api.get(ME, user="bob").status_code == 200  # bob's token has its own bucket
    # refused before authentication: an unknown token is counted too, not looked up forever
    bad = {"Authorization": "Bearer den_nope"}
    assert [api.client.get(ME, headers=bad).status_code for _ in range(4)] == [401] * 3 + [429]


def test_one_address_is_limited_whatever_tokens_it_uses(
        limited: Callable[..., ApiClient]) -> None:
    api = limited(rate_limit_per_address=SLOW, rate_limit_address_burst=4)
    codes = [api.get(ME, user=u).status_code for u in ("alice", "bob", "root", "alice")]
    assert codes == [200] * 4
    assert_error(api.get(ME, user="bob"), 429, "rate_limited")
    assert_error(api.client.get(ME), 429, "rate_limited")  # no token: the same address
    assert api.client.get("/healthz").status_code == 200  # outside /api/: not limited


def test_sign_in_attempts_have_a_slow_rate_of_their_own(
        limited: Callable[..., ApiClient]) -> None:
    api = limited(rate_limit_login_per_address=SLOW, rate_limit_login_burst=2)
    for _ in range(2):
        r = api.client.post("/login/token", data={"token": "den_guess"})
        assert r.status_code != 429, r.text
    r = api.client.post("/login/token", data={"token": "den_guess"})
    assert r.status_code == 429 and "Too many sign-in attempts" in r.text
    assert int(r.headers["retry-after"]) >= 900
    assert api.client.get("/login").status_code == 200  # the form itself is not a sign-in
    assert api.get(ME).status_code == 200  # the API has its own buckets


def test_zero_turns_a_limit_off(limited: Callable[..., ApiClient]) -> None:
    api = limited(rate_limit_per_token=0, rate_limit_per_address=0, rate_limit_token_burst=1,
                  rate_limit_address_burst=1)
    assert {api.get(ME).status_code for _ in range(5)} == {200}


# --- WebSockets -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def den_serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DenServer]:
    """A real ``den serve`` (uvicorn; the fake runtime) whose tokens have a burst of 3."""
    base = tmp_path_factory.mktemp("ws-rates")
    (base / "repos").mkdir()
    srv = DenServer(base / "data", base / "repos", "dentest-wsrate", user="alice",
                    module="tests.fake_serve", ssh_port=0, rate_limit_per_token=SLOW,
                    rate_limit_token_burst=3)
    try:
        srv.start()
        yield srv
    finally:
        srv.close()


def test_websocket_opens_take_from_the_same_buckets_and_are_refused_before_the_upgrade(
        den_serve: DenServer) -> None:
    srv = den_serve
    url = f"ws://127.0.0.1:{srv.port}/api/v1/workspaces/nope/exec/stream"
    headers = {"Authorization": f"Bearer {srv.token}"}
    assert srv.http.get(ME).status_code == 200  # 1 of the token's 3
    for _ in range(2):  # 2 and 3: opened (then ended: no such workspace)
        with ws_connect(url, additional_headers=headers) as conn:
            assert json.loads(conn.recv(timeout=WAIT_S))["error"]["code"] == "not_found"
            with pytest.raises(ConnectionClosed) as closed:
                conn.recv(timeout=WAIT_S)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 4404
    with pytest.raises(InvalidStatus) as refused:
        ws_connect(url, additional_headers=headers)
    response = refused.value.response
    assert response.status_code == 429
    assert int(response.headers["Retry-After"]) >= 900
    assert json.loads(bytes(response.body or b""))["error"]["code"] == "rate_limited"
    assert_error(srv.http.get(ME), 429, "rate_limited")  # one bucket for both
    # The Python client says so as it does for HTTP.
    den = Den(str(srv.http.base_url), srv.token)
    with pytest.raises(DenAPIError) as err, den.websocket(url, what="the stream"):
        pass
    assert (err.value.status, err.value.code) == (429, "rate_limited")


def test_a_server_without_websocket_denials_closes_with_4429() -> None:
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "websocket.connect"}

    async def send(message: Message) -> None:
        sent.append(message)

    scope: Scope = {"type": "websocket", "path": "/api/v1/workspaces/x/terminal", "extensions": {}}
    asyncio.run(refuse_websocket(scope, receive, send, 2.5))
    assert [m["type"] for m in sent] == ["websocket.accept", "websocket.send",
                                         "websocket.close"]
    assert json.loads(sent[1]["text"]) == {
        "type": "error", "error": {"code": "rate_limited",
                                   "message": "too many requests; try again in 3 s"}}
    assert sent[2]["code"] == 4429
