"""A follower's ReplicaLog on real files: preallocated appends, crash tails, promotion."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

from storage_helpers import msg, open_store, segment_files

from mqd.storage import StorageConfig, fs
from mqd.storage import records as rec
from mqd.storage.fs import PREALLOCATE_BYTES_MIN, LoopSyncBudget
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


async def test_small_appends_fsync_on_the_loop_when_the_node_lends_a_budget(
    tmp_path: Path,
) -> None:
    data, end = await leader_records(tmp_path / "leader", 40)
    starts = [_record_start(data, offset) for offset in range(40)] + [len(data)]
    sync_threads: list[int] = []

    def note_thread(_seconds: float) -> None:
        sync_threads.append(threading.get_ident())

    fs.fsync_observers.append(note_thread)
    try:
        replica = await ReplicaLog.open(tmp_path / "replica", StorageConfig())
        replica.loop_sync = budget = LoopSyncBudget()
        # The first append creates and preallocates the segment: a thread's job.
        await replica.append(data[: starts[10]], 0)
        assert sync_threads[-1] != threading.get_ident() and budget.on_loop == 0
        # Then fetch-sized appends into the preallocated space: on the loop.
        for first in range(10, 40, 10):
            chunk = data[starts[first] : starts[first + 10]]
            assert await replica.append(chunk, first) == first + 10
        assert sync_threads[-3:] == [threading.get_ident()] * 3 and budget.on_loop == 3
        await replica.close()
    finally:
        fs.fsync_observers.remove(note_thread)
    promoted = await open_store(tmp_path / "replica")  # all of it on disk, in order
    assert [m.offset for m in promoted.live_messages()] == list(range(end))
    await promoted.close()
