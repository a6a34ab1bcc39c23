"""The rules every SEND entry is held to (protocol.md §4.9), in one place.

The server checks them per request before anything is stored; a client splitting
a batch checks them first over the whole batch with what it knows (HELLO's
limits, a FIFO queue by its name), so a batch refused for its content stores
none of it. A limit the caller does not know is `math.inf`.
"""

from __future__ import annotations

from mqd.errors import InvalidArgument, MessageTooLarge
from mqd.protocol.codec import utf8_len
from mqd.protocol.messages import (
    ATTRIBUTE_NAME_CHARS,
    ATTRIBUTE_NAME_CHARS_MAX,
    DELAY_NONE,
    ID_CHARS_MAX,
    PRIORITY_MAX,
    SendEntry,
)


def check_send_entries(
    entries: list[SendEntry],
    *,
    message_bytes_max: float,
    size_limit: str,
    attributes_max: float,
    delay_ms_max: float,
    retention_ms: float,
    fifo: bool,
) -> None:
    """Raise for the first entry that breaks a rule, naming it by its position.
    `size_limit` says which limit `message_bytes_max` is, for the error: a template
    with one `{}` (formatted only then, not per request)."""
    for position, entry in enumerate(entries):
        size = len(entry.body)
        attributes = entry.attributes
        if attributes:
            if len(attributes) > attributes_max:
                raise InvalidArgument(
                    f"entry {position}: {len(attributes)} attributes; at most attributes_max={attributes_max}"
                )
            for key, value in attributes.items():
                if not 1 <= len(
                    key
                ) <= ATTRIBUTE_NAME_CHARS_MAX or not ATTRIBUTE_NAME_CHARS.issuperset(key):
                    shown = key if len(key) <= 80 else key[:80] + "…"  # not echoed whole
                    raise InvalidArgument(
                        f"entry {position}: attribute name {shown!r} must be 1-"
                        f"{ATTRIBUTE_NAME_CHARS_MAX} characters of A-Z a-z 0-9 _ . -"
                    )
                size += utf8_len(key) + utf8_len(value)
        if size > message_bytes_max:
            raise MessageTooLarge(
                f"entry {position}: {size} bytes (body + attributes); "
                + size_limit.format(message_bytes_max)
            )
        if entry.delay_ms and entry.delay_ms != DELAY_NONE:  # (0, the usual: the queue's)
            if entry.delay_ms > delay_ms_max:
                raise InvalidArgument(
                    f"entry {position}: delay_ms {entry.delay_ms} exceeds delay_ms_max={delay_ms_max}"
                )
            if entry.delay_ms >= retention_ms:
                raise InvalidArgument(
                    f"entry {position}: delay_ms {entry.delay_ms} is not shorter than the queue's "
                    f"retention ({retention_ms} ms): the message would expire before it could be received"
                )
        if entry.priority > PRIORITY_MAX:
            raise InvalidArgument(
                f"entry {position}: priority must be 0-{PRIORITY_MAX}, got {entry.priority}"
            )
        if fifo and not entry.group_id:
            raise InvalidArgument(
                f"entry {position}: a FIFO queue needs a group_id on every message"
            )
        if fifo and entry.priority:
            raise InvalidArgument(
                f"entry {position}: FIFO queues keep strict order; priority is for standard queues"
            )
        if len(entry.dedup_id) > ID_CHARS_MAX or len(entry.group_id) > ID_CHARS_MAX:
            raise InvalidArgument(
                f"entry {position}: group_id and dedup_id are at most {ID_CHARS_MAX} characters"
            )
