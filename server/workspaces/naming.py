"""Workspace ids, names and repo directory names (a backend names its own engine objects:
server/runtime/base.py, ``Runtime.new_handle``)."""

from __future__ import annotations

import re
import secrets
from urllib.parse import urlsplit

NAME_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,38}[a-z0-9])?$")
_NAME_RULE = (
    "1-40 characters of lowercase letters, digits and '-', starting and ending with a "
    "letter or digit"
)


def new_workspace_id() -> str:
    return "ws" + secrets.token_hex(6)


def validate_name(name: str) -> str | None:
    """None when ``name`` is a valid workspace name, else a message saying why not."""
    if NAME_RE.fullmatch(name) is None:
        return f"invalid workspace name {name!r}: use {_NAME_RULE}"
    return None


def repo_basename(url: str) -> str:
    """The directory a repo URL clones into, like ``git clone`` picks it: ``api`` for
    ``https://x/acme/api.git``. Always a safe single path component."""
    path = urlsplit(url).path if "://" in url else url.rsplit(":", 1)[-1]
    last = path.rstrip("/").rsplit("/", 1)[-1]
    if last.endswith(".git"):
        last = last[:-4]
    safe = re.sub(r"[^A-Za-z0-9._-]", "-", last).strip(".-")
    return safe[:100] or "repo"


def default_name(url: str) -> str:
    """A valid workspace name derived from a repo URL."""
    base = re.sub(r"[^a-z0-9-]+", "-", repo_basename(url).lower()).strip("-")[:40].strip("-")
    return base or "workspace"
