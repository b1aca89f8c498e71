"""The create path with a devcontainer.json, on the fake runtime and a fake image builder:
what reaches the row and the events, the cache, host requirements, failing commands, the
opt-out, and a server that cannot build."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import pytest
from sqlalchemy import select, update

from server.db.models import PreviewPort, User, Workspace
from server.devcontainer.build import ImageMaker
from server.devcontainer.setup import DevContainers
from server.errors import LimitReached, ValidationFailed
from server.prebuilds.service import PrebuildService
from server.runtime.fake import FakeRuntime
from server.snapshots.service import SnapshotService
from server.workspaces.service import CreateRequest, WorkspaceService
from server.workspaces.states import State
from tests.unit.test_service_fake import create, settle, user

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class FakeBuilder:
    """Images by name; a build adds its tag, or fails with ``fail``."""

    def __init__(self) -> None:
        self.images = {"den/workspace:latest": "sha256:ws", "den/base:bookworm": "sha256:base"}
        self.builds: list[str] = []
        self.fail: str | None = None
        self.sandboxed = False  # the engine's default runtime is not gVisor

    async def image_id(self, image: str) -> str | None:
        return self.images.get(image)

    async def build(self, *, tag: str, context: Path, dockerfile: str,
                    args: Mapping[str, str], target: str | None, labels: Mapping[str, str],
                    timeout_s: float, on_output: Callable[[str], None]) -> None:
        assert context.exists()
        on_output("Step 1/2 : FROM something")
        if self.fail:
            on_output(self.fail)
            raise ValidationFailed("the image build failed: boom", code="build_failed")
        self.builds.append(tag)
        self.images[tag] = f"sha256:{len(self.images)}"

    async def image_env(self, image: str) -> dict[str, str]:
        return {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}

    async def remove(self, image: str) -> None:
        self.images.pop(image, None)

    async def builds_sandboxed(self) -> bool:
        return self.sandboxed


@pytest.fixture
def builder() -> FakeBuilder:
    return FakeBuilder()


@pytest.fixture
def svc(make_service: Callable[..., WorkspaceService], builder: FakeBuilder
        ) -> WorkspaceService:
    maker = ImageMaker(builder, prefix="dentest-unit", helper_image="den/workspace:latest",
                       check_image=lambda _image: None, timeout_s=60, context_max_mb=16,
                       builds="on")
    return make_service(service_kw={
        "devcontainers": DevContainers(maker, command_timeout_s=5)})


def events(svc: WorkspaceService, ws_id: str, kind: str) -> str:
    return "\n".join(e.message for e in svc.events(ws_id) if e.kind == kind)


CONFIG = """{
  "image": "den/workspace:latest",
  "containerEnv": {"A": "container", "B": "container"},
  "remoteEnv": {"B": "remote", "PATH": "${containerEnv:PATH}:/opt/x", "H": "${localEnv:HOME}"},
  "workspaceFolder": "/workspaces/${localWorkspaceFolderBasename}",
  "onCreateCommand": ["echo", "made"],
  "postCreateCommand": {"one": ["true"], "two": ["pwd"]},
  "postStartCommand": ["echo", "started"],
  "forwardPorts": [5173],
  "shutdownAction": "none",
}"""


async def test_image_is_layered_once_and_shared(
    svc: WorkspaceService, builder: FakeBuilder, fake_runtime: FakeRuntime,
    make_repo: Callable[..., Path]
) -> None:
    alice = user(svc)
    repo = make_repo("api", {".devcontainer/devcontainer.json": CONFIG})
    ws = await create(svc, alice, repo, env={"B": "user"})
    assert ws.state == State.RUNNING, ws.state_reason
    assert ws.image.startswith("dentest-unit-devc:") and builder.builds == [ws.image]
    assert ws.env == {"A": "container", "B": "user", "PATH": "/usr/bin:/bin:/opt/x", "H": ""}
    assert ws.devcontainer["post_start"] == [
        {"name": "postStartCommand", "shell": None, "argv": ["echo", "started"]}]
    devc = events(svc, ws.id, "devcontainer")
    for expected in ("using .devcontainer/devcontainer.json",
                     "not acted on by Den: shutdownAction", "(built)",
                     "onCreateCommand done", "one done", "two done", "postStartCommand done",
                     "forwarded ports: 5173: private", "/workspace/api",
                     "workspaceFolder /workspaces/api not acted on"):
        assert expected in devc, devc
    assert "Step 1/2" in events(svc, ws.id, "build")

    again = await create(svc, alice, repo, name="again")
    assert again.image == ws.image and builder.builds == [ws.image]
    assert "(cached)" in events(svc, again.id, "devcontainer")
    assert events(svc, again.id, "build") == ""

    # The opt-out: the default image, nothing run.
    plain = await create(svc, alice, repo, name="plain", devcontainer=False)
    assert plain.state == State.RUNNING and plain.image == "den/workspace:latest"
    assert plain.devcontainer == {} and events(svc, plain.id, "devcontainer") == ""


@pytest.mark.parametrize("config, reason", [
    ('{"hostRequirements": {"cpus": 8, "memory": "64gb"}}',
     "8 CPUs (the workspace has 1: resources.cpus); 65536 MB of memory"),
    ('{"image": "den/workspace:latest", "postCreateCommand": ["exit", "3"]}',
     "postCreateCommand failed (exit code 3)"),
    ('{"image": "den/missing:1"}', "'den/missing:1' is not on this server"),
    ('{"build": {"dockerfile": "Dockerfile", "context": "../.."}}', "outside the repository"),
    ('{"runArgs": ["--privileged"]}', "runArgs (engine run arguments)"),
])
async def test_bad_devcontainers_end_in_error_with_nothing_left(
    svc: WorkspaceService, builder: FakeBuilder, fake_runtime: FakeRuntime,
    make_repo: Callable[..., Path], config: str, reason: str
) -> None:
    repo = make_repo("api", {".devcontainer.json": config, "Dockerfile": "FROM den/base:bookworm"})
    ws = await create(svc, user(svc), repo)
    assert ws.state == State.ERROR and reason in ws.state_reason, ws.state_reason
    assert fake_runtime.containers == {}


async def test_a_failed_build_shows_its_tail(
    svc: WorkspaceService, builder: FakeBuilder, fake_runtime: FakeRuntime,
    make_repo: Callable[..., Path]
) -> None:
    builder.fail = "E: Unable to locate package nope"
    repo = make_repo("api", {".devcontainer/devcontainer.json":
                             '{"build": {"dockerfile": "Dockerfile"}}',
                             ".devcontainer/Dockerfile": "FROM den/base:bookworm\n"})
    ws = await create(svc, user(svc), repo)
    assert ws.state == State.ERROR
    assert "the image build failed: boom" in ws.state_reason
    assert "E: Unable to locate package nope" in ws.state_reason
    assert "Unable to locate" in events(svc, ws.id, "build")
    assert fake_runtime.containers == {}


async def test_a_server_that_cannot_build_refuses_the_file(
    make_service: Callable[..., WorkspaceService], make_repo: Callable[..., Path]
) -> None:
    svc = make_service()  # no devcontainers: the fake runtime builds no images
    repo = make_repo("api", {".devcontainer.json": '{"image": "den/workspace:latest"}'})
    alice = user(svc)
    ws = await create(svc, alice, repo)
    assert ws.state == State.ERROR and "--no-devcontainer" in ws.state_reason
    ok = await create(svc, alice, repo, name="ok", devcontainer=False)
    assert ok.state == State.RUNNING


BUILD = {".devcontainer/devcontainer.json": '{"build": {"dockerfile": "Dockerfile"}}',
         ".devcontainer/Dockerfile": "FROM den/base:bookworm\nRUN echo repo code\n"}


@pytest.mark.parametrize(("builds", "sandboxed", "built"), [
    ("auto", False, False), ("auto", True, True), ("on", False, True), ("off", True, False)])
async def test_a_repositorys_dockerfile_is_built_only_where_the_operator_allows(
    svc: WorkspaceService, builder: FakeBuilder, fake_runtime: FakeRuntime,
    make_repo: Callable[..., Path], builds: str, sandboxed: bool, built: bool
) -> None:
    """A build's RUN steps run on the engine's default runtime, outside the sandbox."""
    maker = svc.devcontainers.maker  # type: ignore[union-attr]
    maker.builds, builder.sandboxed = builds, sandboxed
    alice = user(svc)
    ws = await create(svc, alice, make_repo("api", BUILD))
    if built:
        assert ws.state == State.RUNNING, ws.state_reason
        assert any("-devc-build:" in b for b in builder.builds), builder.builds
        return
    assert ws.state == State.ERROR and builder.builds == []
    assert "their RUN steps would run outside the sandbox" in ws.state_reason
    assert "DEN_DEVCONTAINER_BUILDS" in ws.state_reason
    assert fake_runtime.containers == {}
    # An image already built (while the operator allowed it) runs nothing of the
    # repository's: it is used.
    maker.builds = "on"
    first = await create(svc, alice, make_repo("api2", BUILD), name="first")
    assert first.state == State.RUNNING
    maker.builds = builds
    again = await create(svc, alice, make_repo("api3", BUILD), name="again")
    assert again.state == State.RUNNING and again.image == first.image


# --- forks behave like their source -----------------------------------------------------------

PORTS = """{
  "image": "den/workspace:latest",
  "containerEnv": {"A": "container"},
  "postStartCommand": ["echo", "started"],
  "forwardPorts": [5173, 8000],
  "portsAttributes": {"5173": {"label": "web", "visibility": "users"}},
}"""


def ports_of(svc: WorkspaceService, ws_id: str) -> dict[int, tuple[str, str]]:
    with svc.sessions() as s:
        rows = s.scalars(select(PreviewPort).where(PreviewPort.workspace_id == ws_id))
        return {r.port: (r.label, r.share) for r in rows}


async def test_a_fork_keeps_the_devcontainers_ports_commands_and_environment(
    svc: WorkspaceService, fake_runtime: FakeRuntime, make_repo: Callable[..., Path]
) -> None:
    alice = user(svc)
    ws = await create(svc, alice, make_repo("api", {".devcontainer.json": PORTS}),
                      env={"SECRET": "mine"})
    assert ws.state == State.RUNNING, ws.state_reason
    want = {5173: ("web", "users"), 8000: ("", "private")}
    assert ports_of(svc, ws.id) == want
    snap = await SnapshotService(svc).create(ws.id, name="before", memory=False, actor="t")
    fork = await svc.create_fork(alice, "api-fork", snap)
    fork = await settle(svc, fork.id)
    assert fork.state == State.RUNNING, fork.state_reason
    assert ports_of(svc, fork.id) == want
    assert fork.devcontainer == ws.devcontainer and fork.devcontainer["post_start"]
    # the devcontainer's environment, not the request's own env of the origin
    assert fork.env == {"A": "container"}
    assert "forwarded ports: 5173 (web): users, 8000: private" in events(
        svc, fork.id, "devcontainer")
    # a cold start of the fork runs postStartCommand as its origin's does
    await svc.stop(fork.id, actor="t")
    await svc.start(fork.id, actor="t")
    assert events(svc, fork.id, "devcontainer").count("postStartCommand done") == 1


async def test_a_fork_of_a_prebuild_keeps_its_ports_and_the_build_is_not_listed(
    svc: WorkspaceService, make_repo: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    alice = user(svc)
    pbs = PrebuildService(svc, SnapshotService(svc))
    repo = str(make_repo("api", {".devcontainer.json": PORTS}))
    seen: list[tuple[list[str], str | None]] = []
    waited = svc.built

    async def built(ws_id: str) -> Workspace:  # what the listing shows while it builds
        seen.append(([w.id for w in svc.list_for(alice)], svc.get(ws_id).prebuild_id))
        return await waited(ws_id)

    monkeypatch.setattr(svc, "built", built)
    pb = await pbs.create(alice, repo, None)
    pb = await pbs.wait(pb.id)
    assert seen == [([], pb.id)]
    assert pb.state == "ready", pb.reason
    ws = await svc.create(alice, CreateRequest(name="api", repo_url=repo), prebuilds=pbs)
    ws = await settle(svc, ws.id)
    assert ws.state == State.RUNNING, ws.state_reason
    assert any("from prebuild" in e.message for e in svc.events(ws.id))
    assert ports_of(svc, ws.id) == {5173: ("web", "users"), 8000: ("", "private")}
    assert [w.id for w in svc.list_for(alice)] == [ws.id]


async def test_a_workspace_made_for_a_prebuild_counts_but_is_not_listed(
    svc: WorkspaceService, make_repo: Callable[..., Path]
) -> None:
    alice = user(svc)
    with svc.sessions.begin() as s:
        s.execute(update(User).where(User.id == alice.id).values(limits={"workspaces": 1}))
        s.add(User(name="root", is_admin=True))
    alice, admin = user(svc), user(svc, "root")
    hidden = await create(svc, alice, make_repo("api"), for_prebuild="pb0123456789ab")
    assert hidden.state == State.RUNNING and hidden.prebuild_id == "pb0123456789ab"
    assert svc.list_for(alice) == [] and svc.list_for(admin) == []
    assert svc.get_for(alice, hidden.id).id == hidden.id  # its events stay readable by id
    with pytest.raises(LimitReached):
        await create(svc, alice, make_repo("web"), name="web")
