"""Workspace names, repo directory names and engine object names."""

from __future__ import annotations

import re

import pytest

from server.workspaces import naming


@pytest.mark.parametrize("name", ["a", "api", "my-api", "a1", "9", "x" * 40, "a-b-c-1-2"])
def test_valid_names(name: str) -> None:
    assert naming.validate_name(name) is None


@pytest.mark.parametrize(
    "name",
    [
        "",
        "Api",
        "API",
        "my_api",
        "x" * 41,
        "-api",
        "api-",
        "my api",
        "api.dev",
        "ap/i",
        "é",
        "api\n",
    ],
)
def test_invalid_names_say_why(name: str) -> None:
    problem = naming.validate_name(name)
    assert problem is not None
    assert repr(name) in problem
    assert "lowercase" in problem


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://forge.example/acme/api.git", "api"),
        ("https://forge.example/acme/api", "api"),
        ("https://forge.example/acme/api/", "api"),
        ("https://forge.example/acme/api.git/", "api"),
        ("https://forge.example/acme/api.git?x=1#frag", "api"),
        ("ssh://git@forge.example:2222/acme/api.git", "api"),
        ("git@forge.example:acme/api.git", "api"),
        ("git@forge.example:api.git", "api"),
        ("forge.example:acme/web-app", "web-app"),
        ("/srv/repos/api.git", "api"),
        ("/srv/repos/api.git/", "api"),
        ("file:///srv/repos/My.Lib.git", "My.Lib"),
        ("https://forge.example/acme/we%20ird name.git", "we-20ird-name"),
        ("https://forge.example/", "repo"),
        ("https://forge.example/acme/..", "repo"),
        ("https://forge.example/acme/.git", "repo"),
    ],
)
def test_repo_basename(url: str, expected: str) -> None:
    assert naming.repo_basename(url) == expected


@pytest.mark.parametrize(
    "url",
    ["https://x/a/..", "https://x/a/.", "/a/b/../..", "git@x:..", "https://x/-rf", "x:/.hidden"],
)
def test_repo_basename_is_always_one_safe_component(url: str) -> None:
    base = naming.repo_basename(url)
    assert base not in ("", ".", "..")
    assert "/" not in base
    assert not base.startswith(("-", "."))


def test_repo_basename_is_capped() -> None:
    assert naming.repo_basename("https://x/" + "a" * 300 + ".git") == "a" * 100


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://forge.example/acme/api.git", "api"),
        ("git@forge.example:acme/My_Lib.git", "my-lib"),
        ("file:///srv/repos/Web.App.git", "web-app"),
        ("https://forge.example/acme/__.git", "workspace"),
        ("https://forge.example/", "repo"),
        ("https://forge.example/acme/" + "b" * 60 + ".git", "b" * 40),
        ("https://forge.example/acme/" + "c" * 39 + "_x.git", "c" * 39),
    ],
)
def test_default_name(url: str, expected: str) -> None:
    name = naming.default_name(url)
    assert name == expected
    assert naming.validate_name(name) is None


def test_workspace_ids_are_unique_and_valid_names() -> None:
    ids = {naming.new_workspace_id() for _ in range(200)}
    assert len(ids) == 200
    for i in ids:
        assert re.fullmatch(r"ws[0-9a-f]{12}", i)
