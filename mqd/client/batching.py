"""Building SEND entries and splitting batches to fit the server's limits.

Pure functions, no I/O. `Queue.send_batch` turns what the caller gives it into
`SendEntry` objects here, then `plan_chunks` cuts the list into consecutive
runs that each fit one request: at most `batch_messages_max` entries and at
most `frame_bytes_max` bytes of frame (protocol.md §1, the HELLO limits).

The frame size is estimated, never under: every variable-length field is
counted with the widest length prefix the codec could use, so an estimated
chunk always encodes to no more than its estimate. The estimate is cheap
(one `len` per body on the fast path) because it runs once per message.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from mqd.errors import InvalidArgument
from mqd.protocol.codec import utf8_len
from mqd.protocol.messages import DELAY_NONE, PRIORITY_MAX, SendEntry
from mqd.protocol.send_rules import check_send_entries

U8_MAX = 0xFF
U32_MAX = 0xFFFFFFFF

# Shared by every entry sent without attributes. The codec only reads it.
_NO_ATTRIBUTES: dict[str, str] = {}

# Fixed bytes of one SendEntry on the wire beyond its body and strings:
# body length u32, attribute count (≤ u32), delay u32, two string lengths
# (u16 each), priority u8 = 17; rounded up.
ENTRY_OVERHEAD_BYTES = 24
# Per attribute pair: two string length prefixes (u16 each), rounded up.
ATTRIBUTE_OVERHEAD_BYTES = 8
# A SEND request's bytes besides its entries: the 8-byte header, the queue
# name's length prefix and the entry count; the name itself is added by the caller.
REQUEST_OVERHEAD_BYTES = 32

_BYTES_LIKE = (bytes, bytearray, memoryview)
_ENTRY_KEYS = frozenset({"body", "attributes", "delay", "group_id", "dedup_id", "priority"})


def seconds_to_ms(value: Any, what: str, *, allow_none: bool = False) -> int:
    """Convert a non-negative number of seconds to wire milliseconds (u32)."""
    if value is None and allow_none:
        return U32_MAX
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidArgument(f"{what} must be a number of seconds, got {type(value).__name__}")
    if not math.isfinite(value):
        raise InvalidArgument(f"{what} must be a finite number of seconds, got {value}")
    ms = round(value * 1000)
    if ms < 0:
        raise InvalidArgument(f"{what} must be 0 seconds or more, got {value}")
    if ms >= U32_MAX:
        # U32_MAX itself is reserved (VISIBILITY_DEFAULT, DELAY_NONE), so it is excluded
        # too. The server's own, tighter range (protocol.md §5.1) is said by the server.
        raise InvalidArgument(
            f"{what} of {value} s is beyond the protocol's {(U32_MAX - 1) // 1000} s"
        )
    return ms


def _check_attributes(attributes: Any) -> dict[str, str]:
    if attributes is None:
        return _NO_ATTRIBUTES
    if not isinstance(attributes, Mapping):
        raise InvalidArgument(
            f"attributes must be a dict of str to str, got {type(attributes).__name__}"
        )
    for key, value in attributes.items():
        if type(key) is not str or type(value) is not str:
            raise InvalidArgument(
                f"attributes must map str to str, got {key!r}: {type(value).__name__}"
            )
    return attributes if type(attributes) is dict else dict(attributes)


def make_entry(
    body: Any,
    attributes: Mapping[str, str] | None = None,
    delay: float | None = None,
    group_id: str | None = None,
    dedup_id: str | None = None,
    priority: int = 0,
) -> SendEntry:
    """Build one SendEntry from the client-facing arguments of `Queue.send`.

    Only what the wire cannot carry is rejected here (types, negative or
    oversized numbers); the server judges every other range.
    """
    if type(body) is not bytes:
        if not isinstance(body, _BYTES_LIKE):
            raise InvalidArgument(
                f"a message body must be bytes, got {type(body).__name__}"
                + (" (encode str bodies first)" if isinstance(body, str) else "")
            )
        body = bytes(body)
    if group_id is None:
        group_id = ""
    elif type(group_id) is not str:
        raise InvalidArgument(f"group_id must be a str, got {type(group_id).__name__}")
    if dedup_id is None:
        dedup_id = ""
    elif type(dedup_id) is not str:
        raise InvalidArgument(f"dedup_id must be a str, got {type(dedup_id).__name__}")
    if type(priority) is not int or not 0 <= priority <= PRIORITY_MAX:
        # (The server's range, protocol.md §4.8: checked here before any chunk of a
        # split batch is sent, not after the earlier chunks were stored.)
        raise InvalidArgument(f"priority must be an int in [0, {PRIORITY_MAX}], got {priority!r}")
    # On the wire 0 means "the queue's delay", so a delay of none is DELAY_NONE;
    # a delay that rounds to 0 ms was asked for explicitly too.
    delay_ms = 0 if delay is None else seconds_to_ms(delay, "delay") or DELAY_NONE
    return SendEntry(body, _check_attributes(attributes), delay_ms, group_id, dedup_id, priority)


def make_entries(bodies: Iterable[Any]) -> list[SendEntry]:
    """Build entries for `send_batch`: each item is bytes or a dict of `send`'s arguments."""
    if isinstance(bodies, (*_BYTES_LIKE, str)):
        # Iterating one body gave its bytes as ints: "body must be bytes, got int".
        raise InvalidArgument(
            f"send_batch takes a list of bodies (or dicts), got one {type(bodies).__name__}; "
            "send_batch([body]) or send(body)"
        )
    entries = []
    append = entries.append
    for item in bodies:
        if type(item) is bytes:
            # The fast path: a bare body, no validation beyond its type.
            append(SendEntry(item, _NO_ATTRIBUTES, 0, "", "", 0))
        elif isinstance(item, Mapping):
            unknown = item.keys() - _ENTRY_KEYS
            if unknown or "body" not in item:
                raise InvalidArgument(
                    "a send_batch entry dict needs 'body' and may have only "
                    f"{sorted(_ENTRY_KEYS)}; got {sorted(item.keys())}"
                )
            append(make_entry(**item))
        else:
            append(make_entry(item))
    return entries


