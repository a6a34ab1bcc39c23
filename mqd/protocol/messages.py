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
    SUBSCRIBE = 0x0026
    GRANT = 0x0027
    UNSUBSCRIBE = 0x0028
    # Not a request: the opcode of the push frames of a subscription (protocol.md §4.18).
    DELIVER = 0x0029
    STATS = 0x0030
    REBALANCE = 0x0040
    DECOMMISSION = 0x0041
    # Internal ops: node to node over the mutually authenticated cluster port
    # (protocol.md §7). A client port answers them with UNKNOWN_OPCODE.
    REGISTER_NODE = 0x1001
    HEARTBEAT = 0x1002
    GET_PLACEMENT = 0x1003
    AUTH_SNAPSHOT = 0x1004
    CREATE_OWNED_QUEUE = 0x1005
    NODE_LEAVING = 0x1006
    PARTITION_CALL = 0x1010
    PARTITION_WAIT = 0x1011
    ACCEPT_MOVED = 0x1012
    ADOPT_PARTITION = 0x1020
    EXPORT_PARTITION = 0x1021
    FETCH_FILE = 0x1022
    RELEASE_PARTITION = 0x1023
    FETCH = 0x1030
    UPDATE_ISR = 0x1031


# A receive or peek request asks for the queue's default visibility timeout with this.
VISIBILITY_DEFAULT = 0xFFFFFFFF

# A SEND entry asks for no delay with this, whatever the queue's `delay` (its
# `delay_ms` 0 means "the queue's delay", so 0 itself cannot say "none").
DELAY_NONE = 0xFFFFFFFF

# SEND entry rules the server checks besides the HELLO limits (protocol.md §4.9);
# a client splitting a batch checks them first, before any part is stored.
ATTRIBUTE_NAME_CHARS = frozenset(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-"
)
ATTRIBUTE_NAME_CHARS_MAX = 64
PRIORITY_MAX = 9
ID_CHARS_MAX = 128  # group_id and dedup_id


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
class CreateOwnedQueueRequest:
    """CREATE_QUEUE from a frontend to metadata for a principal (protocol.md §7.18):
    the queue quota's check, the create and the creator grant as one step."""

    OPCODE: ClassVar[Opcode] = Opcode.CREATE_OWNED_QUEUE
    FIELDS: ClassVar[tuple] = (
        ("name", "STR"),
        ("attributes", "VALUE_MAP"),
        ("exist_ok", "BOOL"),
        ("owner", "STR"),
        ("owned_max", "U32"),
    )
    name: str
    attributes: dict[str, Any] = field(default_factory=dict)
    exist_ok: bool = False
    owner: str = ""
    owned_max: int = 0


@dataclass(slots=True)
class CreateOwnedQueueResponse:
    OPCODE: ClassVar[Opcode] = Opcode.CREATE_OWNED_QUEUE
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
class SubscribeRequest:
    """Open a push subscription (protocol.md §4.18): the server pushes up to `credits`
    messages, each leased for `visibility_timeout_ms`, as they become ready."""

    OPCODE: ClassVar[Opcode] = Opcode.SUBSCRIBE
    FIELDS: ClassVar[tuple] = (
        ("subscription_id", "U32"),
        ("queue", "STR"),
        ("credits", "U32"),
        ("visibility_timeout_ms", "U32"),
    )
    subscription_id: int
    queue: str
    credits: int = 0
    visibility_timeout_ms: int = VISIBILITY_DEFAULT


@dataclass(slots=True)
class SubscribeResponse:
    OPCODE: ClassVar[Opcode] = Opcode.SUBSCRIBE
    FIELDS: ClassVar[tuple] = (("visibility_timeout_ms", "U32"),)
    visibility_timeout_ms: int


@dataclass(slots=True)
class GrantRequest:
    """Allow a subscription `credits` more messages."""

    OPCODE: ClassVar[Opcode] = Opcode.GRANT
    FIELDS: ClassVar[tuple] = (("subscription_id", "U32"), ("credits", "U32"))
    subscription_id: int
    credits: int


