"""The on-disk format of a partition log: segment header and records (no I/O here).

A segment file is a header followed by records, all big-endian:

    header v2 = magic "MQDL" | u16 format version | u16 flags (0) | u64 base offset
                | u64 created_ms | u64 key id                        (32 bytes)
    header v1 = the same without the key id                         (24 bytes)
    record  = u32 length | u32 crc32 | payload                 (length = len(payload))
    payload = u8 type | u64 offset | u64 timestamp_ms | fields | body

The key id (see `crypto.py`) names the AES-256-GCM key that sealed the
segment's message records; 0 (and every v1 segment) means plaintext. A sealed
segment holds SEALED_MESSAGE records where a plaintext one holds MESSAGE.

The CRC (zlib crc32) covers the payload, sealed bytes included. Every record has its own
offset, one more than the previous record's, Kafka-style; offsets never repeat, though a
failed write may leave a gap. Fields per type:

    MESSAGE  u64 due_ms | i32 priority | u32 receive_count | u16 len group_id
             | u16 len dedup_id | u16 len source_queue | u16 len original_id
             | u32 len attributes | the four strings (UTF-8) | attributes | body
             attributes = u16 count, then per pair u16 len key | key | u32 len value | value
    SEALED_MESSAGE  the MESSAGE fields up to and including the four strings (len attributes
             is the plaintext length) | u64 key id | 12-byte nonce
             | AES-256-GCM(attributes | body) | 16-byte tag
             The nonce is random per record. The associated data is the payload before the
             nonce (type, offset, timestamp, the fixed fields, the four strings, the key id), so
             a sealed record cannot be moved to another offset or have its metadata altered
             unnoticed. The strings (group, dedup, source queue, original id) stay plaintext:
             they are metadata the index holds too. Each record names its key (not only the
             segment header) because replication copies records byte for byte into segments
             that roll at other offsets, so one follower segment may hold two keys' records.
    DELETE   u32 count | count * u64 message offset
    LEASE    u32 count | count * (u64 offset | u32 receive_count | u64 visible_at_ms
             | u64 first_received_at_ms)
    PURGE    u64 up_to_offset (every message below it is deleted)

DELETE, LEASE and PURGE carry no user data and are never sealed.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING
from zlib import crc32

from cryptography.exceptions import InvalidTag

if TYPE_CHECKING:
    from mqd.storage.crypto import Keyring, SealingKey

MAGIC = b"MQDL"
# Segment format version. To change the format: bump FORMAT_VERSION, keep the
# decoder of every older version and pick it by each segment's header version
# (`read_header` accepts every version in READABLE_VERSIONS), write new segments
# only in the newest version, and add a test that opens a segment written in the
# old one. Old segments are never rewritten in place; they leave through reclaim.
# History: 1 = first format; 2 = key id in the header, SEALED_MESSAGE records
# (a v1 segment is a plaintext v2 segment with a shorter header).
FORMAT_VERSION = 2
READABLE_VERSIONS = frozenset({1, 2})

HEADER_V1 = struct.Struct(">4sHHQQ")  # magic, version, flags, base offset, created_ms
SEGMENT_HEADER = struct.Struct(">4sHHQQQ")  # v2: the same, then the key id
# The header size of the newest version (what new segments get); `SegmentHeader.size`
# is the size of a given segment's header, where its first record starts.
HEADER_BYTES = SEGMENT_HEADER.size
_HEADER_BY_VERSION = {1: HEADER_V1, 2: SEGMENT_HEADER}

MESSAGE = 1
DELETE = 2
LEASE = 3
PURGE = 4
SEALED_MESSAGE = 5
TYPE_NAMES = {
    MESSAGE: "MESSAGE",
    DELETE: "DELETE",
    LEASE: "LEASE",
    PURGE: "PURGE",
    SEALED_MESSAGE: "SEALED_MESSAGE",
}
KEY_ID_BYTES = 8
NONCE_BYTES = 12
TAG_BYTES = 16
SEAL_OVERHEAD_BYTES = KEY_ID_BYTES + NONCE_BYTES + TAG_BYTES  # per sealed record

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
_STRING_LENGTHS = struct.Struct(">HHHH")  # in MSG_HEAD, 12 bytes before its end
_PURGE_FULL = struct.Struct(">IIBQQQ")
_COUNT_FULL = struct.Struct(">IIBQQI")


class CorruptRecord(Exception):
    """A record failed its checks; `reason` says which."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class TagMismatch(CorruptRecord):
    """A sealed record's CRC holds but its GCM tag does not: tampering, never a torn write.

    (Wrong keys are caught before any record is opened: a key's id is a hash of it.)
    """


