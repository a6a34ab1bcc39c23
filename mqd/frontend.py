"""Frontend role: client connections, the handshake, validation and dispatch.

One `ClientConnection` (an asyncio Protocol, DESIGN.md §10) per socket feeds
the sans-IO decoder, runs each request as its own task so that a long-poll
RECEIVE never blocks a SEND on the same connection (protocol.md §1), and
answers everything finished in one loop turn with one `transport.write`.
Requests are dispatched by the op table `HANDLERS`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import structlog

from mqd import __version__, stages
from mqd.auth import Authenticator, Quotas, Session, validate_principal_name
from mqd.errors import (
    BatchTooLarge,
    ErrorCode,
    InvalidArgument,
    MqdError,
    ProtocolError,
    ServerError,
    Throttled,
    TooManyRequests,
    Unauthenticated,
    Unavailable,
)
from mqd.limits import Limits
from mqd.metadata import QueueRecord
from mqd.protocol import codec, messages
from mqd.protocol.codec import utf8_len
from mqd.protocol.frame import (
    FLAG_RESPONSE,
    HEADER_BYTES,
    PREFIX_BYTES,
    PROTOCOL_VERSION,
    Frame,
    FrameDecoder,
)
from mqd.protocol.messages import VISIBILITY_DEFAULT, Opcode
from mqd.protocol.push import encode_push, encode_push_end
from mqd.protocol.send_rules import check_send_entries
from mqd.router import Router

log = structlog.get_logger("mqd.frontend")

SUPPORTED_VERSIONS = (PROTOCOL_VERSION, PROTOCOL_VERSION)
# Room left in a RECEIVE response frame for everything but the messages.
RESPONSE_HEADROOM_BYTES = 64 * 1024
# Answers and pushes wait their turn while more than this of what the connection wrote
# is unread (protocol.md §1.7 backpressure), looking again every ANSWER_ROOM_POLL_S: a
# client that sends without reading holds the server to about this, not to
# requests_in_flight_max full frames.
ANSWER_BUFFER_BYTES_MAX = 1024 * 1024
ANSWER_ROOM_POLL_S = 0.01
# PEEKs of one connection that read message bodies at the same time; the rest wait.
PEEKS_RUNNING_MAX = 4
# What the RECEIVEs (and subscriptions) running on one connection may answer between
# them: each gets an equal share, at most a frame, and always at least one message.
RECEIVE_ANSWERS_BYTES_MAX = 64 * 1024 * 1024
# A subscription's receive that comes back empty sooner than this (a partition closing,
# a draining node) is followed by a pause as long, so it never spins.
PUSH_EMPTY_FAST_S = 0.05


class FrontendRole:
    """Accepts client connections and turns requests into metadata/backend calls."""

    def __init__(
        self,
        *,
        router: Router,
        limits: Limits,
        node_id: str,
        roles: list[str],
        clock: Any,
        auth: Authenticator | None = None,
    ) -> None:
        self.router = router
        self.handlers = HANDLERS
        self.metrics: Any = None
        self.slow_request_s = 1.0
        # Without one, every client is the anonymous principal with every permission.
        self.auth = auth or Authenticator(None, enabled=False, quotas=Quotas())
        self.limits = limits
        self.node_id = node_id
        self.roles = roles
        self.clock = clock
        self.connections: set[ClientConnection] = set()
        self.draining = False
        # Ops still taken while draining (a cluster leader's followers' FETCH).
        self.served_while_draining: frozenset[int] = frozenset()
        self.started_at = time.monotonic()
        self.connections_total = 0
        self.requests_total = 0
        self._server: asyncio.base_events.Server | None = None

    async def start(self, host: str, port: int, ssl_context: ssl.SSLContext | None) -> str:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: ClientConnection(self),
            host,
            port,
            ssl=ssl_context,
            reuse_address=True,
            backlog=1024,
            ssl_handshake_timeout=self.limits.handshake_timeout_ms / 1000 if ssl_context else None,
        )
        sockname = self._server.sockets[0].getsockname()
        return f"{sockname[0]}:{sockname[1]}"

    async def drain(self, timeout_s: float) -> None:
        """Stop accepting, end long polls, let in-flight requests finish, close connections."""
        self.draining = True
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.end_subscriptions(ErrorCode.UNAVAILABLE, "the server is shutting down")
        self.router.catalog.stop_long_polls()
        await self.finish(timeout_s)

    async def finish(self, timeout_s: float) -> None:
        pending = [task for conn in self.connections for task in conn.tasks]
        if pending:
            _, still_running = await asyncio.wait(pending, timeout=timeout_s)
            for task in still_running:
                task.cancel()
        for conn in list(self.connections):
            conn.close()
        if self._server is not None:
            await self._server.wait_closed()

    def use_metrics(self, metrics: Any, slow_request_ms: int) -> None:
        self.metrics = metrics
        self.slow_request_s = slow_request_ms / 1000
        metrics.connections.set_function(lambda: len(self.connections))

    def observe_request(
        self,
        opcode: int,
        request: Any,
        started: float,
        outcome: str,
        trace: stages.Trace,
    ) -> None:
        """Metrics for one request, and the slow-request line; `started`: its frame's arrival."""
        elapsed = time.perf_counter() - started
        op = _op_name(opcode)
        if self.metrics is not None:
            self.metrics.request_seconds.labels(op).observe(elapsed)
            if outcome != "ok":
                self.metrics.request_errors.labels(op, outcome).inc()
        if self.slow_request_s and elapsed >= self.slow_request_s:
            self._log_slow(op, request, elapsed, outcome, trace)

    def count_entry_failures(self, op: str, failures: list[messages.EntryFailure]) -> None:
        """Entries refused inside a batch that succeeded: no request error counts them."""
        if failures and self.metrics is not None:
            counter = self.metrics.entry_failures
            for failure in failures:
                counter.labels(op, ErrorCode(failure.code).name).inc()

    def count_refused(self, opcode: int, code: ErrorCode) -> None:
        """A request answered with an error before it ran (busy, unknown, malformed)."""
        if self.metrics is not None:
            # One label for every opcode we do not serve, whatever a client sends.
            op = _op_name(opcode) if opcode in self.handlers else "unknown"
            self.metrics.request_errors.labels(op, ErrorCode(code).name).inc()

    def _log_slow(
        self, op: str, request: Any, elapsed: float, outcome: str, trace: stages.Trace
    ) -> None:
        carried: dict[str, Any] = {}
        if trace.carried is not None:
            # A leader's PARTITION_CALL: the line is about the client op inside it.
            carried_op, request, partition = trace.carried
            carried = {"carries": carried_op, "partition": partition}
        if getattr(request, "wait_ms", 0):
            # A long poll is slow on purpose: what counts is the time it did not spend
            # waiting (so a RECEIVE with a wait that had messages at once still gets a
            # line). Through a cluster frontend the wait is inside "peer": no line.
            if not isinstance(request, messages.ReceiveRequest):
                return  # a follower's FETCH, a frontend's WAIT_READY: waiting is the job
            if "peer" in trace.spans and not trace.carried:
                return
            if elapsed - trace.spans.get("wait", 0.0) < self.slow_request_s:
                return
        log.warning(
            "request.slow",
            op=op,
            **carried,
            queue=getattr(request, "queue", "") or getattr(request, "name", ""),
            # The batch's size: what it sent, acked or changed, or what it got.
            entries=len(
                getattr(request, "entries", None)
                or getattr(request, "receipts", None)
                or getattr(request, "changes", None)
                or ()
            )
            or trace.response_messages,
            request_bytes=trace.request_bytes,
            response_bytes=trace.response_bytes,
            elapsed_ms=round(elapsed * 1000, 1),
            stages_ms=trace.summary_ms(elapsed),
            outcome=outcome,
        )

    async def stats(self) -> dict[str, Any]:
        return {
            "node_id": self.node_id,
            "server_version": __version__,
            "uptime_s": round(time.monotonic() - self.started_at, 3),
            "connections": len(self.connections),
            "connections_total": self.connections_total,
            "requests_total": self.requests_total,
            "subscriptions": sum(len(conn.subscriptions) for conn in self.connections),
            **self.router.catalog.stats(),
            **({"metrics": await self.metrics.snapshot()} if self.metrics is not None else {}),
        }


