"""GitLab (gitlab.com and self-managed): REST API v4 (merge requests)."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

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


def _project(repo: RepoRef) -> str:
    return f"/projects/{quote(repo.path, safe='')}"  # the URL-encoded full path is an id


class GitLab:
    kind = "gitlab"

    def default_api_url(self, base_url: str) -> str:
        return base_url.rstrip("/") + "/api/v4"

    def auth_headers(self, token: str) -> dict[str, str]:
        return {"PRIVATE-TOKEN": token}

    def git_username(self, username: str) -> str:
        return "oauth2"

    def profile_request(self) -> ApiRequest:
        return ApiRequest("GET", "/user")

    def parse_profile(self, data: Any, *, base_url: str) -> Profile:
        login = str(data["username"])
        email = (data.get("commit_email") or data.get("public_email") or data.get("email")
                 or f"{login}@users.noreply.gitlab")
        return Profile(username=login, name=str(data.get("name") or login), email=str(email))

    def find_request(self, repo: RepoRef, *, branch: str, base: str) -> ApiRequest:
        return ApiRequest("GET", f"{_project(repo)}/merge_requests",
                          params={"source_branch": branch, "target_branch": base,
                                  "state": "opened"})

    def parse_found(self, data: Any, *, branch: str, base: str) -> PullRequestInfo | None:
        for mr in data if isinstance(data, list) else []:
            if mr.get("source_branch") == branch and mr.get("target_branch") == base:
                return PullRequestInfo(int(mr["iid"]), str(mr["web_url"]))
        return None

    def create_request(self, repo: RepoRef, *, branch: str, base: str, title: str, body: str,
                       draft: bool) -> ApiRequest:
        if draft and not title.lower().startswith(("draft:", "[draft]", "(draft)")):
            title = f"Draft: {title}"
        return ApiRequest("POST", f"{_project(repo)}/merge_requests",
                          json={"source_branch": branch, "target_branch": base,
                                "title": title, "description": body})

    def parse_created(self, data: Any) -> PullRequestInfo:
        return PullRequestInfo(int(data["iid"]), str(data["web_url"]))

    def create_error(self, status: int, data: Any) -> DenError | None:
        text = message_of(data)
        if status == 409 and "already exists" in text:
            return AlreadyExists(text)
        if status in (400, 404, 422) and "target_branch" in text.replace(" ", "_").lower():
            return BaseMissing("the base branch does not exist on the forge", detail=text)
        if status in (400, 409, 422):
            return ForgeRejected(
                f"GitLab refused the merge request (HTTP {status}; its reason "
                "is in the server log)", detail=text)
        return None
