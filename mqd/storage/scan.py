"""Reading a segment file back: record-by-record checks, resync past damage.

Shared by recovery (`PartitionStore.open`) and the operator tools, so both
judge a segment the same way. No asyncio here; callers run it in a thread.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from mqd.errors import StorageError
from mqd.storage import records as rec
from mqd.storage.crypto import Keyring


@dataclass(slots=True)
class SegmentScan:
    """What a scan of one segment found."""

    path: Path
    base: int
    created_ms: int = 0
    file_size: int = 0
    key_id: int = 0  # from the header: the key new records were sealed with (0 = plaintext)
    header_bytes: int = 0  # of this segment's format version; 0 = read it from the data
    key_ids: set[int] = field(default_factory=set)  # named by its sealed records
    header_error: str = ""
    good_end: int = 0  # end of the contiguous run of good records after the header
    last_end: int = 0  # end of the last good record anywhere in the file
    records: int = 0
    last_offset: int = -1
    # Damaged byte ranges (start, end, reason); the last may run to the end of the file.
    bad_ranges: list[tuple[int, int, str]] = field(default_factory=list)

    @property
    def damaged(self) -> bool:
        return bool(self.header_error or self.bad_ranges)

    @property
    def torn_tail_only(self) -> bool:
        """Damage only after the last good record: a torn or corrupt tail."""
        return (
            not self.header_error
            and len(self.bad_ranges) == 1
            and self.bad_ranges[0][0] == self.good_end
            and self.bad_ranges[0][1] == self.file_size
        )

    def readable(self, position: int) -> bool:
        """Whether a record starting at `position` lies outside every damaged range."""
        if self.header_error or position < self.header_bytes or position >= self.last_end:
            return False
        return all(not (start <= position < end) for start, end, _ in self.bad_ranges)


def base_of(path: Path) -> int | None:
    """The base offset in a segment file name (`…20 digits….log` or `.log.bad`)."""
    name = path.name
    if name.endswith(".log.bad"):
        stem = name[: -len(".log.bad")]
    elif name.endswith(".log"):
        stem = name[: -len(".log")]
    else:
        return None
    if len(stem) != 20 or not stem.isdigit():
        return None
    return int(stem)


def list_segments(directory: Path) -> list[tuple[int, Path]]:
    """Segment files (good and `.bad`) of a partition directory, by base offset."""
    found = []
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return []
    for entry in entries:
        path = Path(entry.path)
        base = base_of(path)
        if base is not None and entry.is_file():
            found.append((base, path))
    found.sort()
    return found


def _resync(data: bytes, start: int, last_offset: int, record_bytes_max: int) -> int | None:
    """Find the next position after `start` where a good record with a later offset begins."""
    end = len(data)
    unpack_prefix = rec.PREFIX.unpack_from
    unpack_common = rec.COMMON.unpack_from
    minimum = rec.PREFIX_BYTES + rec.COMMON_BYTES
    for q in range(start + 1, end - minimum + 1):
        length, _crc = unpack_prefix(data, q)
        if length < rec.COMMON_BYTES or length > record_bytes_max or q + 8 + length > end:
            continue
        rtype, offset, _ts = unpack_common(data, q + rec.PREFIX_BYTES)
        if rtype not in rec.TYPE_NAMES or offset <= last_offset:
            continue
        try:
            rec.check_record(data, q, end, record_bytes_max)
        except rec.CorruptRecord:
            continue
        return q
    return None


def scan_segment(
    path: Path, data: bytes, record_bytes_max: int, base_hint: int
) -> tuple[SegmentScan, list[tuple[int, int, int, int]]]:
    """Check every record of a segment's bytes.

    Returns the scan summary and the good records as (position, size, type,
    offset), in file order. Damage is skipped by resynchronising on the next
    record that checks out and has a later offset, so records after a damaged
    region are kept.
    """
    scan = SegmentScan(path=path, base=base_hint, file_size=len(data))
    found: list[tuple[int, int, int, int]] = []
    try:
        header = rec.parse_header(data)
    except rec.CorruptRecord as exc:
        scan.header_error = exc.reason
        return scan, found
    if header.base != base_hint:
        scan.header_error = f"header base offset {header.base} does not match the file name"
        return scan, found
    scan.created_ms = header.created_ms
    scan.key_id = header.key_id
    scan.header_bytes = header.size
    for item in iter_records(scan, data, record_bytes_max):
        found.append(item)
    return scan, found


def iter_records(
    scan: SegmentScan, data: bytes, record_bytes_max: int
) -> Iterator[tuple[int, int, int, int]]:
    if not scan.header_bytes:
        try:
            scan.header_bytes = rec.parse_header(data).size
        except rec.CorruptRecord:
            scan.header_bytes = rec.HEADER_BYTES
    pos = scan.header_bytes
    end = len(data)
    last_offset = scan.base - 1
    contiguous = True
    check = rec.check_record
    unpack_common = rec.COMMON.unpack_from
    sealed = rec.SEALED_MESSAGE
    key_ids = scan.key_ids
    scan.good_end = pos
    scan.last_end = pos
    while pos < end:
        try:
            size = check(data, pos, end, record_bytes_max)
            rtype, offset, _ts = unpack_common(data, pos + rec.PREFIX_BYTES)
            if offset <= last_offset:
                raise rec.CorruptRecord(f"offset {offset} not above {last_offset}")
        except rec.CorruptRecord as exc:
            if data.count(0, pos) == end - pos:
                # Space the store preallocated and had not written yet: the log's end.
                return
            nxt = _resync(data, pos, last_offset, record_bytes_max)
            scan.bad_ranges.append((pos, end if nxt is None else nxt, exc.reason))
            contiguous = False
            if nxt is None:
                return
            pos = nxt
            continue
        if rtype == sealed:
            key_ids.add(rec.sealed_key_id(data, pos, size))
        yield pos, size, rtype, offset
        last_offset = offset
        pos += size
        scan.records += 1
        scan.last_offset = offset
        scan.last_end = pos
        if contiguous:
            scan.good_end = pos


def require_keys(scan: SegmentScan, keys: Keyring) -> None:
    """Check that `keys` holds every key the segment names (header and records).

    A missing key is a `ConfigError` naming its id and the segment: found at
    open from the ids alone, before any record is decrypted. (A key's id is a
    hash of it, so a wrong key is a missing key.)
    """
    for key_id in sorted({scan.key_id, *scan.key_ids} - {0}):
        keys.require(key_id, f"segment {scan.path}")


def decode_checked(
    scan: SegmentScan, data: bytes, found: list[tuple[int, int, int, int]], keys: Keyring
) -> list[tuple[int, int, rec.Record]]:
    """Decode records found by `scan_segment` (no bodies) for replay, checking GCM tags.

    First `require_keys`. A sealed record whose CRC holds but whose tag fails was
    altered after it was written (a torn write fails the CRC first): a
    `StorageError`, never a truncation.
    """
    require_keys(scan, keys)
    decode = rec.decode_record
    try:
        return [(pos, size, decode(data, pos, size, False, keys)) for pos, size, _t, _o in found]
    except rec.TagMismatch as exc:
        raise StorageError(
            f"segment {scan.path}: {exc.reason}; refusing to open the partition "
            "(check it with `mqd storage verify --key-file`)"
        ) from None
    except rec.KeyMissing as exc:  # `require_keys` makes this a bug
        raise AssertionError(f"segment {scan.path}: {exc.reason}") from None
