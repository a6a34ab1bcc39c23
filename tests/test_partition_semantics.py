"""Priorities, FIFO groups, dedup, dead letters and redrive on a manual clock."""

from __future__ import annotations

import asyncio
import random

import pytest

from mqd.clock import ManualClock
from mqd.partition import MOVING_MS, Partition
from mqd.protocol.messages import SendEntry
from mqd.receipts import ReceiptSigner, message_id
from mqd.storage import Lease, PartitionStore, StorageConfig

SIGNER = ReceiptSigner(b"s" * 32)
BYTES_MAX = 16 * 1024 * 1024
VIS = 30_000


async def open_partition(path, clock, *, queue_id=b"\x01" * 8, fifo=False, name="q") -> Partition:
    store = await PartitionStore.open(path, StorageConfig(), clock=clock)
    return Partition(queue_id, 0, store, SIGNER, clock=clock, fifo=fifo, name=name)


@pytest.fixture
def clock():
    return ManualClock()


@pytest.fixture
async def opened(tmp_path, clock):
    partitions: list[Partition] = []

    async def make(name="q", **kwargs) -> Partition:
        part = await open_partition(tmp_path / name, clock, name=name, **kwargs)
        partitions.append(part)
        return part

    yield make
    for part in partitions:
        await part.close()


async def receive(part: Partition, n: int = 10, vis: int = VIS):
    return await part.receive(n, 0, vis, bytes_max=BYTES_MAX)


# --- priorities -------------------------------------------------------------------


async def test_higher_priority_first_fifo_within_priority(opened):
    part = await opened()
    await part.send(
        [SendEntry(b"low1"), SendEntry(b"high1", priority=9), SendEntry(b"mid", priority=5)], 0
    )
    await part.send([SendEntry(b"high2", priority=9), SendEntry(b"low2")], 0)
    got = await receive(part)
    assert [m.body for m in got] == [b"high1", b"high2", b"mid", b"low1", b"low2"]


# --- FIFO -------------------------------------------------------------------------


async def test_fifo_holds_a_group_while_in_flight(opened):
    part = await opened(fifo=True, name="q.fifo")
    await part.send([SendEntry(b"a1", group_id="a"), SendEntry(b"a2", group_id="a")], 0)
    await part.send([SendEntry(b"b1", group_id="b")], 0)
    first = await receive(part, 1)
    assert [m.body for m in first] == [b"a1"]
    # a2 waits behind a1; b is free.
    second = await receive(part, 10)
    assert [m.body for m in second] == [b"b1"]
    assert await receive(part, 10) == []
    await part.delete([first[0].receipt])
    third = await receive(part, 10)
    assert [m.body for m in third] == [b"a2"]


async def test_fifo_redelivers_the_head_after_timeout(opened, clock):
    part = await opened(fifo=True, name="q.fifo")
    await part.send([SendEntry(b"x%d" % i, group_id="g") for i in range(3)], 0)
    got = await receive(part, 2, vis=1_000)
    assert [m.body for m in got] == [b"x0", b"x1"]
    await part.delete([got[1].receipt])
    clock.advance(1_000)
    again = await receive(part, 10)
    assert [m.body for m in again] == [b"x0", b"x2"]


async def test_fifo_order_with_many_groups_and_concurrent_consumers(opened):
    part = await opened(fifo=True, name="q.fifo")
    groups = 50
    per_group = 20
    entries = [
        SendEntry(b"%d:%d" % (g, i), group_id=f"g{g}")
        for i in range(per_group)
        for g in range(groups)
    ]
    random.Random(7).shuffle(entries)
    # Order within a group is send order, so re-sort each group's entries by index first.
    entries.sort(key=lambda e: int(e.body.split(b":")[1]))
    for start in range(0, len(entries), 100):
        await part.send(entries[start : start + 100], 0)
    seen: dict[str, list[int]] = {}

    async def consumer() -> None:
        for _ in range(2000):
            batch = await part.receive(7, 0, VIS, bytes_max=BYTES_MAX)
            if not batch:
                if sum(len(v) for v in seen.values()) >= groups * per_group:
                    return
                await asyncio.sleep(0)
                continue
            for message in batch:
                seen.setdefault(message.group_id, []).append(int(message.body.split(b":")[1]))
            await asyncio.sleep(0)
            await part.delete([m.receipt for m in batch])

    await asyncio.wait_for(asyncio.gather(*(consumer() for _ in range(10))), 30)
    assert len(seen) == groups
    for group, indexes in seen.items():
        assert indexes == list(range(per_group)), group


# --- dedup ------------------------------------------------------------------------


