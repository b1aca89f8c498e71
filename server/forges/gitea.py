"""Gitea and Forgejo: REST API v1 (pulls)."""

from __future__ import annotations

from typing import Any

from server.errors import DenError
from server.forges.base import (
    AlreadyExists,
    ApiRequest,
    Profile,
    PullRequestInfo,
    RepoRef,
    message_of,
)
from server.forges.errors import BaseMissing, ForgeRejected


class Gitea:
    kind = "gitea"

    def default_api_url(self, base_url: str) -> str:
        return base_url.rstrip("/") + "/api/v1"

    def auth_headers(self, token: str) -> dict[str, str]:
        return {"Authorization": f"token {token}"}

    def git_username(self, username: str) -> str:
        return username or "oauth2"  # Gitea takes the token as the password of its owner

    def profile_request(self) -> ApiRequest:
        return ApiRequest("GET", "/user")

    def parse_profile(self, data: Any, *, base_url: str) -> Profile:
        login = str(data["login"])
        email = data.get("email") or f"{login}@noreply.gitea"
        return Profile(username=login, name=str(data.get("full_name") or login),
                       email=str(email))

    def find_request(self, repo: RepoRef, *, branch: str, base: str) -> ApiRequest:
        # The newest 50 open pull requests; Den's own is among the most recently updated.
        return ApiRequest("GET", f"{repo.repos_path}/pulls",
                          params={"state": "open", "sort": "recentupdate", "limit": "50"})

    def parse_found(self, data: Any, *, branch: str, base: str) -> PullRequestInfo | None:
        for pr in data if isinstance(data, list) else []:
            if pr.get("head", {}).get("ref") == branch and pr.get("base", {}).get("ref") == base:
                return PullRequestInfo(int(pr["number"]), str(pr["html_url"]))
        return None

    def create_request(self, repo: RepoRef, *, branch: str, base: str, title: str, body: str,
                       draft: bool) -> ApiRequest:
        if draft and not title.upper().startswith(("WIP:", "[WIP]")):
            title = f"WIP: {title}"  # Gitea's work-in-progress prefix marks a draft
        return ApiRequest("POST", f"{repo.repos_path}/pulls",
                          json={"title": title, "head": branch, "base": base, "body": body})

    def parse_created(self, data: Any) -> PullRequestInfo:
        return PullRequestInfo(int(data["number"]), str(data["html_url"]))

    def create_error(self, status: int, data: Any) -> DenError | None:
        text = message_of(data)
        if status == 409 and "already exists" in text:
            return AlreadyExists(text)
        if status == 404 or (status == 422 and "branch" in text.lower()):
            return BaseMissing("the base branch does not exist on the forge", detail=text)
        if status in (409, 422):
            return ForgeRejected(
                f"Gitea refused the pull request (HTTP {status}; its reason "
                "is in the server log)", detail=text)
        return None
