"""The forge layer's parts on real git and a real HTTP test forge (no engine): push policy,
bundle parsing, provider requests, the REST client's error mapping, the server-owned mirror,
and Den's git hooks."""

from __future__ import annotations

import base64
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.errors import ValidationFailed
from server.forges import policy
from server.forges.accounts import Credential
from server.forges.base import ApiRequest, RepoRef, repo_ref
from server.forges.client import ForgeClient
from server.forges.errors import (
    BaseMissing,
    BranchConflict,
    ForgeForbidden,
    ForgeNotFound,
    ForgeRateLimited,
    ForgeTokenInvalid,
    ForgeUnavailable,
    PushRefused,
)
from server.forges.hooks import install_hooks
from server.forges.mirror import DEN_REFS, Mirror, credential_env
from server.forges.providers import PROVIDERS
from server.outbound import OutboundPolicy
from tests.forge_server import ForgeServer, make_forge_repo

TOKEN = "fgt_unit_0123456789abcdef"
KINDS = ["github", "gitlab", "gitea"]
LOOPBACK = OutboundPolicy.of(["127.0.0.0/8"])  # the stand-in forge listens there


def git(*args: str, cwd: Path, env: dict[str, str] | None = None) -> str:
    base = {**os.environ, "GIT_AUTHOR_NAME": "T", "GIT_AUTHOR_EMAIL": "t@example.com",
            "GIT_COMMITTER_NAME": "T", "GIT_COMMITTER_EMAIL": "t@example.com"}
    out = subprocess.run(["git", *args], cwd=cwd, env={**base, **(env or {})},
                         capture_output=True, text=True, check=True)
    return out.stdout


@pytest.fixture(params=KINDS)
def forge(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ForgeServer]:
    with ForgeServer(request.param, tmp_path / "forge") as f:
        f.add_user("alice", TOKEN, name="Alice Liddell", email="alice@example.com")
        f.add_user("reader", "fgt_readonly_0123456789", can_write=False)
        make_forge_repo(f, "acme/api", {"README.md": "# api\n"})
        yield f


def cred_for(forge: ForgeServer, token: str = TOKEN, username: str = "alice") -> Credential:
    prov = PROVIDERS[forge.kind]
    return Credential(account_id=1, kind=forge.kind, base_url=forge.url,
                      api_url=prov.default_api_url(forge.url), username=username,
                      author_name="Alice", author_email="alice@example.com", token=token)


def client_for(forge: ForgeServer, token: str = TOKEN) -> ForgeClient:
    c = cred_for(forge, token)
    return ForgeClient(PROVIDERS[forge.kind], api_url=c.api_url, token=token, timeout_s=10)


# --- policy --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["feature/x", "den/api", "fix-1.2", "a_b"])
def test_good_branch_names(name: str) -> None:
    assert policy.check_branch_name(name) == name


@pytest.mark.parametrize("name", ["", "-x", "a..b", "a b", "a~1", "x.lock", ".hidden", "a//b",
                                  "refs/heads/x", "HEAD", "a/", "x@{1}", "a:b", "a\\b", "x" * 300])
def test_bad_branch_names(name: str) -> None:
    with pytest.raises(ValidationFailed) as err:
        policy.check_branch_name(name)
    assert err.value.code == "invalid_branch"


def test_target_policy() -> None:
    protected = ["main", "release/*"]
    policy.check_target("feature", base="develop", protected=protected)
    for branch, base in (("develop", "develop"), ("main", "develop"), ("release/1.0", "dev")):
        with pytest.raises(PushRefused):
            policy.check_target(branch, base=base, protected=protected)


def test_decide_push() -> None:
    a, b, c = "a" * 40, "b" * 40, "c" * 40
    kw = {"branch": "x"}
    assert policy.decide_push(remote_tip=None, new_tip=a, fast_forward=False, den_pushed=None,
                              **kw) is policy.PushMode.CREATE
    assert policy.decide_push(remote_tip=a, new_tip=a, fast_forward=False, den_pushed=None,
                              **kw) is policy.PushMode.UP_TO_DATE
    assert policy.decide_push(remote_tip=a, new_tip=b, fast_forward=True, den_pushed=None,
                              **kw) is policy.PushMode.FAST_FORWARD
    assert policy.decide_push(remote_tip=a, new_tip=b, fast_forward=False, den_pushed=a,
                              **kw) is policy.PushMode.FORCE_OWN
    with pytest.raises(BranchConflict):
        policy.decide_push(remote_tip=a, new_tip=b, fast_forward=False, den_pushed=c, **kw)


