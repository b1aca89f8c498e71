"""The Docker Engine API calls that docker-py has no method for (the checkpoint endpoints),
made through the SDK's public session: the same connection, API version and timeout, and the
SDK's own errors, so that callers handle them as any other SDK call's."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import docker.errors
import requests
import requests.exceptions


def call(api: Any, method: str, path: str, *parts: str, params: dict[str, str] | None = None
         ) -> requests.Response:
    """``method`` on the engine path ``path``, whose ``{}`` are filled with ``parts`` (URL-
    quoted). Raises docker.errors.NotFound / APIError for an error status, as the SDK does."""
    url = f"{api.base_url}/v{api.api_version}{path.format(*(quote(p, safe='') for p in parts))}"
    res: requests.Response = api.request(method, url, params=params, timeout=api.timeout)
    try:
        res.raise_for_status()
    except requests.exceptions.HTTPError as exc:
        docker.errors.create_api_error_from_http_exception(exc)  # raises the SDK's error
    return res


def start_from_checkpoint(api: Any, container: str, checkpoint: str) -> None:
    """Start ``container`` from its checkpoint ``checkpoint`` (a restore)."""
    call(api, "POST", "/containers/{}/start", container, params={"checkpoint": checkpoint})


def delete_checkpoint(api: Any, container: str, checkpoint: str) -> None:
    """Remove a checkpoint; a missing one is success (Docker 20.10 answers 500 for it)."""
    try:
        call(api, "DELETE", "/containers/{}/checkpoints/{}", container, checkpoint)
    except docker.errors.APIError as exc:
        if exc.status_code == 404 or "does not exist" in str(exc.explanation or ""):
            return
        raise
