"""Image builds on the Docker engine, for devcontainers (server/devcontainer/).

The classic builder (no BuildKit: it uses local images for FROM and needs no buildx plugin),
given a context tar that Den wrote itself. Every build runs with ``network_mode="none"``:
a Dockerfile's RUN steps reach nothing, neither the host's services nor the outside (the
engine's build containers run under its default runtime, outside Den's bridge and its
firewall, so no network is the only policy Den can promise for them). ``forcerm`` removes
a failed step's container; a build that runs past its deadline is cancelled by closing the
connection (dockerd cancels a classic build whose client goes away).
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import docker
import docker.errors
import requests.exceptions
import urllib3.exceptions

from server.errors import DenError, ValidationFailed
from server.runtime.errors import EngineError, EngineUnavailable, without_host_paths

log = logging.getLogger(__name__)


_STEP_IMAGE = re.compile(r"^ ---> ([0-9a-f]{12,64})$")
_FROM_STEP = re.compile(r"^Step \d+/\d+ : FROM ", re.IGNORECASE)


class BuildFailed(ValidationFailed):
    """The repository's image did not build (its Dockerfile failed, or took too long)."""

    code = "build_failed"


class DockerImageBuilder:
    """Builds and inspects images through its own engine client (builds are long: they do
    not take a thread of the runtime's executors)."""

    def __init__(self, *, base_url: str = "", gvisor_runtime: str = "runsc") -> None:
        self._base_url = base_url
        self._gvisor_runtime = gvisor_runtime
        self._short: Any = None  # one client for inspects (a new one asks the version first)
        self._lock = threading.Lock()

    def _inspector(self) -> Any:
        with self._lock:
            if self._short is None:
                self._short = self._client(60)
            return self._short

    def _client(self, timeout_s: float) -> Any:
        try:
            if self._base_url:
                return docker.APIClient(base_url=self._base_url, timeout=timeout_s)
            return docker.APIClient(timeout=timeout_s, **docker.utils.kwargs_from_env())
        except docker.errors.DockerException as exc:
            raise EngineUnavailable("the Docker engine is not reachable", detail=str(exc)) from exc

    async def image_id(self, image: str) -> str | None:
        """The local image's id, or None when the engine has no such image."""
        def run() -> str | None:
            api = self._inspector()
            try:
                return str(api.inspect_image(image)["Id"])
            except docker.errors.ImageNotFound:
                return None
            except docker.errors.APIError as exc:
                if exc.status_code in (400, 404):  # an invalid reference names no image
                    return None
                raise EngineError(f"image {image}: {exc.explanation}", detail=str(exc)) from exc
            except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
                raise EngineUnavailable("the Docker engine is not reachable",
                                        detail=str(exc)) from exc

        return await asyncio.to_thread(run)

    async def builds_sandboxed(self) -> bool:
        """Whether the engine's default runtime (which runs a build's steps) is gVisor's."""
        def run() -> bool:
            try:
                info = self._inspector().info()
            except (docker.errors.DockerException,
                    requests.exceptions.RequestException) as exc:
                raise EngineUnavailable("the Docker engine is not reachable",
                                        detail=str(exc)) from exc
            return bool(info.get("DefaultRuntime") == self._gvisor_runtime)

        return await asyncio.to_thread(run)

    async def image_env(self, image: str) -> dict[str, str]:
        def run() -> dict[str, str]:
            try:
                env = (self._inspector().inspect_image(image).get("Config") or {}).get("Env")
            except (docker.errors.DockerException,
                    requests.exceptions.RequestException) as exc:
                raise EngineError(f"image {image}: cannot be inspected", detail=str(exc)) from exc
            return dict(e.split("=", 1) for e in env or [] if "=" in e)

        return await asyncio.to_thread(run)

    async def build(self, *, tag: str, context: Path, dockerfile: str,
                    args: Mapping[str, str], target: str | None, labels: Mapping[str, str],
                    timeout_s: float, on_output: Callable[[str], None]) -> None:
        """Build ``context`` (a tar) into ``tag``; each output line goes to ``on_output`` (on
        a worker thread). BuildFailed with the engine's error when it fails or times out."""
        steps: list[str] = []  # the images of the steps done, the FROM images left out

        def line(text: str) -> None:
            m = _STEP_IMAGE.match(text)
            if m and not (steps and steps[-1] == "FROM"):
                steps.append(m.group(1))
            elif m:
                steps.pop()
            elif _FROM_STEP.match(text):
                steps.append("FROM")
            on_output(text)

        def run() -> None:
            deadline = time.monotonic() + timeout_s
            api = self._client(timeout_s)
            try:
                with context.open("rb") as fh:
                    stream = api.build(
                        fileobj=fh, custom_context=True, dockerfile=dockerfile, tag=tag,
                        buildargs=dict(args), target=target, labels=dict(labels),
                        network_mode="none", pull=False, rm=True, forcerm=True, decode=True,
                        timeout=timeout_s)  # each read; the whole build: ``deadline``
                    for chunk in stream:
                        if "error" in chunk:
                            msg = str(chunk.get("error") or "").strip()
                            on_output(msg)
                            raise BuildFailed(f"the image build failed: "
                                              f"{without_host_paths(msg)[-500:]}")
                        text = chunk.get("stream")
                        if isinstance(text, str):
                            for one in text.splitlines():
                                if one.strip():
                                    line(one)
                        if time.monotonic() > deadline:
                            raise BuildFailed(f"the image build took longer than {timeout_s:g} "
                                              "s (DEN_DEVCONTAINER_BUILD_TIMEOUT_S) and was "
                                              "cancelled")
            except (requests.exceptions.ReadTimeout, urllib3.exceptions.ReadTimeoutError,
                    TimeoutError) as exc:  # a streamed read times out in urllib3 itself
                raise BuildFailed(f"the image build took longer than {timeout_s:g} s "
                                  "(DEN_DEVCONTAINER_BUILD_TIMEOUT_S) and was cancelled") from exc
            except docker.errors.APIError as exc:
                raise BuildFailed(f"the image build failed: "
                                  f"{without_host_paths(str(exc.explanation))[-500:]}",
                                  detail=str(exc)) from exc
            except DenError:
                raise
            except (docker.errors.DockerException, requests.exceptions.RequestException,
                    urllib3.exceptions.HTTPError, OSError) as exc:
                raise EngineUnavailable("the Docker engine failed during an image build",
                                        detail=str(exc)) from exc
            finally:
                api.close()  # closing the connection cancels a build still running

        try:
            await asyncio.to_thread(run)
        except BaseException:
            await asyncio.to_thread(self._drop_steps, steps)
            raise

    def _drop_steps(self, steps: list[str]) -> None:
        """Remove the untagged step images a failed build left, newest first (one another
        image still builds on, or a container uses, stays: the engine refuses)."""
        api = self._inspector()
        for image in reversed([s for s in steps if s != "FROM"]):
            try:
                if api.inspect_image(image).get("RepoTags"):
                    continue
                api.remove_image(image, noprune=True)
            except (docker.errors.DockerException, requests.exceptions.RequestException):
                continue

    async def remove(self, image: str) -> None:
        """Untag ``image`` (best effort; an image in use stays)."""
        def run() -> None:
            try:
                self._inspector().remove_image(image, noprune=False)
            except (docker.errors.DockerException,
                    requests.exceptions.RequestException) as exc:
                log.info("image %s not removed: %s", image, exc)

        await asyncio.to_thread(run)