Handler = Callable[["ClientConnection", Any], Awaitable[Any]]


def _op_name(opcode: int) -> str:
    try:
        return Opcode(opcode).name
    except ValueError:
        return f"0x{opcode:04x}"


class ClientConnection(asyncio.Protocol):
    def __init__(self, frontend: FrontendRole) -> None:
        self.frontend = frontend
        self.handlers: dict[int, Handler] = frontend.handlers
        self.limits = frontend.limits
        self.decoder = FrameDecoder(frontend.limits.frame_bytes_max)
        self.transport: asyncio.Transport | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self.hello_done = False
        self.peer = ""
        # Who this connection is, from HELLO (protocol.md §8.1); None before HELLO.
        self.session: Session | None = None
        self.certificate_name: str | None = None
        self._counted = False
        self._close_after_error = False
        self._login: asyncio.Task[None] | None = None
        # Push subscriptions by the id the client gave them (protocol.md §4.18).
        self.subscriptions: dict[int, Subscription] = {}
        self._out: list[bytes] = []
        self._out_bytes = 0
        self._flush_scheduled = False
        # Answers waiting for the client to read (`answer_room`), in turn.
        self._answer_turn = asyncio.Lock()
        self._drained = asyncio.Event()
        self._peeks = asyncio.Semaphore(PEEKS_RUNNING_MAX)
        self._receives_running = 0
        self._closing = False
        self._last_activity = time.monotonic()
        # When the last outstanding request or subscription ended: the idle clock of
        # §1.7 runs from this or `_last_activity` (the last data received), the later.
        self._last_busy = self._last_activity
        # The connection's one timer (`_on_timer`) checks every deadline of §1.7; `_timer_due`
        # is when it fires, on the time.monotonic() clock.
        self._opened_at = self._last_activity
        self._timer: asyncio.TimerHandle | None = None
        self._timer_due = 0.0
        # When the first byte of the frame now partly in the decoder arrived; None = no
        # partial frame (protocol.md §1.7, frame_timeout_ms).
        self._frame_started: float | None = None
        self._reading_paused = False
        self._loop = asyncio.get_running_loop()

    # --- transport callbacks ----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        self.certificate_name = _certificate_name(transport)
        self.frontend.connections_total += 1
        if len(self.frontend.connections) >= self.limits.connections_max:
            self._send_fatal(
                0,
                0,
                ErrorCode.UNAVAILABLE,
                f"too many connections (connections_max={self.limits.connections_max})",
            )
            return
        self.frontend.connections.add(self)
        self._arm_timer(self._opened_at + self.limits.handshake_timeout_ms / 1000)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        self.frontend.connections.discard(self)
        self._uncount()
        if self._timer is not None:
            self._timer.cancel()
        # Requests already running finish (their effects are durable); answers are dropped.
        # Subscriptions end: what they pushed keeps its lease (protocol.md §4.18).
        self.end_subscriptions()
        self._drained.set()  # answers waiting for room are dropped now

    def pause_writing(self) -> None:
        # The peer reads slower than we answer: stop reading its requests until it catches up.
        if self.transport is not None:
            self.transport.pause_reading()
            self._reading_paused = True

    def resume_writing(self) -> None:
        if self.transport is not None and not self._closing:
            self.transport.resume_reading()
            self._reading_paused = False
            self._drained.set()
            if self._frame_started is not None:
                # While we did not read, a partial frame waited on us, not on the peer.
                self._frame_started = time.monotonic()
                self._arm_timer(self._frame_started + self.limits.frame_timeout_ms / 1000)

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        self._last_activity = time.monotonic()
        if self.frontend.metrics is not None:
            self.frontend.metrics.bytes_received.inc(len(data))
        decoder = self.decoder
        completed = False
        try:
            decoder.feed(data)
            while not self._closing:
                frame = decoder.next_frame()
                if frame is None:
                    break
                completed = True
                self._on_frame(frame)
        except ServerError as exc:
            # Broken framing: we can no longer find frame boundaries (protocol.md §1).
            self._send_fatal(0, 0, exc.code, exc.message)
            return
        if self._closing:
            return
        # Every whole frame was taken out above, so what is left is the start of one
        # frame: it must be whole within frame_timeout_ms of its first byte (§1.7).
        if not decoder.buffered_bytes:
            self._frame_started = None
        elif completed or self._frame_started is None:
            self._frame_started = self._last_activity
            self._arm_timer(self._last_activity + self.limits.frame_timeout_ms / 1000)

    def _arm_timer(self, due: float) -> None:
        """Make sure `_on_timer` runs by `due` (time.monotonic()); a later timer moves up."""
        if self._timer is not None:
            if self._timer_due <= due:
                return
            self._timer.cancel()
        self._timer_due = due
        self._timer = self._loop.call_later(max(0.0, due - time.monotonic()), self._on_timer)

    def _on_timer(self) -> None:
        """Check the deadlines of protocol.md §1.7, then sleep until the next one."""
        self._timer = None
        if self._closing:
            return
        limits = self.limits
        now = time.monotonic()
        if not self.hello_done:
            due = self._opened_at + limits.handshake_timeout_ms / 1000
            if now >= due:
                self._send_fatal(0, 0, ErrorCode.TIMEOUT, "no HELLO within handshake_timeout_ms")
                return
        else:
            idle_s = limits.idle_timeout_ms / 1000
            quiet_s = now - max(self._last_activity, self._last_busy)
            if not self.tasks and quiet_s >= idle_s:
                self._send_fatal(0, 0, ErrorCode.TIMEOUT, "connection idle for idle_timeout_ms")
                return
            due = now + max(1.0, idle_s - quiet_s)
        started = self._frame_started
        if started is not None and not self._reading_paused:
            frame_due = started + limits.frame_timeout_ms / 1000
            if now >= frame_due:
                # Late, but still arriving at frame_bytes_per_s_min on average (a large
                # frame on a slow link): look again in a second. A stalled one is cut.
                rate_min = limits.frame_bytes_per_s_min
                if not rate_min or self.decoder.buffered_bytes < rate_min * (now - started):
                    message = "a frame did not arrive whole within frame_timeout_ms"
                    self._send_fatal(0, 0, ErrorCode.TIMEOUT, message)
                    return
                frame_due = now + 1.0
            due = min(due, frame_due)
        self._arm_timer(due)

    # --- frames -------------------------------------------------------------------

    def _on_frame(self, frame: Frame) -> None:
        opcode, correlation_id = frame.opcode, frame.correlation_id
        if frame.flags & FLAG_RESPONSE:
            self._refuse(
                correlation_id,
                opcode,
                ErrorCode.MALFORMED_FRAME,
                "clients send requests, not responses",
                fatal=True,
            )
            return
        if frame.version != PROTOCOL_VERSION:
            self._refuse(
                correlation_id,
                opcode,
                ErrorCode.UNSUPPORTED_VERSION,
                f"protocol version {frame.version} is not supported; this server speaks {PROTOCOL_VERSION}",
                {"version_min": SUPPORTED_VERSIONS[0], "version_max": SUPPORTED_VERSIONS[1]},
            )
            return
        handler = self.handlers.get(opcode)
        if handler is None:
            self._refuse(
                correlation_id, opcode, ErrorCode.UNKNOWN_OPCODE, f"unknown opcode 0x{opcode:04x}"
            )
            return
        if not self.hello_done and opcode != Opcode.HELLO:
            self._refuse(correlation_id, opcode, ErrorCode.HELLO_REQUIRED, "send HELLO first")
            return
        try:
            request = codec.decode_request(frame)
        except ProtocolError as exc:
            self._refuse(correlation_id, opcode, exc.code, exc.message, fatal=True)
            return
        except ServerError as exc:
            self._refuse(correlation_id, opcode, exc.code, exc.message)
            return
        if len(self.tasks) >= self.limits.requests_in_flight_max:
            self._refuse(
                correlation_id,
                opcode,
                ErrorCode.TOO_MANY_REQUESTS,
                f"more than requests_in_flight_max={self.limits.requests_in_flight_max} requests in flight",
            )
            return
        if self.frontend.draining and opcode not in self.frontend.served_while_draining:
            # Refused before it ran: safe to send again, elsewhere (a frontend retries
            # a draining leader's refusal on the next one, §7.13).
            self._refuse(
                correlation_id,
                opcode,
                ErrorCode.UNAVAILABLE,
                "the server is shutting down",
                {"not_applied": True},
            )
            return
        self.frontend.requests_total += 1
        frame_bytes = PREFIX_BYTES + HEADER_BYTES + len(frame.body)
        task = self._loop.create_task(
            self._run(handler, request, opcode, correlation_id, frame_bytes, time.perf_counter())
        )
        self.track(task)

    @property
    def closing(self) -> bool:
        """The connection is closed or closing: answers written now go nowhere."""
        return self._closing

    def track(self, task: asyncio.Task[None]) -> None:
        """Count a request's (or subscription's) task as outstanding until it ends."""
        self.tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if not self.tasks:
            # Nothing outstanding from now: the idle clock starts here (§1.7).
            self._last_busy = time.monotonic()

    async def _run(
        self,
        handler: Handler,
        request: Any,
        opcode: int,
        correlation_id: int,
        request_bytes: int,
        received: float,
    ) -> None:
        trace = stages.begin(request_bytes)
        trace.add("queued", time.perf_counter() - received)
        outcome = "INTERNAL"
        try:
            outcome = await self._answer(handler, request, opcode, correlation_id)
        finally:
            self.frontend.observe_request(opcode, request, received, outcome, trace)

    async def _answer(
        self, handler: Handler, request: Any, opcode: int, correlation_id: int
    ) -> str:
        """Run one request and write its answer; the outcome: "ok" or the error code's name."""
        try:
            if opcode != Opcode.HELLO:
                await stages.timed("auth", self._authorize(opcode, request))
            response = await handler(self, request)
        except ServerError as exc:
            if exc.code.fatal or self._close_after_error:
                self._send_fatal(correlation_id, opcode, exc.code, exc.message, exc.details)
            else:
                self._send_error(correlation_id, opcode, exc.code, exc.message, exc.details)
            return exc.code.name
        except asyncio.CancelledError:
            self._send_error(
                correlation_id, opcode, ErrorCode.UNAVAILABLE, "the server is shutting down"
            )
            raise
        except Exception:
            log.exception("request.failed", op=Opcode(opcode).name, peer=self.peer)
            self._send_error(
                correlation_id, opcode, ErrorCode.INTERNAL, "internal error; see the server log"
            )
            return "INTERNAL"
        if self.answers_backed_up():  # (checked here: no coroutine per answer)
            await self.answer_room()
        encoding = time.perf_counter()
        frame = codec.encode_response(correlation_id, response)
        self._write(frame)
        delivered = getattr(response, "messages", None)
        stages.respond(
            len(frame), time.perf_counter() - encoding, len(delivered) if delivered else 0
        )
        return "ok"

    # --- output ---------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        if self._closing:
            return
        self._out.append(data)
        self._out_bytes += len(data)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._out and self.transport is not None and not self.transport.is_closing():
            out, self._out = self._out, []
            self._out_bytes = 0
            data = b"".join(out) if len(out) > 1 else out[0]
            self.transport.write(data)
            if self.frontend.metrics is not None:
                self.frontend.metrics.bytes_sent.inc(len(data))

    def unread_bytes(self) -> int:
        """What we wrote to this connection and the client has not read yet (as far as
        we can tell: what the transport still buffers, and what waits for `_flush`)."""
        transport = self.transport
        buffered = transport.get_write_buffer_size() if transport is not None else 0
        return self._out_bytes + buffered

    def answers_backed_up(self) -> bool:
        """Whether an answer must wait for the client to read (or behind one that does)."""
        return self._answer_turn.locked() or self.unread_bytes() > ANSWER_BUFFER_BYTES_MAX

    async def answer_room(self) -> None:
        """Wait, in turn, while the client leaves more than ANSWER_BUFFER_BYTES_MAX of our
        answers unread (protocol.md §1.7 backpressure). Free when it reads: one check.

        Woken by the transport's resume_writing, with a poll as well in case its
        marks sit above ours.
        """
        if not self.answers_backed_up():
            return
        async with self._answer_turn:
            while not self._closing and self.unread_bytes() > ANSWER_BUFFER_BYTES_MAX:
                if self._out:
                    await asyncio.sleep(0)  # our own `_flush` comes first
                    continue
                self._drained.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(ANSWER_ROOM_POLL_S):
                        await self._drained.wait()

    @contextlib.asynccontextmanager
    async def reading_bodies(self) -> AsyncIterator[None]:
        """A PEEK's turn to read message bodies: PEEKS_RUNNING_MAX at a time, each once
        the client has read what came before (its answer then waits in `_answer`)."""
        async with self._peeks:
            await self.answer_room()
            yield

    @contextlib.asynccontextmanager
    async def receiving(self) -> AsyncIterator[int]:
        """A RECEIVE's (or a subscription's batch's) run: yields the answer's byte cap,
        an equal share of RECEIVE_ANSWERS_BYTES_MAX among those running, at most a frame."""
        await self.answer_room()
        self._receives_running += 1
        try:
            share = RECEIVE_ANSWERS_BYTES_MAX // self._receives_running
            yield min(self.limits.frame_bytes_max - RESPONSE_HEADROOM_BYTES, share)
        finally:
            self._receives_running -= 1

    def _refuse(
        self,
        correlation_id: int,
        opcode: int,
        code: ErrorCode,
        message: str,
        details: dict | None = None,
        *,
        fatal: bool = False,
    ) -> None:
        """An error for a request refused before it ran, counted like those that ran."""
        self.frontend.count_refused(opcode, code)
        send = self._send_fatal if fatal else self._send_error
        send(correlation_id, opcode, code, message, details)

    def _send_error(
        self,
        correlation_id: int,
        opcode: int,
        code: ErrorCode,
        message: str,
        details: dict | None = None,
    ) -> None:
        self._write(codec.encode_error(correlation_id, opcode, int(code), message, details))

    def _send_fatal(
        self,
        correlation_id: int,
        opcode: int,
        code: ErrorCode,
        message: str,
        details: dict | None = None,
    ) -> None:
        log.info("connection.refused", peer=self.peer, code=ErrorCode(code).name, reason=message)
        self._send_error(correlation_id, opcode, code, message, details)
        self._flush()
        self.close()

    def close(self) -> None:
        if self._closing:
            return
        self._flush()
        self._closing = True
        self.frontend.connections.discard(self)
        self._uncount()
        self.end_subscriptions()
        if self.transport is not None:
            self.transport.close()

    # --- authentication and authorisation (protocol.md §8) ----------------------------------

    async def login(self, token: str) -> None:
        """HELLO's authentication: fix the session once, count it against its principal.
        HELLO again changes nothing (protocol.md §4.1); two at once share the first."""
        if self._login is None:
            self._login = self._loop.create_task(self._first_login(token))
        await asyncio.shield(self._login)

    async def _first_login(self, token: str) -> None:
        auth = self.frontend.auth
        session = await auth.authenticate(token, self.certificate_name)
        try:
            auth.connection_opened(session)
        except ServerError:
            self._close_after_error = True
            raise
        self.session = session
        self._counted = True
        if self._closing:  # the peer left while we checked
            self._uncount()

    def _uncount(self) -> None:
        if self._counted and self.session is not None:
            self._counted = False
            self.frontend.auth.connection_closed(self.session)

    async def _authorize(self, opcode: int, request: Any) -> None:
        """The op table's permission check, on the name alone, before any lookup."""
        auth = self.frontend.auth
        session = self.session
        assert session is not None, "HELLO completed without a session"
        if session.anonymous:
            return
        await auth.state()
        if not auth.still_valid(session):
            raise Unauthenticated("the token was rotated or its principal removed")
        rule = PERMISSIONS[opcode]
        if rule is None:
            return
        permission, field_name = rule
        queue = getattr(request, field_name) if field_name else "*"
        if permission == VISIBLE:
            auth.require_visible(session, queue)
        else:
            auth.require(session, permission, queue)

    def require(self, permission: str, queue: str, *, or_: tuple[str, ...] = ()) -> None:
        assert self.session is not None
        self.frontend.auth.require(self.session, permission, queue, or_=or_)

    # --- helpers for handlers -------------------------------------------------------------

    async def queue(self, name: str) -> QueueRecord:
        return await self.frontend.router.lookup(name)

    def check_batch(self, count: int, what: str) -> None:
        if count == 0:
            raise InvalidArgument(f"{what}: the batch is empty")
        if count > self.limits.batch_messages_max:
            raise BatchTooLarge(
                f"{what}: {count} entries; at most batch_messages_max={self.limits.batch_messages_max}"
            )

    # --- push subscriptions (protocol.md §4.18) ---------------------------------------------

    def end_subscriptions(self, code: ErrorCode | None = None, message: str = "") -> None:
        """End every subscription: with an end frame saying why, or silently (closing)."""
        for subscription in list(self.subscriptions.values()):
            subscription.end(code, message)


