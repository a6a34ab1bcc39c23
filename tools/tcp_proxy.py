"""A small asyncio TCP proxy for fault injection, loopback only (tools/chaos.py).

    proxy = TcpProxy("127.0.0.1", 7001, name="*->backend-1")
    port = await proxy.start()          # listens on 127.0.0.1:<port>
    proxy.set_mode("delay", delay_s=0.5)
    proxy.set_mode("drop")              # close every connection, refuse new ones
    proxy.set_mode("blackhole")         # keep connections, forward nothing
    proxy.set_mode("pass")              # heal: forward again
    proxy.freeze_open()                 # open connections go dead for good
    proxy.set_rate(100_000)             # a slow link: bytes per second each way
    await proxy.close()

It forwards bytes both ways without looking at them (TLS passes through
untouched). Modes:

- `pass`: forward at once.
- `delay`: forward each chunk `delay_s` after it was read, in order.
- `drop`: abort every open connection (both sides see a reset) and refuse new
  ones (accepted and aborted at once): a cut link the peers notice.
- `blackhole`: connections stay open and new ones are accepted, but nothing is
  forwarded until the mode changes (then the held bytes flow, as TCP would
  after a short partition): a cut link the peers only notice by timeouts.

Every address must be a loopback address; every wait inside is bounded
(connect timeout) or ends when the proxy closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import time

MODES = ("pass", "delay", "drop", "blackhole")
CHUNK_BYTES = 64 * 1024
CONNECT_TIMEOUT_S = 5.0
# Chunks read ahead per direction before the reader waits for the writer.
QUEUE_CHUNKS = 64


def check_loopback(host: str) -> str:
    """Return `host` if it is a loopback address (or "localhost"), else raise ValueError."""
    if host == "localhost":
        return host
    try:
        if ipaddress.ip_address(host).is_loopback:
            return host
    except ValueError:
        pass
    raise ValueError(f"{host!r} is not a loopback address; the proxy only works on loopback")


class _Pair:
    """One proxied connection: the client side and the upstream side."""

    def __init__(self) -> None:
        self.writers: list[asyncio.StreamWriter] = []
        self.tasks: list[asyncio.Task[None]] = []

    def abort(self) -> None:
        for writer in self.writers:
            transport = writer.transport
            if not transport.is_closing():
                transport.abort()
        for task in self.tasks:
            task.cancel()


class TcpProxy:
    """Listens on `listen_host:listen_port` (0 = any free port), forwards to `target`."""

    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
        name: str = "",
    ) -> None:
        self.target_host = check_loopback(target_host)
        self.target_port = int(target_port)
        self.listen_host = check_loopback(listen_host)
        self.listen_port = int(listen_port)
        self.name = name or f"->{target_host}:{target_port}"
        self.mode = "pass"
        self.delay_s = 0.0
        # Each direction's bandwidth, bytes per second (0: as fast as it goes): a slow link.
        self.rate_bytes_per_s = 0
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server: asyncio.Server | None = None
        self._pairs: set[_Pair] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self.connections_total = 0
        self.refused_total = 0
        self.bytes_total = 0

    @property
    def address(self) -> str:
        return f"{self.listen_host}:{self.listen_port}"

    @property
    def target(self) -> str:
        return f"{self.target_host}:{self.target_port}"

    async def start(self) -> int:
        """Start listening; returns the port."""
        self._server = await asyncio.start_server(
            self._accept, self.listen_host, self.listen_port, reuse_address=True
        )
        self.listen_port = self._server.sockets[0].getsockname()[1]
        return self.listen_port

    def set_mode(self, mode: str, delay_s: float = 0.0) -> None:
        """Switch to `pass`, `delay` (with `delay_s`), `drop` or `blackhole`."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if mode == "delay" and not 0 < delay_s <= 60:
            raise ValueError(f"delay_s must be in (0, 60], got {delay_s!r}")
        self.mode = mode
        self.delay_s = delay_s if mode == "delay" else 0.0
        if mode == "blackhole":
            self._flowing.clear()
        else:
            self._flowing.set()
        if mode == "drop":
            for pair in list(self._pairs):
                pair.abort()
            self._pairs.clear()

    def set_rate(self, bytes_per_s: int) -> None:
        """Limit each direction to `bytes_per_s` (0: no limit), on every connection."""
        if not 0 <= bytes_per_s:
            raise ValueError(f"bytes_per_s must be >= 0, got {bytes_per_s}")
        self.rate_bytes_per_s = bytes_per_s

    def freeze_open(self) -> int:
        """Stop forwarding on every connection open now, for good, without a FIN or a
        reset (a NAT or firewall that forgot the flow); new connections go by the mode.
        Returns how many were frozen; `close` ends them."""
        for pair in self._pairs:
            for writer in pair.writers:
                writer.transport.pause_reading()
        return len(self._pairs)

    @property
    def open_connections(self) -> int:
        return len(self._pairs)

    async def close(self) -> None:
        """Stop listening and abort every connection."""
        if self._server is not None:
            self._server.close()
        for pair in list(self._pairs):
            pair.abort()
        self._pairs.clear()
        self._flowing.set()
        handlers = list(self._handlers)
        for task in handlers:
            task.cancel()
        if handlers:
            await asyncio.wait(handlers, timeout=CONNECT_TIMEOUT_S)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), CONNECT_TIMEOUT_S)
            self._server = None

    async def __aenter__(self) -> TcpProxy:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # --- connections -----------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            await self._handle(reader, writer)
        except asyncio.CancelledError:
            writer.transport.abort()
        finally:
            self._handlers.discard(task)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.mode == "drop":
            self.refused_total += 1
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.wait_for(
                asyncio.open_connection(self.target_host, self.target_port), CONNECT_TIMEOUT_S
            )
        except (OSError, TimeoutError):
            self.refused_total += 1
            writer.transport.abort()
            return
        if self.mode == "drop":  # switched while connecting
            self.refused_total += 1
            writer.transport.abort()
            up_writer.transport.abort()
            return
        self.connections_total += 1
        pair = _Pair()
        pair.writers = [writer, up_writer]
        self._pairs.add(pair)
        pair.tasks = [
            asyncio.create_task(self._pipe(reader, up_writer)),
            asyncio.create_task(self._pipe(up_reader, writer)),
        ]
        try:
            await asyncio.gather(*pair.tasks, return_exceptions=True)
        finally:
            self._pairs.discard(pair)
            pair.abort()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Copy one direction: a reader task fills a queue, this task writes (maybe late)."""
        queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue(QUEUE_CHUNKS)

        async def read() -> None:
            try:
                while True:
                    data = await reader.read(CHUNK_BYTES)
                    if not data:
                        break
                    await queue.put((time.monotonic() + self.delay_s, data))
            except OSError:
                pass
            await queue.put(None)  # end of stream (not reached if cancelled)

        reading = asyncio.create_task(read())
        try:
            while True:
                item = await queue.get()
                if item is None:
                    break
                due, data = item
                # Held while the link is a black hole; close() and other modes release it.
                await self._flowing.wait()
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                if self.mode == "drop":
                    break
                writer.write(data)
                self.bytes_total += len(data)
                await writer.drain()
                if self.rate_bytes_per_s:
                    await asyncio.sleep(len(data) / self.rate_bytes_per_s)
            if writer.can_write_eof():
                with contextlib.suppress(OSError):
                    writer.write_eof()
        except OSError:
            pass
        finally:
            reading.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reading