async def test_dedup_window_returns_the_original_id(opened, clock):
    part = await opened()
    part.dedup_window_ms = 300_000
    (first,) = await part.send([SendEntry(b"pay", dedup_id="order-1")], 0)
    (again,) = await part.send([SendEntry(b"pay (retry)", dedup_id="order-1")], 0)
    assert again == first
    ids = await part.send(
        [SendEntry(b"x", dedup_id="order-2"), SendEntry(b"x", dedup_id="order-2"), SendEntry(b"y")],
        0,
    )
    assert ids[0] == ids[1] != ids[2]
    assert part.stats()["visible"] == 3
    assert part.stats()["deduplicated_total"] == 2
    clock.advance(300_001)
    (later,) = await part.send([SendEntry(b"pay", dedup_id="order-1")], 0)
    assert later != first


async def test_concurrent_duplicate_sends_enqueue_once(opened):
    part = await opened()
    results = await asyncio.gather(
        *(part.send([SendEntry(b"same", dedup_id="d")], 0) for _ in range(20))
    )
    assert len({ids[0] for ids in results}) == 1
    assert part.stats()["visible"] == 1


async def test_content_based_dedup(opened):
    part = await opened()
    part.content_based_dedup = True
    a = await part.send([SendEntry(b"body")], 0)
    b = await part.send([SendEntry(b"body")], 0)
    c = await part.send([SendEntry(b"other")], 0)
    assert a == b != c


async def test_dedup_survives_reopen(tmp_path, clock):
    part = await open_partition(tmp_path / "q", clock)
    (first,) = await part.send([SendEntry(b"x", dedup_id="k")], 0)
    await part.close()
    part = await open_partition(tmp_path / "q", clock)
    try:
        (again,) = await part.send([SendEntry(b"x", dedup_id="k")], 0)
        assert again == first
        assert part.stats()["visible"] == 1
    finally:
        await part.close()


# --- dead letters -------------------------------------------------------------------


def wire_dead_letters(source: Partition, dlq: Partition, max_receive_count: int) -> None:
    async def sink(name: str, messages) -> None:
        assert name == dlq.name
        await dlq.accept_dead_letters(messages)

    source.dead_letter_queue = dlq.name
    source.max_receive_count = max_receive_count
    source.dead_letter_sink = sink


async def test_message_moves_to_dlq_after_max_receives(opened):
    source = await opened("src")
    dlq = await opened("dlq", queue_id=b"\x02" * 8)
    wire_dead_letters(source, dlq, 2)
    (sent_id,) = await source.send([SendEntry(b"poison", attributes={"k": "v"})], 0)
    for expected_count in (1, 2):
        got = await receive(source, 1)
        assert got[0].body == b"poison" and got[0].receive_count == expected_count
        await source.change_visibility([(got[0].receipt, 0)])
    await source.send([SendEntry(b"fine")], 0)
    # The third delivery would exceed 2: the poison message moves, `fine` is delivered.
    got = await receive(source, 10)
    assert [m.body for m in got] == [b"fine"]
    assert source.stats()["dead_lettered_total"] == 1
    (dead,) = await receive(dlq, 10)
    assert dead.body == b"poison" and dead.attributes == {"k": "v"}
    assert dead.source_queue == "src" and dead.original_id == sent_id
    assert dead.receive_count == 3  # the DLQ's first delivery counts on from the source's


async def test_a_fifo_message_taken_while_a_move_runs_is_not_delivered_twice(opened):
    # RECEIVE A takes [d, x1]; d goes to the DLQ, and while that move runs a send to
    # x1's group lists the group again. RECEIVE B must not get x1 if A does too: A
    # gives x1 back before the move and takes again after it.
    source = await opened("race.fifo", fifo=True)
    dlq = await opened("dlq.fifo", queue_id=b"\x02" * 8, fifo=True)
    wire_dead_letters(source, dlq, 1)
    gate = asyncio.Event()
    move = source.dead_letter_sink

    async def gated_sink(name: str, messages) -> None:
        await gate.wait()
        await move(name, messages)

    source.dead_letter_sink = gated_sink
    await source.send([SendEntry(b"d", group_id="D")], 0)
    (d,) = await receive(source, 1)
    await source.change_visibility([(d.receipt, 0)])
    await source.send([SendEntry(b"x1", group_id="X")], 0)
    a = asyncio.create_task(receive(source, 10))
    for _ in range(50):  # until A waits in the move
        if source.stats()["in_flight"]:
            break
        await asyncio.sleep(0.01)
    await source.send([SendEntry(b"x2", group_id="X")], 0)
    b = await receive(source, 10)
    gate.set()
    a_got = await asyncio.wait_for(a, 10)
    assert [m.body for m in b] == [b"x1", b"x2"]
    assert a_got == []  # X is in flight with B; D's head moved and D is empty
    (dead,) = await receive(dlq, 10)
    assert dead.body == b"d"