class Subscription:
    """One push subscription (protocol.md §4.18): while it holds credits, a task
    receives for its subscriber, exactly as a long-poll RECEIVE would (so through
    `Router`, on a single node and through a cluster frontend alike), and pushes
    each batch as one DELIVER frame. It parks at 0 credits until a GRANT.

    The task counts among the connection's `tasks`, like a long poll: it keeps
    the connection from idling out and takes one of requests_in_flight_max.
    """

    def __init__(self, conn: ClientConnection, request: messages.SubscribeRequest) -> None:
        self.conn = conn
        self.request = request
        self.subscription_id = request.subscription_id
        self.credits = request.credits
        self.pushed_total = 0
        self._granted = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._ended = False

    def start(self) -> None:
        conn = self.conn
        conn.subscriptions[self.subscription_id] = self
        task = conn._loop.create_task(
            self._run(), name=f"mqd-subscription {self.request.queue} {self.subscription_id}"
        )
        self._task = task
        conn.track(task)

    def grant(self, credits: int) -> int:
        limit = self.conn.limits.subscription_credits_max
        if self.credits + credits > limit:
            raise InvalidArgument(
                f"GRANT: {self.credits} credits + {credits} exceeds "
                f"subscription_credits_max={limit}"
            )
        self.credits += credits
        if self.credits:
            self._granted.set()
        return self.credits

    async def stop(self) -> None:
        """UNSUBSCRIBE: no push for it is written after this returns."""
        self.end(None, "")
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)

    def end(self, code: ErrorCode | None, message: str, details: dict | None = None) -> None:
        """Forget the subscription, stop its task, and tell the client if `code` is given."""
        if self._ended:
            return
        self._ended = True
        conn = self.conn
        if conn.subscriptions.get(self.subscription_id) is self:
            del conn.subscriptions[self.subscription_id]
        if code is not None:
            conn._write(encode_push_end(self.subscription_id, code, message, details))
        task = self._task
        if task is not None and task is not asyncio.current_task():
            # On a single node a receive cancelled mid-way gives its messages back;
            # through a cluster frontend they may wait out their lease instead.
            task.cancel()
            self._granted.set()  # (and `_run` looks at `_ended` whatever the cancel did)

    async def _run(self) -> None:
        conn = self.conn
        frontend = conn.frontend
        limits = conn.limits
        request = self.request
        loop = conn._loop
        try:
            while not self._ended:
                if frontend.draining:
                    raise Unavailable("the server is shutting down")
                if self.credits <= 0:
                    self._granted.clear()
                    await self._granted.wait()
                    continue
                # Each batch is authorized like a RECEIVE: a revoked grant or a rotated
                # token ends the subscription (FORBIDDEN, UNAUTHENTICATED).
                await conn._authorize(Opcode.SUBSCRIBE, request)
                record = await conn.queue(request.queue)
                visibility = _subscription_visibility_ms(limits, record, request)
                assert conn.session is not None
                try:
                    frontend.auth.admit(conn.session, 1, 1, take=False)
                except Throttled as exc:
                    # Over quota (protocol.md §8.3): wait as long as a client would be told to.
                    await asyncio.sleep(exc.details.get("retry_after_ms", 100) / 1000)
                    continue
                started = loop.time()
                async with conn.receiving() as bytes_max:
                    delivered = await frontend.router.receive(
                        record,
                        min(self.credits, limits.batch_messages_max),
                        limits.receive_wait_ms_max,
                        visibility,
                        bytes_max,
                    )
                if not delivered:
                    if loop.time() - started < PUSH_EMPTY_FAST_S:
                        await asyncio.sleep(PUSH_EMPTY_FAST_S)
                    continue
                if self._ended:
                    # Ended while this receive answered (a cancel that did not land):
                    # nothing is pushed after UNSUBSCRIBE, so give them back at once.
                    with contextlib.suppress(MqdError):
                        await frontend.router.change_visibility(
                            record, [(m.receipt, 0) for m in delivered]
                        )
                    return
                assert len(delivered) <= self.credits
                _charge_delivered(conn, delivered)
                self.credits -= len(delivered)
                self.pushed_total += len(delivered)
                conn._write(encode_push(self.subscription_id, messages.DeliverPush(delivered)))
        except ServerError as exc:
            self.end(exc.code, exc.message, exc.details)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("subscription.failed", queue=request.queue, peer=conn.peer)
            self.end(ErrorCode.INTERNAL, "internal error; see the server log")


