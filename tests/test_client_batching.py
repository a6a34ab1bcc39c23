"""Splitting SEND batches to the server's limits (mqd.client.batching): pure, no server."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mqd.client.batching import entry_bytes, make_entries, make_entry, plan_chunks
from mqd.errors import InvalidArgument, MessageTooLarge, ServerError
from mqd.protocol.codec import encode_request
from mqd.protocol.frame import PREFIX_BYTES
from mqd.protocol.messages import SendEntry, SendRequest

_text = st.text(max_size=20)
_entries = st.lists(
    st.builds(
        SendEntry,
        body=st.binary(max_size=300),
        attributes=st.dictionaries(_text, _text, max_size=3),
        delay_ms=st.integers(0, 10_000),
        group_id=_text,
        dedup_id=_text,
        priority=st.integers(0, 255),
    ),
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(
    entries=_entries,
    queue=st.text(min_size=1, max_size=30),
    batch_max=st.integers(1, 25),
    frame_max=st.integers(64, 5000),
)
def test_chunks_cover_the_batch_in_order_and_fit_the_limits(entries, queue, batch_max, frame_max):
    chunks = plan_chunks(entries, queue, batch_max, frame_max)
    assert [i for start, end in chunks for i in range(start, end)] == list(range(len(entries)))
    for start, end in chunks:
        assert 1 <= end - start <= batch_max
        frame = encode_request(1, SendRequest(queue, entries[start:end]))
        # A chunk over the frame limit is a single entry too big for any frame.
        assert len(frame) - PREFIX_BYTES <= frame_max or end - start == 1


@given(entry=_entries.filter(bool).map(lambda e: e[0]))
def test_entry_estimate_is_never_below_the_encoded_size(entry):
    alone = len(encode_request(1, SendRequest("q", [])))
    assert len(encode_request(1, SendRequest("q", [entry]))) - alone <= entry_bytes(entry)


def test_make_entries_accepts_bodies_and_dicts_and_converts_seconds():
    plain, rich = make_entries(
        [
            b"plain",
            {
                "body": b"rich",
                "attributes": {"k": "v"},
                "delay": 1.5,
                "group_id": "g",
                "dedup_id": "d",
                "priority": 3,
            },
        ]
    )
    assert plain == SendEntry(b"plain")
    assert rich == SendEntry(b"rich", {"k": "v"}, 1500, "g", "d", 3)
    assert make_entry(memoryview(b"mv")).body == b"mv"


@pytest.mark.parametrize(
    "bad",
    [
        "text",
        {"attributes": {}},
        {"body": b"x", "delay": "soon"},
        {"body": b"x", "group_id": 5},
        {"body": b"x", "priority": -1},
        {"body": b"x", "attributes": [("k", "v")]},
        {"body": b"x", "delay": 10**10},
    ],
)
def test_make_entries_rejects_what_the_wire_cannot_carry(bad):
    with pytest.raises(InvalidArgument):
        make_entries([bad])


async def test_a_split_batchs_error_names_the_callers_entry(client):
    # A batch over batch_messages_max goes out in chunks; an entry refused in a later
    # chunk was named by its place in that chunk ("entry 200" for the caller's 1200).
    queue = await client.create_queue("split-index", max_message_bytes=1024)
    chunk = client.server_limits["batch_messages_max"]
    bad = chunk + 200
    entries = [b"ok"] * (chunk + 300)
    entries[bad] = b"x" * 2048
    with pytest.raises(MessageTooLarge) as refused:
        await queue.send_batch(entries)
    assert refused.value.message.startswith(f"entry {bad}: ")
    assert len(refused.value.details["sent_message_ids"]) == chunk
    # (A queue's own smaller max_message_bytes is the server's to judge, so a
    # part was stored: the text says so, not only the details.)
    assert f"entries 0-{chunk - 1} of the batch were stored" in str(refused.value)
    # A priority the server refuses is refused before any chunk goes out.
    with pytest.raises(InvalidArgument, match="priority"):
        await queue.send_batch([b"a"] * chunk + [{"body": b"b", "priority": 10}])
    assert (await queue.stats())["sent_total"] == chunk


@pytest.mark.parametrize(
    ("bad", "refused"),
    [
        ({"body": b"x" * (1024 * 1024 + 1)}, "message_bytes_max"),
        ({"body": b"x", "attributes": {"": "v"}}, "attribute name"),
        ({"body": b"x", "delay": 8 * 86400}, "delay_ms_max"),
        ({"body": b"x", "dedup_id": "d" * 129}, "at most 128"),
    ],
)
async def test_a_split_batch_refused_for_its_content_stores_none_of_it(client, bad, refused):
    # Each request of a split batch was judged alone: 1,500 good entries and a bad
    # one at 1,500 stored the first 1,000 and then failed (a retry duplicated them).
    queue = await client.create_queue("split-precheck", exist_ok=True)
    chunk = client.server_limits["batch_messages_max"]
    entries: list = [b"ok"] * (chunk + 500)
    entries[chunk + 500 - 1] = bad
    with pytest.raises(ServerError, match=refused) as error:
        await queue.send_batch(entries)
    assert error.value.message.startswith(f"entry {chunk + 499}: ")
    assert "sent_message_ids" not in error.value.details
    assert (await queue.stats())["sent_total"] == 0


async def test_a_split_batch_to_a_fifo_queue_without_group_ids_stores_none(client):
    queue = await client.create_queue("split-precheck.fifo")
    chunk = client.server_limits["batch_messages_max"]
    entries = [{"body": b"ok", "group_id": "g"}] * chunk + [b"no group"]
    with pytest.raises(InvalidArgument, match="needs a group_id"):
        await queue.send_batch(entries)
    assert (await queue.stats())["sent_total"] == 0
