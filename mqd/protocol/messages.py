"""Typed bodies of every protocol v1 operation (protocol.md §4).

Each class lists its wire fields in order in `FIELDS` as (attribute, type)
pairs; `mqd.protocol.codec` turns that list into an encoder and a decoder.
The types are the names in `mqd.protocol.codec` (U8 … VALUE_MAP, and
`ListOf(type)` / `StructOf(cls)`). Field order is the wire order: change it
only together with protocol.md and its test vectors.

Times on the wire are integer milliseconds; the client API speaks seconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, ClassVar


class Opcode(IntEnum):
    """Operation codes (protocol.md §4). Internal node-to-node ops use 0x1000+."""

    HELLO = 0x0001
    PING = 0x0002
    CREATE_QUEUE = 0x0010
    DELETE_QUEUE = 0x0011
    GET_QUEUE = 0x0012
    LIST_QUEUES = 0x0013
    SET_QUEUE_ATTRIBUTES = 0x0014
    PURGE_QUEUE = 0x0015
    SEND = 0x0020
    RECEIVE = 0x0021
    DELETE = 0x0022
    CHANGE_VISIBILITY = 0x0023
    PEEK = 0x0024
    REDRIVE = 0x0025
    STATS = 0x0030


# A receive or peek request asks for the queue's default visibility timeout with this.
VISIBILITY_DEFAULT = 0xFFFFFFFF


# --- nested structures -------------------------------------------------------


@dataclass(slots=True)
class SendEntry:
    """One message of a SEND batch."""

    FIELDS: ClassVar[tuple] = (
        ("body", "BLOB"),
        ("attributes", "STR_MAP"),
        ("delay_ms", "U32"),
        ("group_id", "STR"),
        ("dedup_id", "STR"),
        ("priority", "U8"),
    )
    body: bytes
    attributes: dict[str, str] = field(default_factory=dict)
    delay_ms: int = 0
    group_id: str = ""
    dedup_id: str = ""
    priority: int = 0


@dataclass(slots=True)
class DeliveredMessage:
    """One message in a RECEIVE or PEEK response. `receipt` is empty for PEEK."""

    FIELDS: ClassVar[tuple] = (
        ("id", "STR"),
        ("receipt", "STR"),
        ("body", "BLOB"),
        ("attributes", "STR_MAP"),
        ("receive_count", "U32"),
        ("sent_at_ms", "U64"),
        ("first_received_at_ms", "U64"),
        ("group_id", "STR"),
        ("dedup_id", "STR"),
        ("source_queue", "STR"),
        ("original_id", "STR"),
    )
    id: str
    receipt: str
    body: bytes
    attributes: dict[str, str] = field(default_factory=dict)
    receive_count: int = 0
    sent_at_ms: int = 0
    first_received_at_ms: int = 0
    group_id: str = ""
    dedup_id: str = ""
    source_queue: str = ""
    original_id: str = ""


@dataclass(slots=True)
class VisibilityChange:
    """One entry of a CHANGE_VISIBILITY batch; 0 ms releases the message now."""

    FIELDS: ClassVar[tuple] = (("receipt", "STR"), ("timeout_ms", "U32"))
    receipt: str
    timeout_ms: int


@dataclass(slots=True)
class EntryFailure:
    """A per-entry failure inside a batch that otherwise took effect."""

    FIELDS: ClassVar[tuple] = (("index", "U32"), ("code", "U16"), ("message", "STR"))
    index: int
    code: int
    message: str


# --- errors --------------------------------------------------------------------


@dataclass(slots=True)
class ErrorBody:
    """Body of every frame with the ERROR flag (protocol.md §2)."""

    FIELDS: ClassVar[tuple] = (("code", "U16"), ("message", "STR"), ("details", "VALUE_MAP"))
    code: int
    message: str
    details: dict[str, Any] = field(default_factory=dict)


# --- requests and responses ----------------------------------------------------


@dataclass(slots=True)
class HelloRequest:
    OPCODE: ClassVar[Opcode] = Opcode.HELLO
    FIELDS: ClassVar[tuple] = (
        ("version_min", "U16"),
        ("version_max", "U16"),
        ("client_name", "STR"),
        ("token", "STR"),
    )
    version_min: int = 1
    version_max: int = 1
    client_name: str = ""
    token: str = ""


@dataclass(slots=True)
class HelloResponse:
    OPCODE: ClassVar[Opcode] = Opcode.HELLO
    FIELDS: ClassVar[tuple] = (
        ("version", "U16"),
        ("server_version", "STR"),
        ("node_id", "STR"),
        ("roles", "STR_LIST"),
        ("limits", "VALUE_MAP"),
    )
    version: int
    server_version: str
    node_id: str
    roles: list[str]
    limits: dict[str, Any]


@dataclass(slots=True)
class PingRequest:
    OPCODE: ClassVar[Opcode] = Opcode.PING
    FIELDS: ClassVar[tuple] = (("payload", "BLOB"),)
    payload: bytes = b""


@dataclass(slots=True)
class PingResponse:
    OPCODE: ClassVar[Opcode] = Opcode.PING
    FIELDS: ClassVar[tuple] = (("payload", "BLOB"), ("server_time_ms", "U64"))
    payload: bytes
    server_time_ms: int


@dataclass(slots=True)
class CreateQueueRequest:
    """Create a queue. With `exist_ok`, an existing queue with the same attributes is no error."""

    OPCODE: ClassVar[Opcode] = Opcode.CREATE_QUEUE
    FIELDS: ClassVar[tuple] = (("name", "STR"), ("attributes", "VALUE_MAP"), ("exist_ok", "BOOL"))
    name: str
    attributes: dict[str, Any] = field(default_factory=dict)
    exist_ok: bool = False


@dataclass(slots=True)
class QueueInfo:
    """A queue's attributes and live stats: the response of CREATE, GET and SET."""

    FIELDS: ClassVar[tuple] = (
        ("name", "STR"),
        ("attributes", "VALUE_MAP"),
        ("stats", "VALUE_MAP"),
    )
    name: str
    attributes: dict[str, Any]
    stats: dict[str, Any]


