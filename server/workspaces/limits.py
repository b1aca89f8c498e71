"""Size limits on what a command carries into a workspace, as pure checks.

A command (argv, environment, working directory) travels to the workspace in one message: to
the in-workspace agent as one JSON frame of at most 256 KiB (``server.agent.protocol``), or
to the engine in one gRPC message of at most 4 MiB; inside, Linux refuses to start a program
with one argument or ``NAME=value`` over 128 KiB. A command that does not fit used to fail
only inside (a 409, or exit 126 with containerd's message on stdout), and a workspace whose
own env did not fit could run nothing at all. These checks refuse it up front with a 422.
Sizes are counted as the JSON the agent is sent (``ensure_ascii``: a non-ASCII character
counts 6 or 12 bytes, a control character 6).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

from server.errors import ValidationFailed

ENV_MAX_VARS = 200
ENV_VALUE_MAX_CHARS = 32768
ENV_MAX_BYTES = 65536  # a workspace's env, or one command's, as JSON
COMMAND_MAX_BYTES = 196608  # argv and the whole env of one command, as JSON (the frame: 256 KiB)
ARG_MAX_BYTES = 131071  # one argument or NAME=value in UTF-8 (Linux's MAX_ARG_STRLEN, less NUL)
PATH_MAX_BYTES = 4095
NAME_MAX_BYTES = 255  # one path component


def json_size(value: object) -> int:
    return len(json.dumps(value, separators=(",", ":")))


def validate_env(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` checked: names, values, count and total size."""
    if len(env) > ENV_MAX_VARS:
        raise ValidationFailed(f"env may hold at most {ENV_MAX_VARS} variables")
    for k, v in env.items():
        if not k or not (k[0].isalpha() or k[0] == "_") or not all(
            c.isalnum() or c == "_" for c in k
        ) or not k.isascii():
            raise ValidationFailed(f"env name {k!r} is not a valid variable name")
        if "\x00" in v or len(v) > ENV_VALUE_MAX_CHARS:
            raise ValidationFailed(f"env value of {k} is too long or contains NUL")
    if (size := json_size(env)) > ENV_MAX_BYTES:
        raise ValidationFailed(
            f"env is {size} bytes (as JSON); at most {ENV_MAX_BYTES} bytes are allowed in all")
    return dict(env)


def check_command(argv: Sequence[str], env: Mapping[str, str]) -> None:
    """That ``argv`` with ``env`` (everything the command's environment holds) fits."""
    for word in (*argv, *(f"{k}={v}" for k, v in env.items())):
        if len(word.encode()) > ARG_MAX_BYTES:
            raise ValidationFailed(
                f"an argument or environment variable is over {ARG_MAX_BYTES + 1} bytes, "
                "more than Linux passes to a program (pass large data as stdin or a file)")
    if (size := json_size([list(argv), dict(env)])) > COMMAND_MAX_BYTES:
        raise ValidationFailed(
            f"the command and its environment are {size} bytes (as JSON); at most "
            f"{COMMAND_MAX_BYTES} bytes are allowed (pass large data as stdin or a file)")


def check_path(path: str, *, what: str) -> None:
    """A path the kernel can take: no NUL, components up to 255 bytes, 4095 in all."""
    if "\x00" in path:
        raise ValidationFailed(f"{what} contains a NUL byte")
    raw = path.encode()
    if len(raw) > PATH_MAX_BYTES:
        raise ValidationFailed(f"{what} is longer than {PATH_MAX_BYTES} bytes")
    if any(len(part) > NAME_MAX_BYTES for part in raw.split(b"/")):
        raise ValidationFailed(
            f"{what} has a name longer than {NAME_MAX_BYTES} bytes (the most a file system "
            "allows)", code="name_too_long")
