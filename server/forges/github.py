"""GitHub and GitHub Enterprise Server: REST API v3 (pulls)."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

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


class GitHub:
    kind = "github"

    def default_api_url(self, base_url: str) -> str:
        host = urlsplit(base_url).hostname or ""
        if host in ("github.com", "www.github.com"):
            return "https://api.github.com"
        return base_url.rstrip("/") + "/api/v3"  # GitHub Enterprise Server

    def auth_headers(self, token: str) -> dict[str, str]:
        return {
            "Authorization": f"Bearer {token}",
            "Accept": "application/vnd.github+json",
            "X-GitHub-Api-Version": "2022-11-28",
        }

    def git_username(self, username: str) -> str:
        return "x-access-token"  # works for fine-grained, classic and app tokens

    def profile_request(self) -> ApiRequest:
        return ApiRequest("GET", "/user")

    def parse_profile(self, data: Any, *, base_url: str) -> Profile:
        login = str(data["login"])
        host = urlsplit(base_url).hostname or "github.com"
        email = data.get("email") or f"{data.get('id', 0)}+{login}@users.noreply.{host}"
        return Profile(username=login, name=str(data.get("name") or login), email=str(email))

    def find_request(self, repo: RepoRef, *, branch: str, base: str) -> ApiRequest:
        return ApiRequest("GET", f"{repo.repos_path}/pulls",
                          params={"head": f"{repo.owner}:{branch}", "base": base,
                                  "state": "open"})

    def parse_found(self, data: Any, *, branch: str, base: str) -> PullRequestInfo | None:
        for pr in data if isinstance(data, list) else []:
            if pr.get("head", {}).get("ref") == branch and pr.get("base", {}).get("ref") == base:
                return PullRequestInfo(int(pr["number"]), str(pr["html_url"]))
        return None

    def create_request(self, repo: RepoRef, *, branch: str, base: str, title: str, body: str,
                       draft: bool) -> ApiRequest:
        return ApiRequest("POST", f"{repo.repos_path}/pulls",
                          json={"title": title, "head": branch, "base": base, "body": body,
                                "draft": draft})

    def parse_created(self, data: Any) -> PullRequestInfo:
        return PullRequestInfo(int(data["number"]), str(data["html_url"]))

    def create_error(self, status: int, data: Any) -> DenError | None:
        if status != 422:
            return None
        text = message_of(data)
        errors = data.get("errors", []) if isinstance(data, dict) else []
        if "already exists" in text:
            return AlreadyExists(text)
        if any(isinstance(e, dict) and e.get("field") == "base" for e in errors):
            return BaseMissing("the base branch does not exist on the forge", detail=text)
        return ForgeRejected(
            f"GitHub refused the pull request (HTTP {status}; its reason "
            "is in the server log)", detail=text)
