"""The client API: `connect`, `Client` (queues) and `Queue` (messages).

The top layer (STYLE.md: codec → transport → connection → client API). It
speaks seconds and Python values and turns them into protocol v1 requests
(protocol.md §4, where times are integer milliseconds); the connection below
does the correlation and the waiting.

A `Client` holds one multiplexed connection and reopens it (with HELLO) on
the next call after it is lost; calls outstanding at the moment of loss fail
with ConnectionClosed and are not retried, because the client cannot know
whether the server acted on them.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import math
import os
import random
import re
import ssl
from collections.abc import Callable, Coroutine, Iterable, Sequence
from typing import Any

from mqd.errors import (
    ClientClosed,
    ConnectionClosed,
    ErrorCode,
    InvalidArgument,
    MqdError,
    ServerError,
    Throttled,
)
from mqd.log import library_logger
from mqd.protocol.codec import utf8_len
from mqd.protocol.messages import (
    DELAY_NONE,
    VISIBILITY_DEFAULT,
    ChangeVisibilityRequest,
    CreateQueueRequest,
    DeleteQueueRequest,
    DeleteRequest,
    GetQueueRequest,
    HelloResponse,
    ListQueuesRequest,
    Opcode,
    PeekRequest,
    PingRequest,
    PurgeQueueRequest,
    ReceiveRequest,
    RedriveRequest,
    SendRequest,
    SetQueueAttributesRequest,
    StatsRequest,
    VisibilityChange,
)

from .batching import (
    U32_MAX,
    check_split_batch,
    make_entries,
    make_entry,
    plan_chunks,
    seconds_to_ms,
)
from .connection import KEEPALIVE_S, Connection
from .consumer import Consumer, Handler, MessageStream
from .message import Message, messages_from_delivered
from .subscription import RELEASE_TIMEOUT_S, Subscription

# Through `logging`: the application decides what is shown, and where (mqd.log).
log = library_logger("mqd.client")

DEFAULT_ADDRESS = "127.0.0.1:6470"
# A long-poll RECEIVE may legitimately take `wait` seconds; the client gives
# up on it only this much later.
RECEIVE_TIMEOUT_MARGIN_S = 10.0
# close() waits at most this long for background releases to finish.
BACKGROUND_AT_CLOSE_S = 2.0
# How long close() gives its streams and consumers to give back what they hold.
CLOSE_ENDING_S = 6.0
# Bytes of one receipt in a DELETE request beyond its text (u16 length), and
# of the request around the receipts (header, queue name prefix, list count).
_RECEIPT_OVERHEAD_BYTES = 2
_RECEIPTS_REQUEST_OVERHEAD_BYTES = 32
# At most this many failed receipts are spelled out in an exception message.
_FAILURES_IN_MESSAGE_MAX = 5


def parse_address(address: str) -> tuple[str, int]:
    """Split "host:port" (or "[v6addr]:port") into host and port."""
    if not isinstance(address, str):
        raise InvalidArgument(f"an address must be a 'host:port' str, got {address!r}")
    host, sep, port_text = address.strip().rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise InvalidArgument(f"an address must look like 'host:port', got {address!r}")
    return host, int(port_text)


def _parse_addresses(address: str | Sequence[str]) -> list[tuple[str, int]]:
    """One address, a comma-separated list, or a sequence; tried in turn when connecting."""
    items = address.split(",") if isinstance(address, str) else list(address)
    if not items:
        raise InvalidArgument("no address given")
    return [parse_address(item) for item in items]


def _check_name(name: Any, what: str = "queue name") -> str:
    if type(name) is not str:
        raise InvalidArgument(f"{what} must be a str, got {type(name).__name__}")
    return name


def _within_limit(client: Client, ms: int, limit: str, what: str, seconds: Any) -> None:
    """A time over the server's limit (HELLO), said in the seconds the caller gave:
    the server's own refusal speaks its milliseconds ("wait_ms 100000 exceeds ...")."""
    most = client._limits.get(limit)
    if isinstance(most, int) and ms > most:
        raise InvalidArgument(
            f"{what} must be at most {most / 1000:g} s on this server ({limit}), got {seconds!r}"
        )


def _check_count(value: Any, what: str) -> int:
    if type(value) is not int:
        raise InvalidArgument(f"{what} must be an int, got {type(value).__name__}")
    if not 0 <= value <= U32_MAX:
        raise InvalidArgument(f"{what} must be an int in [0, {U32_MAX}], got {value!r}")
    return value


def _receipts_of(items: Iterable[Any], out: list[str]) -> list[str]:
    """Collect receipt strings from Messages, strings and (nested) lists of them."""
    for item in items:
        if type(item) is Message:
            out.append(item.receipt)
        elif type(item) is str:
            out.append(item)
        elif isinstance(item, list | tuple):
            _receipts_of(item, out)
        elif isinstance(item, Message):
            out.append(item.receipt)
        else:
            raise InvalidArgument(f"expected a Message or a receipt str, got {type(item).__name__}")
    return out