def _subscription_visibility_ms(
    limits: Limits, record: QueueRecord, request: messages.SubscribeRequest
) -> int:
    milliseconds = visibility_ms(limits, record, request.visibility_timeout_ms)
    if milliseconds == 0:
        # A lease of 0 leaves pushed messages ready: they would be pushed again at once.
        raise InvalidArgument("a subscription needs a visibility timeout above 0")
    return milliseconds


# --- handlers (one per opcode) -----------------------------------------------------


async def handle_hello(
    conn: ClientConnection, request: messages.HelloRequest
) -> messages.HelloResponse:
    if not request.version_min <= PROTOCOL_VERSION <= request.version_max:
        raise ServerError(
            f"client speaks versions {request.version_min}-{request.version_max}; server speaks {PROTOCOL_VERSION}",
            code=ErrorCode.UNSUPPORTED_VERSION,
            details={"version_min": SUPPORTED_VERSIONS[0], "version_max": SUPPORTED_VERSIONS[1]},
        )
    await conn.login(request.token)
    conn.hello_done = True
    frontend = conn.frontend
    return messages.HelloResponse(
        version=PROTOCOL_VERSION,
        server_version=__version__,
        node_id=frontend.node_id,
        roles=list(frontend.roles),
        limits=frontend.limits.as_wire(),
    )


