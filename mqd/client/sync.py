"""A thin blocking facade over the async client (DESIGN.md §1: "async first").

    from mqd.client.sync import connect

    with connect("127.0.0.1:6470") as client:
        queue = client.create_queue("jobs", exist_ok=True)
        queue.send(b"hello")
        for message in queue.receive(max_messages=10, wait=5):
            queue.ack(message)
        for message in queue.consume(prefetch=10, wait=20):  # a plain iterator
            ...
            queue.ack(message)

Each SyncClient runs one private event loop in a daemon thread and hands
every call to it with `run_coroutine_threadsafe`, so one SyncClient may be
used from many threads at once and the async client's multiplexing still
applies (their requests share one connection). The methods and their
arguments are exactly those of `Client` and `Queue`; queue-returning ones
return a SyncQueue. `close()` (or leaving the `with` block) closes the
connection and ends the thread; later calls raise ConnectionClosed.

Calls wait for the async client's own timeouts, plus a grace period; a call
that still has no answer then raises RequestTimeout. `receive` waits its
`wait` on top; `redrive` and `run_consumer` wait as long as they take.
`run_consumer` takes a plain function (run in a thread per message) or an
async one (run on the client's loop).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import inspect
import threading
from collections.abc import Coroutine, Iterator, Sequence
from typing import Any, TypeVar

from mqd.errors import ClientClosed, ClientError, ConnectionClosed, InvalidArgument, RequestTimeout

from .client import DEFAULT_ADDRESS, Client, Queue
from .message import Message

T = TypeVar("T")

# A call waits at most this much longer than the async client's own timeouts
# (which always fire first) before giving up on the loop thread itself.
_CALL_GRACE_S = 5.0
# Closing waits this long for the loop thread to end.
_THREAD_JOIN_S = 10.0
# How long a call interrupted in the calling thread (Ctrl-C) may take to unwind on the
# loop before the interrupt is raised: a consumer's graceful stop (its drain_timeout,
# 30 s by default, and the acks after), a stream closing its subscription.
_UNWIND_WAIT_S = 120.0

# The coroutine methods offered blocking, by class. Anything else is still
# reached through __getattr__; these are spelled out so that they show up in
# dir() and help() and carry the async method's signature and docstring.
_CLIENT_METHODS = (
    "connect",
    "create_queue",
    "delete_queue",
    "get_queue",
    "list_queues",
    "set_queue_attributes",
    "purge_queue",
    "ping",
    "stats",
)
_QUEUE_METHODS = (
    "send",
    "send_batch",
    "receive",
    "peek",
    "ack",
    "change_visibility",
    "change_visibility_many",
    "nack",
    "redrive",
    "run_consumer",
    "info",
    "stats",
    "attributes",
    "set_attributes",
    "purge",
    "delete",
)
# Calls that take as long as they take: no timeout of the facade's own.
_UNBOUNDED = frozenset({"redrive", "run_consumer"})


class _LoopThread:
    """An event loop running forever in a daemon thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._lock = threading.Lock()
        self._stopped = False
        self._thread = threading.Thread(target=self._main, name="mqd-client-sync", daemon=True)
        self._thread.start()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def run(self, coro: Coroutine[Any, Any, T], timeout_s: float | None) -> T:
        """Run `coro` on the loop and wait for its result (thread-safe)."""
        if threading.current_thread() is self._thread:
            coro.close()
            raise ClientError(
                "a blocking mqd call was made from the client's own event loop thread "
                "(e.g. from an async handler); use the async client there"
            )
        with self._lock:
            if self._stopped:
                coro.close()
                raise ClientClosed("the client is closed")
            running: list[asyncio.Task[Any]] = []  # the call's task, once it starts
            future = asyncio.run_coroutine_threadsafe(_noting_task(coro, running), self.loop)
        try:
            return future.result(timeout_s)
        except concurrent.futures.CancelledError:
            if self._stopped:
                # The client closed under the call (its loop's tasks cancelled): as the
                # async client says it, not a bare CancelledError from another module.
                raise ClientClosed("the client was closed while the call ran") from None
            raise
        except TimeoutError:
            if future.done():
                raise  # the call's own TimeoutError
            future.cancel()
            raise RequestTimeout(
                f"no answer from the client's event loop within {timeout_s:g} s",
                details={"timeout_s": timeout_s},
            ) from None
        except BaseException:
            if future.done():
                raise  # the call's own error: nothing to unwind
            future.cancel()  # e.g. KeyboardInterrupt in the calling thread
            self._wait_unwound(running)
            raise

    def _wait_unwound(self, running: list[asyncio.Task[Any]]) -> None:
        """Let a call cancelled from the calling thread finish on the loop (a consumer's
        graceful stop: running handlers finish, the rest released; a stream closing its
        subscription) before the caller goes on, as an async caller would by awaiting
        it. A second Ctrl-C ends the wait."""

        async def unwound() -> None:
            # Scheduled after the cancellation: a call not started by then never will.
            if running and not running[0].done():
                await asyncio.wait(running, timeout=_UNWIND_WAIT_S)

        if self._stopped or not self._thread.is_alive():
            return
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(unwound(), self.loop).result(_UNWIND_WAIT_S + 1)

    def stop(self) -> None:
        """Cancel what still runs on the loop, stop it, end the thread, close the loop."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(self._shutdown(), self.loop)
            self._thread.join(_THREAD_JOIN_S)
        if not self._thread.is_alive():
            self.loop.close()

    async def _shutdown(self) -> None:
        current = asyncio.current_task()
        tasks = [task for task in asyncio.all_tasks() if task is not current]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.loop.shutdown_asyncgens()
        self.loop.stop()

    @property
    def stopped(self) -> bool:
        return self._stopped


async def _noting_task(coro: Coroutine[Any, Any, T], running: list[asyncio.Task[Any]]) -> T:
    task = asyncio.current_task()
    assert task is not None
    running.append(task)
    return await coro


def _blocking(name: str) -> Any:
    """A method of SyncClient / SyncQueue that runs the async method `name` and waits."""

    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        return self._call(name, args, kwargs)

    call.__name__ = call.__qualname__ = name
    return call


class SyncQueue:
    """Blocking `Queue`: every coroutine method of Queue, called synchronously."""

    def __init__(self, owner: SyncClient, queue: Queue) -> None:
        self._owner = owner
        self._queue = queue
        self.name = queue.name

    @property
    def client(self) -> SyncClient:
        return self._owner

    def _call(self, name: str, args: tuple, kwargs: dict) -> Any:
        return self._owner._run_method(getattr(self._queue, name), name, args, kwargs)

    def consume(self, prefetch: int = 10, wait: float = 20.0, **options: Any) -> Iterator[Message]:
        """`Queue.consume` as a plain iterator: `for message in queue.consume(): ...`.

        Blocks for the next message as long as it takes. Leaving the loop
        (break, an exception, or closing the iterator) releases the messages
        fetched but not yet yielded before the iterator is gone.
        """
        owner = self._owner
        stream = self._queue.consume(prefetch, wait, **options)
        try:
            while True:
                try:
                    message = owner._loop_thread.run(stream.__anext__(), None)
                except StopAsyncIteration:
                    return
                yield message
        finally:
            if not owner._loop_thread.stopped:
                with contextlib.suppress(ConnectionClosed):
                    owner._loop_thread.run(stream.aclose(), owner._call_timeout_s)

    def run_consumer(self, handler: Any, **options: Any) -> None:
        """`Queue.run_consumer`; a plain function as `handler` runs in a thread of its
        own per message (`asyncio.to_thread`), an async one on the client's loop."""
        if not _is_async_callable(handler) and callable(handler):
            plain = handler

            async def handler(message: Message) -> Any:
                result = await asyncio.to_thread(plain, message)
                return await result if inspect.isawaitable(result) else result

        return self._call("run_consumer", (handler,), options)

    def subscribe(self, *args: Any, **kwargs: Any) -> Any:
        """Not offered: a Subscription is driven with await, which this client has not."""
        raise InvalidArgument(
            "subscribe() gives an async Subscription, which the sync client cannot drive "
            "(its credits would take messages nobody handles): use queue.consume(), an "
            "iterator over pushed messages, or queue.run_consumer(handler)"
        )

    def consumer(self, *args: Any, **kwargs: Any) -> Any:
        """Not offered: a Consumer is started and stopped with await."""
        raise InvalidArgument(
            "consumer() gives an async Consumer, which the sync client cannot start: use "
            "queue.run_consumer(handler, ...), which blocks while it runs (until Ctrl-C or "
            "client.close() from another thread)"
        )

    def __getattr__(self, name: str) -> Any:
        return self._owner._wrap(getattr(self._queue, name), name)

    def __repr__(self) -> str:
        return f"<mqd.client.sync.SyncQueue {self.name!r}>"