@dataclass(slots=True)
class CreateQueueResponse:
    OPCODE: ClassVar[Opcode] = Opcode.CREATE_QUEUE
    FIELDS: ClassVar[tuple] = (("queue", QueueInfo),)
    queue: QueueInfo


@dataclass(slots=True)
class DeleteQueueRequest:
    OPCODE: ClassVar[Opcode] = Opcode.DELETE_QUEUE
    FIELDS: ClassVar[tuple] = (("name", "STR"),)
    name: str


@dataclass(slots=True)
class DeleteQueueResponse:
    OPCODE: ClassVar[Opcode] = Opcode.DELETE_QUEUE
    FIELDS: ClassVar[tuple] = ()


@dataclass(slots=True)
class GetQueueRequest:
    OPCODE: ClassVar[Opcode] = Opcode.GET_QUEUE
    FIELDS: ClassVar[tuple] = (("name", "STR"),)
    name: str


@dataclass(slots=True)
class GetQueueResponse:
    OPCODE: ClassVar[Opcode] = Opcode.GET_QUEUE
    FIELDS: ClassVar[tuple] = (("queue", QueueInfo),)
    queue: QueueInfo


@dataclass(slots=True)
class ListQueuesRequest:
    OPCODE: ClassVar[Opcode] = Opcode.LIST_QUEUES
    FIELDS: ClassVar[tuple] = (("prefix", "STR"),)
    prefix: str = ""


@dataclass(slots=True)
class ListQueuesResponse:
    OPCODE: ClassVar[Opcode] = Opcode.LIST_QUEUES
    FIELDS: ClassVar[tuple] = (("names", "STR_LIST"),)
    names: list[str]


@dataclass(slots=True)
class SetQueueAttributesRequest:
    OPCODE: ClassVar[Opcode] = Opcode.SET_QUEUE_ATTRIBUTES
    FIELDS: ClassVar[tuple] = (("name", "STR"), ("attributes", "VALUE_MAP"))
    name: str
    attributes: dict[str, Any]


@dataclass(slots=True)
class SetQueueAttributesResponse:
    OPCODE: ClassVar[Opcode] = Opcode.SET_QUEUE_ATTRIBUTES
    FIELDS: ClassVar[tuple] = (("queue", QueueInfo),)
    queue: QueueInfo


@dataclass(slots=True)
class PurgeQueueRequest:
    OPCODE: ClassVar[Opcode] = Opcode.PURGE_QUEUE
    FIELDS: ClassVar[tuple] = (("name", "STR"),)
    name: str


@dataclass(slots=True)
class PurgeQueueResponse:
    OPCODE: ClassVar[Opcode] = Opcode.PURGE_QUEUE
    FIELDS: ClassVar[tuple] = (("purged", "U64"),)
    purged: int


@dataclass(slots=True)
class SendRequest:
    OPCODE: ClassVar[Opcode] = Opcode.SEND
    FIELDS: ClassVar[tuple] = (("queue", "STR"), ("entries", ("LIST", SendEntry)))
    queue: str
    entries: list[SendEntry]


@dataclass(slots=True)
class SendResponse:
    OPCODE: ClassVar[Opcode] = Opcode.SEND
    FIELDS: ClassVar[tuple] = (("message_ids", "STR_LIST"),)
    message_ids: list[str]


@dataclass(slots=True)
class ReceiveRequest:
    OPCODE: ClassVar[Opcode] = Opcode.RECEIVE
    FIELDS: ClassVar[tuple] = (
        ("queue", "STR"),
        ("max_messages", "U32"),
        ("wait_ms", "U32"),
        ("visibility_timeout_ms", "U32"),
    )
    queue: str
    max_messages: int = 1
    wait_ms: int = 0
    visibility_timeout_ms: int = VISIBILITY_DEFAULT


