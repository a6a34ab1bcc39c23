"""Helpers for storage tests: real files in tmp_path, a faulty filesystem seam, a log recorder."""

from __future__ import annotations

import asyncio
import errno
import os
import threading
from pathlib import Path

from mqd.clock import ManualClock
from mqd.storage import FileSystem, NewMessage, PartitionStore, StorageConfig
from mqd.storage import records as rec


class FaultyFS(FileSystem):
    """Real POSIX calls, plus faults on demand.

    `write_errno`: the next pwrite writes half its data for real, then fails with it.
    `fsync_errno`: the next fdatasync fails with it. Both stay set until cleared.
    """

    def __init__(self) -> None:
        super().__init__()
        self.write_errno: int | None = None
        self.fsync_errno: int | None = None

    def pwrite(self, fd: int, data, position: int) -> int:
        if self.write_errno is not None:
            self.writes += 1
            half = len(data) // 2
            if half:
                os.pwrite(fd, bytes(data[:half]), position)
            raise OSError(self.write_errno, os.strerror(self.write_errno))
        return super().pwrite(fd, data, position)

    def fdatasync(self, fd: int) -> None:
        if self.fsync_errno is not None:
            self.fsyncs += 1
            raise OSError(self.fsync_errno, os.strerror(self.fsync_errno))
        super().fdatasync(fd)


class ThreadNotingFS(FileSystem):
    """Real calls; remembers which thread made each fdatasync."""

    def __init__(self) -> None:
        super().__init__()
        self.sync_threads: list[int] = []

    def fdatasync(self, fd: int) -> None:
        self.sync_threads.append(threading.get_ident())
        super().fdatasync(fd)


class LogRecorder:
    """A structlog-like logger that keeps (level, event, fields)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, dict]] = []

    def bind(self, **_fields) -> LogRecorder:
        return self

    def _rec(self, level: str, event: str, **fields) -> None:
        self.events.append((level, event, fields))

    def debug(self, event: str, **fields) -> None:
        self._rec("debug", event, **fields)

    def info(self, event: str, **fields) -> None:
        self._rec("info", event, **fields)

    def warning(self, event: str, **fields) -> None:
        self._rec("warning", event, **fields)

    def error(self, event: str, **fields) -> None:
        self._rec("error", event, **fields)

    def exception(self, event: str, **fields) -> None:
        self._rec("exception", event, **fields)

    def named(self, event: str) -> list[dict]:
        return [f for _lvl, e, f in self.events if e == event]


ENOSPC = errno.ENOSPC
EIO = errno.EIO


def record_offsets(data: bytes) -> list[int]:
    """The offsets of the whole records in `data` (raw records, as FETCH carries them)."""
    offsets, pos = [], 0
    while pos < len(data):
        size = rec.check_record(data, pos, len(data), 1 << 20)
        offsets.append(rec.record_offset(data, pos)[1])
        pos += size
    return offsets


def msg(i: int, size: int = 32, **kw) -> NewMessage:
    body = (f"m{i}:".encode() + b"x" * size)[:size] if size else b""
    return NewMessage(body=body, attributes=kw.pop("attributes", {}), **kw)


async def open_store(path: Path, **kw) -> PartitionStore:
    config = kw.pop("config", None) or StorageConfig()
    kw.setdefault("clock", ManualClock())
    kw.setdefault("log", LogRecorder())
    return await PartitionStore.open(path, config, **kw)


async def wait_for(predicate, timeout_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


def segment_files(path: Path) -> list[Path]:
    return sorted(path.glob("*.log"))
