"""A follower's ReplicaLog on real files: preallocated appends, crash tails, promotion."""

from __future__ import annotations

import asyncio
import shutil
import threading
from pathlib import Path

import pytest
from storage_helpers import msg, open_store, segment_files

from mqd.storage import StorageConfig, fs
from mqd.storage import records as rec
from mqd.storage.fs import PREALLOCATE_BYTES_MIN
from mqd.storage.replica import ReplicaLog


async def leader_records(path: Path, count: int, start: int = 0) -> tuple[bytes, int]:
    """Raw records of `count` messages from a real leader log (what FETCH carries)."""
    store = await open_store(path)
    for i in range(start, start + count):
        await store.append_messages([msg(i, 200)])
    end = store.next_offset
    data, offset = b"", 0
    while offset < end:  # one FETCH's worth at a time, as a follower reads
        chunk, offset = await store.read_raw(offset, 1 << 24)
        data += chunk
    await store.close()
    return data, end


async def test_appends_land_in_preallocated_space_given_back_on_close(tmp_path: Path) -> None:
    data, end = await leader_records(tmp_path / "leader", 20)
    replica = await ReplicaLog.open(tmp_path / "replica", StorageConfig())
    assert await replica.append(data, 0) == end
    (segment,) = segment_files(tmp_path / "replica")
    written = segment.stat().st_size
    assert written >= PREALLOCATE_BYTES_MIN > len(data)  # the fsync had no size to commit
    await replica.close()
    assert segment.stat().st_size < written  # the zero tail went back on close
    reopened = await ReplicaLog.open(tmp_path / "replica", StorageConfig())
    assert reopened.next_offset == end
    await reopened.close()


async def test_a_crashed_follower_reads_its_zero_tail_as_the_end(tmp_path: Path) -> None:
    data, end = await leader_records(tmp_path / "leader", 30)
    replica = await ReplicaLog.open(tmp_path / "replica", StorageConfig())
    await replica.append(data, 0)
    # kill -9 leaves the file as it is: records, then preallocated zeros.
    crashed = tmp_path / "crashed"
    shutil.copytree(tmp_path / "replica", crashed)
    await replica.close()
    (segment,) = segment_files(crashed)
    assert segment.read_bytes().endswith(b"\0" * 1024)

    # The follower restarts from the right offset and goes on appending ...
    follower = await ReplicaLog.open(crashed, StorageConfig())
    assert follower.next_offset == end
    more, more_end = await leader_records(tmp_path / "leader", 5, start=30)
    tail = more[len(data) :]
    assert await follower.append(tail, end) == more_end
    await follower.close()
    # ... and, promoted, its log recovers as a leader's with every message, and
    # takes new ones after them.
    promoted = await open_store(crashed)
    assert len(promoted.live_messages()) == 35
    (stored,) = await promoted.read([34])
    assert stored.body.startswith(b"m34:")
    (meta,) = await promoted.append_messages([msg(35, 200)])
    assert meta.offset == more_end
    await promoted.close()
    reopened = await open_store(crashed)
    assert [m.offset for m in reopened.live_messages()] == list(range(36))
    await reopened.close()


async def test_truncate_then_append_after_preallocation(tmp_path: Path) -> None:
    data, end = await leader_records(tmp_path / "leader", 10)
    replica = await ReplicaLog.open(tmp_path / "replica", StorageConfig())
    await replica.append(data, 0)
    await replica.truncate(4)
    assert replica.next_offset == 4
    raw_from_4 = data[_record_start(data, 4) :]
    assert await replica.append(raw_from_4, 4) == end
    await replica.close()
    promoted = await open_store(tmp_path / "replica")
    assert [m.offset for m in promoted.live_messages()] == list(range(10))
    await promoted.close()


def _record_start(data: bytes, offset: int) -> int:
    pos = 0
    while rec.record_offset(data, pos)[1] != offset:
        pos += rec.check_record(data, pos, len(data), 1 << 26)
    return pos


