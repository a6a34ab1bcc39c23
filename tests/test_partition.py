"""Queue semantics of one partition on a manual clock, over a real store in tmp_path."""

from __future__ import annotations

import asyncio

import pytest

from mqd.clock import ManualClock
from mqd.errors import ErrorCode
from mqd.partition import Partition
from mqd.protocol.messages import SendEntry
from mqd.receipts import ReceiptSigner
from mqd.storage import PartitionStore, StorageConfig

QUEUE_ID = b"\x01" * 8
SIGNER = ReceiptSigner(b"s" * 32)
BYTES_MAX = 16 * 1024 * 1024


async def open_partition(path, clock) -> Partition:
    store = await PartitionStore.open(path, StorageConfig(), clock=clock)
    return Partition(QUEUE_ID, 0, store, SIGNER, clock=clock)


@pytest.fixture
def clock():
    return ManualClock()


@pytest.fixture
async def partition(tmp_path, clock):
    part = await open_partition(tmp_path / "p", clock)
    yield part
    await part.close()


async def send(part: Partition, *bodies: bytes, delay_ms: int = 0) -> list[str]:
    return await part.send([SendEntry(body, delay_ms=delay_ms) for body in bodies], 0)


async def test_receive_returns_all_ready_up_to_max(partition):
    await send(partition, *(b"m%d" % i for i in range(10)))
    got = await partition.receive(7, 0, 30_000, bytes_max=BYTES_MAX)
    assert [m.body for m in got] == [b"m%d" % i for i in range(7)]
    got = await partition.receive(7, 0, 30_000, bytes_max=BYTES_MAX)
    assert [m.body for m in got] == [b"m7", b"m8", b"m9"]
    assert partition.stats()["in_flight"] == 10


async def test_visibility_timeout_redelivers_and_old_receipt_dies(partition, clock):
    await send(partition, b"job")
    (first,) = await partition.receive(1, 0, 30_000, bytes_max=BYTES_MAX)
    assert first.receive_count == 1
    assert await partition.receive(1, 0, 30_000, bytes_max=BYTES_MAX) == []
    clock.advance(29_999)
    assert await partition.receive(1, 0, 30_000, bytes_max=BYTES_MAX) == []
    clock.advance(1)
    (second,) = await partition.receive(1, 0, 30_000, bytes_max=BYTES_MAX)
    assert second.id == first.id and second.receive_count == 2
    failures = await partition.delete([first.receipt])
    assert [f.code for f in failures] == [ErrorCode.RECEIPT_INVALID]
    assert await partition.delete([second.receipt]) == []
    assert partition.stats()["in_flight"] == 0
    clock.advance(60_000)
    assert await partition.receive(1, 0, 30_000, bytes_max=BYTES_MAX) == []


async def test_an_expired_lease_cannot_be_extended_back_into_flight(partition, clock):
    # A late heartbeat (CHANGE_VISIBILITY) revived it: the ready message was hidden
    # again and, on a FIFO queue, held its group for the new timeout (review).
    await send(partition, b"late")
    (message,) = await partition.receive(1, 0, 1_000, bytes_max=BYTES_MAX)
    assert await partition.change_visibility([(message.receipt, 1_000)]) == []  # in flight
    clock.advance(5_000)
    (refused,) = await partition.change_visibility([(message.receipt, 600_000)])
    assert refused.code == ErrorCode.RECEIPT_INVALID and "not in flight" in refused.message
    assert partition.stats()["visible"] == 1 and partition.stats()["in_flight"] == 0
    assert await partition.change_visibility([(message.receipt, 0)]) == []  # a no-op
    assert await partition.delete([message.receipt]) == []  # still acks until redelivered


async def test_expired_lease_can_still_ack_until_redelivered(partition, clock):
    await send(partition, b"slow")
    (message,) = await partition.receive(1, 0, 1_000, bytes_max=BYTES_MAX)
    clock.advance(5_000)
    assert await partition.delete([message.receipt]) == []
    assert partition.stats()["visible"] == 0


