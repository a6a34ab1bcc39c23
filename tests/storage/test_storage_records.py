"""The record format: round trips (hypothesis) and damage detection, no I/O."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mqd.storage import Lease, NewMessage
from mqd.storage import records as rec

text = st.text(max_size=20)
messages = st.builds(
    NewMessage,
    body=st.binary(max_size=300),
    attributes=st.dictionaries(text, text, max_size=4),
    due_ms=st.integers(0, 2**63 - 1),
    group_id=text,
    dedup_id=text,
    priority=st.integers(-(2**31), 2**31 - 1),
    source_queue=text,
    original_id=text,
    receive_count=st.integers(0, 2**32 - 1),
)


@settings(max_examples=60, deadline=None)
@given(st.lists(messages, min_size=1, max_size=5), st.integers(0, 2**40))
def test_message_round_trip(msgs: list[NewMessage], first: int) -> None:
    parts: list[bytes] = []
    sizes: list[int] = []
    rec.encode_messages(msgs, first, 1234, parts, sizes)
    buf = b"".join(parts)
    rec.verify_buffer(buf, sizes)
    pos = 0
    for i, (m, size) in enumerate(zip(msgs, sizes, strict=True)):
        assert rec.check_record(buf, pos, len(buf), 1 << 20) == size
        r = rec.decode_record(buf, pos, size)
        assert isinstance(r, rec.MessageRecord)
        assert (r.offset, r.timestamp_ms, r.body, r.attributes) == (
            first + i, 1234, m.body, m.attributes,
        )  # fmt: skip
        assert (r.group_id, r.dedup_id, r.source_queue, r.original_id) == (
            m.group_id, m.dedup_id, m.source_queue, m.original_id,
        )  # fmt: skip
        assert (r.due_ms, r.priority, r.receive_count) == (m.due_ms, m.priority, m.receive_count)
        pos += size


def test_control_records_round_trip() -> None:
    d = rec.encode_delete(7, 99, [1, 2, 3])
    lease = rec.encode_lease(8, 99, [Lease(1, 2, 3, 4), Lease(5, 6, 7)])
    p = rec.encode_purge(9, 99, 5)
    for data, expected in [
        (d, rec.DeleteRecord(7, 99, (1, 2, 3))),
        (lease, rec.LeaseRecord(8, 99, [(1, 2, 3, 4), (5, 6, 7, 0)])),
        (p, rec.PurgeRecord(9, 99, 5)),
    ]:
        size = rec.check_record(data, 0, len(data), 1 << 20)
        assert size == len(data)
        assert rec.decode_record(data, 0, size) == expected


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_any_flipped_byte_is_detected(data) -> None:
    parts: list[bytes] = []
    rec.encode_messages([NewMessage(b"payload" * 5, {"a": "b"}, group_id="g")], 3, 1, parts, [])
    buf = bytearray(b"".join(parts))
    i = data.draw(st.integers(0, len(buf) - 1))
    buf[i] ^= data.draw(st.integers(1, 255))
    with pytest.raises(rec.CorruptRecord):
        rec.check_record(bytes(buf), 0, len(buf), 1 << 20)


def test_segment_header() -> None:
    header = rec.encode_header(42, 1000)
    assert len(header) == rec.HEADER_BYTES
    assert rec.read_header(header) == (rec.FORMAT_VERSION, 42, 1000)
    with pytest.raises(rec.CorruptRecord, match="magic"):
        rec.read_header(b"XXXX" + header[4:])
    with pytest.raises(rec.CorruptRecord, match="version"):
        rec.read_header(header[:4] + b"\x00\x63" + header[6:])
