"""Fault points (server/faults.py): a den serve armed with DEN_FAULT dies at that point."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from server import faults


def _run(armed: str | None, script: str) -> int:
    env = {k: v for k, v in os.environ.items() if k != faults.ENV}
    if armed is not None:
        env[faults.ENV] = armed
    return subprocess.run([sys.executable, "-c", script], env=env, timeout=60).returncode


@pytest.mark.parametrize(("armed", "code"), [
    (None, 0),  # unset: nothing happens
    ("pause.checkpoint", 0),  # another point
    ("fork.copy", -9),  # this point: SIGKILL
    ("fork.copy:3", 0),  # the third hit; only two happen
    ("fork.copy:2", -9),
])
def test_a_point_kills_the_process_only_when_armed(armed: str | None, code: int) -> None:
    script = "from server import faults\nfaults.point('fork.copy')\nfaults.point('fork.copy')\n"
    assert _run(armed, script) == code


def test_every_point_is_documented() -> None:
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "operations.md").read_text()
    for point in faults.POINTS:
        assert f"`{point}`" in doc, point
