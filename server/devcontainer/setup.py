"""A workspace from its repository's devcontainer.json: what the create path calls.

:meth:`DevContainers.prepare` reads the file from the clone, checks it (refusals, host
requirements), finds or builds the image and returns a :class:`Plan`: the image, the
environment and what the workspace keeps for later (its postStartCommand, the user and folder
its commands run as and in). :meth:`DevContainers.created` and :meth:`DevContainers.started`
run the lifecycle commands. The workspace service writes the plan into the row; this package
changes no state.
"""

from __future__ import annotations

import posixpath
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server.devcontainer import lifecycle, source, variables
from server.devcontainer.build import BuildLog, ImageMaker
from server.devcontainer.parse import DevContainer, parse, unmet
from server.errors import DenError, ValidationFailed
from server.runtime.base import Runtime, WorkspaceSpec

Note = Callable[[str, str], None]  # (event kind, message)


@dataclass(frozen=True)
class Resources:
    cpus: float
    memory_mb: int
    disk_gb: int
    gpus: int


@dataclass(frozen=True)
class Plan:
    file: str
    config: DevContainer
    image: str
    env: Mapping[str, str]
    stored: dict[str, Any] = field(default_factory=dict)  # the row's ``devcontainer``


class DevContainers:
    def __init__(self, maker: ImageMaker, *, command_timeout_s: float) -> None:
        self.maker = maker
        self.command_timeout_s = command_timeout_s

    async def prepare(self, repo: Path, *, repo_path: str, resources: Resources,
                      user_env: Mapping[str, str], work: Path, note: Note) -> Plan | None:
        """The plan of the clone at ``repo`` (seen at ``repo_path`` in the workspace), or
        None when it has no devcontainer.json. Raises a DenError saying what is wrong."""
        found = source.find(repo)
        if found is None:
            return None
        config = parse(found.data, where=found.path)
        missing = unmet(config.host, cpus=resources.cpus, memory_mb=resources.memory_mb,
                        disk_gb=resources.disk_gb, gpus=resources.gpus)
        if missing:
            raise ValidationFailed(
                f"{found.path} asks for hostRequirements this workspace lacks: "
                f"{'; '.join(missing)}. Create it with more resources, or with "
                "--no-devcontainer", code="devcontainer_host_requirements")
        note("devcontainer", f"using {found.path}")
        if config.unused:
            note("devcontainer", f"{found.path}: not acted on by Den: "
                                 f"{', '.join(config.unused)} (docs/devcontainer.md)")
        log = BuildLog(lambda chunk: note("build", chunk))
        config_dir = posixpath.dirname(found.path)
        try:
            if config.build is not None:
                built = await self.maker.from_build(config.build, repo=repo,
                                                    config_dir=config_dir, work=work,
                                                    log_to=log)
            else:
                image = config.image or self.maker.helper_image
                built = await self.maker.from_image(image, work=work, log_to=log)
        except DenError as exc:
            log.close()
            shown = "\n".join(log.tail)
            if shown and exc.code == "build_failed":
                exc.message = f"{exc.message}\n--- the build's last lines ---\n{shown}"
            raise
        log.close()
        note("devcontainer", f"image {built.image} ({'cached' if built.cached else 'built'})")
        folder = posixpath.normpath(variables.substitute(
            config.workspace_folder or repo_path, folder=repo_path, container_env={}))
        if folder != "/workspace" and not folder.startswith("/workspace/"):
            note("devcontainer", f"workspaceFolder {folder} not acted on: the repository is "
                                 f"at {repo_path}, where the lifecycle commands run")
            folder = repo_path
        # Den's sessions are remote: remoteEnv applies to them all, over containerEnv; the
        # user's own env (the API's "env") wins over both.
        own = variables.env_of(await self.maker.builder.image_env(built.image),
                               config.container_env, config.remote_env, folder=folder)
        env = {**own, **user_env}
        # ``env``: the devcontainer's own environment, for forks (the request's stays out).
        stored = {"file": found.path, "folder": folder, "remote_user": config.remote_user,
                  "post_start": lifecycle.to_json(config.post_start), "env": dict(own)}
        return Plan(file=found.path, config=config, image=built.image, env=env, stored=stored)

    async def created(self, runtime: Runtime, spec: WorkspaceSpec, plan: Plan, *,
                      note: Note) -> None:
        """onCreateCommand (as containerUser), then postCreateCommand and postStartCommand
        (as remoteUser), in the workspace folder."""
        cfg = plan.config
        folder = str(plan.stored["folder"])
        for commands, user in ((cfg.on_create, cfg.container_user),
                               (cfg.post_create, cfg.remote_user),
                               (cfg.post_start, cfg.remote_user)):
            await lifecycle.run(runtime, spec, commands, user=user, cwd=folder, env={},
                                timeout_s=self.command_timeout_s,
                                note=lambda m: note("devcontainer", m))

    async def started(self, runtime: Runtime, spec: WorkspaceSpec, stored: Mapping[str, Any],
                      *, note: Note) -> None:
        """postStartCommand after a cold start (not after a resume: its processes live on)."""
        commands = lifecycle.from_json(stored.get("post_start") or [])
        await lifecycle.run(runtime, spec, commands, user=str(stored.get("remote_user", "dev")),
                            cwd=str(stored.get("folder", "/workspace")), env={},
                            timeout_s=self.command_timeout_s,
                            note=lambda m: note("devcontainer", m))
