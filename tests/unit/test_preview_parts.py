"""The pure parts of preview URLs: hosts and paths, /proc/net/tcp, headers, signed tokens,
and the access decision."""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

import pytest

from server.preview import headers, tokens, urls
from server.preview.service import Share, may_open

# --- hosts and paths -------------------------------------------------------------------------


@pytest.mark.parametrize(("host", "want"), [
    ("8000--api--alice.preview.example", urls.HostTarget(8000, "api", "alice")),
    ("8000--api--alice.preview.example:8443", urls.HostTarget(8000, "api", "alice")),
    ("8000--API--Alice.Preview.Example.", urls.HostTarget(8000, "api", "alice")),
    ("3000--my--api--bob_x.preview.example", urls.HostTarget(3000, "my--api", "bob_x")),
    ("1--a--b.preview.example", urls.HostTarget(1, "a", "b")),
    ("65535--a--b.preview.example", urls.HostTarget(65535, "a", "b")),
])
def test_preview_hosts_parse(host: str, want: urls.HostTarget) -> None:
    assert urls.is_preview_host(host, "preview.example")
    assert urls.parse_host(host, "preview.example") == want


@pytest.mark.parametrize("host", [
    "0--api--alice.preview.example", "65536--api--alice.preview.example",
    "99999--api--alice.preview.example", "-1--api--alice.preview.example",
    "8000-api-alice.preview.example", "8000--api.preview.example",
    "x.8000--api--alice.preview.example", "8000--api--alice.x.preview.example",
    "8000----alice.preview.example", "8000--api--.preview.example",
    "preview.example", ".preview.example",
])
def test_bad_preview_hosts_are_not_targets(host: str) -> None:
    assert urls.parse_host(host, "preview.example") is None


def test_hosts_outside_the_domain_are_not_preview_hosts() -> None:
    for host in ("den.example", "8000--api--alice.den.example", "evilpreview.example",
                 "[::1]:8080", "127.0.0.1:8080", ""):
        assert not urls.is_preview_host(host, "preview.example")
    assert not urls.is_preview_host("8000--api--alice.preview.example", "")


@pytest.mark.parametrize(("path", "want"), [
    ("/preview/api/8000/", urls.PathTarget("api", 8000, "/")),
    ("/preview/api/8000", urls.PathTarget("api", 8000, "")),
    ("/preview/ws0123/1/a/b?c", urls.PathTarget("ws0123", 1, "/a/b?c")),
    ("/preview/api/65535/x/", urls.PathTarget("api", 65535, "/x/")),
])
def test_preview_paths_parse(path: str, want: urls.PathTarget) -> None:
    assert urls.parse_path(path) == want
    assert want.prefix == f"/preview/{want.workspace}/{want.port}"


@pytest.mark.parametrize("path", [
    "/preview/", "/preview/api", "/preview/api/", "/preview/api/0/", "/preview/api/65536/",
    "/preview/api/80a/", "/preview//8000/", "/preview/api/-1/", "/previews/api/8000/",
    "/preview/api/00000080/", "/preview/" + "x" * 65 + "/80/",
])
def test_bad_preview_paths_are_not_targets(path: str) -> None:
    assert urls.parse_path(path) is None


def test_urls_of_a_port() -> None:
    assert urls.host_url(scheme="https", domain="preview.example", port=8000,
                         workspace="api", owner="alice") == \
        "https://8000--api--alice.preview.example/"
    assert urls.host_url(scheme="http", domain="p.test", port=3000, workspace="api",
                         owner="alice", public_port=8080) == "http://3000--api--alice.p.test:8080/"
    assert urls.host_url(scheme="https", domain="", port=1, workspace="a", owner="b") is None
    # owner names a DNS label cannot carry, or that make the label ambiguous, or too long
    for owner in ("al.ice", "a--b", "x" * 60):
        assert urls.host_url(scheme="https", domain="p.test", port=1, workspace="a",
                             owner=owner) is None
    assert urls.path_url("http://den.test:8080/", "ws1", 8000) == \
        "http://den.test:8080/preview/ws1/8000/"
    assert urls.valid_port("080") == 80 and urls.valid_port("0") is None
    assert urls.valid_port("1e3") is None and urls.valid_port("") is None


# --- /proc/net/tcp ---------------------------------------------------------------------------

PROC_NET_TCP = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid
   0: 00000000:1F40 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000
   1: 0100007F:0BB8 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000
   2: 0100007F:0BB8 0100007F:A000 01 00000000:00000000 00:00000000 00000000  1000
   3: 0200110A:1388 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000
   4: 0500007F:0050 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000