def _is_async_callable(handler: Any) -> bool:
    while isinstance(handler, functools.partial):
        handler = handler.func
    # (An object whose __call__ is async counts as async too.)
    call = type(handler).__dict__.get("__call__") if not inspect.isroutine(handler) else None
    return inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(call)


class SyncClient:
    """Blocking `Client`. Queue-returning methods return SyncQueue."""

    def __init__(self, client: Client, loop_thread: _LoopThread, call_timeout_s: float) -> None:
        self._client = client
        self._loop_thread = loop_thread
        self._call_timeout_s = call_timeout_s

    def _call(self, name: str, args: tuple, kwargs: dict) -> Any:
        return self._run_method(getattr(self._client, name), name, args, kwargs)

    def _run_method(self, method: Any, name: str, args: tuple, kwargs: dict) -> Any:
        if name in _UNBOUNDED:
            timeout_s = None
        else:
            # A long-poll receive may wait up to `wait` seconds on top.
            wait = kwargs.get("wait", 0) if name == "receive" else 0
            if name == "receive" and len(args) >= 2:
                wait = args[1]
            timeout_s = self._call_timeout_s + (
                float(wait) if isinstance(wait, int | float) and wait > 0 else 0.0
            )
        result = self._loop_thread.run(method(*args, **kwargs), timeout_s)
        if isinstance(result, Client):
            return self
        return SyncQueue(self, result) if isinstance(result, Queue) else result

    def _wrap(self, attribute: Any, name: str) -> Any:
        if not inspect.iscoroutinefunction(attribute):
            return attribute

        @functools.wraps(attribute)
        def call(*args: Any, **kwargs: Any) -> Any:
            return self._run_method(attribute, name, args, kwargs)

        return call

    def __getattr__(self, name: str) -> Any:
        return self._wrap(getattr(self._client, name), name)

    def queue(self, name: str) -> SyncQueue:
        """A handle on a queue by name; no round trip."""
        return SyncQueue(self, self._client.queue(name))

    @property
    def closed(self) -> bool:
        return self._loop_thread.stopped

    def close(self) -> None:
        """Close the connection and end the loop thread; idempotent."""
        if self._loop_thread.stopped:
            return
        try:
            self._loop_thread.run(self._client.close(), self._call_timeout_s)
        finally:
            self._loop_thread.stop()

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<mqd.client.sync.SyncClient {self._client.address}>"


