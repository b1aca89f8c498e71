"""The registry of forge providers, by the ``kind`` a linked account names."""

from __future__ import annotations

from server.errors import ValidationFailed
from server.forges.base import Provider
from server.forges.gitea import Gitea
from server.forges.github import GitHub
from server.forges.gitlab import GitLab

PROVIDERS: dict[str, Provider] = {"github": GitHub(), "gitlab": GitLab(), "gitea": Gitea()}


def provider(kind: str) -> Provider:
    try:
        return PROVIDERS[kind]
    except KeyError:
        raise ValidationFailed(
            f"unknown forge kind {kind!r}; use one of {', '.join(PROVIDERS)} "
            "(gitea also covers Forgejo)"
        ) from None