def test_bundle_header_of_a_real_bundle(tmp_path: Path) -> None:
    git("init", "-q", "-b", "main", cwd=tmp_path)
    git("commit", "-q", "--allow-empty", "-m", "one", cwd=tmp_path)
    git("commit", "-q", "--allow-empty", "-m", "two", cwd=tmp_path)
    data = subprocess.run(["git", "bundle", "create", "-", "refs/heads/main", "^HEAD~1"],
                          cwd=tmp_path, capture_output=True, check=True).stdout
    header = policy.parse_bundle_header(data)
    assert header.version in (2, 3)
    assert header.prerequisites == (git("rev-parse", "HEAD~1", cwd=tmp_path).strip(),)
    tip = git("rev-parse", "HEAD", cwd=tmp_path).strip()
    assert policy.bundle_tip(header, "main") == tip
    with pytest.raises(policy.BadBundle):
        policy.bundle_tip(header, "other")
    with pytest.raises(policy.BadBundle):
        policy.parse_bundle_header(b"#!/bin/sh\nrm -rf /\n\n")
    two_refs = data.replace(b"refs/heads/main\n", b"refs/heads/main\n" + tip.encode()
                            + b" refs/heads/evil\n", 1)
    with pytest.raises(policy.BadBundle):
        policy.bundle_tip(policy.parse_bundle_header(two_refs), "main")


# --- providers: pure builders ------------------------------------------------------------


def test_provider_requests_are_the_documented_ones() -> None:
    repo = RepoRef("acme/api")
    gh, gl, gt = PROVIDERS["github"], PROVIDERS["gitlab"], PROVIDERS["gitea"]
    assert gh.default_api_url("https://github.com") == "https://api.github.com"
    assert gh.default_api_url("https://ghe.example") == "https://ghe.example/api/v3"
    assert gl.default_api_url("https://gitlab.example/") == "https://gitlab.example/api/v4"
    assert gt.default_api_url("https://codeberg.org") == "https://codeberg.org/api/v1"
    assert gh.find_request(repo, branch="b", base="main") == ApiRequest(
        "GET", "/repos/acme/api/pulls", params={"head": "acme:b", "base": "main",
                                                 "state": "open"})
    assert gh.create_request(repo, branch="b", base="main", title="T", body="B",
                             draft=True) == ApiRequest(
        "POST", "/repos/acme/api/pulls",
        json={"title": "T", "head": "b", "base": "main", "body": "B", "draft": True})
    assert gl.find_request(RepoRef("g/sub/api"), branch="b", base="main") == ApiRequest(
        "GET", "/projects/g%2Fsub%2Fapi/merge_requests",
        params={"source_branch": "b", "target_branch": "main", "state": "opened"})
    assert gl.create_request(repo, branch="b", base="main", title="T", body="B",
                             draft=True).json == {
        "source_branch": "b", "target_branch": "main", "title": "Draft: T", "description": "B"}
    assert gt.create_request(repo, branch="b", base="main", title="T", body="B",
                             draft=False).json == {
        "title": "T", "head": "b", "base": "main", "body": "B"}
    assert gh.auth_headers("t")["Authorization"] == "Bearer t"
    assert gl.auth_headers("t") == {"PRIVATE-TOKEN": "t"}
    assert gt.auth_headers("t") == {"Authorization": "token t"}
    assert repo_ref("https://gl.example/", "https://gl.example/g/sub/api.git").path == "g/sub/api"
    with pytest.raises(ValidationFailed):
        repo_ref("https://gl.example", "https://gl.example/api.git")


# --- the REST client against the test forge ------------------------------------------------


