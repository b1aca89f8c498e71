"""The little of the DNS wire format (RFC 1035) Den's forwarder needs (pure): the question
of a query, the IPv4 addresses and TTLs of an answer, and error answers. Everything parsed
here comes from a workspace or from the network: lengths are checked, compression pointers
may only point backwards, and anything odd raises :class:`Malformed`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

HEADER = struct.Struct("!HHHHHH")
TYPE_A, CLASS_IN = 1, 1
SERVFAIL, REFUSED = 2, 5
MAX_POINTERS = 32


class Malformed(ValueError):
    pass


@dataclass(frozen=True)
class Question:
    id: int
    name: str  # lower case, no trailing dot
    qtype: int
    qclass: int
    end: int  # offset just after the question


def _name(data: bytes, offset: int) -> tuple[str, int]:
    """The name at ``offset`` and the offset after it (where it ends in place)."""
    labels: list[str] = []
    end = -1
    jumps = 0
    total = 0
    while True:
        if offset >= len(data):
            raise Malformed("name runs past the message")
        size = data[offset]
        if size & 0xC0 == 0xC0:
            if offset + 1 >= len(data):
                raise Malformed("truncated pointer")
            target = ((size & 0x3F) << 8) | data[offset + 1]
            if target >= offset or jumps >= MAX_POINTERS:
                raise Malformed("bad compression pointer")
            jumps += 1
            if end < 0:
                end = offset + 2
            offset = target
            continue
        if size & 0xC0:
            raise Malformed("unknown label type")
        offset += 1
        if size == 0:
            break
        label = data[offset:offset + size]
        if len(label) != size:
            raise Malformed("label runs past the message")
        total += size + 1
        if total > 255:
            raise Malformed("name too long")
        labels.append(label.decode("ascii", errors="replace").lower())
        offset += size
    return ".".join(labels), (end if end >= 0 else offset)


def question(data: bytes, *, response: bool = False) -> Question:
    """The single question of a standard query (or of its response)."""
    if len(data) < HEADER.size:
        raise Malformed("shorter than a header")
    ident, flags, qd, _an, _ns, _ar = HEADER.unpack_from(data)
    if bool(flags & 0x8000) != response or (flags >> 11) & 0xF != 0 or qd != 1:
        raise Malformed("not a standard query with one question")
    name, offset = _name(data, HEADER.size)
    if offset + 4 > len(data):
        raise Malformed("question runs past the message")
    qtype, qclass = struct.unpack_from("!HH", data, offset)
    return Question(ident, name, qtype, qclass, offset + 4)


def answers_a(data: bytes) -> list[tuple[str, int]]:
    """(IPv4 address, TTL) of each A record in a response's answer section."""
    q = question(data, response=True)
    ancount = HEADER.unpack_from(data)[3]
    offset, found = q.end, []
    for _ in range(ancount):
        _, offset = _name(data, offset)
        if offset + 10 > len(data):
            raise Malformed("record runs past the message")
        rtype, rclass, ttl, size = struct.unpack_from("!HHIH", data, offset)
        offset += 10
        if offset + size > len(data):
            raise Malformed("record data runs past the message")
        if rtype == TYPE_A and rclass == CLASS_IN and size == 4:
            found.append((".".join(str(b) for b in data[offset:offset + 4]), ttl))
        offset += size
    return found


def rcode(data: bytes) -> int:
    return int(HEADER.unpack_from(data)[1]) & 0xF


def with_id(data: bytes, ident: int) -> bytes:
    return struct.pack("!H", ident) + data[2:]


def error_answer(query: bytes, q: Question, code: int) -> bytes:
    """An answer with ``code`` and no records to ``query`` (its question echoed)."""
    flags = 0x8000 | 0x0080 | (HEADER.unpack_from(query)[1] & 0x0100) | code  # QR RA RD
    return HEADER.pack(q.id, flags, 1, 0, 0, 0) + query[HEADER.size:q.end]


def build_query(ident: int, name: str, qtype: int = TYPE_A) -> bytes:
    """A recursive query for ``name`` (tests, benchmarks)."""
    wire = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".") if p) + b"\0"
    return HEADER.pack(ident, 0x0100, 1, 0, 0, 0) + wire + struct.pack("!HH", qtype, CLASS_IN)


def build_answer(query: bytes, records: list[tuple[str, int]]) -> bytes:
    """An answer to ``query`` with A records (address, TTL) for its name (the tests' DNS
    stand-in)."""
    q = question(query)
    flags = 0x8000 | 0x0400 | 0x0080 | (HEADER.unpack_from(query)[1] & 0x0100)  # QR AA RA
    out = HEADER.pack(q.id, flags, 1, len(records), 0, 0) + query[HEADER.size:q.end]
    for addr, ttl in records:
        out += struct.pack("!HHHIH", 0xC00C, TYPE_A, CLASS_IN, ttl, 4)
        out += bytes(int(p) for p in addr.split("."))
    return out