async def test_a_fifo_receive_that_moves_a_head_leaves_the_rest_of_its_group(opened):
    # protocol.md §4.0: the other messages of the moved message's group are not
    # delivered by that RECEIVE (the next one gets them, in order).
    source = await opened("rest.fifo", fifo=True)
    dlq = await opened("dlq2.fifo", queue_id=b"\x02" * 8, fifo=True)
    wire_dead_letters(source, dlq, 1)
    await source.send([SendEntry(b"m1", group_id="g")], 0)
    (m1,) = await receive(source, 1)
    await source.change_visibility([(m1.receipt, 0)])
    await source.send([SendEntry(b"m2", group_id="g"), SendEntry(b"m3", group_id="g")], 0)
    assert await receive(source, 10) == []
    assert [m.body for m in await receive(source, 10)] == [b"m2", b"m3"]


async def test_interrupted_move_is_finished_on_restart(tmp_path, clock):
    """Crash after the mark, before the DLQ append: the restart moves it exactly once."""
    source = await open_partition(tmp_path / "src", clock, name="src")
    (sent_id,) = await source.send([SendEntry(b"m")], 0)
    (got,) = await receive(source, 1)
    await source.store.lease([Lease(0, got.receive_count, MOVING_MS, 0)])
    await source.close()

    source = await open_partition(tmp_path / "src", clock, name="src")
    dlq = await open_partition(tmp_path / "dlq", clock, queue_id=b"\x02" * 8, name="dlq")
    try:
        wire_dead_letters(source, dlq, 1)
        assert len(source.pending_moves) == 1

        async def ids_in(name: str) -> set[str]:
            return await dlq.original_ids_from("src")

        await source.recover_moves(ids_in)
        assert source.stats()["visible"] + source.stats()["in_flight"] == 0
        assert [m.original_id for m in await receive(dlq)] == [sent_id]
    finally:
        await source.close()
        await dlq.close()


async def test_interrupted_move_after_dlq_append_is_not_duplicated(tmp_path, clock):
    """Crash after the DLQ append, before the source delete: the restart only deletes."""
    source = await open_partition(tmp_path / "src", clock, name="src")
    dlq = await open_partition(tmp_path / "dlq", clock, queue_id=b"\x02" * 8, name="dlq")
    (sent_id,) = await source.send([SendEntry(b"m")], 0)
    (got,) = await receive(source, 1)
    await source.store.lease([Lease(0, got.receive_count, MOVING_MS, 0)])
    record = (await source.store.read([0]))[0]
    copy = source._dead_letter_copy(source._metas[0], record)
    await dlq.accept_dead_letters([copy])
    await source.close()
    await dlq.close()

    source = await open_partition(tmp_path / "src", clock, name="src")
    dlq = await open_partition(tmp_path / "dlq", clock, queue_id=b"\x02" * 8, name="dlq")
    try:
        wire_dead_letters(source, dlq, 1)

        async def ids_in(name: str) -> set[str]:
            return await dlq.original_ids_from("src")

        await source.recover_moves(ids_in)
        assert len(source._metas) == 0
        assert [m.original_id for m in await receive(dlq)] == [sent_id]
    finally:
        await source.close()
        await dlq.close()


async def test_old_receipt_after_dead_lettering_does_not_touch_the_dlq_copy(opened):
    source = await opened("src")
    dlq = await opened("dlq", queue_id=b"\x02" * 8)
    wire_dead_letters(source, dlq, 1)
    await source.send([SendEntry(b"m")], 0)
    (got,) = await receive(source, 1)
    await source.change_visibility([(got.receipt, 0)])
    assert await receive(source) == []
    # The source no longer has the message: the ack is an idempotent no-op there.
    assert await source.delete([got.receipt]) == []
    assert len(await receive(dlq)) == 1


async def test_redrive_moves_back_oldest_first(opened):
    source = await opened("src")
    dlq = await opened("dlq", queue_id=b"\x02" * 8)
    wire_dead_letters(source, dlq, 1)
    ids = await source.send([SendEntry(b"%d" % i) for i in range(5)], 0)
    got = await receive(source, 5)
    await source.change_visibility([(m.receipt, 0) for m in got])
    assert await receive(source) == []
    assert dlq.stats()["visible"] == 5

    async def sink(name, messages):
        assert name == "src"
        await source.accept_dead_letters(messages)

    moved, problems = await dlq.redrive(sink, to="", max_messages=3, rate_per_s=0)
    assert (moved, problems) == (3, [])
    back = await receive(source, 10)
    assert [m.body for m in back] == [b"0", b"1", b"2"]
    assert [m.original_id for m in back] == ids[:3]
    assert all(m.receive_count == 1 for m in back)
    moved, _ = await dlq.redrive(sink, to="", max_messages=0, rate_per_s=0)
    assert moved == 2 and dlq.stats()["visible"] == 0


async def test_message_ids_embed_the_queue(opened):
    part = await opened()
    (sent,) = await part.send([SendEntry(b"x")], 0)
    assert sent == message_id(b"\x01" * 8, 0, 0)