def _queue_info(info: Any) -> dict[str, Any]:
    return {"name": info.name, "attributes": info.attributes, "stats": info.stats}


def _entry_failures_error(
    op: str, receipts: list[str], failures: list[tuple[int, int, str]]
) -> ServerError:
    """The exception for a batch in which some receipts failed (the rest took effect)."""
    listed = []
    codes = []
    for index, code, message in failures:
        try:
            name = ErrorCode(code).name
        except ValueError:
            name = f"ERROR_{code}"
        receipt = receipts[index] if 0 <= index < len(receipts) else None
        codes.append(code)
        listed.append({"index": index, "receipt": receipt, "code": name, "message": message})
    # RECEIPT_INVALID is the usual failure and names the class; a batch whose
    # failures are all something else raises that code's class instead.
    code = ErrorCode.RECEIPT_INVALID if ErrorCode.RECEIPT_INVALID in codes else codes[0]
    shown = "; ".join(
        f"{f['receipt']!r} ({f['code']}: {f['message']})" for f in listed[:_FAILURES_IN_MESSAGE_MAX]
    )
    more = len(listed) - _FAILURES_IN_MESSAGE_MAX
    if more > 0:
        shown += f"; and {more} more"
    text = f"{op}: {len(listed)} of {len(receipts)} receipts failed: {shown}"
    return ServerError.from_code(
        code, text, {"failures": listed, "succeeded": len(receipts) - len(listed)}
    )


class RedriveResult(int):
    """What `Queue.redrive` returns: the number of messages moved, with the server's remarks.

    It is an int (the `moved` count of protocol.md §4.14), so `n = await
    dlq.redrive()` reads naturally; `.problems` holds the server's lines
    about messages it left where they were (empty if none).
    """

    problems: list[str]

    def __new__(cls, moved: int, problems: Iterable[str] = ()) -> RedriveResult:
        result = super().__new__(cls, moved)
        result.problems = list(problems)
        return result

    @property
    def moved(self) -> int:
        return int(self)

    def __repr__(self) -> str:
        return f"RedriveResult(moved={int(self)}, problems={self.problems!r})"


_IDEMPOTENT_OPS = frozenset(
    {
        Opcode.PING,
        Opcode.LIST_QUEUES,
        Opcode.GET_QUEUE,
        Opcode.PEEK,
        Opcode.STATS,
        Opcode.DELETE,  # acking an acked message succeeds
        Opcode.CHANGE_VISIBILITY,
        Opcode.RECEIVE,  # at worst a message waits out its lease on the lost connection
    }
)


def _is_idempotent(msg: Any) -> bool:
    if msg.OPCODE in _IDEMPOTENT_OPS:
        return True
    # A send whose every entry has a dedup id is stored once however often it is sent.
    return msg.OPCODE == Opcode.SEND and all(entry.dedup_id for entry in msg.entries)


def _throttle_delay_s(exc: Throttled) -> float:
    """THROTTLED's `retry_after_ms` plus up to half again of jitter (protocol.md §2.3)."""
    retry_after_ms = exc.details.get("retry_after_ms")
    if not isinstance(retry_after_ms, int) or isinstance(retry_after_ms, bool):
        retry_after_ms = 100
    retry_after_s = min(max(retry_after_ms, 1), 60_000) / 1000
    return retry_after_s * random.uniform(1.0, 1.5)


