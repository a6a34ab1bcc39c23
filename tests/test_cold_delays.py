"""The cold tier: messages delayed past the horizon live on disk only (store + partition)."""

from __future__ import annotations

import asyncio
import time

from mqd.clock import ManualClock
from mqd.partition import Partition
from mqd.protocol.messages import SendEntry
from mqd.receipts import ReceiptSigner
from mqd.storage import PartitionStore, StorageConfig
from mqd.storage.tools import verify

QUEUE_ID = b"\x02" * 8
SIGNER = ReceiptSigner(b"s" * 32)
BYTES_MAX = 64 * 1024 * 1024
DAY_MS = 86_400_000


async def open_partition(path, clock=None, *, fifo=False, **store_kw) -> Partition:
    store = await PartitionStore.open(path, StorageConfig(), clock=clock, **store_kw)
    return Partition(QUEUE_ID, 0, store, SIGNER, clock=clock, fifo=fifo)


def in_memory(part: Partition) -> int:
    """Messages the partition or its store hold any per-message state for."""
    return len(set(part._metas) | {o for _, o in part._delayed} | set(part.store._live))


async def send_many(part: Partition, n: int, delay_ms: int, **entry_kw) -> list[str]:
    ids: list[str] = []
    for start in range(0, n, 1000):
        entries = [
            SendEntry(b"m%d" % i, delay_ms=delay_ms, **entry_kw)
            for i in range(start, min(n, start + 1000))
        ]
        ids += await part.send(entries, 0)
    return ids


async def receive_all(part: Partition) -> list[bytes]:
    bodies: list[bytes] = []
    while True:
        got = await part.receive(1000, 0, 30_000, bytes_max=BYTES_MAX)
        if not got:
            return bodies
        bodies += [m.body for m in got]


async def test_ten_thousand_delayed_a_day_hold_no_memory_and_survive_restart(tmp_path):
    clock = ManualClock()
    part = await open_partition(tmp_path / "p", clock)
    await send_many(part, 10_000, DAY_MS)
    await part.send([SendEntry(b"now")], 0)
    assert in_memory(part) == 1  # only the undelayed one
    assert part.stats()["delayed"] == 10_000 and part.stats()["visible"] == 1
    (now,) = await part.receive(10, 0, 30_000, bytes_max=BYTES_MAX)
    assert now.body == b"now" and await part.delete([now.receipt]) == []
    await part.close()

    part = await open_partition(tmp_path / "p", clock)
    try:
        assert in_memory(part) == 0
        assert part.stats()["delayed"] == 10_000
        clock.advance(DAY_MS - 1)
        assert await part.receive(10, 0, 30_000, bytes_max=BYTES_MAX) == []
        assert in_memory(part) > 1  # pulled in ahead of time, still delayed
        assert part.stats()["delayed"] == 10_000
        clock.advance(1)
        bodies = await receive_all(part)
        assert sorted(bodies) == sorted(b"m%d" % i for i in range(10_000))
        assert part.stats()["delayed"] == 0 and part.store.cold_count == 0
    finally:
        await part.close()
    assert verify(tmp_path / "p").ok


async def test_restart_between_load_and_due_loads_each_message_once(tmp_path):
    clock = ManualClock()
    part = await open_partition(tmp_path / "p", clock)
    await send_many(part, 50, 10 * 60_000)
    clock.advance(9 * 60_000 + 30_000)  # within the horizon: the next receive pulls them in
    assert await part.receive(10, 0, 30_000, bytes_max=BYTES_MAX) == []
    assert part.store.cold_count == 0 and len(part._metas) == 50
    await part.close()

    part = await open_partition(tmp_path / "p", clock)
    try:
        assert len(part._metas) == 50 and part.store.cold_count == 0
        clock.advance(30_000)
        assert sorted(await receive_all(part)) == sorted(b"m%d" % i for i in range(50))
    finally:
        await part.close()


async def test_long_poll_wakes_for_a_cold_message(tmp_path):
    # Real clock, horizon 200 ms: a message delayed 500 ms starts cold.
    part = await open_partition(tmp_path / "p", cold_horizon_ms=200)
    try:
        waiter = asyncio.create_task(part.receive(1, 5_000, 30_000, bytes_max=BYTES_MAX))
        await asyncio.sleep(0.02)
        sent_at = time.monotonic()
        await part.send([SendEntry(b"later", delay_ms=500)], 0)
        assert part.store.cold_count == 1 and in_memory(part) == 0
        got = await asyncio.wait_for(waiter, 5)
        late_ms = (time.monotonic() - sent_at) * 1000 - 500
        assert [m.body for m in got] == [b"later"]
        print(f"received {late_ms:.1f} ms after due")
        assert late_ms >= -5  # never early (allowing for the send's own latency)
    finally:
        await part.close()


async def test_purge_covers_cold_messages(tmp_path):
    clock = ManualClock()
    part = await open_partition(tmp_path / "p", clock)
    await send_many(part, 100, DAY_MS)
    await part.send([SendEntry(b"x")], 0)
    assert await part.purge() == 101
    assert part.stats()["delayed"] == 0 and part.store.cold_count == 0
    await part.close()
    part = await open_partition(tmp_path / "p", clock)
    try:
        assert part.stats()["delayed"] == 0
        clock.advance(DAY_MS)
        assert await receive_all(part) == []
    finally:
        await part.close()
    assert verify(tmp_path / "p").ok


