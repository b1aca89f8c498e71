"""``.dockerignore`` (server/devcontainer/dockerignore.py and source.py): docker build's rules,
and a build context written without what it leaves out, never with anything from outside."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import pytest

from server.devcontainer import dockerignore, source
from server.devcontainer.parse import DevContainerInvalid, DevContainerRefused

RULES = """\ufeff# a comment
node_modules
  *.log\x20\x20
!keep.log
**/tmp
build/**
!build/keep
/abs/./x/
docs/*.md
a[bc]d
file?.txt
"""


@pytest.mark.parametrize(("path", "left_out"), [
    ("node_modules", True), ("node_modules/x/y", True),  # a directory takes its content
    ("x.log", True), ("sub/x.log", False),  # "*" never crosses a "/"
    ("keep.log", False),  # an exception after the pattern
    ("tmp", True), ("a/b/tmp", True), ("a/b/tmp/f", True),  # "**/" is any directories
    ("build", False), ("build/x", True), ("build/keep", False),
    ("abs/x", True), ("abs/x/y", True), ("absx", False),  # cleaned, leading "/" dropped
    ("docs/a.md", True), ("docs/sub/a.md", False),
    ("abd", True), ("acd", True), ("aed", False),
    ("file1.txt", True), ("file12.txt", False), ("file/.txt", False),
    ("src/main.py", False), ("# a comment", False),
])
def test_patterns_follow_docker_build(path: str, left_out: bool) -> None:
    assert dockerignore.Ignore(dockerignore.parse(RULES)).excluded(path) is left_out


def test_the_last_matching_pattern_decides() -> None:
    ig = dockerignore.Ignore(dockerignore.parse("*.md\n!README.md\nREADME*\n"))
    assert ig.excluded("README.md") and ig.excluded("a.md") and not ig.excluded("a.txt")
    ig = dockerignore.Ignore(dockerignore.parse("**\n!src\n"))
    assert ig.excluded("x") and not ig.excluded("src") and not ig.excluded("src/a/b")


def test_regular_expression_characters_are_literal_and_bad_patterns_are_errors() -> None:
    ig = dockerignore.Ignore(dockerignore.parse("a.b\n(x)+\n"))
    assert ig.excluded("a.b") and not ig.excluded("axb") and ig.excluded("(x)+")
    with pytest.raises(ValueError, match="bad pattern"):
        dockerignore.parse("[unclosed\n")


def test_docker_looks_inside_a_left_out_directory_only_for_an_exception_under_it() -> None:
    ig = dockerignore.Ignore(dockerignore.parse("build\n!build/keep\n!**/other\n"))
    assert ig.may_hold_exceptions("build") and not ig.may_hold_exceptions("dist")


def tree(tmp_path: Path, files: dict[str, str]) -> Path:
    repo = tmp_path / "repo"
    for rel, text in files.items():
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        (repo / rel).write_text(text)
    return repo


def members(repo: Path, context: str, tmp_path: Path, *, dockerfile: str = "Dockerfile"
            ) -> tuple[set[str], str]:
    """What the context sends (but the Dockerfile Den adds), and its hash."""
    out = tmp_path / "ctx.tar"
    ignore = source.ignored(repo, context, dockerfile=dockerfile)
    digest = source.context_tar(repo, context, dockerfile=b"FROM x", out=out,
                                max_bytes=1 << 20, ignore=ignore)
    with tarfile.open(out) as tar:
        names = [m.name for m in tar.getmembers()]
        sent = tar.extractfile(".dockerignore")
        assert sent is not None
        # the engine's builder removes Den's Dockerfile (and an added .dockerignore) itself
        # before the build: `COPY . x` copies neither
        assert source.DOCKERFILE_NAME.encode() in sent.read().splitlines()
    assert len(names) == len(set(names)), names
    return set(names) - {source.DOCKERFILE_NAME}, digest


def test_the_context_leaves_out_what_dockerignore_says(tmp_path: Path) -> None:
    repo = tree(tmp_path, {
        ".dockerignore": "*\n!src\n!package.json\nsrc/**/*.pyc\n",
        "Dockerfile": "FROM x", "package.json": "{}", "secret.env": "TOKEN=1",
        "node_modules/big/index.js": "x", "src/app.py": "print()", "src/sub/app.pyc": "x"})
    names, digest = members(repo, ".", tmp_path)
    # the file itself and the Dockerfile stay, as docker build keeps them
    assert names == {".dockerignore", "Dockerfile", "package.json", "src", "src/app.py",
                     "src/sub"}
    # what is left out does not change the hash: no rebuild for it
    (repo / "secret.env").write_text("TOKEN=2")
    (repo / "src/sub/app.pyc").write_text("y")
    assert members(repo, ".", tmp_path)[1] == digest
    (repo / "src/app.py").write_text("print(1)")
    assert members(repo, ".", tmp_path)[1] != digest


def test_an_exception_under_a_left_out_directory_is_walked_to(tmp_path: Path) -> None:
    repo = tree(tmp_path, {".devcontainer/.dockerignore": "dist\n!dist/keep.txt\n",
                           ".devcontainer/Dockerfile": "FROM x",
                           ".devcontainer/dist/keep.txt": "k", ".devcontainer/dist/drop.txt": "d"})
    names, _ = members(repo, ".devcontainer", tmp_path,
                       dockerfile=".devcontainer/Dockerfile")
    assert names == {".dockerignore", "Dockerfile", "dist/keep.txt"}


def test_no_dockerignore_keeps_everything_but_git(tmp_path: Path) -> None:
    repo = tree(tmp_path, {"a/b": "x", ".git/config": "[core]"})
    assert members(repo, ".", tmp_path)[0] == {"a", "a/b", ".dockerignore"}
    with tarfile.open(tmp_path / "ctx.tar") as tar:
        added = tar.extractfile(".dockerignore")
        assert added is not None
        assert added.read().split() == [source.DOCKERFILE_NAME.encode(), b".dockerignore"]


def test_a_dockerignore_never_brings_in_anything_from_outside(tmp_path: Path) -> None:
    repo = tree(tmp_path, {".dockerignore": "!../outside\n!/etc/passwd\n!**\n", "a": "x"})
    (tmp_path / "outside").write_text("host file")
    assert members(repo, ".", tmp_path)[0] == {".dockerignore", "a"}
    # a link pointing out of the repository is refused, as for every path it names
    (repo / ".dockerignore").unlink()
    os.symlink(tmp_path / "outside", repo / ".dockerignore")
    with pytest.raises(DevContainerRefused, match="outside the repository"):
        source.ignored(repo, ".", dockerfile="Dockerfile")


def test_a_bad_dockerignore_is_a_clear_error(tmp_path: Path) -> None:
    repo = tree(tmp_path, {".dockerignore": "[oops\n"})
    with pytest.raises(DevContainerInvalid, match=r"\.dockerignore: bad pattern '\[oops'"):
        source.ignored(repo, ".", dockerfile="Dockerfile")
    (repo / ".dockerignore").write_bytes(b"\xff\xfe")
    with pytest.raises(DevContainerInvalid, match="not UTF-8"):
        source.ignored(repo, ".", dockerfile="Dockerfile")