async def handle_ping(
    conn: ClientConnection, request: messages.PingRequest
) -> messages.PingResponse:
    return messages.PingResponse(
        payload=request.payload, server_time_ms=conn.frontend.clock.now_ms()
    )


async def handle_create_queue(
    conn: ClientConnection, request: messages.CreateQueueRequest
) -> messages.CreateQueueResponse:
    router = conn.frontend.router
    auth = conn.frontend.auth
    session = conn.session
    assert session is not None
    _require_dead_letter_send(conn, request.attributes)
    # The catalog checks the quota, creates and records the creator grant (`admin`,
    # protocol.md §8.2) as one step, for every frontend at once (§8.3).
    owner, owned_max = auth.queue_owner(session)
    record = await router.catalog.create_queue(
        request.name, request.attributes, request.exist_ok, owner=owner, owned_max=owned_max
    )
    if owner:
        await auth.state(force=True)  # the creator grant counts at once
    return messages.CreateQueueResponse(queue=await router.queue_info(record))


def _require_dead_letter_send(conn: ClientConnection, attributes: dict[str, Any]) -> None:
    """Naming a dead-letter queue sends messages to it: that needs `send` (or `admin`) there."""
    policy = attributes.get("redrive_policy")
    if isinstance(policy, dict):
        target = policy.get("dead_letter_queue")
        if isinstance(target, str) and target:
            conn.require("send", target, or_=("admin",))