async def test_ack_is_idempotent(partition):
    await send(partition, b"x")
    (message,) = await partition.receive(1, 0, 30_000, bytes_max=BYTES_MAX)
    assert await partition.delete([message.receipt]) == []
    assert await partition.delete([message.receipt]) == []
    assert partition.stats()["acked_total"] == 1


async def test_change_visibility_extends_and_releases(partition, clock):
    await send(partition, b"a")
    (message,) = await partition.receive(1, 0, 10_000, bytes_max=BYTES_MAX)
    assert await partition.change_visibility([(message.receipt, 60_000)]) == []
    clock.advance(30_000)
    assert await partition.receive(1, 0, 10_000, bytes_max=BYTES_MAX) == []
    assert await partition.change_visibility([(message.receipt, 0)]) == []
    (again,) = await partition.receive(1, 0, 10_000, bytes_max=BYTES_MAX)
    assert again.receive_count == 2
    failures = await partition.change_visibility([(message.receipt, 5_000), (again.receipt, 5_000)])
    assert [f.index for f in failures] == [0]


async def test_delay_hides_until_due(partition, clock):
    await send(partition, b"later", delay_ms=5_000)
    await send(partition, b"now")
    stats = partition.stats()
    assert stats["delayed"] == 1 and stats["visible"] == 1
    got = await partition.receive(10, 0, 30_000, bytes_max=BYTES_MAX)
    assert [m.body for m in got] == [b"now"]
    clock.advance(5_000)
    got = await partition.receive(10, 0, 30_000, bytes_max=BYTES_MAX)
    assert [m.body for m in got] == [b"later"]


async def test_long_poll_wakes_on_send(partition):
    waiter = asyncio.create_task(partition.receive(1, 10_000, 30_000, bytes_max=BYTES_MAX))
    await asyncio.sleep(0.05)
    assert not waiter.done()
    await send(partition, b"wake")
    got = await asyncio.wait_for(waiter, 5)
    assert [m.body for m in got] == [b"wake"]


async def test_long_poll_wakes_on_release(partition):
    await send(partition, b"x")
    (message,) = await partition.receive(1, 0, 30_000, bytes_max=BYTES_MAX)
    waiter = asyncio.create_task(partition.receive(1, 10_000, 30_000, bytes_max=BYTES_MAX))
    await asyncio.sleep(0.05)
    assert not waiter.done()
    await partition.change_visibility([(message.receipt, 0)])
    got = await asyncio.wait_for(waiter, 5)
    assert got[0].receive_count == 2


@pytest.mark.parametrize("look", ["stats", "peek"])
async def test_a_look_that_finds_a_message_due_wakes_the_long_poll(partition, clock, look):
    # The look makes the delayed message ready; before, it left the waiting receive
    # asleep (its timer then found nothing to do) until its wait ran out.
    await send(partition, b"late", delay_ms=60_000)
    waiter = asyncio.create_task(partition.receive(1, 120_000, 30_000, bytes_max=BYTES_MAX))
    await asyncio.sleep(0.05)
    clock.advance(60_000)
    if look == "stats":
        assert partition.stats()["visible"] == 1
    else:
        assert [m.body for m in await partition.peek(10, -1, bytes_max=1 << 24)] == [b"late"]
    got = await asyncio.wait_for(waiter, 5)
    assert [m.body for m in got] == [b"late"]


async def test_state_survives_reopen(tmp_path, clock):
    part = await open_partition(tmp_path / "p", clock)
    await send(part, b"a", b"b", b"c")
    await send(part, b"d", delay_ms=60_000)
    got = await part.receive(2, 0, 30_000, bytes_max=BYTES_MAX)
    await part.delete([got[0].receipt])
    await part.close()

    part = await open_partition(tmp_path / "p", clock)
    try:
        stats = part.stats()
        assert (stats["visible"], stats["in_flight"], stats["delayed"]) == (1, 1, 1)
        # The surviving receipt of the in-flight message still acks after the restart.
        assert await part.delete([got[1].receipt]) == []
        clock.advance(60_000)
        rest = await part.receive(10, 0, 30_000, bytes_max=BYTES_MAX)
        assert sorted(m.body for m in rest) == [b"c", b"d"]
    finally:
        await part.close()


