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


def fdatasync_observed(fd: int) -> None:
    started = time.perf_counter()
    os.fdatasync(fd)
    seconds = time.perf_counter() - started
    for observe in fsync_observers:
        observe(seconds)


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