async def handle_delete_queue(
    conn: ClientConnection, request: messages.DeleteQueueRequest
) -> messages.DeleteQueueResponse:
    await conn.queue(request.name)
    await conn.frontend.router.catalog.delete_queue(request.name)
    # The queue's grants went with it (its creator's quota too): see that at once.
    await conn.frontend.auth.state(force=True)
    return messages.DeleteQueueResponse()


async def handle_get_queue(
    conn: ClientConnection, request: messages.GetQueueRequest
) -> messages.GetQueueResponse:
    record = await conn.queue(request.name)
    return messages.GetQueueResponse(queue=await conn.frontend.router.queue_info(record))


async def handle_list_queues(
    conn: ClientConnection, request: messages.ListQueuesRequest
) -> messages.ListQueuesResponse:
    names = await conn.frontend.router.catalog.list_queues(request.prefix)
    assert conn.session is not None
    # Only the queues the principal holds a permission on (protocol.md §8.2).
    return messages.ListQueuesResponse(names=conn.frontend.auth.visible(conn.session, names))


async def handle_set_queue_attributes(
    conn: ClientConnection, request: messages.SetQueueAttributesRequest
) -> messages.SetQueueAttributesResponse:
    _require_dead_letter_send(conn, request.attributes)
    await conn.queue(request.name)
    router = conn.frontend.router
    record = await router.catalog.set_attributes(request.name, request.attributes)
    return messages.SetQueueAttributesResponse(queue=await router.queue_info(record))


async def handle_purge_queue(
    conn: ClientConnection, request: messages.PurgeQueueRequest
) -> messages.PurgeQueueResponse:
    record = await conn.queue(request.name)
    return messages.PurgeQueueResponse(purged=await conn.frontend.router.purge(record))


def validate_send(limits: Limits, record: QueueRecord, entries: list[messages.SendEntry]) -> None:
    """SEND is all or nothing: every entry is checked before anything is stored (protocol.md §4.9)."""
    if not entries:
        raise InvalidArgument("SEND: the batch is empty")
    if len(entries) > limits.batch_messages_max:
        raise BatchTooLarge(
            f"SEND: {len(entries)} entries; at most batch_messages_max={limits.batch_messages_max}"
        )
    check_send_entries(
        entries,
        message_bytes_max=record.max_message_bytes,
        size_limit="the queue's max_message_bytes is {}",
        attributes_max=limits.attributes_max,
        delay_ms_max=limits.delay_ms_max,
        retention_ms=record.retention_ms,
        fifo=record.attributes.get("fifo", False),
    )


async def handle_send(
    conn: ClientConnection, request: messages.SendRequest
) -> messages.SendResponse:
    record = await conn.queue(request.queue)
    validate_send(conn.limits, record, request.entries)
    assert conn.session is not None
    auth = conn.frontend.auth
    if auth.metered(conn.session):
        auth.admit(
            conn.session, len(request.entries), sum(_entry_bytes(e) for e in request.entries)
        )
    return messages.SendResponse(
        message_ids=await conn.frontend.router.send(record, request.entries)
    )


