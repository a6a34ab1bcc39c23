"""Consuming a queue: a message stream and a managed consumer with leases.

Two ways to consume, on top of a push subscription (`Subscription`,
SUBSCRIBE with credits, protocol.md §4.18) and `ack` / CHANGE_VISIBILITY
(§4.11-§4.12); against a server without SUBSCRIBE (UNKNOWN_OPCODE) both
long-poll RECEIVE (§4.10) instead:

- `MessageStream` (`Queue.consume`): `async for message in stream`; the
  caller acks. Messages fetched but not yet yielded are released
  (CHANGE_VISIBILITY 0) when the stream ends.
- `Consumer` (`Queue.consumer`, `Queue.run_consumer`): runs an async handler
  per message with bounded concurrency and does the bookkeeping: it extends
  the leases of the messages it holds (heartbeat), acks when the handler
  returns, releases with a backoff delay when it raises, and stops gracefully.

One owner per mutable thing (STYLE.md): in a Consumer, one fetcher task
receives (or holds the subscription and grants credits as handlers finish),
`concurrency` worker tasks run the handler, and one settler task
sends every DELETE and CHANGE_VISIBILITY. The settler batches: one round
sends at most one DELETE (the acks gathered within `ack_window` s) and one
CHANGE_VISIBILITY (releases and lease extensions together, each with its own
timeout), and the next round starts only when both have answered. Since a
message is in exactly one of "to ack", "to release" or "held" at a time,
a lease extension can never overtake the release of the same message (the
server does not order concurrent requests, §1.5).

Not measured: the throughput of either path against a remote server.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import math
import random
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mqd.errors import (
    ClientClosed,
    ClientError,
    ConnectionClosed,
    ErrorCode,
    InternalError,
    InvalidArgument,
    MqdError,
    NotLeader,
    RequestTimeout,
    StorageFull,
    Throttled,
    TooManyRequests,
    Unavailable,
    UnknownOpcode,
)
from mqd.log import library_logger

from .batching import seconds_to_ms
from .message import Message
from .subscription import Subscription, credits_max

if TYPE_CHECKING:
    from .client import Queue

# client.close() gives a consumer's running handlers at most this long to finish.
CLOSE_DRAIN_S = 2.0
# The consumer whose handler runs in this task, if any: client.close() called from a
# handler must not wait for that handler to finish.
_handling: contextvars.ContextVar[Consumer | None] = contextvars.ContextVar(
    "mqd_consumer_handling", default=None
)

# Through `logging`: the application decides what is shown, and where (mqd.log).
log = library_logger("mqd.client.consumer")

Handler = Callable[[Message], Awaitable[Any]]

# Errors after which a consumer backs off and tries again: the connection or
# the server is (for now) unable, but nothing is wrong with the request. Any
# other MqdError (QUEUE_NOT_FOUND, FORBIDDEN, ...) ends a Consumer and is
# raised from a MessageStream.
TRANSIENT_ERRORS: tuple[type[MqdError], ...] = (
    ConnectionClosed,
    RequestTimeout,
    Throttled,
    Unavailable,
    NotLeader,
    TooManyRequests,
    StorageFull,
    InternalError,
)
# The first retry after a transient error waits about this long; each
# further one doubles it, up to the `reconnect_delay_max` option.
RECONNECT_DELAY_MIN_S = 0.05
# While stopping, acks and releases are retried until drain_timeout after the stop
# began, and at least until this long after the handlers ended; then given up, a
# DELETE in flight included (so stop() takes at most about drain_timeout + this).
SETTLE_AT_STOP_MIN_S = 5.0
# A stream's lease keeper retries reading the queue's visibility timeout this often.
KEEPER_RETRY_S = 1.0
# How long `MessageStream.aclose` waits for a cancelled next() to unwind (5 s in all).
ACLOSE_WAIT_TURN_S = 0.01
ACLOSE_WAIT_TURNS = 500
# The longest retry delay: the default visibility_timeout_ms_max (protocol.md §5.1).
RETRY_DELAY_MAX_S = 43200.0
# An empty RECEIVE answered sooner than this (wait 0, or a server that cuts
# long polls short) is followed by a pause of EMPTY_POLL_PAUSE_S, so that an
# idle consumer never spins against the server.
EMPTY_POLL_FAST_S = 0.05
EMPTY_POLL_PAUSE_S = 0.1
# A RECEIVE asks for at most this many messages if the server named no
# batch_messages_max (protocol.md §5.1).
_BATCH_MESSAGES_DEFAULT = 100
# 2**this bounds the retry-delay doubling (far beyond any retry_delay_max).
_RETRY_EXPONENT_MAX = 40
# A stopping Consumer gives its UNSUBSCRIBE this long to be answered, so that the
# messages pushed meanwhile are released rather than left to their lease.
UNSUBSCRIBE_AT_STOP_S = 5.0


def _grant_due(window: int, outstanding: int, held: int) -> int:
    """Credits to grant now: top the window up once half of it (at least 1) is free."""
    need = window - outstanding - held
    return need if need >= max(1, window // 2) else 0


class Backoff:
    """Exponential backoff with jitter, bounded: waits in [d/2, d], d = min(max, base * 2**n)."""

    def __init__(self, base_s: float, max_s: float, rng: random.Random | None = None) -> None:
        assert 0 < base_s <= max_s
        self._base_s = base_s
        self._max_s = max_s
        self._rng = rng or random.Random()
        self._attempt = 0

    def next_delay(self) -> float:
        delay = min(self._max_s, self._base_s * 2 ** min(self._attempt, _RETRY_EXPONENT_MAX))
        self._attempt += 1
        return delay / 2 + self._rng.random() * delay / 2

    def reset(self) -> None:
        self._attempt = 0

    async def pause(self, event: str, queue_name: str, exc: BaseException) -> None:
        """Log why the loop backs off (`event`) and wait the next delay. A closed
        client is not a passing trouble: that ends the loop (ClientClosed)."""
        if isinstance(exc, ClientClosed):
            raise exc
        delay = self.next_delay()
        log.warning(event, queue=queue_name, error=str(exc), retry_in_s=round(delay, 3))
        await asyncio.sleep(delay)


def _check_positive_int(value: Any, what: str, minimum: int = 1) -> int:
    if type(value) is not int or value < minimum:
        raise InvalidArgument(f"{what} must be an int >= {minimum}, got {value!r}")
    return value


def _check_seconds(value: Any, what: str, *, positive: bool = False) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value < 0
    ):
        raise InvalidArgument(
            f"{what} must be a finite non-negative number of seconds, got {value!r}"
        )
    if positive and value == 0:
        raise InvalidArgument(f"{what} must be positive, got {value!r}")
    return float(value)


async def _release(queue: Queue, messages: list[Message]) -> None:
    """Make messages ready again at once (CHANGE_VISIBILITY 0); failures are only logged."""
    await queue._release_receipts([m.receipt for m in messages])


# --- the stream ----------------------------------------------------------------------


class MessageStream:
    """`async for message in queue.consume(prefetch, wait)`: messages one by one.

    Also an async context manager, whose exit (like `aclose()`) releases the
    messages fetched but not yet yielded before it returns.
    """

    def __init__(
        self,
        queue: Queue,
        *,
        prefetch: int = 10,
        wait: float = 20.0,
        visibility_timeout: float | None = None,
        reconnect_delay_max: float = 5.0,
    ) -> None:
        self._queue = queue
        self._prefetch = _check_positive_int(prefetch, "prefetch")
        self._wait_s = _check_seconds(wait, "wait")
        if visibility_timeout is not None:
            seconds_to_ms(visibility_timeout, "visibility_timeout")
        self._visibility_timeout = visibility_timeout
        self._reconnect_delay_max_s = max(
            RECONNECT_DELAY_MIN_S, _check_seconds(reconnect_delay_max, "reconnect_delay_max")
        )
        # The fetched messages not yet yielded; released when the stream ends.
        self._buffer: deque[Message] = deque()
        # The generator must not refer to `self`: with no reference cycle, a
        # stream left behind by `break` is freed (and closed) at once.
        self._messages = _stream_messages(
            queue,
            self._buffer,
            self._prefetch,
            self._wait_s,
            self._visibility_timeout,
            self._reconnect_delay_max_s,
        )

    def __aiter__(self) -> MessageStream:
        return self

    async def __anext__(self) -> Message:
        return await self._messages.__anext__()

    async def aclose(self) -> None:
        """End the stream and release the messages it fetched but did not yield."""
        messages = self._messages
        # A next message asked for by another task that was then cancelled (a sync
        # client's caller interrupted by Ctrl-C) may still be unwinding the stream, which
        # closes its subscription as it goes: let it finish rather than fail with
        # "asynchronous generator is already running".
        waited = 0
        while messages.ag_running and waited < ACLOSE_WAIT_TURNS:
            await asyncio.sleep(ACLOSE_WAIT_TURN_S)
            waited += 1
        await messages.aclose()

    async def __aenter__(self) -> MessageStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    @property
    def buffered(self) -> int:
        """Messages fetched and not yet yielded."""
        return len(self._buffer)

    def __repr__(self) -> str:
        return f"<mqd.client.MessageStream {self._queue.name!r} buffered={len(self._buffer)}>"


async def _stream_messages(
    queue: Queue,
    buffer: deque[Message],
    prefetch: int,
    wait_s: float,
    visibility_timeout: float | None,
    reconnect_delay_max_s: float,
) -> AsyncIterator[Message]:
    """The body of a MessageStream.

    An async generator, so that a stream left behind by `break` or a
    cancellation is still closed, and its buffer released, by the event
    loop's finalizer hook.
    """
    backoff = Backoff(RECONNECT_DELAY_MIN_S, reconnect_delay_max_s)
    loop = asyncio.get_running_loop()
    client = queue.client
    subscription: Subscription | None = None
    window = prefetch
    # When each buffered message's lease was last set (by receipt), and the
    # subscription whose pushes are not taken yet: the keeper extends their leases.
    leased_at: dict[str, float] = {}
    current: list[Subscription] = []
    keeper = loop.create_task(
        _keep_buffered_leases(queue, buffer, leased_at, current, visibility_timeout),
        context=contextvars.Context(),
    )

    # The give-back, done once: at the stream's end, or first by client.close()
    # (whether the stream waits in a RECEIVE or was left behind by `break`), which
    # then waits for it before the connection goes.
    giving_back: list[asyncio.Future[None]] = []

    def give_back() -> Awaitable[None]:
        if not giving_back:
            giving_back.append(asyncio.ensure_future(_give_back(queue, buffer, current)))
        return asyncio.shield(giving_back[0])

    client._streams.add(give_back)
    try:
        while True:
            if client._closing:
                raise ClientClosed("the client is closed")
            if subscription is not None:
                # What was pushed and not taken yet counts as held: granting past it
                # fetched more than the window, leases ran out in the buffer, and the
                # messages came round again (a stream that acked 3 of 8 in 14 s).
                held = len(buffer) + subscription.buffered
                grant = _grant_due(window, subscription.outstanding, held)
                if grant:
                    subscription.grant(grant)
            if buffer:
                message = buffer.popleft()
                leased_at.pop(message.receipt, None)
                yield message
                continue
            if subscription is not None and subscription.ended:
                subscription = None
            # Push, unless the server has none, or this client's connection holds all the
            # subscriptions it may (then poll, and look again next time round).
            if not client._push_unsupported and (
                subscription is not None or client._subscription_room()
            ):
                if subscription is None:
                    current.clear()
                    window = min(prefetch, credits_max(queue))
                    try:
                        subscription = await Subscription.open(queue, window, visibility_timeout)
                        current.append(subscription)
                    except UnknownOpcode:
                        client._push_unsupported = True
                        continue
                    except TRANSIENT_ERRORS as exc:
                        await backoff.pause("consumer.subscribe_failed", queue.name, exc)
                        continue
                try:
                    _buffer_leased(buffer, leased_at, await subscription.next_batch(), loop.time())
                except TRANSIENT_ERRORS as exc:
                    await backoff.pause("consumer.subscription_ended", queue.name, exc)
                    continue
                backoff.reset()
                continue
            started = loop.time()
            try:
                messages = await queue.receive(prefetch, wait_s, visibility_timeout)
            except TRANSIENT_ERRORS as exc:
                await backoff.pause("consumer.receive_failed", queue.name, exc)
                continue
            backoff.reset()
            if not messages and loop.time() - started < EMPTY_POLL_FAST_S:
                await asyncio.sleep(EMPTY_POLL_PAUSE_S)
            _buffer_leased(buffer, leased_at, messages, started)
    finally:
        keeper.cancel()
        await asyncio.gather(keeper, return_exceptions=True)
        try:
            await give_back()
        finally:
            client._streams.discard(give_back)


async def _give_back(queue: Queue, buffer: deque[Message], current: list[Subscription]) -> None:
    """A stream's end: UNSUBSCRIBE, then release what was pushed or fetched and not yielded."""
    left = [*await current[0].close()] if current else []
    left += buffer
    buffer.clear()
    await _release(queue, left)