garbage line
   5: 00000000:ZZZZ 00000000:0000 0A
   6: 00000000:0000 00000000:0000 0A
  sl  local_address                         remote_address                        st
   0: 00000000000000000000000000000000:2328 00000000000000000000000000000000:0000 0A
   1: 00000000000000000000000001000000:1F41 00000000000000000000000000000000:0000 0A
   2: 0000000000000000FFFF00000100007F:1F42 00000000000000000000000000000000:0000 0A
   3: 20010DB8000000000000000000000001:1F43 00000000000000000000000000000000:0000 0A
"""


def test_listening_ports_are_loopback_or_any_in_listen_state() -> None:
    # 8000 any, 3000 loopback (the established row is not a listener), 80 on 127.0.0.5,
    # 9000/8001/8002 on v6 any/loopback/mapped; 5000 on 10.17.0.2 and 8003 on 2001:db8::1
    # cannot be reached through the loopback; broken lines are skipped
    assert urls.listening_ports(PROC_NET_TCP) == [80, 3000, 8000, 8001, 8002, 9000]
    assert urls.listening_ports("") == []
    many = "\n".join(f"0: 00000000:{p:04X} 00000000:0000 0A" for p in range(1, 3000))
    assert len(urls.listening_ports(many, limit=100)) == 100


# --- headers ---------------------------------------------------------------------------------


def _h(pairs: list[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    return [(k.encode(), v.encode()) for k, v in pairs]


def test_request_headers_keep_host_drop_hop_by_hop_and_den_credentials() -> None:
    given = _h([
        ("host", "8000--api--alice.p.test"), ("connection", "keep-alive, X-Secret"),
        ("x-secret", "1"), ("keep-alive", "timeout=5"), ("te", "trailers"),
        ("transfer-encoding", "chunked"), ("upgrade", "h2c"), ("proxy-authorization", "x"),
        ("x-forwarded-for", "6.6.6.6"), ("forwarded", "for=6.6.6.6"),
        ("x-real-ip", "6.6.6.6"), ("x-forwarded-host", "evil"),
        ("cookie", "den_session=abc; app=1; den_preview=x;den_share=y; other=2"),
        ("authorization", "Bearer den_secrettoken"), ("accept", "text/html"),
        ("content-length", "5"),
    ])
    out = headers.request_headers(given, client_ip="10.0.0.1", proto="https",
                                  host="8000--api--alice.p.test")
    assert out == _h([
        ("host", "8000--api--alice.p.test"), ("cookie", "app=1; other=2"),
        ("accept", "text/html"), ("content-length", "5"),
        ("x-forwarded-for", "10.0.0.1"), ("x-forwarded-proto", "https"),
        ("x-forwarded-host", "8000--api--alice.p.test"),
        ("forwarded", 'for=10.0.0.1;proto=https;host="8000--api--alice.p.test"'),
    ])


def test_request_headers_path_form_and_ipv6_and_app_authorization() -> None:
    given = _h([("host", "den.test"), ("cookie", "den_session=abc"),
                ("authorization", "Bearer app-token")])
    out = dict(headers.request_headers(given, client_ip="::1", proto="http", host="den.test",
                                       prefix="/preview/ws1/8000"))
    assert b"cookie" not in out  # nothing left of it
    assert out[b"authorization"] == b"Bearer app-token"  # the app's own scheme passes
    assert out[b"forwarded"] == b'for="[::1]";proto=http;host="den.test"'
    assert out[b"x-forwarded-prefix"] == b"/preview/ws1/8000"


def test_response_headers_drop_hop_by_hop_and_den_cookies() -> None:
    given = _h([("connection", "close, x-hop"), ("x-hop", "1"), ("transfer-encoding", "chunked"),
                ("content-type", "text/plain"), ("set-cookie", "den_session=stolen; Path=/"),
                ("set-cookie", "DEN_preview=x"), ("set-cookie", "app=1; Path=/; HttpOnly"),
                ("location", "/next")])
    assert headers.response_headers(given) == _h([
        ("content-type", "text/plain"), ("set-cookie", "app=1; Path=/; HttpOnly"),
        ("location", "/next")])


def test_response_headers_on_the_path_form_stay_under_the_prefix() -> None:
    p = "/preview/ws1/8000"
    given = _h([("location", "/login?x=1"), ("set-cookie", "a=1; Path=/; HttpOnly"),
                ("set-cookie", "b=2"), ("set-cookie", "c=3; path=/api"),
                ("set-cookie", f"d=4; Path={p}/x")])
    out = headers.response_headers(given, prefix=p, origin="https://den.test")
    assert out == _h([("location", f"{p}/login?x=1"), ("set-cookie", f"a=1; Path={p}/; HttpOnly"),
                      ("set-cookie", f"b=2; Path={p}/"), ("set-cookie", f"c=3; Path={p}/api"),
                      ("set-cookie", f"d=4; Path={p}/x")])
    for location, want in [("https://den.test/x", f"{p}/x"), (f"{p}/y", f"{p}/y"),
                           ("//other.test/x", "//other.test/x"), ("relative", "relative"),
                           ("https://other.test/x", "https://other.test/x")]:
        got = headers.response_headers(_h([("location", location)]), prefix=p,
                                       origin="https://den.test")
        assert got == _h([("location", want)]), location


def test_without_den_cookies() -> None:
    assert headers.without_den_cookies("den_session=1") == ""
    assert headers.without_den_cookies(" a=1 ;den_x=2; b=3 ") == "a=1; b=3"


# --- tokens ----------------------------------------------------------------------------------

KEY = tokens.derive_key("secret")


def test_share_links_verify_only_unaltered_unexpired_and_for_their_purpose() -> None:
    now = time.time()
    token = tokens.share_link(KEY, workspace_id="ws1", port=8000, link_id="lk1",
                              expires_at=int(now) + 60)
    payload = tokens.verify(KEY, tokens.SHARE, token, now=now)
    assert tokens.share_link_id(payload, workspace_id="ws1", port=8000) == "lk1"
    assert tokens.share_link_id(payload, workspace_id="ws1", port=8001) is None
    assert tokens.share_link_id(payload, workspace_id="ws2", port=8000) is None
    # A link made before links could be revoked names no row: it opens nothing.
    old = tokens.sign(KEY, tokens.SHARE, {"w": "ws1", "p": 8000}, expires_at=int(now) + 60)
    old_payload = tokens.verify(KEY, tokens.SHARE, old, now=now)
    assert tokens.share_link_id(old_payload, workspace_id="ws1", port=8000) is None
    assert tokens.verify(KEY, tokens.SHARE, token, now=now + 61) is None  # expired
    assert tokens.verify(KEY, tokens.COOKIE, token, now=now) is None  # another purpose
    assert tokens.verify(tokens.derive_key("other"), tokens.SHARE, token, now=now) is None
    body, mac = token.split(".")
    forged_body = tokens.sign(KEY, tokens.SHARE, {"w": "ws2", "p": 8000},
                              expires_at=int(now) + 60).split(".")[0]
    for bad in (f"{forged_body}.{mac}", f"{body}.{mac[:-2]}AA", f"{body}x.{mac}", body, "",
                ".", "a.b.c", "x" * 2000, f"{body}.{mac}=", "!!.!!"):
        assert tokens.verify(KEY, tokens.SHARE, bad, now=now) is None, bad
    assert tokens.share_link_id(None, workspace_id="ws1", port=8000) is None


# --- the decision ----------------------------------------------------------------------------


def _user(uid: int, admin: bool = False) -> Any:
    return SimpleNamespace(id=uid, is_admin=admin)


@pytest.mark.parametrize(("share", "viewer", "link", "public_ok", "want"), [
    (Share.PRIVATE, _user(1), False, True, True),  # the owner
    (Share.PRIVATE, _user(9, admin=True), False, True, True),  # an admin
    (Share.PRIVATE, _user(2), False, True, False),
    (Share.PRIVATE, None, False, True, False),
    (Share.PRIVATE, None, True, True, True),  # a valid share link
    (Share.USERS, _user(2), False, True, True),
    (Share.USERS, None, False, True, False),
    (Share.PUBLIC, None, False, True, True),
    (Share.PUBLIC, None, False, False, False),  # public sharing turned off
    (Share.PUBLIC, _user(2), False, False, True),  # ... reads as users
])
def test_may_open(share: Share, viewer: Any, link: bool, public_ok: bool, want: bool) -> None:
    assert may_open(share=share, viewer=viewer, owner_id=1, link_ok=link,
                    public_allowed=public_ok) is want


def test_close_codes_passed_to_the_app_are_sendable() -> None:
    from server.preview.proxy import _sendable

    assert [_sendable(c) for c in (1000, 1001, 1011, 3000, 4999)] == [1000, 1001, 1011,
                                                                      3000, 4999]
    assert {_sendable(c) for c in (None, 1005, 1006, 1015, 999, 2000, 5000, "x")} == {1001}