@pytest.mark.anyio
async def test_profile_open_and_idempotent_open(forge: ForgeServer) -> None:
    client = client_for(forge)
    profile = await client.profile(base_url=forge.url)
    assert (profile.username, profile.name, profile.email) == (
        "alice", "Alice Liddell", "alice@example.com")
    git("--git-dir", str(forge.bare("acme/api")), "branch", "feature", "main", cwd=forge.root)
    repo = RepoRef("acme/api")
    first, created = await client.open(repo, branch="feature", base="main", title="T",
                                       body="B", draft=False)
    assert created and first.number == 1 and first.url.startswith(forge.url)
    again, created = await client.open(repo, branch="feature", base="main", title="T",
                                       body="B", draft=False)
    assert (again, created) == (first, False)
    # A request opened meanwhile: the list (first call) misses it, creating conflicts, Den
    # finds it again rather than failing.
    forge.fail_next(200, [], method="GET")
    again, created = await client.open(repo, branch="feature", base="main", title="T",
                                       body="B", draft=False)
    assert (again, created) == (first, False)
    sent = [r for r in forge.requests("/api/") if r.method == "POST"]
    assert len(sent) == 2  # one created, one answered "exists"


@pytest.mark.anyio
async def test_forge_errors_become_clear_errors(forge: ForgeServer) -> None:
    repo = RepoRef("acme/api")
    with pytest.raises(ForgeTokenInvalid, match="link the account again"):
        await client_for(forge, "fgt_wrong_token_000000").profile(base_url=forge.url)
    git("--git-dir", str(forge.bare("acme/api")), "branch", "feature", "main", cwd=forge.root)
    with pytest.raises(ForgeForbidden):
        await client_for(forge, "fgt_readonly_0123456789").open(
            repo, branch="feature", base="main", title="T", body="", draft=False)
    forge.fail_next(429, {"message": "slow down"}, headers={"Retry-After": "42"})
    with pytest.raises(ForgeRateLimited) as limited:
        await client_for(forge).profile(base_url=forge.url)
    assert limited.value.retry_after_s == 42 and limited.value.headers == {"Retry-After": "42"}
    with pytest.raises(BaseMissing):
        await client_for(forge).open(repo, branch="feature", base="nope", title="T", body="",
                                     draft=False)
    forge.fail_next(503, {"message": "maintenance"})
    with pytest.raises(ForgeUnavailable):
        await client_for(forge).profile(base_url=forge.url)
    with pytest.raises(ForgeNotFound):
        await client_for(forge).find_open(RepoRef("acme/missing"), branch="x", base="main")


@pytest.mark.anyio
async def test_github_rate_limit_reset_header(tmp_path: Path) -> None:
    with ForgeServer("github", tmp_path) as forge:
        forge.add_user("alice", TOKEN)
        forge.fail_next(403, {"message": "API rate limit exceeded"},
                        headers={"x-ratelimit-remaining": "0", "x-ratelimit-reset": "1"})
        with pytest.raises(ForgeRateLimited) as limited:
            await client_for(forge).profile(base_url=forge.url)
        assert limited.value.retry_after_s == 0


@pytest.mark.anyio
async def test_unreachable_forge() -> None:
    client = ForgeClient(PROVIDERS["github"], api_url="http://127.0.0.1:9/api/v3", token="t",
                         timeout_s=5)
    with pytest.raises(ForgeUnavailable, match="could not be reached"):
        await client.profile(base_url="http://127.0.0.1:9")


# --- the mirror ----------------------------------------------------------------------------


def _malicious_repo(path: Path, marker: Path) -> None:
    """A repository whose .git/config and hooks run ``marker``-writing code if git obeys them."""
    git("init", "-q", "-b", "main", cwd=path)
    evil = path / "evil.sh"
    evil.write_text(f"#!/bin/sh\necho ran \"$0\" >> {marker}\ncat\n")
    evil.chmod(0o755)
    hooks = path / "evilhooks"
    hooks.mkdir()
    for hook in ("pre-commit", "post-commit", "pre-push", "reference-transaction",
                 "post-checkout", "pre-auto-gc", "post-merge"):
        (hooks / hook).write_text(f"#!/bin/sh\necho {hook} >> {marker}\n")
        (hooks / hook).chmod(0o755)
    (path / ".gitattributes").write_text("* filter=evil diff=evil\n")
    for key, value in (("core.fsmonitor", str(evil)), ("core.hooksPath", str(hooks)),
                       ("filter.evil.clean", str(evil)), ("filter.evil.smudge", str(evil)),
                       ("diff.evil.textconv", str(evil)), ("core.sshCommand", str(evil)),
                       ("core.pager", str(evil)), ("credential.helper", f"!{evil}"),
                       ("uploadpack.packObjectsHook", str(evil))):
        git("config", key, value, cwd=path)


