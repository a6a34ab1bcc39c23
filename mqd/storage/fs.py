"""The filesystem seam: every system call the store makes to write or sync.

Tests pass a subclass that fails on demand (ENOSPC, EIO) to check the store's
fault handling against real files, without mocking the store itself. All
methods are called from an executor thread, except where noted.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable
from pathlib import Path

import structlog

log = structlog.get_logger("mqd.storage.fs")

# A log's active segment file grows ahead of its records, by its own size within these
# bounds: an fdatasync after a write inside the file's size has no size change (an ext4
# journal commit) to make durable. Measured on the dev VM (pwrite 300 B + fdatasync):
# p50 0.24 -> 0.16 ms, p99 0.83 -> 0.28 ms. Recovery reads the zero tail as the end.
PREALLOCATE_BYTES_MIN = 256 * 1024
PREALLOCATE_BYTES_MAX = 8 * 1024 * 1024
# posix_fallocate errnos that mean "this filesystem cannot", not "no space just now".
PREALLOCATE_UNSUPPORTED = frozenset({errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS})


def preallocation_end(written: int, end: int, size_max: int) -> int:
    """How far to allocate a segment holding `written` bytes before a write ending at
    `end`: ahead by its own size within the bounds, not past `size_max` unless `end` is."""
    grow = min(PREALLOCATE_BYTES_MAX, max(PREALLOCATE_BYTES_MIN, written))
    return max(end, min(written + grow, size_max))


# Told the seconds of every log fdatasync (leader segments and replica appends), from
# whichever thread made it: the node's metrics put them in a histogram. Process-wide,
# as a process runs one node.
fsync_observers: list[Callable[[float], None]] = []


def report_fsync(seconds: float) -> None:
    """Tell the observers of a sync a node's syncer made, from its completions, after
    answering it: an observer that raises is logged, and must not leave the rest of
    the completions unread (their callers would wait for ever)."""
    try:
        for observe in fsync_observers:
            observe(seconds)
    except Exception:
        log.exception("fsync.observer_failed")


def fdatasync_observed(fd: int) -> None:
    started = time.perf_counter()
    os.fdatasync(fd)
    seconds = time.perf_counter() - started
    for observe in fsync_observers:
        observe(seconds)


class LoopSyncBudget:
    """When a small commit group may be written and fsynced on the event loop's thread.

    Handing an fsync to an executor thread costs two thread wake-ups and three GIL
    hand-overs; on the 2-core dev VM at 1,000 msgs/s that was ~0.3 ms per commit on
    top of a 0.2 ms fdatasync, more than the disk itself (W2: e2e p50 1.6 -> 0.6 ms,
    p99 4.6 -> 1.7 ms with every fsync on the loop). But a loop blocked in fdatasync
    serves nobody, so it is allowed only while it stays cheap: blocking at most
    `share` of the wall time (a burst of `burst_s` beyond it), and only while this
    disk's recent fsyncs, wherever they ran, took less than `slow_sync_s`. Busy
    nodes and slow disks get the node's io_uring (mqd.storage.uring) or else the
    executor, which keeps both cores working. One per node, shared by its stores,
    as they share the loop.

    The limits: this disk's fsyncs take ~0.17 ms, but for stretches of tens of ms
    0.5-1 ms each; on the loop, two of those per message (the send's, the ack's)
    plus the loop's own work outrun 1,000 msgs/s, and a backlog builds that outlasts
    the stretch. Out of the loop as soon as syncs pass 0.4 ms, and at most 30 % of
    the time on it (was 1 ms and 50 %), with io_uring as the way out: W2 e2e p99,
    medians of interleaved runs, push 3.14 -> 2.27 ms (12), poll 3.48 -> 2.76 (5);
    the new limits with executor threads instead, push 2.54 (9). While the disk
    stays quick it changes nothing: the loop syncs as before.
    """

    def __init__(
        self, share: float = 0.3, burst_s: float = 0.002, slow_sync_s: float = 0.0004
    ) -> None:
        self.share = share
        self.burst_s = burst_s
        self.slow_sync_s = slow_sync_s
        self._debt_s = 0.0
        self._at = time.perf_counter()
        self._recent_sync_s = 0.0  # moving average of write + fdatasync times
        self.on_loop = 0  # commits made on the loop (stats, tests)

    def allows(self) -> bool:
        now = time.perf_counter()
        self._debt_s = max(0.0, self._debt_s - (now - self._at) * self.share)
        self._at = now
        return self._debt_s < self.burst_s and self._recent_sync_s < self.slow_sync_s

    def observe(self, seconds: float, *, on_loop: bool) -> None:
        """A durable commit's write + fdatasync took `seconds`, on the loop or not."""
        self._recent_sync_s += (seconds - self._recent_sync_s) * 0.125
        if on_loop:
            self.on_loop += 1
            self._debt_s += seconds


def fsync_path(path: Path) -> None:
    """fsync a file or a directory by its path (a truncation, a rename, an unlink)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_file(path: Path, data: bytes) -> None:
    """Make `path` hold `data`, all or nothing, durably: a temp file written and synced,
    renamed over it, the directory synced."""
    temp = path.with_suffix(".tmp")
    temp.write_bytes(data)
    fsync_path(temp)
    os.replace(temp, path)
    fsync_path(path.parent)


class FileSystem:
    """Plain POSIX calls; also counts writes and syncs for tests and stats."""

    def __init__(self) -> None:
        self.writes = 0
        self.fsyncs = 0

    def open(self, path: Path, *, create: bool) -> int:
        flags = os.O_RDWR | getattr(os, "O_CLOEXEC", 0)
        if create:
            flags |= os.O_CREAT | os.O_EXCL
        return os.open(path, flags, 0o644)

    def open_readonly(self, path: Path) -> int:
        return os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))

    def pwrite(self, fd: int, data: bytes | memoryview, position: int) -> int:
        self.writes += 1
        return os.pwrite(fd, data, position)

    def fdatasync(self, fd: int) -> None:
        self.fsyncs += 1
        fdatasync_observed(fd)

    def ftruncate(self, fd: int, size: int) -> None:
        os.ftruncate(fd, size)

    def preallocate(self, fd: int, offset: int, length: int) -> None:
        """Reserve blocks (and extend the file size) so later writes inside them do not
        change the file's size: an fdatasync then has no size to commit."""
        os.posix_fallocate(fd, offset, length)

    def pread(self, fd: int, size: int, position: int) -> bytes:
        return os.pread(fd, size, position)

    def close(self, fd: int) -> None:
        os.close(fd)

    def fsync_dir(self, path: Path) -> None:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def unlink(self, path: Path) -> None:
        os.unlink(path)

    def rename(self, src: Path, dst: Path) -> None:
        os.rename(src, dst)


def write_all(fs: FileSystem, fd: int, data: bytes, position: int) -> None:
    """pwrite until every byte is written (a short write is legal POSIX)."""
    view = memoryview(data)
    done = 0
    total = len(view)
    while done < total:
        n = fs.pwrite(fd, view[done:], position + done)
        if n <= 0:
            raise OSError("pwrite wrote no bytes")
        done += n
