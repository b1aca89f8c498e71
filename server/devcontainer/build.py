"""The image of a devcontainer workspace: the repository's (``image``, or built from its
``build.dockerfile``) with Den's layer on top (workspace_images/devcontainer/den-layer.sh:
user dev, den-init, sudo, the tmux wrapper; the agent itself is mounted at run time).

Images are tagged ``<engine prefix>-devc:<hash>``, the hash covering everything that goes
into them: the Dockerfile, the context's content, the build args and target, the ids of the
images it builds FROM, and Den's layer. A workspace whose hash is already built uses that
image at once (a cache hit costs the context's hash and a few image inspects: see
docs/benchmarks.md); workspaces that hash alike share it.
"""

from __future__ import annotations

import collections
import hashlib
import io
import logging
import tarfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from server.devcontainer import source
from server.devcontainer.parse import Build, DevContainerInvalid
from server.errors import ValidationFailed

log = logging.getLogger(__name__)

IMAGES = Path(__file__).resolve().parents[2] / "workspace_images"
LAYER_FILES = {  # name in the layer's context -> file in workspace_images/
    "den-layer.sh": "devcontainer/den-layer.sh",
    "den-init": "default/den-init",
    "den-sudo": "default/den-sudo",
    "den-sudo-broker": "default/den-sudo-broker",
    "tmux-wrapper": "default/tmux-wrapper",
}
LABEL_DEVCONTAINER = "den.devcontainer"
TAIL_LINES = 40  # of build output, in the error of a failed build
LOG_CHUNK_BYTES = 2048  # build output is recorded in events of about this size
LOG_MAX_BYTES = 64 * 1024  # at most this much of one build's output goes into events


class ImageBuilder(Protocol):
    """Builds images on the engine (server/runtime/docker_build.py)."""

    async def image_id(self, image: str) -> str | None:
        """The local image's id; None when there is none (nothing is ever pulled)."""

    async def build(self, *, tag: str, context: Path, dockerfile: str,
                    args: Mapping[str, str], target: str | None, labels: Mapping[str, str],
                    timeout_s: float, on_output: Callable[[str], None]) -> None:
        """Build the context tar into ``tag``, output lines to ``on_output``; raise a
        DenError (BuildFailed) that says why when it fails."""

    async def image_env(self, image: str) -> dict[str, str]:
        """The environment an image sets (its ``Config.Env``)."""

    async def remove(self, image: str) -> None:
        """Untag an image, best effort."""

    async def builds_sandboxed(self) -> bool:
        """Whether a build's RUN steps run in the sandbox (the engine's default runtime is
        gVisor's)."""


class BuildLog:
    """Build output: into the workspace's events in bounded chunks, and its tail kept for the
    error of a failed build."""

    def __init__(self, record: Callable[[str], None]) -> None:
        self._record = record
        self._pending: list[str] = []
        self._pending_bytes = 0
        self._recorded = 0
        self._dropped = 0
        self.tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)

    def line(self, text: str) -> None:
        text = text[:1000]
        self.tail.append(text)
        if self._recorded >= LOG_MAX_BYTES:
            self._dropped += 1
            return
        self._pending.append(text)
        self._pending_bytes += len(text) + 1
        if self._pending_bytes >= LOG_CHUNK_BYTES or text.startswith("Step "):
            self.flush()

    def flush(self) -> None:
        if self._pending:
            chunk = "\n".join(self._pending)
            self._recorded += len(chunk)
            self._pending, self._pending_bytes = [], 0
            if self._recorded >= LOG_MAX_BYTES:
                chunk += f"\n(build output beyond {LOG_MAX_BYTES // 1024} KiB is not recorded)"
            self._record(chunk)

    def close(self) -> None:
        self.flush()
        if self._dropped:
            self._record(f"({self._dropped} more lines of build output not recorded)")


@dataclass(frozen=True)
class Built:
    image: str  # the tag to run
    cached: bool


def _layer_dockerfile(base: str, helper_image: str) -> str:
    return (f"FROM {base}\n"
            "USER root\n"
            "COPY . /usr/local/lib/den/layer/\n"
            f"COPY --from={helper_image} /usr/local/lib/den/libden-closefix.so "
            "/usr/local/lib/den/layer/\n"
            "RUN [\"/bin/sh\", \"/usr/local/lib/den/layer/den-layer.sh\"]\n"
            "WORKDIR /workspace\n")


def _layer_tar(out: Path, dockerfile: str) -> str:
    """The layer's context as a tar at ``out``; the hash of its content."""
    digest = hashlib.sha256(dockerfile.encode())
    with tarfile.open(out, "w") as tar:
        for name, rel in sorted(LAYER_FILES.items()):
            data = (IMAGES / rel).read_bytes()
            digest.update(name.encode() + b"\0" + data)
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o755
            tar.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo(source.DOCKERFILE_NAME)
        info.size, info.mode = len(dockerfile), 0o644
        tar.addfile(info, io.BytesIO(dockerfile.encode()))
    return digest.hexdigest()