def test_mirror_pushes_bundle_commits_without_running_workspace_config(
        forge: ForgeServer, tmp_path: Path) -> None:
    """What the PR flow does on the host, step by step, with a malicious repository as the
    source: the host only ever reads the bundle, so nothing of the repository's config or
    hooks runs on it; the credential reaches the forge as Basic auth and no file."""
    ws = tmp_path / "ws"
    ws.mkdir()
    marker = tmp_path / "host-marker"
    git("clone", "-q", forge.bare("acme/api").as_posix(), ".", cwd=ws)
    _malicious_repo(ws, marker)
    git("checkout", "-q", "-b", "feature", cwd=ws)
    (ws / "new.txt").write_text("new\n")
    # The workspace side (in the sandbox, in the real flow) may run all of that; reset the
    # marker so the check below sees only what the host does.
    git("-c", "core.hooksPath=/dev/null", "-c", "core.fsmonitor=false", "add", "new.txt",
        cwd=ws)
    git("-c", "core.hooksPath=/dev/null", "commit", "-q", "-m", "feature", cwd=ws)
    marker.unlink(missing_ok=True)

    cred = cred_for(forge)
    url = forge.repo_url("acme/api")
    mirror = Mirror(tmp_path / "mirror.git", timeout_s=60, outbound=LOOPBACK)
    mirror.ensure()
    heads = mirror.remote_heads(url, ["main", "feature"], cred)
    assert set(heads) == {"main"}
    mirror.fetch(url, ["main"], cred)
    known = mirror.known_tips()
    assert known == [heads["main"]]
    bundle = tmp_path / "b.bundle"
    bundle.write_bytes(subprocess.run(
        ["git", "bundle", "create", "-", "refs/heads/feature", f"^{known[0]}"], cwd=ws,
        capture_output=True, check=True).stdout)
    mirror.import_bundle(bundle, "feature")
    tip = git("rev-parse", "HEAD", cwd=ws).strip()
    assert mirror.ref("feature") == tip and mirror.is_ancestor(heads["main"], tip)
    mirror.push(url, "feature", mode=policy.PushMode.CREATE, remote_tip=None, cred=cred)
    assert git("--git-dir", str(forge.bare("acme/api")), "rev-parse", "feature",
               cwd=tmp_path).strip() == tip
    assert not marker.exists(), marker.read_text()
    # The forge saw the token as Basic auth on the push; nothing under the mirror holds it.
    pushes = [r for r in forge.log if "git-receive-pack" in r.path]
    user = PROVIDERS[forge.kind].git_username("alice")
    want = "Basic " + base64.b64encode(f"{user}:{TOKEN}".encode()).decode()
    assert pushes and all(r.headers.get("authorization") == want for r in pushes)
    for f in (tmp_path / "mirror.git").rglob("*"):
        if f.is_file():
            assert TOKEN.encode() not in f.read_bytes(), f
    assert "hooksPath = \"/dev/null\"" in (tmp_path / "mirror.git" / "config").read_text()
    assert not (tmp_path / "mirror.git" / "hooks").exists()

    # The lease: the branch moved on the forge since Den looked -> a conflict, not a loss.
    other = tmp_path / "other"
    git("clone", "-q", forge.bare("acme/api").as_posix(), str(other), cwd=tmp_path)
    git("checkout", "-q", "feature", cwd=other)
    git("commit", "-q", "--allow-empty", "-m", "someone else", cwd=other)
    git("push", "-q", "origin", "feature", cwd=other)
    with pytest.raises(BranchConflict):
        mirror.push(url, "feature", mode=policy.PushMode.FORCE_OWN, remote_tip=tip, cred=cred)


