"""devcontainer.json, read into a plain value (pure: no I/O).

The file is JSON with comments and trailing commas (JSONC). Every key is either acted on,
refused (a clear error naming it: a repository never gets a privilege, a host path or an
engine option by asking), or not acted on and listed, so that the workspace's events say what
Den left out: nothing is ignored silently.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from server.errors import ValidationFailed

MAX_FILE_BYTES = 256 * 1024
MAX_COMMANDS = 32
MAX_ENV = 256

# Keys a repository may not use: each would hand it a privilege, a host path or an engine
# option that Den decides, not the repository.
REFUSED = {
    "privileged": "privileged mode",
    "capAdd": "extra capabilities",
    "securityOpt": "security options",
    "runArgs": "engine run arguments",
    "mounts": "mounts (host paths and volumes)",
    "workspaceMount": "a workspace mount of its own",
    "appPort": "host ports (use forwardPorts)",
    "dockerComposeFile": "Docker Compose",
    "init": "an engine init (Den's agent is the workspace's init)",
    "initializeCommand": "a command run on the Den host",
}

# Keys Den reads: see DevContainer's fields.
ACTED_ON = frozenset({
    "name", "image", "build", "containerEnv", "remoteEnv", "remoteUser", "containerUser",
    "workspaceFolder", "onCreateCommand", "postCreateCommand", "postStartCommand",
    "forwardPorts", "portsAttributes", "hostRequirements", "features",
    "$schema",
})

# Keys of build: Den acts on these; any other build key is listed as not acted on.
BUILD_KEYS = frozenset({"dockerfile", "context", "args", "target"})

# Users a workspace's sessions may run as: Den's exec, SSH and files run as dev.
USERS = ("dev", "root")

LABELS = {"label", "onAutoForward", "protocol", "requireLocalPort", "elevateIfNeeded"}
SHARE_OF = {"private": "private", "users": "users", "public": "public", "org": "users"}


@dataclass(frozen=True)
class Command:
    """One lifecycle command: ``argv`` run directly, or ``shell`` through ``/bin/sh -c``."""

    name: str
    shell: str | None = None
    argv: tuple[str, ...] = ()


@dataclass(frozen=True)
class Build:
    dockerfile: str
    context: str = "."
    args: Mapping[str, str] = field(default_factory=dict)
    target: str | None = None


@dataclass(frozen=True)
class PortAttributes:
    label: str = ""
    share: str | None = None  # a Den share level, from "visibility" or "share"


@dataclass(frozen=True)
class HostRequirements:
    cpus: float | None = None
    memory_mb: int | None = None
    storage_gb: int | None = None
    gpus: int | None = None


@dataclass(frozen=True)
class DevContainer:
    """What Den acts on, and ``unused``: the keys it does not act on (listed in events)."""

    image: str | None = None
    build: Build | None = None
    container_env: Mapping[str, str] = field(default_factory=dict)
    remote_env: Mapping[str, str] = field(default_factory=dict)
    remote_user: str = "dev"
    container_user: str = "dev"
    workspace_folder: str | None = None
    on_create: tuple[Command, ...] = ()
    post_create: tuple[Command, ...] = ()
    post_start: tuple[Command, ...] = ()
    forward_ports: tuple[int, ...] = ()
    ports: Mapping[int, PortAttributes] = field(default_factory=dict)
    host: HostRequirements = HostRequirements()
    unused: tuple[str, ...] = ()


class DevContainerInvalid(ValidationFailed):
    code = "devcontainer_invalid"


class DevContainerRefused(ValidationFailed):
    code = "devcontainer_refused"


# --- JSONC --------------------------------------------------------------------------

_TOKENS = re.compile(
    r'"(?:[^"\\\n]|\\.)*"'  # a string, kept as it is
    r"|//[^\n]*|/\*.*?\*/"  # a comment
    r"|,(?=\s*(?:/\*.*?\*/\s*|//[^\n]*\s*)*[}\]])",  # a trailing comma
    re.DOTALL)


def strip_jsonc(text: str) -> str:
    """JSON from JSONC: comments become spaces (line numbers kept), trailing commas go."""
    def sub(m: re.Match[str]) -> str:
        s = m.group(0)
        if s.startswith('"'):
            return s
        return re.sub(r"[^\n]", " ", s)

    return _TOKENS.sub(sub, text)


def loads(text: str | bytes, *, where: str = "devcontainer.json") -> dict[str, Any]:
    """The file's top-level object; DevContainerInvalid with the line and column."""
    if isinstance(text, bytes):
        if len(text) > MAX_FILE_BYTES:
            raise DevContainerInvalid(f"{where} is larger than {MAX_FILE_BYTES // 1024} KiB")
        try:
            text = text.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise DevContainerInvalid(f"{where} is not UTF-8 text") from exc
    try:
        data = json.loads(strip_jsonc(text))
    except json.JSONDecodeError as exc:
        raise DevContainerInvalid(
            f"{where} is not valid JSON (with comments): {exc.msg} at line {exc.lineno}, "
            f"column {exc.colno}") from exc
    if not isinstance(data, dict):
        raise DevContainerInvalid(f"{where} must be a JSON object")
    return data


