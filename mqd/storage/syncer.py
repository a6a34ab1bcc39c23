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
from pathlib import Path

import structlog

from mqd.storage import fs
from mqd.storage.sync_helper import REPLY, REQUEST

log = structlog.get_logger("mqd.storage.syncer")

HELPER = Path(__file__).with_name("sync_helper.py")
START_WAIT_S = 10.0
STOP_WAIT_S = 5.0


class SyncProcess:
    """One per node, shared by its stores (`PartitionStore.syncer`)."""

    def __init__(self, proc: asyncio.subprocess.Process, sock: socket.socket) -> None:
        self._loop = asyncio.get_running_loop()
        self._proc = proc
        self._sock = sock
        self._ids = itertools.count(1)
        self._slots = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[None]] = {}
        self.alive = True
        self.syncs = 0  # answered (stats, tests)
        self._loop.add_reader(sock.fileno(), self._on_readable)

    @property
    def pid(self) -> int:
        return self._proc.pid

    @classmethod
    async def start(cls) -> SyncProcess | None:
        """Start the process; None where this platform cannot pass descriptors over a
        Unix socket (the stores then sync in executor threads, as before)."""
        if not hasattr(socket, "send_fds") or not hasattr(socket, "SOCK_SEQPACKET"):
            return None
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-I", str(HELPER), str(child.fileno()),
                pass_fds=[child.fileno()], stdin=subprocess.DEVNULL,
            )  # fmt: skip
        except OSError as exc:
            parent.close()
            log.warning("syncer.unavailable", error=str(exc))
            return None
        finally:
            child.close()
        parent.setblocking(False)
        try:
            ready = await asyncio.wait_for(
                asyncio.get_running_loop().sock_recv(parent, REPLY.size), START_WAIT_S
            )
        except (OSError, TimeoutError) as exc:
            ready, why = b"", str(exc) or type(exc).__name__
        else:
            why = "it exited at start"
        if not ready:
            log.warning("syncer.unavailable", error=why, pid=proc.pid)
            parent.close()
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            return None
        return cls(proc, parent)

    def new_slot(self) -> int:
        """A name for one store's file in the process, for `use` and `fdatasync`."""
        return next(self._slots)

    def use(self, slot: int, fd: int) -> None:
        """Sync the file open at `fd` as `slot` from now on (the process keeps its own
        descriptor of it, closing the slot's previous one)."""
        self._send(REQUEST.pack(b"R", slot, 0), fd)

    def forget(self, slot: int) -> None:
        """Let the process close the slot's file (a store closing: never raises)."""
        if self.alive:
            with contextlib.suppress(OSError):  # it died: its files went with it
                self._send(REQUEST.pack(b"C", slot, 0))

    def fdatasync(self, slot: int) -> asyncio.Future[None]:
        """fdatasync the slot's file; the future fails with OSError as fdatasync would."""
        future: asyncio.Future[None] = self._loop.create_future()
        request_id = next(self._ids)
        self._waiting[request_id] = future
        self._send(REQUEST.pack(b"S", request_id, slot))
        return future

    def _send(self, data: bytes, fd: int | None = None) -> None:
        if not self.alive:
            raise OSError(errno.EIO, "the sync process has exited")
        try:
            # Datagrams of 9 bytes into a socket buffer of ~200 KB that the process
            # drains as fast as the disk syncs: a full buffer means it is stuck.
            if fd is None:
                self._sock.send(data)
            else:
                socket.send_fds(self._sock, [data], [fd])
        except OSError as exc:
            self._died(f"send: {exc}")
            raise OSError(errno.EIO, "the sync process has exited") from None

    def _on_readable(self) -> None:
        while True:
            try:
                data = self._sock.recv(REPLY.size)
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
            else:
                for observe in fs.fsync_observers:
                    observe(seconds)
                future.set_result(None)

    def _died(self, why: str) -> None:
        if not self.alive:
            return
        self.alive = False
        self._loop.remove_reader(self._sock.fileno())
        waiting, self._waiting = self._waiting, {}
        log.error("syncer.exited", why=why, unanswered=len(waiting), pid=self._proc.pid,
                  hint="log syncs go to executor threads until the node restarts")  # fmt: skip
        for future in waiting.values():
            if not future.done():
                future.set_exception(
                    OSError(errno.EIO, "the sync process exited; whether it synced is unknown")
                )

    async def close(self) -> None:
        """Stop the process once it has answered what it was asked (stores close first)."""
        if self.alive:
            self.alive = False
            self._loop.remove_reader(self._sock.fileno())
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(OSError(errno.EIO, "the sync process was stopped"))
        self._waiting.clear()
        self._sock.close()  # end of file for the process: it exits
        try:
            await asyncio.wait_for(self._proc.wait(), STOP_WAIT_S)
        except TimeoutError:
            self._proc.kill()
            await self._proc.wait()