class KeyMissing(CorruptRecord):
    """A sealed record names a key id the key ring does not hold."""

    def __init__(self, key_id: int) -> None:
        super().__init__(f"sealed with key {key_id:016x}, which is not listed")
        self.key_id = key_id


def segment_name(base_offset: int) -> str:
    return f"{base_offset:020d}.log"


def encode_header(base_offset: int, created_ms: int, key_id: int = 0) -> bytes:
    """A newest-version header; `key_id` 0 = a plaintext segment."""
    return SEGMENT_HEADER.pack(MAGIC, FORMAT_VERSION, 0, base_offset, created_ms, key_id)


@dataclass(frozen=True, slots=True)
class SegmentHeader:
    version: int
    base: int
    created_ms: int
    key_id: int  # 0 = plaintext
    size: int  # bytes; the first record starts here


def parse_header(data: bytes) -> SegmentHeader:
    """Decode a segment header of any readable version or raise CorruptRecord."""
    if len(data) < 8:
        raise CorruptRecord("short segment header")
    magic, version = struct.unpack_from(">4sH", data, 0)
    if magic != MAGIC:
        raise CorruptRecord("bad segment magic")
    if version not in READABLE_VERSIONS:
        raise CorruptRecord(f"unknown segment format version {version}")
    layout = _HEADER_BY_VERSION[version]
    if len(data) < layout.size:
        raise CorruptRecord("short segment header")
    fields = layout.unpack_from(data, 0)
    key_id = fields[5] if version >= 2 else 0
    return SegmentHeader(version, fields[3], fields[4], key_id, layout.size)


def read_header(data: bytes) -> tuple[int, int, int]:
    """Return (version, base offset, created_ms) or raise CorruptRecord."""
    h = parse_header(data)
    return h.version, h.base, h.created_ms


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


def encode_messages(
    messages,
    first_offset: int,
    timestamp_ms: int,
    parts: list,
    sizes: list,
    key: SealingKey | None = None,
) -> None:
    """Append the records of `messages` to `parts` and each record's size to `sizes`.

    This is the hot path of SEND (DESIGN.md §10): one struct pack, two or three
    crc32 calls and three list appends per message; the body is not copied
    until the group's single join. With a `key` the records are SEALED_MESSAGE
    (`_encode_sealed`).
    """
    if key is not None:
        _encode_sealed(messages, first_offset, timestamp_ms, parts, sizes, key)
        return
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


def _encode_sealed(messages, first_offset: int, timestamp_ms: int, parts, sizes, key) -> None:
    """Sealed records: as the plaintext path plus one AES-GCM call per message.

    The nonces of the whole group come from one `os.urandom` call. Attributes and
    body are joined (one copy) because GCM seals them together; the ciphertext is
    a new buffer anyway.
    """
    pack_head = MSG_HEAD.pack
    pack_prefix = PREFIX.pack
    encrypt = key.aead.encrypt
    nonces = key.nonces(len(messages))
    kid = U64.pack(key.key_id)
    append = parts.append
    append_size = sizes.append
    offset = first_offset
    at = 0
    for m in messages:
        attrs = m.attributes
        a = encode_attributes(attrs) if attrs else b""
        if m.group_id or m.dedup_id or m.source_queue or m.original_id:
            g = m.group_id.encode()
            d = m.dedup_id.encode()
            s = m.source_queue.encode()
            o = m.original_id.encode()
            var = b"".join((g, d, s, o))
            head = pack_head(
                SEALED_MESSAGE, offset, timestamp_ms, m.due_ms, m.priority, m.receive_count,
                len(g), len(d), len(s), len(o), len(a),
            )  # fmt: skip
            aad = b"".join((head, var, kid))
        else:
            aad = pack_head(
                SEALED_MESSAGE, offset, timestamp_ms, m.due_ms, m.priority, m.receive_count,
                0, 0, 0, 0, len(a),
            ) + kid  # fmt: skip
        nonce = nonces[at : at + NONCE_BYTES]
        at += NONCE_BYTES
        sealed = encrypt(nonce, a + m.body if a else m.body, aad)
        length = len(aad) + NONCE_BYTES + len(sealed)
        append(pack_prefix(length, crc32(sealed, crc32(nonce, crc32(aad)))))
        append(aad)
        append(nonce)
        append(sealed)
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


