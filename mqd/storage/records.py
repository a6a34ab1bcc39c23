"""The on-disk format of a partition log: segment header and records (no I/O here).

A segment file is a header followed by records, all big-endian:

    header  = magic "MQDL" | u16 format version | u16 flags (0) | u64 base offset
              | u64 created_ms                                         (24 bytes)
    record  = u32 length | u32 crc32 | payload                 (length = len(payload))
    payload = u8 type | u64 offset | u64 timestamp_ms | fields | body

The CRC (zlib crc32) covers the payload. Every record has its own offset, one
more than the previous record's, Kafka-style; offsets never repeat, though a
failed write may leave a gap. Fields per type:

    MESSAGE  u64 due_ms | i32 priority | u32 receive_count | u16 len group_id
             | u16 len dedup_id | u16 len source_queue | u16 len original_id
             | u32 len attributes | the four strings (UTF-8) | attributes | body
             attributes = u16 count, then per pair u16 len key | key | u32 len value | value
    DELETE   u32 count | count * u64 message offset
    LEASE    u32 count | count * (u64 offset | u32 receive_count | u64 visible_at_ms
             | u64 first_received_at_ms)
    PURGE    u64 up_to_offset (every message below it is deleted)
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from zlib import crc32

MAGIC = b"MQDL"
# Segment format version. To change the format: bump FORMAT_VERSION, keep the
# decoder of every older version and pick it by each segment's header version
# (`read_header` accepts every version in READABLE_VERSIONS), write new segments
# only in the newest version, and add a test that opens a segment written in the
# old one. Old segments are never rewritten in place; they leave through reclaim.
FORMAT_VERSION = 1
READABLE_VERSIONS = frozenset({1})

SEGMENT_HEADER = struct.Struct(">4sHHQQ")  # magic, version, flags, base offset, created_ms
HEADER_BYTES = SEGMENT_HEADER.size

MESSAGE = 1
DELETE = 2
LEASE = 3
PURGE = 4
TYPE_NAMES = {MESSAGE: "MESSAGE", DELETE: "DELETE", LEASE: "LEASE", PURGE: "PURGE"}

PREFIX = struct.Struct(">II")  # length, crc32
PREFIX_BYTES = PREFIX.size
COMMON = struct.Struct(">BQQ")  # type, offset, timestamp_ms
COMMON_BYTES = COMMON.size
MSG_HEAD = struct.Struct(">BQQQiIHHHHI")
MSG_HEAD_BYTES = MSG_HEAD.size
MSG_FULL = struct.Struct(">IIBQQQiIHHHHI")  # prefix + MSG_HEAD, for decoding in one call
COUNT = struct.Struct(">I")
U64 = struct.Struct(">Q")
LEASE_ITEM = struct.Struct(">QIQQ")
U16 = struct.Struct(">H")
U32 = struct.Struct(">I")
_PURGE_FULL = struct.Struct(">IIBQQQ")
_COUNT_FULL = struct.Struct(">IIBQQI")


class CorruptRecord(Exception):
    """A record failed its checks; `reason` says which."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def segment_name(base_offset: int) -> str:
    return f"{base_offset:020d}.log"


def encode_header(base_offset: int, created_ms: int) -> bytes:
    return SEGMENT_HEADER.pack(MAGIC, FORMAT_VERSION, 0, base_offset, created_ms)


def read_header(data: bytes) -> tuple[int, int, int]:
    """Return (version, base offset, created_ms) or raise CorruptRecord."""
    if len(data) < HEADER_BYTES:
        raise CorruptRecord("short segment header")
    magic, version, _flags, base, created_ms = SEGMENT_HEADER.unpack_from(data, 0)
    if magic != MAGIC:
        raise CorruptRecord("bad segment magic")
    if version not in READABLE_VERSIONS:
        raise CorruptRecord(f"unknown segment format version {version}")
    return version, base, created_ms


def encode_attributes(attributes: dict[str, str]) -> bytes:
    parts = [U16.pack(len(attributes))]
    for key, value in attributes.items():
        k = key.encode()
        v = value.encode()
        parts.append(U16.pack(len(k)))
        parts.append(k)
        parts.append(U32.pack(len(v)))
        parts.append(v)
    return b"".join(parts)


