"""The ``den`` command prints its own output only: no library warnings (asyncssh's import
used to print a screenful of CryptographyDeprecationWarning before every command)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def _run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DEN_DATA_DIR": str(tmp_path / "data"),
           "DEN_CONFIG": str(tmp_path / "client.json"), "PYTHONWARNINGS": "default"}
    env.pop("DEN_URL", None)
    env.pop("DEN_TOKEN", None)
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("argv", [
    ("-m", "server.cli", "--help"),
    ("-m", "server.cli", "ls"),  # a client command (not logged in: its own error only)
    ("-m", "server.cli", "admin", "token", "--user", "alice"),
    # What ``den serve`` imports (the SSH gateway pulls in asyncssh).
    ("-c", "import server.app, server.ssh.gateway, server.ssh.keys"),
])
def test_no_library_warnings(tmp_path: Path, argv: tuple[str, ...]) -> None:
    p = _run(tmp_path, *argv)
    assert "Warning" not in p.stderr, p.stderr
    assert "Warning" not in p.stdout, p.stdout
