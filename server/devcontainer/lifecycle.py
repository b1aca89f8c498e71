"""Running a devcontainer's lifecycle commands (onCreateCommand, postCreateCommand,
postStartCommand) in the workspace: each through the runtime's exec, with a deadline, its
output's tail recorded in the workspace's events; a command that fails or runs past the
deadline is an error that names it."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from server.devcontainer.parse import Command
from server.errors import ValidationFailed
from server.runtime.base import ExecRequest, Runtime, WorkspaceSpec

OUTPUT_TAIL_BYTES = 4096  # of each command's output, in its event and its error
MAX_OUTPUT_BYTES = 1024 * 1024  # kept of a command's output at all


class CommandFailed(ValidationFailed):
    code = "devcontainer_command_failed"


def argv(command: Command) -> list[str]:
    """A string runs through /bin/sh -c (as the specification says); an array runs as is."""
    return ["/bin/sh", "-c", command.shell] if command.shell is not None else list(command.argv)


def to_json(commands: Iterable[Command]) -> list[dict[str, Any]]:
    return [{"name": c.name, "shell": c.shell, "argv": list(c.argv)} for c in commands]


def from_json(raw: Sequence[Mapping[str, Any]]) -> tuple[Command, ...]:
    return tuple(Command(name=str(c["name"]), shell=c.get("shell"),
                         argv=tuple(c.get("argv") or ())) for c in raw)


def _tail(data: bytes) -> str:
    text = data[-OUTPUT_TAIL_BYTES:].decode(errors="replace").strip()
    return ("…" + text) if len(data) > OUTPUT_TAIL_BYTES else text


async def run(runtime: Runtime, spec: WorkspaceSpec, commands: Sequence[Command], *,
              user: str, cwd: str, env: Mapping[str, str], timeout_s: float,
              note: Callable[[str], None]) -> None:
    """Run ``commands`` one after the other; CommandFailed at the first that fails."""
    for command in commands:
        req = ExecRequest(argv=argv(command), user=user, cwd=cwd, env=dict(env),
                          timeout_s=timeout_s, max_output_bytes=MAX_OUTPUT_BYTES)
        result = await runtime.exec(spec, req)
        output = _tail(result.stdout + result.stderr)
        shown = f":\n{output}" if output else ""
        if result.timed_out:
            raise CommandFailed(
                f"{command.name} did not finish within {timeout_s:g} s and was stopped "
                f"(DEN_DEVCONTAINER_COMMAND_TIMEOUT_S){shown}")
        if result.exit_code != 0:
            raise CommandFailed(f"{command.name} failed (exit code {result.exit_code}){shown}")
        note(f"{command.name} done ({result.duration_ms} ms){shown}")