@dataclass(slots=True)
class ReceiveResponse:
    OPCODE: ClassVar[Opcode] = Opcode.RECEIVE
    FIELDS: ClassVar[tuple] = (("messages", ("LIST", DeliveredMessage)),)
    messages: list[DeliveredMessage]


@dataclass(slots=True)
class DeleteRequest:
    OPCODE: ClassVar[Opcode] = Opcode.DELETE
    FIELDS: ClassVar[tuple] = (("queue", "STR"), ("receipts", "STR_LIST"))
    queue: str
    receipts: list[str]


@dataclass(slots=True)
class DeleteResponse:
    OPCODE: ClassVar[Opcode] = Opcode.DELETE
    FIELDS: ClassVar[tuple] = (("failures", ("LIST", EntryFailure)),)
    failures: list[EntryFailure] = field(default_factory=list)


@dataclass(slots=True)
class ChangeVisibilityRequest:
    OPCODE: ClassVar[Opcode] = Opcode.CHANGE_VISIBILITY
    FIELDS: ClassVar[tuple] = (("queue", "STR"), ("changes", ("LIST", VisibilityChange)))
    queue: str
    changes: list[VisibilityChange]


@dataclass(slots=True)
class ChangeVisibilityResponse:
    OPCODE: ClassVar[Opcode] = Opcode.CHANGE_VISIBILITY
    FIELDS: ClassVar[tuple] = (("failures", ("LIST", EntryFailure)),)
    failures: list[EntryFailure] = field(default_factory=list)


@dataclass(slots=True)
class PeekRequest:
    OPCODE: ClassVar[Opcode] = Opcode.PEEK
    FIELDS: ClassVar[tuple] = (("queue", "STR"), ("max_messages", "U32"), ("after_id", "STR"))
    queue: str
    max_messages: int = 1
    # Peek resumes after this message id ("" = from the oldest), so `tail` can follow a queue.
    after_id: str = ""


@dataclass(slots=True)
class PeekResponse:
    OPCODE: ClassVar[Opcode] = Opcode.PEEK
    FIELDS: ClassVar[tuple] = (("messages", ("LIST", DeliveredMessage)),)
    messages: list[DeliveredMessage]


@dataclass(slots=True)
class RedriveRequest:
    """Move messages from a dead-letter queue back to their source queue (or `to`)."""

    OPCODE: ClassVar[Opcode] = Opcode.REDRIVE
    FIELDS: ClassVar[tuple] = (
        ("queue", "STR"),
        ("to", "STR"),
        ("max_messages", "U32"),
        ("rate_per_s", "U32"),
    )
    queue: str
    to: str = ""  # "" = each message's source queue
    max_messages: int = 0  # 0 = every ready message
    rate_per_s: int = 0  # 0 = as fast as the disk allows


@dataclass(slots=True)
class RedriveResponse:
    OPCODE: ClassVar[Opcode] = Opcode.REDRIVE
    FIELDS: ClassVar[tuple] = (("moved", "U64"), ("problems", "STR_LIST"))
    moved: int
    problems: list[str] = field(default_factory=list)


@dataclass(slots=True)
class StatsRequest:
    OPCODE: ClassVar[Opcode] = Opcode.STATS
    FIELDS: ClassVar[tuple] = ()


@dataclass(slots=True)
class StatsResponse:
    OPCODE: ClassVar[Opcode] = Opcode.STATS
    FIELDS: ClassVar[tuple] = (("stats", "VALUE_MAP"),)
    stats: dict[str, Any]


# The op table: one row per opcode, driving the server's dispatch, the client
# and the shell (STYLE.md "dispatch by table").
OPS: dict[Opcode, tuple[type, type]] = {
    Opcode.HELLO: (HelloRequest, HelloResponse),
    Opcode.PING: (PingRequest, PingResponse),
    Opcode.CREATE_QUEUE: (CreateQueueRequest, CreateQueueResponse),
    Opcode.DELETE_QUEUE: (DeleteQueueRequest, DeleteQueueResponse),
    Opcode.GET_QUEUE: (GetQueueRequest, GetQueueResponse),
    Opcode.LIST_QUEUES: (ListQueuesRequest, ListQueuesResponse),
    Opcode.SET_QUEUE_ATTRIBUTES: (SetQueueAttributesRequest, SetQueueAttributesResponse),
    Opcode.PURGE_QUEUE: (PurgeQueueRequest, PurgeQueueResponse),
    Opcode.SEND: (SendRequest, SendResponse),
    Opcode.RECEIVE: (ReceiveRequest, ReceiveResponse),
    Opcode.DELETE: (DeleteRequest, DeleteResponse),
    Opcode.CHANGE_VISIBILITY: (ChangeVisibilityRequest, ChangeVisibilityResponse),
    Opcode.PEEK: (PeekRequest, PeekResponse),
    Opcode.REDRIVE: (RedriveRequest, RedriveResponse),
    Opcode.STATS: (StatsRequest, StatsResponse),
}
