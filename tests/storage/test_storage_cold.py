"""PartitionStore cold tier: due past the watermark = on disk only; `load_due` once each."""

from __future__ import annotations

import sqlite3

import pytest

from mqd.clock import ManualClock
from mqd.storage import NewMessage, PartitionStore, StorageConfig
from mqd.storage.tools import verify

DAY_MS = 86_400_000


async def test_cold_messages_stay_out_of_memory_and_load_once(part):
    clock = ManualClock()
    now = clock.now_ms()
    store = await PartitionStore.open(part, StorageConfig(), clock=clock)
    try:
        metas = await store.append_messages(
            [NewMessage(b"a"), NewMessage(b"b", due_ms=now + DAY_MS)]
            + [NewMessage(b"c%d" % i, due_ms=now + 2 * DAY_MS) for i in range(5)]
        )
        assert len(metas) == 7
        assert store.is_hot(0) and not any(store.is_hot(m.offset) for m in metas[1:])
        assert store.cold_count == 6 and len(store._live) == 1
        # Before the index writer has run: the rows come from its pending batches.
        got = await store.load_due(now + DAY_MS)
        assert [m.offset for m in got] == [1]
        assert store.cold_count == 5
        assert [r.body for r in await store.read([1])] == [b"b"]
        assert await store.load_due(now + DAY_MS) == []  # never twice
        await store._index_drained()
        got = await store.load_due(now + 2 * DAY_MS)
        assert [m.offset for m in got] == [2, 3, 4, 5, 6]
        assert store.cold_count == 0 and len(store._live) == 7
    finally:
        await store.close()


async def test_reopen_counts_cold_rows_without_loading_them(part):
    clock = ManualClock()
    now = clock.now_ms()
    store = await PartitionStore.open(part, StorageConfig(segment_bytes_max=4096), clock=clock)
    for start in range(0, 200, 10):
        await store.append_messages(
            [NewMessage(b"x" * 100, due_ms=now + DAY_MS + i) for i in range(start, start + 10)]
        )
    await store.append_messages([NewMessage(b"soon", due_ms=now + 1000)])
    await store.close()

    for _ in range(2):  # with the index, then rebuilt from the log alone
        store = await PartitionStore.open(part, StorageConfig(), clock=clock)
        try:
            assert [m.offset for m in store.live_messages()] == [200]
            assert store.cold_count == 200 and len(store._live) == 1
            assert store.stats()["live_messages"] == 201
            assert store.stats()["segments"] > 1
        finally:
            await store.close()
        assert verify(part).ok, verify(part).text()
        (part / "index.sqlite").unlink()


async def open_small_segments(part) -> tuple[PartitionStore, ManualClock, int]:
    """A store of 4 KiB segments on a manual clock, and the clock's start time."""
    clock = ManualClock()
    store = await PartitionStore.open(part, StorageConfig(segment_bytes_max=4096), clock=clock)
    return store, clock, clock.now_ms()


async def test_cold_expiry_writes_deletes_and_frees_segments(part):
    store, clock, now = await open_small_segments(part)
    try:
        await store.append_messages(
            [NewMessage(b"x" * 100, due_ms=now + DAY_MS) for _ in range(100)]
        )
        clock.advance(1000)
        young = await store.append_messages([NewMessage(b"y", due_ms=now + DAY_MS)])
        gone = await store.expire_cold(now + 1)
        assert len(gone) == 100 and store.cold_count == 1
        await store.append_messages([NewMessage(b"roll")])  # let the reclaim run
        await store._index_drained()
    finally:
        await store.close()
    assert verify(part).ok, verify(part).text()
    store = await PartitionStore.open(part, StorageConfig(), clock=clock)
    try:
        assert store.cold_count == 1
        clock.advance(DAY_MS)
        got = await store.load_due(clock.now_ms() + 60_000)
        assert [m.offset for m in got] == [young[0].offset]
    finally:
        await store.close()


def damage_root_page(path, index_name: str) -> None:
    """Overwrite the root page of one of the index file's b-trees with garbage."""
    with sqlite3.connect(path) as db:
        (root,) = db.execute(
            "SELECT rootpage FROM sqlite_master WHERE name = ?", (index_name,)
        ).fetchone()
        (page_size,) = db.execute("PRAGMA page_size").fetchone()
    with open(path, "r+b") as raw:
        raw.seek((root - 1) * page_size)
        raw.write(b"\xa5" * page_size)


@pytest.mark.parametrize("damaged", ["messages_due", "messages_grp"])
async def test_a_damaged_index_page_means_a_rebuild_not_a_failed_open(part, damaged):
    # The cold rows are counted through partial indexes the first queries of an open
    # do not read: a damaged page there must also send the open to the log.
    clock = ManualClock()
    now = clock.now_ms()
    store = await PartitionStore.open(part, StorageConfig(), clock=clock)
    await store.append_messages(
        [NewMessage(b"hot")]
        + [NewMessage(b"c%d" % i, due_ms=now + DAY_MS, group_id="g") for i in range(50)]
    )
    await store.close()
    damage_root_page(part / "index.sqlite", damaged)

    store = await PartitionStore.open(part, StorageConfig(), clock=clock)
    try:
        assert store.cold_count == 50 and store.stats()["live_messages"] == 51
        assert [r.body for r in await store.read([0])] == [b"hot"]
    finally:
        await store.close()
    assert verify(part).ok, verify(part).text()


async def test_peek_cold_reads_cold_messages_where_the_index_says_and_leaves_them_cold(part):
    store, _clock, now = await open_small_segments(part)
    try:
        await store.append_messages(
            [NewMessage(b"hot")]
            + [NewMessage(b"c%02d" % i + b"x" * 200, due_ms=now + DAY_MS) for i in range(30)]
        )
        # Before the index writer ran: from its pending batch; then from SQLite.
        for _ in range(2):
            got = await store.peek_cold(0, 5, 1 << 24)
            assert [m.offset for m, _ in got] == [1, 2, 3, 4, 5]
            assert [r.body[:3] for _, r in got] == [b"c00", b"c01", b"c02", b"c03", b"c04"]
            assert all(m.due_ms == now + DAY_MS for m, _ in got)
            later = await store.peek_cold(28, 10, 1 << 24)
            assert [m.offset for m, _ in later] == [29, 30]
            assert store.cold_count == 30 and len(store._live) == 1  # still cold
            await store._index_drained()
    finally:
        await store.close()
