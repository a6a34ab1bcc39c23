"""fdatasync without the GIL: a node's log syncs run in a small process of its own.

An fsync handed to an executor thread costs a thread wake-up each way and, worse,
the GIL twice: the thread takes it to start, and again to return from
`os.fdatasync`, each time waiting for the event loop to let go of it. Timed in a
replicated leader's writer during cluster W2 (2-core VM): hand-off 0.35 ms mean
(p90 0.91) and back 0.17, around a 0.63 ms fdatasync. The sync process has its own
interpreter: the loop sends it a datagram, it calls fdatasync and answers, and the
answer arrives as one more readable socket for the loop. Cluster W2, interleaved:
push e2e p50 3.2 -> 2.7 ms, p99 6.1 -> 5.6 ms, same CPU (README, Performance). Used
by cluster backends only: a single node syncs small groups on its loop, which
measured better there (LoopSyncBudget).

The process receives each file's descriptor itself (SCM_RIGHTS), so it syncs the
very open file the node wrote, fd numbers reused by the node do not matter, and a
writeback error is reported on that file as it would be to the node.

If the process dies, every sync it had not answered fails with EIO (whether it ran
is unknown, so it counts as failed: the store cuts the group back or, if shipped,
stops taking writes), and the node's stores fall back to executor threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import os
import socket
import subprocess
import sys
from collections import deque
from pathlib import Path

import structlog

from mqd.storage import fs
from mqd.storage.sync_helper import REPLY, REQUEST

log = structlog.get_logger("mqd.storage.syncer")

HELPER = Path(__file__).with_name("sync_helper.py")
# Lanes: socket pairs, each served by a thread of the process. A store keeps to one
# (its requests stay in order); stores on different lanes sync at the same time, as
# they would in executor threads (the journal batches concurrent fsyncs).
LANES = 4
START_WAIT_S = 10.0
STOP_WAIT_S = 5.0


class _Lane:
    """One socket pair's node end, with what could not be sent yet (a full buffer:
    sent in order once the socket is writable, never dropped)."""

    __slots__ = ("backlog", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.backlog: deque[tuple[bytes, int | None]] = deque()  # (datagram, own fd)


class SyncProcess:
    """One per node, shared by its stores (`PartitionStore.syncer`)."""

    name = "sync_process"  # in STATS' storage figures, as `syncer`
    stats_key = "fsyncs_in_sync_process"  # the store's STATS figure for syncs made here

    def __init__(self, proc: asyncio.subprocess.Process, socks: list[socket.socket]) -> None:
        self._loop = asyncio.get_running_loop()
        self._proc = proc
        self._lanes = [_Lane(sock) for sock in socks]
        self._ids = itertools.count(1)
        self._slots = itertools.count(0)
        self._waiting: dict[int, asyncio.Future[None]] = {}
        self.alive = True
        self.syncs = 0  # answered (stats, tests)
        for lane in self._lanes:
            self._loop.add_reader(lane.sock.fileno(), self._on_readable, lane)

    @property
    def pid(self) -> int:
        return self._proc.pid

    @classmethod
    async def start(cls, lanes: int = LANES) -> SyncProcess | None:
        """Start the process; None where it cannot be (a platform that cannot pass
        descriptors over Unix sockets, or it did not come up): the stores then sync
        in executor threads, as before."""
        if not hasattr(socket, "send_fds") or not hasattr(socket, "SOCK_SEQPACKET"):
            return None
        pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET) for _ in range(lanes)]
        ours = [mine for mine, _ in pairs]
        theirs = [other.fileno() for _, other in pairs]
        proc = None
        why = ""
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-I", str(HELPER), *map(str, theirs),
                pass_fds=theirs, stdin=subprocess.DEVNULL,
            )  # fmt: skip
            for sock in ours:
                sock.setblocking(False)
                ready = await asyncio.wait_for(
                    asyncio.get_running_loop().sock_recv(sock, REPLY.size), START_WAIT_S
                )
                if not ready:
                    why = "it exited at start"
                    break
        except (OSError, TimeoutError) as exc:
            why = str(exc) or type(exc).__name__
        finally:
            for _, other in pairs:
                other.close()
        if why:
            log.warning("syncer.unavailable", error=why)
            for sock in ours:
                sock.close()
            if proc is not None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
            return None
        assert proc is not None
        return cls(proc, ours)

    def new_slot(self) -> int:
        """A name for one store's file in the process, for `use` and `fdatasync`."""
        return next(self._slots)

    def _lane_of(self, slot: int) -> _Lane:
        return self._lanes[slot % len(self._lanes)]

    def use(self, slot: int, fd: int) -> None:
        """Sync the file open at `fd` as `slot` from now on (the process keeps its own
        descriptor of it, closing the slot's previous one)."""
        self._send(self._lane_of(slot), REQUEST.pack(b"R", slot, 0), fd)

    def forget(self, slot: int) -> None:
        """Let the process close the slot's file (a store closing: never raises)."""
        if self.alive:
            with contextlib.suppress(OSError):  # it died: its files went with it
                self._send(self._lane_of(slot), REQUEST.pack(b"C", slot, 0))

    def fdatasync(self, slot: int) -> asyncio.Future[None]:
        """fdatasync the slot's file; the future fails with OSError as fdatasync would."""
        request_id = next(self._ids)
        self._send(self._lane_of(slot), REQUEST.pack(b"S", request_id, slot))
        # Registered after sending: a send that fails raises instead, and the answer
        # can only be read by this loop, later.
        future: asyncio.Future[None] = self._loop.create_future()
        self._waiting[request_id] = future
        return future

    def _send(self, lane: _Lane, data: bytes, fd: int | None = None) -> None:
        if not self.alive:
            raise OSError(errno.EIO, "the sync process has exited")
        if not lane.backlog and self._try_send(lane, data, fd):
            return
        # A full socket buffer (the disk is slow and many stores wait on it): keep it,
        # with a descriptor of our own, as the store may close its file meanwhile.
        lane.backlog.append((data, None if fd is None else os.dup(fd)))
        if len(lane.backlog) == 1:
            self._loop.add_writer(lane.sock.fileno(), self._drain, lane)

    def _try_send(self, lane: _Lane, data: bytes, fd: int | None) -> bool:
        """Sent (True), or the buffer is full (False); any other failure is the end."""
        try:
            if fd is None:
                lane.sock.send(data)
            else:
                socket.send_fds(lane.sock, [data], [fd])
        except BlockingIOError:
            return False
        except OSError as exc:
            self._died(f"send: {exc}")
            raise OSError(errno.EIO, "the sync process has exited") from None
        return True

    def _drain(self, lane: _Lane) -> None:
        while lane.backlog:
            data, fd = lane.backlog[0]
            try:
                if not self._try_send(lane, data, fd):
                    return
            except OSError:
                return  # _died took the backlog down with it
            lane.backlog.popleft()
            if fd is not None:
                os.close(fd)
        self._loop.remove_writer(lane.sock.fileno())

    def _on_readable(self, lane: _Lane) -> None:
        while True:
            try:
                data = lane.sock.recv(REPLY.size)
            except BlockingIOError:
                return
            except OSError as exc:
                self._died(f"receive: {exc}")
                return
            if not data:
                self._died("it closed its socket")
                return
            request_id, error, seconds = REPLY.unpack(data)
            future = self._waiting.pop(request_id, None)
            if future is None or future.done():
                continue
            self.syncs += 1
            if error:
                future.set_exception(OSError(error, os.strerror(error)))
                continue
            future.set_result(None)
            fs.report_fsync(seconds)

    def _stop_watching(self) -> None:
        self.alive = False
        for lane in self._lanes:
            self._loop.remove_reader(lane.sock.fileno())
            if lane.backlog:
                self._loop.remove_writer(lane.sock.fileno())
            while lane.backlog:
                _data, fd = lane.backlog.popleft()
                if fd is not None:
                    os.close(fd)

    def _fail_waiting(self, why: str) -> int:
        waiting, self._waiting = self._waiting, {}
        for future in waiting.values():
            if not future.done():
                future.set_exception(OSError(errno.EIO, why))
        return len(waiting)

    def _died(self, why: str) -> None:
        if not self.alive:
            return
        self._stop_watching()
        unanswered = self._fail_waiting("the sync process exited; whether it synced is unknown")
        log.error("syncer.exited", why=why, unanswered=unanswered, pid=self._proc.pid,
                  hint="log syncs go to executor threads until the node restarts")  # fmt: skip

    async def close(self) -> None:
        """Stop the process once it has answered what it was asked (stores close first)."""
        if self.alive:
            self._stop_watching()
        self._fail_waiting("the sync process was stopped")
        for lane in self._lanes:
            lane.sock.close()  # end of file for the process: it exits
        try:
            await asyncio.wait_for(self._proc.wait(), STOP_WAIT_S)
        except TimeoutError:
            self._proc.kill()
            await self._proc.wait()
