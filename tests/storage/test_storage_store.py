"""PartitionStore round trips, restart, group commit, fsync policies, roll, reclaim, index."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import pytest
from storage_helpers import (
    LogRecorder,
    msg,
    open_store,
    record_offsets,
    segment_files,
    wait_for,
)

from mqd.clock import ManualClock, SystemClock
from mqd.errors import ConfigError, MessageTooLarge, StorageError
from mqd.storage import Lease, NewMessage, StorageConfig
from mqd.storage import records as rec
from mqd.storage import store as store_module
from mqd.storage.index import INDEX_FILE, Index


def state(metas):
    return [
        (m.offset, m.sent_at_ms, m.due_ms, m.priority, m.group_id, m.dedup_id,
         m.receive_count, m.visible_at_ms, m.first_received_at_ms, m.size)
        for m in metas
    ]  # fmt: skip


async def test_append_read_round_trip(part: Path) -> None:
    clock = ManualClock()
    store = await open_store(part, clock=clock)
    new = [
        NewMessage(b"one", {"k": "v", "ключ": "значение"}, due_ms=5, group_id="g",
                   dedup_id="d1", priority=3, source_queue="src", original_id="orig",
                   receive_count=2),
        NewMessage(b"", {}),
        NewMessage(b"\x00" * 1000, {}),
    ]  # fmt: skip
    metas = await store.append_messages(new)
    assert [m.offset for m in metas] == [0, 1, 2]
    assert metas[0].sent_at_ms == clock.now_ms()
    assert (metas[0].due_ms, metas[0].priority, metas[0].group_id, metas[0].dedup_id) == (
        5, 3, "g", "d1",
    )  # fmt: skip
    assert metas[0].receive_count == 2 and metas[0].visible_at_ms == 0
    assert metas[1].size == 0 and metas[2].size == 1000
    assert store.next_offset == 3
    got = await store.read([2, 0, 1, 99])
    assert [g.offset for g in got] == [2, 0, 1]
    assert got[1].body == b"one" and got[1].attributes == {"k": "v", "ключ": "значение"}
    assert (got[1].source_queue, got[1].original_id, got[1].dedup_id) == ("src", "orig", "d1")
    assert got[0].body == b"\x00" * 1000
    await store.close()
    # The same bytes come back from disk, through the CRC check, after a restart.
    store = await open_store(part, config=StorageConfig(read_cache_bytes_max=0), clock=clock)
    assert state(store.live_messages()) == state(metas)
    again = await store.read([0, 1, 2])
    assert again == [got[1], got[2], got[0]]
    assert store.stats()["cache_misses"] == 3
    await store.close()


async def test_reads_cache_first_then_disk(part: Path) -> None:
    store = await open_store(part, config=StorageConfig(read_cache_bytes_max=4096))
    metas = await store.append_messages([msg(i, 1000) for i in range(10)])
    st = store.stats()
    assert st["cache_bytes"] <= 4096 and 0 < st["cache_entries"] < 10
    got = await store.read([m.offset for m in metas])
    assert [g.body for g in got] == [msg(i, 1000).body for i in range(10)]
    st = store.stats()
    assert st["cache_hits"] == st["cache_entries"] and st["cache_misses"] == 10 - st["cache_hits"]
    await store.close()


async def test_delete_lease_purge_and_restart(part: Path) -> None:
    clock = ManualClock()
    store = await open_store(part, clock=clock)
    metas = await store.append_messages([msg(i, dedup_id=f"d{i}") for i in range(10)])
    await store.delete([metas[0].offset, metas[1].offset, 12345])
    await store.delete([metas[0].offset])  # acking twice is harmless
    await store.lease([Lease(metas[2].offset, 1, clock.now_ms() + 30_000, clock.now_ms())])
    await store.lease([Lease(metas[2].offset, 2, 0, clock.now_ms()), Lease(777, 1, 1, 1)])
    await store.lease([Lease(metas[3].offset, 1, 42, 7)])
    assert (await store.read([metas[0].offset])) == []
    await store.close()

    store = await open_store(part, clock=clock)
    live = {m.offset: m for m in store.live_messages()}
    assert sorted(live) == [m.offset for m in metas[2:]]
    assert (live[2].receive_count, live[2].visible_at_ms, live[2].first_received_at_ms) == (
        2, 0, clock.now_ms(),
    )  # fmt: skip
    assert (live[3].receive_count, live[3].visible_at_ms, live[3].first_received_at_ms) == (
        1, 42, 7,
    )  # fmt: skip
    # Dedup ids survive restarts, including those of deleted messages.
    assert store.find_dedup("d0", 0) == 0
    assert store.find_dedup("d5", 0) == 5
    assert store.find_dedup("d5", clock.now_ms() + 1) is None
    assert store.find_dedup("nope", 0) is None

    assert await store.purge(up_to_offset=5) == 3  # offsets 2, 3, 4
    assert await store.purge(up_to_offset=5) == 0
    more = await store.append_messages([msg(100)])
    assert await store.purge() == 6  # 5..9 and the new one
    assert (await store.read([more[0].offset, 9])) == []
    before = store.next_offset
    await store.close()

    store = await open_store(part, clock=clock)
    assert store.live_messages() == []
    assert store.next_offset == before
    await store.close()


async def test_state_equal_after_reopen_without_index(part: Path) -> None:
    """The index is derived: deleting it rebuilds the same state from the log."""
    clock = ManualClock()
    store = await open_store(part, clock=clock)
    metas = await store.append_messages([msg(i, group_id=f"g{i % 3}", dedup_id=f"x{i}")
                                         for i in range(50)])  # fmt: skip
    await store.delete([m.offset for m in metas[::3]])
    await store.lease([Lease(m.offset, 1, 1000 + m.offset, 500) for m in metas[1::4]])
    await store.close()
    store = await open_store(part, clock=clock)
    expected = state(store.live_messages())
    await store.close()
    assert len(expected) == 50 - 17

    for suffix in ("", "-wal", "-shm"):
        (part / (INDEX_FILE + suffix)).unlink(missing_ok=True)
    store = await open_store(part, clock=clock)
    assert state(store.live_messages()) == expected
    assert store.find_dedup("x0", 0) == 0
    await store.close()

    # A corrupt index file is detected and rebuilt too.
    (part / INDEX_FILE).write_bytes(b"this is not sqlite" * 100)
    log = LogRecorder()
    store = await open_store(part, clock=clock, log=log)
    assert state(store.live_messages()) == expected
    assert log.named("index.rebuild")
    await store.close()


async def test_index_checkpoint_and_replay(part: Path, tmp_path: Path) -> None:
    """An index left behind (crash before its batches landed) is caught up from the log."""
    clock = ManualClock()
    store = await open_store(part, clock=clock)
    first = await store.append_messages([msg(i) for i in range(20)])
    await store.close()
    saved = tmp_path / "saved-index"
    shutil.copytree(part, saved, ignore=shutil.ignore_patterns("*.log"))

    store = await open_store(part, clock=clock)
    second = await store.append_messages([msg(i) for i in range(20, 30)])
    await store.delete([m.offset for m in first[:5]] + [second[0].offset])
    await store.lease([Lease(first[6].offset, 3, 99, 98)])
    await store.purge(up_to_offset=3)
    await store.close()
    store = await open_store(part, clock=clock)
    expected = state(store.live_messages())
    await store.close()

    Index.remove_files(part)
    shutil.copytree(saved, part, dirs_exist_ok=True)
    store = await open_store(part, clock=clock)
    assert state(store.live_messages()) == expected
    (opened,) = store._log.named("partition.opened")
    assert opened["replayed_from"] == 20
    await store.close()


async def test_group_commit_one_write_one_fsync(part: Path) -> None:
    store = await open_store(part)
    before = store.stats()
    results = await asyncio.gather(*(store.append_messages([msg(i)]) for i in range(100)))
    after = store.stats()
    assert after["commits"] - before["commits"] == 1
    assert after["writes"] - before["writes"] == 1
    assert after["fsyncs"] - before["fsyncs"] == 1
    assert after["last_group_ops"] == 100 and after["last_group_records"] == 100
    assert sorted(r[0].offset for r in results) == list(range(100))
    # Appends, leases and deletes queued in one turn share one group as well.
    ops = [store.delete([0, 1]), store.lease([Lease(2, 1, 5, 5)]), store.append_messages([msg(1)])]
    await asyncio.gather(*ops)
    final = store.stats()
    assert final["commits"] - after["commits"] == 1
    assert final["fsyncs"] - after["fsyncs"] == 1
    await store.close()


async def test_receive_leases_ride_on_the_next_fsync(part: Path) -> None:
    """A lease nobody waits for is written at once but synced by a later group or timer."""
    store = await open_store(part)
    await store.append_messages([msg(0), msg(1)])
    base = store.stats()
    await store.lease([Lease(0, 1, 5, 5)], wait=False)
    await wait_for(lambda: store.stats()["commits"] > base["commits"])
    written = store.stats()
    assert written["fsyncs"] == base["fsyncs"]
    # A durable group fsyncs (and so covers the lease before it in the file) ...
    await store.delete([1])
    assert store.stats()["fsyncs"] == base["fsyncs"] + 1
    # ... and a lone lease is synced within LAZY_SYNC_S even if nothing follows.
    await store.lease([Lease(0, 2, 9, 9)], wait=False)
    await wait_for(lambda: store.stats()["commits"] > written["commits"] + 1)
    synced = store.stats()["fsyncs"]
    await wait_for(lambda: store.stats()["fsyncs"] == synced + 1, timeout_s=2.0)
    await store.close()
    store = await open_store(part)
    (live,) = store.live_messages()
    assert (live.offset, live.receive_count, live.visible_at_ms) == (0, 2, 9)
    await store.close()


async def test_groups_pipeline_while_disk_works(part: Path) -> None:
    """Calls arriving while a group is being written form the next group."""
    store = await open_store(part)
    tasks = [asyncio.create_task(store.append_messages([msg(i)])) for i in range(5)]
    await asyncio.sleep(0)
    tasks += [asyncio.create_task(store.append_messages([msg(i)])) for i in range(5, 300)]
    await asyncio.gather(*tasks)
    st = store.stats()
    assert st["records_written"] == 300
    assert st["commits"] < 300
    await store.close()


@pytest.mark.parametrize("policy", ["always", "interval", "never"])
async def test_fsync_policies(part: Path, policy: str) -> None:
    config = StorageConfig(fsync=policy, fsync_interval_ms=20)
    store = await open_store(part, config=config)
    base = store.stats()["fsyncs"]
    for i in range(5):
        await store.append_messages([msg(i)])
    synced = store.stats()["fsyncs"] - base
    if policy == "always":
        assert synced == 5
    elif policy == "never":
        assert synced == 0
    else:
        assert synced <= 1  # at most one per interval
        await wait_for(lambda: store.stats()["fsyncs"] > base)
    await store.close()
    store = await open_store(part, config=config)
    assert [m.offset for m in store.live_messages()] == [0, 1, 2, 3, 4]
    await store.close()


async def test_close_flushes_pending_and_refuses_new_work(part: Path) -> None:
    store = await open_store(part, config=StorageConfig(fsync="never"))
    pending = [asyncio.create_task(store.append_messages([msg(i)])) for i in range(50)]
    await asyncio.sleep(0)
    await store.close()
    assert all(t.done() and not t.exception() for t in pending)
    with pytest.raises(StorageError):
        await store.append_messages([msg(1)])
    await store.close()  # idempotent
    store = await open_store(part)
    assert len(store.live_messages()) == 50
    await store.close()


async def test_segment_roll_and_reclaim_from_oldest_end(part: Path) -> None:
    config = StorageConfig(segment_bytes_max=4096)
    store = await open_store(part, config=config)
    metas = []
    for i in range(60):
        metas += await store.append_messages([msg(i, 200)])
    files = segment_files(part)
    assert len(files) >= 3
    names = [int(f.name[:20]) for f in files]
    assert names[0] == 0 and names == sorted(names)
    assert all(f.stat().st_size <= 4096 for f in files)
    # Data in sealed segments reads back fine (from disk, the cache is not enough).
    store.config.read_cache_bytes_max = 0
    store._cache.clear()
    got = await store.read([m.offset for m in metas])
    assert [g.body for g in got] == [msg(i, 200).body for i in range(60)]

    # Deleting everything of the SECOND segment reclaims nothing: prefix only.
    seg_of = {m.offset: store._segment_of(m.offset).base for m in metas}
    second = names[1]
    await store.delete([o for o, b in seg_of.items() if b == second])
    await asyncio.sleep(0.05)
    assert store.stats()["segments_reclaimed"] == 0
    assert (part / files[1].name).exists()

    # Deleting the first one too reclaims both, once the index covers the deletes.
    await store.delete([o for o, b in seg_of.items() if b == names[0]])
    await wait_for(lambda: store.stats()["segments_reclaimed"] == 2)
    assert not (part / files[0].name).exists() and not (part / files[1].name).exists()
    await store.close()

    # Reclaimed segments are not needed to rebuild the same state, with or without the index.
    store = await open_store(part, config=config)
    expected = state(store.live_messages())
    await store.close()
    (part / INDEX_FILE).unlink()
    store = await open_store(part, config=config)
    assert state(store.live_messages()) == expected
    assert len(expected) == len([o for o, b in seg_of.items() if b not in names[:2]])
    await store.close()


async def test_one_stuck_message_blocks_reclaim(part: Path) -> None:
    store = await open_store(part, config=StorageConfig(segment_bytes_max=4096))
    metas = []
    for i in range(60):
        metas += await store.append_messages([msg(i, 200)])
    await store.delete([m.offset for m in metas[1:]])
    await asyncio.sleep(0.05)
    assert store.stats()["segments_reclaimed"] == 0
    await store.delete([metas[0].offset])
    await wait_for(lambda: store.stats()["segments"] == 1)
    # Only the active segment is left (the files go in a thread after the count drops).
    await wait_for(lambda: len(segment_files(part)) == 1)
    await store.close()


async def test_a_segment_with_dedup_ids_outlives_its_messages_until_they_expire(
    part: Path,
) -> None:
    # The index remembers dedup ids, but an index rebuilt from the log knows only what
    # the segments still hold: a segment is kept until its dedup ids leave retention.
    clock = ManualClock()
    config = StorageConfig(segment_bytes_max=4096, dedup_retention_ms=60_000)
    store = await open_store(part, config=config, clock=clock)
    metas = await store.append_messages([msg(0, 200, dedup_id="order-1")])
    for i in range(1, 60):
        metas += await store.append_messages([msg(i, 200)])
    assert len(segment_files(part)) >= 3
    first_segment = store._segment_of(metas[0].offset).base
    doomed = [m.offset for m in metas if store._segment_of(m.offset).base == first_segment]
    await store.delete(doomed)
    written = store.stats()["next_offset"]
    # Once the index covers the deletes the segment would go (it does without the id).
    await wait_for(lambda: store._index_checkpoint >= written)
    await store.append_messages([msg(99)])
    await wait_for(lambda: store._index_checkpoint > written)
    await asyncio.sleep(0.1)
    assert store.stats()["segments_reclaimed"] == 0
    await store.close()
    (part / INDEX_FILE).unlink()
    clock.advance(30_000)
    store = await open_store(part, config=config, clock=clock)
    assert store.find_dedup("order-1", clock.now_ms() - 60_000) == metas[0].offset
    # Once the id has left retention the segment goes, at the next chance to reclaim.
    clock.advance(30_001)
    await store.append_messages([msg(100)])
    await wait_for(lambda: store.stats()["segments_reclaimed"] == 1)
    await store.close()


async def test_a_segment_held_for_its_dedup_ids_is_reclaimed_by_a_timer(part: Path) -> None:
    config = StorageConfig(segment_bytes_max=4096, dedup_retention_ms=300)
    store = await open_store(part, config=config, clock=SystemClock())
    metas = await store.append_messages([msg(0, 200, dedup_id="order-1")])
    for i in range(1, 40):
        metas += await store.append_messages([msg(i, 200)])
    await store.delete([m.offset for m in metas])
    await store.append_messages([msg(99)])
    # Nothing else happens on the partition: the store looks again on its own.
    await wait_for(lambda: store.stats()["segments_reclaimed"] >= 2, timeout_s=5)
    await store.close()


async def test_roll_by_age(part: Path) -> None:
    clock = ManualClock()
    store = await open_store(part, clock=clock, config=StorageConfig(segment_age_max_s=60))
    await store.append_messages([msg(0)])
    clock.advance(30_000)
    await store.append_messages([msg(1)])
    assert len(segment_files(part)) == 1
    clock.advance(31_000)
    await store.append_messages([msg(2)])
    assert [f.name for f in segment_files(part)] == [
        "00000000000000000000.log",
        "00000000000000000002.log",
    ]
    await store.close()


async def test_destroy_removes_directory(part: Path) -> None:
    store = await open_store(part)
    await store.append_messages([msg(0)])
    await store.destroy()
    assert part.name not in os.listdir(part.parent)


async def test_message_too_large(part: Path) -> None:
    store = await open_store(part, config=StorageConfig(record_bytes_max=8192))
    with pytest.raises(MessageTooLarge):
        await store.append_messages([NewMessage(b"x" * 8192, {})])
    assert (await store.append_messages([NewMessage(b"x" * 100, {})]))[0].offset == 0
    await store.close()


def test_config_validate_names_the_key() -> None:
    StorageConfig().validate()
    for key, value in [("fsync", "sometimes"), ("fsync_interval_ms", 0),
                       ("segment_bytes_max", 10), ("read_cache_bytes_max", -1)]:  # fmt: skip
        config = StorageConfig()
        setattr(config, key, value)
        with pytest.raises(ConfigError, match=key):
            config.validate()


async def test_read_raw_from_any_offset_matches_the_log(part: Path) -> None:
    """Followers fetch by offset: from memory (the group holding it, and the groups
    after it while they fit) or from the segment."""
    store = await open_store(part)
    for group in range(6):  # groups of 1..6 records, each its own commit
        await store.append_messages([msg(group * 10 + i) for i in range(group + 1)])
    await store.delete([0, 3])
    end = store.next_offset
    for start in range(end):
        data, next_offset = await store.read_raw(start, 1 << 20)
        # The same bytes as the segment holds (memory answers up to its group's end).
        assert store._read_raw_disk(start, 1 << 20, end)[0].startswith(data), start
        offsets = record_offsets(data)
        assert offsets and offsets == list(range(start, next_offset)), start
        # The later groups come along while they fit: one fetch catches a follower up.
        assert next_offset == end, start
    assert await store.read_raw(end, 1 << 20) == (b"", end)
    # ...and no further than bytes_max lets them (at least one record, always).
    one_group, after = await store.read_raw(1, 1)
    assert record_offsets(one_group) == [1] and after == 2
    await store.close()


def _reference_raw(part: Path, from_offset: int, bytes_max: int) -> tuple[bytes, int]:
    """What `read_raw` must return, from the segment files alone: whole records from
    `from_offset` on, from the segment holding it, at least one, then up to about
    `bytes_max` bytes."""
    segments = []  # (base, [(offset, raw)])
    for path in sorted(p for p in part.iterdir() if p.suffix == ".log"):
        data = path.read_bytes()
        pos = rec.parse_header(data).size
        records = []
        while pos < len(data):
            try:
                size = rec.check_record(data, pos, len(data), 1 << 20)
            except rec.CorruptRecord:
                break  # the preallocated zeros after the last record
            records.append((rec.record_offset(data, pos)[1], data[pos : pos + size]))
            pos += size
        segments.append((int(path.stem), records))
    holding = [i for i, (base, _) in enumerate(segments) if base <= from_offset]
    for _, records in segments[holding[-1] :]:
        chunks, total, next_offset = [], 0, from_offset
        for offset, raw in records:
            if offset < from_offset:
                continue
            if chunks and total + len(raw) > bytes_max:
                break
            chunks.append(raw)
            total += len(raw)
            next_offset = offset + 1
        if chunks:
            return b"".join(chunks), next_offset
    return b"", from_offset


async def test_read_raw_from_disk_reads_from_the_nearest_mark(
    part: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A follower catching up reads past the in-memory tail: each segment keeps a mark
    every RAW_MARK_BYTES, so a fetch reads about its own size, not the whole segment,
    and returns exactly what the log holds from any offset."""
    monkeypatch.setattr(store_module, "RAW_MARK_BYTES", 4096)
    monkeypatch.setattr(store_module, "RAW_WINDOW_SLACK", 1024)
    monkeypatch.setattr(store_module, "TAIL_BYTES_MAX", 1)  # keep only the last group
    config = StorageConfig(segment_bytes_max=96 * 1024, fsync="never")
    store = await open_store(part, config=config)
    for group in range(120):  # ~2,400 records of ~100 bytes over ~3 segments
        await store.append_messages([msg(group * 20 + i, 60) for i in range(20)])
        if group % 7 == 0:
            await store.delete([group * 20, group * 20 + 3])  # other record types between
    end = store.next_offset
    assert len(store._segments) >= 3
    bytes_max = 8192

    # A follower from 0 to the end, fetch after fetch.
    offset, fetches = 0, 0
    while offset < end:
        expected = _reference_raw(part, offset, bytes_max)
        got = await store.read_raw(offset, bytes_max)
        assert got == expected, offset
        offset, fetches = got[1], fetches + 1
    log_bytes = store.stats()["log_bytes"]
    # About what the fetches returned, plus a mark's distance and the slack each, plus
    # each segment read whole once; whole-segment reads would be ~12x the log here.
    assert fetches > 30
    assert store.stats()["raw_read_bytes"] < 3 * log_bytes

    # Any offset, once the marks are laid.
    for start in range(0, end, 37):
        assert await store.read_raw(start, bytes_max) == _reference_raw(part, start, bytes_max)
    await store.close()


