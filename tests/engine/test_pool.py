"""The warm pool on the real engine: a create claims a frozen, never-used gVisor sandbox (the
event log says so; the workspace works, has its own host name, given by the rename armed when
the pool made the sandbox, and its repository, written from the host), the pool refills, nothing
of one user is in the sandbox another user claims next, a create that does not fit boots its
own, the budget holds, and a restart (``kill -9``) leaves no orphan and refills the pool."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import (
    RUN_PREFIX,
    bare_repo,
    container_state,
    engine_objects,
    remove_engine_objects,
    unmount_disks,
)
from tests.engine.test_sleep import docker, wait
from tests.server_process import DenServer

pytestmark = pytest.mark.engine
METRICS_TOKEN = "pool-metrics-token"


class Pooled(DenServer):
    def ws(self, wid: str, http: httpx.Client | None = None) -> dict[str, Any]:
        r = (http or self.http).get(f"/api/v1/workspaces/{wid}")
        assert r.status_code == 200, r.text
        return dict(r.json())

    def exec(self, wid: str, cmd: str, http: httpx.Client | None = None,
             env: dict[str, str] | None = None) -> str:
        r = (http or self.http).post(f"/api/v1/workspaces/{wid}/exec",
                                     json={"cmd": cmd, "env": env or {}})
        assert r.status_code == 200 and r.json()["exit_code"] == 0, r.text
        return str(r.json()["stdout"])

    def create(self, repo: Path, name: str, http: httpx.Client | None = None,
               **kw: Any) -> str:
        client = http or self.http
        r = client.post("/api/v1/workspaces", json={"name": name, "repo": {"url": str(repo)},
                                                    **kw})
        assert r.status_code == 202, r.text
        wid = str(r.json()["id"])
        assert wait(lambda: self.ws(wid, client)["state"] == "running", 120), \
            (self.ws(wid, client), self.log_tail())
        return wid

    def pool_notes(self, wid: str, http: httpx.Client | None = None) -> list[str]:
        r = (http or self.http).get(f"/api/v1/workspaces/{wid}/events")
        return [str(e["message"]) for e in r.json()["events"] if e["kind"] == "pool"]

    def waiting(self) -> list[str]:
        """Workspace ids of the pool's sandboxes: frozen, labelled so, and with no row."""
        rows = {w["id"] for w in self.http.get("/api/v1/workspaces").json()["workspaces"]}
        out = docker("ps", "--filter", "label=den.role=pool",
                     "--format", '{{.Label "den.workspace"}} {{.Names}}')
        return [line.split()[0] for line in out.splitlines()
                if line.split()[1].startswith(self.prefix + "-") and line.split()[0] not in rows
                and container_state(line.split()[1]) == "frozen"]

    def ready(self) -> list[str]:
        """:meth:`waiting`, once the pool counts them too: the kernel shows a sandbox frozen
        a moment before the pool has measured it and can hand it out."""
        waiting = self.waiting()
        return waiting if self.metric("den_pool_sandboxes") == len(waiting) else []

    def as_user(self, user: str) -> httpx.Client:
        token = self._cli("admin", "token", "--user", user)
        return httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=60,
                            headers={"Authorization": f"Bearer {token}"})

    def metric(self, name: str) -> float:
        r = self.http.get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
        assert r.status_code == 200, r.text
        text = r.text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(name + "{") or line.startswith(name + " "))


def remove_server_objects(prefix: str) -> None:
    remove_engine_objects(prefix + "-")  # the pool's frozen sandboxes too, and the network
    unmount_disks(prefix)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pool-repo")
    (root / "repos").mkdir()
    return bare_repo(root / "repos", root / "src")


def _server(root: Path, repos: Path, tag: str, **settings: Any) -> Pooled:
    return Pooled(root / "data", repos, f"{RUN_PREFIX}-{tag}{os.getpid() % 1000}",
                  user="alice", default_memory_mb=512, default_disk_gb=1, stop_timeout_s=2,
                  ssh_port=0, reaper_interval_s=0, metrics_token=METRICS_TOKEN,
                  **settings)


@pytest.fixture(scope="module")
def srv(engine: None, repo: Path, tmp_path_factory: pytest.TempPathFactory
        ) -> Iterator[Pooled]:
    s = _server(tmp_path_factory.mktemp("pool"), repo.parent, "pool", pool_size=1,
                pool_memory_budget_mb=1024)
    s.start()
    try:
        yield s
    finally:
        s.close()
        remove_server_objects(s.prefix)


