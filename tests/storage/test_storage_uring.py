"""A single node's io_uring syncer (mqd.storage.uring): a real ring, real files.

What every syncer must do (sync, report the time, answer errors) is tested
against each in test_storage_syncer.py."""

from __future__ import annotations

import asyncio
import errno
import os
import threading
from pathlib import Path

import pytest
from storage_helpers import ThreadNotingFS, msg, open_store, segment_files

from mqd.storage.config import StorageConfig
from mqd.storage.fs import LoopSyncBudget
from mqd.storage.uring import UringSyncer


@pytest.fixture
async def syncer():
    ring = UringSyncer.open()
    if ring is None:
        pytest.skip("this kernel gives no io_uring (the node then syncs in threads)")
    yield ring
    await ring.close()


def file_of(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


async def test_more_syncs_than_the_ring_holds_wait_their_turn(tmp_path: Path) -> None:
    ring = UringSyncer.open(entries=2)  # 2 syncs in flight at a time
    if ring is None:
        pytest.skip("this kernel gives no io_uring")
    fds = [os.open(tmp_path / f"f{i}", os.O_RDWR | os.O_CREAT, 0o644) for i in range(2)]
    try:
        slots = [ring.new_slot() for _ in fds]
        for slot, fd in zip(slots, fds, strict=True):
            ring.use(slot, fd)
            os.pwrite(fd, b"y" * 100, 0)
        pending = [ring.fdatasync(slots[i % 2]) for i in range(50)]
        assert len(ring._backlog) == 50 - ring._in_flight_max
        for fd in fds:
            os.close(fd)  # the waiting ones hold descriptors of their own
        fds = []
        await asyncio.wait_for(asyncio.gather(*pending), 30)
        assert ring.syncs == 50 and not ring._backlog and ring._in_flight == 0
        assert list(ring._holds.values()) == [1, 1]  # just the slots' own, again
    finally:
        for fd in fds:
            os.close(fd)
        await ring.close()


async def test_where_the_kernel_refuses_a_ring_there_is_none() -> None:
    assert UringSyncer.open(entries=0) is None  # io_uring_setup: EINVAL


async def test_once_closed_it_refuses_and_a_store_syncs_in_threads(tmp_path: Path) -> None:
    ring = UringSyncer.open()
    if ring is None:
        pytest.skip("this kernel gives no io_uring")
    filesystem = ThreadNotingFS()
    store = await open_store(tmp_path / "p", fs=filesystem)
    store.syncer = ring
    try:
        await store.append_messages([msg(0, 200)])  # allocates ahead: a thread's job
        await store.append_messages([msg(1, 200)])
        assert store.stats()["fsyncs_in_io_uring"] == 1
        await ring.close()
        with pytest.raises(OSError) as refused:
            ring.fdatasync(1)
        assert refused.value.errno == errno.EIO
        synced = len(filesystem.sync_threads)
        await store.append_messages([msg(2, 200)])
        assert len(filesystem.sync_threads) == synced + 1
        assert threading.get_ident() not in filesystem.sync_threads
        assert store.stats()["fsyncs_in_io_uring"] == 1
    finally:
        await store.close()
        await ring.close()  # twice is fine


async def test_a_store_syncs_through_it_and_follows_its_active_segment(
    syncer: UringSyncer, tmp_path: Path
) -> None:
    config = StorageConfig(segment_bytes_max=64 * 1024)
    store = await open_store(tmp_path / "p", config=config)
    store.syncer = syncer
    for i in range(20):
        await store.append_messages([msg(i, 200)])
    stats = store.stats()
    assert stats["fsyncs_in_io_uring"] >= 15 and stats["fsyncs_in_sync_process"] == 0
    assert stats["fsyncs"] >= stats["fsyncs_in_io_uring"]
    (first,) = segment_files(tmp_path / "p")
    (slot,) = syncer._files
    assert file_of(syncer._files[slot]) == str(first)

    # Past a segment: it syncs the new one, and let go of the old one.
    for i in range(20, 400):
        await store.append_messages([msg(i, 300)])
    files = segment_files(tmp_path / "p")
    assert len(files) > 1
    assert file_of(syncer._files[slot]) == str(files[-1])

    await store.close()
    assert not syncer._files  # the store closing let go of its file
    reopened = await open_store(tmp_path / "p", config=config)
    assert len(reopened.live_messages()) == 400
    await reopened.close()


async def test_with_a_budget_the_loop_syncs_while_cheap_and_the_ring_takes_the_rest(
    syncer: UringSyncer, tmp_path: Path
) -> None:
    filesystem = ThreadNotingFS()
    store = await open_store(tmp_path / "p", fs=filesystem)
    # A burst the test cannot spend: only the disk's speed decides here.
    store.loop_sync = budget = LoopSyncBudget(burst_s=60.0, slow_sync_s=0.004)
    store.syncer = syncer
    loop_thread = threading.get_ident()
    try:
        await store.append_messages([msg(0, 200)])  # allocates ahead: a thread's job
        synced = len(filesystem.sync_threads)
        await store.append_messages([msg(1, 200)])
        assert filesystem.sync_threads[synced:] == [loop_thread] and budget.on_loop == 1

        budget.observe(0.2, on_loop=False)  # the disk slowed down: off the loop
        for i in range(2, 5):
            await store.append_messages([msg(i, 200)])
        assert len(filesystem.sync_threads) == synced + 1  # no thread, no loop sync
        assert store.stats()["fsyncs_in_io_uring"] >= 3 and budget.on_loop == 1

        for _ in range(40):  # fast again
            budget.observe(0.0001, on_loop=False)
        await store.append_messages([msg(5, 200)])
        assert filesystem.sync_threads[-1] == loop_thread and budget.on_loop == 2
    finally:
        await store.close()
    reopened = await open_store(tmp_path / "p")
    assert len(reopened.live_messages()) == 6
    await reopened.close()


async def test_a_single_node_says_it_has_a_ring_and_counts_its_syncs(server) -> None:
    import mqd.client

    probe = UringSyncer.open()
    if probe is None:
        pytest.skip("this kernel gives no io_uring (the node then syncs in threads)")
    await probe.close()
    async with await mqd.client.connect(server.address) as client:
        queue = await client.create_queue("rung")
        await queue.send(b"x")
        storage = (await client.stats())["storage"]
    assert storage["syncer"] == "io_uring"
    assert storage["fsyncs"] >= 1 and storage["fsyncs_in_io_uring"] >= 0


async def test_completions_no_eventfd_announced_are_found_all_the_same(
    syncer: UringSyncer, tmp_path: Path
) -> None:
    # Completions that overflowed the kernel's ring wait in its overflow list with no
    # eventfd signal (seen under CPU load); the ring is looked at while syncs are in
    # flight regardless. Here no signal is heard at all.
    asyncio.get_running_loop().remove_reader(syncer._event_fd)
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, b"z" * 100, 0)
        slot = syncer.new_slot()
        syncer.use(slot, fd)
        await asyncio.wait_for(asyncio.gather(*(syncer.fdatasync(slot) for _ in range(3))), 5)
        assert syncer.syncs == 3 and syncer._in_flight == 0
    finally:
        os.close(fd)


def ring_fds() -> list[str]:
    names = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            names.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            pass  # the listing's own descriptor, gone
    return [name for name in names if name in ("anon_inode:[io_uring]", "anon_inode:[eventfd]")]


async def test_a_close_cancelled_while_syncs_finish_still_frees_the_ring(tmp_path: Path) -> None:
    before = ring_fds()
    ring = UringSyncer.open()
    if ring is None:
        pytest.skip("this kernel gives no io_uring")
    fd = os.open(tmp_path / "big", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, b"z" * (64 << 20), 0)  # tens of ms of writeback for the sync
        slot = ring.new_slot()
        ring.use(slot, fd)
        syncing = asyncio.ensure_future(ring.fdatasync(slot))
        closing = asyncio.ensure_future(ring.close())
        await asyncio.sleep(0.001)
        assert not syncing.done() and not closing.done()  # close waits for the sync
        closing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await closing
        await ring.close()  # returns at once: the first one freed everything
        assert not ring.alive
        assert ring_fds() == before  # ring, its mmaps' copies and eventfd: all closed
        with pytest.raises(OSError) as failed:
            await syncing
        assert failed.value.errno == errno.EIO
    finally:
        os.close(fd)
