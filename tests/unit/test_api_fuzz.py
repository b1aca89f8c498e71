"""A bounded schemathesis run against a real server process (``tests.fake_serve``: ``den
serve``'s own code on the fake runtime, so the HTTP surface is the same): every operation of
the OpenAPI document, a few examples each, with a fixed seed. It fails on any 5xx, any
response (status, headers, body) the document does not describe, any 2xx for invalid input,
an `Allow` header that does not name the path's methods, and an operation that ignores a
missing token. Two checks are left out: `positive_data_acceptance` (a request that fits the
schema but breaks a rule the schema cannot say, such as "repo or from_snapshot", is a 422),
and `unsupported_method` (a `DELETE .../ssh-keys/challenge` reaches the route of
`.../ssh-keys/{key_id}` and is a 422 for its id, where the check wants a 405)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from tests.server_process import DenServer

SEED = 20261206
EXAMPLES = 5


def test_schemathesis_finds_nothing(tmp_path: Path, repos_root: Path,
                                    make_repo: Callable[..., Path]) -> None:
    srv = DenServer(tmp_path / "data", repos_root, "dentest-fuzz", user="alice",
                    module="tests.fake_serve", ssh_port=0)
    # Schemathesis sends as fast as it can: rate limits off (tests/unit/test_rate_limits.py
    # has them), else its checks meet 429s (declared, but they hide the routes' answers).
    srv.env.update(DEN_RATE_LIMIT_PER_TOKEN="0", DEN_RATE_LIMIT_PER_ADDRESS="0")
    try:
        srv.start()
        # A workspace the {ref} operations can find (most examples still miss it: 404).
        r = srv.http.post("/api/v1/workspaces",
                          json={"name": "api", "repo": {"url": str(make_repo())}})
        assert r.status_code == 202, r.text
        st = Path(sys.executable).parent / "schemathesis"
        p = subprocess.run(
            [str(st), "run", f"http://127.0.0.1:{srv.port}/openapi.json",
             "-H", f"Authorization: Bearer {srv.token}", "-n", str(EXAMPLES),
             "--seed", str(SEED), "--checks", "all",
             "--exclude-checks", "positive_data_acceptance,unsupported_method", "--no-color"],
            capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stdout[-6000:] + p.stderr[-2000:]
    finally:
        srv.close()
