"""The native asyncio client of mqd (DESIGN.md §1).

    import mqd.client

    async with await mqd.client.connect("127.0.0.1:6470") as client:
        queue = await client.create_queue("jobs", exist_ok=True, visibility_timeout=30)
        await queue.send(b"hello")
        for message in await queue.receive(max_messages=10, wait=5):
            ...
            await queue.ack(message)

Layers (STYLE.md): `mqd.protocol` (codec, no I/O) → `transport` (asyncio
Protocol, coalesced writes) → `connection` (correlation ids, futures, HELLO,
limits, timeouts) → `client` (Client, Queue, Message); `sync` is a thin
blocking facade over it.
"""

from .client import DEFAULT_ADDRESS, Client, Queue, connect, parse_address
from .message import Message

__all__ = ["DEFAULT_ADDRESS", "Client", "Message", "Queue", "connect", "parse_address"]