def _entry_bytes(entry: messages.SendEntry | messages.DeliveredMessage) -> int:
    """A message's size as protocol.md §4.9 defines it (and `validate_send` checks it):
    the body plus the UTF-8 lengths of its attribute names and values."""
    return len(entry.body) + sum(utf8_len(k) + utf8_len(v) for k, v in entry.attributes.items())


def _charge_delivered(conn: ClientConnection, delivered: list[messages.DeliveredMessage]) -> None:
    assert conn.session is not None
    auth = conn.frontend.auth
    if auth.metered(conn.session):
        auth.charge(conn.session, len(delivered), sum(_entry_bytes(m) for m in delivered))


def visibility_ms(limits: Limits, record: QueueRecord, requested_ms: int) -> int:
    if requested_ms == VISIBILITY_DEFAULT:
        return record.visibility_timeout_ms
    if requested_ms > limits.visibility_timeout_ms_max:
        raise InvalidArgument(
            f"visibility timeout {requested_ms} ms exceeds visibility_timeout_ms_max={limits.visibility_timeout_ms_max}"
        )
    return requested_ms


def validate_receive(limits: Limits, request: messages.ReceiveRequest) -> None:
    if not 1 <= request.max_messages <= limits.batch_messages_max:
        raise InvalidArgument(
            f"max_messages must be 1-{limits.batch_messages_max}, got {request.max_messages}"
        )
    if request.wait_ms > limits.receive_wait_ms_max:
        raise InvalidArgument(
            f"wait_ms {request.wait_ms} exceeds receive_wait_ms_max={limits.receive_wait_ms_max}"
        )


async def handle_receive(
    conn: ClientConnection, request: messages.ReceiveRequest
) -> messages.ReceiveResponse:
    record = await conn.queue(request.queue)
    limits = conn.limits
    validate_receive(limits, request)
    assert conn.session is not None
    # What a RECEIVE takes is known only afterwards: go if the buckets are not in debt,
    # then charge what was delivered (protocol.md §8.3).
    conn.frontend.auth.admit(conn.session, 1, 1, take=False)
    async with conn.receiving() as bytes_max:
        delivered = await conn.frontend.router.receive(
            record,
            request.max_messages,
            request.wait_ms,
            visibility_ms(limits, record, request.visibility_timeout_ms),
            bytes_max,
        )
    if delivered and conn.closing:
        # The client left during the long poll: nobody gets this answer. Give the
        # messages back now rather than leave them leased for the visibility timeout.
        await conn.frontend.router.change_visibility(record, [(m.receipt, 0) for m in delivered])
        return messages.ReceiveResponse(messages=[])
    _charge_delivered(conn, delivered)
    return messages.ReceiveResponse(messages=delivered)


async def handle_delete(
    conn: ClientConnection, request: messages.DeleteRequest
) -> messages.DeleteResponse:
    record = await conn.queue(request.queue)
    conn.check_batch(len(request.receipts), "DELETE")
    failures = await conn.frontend.router.delete(record, request.receipts)
    conn.frontend.count_entry_failures("DELETE", failures)
    return messages.DeleteResponse(failures=failures)


async def handle_change_visibility(
    conn: ClientConnection, request: messages.ChangeVisibilityRequest
) -> messages.ChangeVisibilityResponse:
    record = await conn.queue(request.queue)
    conn.check_batch(len(request.changes), "CHANGE_VISIBILITY")
    changes = [
        (change.receipt, visibility_ms(conn.limits, record, change.timeout_ms))
        for change in request.changes
    ]
    failures = await conn.frontend.router.change_visibility(record, changes)
    conn.frontend.count_entry_failures("CHANGE_VISIBILITY", failures)
    return messages.ChangeVisibilityResponse(failures=failures)


async def handle_peek(
    conn: ClientConnection, request: messages.PeekRequest
) -> messages.PeekResponse:
    record = await conn.queue(request.queue)
    if not 1 <= request.max_messages <= conn.limits.batch_messages_max:
        raise InvalidArgument(f"max_messages must be 1-{conn.limits.batch_messages_max}")
    assert conn.session is not None
    conn.frontend.auth.admit(conn.session, 1, 1, take=False)
    async with conn.reading_bodies():
        # One frame's worth at most, as a RECEIVE (without a cap, peek(1000) of 1 MiB
        # messages built a 1 GB answer).
        delivered = await conn.frontend.router.peek(
            record,
            request.max_messages,
            request.after_id,
            conn.limits.frame_bytes_max - RESPONSE_HEADROOM_BYTES,
        )
    _charge_delivered(conn, delivered)
    return messages.PeekResponse(messages=delivered)


async def handle_redrive(
    conn: ClientConnection, request: messages.RedriveRequest
) -> messages.RedriveResponse:
    record = await conn.queue(request.queue)
    if request.to == request.queue:
        raise InvalidArgument("redrive: `to` must be another queue")
    if request.to:
        conn.require("send", request.to, or_=("admin",))
        target = await conn.queue(request.to)
        if bool(target.attributes.get("fifo")) != bool(record.attributes.get("fifo")):
            raise InvalidArgument(
                f"redrive: {request.to!r} and {request.queue!r} must both be FIFO or both standard"
            )
    moved, problems = await conn.frontend.router.redrive(
        record, request.to, request.max_messages, request.rate_per_s
    )
    return messages.RedriveResponse(moved=moved, problems=problems)