async def test_read_raw_does_not_trust_a_mark_that_no_longer_names_its_record(
    part: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write that fails after its records reached the file is cut back, and the next
    group reuses its offsets at other positions: a mark laid meanwhile is then wrong.
    Such marks are checked against the record they point at, and dropped."""
    monkeypatch.setattr(store_module, "RAW_MARK_BYTES", 512)
    monkeypatch.setattr(store_module, "TAIL_BYTES_MAX", 1)
    store = await open_store(part, config=StorageConfig(fsync="never"))
    for group in range(20):
        await store.append_messages([msg(group * 5 + i, 40) for i in range(5)])
    assert await store.read_raw(0, 1 << 20) == _reference_raw(part, 0, 1 << 20)
    seg = store._segments[-1]
    good = list(seg.marks)
    assert len(good) > 3
    (offset_a, pos_a), (offset_b, pos_b) = good[1], good[2]

    # A mark naming another record's offset, and one pointing into a record's middle.
    for stale in ((offset_a, pos_b), (offset_a, pos_a + 7)):
        seg.marks = [*good[:1], stale]
        for start in (offset_a, offset_a + 3, offset_b):
            assert await store.read_raw(start, 600) == _reference_raw(part, start, 600), stale
        assert stale not in seg.marks  # replaced by marks laid afresh
    await store.close()
