"""The client's asyncio glue: bytes in → frames out, frames in → one write per loop turn.

This layer knows frames, not operations (STYLE.md "layers import only
downward": codec → transport → connection → client API). It owns:

- reading: an `asyncio.Protocol` whose `data_received` feeds the sans-IO
  `FrameDecoder` and hands each whole frame to the connection's callback;
- writing: frames queued during one loop turn leave in one `transport.write`
  (a `call_soon` flush), so a burst of requests from many tasks costs one
  syscall (DESIGN.md §10);
- write backpressure: `pause_writing` / `resume_writing` and `drain()`;
- noticing a peer that went away while the connection sat idle (`peer_gone`).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import struct
from collections.abc import Callable

from mqd.errors import ConnectionClosed
from mqd.protocol.frame import FLAG_ERROR, HEADER_BYTES, PREFIX_BYTES, Frame, FrameDecoder

_PREFIX_AND_HEADER = struct.Struct(">IBBHI")  # length, version, flags, opcode, correlation_id


class FrameProtocol(asyncio.Protocol):
    """One client connection at the frame level.

    `on_frame(frame)` is called for every frame received, in order;
    `on_lost(exc)` once, when the connection is gone (exc is None for a clean
    close). A frame the decoder refuses (too large, malformed) aborts the
    connection: the server broke framing and nothing after it can be trusted.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        frame_bytes_max: int,
        on_frame: Callable[[Frame], None],
        on_lost: Callable[[BaseException | None], None],
    ) -> None:
        self._loop = loop
        self._decoder = FrameDecoder(frame_bytes_max)
        self._on_frame = on_frame
        self._on_lost = on_lost
        self._transport: asyncio.Transport | None = None
        self._out: list[bytes] = []
        self._write_paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._lost = False
        self._abort_reason: BaseException | None = None
        self._plaintext = True
        # Bytes received so far, whole frames or not: a large frame on a slow link is
        # progress long before it ends (Connection's keepalive looks at this).
        self.bytes_in = 0

    # --- asyncio.Protocol callbacks ------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses; no isinstance check.
        self._transport = transport  # type: ignore[assignment]
        self._plaintext = transport.get_extra_info("sslcontext") is None

    def data_received(self, data: bytes) -> None:
        self.bytes_in += len(data)
        decoder = self._decoder
        on_frame = self._on_frame
        try:
            decoder.feed(data)
            while (frame := decoder.next_frame()) is not None:
                on_frame(frame)
        except Exception as exc:
            # A framing error from the server, or a bug in handling a frame:
            # either way this connection is done; outstanding calls are failed
            # in connection_lost with this as the cause.
            self.abort(exc)

    def eof_received(self) -> bool:
        # Returning False lets the transport close itself; connection_lost follows.
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._out.clear()
        reason = self._abort_reason or exc
        self._wake_drainers()
        self._on_lost(reason)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake_drainers()

    # --- writing ---------------------------------------------------------------

    @property
    def write_paused(self) -> bool:
        return self._write_paused

    @property
    def is_lost(self) -> bool:
        return self._lost

    def write(self, frame: bytes) -> None:
        """Queue one encoded frame; every frame queued this loop turn leaves in one write."""
        out = self._out
        if not out:
            self._loop.call_soon(self._flush)
        out.append(frame)

    def _flush(self) -> None:
        out = self._out
        if not out:
            return
        self._out = []
        transport = self._transport
        if transport is None or self._lost or transport.is_closing():
            return
        transport.write(out[0] if len(out) == 1 else b"".join(out))

    async def drain(self) -> None:
        """Wait until the transport's write buffer is below its high-water mark."""
        if not self._write_paused or self._lost:
            return
        waiter = self._loop.create_future()
        self._drain_waiters.append(waiter)
        await waiter

    def _wake_drainers(self) -> None:
        waiters, self._drain_waiters = self._drain_waiters, []
        for waiter in waiters:
            if not waiter.done():
                # A lost connection wakes drainers normally; the caller then
                # finds the connection closed and raises ConnectionClosed.
                waiter.set_result(None)

    # --- closing ---------------------------------------------------------------

    def close(self) -> None:
        """Flush what is queued, then close gracefully."""
        if self._transport is not None and not self._lost:
            self._flush()
            self._transport.close()

    def abort(self, reason: BaseException | None = None) -> None:
        """Drop the connection now; `reason` becomes the cause of the failed calls."""
        if self._abort_reason is None:
            self._abort_reason = reason
        if self._transport is not None and not self._lost:
            self._transport.abort()

    def write_buffer_size(self) -> int:
        """Bytes written and not yet sent (0 once the connection is gone)."""
        transport = self._transport
        if transport is None or self._lost:
            return 0
        return transport.get_write_buffer_size()

    def peer_gone(self) -> bool:
        """Whether the server already closed or reset this idle connection.

        After the server restarts, the old socket holds an EOF or a reset that
        the event loop has not processed yet if the application did not yield
        since. Writing a request into it would fail the request although the
        server never saw it, so before reusing an idle connection the client
        asks the kernel with a non-blocking MSG_PEEK (one recv, no data
        consumed). Waiting bytes mean alive, unless (on a plaintext
        connection) they start an error frame with correlation id 0, which
        the server sends only right before it closes the connection
        (protocol.md §1.6, §1.7: the idle timeout).
        """
        if self._lost:
            return True
        transport = self._transport
        if transport is None:
            return True
        sock = transport.get_extra_info("socket")
        if sock is None:
            return False
        try:
            fd = sock.fileno()
            if fd < 0:
                return True
            probe = socket.socket(fileno=fd)
        except OSError:
            return False
        try:
            data = probe.recv(PREFIX_BYTES + HEADER_BYTES, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            return True  # ECONNRESET and friends
        finally:
            probe.detach()  # the fd belongs to the transport
        if not data:
            return True
        if self._plaintext and len(data) == PREFIX_BYTES + HEADER_BYTES:
            _, _, flags, _, correlation_id = _PREFIX_AND_HEADER.unpack(data)
            return correlation_id == 0 and bool(flags & FLAG_ERROR)
        return False


async def open_frame_connection(
    host: str,
    port: int,
    *,
    tls: ssl.SSLContext | None,
    frame_bytes_max: int,
    on_frame: Callable[[Frame], None],
    on_lost: Callable[[BaseException | None], None],
    connect_timeout_s: float,
) -> FrameProtocol:
    """Open a TCP (optionally TLS) connection and return its FrameProtocol."""
    loop = asyncio.get_running_loop()
    protocol = FrameProtocol(loop, frame_bytes_max, on_frame, on_lost)
    try:
        async with asyncio.timeout(connect_timeout_s):
            await loop.create_connection(
                lambda: protocol,
                host,
                port,
                ssl=tls,
                server_hostname=host if tls is not None else None,
            )
    except TimeoutError:
        raise ConnectionClosed(
            f"could not connect to {host}:{port} within {connect_timeout_s} s"
        ) from None
    except (OSError, ssl.SSLError) as exc:
        raise ConnectionClosed(f"could not connect to {host}:{port}: {exc}") from exc
    return protocol