async def handle_subscribe(
    conn: ClientConnection, request: messages.SubscribeRequest
) -> messages.SubscribeResponse:
    record = await conn.queue(request.queue)
    limits = conn.limits
    if request.subscription_id == 0:
        raise InvalidArgument("subscription_id must be 1 or more")
    if request.subscription_id in conn.subscriptions:
        raise InvalidArgument(
            f"subscription {request.subscription_id} is already open on this connection"
        )
    if len(conn.subscriptions) >= limits.subscriptions_per_connection_max:
        raise TooManyRequests(
            f"more than subscriptions_per_connection_max={limits.subscriptions_per_connection_max} "
            "subscriptions on this connection"
        )
    if request.credits > limits.subscription_credits_max:
        raise InvalidArgument(
            f"credits {request.credits} exceeds subscription_credits_max={limits.subscription_credits_max}"
        )
    visibility = _subscription_visibility_ms(limits, record, request)
    if conn.frontend.draining:
        raise Unavailable("the server is shutting down")
    # The task's first step runs after this answer is queued, so the answer comes first.
    Subscription(conn, request).start()
    return messages.SubscribeResponse(visibility_timeout_ms=visibility)


async def handle_grant(
    conn: ClientConnection, request: messages.GrantRequest
) -> messages.GrantResponse:
    subscription = conn.subscriptions.get(request.subscription_id)
    if subscription is None:
        raise InvalidArgument(
            f"no subscription {request.subscription_id} on this connection (it may have ended)"
        )
    return messages.GrantResponse(credits=subscription.grant(request.credits))


async def handle_unsubscribe(
    conn: ClientConnection, request: messages.UnsubscribeRequest
) -> messages.UnsubscribeResponse:
    subscription = conn.subscriptions.get(request.subscription_id)
    if subscription is not None:
        await subscription.stop()
    return messages.UnsubscribeResponse()


async def handle_rebalance(
    conn: ClientConnection, request: messages.RebalanceRequest
) -> messages.RebalanceResponse:
    return await conn.frontend.router.catalog.rebalance(request.dry_run)


async def handle_decommission(
    conn: ClientConnection, request: messages.DecommissionRequest
) -> messages.DecommissionResponse:
    return await conn.frontend.router.catalog.decommission(request.node_id)


async def handle_stats(
    conn: ClientConnection, request: messages.StatsRequest
) -> messages.StatsResponse:
    stats = await conn.frontend.stats()
    # A cluster frontend adds the other nodes' own figures (protocol.md §4.15).
    nodes = await conn.frontend.router.catalog.node_stats(conn.frontend.node_id)
    if nodes is not None:
        stats["nodes"] = nodes
    return messages.StatsResponse(stats=stats)


HANDLERS: dict[int, Handler] = {
    Opcode.HELLO: handle_hello,
    Opcode.PING: handle_ping,
    Opcode.CREATE_QUEUE: handle_create_queue,
    Opcode.DELETE_QUEUE: handle_delete_queue,
    Opcode.GET_QUEUE: handle_get_queue,
    Opcode.LIST_QUEUES: handle_list_queues,
    Opcode.SET_QUEUE_ATTRIBUTES: handle_set_queue_attributes,
    Opcode.PURGE_QUEUE: handle_purge_queue,
    Opcode.SEND: handle_send,
    Opcode.RECEIVE: handle_receive,
    Opcode.DELETE: handle_delete,
    Opcode.CHANGE_VISIBILITY: handle_change_visibility,
    Opcode.PEEK: handle_peek,
    Opcode.REDRIVE: handle_redrive,
    Opcode.SUBSCRIBE: handle_subscribe,
    Opcode.GRANT: handle_grant,
    Opcode.UNSUBSCRIBE: handle_unsubscribe,
    Opcode.REBALANCE: handle_rebalance,
    Opcode.DECOMMISSION: handle_decommission,
    Opcode.STATS: handle_stats,
}
assert set(HANDLERS) == {op for op in messages.OPS if op < messages.INTERNAL_OPCODE_MIN}, (
    "every client op in the table has a handler"
)

# The permission each op needs (protocol.md §8.2): (permission, the request field naming
# the queue); field "" = every queue (`*`), VISIBLE = any one of the three; None = no
# check (LIST_QUEUES filters its answer instead). Checked in `_authorize`, before the
# handler looks anything up, so a forbidden queue and a missing one answer alike.
VISIBLE = "visible"
PERMISSIONS: dict[int, tuple[str, str] | None] = {
    Opcode.HELLO: None,
    Opcode.PING: None,
    Opcode.CREATE_QUEUE: ("admin", "name"),
    Opcode.DELETE_QUEUE: ("admin", "name"),
    Opcode.GET_QUEUE: (VISIBLE, "name"),
    Opcode.LIST_QUEUES: None,
    Opcode.SET_QUEUE_ATTRIBUTES: ("admin", "name"),
    Opcode.PURGE_QUEUE: ("admin", "name"),
    Opcode.SEND: ("send", "queue"),
    Opcode.RECEIVE: ("receive", "queue"),
    Opcode.DELETE: ("receive", "queue"),
    Opcode.CHANGE_VISIBILITY: ("receive", "queue"),
    Opcode.PEEK: ("receive", "queue"),
    Opcode.REDRIVE: ("admin", "queue"),
    Opcode.SUBSCRIBE: ("receive", "queue"),
    # A subscription belongs to its connection; SUBSCRIBE checked (and each batch
    # re-checks) the permission.
    Opcode.GRANT: None,
    Opcode.UNSUBSCRIBE: None,
    Opcode.STATS: ("admin", ""),
    Opcode.REBALANCE: ("admin", ""),
    Opcode.DECOMMISSION: ("admin", ""),
}
assert set(PERMISSIONS) == set(HANDLERS), "every op has a row in the permission table"


def _certificate_name(transport: asyncio.BaseTransport) -> str | None:
    """The subject common name of a verified client certificate: the principal (§8.1)."""
    certificate = transport.get_extra_info("peercert")
    if not certificate:
        return None
    for rdn in certificate.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                try:
                    return validate_principal_name(value)
                except ServerError:
                    return None
    return None


__all__ = ["HANDLERS", "ClientConnection", "FrontendRole", "Unavailable"]