async def test_small_appends_are_written_on_the_loop_and_synced_in_a_thread(
    tmp_path: Path,
) -> None:
    data, end = await leader_records(tmp_path / "leader", 40)
    starts = [_record_start(data, offset) for offset in range(40)] + [len(data)]
    sync_threads: list[int] = []

    def note_thread(_seconds: float) -> None:
        sync_threads.append(threading.get_ident())

    config = StorageConfig(fsync="always", fsync_interval_ms=50)
    fs.fsync_observers.append(note_thread)
    try:
        replica = await ReplicaLog.open(tmp_path / "replica", config)
        # The first append creates and preallocates the segment: a thread's job.
        await replica.append(data[: starts[10]], 0)
        assert replica._fd is not None
        # Fetch-sized appends into the preallocated space are written on the loop: the
        # coroutine finishes without suspending once (no hand-off to a thread), and
        # without a sync.
        synced_before = len(sync_threads)
        for first in range(10, 40, 10):
            chunk = data[starts[first] : starts[first + 10]]
            appending = replica.append(chunk, first)
            with pytest.raises(StopIteration) as finished:
                appending.send(None)
            assert finished.value.value == first + 10
        assert len(sync_threads) == synced_before
        await asyncio.sleep(0.06)
        await replica.sync_if_due()
        assert len(sync_threads) == synced_before + 1
        assert sync_threads[-1] != threading.get_ident()
        await replica.close()
    finally:
        fs.fsync_observers.remove(note_thread)
    promoted = await open_store(tmp_path / "replica")  # all of it on disk, in order
    assert [m.offset for m in promoted.live_messages()] == list(range(end))
    await promoted.close()


class SyncCounter:
    """Counts the log fdatasyncs of this process (the node's fsync histogram hook)."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, _seconds: float) -> None:
        self.count += 1

    def __enter__(self) -> SyncCounter:
        fs.fsync_observers.append(self)
        return self

    def __exit__(self, *_exc: object) -> None:
        fs.fsync_observers.remove(self)


async def _append_in_chunks(replica: ReplicaLog, data: bytes, end: int, step: int) -> None:
    starts = [_record_start(data, offset) for offset in range(end)] + [len(data)]
    for first in range(0, end, step):
        last = min(first + step, end)
        assert await replica.append(data[starts[first] : starts[last]], first) == last


async def test_a_follower_leaves_syncing_to_the_kernel_under_fsync_never(tmp_path: Path) -> None:
    # The node's policy holds for the logs it follows too: a cluster set to "never"
    # (replication as the durability, as Kafka's default) does not fsync on followers.
    data, end = await leader_records(tmp_path / "leader", 12)
    with SyncCounter() as syncs:
        replica = await ReplicaLog.open(tmp_path / "replica", StorageConfig(fsync="never"))
        await _append_in_chunks(replica, data, end, 3)
        assert syncs.count == 0
        assert replica.fetch_wait_ms(2000) == 2000
        await replica.close()
        assert syncs.count == 1  # a clean stop leaves it all on disk
    promoted = await open_store(tmp_path / "replica")
    assert [m.offset for m in promoted.live_messages()] == list(range(end))
    await promoted.close()


@pytest.mark.parametrize("policy", ["always", "interval"])
async def test_a_follower_syncs_at_most_every_interval_and_cuts_its_poll_short(
    tmp_path: Path, policy: str
) -> None:
    # Under "always" too: the leader syncs before it commits; a follower's copy counts
    # once written (mqd.storage.replica), and is synced off that path.
    data, end = await leader_records(tmp_path / "leader", 12)
    config = StorageConfig(fsync=policy, fsync_interval_ms=300)
    with SyncCounter() as syncs:
        replica = await ReplicaLog.open(tmp_path / "replica", config)
        await _append_in_chunks(replica, data, end, 3)
        assert syncs.count == 0  # within the interval of opening
        # An idle follower does not long-poll past the sync it owes.
        assert 0 < replica.fetch_wait_ms(2000) <= 300
        await replica.sync_if_due()
        assert syncs.count == 0  # not due yet
        await asyncio.sleep(0.35)
        assert replica.fetch_wait_ms(2000) == 1
        await replica.sync_if_due()
        assert syncs.count == 1
        assert replica.fetch_wait_ms(2000) == 2000  # nothing left to sync
        await replica.sync_if_due()
        assert syncs.count == 1
        await replica.close()
        assert syncs.count == 1
