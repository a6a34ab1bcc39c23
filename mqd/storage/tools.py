"""Operator tools: `mqd storage verify|dump|rebuild-index DIR`.

`verify` and `dump` only read (segments, and the index opened read-only);
`rebuild_index` opens each partition like the node does, which also runs
recovery (a torn tail is truncated, a damaged segment renamed `.bad`). Run
them with the node stopped: the node's data-dir lock is the CLI's business.

DIR is a partition directory (one with `*.log` segments) or any directory
above partition directories, searched recursively.

Sealed segments (encryption at rest, `crypto.py`): given key files (`--key-file`,
repeatable), `verify` also checks every sealed record's GCM tag and `dump`
shows their bodies; without them it checks CRCs only and says how many sealed
records it could not authenticate.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from mqd.errors import ConfigError
from mqd.storage import records as rec
from mqd.storage.config import StorageConfig
from mqd.storage.crypto import Keyring, format_key_id, load_key_file
from mqd.storage.index import INDEX_FILE
from mqd.storage.scan import base_of, list_segments, scan_segment

_RECORD_BYTES_MAX = 2**32 - 65  # the tools accept any record the format can frame


def load_keys(paths: list[str]) -> Keyring | None:
    """The key ring of `--key-file` options (None if none given); ConfigError on a bad file."""
    if not paths:
        return None
    return Keyring(None, [load_key_file(p, "--key-file") for p in paths])


def find_partitions(path: Path) -> list[Path]:
    """`path` itself if it holds segments, else every directory below it that does."""
    path = Path(path)
    if list_segments(path):
        return [path]
    found = []
    for root, dirs, _files in os.walk(path):
        dirs.sort()
        if list_segments(Path(root)):
            found.append(Path(root))
    return found


@dataclass
class PartitionReport:
    path: Path
    segments: int = 0
    records: int = 0
    sealed_records: int = 0
    sealed_unchecked: int = 0  # sealed records whose tag was not checked (no keys given)
    live_messages: int = 0  # by replaying the whole log
    index_rows: int | None = None  # None: no index file
    index_checkpoint: int | None = None
    log_end: int = 0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass
class VerifyReport:
    partitions: list[PartitionReport] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """False if anything is damaged or inconsistent (exit status 1 in the CLI)."""
        return bool(self.partitions) and all(p.ok for p in self.partitions)

    def text(self) -> str:
        if not self.partitions:
            return "no partition directories (with *.log segments) found\nFAILED\n"
        lines = []
        for p in self.partitions:
            index = (
                "no index"
                if p.index_rows is None
                else f"index rows={p.index_rows} checkpoint={p.index_checkpoint}"
            )
            sealed = f" sealed={p.sealed_records}" if p.sealed_records else ""
            lines.append(
                f"{'ok ' if p.ok else 'BAD'} {p.path}: segments={p.segments} records={p.records}"
                f"{sealed} live={p.live_messages} log_end={p.log_end} {index}"
            )
            lines += [f"    problem: {x}" for x in p.problems]
            lines += [f"    note: {x}" for x in p.notes]
        bad = sum(1 for p in self.partitions if not p.ok)
        lines.append(f"{len(self.partitions)} partition(s), {bad} with problems")
        lines.append("OK" if self.ok else "FAILED")
        return "\n".join(lines) + "\n"


def verify(path: Path, keys: Keyring | None = None) -> VerifyReport:
    """Check every record's CRC and framing, and the index rows against the log.

    With `keys`, also every sealed record's GCM tag; a key a segment needs and
    `keys` lacks is a problem naming its id.
    """
    return VerifyReport([_verify_partition(p, keys) for p in find_partitions(Path(path))])


def _missing_keys(scan: Any, keys: Keyring) -> list[int]:
    """The ids of the keys a scanned segment is sealed with that `keys` does not hold."""
    return sorted(k for k in {scan.key_id, *scan.key_ids} - {0} if not keys.get(k))


def _verify_partition(part: Path, keys: Keyring | None = None) -> PartitionReport:
    report = PartitionReport(part)
    live: dict[int, tuple[int, int, int]] = {}  # offset -> (segment base, position, size)
    files = list_segments(part)
    report.segments = len(files)
    history: list[tuple[int, str, tuple]] = []  # replay events by record offset
    for i, (base, seg_path) in enumerate(files):
        if seg_path.name.endswith(".bad"):
            report.problems.append(f"{seg_path.name}: damaged segment set aside by recovery")
        data = seg_path.read_bytes()
        scan, found = scan_segment(seg_path, data, _RECORD_BYTES_MAX, base)
        if scan.header_error:
            report.problems.append(f"{seg_path.name}: {scan.header_error}")
        for start, end, why in scan.bad_ranges:
            where = "tail" if end == scan.file_size and i == len(files) - 1 else "middle"
            report.problems.append(f"{seg_path.name}: bytes {start}-{end} damaged ({why}, {where})")
        report.records += scan.records
        report.log_end = max(report.log_end, base, scan.last_offset + 1)
        for key_id in _missing_keys(scan, keys) if keys else ():
            report.problems.append(f"{seg_path.name}: sealed with key {format_key_id(key_id)}, "
                                   "which no --key-file holds")  # fmt: skip
        for pos, size, rtype, _off in found:
            r = rec.decode_record(data, pos, size, with_body=False)
            history.append((r.offset, "r", (base, pos, size, r)))
            if rtype != rec.SEALED_MESSAGE:
                continue
            report.sealed_records += 1
            if keys is None:
                report.sealed_unchecked += 1
                continue
            try:
                rec.decode_record(data, pos, size, with_body=False, keys=keys)
            except rec.KeyMissing:
                report.sealed_unchecked += 1  # reported once per key above
            except rec.TagMismatch as exc:
                report.problems.append(f"{seg_path.name}: position {pos}: {exc.reason}")
    if report.sealed_unchecked:
        report.notes.append(f"{report.sealed_unchecked} sealed record(s) not authenticated "
                            "(give their key with --key-file)")  # fmt: skip
    history.sort(key=lambda h: h[0])
    # Replay the log; remember the live set as of the index checkpoint.
    checkpoint, rows = _read_index(part, report)
    at_checkpoint: set[int] | None = set() if checkpoint == 0 else None
    for off, _kind, (base, pos, size, r) in history:
        if checkpoint is not None and at_checkpoint is None and off >= checkpoint:
            at_checkpoint = set(live)
        if isinstance(r, rec.MessageRecord):
            live[r.offset] = (base, pos, size)
        elif isinstance(r, rec.DeleteRecord):
            for o in r.offsets:
                live.pop(o, None)
        elif isinstance(r, rec.PurgeRecord):
            for o in [o for o in live if o < r.up_to_offset]:
                del live[o]
    if checkpoint is not None and at_checkpoint is None:
        at_checkpoint = set(live)
    report.live_messages = len(live)
    if rows is None:
        return report
    report.index_rows = len(rows)
    if checkpoint > report.log_end:
        report.problems.append(
            f"index checkpoint {checkpoint} is past the end of the log {report.log_end}"
        )
        return report
    if checkpoint < report.log_end:
        report.notes.append(f"index lags the log by {report.log_end - checkpoint} record(s)")
    positions = _all_messages(history)
    in_index = set()
    for off, seg, pos, length in rows:
        in_index.add(off)
        if positions.get(off) != (seg, pos, length):
            report.problems.append(
                f"index row for offset {off} points at segment {seg} position {pos}"
                f" length {length}, which holds no such message record"
            )
    missing = sorted(at_checkpoint - in_index)
    extra = sorted(in_index - at_checkpoint)
    if missing:
        report.problems.append(f"{len(missing)} live message(s) missing from the index: "
                               f"{missing[:10]}")  # fmt: skip
    if extra:
        report.problems.append(f"{len(extra)} deleted message(s) still in the index: "
                               f"{extra[:10]}")  # fmt: skip
    return report


def _all_messages(history) -> dict[int, tuple[int, int, int]]:
    return {
        r.offset: (base, pos, size)
        for _off, _k, (base, pos, size, r) in history
        if isinstance(r, rec.MessageRecord)
    }


def _read_index(part: Path, report: PartitionReport):
    index = part / INDEX_FILE
    if not index.exists():
        report.notes.append("no index file (it is rebuilt from the log on open)")
        return None, None
    try:
        db = sqlite3.connect(f"file:{index}?mode=ro", uri=True)
        try:
            (checkpoint,) = db.execute("SELECT value FROM meta WHERE key='checkpoint'").fetchone()
            rows = db.execute("SELECT off, seg, pos, len FROM messages ORDER BY off").fetchall()
        finally:
            db.close()
    except (sqlite3.Error, TypeError) as exc:
        report.problems.append(f"index unreadable ({exc}); run rebuild-index")
        return None, None
    report.index_checkpoint = checkpoint
    return checkpoint, rows


def dump(
    path: Path, out: TextIO, *, body_preview_bytes: int = 32, keys: Keyring | None = None
) -> int:
    """Write every record as one readable line; returns the number of records.

    Sealed bodies and attributes are shown only with `keys` that open them.
    """
    path = Path(path)
    if path.is_file():
        targets = [(path.parent, [(_base_or_zero(path), path)])]
    else:
        targets = [(p, list_segments(p)) for p in find_partitions(path)]
    count = 0
    for part, files in targets:
        out.write(f"# partition {part}\n")
        for base, seg_path in files:
            data = seg_path.read_bytes()
            scan, found = scan_segment(seg_path, data, _RECORD_BYTES_MAX, base)
            sealed = f" key={format_key_id(scan.key_id)}" if scan.key_id else ""
            out.write(f"# segment {seg_path.name} bytes={len(data)} created_ms={scan.created_ms}"
                      f"{sealed}\n")  # fmt: skip
            if scan.header_error:
                out.write(f"!! header: {scan.header_error}\n")
            damage = iter(scan.bad_ranges)
            pending = next(damage, None)
            for pos, size, rtype, _off in found:
                while pending is not None and pending[0] < pos:
                    out.write(f"!! damaged bytes {pending[0]}-{pending[1]}: {pending[2]}\n")
                    pending = next(damage, None)
                out.write(_describe_any(data, pos, size, rtype, keys, body_preview_bytes) + "\n")
                count += 1
            while pending is not None:
                out.write(f"!! damaged bytes {pending[0]}-{pending[1]}: {pending[2]}\n")
                pending = next(damage, None)
    return count


def _describe_any(data, pos: int, size: int, rtype: int, keys, preview: int) -> str:
    if rtype != rec.SEALED_MESSAGE:
        return _describe(rec.decode_record(data, pos, size), pos, size, preview)
    key_id = format_key_id(rec.sealed_key_id(data, pos, size))
    try:
        r = rec.decode_record(data, pos, size, keys=keys or Keyring())
    except rec.CorruptRecord as exc:
        r = rec.decode_record(data, pos, size, with_body=False)
        line = _describe(r, pos, size, 0).replace(" MESSAGE ", " SEALED_MESSAGE ")
        return line.rsplit(" attributes=", 1)[0] + f" key={key_id} (not opened: {exc.reason})"
    return _describe(r, pos, size, preview).replace(" MESSAGE ", f" SEALED_MESSAGE key={key_id} ")


def _base_or_zero(path: Path) -> int:
    return base_of(path) or 0


def _describe(r: rec.Record, pos: int, size: int, preview: int) -> str:
    head = f"offset={r.offset} pos={pos} size={size} ts={r.timestamp_ms}"
    if isinstance(r, rec.MessageRecord):
        return (
            f"{head} MESSAGE due={r.due_ms} priority={r.priority} receive_count={r.receive_count}"
            f" group={r.group_id!r} dedup={r.dedup_id!r} source={r.source_queue!r}"
            f" original={r.original_id!r} attributes={r.attributes!r}"
            f" body[{len(r.body)}]={r.body[:preview]!r}{'…' if len(r.body) > preview else ''}"
        )
    if isinstance(r, rec.DeleteRecord):
        return f"{head} DELETE offsets={list(r.offsets)}"
    if isinstance(r, rec.LeaseRecord):
        items = " ".join(f"{o}:rc={rc},visible_at={v},first={f}" for o, rc, v, f in r.leases)
        return f"{head} LEASE {items}"
    return f"{head} PURGE up_to={r.up_to_offset}"


@dataclass
class RebuildReport:
    partitions: dict[Path, dict] = field(default_factory=dict)  # path -> store stats

    @property
    def ok(self) -> bool:
        return bool(self.partitions)

    def text(self) -> str:
        lines = [
            f"rebuilt {p}: live={s['live_messages']} next_offset={s['next_offset']}"
            f" segments={s['segments']} bad_segments={s['bad_segments']}"
            for p, s in self.partitions.items()
        ]
        if not self.partitions:
            lines.append("no partition directories (with *.log segments) found")
        return "\n".join(lines) + "\n"


async def rebuild_index_async(path: Path, config: StorageConfig | None = None) -> RebuildReport:
    """Drop each partition's index and rebuild it from the log (with recovery).

    Sealed segments need the node's `[storage]` config (its key files); with
    another current key, recovery would roll each active segment to that key.
    """
    from mqd.storage.index import Index
    from mqd.storage.store import PartitionStore

    report = RebuildReport()
    parts = find_partitions(Path(path))
    # Every key the logs need, checked before any index is dropped: without them the
    # rebuild failed after emptying the first index (the node replays its log at start,
    # so nothing was lost, but the tool left things worse than it found them).
    keys = (config or StorageConfig()).keyring()
    for part in parts:
        for base, seg_path in list_segments(part):
            scan, _ = scan_segment(seg_path, seg_path.read_bytes(), _RECORD_BYTES_MAX, base)
            missing = _missing_keys(scan, keys)
            if missing:
                raise ConfigError(
                    f"{seg_path}: sealed with key {format_key_id(missing[0])}, which this "
                    "node's [storage] keys do not hold: pass the node's --config; "
                    "nothing was changed"
                )
    for part in parts:
        Index.remove_files(part)
        store = await PartitionStore.open(part, config or StorageConfig())
        try:
            report.partitions[part] = store.stats()
        finally:
            await store.close()
    return report


def rebuild_index(path: Path, config: StorageConfig | None = None) -> RebuildReport:
    """Synchronous wrapper of `rebuild_index_async` for the CLI."""
    return asyncio.run(rebuild_index_async(path, config))