def _install(cls: type, target: type, names: tuple[str, ...]) -> None:
    for name in names:
        if name in cls.__dict__:
            continue  # written out by hand (SyncQueue.run_consumer)
        method = _blocking(name)
        functools.update_wrapper(method, getattr(target, name), assigned=("__doc__",))
        method.__signature__ = inspect.signature(getattr(target, name))  # type: ignore[attr-defined]
        setattr(cls, name, method)


_install(SyncClient, Client, _CLIENT_METHODS)
_install(SyncQueue, Queue, _QUEUE_METHODS)


_CONNECT_OPTIONS = frozenset({"client_name", "connect_timeout", "request_timeout", "keepalive"})


def _seconds(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise InvalidArgument(f"{name} must be a positive number of seconds, got {value!r}")
    return float(value)


def connect(
    address: str | Sequence[str] = DEFAULT_ADDRESS,
    tls: Any = None,
    token: str | None = None,
    **options: Any,
) -> SyncClient:
    """Blocking `mqd.client.connect`: same arguments, returns a SyncClient."""
    # Checked before the loop thread starts: a bad option left it running.
    unknown = options.keys() - _CONNECT_OPTIONS
    if unknown:
        raise InvalidArgument(
            f"connect() got unknown options {sorted(unknown)}; it takes address, tls, "
            f"token and {', '.join(sorted(_CONNECT_OPTIONS))}"
        )
    request_timeout = _seconds(options.get("request_timeout", 30.0), "request_timeout")
    connect_timeout = _seconds(options.get("connect_timeout", 10.0), "connect_timeout")
    loop_thread = _LoopThread()

    async def open_client() -> Client:
        client = Client(address, tls=tls, token=token, **options)
        try:
            return await client.connect()
        except BaseException:
            await client.close()
            raise

    try:
        client = loop_thread.run(open_client(), connect_timeout * 2 + _CALL_GRACE_S)
    except BaseException:
        loop_thread.stop()
        raise
    return SyncClient(client, loop_thread, request_timeout + _CALL_GRACE_S)