@dataclass(slots=True)
class GrantResponse:
    """The subscription's credits after the grant: messages it may still push."""

    OPCODE: ClassVar[Opcode] = Opcode.GRANT
    FIELDS: ClassVar[tuple] = (("credits", "U32"),)
    credits: int


@dataclass(slots=True)
class UnsubscribeRequest:
    OPCODE: ClassVar[Opcode] = Opcode.UNSUBSCRIBE
    FIELDS: ClassVar[tuple] = (("subscription_id", "U32"),)
    subscription_id: int


@dataclass(slots=True)
class UnsubscribeResponse:
    OPCODE: ClassVar[Opcode] = Opcode.UNSUBSCRIBE
    FIELDS: ClassVar[tuple] = ()


@dataclass(slots=True)
class DeliverPush:
    """The body of a push frame (flags PUSH, opcode DELIVER, correlation id = the
    subscription id): messages now in flight for the subscriber (protocol.md §4.18)."""

    OPCODE: ClassVar[Opcode] = Opcode.DELIVER
    FIELDS: ClassVar[tuple] = (("messages", ("LIST", DeliveredMessage)),)
    messages: list[DeliveredMessage]


@dataclass(slots=True)
class StatsRequest:
    OPCODE: ClassVar[Opcode] = Opcode.STATS
    FIELDS: ClassVar[tuple] = ()


@dataclass(slots=True)
class StatsResponse:
    OPCODE: ClassVar[Opcode] = Opcode.STATS
    FIELDS: ClassVar[tuple] = (("stats", "VALUE_MAP"),)
    stats: dict[str, Any]


# --- internal ops (node to node) ----------------------------------------------


@dataclass(slots=True)
class NodeInfo:
    """A cluster member as the catalog knows it."""

    FIELDS: ClassVar[tuple] = (
        ("node_id", "STR"),
        ("roles", "STR_LIST"),
        ("client_address", "STR"),
        ("cluster_address", "STR"),
        ("up", "BOOL"),
    )
    node_id: str
    roles: list[str] = field(default_factory=list)
    client_address: str = ""
    cluster_address: str = ""
    up: bool = True


@dataclass(slots=True)
class PartitionPlacement:
    """Where one partition lives: its replicas (first = preferred leader), leader, epoch."""

    FIELDS: ClassVar[tuple] = (
        ("index", "U16"),
        ("replicas", "STR_LIST"),
        ("leader", "STR"),
        ("epoch", "U64"),
        ("isr", "STR_LIST"),
    )
    index: int
    replicas: list[str] = field(default_factory=list)
    leader: str = ""
    epoch: int = 0
    # The in-sync replicas (leader included): every one holds every committed record.
    isr: list[str] = field(default_factory=list)


@dataclass(slots=True)
class QueuePlacement:
    """A queue's catalog record and the placement of each of its partitions."""

    FIELDS: ClassVar[tuple] = (
        ("name", "STR"),
        ("queue_id", "BLOB"),
        ("attributes", "VALUE_MAP"),
        ("created_at_ms", "U64"),
        ("version", "U64"),
        ("partitions", ("LIST", PartitionPlacement)),
    )
    name: str
    queue_id: bytes
    attributes: dict[str, Any] = field(default_factory=dict)
    created_at_ms: int = 0
    version: int = 0
    partitions: list[PartitionPlacement] = field(default_factory=list)


@dataclass(slots=True)
class RegisterNodeRequest:
    OPCODE: ClassVar[Opcode] = Opcode.REGISTER_NODE
    FIELDS: ClassVar[tuple] = (("node", NodeInfo), ("rebooted_unclean", "BOOL"))
    node: NodeInfo
    # A backend whose machine restarted since it last stopped cleanly: its follower
    # copies may lack records they acknowledged (mqd.storage.boot).
    rebooted_unclean: bool = False