def test_a_create_claims_a_pooled_sandbox_and_the_pool_refills(srv: Pooled, repo: Path
                                                               ) -> None:
    assert wait(lambda: len(srv.ready()) == 1, 120), srv.log_tail()
    [pooled] = srv.ready()
    claimed_at = time.time()
    wid = srv.create(repo, "api")
    assert wid == pooled, "the create did not take the waiting sandbox"
    # frozen only once its boot had settled: den-init was done (tmux up, its marker written)
    # before the claim, not resumed by it
    assert float(srv.exec(wid, "date +%s.%N -r /tmp/.den-ready")) < claimed_at
    assert srv.pool_notes(wid) == ["took a sandbox from the warm pool"]
    assert srv.exec(wid, "hostname && cat /etc/hostname && grep -c api /etc/hosts") \
        == "api\napi\n1\n"
    assert srv.exec(wid, "cat /workspace/api/README.md") == "# api\n"
    assert srv.exec(wid, "stat -c '%U:%G' /workspace/api /workspace/api/README.md") \
        == "dev:dev\ndev:dev\n"
    assert "den-hostname" not in srv.exec(wid, "ps -eo args")  # the armed rename ended
    # the fast paths served the claim: the rename armed at fill time, the host's seed
    log = srv.log.read_text(errors="replace")
    assert "could not be made ready" not in log and "the engine seeds" not in log, log[-3000:]
    r = srv.http.put(f"/api/v1/workspaces/{wid}/files", params={"path": "api/new.txt"},
                     content=b"hi")
    assert r.status_code == 200, r.text
    assert srv.exec(wid, "cat /workspace/api/new.txt") == "hi"
    r = srv.http.get(f"/api/v1/workspaces/{wid}/files", params={"path": "api/README.md"})
    assert (r.status_code, r.content) == (200, b"# api\n")
    assert wait(lambda: len(srv.ready()) == 1 and srv.ready() != [wid], 120), \
        srv.log_tail()
    assert srv.metric("den_pool_claims_total") >= 1


def test_nothing_of_one_user_is_in_the_sandbox_another_claims(srv: Pooled, repo: Path
                                                              ) -> None:
    assert wait(lambda: len(srv.ready()) == 1, 120), srv.log_tail()
    alice = srv.http
    a = srv.create(repo, "alice-ws", alice)
    assert srv.pool_notes(a, alice) == ["took a sandbox from the warm pool"]
    srv.exec(a, "echo alice-secret > /tmp/alice-secret; "
                "tmux new-session -d -s alice 'ALICE_MARK=1 sleep 4321'", alice,
             env={"ALICE_ENV": "alice-value"})
    mine = srv.exec(a, "ls -A /tmp; ps -eo args; cat /proc/*/environ 2>/dev/null "
                       "| tr '\\0' '\\n'", alice)
    assert "alice-secret" in mine and "4321" in mine and "ALICE_MARK" in mine, mine
    assert wait(lambda: len(srv.ready()) == 1, 120), srv.log_tail()
    with srv.as_user("bob") as bob:
        b = srv.create(repo, "bob-ws", bob)
        assert b != a and srv.pool_notes(b, bob) == ["took a sandbox from the warm pool"]
        seen = srv.exec(b, "ls -A /tmp; ps -eo args; env; cat /proc/*/environ 2>/dev/null "
                           "| tr '\\0' '\\n'", bob)
    assert "alice" not in seen.lower(), seen
    assert "4321" not in seen


def test_a_create_that_does_not_fit_boots_its_own(srv: Pooled, repo: Path) -> None:
    assert wait(lambda: len(srv.ready()) == 1, 120), srv.log_tail()
    [pooled] = srv.ready()
    wid = srv.create(repo, "big", resources={"memory_mb": 768})
    assert wid != pooled and srv.pool_notes(wid) == []
    assert srv.waiting() == [pooled]
    assert srv.exec(wid, "hostname") == "big\n"


def test_the_budget_holds_and_a_restart_leaves_no_orphan(
        engine: None, repo: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    # Three asked for in 70 MiB: a frozen sandbox holds ~30 MiB (measured), so two fit, and
    # the third would not; the pool says once when the budget has no room left.
    s = _server(tmp_path_factory.mktemp("pool-budget"), repo.parent, "poolb", pool_size=3,
                pool_memory_budget_mb=70)
    s.start()
    try:
        assert wait(lambda: "has no room for another" in s.log_tail(20000), 180), \
            s.log_tail()
        held, count = s.metric("den_pool_memory_bytes"), s.metric("den_pool_sandboxes")
        assert 0 < held <= 70 * 1024 * 1024, held
        assert 1 <= count < 3 and len(s.waiting()) == count, (count, s.waiting())
        before = set(s.waiting())
        assert before
        s.kill9()
        s.start()
        # the old run's sandboxes are gone (removed as orphans) and new ones wait
        assert wait(lambda: bool(s.waiting()) and not before & set(s.waiting()), 120), \
            s.log_tail()
        left = {name for _, name in engine_objects(s.prefix + "-")}
        assert not any(old in name for old in before for name in left), left
    finally:
        s.close()
        remove_server_objects(s.prefix)
