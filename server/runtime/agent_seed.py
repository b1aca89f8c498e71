"""Seeding a workspace through its agent's open session instead of the engine's archive API.

A pooled sandbox (server/pool/) keeps the agent session it had when it was frozen, so its
seed can be one exec of ``tar -x`` fed on standard input over that session, tens of
milliseconds, where the engine's ``put_archive`` cost 0.1-0.3 s of the claim under load. Only
when a session is open already (a fresh sandbox's agent may still be starting: the engine
seeds it as before), and only for a small archive (it is read into memory). Any failure
(no ``tar`` in the image, the session ended) leaves the seed to the engine, which
overwrites what a partial extraction wrote.

The archive is Den's own (server/git/clone.py packs the clone, every entry owned by the
workspace user); ``tar`` runs as root in the sandbox and keeps those owners, as the
engine's extraction does. In a pooled sandbox it runs before anything of the user's; in a
workspace that already ran code (a prebuild's fork brought up to date: server/prebuilds/
update.py, whose next step is an exec through the same agent anyway) it runs in the
sandbox of the workspace's owner, who has root in it: nothing crosses a boundary either way.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from pathlib import Path

from server.agent import ops as agent_ops
from server.agent.session import AgentOpError, AgentSession
from server.runtime.base import ExecRequest
from server.runtime.errors import AgentTimeout, AgentUnavailable

log = logging.getLogger(__name__)

MAX_BYTES = 8 * 1024 * 1024  # a larger archive goes through the engine (no copy in memory)
TIMEOUT_S = 60.0


def argv(dest: str) -> list[str]:
    """Extract the archive on standard input under ``dest``, owners and modes as stored."""
    return ["tar", "-x", "-f", "-", "-C", dest, "--same-owner", "--same-permissions"]


async def seed(session: AgentSession, tar: Path, *, dest: str, env: Mapping[str, str],
               name: str) -> bool:
    """Whether ``tar`` was extracted under ``dest`` through ``session``; False (logged) when
    the engine should seed instead."""
    size = tar.stat().st_size
    if size > MAX_BYTES or not session.alive:
        return False
    data = await asyncio.to_thread(tar.read_bytes)
    req = ExecRequest(argv=argv(dest), user="root", cwd="/", stdin=data, timeout_s=TIMEOUT_S,
                      max_output_bytes=64 * 1024)
    try:
        result = await agent_ops.run(session, req, env)
    except (AgentUnavailable, AgentTimeout, AgentOpError) as exc:
        log.info("%s: seeding through the agent failed (%s); the engine seeds", name, exc)
        return False
    if result.exit_code != 0:
        log.info("%s: seeding through the agent exited %d (%s); the engine seeds", name,
                 result.exit_code, result.stderr[-300:].decode(errors="replace").strip())
        return False
    return True
