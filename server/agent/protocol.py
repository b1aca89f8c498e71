"""The agent's wire format (docs/agent.md): pure encoders and incremental decoders.

Everything decoded here comes from inside a workspace and is untrusted: every length is
checked before anything is buffered, and a malformed frame is an error, never a guess.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

MAGIC = b"\xd3\x4e"
HEADER = struct.Struct(">2sBBII")
MAX_PAYLOAD = 262144
WINDOW = 262144  # each stream's initial flow-control window, both directions
HELLO_MAX = 4096
PAD = b"\0" * (MAX_PAYLOAD + HEADER.size + 16)  # completes any half-sent frame (resync)
VERSION = 1


class Type(IntEnum):
    HELLO = 1
    OPEN = 2
    MSG = 3
    DATA = 4
    EOF = 5
    WINDOW = 6
    CLOSE = 7


class ProtocolError(Exception):
    """The agent broke the protocol; the session is dropped."""


@dataclass(frozen=True)
class Frame:
    type: Type
    chan: int
    payload: bytes = b""
    flags: int = 0

    def json(self) -> Any:
        try:
            return json.loads(self.payload)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ProtocolError(f"a {self.type.name} frame that is not JSON") from exc


def encode(type_: Type, chan: int, payload: bytes = b"", *, flags: int = 0) -> bytes:
    if len(payload) > MAX_PAYLOAD:
        raise ValueError("payload too large")
    return HEADER.pack(MAGIC, type_, flags, chan, len(payload)) + payload


def encode_json(type_: Type, chan: int, obj: Any) -> bytes:
    return encode(type_, chan, json.dumps(obj, separators=(",", ":")).encode())


def window(chan: int, stream: int, n: int) -> bytes:
    return encode(Type.WINDOW, chan, struct.pack(">I", n), flags=stream)


class FrameReader:
    """Frames out of a byte stream. ``sync(nonce)`` first: until the agent's HELLO carrying
    ``nonce`` is found, every byte before it is old data and dropped (bounded scan)."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._nonce: str | None = None  # set while scanning for the hello
        self.hello: dict[str, Any] | None = None

    def sync(self, nonce: str) -> None:
        self._nonce = nonce
        self.hello = None

    def feed(self, data: bytes) -> list[Frame]:
        self._buf += data
        frames: list[Frame] = []
        while True:
            if self._nonce is not None:
                if not self._scan():
                    return frames
                continue
            if len(self._buf) < HEADER.size:
                return frames
            magic, type_, flags, chan, size = HEADER.unpack_from(self._buf)
            if magic != MAGIC or size > MAX_PAYLOAD or type_ not in _TYPES:
                raise ProtocolError("a malformed frame header")
            if len(self._buf) < HEADER.size + size:
                return frames
            payload = bytes(self._buf[HEADER.size:HEADER.size + size])
            del self._buf[:HEADER.size + size]
            frames.append(Frame(Type(type_), chan, payload, flags))

    def _scan(self) -> bool:
        """Look for the hello; True when found (or more scanning can be done)."""
        at = self._buf.find(MAGIC + bytes([Type.HELLO]))
        if at < 0:
            del self._buf[:max(0, len(self._buf) - 2)]
            return False
        del self._buf[:at]
        if len(self._buf) < HEADER.size:
            return False
        _, _, _, chan, size = HEADER.unpack_from(self._buf)
        if chan != 0 or size > HELLO_MAX:
            del self._buf[:1]
            return True
        if len(self._buf) < HEADER.size + size:
            return False
        payload = bytes(self._buf[HEADER.size:HEADER.size + size])
        del self._buf[:HEADER.size + size]
        try:
            hello = json.loads(payload)
        except (ValueError, UnicodeDecodeError):
            return True
        if isinstance(hello, dict) and hello.get("nonce") == self._nonce:
            self.hello = hello
            self._nonce = None
        return True


_TYPES = {int(t) for t in Type}


class DockerDemux:
    """Split the engine's attach stream (8-byte headers: stream, 0, 0, 0, size) into
    (stream, bytes) pieces: 1 is stdout, 2 is stderr."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._left = 0
        self._stream = 0

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        out: list[tuple[int, bytes]] = []
        view = memoryview(data)
        while view:
            if self._left:
                take = min(self._left, len(view))
                out.append((self._stream, bytes(view[:take])))
                self._left -= take
                view = view[take:]
                continue
            need = 8 - len(self._buf)
            self._buf += view[:need]
            view = view[need:]
            if len(self._buf) == 8:
                self._stream = self._buf[0]
                self._left = struct.unpack(">I", self._buf[4:])[0]
                self._buf.clear()
        return out