def decode_attributes(data: bytes | memoryview) -> dict[str, str]:
    if not data:
        return {}
    (count,) = U16.unpack_from(data, 0)
    pos = 2
    out: dict[str, str] = {}
    for _ in range(count):
        (klen,) = U16.unpack_from(data, pos)
        pos += 2
        key = bytes(data[pos : pos + klen]).decode()
        pos += klen
        (vlen,) = U32.unpack_from(data, pos)
        pos += 4
        out[key] = bytes(data[pos : pos + vlen]).decode()
        pos += vlen
    if pos != len(data):
        raise CorruptRecord("attribute block length mismatch")
    return out


def encode_messages(messages, first_offset: int, timestamp_ms: int, parts: list, sizes: list):
    """Append the records of `messages` to `parts` and each record's size to `sizes`.

    This is the hot path of SEND (DESIGN.md §10): one struct pack, two or three
    crc32 calls and three list appends per message; the body is not copied
    until the group's single join.
    """
    pack_head = MSG_HEAD.pack
    pack_prefix = PREFIX.pack
    append = parts.append
    append_size = sizes.append
    offset = first_offset
    for m in messages:
        body = m.body
        attrs = m.attributes
        if m.group_id or m.dedup_id or m.source_queue or m.original_id or attrs:
            g = m.group_id.encode()
            d = m.dedup_id.encode()
            s = m.source_queue.encode()
            o = m.original_id.encode()
            a = encode_attributes(attrs) if attrs else b""
            var = b"".join((g, d, s, o, a))
            head = pack_head(
                MESSAGE, offset, timestamp_ms, m.due_ms, m.priority, m.receive_count,
                len(g), len(d), len(s), len(o), len(a),
            )  # fmt: skip
            length = MSG_HEAD_BYTES + len(var) + len(body)
            append(pack_prefix(length, crc32(body, crc32(var, crc32(head)))))
            append(head)
            append(var)
        else:
            head = pack_head(
                MESSAGE, offset, timestamp_ms, m.due_ms, m.priority, m.receive_count,
                0, 0, 0, 0, 0,
            )  # fmt: skip
            length = MSG_HEAD_BYTES + len(body)
            append(pack_prefix(length, crc32(body, crc32(head))))
            append(head)
        append(body)
        append_size(PREFIX_BYTES + length)
        offset += 1


def _frame(payload: bytes) -> bytes:
    return PREFIX.pack(len(payload), crc32(payload)) + payload


def encode_delete(offset: int, timestamp_ms: int, offsets: list[int]) -> bytes:
    n = len(offsets)
    payload = COMMON.pack(DELETE, offset, timestamp_ms) + struct.pack(f">I{n}Q", n, *offsets)
    return _frame(payload)


def encode_lease(offset: int, timestamp_ms: int, leases) -> bytes:
    """`leases` is a list of `Lease` values."""
    pack = LEASE_ITEM.pack
    parts = [COMMON.pack(LEASE, offset, timestamp_ms), COUNT.pack(len(leases))]
    parts += [
        pack(x.offset, x.receive_count, x.visible_at_ms, x.first_received_at_ms) for x in leases
    ]
    return _frame(b"".join(parts))


def encode_purge(offset: int, timestamp_ms: int, up_to_offset: int) -> bytes:
    return _frame(COMMON.pack(PURGE, offset, timestamp_ms) + U64.pack(up_to_offset))


def check_record(buf, pos: int, end: int, record_bytes_max: int) -> int:
    """Check the record at `pos` (framing, CRC, type) and return its total size."""
    if end - pos < PREFIX_BYTES:
        raise CorruptRecord("truncated record prefix")
    length, crc = PREFIX.unpack_from(buf, pos)
    if length < COMMON_BYTES or length > record_bytes_max:
        raise CorruptRecord(f"implausible record length {length}")
    start = pos + PREFIX_BYTES
    if start + length > end:
        raise CorruptRecord("truncated record")
    view = memoryview(buf)[start : start + length]
    if crc32(view) != crc:
        raise CorruptRecord("crc mismatch")
    if view[0] not in TYPE_NAMES:
        raise CorruptRecord(f"unknown record type {view[0]}")
    return PREFIX_BYTES + length