# --- the model ----------------------------------------------------------------------

def parse(text: str | bytes, *, where: str = "devcontainer.json") -> DevContainer:
    """Read a devcontainer.json; DevContainerInvalid or DevContainerRefused say why not."""
    data = loads(text, where=where)
    refused = [k for k in REFUSED if k in data and not _empty(data[k])]
    if refused:
        what = "; ".join(f"{k} ({REFUSED[k]})" for k in refused)
        raise DevContainerRefused(
            f"{where} asks for what Den never grants a repository: {what}. Remove "
            f"{'it' if len(refused) == 1 else 'them'}, or create the workspace with "
            "--no-devcontainer")
    features = data.get("features")
    if not _empty(features):
        names = ", ".join(sorted(features)) if isinstance(features, dict) else str(features)
        raise DevContainerRefused(
            f"{where} uses features ({names}); Den does not install devcontainer features: "
            "install what they provide in a Dockerfile (build.dockerfile) instead")
    unused = [k for k in data if k not in ACTED_ON and k not in REFUSED]
    image = _opt_str(data, "image", where)
    build = _build(data.get("build"), where, unused)
    if build is None and "dockerFile" in data:  # the old spelling, at the top level
        build = Build(dockerfile=_str(data["dockerFile"], "dockerFile", where),
                      context=_str(data.get("context", "."), "context", where))
        unused = [k for k in unused if k not in ("dockerFile", "context")]
    if image is not None and build is not None:
        raise DevContainerInvalid(f"{where} has both image and build: use one")
    users = {}
    for key in ("remoteUser", "containerUser"):
        user = _opt_str(data, key, where) or "dev"
        if user not in USERS:
            raise DevContainerInvalid(
                f"{where}: {key} {user!r} is not supported: Den's sessions run as dev "
                "(with sudo); use \"dev\" or \"root\", or leave it out")
        users[key] = user
    folder = _opt_str(data, "workspaceFolder", where)
    forward = tuple(_port(p, where) for p in _list(data.get("forwardPorts", []),
                                                   "forwardPorts", where))
    return DevContainer(
        image=image, build=build,
        container_env=_env(data.get("containerEnv"), "containerEnv", where),
        remote_env=_env(data.get("remoteEnv"), "remoteEnv", where),
        remote_user=users["remoteUser"], container_user=users["containerUser"],
        workspace_folder=folder,
        on_create=commands(data.get("onCreateCommand"), "onCreateCommand", where),
        post_create=commands(data.get("postCreateCommand"), "postCreateCommand", where),
        post_start=commands(data.get("postStartCommand"), "postStartCommand", where),
        forward_ports=forward,
        ports=_ports_attributes(data.get("portsAttributes"), where, unused),
        host=_host(data.get("hostRequirements"), where, unused),
        unused=tuple(unused),
    )


def commands(value: Any, key: str, where: str) -> tuple[Command, ...]:
    """A lifecycle command in its three forms: a string (a shell command), an array (argv,
    no shell) or an object of named commands (each a string or an array)."""
    if value is None:
        return ()
    if isinstance(value, dict):
        if len(value) > MAX_COMMANDS:
            raise DevContainerInvalid(f"{where}: {key} has more than {MAX_COMMANDS} commands")
        out: list[Command] = []
        for name, one in value.items():
            if isinstance(one, dict):
                raise DevContainerInvalid(f"{where}: {key}.{name} must be a string or an array")
            out.extend(Command(name=str(name), shell=c.shell, argv=c.argv)
                       for c in commands(one, f"{key}.{name}", where))
        return tuple(out)
    if isinstance(value, str):
        return (Command(name=key, shell=value),) if value.strip() else ()
    if isinstance(value, list):
        if not value:
            return ()
        if not all(isinstance(a, str) for a in value):
            raise DevContainerInvalid(f"{where}: {key} must be an array of strings")
        return (Command(name=key, argv=tuple(value)),)
    raise DevContainerInvalid(f"{where}: {key} must be a string, an array or an object")


def _empty(value: Any) -> bool:
    return value is None or value is False or value == [] or value == {} or value == ""


