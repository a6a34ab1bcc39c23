"""fdatasync off the loop without a thread of ours: io_uring.

A single node fsyncs small commit groups on its loop's thread while that is cheap
(`fs.LoopSyncBudget`); when it is not (the disk slows down, or the loop is busy),
the group's fsync goes here instead of to an executor thread. The loop puts one
IORING_OP_FSYNC (datasync) on a ring and goes on serving; the kernel runs it in a
worker of its own, and the completion makes an eventfd readable, one more file the
loop polls. An executor thread would need the GIL twice (to start and to return
from `os.fdatasync`, each time waiting for the loop to let go of it) and a Python
thread's wake-up each way.

Measured on the 2-core dev VM (300-byte pwrite + sync at 1,000/s from a uvloop
process, p50 / p99 ms): on the loop 0.175 / 0.4-0.6, the loop serving nobody
meanwhile; an executor thread 0.218 / 0.5-0.6; io_uring 0.181-0.190 / 0.5-0.65,
the loop free. Used for every sync instead, it raised W2's p50 (the completion is
a second wake-up after the disk's), so it is the budget's way out, not its
replacement (README, Performance: W2 p99 and p99.9 with and without it).

No library: the ring is three system calls and two mmaps, driven with ctypes and
struct as liburing does in C. Where the kernel has no io_uring or forbids it
(before 5.5, `kernel.io_uring_disabled`, a container's seccomp profile), `open`
returns None and the node syncs as before, in executor threads.

The kernel may put a completion on its overflow list instead of the ring, even
with fewer in flight than the ring holds (seen under CPU load), and then no
eventfd signal comes for it: the completion ring is four times what may be in
flight, the overflow list is flushed (`io_uring_enter` with GETEVENTS, as
liburing does) whenever the ring says it has one, and while syncs are in flight
the ring is looked at every WATCH_S whatever the eventfd says. A store's writer
waits on these syncs: a lost one would stop its partition for good.

Memory ordering: the kernel reads a submission inside this thread's own
`io_uring_enter`, so program order publishes it. Completions are read after the
eventfd's read, whose lock the kernel takes after posting them, so what it wrote
before signalling is visible here on any architecture.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import mmap
import os
import platform
import struct
import sys
import time
from collections import deque

import structlog

from mqd.storage import fs

log = structlog.get_logger("mqd.storage.uring")

# The same numbers on every Linux architecture (the unified table, since 5.1).
_SYS_SETUP = 425
_SYS_ENTER = 426
_SYS_REGISTER = 427
_ARCHITECTURES = frozenset({"x86_64", "aarch64", "arm64"})

_OFF_SQ_RING = 0
_OFF_SQES = 0x10000000
_OP_FSYNC = 3
_FSYNC_DATASYNC = 1
_REGISTER_EVENTFD = 4
_SETUP_CQSIZE = 1 << 3
_ENTER_GETEVENTS = 1 << 0
_SQ_CQ_OVERFLOW = 1 << 1  # in the submission ring's flags
# One mmap for both rings (5.4) and completions never dropped when the ring is full
# (5.5): what this module relies on.
_FEATURES_NEEDED = (1 << 0) | (1 << 1)

# struct io_uring_params: sq_entries, cq_entries, flags, sq_thread_cpu,
# sq_thread_idle, features, wq_fd, resv[3], then the two offset structs.
_PARAMS_BYTES = 120
_SQ_OFFSETS_AT = 40  # head, tail, ring_mask, ring_entries, flags, dropped, array
_CQ_OFFSETS_AT = 80  # head, tail, ring_mask, ring_entries, overflow, cqes
_SQE_BYTES = 64
# opcode, flags, ioprio, fd, off, addr, len, fsync_flags, user_data; 24 bytes unused.
_SQE = struct.Struct("<BBHiQQIIQ24x")
_CQE = struct.Struct("<QiI")  # user_data, res, flags
_U32 = struct.Struct("<I")

ENTRIES = 64
# The completion ring holds this many times what may be in flight.
CQ_FACTOR = 4
# While syncs are in flight, the ring is also looked at this often, whatever the
# eventfd says (see `_watch`).
WATCH_S = 0.05
# Overflow flushes in one look at the ring; what is still left waits for the next.
OVERFLOW_FLUSHES_MAX = 8
CLOSE_WAIT_S = 5.0


def _last_error(call: str) -> OSError:
    code = ctypes.get_errno()
    return OSError(code, f"{call}: {os.strerror(code)}")


class UringSyncer:
    """One per node, shared by its stores (`PartitionStore.syncer`): the calls of
    `mqd.storage.syncer.SyncProcess`, so a store does not care which it has."""

    name = "io_uring"  # in STATS' storage figures, as `syncer`
    stats_key = "fsyncs_in_io_uring"  # the store's STATS figure for syncs made here

    def __init__(self, libc: ctypes.CDLL, ring_fd: int, params: bytes) -> None:
        self._loop = asyncio.get_running_loop()
        self._enter = libc.syscall
        self._ring_fd = ring_fd
        sq_entries, cq_entries = struct.unpack_from("<2I", params, 0)
        _, sq_tail, sq_mask, _, sq_flags, _, sq_array = struct.unpack_from(
            "<7I", params, _SQ_OFFSETS_AT
        )
        cq_head, cq_tail, cq_mask, _, _, cqes = struct.unpack_from("<6I", params, _CQ_OFFSETS_AT)
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        prot = mmap.PROT_READ | mmap.PROT_WRITE
        size = max(sq_array + sq_entries * _U32.size, cqes + cq_entries * _CQE.size)
        self._ring = mmap.mmap(ring_fd, size, flags, prot, offset=_OFF_SQ_RING)
        try:
            self._sqes = mmap.mmap(ring_fd, sq_entries * _SQE_BYTES, flags, prot, offset=_OFF_SQES)
        except BaseException:
            self._ring.close()
            raise
        self._sq_tail_at, self._sq_array_at, self._sq_flags_at = sq_tail, sq_array, sq_flags
        self._cq_head_at, self._cq_tail_at, self._cqes_at = cq_head, cq_tail, cqes
        self._sq_mask = _U32.unpack_from(self._ring, sq_mask)[0]
        self._cq_mask = _U32.unpack_from(self._ring, cq_mask)[0]
        # Submitted and not yet completed: at most a submission ring's worth, a
        # fraction of what the completion ring holds.
        self._in_flight = 0
        self._in_flight_max = sq_entries
        self._watching: asyncio.TimerHandle | None = None
        self._backlog: deque[tuple[int, int]] = deque()  # (request id, fd), not submitted
        self._waiting: dict[int, tuple[asyncio.Future[None], float, int]] = {}  # + fd
        self._files: dict[int, int] = {}  # slot -> our own descriptor of its file
        # Our descriptors and what holds each: its slot, and every sync not yet
        # completed, as the kernel may look the number up only when it runs the sync.
        self._holds: dict[int, int] = {}
        self._slots = 0
        self._ids = 0
        self.alive = True
        self._closed = False
        self.syncs = 0  # completed (stats, tests)
        self._event_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        arg = ctypes.c_int(self._event_fd)
        if libc.syscall(_SYS_REGISTER, ring_fd, _REGISTER_EVENTFD, ctypes.byref(arg), 1):
            error = _last_error("io_uring_register")
            os.close(self._event_fd)
            self._unmap()
            raise error
        self._loop.add_reader(self._event_fd, self._on_completions)

    @classmethod
    def open(cls, entries: int = ENTRIES) -> UringSyncer | None:
        """A ring, or None where this kernel will not give one (the caller then syncs
        in executor threads, as without it)."""
        if sys.platform != "linux" or platform.machine() not in _ARCHITECTURES:
            return None
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall.restype = ctypes.c_long
        params = ctypes.create_string_buffer(_PARAMS_BYTES)
        struct.pack_into("<3I", params, 0, 0, entries * CQ_FACTOR, _SETUP_CQSIZE)
        ring_fd = libc.syscall(_SYS_SETUP, ctypes.c_uint(entries), params)
        if ring_fd < 0:
            log.info("uring.unavailable", error=str(_last_error("io_uring_setup")))
            return None
        features = _U32.unpack_from(params.raw, 20)[0]
        if features & _FEATURES_NEEDED != _FEATURES_NEEDED:
            os.close(ring_fd)
            log.info("uring.unavailable", error="the kernel is older than 5.5")
            return None
        try:
            return cls(libc, ring_fd, params.raw)
        except OSError as exc:
            os.close(ring_fd)
            log.info("uring.unavailable", error=str(exc))
            return None

    # --- what a store calls (as SyncProcess) -----------------------------------------

    def new_slot(self) -> int:
        """A name for one store's file, for `use` and `fdatasync`."""
        self._slots += 1
        return self._slots

    def use(self, slot: int, fd: int) -> None:
        """Sync the file open at `fd` as `slot` from now on. We keep a descriptor of
        our own, open until its slot moves on and its syncs have completed: the store
        closes its segments when it likes."""
        own = os.dup(fd)
        self._holds[own] = 1
        old = self._files.get(slot)
        self._files[slot] = own
        if old is not None:
            self._release(old)

    def forget(self, slot: int) -> None:
        """Let go of the slot's file (a store closing; never raises)."""
        fd = self._files.pop(slot, None)
        if fd is not None:
            self._release(fd)

    def _release(self, fd: int) -> None:
        holds = self._holds[fd] - 1
        if holds:
            self._holds[fd] = holds
            return
        del self._holds[fd]
        with contextlib.suppress(OSError):
            os.close(fd)

    def fdatasync(self, slot: int) -> asyncio.Future[None]:
        """fdatasync the slot's file; the future fails with OSError as fdatasync would."""
        if not self.alive:
            raise OSError(errno.EIO, "the io_uring syncer is closed")
        future: asyncio.Future[None] = self._loop.create_future()
        fd = self._files.get(slot)
        if fd is None:
            future.set_exception(OSError(errno.EBADF, "no file was given for this slot"))
            return future
        self._ids += 1
        request_id = self._ids
        if self._backlog or self._in_flight >= self._in_flight_max:
            self._backlog.append((request_id, fd))
        else:
            self._submit(request_id, fd)  # raises if the ring broke: nothing registered
        self._holds[fd] += 1
        self._waiting[request_id] = (future, time.perf_counter(), fd)
        return future

    # --- the ring ----------------------------------------------------------------------

    def _submit(self, request_id: int, fd: int) -> None:
        ring = self._ring
        tail = _U32.unpack_from(ring, self._sq_tail_at)[0]
        index = tail & self._sq_mask
        _SQE.pack_into(self._sqes, index * _SQE_BYTES,
                       _OP_FSYNC, 0, 0, fd, 0, 0, 0, _FSYNC_DATASYNC, request_id)  # fmt: skip
        _U32.pack_into(ring, self._sq_array_at + index * _U32.size, index)
        _U32.pack_into(ring, self._sq_tail_at, (tail + 1) & 0xFFFFFFFF)
        while True:
            taken = self._enter(_SYS_ENTER, self._ring_fd, 1, 0, 0, None, 0)
            if taken == 1:
                self._in_flight += 1
                if self._watching is None:
                    self._watching = self._loop.call_later(WATCH_S, self._watch)
                return
            if taken < 0 and ctypes.get_errno() == errno.EINTR:
                continue
            # The entry is on the ring but the kernel did not take it: the ring can no
            # longer be trusted. What waits fails; the stores go back to threads.
            why = str(_last_error("io_uring_enter")) if taken < 0 else "entry not taken"
            self._break(why)
            raise OSError(errno.EIO, f"io_uring: {why}")

    def _watch(self) -> None:
        """Look at the ring while syncs are in flight, eventfd or not. Completions the
        kernel could not put on the ring when it posted them (it overflowed, seen
        here under CPU load with fewer in flight than the ring holds) wait in its
        overflow list, which only `io_uring_enter` flushes, and no eventfd says so:
        without this, their stores would wait for ever."""
        self._watching = None
        if not self.alive:
            return
        self._on_completions()
        if self._in_flight and self._watching is None:
            self._watching = self._loop.call_later(WATCH_S, self._watch)

    def _on_completions(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._event_fd)
        ring = self._ring
        now = time.perf_counter()
        for _ in range(OVERFLOW_FLUSHES_MAX):
            head = _U32.unpack_from(ring, self._cq_head_at)[0]
            tail = _U32.unpack_from(ring, self._cq_tail_at)[0]
            while head != tail:
                at = self._cqes_at + (head & self._cq_mask) * _CQE.size
                request_id, result, _flags = _CQE.unpack_from(ring, at)
                head = (head + 1) & 0xFFFFFFFF
                self._in_flight -= 1
                self._complete(request_id, result, now)
            _U32.pack_into(ring, self._cq_head_at, head)  # their slots are free again
            if not _U32.unpack_from(ring, self._sq_flags_at)[0] & _SQ_CQ_OVERFLOW:
                break
            # Move what overflowed onto the ring (liburing does the same), and read on.
            self._enter(_SYS_ENTER, self._ring_fd, 0, 0, _ENTER_GETEVENTS, None, 0)
        while self._backlog and self._in_flight < self._in_flight_max and self.alive:
            request_id, fd = self._backlog.popleft()
            with contextlib.suppress(OSError):  # _break failed everything that waits
                self._submit(request_id, fd)

    def _complete(self, request_id: int, result: int, now: float) -> None:
        entry = self._waiting.pop(request_id, None)
        if entry is None:
            return
        self.syncs += 1
        future, submitted, fd = entry
        self._release(fd)
        if future.done():
            return
        if result < 0:
            future.set_exception(OSError(-result, os.strerror(-result)))
            return
        future.set_result(None)
        # Submission to completion as the loop saw it: the disk and the wake-up.
        fs.report_fsync(now - submitted)

    def _break(self, why: str) -> None:
        if not self.alive:
            return
        self.alive = False
        self._loop.remove_reader(self._event_fd)
        self._stop_watching()
        log.error("uring.broken", why=why, unanswered=len(self._waiting),
                  hint="log syncs go to executor threads until the node restarts")  # fmt: skip
        self._fail_waiting(f"io_uring: {why}; whether it synced is unknown")

    def _fail_waiting(self, why: str) -> None:
        waiting, self._waiting = self._waiting, {}
        self._backlog.clear()
        for future, _submitted, fd in waiting.values():
            self._release(fd)
            if not future.done():
                future.set_exception(OSError(errno.EIO, why))

    def _stop_watching(self) -> None:
        if self._watching is not None:
            self._watching.cancel()
            self._watching = None

    def _unmap(self) -> None:
        self._sqes.close()
        self._ring.close()

    async def close(self) -> None:
        """Free the ring once what was asked of it is answered (stores close first)."""
        if self._closed:
            return
        self._closed = True
        try:
            pending = [future for future, _submitted, _fd in self._waiting.values()]
            if pending and self.alive:
                await asyncio.wait(pending, timeout=CLOSE_WAIT_S)
        finally:
            # Cancelled while waiting (a second close returns at once): freed all the same.
            self._release_all()

    def _release_all(self) -> None:
        if self.alive:
            self.alive = False
            self._loop.remove_reader(self._event_fd)
        self._stop_watching()
        self._fail_waiting("the io_uring syncer was closed")
        for slot in list(self._files):
            self.forget(slot)
        os.close(self._event_fd)
        self._unmap()
        # A sync still in the kernel keeps the ring alive there until it ends.
        os.close(self._ring_fd)
