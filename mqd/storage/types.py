"""Values exchanged between the queue layer and the partition store."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class NewMessage:
    """What the queue layer appends on SEND."""

    body: bytes
    attributes: dict[str, str] = field(default_factory=dict)
    due_ms: int = 0  # wall-clock ms when it becomes deliverable; 0 = now
    group_id: str = ""
    dedup_id: str = ""
    priority: int = 0
    source_queue: str = ""  # for dead-lettered messages
    original_id: str = ""
    receive_count: int = 0  # carried over when dead-lettering


@dataclass(slots=True)
class MessageMeta:
    """The live state of one message, kept in memory by the queue layer."""

    offset: int  # log offset of its MESSAGE record = its identity within the partition
    sent_at_ms: int  # the record timestamp
    due_ms: int
    priority: int
    group_id: str
    dedup_id: str
    receive_count: int
    visible_at_ms: int  # 0 = not leased; otherwise the lease deadline
    first_received_at_ms: int  # 0 = never received
    size: int  # body bytes + attribute bytes


@dataclass(slots=True)
class StoredMessage:
    """A message body as `PartitionStore.read` returns it."""

    offset: int
    sent_at_ms: int
    body: bytes
    attributes: dict[str, str]
    group_id: str
    dedup_id: str
    source_queue: str
    original_id: str


@dataclass(slots=True)
class Lease:
    """A receive (receive_count already bumped by the caller) or a visibility change."""

    offset: int
    receive_count: int
    visible_at_ms: int  # 0 = released, visible now
    first_received_at_ms: int = 0