async def test_retention_covers_cold_messages(tmp_path):
    clock = ManualClock()
    part = await open_partition(tmp_path / "p", clock)
    part.retention_ms = DAY_MS
    await send_many(part, 100, 3 * DAY_MS)
    clock.advance(DAY_MS // 2)
    await send_many(part, 10, 3 * DAY_MS)  # younger: survive the first expiry
    assert await part.expire() == 0
    clock.advance(DAY_MS // 2 + 1)
    assert await part.expire() == 100
    assert part.stats()["delayed"] == 10 and part.expired_total == 100
    await part.close()

    part = await open_partition(tmp_path / "p", clock)
    part.retention_ms = DAY_MS
    try:
        assert part.stats()["delayed"] == 10
        clock.advance(DAY_MS)
        assert await part.expire() == 10
        clock.advance(2 * DAY_MS)
        assert await receive_all(part) == []
        assert part.stats()["delayed"] == 0
    finally:
        await part.close()
    assert verify(tmp_path / "p").ok


async def test_fifo_cold_message_holds_its_group_back(tmp_path):
    clock = ManualClock()
    part = await open_partition(tmp_path / "p", clock, fifo=True)
    try:
        await part.send([SendEntry(b"g1", group_id="g")], 0)
        await part.send([SendEntry(b"g2", group_id="g", delay_ms=DAY_MS)], 0)
        await part.send([SendEntry(b"g3", group_id="g"), SendEntry(b"h1", group_id="h")], 0)
        assert part.store.cold_count == 1
        got = await part.receive(10, 0, 30_000, bytes_max=BYTES_MAX)
        assert sorted(m.body for m in got) == [b"g1", b"h1"]
        await part.delete([m.receipt for m in got])
        assert await part.receive(10, 0, 30_000, bytes_max=BYTES_MAX) == []
        await part.close()

        part = await open_partition(tmp_path / "p", clock, fifo=True)
        assert await part.receive(10, 0, 30_000, bytes_max=BYTES_MAX) == []
        clock.advance(DAY_MS)
        got = await part.receive(10, 0, 30_000, bytes_max=BYTES_MAX)
        assert [m.body for m in got] == [b"g2", b"g3"]
    finally:
        await part.close()


async def test_fifo_group_released_when_its_cold_head_expires(tmp_path):
    clock = ManualClock()
    part = await open_partition(tmp_path / "p", clock, fifo=True)
    part.retention_ms = DAY_MS
    try:
        await part.send([SendEntry(b"old", group_id="g", delay_ms=2 * DAY_MS)], 0)
        clock.advance(DAY_MS // 2)
        await part.send([SendEntry(b"young", group_id="g")], 0)
        assert await part.receive(10, 0, 30_000, bytes_max=BYTES_MAX) == []
        clock.advance(DAY_MS // 2 + 1)
        assert await part.expire() == 1
        got = await part.receive(10, 0, 30_000, bytes_max=BYTES_MAX)
        assert [m.body for m in got] == [b"young"]
    finally:
        await part.close()


async def test_peek_shows_cold_messages_in_send_order_and_follows_past_them(tmp_path):
    # protocol.md §4.13: every state, delayed included, however far (a message due
    # past the horizon lives on disk only, and peeking leaves it there).
    clock = ManualClock()
    part = await open_partition(tmp_path / "p", clock)
    try:
        await part.send([SendEntry(b"now")], 0)
        await part.send([SendEntry(b"far", delay_ms=DAY_MS)], 0)
        await part.send([SendEntry(b"soon", delay_ms=10_000)], 0)
        await part.send([SendEntry(b"far2", delay_ms=2 * DAY_MS)], 0)
        assert part.stats()["delayed"] == 3 and part.store.cold_count == 2
        assert [m.body for m in await part.peek(10, -1, bytes_max=BYTES_MAX)] == [
            b"now",
            b"far",
            b"soon",
            b"far2",
        ]
        assert [m.body for m in await part.peek(2, 0, bytes_max=BYTES_MAX)] == [b"far", b"soon"]
        assert [m.body for m in await part.peek(10, 2, bytes_max=BYTES_MAX)] == [b"far2"]
        assert part.store.cold_count == 2  # still on disk only
        got = await part.peek(10, -1, bytes_max=BYTES_MAX)
        assert got[1].id.endswith("0000000000000001") and got[1].receipt == ""
    finally:
        await part.close()


async def test_the_oldest_message_age_counts_cold_messages(tmp_path):
    # Their sent times are on disk only: the figure used to leave them out, so a queue
    # holding only messages delayed past the horizon said 0.0.
    clock = ManualClock()
    part = await open_partition(tmp_path / "p", clock)
    await part.send([SendEntry(b"a day", delay_ms=DAY_MS)], 0)
    clock.advance(5_000)
    await part.send([SendEntry(b"two days", delay_ms=2 * DAY_MS)], 0)
    await part.send([SendEntry(b"now")], 0)
    clock.advance(5_000)
    assert part.store.cold_count == 2
    assert part.stats()["oldest_message_age_s"] == 10.0
    (now,) = await part.receive(10, 0, 30_000, bytes_max=BYTES_MAX)
    assert await part.delete([now.receipt]) == []
    assert part.stats()["oldest_message_age_s"] == 10.0  # only cold ones left
    await part.close()

    part = await open_partition(tmp_path / "p", clock)  # from the index
    try:
        assert part.stats()["oldest_message_age_s"] == 10.0
        clock.advance(DAY_MS)
        (first,) = await receive_all_messages(part)
        assert first.body == b"a day" and await part.delete([first.receipt]) == []
        # The one left is the later one: looked up again once the first left the cold tier.
        assert part.store.cold_count == 1
        assert part.stats()["oldest_message_age_s"] == (DAY_MS + 5_000) / 1000
    finally:
        await part.close()


async def receive_all_messages(part: Partition) -> list:
    got = []
    for _ in range(10):
        batch = await part.receive(1000, 0, 30_000, bytes_max=BYTES_MAX)
        if not batch:
            return got
        got += batch
    return got