class Client:
    """A connection to an mqd server (a frontend), shared by every task that uses it.

    Build one with `await mqd.client.connect(address)`; use it from any
    number of tasks at once. `async with client:` closes it at the end.
    """

    def __init__(
        self,
        address: str | Sequence[str] = DEFAULT_ADDRESS,
        *,
        tls: ssl.SSLContext | None = None,
        token: str | None = None,
        client_name: str | None = None,
        connect_timeout: float = 10.0,
        request_timeout: float = 30.0,
        keepalive: float = KEEPALIVE_S,
    ) -> None:
        if isinstance(tls, str | os.PathLike):
            # A CA file to trust (a cluster's `client_ca`): verify the server against it.
            try:
                tls = ssl.create_default_context(cafile=os.fspath(tls))
            except (OSError, ssl.SSLError) as exc:
                raise InvalidArgument(
                    f"tls: cannot use CA file {os.fspath(tls)!r}: {exc}"
                ) from None
        if tls is not None and not isinstance(tls, ssl.SSLContext):
            raise InvalidArgument(
                f"tls must be an ssl.SSLContext, a CA file path or None, got {tls!r}"
            )
        if token is not None and type(token) is not str:
            raise InvalidArgument("token must be a str or None")
        self._addresses = _parse_addresses(address)
        # Many clients given the same frontends spread over them.
        self._address_index = random.randrange(len(self._addresses))
        self._tls = tls
        self._token = token
        self._client_name = client_name or f"mqd-python pid={os.getpid()}"
        for name, value in (
            ("connect_timeout", connect_timeout),
            ("request_timeout", request_timeout),
        ):
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                # 0 or less made every request time out "within 0 s" after it was sent.
                raise InvalidArgument(f"{name} must be seconds > 0, got {value!r}")
        self._connect_timeout_s = float(connect_timeout)
        self._request_timeout_s = float(request_timeout)
        if isinstance(keepalive, bool) or not isinstance(keepalive, int | float) or keepalive < 0:
            raise InvalidArgument(f"keepalive must be seconds >= 0 (0: off), got {keepalive!r}")
        self._keepalive_s = float(keepalive)
        self._conn: Connection | None = None
        self._connect_lock = asyncio.Lock()
        self._closed = False
        self._closing = False
        self._background: set[asyncio.Task[None]] = set()
        # What close() ends first, while the connection still carries their acks and
        # releases: the give-backs of running streams, and the running consumers.
        self._streams: set[Any] = set()
        self._consumers: set[Any] = set()
        # From the latest HELLO; kept after the connection closes.
        self._hello: HelloResponse | None = None
        self._limits: dict[str, Any] = {}
        # Set when the server answered SUBSCRIBE with UNKNOWN_OPCODE (a server older than
        # protocol.md §4.18): consumers long-poll RECEIVE instead.
        self._push_unsupported = False
        # Acks by queue name, coalesced while one of that queue's DELETEs is in flight.
        self._ack_batches: dict[str, _AckBatcher] = {}

    # --- connection management -------------------------------------------------

    async def _open(self) -> Connection:
        errors: list[ConnectionClosed] = []
        count = len(self._addresses)
        for step in range(count):
            index = (self._address_index + step) % count
            host, port = self._addresses[index]
            try:
                conn = await Connection.open(
                    host,
                    port,
                    tls=self._tls,
                    token=self._token,
                    client_name=self._client_name,
                    connect_timeout_s=self._connect_timeout_s,
                    request_timeout_s=self._request_timeout_s,
                    keepalive_s=self._keepalive_s,
                )
            except ConnectionClosed as exc:
                errors.append(exc)
                continue
            self._address_index = index
            return conn
        if count == 1:
            raise errors[0]
        raise ConnectionClosed(
            "could not connect to any address: " + "; ".join(str(e) for e in errors)
        ) from errors[-1]

    async def _connection(self) -> Connection:
        """The open connection, reopened (with HELLO) if it was lost."""
        conn = self._conn
        if conn is not None and conn.usable():
            return conn
        async with self._connect_lock:
            if self._closed:
                raise ClientClosed("the client is closed")
            conn = self._conn
            if conn is not None and conn.usable():
                return conn
            if conn is not None:
                await conn.close()
                # That server went away: try the next address first.
                self._address_index = (self._address_index + 1) % len(self._addresses)
            self._conn = None
            conn = await self._open()
            if self._closed:  # closed while we were connecting
                await conn.close()
                raise ClientClosed("the client is closed")
            self._conn = conn
            self._hello = conn.hello
            self._limits = conn.limits
            return conn

    async def _call(
        self,
        msg: Any,
        timeout_s: float | None = None,
        on_abandoned: Callable[[Any], None] | None = None,
    ) -> Any:
        deadline: float | None = None
        reconnects = 0
        while True:
            conn = self._conn
            if conn is None or not conn.usable():
                conn = await self._connection()
            try:
                return await conn.request(msg, timeout_s, on_abandoned)
            except ConnectionClosed:
                # Another frontend can answer a call that is safe to repeat (protocol.md §7.10).
                if reconnects >= len(self._addresses) or not _is_idempotent(msg):
                    raise
                reconnects += 1
                continue
            except Throttled as exc:
                # THROTTLED had no effect (protocol.md §8.3): wait as asked, with jitter so
                # throttled clients do not return in step, while the call's time allows.
                now = asyncio.get_running_loop().time()
                if deadline is None:
                    deadline = now + (self._request_timeout_s if timeout_s is None else timeout_s)
                delay_s = _throttle_delay_s(exc)
                if now + delay_s > deadline:
                    raise
                await asyncio.sleep(delay_s)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run a background chore of the client (a release); close() waits for it briefly."""
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def connect(self) -> Client:
        """Open the connection now (calls open it on demand otherwise)."""
        await self._connection()
        return self

    async def close(self) -> None:
        """End the client's streams and consumers, then close the connection.

        Streams give back what they fetched and did not yield; consumers stop as
        with `stop()` (their handlers get at most 2 s; what they finish is acked,
        the rest released); both then end with ClientClosed. Calls still
        outstanding fail with ConnectionClosed.
        """
        if not self._closed and (self._streams or self._consumers):
            self._closing = True
            ending = [
                asyncio.ensure_future(end())
                for end in [
                    *self._streams,
                    *(consumer._stop_for_close for consumer in self._consumers),
                ]
            ]
            # Bounded: a server gone silent must not hold close() for request timeouts.
            _, late = await asyncio.wait(ending, timeout=CLOSE_ENDING_S)
            for task in late:
                task.cancel()
            await asyncio.gather(*ending, return_exceptions=True)
        if self._background:
            # Let releases under way reach the server first.
            await asyncio.wait(set(self._background), timeout=BACKGROUND_AT_CLOSE_S)
        self._closed = True
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()

    async def __aenter__(self) -> Client:
        return await self.connect()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def connected(self) -> bool:
        return self._conn is not None and not self._conn.closed

    def _subscription_room(self) -> bool:
        """Whether a stream may subscribe on this client's connection (else it polls)."""
        conn = self._conn
        return conn is None or conn.closed or conn.subscription_room()

    def _hello_field(self, name: str) -> Any:
        return None if self._hello is None else getattr(self._hello, name)

    @property
    def server_limits(self) -> dict[str, Any]:
        """The limits the server sent in HELLO (frame_bytes_max, batch_messages_max, …)."""
        return dict(self._limits)

    @property
    def node_id(self) -> str | None:
        return self._hello_field("node_id")

    @property
    def server_version(self) -> str | None:
        return self._hello_field("server_version")

    @property
    def server_roles(self) -> list[str] | None:
        return self._hello_field("roles")

    @property
    def protocol_version(self) -> int | None:
        return self._hello_field("version")

    @property
    def address(self) -> str:
        """The address of the server this client talks (or will talk) to."""
        host, port = self._addresses[self._address_index]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    # --- queues ------------------------------------------------------------------

    def queue(self, name: str) -> Queue:
        """A handle on a queue by name; no round trip, the queue need not exist yet."""
        return Queue(self, _check_name(name))

    async def create_queue(
        self, name: str, /, *, exist_ok: bool = False, **attributes: Any
    ) -> Queue:
        """Create a queue with the given attributes (e.g. visibility_timeout=30).

        With exist_ok=True an existing queue is no error if its attributes match.
        """
        await self._call(CreateQueueRequest(_check_name(name), attributes, bool(exist_ok)))
        return Queue(self, name)

    async def delete_queue(self, name: str) -> None:
        await self._call(DeleteQueueRequest(_check_name(name)))

    async def get_queue(self, name: str) -> dict[str, Any]:
        """{"name", "attributes", "stats"} of one queue."""
        response = await self._call(GetQueueRequest(_check_name(name)))
        return _queue_info(response.queue)

    async def list_queues(self, prefix: str = "") -> list[str]:
        response = await self._call(ListQueuesRequest(_check_name(prefix, "prefix")))
        return list(response.names)

    async def set_queue_attributes(self, name: str, /, **attributes: Any) -> dict[str, Any]:
        """Change some attributes; returns the queue's {"name", "attributes", "stats"}."""
        response = await self._call(SetQueueAttributesRequest(_check_name(name), attributes))
        return _queue_info(response.queue)

    async def purge_queue(self, name: str) -> int:
        """Delete every message of a queue; returns how many were deleted."""
        response = await self._call(PurgeQueueRequest(_check_name(name)))
        return response.purged

    async def ping(self, payload: bytes = b"") -> float:
        """One round trip; returns its duration in seconds."""
        if not isinstance(payload, bytes):
            raise InvalidArgument("ping payload must be bytes")
        loop = asyncio.get_running_loop()
        await self._connection()
        start = loop.time()
        await self._call(PingRequest(payload))
        return loop.time() - start

    async def stats(self) -> dict[str, Any]:
        """Server-wide statistics (STATS)."""
        response = await self._call(StatsRequest())
        return response.stats

    def __repr__(self) -> str:
        state = "closed" if self._closed else "connected" if self.connected else "idle"
        return f"<mqd.client.Client {self.address} {state}>"