def record_offset(buf, pos: int) -> tuple[int, int, int]:
    """(type, offset, timestamp_ms) of an already checked record."""
    return COMMON.unpack_from(buf, pos + PREFIX_BYTES)


@dataclass(slots=True)
class MessageRecord:
    offset: int
    timestamp_ms: int
    due_ms: int
    priority: int
    receive_count: int
    group_id: str
    dedup_id: str
    source_queue: str
    original_id: str
    attributes: dict[str, str]
    body: bytes
    size: int  # body bytes + attribute block bytes


@dataclass(slots=True)
class DeleteRecord:
    offset: int
    timestamp_ms: int
    offsets: tuple[int, ...]


@dataclass(slots=True)
class LeaseRecord:
    offset: int
    timestamp_ms: int
    leases: list[tuple[int, int, int, int]]  # (offset, receive_count, visible_at, first_received)


@dataclass(slots=True)
class PurgeRecord:
    offset: int
    timestamp_ms: int
    up_to_offset: int


Record = MessageRecord | DeleteRecord | LeaseRecord | PurgeRecord


def decode_message(buf, pos: int, total: int, with_body: bool = True) -> MessageRecord:
    """Decode a checked MESSAGE record at `pos` of size `total`."""
    (_l, _c, _t, offset, ts, due, prio, rc, lg, ld, ls, lo, la) = MSG_FULL.unpack_from(buf, pos)
    p = pos + PREFIX_BYTES + MSG_HEAD_BYTES
    end = pos + total
    if p + lg + ld + ls + lo + la > end:
        raise CorruptRecord("message field lengths exceed record")
    mv = memoryview(buf)
    try:
        g = str(mv[p : p + lg], "utf-8") if lg else ""
        p += lg
        d = str(mv[p : p + ld], "utf-8") if ld else ""
        p += ld
        s = str(mv[p : p + ls], "utf-8") if ls else ""
        p += ls
        o = str(mv[p : p + lo], "utf-8") if lo else ""
        p += lo
        attrs = decode_attributes(mv[p : p + la]) if la else {}
    except (UnicodeDecodeError, struct.error) as exc:
        raise CorruptRecord(f"bad message fields: {exc}") from None
    p += la
    body = bytes(mv[p:end]) if with_body else b""
    return MessageRecord(offset, ts, due, prio, rc, g, d, s, o, attrs, body, end - p + la)


def decode_record(buf, pos: int, total: int, with_body: bool = True) -> Record:
    """Decode a record already checked by `check_record`."""
    rtype = buf[pos + PREFIX_BYTES]
    if rtype == MESSAGE:
        return decode_message(buf, pos, total, with_body)
    end = pos + total
    try:
        if rtype == PURGE:
            _l, _c, _t, offset, ts, up_to = _PURGE_FULL.unpack_from(buf, pos)
            return PurgeRecord(offset, ts, up_to)
        _l, _c, _t, offset, ts, count = _COUNT_FULL.unpack_from(buf, pos)
        start = pos + _COUNT_FULL.size
        if rtype == DELETE:
            if start + 8 * count != end:
                raise CorruptRecord("delete count mismatch")
            return DeleteRecord(offset, ts, struct.unpack_from(f">{count}Q", buf, start))
        if start + LEASE_ITEM.size * count != end:
            raise CorruptRecord("lease count mismatch")
        items = list(LEASE_ITEM.iter_unpack(memoryview(buf)[start:end]))
        return LeaseRecord(offset, ts, items)
    except struct.error as exc:
        raise CorruptRecord(f"bad record fields: {exc}") from None


def verify_buffer(buf: bytes, sizes: list[int]) -> None:
    """Re-check every record's CRC in an encoded group right before it is written.

    Catches a bug or a memory error between encoding and the write; a failure is
    an AssertionError (a bug), never written to disk.
    """
    view = memoryview(buf)
    unpack = PREFIX.unpack_from
    pos = 0
    for size in sizes:
        length, crc = unpack(buf, pos)
        end = pos + size
        if length + PREFIX_BYTES != size or crc32(view[pos + PREFIX_BYTES : end]) != crc:
            raise AssertionError(f"record at {pos} of an encoded group fails its check")
        pos = end
    if pos != len(buf):
        raise AssertionError("encoded group length mismatch")