@dataclass(slots=True)
class RegisterNodeResponse:
    """The cluster-wide receipt secret travels only over the mutually authenticated port."""

    OPCODE: ClassVar[Opcode] = Opcode.REGISTER_NODE
    FIELDS: ClassVar[tuple] = (
        ("cluster_id", "STR"),
        ("receipt_secret", "BLOB"),
        ("placement_version", "U64"),
    )
    cluster_id: str
    receipt_secret: bytes
    placement_version: int


@dataclass(slots=True)
class HeartbeatRequest:
    OPCODE: ClassVar[Opcode] = Opcode.HEARTBEAT
    FIELDS: ClassVar[tuple] = (("node_id", "STR"), ("stats", "VALUE_MAP"))
    node_id: str
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class HeartbeatResponse:
    OPCODE: ClassVar[Opcode] = Opcode.HEARTBEAT
    FIELDS: ClassVar[tuple] = (("placement_version", "U64"),)
    placement_version: int


@dataclass(slots=True)
class NodeLeavingRequest:
    """A node stopping on purpose (protocol.md §7.19): down now, not after its session."""

    OPCODE: ClassVar[Opcode] = Opcode.NODE_LEAVING
    FIELDS: ClassVar[tuple] = (("node_id", "STR"),)
    node_id: str


@dataclass(slots=True)
class NodeLeavingResponse:
    OPCODE: ClassVar[Opcode] = Opcode.NODE_LEAVING
    FIELDS: ClassVar[tuple] = (("placement_version", "U64"),)
    placement_version: int


@dataclass(slots=True)
class GetPlacementRequest:
    """The whole placement once it is newer than `since_version` (a long poll up to `wait_ms`)."""

    OPCODE: ClassVar[Opcode] = Opcode.GET_PLACEMENT
    FIELDS: ClassVar[tuple] = (("since_version", "U64"), ("wait_ms", "U32"))
    since_version: int = 0
    wait_ms: int = 0


@dataclass(slots=True)
class GetPlacementResponse:
    OPCODE: ClassVar[Opcode] = Opcode.GET_PLACEMENT
    FIELDS: ClassVar[tuple] = (
        ("version", "U64"),
        ("queues", ("LIST", QueuePlacement)),
        ("nodes", ("LIST", NodeInfo)),
    )
    version: int
    queues: list[QueuePlacement] = field(default_factory=list)
    nodes: list[NodeInfo] = field(default_factory=list)


@dataclass(slots=True)
class AuthPrincipal:
    """A principal with a token, as the catalog stores it (protocol.md §8.1): never the
    token, only the scrypt verifier of its secret."""

    FIELDS: ClassVar[tuple] = (
        ("name", "STR"),
        ("token_id", "STR"),
        ("verifier", "STR"),
        ("created_at_ms", "U64"),
        ("limits", "VALUE_MAP"),
    )
    name: str
    token_id: str
    verifier: str
    created_at_ms: int = 0
    limits: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class AuthGrant:
    """A permission on a queue pattern; `owner`: a creator grant (protocol.md §8.2)."""

    FIELDS: ClassVar[tuple] = (
        ("principal", "STR"),
        ("pattern", "STR"),
        ("permission", "STR"),
        ("owner", "BOOL"),
    )
    principal: str
    pattern: str
    permission: str
    owner: bool = False


@dataclass(slots=True)
class AuthSnapshotRequest:
    """A frontend asks metadata for principals and grants unless it holds `since_version`
    already; `add_grants` (creator grants) are recorded first (protocol.md §7.17)."""

    OPCODE: ClassVar[Opcode] = Opcode.AUTH_SNAPSHOT
    FIELDS: ClassVar[tuple] = (
        ("since_version", "U64"),
        ("add_grants", ("LIST", AuthGrant)),
    )
    since_version: int = 0
    add_grants: list[AuthGrant] = field(default_factory=list)


@dataclass(slots=True)
class AuthSnapshotResponse:
    """`version` equal to the request's `since_version`: unchanged, and both lists empty."""

    OPCODE: ClassVar[Opcode] = Opcode.AUTH_SNAPSHOT
    FIELDS: ClassVar[tuple] = (
        ("version", "U64"),
        ("principals", ("LIST", AuthPrincipal)),
        ("grants", ("LIST", AuthGrant)),
    )
    version: int
    principals: list[AuthPrincipal] = field(default_factory=list)
    grants: list[AuthGrant] = field(default_factory=list)