class _AckBatcher:
    """One queue's acks on one client: those made while a DELETE of the queue is in
    flight wait, and go out together in the next DELETE when it returns.

    Tasks that ack concurrently (a push consumer acking each message in its own
    task; handlers running side by side) would otherwise send a request, and in a
    cluster a replicated commit, per message. An ack alone goes out at once, so a
    lone caller waits no longer than before; each caller gets back its own
    receipts' failures, and every caller of a batch the error of its request."""

    __slots__ = ("_in_flight", "_queue", "_waiting")

    def __init__(self, queue: Queue) -> None:
        self._queue = queue
        self._in_flight = False
        self._waiting: list[tuple[list[str], asyncio.Future[list[tuple[int, int, str]]]]] = []

    async def delete(self, receipts: list[str]) -> list[tuple[int, int, str]]:
        if self._in_flight:
            future = asyncio.get_running_loop().create_future()
            self._waiting.append((receipts, future))
            return await future
        self._in_flight = True
        try:
            return await self._queue._delete(receipts)
        finally:
            self._next()

    def _next(self) -> None:
        """After a DELETE: send what waited, as one, or stand idle."""
        batch = [(r, f) for r, f in self._waiting if not f.cancelled()]
        self._waiting = []
        if not batch:
            self._in_flight = False
            # Idle: forget it, so a client that acks on many queues keeps none of them.
            batches = self._queue._client._ack_batches
            if batches.get(self._queue.name) is self:
                del batches[self._queue.name]
            return
        self._queue._client._spawn(self._delete_batch(batch))

    async def _delete_batch(
        self, batch: list[tuple[list[str], asyncio.Future[list[tuple[int, int, str]]]]]
    ) -> None:
        try:
            failures = await self._queue._delete([r for receipts, _ in batch for r in receipts])
        except asyncio.CancelledError:  # the client closing: the callers are cancelled too
            for _, future in batch:
                future.cancel()
            raise
        except Exception as exc:  # every caller of the batch sees its request's error
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
        else:
            start = 0
            for receipts, future in batch:
                end = start + len(receipts)
                if not future.done():
                    future.set_result(
                        [(i - start, code, text) for i, code, text in failures if start <= i < end]
                    )
                start = end
        finally:
            self._next()


