"""Where ``den login`` keeps the server URL and API token.

The file is ``$DEN_CONFIG`` if set, else ``$XDG_CONFIG_HOME/den/config.json``, else
``~/.config/den/config.json``. It holds a token, so it is written with mode 0600 (its directory,
when created here, with 0700) and replaced atomically. ``DEN_URL`` and ``DEN_TOKEN`` in the
environment override the corresponding field of the file.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ClientConfig", "config_path", "load_config", "save_config"]


@dataclass(frozen=True)
class ClientConfig:
    """A server URL and the API token to use against it."""

    url: str
    token: str

    def __repr__(self) -> str:  # never print the token by accident
        return f"ClientConfig(url={self.url!r}, token='***')"


def config_path(env: Mapping[str, str] | None = None) -> Path:
    """Return the path of the client configuration file (it need not exist)."""
    env = os.environ if env is None else env
    explicit = env.get("DEN_CONFIG")
    if explicit:
        return Path(explicit).expanduser()
    xdg = env.get("XDG_CONFIG_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".config"
    return base / "den" / "config.json"


def _read_file(path: Path) -> dict[str, str]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read den config {path}: {exc}") from exc
    if not isinstance(raw, dict):
        raise ValueError(f"den config {path} is not a JSON object")
    return {k: v for k, v in raw.items() if isinstance(k, str) and isinstance(v, str)}


def load_config(env: Mapping[str, str] | None = None) -> ClientConfig | None:
    """Load the configuration, with ``DEN_URL``/``DEN_TOKEN`` overriding the file.

    Returns None when no URL or no token is known. Raises ValueError for an unreadable file.
    """
    env = os.environ if env is None else env
    stored = _read_file(config_path(env))
    url = env.get("DEN_URL") or stored.get("url")
    token = env.get("DEN_TOKEN") or stored.get("token")
    if not url or not token:
        return None
    return ClientConfig(url=url.rstrip("/"), token=token)


def save_config(config: ClientConfig, env: Mapping[str, str] | None = None) -> Path:
    """Write the configuration file (mode 0600) and return its path."""
    path = config_path(env)
    directory = path.parent
    if not directory.exists():
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        directory.chmod(0o700)  # mkdir's mode is filtered by the umask
    payload = json.dumps({"url": config.url.rstrip("/"), "token": config.token}, indent=2) + "\n"
    fd, tmp_name = tempfile.mkstemp(dir=directory, prefix=".config-", suffix=".tmp")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(payload)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path