def sealed_key_id(buf, pos: int, total: int) -> int:
    """The key id a checked SEALED_MESSAGE record names (0 if its fields are implausible)."""
    p = pos + PREFIX_BYTES + MSG_HEAD_BYTES
    lg, ld, ls, lo = _STRING_LENGTHS.unpack_from(buf, p - 12)
    p += lg + ld + ls + lo
    if p + SEAL_OVERHEAD_BYTES > pos + total:
        return 0
    return U64.unpack_from(buf, p)[0]


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


def decode_message(
    buf, pos: int, total: int, with_body: bool = True, keys: Keyring | None = None
) -> MessageRecord:
    """Decode a checked MESSAGE or SEALED_MESSAGE record at `pos` of size `total`.

    A sealed record is opened with the key it names from `keys`; then its GCM tag
    is always checked (even `with_body=False`): a mismatch raises `TagMismatch`,
    a key not in `keys` `KeyMissing`. With `keys` None, `with_body=False` gives
    the plaintext metadata (no attributes) and `with_body=True` raises
    CorruptRecord: never ciphertext as a body.
    """
    (_l, _c, rtype, offset, ts, due, prio, rc, lg, ld, ls, lo, la) = MSG_FULL.unpack_from(buf, pos)
    p = pos + PREFIX_BYTES + MSG_HEAD_BYTES
    end = pos + total
    sealed = rtype == SEALED_MESSAGE
    if p + lg + ld + ls + lo + (SEAL_OVERHEAD_BYTES if sealed else 0) + la > end:
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
        if sealed:
            return _open_sealed(mv, pos, p, end, keys, with_body,
                                (offset, ts, due, prio, rc, g, d, s, o), la)  # fmt: skip
        attrs = decode_attributes(mv[p : p + la]) if la else {}
    except (UnicodeDecodeError, struct.error) as exc:
        raise CorruptRecord(f"bad message fields: {exc}") from None
    p += la
    body = bytes(mv[p:end]) if with_body else b""
    return MessageRecord(offset, ts, due, prio, rc, g, d, s, o, attrs, body, end - p + la)


def _open_sealed(mv, pos: int, p: int, end: int, keys, with_body: bool, fields, la: int):
    size = end - p - SEAL_OVERHEAD_BYTES  # plaintext attributes + body
    if keys is None:
        if with_body:
            raise CorruptRecord("sealed message record and no key to open it")
        return MessageRecord(*fields, {}, b"", size)
    (key_id,) = U64.unpack_from(mv, p)
    key = keys.get(key_id) if key_id else None
    if key is None:
        raise KeyMissing(key_id)
    p += KEY_ID_BYTES
    nonce = mv[p : p + NONCE_BYTES]
    try:
        plain = key.aead.decrypt(nonce, mv[p + NONCE_BYTES : end], mv[pos + PREFIX_BYTES : p])
    except InvalidTag:
        raise TagMismatch(
            f"authentication tag mismatch at offset {fields[0]} (tampered record)"
        ) from None
    if not with_body:
        return MessageRecord(*fields, {}, b"", size)
    attrs = decode_attributes(memoryview(plain)[:la]) if la else {}
    return MessageRecord(*fields, attrs, plain[la:] if la else plain, size)


def decode_record(
    buf, pos: int, total: int, with_body: bool = True, keys: Keyring | None = None
) -> Record:
    """Decode a record already checked by `check_record` (`keys`: see `decode_message`)."""
    rtype = buf[pos + PREFIX_BYTES]
    if rtype == MESSAGE or rtype == SEALED_MESSAGE:
        return decode_message(buf, pos, total, with_body, keys)
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