def entry_bytes(entry: SendEntry) -> int:
    """An upper bound on the encoded size of one SendEntry."""
    size = ENTRY_OVERHEAD_BYTES + len(entry.body)
    if entry.attributes:
        for key, value in entry.attributes.items():
            size += ATTRIBUTE_OVERHEAD_BYTES + utf8_len(key) + utf8_len(value)
    if entry.group_id:
        size += utf8_len(entry.group_id)
    if entry.dedup_id:
        size += utf8_len(entry.dedup_id)
    return size


def plan_chunks(
    entries: list[SendEntry], queue: str, batch_messages_max: int, frame_bytes_max: int
) -> list[tuple[int, int]]:
    """Cut `entries` into consecutive [start, end) runs that each fit one SEND request.

    A run holds at least one entry: an entry too big for any frame gets a run
    of its own and the request is refused when it is encoded, without being
    sent (a frame over the limit would make the server close the connection).
    """
    assert batch_messages_max >= 1 and frame_bytes_max >= 1
    fixed = REQUEST_OVERHEAD_BYTES + utf8_len(queue)
    chunks = []
    start = 0
    size = fixed
    count = 0
    for i, entry in enumerate(entries):
        if entry.attributes or entry.group_id or entry.dedup_id:
            n = entry_bytes(entry)
        else:
            n = ENTRY_OVERHEAD_BYTES + len(entry.body)
        if count and (count == batch_messages_max or size + n > frame_bytes_max):
            chunks.append((start, i))
            start = i
            size = fixed
            count = 0
        size += n
        count += 1
    if count:
        chunks.append((start, len(entries)))
    return chunks


def check_split_batch(entries: list[SendEntry], queue: str, limits: Mapping[str, Any]) -> None:
    """What the server would refuse in any request of a batch about to be split, as
    it would say it: checked before the first part is stored, so a batch refused for
    its content stores none of it (the server's check is per request). Only what a
    client knows: HELLO's limits and a FIFO queue by its name; a queue's own smaller
    `max_message_bytes`, or its retention, the server still judges request by request.
    """
    check_send_entries(
        entries,
        message_bytes_max=limits.get("message_bytes_max", math.inf),
        size_limit="at most message_bytes_max={}",
        attributes_max=limits.get("attributes_max", math.inf),
        delay_ms_max=limits.get("delay_ms_max", math.inf),
        retention_ms=math.inf,
        fifo=queue.endswith(".fifo"),
    )