def _buffer_leased(
    buffer: deque[Message], leased_at: dict[str, float], messages: list[Message], when: float
) -> None:
    """Buffer messages leased at `when` (loop time)."""
    for message in messages:
        leased_at[message.receipt] = when
    buffer.extend(messages)


async def _keep_buffered_leases(
    queue: Queue,
    buffer: deque[Message],
    leased_at: dict[str, float],
    current: list[Subscription],
    visibility_timeout: float | None,
) -> None:
    """Extend the leases of the messages a stream fetched and has not yielded yet
    (pushed ones still in its subscription are taken into the buffer first), every
    third of the visibility timeout, in one CHANGE_VISIBILITY; a message whose lease
    was lost leaves the buffer (it comes again). Once yielded, a message's lease is
    its caller's. Runs while the stream does; the caller may hold a message as long as
    it likes between two `next()`s, which is when the stream itself does not run."""
    loop = asyncio.get_running_loop()
    lease_s = visibility_timeout
    while lease_s is None:
        try:
            lease_s = float((await queue.attributes()).get("visibility_timeout", 0))
        except TRANSIENT_ERRORS:
            await asyncio.sleep(KEEPER_RETRY_S)
        except MqdError:
            return  # the stream meets the same error and says so
    if lease_s <= 0:
        return
    interval = lease_s / 3
    extend_ms = max(1, round(lease_s * 1000))
    while True:
        await asyncio.sleep(interval / 2)
        if current and current[0].buffered:
            _buffer_leased(buffer, leased_at, current[0].take(), loop.time())
        now = loop.time()
        due = [m for m in buffer if now - leased_at.get(m.receipt, now) >= interval]
        if not due:
            continue
        try:
            failures = await queue._change_visibility(
                [m.receipt for m in due], [extend_ms] * len(due)
            )
        except MqdError:
            continue  # the next round tries again, while the leases last
        failed = {index for index, _code, _text in failures}
        for index, message in enumerate(due):
            if index not in failed:
                if message.receipt in leased_at:
                    leased_at[message.receipt] = now
            elif message in buffer:
                buffer.remove(message)
                leased_at.pop(message.receipt, None)


