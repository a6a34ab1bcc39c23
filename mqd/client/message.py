"""The `Message` a consumer receives: a cheap, slotted view of a DeliveredMessage.

A receive of 1000 messages builds 1000 of these, so construction is one
positional `__init__` with no conversions; the times arrive as integer
milliseconds (protocol.md §4, "times on the wire") and are turned into float
seconds only when `sent_at` / `first_received_at` are read.
"""

from __future__ import annotations

from typing import Any


class Message:
    """One delivered message.

    `receipt` is the handle for `Queue.ack` / `change_visibility` / `nack`; it
    is "" for a message returned by `Queue.peek`. `queue` is the name of the
    queue it was received from. `source_queue` and `original_id` are set when
    the message was moved (e.g. dead-lettered) from another queue.
    """

    __slots__ = (
        "attributes",
        "body",
        "dedup_id",
        "first_received_at_ms",
        "group_id",
        "id",
        "original_id",
        "queue",
        "receipt",
        "receive_count",
        "sent_at_ms",
        "source_queue",
    )

    def __init__(
        self,
        id: str,
        receipt: str,
        body: bytes,
        attributes: dict[str, str],
        receive_count: int,
        sent_at_ms: int,
        first_received_at_ms: int,
        group_id: str,
        dedup_id: str,
        source_queue: str,
        original_id: str,
        queue: str,
    ) -> None:
        self.id = id
        self.receipt = receipt
        self.body = body
        self.attributes = attributes
        self.receive_count = receive_count
        self.sent_at_ms = sent_at_ms
        self.first_received_at_ms = first_received_at_ms
        self.group_id = group_id
        self.dedup_id = dedup_id
        self.source_queue = source_queue
        self.original_id = original_id
        self.queue = queue

    @property
    def sent_at(self) -> float:
        """When the message was accepted by the server, in seconds since the epoch."""
        return self.sent_at_ms / 1000.0

    @property
    def first_received_at(self) -> float:
        """When the message was first delivered, in seconds since the epoch (0.0 if never)."""
        return self.first_received_at_ms / 1000.0

    def to_dict(self) -> dict[str, Any]:
        """The message as a plain dict (for logging and the shell)."""
        return {name: getattr(self, name) for name in self.__slots__}

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Message):
            return NotImplemented
        return all(getattr(self, n) == getattr(other, n) for n in self.__slots__)

    __hash__ = None  # type: ignore[assignment]  # mutable, compared by value

    def __repr__(self) -> str:
        body = self.body if len(self.body) <= 32 else self.body[:32] + b"..."
        return (
            f"Message(id={self.id!r}, queue={self.queue!r}, body={body!r}, "
            f"receive_count={self.receive_count}, receipt={self.receipt!r})"
        )


def messages_from_delivered(delivered: list, queue: str) -> list[Message]:
    """Build Messages from a RECEIVE / PEEK response's DeliveredMessage list."""
    return [
        Message(
            d.id,
            d.receipt,
            d.body,
            d.attributes,
            d.receive_count,
            d.sent_at_ms,
            d.first_received_at_ms,
            d.group_id,
            d.dedup_id,
            d.source_queue,
            d.original_id,
            queue,
        )
        for d in delivered
    ]
