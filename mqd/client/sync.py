"""A thin blocking facade over the async client (DESIGN.md §1: "async first").

    from mqd.client.sync import connect

    with connect("127.0.0.1:6470") as client:
        queue = client.create_queue("jobs", exist_ok=True)
        queue.send(b"hello")
        for message in queue.receive(max_messages=10, wait=5):
            queue.ack(message)

Each SyncClient runs one private event loop in a daemon thread and hands
every call to it with `run_coroutine_threadsafe`, so the async client's
multiplexing still applies when several threads share one SyncClient. The
methods and their arguments are exactly those of `Client` and `Queue`.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

from .client import DEFAULT_ADDRESS, Client, Queue

T = TypeVar("T")

# A call waits at most this much longer than the async client's own timeouts
# (which always fire first) before giving up on the loop thread itself.
_CALL_GRACE_S = 5.0


class _LoopThread:
    """An event loop running forever in a daemon thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self.loop.run_forever, name="mqd-client-sync", daemon=True
        )
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout_s: float | None) -> T:
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(timeout_s)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


class SyncQueue:
    """Blocking `Queue`: every coroutine method of Queue, called synchronously."""

    def __init__(self, owner: SyncClient, queue: Queue) -> None:
        self._owner = owner
        self._queue = queue
        self.name = queue.name

    def __getattr__(self, name: str) -> Any:
        return self._owner._wrap(getattr(self._queue, name))

    def __repr__(self) -> str:
        return f"<mqd.client.sync.SyncQueue {self.name!r}>"


class SyncClient:
    """Blocking `Client`. Queue-returning methods return SyncQueue."""

    def __init__(self, client: Client, loop_thread: _LoopThread, call_timeout_s: float) -> None:
        self._client = client
        self._loop_thread = loop_thread
        self._call_timeout_s = call_timeout_s

    def _wrap(self, attribute: Any) -> Any:
        if not callable(attribute) or not asyncio.iscoroutinefunction(attribute):
            return attribute

        def call(*args: Any, **kwargs: Any) -> Any:
            # A long-poll receive may wait up to `wait` seconds on top.
            timeout_s = self._call_timeout_s + float(kwargs.get("wait", 0) or 0)
            result = self._loop_thread.run(attribute(*args, **kwargs), timeout_s)
            return SyncQueue(self, result) if isinstance(result, Queue) else result

        call.__name__ = attribute.__name__
        call.__doc__ = attribute.__doc__
        return call

    def __getattr__(self, name: str) -> Any:
        return self._wrap(getattr(self._client, name))

    def queue(self, name: str) -> SyncQueue:
        return SyncQueue(self, self._client.queue(name))

    def close(self) -> None:
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


def connect(
    address: str | Sequence[str] = DEFAULT_ADDRESS,
    tls: Any = None,
    token: str | None = None,
    **options: Any,
) -> SyncClient:
    """Blocking `mqd.client.connect`: same arguments, returns a SyncClient."""
    loop_thread = _LoopThread()
    request_timeout = float(options.get("request_timeout", 30.0))
    connect_timeout = float(options.get("connect_timeout", 10.0))

    async def open_client() -> Client:
        client = Client(address, tls=tls, token=token, **options)
        return await client.connect()

    try:
        client = loop_thread.run(open_client(), connect_timeout * 2 + _CALL_GRACE_S)
    except BaseException:
        loop_thread.stop()
        raise
    return SyncClient(client, loop_thread, request_timeout + _CALL_GRACE_S)