@dataclass(slots=True)
class PartitionCallRequest:
    """A client op addressed to one partition: `body` is the op's request body."""

    OPCODE: ClassVar[Opcode] = Opcode.PARTITION_CALL
    FIELDS: ClassVar[tuple] = (
        ("queue_id", "BLOB"),
        ("partition", "U16"),
        ("epoch", "U64"),
        ("opcode", "U16"),
        ("body", "BLOB"),
    )
    queue_id: bytes
    partition: int
    epoch: int
    opcode: int
    body: bytes


@dataclass(slots=True)
class PartitionCallResponse:
    """The op's response body (an error comes back as an ordinary error frame)."""

    OPCODE: ClassVar[Opcode] = Opcode.PARTITION_CALL
    FIELDS: ClassVar[tuple] = (("body", "BLOB"),)
    body: bytes


@dataclass(slots=True)
class PartitionWaitRequest:
    """Wait up to `wait_ms` until the partition has a ready message; takes nothing."""

    OPCODE: ClassVar[Opcode] = Opcode.PARTITION_WAIT
    FIELDS: ClassVar[tuple] = (("queue_id", "BLOB"), ("partition", "U16"), ("wait_ms", "U32"))
    queue_id: bytes
    partition: int
    wait_ms: int


@dataclass(slots=True)
class PartitionWaitResponse:
    OPCODE: ClassVar[Opcode] = Opcode.PARTITION_WAIT
    FIELDS: ClassVar[tuple] = (("ready", "U32"),)
    ready: int


@dataclass(slots=True)
class MovedMessage:
    """A message moved between queues (dead-lettered or redriven), as stored."""

    FIELDS: ClassVar[tuple] = (
        ("body", "BLOB"),
        ("attributes", "STR_MAP"),
        ("group_id", "STR"),
        ("dedup_id", "STR"),
        ("priority", "U8"),
        ("source_queue", "STR"),
        ("original_id", "STR"),
        ("receive_count", "U32"),
    )
    body: bytes
    attributes: dict[str, str] = field(default_factory=dict)
    group_id: str = ""
    dedup_id: str = ""
    priority: int = 0
    source_queue: str = ""
    original_id: str = ""
    receive_count: int = 0


@dataclass(slots=True)
class AcceptMovedRequest:
    """Append moved messages to one partition of the queue `queue_id` (durable on reply)."""

    OPCODE: ClassVar[Opcode] = Opcode.ACCEPT_MOVED
    FIELDS: ClassVar[tuple] = (
        ("queue_id", "BLOB"),
        ("partition", "U16"),
        ("messages", ("LIST", MovedMessage)),
    )
    queue_id: bytes
    partition: int
    messages: list[MovedMessage]


@dataclass(slots=True)
class AcceptMovedResponse:
    OPCODE: ClassVar[Opcode] = Opcode.ACCEPT_MOVED
    FIELDS: ClassVar[tuple] = ()


@dataclass(slots=True)
class PartitionMove:
    """One step of a rebalance plan, and how it went."""

    FIELDS: ClassVar[tuple] = (
        ("queue", "STR"),
        ("partition", "U16"),
        ("source", "STR"),
        ("target", "STR"),
        ("status", "STR"),
    )
    queue: str
    partition: int
    source: str
    target: str
    status: str = "planned"


@dataclass(slots=True)
class RebalanceRequest:
    """Move partitions to where the ring over live backends puts them (admin)."""

    OPCODE: ClassVar[Opcode] = Opcode.REBALANCE
    FIELDS: ClassVar[tuple] = (("dry_run", "BOOL"),)
    dry_run: bool = False


@dataclass(slots=True)
class RebalanceResponse:
    OPCODE: ClassVar[Opcode] = Opcode.REBALANCE
    FIELDS: ClassVar[tuple] = (("moves", ("LIST", PartitionMove)), ("placement_version", "U64"))
    moves: list[PartitionMove] = field(default_factory=list)
    placement_version: int = 0