# --- the managed consumer --------------------------------------------------------------

_BUFFERED = "buffered"  # received, waiting for a worker
_RUNNING = "running"  # its handler runs
_SETTLING = "settling"  # handed to the settler to ack or release


class _Lease:
    """A message this consumer holds, and when its lease was last set."""

    __slots__ = ("batch", "extended_at", "lost", "message", "state")

    def __init__(self, message: Message, extended_at: float, batch: int = 0) -> None:
        self.message = message
        self.extended_at = extended_at
        self.state = _BUFFERED
        self.lost = False
        self.batch = batch  # the consumer's count of batches received, at this one


@dataclass(slots=True)
class ConsumerStats:
    """Counters of one Consumer; read them any time."""

    received: int = 0  # messages received
    handled: int = 0  # handler returned
    failed: int = 0  # handler raised
    acked: int = 0  # DELETE confirmed
    ack_failed: int = 0  # DELETE refused (the lease was lost) or given up
    released: int = 0  # released (after a failure, or unstarted at stop), confirmed
    extended: int = 0  # lease extensions confirmed
    leases_lost: int = 0  # an extension was refused: someone else may get the message


class Consumer:
    """Runs `await handler(message)` for the messages of a queue, with leases kept.

    Options (seconds unless said otherwise):

    - `concurrency`: handlers running at once.
    - `prefetch`: messages received ahead of free workers (default: `concurrency`).
    - `wait`: long-poll time of each RECEIVE (at most the server's 20 s).
    - `visibility_timeout`: the lease of each message (default: the queue's,
      read once at start); must be positive.
    - `heartbeat`: extend the leases of held messages (received, not yet
      acked or released) by `visibility_timeout` every `heartbeat_interval`
      (default `visibility_timeout` / 3), all in one CHANGE_VISIBILITY.
    - `retry_delay`, `retry_delay_max`: a message whose handler raised is
      released with delay min(retry_delay * 2**(receive_count-1), retry_delay_max).
    - `ack_window`: acks gathered this long go in one DELETE.
    - `drain_timeout`: how long `stop()` lets running handlers finish before
      cancelling them (their messages are then released). Acks and releases
      are retried until then too, and at least 5 s after the handlers end:
      with the server out of reach, `stop()` returns within about
      `drain_timeout` + 5 s, and the messages whose acks were given up are
      delivered again when their lease ends (`stats.ack_failed`).
    - `reconnect_delay_max`: the longest backoff after a connection error.
    - `rng`: a random.Random for the backoff jitter (tests seed it).

    `await start()` (or `async with`) starts it; `await stop()` stops it
    gracefully: start no more handlers and fetch no more, let running
    handlers finish (up to `drain_timeout`) and settle their messages, then
    release the prefetched messages that no handler started. A long poll
    still waiting at that point is cut short; should the server hand it a
    message later, the client releases that too (one delivery later).
    Cancelling the task that awaits `run_consumer` does the same.
    `await wait()` returns when it has stopped and raises the error that
    stopped it, if any (one it cannot retry, e.g. QueueNotFound).
    """

    def __init__(
        self,
        queue: Queue,
        handler: Handler,
        *,
        concurrency: int = 8,
        prefetch: int | None = None,
        wait: float = 20.0,
        visibility_timeout: float | None = None,
        heartbeat: bool = True,
        heartbeat_interval: float | None = None,
        retry_delay: float = 1.0,
        retry_delay_max: float = 300.0,
        ack_window: float = 0.005,
        drain_timeout: float = 30.0,
        reconnect_delay_max: float = 5.0,
        rng: random.Random | None = None,
    ) -> None:
        if not callable(handler):
            raise InvalidArgument(f"handler must be an async callable, got {handler!r}")
        self._warned_plain_handler = False
        self.queue = queue
        self._handler = handler
        self.concurrency = _check_positive_int(concurrency, "concurrency")
        self.prefetch = (
            self.concurrency if prefetch is None else _check_positive_int(prefetch, "prefetch", 0)
        )
        self._wait_s = _check_seconds(wait, "wait")
        self.visibility_timeout: float | None = None
        if visibility_timeout is not None:
            seconds_to_ms(visibility_timeout, "visibility_timeout")
            self.visibility_timeout = _check_seconds(
                visibility_timeout, "visibility_timeout", positive=True
            )
        self._heartbeat = bool(heartbeat)
        self._heartbeat_interval_s = (
            None
            if heartbeat_interval is None
            else _check_seconds(heartbeat_interval, "heartbeat_interval", positive=True)
        )
        self._retry_delay_s = _check_seconds(retry_delay, "retry_delay")
        self._retry_delay_max_s = _check_seconds(retry_delay_max, "retry_delay_max")
        if self._retry_delay_max_s > RETRY_DELAY_MAX_S:
            # A longer delay would make the server refuse the whole batch of
            # CHANGE_VISIBILITY it travels in (visibility_timeout_ms_max, §5.1).
            raise InvalidArgument(
                f"retry_delay_max must be at most {RETRY_DELAY_MAX_S:g} s, got {retry_delay_max!r}"
            )
        self._ack_window_s = _check_seconds(ack_window, "ack_window")
        self._drain_timeout_s = _check_seconds(drain_timeout, "drain_timeout")
        self._reconnect_delay_max_s = max(
            RECONNECT_DELAY_MIN_S, _check_seconds(reconnect_delay_max, "reconnect_delay_max")
        )
        self._rng = rng or random.Random()
        self.stats = ConsumerStats()

        self._started = False
        self._stopping = False
        self._error: BaseException | None = None
        self._run_task: asyncio.Task[None] | None = None
        self._stop_requested: asyncio.Event | None = None
        # Received messages: leases not yet handed to the settler, by receipt.
        self._held: dict[str, _Lease] = {}
        self._buffer: asyncio.Queue[_Lease | None] | None = None
        self._running = 0
        self._room: asyncio.Event | None = None  # set when the fetcher may have room
        # The settler's inbox.
        self._acks: list[_Lease] = []
        self._releases: list[tuple[_Lease, int]] = []
        self._settle_wakeup: asyncio.Event | None = None
        self._settler_closing = False
        self._settle_until = 0.0  # loop time: stopping, the settler gives up then
        self._round_cut: asyncio.Timeout | None = None  # the settle round under way
        self._unstarted: list[_Lease] = []  # taken from the buffer after stop()
        self._settling_now = 0  # messages in the DELETE / CHANGE_VISIBILITY under way
        # FIFO queues: a group's messages are handled one at a time, in order, by the
        # worker that took the first (its chain holds the ones that came meanwhile);
        # after a failure in a group, its messages from batches received until then
        # are released, to come again after the failed one (protocol.md §4.0).
        self._fifo = queue.name.endswith(".fifo")
        self._batches_taken = 0
        self._group_chains: dict[str, deque[_Lease]] = {}
        self._group_failed_upto: dict[str, int] = {}
        self._subscribed = False  # the fetcher holds a subscription (protocol.md §4.18)

    # --- life cycle ------------------------------------------------------------------

    async def start(self) -> Consumer:
        """Start fetching and handling; returns at once (after reading the queue's lease)."""
        if self._started:
            raise ClientError("this Consumer was already started")
        self._started = True
        if self.visibility_timeout is None:
            attributes = await self.queue.attributes()
            seconds = float(attributes.get("visibility_timeout", 0))
            if seconds <= 0:
                raise InvalidArgument(
                    f"queue {self.queue.name!r} has visibility_timeout {seconds:g}: "
                    "give the Consumer a positive visibility_timeout"
                )
            self.visibility_timeout = seconds
        if self._heartbeat_interval_s is None:
            self._heartbeat_interval_s = self.visibility_timeout / 3
        self._buffer = asyncio.Queue()
        self._room = asyncio.Event()
        self._room.set()
        self._settle_wakeup = asyncio.Event()
        self._stop_requested = asyncio.Event()
        self._run_task = asyncio.get_running_loop().create_task(
            self._run(), name=f"mqd-consumer {self.queue.name}"
        )
        self.queue.client._consumers.add(self)
        self._run_task.add_done_callback(lambda _: self.queue.client._consumers.discard(self))
        log.debug(
            "consumer.started",
            queue=self.queue.name,
            concurrency=self.concurrency,
            prefetch=self.prefetch,
            visibility_timeout_s=self.visibility_timeout,
        )
        return self

    async def stop(self, drain_timeout: float | None = None) -> None:
        """Stop gracefully and wait until done (see the class); idempotent.

        Does not raise the error that may have stopped the consumer earlier
        (`wait()` does). Cancelling `stop()` itself cancels the running
        handlers at once.
        """
        if self._run_task is None:
            return
        if drain_timeout is not None:
            self._drain_timeout_s = _check_seconds(drain_timeout, "drain_timeout")
        self._request_stop()
        try:
            await asyncio.shield(self._run_task)
        except asyncio.CancelledError:
            if not self._run_task.done():
                self._run_task.cancel()
            raise

    async def _stop_for_close(self) -> None:
        """client.close() stops this consumer first, with a short drain: what its
        handlers finish is acked, the rest released; then wait() raises ClientClosed.
        Called from one of its own handlers, it only asks the consumer to stop."""
        if self._error is None:
            self._error = ClientClosed("the client is closed")
        if _handling.get() is self:
            self._drain_timeout_s = min(self._drain_timeout_s, CLOSE_DRAIN_S)
            self._request_stop()
            return
        await self.stop(drain_timeout=min(self._drain_timeout_s, CLOSE_DRAIN_S))

    async def wait(self) -> None:
        """Wait until the consumer has stopped; raise the error that stopped it, if any."""
        if self._run_task is None:
            raise ClientError("this Consumer was not started")
        try:
            await asyncio.shield(self._run_task)
        except asyncio.CancelledError:
            caller = asyncio.current_task()
            if self._run_task.cancelled() and not (caller and caller.cancelling()):
                # Stopped hard (client.close() past its bound): say why, not CancelledError.
                raise self._error or ClientClosed("the consumer was cancelled") from None
            raise
        if self._error is not None:
            raise self._error

    async def __aenter__(self) -> Consumer:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    @property
    def running(self) -> bool:
        """Started and not yet stopped."""
        return self._run_task is not None and not self._run_task.done()

    @property
    def in_flight(self) -> int:
        """Messages held: received and not yet settled (acked or released)."""
        return len(self._held) + len(self._acks) + len(self._releases) + self._settling_now

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped" if self._started else "new"
        return (
            f"<mqd.client.Consumer {self.queue.name!r} {state} "
            f"concurrency={self.concurrency} in_flight={self.in_flight}>"
        )

    def _request_stop(self) -> None:
        self._stopping = True
        if self._stop_requested is not None:
            self._stop_requested.set()
        if self._room is not None:
            self._room.set()

    def _fail(self, exc: BaseException) -> None:
        """Stop because of an error that retrying will not cure; wait() raises it."""
        if self._error is None:
            self._error = exc
        log.error("consumer.failed", queue=self.queue.name, error=str(exc), exc_info=exc)
        self._request_stop()

    # --- the supervisor ----------------------------------------------------------------

    async def _run(self) -> None:
        assert self._stop_requested is not None and self._buffer is not None
        loop = asyncio.get_running_loop()
        fetcher = loop.create_task(self._guard(self._fetch_loop()))
        settler = loop.create_task(self._guard(self._settle_loop()))
        workers = [loop.create_task(self._work_loop()) for _ in range(self.concurrency)]
        tasks = [fetcher, settler, *workers]
        try:
            await self._stop_requested.wait()
            stop_began = loop.time()
            # 1. Start no more handlers (a worker that finishes now exits), and
            # fetch no more: the fetcher ends after the RECEIVE it is in, if any.
            buffer = self._buffer
            for _ in workers:
                buffer.put_nowait(None)
            # 2. Let running handlers finish, for a while.
            _, late = await asyncio.wait(workers, timeout=self._drain_timeout_s)
            if late:
                log.warning(
                    "consumer.drain_timeout",
                    queue=self.queue.name,
                    handlers=len(late),
                    drain_timeout_s=self._drain_timeout_s,
                )
                for task in late:
                    task.cancel()
                await asyncio.wait(late)
            handlers_ended = loop.time()
            # 3. A long poll still waiting is cut short now. The server goes on
            # waiting: if it is sent a message after all, the client releases
            # it (Queue._release_abandoned), one delivery later. That is why
            # the fetcher had until now to finish: a prefetched message
            # released while the poll waits would be taken by it.
            # A subscription's fetcher ends by itself (UNSUBSCRIBE, then it hands
            # over what was pushed meanwhile): give it a moment first.
            if not fetcher.done() and self._subscribed:
                await asyncio.wait([fetcher], timeout=UNSUBSCRIBE_AT_STOP_S)
            fetcher.cancel()
            await asyncio.gather(fetcher, return_exceptions=True)
            # 4. Release what no handler started.
            unstarted, self._unstarted = self._unstarted, []
            while not buffer.empty():
                lease = buffer.get_nowait()
                if lease is not None:
                    unstarted.append(lease)
            for lease in unstarted:
                self._settle(lease, release_ms=0)
            # 5. Settle everything, then stop the settler.
            self._settle_until = max(
                stop_began + self._drain_timeout_s, handlers_ended + SETTLE_AT_STOP_MIN_S
            )
            self._settler_closing = True
            cut = self._round_cut
            if cut is not None and cut.when() is None:
                # A DELETE under way in an outage would hold the stop for its whole
                # request timeout (30 s, then a probe): bounded like the retries.
                cut.reschedule(self._settle_until)
            assert self._settle_wakeup is not None
            self._settle_wakeup.set()
            await asyncio.gather(settler, return_exceptions=True)
            log.debug("consumer.stopped", queue=self.queue.name, **_stats_fields(self.stats))
        finally:
            # Only after a hard cancel is anything left running here.
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _guard(self, coro: Awaitable[None]) -> None:
        """Run a loop of ours; a bug in it stops the consumer instead of vanishing."""
        try:
            await coro
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self._fail(exc)

    # --- fetching ----------------------------------------------------------------------

    def _room_to_fetch(self) -> int:
        """How many messages to ask for now (0: wait for a worker to take some)."""
        assert self._buffer is not None
        buffered = self._buffer.qsize()
        if buffered > self.prefetch // 2:
            return 0
        return self.concurrency + self.prefetch - buffered - self._running

    def _window(self) -> int:
        """Messages the consumer may hold unstarted or running: its subscription's credits."""
        return min(self.concurrency + self.prefetch, credits_max(self.queue))

    def _take_in(self, messages: list[Message]) -> None:
        """Hold received messages (leases kept from now) and queue them for the workers."""
        assert self._buffer is not None and self._settle_wakeup is not None
        now = asyncio.get_running_loop().time()
        self.stats.received += len(messages)
        if self._group_failed_upto and self._buffer.empty() and not self._group_chains:
            self._group_failed_upto.clear()  # no message of an older batch is left
        self._batches_taken += 1
        batch = self._batches_taken
        for message in messages:
            lease = _Lease(message, now, batch)
            self._held[message.receipt] = lease
            self._buffer.put_nowait(lease)
        self._settle_wakeup.set()  # so the settler plans the next heartbeat

    async def _push_fetch_loop(self) -> bool:
        """Fetch by subscription, granting credits as handlers finish; False: not supported."""
        assert self._buffer is not None and self._room is not None
        queue = self.queue
        room = self._room
        buffer = self._buffer
        backoff = Backoff(RECONNECT_DELAY_MIN_S, self._reconnect_delay_max_s, self._rng)
        subscription: Subscription | None = None
        try:
            while not self._stopping:
                if subscription is None:
                    if not queue.client._subscription_room():
                        # Its connection holds all the subscriptions it may: poll instead.
                        log.info("consumer.polling", queue=queue.name,
                                 reason="subscriptions_per_connection_max")  # fmt: skip
                        return False
                    window = self._window()
                    try:
                        subscription = await Subscription.open(
                            queue, window, self.visibility_timeout, on_event=room.set
                        )
                    except UnknownOpcode:
                        queue.client._push_unsupported = True
                        return False
                    except TRANSIENT_ERRORS as exc:
                        await backoff.pause("consumer.subscribe_failed", queue.name, exc)
                        continue
                    except MqdError as exc:
                        self._fail(exc)
                        return True
                    self._subscribed = True
                room.clear()
                try:
                    messages = subscription.take()
                except TRANSIENT_ERRORS as exc:
                    subscription = None
                    await backoff.pause("consumer.subscription_ended", queue.name, exc)
                    continue
                except MqdError as exc:
                    subscription = None
                    self._fail(exc)
                    return True
                if messages:
                    backoff.reset()
                    self._take_in(messages)
                grant = _grant_due(window, subscription.outstanding, buffer.qsize() + self._running)
                if grant:
                    subscription.grant(grant)
                if not messages:
                    await room.wait()
        finally:
            if subscription is not None:
                # Pushed before the UNSUBSCRIBE answer and never started: released at stop.
                left = await subscription.close()
                if left:
                    now = asyncio.get_running_loop().time()
                    self.stats.received += len(left)
                    for message in left:
                        lease = _Lease(message, now)
                        self._held[message.receipt] = lease
                        self._unstarted.append(lease)
        return True

    async def _fetch_loop(self) -> None:
        assert self._buffer is not None and self._room is not None
        if not self.queue.client._push_unsupported and await self._push_fetch_loop():
            return
        queue = self.queue
        loop = asyncio.get_running_loop()
        backoff = Backoff(RECONNECT_DELAY_MIN_S, self._reconnect_delay_max_s, self._rng)
        visibility_timeout = self.visibility_timeout
        while not self._stopping:
            room = self._room_to_fetch()
            if room <= 0:
                self._room.clear()
                await self._room.wait()
                continue
            batch_max = queue.client.server_limits.get("batch_messages_max")
            if type(batch_max) is not int or batch_max < 1:
                batch_max = _BATCH_MESSAGES_DEFAULT
            started = loop.time()
            try:
                messages = await queue.receive(
                    min(room, batch_max), self._wait_s, visibility_timeout
                )
            except TRANSIENT_ERRORS as exc:
                await backoff.pause("consumer.receive_failed", queue.name, exc)
                continue
            except MqdError as exc:
                self._fail(exc)
                return
            backoff.reset()
            if not messages:
                if loop.time() - started < EMPTY_POLL_FAST_S:
                    await asyncio.sleep(EMPTY_POLL_PAUSE_S)
                continue
            self._take_in(messages)

    # --- handling ----------------------------------------------------------------------

    async def _work_loop(self) -> None:
        assert self._buffer is not None and self._room is not None
        buffer = self._buffer
        while True:
            lease = await buffer.get()
            if lease is None:
                return
            if self._stopping:
                self._unstarted.append(lease)  # released once the fetcher is done
                return
            group = lease.message.group_id if self._fifo else ""
            if group and self._joins_group(lease, group):
                continue
            self._running += 1
            self._room.set()
            try:
                if group:
                    await self._handle_group(lease, group)
                else:
                    await self._handle(lease)
            finally:
                self._running -= 1
                self._room.set()

    def _joins_group(self, lease: _Lease, group: str) -> bool:
        """FIFO: a message whose group another worker handles waits its turn in that
        worker's chain; one received before its group's handler failed is released
        (it comes again after the failed one). True: taken care of here."""
        if lease.batch <= self._group_failed_upto.get(group, 0):
            self._settle(lease, release_ms=0)
            return True
        chain = self._group_chains.get(group)
        if chain is None:
            return False
        chain.append(lease)
        self._running += 1  # held for a worker: counted as running, not as fetchable room
        return True

    async def _handle_group(self, first: _Lease, group: str) -> None:
        """Handle a FIFO group's messages one at a time, in the order received; after a
        failure, release the rest so that they come again after the failed one."""
        chain: deque[_Lease] = deque()
        self._group_chains[group] = chain
        try:
            ok = await self._handle(first)
            if not ok:
                self._group_failed_upto[group] = self._batches_taken
            while chain:
                lease = chain.popleft()
                self._running -= 1
                if self._stopping:
                    self._unstarted.append(lease)
                elif not ok:
                    self._settle(lease, release_ms=0)  # no await: no batch comes meanwhile
                else:
                    ok = await self._handle(lease)
                    if not ok:
                        self._group_failed_upto[group] = self._batches_taken
        finally:
            del self._group_chains[group]
            while chain:  # cancelled at stop: released with what no handler started
                self._running -= 1
                self._unstarted.append(chain.popleft())

    async def _handle(self, lease: _Lease) -> bool:
        """Run the handler on one message; False if it failed (retried later)."""
        message = lease.message
        lease.state = _RUNNING
        handling = _handling.set(self)
        try:
            result = self._handler(message)
            if inspect.isawaitable(result):
                await result
            elif not self._warned_plain_handler:
                # A plain function ran (on the loop, blocking it) and returned: it is
                # done with the message. Awaiting its None raised TypeError, and every
                # message was retried for ever, to its dead-letter queue.
                self._warned_plain_handler = True
                log.warning(
                    "consumer.plain_handler",
                    queue=self.queue.name,
                    hint="the handler is not async: it blocks the event loop while it "
                    "runs; make it async, or use mqd.client.sync, which runs it in a thread",
                )
        except asyncio.CancelledError:
            worker = asyncio.current_task()
            if worker is None or worker.cancelling():
                # The drain timeout ran out (or a hard stop): give it back now.
                self._settle(lease, release_ms=0)
                raise
            # Raised by the handler itself (it awaited something that was cancelled),
            # not a stop: a failure like any other, and the worker goes on.
            self._handler_failed(lease)
            return False
        except Exception:
            self._handler_failed(lease)
            return False
        finally:
            _handling.reset(handling)
        self.stats.handled += 1
        self._settle(lease, ack=True)
        return True

    def _handler_failed(self, lease: _Lease) -> None:
        """Log the handler's exception (being handled) and retry the message later."""
        message = lease.message
        self.stats.failed += 1
        delay_s = self._retry_delay_for(message.receive_count)
        log.exception(
            "consumer.handler_failed",
            queue=self.queue.name,
            message_id=message.id,
            receive_count=message.receive_count,
            retry_in_s=delay_s,
        )
        self._settle(lease, release_ms=round(delay_s * 1000))

    def _retry_delay_for(self, receive_count: int) -> float:
        exponent = min(max(receive_count - 1, 0), _RETRY_EXPONENT_MAX)
        return min(self._retry_delay_s * 2**exponent, self._retry_delay_max_s)

    # --- settling: acks, releases, lease extensions -----------------------------------

    def _settle(self, lease: _Lease, *, ack: bool = False, release_ms: int = 0) -> None:
        """Hand a message to the settler to ack or release; it is no longer extended."""
        assert lease.state != _SETTLING
        lease.state = _SETTLING
        self._held.pop(lease.message.receipt, None)
        if ack:
            self._acks.append(lease)
        else:
            self._releases.append((lease, release_ms))
        assert self._settle_wakeup is not None
        self._settle_wakeup.set()

    def _extensions_due(self, now: float) -> tuple[list[_Lease], float | None]:
        """The leases to extend now, and when the next one falls due (None: none held)."""
        if not self._heartbeat or not self._held:
            return [], None
        interval = self._heartbeat_interval_s
        assert interval is not None
        due = []
        next_at = None
        for lease in self._held.values():
            if lease.lost:
                continue
            at = lease.extended_at + interval
            if at <= now:
                due.append(lease)
            elif next_at is None or at < next_at:
                next_at = at
        return due, next_at

    async def _settle_loop(self) -> None:
        wakeup = self._settle_wakeup
        assert wakeup is not None
        loop = asyncio.get_running_loop()
        backoff = Backoff(RECONNECT_DELAY_MIN_S, self._reconnect_delay_max_s, self._rng)
        while True:
            now = loop.time()
            due, next_at = self._extensions_due(now)
            if not self._acks and not self._releases and not due:
                if self._settler_closing:
                    return
                wakeup.clear()
                try:
                    async with asyncio.timeout_at(next_at):
                        await wakeup.wait()
                except TimeoutError:
                    pass
                continue
            if self._acks and self._ack_window_s and not self._settler_closing:
                # Let more acks arrive to share the DELETE.
                await asyncio.sleep(self._ack_window_s)
                due, _ = self._extensions_due(loop.time())
            try:
                async with asyncio.timeout_at(
                    self._settle_until if self._settler_closing else None
                ) as cut:
                    self._round_cut = cut
                    settled = await self._settle_round(due)
            except TimeoutError:
                settled = False
            finally:
                self._round_cut = None
            if settled:
                backoff.reset()
            elif self._settler_closing and loop.time() >= self._settle_until:
                # Stopping, and the server stays out of reach: the leases run
                # out by themselves and the messages are delivered again.
                log.warning(
                    "consumer.settle_abandoned",
                    queue=self.queue.name,
                    acks=len(self._acks),
                    releases=len(self._releases),
                )
                self.stats.ack_failed += len(self._acks)
                self._acks, self._releases = [], []
                return
            else:
                await asyncio.sleep(backoff.next_delay())

    async def _settle_round(self, due: list[_Lease]) -> bool:
        """One DELETE and one CHANGE_VISIBILITY, at once; False after a transient error."""
        acks, self._acks = self._acks, []
        releases, self._releases = self._releases, []
        self._settling_now = len(acks) + len(releases)
        try:
            results = await asyncio.gather(
                self._send_acks(acks), self._send_changes(releases, due), return_exceptions=True
            )
        finally:
            self._settling_now = 0
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return all(results)

    async def _send_acks(self, acks: list[_Lease]) -> bool:
        if not acks:
            return True
        queue = self.queue
        try:
            failures = await queue._delete([lease.message.receipt for lease in acks])
        except asyncio.CancelledError:
            self._acks[:0] = acks  # cut short while stopping: not confirmed
            raise
        except ClientClosed:
            self.stats.ack_failed += len(acks)  # no retry can get through any more
            return True
        except TRANSIENT_ERRORS as exc:
            # DELETE is safe to retry (protocol.md §1.5): try them all again.
            log.warning("consumer.ack_retry", queue=queue.name, acks=len(acks), error=str(exc))
            self._acks[:0] = acks
            return False
        except MqdError as exc:
            self.stats.ack_failed += len(acks)
            log.error("consumer.ack_failed", queue=queue.name, acks=len(acks), error=str(exc))
            return True
        self.stats.acked += len(acks) - len(failures)
        for index, code, text in failures:
            self.stats.ack_failed += 1
            log.warning(
                "consumer.ack_refused",
                queue=queue.name,
                message_id=acks[index].message.id,
                code=_code_name(code),
                error=text,
            )
        return True

    async def _send_changes(self, releases: list[tuple[_Lease, int]], due: list[_Lease]) -> bool:
        if not releases and not due:
            return True
        queue = self.queue
        assert self.visibility_timeout is not None
        extend_ms = round(self.visibility_timeout * 1000)
        leases = [lease for lease, _ in releases] + due
        receipts = [lease.message.receipt for lease in leases]
        timeouts_ms = [ms for _, ms in releases] + [extend_ms] * len(due)
        sent_at = asyncio.get_running_loop().time()
        try:
            failures = await queue._change_visibility(receipts, timeouts_ms)
        except asyncio.CancelledError:
            self._releases[:0] = releases
            raise
        except ClientClosed:
            return True  # no retry can get through any more: the leases run out
        except TRANSIENT_ERRORS as exc:
            # Safe to retry as well; the extensions are recomputed next round.
            log.warning(
                "consumer.change_visibility_retry",
                queue=queue.name,
                releases=len(releases),
                extensions=len(due),
                error=str(exc),
            )
            self._releases[:0] = releases
            return False
        except MqdError as exc:
            log.error(
                "consumer.change_visibility_failed",
                queue=queue.name,
                releases=len(releases),
                extensions=len(due),
                error=str(exc),
            )
            for lease in due:
                lease.lost = True
            return True
        failed = {index: (code, text) for index, code, text in failures}
        for index, lease in enumerate(leases):
            if index < len(releases):
                if index not in failed:
                    self.stats.released += 1
                continue
            if index in failed:
                if lease.state == _SETTLING:
                    continue  # acked or released meanwhile: its receipt no longer matters
                lease.lost = True
                self.stats.leases_lost += 1
                code, text = failed[index]
                log.warning(
                    "consumer.lease_lost",
                    queue=queue.name,
                    message_id=lease.message.id,
                    code=_code_name(code),
                    error=text,
                )
            else:
                lease.extended_at = sent_at
                self.stats.extended += 1
        return True


def _code_name(code: int) -> str:
    try:
        return ErrorCode(code).name
    except ValueError:
        return f"ERROR_{code}"


def _stats_fields(stats: ConsumerStats) -> dict[str, int]:
    return {name: getattr(stats, name) for name in ConsumerStats.__slots__}
