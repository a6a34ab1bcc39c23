"""Push consumption: one SUBSCRIBE on one connection, with credits (protocol.md §4.18).

The server pushes messages (DELIVER frames) while the subscription holds
credits; the client grants more (GRANT) as it makes room. `Subscription`
keeps the client's side of that bargain:

- `outstanding` counts the credits granted and not yet used up by a push, as
  far as the client has seen. It is never below the server's own count (a
  push or a GRANT in transit only makes the server's smaller), so a client
  that keeps `outstanding` + what it holds within its window never holds more.
- GRANT goes out in the background (`grant` does not wait): the answer
  matters only if it is an error, and a subscription that ended says why in
  its end frame anyway.
- `close()` sends UNSUBSCRIBE and returns what was pushed and not yet taken,
  for the caller to release. The server pushes nothing after its answer.
- While open, a subscription holds one of the connection's in-flight slots,
  as the server counts it as an outstanding request.

A subscription lives and dies with its connection: when the connection is
lost, the next `take` / `next_batch` raises ConnectionClosed, and the caller
subscribes again (on a new connection).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from mqd.errors import (
    ClientClosed,
    ConnectionClosed,
    MqdError,
    RequestTimeout,
    ServerError,
    Throttled,
    TooManyRequests,
    Unavailable,
)
from mqd.log import library_logger
from mqd.protocol.messages import (
    VISIBILITY_DEFAULT,
    DeliverPush,
    ErrorBody,
    GrantRequest,
    SubscribeRequest,
    UnsubscribeRequest,
)

from .batching import seconds_to_ms
from .message import Message, messages_from_delivered

# How long closing a stream or subscription waits to give back what it holds
# (UNSUBSCRIBE, then CHANGE_VISIBILITY 0): past it, the messages wait out their lease.
RELEASE_TIMEOUT_S = 5.0

if TYPE_CHECKING:
    from .client import Queue
    from .connection import Connection

# Through `logging`: the application decides what is shown, and where (mqd.log).
log = library_logger("mqd.client.subscription")

# Assumed when the server's HELLO names no subscription_credits_max (protocol.md §5.1).
CREDITS_MAX_DEFAULT = 1000
# A GRANT refused for now is sent again after this long, doubling up to the max.
GRANT_RETRY_MIN_S = 0.05
GRANT_RETRY_MAX_S = 2.0
# What a GRANT may meet and still be worth sending again (the subscription runs).
GRANT_RETRY_ERRORS: tuple[type[MqdError], ...] = (
    TooManyRequests,
    Throttled,
    RequestTimeout,
    Unavailable,
)


class Subscription:
    """A push subscription to one queue; build it with `await queue.subscribe(credits)`.

    `await next_batch()` returns the next pushed messages (waiting for them),
    `take()` whatever has arrived (maybe nothing), `grant(n)` allows `n` more,
    `await close()` ends it. Every message is in flight for `visibility_timeout`
    seconds from its push; ack or release it like a received one.
    """

    def __init__(self, queue: Queue, *, on_event: Callable[[], None] | None = None) -> None:
        self.queue = queue
        self.subscription_id = 0
        self.visibility_timeout: float | None = None
        self.outstanding = 0
        self.pushed_total = 0
        self._conn: Connection | None = None
        self._batches: deque[list[Message]] = deque()
        self._end: BaseException | None = None
        self._closed = False
        self._wakeup = asyncio.Event()
        self._on_event = on_event
        self._grants: set[asyncio.Task[None]] = set()
        self._holds_slot = False  # the SUBSCRIBE's in-flight slot, until the server ends it

    @classmethod
    async def open(
        cls,
        queue: Queue,
        credits: int,
        visibility_timeout: float | None = None,
        *,
        on_event: Callable[[], None] | None = None,
    ) -> Subscription:
        """SUBSCRIBE; `on_event()` is called whenever messages or the end arrive.

        Raises the server's error (UnknownOpcode from a server without
        subscriptions, QueueNotFound, ...) or ConnectionClosed.
        """
        if visibility_timeout is None:
            visibility_ms = VISIBILITY_DEFAULT
        else:
            visibility_ms = seconds_to_ms(visibility_timeout, "visibility_timeout")
        self = cls(queue, on_event=on_event)
        conn = await queue.client._connection()
        self._conn = conn
        self.subscription_id = conn.add_push_listener(self._on_push)
        self.outstanding = credits
        request = SubscribeRequest(self.subscription_id, queue.name, credits, visibility_ms)
        try:
            response = await conn.request(request, on_abandoned=self._abandoned, keep_slot=True)
        except asyncio.CancelledError:
            # Sent, and maybe opened: `_abandoned` closes it if the answer says so.
            raise
        except BaseException:
            conn.remove_push_listener(self.subscription_id)
            raise
        self._holds_slot = True
        if self._end is not None:  # ended (or the connection lost) before the answer
            self._release_slot()
        self.visibility_timeout = response.visibility_timeout_ms / 1000
        return self

    def _release_slot(self) -> None:
        if self._holds_slot:
            self._holds_slot = False
            assert self._conn is not None
            self._conn.release_slot()

    def _abandoned(self, response: Any) -> None:
        """SUBSCRIBE succeeded after its caller gave up: end it, release what came."""
        self.queue.client._spawn(self._close_and_release())

    async def _close_and_release(self) -> None:
        await self.queue._release_receipts([m.receipt for m in await self.close()])

    # --- pushes ------------------------------------------------------------------------

    def _on_push(self, body: Any) -> None:
        if type(body) is DeliverPush:
            messages = messages_from_delivered(body.messages, self.queue.name)
            self.outstanding = max(0, self.outstanding - len(messages))
            self.pushed_total += len(messages)
            self._batches.append(messages)
        elif isinstance(body, ErrorBody):
            self._end = ServerError.from_code(body.code, body.message, body.details)
            self._release_slot()
        else:  # ConnectionClosed: the connection is gone
            assert isinstance(body, BaseException)
            self._end = body
            self._release_slot()
        self._wakeup.set()
        if self._on_event is not None:
            self._on_event()

    @property
    def ended(self) -> bool:
        """The server ended it (see `take`), the connection was lost, or it was closed."""
        return self._end is not None or self._closed

    @property
    def buffered(self) -> int:
        """Messages pushed and not yet taken."""
        return sum(map(len, self._batches))

    def take(self) -> list[Message]:
        """Every message pushed and not yet taken (maybe none).

        Once they are all taken, raises why the subscription ended: the
        server's error (its end frame), or ConnectionClosed.
        """
        if self._batches:
            batches, self._batches = self._batches, deque()
            self._wakeup.clear()
            return batches[0] if len(batches) == 1 else [m for b in batches for m in b]
        if self._end is not None:
            raise self._end
        if self._closed:
            raise ConnectionClosed("the subscription is closed")
        self._wakeup.clear()
        return []

    async def next_batch(self) -> list[Message]:
        """The next pushed messages, waiting for them; raises as `take` does."""
        while True:
            messages = self.take()
            if messages:
                return messages
            await self._wakeup.wait()

    def grant(self, credits: int) -> None:
        """Allow the server `credits` more pushes (GRANT, sent in the background)."""
        if credits <= 0 or self.ended:
            return
        self.outstanding += credits
        task = asyncio.get_running_loop().create_task(self._grant(credits))
        self._grants.add(task)
        task.add_done_callback(self._grants.discard)

    async def _grant(self, credits: int) -> None:
        """GRANT until the server has the credits or the subscription ends: `outstanding`
        already counts them, so one lost would leave a stream waiting for pushes that
        never come."""
        conn = self._conn
        assert conn is not None
        delay_s = GRANT_RETRY_MIN_S
        while True:
            try:
                await conn.request(GrantRequest(self.subscription_id, credits))
                return
            except MqdError as exc:
                if not self.ended:
                    # The end frame, if one is coming, is in the same stream after the
                    # answer: look again once the loop has read it.
                    await asyncio.sleep(0)
                if self.ended:
                    return
                retry = isinstance(exc, GRANT_RETRY_ERRORS)
                log.warning(
                    "subscription.grant_failed",
                    queue=self.queue.name,
                    subscription_id=self.subscription_id,
                    error=str(exc),
                    retry_in_s=delay_s if retry else None,
                )
                if not retry:
                    # Not the server's to give: end it here, so the stream subscribes
                    # again (or raises), and give back what it holds.
                    self.outstanding = max(0, self.outstanding - credits)
                    self._end = exc
                    self._wakeup.set()
                    if self._on_event is not None:
                        self._on_event()
                    self.queue.client._spawn(self._unsubscribe_ended())
                    return
                await asyncio.sleep(delay_s)
                delay_s = min(delay_s * 2, GRANT_RETRY_MAX_S)

    async def _unsubscribe_ended(self) -> None:
        """UNSUBSCRIBE a subscription this client ended (the server's side may run)."""
        await self._unsubscribe(ask=self._holds_slot)

    async def _unsubscribe(self, *, ask: bool) -> None:
        """UNSUBSCRIBE if `ask` (and the connection is up), give the in-flight slot back,
        free the id: for good once the server has said the subscription ended, else
        kept from reuse while its pushes may still come (Connection.remove_push_listener)."""
        conn = self._conn
        ended = True
        if ask and conn is not None and not conn.closed:
            try:
                await conn.request(
                    UnsubscribeRequest(self.subscription_id),
                    timeout_s=min(conn.request_timeout_s, RELEASE_TIMEOUT_S),
                )
            except MqdError as exc:
                ended = conn.closed
                log.debug("subscription.unsubscribe_failed", queue=self.queue.name, error=str(exc))
        self._release_slot()
        if conn is not None:
            conn.remove_push_listener(self.subscription_id, ended=ended)

    # --- the end -----------------------------------------------------------------------

    async def close(self) -> list[Message]:
        """UNSUBSCRIBE (if it still runs); returns the messages pushed and not taken.

        They are in flight for this client: release them (CHANGE_VISIBILITY 0)
        or let their lease run out. Safe to call more than once.
        """
        if not self._closed:
            self._closed = True
            ask = self._end is None
            if ask and self.queue.client._closing:
                # client.close() closes it under a stream that may wait in next_batch:
                # wake that up with the reason the stream ends for good.
                self._end = ClientClosed("the client is closed")
            self._wakeup.set()
            await self._unsubscribe(ask=ask)
            for task in list(self._grants):
                task.cancel()
        left = [m for batch in self._batches for m in batch]
        self._batches.clear()
        return left

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._close_and_release()

    def __repr__(self) -> str:
        state = "ended" if self.ended else "open"
        return (
            f"<mqd.client.Subscription {self.queue.name!r} {state} "
            f"outstanding={self.outstanding} buffered={self.buffered}>"
        )


def credits_max(queue: Queue) -> int:
    """The server's subscription_credits_max (HELLO limits), or a modest default."""
    value = queue.client.server_limits.get("subscription_credits_max")
    if type(value) is int and value > 0:
        return value
    return CREDITS_MAX_DEFAULT