@dataclass(slots=True)
class DecommissionRequest:
    """Retire a backend for good: its replicas move to other backends (admin)."""

    OPCODE: ClassVar[Opcode] = Opcode.DECOMMISSION
    FIELDS: ClassVar[tuple] = (("node_id", "STR"),)
    node_id: str


@dataclass(slots=True)
class DecommissionResponse:
    """One entry per partition replica that moved (`source` = the retired node)."""

    OPCODE: ClassVar[Opcode] = Opcode.DECOMMISSION
    FIELDS: ClassVar[tuple] = (("moves", ("LIST", PartitionMove)), ("placement_version", "U64"))
    moves: list[PartitionMove] = field(default_factory=list)
    placement_version: int = 0


@dataclass(slots=True)
class AdoptPartitionRequest:
    """Metadata asks a backend to copy a partition from its current leader."""

    OPCODE: ClassVar[Opcode] = Opcode.ADOPT_PARTITION
    FIELDS: ClassVar[tuple] = (
        ("queue_id", "BLOB"),
        ("partition", "U16"),
        ("source_address", "STR"),
    )
    queue_id: bytes
    partition: int
    source_address: str


@dataclass(slots=True)
class AdoptPartitionResponse:
    OPCODE: ClassVar[Opcode] = Opcode.ADOPT_PARTITION
    FIELDS: ClassVar[tuple] = (("files", "U32"), ("bytes", "U64"))
    files: int
    bytes: int


@dataclass(slots=True)
class FileInfo:
    FIELDS: ClassVar[tuple] = (("name", "STR"), ("size", "U64"))
    name: str
    size: int


@dataclass(slots=True)
class ExportPartitionRequest:
    """Fence a partition (no more ops until released or the fence times out), make it
    durable and close it; list its log files for FETCH_FILE."""

    OPCODE: ClassVar[Opcode] = Opcode.EXPORT_PARTITION
    FIELDS: ClassVar[tuple] = (("queue_id", "BLOB"), ("partition", "U16"))
    queue_id: bytes
    partition: int


@dataclass(slots=True)
class ExportPartitionResponse:
    OPCODE: ClassVar[Opcode] = Opcode.EXPORT_PARTITION
    FIELDS: ClassVar[tuple] = (("files", ("LIST", FileInfo)),)
    files: list[FileInfo] = field(default_factory=list)


@dataclass(slots=True)
class FetchFileRequest:
    OPCODE: ClassVar[Opcode] = Opcode.FETCH_FILE
    FIELDS: ClassVar[tuple] = (
        ("queue_id", "BLOB"),
        ("partition", "U16"),
        ("name", "STR"),
        ("offset", "U64"),
        ("bytes_max", "U32"),
    )
    queue_id: bytes
    partition: int
    name: str
    offset: int
    bytes_max: int


@dataclass(slots=True)
class FetchFileResponse:
    OPCODE: ClassVar[Opcode] = Opcode.FETCH_FILE
    FIELDS: ClassVar[tuple] = (("data", "BLOB"), ("eof", "BOOL"))
    data: bytes
    eof: bool


@dataclass(slots=True)
class ReleasePartitionRequest:
    """After a move: `destroy` the old copy; after a failed move: lift the fence (destroy false)."""

    OPCODE: ClassVar[Opcode] = Opcode.RELEASE_PARTITION
    FIELDS: ClassVar[tuple] = (("queue_id", "BLOB"), ("partition", "U16"), ("destroy", "BOOL"))
    queue_id: bytes
    partition: int
    destroy: bool


@dataclass(slots=True)
class ReleasePartitionResponse:
    OPCODE: ClassVar[Opcode] = Opcode.RELEASE_PARTITION
    FIELDS: ClassVar[tuple] = ()


