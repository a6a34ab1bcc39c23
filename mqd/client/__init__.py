"""The native asyncio client of mqd (DESIGN.md §1).

    import mqd.client

    async with await mqd.client.connect("127.0.0.1:6470") as client:
        queue = await client.create_queue("jobs", exist_ok=True, visibility_timeout=30)
        await queue.send(b"hello")
        for message in await queue.receive(max_messages=10, wait=5):
            ...
            await queue.ack(message)
        await queue.run_consumer(handler, concurrency=8)  # ack / retry / leases done for you

Layers (STYLE.md): `mqd.protocol` (codec, no I/O) → `transport` (asyncio
Protocol, coalesced writes) → `connection` (correlation ids, futures, HELLO,
limits, timeouts) → `client` (Client, Queue, Message) and `consumer`
(MessageStream, Consumer); `sync` is a thin blocking facade over it.
"""

from . import sync  # `mqd.client.sync.connect(...)` after `import mqd.client`
from .client import (
    DEFAULT_ADDRESS,
    Client,
    Queue,
    RedriveResult,
    connect,
    parse_address,
    peek_cursor,
)
from .consumer import Consumer, ConsumerStats, MessageStream
from .message import Message

__all__ = [
    "DEFAULT_ADDRESS",
    "Client",
    "Consumer",
    "ConsumerStats",
    "Message",
    "MessageStream",
    "Queue",
    "RedriveResult",
    "connect",
    "parse_address",
    "peek_cursor",
    "sync",
]
