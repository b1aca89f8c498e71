"""The one place Den talks HTTP to a forge: sends a provider's requests with httpx and
translates every failure (transport errors, 401/403/404/429/5xx) into Den's errors."""

from __future__ import annotations

import logging
import time
from typing import Any

import httpx

from server import __version__
from server.errors import DenError
from server.forges.base import (
    AlreadyExists,
    ApiRequest,
    Profile,
    Provider,
    PullRequestInfo,
    RepoRef,
    message_of,
)
from server.forges.errors import (
    ForgeForbidden,
    ForgeNotFound,
    ForgeRateLimited,
    ForgeRejected,
    ForgeTokenInvalid,
    ForgeUnavailable,
)

USER_AGENT = f"den/{__version__}"
log = logging.getLogger(__name__)


def retry_after_s(headers: httpx.Headers, *, now: float | None = None) -> int | None:
    """Seconds to wait from a rate-limited answer (Retry-After, or GitHub's reset time)."""
    value = headers.get("retry-after")
    if value and value.strip().isdigit():
        return int(value.strip())
    reset = headers.get("x-ratelimit-reset")
    if headers.get("x-ratelimit-remaining") == "0" and reset and reset.isdigit():
        return max(0, int(reset) - int(now if now is not None else time.time()))
    return None


def error_for(status: int, headers: httpx.Headers, data: Any, *, what: str) -> DenError:
    """The generic mapping of a forge's non-2xx answer. The forge's own words are logged,
    not passed on: the user gets the status and Den's reading of it."""
    text = message_of(data) or f"HTTP {status}"
    log.warning("the forge answered HTTP %s while %s: %s", status, what, text)
    wait = retry_after_s(headers)
    if status == 429 or (status == 403 and (wait is not None or "rate limit" in text.lower())):
        after = f"; retry after {wait} s" if wait is not None else ""
        return ForgeRateLimited(f"the forge's rate limit was hit while {what}{after}",
                                retry_after_s=wait, detail=text)
    if status == 401:
        return ForgeTokenInvalid(
            f"the forge rejected the linked token while {what} (HTTP 401); link the account "
            "again with a valid token", detail=text)
    if status == 403:
        return ForgeForbidden(f"the linked token may not do this ({what}): HTTP 403",
                              detail=text)
    if status == 404:
        return ForgeNotFound(
            f"not found while {what}: the repository does not exist or the linked token "
            "cannot see it", detail=text)
    if status >= 500:
        return ForgeUnavailable(f"the forge failed while {what}: HTTP {status}", detail=text)
    return ForgeRejected(f"the forge refused {what}: HTTP {status}", detail=text)


class ForgeClient:
    """A provider bound to one account's API URL and token."""

    def __init__(self, provider: Provider, *, api_url: str, token: str, timeout_s: float,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.provider = provider
        self.api_url = api_url.rstrip("/")
        self._token = token
        self._timeout_s = timeout_s
        self._transport = transport

    async def send(self, req: ApiRequest, *, what: str) -> tuple[int, httpx.Headers, Any]:
        """Status, headers and JSON body of ``req``; transport failures raise ForgeUnavailable."""
        headers = {"User-Agent": USER_AGENT, **self.provider.auth_headers(self._token)}
        try:
            async with httpx.AsyncClient(timeout=self._timeout_s, transport=self._transport,
                                         follow_redirects=False) as client:
                resp = await client.request(req.method, self.api_url + req.path,
                                            params=dict(req.params) or None,
                                            json=req.json, headers=headers)
        except httpx.TimeoutException as exc:
            raise ForgeUnavailable(f"the forge did not answer in time while {what}",
                                   detail=str(exc)) from exc
        except httpx.HTTPError as exc:
            log.warning("the forge at %s could not be reached while %s: %r", self.api_url,
                        what, exc)
            raise ForgeUnavailable(f"the forge at {self.api_url} could not be reached while "
                                   f"{what}", detail=str(exc)) from exc
        try:
            data: Any = resp.json() if resp.content else None
        except ValueError:
            data = resp.text[:500]
        return resp.status_code, resp.headers, data

    async def call(self, req: ApiRequest, *, what: str) -> Any:
        status, headers, data = await self.send(req, what=what)
        if status >= 300:
            raise error_for(status, headers, data, what=what)
        return data

    async def profile(self, *, base_url: str) -> Profile:
        data = await self.call(self.provider.profile_request(), what="checking the token")
        try:
            return self.provider.parse_profile(data, base_url=base_url)
        except (KeyError, TypeError, AttributeError) as exc:
            raise ForgeRejected("the forge's user API answered something Den cannot read; "
                                "is the forge kind right?") from exc

    async def find_open(self, repo: RepoRef, *, branch: str, base: str
                        ) -> PullRequestInfo | None:
        req = self.provider.find_request(repo, branch=branch, base=base)
        data = await self.call(req, what="looking for an open pull request")
        return self.provider.parse_found(data, branch=branch, base=base)

    async def open(self, repo: RepoRef, *, branch: str, base: str, title: str, body: str,
                   draft: bool) -> tuple[PullRequestInfo, bool]:
        """The open pull request from ``branch`` into ``base``, created when there is none;
        the flag says whether it was created now."""
        found = await self.find_open(repo, branch=branch, base=base)
        if found is not None:
            return found, False
        req = self.provider.create_request(repo, branch=branch, base=base, title=title,
                                           body=body, draft=draft)
        what = "opening the pull request"
        status, headers, data = await self.send(req, what=what)
        if status < 300:
            return self.provider.parse_created(data), True
        err = self.provider.create_error(status, data)
        if err is not None and not isinstance(err, AlreadyExists):
            log.warning("the forge answered HTTP %s while %s: %s", status, what,
                        message_of(data))
        if isinstance(err, AlreadyExists):  # opened meanwhile by another call
            found = await self.find_open(repo, branch=branch, base=base)
            if found is not None:
                return found, False
            raise ForgeRejected("the forge says a pull request exists but lists none",
                                detail=err.message)
        if err is not None and status not in (401, 403, 429) and status < 500:
            raise err
        raise error_for(status, headers, data, what=what)