def _str(value: Any, key: str, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise DevContainerInvalid(f"{where}: {key} must be a non-empty string")
    return value.strip()


def _opt_str(data: Mapping[str, Any], key: str, where: str) -> str | None:
    return None if data.get(key) is None else _str(data[key], key, where)


def _list(value: Any, key: str, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise DevContainerInvalid(f"{where}: {key} must be an array")
    return value


def _env(value: Any, key: str, where: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise DevContainerInvalid(f"{where}: {key} must be an object of strings")
    if len(value) > MAX_ENV:
        raise DevContainerInvalid(f"{where}: {key} has more than {MAX_ENV} variables")
    out = {}
    for name, v in value.items():
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise DevContainerInvalid(f"{where}: {key} has an invalid variable name {name!r}")
        if not isinstance(v, str | int | float | bool) or v is None:
            raise DevContainerInvalid(f"{where}: {key}.{name} must be a string")
        out[name] = v if isinstance(v, str) else json.dumps(v)
    return out


def _build(value: Any, where: str, unused: list[str]) -> Build | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise DevContainerInvalid(f"{where}: build must be an object")
    unused.extend(f"build.{k}" for k in value if k not in BUILD_KEYS)
    if "dockerfile" not in value:
        raise DevContainerInvalid(f"{where}: build needs a dockerfile")
    args = value.get("args") or {}
    if not isinstance(args, dict) or not all(isinstance(v, str) for v in args.values()):
        raise DevContainerInvalid(f"{where}: build.args must be an object of strings")
    target = value.get("target")
    return Build(
        dockerfile=_str(value["dockerfile"], "build.dockerfile", where),
        context=_str(value.get("context", "."), "build.context", where),
        args={str(k): v for k, v in args.items()},
        target=None if target is None else _str(target, "build.target", where),
    )


def _port(value: Any, where: str) -> int:
    # "host:port" forms name another container (Docker Compose): not a port of this one.
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise DevContainerInvalid(f"{where}: forwardPorts takes port numbers (1-65535), "
                                  f"not {value!r}")
    return value


def _ports_attributes(value: Any, where: str, unused: list[str]) -> dict[int, PortAttributes]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise DevContainerInvalid(f"{where}: portsAttributes must be an object")
    out = {}
    for key, attrs in value.items():
        if not str(key).isdigit() or not 1 <= int(key) <= 65535:
            unused.append(f"portsAttributes.{key} (only single port numbers are acted on)")
            continue
        if not isinstance(attrs, dict):
            raise DevContainerInvalid(f"{where}: portsAttributes.{key} must be an object")
        share = attrs.get("visibility", attrs.get("share"))
        if share is not None and share not in SHARE_OF:
            raise DevContainerInvalid(
                f"{where}: portsAttributes.{key}.visibility must be one of "
                f"{', '.join(SHARE_OF)}")
        unused.extend(f"portsAttributes.{key}.{a}" for a in attrs
                      if a not in ("label", "visibility", "share"))
        label = attrs.get("label", "")
        out[int(key)] = PortAttributes(label=str(label)[:64],
                                       share=SHARE_OF[share] if share is not None else None)
    return out


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(tb|gb|mb|kb)?\s*$", re.IGNORECASE)
_MB = {"tb": 1024 * 1024, "gb": 1024, "mb": 1, "kb": 1 / 1024, None: 1 / (1024 * 1024)}


def _size_mb(value: Any, key: str, where: str) -> int:
    m = _SIZE.match(str(value))
    if m is None:
        raise DevContainerInvalid(f"{where}: hostRequirements.{key} must be a size like \"4gb\"")
    unit = m.group(2).lower() if m.group(2) else None
    return int(float(m.group(1)) * _MB[unit] + 0.999)


def _host(value: Any, where: str, unused: list[str]) -> HostRequirements:
    if value is None:
        return HostRequirements()
    if not isinstance(value, dict):
        raise DevContainerInvalid(f"{where}: hostRequirements must be an object")
    unused.extend(f"hostRequirements.{k}" for k in value
                  if k not in ("cpus", "memory", "storage", "gpu"))
    cpus = value.get("cpus")
    if cpus is not None and (isinstance(cpus, bool) or not isinstance(cpus, int | float)):
        raise DevContainerInvalid(f"{where}: hostRequirements.cpus must be a number")
    gpu = value.get("gpu")
    gpus: int | None = None
    if gpu is True:
        gpus = 1
    elif isinstance(gpu, dict):
        gpus = int(gpu.get("cores", 1) or 1) if "cores" in gpu else 1
    elif gpu not in (None, False, "optional"):
        raise DevContainerInvalid(f"{where}: hostRequirements.gpu must be true, false, "
                                  "\"optional\" or an object")
    storage = value.get("storage")
    return HostRequirements(
        cpus=None if cpus is None else float(cpus),
        memory_mb=None if value.get("memory") is None else _size_mb(value["memory"], "memory",
                                                                     where),
        storage_gb=None if storage is None else -(-_size_mb(storage, "storage", where) // 1024),
        gpus=gpus,
    )


def unmet(host: HostRequirements, *, cpus: float, memory_mb: int, disk_gb: int,
          gpus: int) -> list[str]:
    """What the workspace's resources lack of ``host``, as phrases for an error."""
    out = []
    if host.cpus is not None and cpus < host.cpus:
        out.append(f"{host.cpus:g} CPUs (the workspace has {cpus:g}: resources.cpus)")
    if host.memory_mb is not None and memory_mb < host.memory_mb:
        out.append(f"{host.memory_mb} MB of memory (the workspace has {memory_mb}: "
                   "resources.memory_mb)")
    if host.storage_gb is not None and disk_gb < host.storage_gb:
        out.append(f"{host.storage_gb} GB of disk (the workspace has {disk_gb}: "
                   "resources.disk_gb)")
    if host.gpus is not None and gpus < host.gpus:
        out.append(f"{host.gpus} GPU(s) (the workspace has {gpus}: resources.gpus)")
    return out