class Queue:
    """A handle on one queue: send, receive, acknowledge.

    Cheap to make (`client.queue(name)`), holds no state beyond the name.
    """

    __slots__ = ("_client", "name")

    def __init__(self, client: Client, name: str) -> None:
        self._client = client
        self.name = name

    def __repr__(self) -> str:
        return f"<mqd.client.Queue {self.name!r}>"

    @property
    def client(self) -> Client:
        return self._client

    # --- sending -------------------------------------------------------------------

    async def send(
        self,
        body: bytes,
        *,
        attributes: dict[str, str] | None = None,
        delay: float | None = None,
        group_id: str | None = None,
        dedup_id: str | None = None,
        priority: int = 0,
    ) -> str:
        """Send one message; returns its id. `delay` is in seconds; None (the
        default) means the queue's own `delay` attribute, and 0 means none even
        on a queue with a delay, as in SQS (protocol.md §4.0)."""
        entry = make_entry(body, attributes, delay, group_id, dedup_id, priority)
        if delay is not None and entry.delay_ms != DELAY_NONE:
            _within_limit(self._client, entry.delay_ms, "delay_ms_max", "delay", delay)
        response = await self._client._call(SendRequest(self.name, [entry]))
        return response.message_ids[0]

    async def send_batch(self, bodies: Iterable[Any]) -> list[str]:
        """Send many messages; returns their ids in the same order.

        Each item is a body (bytes) or a dict of `send`'s arguments (body,
        attributes, delay, group_id, dedup_id, priority). The batch is cut
        into requests that respect the server's batch_messages_max and
        frame_bytes_max, sent one after another so that order is kept. If a
        request fails, the exception's details carry the ids of the messages
        already sent ("sent_message_ids").
        """
        entries = make_entries(bodies)
        if not entries:
            return []
        client = self._client
        conn = await client._connection()
        name = self.name
        chunks = plan_chunks(entries, name, conn.batch_messages_max, conn.frame_bytes_max)
        if len(chunks) == 1:
            response = await client._call(SendRequest(name, entries))
            return response.message_ids
        check_split_batch(entries, name, conn.limits)
        ids: list[str] = []
        for start, end in chunks:
            try:
                response = await client._call(SendRequest(name, entries[start:end]))
            except MqdError as exc:
                error = _renumbered(exc, start)
                if ids:
                    error.details = {**getattr(error, "details", {}), "sent_message_ids": ids}
                    if isinstance(error, ServerError):
                        # Said in the text too: retrying the whole batch would send
                        # these again (unless they carry dedup_ids).
                        error = type(error)(
                            f"{error.message} (entries 0-{len(ids) - 1} of the batch were "
                            "stored before this; their ids are in details['sent_message_ids'])",
                            code=error.code,
                            details=error.details,
                        )
                raise error from None
            ids.extend(response.message_ids)
        return ids

    # --- receiving -------------------------------------------------------------------

    async def receive(
        self,
        max_messages: int = 1,
        wait: float = 0.0,
        visibility_timeout: float | None = None,
    ) -> list[Message]:
        """Receive up to `max_messages`, long-polling up to `wait` seconds for the first.

        The messages stay invisible to other consumers for `visibility_timeout`
        seconds (None: the queue's default); ack them before it runs out. If
        the call is cancelled while it waits, messages the server delivers to
        it afterwards are released at once (see `_release_abandoned`).
        """
        _check_count(max_messages, "max_messages")
        client = self._client
        wait_ms = 0 if wait == 0 else seconds_to_ms(wait, "wait")
        _within_limit(client, wait_ms, "receive_wait_ms_max", "wait", wait)
        if visibility_timeout is None:
            visibility_ms = VISIBILITY_DEFAULT
        else:
            visibility_ms = seconds_to_ms(visibility_timeout, "visibility_timeout")
            _within_limit(
                client, visibility_ms, "visibility_timeout_ms_max", "visibility_timeout",
                visibility_timeout,
            )  # fmt: skip
        timeout_s = None
        if wait_ms:
            timeout_s = max(client._request_timeout_s, wait_ms / 1000 + RECEIVE_TIMEOUT_MARGIN_S)
        response = await client._call(
            ReceiveRequest(self.name, max_messages, wait_ms, visibility_ms),
            timeout_s,
            self._release_abandoned,
        )
        return messages_from_delivered(response.messages, self.name)

    def _release_abandoned(self, response: Any) -> None:
        """Give back what a RECEIVE delivered after its caller was cancelled.

        The server does not know the caller gave up: a long poll still
        waiting when its caller is cancelled takes the next messages that
        become ready (each delivery counts in receive_count). Releasing them
        at once keeps them from waiting out a lease nobody holds.
        """
        if response.messages:
            self._client._spawn(self._release_receipts([d.receipt for d in response.messages]))

    async def _release_receipts(self, receipts: list[str]) -> None:
        """CHANGE_VISIBILITY 0 for each receipt; failures are only logged."""
        if not receipts:
            return
        try:
            # A courtesy (else their leases run out): a close in an outage does not
            # wait a full request timeout for it.
            async with asyncio.timeout(RELEASE_TIMEOUT_S):
                failures = await self._change_visibility(receipts, [0] * len(receipts))
        except (TimeoutError, MqdError) as exc:
            error = str(exc) or f"no answer within {RELEASE_TIMEOUT_S:g} s"
            log.warning(
                "queue.release_failed", queue=self.name, messages=len(receipts), error=error
            )
            return
        if failures:
            log.debug("queue.release_refused", queue=self.name, refused=len(failures))

    async def peek(self, max_messages: int = 1, *, after_id: str = "") -> list[Message]:
        """Look at messages without changing their state (receipt ""), oldest first.

        `after_id` resumes after that message id, to page through a queue. To follow
        a queue as it grows, pass a cursor instead (`peek_cursor`): with one id, a
        queue of several partitions may skip messages stored meanwhile in another.
        """
        _check_count(max_messages, "max_messages")
        response = await self._client._call(
            PeekRequest(self.name, max_messages, _check_name(after_id, "after_id"))
        )
        return messages_from_delivered(response.messages, self.name)

    # --- acknowledging ---------------------------------------------------------------

    async def _receipt_chunks(self, receipts: list[str]) -> list[tuple[int, int]]:
        """Cut receipts into runs that fit one DELETE / CHANGE_VISIBILITY request."""
        conn = await self._client._connection()
        batch_max = conn.batch_messages_max
        frame_max = conn.frame_bytes_max
        fixed = _RECEIPTS_REQUEST_OVERHEAD_BYTES + utf8_len(self.name)
        if len(receipts) <= batch_max:
            # 8 bytes per receipt bound its u16 length and a CHANGE_VISIBILITY u32 timeout.
            total = fixed + sum(map(len, receipts)) + 8 * len(receipts)
            if total <= frame_max:
                return [(0, len(receipts))]
        chunks = []
        start, size = 0, fixed
        for i, receipt in enumerate(receipts):
            n = utf8_len(receipt) + 8
            if i > start and (i - start == batch_max or size + n > frame_max):
                chunks.append((start, i))
                start, size = i, fixed
            size += n
        chunks.append((start, len(receipts)))
        return chunks

    async def _delete(self, receipts: list[str]) -> list[tuple[int, int, str]]:
        """DELETE receipts (one request per server batch); the failed ones as (index, code, text)."""
        chunks = await self._receipt_chunks(receipts)
        if len(chunks) == 1:
            response = await self._client._call(DeleteRequest(self.name, receipts))
            return [(f.index, f.code, f.message) for f in response.failures]
        failures = []
        for start, end in chunks:
            response = await self._client._call(DeleteRequest(self.name, receipts[start:end]))
            failures.extend((start + f.index, f.code, f.message) for f in response.failures)
        return failures

    async def _change_visibility(
        self, receipts: list[str], timeouts_ms: list[int]
    ) -> list[tuple[int, int, str]]:
        """CHANGE_VISIBILITY with a timeout per receipt; the failed ones as (index, code, text)."""
        failures = []
        for start, end in await self._receipt_chunks(receipts):
            changes = [VisibilityChange(receipts[i], timeouts_ms[i]) for i in range(start, end)]
            response = await self._client._call(ChangeVisibilityRequest(self.name, changes))
            failures.extend((start + f.index, f.code, f.message) for f in response.failures)
        return failures

    async def ack(self, *messages_or_receipts: Message | str) -> None:
        """Delete received messages (Message objects or receipt strings) in one request.

        If some receipts are refused (expired, forged, already used), the others
        still take effect and ReceiptInvalid (or the failures' own code) is
        raised, naming the refused receipts in its message and in
        `.details["failures"]` ([{"index", "receipt", "code", "message"}]).
        """
        receipts = _receipts_of(messages_or_receipts, [])
        if not receipts:
            return
        batcher = self._client._ack_batches.get(self.name)
        if batcher is None:
            batcher = self._client._ack_batches[self.name] = _AckBatcher(self)
        failures = await batcher.delete(receipts)
        if failures:
            raise _entry_failures_error("ack", receipts, failures)

    async def change_visibility(self, message_or_receipt: Message | str, seconds: float) -> None:
        """Make a received message visible again after `seconds` (0: at once)."""
        await self.change_visibility_many([message_or_receipt], seconds)

    async def change_visibility_many(
        self, messages_or_receipts: Iterable[Message | str], seconds: float
    ) -> None:
        """`change_visibility` for many messages at once (one request per server batch)."""
        receipts = _receipts_of(messages_or_receipts, [])
        if not receipts:
            return
        timeout_ms = seconds_to_ms(seconds, "seconds")
        failures = await self._change_visibility(receipts, [timeout_ms] * len(receipts))
        if failures:
            raise _entry_failures_error("change_visibility", receipts, failures)

    async def nack(self, message_or_receipt: Message | str, delay: float = 0) -> None:
        """Give a message back: visible again after `delay` seconds (default at once).

        This is CHANGE_VISIBILITY with timeout `delay` (protocol.md §4.12):
        0 makes it ready now; its next delivery counts toward the queue's
        redrive_policy max_receive_count like any other.
        """
        await self.change_visibility_many([message_or_receipt], delay)

    # --- consuming ---------------------------------------------------------------------

    async def subscribe(
        self, credits: int, visibility_timeout: float | None = None
    ) -> Subscription:
        """Have the server push messages as they become ready (SUBSCRIBE, protocol.md §4.18).

        It pushes at most `credits` messages, then waits for `subscription.grant(n)`.
        Each pushed message is in flight for `visibility_timeout` seconds (None:
        the queue's; must be positive) like a received one: ack or release it.
        `await subscription.next_batch()` waits for the next messages; `await
        subscription.close()` ends it and returns those pushed but not taken
        (`async with` releases them). A server without subscriptions raises
        UnknownOpcode; `consume()` and the consumer then long-poll instead.
        """
        _check_count(credits, "credits")
        return await Subscription.open(self, credits, visibility_timeout)

    def consume(
        self,
        prefetch: int = 10,
        wait: float = 20.0,
        *,
        visibility_timeout: float | None = None,
        reconnect_delay_max: float = 5.0,
    ) -> MessageStream:
        """A stream of messages: `async for message in queue.consume(): ...; await queue.ack(message)`.

        Underneath it subscribes (SUBSCRIBE, protocol.md §4.18) with `prefetch`
        credits: the server pushes messages as they become ready, and the
        stream grants more as it yields them, so at most `prefetch` messages
        are on their way or buffered. Against a server without subscriptions
        it long-polls RECEIVE for up to `prefetch` messages at a time, waiting
        up to `wait` seconds. It yields messages one by one; the caller acks
        (or nacks) each. A lost connection is retried with a bounded backoff. Messages fetched but not yet yielded when the stream
        ends are released at once (CHANGE_VISIBILITY 0): deterministically
        with `async with queue.consume() as stream:` or `await stream.aclose()`,
        and shortly afterwards (when the stream is garbage collected) after a
        plain `break` out of the loop or a cancellation.
        """
        return MessageStream(
            self,
            prefetch=prefetch,
            wait=wait,
            visibility_timeout=visibility_timeout,
            reconnect_delay_max=reconnect_delay_max,
        )

    def consumer(self, handler: Handler, **options: Any) -> Consumer:
        """A `Consumer` running `await handler(message)` per message; see `run_consumer`.

        Start it with `await consumer.start()` (or `async with`), end it with
        `await consumer.stop()`.
        """
        _check_consumer_options(options)
        return Consumer(self, handler, **options)

    async def run_consumer(self, handler: Handler, concurrency: int = 8, **options: Any) -> None:
        """Run `await handler(message)` for each message, at most `concurrency` at once, until cancelled.

        The message is acked when the handler returns and released with a
        backoff delay (`retry_delay` * 2**(receive_count-1), at most
        `retry_delay_max`) when it raises; its lease is extended while the
        handler runs. Cancelling the task stops gracefully: no more fetching,
        running handlers finish (up to `drain_timeout` s), prefetched
        messages are released. The other options are those of `Consumer`.
        Returns only if the consumer stops on an error it cannot retry
        (then raises it).
        """
        _check_consumer_options(options)
        consumer = Consumer(self, handler, concurrency=concurrency, **options)
        await consumer.start()
        try:
            await consumer.wait()
        except asyncio.CancelledError:
            await consumer.stop()
            raise

    # --- dead letters -------------------------------------------------------------------

    async def redrive(
        self,
        to: str | None = None,
        max_messages: int | None = None,
        rate: float | None = None,
    ) -> RedriveResult:
        """Move this queue's ready messages (normally a dead-letter queue's) back (REDRIVE, §4.14).

        Each goes to its own `source_queue`, or to `to` if given; at most
        `max_messages` (None: all), at most `rate` per second (None: no
        limit). Returns how many were moved, as a `RedriveResult` (an int
        whose `.problems` lists the server's lines about messages it left
        in place; they are also logged as a warning). A redrive of many
        messages can take long, so the client sets no timeout of its own
        (wrap the call in `asyncio.timeout` for one); the call still fails
        if the connection is lost. It is safe to call again: it moves only what is
        still there.
        """
        if to is None:
            target = ""
        else:
            target = _check_name(to, "to")
            if not target:
                raise InvalidArgument("to must be a queue name, or None for each source queue")
        count = 0 if max_messages is None else _check_count(max_messages, "max_messages")
        if max_messages == 0:
            raise InvalidArgument("max_messages must be positive, or None for all")
        if rate is None:
            rate_per_s = 0
        elif (
            isinstance(rate, bool) or not isinstance(rate, int | float) or not 1 <= rate <= U32_MAX
        ):
            raise InvalidArgument(
                f"rate must be a number of messages per second in [1, {U32_MAX}], got {rate!r}"
            )
        else:
            rate_per_s = int(rate)
        response = await self._client._call(
            RedriveRequest(self.name, target, count, rate_per_s), math.inf
        )
        if response.problems:
            log.warning(
                "queue.redrive_problems",
                queue=self.name,
                to=target or None,
                moved=response.moved,
                problems=list(response.problems),
            )
        return RedriveResult(response.moved, response.problems)

    # --- the queue itself --------------------------------------------------------------

    async def info(self) -> dict[str, Any]:
        """{"name", "attributes", "stats"} (GET_QUEUE)."""
        return await self._client.get_queue(self.name)

    async def stats(self) -> dict[str, Any]:
        """Live counts: visible, in_flight, delayed, oldest_message_age_s, …"""
        return (await self.info())["stats"]

    async def attributes(self) -> dict[str, Any]:
        return (await self.info())["attributes"]

    async def set_attributes(self, **attributes: Any) -> dict[str, Any]:
        return await self._client.set_queue_attributes(self.name, **attributes)

    async def purge(self) -> int:
        """Delete every message; returns how many were deleted."""
        return await self._client.purge_queue(self.name)

    async def delete(self) -> None:
        """Delete the queue itself."""
        await self._client.delete_queue(self.name)


