"""Forges on the real engine: a private clone with a linked account, pull requests pushed
from the server's mirror to a real Git server over smart HTTP with authentication, and the
forge's REST API (GitHub, GitLab, Gitea as documented), with the token never visible inside
the workspace and the workspace's .git never trusted on the host."""

from __future__ import annotations

import base64
import functools
import secrets
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.config import Settings
from server.runtime.base import ExecResult
from server.runtime.docker_specs import container_of
from tests.conftest import ApiClient, users
from tests.forge_server import ForgeServer, make_forge_repo

pytestmark = pytest.mark.engine

TOKEN = "fgt_" + secrets.token_hex(16)
USER = {"github": "x-access-token", "gitlab": "oauth2", "gitea": "alice-forge"}


@pytest.fixture
def make_api(engine: None, make_settings: Callable[..., Settings]
             ) -> Iterator[Callable[..., ApiClient]]:
    clients: list[tuple[TestClient, ApiClient]] = []

    def make(**overrides: Any) -> ApiClient:
        app = create_app(make_settings(allowed_git_schemes=["http", "https"],
                                       local_repo_roots=[], **overrides))
        client = TestClient(app)
        client.__enter__()
        api = ApiClient(client, users(app))
        clients.append((client, api))
        return api

    yield make
    for client, api in clients:
        for ws in api.get("/api/v1/workspaces", user="root").json()["workspaces"]:
            api.delete(f"/api/v1/workspaces/{ws['id']}", user="root")
        client.__exit__(None, None, None)


def start_forge(kind: str, root: Path) -> ForgeServer:
    forge = ForgeServer(kind, root).__enter__()
    forge.add_user("alice-forge", TOKEN, name="Alice Liddell", email="alice@example.com")
    make_forge_repo(forge, "acme/api", {"README.md": "# api\n", "src/app.py": "print(1)\n"})
    return forge


@pytest.fixture(params=["github", "gitlab", "gitea"])
def forge(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ForgeServer]:
    f = start_forge(request.param, tmp_path / "forge")
    yield f
    f.__exit__(None, None, None)


@pytest.fixture
def github(tmp_path: Path) -> Iterator[ForgeServer]:
    f = start_forge("github", tmp_path / "forge")
    yield f
    f.__exit__(None, None, None)


def link(api: ApiClient, forge: ForgeServer) -> None:
    r = api.post("/api/v1/users/me/forges",
                 json={"kind": forge.kind, "base_url": forge.url, "token": TOKEN})
    assert r.status_code == 201, r.text


def root_exec(api: ApiClient, ws_id: str, script: str, timeout_s: float = 300) -> ExecResult:
    svc = api.app.state.workspaces
    req = svc.exec_request(svc.get(ws_id), ["bash", "-c", script], user="root",
                           timeout_s=timeout_s)
    result: ExecResult = api.call(functools.partial(svc.exec, ws_id, req,
                                                                  actor="test"))
    return result


def forge_git(forge: ForgeServer, *args: str) -> str:
    return subprocess.run(["git", "--git-dir", str(forge.bare("acme/api")), *args],
                          capture_output=True, text=True, check=True).stdout