async def test_purge_and_peek(partition):
    ids = await send(partition, b"1", b"2", b"3")
    peeked = await partition.peek(2, -1, bytes_max=1 << 24)
    assert [m.id for m in peeked] == ids[:2]
    assert all(m.receipt == "" for m in peeked)
    assert partition.stats()["visible"] == 3
    assert await partition.purge() == 3
    assert partition.stats()["visible"] == 0
    assert await partition.receive(10, 0, 30_000, bytes_max=BYTES_MAX) == []


async def test_receive_respects_response_bytes(partition):
    await send(partition, *(b"x" * 1000 for _ in range(10)))
    got = await partition.receive(10, 0, 30_000, bytes_max=3 * 1300)
    assert 1 <= len(got) < 10
    rest = await partition.receive(10, 0, 30_000, bytes_max=BYTES_MAX)
    assert len(got) + len(rest) == 10


async def test_retention_drops_old_messages_in_any_state(partition, clock):
    partition.retention_ms = 60_000
    await send(partition, b"old-ready", b"old-leased")
    await partition.receive(1, 0, 30_000, bytes_max=BYTES_MAX)
    clock.advance(30_000)
    await send(partition, b"young")
    assert await partition.expire() == 0
    clock.advance(30_001)
    assert await partition.expire() == 2
    stats = partition.stats()
    assert stats["expired_total"] == 2
    assert (stats["visible"], stats["in_flight"]) == (1, 0)
    got = await partition.receive(10, 0, 30_000, bytes_max=BYTES_MAX)
    assert [m.body for m in got] == [b"young"]


@pytest.mark.parametrize("turns", [0, 1, 2, 3])
async def test_sends_committed_while_a_purge_is_written_stay_visible(tmp_path, clock, turns):
    # A purge removes what was stored before it. Sends that reach the log after its
    # boundary stay there, and must stay in memory too: dropped, they were hidden
    # until a restart brought them back.
    part = await open_partition(tmp_path / "p", clock)
    await send(part, b"old1", b"old2")
    sends = [asyncio.create_task(send(part, b"new%d" % i)) for i in range(20)]
    for _ in range(turns):
        await asyncio.sleep(0)
    purging = asyncio.create_task(part.purge())
    await asyncio.gather(*sends)
    purged = await purging
    visible = part.stats()["visible"]
    assert purged + visible == 22
    await part.close()
    reopened = await open_partition(tmp_path / "p", clock)
    try:
        assert reopened.stats()["visible"] == visible  # memory agreed with the log
    finally:
        await reopened.close()


async def test_a_receipt_from_before_a_promotion_is_refused_for_the_new_leaders_delivery(
    tmp_path, clock
):
    # Review: the old leader delivered a message (receive count 1) and its lease record
    # never reached the follower that took over; the new leader delivered it again with
    # receive count 1, and the first consumer's receipt acked it while the second held
    # it (on a FIFO queue, two consumers held one group). Same queue, partition, offset
    # and count on both copies here; only the epoch tells the deliveries apart.
    old = await open_partition(tmp_path / "old", clock)
    new = await open_partition(tmp_path / "new", clock)
    try:
        old.epoch = 1
        await send(old, b"m")
        await send(new, b"m")  # the follower's copy: the send, not the lease
        (first,) = await old.receive(10, 0, 30_000, bytes_max=1 << 24)
        new.epoch = new.receipt_epoch_floor = 2  # promoted
        (second,) = await new.receive(10, 0, 30_000, bytes_max=1 << 24)
        assert first.receive_count == second.receive_count == 1
        (refused,) = await new.delete([first.receipt])
        assert refused.code == ErrorCode.RECEIPT_INVALID and "leader changed" in refused.message
        assert await new.delete([second.receipt]) == []
        # A receipt of a message already gone still acks (a retried ack), whatever its epoch.
        assert await new.delete([first.receipt]) == []
    finally:
        await old.close()
        await new.close()
