"""A partition store: one append-only log of segments plus a derived SQLite index.

One instance per queue partition directory (DESIGN.md §4). The queue layer
keeps ready / delayed / in-flight sets in memory and calls this for
durability. Structure:

- Callers put an operation on `_pending` and await one future per call.
- One writer task (the single owner of the segment files) takes everything
  pending, encodes it into one buffer, does ONE write and, with fsync
  "always", ONE fdatasync in an executor thread, then resolves the futures
  of the group. While the disk works the event loop keeps queueing the next
  group.
- After the group is durable its index changes go to the index writer task
  (one SQLite transaction per batch, not awaited by callers). Batches that
  pile up while SQLite lags are merged and coalesced.
- In memory the store keeps, per live message, only its position in its
  segment (`_live`: offset -> position << 32 | size) plus the dedup ids and a
  write-through cache of recent bodies.
- Cold tier: a message due later than the cold watermark `_cold_until` (kept
  about `cold_horizon_ms` ahead of the clock) is not kept in memory at all,
  here or in the queue layer; only the log and the index row hold it. The
  queue layer calls `load_due` to move the watermark forward, which brings
  the messages now due within it back into `_live` (and hands their metas
  over). Invariant: a live message is cold iff its due time is past the
  watermark; the watermark never goes back, and `load_due` returns every
  cold message it passes over exactly once (from SQLite, or from the index
  batches not yet written to it).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import errno
import shutil
import sqlite3
import time
from collections import deque
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import structlog

from mqd import stages
from mqd.clock import SystemClock
from mqd.errors import InternalError, MessageTooLarge, StorageError, StorageFull
from mqd.storage import records as rec
from mqd.storage.config import RECORD_HEADROOM_BYTES, StorageConfig
from mqd.storage.fs import (
    PREALLOCATE_UNSUPPORTED,
    FileSystem,
    LoopSyncBudget,
    preallocation_end,
    write_all,
)
from mqd.storage.index import Index, IndexBatch, IndexUnusable
from mqd.storage.scan import (
    SegmentScan,
    decode_checked,
    iter_records,
    list_segments,
    scan_segment,
)
from mqd.storage.syncer import SyncProcess
from mqd.storage.types import Lease, MessageMeta, NewMessage, StoredMessage
from mqd.storage.uring import UringSyncer

_SHIFT = 32
_MASK = (1 << _SHIFT) - 1
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
_CACHE_ENTRY_OVERHEAD = 64
_FIXED = rec.PREFIX_BYTES + rec.MSG_HEAD_BYTES

# The index writer pauses this long between transactions (profiled: the SQLite thread
# was a quarter of the server's CPU in a send+receive+ack run; most rows it wrote
# were deleted again within a second).
INDEX_GATHER_S = 1.0
# With fsync "always", records nobody waits on (receive leases) reach the disk at the
# latest this long after their write.
LAZY_SYNC_S = 0.2
# A group that needs no fsync and fits in the preallocated space is written on the
# event loop's thread when it is at most this big.
INLINE_WRITE_BYTES_MAX = 64 * 1024
# A durable group of more operations than this fsyncs in the executor even when the
# node's LoopSyncBudget would allow the loop: groups grow when requests queue up behind
# the fsync, and then the loop has better things to do than wait for the disk.
LOOP_SYNC_OPS_MAX = 2
# Commit groups kept in memory for followers' fetches.
TAIL_BYTES_MAX = 32 * 1024 * 1024


def _slice_records(buf: bytes, first: int, from_offset: int, bytes_max: int) -> tuple[bytes, int]:
    """The records of one commit group from `from_offset` on (offsets run consecutively)."""
    pos = 0
    offset = first
    length_of = rec.PREFIX.unpack_from
    while offset < from_offset:
        pos += rec.PREFIX_BYTES + length_of(buf, pos)[0]
        offset += 1
    start = pos
    while pos < len(buf) and (pos == start or pos - start < bytes_max):
        pos += rec.PREFIX_BYTES + length_of(buf, pos)[0]
        offset += 1
    return buf[start:pos], offset


def _join_tail(
    tail: deque[tuple[int, int, bytes]], i: int, from_offset: int, bytes_max: int
) -> tuple[bytes, int]:
    """Records from `from_offset` (in group `i` of the in-memory tail) and the whole
    groups after it while they fit in `bytes_max`: a follower that is a few groups
    behind (commits made during its last round trip, or a receive lease's group just
    before a send's) catches up in one fetch, not one per group."""
    first, _end, buf = tail[i]
    data, next_offset = _slice_records(buf, first, from_offset, bytes_max)
    parts = [data]
    total = len(data)
    for j in range(i + 1, len(tail)):
        first, end, buf = tail[j]
        if first != next_offset or total + len(buf) > bytes_max:
            break
        parts.append(buf)
        total += len(buf)
        next_offset = end
    return (b"".join(parts) if len(parts) > 1 else data), next_offset


_APPEND, _DELETE, _LEASE, _PURGE, _DELETE_COLD = range(5)

# Messages due further ahead than this are kept only on disk (log + index) until they
# come within it; see the module docstring. A minute gives the queue layer's periodic
# pull (at least every half horizon) ample room to have them in memory before they fall
# due. Not a config key yet: `PartitionStore.open(cold_horizon_ms=...)` overrides it.
COLD_HORIZON_MS = 60_000

# A follower's fetch from disk (`read_raw` past the in-memory tail) starts reading at a
# record at most this far before what it asked for: each segment keeps the offset and
# position of a record every RAW_MARK_BYTES, found the first time it is read whole.
RAW_MARK_BYTES = 1 << 20
RAW_WINDOW_SLACK = 64 * 1024


class _Segment:
    """One segment file. Positions are byte positions in the file."""

    __slots__ = (
        "allocated", "bad", "base", "cold", "created_ms", "dead_at", "dedup_ms", "fd", "live",
        "marks", "path", "scan", "size",
    )  # fmt: skip

    def __init__(self, base: int, path: Path, size: int, created_ms: int) -> None:
        self.base = base
        self.path = path
        self.size = size  # end of the last good record; the active segment appends here
        self.allocated = size  # the file's size: beyond `size`, preallocated zeros
        self.created_ms = created_ms
        self.fd: int | None = None
        self.live = 0  # live messages in this segment, cold ones included
        self.cold = 0  # of which cold (in the index only)
        self.dead_at = -1  # offset of the record that deleted its last live message
        self.bad = False  # renamed .bad: read-only, never reclaimed
        # When the newest message with a dedup id in it was sent (0: none): the segment
        # outlives its messages until that id leaves `dedup_retention_ms`, so an index
        # rebuilt from the log still knows it.
        self.dedup_ms = 0
        self.scan: SegmentScan | None = None
        # (offset, position) of a record every RAW_MARK_BYTES, for `read_raw` from disk;
        # replaced whole (never mutated), so a reader thread always sees a sorted list.
        self.marks: list[tuple[int, int]] = []


class _Op:
    __slots__ = ("durable", "future", "kind", "payload", "result")

    def __init__(self, kind: int, payload: Any, future: asyncio.Future, durable: bool) -> None:
        self.kind = kind
        self.payload = payload
        self.future = future
        self.durable = durable  # with fsync "always": its group must fsync before it resolves
        self.result: Any = None


def _fail_ops(ops: list[_Op], error: Callable[[], Exception]) -> None:
    """Fail the callers of a group still waiting, each with its own error object (one
    shared instance would grow its traceback with every caller that raises it)."""
    for op in ops:
        if not op.future.done():
            op.future.set_exception(error())


def _io_error(exc: OSError, what: str) -> Exception:
    if exc.errno in _FULL_ERRNOS:
        return StorageFull(f"{what}: disk full ({exc.strerror})")
    return InternalError(f"{what}: {exc.strerror or exc}")


# The keys of `PartitionStore.stats()` that count since the store opened (the rest are
# gauges): a node's totals keep them when a partition closes (a queue deleted, a
# partition moved away), so its STATS never go back.
CUMULATIVE_STATS = frozenset(
    {
        "commits",
        "commits_synced_on_loop",
        "fsyncs_in_sync_process",
        "fsyncs_in_io_uring",
        "records_written",
        "messages_appended",
        "bytes_written",
        "write_errors",
        "segments_reclaimed",
        "index_batches",
        "index_errors",
        "cache_hits",
        "cache_misses",
        "raw_read_bytes",
        "writes",
        "fsyncs",
    }
)


class PartitionStore:
    """The durable log of one queue partition. See the module docstring."""

    def __init__(
        self,
        directory: Path,
        config: StorageConfig,
        clock: Any,
        log: Any,
        fs: FileSystem,
        cold_horizon_ms: int = COLD_HORIZON_MS,
    ) -> None:
        assert cold_horizon_ms > 0, "the cold horizon must be positive"
        self.directory = directory
        self.cold_horizon_ms = cold_horizon_ms
        self.config = config
        self._clock = clock
        self._log = log
        self._fs = fs
        self._loop = asyncio.get_running_loop()
        self._segments: list[_Segment] = []
        self._bases: list[int] = []
        self._active: _Segment | None = None
        self._live: dict[int, int] = {}
        self._dedup: dict[str, tuple[int, int]] = {}
        self._cache: dict[int, tuple[NewMessage, int]] = {}
        self._cache_bytes = 0
        self._next_offset = 0
        # Replication (mqd.cluster.replication): the last commit groups as written, so
        # followers fetch from memory; `durable_listeners` hear when a durable group can
        # be shipped (its end), `synced_listeners` when `next_offset` has moved past it.
        self._tail: deque[tuple[int, int, bytes]] = deque()
        self._tail_bytes = 0
        self.durable_listeners: list[Callable[[int], None]] = []
        # Set by a replicated leader (LeaderReplication): a small durable group goes to
        # the followers once written, while its fsync runs, so the two overlap instead
        # of the followers' round trip starting after the leader's own commit.
        # `_written_end` is then past `_next_offset` (the durable end) until it returns.
        self.ship_before_sync = False
        self._written_end = 0
        self.synced_listeners: list[Callable[[], None]] = []
        # An fsync that failed after its group was shipped: the log can no longer be
        # cut back (followers may hold the group), so every later write is refused (with
        # this reason), and `failure_listeners` hear of it (the backend stops its node).
        self._broken: str | None = None
        self.failure_listeners: list[Callable[[OSError], None]] = []
        # Metrics (mqd.metrics): (records in the group, seconds of write + fsync).
        self.commit_observers: list[Callable[[int, float], None]] = []
        # Set by the backend of a node without replication: small durable groups may
        # fsync on the loop's thread (fs.LoopSyncBudget). A replicated leader keeps its
        # loop for followers' fetches (measured: the cluster's W1c fell to 690 msgs/s).
        self.loop_sync: LoopSyncBudget | None = None
        # Set by the backend: the node's syncer, which syncs the active segment of small
        # durable groups the loop does not, sparing the GIL hand-offs of an executor
        # thread: a cluster node's sync process (mqd.storage.syncer), a single node's
        # io_uring (mqd.storage.uring). `_sync_slot` names this store's file there,
        # registered anew whenever the active segment is not `_sync_seg`.
        self.syncer: SyncProcess | UringSyncer | None = None
        self._sync_slot: int | None = None
        self._sync_seg: _Segment | None = None
        self._pending: list[_Op] = []
        self._preallocate = self._preallocate_supported = True
        self._wake = asyncio.Event()
        self._closing = False
        self._closed = False
        self._writer: asyncio.Task | None = None
        self._unsynced = False
        self._last_sync = self._loop.time()
        self._sync_timer: asyncio.TimerHandle | None = None
        self._needs_truncate = False
        self._recovered: list[MessageMeta] = []
        self._last_dedup_prune_ms = 0
        # Cold tier (module docstring): the watermark, how many live messages are past it,
        # the end of the last purge, and one lock so loads and cold expiry do not interleave.
        self._cold_until = 0
        self._cold_count = 0
        # A lower bound of the cold messages' sent times (valid while any is cold):
        # their sent times are on disk only, and a queue's oldest message may be one.
        self._cold_sent_min_ms = 0
        self._purged_below = 0
        self._cold_lock = asyncio.Lock()
        self._recovered_cold_heads: dict[str, int] = {}
        # Index writer state.
        self._index: Index | None = None
        self._index_pending: IndexBatch | None = None  # changes gathering for SQLite
        self._index_hurry = asyncio.Event()
        self._index_applying: IndexBatch | None = None
        self._index_backlog_rows = 0
        self._index_wake = asyncio.Event()
        self._index_idle = asyncio.Event()
        self._index_idle.set()
        self._index_task: asyncio.Task | None = None
        self._index_checkpoint = 0
        self._reclaim_wanted = False
        self._reclaim_timer: asyncio.TimerHandle | None = None
        # Reads in flight in executor threads; fds of reclaimed segments wait for them.
        self._reads_in_flight = 0
        self._fds_to_close: list[int] = []
        # Encryption at rest (crypto.py): the key for new records, and every key for reading.
        self._keys = config.keyring()
        self._stats = {  # the cumulative ones are named in CUMULATIVE_STATS
            "commits": 0,
            "commits_synced_on_loop": 0,  # fsynced on the loop's thread (LoopSyncBudget)
            "fsyncs_in_sync_process": 0,  # by the node's sync process (mqd.storage.syncer)
            "fsyncs_in_io_uring": 0,  # by the node's io_uring (mqd.storage.uring)
            "records_written": 0,
            "messages_appended": 0,
            "bytes_written": 0,
            "last_group_ops": 0,
            "last_group_records": 0,
            "write_errors": 0,
            "segments_reclaimed": 0,
            "index_batches": 0,
            "index_errors": 0,
            "cache_hits": 0,
            "cache_misses": 0,
            "raw_read_bytes": 0,  # read from segment files for followers' fetches
        }

    # ------------------------------------------------------------------ open

    @classmethod
    async def open(
        cls,
        directory: Path,
        config: StorageConfig,
        *,
        clock: Any = None,
        log: Any = None,
        fs: FileSystem | None = None,
        cold_horizon_ms: int = COLD_HORIZON_MS,
    ) -> PartitionStore:
        """Open (creating if missing) the partition in `directory` and run recovery.

        Takes no lock: the node locks its data directory. Messages due more than
        `cold_horizon_ms` from now stay cold (not in `live_messages()`).
        """
        config.validate()
        directory = Path(directory)
        log = (log or structlog.get_logger("mqd.storage")).bind(partition_dir=str(directory))
        self = cls(
            directory, config, clock or SystemClock(), log, fs or FileSystem(), cold_horizon_ms
        )
        try:
            await self._recover()
        except BaseException:
            await self._abort_open()
            raise
        self._writer = asyncio.create_task(self._run_writer(), name=f"log-writer {directory}")
        self._index_task = asyncio.create_task(self._run_index(), name=f"index {directory}")
        return self

    async def _abort_open(self) -> None:
        if self._index is not None:
            await self._index.close()
            self._index = None
        self._close_fds()

    async def _recover(self) -> None:
        loop = self._loop
        await loop.run_in_executor(None, self._prepare_dir)
        now = self._clock.now_ms()
        dedup_since = now - self.config.dedup_retention_ms
        cold_after = self._cold_until = now + self.cold_horizon_ms
        checkpoint, rows, dedups = 0, [], []
        try:
            self._index = await Index.open(self.directory)
            checkpoint, rows, dedups = await self._index.load(dedup_since, cold_after)
        except IndexUnusable as exc:
            self._log.warning("index.rebuild", reason=str(exc))
            await self._reset_index()

        scans = await loop.run_in_executor(None, self._scan_all, checkpoint)
        log_end = self._log_end(scans)
        if checkpoint > log_end:
            # The index covers records the log no longer has (a power loss with fsync
            # "never"/"interval", or a torn tail): it cannot be trusted.
            self._log.warning("index.rebuild", reason="index ahead of log",
                              checkpoint=checkpoint, log_end=log_end)  # fmt: skip
            await self._reset_index()
            checkpoint, rows, dedups = 0, [], []
            scans = await loop.run_in_executor(None, self._scan_all, 0)
        await loop.run_in_executor(None, self._settle_segments, scans)
        self._next_offset = log_end

        metas: dict[int, MessageMeta] = {}
        batch = IndexBatch(checkpoint=log_end)
        self._load_rows(rows, metas, batch)
        for dedup_id, off, sent_at in dedups:
            self._dedup[dedup_id] = (off, sent_at)
        self._replay(scans, checkpoint, metas, batch)
        # Messages replayed from the log that are due past the watermark go cold too.
        replayed_cold = [m for m in metas.values() if m.due_ms > cold_after]
        for meta in replayed_cold:
            del metas[meta.offset]
            del self._live[meta.offset]

        for meta in metas.values():
            seg = self._segment_of(meta.offset)
            seg.live += 1
        for off, sent_at in self._dedup.values():
            if self._bases and off >= self._bases[0]:
                seg = self._segment_of(off)
                seg.dedup_ms = max(seg.dedup_ms, sent_at)
        if self._active is None or self._active.bad:
            await loop.run_in_executor(None, self._create_segment, log_end)
        elif self._active.scan is not None and self._active.scan.key_id != self._keys.current_id:
            await loop.run_in_executor(None, self._rekey_active, log_end)
        for seg in self._segments:
            if seg.live == 0:
                seg.dead_at = -1
        batch.dedup_prune_before_ms = dedup_since
        self._last_dedup_prune_ms = now
        caught_up = True
        try:
            await self._index.apply(batch)
            self._index_checkpoint = log_end
        except sqlite3.Error as exc:
            # The index is derived: a full disk must not stop the partition from
            # opening. The index task retries the batch; until then it covers `checkpoint`.
            self._log.error("index.catch_up_failed", error=str(exc))
            self._index_pending = batch
            self._index_backlog_rows = batch.rows()
            self._index_checkpoint = checkpoint
            caught_up = False
        await self._count_cold(cold_after, [] if caught_up else replayed_cold)
        self._recovered = sorted(metas.values(), key=lambda m: m.offset)
        self._log.info("partition.opened", next_offset=log_end, live=len(metas),
                       cold=self._cold_count, segments=len(self._segments),
                       replayed_from=checkpoint)  # fmt: skip
        await self._reclaim()

    async def _count_cold(self, cold_after: int, not_indexed: list[MessageMeta]) -> None:
        """Count the cold messages per segment, from the index (only counts are loaded).

        `not_indexed` are cold messages replayed from the log whose index batch
        failed to apply. Then the index still holds some rows the replay deleted,
        so the counts come out high until the next open; high only holds back the
        reclaim of a segment, where low would lose messages.
        """
        by_base = {s.base: s for s in self._segments}
        counts = await self._index.cold_by_segment(cold_after)
        for meta in not_indexed:
            counts.append((self._segment_of(meta.offset).base, 1))
        for base, n in counts:
            seg = by_base.get(base)
            if seg is None:  # rows of a lost segment: `load_due` drops them when met
                continue
            seg.cold += n
            seg.live += n
            self._cold_count += n
        heads = dict(await self._index.cold_group_heads(cold_after)) if self._cold_count else {}
        if self._cold_count:
            sent = [m.sent_at_ms for m in not_indexed]
            indexed = await self._index.cold_sent_min(cold_after)
            self._cold_sent_min_ms = min(sent + ([] if indexed is None else [indexed]), default=0)
        for meta in not_indexed:
            if meta.group_id:
                heads[meta.group_id] = min(heads.get(meta.group_id, meta.offset), meta.offset)
        self._recovered_cold_heads = heads

    async def _reset_index(self) -> None:
        if self._index is not None:
            await self._index.close()
            self._index = None
        await self._loop.run_in_executor(None, Index.remove_files, self.directory)
        self._index = await Index.open(self.directory)

    def _prepare_dir(self) -> None:
        existed = self.directory.exists()
        self.directory.mkdir(parents=True, exist_ok=True)
        if not existed:
            self._fs.fsync_dir(self.directory.parent)

    def _scan_all(self, checkpoint: int) -> list[tuple[SegmentScan, list]]:
        """Scan every segment (thread). Keeps record lists only where replay needs them."""
        out = []
        files = list_segments(self.directory)
        for i, (base, path) in enumerate(files):
            data = path.read_bytes()
            scan, found = scan_segment(path, data, self.config.record_bytes_max, base)
            is_last = i == len(files) - 1
            keep = [r for r in found if r[3] >= checkpoint] if found else []
            # Decode what replay needs now, while the bytes are at hand; check every key the
            # segment names is listed, and the GCM tags of what is replayed.
            decoded = decode_checked(scan, data, keep, self._keys)
            out.append((scan, decoded, is_last))
        return out

    @staticmethod
    def _log_end(scans) -> int:
        end = 0
        for scan, _decoded, _is_last in scans:
            end = max(end, scan.base, scan.last_offset + 1)
        return end

    def _settle_segments(self, scans) -> None:
        """Truncate torn tails, rename damaged segments .bad, open the active segment (thread)."""
        for scan, _decoded, is_last in scans:
            path = scan.path
            bad = path.name.endswith(".bad")
            seg = _Segment(scan.base, path, scan.last_end, scan.created_ms)
            seg.scan = scan
            if bad:
                seg.bad = True
                self._log.error("segment.damaged", segment=path.name, already_renamed=True,
                                damage=_describe(scan))  # fmt: skip
            elif is_last and not scan.header_error and (not scan.damaged or scan.torn_tail_only):
                if scan.damaged:
                    fd = self._fs.open(path, create=False)
                    try:
                        self._fs.ftruncate(fd, scan.good_end)
                        self._fs.fdatasync(fd)
                    finally:
                        self._fs.close(fd)
                    self._log.warning(
                        "segment.truncated", segment=path.name, position=scan.good_end,
                        bytes_dropped=scan.file_size - scan.good_end,
                        reason=scan.bad_ranges[0][2],
                    )  # fmt: skip
                    seg.allocated = scan.good_end
                else:
                    seg.allocated = scan.file_size  # with the preallocated zeros
                seg.size = scan.good_end
            elif is_last and scan.header_error and scan.file_size <= rec.HEADER_BYTES:
                # A segment torn while being created holds no records: start it again.
                fd = self._fs.open(path, create=False)
                try:
                    self._fs.ftruncate(fd, 0)
                    now_ms = self._clock.now_ms()
                    header = rec.encode_header(scan.base, now_ms, self._keys.current_id)
                    write_all(self._fs, fd, header, 0)
                    self._fs.fdatasync(fd)
                finally:
                    self._fs.close(fd)
                self._log.warning("segment.truncated", segment=path.name, position=0,
                                  bytes_dropped=scan.file_size, reason=scan.header_error)  # fmt: skip
                seg.size = seg.allocated = rec.HEADER_BYTES
                seg.created_ms = self._clock.now_ms()
                seg.scan = None
            elif scan.damaged:
                # Damage inside the log: keep the file for the operator, read what checks out.
                bad_path = path.with_name(path.name + ".bad")
                self._fs.rename(path, bad_path)
                self._fs.fsync_dir(self.directory)
                seg.path = bad_path
                seg.bad = True
                self._log.error("segment.damaged", segment=path.name, renamed_to=bad_path.name,
                                damage=_describe(scan), records_kept=scan.records)  # fmt: skip
            self._segments.append(seg)
            self._bases.append(seg.base)
        if self._segments and not self._segments[-1].bad:
            self._active = self._segments[-1]
            self._active.fd = self._fs.open(self._active.path, create=False)

    def _load_rows(self, rows, metas: dict[int, MessageMeta], batch: IndexBatch) -> None:
        """Live messages from the index, minus any whose record is gone or damaged."""
        dropped = 0
        by_base = {s.base: s for s in self._segments}
        live = self._live
        for (
            off,
            seg_base,
            pos,
            length,
            sent_at,
            due,
            prio,
            grp,
            dedup,
            rc,
            vis,
            first,
            size,
        ) in rows:
            seg = by_base.get(seg_base)
            if (
                seg is None
                or (seg.scan is not None and not seg.scan.readable(pos))
                or (seg.scan is None and pos + length > seg.size)
            ):
                dropped += 1
                batch.delete(off)
                continue
            metas[off] = MessageMeta(off, sent_at, due, prio, grp, dedup, rc, vis, first, size)
            live[off] = (pos << _SHIFT) | length
        if dropped:
            self._log.error("index.rows_lost", count=dropped,
                            reason="record missing or damaged in the log")  # fmt: skip

    def _replay(self, scans, checkpoint: int, metas: dict[int, MessageMeta], batch) -> None:
        """Apply the log past the index checkpoint to memory and to the index batch."""
        live = self._live
        for scan, decoded, _is_last in scans:
            for pos, size, r in decoded:
                if isinstance(r, rec.MessageRecord):
                    metas[r.offset] = MessageMeta(
                        r.offset, r.timestamp_ms, r.due_ms, r.priority, r.group_id, r.dedup_id,
                        r.receive_count, 0, 0, r.size,
                    )  # fmt: skip
                    live[r.offset] = (pos << _SHIFT) | size
                    batch.insert((
                        r.offset, scan.base, pos, size, r.timestamp_ms, r.due_ms, r.priority,
                        r.group_id, r.dedup_id, r.receive_count, 0, 0, r.size,
                    ))  # fmt: skip
                    if r.dedup_id:
                        self._dedup[r.dedup_id] = (r.offset, r.timestamp_ms)
                        batch.dedups.append((r.dedup_id, r.offset, r.timestamp_ms))
                elif isinstance(r, rec.DeleteRecord):
                    for off in r.offsets:
                        if metas.pop(off, None) is not None:
                            del live[off]
                        # Not in memory: it may be a cold row of the index (cold expiry).
                        batch.delete(off)
                elif isinstance(r, rec.LeaseRecord):
                    for off, rc, vis, first in r.leases:
                        meta = metas.get(off)
                        if meta is not None:
                            meta.receive_count = rc
                            meta.visible_at_ms = vis
                            meta.first_received_at_ms = first
                            batch.lease(rc, vis, first, off)
                else:
                    for off in [o for o in metas if o < r.up_to_offset]:
                        del metas[off]
                        del live[off]
                    batch.purges.append(r.up_to_offset)

    # --------------------------------------------------------------- queries

    def live_messages(self) -> list[MessageMeta]:
        """Every message recovered at open (not deleted), with its latest lease, by offset.

        This is the state found by recovery: after open the queue layer owns the
        live state (the store keeps only positions), so later calls return the
        same list, not the current state.
        """
        return self._recovered

    @property
    def cold_count(self) -> int:
        """Live messages held only on disk because they are due past `cold_until`."""
        return self._cold_count

    @property
    def cold_sent_min_ms(self) -> int | None:
        """When the oldest cold message was sent, or earlier (None: nothing is cold).

        Exact at open and after the cold messages that left were looked up again
        (`load_due`, `expire_cold`); until then it may be older than the truth."""
        return self._cold_sent_min_ms if self._cold_count else None

    async def _refresh_cold_sent_min(self) -> None:
        """Look the bound up again (under `_cold_lock`) after cold messages left."""
        if not self._cold_count:
            return
        until = self._cold_until
        gone = self._unwritten_deletes()
        pending = [r[4] for r in self._unwritten_rows() if r[5] > until and r[0] not in gone]
        try:
            indexed = await self._index.cold_sent_min(until)
        except sqlite3.Error as exc:
            self._log.warning("index.cold_sent_min_failed", error=str(exc))
            return  # the old bound stays: older than the truth, never younger
        self._cold_sent_min_ms = min(pending + ([] if indexed is None else [indexed]), default=0)

    @property
    def cold_until(self) -> int:
        """The cold watermark (ms): a live message due after it is cold."""
        return self._cold_until

    def is_hot(self, offset: int) -> bool:
        """True if the message is live and in memory (not cold, not deleted)."""
        return offset in self._live

    def _unwritten_rows(self) -> list[tuple]:
        """Index rows inserted by batches that SQLite may not show yet."""
        rows: list[tuple] = []
        for batch in (self._index_applying, self._index_pending):
            if batch is not None:
                rows += batch.inserts.values()
        return rows

    def _unwritten_deletes(self) -> set[int]:
        """Offsets whose index rows are deleted by batches SQLite may not show yet."""
        gone: set[int] = set()
        for batch in (self._index_applying, self._index_pending):
            if batch is not None:
                gone.update(batch.deletes)
        return gone

    async def load_due(self, until_ms: int) -> list[MessageMeta]:
        """Move the cold watermark up to `until_ms`; return the cold messages it passes.

        They are hot again from here on (readable, in `_live`); the caller owns
        their state. Each cold message is returned by exactly one call: the ones
        whose index rows are not written yet are taken from the pending batches.
        All messages due within the new watermark are loaded at once (they would
        be in memory anyway had they been sent later); no paging.
        """
        async with self._cold_lock:
            after = self._cold_until
            if until_ms <= after:
                return []
            self._cold_until = until_ms
            if not self._cold_count:
                return []
            found = {row[0]: row for row in self._unwritten_rows() if after < row[5] <= until_ms}
            gone = self._unwritten_deletes()  # e.g. by `expire_cold`, not written yet
            try:
                rows = await self._index.due_between(after, until_ms)
            except sqlite3.Error as exc:
                # Step the watermark back so the next call looks again. Messages appended
                # meanwhile and due within `until_ms` are hot; every cold lookup skips
                # offsets found in `_live`, so they are not loaded twice.
                if self._cold_until == until_ms:
                    self._cold_until = after
                self._log.error("index.cold_load_failed", error=str(exc))
                raise InternalError(f"loading delayed messages from the index: {exc}") from None
            for row in rows:
                found.setdefault(row[0], row)
            metas = self._make_hot(sorted(r for r in found.values() if r[0] not in gone))
            if metas:
                await self._refresh_cold_sent_min()
            return metas

    def _make_hot(self, rows: list[tuple]) -> list[MessageMeta]:
        live = self._live
        by_base = {s.base: s for s in self._segments}
        metas = []
        lost = []
        for (
            off,
            seg_base,
            pos,
            length,
            sent_at,
            due,
            prio,
            grp,
            dedup,
            rc,
            vis,
            first,
            size,
        ) in rows:
            if off in live or off < self._purged_below:
                continue  # hot already (appended after the watermark moved) or purged
            seg = by_base.get(seg_base)
            if seg is None:  # its segment is gone: never counted (`_count_cold`)
                lost.append(off)
                continue
            seg.cold -= 1
            self._cold_count -= 1
            if seg.scan is not None and not seg.scan.readable(pos):
                seg.live -= 1  # damaged on disk: a bad segment, never reclaimed
                lost.append(off)
                continue
            live[off] = (pos << _SHIFT) | length
            metas.append(MessageMeta(off, sent_at, due, prio, grp, dedup, rc, vis, first, size))
        if lost:
            # The record is gone or damaged: as `_load_rows` does at open.
            self._log.error("index.rows_lost", count=len(lost),
                            reason="record missing or damaged in the log")  # fmt: skip
            self._submit_index(IndexBatch(checkpoint=self._next_offset, deletes=lost))
        return metas

    async def expire_cold(self, sent_before_ms: int) -> list[MessageMeta]:
        """Delete the cold messages sent before `sent_before_ms` (retention); return them."""
        async with self._cold_lock:
            if not self._cold_count:
                return []
            found = await self._cold_rows(
                lambda row: row[4] < sent_before_ms,
                self._index.cold_sent_before(self._cold_until, sent_before_ms),
            )
            doomed = sorted(found)
            if not doomed:
                return []
            done = await self._submit(_DELETE_COLD, doomed) or []
            if done:
                await self._refresh_cold_sent_min()
            return [MessageMeta(o, *found[o][4:]) for o in done]

    async def peek_cold(
        self, after_offset: int, limit: int, bytes_max: int, overhead_bytes: int = 0
    ) -> list[tuple[MessageMeta, StoredMessage]]:
        """Up to `limit` cold messages past `after_offset`, in offset order, with their
        bodies, read where their index rows say; they stay cold (PEEK shows them). Only
        as many as fit `bytes_max` (each counted as its size + `overhead_bytes`; at least
        one) are read."""
        async with self._cold_lock:
            if not self._cold_count:
                return []
            found = await self._cold_rows(
                lambda row: row[0] > after_offset,
                self._index.cold_after(self._cold_until, after_offset, limit),
            )
            by_base = {seg.base: seg for seg in self._segments}
            runs = []
            total = 0
            for off in sorted(found)[:limit]:
                total += found[off][12] + overhead_bytes  # the row's message size
                if total > bytes_max and runs:
                    break
                _off, base, pos, size = found[off][:4]
                seg = by_base.get(base)
                if seg is not None:
                    runs.append((seg, pos, size, [(off, pos, size)]))
            if not runs:
                return []
            try:
                blobs = await self._read_segments([r[0] for r in runs], self._pread_runs, runs)
            except OSError as exc:
                raise _io_error(exc, "read") from None
        return [
            (MessageMeta(off, *found[off][4:]), self._decode_read(seg, blob, 0, size, off))
            for (seg, _pos, size, [(off, _p, _s)]), blob in zip(runs, blobs, strict=True)
        ]

    async def _cold_rows(
        self, pending: Callable[[tuple], bool], indexed: Awaitable[list[tuple]]
    ) -> dict[int, tuple]:
        """Cold index rows by offset (under `_cold_lock`): those `indexed` finds in SQLite
        and those of the batches not written yet that `pending` picks, less what those
        batches delete, what is hot and what is purged."""
        until = self._cold_until
        rows = [r for r in self._unwritten_rows() if r[5] > until and pending(r)]
        gone = self._unwritten_deletes()
        # (The query runs from here: rows written while it runs were pending before it.)
        rows += await indexed
        live, purged_below = self._live, self._purged_below
        return {
            row[0]: row
            for row in rows
            if row[0] not in gone and row[0] not in live and row[0] >= purged_below
        }

    def recovered_cold_group_heads(self) -> dict[str, int]:
        """Per message group, the lowest offset of a cold message in it, as of open."""
        return self._recovered_cold_heads

    def is_cold(self, offset: int) -> bool:
        """For an offset the caller knows was appended: True if it is live but cold.

        (Not in memory and not purged. A cold message deleted by `expire_cold`
        also answers True; the queue layer asks only right after the append.)
        """
        return offset not in self._live and offset >= self._purged_below

    async def cold_group_head(self, group: str) -> int | None:
        """The lowest offset of a cold message in `group`, or None."""
        until = self._cold_until
        pending = [r[0] for r in self._unwritten_rows() if r[5] > until and r[7] == group]
        gone = self._unwritten_deletes()
        # Rows written while the query runs were pending before it.
        head = await self._index.cold_group_head(group, until)
        if head is not None and head in gone:
            # Deleted (expired) but still in SQLite: look past the deleted rows.
            rows = await self._index.cold_group_offsets(group, until)
            head = next((o for o in rows if o not in gone), None)
        candidates = [
            o
            for o in [*pending, head]
            if o is not None and o not in self._live and o not in gone and o >= self._purged_below
        ]
        return min(candidates) if candidates else None

    @property
    def next_offset(self) -> int:
        """The offset the next record written will get: the end of the log as committed
        (with fsync "always", durable)."""
        return self._next_offset

    @property
    def written_end(self) -> int:
        """The end of the records `read_raw` may return: `next_offset`, or past it while
        a group shipped before its fsync (`ship_before_sync`) waits for the disk."""
        return max(self._next_offset, self._written_end)

    # --- replication: raw records by offset -----------------------------------------

    def _remember_tail(self, first: int, end: int, buf: bytes, durable: bool) -> None:
        self._tail.append((first, end, buf))
        self._tail_bytes += len(buf)
        while self._tail_bytes > TAIL_BYTES_MAX and len(self._tail) > 1:
            self._tail_bytes -= len(self._tail.popleft()[2])
        if durable:
            # A group of only receive leases wakes no follower: nobody waits for its
            # replication, and it travels with the next group (or the next fetch once a
            # long poll runs out). One replication round per message fewer in W2.
            for listener in self.durable_listeners:
                listener(end)

    async def read_raw(self, from_offset: int, bytes_max: int) -> tuple[bytes, int]:
        """Whole records from `from_offset` on, as stored (at least one record if any,
        else about `bytes_max` bytes), and the offset after the last one returned.
        Recent records come from memory; older ones are read back from their segment."""
        if from_offset >= self.written_end:
            return b"", from_offset
        # Newest first: a follower in sync asks for the last group or two. (Scanning
        # from the oldest walked up to 32 MiB of groups on every fetch: at 1,000 one-
        # message groups a second that was a core of CPU on a leader within a minute.)
        tail = self._tail
        for i in range(len(tail) - 1, -1, -1):
            first, end, _ = tail[i]
            if first <= from_offset:
                if from_offset < end:
                    return _join_tail(tail, i, from_offset, bytes_max)
                break
        index = bisect.bisect_right(self._bases, from_offset) - 1
        if index >= 0:
            seg = self._segments[index]
            if seg.marks:
                found = await self._read_segments(
                    [seg], self._read_raw_marked, seg, from_offset, bytes_max, self._next_offset
                )
                if found is not None:
                    return found
        return await self._loop.run_in_executor(
            None, self._read_raw_disk, from_offset, bytes_max, self._next_offset
        )

    def _read_raw_marked(
        self, seg: _Segment, from_offset: int, bytes_max: int, limit: int
    ) -> tuple[bytes, int] | None:
        """`read_raw` from the segment's nearest mark at or before `from_offset` (thread):
        a window of about bytes_max + RAW_MARK_BYTES instead of the whole segment (at
        64 MiB, 56-206 ms of parsing for each 4 MiB fetch of a follower catching up).
        None when the marks do not serve (stale, or `from_offset` past them): the caller
        then reads the segment whole, which lays the marks again."""
        marks = seg.marks
        i = bisect.bisect_right(marks, (from_offset, 1 << 64)) - 1
        if i < 0:
            return None
        mark_offset, start = marks[i]
        # Reading on from the last mark lays new ones (a follower catching up reads on).
        laid: list[tuple[int, int]] = []
        next_mark = start + RAW_MARK_BYTES if i == len(marks) - 1 else 1 << 64
        # Between two marks lie at most RAW_MARK_BYTES and one record. A record cut by
        # the window's end before anything was taken (a big one) sends the read down
        # the whole-segment path, which always returns at least one record.
        record_max = self.config.record_bytes_max
        window = self._fs.pread(seg.fd, bytes_max + RAW_MARK_BYTES + RAW_WINDOW_SLACK, start)
        self._stats["raw_read_bytes"] += len(window)
        end = len(window)
        view = memoryview(window)
        chunks: list[memoryview] = []
        total = 0
        next_offset = from_offset
        pos = 0
        while pos < end:
            try:
                size = rec.check_record(window, pos, end, record_max)
            except rec.CorruptRecord:
                break  # a record cut by the window's end, or the segment's end
            offset = rec.record_offset(window, pos)[1]
            if pos == 0 and offset != mark_offset:
                seg.marks = []  # the segment changed under the mark (a cut-back write)
                return None
            if offset >= limit:
                break
            if start + pos >= next_mark:
                laid.append((offset, start + pos))
                next_mark = start + pos + RAW_MARK_BYTES
            if offset >= from_offset:
                if chunks and total + size > bytes_max:
                    break
                chunks.append(view[pos : pos + size])
                total += size
                next_offset = offset + 1
            pos += size
        if laid and seg.marks is marks:
            seg.marks = marks + laid
        if not chunks:
            return None
        return b"".join(chunks), next_offset

    def _read_raw_disk(self, from_offset: int, bytes_max: int, limit: int) -> tuple[bytes, int]:
        """`read_raw` from the segment file read whole (thread), below `limit` (the
        committed end when called: a group still being written is not shipped)."""
        index = bisect.bisect_right(self._bases, from_offset) - 1
        if index < 0:
            raise StorageError(f"offset {from_offset} is below the log start (reclaimed)")
        seg = self._segments[index]
        data = seg.path.read_bytes()
        self._stats["raw_read_bytes"] += len(data)
        scan = SegmentScan(path=seg.path, base=seg.base, file_size=len(data))
        chunks: list[memoryview] = []
        total = 0
        next_offset = from_offset
        view = memoryview(data)
        # Marks up to where this read stops; reads from the last one lay more.
        marks: list[tuple[int, int]] = []
        next_mark = 0
        for pos, size, _rtype, offset in iter_records(scan, data, self.config.record_bytes_max):
            if pos >= next_mark:
                marks.append((offset, pos))
                next_mark = pos + RAW_MARK_BYTES
            if offset >= limit:
                break
            if offset < from_offset:
                continue
            if chunks and total + size > bytes_max:
                break
            chunks.append(view[pos : pos + size])
            total += size
            next_offset = offset + 1
        if not scan.bad_ranges:
            seg.marks = marks
        if not chunks and index + 1 < len(self._segments):
            # `from_offset` sits in a gap (a record the next segment starts after).
            return self._read_raw_disk(self._segments[index + 1].base, bytes_max, limit)
        return b"".join(chunks), next_offset

    def find_dedup(self, dedup_id: str, since_ms: int) -> int | None:
        """The offset of a durable message with `dedup_id` sent at/after `since_ms`, or None.

        Survives restarts (kept in the index) for `config.dedup_retention_ms`,
        whether or not the message has been deleted since. Messages still in a
        commit group that has not finished are not seen.
        """
        entry = self._dedup.get(dedup_id)
        if entry is None or entry[1] < since_ms:
            return None
        return entry[0]

    def stats(self) -> dict:
        s = dict(self._stats)
        s.update(
            segments=len(self._segments),
            bad_segments=sum(1 for x in self._segments if x.bad),
            log_bytes=sum(x.size for x in self._segments),
            next_offset=self._next_offset,
            live_messages=len(self._live) + self._cold_count,
            cold_messages=self._cold_count,
            cold_until_ms=self._cold_until,
            writes=self._fs.writes,
            fsyncs=self._fs.fsyncs
            + self._stats["fsyncs_in_sync_process"]
            + self._stats["fsyncs_in_io_uring"],
            pending_ops=len(self._pending),
            index_checkpoint=self._index_checkpoint,
            index_backlog_rows=self._index_backlog_rows,
            cache_entries=len(self._cache),
            cache_bytes=self._cache_bytes,
            dedup_ids=len(self._dedup),
        )
        return s

    # -------------------------------------------------------------- commands

    def _submit(self, kind: int, payload: Any, *, durable: bool = True) -> asyncio.Future:
        if self._closing:
            raise StorageError("partition store is closed")
        fut = self._loop.create_future()
        self._pending.append(_Op(kind, payload, fut, durable))
        self._wake.set()
        return fut

    async def append_messages(self, messages: list[NewMessage]) -> list[MessageMeta]:
        """Append messages; returns their metadata once durable per the fsync policy."""
        if not messages:
            return []
        limit = self.config.record_bytes_max - RECORD_HEADROOM_BYTES
        for m in messages:
            if len(m.body) > limit:
                raise MessageTooLarge(f"message body of {len(m.body)} bytes exceeds {limit}")
        return await stages.timed("log", self._submit(_APPEND, messages))

    async def delete(self, offsets: list[int]) -> None:
        """Delete (ack) messages; unknown or already deleted offsets are ignored."""
        if offsets:
            await stages.timed("log", self._submit(_DELETE, offsets))

    async def lease(self, leases: list[Lease], *, wait: bool = True) -> None:
        """Record receives / visibility changes; leases of unknown offsets are ignored.

        With `wait=False` the record goes out with the next commit group and the
        caller does not wait for it (a receive: losing its lease in a crash only
        makes the message visible early, which at-least-once delivery allows); nor
        does a group of only such records fsync: the next durable group's fsync, or
        a sync within LAZY_SYNC_S, covers it. At 1,000 msgs/s one message at a time
        that takes one of three fsyncs per message off the disk (issue 7, W2).
        """
        if not leases:
            return
        future = self._submit(_LEASE, leases, durable=wait)
        if wait:
            await stages.timed("log", future)
        else:
            future.add_done_callback(self._report_lost_lease)

    def _report_lost_lease(self, future: asyncio.Future) -> None:
        if not future.cancelled() and future.exception() is not None:
            self._log.warning("lease.write_failed", error=str(future.exception()))

    async def purge(self, up_to_offset: int | None = None) -> int:
        """Delete every live message (below `up_to_offset`); returns how many."""
        return await self._submit(_PURGE, up_to_offset)

    async def read(self, offsets: list[int]) -> list[StoredMessage]:
        """Bodies of live messages, in the order asked; unknown/deleted offsets are left out.

        The write-through cache answers recent messages; the rest are read with
        one pread per contiguous run of records and checked against their CRC.
        """
        found: dict[int, StoredMessage] = {}
        misses: list[int] = []
        cache = self._cache
        live = self._live
        for off in offsets:
            hit = cache.get(off)
            if hit is not None:
                m, sent_at = hit
                found[off] = StoredMessage(off, sent_at, m.body, m.attributes, m.group_id,
                                           m.dedup_id, m.source_queue, m.original_id)  # fmt: skip
            elif off in live:
                misses.append(off)
        self._stats["cache_hits"] += len(found)
        if misses:
            self._stats["cache_misses"] += len(misses)
            runs = self._plan_runs(sorted(set(misses)))
            try:
                blobs = await stages.timed(
                    "read", self._read_segments([seg for seg, *_ in runs], self._pread_runs, runs)
                )
            except OSError as exc:
                raise _io_error(exc, "read") from None
            for (seg, start, _length, items), blob in zip(runs, blobs, strict=True):
                for off, pos, size in items:
                    found[off] = self._decode_read(seg, blob, pos - start, size, off)
        return [found[o] for o in offsets if o in found]

    def _plan_runs(self, offsets: list[int]) -> list[tuple[_Segment, int, int, list]]:
        runs: list[tuple[_Segment, int, int, list]] = []
        live = self._live
        cur_seg = None
        cur_start = cur_end = 0
        items: list = []
        for off in offsets:
            packed = live[off]
            pos = packed >> _SHIFT
            size = packed & _MASK
            seg = self._segment_of(off)
            if seg is cur_seg and pos == cur_end:
                cur_end += size
                items.append((off, pos, size))
                continue
            if cur_seg is not None:
                runs.append((cur_seg, cur_start, cur_end - cur_start, items))
            cur_seg, cur_start, cur_end, items = seg, pos, pos + size, [(off, pos, size)]
        if cur_seg is not None:
            runs.append((cur_seg, cur_start, cur_end - cur_start, items))
        return runs

    async def _read_segments(self, segments: list[_Segment], read: Callable[..., Any], *args):
        """`read(*args)` in a thread, by the segments' fds (opened here if need be): a
        segment reclaimed meanwhile keeps its fd open until no such read is in flight."""
        for seg in segments:
            if seg.fd is None:
                seg.fd = self._fs.open_readonly(seg.path)
        self._reads_in_flight += 1
        try:
            return await self._loop.run_in_executor(None, read, *args)
        finally:
            self._reads_in_flight -= 1
            if not self._reads_in_flight:
                self._close_deferred_fds()

    def _pread_runs(self, runs) -> list[bytes]:
        out = []
        for seg, start, length, _items in runs:
            data = self._fs.pread(seg.fd, length, start)
            if len(data) != length:
                raise OSError(errno.EIO, f"short read from {seg.path.name}")
            out.append(data)
        return out

    def _decode_read(self, seg: _Segment, blob: bytes, at: int, size: int, off: int):
        try:
            got = rec.check_record(blob, at, at + size, self.config.record_bytes_max)
            r = rec.decode_message(blob, at, got, keys=self._keys)
            if got != size or r.offset != off:
                raise rec.CorruptRecord("record does not match the index")
        except rec.CorruptRecord as exc:
            self._log.error("record.corrupt", segment=seg.path.name, offset=off,
                            reason=exc.reason)  # fmt: skip
            raise InternalError(f"message {off} is damaged on disk: {exc.reason}") from None
        return StoredMessage(off, r.timestamp_ms, r.body, r.attributes, r.group_id,
                             r.dedup_id, r.source_queue, r.original_id)  # fmt: skip

    def _segment_of(self, offset: int) -> _Segment:
        return self._segments[bisect.bisect_right(self._bases, offset) - 1]

    # ---------------------------------------------------------------- writer

    async def _run_writer(self) -> None:
        while True:
            if not self._pending and not self._closing and not self._reclaim_wanted:
                await self._wake.wait()
            self._wake.clear()
            if self._pending:
                await self._commit_group()
                if self.loop_sync is not None and self._pending:
                    # The next group may fsync on the loop's thread, which then serves
                    # nobody: first let what this group resolved go out (the first
                    # turn wakes the waiting tasks, the second runs them: answers,
                    # pushes) and let the loop read its sockets once, so requests that
                    # came in meanwhile join the group. W2 single node, push e2e p99
                    # 2.75 -> 2.58 ms (medians of 13 interleaved runs); poll the same.
                    await asyncio.sleep(0)
                    await asyncio.sleep(0)
            elif self._closing:
                break
            if self._unsynced and self.config.fsync != "never":
                interval_ms = (
                    self.config.fsync_interval_ms
                    if self.config.fsync == "interval"
                    else LAZY_SYNC_S * 1000
                )
                elapsed_ms = (self._loop.time() - self._last_sync) * 1000
                if elapsed_ms >= interval_ms:
                    await self._sync_now()
                elif self._sync_timer is None:
                    delay = (interval_ms - elapsed_ms) / 1000
                    self._sync_timer = self._loop.call_later(delay, self._sync_timer_fired)
            if self._reclaim_wanted and not self._pending:
                self._reclaim_wanted = False
                await self._reclaim()
        if self._unsynced:
            await self._sync_now()

    def _sync_timer_fired(self) -> None:
        self._sync_timer = None
        self._wake.set()

    async def _sync_now(self) -> None:
        seg = self._active
        self._unsynced = False
        self._last_sync = self._loop.time()
        try:
            await self._sync(seg)
        except OSError as exc:
            # Acknowledged writes may not be on disk: say so loudly (fsync "interval"/"never").
            self._stats["write_errors"] += 1
            self._log.error("segment.fsync_failed", segment=seg.path.name, error=str(exc))

    async def _commit_group(self) -> None:
        ops = self._pending
        self._pending = []
        try:
            await self._commit(ops)
        except Exception as exc:  # a bug: fail the callers rather than hang them
            self._log.exception("log.writer_failed")
            reason = f"storage writer failed: {exc!r}"
            _fail_ops(ops, lambda: InternalError(reason))

    async def _commit(self, ops: list[_Op]) -> None:
        broken = self._broken
        if broken is not None:
            _fail_ops(ops, lambda: InternalError(broken))
            return
        now = self._clock.now_ms()
        first = offset = self._next_offset
        parts: list[bytes] = []
        sizes: list[int] = []
        live = self._live
        durable = False
        for op in ops:
            durable = durable or op.durable
            kind = op.kind
            if kind == _APPEND:
                op.result = offset
                rec.encode_messages(op.payload, offset, now, parts, sizes, self._keys.current)
                offset += len(op.payload)
            elif kind == _DELETE:
                offs = [o for o in op.payload if o in live]
                op.result = offs
                if offs:
                    parts.append(rec.encode_delete(offset, now, offs))
                    sizes.append(len(parts[-1]))
                    offset += 1
            elif kind == _LEASE:
                leases = [x for x in op.payload if x.offset in live]
                op.result = leases
                if leases:
                    parts.append(rec.encode_lease(offset, now, leases))
                    sizes.append(len(parts[-1]))
                    offset += 1
            elif kind == _DELETE_COLD:
                # Cold messages found in the index by `expire_cold` (under the cold lock,
                # so none was loaded since); a purge may have taken them meanwhile.
                offs = [o for o in op.payload if o not in live and o >= self._purged_below]
                op.result = offs
                if offs:
                    parts.append(rec.encode_delete(offset, now, offs))
                    sizes.append(len(parts[-1]))
                    offset += 1
            else:
                up_to = offset if op.payload is None else min(op.payload, offset)
                op.result = up_to
                parts.append(rec.encode_purge(offset, now, up_to))
                sizes.append(len(parts[-1]))
                offset += 1
        if not parts:
            self._resolve_empty(ops)
            return
        buf = b"".join(parts)
        del parts
        if self.config.verify_before_write:
            rec.verify_buffer(buf, sizes)
        try:
            await self._maybe_roll(len(buf), now, first)
            seg = self._active
            position = seg.size
            do_sync = durable and self.config.fsync == "always"
            started = time.perf_counter()  # (uvloop's loop.time() has 1 ms steps)
            fits = len(buf) <= INLINE_WRITE_BYTES_MAX and position + len(buf) <= seg.allocated
            ship_first = fits and do_sync and self.ship_before_sync
            on_loop = (
                fits
                and not ship_first
                and (
                    not do_sync
                    or (
                        self.loop_sync is not None
                        and len(ops) <= LOOP_SYNC_OPS_MAX
                        and self.loop_sync.allows()
                    )
                )
            )
            # Where the loop may not sync (a leader; a single node's budget spent or
            # its disk slow), the node's syncer does, if it has one.
            in_syncer = fits and do_sync and not ship_first and not on_loop and self._has_syncer()
            if ship_first:
                # Written on the loop (page cache: a failure cuts it back unshipped),
                # shipped, then the fsync in the executor while the followers fetch.
                # Cluster W2 (interleaved runs): e2e p50 ~5.3 -> ~3.8 ms.
                self._write(seg, buf, position, False)
                self._written_end = offset
                self._remember_tail(first, offset, buf, durable)
                try:
                    await self._sync(seg)
                except OSError as exc:
                    seg.size = position + len(buf)
                    self._fail_shipped(ops, exc)
                    return
            elif in_syncer:
                # Written on the loop (page cache), synced by the node's syncer.
                self._write(seg, buf, position, False)
                try:
                    await self._sync(seg)
                except OSError:
                    self._cut_back(seg, position)
                    raise
            elif on_loop:
                # Into preallocated page cache, no fsync: a few µs here costs less
                # than the two thread wake-ups of the executor (W2: receive leases;
                # server CPU 668 -> 587 µs/msg, e2e p99 2.38 -> 2.18 ms, medians of 3
                # interleaved runs). With an fsync, when the node's LoopSyncBudget says.
                self._write(seg, buf, position, do_sync)
            else:
                await self._loop.run_in_executor(None, self._write, seg, buf, position, do_sync)
            seconds = time.perf_counter() - started
            if do_sync and self.loop_sync is not None:
                self.loop_sync.observe(seconds, on_loop=on_loop)
                if on_loop:
                    self._stats["commits_synced_on_loop"] += 1
            for observe in self.commit_observers:
                observe(len(sizes), seconds)
        except OSError as exc:
            self._stats["write_errors"] += 1
            self._log.error("log.write_failed", error=str(exc), errno=exc.errno,
                            records=len(sizes))  # fmt: skip
            cause = exc
            _fail_ops(ops, lambda: _io_error(cause, "append"))
            return
        seg.size = position + len(buf)
        self._next_offset = offset
        if not ship_first:
            self._remember_tail(first, offset, buf, durable)
        if durable:
            for listener in self.synced_listeners:
                listener()
        if not do_sync:
            self._unsynced = True
        else:
            self._last_sync = self._loop.time()
        st = self._stats
        st["commits"] += 1
        st["records_written"] += len(sizes)
        st["bytes_written"] += len(buf)
        st["last_group_ops"] = len(ops)
        st["last_group_records"] = len(sizes)
        self._apply(ops, seg, position, sizes, now)
        if self._index_backlog_rows > self.config.index_backlog_rows_max:
            await self._index_drained()

    def _fail_shipped(self, ops: list[_Op], exc: OSError) -> None:
        """The fsync of a group already shipped to followers failed. The group cannot be
        cut back (a follower may hold it and would keep it at offsets the next group
        reused), nor counted durable (the kernel may have dropped the pages, and a
        later fsync would not say so): keep it as written, not committed, answer its
        callers with an outcome unknown, and refuse every later write until the node
        restarts and recovers the log from disk (a replicated leader's node stops so
        that metadata fails its partitions over, see LeaderReplication)."""
        self._stats["write_errors"] += 1
        self._log.error("log.fsync_failed_after_ship", error=str(exc), errno=exc.errno,
                        hint="writes to this partition are refused until the node restarts")  # fmt: skip
        self._broken = (
            f"the partition's log could not be synced ({exc.strerror or exc}); it takes no "
            "writes until its node restarts"
        )
        outcome = (
            f"append: {exc.strerror or exc} after the followers were sent the records; "
            "the outcome is unknown"
        )
        _fail_ops(ops, lambda: InternalError(outcome))
        for listener in self.failure_listeners:
            listener(exc)

    def _resolve_empty(self, ops: list[_Op]) -> None:
        for op in ops:
            if not op.future.done():
                op.future.set_result(0 if op.kind == _PURGE else None)

    def _write(self, seg: _Segment, buf: bytes, position: int, do_sync: bool) -> None:
        """Write one commit group (executor thread); on failure cut the file back."""
        fs = self._fs
        try:
            if self._needs_truncate:
                fs.ftruncate(seg.fd, position)
                seg.allocated = position
                self._needs_truncate = False
            end = position + len(buf)
            if end > seg.allocated and self._preallocate:
                self._grow(seg, end)
            write_all(fs, seg.fd, buf, position)
            if do_sync:
                fs.fdatasync(seg.fd)
        except OSError:
            self._cut_back(seg, position)
            raise

    def _cut_back(self, seg: _Segment, position: int) -> None:
        """Keep the log valid after a failed write or sync: drop whatever part of the
        group reached the file (or have the next write do it)."""
        try:
            self._fs.ftruncate(seg.fd, position)
            seg.allocated = position
        except OSError:
            self._needs_truncate = True

    def _has_syncer(self) -> bool:
        return self.syncer is not None and self.syncer.alive

    async def _sync(self, seg: _Segment) -> None:
        """fdatasync `seg` in the node's syncer, or else in an executor thread."""
        syncer = self.syncer
        if syncer is None or not syncer.alive:
            await self._loop.run_in_executor(None, self._fs.fdatasync, seg.fd)
            return
        if self._sync_slot is None:
            self._sync_slot = syncer.new_slot()
        if self._sync_seg is not seg:
            # By segment, not fd number: a number may come back for another file.
            syncer.use(self._sync_slot, seg.fd)
            self._sync_seg = seg
        self._stats[syncer.stats_key] += 1
        await syncer.fdatasync(self._sync_slot)

    def _grow(self, seg: _Segment, end: int) -> None:
        """Preallocate the active segment ahead of a write that ends at `end` (thread)."""
        target = preallocation_end(seg.size, end, self.config.segment_bytes_max)
        try:
            self._fs.preallocate(seg.fd, seg.allocated, target - seg.allocated)
        except OSError as exc:
            # Only slower without it. Not supported here: never again; a full disk: not
            # again in this segment (the write itself says whether space is left).
            self._preallocate = False
            if exc.errno in PREALLOCATE_UNSUPPORTED:
                self._preallocate_supported = False
            self._log.info("segment.preallocate_failed", segment=seg.path.name,
                           error=exc.strerror, errno=exc.errno)  # fmt: skip
            return
        seg.allocated = target

    def _trim_allocation(self, seg: _Segment) -> None:
        """Give back a segment's unwritten preallocated space (thread; not synced: a zero
        tail left by a crash reads as the segment's end anyway)."""
        if seg.fd is not None and seg.allocated > seg.size and not self._needs_truncate:
            try:
                self._fs.ftruncate(seg.fd, seg.size)
            except OSError as exc:
                self._log.warning("segment.trim_failed", segment=seg.path.name, error=str(exc))
            else:
                seg.allocated = seg.size

    def _apply(self, ops: list[_Op], seg: _Segment, position: int, sizes: list[int], now: int):
        """The group is durable: update memory, answer callers, queue index changes."""
        base = seg.base
        live = self._live
        cache = self._cache
        cache_max = self.config.read_cache_bytes_max
        batch = IndexBatch(checkpoint=self._next_offset)
        pos = position
        first = self._next_offset - len(sizes)  # offset of the group's first record
        i = 0  # index into sizes (= record number within the group)
        if not self._cold_count:
            # Nothing is cold, so the watermark can move up without asking the index.
            self._cold_until = max(self._cold_until, now + self.cold_horizon_ms)
        cold_until = self._cold_until
        for op in ops:
            kind = op.kind
            if kind == _APPEND:
                msgs = op.payload
                off = op.result
                metas = []
                add_meta = metas.append
                add_row = batch.insert
                cache_bytes = 0
                cold = 0
                for m in msgs:
                    size = sizes[i]
                    i += 1
                    body_size = len(m.body)
                    msize = body_size
                    if m.attributes:  # size = body + attribute block, as the record holds it
                        msize = (
                            size
                            - _FIXED
                            - (rec.SEAL_OVERHEAD_BYTES if self._keys.current else 0)
                            - sum(
                                len(x.encode())
                                for x in (m.group_id, m.dedup_id, m.source_queue, m.original_id)
                            )
                        )
                    if m.dedup_id:
                        self._dedup[m.dedup_id] = (off, now)
                        batch.dedups.append((m.dedup_id, off, now))
                        seg.dedup_ms = now
                    add_meta(MessageMeta(off, now, m.due_ms, m.priority, m.group_id, m.dedup_id,
                                         m.receive_count, 0, 0, msize))  # fmt: skip
                    add_row((off, base, pos, size, now, m.due_ms, m.priority, m.group_id,
                             m.dedup_id, m.receive_count, 0, 0, msize))  # fmt: skip
                    if m.due_ms > cold_until:
                        cold += 1  # in the log and (soon) the index only
                    else:
                        live[off] = (pos << _SHIFT) | size
                        if cache_max:
                            cache[off] = (m, now)
                            cache_bytes += body_size + _CACHE_ENTRY_OVERHEAD
                    pos += size
                    off += 1
                seg.live += len(msgs)
                seg.cold += cold
                if cold and not self._cold_count:
                    self._cold_sent_min_ms = now  # (else an older one is cold already)
                self._cold_count += cold
                self._cache_bytes += cache_bytes
                self._stats["messages_appended"] += len(msgs)
                op.result = metas
            elif kind == _DELETE:
                offs = op.result
                if offs:
                    rec_off = first + i
                    pos += sizes[i]
                    i += 1
                    for o in offs:
                        if live.pop(o, None) is not None:
                            self._forget(o, rec_off)
                            batch.delete(o)
                op.result = None
            elif kind == _DELETE_COLD:
                offs = op.result
                done = []
                if offs:
                    rec_off = first + i
                    pos += sizes[i]
                    i += 1
                    for o in offs:
                        if o >= self._purged_below:  # else a purge in this group took it
                            seg_of = self._segment_of(o)
                            seg_of.cold -= 1
                            self._cold_count -= 1
                            self._forget(o, rec_off)
                            batch.delete(o)
                            done.append(o)
                op.result = done
            elif kind == _LEASE:
                leases = op.result
                if leases:
                    pos += sizes[i]
                    i += 1
                    add_lease = batch.lease
                    for x in leases:
                        add_lease(
                            x.receive_count, x.visible_at_ms, x.first_received_at_ms, x.offset
                        )
                op.result = None
            else:
                up_to = op.result
                rec_off = first + i
                pos += sizes[i]
                i += 1
                doomed = [o for o in live if o < up_to]
                for o in doomed:
                    del live[o]
                    self._forget(o, rec_off)
                op.result = len(doomed) + self._purge_cold(up_to, rec_off)
                self._purged_below = max(self._purged_below, up_to)
                batch.purges.append(up_to)
        assert i == len(sizes), "records and operations out of step"
        assert pos == seg.size, "positions out of step with the segment end"
        if self._cache_bytes > cache_max:
            self._trim_cache()
        if now - self._last_dedup_prune_ms > self.config.dedup_retention_ms // 4:
            self._prune_dedup(now, batch)
        self._submit_index(batch)
        for op in ops:
            if not op.future.done():
                op.future.set_result(op.result)

    def _purge_cold(self, up_to: int, rec_off: int) -> int:
        """Account for the cold messages below `up_to` (the index deletes their rows).

        Exact for every segment wholly below `up_to` (the queue layer always purges
        everything). The cold messages of a segment that `up_to` cuts through are
        not known without the index; they stay counted, which only holds back the
        reclaim of that segment and leaves the cold count high. Logged if it happens.
        """
        gone = 0
        segs = self._segments
        for n, seg in enumerate(segs):
            if seg.base >= up_to:
                break
            if not seg.cold:
                continue
            end = segs[n + 1].base if n + 1 < len(segs) else rec_off
            if end > up_to:
                self._log.warning("purge.cold_left_counted", segment=seg.path.name,
                                  up_to=up_to, cold=seg.cold)  # fmt: skip
                break
            gone += seg.cold
            seg.live -= seg.cold
            self._cold_count -= seg.cold
            seg.cold = 0
            if seg.live == 0:
                seg.dead_at = rec_off
        return gone

    def _forget(self, offset: int, deleted_by: int) -> None:
        hit = self._cache.pop(offset, None)
        if hit is not None:
            self._cache_bytes -= len(hit[0].body) + _CACHE_ENTRY_OVERHEAD
        seg = self._segment_of(offset)
        seg.live -= 1
        if seg.live == 0:
            seg.dead_at = deleted_by

    def _trim_cache(self) -> None:
        cache = self._cache
        limit = self.config.read_cache_bytes_max
        while self._cache_bytes > limit and cache:
            off = next(iter(cache))
            m, _ = cache.pop(off)
            self._cache_bytes -= len(m.body) + _CACHE_ENTRY_OVERHEAD

    def _prune_dedup(self, now: int, batch: IndexBatch) -> None:
        cutoff = now - self.config.dedup_retention_ms
        self._last_dedup_prune_ms = now
        old = [k for k, (_off, sent_at) in self._dedup.items() if sent_at < cutoff]
        for k in old:
            del self._dedup[k]
        batch.dedup_prune_before_ms = cutoff

    # ------------------------------------------------------------- segments

    async def _maybe_roll(self, nbytes: int, now: int, first_offset: int) -> None:
        seg = self._active
        has_records = seg.size > rec.HEADER_BYTES
        too_big = seg.size + nbytes > self.config.segment_bytes_max
        too_old = now - seg.created_ms >= self.config.segment_age_max_s * 1000
        if has_records and (too_big or too_old):
            await self._loop.run_in_executor(None, self._roll, first_offset)

    def _roll(self, base: int) -> None:
        """Seal the active segment and start a new one at `base` (thread)."""
        old = self._active
        if self.config.fsync != "always" or self._unsynced or self._needs_truncate:
            if self._needs_truncate:
                self._fs.ftruncate(old.fd, old.size)
                self._needs_truncate = False
            self._fs.fdatasync(old.fd)
        self._trim_allocation(old)
        self._create_segment(base)
        self._unsynced = False
        self._log.info("segment.rolled", sealed=old.path.name, new=self._active.path.name)

    def _rekey_active(self, base: int) -> None:
        """The key changed since the active segment was made (thread): roll, or re-head it.

        So that a segment header always names the key of what the store writes into
        it (rotation: new segments use the new key). An empty segment gets a new
        header in place (a crash midway leaves a torn header, restarted at open).
        """
        seg = self._active
        if seg.size > seg.scan.header_bytes:
            self._roll(base)
            return
        created_ms = self._clock.now_ms()
        self._fs.ftruncate(seg.fd, 0)
        header = rec.encode_header(seg.base, created_ms, self._keys.current_id)
        write_all(self._fs, seg.fd, header, 0)
        self._fs.fdatasync(seg.fd)
        seg.size = seg.allocated = len(header)
        seg.created_ms = created_ms
        seg.scan = None

    def _create_segment(self, base: int) -> None:
        """Create, sync and install a new active segment (thread)."""
        path = self.directory / rec.segment_name(base)
        created_ms = self._clock.now_ms()
        fs = self._fs
        fd = fs.open(path, create=True)
        try:
            write_all(fs, fd, rec.encode_header(base, created_ms, self._keys.current_id), 0)
            fs.fdatasync(fd)
            fs.fsync_dir(self.directory)
        except OSError:
            fs.close(fd)
            with contextlib.suppress(OSError):
                fs.unlink(path)
            raise
        seg = _Segment(base, path, rec.HEADER_BYTES, created_ms)
        seg.fd = fd
        self._preallocate = self._preallocate_supported
        self._segments.append(seg)
        self._bases.append(base)
        self._active = seg

    async def _reclaim(self) -> None:
        """Delete fully dead segments from the oldest end.

        Only a prefix of the log goes: a DELETE record in a later segment may refer
        to a message in an earlier one, so removing a later segment first could
        bring acked messages back on an index rebuild. A segment also waits until
        the index checkpoint covers the record that deleted its last message.
        Until compaction exists, one message that is never deleted (or a .bad
        segment) holds back the reclaim of every later segment.
        """
        doomed = []
        for seg in self._segments:
            if seg is self._active or seg.bad or seg.live or seg.dead_at >= self._index_checkpoint:
                break
            if self._holds_dedup(seg):
                self._reclaim_later(seg)
                break
            doomed.append(seg)
        if not doomed:
            return
        del self._segments[: len(doomed)]
        del self._bases[: len(doomed)]
        fds = [s.fd for s in doomed if s.fd is not None]
        for s in doomed:
            s.fd = None
        if self._reads_in_flight:
            self._fds_to_close += fds
            fds = []
        try:
            await self._loop.run_in_executor(None, self._unlink_segments, doomed, fds)
        except OSError as exc:
            self._log.error("segment.reclaim_failed", error=str(exc))
        self._stats["segments_reclaimed"] += len(doomed)

    def _holds_dedup(self, seg: _Segment) -> bool:
        return seg.dedup_ms + self.config.dedup_retention_ms > self._clock.now_ms()

    def _reclaim_later(self, seg: _Segment) -> None:
        """Look again when `seg`'s dedup ids have left their retention (one timer)."""
        if self._reclaim_timer is not None or self._closing:
            return
        delay_ms = seg.dedup_ms + self.config.dedup_retention_ms - self._clock.now_ms()

        def wanted() -> None:
            self._reclaim_timer = None
            self._reclaim_wanted = True
            self._wake.set()

        self._reclaim_timer = self._loop.call_later(max(0, delay_ms) / 1000 + 0.01, wanted)

    def _unlink_segments(self, doomed: list[_Segment], fds: list[int]) -> None:
        for fd in fds:
            self._fs.close(fd)
        for seg in doomed:
            self._fs.unlink(seg.path)
            self._log.info("segment.reclaimed", segment=seg.path.name)
        self._fs.fsync_dir(self.directory)

    def _close_deferred_fds(self) -> None:
        fds, self._fds_to_close = self._fds_to_close, []
        for fd in fds:
            with contextlib.suppress(OSError):
                self._fs.close(fd)

    # ----------------------------------------------------------------- index

    def _submit_index(self, batch: IndexBatch) -> None:
        pending = self._index_pending
        if pending is None:
            self._index_pending = pending = batch
        else:
            pending.merge(batch)
        self._index_backlog_rows = pending.rows()
        if self._index_backlog_rows >= self.config.index_backlog_rows_max // 4:
            self._index_hurry.set()
        self._index_idle.clear()
        self._index_wake.set()

    async def _index_drained(self) -> None:
        await self._index_idle.wait()

    async def _run_index(self) -> None:
        retry_s = 0.05
        while True:
            if self._index_pending is None:
                self._index_idle.set()
                if self._closing and self._writer is not None and self._writer.done():
                    return
                await self._index_wake.wait()
                self._index_wake.clear()
                continue
            batch = self._index_pending
            self._index_pending = None
            # `load_due` looks into this batch while SQLite may not show it yet.
            self._index_applying = batch
            try:
                await self._index.apply(batch)
            except Exception as exc:
                # The index is derived: keep the batch, retry, and let the log carry on.
                self._index_applying = None
                self._stats["index_errors"] += 1
                self._log.error("index.write_failed", error=str(exc), retry_s=retry_s)
                if self._index_pending is not None:
                    batch.merge(self._index_pending)
                self._index_pending = batch
                if self._closing and self._writer is not None and self._writer.done():
                    return  # the next open replays the log past the old checkpoint
                await asyncio.sleep(retry_s)
                retry_s = min(retry_s * 2, 5.0)
                continue
            self._index_applying = None
            retry_s = 0.05
            pending = self._index_pending
            self._index_backlog_rows = 0 if pending is None else pending.rows()
            self._index_checkpoint = batch.checkpoint
            self._stats["index_batches"] += 1
            if self._segments and self._segments[0] is not self._active:
                first = self._segments[0]
                if (
                    not first.live
                    and not first.bad
                    and first.dead_at < batch.checkpoint
                    and not self._holds_dedup(first)
                ):
                    self._reclaim_wanted = True
                    self._wake.set()
            if (
                not self._closing
                and self._index_backlog_rows < self.config.index_backlog_rows_max // 4
            ):
                # Let the next batch gather: a message sent and acked within this pause
                # never reaches SQLite (its insert, leases and delete cancel in `coalesce`).
                # Closing, or a growing backlog, cuts the pause short.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._index_hurry.wait(), INDEX_GATHER_S)
                self._index_hurry.clear()

    # ----------------------------------------------------------------- close

    async def close(self) -> None:
        """Finish pending commits, fsync, bring the index up to date and close it."""
        if self._closed:
            return
        self._closing = True
        self._wake.set()
        self._index_wake.set()
        self._index_hurry.set()
        try:
            if self._writer is not None:
                await self._writer
            if self._index_task is not None:
                self._index_wake.set()
                await self._index_task
        finally:
            self._closed = True
            if self._sync_timer is not None:
                self._sync_timer.cancel()
            if self._reclaim_timer is not None:
                self._reclaim_timer.cancel()
            if self._index is not None:
                await self._index.close()
                self._index = None
            if self._sync_slot is not None and self.syncer is not None:
                self.syncer.forget(self._sync_slot)
                self._sync_slot = self._sync_seg = None
            await self._loop.run_in_executor(None, self._final_sync_and_close)

    def _final_sync_and_close(self) -> None:
        active = self._active
        if (
            active is not None
            and active.fd is not None
            and (self.config.fsync != "always" or self._unsynced)
        ):
            try:
                self._fs.fdatasync(active.fd)
            except OSError as exc:
                self._log.error("segment.fsync_failed", segment=active.path.name, error=str(exc))
        if active is not None:
            self._trim_allocation(active)
        self._close_fds()

    def _close_fds(self) -> None:
        for seg in self._segments:
            if seg.fd is not None:
                with contextlib.suppress(OSError):
                    self._fs.close(seg.fd)
                seg.fd = None
        self._close_deferred_fds()

    async def destroy(self) -> None:
        """Close the store and remove its directory (the queue was deleted)."""
        await self.close()
        await self._loop.run_in_executor(None, shutil.rmtree, self.directory)
        self._log.info("partition.destroyed")


def _describe(scan: SegmentScan) -> str:
    if scan.header_error:
        return f"header: {scan.header_error}"
    return "; ".join(f"bytes {a}-{b}: {why}" for a, b, why in scan.bad_ranges)


__all__ = ["PartitionStore"]