_CONSUMER_OPTIONS = tuple(
    name
    for name in inspect.signature(Consumer.__init__).parameters
    if name not in ("self", "queue", "handler")
)


def _check_consumer_options(options: dict[str, Any]) -> None:
    """An unknown option is INVALID_ARGUMENT naming the known ones (not a TypeError)."""
    unknown = sorted(set(options) - set(_CONSUMER_OPTIONS))
    if unknown:
        raise InvalidArgument(
            f"unknown consumer option(s) {', '.join(unknown)}; "
            f"options are {', '.join(_CONSUMER_OPTIONS)}"
        )


_ENTRY_NAMED = re.compile(r"entry (\d+): ")


def _renumbered(exc: MqdError, start: int) -> MqdError:
    """A split batch's chunk error naming an entry (protocol.md §2.4) by its place in
    the chunk: named by its place in the caller's batch instead."""
    if not start or not isinstance(exc, ServerError):
        return exc
    match = _ENTRY_NAMED.match(exc.message)
    if match is None:
        return exc
    message = f"entry {int(match[1]) + start}: {exc.message[match.end() :]}"
    return type(exc)(message, code=exc.code, details=dict(exc.details))


def peek_cursor(messages: Iterable[Message], cursor: str = "") -> str:
    """`cursor` moved past `messages`: the `after_id` that follows a queue with
    `Queue.peek` without skipping messages (protocol.md §4.13). It holds the last id
    seen in each partition (a message id's second part names its partition, §5.4).

        cursor = ""
        while following:
            found = await queue.peek(100, after_id=cursor)
            cursor = peek_cursor(found, cursor)
    """
    last: dict[str, str] = {}
    ids = [text for text in cursor.split(",") if text]
    for message_id in itertools.chain(ids, (m.id for m in messages)):
        parts = message_id.split("-")
        if len(parts) != 3:
            raise InvalidArgument(f"{message_id!r} is not an mqd message id")
        last[parts[1]] = message_id
    return "".join(f"{message_id}," for message_id in last.values())


async def connect(
    address: str | Sequence[str] = DEFAULT_ADDRESS,
    tls: ssl.SSLContext | None = None,
    token: str | None = None,
    *,
    client_name: str | None = None,
    connect_timeout: float = 10.0,
    request_timeout: float = 30.0,
    keepalive: float = KEEPALIVE_S,
) -> Client:
    """Connect to an mqd server and say HELLO; returns a ready Client.

    `address` is "host:port" (or several, comma-separated or in a list, tried
    in turn). `tls` is an ssl.SSLContext (the server's name is checked
    against `host`). Raises ConnectionClosed if no address answers and the
    server's error (e.g. Unauthenticated) if HELLO is refused. While
    subscriptions (`consume`, consumers) are open, a connection that has heard
    nothing for `keepalive` seconds sends PING and is given up (its streams
    subscribe again) if no answer comes within as long again; while a request
    waits, after at most 5 s of quiet (calls safe to repeat then go on at the
    next address). 0 turns both off.
    """
    client = Client(
        address,
        tls=tls,
        token=token,
        client_name=client_name,
        connect_timeout=connect_timeout,
        request_timeout=request_timeout,
        keepalive=keepalive,
    )
    return await client.connect()
