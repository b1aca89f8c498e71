"""The ``${...}`` variables of devcontainer.json values (pure).

``${containerEnv:NAME}`` reads the image's environment (then ``containerEnv``, for
``remoteEnv``); ``${localEnv:NAME}`` (and ``${env:NAME}``) reads **nothing**: the Den host's
environment never enters a workspace, so it is the default after a second colon, else empty;
the workspace folder variables name the repository inside the workspace (there is no local
folder: the clone on the host is Den's, not the user's). Anything else is left as it is.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Mapping

_VAR = re.compile(
    r"\$\{(?:(?P<scope>localEnv|containerEnv|env):(?P<name>[A-Za-z_][A-Za-z0-9_]*)"
    r"(?::(?P<default>[^}]*))?|(?P<folder>localWorkspaceFolder|containerWorkspaceFolder)"
    r"|(?P<base>localWorkspaceFolderBasename|containerWorkspaceFolderBasename))\}")


def substitute(value: str, *, folder: str, container_env: Mapping[str, str]) -> str:
    def one(m: re.Match[str]) -> str:
        if m.group("folder"):
            return folder
        if m.group("base"):
            return posixpath.basename(folder)
        default = m.group("default") or ""
        if m.group("scope") == "containerEnv":
            return container_env.get(m.group("name"), default)
        return default

    return _VAR.sub(one, value)


def env_of(image_env: Mapping[str, str], container: Mapping[str, str],
           remote: Mapping[str, str], *, folder: str) -> dict[str, str]:
    """containerEnv over the image's environment, then remoteEnv over both, substituted."""
    base = dict(image_env)
    out = {k: substitute(v, folder=folder, container_env=base) for k, v in container.items()}
    both = {**base, **out}
    out.update({k: substitute(v, folder=folder, container_env=both) for k, v in remote.items()})
    return out