def test_mirror_errors(forge: ForgeServer, tmp_path: Path) -> None:
    url = forge.repo_url("acme/api")
    mirror = Mirror(tmp_path / "m.git", timeout_s=60, outbound=LOOPBACK)
    mirror.ensure()
    with pytest.raises(ForgeTokenInvalid):
        mirror.remote_heads(url, ["main"], cred_for(forge, "fgt_wrong_token_000000"))
    mirror.fetch(url, ["main"], cred_for(forge))
    main = mirror.known_tips()[0]
    mirror.set_ref("feature", main)
    reader = cred_for(forge, "fgt_readonly_0123456789", username="reader")
    with pytest.raises(ForgeForbidden):
        mirror.push(url, "feature", mode=policy.PushMode.CREATE, remote_tip=None, cred=reader)
    bad = tmp_path / "bad.bundle"
    bad.write_bytes(b"# v2 git bundle\n" + b"0" * 40 + b" refs/heads/feature\n\nnot a pack")
    with pytest.raises(policy.BadBundle):
        mirror.import_bundle(bad, "feature")
    assert mirror.ref("feature") == main  # unchanged
    assert DEN_REFS == "refs/den/heads"


def test_credential_env_is_scoped_to_the_forge() -> None:
    cred = Credential(1, "github", "https://ghe.example", "https://ghe.example/api/v3", "a",
                      "", "", "tok")
    env = credential_env(cred)
    assert env["GIT_CONFIG_KEY_0"] == "http.https://ghe.example/.extraHeader"
    assert env["GIT_CONFIG_VALUE_0"] == "Authorization: Basic " + base64.b64encode(
        b"x-access-token:tok").decode()
    assert "tok" not in repr(cred)


# --- git hooks -------------------------------------------------------------------------------


def test_hooks_chain_existing_ones_and_add_the_trailer(tmp_path: Path) -> None:
    git("init", "-q", "-b", "main", cwd=tmp_path)
    hooks = tmp_path / ".git" / "hooks"
    own = hooks / "commit-msg"
    own.write_text("#!/bin/sh\necho 'Signed-off-by: Repo Tool <t@example.com>' >> \"$1\"\n")
    own.chmod(0o755)
    install_hooks(tmp_path / ".git", workspace="api", protected=["main", "release/*"])
    install_hooks(tmp_path / ".git", workspace="api", protected=["main"])  # idempotent chain
    assert "Repo Tool" in (hooks / "commit-msg.local").read_text()  # kept, not overwritten
    assert "# den-hook" in (hooks / "commit-msg").read_text()
    (tmp_path / "f").write_text("x")
    git("add", "f", cwd=tmp_path)
    git("commit", "-q", "-m", "change", cwd=tmp_path)
    git("commit", "-q", "--amend", "--no-edit", cwd=tmp_path)
    msg = git("log", "-1", "--format=%B", cwd=tmp_path)
    assert msg.count("Den-Workspace: api") == 1 and "Signed-off-by: Repo Tool" in msg


def test_pre_push_hook_applies_the_policy(tmp_path: Path) -> None:
    remote = tmp_path / "remote.git"
    git("init", "-q", "--bare", str(remote), cwd=tmp_path)
    work = tmp_path / "work"
    git("clone", "-q", str(remote), str(work), cwd=tmp_path)
    git("checkout", "-q", "-b", "main", cwd=work)
    git("commit", "-q", "--allow-empty", "-m", "one", cwd=work)
    git("push", "-q", "origin", "main", cwd=work)  # before the hooks: set up the remote
    install_hooks(work / ".git", workspace="api", protected=["main", "release/*"])

    def push(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["git", "push", "-q", "origin", *args], cwd=work,
                              capture_output=True, text=True)

    git("commit", "-q", "--allow-empty", "-m", "two", cwd=work)
    refused = push("main")
    assert refused.returncode != 0 and "protected" in refused.stderr
    assert push("HEAD:release/1.0").returncode != 0
    git("checkout", "-q", "-b", "feature", cwd=work)
    assert push("feature").returncode == 0
    git("commit", "-q", "--amend", "--allow-empty", "-m", "rewritten", cwd=work)
    forced = push("--force", "feature")
    assert forced.returncode != 0 and "force-push" in forced.stderr
    deleted = push(":feature")
    assert deleted.returncode != 0 and "delete" in deleted.stderr
    # A pattern is a branch pattern, not a file glob in the current directory.
    (work / "release").mkdir()
    (work / "release" / "x").write_text("")
    assert push("HEAD:release/2.0").returncode != 0