class ImageMaker:
    """Finds or builds the image of a devcontainer, for the workspace service."""

    def __init__(self, builder: ImageBuilder, *, prefix: str, helper_image: str,
                 check_image: Callable[[str], None], timeout_s: float,
                 context_max_mb: int, builds: str = "auto") -> None:
        """``check_image`` raises when the server's image policy does not allow an image
        (the same rule as the API's ``image`` field); ``builds`` is the operator's
        ``devcontainer_builds``."""
        self.builder = builder
        self.builds = builds
        self.prefix = prefix
        self.helper_image = helper_image
        self.check_image = check_image
        self.timeout_s = timeout_s
        self.context_max_bytes = context_max_mb * 1024 * 1024
        recipe = "\0".join((IMAGES / rel).read_text() for rel in sorted(LAYER_FILES.values()))
        self._layer_key = _hash(recipe + helper_image)  # Den's layer, in every image's hash

    def tag(self, digest: str) -> str:
        return f"{self.prefix}-devc:{digest[:24]}"

    async def _local(self, image: str, *, what: str) -> str:
        self.check_image(image)
        image_id = await self.builder.image_id(image)
        if image_id is None:
            raise ValidationFailed(
                f"{what} {image!r} is not on this server: Den uses only local images (it "
                "does not pull from registries); name one of this server's images, e.g. "
                f"{self.helper_image}", code="image_missing")
        return image_id

    async def from_image(self, image: str, *, work: Path, log_to: BuildLog) -> Built:
        """``image`` (local) with Den's layer."""
        image_id = await self._local(image, what="image")
        return await self._with_layer(image, image_id, work=work, log_to=log_to,
                                      key=f"image\0{image_id}")

    async def from_build(self, build: Build, *, repo: Path, config_dir: str, work: Path,
                         log_to: BuildLog) -> Built:
        """The repository's Dockerfile built (paths relative to the devcontainer.json's
        folder, as the specification says), then Den's layer."""
        dockerfile_rel = _join(config_dir, build.dockerfile)
        context_rel = _join(config_dir, build.context)
        text = source.read_inside(repo, dockerfile_rel, what="build.dockerfile",
                                  limit=source.MAX_DOCKERFILE_BYTES)
        try:
            dockerfile = text.decode()
        except UnicodeDecodeError as exc:
            raise DevContainerInvalid(f"build.dockerfile {dockerfile_rel!r} is not UTF-8") from exc
        bases = source.base_images(dockerfile, dict(build.args))
        if not bases:
            raise DevContainerInvalid(f"build.dockerfile {dockerfile_rel!r} has no FROM line")
        ids = [await self._local(b, what="the Dockerfile's FROM image") for b in bases]
        ignore = source.ignored(repo, context_rel, dockerfile=dockerfile_rel)
        content = source.context_tar(repo, context_rel, dockerfile=text, out=None,
                                     max_bytes=self.context_max_bytes, ignore=ignore)
        key = "\0".join(["build", content, *ids, build.target or "",
                         *(f"{k}={v}" for k, v in sorted(build.args.items()))])
        final = self.tag(_hash(key + "\0" + self._layer_key))
        if await self.builder.image_id(final) is not None:
            return Built(image=final, cached=True)  # runs nothing of the repository's
        await self._may_build()
        intermediate = f"{self.prefix}-devc-build:{_hash(key)[:24]}"
        ctx = work / "context.tar"
        source.context_tar(repo, context_rel, dockerfile=text, out=ctx,
                           max_bytes=self.context_max_bytes, ignore=ignore)
        log_to.line(f"building {dockerfile_rel} (context {context_rel or '.'})")
        try:
            await self.builder.build(
                tag=intermediate, context=ctx, dockerfile=source.DOCKERFILE_NAME,
                args=build.args, target=build.target, labels={LABEL_DEVCONTAINER: "build"},
                timeout_s=self.timeout_s, on_output=log_to.line)
        finally:
            ctx.unlink(missing_ok=True)
        try:
            built_id = await self.builder.image_id(intermediate) or intermediate
            return await self._with_layer(intermediate, built_id, work=work, log_to=log_to,
                                          key=key, final=final)
        finally:  # the final image keeps its layers; the intermediate name is not needed
            await self.builder.remove(intermediate)

    async def _may_build(self) -> None:
        """Refuse to run a repository's RUN steps outside the sandbox unless the operator
        said so (``devcontainer_builds``)."""
        if self.builds == "on" or (self.builds == "auto"
                                   and await self.builder.builds_sandboxed()):
            return
        why = ("this server does not build repositories' Dockerfiles" if self.builds == "off"
               else "this server builds a repository's Dockerfile only when the engine runs "
                    "builds in the gVisor sandbox, and its default runtime is not gVisor")
        raise ValidationFailed(
            f"{why}: their RUN steps would run outside the sandbox. Use `image` with one of "
            "this server's images and install what you need in postCreateCommand, or ask the "
            "operator (DEN_DEVCONTAINER_BUILDS)", code="build_not_allowed")

    async def _with_layer(self, base: str, base_id: str, *, work: Path, log_to: BuildLog,
                          key: str, final: str | None = None) -> Built:
        final = final or self.tag(_hash(key + "\0" + self._layer_key))
        if await self.builder.image_id(final) is not None:
            return Built(image=final, cached=True)
        ctx = work / "layer.tar"
        _layer_tar(ctx, _layer_dockerfile(base, self.helper_image))
        log_to.line(f"adding Den's layer (user dev, init, sudo) on {base}")
        try:
            await self.builder.build(
                tag=final, context=ctx, dockerfile=source.DOCKERFILE_NAME, args={},
                target=None, labels={LABEL_DEVCONTAINER: final, "den.managed": "true"},
                timeout_s=self.timeout_s, on_output=log_to.line)
        finally:
            ctx.unlink(missing_ok=True)
        return Built(image=final, cached=False)


def _hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _join(config_dir: str, relative: str) -> str:
    """A path of devcontainer.json, relative to its folder, as a path in the repository."""
    import posixpath

    joined = posixpath.normpath(posixpath.join(config_dir, relative))
    return "." if joined in ("", ".") else joined


def tail(lines: Sequence[str]) -> str:
    return "\n".join(lines)