@dataclass(slots=True)
class FetchRequest:
    """A follower asks its leader for records from `from_offset`; asking acknowledges
    that it holds, durably, every record below `from_offset` (DESIGN.md §6)."""

    OPCODE: ClassVar[Opcode] = Opcode.FETCH
    FIELDS: ClassVar[tuple] = (
        ("queue_id", "BLOB"),
        ("partition", "U16"),
        ("epoch", "U64"),
        ("replica", "STR"),
        ("from_offset", "U64"),
        ("wait_ms", "U32"),
        ("bytes_max", "U32"),
    )
    queue_id: bytes
    partition: int
    epoch: int
    replica: str
    from_offset: int
    wait_ms: int = 0
    bytes_max: int = 1024 * 1024


@dataclass(slots=True)
class FetchResponse:
    OPCODE: ClassVar[Opcode] = Opcode.FETCH
    FIELDS: ClassVar[tuple] = (
        ("data", "BLOB"),
        ("next_offset", "U64"),
        ("leader_end", "U64"),
        ("high_watermark", "U64"),
    )
    data: bytes
    next_offset: int
    leader_end: int
    high_watermark: int


@dataclass(slots=True)
class UpdateIsrRequest:
    """A leader changes its partition's in-sync set; refused unless `epoch` is current."""

    OPCODE: ClassVar[Opcode] = Opcode.UPDATE_ISR
    FIELDS: ClassVar[tuple] = (
        ("queue_id", "BLOB"),
        ("partition", "U16"),
        ("epoch", "U64"),
        ("leader", "STR"),
        ("isr", "STR_LIST"),
    )
    queue_id: bytes
    partition: int
    epoch: int
    leader: str
    isr: list[str]


@dataclass(slots=True)
class UpdateIsrResponse:
    OPCODE: ClassVar[Opcode] = Opcode.UPDATE_ISR
    FIELDS: ClassVar[tuple] = (("placement_version", "U64"),)
    placement_version: int


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
    Opcode.SUBSCRIBE: (SubscribeRequest, SubscribeResponse),
    Opcode.GRANT: (GrantRequest, GrantResponse),
    Opcode.UNSUBSCRIBE: (UnsubscribeRequest, UnsubscribeResponse),
    Opcode.STATS: (StatsRequest, StatsResponse),
    Opcode.REGISTER_NODE: (RegisterNodeRequest, RegisterNodeResponse),
    Opcode.HEARTBEAT: (HeartbeatRequest, HeartbeatResponse),
    Opcode.GET_PLACEMENT: (GetPlacementRequest, GetPlacementResponse),
    Opcode.AUTH_SNAPSHOT: (AuthSnapshotRequest, AuthSnapshotResponse),
    Opcode.CREATE_OWNED_QUEUE: (CreateOwnedQueueRequest, CreateOwnedQueueResponse),
    Opcode.NODE_LEAVING: (NodeLeavingRequest, NodeLeavingResponse),
    Opcode.PARTITION_CALL: (PartitionCallRequest, PartitionCallResponse),
    Opcode.PARTITION_WAIT: (PartitionWaitRequest, PartitionWaitResponse),
    Opcode.ACCEPT_MOVED: (AcceptMovedRequest, AcceptMovedResponse),
    Opcode.REBALANCE: (RebalanceRequest, RebalanceResponse),
    Opcode.DECOMMISSION: (DecommissionRequest, DecommissionResponse),
    Opcode.ADOPT_PARTITION: (AdoptPartitionRequest, AdoptPartitionResponse),
    Opcode.EXPORT_PARTITION: (ExportPartitionRequest, ExportPartitionResponse),
    Opcode.FETCH_FILE: (FetchFileRequest, FetchFileResponse),
    Opcode.RELEASE_PARTITION: (ReleasePartitionRequest, ReleasePartitionResponse),
    Opcode.FETCH: (FetchRequest, FetchResponse),
    Opcode.UPDATE_ISR: (UpdateIsrRequest, UpdateIsrResponse),
}
INTERNAL_OPCODE_MIN = 0x1000
# Frames the server sends unasked (flags PUSH, protocol.md §4.18): opcode → body.
PUSHES: dict[Opcode, type] = {Opcode.DELIVER: DeliverPush}
