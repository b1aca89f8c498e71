"""Putting the agent binary where workspaces can see it: ``<data_dir>/agent``.

Each build goes into a directory named after its content hash, and ``current`` points at the
newest. Workspaces mount the whole directory read-only at ``/.den`` and run
``/.den/current/den-agent``: a cold start picks up the newest agent, while a workspace restored
from a memory checkpoint keeps running the build it had, which is never removed.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

from server.config import Settings

log = logging.getLogger(__name__)

SOURCE_BUILD = Path(__file__).resolve().parents[2] / "build" / "agent" / "den-agent"
MOUNT = "/.den"
COMMAND = f"{MOUNT}/current/den-agent"


def install_agent(settings: Settings) -> Path | None:
    """The agent directory to mount, or None (logged) when there is no agent binary."""
    binary = Path(settings.agent_binary) if settings.agent_binary else SOURCE_BUILD
    try:
        data = binary.read_bytes()
    except OSError as exc:
        log.error("no workspace agent at %s (%s): run scripts/build-agent.sh; new workspaces "
                  "run without one", binary, exc.strerror)
        return None
    version = hashlib.sha256(data).hexdigest()[:16]
    root = settings.data_dir / "agent"
    target = root / version / "den-agent"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(".den-agent.tmp")
        tmp.write_bytes(data)
        tmp.chmod(0o755)
        os.replace(tmp, target)
    link = root / "current"
    if not link.is_symlink() or os.readlink(link) != version:
        tmp_link = root / ".current.tmp"
        if tmp_link.is_symlink() or tmp_link.exists():
            tmp_link.unlink()
        tmp_link.symlink_to(version)
        os.replace(tmp_link, link)
    root.chmod(0o755)
    log.info("workspace agent %s at %s", version, target)
    return root
