"""One client connection at the operation level: correlation ids and futures.

Above the transport (frames) and below the client API (queues, messages).
Every request gets a fresh correlation id and one future; responses are
matched by id, so they may arrive in any order and a long-poll RECEIVE does
not hold up anything else (protocol.md §1, DESIGN.md §3). At most
`requests_in_flight_max` requests (a server limit from HELLO) are outstanding;
further callers wait for a slot in arrival order.

A connection is never reopened: when it is lost, every outstanding call fails
with ConnectionClosed and the client API opens a new one on its next call.
"""

from __future__ import annotations

import asyncio
import math
import ssl
from collections import deque
from collections.abc import Callable, Container
from typing import Any

from mqd.errors import (
    ConnectionClosed,
    FrameTooLarge,
    MqdError,
    ProtocolError,
    RequestTimeout,
    ServerError,
    UnsupportedVersion,
)
from mqd.protocol.codec import decode_response, encode_request
from mqd.protocol.frame import (
    FLAG_ERROR,
    FLAG_PUSH,
    PREFIX_BYTES,
    PROTOCOL_VERSION_MAX,
    PROTOCOL_VERSION_MIN,
    Frame,
)
from mqd.protocol.messages import ErrorBody, HelloRequest, HelloResponse, Opcode, PingRequest
from mqd.protocol.push import decode_push

from .transport import FrameProtocol, open_frame_connection

# Limits assumed until (or if) the server's HELLO response names them. They
# are small on purpose: a server that does not advertise a limit is trusted
# with no more than this.
DEFAULT_LIMITS: dict[str, int] = {
    "frame_bytes_max": 1024 * 1024,
    "batch_messages_max": 100,
    "requests_in_flight_max": 64,
}
# The largest response frame the client accepts, whatever the server says.
RESPONSE_FRAME_BYTES_MAX = 256 * 1024 * 1024
# Before reusing a connection that has been quiet this long, check that the
# server has not closed it meanwhile (see FrameProtocol.peer_gone). The check
# costs about 2 µs (measured); back-to-back requests come sooner than this and
# skip it. A server restart takes far longer (about 0.2 s measured).
IDLE_CHECK_S = 0.005
# A connection idle this close to the server's idle_timeout_ms (or a tenth of it, if
# more; at most half of it) is replaced before its next request rather than raced
# against the close.
IDLE_MARGIN_S = 1.0
# While a connection has subscriptions open and nothing has come in for this long, it
# sends PING; no answer within as long again closes it (`Client(keepalive=...)`).
KEEPALIVE_S = 30.0
# While a request waits for its answer and nothing has come in for this long (or the
# keepalive, if shorter), PING; no answer within as long again closes the connection,
# so that its calls fail over to another address instead of waiting out their
# timeout (30 s) and a probe (10 s) on a stopped server. A server answers PING at
# once even while it works on long requests (long polls), so this much quiet with
# a request out means a stopped or hung server, or a dead link.
STALL_S = 5.0
# ... except while a request this large waits: it may still be on its way over a slow
# link, its bytes out of our sight in kernel and proxy buffers, with the PING queued
# behind it. Its own timeout (and the probe after it) judges then.
STALL_FRAME_BYTES_MAX = 64 * 1024
# After a request times out, a PING must come back within this (or the keepalive
# period, if shorter), or the connection is dropped and the next call opens another:
# a link that died with no FIN or reset would otherwise fail every call for ever.
PROBE_TIMEOUT_S = 10.0
_CORRELATION_ID_MAX = 0xFFFFFFFF

# What a subscription's listener is handed: the DeliverPush or ErrorBody of one push
# frame (protocol.md §4.18), or ConnectionClosed when the connection is gone.
PushListener = Callable[[Any], None]


def _limit(limits: dict[str, Any], name: str) -> int:
    value = limits.get(name)
    if type(value) is int and value > 0:
        return value
    return DEFAULT_LIMITS[name]


def _next_free_id(previous: int, taken: Container[int]) -> int:
    """The next id after `previous` (1 .. _CORRELATION_ID_MAX, wrapping) not in `taken`."""
    candidate = previous % _CORRELATION_ID_MAX + 1
    while candidate in taken:
        candidate = candidate % _CORRELATION_ID_MAX + 1
    return candidate