def events(api: ApiClient, ws_id: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = api.get(f"/api/v1/workspaces/{ws_id}/events").json()["events"]
    return out


def assert_no_credential_inside(api: ApiClient, ws_id: str) -> None:
    """Search the workspace's whole filesystem, every process's environment and command
    line, and the container's configured environment for the token (plain or as the Basic
    auth header git sends)."""
    basic = base64.b64encode(f"x:{TOKEN}".encode()).decode()[4:20]  # a slice of the header
    # As regular expressions that do not contain the strings themselves, so that grep's own
    # command line (in /proc) does not match.
    needles = " ".join(f"-e '{n[:5]}[{n[5]}]{n[6:]}'" for n in (TOKEN, TOKEN[4:], basic))
    found = root_exec(api, ws_id,
                      f"grep -rlsa {needles} / --exclude-dir=proc --exclude-dir=sys "
                      f"--exclude-dir=dev; echo rc=$?")
    assert found.stdout.decode().strip() == "rc=1", found.stdout  # grep: nothing matched
    procs = root_exec(api, ws_id,
                      f"grep -lsa {needles} /proc/[0-9]*/environ /proc/[0-9]*/cmdline; "
                      "echo rc=$?; ps -eo args")
    out = procs.stdout.decode()
    assert "rc=1" in out and TOKEN not in out, out
    container = container_of(api.app.state.workspaces.spec_for(
        api.app.state.workspaces.get(ws_id)))
    inspect = subprocess.run(["docker", "inspect", container], capture_output=True, text=True,
                             check=True).stdout
    assert TOKEN not in inspect


def test_private_clone_and_pull_requests(make_api: Callable[..., ApiClient],
                                         forge: ForgeServer) -> None:
    api = make_api()
    url = forge.repo_url("acme/api")
    if forge.kind == "github":  # without a linked account the private repo does not clone
        ws = api.create(url, name="nolink")
        # Den's words; git's ("could not read Username") go to the log (issue 11)
        assert ws["state"] == "error" and "without credentials" in ws["state_reason"], ws
        assert "Username" not in ws["state_reason"]
        api.delete(f"/api/v1/workspaces/{ws['id']}")
    link(api, forge)
    ws = api.create(url, name="api")
    assert ws["state"] == "running", ws
    wid = ws["id"]
    clones = [r for r in forge.log if "git-upload-pack" in r.path]
    assert clones and all(r.headers["authorization"].startswith("Basic ") for r in clones)
    out = api.exec(wid, "git remote get-url origin; git config --list; "
                        "cat .git/logs/HEAD; head -3 .git/hooks/commit-msg")
    assert out["stdout"].startswith(url + "\n") and TOKEN not in out["stdout"]
    assert "den.workspace=api" in out["stdout"] and "# den-hook" in out["stdout"]
    assert "user.email=alice@example.com" in out["stdout"]  # the forge profile, for commits
    assert_no_credential_inside(api, wid)

    # First call: commits the uncommitted change, pushes a new branch, opens the request.
    api.exec(wid, "echo 'print(2)' > src/app.py && echo new > NEW.md")
    pr_url = f"/api/v1/workspaces/{wid}/pull-requests"
    r = api.post(pr_url, json={"title": "Print two", "body": "Because.",
                               "branch": "feature/two", "base": "main"})
    assert r.status_code == 201, r.text
    first = r.json()
    assert first["created"] is True and first["number"] == 1 and first["push"] == "create"
    assert first["url"].startswith(forge.url) and first["forge"] == forge.kind
    tip = forge_git(forge, "rev-parse", "feature/two").strip()
    assert tip == first["head_sha"]
    log = forge_git(forge, "log", "-1", "--format=%an <%ae>%n%B", "feature/two")
    assert log.startswith("Alice Liddell <alice@example.com>\nPrint two\n")
    assert "Den-Workspace: api" in log
    assert forge_git(forge, "show", "feature/two:src/app.py") == "print(2)\n"
    # The push carried the token as Basic auth with the forge's documented user name.
    pushes = [r for r in forge.log if "git-receive-pack" in r.path]
    want = "Basic " + base64.b64encode(f"{USER[forge.kind]}:{TOKEN}".encode()).decode()
    assert pushes and all(r.headers["authorization"] == want for r in pushes)
    assert_no_credential_inside(api, wid)

    # Again, with more work: the branch fast-forwards and the same request comes back.
    api.exec(wid, "echo more >> NEW.md")
    r = api.post(pr_url, json={"title": "Print two", "branch": "feature/two",
                               "commit_message": "More"})
    assert r.status_code == 200, r.text
    second = r.json()
    assert (second["number"], second["created"], second["push"]) == (1, False, "fast-forward")
    assert forge_git(forge, "rev-parse", "feature/two~1").strip() == tip

    # A rewritten branch: Den force-pushes over its own last push only.
    assert api.exec(wid, "git commit -q --amend -m 'More, reworded'")["exit_code"] == 0
    r = api.post(pr_url, json={"title": "Print two", "branch": "feature/two"})
    assert r.status_code == 200 and r.json()["push"] == "force-own", r.text
    assert forge_git(forge, "log", "-1", "--format=%s", "feature/two") == "More, reworded\n"

    # Someone else pushes to the branch: Den will not throw their commit away.
    other = forge.root / "other"
    subprocess.run(["git", "clone", "-q", "-b", "feature/two", str(forge.bare("acme/api")),
                    str(other)], check=True)
    subprocess.run(["git", "-C", str(other), "-c", "user.name=Bob", "-c", "user.email=b@x",
                    "commit", "-q", "--allow-empty", "-m", "bob's"], check=True)
    subprocess.run(["git", "-C", str(other), "push", "-q", "origin", "feature/two"], check=True)
    assert api.exec(wid, "git commit -q --amend -m 'Reworded again'")["exit_code"] == 0
    r = api.post(pr_url, json={"title": "Print two", "branch": "feature/two"})
    assert r.status_code == 409 and r.json()["error"]["code"] == "branch_conflict", r.text
    assert forge_git(forge, "log", "-1", "--format=%s", "feature/two") == "bob's\n"

    kinds = [e["kind"] for e in events(api, wid)]
    assert kinds.count("push") == 3 and kinds.count("pull_request") == 3
    assert kinds[-1] == "push_failed"
    assert forge.pulls.get("acme/api") and len(forge.pulls["acme/api"]) == 1
    assert_no_credential_inside(api, wid)


def test_malicious_git_config_never_runs_on_the_host(make_api: Callable[..., ApiClient],
                                                     github: ForgeServer) -> None:
    api = make_api()
    link(api, github)
    ws = api.create(github.repo_url("acme/api"), name="evil")
    assert ws["state"] == "running", ws
    wid = ws["id"]
    marker = f"/tmp/den-evil-{secrets.token_hex(6)}"
    assert not Path(marker).exists()
    setup = f"""
set -e
cat > /workspace/api/.evil.sh <<'SH'
#!/bin/sh
echo "ran $0 $*" >> {marker}
cat
SH
chmod +x /workspace/api/.evil.sh
mkdir -p /workspace/api/.evilhooks
for h in pre-commit commit-msg post-commit pre-push reference-transaction post-checkout \
         pre-auto-gc post-rewrite; do
  printf '#!/bin/sh\\necho hook %s >> {marker}\\nexit 0\\n' "$h" > /workspace/api/.evilhooks/$h
  chmod +x /workspace/api/.evilhooks/$h
done
echo '*.py filter=evil diff=evil' > .gitattributes
git config core.fsmonitor /workspace/api/.evil.sh
git config core.hooksPath /workspace/api/.evilhooks
git config filter.evil.clean /workspace/api/.evil.sh
git config filter.evil.smudge /workspace/api/.evil.sh
git config diff.evil.textconv /workspace/api/.evil.sh
git config core.sshCommand /workspace/api/.evil.sh
git config core.pager /workspace/api/.evil.sh
git config credential.helper '!/workspace/api/.evil.sh'
git config uploadpack.packObjectsHook /workspace/api/.evil.sh
git config remote.origin.url 'ext::sh -c /workspace/api/.evil.sh'
git config --add url.'ext::sh -c /workspace/api/.evil.sh #'.insteadOf http://
echo 'print(3)' > src/app.py
"""
    assert api.exec(wid, setup)["exit_code"] == 0
    r = api.post(f"/api/v1/workspaces/{wid}/pull-requests",
                 json={"title": "Evil", "branch": "evil", "base": "main"})
    assert r.status_code == 201, r.text
    # It all ran, but inside the sandbox (the workspace's own business) ...
    inside = api.exec(wid, f"cat {marker}")["stdout"]
    assert "hook pre-commit" in inside and ".evil.sh" in inside, inside
    # ... and nothing on the host: the host only read a bundle.
    assert not Path(marker).exists(), Path(marker).read_text()
    assert forge_git(github, "show", "evil:src/app.py") == "print(3)\n"

    # A hook that fails in the workspace stops the pull request, loudly.
    api.exec(wid, "printf '#!/bin/sh\\necho lint failed: tabs >&2\\nexit 1\\n' "
                  "> .evilhooks/pre-commit && echo x >> src/app.py")
    r = api.post(f"/api/v1/workspaces/{wid}/pull-requests",
                 json={"title": "Evil", "branch": "evil"})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == "commit_failed" and "lint failed" in r.text
    assert events(api, wid)[-1]["kind"] == "push_failed"
    assert not Path(marker).exists()


def test_policy_limits_and_forge_errors(make_api: Callable[..., ApiClient],
                                        github: ForgeServer) -> None:
    api = make_api(forge_max_push_mb=1)
    link(api, github)
    ws = api.create(github.repo_url("acme/api"), name="pol")
    assert ws["state"] == "running", ws
    wid = ws["id"]
    url = f"/api/v1/workspaces/{wid}/pull-requests"

    def refused(body: dict[str, Any], status: int, code: str) -> dict[str, Any]:
        r = api.post(url, json={"title": "T", **body})
        assert (r.status_code, r.json()["error"]["code"]) == (status, code), r.text
        out: dict[str, Any] = r.json()["error"]
        return out

    refused({"branch": "main"}, 403, "push_refused")
    refused({"branch": "release/1.0"}, 403, "push_refused")
    refused({"branch": "x", "base": "nope"}, 422, "base_missing")
    api.exec(wid, "head -c 3000000 /dev/urandom > blob.bin")
    refused({"branch": "big"}, 413, "push_too_large")
    assert "refs/heads/big" not in forge_git(github, "show-ref")
    api.exec(wid, "git rm -q --cached blob.bin && rm blob.bin && "
                  "git commit -q -m 'drop blob' && git checkout -q main")
    # Nothing to propose: the branch has no commits main lacks.
    refused({"branch": "empty"}, 422, "no_changes")

    # The forge fails after the push: reported as such, recorded, and a retry completes.
    api.exec(wid, "echo fix > FIX.md")
    github.fail_next(401, {"message": "Bad credentials"}, method="POST")
    err = refused({"branch": "fix"}, 422, "forge_token_invalid")
    assert "was pushed" in err["message"]
    assert events(api, wid)[-1]["kind"] == "pull_request_failed"
    assert "refs/heads/fix" in forge_git(github, "show-ref")
    github.fail_next(429, {"message": "secondary rate limit"}, headers={"Retry-After": "17"},
                     method="POST")
    r = api.post(url, json={"title": "T", "branch": "fix"})
    assert r.status_code == 429 and r.headers["retry-after"] == "17", r.text
    r = api.post(url, json={"title": "T", "branch": "fix", "draft": True})
    assert r.status_code == 201 and r.json()["push"] == "up-to-date", r.text
    assert github.pulls["acme/api"][0]["draft"] is True
    github.fail_next(403, {"message": "Resource not accessible by personal access token"},
                     method="GET")
    refused({"branch": "fix"}, 403, "forge_forbidden")

    # Deleting the workspace removes its mirror on the server.
    mirror = api.app.state.settings.data_dir / "mirrors" / f"{wid}.git"
    assert (mirror / "HEAD").exists()
    assert api.delete(f"/api/v1/workspaces/{wid}").status_code == 204
    assert not mirror.exists()
