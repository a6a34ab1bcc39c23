"""The sync process: fdatasync for a node's logs, in a process of its own.

Run by `mqd.storage.syncer.SyncProcess` as `python -I sync_helper.py FD...`, where
each FD is its end of an AF_UNIX SOCK_SEQPACKET socket pair: a lane, served by a
thread of its own, so that stores on different lanes sync at the same time (the
filesystem journal batches concurrent fsyncs) while each store's requests, all on
one lane, stay in order. Standard library only, nothing of mqd imported: it starts
in milliseconds and holds a few MB. It exits at end of file on the first lane (the
node closed its ends, or was killed and the kernel closed them); it ignores SIGINT
and SIGTERM, which are the node's to act on.

Requests on a lane, one datagram each (little-endian):
    b"R" u32 slot      + one fd (SCM_RIGHTS): sync that file as `slot` from now on
    b"C" u32 slot      forget `slot` (closes its fd)
    b"S" u32 id u32 slot   fdatasync `slot`'s file
An S is answered with u32 id, i32 errno (0: synced), f64 seconds the call took; the
same with id 0 says the process is ready (its signal dispositions set).
"""

import errno
import os
import signal
import socket
import struct
import sys
import threading
import time

REQUEST = struct.Struct("<cII")
REPLY = struct.Struct("<Iid")


def main(fds: list[int]) -> None:
    # A Ctrl-C at the terminal, or a service manager's SIGTERM to the whole group, is
    # for the node: it drains, with syncs, then closes its end, and this process exits.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    lanes = [socket.socket(fileno=fd) for fd in fds]
    for lane in lanes[1:]:
        threading.Thread(target=serve, args=(lane,), daemon=True).start()
    serve(lanes[0])  # its end of file (the node gone, or done) ends the process


def serve(sock: socket.socket) -> None:
    """One lane, until its end of file; a lane that fails closes, which the node
    takes as the end of the whole process."""
    try:
        _serve(sock)
    finally:
        sock.close()


def _serve(sock: socket.socket) -> None:
    sock.send(REPLY.pack(0, 0, 0.0))  # ready
    files: dict[int, int] = {}
    while True:
        try:
            data, fds, _flags, _addr = socket.recv_fds(sock, REQUEST.size, 1)
        except OSError:
            return
        if not data:
            return
        kind, first, second = REQUEST.unpack(data)
        if kind in (b"R", b"C"):
            old = files.pop(first, None)
            if old is not None:
                os.close(old)
            if kind == b"R" and fds:
                files[first] = fds[0]
        elif kind == b"S":
            fd = files.get(second)
            started = time.perf_counter()
            if fd is None:
                error = errno.EBADF  # no such slot (a bug on the node's side)
            else:
                try:
                    os.fdatasync(fd)
                    error = 0
                except OSError as exc:
                    error = exc.errno or errno.EIO
            try:
                sock.send(REPLY.pack(first, error, time.perf_counter() - started))
            except OSError:
                return


if __name__ == "__main__":
    main([int(arg) for arg in sys.argv[1:]])