def _idle_margin_s(idle_limit_s: float) -> float:
    # At most half the limit: with the smallest (1 s) a margin of a whole second had
    # every request after the least pause open a new connection.
    return min(idle_limit_s / 2, max(IDLE_MARGIN_S, idle_limit_s / 10))


class Connection:
    """A multiplexed request/response channel to one server, after HELLO."""

    def __init__(
        self, address: str, request_timeout_s: float, keepalive_s: float = KEEPALIVE_S
    ) -> None:
        self.address = address
        self.request_timeout_s = request_timeout_s
        self.keepalive_s = keepalive_s  # 0: off
        self._keepalive_task: asyncio.Task[None] | None = None
        self._probe_task: asyncio.Task[None] | None = None
        # (bytes received, bytes waiting to be sent) when the keepalive last looked.
        self._traffic_seen = (0, 0)
        # Correlation ids of large requests sent (STALL_FRAME_BYTES_MAX); pruned lazily.
        self._large_sent: set[int] = set()
        self._loop = asyncio.get_running_loop()
        self._protocol: FrameProtocol | None = None
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._next_id = 0
        self._in_flight = 0
        self._in_flight_max = DEFAULT_LIMITS["requests_in_flight_max"]
        self._slot_waiters: deque[asyncio.Future[None]] = deque()
        self._closed_reason: str | None = None
        self._closed_cause: BaseException | None = None
        self._lost_waiter: asyncio.Future[None] = self._loop.create_future()
        self._last_alive = self._loop.time()
        # When a request last went out or a frame came in: the server's idle clock.
        self._last_exchange = self._last_alive
        # Push subscriptions by id (protocol.md §4.18); the client picks the ids.
        self._push_listeners: dict[int, PushListener] = {}
        # Subscriptions given up without the server's word that they ended (UNSUBSCRIBE
        # unanswered): their pushes may still come, and are dropped, not a broken stream.
        self._retired: set[int] = set()
        self._next_subscription_id = 0
        # Set from the HELLO response.
        self.hello: HelloResponse | None = None
        self.limits: dict[str, Any] = {}
        self.frame_bytes_max = DEFAULT_LIMITS["frame_bytes_max"]
        self.batch_messages_max = DEFAULT_LIMITS["batch_messages_max"]

    @classmethod
    async def open(
        cls,
        host: str,
        port: int,
        *,
        tls: ssl.SSLContext | None = None,
        token: str | None = None,
        client_name: str = "mqd-python",
        connect_timeout_s: float = 10.0,
        request_timeout_s: float = 30.0,
        keepalive_s: float = KEEPALIVE_S,
    ) -> Connection:
        """Connect, send HELLO (protocol.md §4 HELLO) and keep the server's limits."""
        conn = cls(f"{host}:{port}", request_timeout_s, keepalive_s)
        conn._protocol = await open_frame_connection(
            host,
            port,
            tls=tls,
            frame_bytes_max=RESPONSE_FRAME_BYTES_MAX,
            on_frame=conn._on_frame,
            on_lost=conn._on_lost,
            connect_timeout_s=connect_timeout_s,
        )
        try:
            hello = await conn.request(
                HelloRequest(PROTOCOL_VERSION_MIN, PROTOCOL_VERSION_MAX, client_name, token or ""),
                timeout_s=connect_timeout_s,
            )
            if not PROTOCOL_VERSION_MIN <= hello.version <= PROTOCOL_VERSION_MAX:
                raise UnsupportedVersion(
                    f"server chose protocol version {hello.version}, this client speaks "
                    f"{PROTOCOL_VERSION_MIN}..{PROTOCOL_VERSION_MAX}"
                )
        except ConnectionClosed as exc:
            await conn.close()
            if tls is None:
                # A TLS-only server closes a plaintext connection without a word.
                raise ConnectionClosed(
                    f"{exc}, before answering HELLO; if the server requires TLS, connect "
                    "with tls= (a CA file or an ssl.SSLContext; mqd admin and bench: --ca / "
                    "--tls-ca FILE); if it is a cluster port, use a frontend's client port"
                ) from exc
            raise
        except BaseException:
            await conn.close()
            raise
        conn._apply_hello(hello)
        return conn

    def _apply_hello(self, hello: HelloResponse) -> None:
        self.hello = hello
        self.limits = dict(hello.limits)
        self.frame_bytes_max = _limit(self.limits, "frame_bytes_max")
        self.batch_messages_max = _limit(self.limits, "batch_messages_max")
        self._in_flight_max = _limit(self.limits, "requests_in_flight_max")

    # --- state -----------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed_reason is not None

    def usable(self) -> bool:
        """Whether a request may be sent now; detects a server gone while idle."""
        if self._closed_reason is not None:
            return False
        if self._pending:
            return True
        now = self._loop.time()
        idle_limit_s = self.limits.get("idle_timeout_ms", 0) / 1000
        if (
            idle_limit_s
            and not self._push_listeners
            and now - self._last_exchange >= idle_limit_s - _idle_margin_s(idle_limit_s)
        ):
            # The server closes a connection idle for idle_timeout_ms: a request sent
            # about then could cross its close, and fail with an outcome unknown (a SEND
            # is not repeated). Start afresh on a new connection instead.
            self._mark_closed("idle for nearly the server's idle_timeout_ms", None)
            assert self._protocol is not None
            self._protocol.abort()
            return False
        if now - self._last_alive < IDLE_CHECK_S:
            return True
        protocol = self._protocol
        assert protocol is not None
        if protocol.peer_gone():
            self._mark_closed("the server closed the connection while it was idle", None)
            protocol.abort()
            return False
        self._last_alive = now
        return True

    def _closed_error(self) -> ConnectionClosed:
        exc = ConnectionClosed(f"connection to {self.address} closed: {self._closed_reason}")
        exc.__cause__ = self._closed_cause
        return exc

    # --- requests ----------------------------------------------------------------

    async def request(
        self,
        msg: Any,
        timeout_s: float | None = None,
        on_abandoned: Callable[[Any], None] | None = None,
        *,
        keep_slot: bool = False,
    ) -> Any:
        """Send one request and return its response dataclass.

        Raises the ServerError subclass of an error frame, ConnectionClosed if
        the connection is or becomes closed, RequestTimeout after `timeout_s`
        (default `request_timeout_s`; `math.inf` for none), FrameTooLarge
        (without sending) if the request would not fit the server's frame limit.

        If the caller is cancelled after the request was sent, the server
        still acts on it; with `on_abandoned`, its successful response (if it
        comes before the timeout) is handed to `on_abandoned(response)`
        instead of being dropped. RECEIVE uses this to give back messages a
        cancelled long poll was sent (protocol.md §4.10).

        With `keep_slot`, a successful request keeps its in-flight slot until
        `release_slot()`: the server counts an open subscription as an
        outstanding request (protocol.md §4.18), and so must the client, or
        its next request beyond the limit is refused (TOO_MANY_REQUESTS).
        """
        abandoned = kept = False
        if self._closed_reason is not None:
            raise self._closed_error()
        if self._in_flight < self._in_flight_max:
            self._in_flight += 1
        else:
            await self._wait_for_slot()
        if self._keepalive_task is None:
            self._watch()
        seconds = self.request_timeout_s if timeout_s is None else timeout_s
        try:
            protocol = self._protocol
            assert protocol is not None
            if protocol.write_paused:
                # The server reads nothing of ours (or the link is dead): as long as the
                # request would wait for its answer, then RequestTimeout.
                try:
                    async with asyncio.timeout(None if seconds == math.inf else seconds):
                        await protocol.drain()
                except TimeoutError:
                    raise self._timed_out(msg.OPCODE, seconds, "could not be sent to") from None
            if self._closed_reason is not None:
                raise self._closed_error()
            pending = self._pending
            cid = self._next_id = _next_free_id(self._next_id, pending)
            frame = encode_request(cid, msg)
            if len(frame) - PREFIX_BYTES > self.frame_bytes_max:
                raise FrameTooLarge(
                    f"{Opcode(msg.OPCODE).name} request of {len(frame) - PREFIX_BYTES} bytes "
                    f"exceeds the server's frame_bytes_max {self.frame_bytes_max}; not sent",
                    details={
                        "frame_bytes": len(frame) - PREFIX_BYTES,
                        "frame_bytes_max": self.frame_bytes_max,
                    },
                )
            loop = self._loop
            future = loop.create_future()
            pending[cid] = future
            protocol.write(frame)
            if len(frame) > STALL_FRAME_BYTES_MAX:
                self._large_sent.add(cid)
            self._last_exchange = loop.time()
            # An infinite timeout (REDRIVE, which may run for minutes) sets no
            # timer: only the connection's loss ends the wait.
            timer = (
                None
                if seconds == math.inf
                else loop.call_later(seconds, self._expire, cid, msg.OPCODE, timeout_s)
            )
            try:
                response = await future
            except asyncio.CancelledError:
                if on_abandoned is not None:
                    abandoned = self._abandon(cid, future, timer, on_abandoned)
                raise
            finally:
                if not abandoned:
                    if timer is not None:
                        timer.cancel()
                    pending.pop(cid, None)
            kept = keep_slot
            return response
        finally:
            if not abandoned and not kept:
                self._release_slot()

    def release_slot(self) -> None:
        """Give back a slot a request kept (`keep_slot`): once per such request."""
        self._release_slot()

    def _abandon(
        self,
        cid: int,
        future: asyncio.Future[Any],
        timer: asyncio.TimerHandle | None,
        on_abandoned: Callable[[Any], None],
    ) -> bool:
        """Keep waiting, without a caller, for the response of a cancelled request.

        Returns True if a listener now holds the request's id and its
        in-flight slot (both freed when the response, the timeout or the
        connection's loss comes), False if there is nothing to wait for.
        """
        if future.done() and not future.cancelled():
            # The response came in the same turn as the cancellation.
            if future.exception() is None:
                on_abandoned(future.result())
            return False
        if self._closed_reason is not None or self._pending.get(cid) is not future:
            return False
        late: asyncio.Future[Any] = self._loop.create_future()
        self._pending[cid] = late

        def on_done(late: asyncio.Future[Any]) -> None:
            # Whoever completed `late` (_on_frame, _expire, _mark_closed) has
            # already removed it from _pending.
            if timer is not None:
                timer.cancel()
            self._release_slot()
            if not late.cancelled() and late.exception() is None:
                on_abandoned(late.result())

        late.add_done_callback(on_done)
        return True

    async def _wait_for_slot(self) -> None:
        """Wait until a finishing request hands its in-flight slot over to us."""
        waiter = self._loop.create_future()
        self._slot_waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._release_slot()  # handed over just as we were cancelled
            raise

    def _release_slot(self) -> None:
        waiters = self._slot_waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot passes on; _in_flight is unchanged
                return
        self._in_flight -= 1

    def _expire(self, cid: int, opcode: int, timeout_s: float | None) -> None:
        future = self._pending.pop(cid, None)
        if future is not None and not future.done():
            seconds = self.request_timeout_s if timeout_s is None else timeout_s
            future.set_exception(self._timed_out(opcode, seconds, "got no response from"))

    def _timed_out(self, opcode: int, seconds: float, what: str) -> RequestTimeout:
        """The error for a request that timed out; the first also starts `_probe`."""
        if opcode != Opcode.PING and self._probe_task is None and self._closed_reason is None:
            self._probe_task = self._loop.create_task(self._probe())
        return RequestTimeout(
            f"{Opcode(opcode).name} {what} {self.address} within {seconds:g} s",
            details={"timeout_s": seconds},
        )

    async def _probe(self) -> None:
        """A request timed out: a slow server, or a link that died with no FIN or reset.
        PING; no answer within PROBE_TIMEOUT_S drops the connection, so that the next
        call connects again instead of timing out on it for ever."""
        seconds = min(PROBE_TIMEOUT_S, self.keepalive_s or PROBE_TIMEOUT_S)
        try:
            await self.request(PingRequest(b""), timeout_s=seconds)
        except RequestTimeout:
            self.abort(f"no answer to a PING within {seconds:g} s after a request timed out")
        except MqdError:
            pass  # closed meanwhile
        finally:
            self._probe_task = None

    # --- push subscriptions ------------------------------------------------------

    def add_push_listener(self, listener: PushListener) -> int:
        """Reserve a subscription id whose push frames go to `listener` (before SUBSCRIBE).

        The listener gets each push body in order, then ConnectionClosed if the
        connection is lost first; `remove_push_listener` frees the id.
        """
        if self._closed_reason is not None:
            raise self._closed_error()
        listeners = self._push_listeners
        retired = self._retired
        sid = _next_free_id(self._next_subscription_id, listeners)
        while sid in retired:
            sid = _next_free_id(sid, listeners)
        self._next_subscription_id = sid
        listeners[sid] = listener
        if self._keepalive_task is None:
            self._watch()
        return sid

    def _watch(self) -> None:
        """Start the keepalive (unless it is off), which ends when nothing waits."""
        if self.keepalive_s > 0:
            self._keepalive_task = self._loop.create_task(self._keep_alive())

    async def _keep_alive(self) -> None:
        """While subscriptions are open or requests wait, make sure the link still
        carries answers.

        A link that died with no FIN or reset (a network partition, a NAT or firewall
        that forgot the flow), or a server that stopped (SIGSTOP, a hung host), raises
        no error: a stream waiting for pushes would wait on it for ever, and a request
        for its whole timeout. When nothing has come in for `keepalive_s` (STALL_S
        while a request waits), PING; no answer within as long again closes the
        connection, which ends its subscriptions and requests (ConnectionClosed), so
        streams subscribe again and calls safe to repeat go to the next address."""
        try:
            while self._closed_reason is None:
                if self._large_sent:
                    self._large_sent.intersection_update(self._pending)
                if self._pending and not self._large_sent:
                    period = min(self.keepalive_s, STALL_S)
                elif self._push_listeners:
                    period = self.keepalive_s
                elif self._pending:
                    await asyncio.sleep(STALL_S)  # a large request: look again later
                    continue
                else:
                    return
                quiet_s = self._loop.time() - self._last_alive
                if quiet_s < period:
                    self._traffic_moved()  # the baseline for the next look
                    await asyncio.sleep(period - quiet_s)
                    continue
                if self._traffic_moved():
                    # No whole frame, but bytes moved: a large frame on a slow link.
                    self._last_alive = self._loop.time()
                    continue
                if self._in_flight >= self._in_flight_max:
                    # No slot for a PING (the server would refuse one more request):
                    # the requests' own timeouts and the probe after them judge.
                    await asyncio.sleep(period)
                    continue
                if not await self._answers_ping(period):
                    self.abort(f"no answer to a PING within {period:g} s, and nothing moving")
                    return
        finally:
            self._keepalive_task = None

    def _traffic_moved(self) -> bool:
        """Whether bytes came in, or went out, since the last look."""
        protocol = self._protocol
        if protocol is None:
            return False
        seen_in, seen_waiting = self._traffic_seen
        now_in, now_waiting = protocol.bytes_in, protocol.write_buffer_size()
        self._traffic_seen = (now_in, now_waiting)
        return now_in != seen_in or now_waiting < seen_waiting

    async def _answers_ping(self, period: float) -> bool:
        """PING; True once answered (or the connection closed meanwhile), False if
        `period` passes with no answer and no byte moving either way. The answer may
        queue behind a large frame on a slow link: while bytes move, it is waited for."""
        ping = self._loop.create_task(self.request(PingRequest(b""), timeout_s=math.inf))
        try:
            while True:
                done, _ = await asyncio.wait([ping], timeout=period)
                if done:
                    return True  # answered, or failed: the connection closed meanwhile
                if not self._traffic_moved():
                    return False
        finally:
            if not ping.done():
                ping.cancel()
            await asyncio.gather(ping, return_exceptions=True)

    def subscription_room(self) -> bool:
        """Whether one more subscription fits the server's subscriptions_per_connection_max
        (past it, SUBSCRIBE is refused with TOO_MANY_REQUESTS, protocol.md §4.18)."""
        limit = self.limits.get("subscriptions_per_connection_max")
        return type(limit) is not int or len(self._push_listeners) < limit

    def remove_push_listener(self, subscription_id: int, *, ended: bool = True) -> None:
        """Free a subscription id; `ended=False` when the server has not said the
        subscription ended (its UNSUBSCRIBE failed): pushes for it are then dropped
        until its end frame, instead of breaking the connection."""
        if self._push_listeners.pop(subscription_id, None) is not None and not ended:
            self._retired.add(subscription_id)

    def _on_push(self, frame: Frame) -> None:
        try:
            body = decode_push(frame)
        except Exception as exc:
            raise ProtocolError(
                f"undecodable push frame for subscription {frame.correlation_id}: {exc}"
            ) from exc  # the transport aborts the connection
        listener = self._push_listeners.get(frame.correlation_id)
        if listener is None and frame.correlation_id in self._retired:
            if isinstance(body, ErrorBody):
                self._retired.discard(frame.correlation_id)  # its end: the id is free
            return  # pushed before the server saw our UNSUBSCRIBE: its lease runs out
        if listener is None:
            # The server pushes only between SUBSCRIBE and the end of the subscription,
            # and we drop a listener only after that: a broken server.
            raise ProtocolError(f"a push for unknown subscription {frame.correlation_id}")
        if isinstance(body, ErrorBody):
            self._push_listeners.pop(frame.correlation_id, None)
        listener(body)

    # --- frames from the transport ---------------------------------------------

    def _on_frame(self, frame: Frame) -> None:
        self._last_alive = self._last_exchange = self._loop.time()
        if frame.flags & FLAG_PUSH:
            self._on_push(frame)
            return
        future = self._pending.pop(frame.correlation_id, None)
        if future is None or future.done():
            if frame.flags & FLAG_ERROR:
                # An error for no outstanding request: the server's answer to
                # something it could not attribute (protocol.md §1.6), usually
                # just before it closes the connection. Keep it as the reason.
                body = decode_response(frame)
                if isinstance(body, ErrorBody):
                    self._closed_cause = ServerError.from_code(
                        body.code, body.message, body.details
                    )
            # Otherwise a late response to a request that timed out or was
            # cancelled: nobody wants it.
            return
        try:
            response = decode_response(frame)
        except Exception as exc:
            error = ProtocolError(
                f"undecodable response to request {frame.correlation_id} "
                f"(opcode {frame.opcode:#06x}): {exc}"
            )
            future.set_exception(error)
            raise error from exc  # the transport aborts the connection
        if type(response) is ErrorBody:
            future.set_exception(
                ServerError.from_code(response.code, response.message, response.details)
            )
        else:
            future.set_result(response)

    def _on_lost(self, exc: BaseException | None) -> None:
        if exc is not None:
            reason = str(exc) or type(exc).__name__
        elif self._closed_cause is not None:
            reason = f"the server closed it after {self._closed_cause}"
        else:
            reason = "the server closed it"
        self._mark_closed(reason, exc)
        if not self._lost_waiter.done():
            self._lost_waiter.set_result(None)

    def _mark_closed(self, reason: str, cause: BaseException | None) -> None:
        if self._closed_reason is None:
            self._closed_reason = reason
            if cause is not None:
                self._closed_cause = cause
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(self._closed_error())
        waiters, self._slot_waiters = self._slot_waiters, deque()
        for waiter in waiters:
            if not waiter.done():
                waiter.set_exception(self._closed_error())
        listeners, self._push_listeners = self._push_listeners, {}
        for listener in listeners.values():
            listener(self._closed_error())
        for chore in (self._keepalive_task, self._probe_task):
            if chore is not None and chore is not asyncio.current_task():
                chore.cancel()

    # --- closing -----------------------------------------------------------------

    async def close(self, timeout_s: float = 2.0) -> None:
        """Close gracefully; outstanding calls fail with ConnectionClosed."""
        self._mark_closed("closed by the client", None)
        protocol = self._protocol
        if protocol is None or protocol.is_lost:
            return
        protocol.close()
        try:
            async with asyncio.timeout(timeout_s):
                await asyncio.shield(self._lost_waiter)
        except TimeoutError:
            protocol.abort()

    def abort(self, reason: str = "aborted by the client") -> None:
        """Drop the connection at once."""
        self._mark_closed(reason, None)
        if self._protocol is not None:
            self._protocol.abort()
