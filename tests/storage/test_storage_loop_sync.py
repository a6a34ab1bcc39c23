"""Small durable commit groups fsync on the loop's thread while that stays cheap."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from storage_helpers import (
    EIO,
    ENOSPC,
    FaultyFS,
    ThreadNotingFS,
    msg,
    open_store,
    segment_files,
)

from mqd.errors import InternalError, StorageFull
from mqd.storage.fs import LoopSyncBudget


async def test_small_groups_sync_on_the_loop_large_ones_in_a_thread(tmp_path: Path) -> None:
    fs = ThreadNotingFS()
    store = await open_store(tmp_path / "p", fs=fs)
    # Slow fsyncs (a busy machine) would send commits off the loop: not what is tested.
    store.loop_sync = budget = LoopSyncBudget(burst_s=1.0, slow_sync_s=1.0)
    loop_thread = threading.get_ident()

    # The segment's first write allocates ahead of it (posix_fallocate): a thread's job.
    await store.append_messages([msg(0, 200)])
    assert fs.sync_threads[-1] != loop_thread and budget.on_loop == 0
    synced = len(fs.sync_threads)

    await store.append_messages([msg(1, 200)])
    meta = (await store.append_messages([msg(2, 200)]))[0]
    await store.delete([meta.offset])
    assert fs.sync_threads[synced:] == [loop_thread] * 3 and budget.on_loop == 3
    assert store.stats()["commits_synced_on_loop"] == 3  # in STATS' storage figures

    # Bigger than a loop write may be: the executor, as without a budget.
    await store.append_messages([msg(i, 1000) for i in range(3, 103)])
    assert len(fs.sync_threads) == synced + 4 and fs.sync_threads[-1] != loop_thread
    assert budget.on_loop == 3

    # Whatever thread synced it, it is on disk: a reopened store has it all.
    await store.close()
    reopened = await open_store(tmp_path / "p")
    assert len(reopened.live_messages()) == 102
    await reopened.close()


async def test_a_store_without_a_budget_never_syncs_on_the_loop(tmp_path: Path) -> None:
    fs = ThreadNotingFS()
    store = await open_store(tmp_path / "p", fs=fs)  # a replicated leader's store
    for i in range(5):
        await store.append_messages([msg(i, 100)])
    assert len(fs.sync_threads) >= 5  # (and the file's, after its first fallocate)
    assert threading.get_ident() not in fs.sync_threads
    await store.close()


def test_the_budget_caps_the_share_of_time_the_loop_blocks() -> None:
    budget = LoopSyncBudget(share=0.5, burst_s=0.002, slow_sync_s=0.001)
    assert budget.allows()
    budget.observe(0.0002, on_loop=True)
    assert budget.allows()  # 0.2 ms of debt, within the burst
    budget.observe(0.004, on_loop=True)
    assert not budget.allows()  # a 4 ms block: past the burst
    time.sleep(0.012)  # at half the wall time the debt is paid in ~8 ms
    assert budget.allows()


def test_the_budget_stops_loop_syncs_while_the_disk_is_slow() -> None:
    budget = LoopSyncBudget(share=0.5, burst_s=0.002, slow_sync_s=0.001)
    budget.observe(0.05, on_loop=False)  # a 50 ms fsync, in the executor
    assert not budget.allows()
    for _ in range(30):  # the disk is fast again
        budget.observe(0.0002, on_loop=False)
    assert budget.allows()
    assert budget.on_loop == 0


async def test_a_failed_fsync_on_the_loop_fails_the_group_and_keeps_the_log(
    tmp_path: Path,
) -> None:
    fs = FaultyFS()
    store = await open_store(tmp_path / "p", fs=fs)
    store.loop_sync = budget = LoopSyncBudget(burst_s=1.0, slow_sync_s=1.0)  # as above
    await store.append_messages([msg(0, 100)])  # allocates the segment (executor)
    await store.append_messages([msg(1, 100)])
    assert budget.on_loop == 1
    (segment,) = segment_files(tmp_path / "p")
    records = segment.read_bytes().rstrip(b"\0")
    fs.fsync_errno = EIO
    with pytest.raises(InternalError):
        await store.append_messages([msg(2, 100)])
    assert segment.read_bytes().rstrip(b"\0") == records  # the group was cut off again
    fs.fsync_errno = None
    fs.write_errno = ENOSPC
    with pytest.raises(StorageFull):
        await store.delete([0])
    fs.write_errno = None
    assert (await store.append_messages([msg(3, 100)]))[0].offset == 2
    assert store.stats()["write_errors"] == 2
    await store.close()
    reopened = await open_store(tmp_path / "p")
    assert [m.offset for m in reopened.live_messages()] == [0, 1, 2]
    await reopened.close()
