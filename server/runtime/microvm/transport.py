"""The agent's byte stream over a VM's virtio-serial port: QEMU listens on the port's Unix
socket on the host and passes bytes to ``/dev/vportNpM`` in the guest, where the agent serves
the same protocol as in a container (docs/agent.md). One connection at a time: the agent
keeps reading the port when Den goes away and comes back (its stdio mode)."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

READ_BYTES = 262144


class PortTransport:
    """:class:`server.agent.session.Transport` over the port's host socket."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    @classmethod
    async def open(cls, path: Path) -> PortTransport:
        reader, writer = await asyncio.open_unix_connection(str(path), limit=READ_BYTES)
        return cls(reader, writer)

    async def read(self) -> bytes:
        return await self._reader.read(READ_BYTES)

    async def write(self, data: bytes) -> None:
        self._writer.write(data)
        await self._writer.drain()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._writer.close()
