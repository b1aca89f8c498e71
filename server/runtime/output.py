"""One stream of a one-shot exec's output, spooled to a private file past a threshold
(issue 11, finding 6).

An exec's stdout and stderr may each be ``DEN_EXEC_MAX_OUTPUT_BYTES`` (16 MiB), and the API
runs up to ``DEN_EXEC_CONCURRENCY`` (64) at once: held in memory until the answer is sent,
that is 2 GiB. A :class:`Captured` stream keeps at most ``memory_bytes`` (256 KiB) in memory:
past that, everything goes to an anonymous temporary file under ``spool_dir`` (``O_TMPFILE``,
or created and unlinked at once: mode 0600, no name anyone can open, nothing left on disk
when the server dies), written a batch of ``memory_bytes`` at a time. :meth:`close` frees it;
so does the garbage collector, should a caller forget.

Without a ``spool_dir`` (files calls, devcontainer hooks, port scans: small outputs read
whole) everything stays in memory, as before.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import BinaryIO

from server.errors import DenError

MEMORY_BYTES = 256 * 1024
READ_BYTES = 256 * 1024


class SpoolFailed(DenError):
    """Output could not be written to the spool file (503: the operator's disk)."""

    status_code = 503
    code = "spool_failed"


class Captured:
    """Bytes of one stream, appended by one writer, then read by one reader. Appending past
    ``limit`` keeps the first ``limit`` bytes and sets :attr:`truncated`."""

    def __init__(self, limit: int, *, spool_dir: Path | None = None,
                 memory_bytes: int = MEMORY_BYTES) -> None:
        self.limit = limit
        self.truncated = False
        self._spool_dir = spool_dir
        self._memory_bytes = memory_bytes
        self._buf = bytearray()  # everything (no file yet), or what is not yet written to it
        self._file: BinaryIO | None = None
        self._size = 0

    @classmethod
    def of(cls, data: bytes) -> Captured:
        c = cls(len(data))
        c.add(data)
        return c

    def __len__(self) -> int:
        return self._size

    @property
    def spooled(self) -> bool:
        return self._file is not None

    def _take(self, data: bytes | memoryview) -> bool:
        """Append what fits under the limit; True when the buffer should go to the file."""
        room = self.limit - self._size
        if len(data) > room:
            self.truncated = True
            data = data[:max(0, room)]
        if not data:
            return False
        self._buf += data
        self._size += len(data)
        return self._spool_dir is not None and len(self._buf) >= self._memory_bytes

    def add(self, data: bytes | memoryview) -> None:
        """Append ``data``; may write to the spool file (blocking: from a worker thread)."""
        if self._take(data):
            self._flush()

    async def add_async(self, data: bytes | memoryview) -> None:
        """Append ``data`` from the event loop; the file is written on a worker thread."""
        if self._take(data):
            await asyncio.to_thread(self._flush)

    def _flush(self) -> None:
        try:
            if self._file is None:
                assert self._spool_dir is not None
                self._spool_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
                # 0600 and unlinked; closed by close() (or the collector), not a `with` block
                self._file = tempfile.TemporaryFile(dir=self._spool_dir)  # noqa: SIM115
            self._file.write(self._buf)
        except OSError as exc:  # the data directory's disk is full, most likely
            self.close()
            raise SpoolFailed(
                f"the server could not keep the command's output ({exc.strerror}); the "
                "command ran", detail=str(exc)) from exc
        self._buf = bytearray()

    def head(self, n: int) -> bytes:
        """The first ``n`` bytes (blocking when spooled)."""
        if self._file is None:
            return bytes(self._buf[:n])
        self._file.flush()
        return os.pread(self._file.fileno(), n, 0)

    def read(self) -> bytes:
        """Everything, as one bytes object (blocking when spooled): for small outputs."""
        if self._file is None:
            return bytes(self._buf)
        return self.head(self._size - len(self._buf)) + bytes(self._buf)

    async def chunks(self, size: int = READ_BYTES) -> AsyncIterator[bytes]:
        """Everything, ``size`` bytes at a time; the file is read on a worker thread."""
        if self._file is not None:
            fd, written = self._file.fileno(), self._size - len(self._buf)
            await asyncio.to_thread(self._file.flush)
            for offset in range(0, written, size):
                yield await asyncio.to_thread(os.pread, fd, min(size, written - offset), offset)
        view = memoryview(self._buf)
        for start in range(0, len(view), size):
            yield bytes(view[start:start + size])

    def close(self) -> None:
        """Free the spool file (idempotent); the object reads as empty afterwards."""
        if self._file is not None:
            self._file.close()
            self._file = None
        self._buf = bytearray()
        self._size = 0
