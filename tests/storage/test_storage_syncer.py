"""A node's sync process (mqd.storage.syncer): real process, real files, real faults.

The first tests hold for every syncer a store may have, so they run against a
single node's io_uring (mqd.storage.uring) too."""

from __future__ import annotations

import asyncio
import errno
import os
import signal
from pathlib import Path

import pytest
from storage_helpers import msg, open_store, segment_files, wait_for

from mqd.errors import InternalError
from mqd.storage import fs
from mqd.storage.config import StorageConfig
from mqd.storage.syncer import SyncProcess
from mqd.storage.uring import UringSyncer


@pytest.fixture
async def syncer():
    started = await SyncProcess.start()
    assert started is not None, "Linux passes descriptors over Unix sockets"
    yield started
    await started.close()


def files_held_by(pid: int) -> set[str]:
    """The regular files process `pid` holds open, by path."""
    held = set()
    for entry in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{entry}")
        except OSError:
            continue  # closed since the listing
        if target.startswith("/"):
            held.add(target.removesuffix(" (deleted)"))
    return held


@pytest.fixture(params=["sync_process", "io_uring"])
async def any_syncer(request: pytest.FixtureRequest):
    """Each syncer in turn: a cluster node's sync process, a single node's ring."""
    if request.param == "sync_process":
        made: SyncProcess | UringSyncer | None = await SyncProcess.start()
        assert made is not None, "Linux passes descriptors over Unix sockets"
    else:
        made = UringSyncer.open()
        if made is None:
            pytest.skip("this kernel gives no io_uring (the node then syncs in threads)")
    yield made
    await made.close()


def holds_own_copy(syncer: SyncProcess | UringSyncer, slot: int, fd: int, path: Path) -> bool:
    """Whether the syncer keeps a descriptor of its own of the file (the node may
    close its one meanwhile)."""
    if isinstance(syncer, SyncProcess):
        return str(path) in files_held_by(syncer.pid)
    own = syncer._files[slot]
    return own != fd and os.readlink(f"/proc/self/fd/{own}") == str(path)


async def test_an_observer_that_raises_loses_no_completion(
    any_syncer: SyncProcess | UringSyncer, tmp_path: Path
) -> None:
    def broken(_seconds: float) -> None:
        raise RuntimeError("observer bug")

    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o644)
    fs.fsync_observers.append(broken)
    try:
        slot = any_syncer.new_slot()
        any_syncer.use(slot, fd)
        os.pwrite(fd, b"x" * 100, 0)
        syncs = [any_syncer.fdatasync(slot) for _ in range(5)]
        await asyncio.wait_for(asyncio.gather(*syncs), 10)
        assert any_syncer.syncs == 5 and not any_syncer._waiting
    finally:
        fs.fsync_observers.remove(broken)
        os.close(fd)


async def test_it_syncs_the_file_it_was_given_and_reports_the_time(
    any_syncer: SyncProcess | UringSyncer, tmp_path: Path
) -> None:
    seen: list[float] = []
    fs.fsync_observers.append(seen.append)
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, b"x" * 300, 0)
        slot = any_syncer.new_slot()
        any_syncer.use(slot, fd)
        await any_syncer.fdatasync(slot)
        await asyncio.gather(any_syncer.fdatasync(slot), any_syncer.fdatasync(slot))
        assert any_syncer.syncs == 3 and len(seen) == 3 and all(s >= 0 for s in seen)
        assert holds_own_copy(any_syncer, slot, fd, tmp_path / "f")
    finally:
        fs.fsync_observers.remove(seen.append)
        os.close(fd)


async def test_a_failed_fdatasync_comes_back_with_its_errno(
    any_syncer: SyncProcess | UringSyncer,
) -> None:
    read_end, write_end = os.pipe()  # fdatasync on a pipe: EINVAL
    try:
        slot = any_syncer.new_slot()
        any_syncer.use(slot, read_end)
        with pytest.raises(OSError) as failed:
            await any_syncer.fdatasync(slot)
        assert failed.value.errno == errno.EINVAL
        with pytest.raises(OSError) as unknown:
            await any_syncer.fdatasync(any_syncer.new_slot())  # never given a file
        assert unknown.value.errno == errno.EBADF
        assert any_syncer.alive  # errors are answers, not the syncer's end
    finally:
        os.close(read_end)
        os.close(write_end)


async def test_it_ignores_sigterm_and_exits_when_the_node_closes_its_end(
    syncer: SyncProcess, tmp_path: Path
) -> None:
    os.kill(syncer.pid, signal.SIGTERM)  # a service manager signalling the whole group
    os.kill(syncer.pid, signal.SIGINT)  # a Ctrl-C at the terminal
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        slot = syncer.new_slot()
        syncer.use(slot, fd)
        await syncer.fdatasync(slot)  # still serving
    finally:
        os.close(fd)
    await syncer.close()
    assert syncer._proc.returncode == 0  # exited by itself, at end of file


async def test_a_store_syncs_through_it_and_follows_its_active_segment(tmp_path: Path) -> None:
    syncer = await SyncProcess.start()
    assert syncer is not None
    config = StorageConfig(segment_bytes_max=64 * 1024)
    store = await open_store(tmp_path / "p", config=config)
    store.syncer = syncer
    try:
        for i in range(20):
            await store.append_messages([msg(i, 200)])
        assert store.stats()["fsyncs_in_sync_process"] >= 15
        (first,) = segment_files(tmp_path / "p")
        assert str(first) in files_held_by(syncer.pid)

        # Past a segment: the process syncs the new one, and let go of the old one.
        for i in range(20, 400):
            await store.append_messages([msg(i, 300)])
        files = segment_files(tmp_path / "p")
        assert len(files) > 1
        held = files_held_by(syncer.pid)
        assert str(files[-1]) in held and str(first) not in held

        await store.close()
        # The forget goes out without an answer: the process closes the file soon after.
        await wait_for(lambda: not any(p.endswith(".log") for p in files_held_by(syncer.pid)))
        reopened = await open_store(tmp_path / "p", config=config)
        assert len(reopened.live_messages()) == 400
        await reopened.close()
    finally:
        await syncer.close()


async def test_if_it_dies_mid_sync_the_group_fails_and_later_ones_sync_in_threads(
    tmp_path: Path,
) -> None:
    syncer = await SyncProcess.start()
    assert syncer is not None
    store = await open_store(tmp_path / "p")
    store.syncer = syncer
    try:
        await store.append_messages([msg(0, 200)])  # allocates ahead: a thread's job
        await store.append_messages([msg(1, 200)])
        assert store.stats()["fsyncs_in_sync_process"] == 1

        os.kill(syncer.pid, signal.SIGSTOP)  # its sync of the next group never answers
        stuck = asyncio.ensure_future(store.append_messages([msg(2, 200)]))
        await asyncio.sleep(0.1)
        assert not stuck.done()
        os.kill(syncer.pid, signal.SIGKILL)
        with pytest.raises(InternalError):
            await asyncio.wait_for(stuck, 5)  # whether it synced is unknown: not acknowledged
        assert not syncer.alive

        # The log was cut back to before the group; the next ones sync in threads.
        metas = await store.append_messages([msg(3, 200)])
        assert metas[0].offset == 2 and store.stats()["fsyncs_in_sync_process"] == 2
        await store.close()
        reopened = await open_store(tmp_path / "p")
        offsets = [meta.offset for meta in reopened.live_messages()]
        bodies = sorted(m.body for m in await reopened.read(offsets))
        assert bodies == [msg(i, 200).body for i in (0, 1, 3)]
        await reopened.close()
    finally:
        await syncer.close()


async def test_a_full_socket_buffer_queues_requests_in_order_instead_of_failing(
    syncer: SyncProcess, tmp_path: Path
) -> None:
    # A disk that hangs while many stores wait: requests beyond the socket's buffer
    # wait on the node's side and go out, in order, once the process reads again.
    fds = [os.open(tmp_path / f"f{i}", os.O_RDWR | os.O_CREAT, 0o644) for i in range(2)]
    try:
        slots = [syncer.new_slot() for _ in fds]
        os.kill(syncer.pid, signal.SIGSTOP)
        for slot, fd in zip(slots, fds, strict=True):
            syncer.use(slot, fd)
        pending = [syncer.fdatasync(slots[i % 2]) for i in range(3000)]
        assert any(lane.backlog for lane in syncer._lanes)  # more than the buffers hold
        os.kill(syncer.pid, signal.SIGCONT)
        await asyncio.wait_for(asyncio.gather(*pending), 30)
        assert syncer.alive and syncer.syncs == 3000
        assert not any(lane.backlog for lane in syncer._lanes)
    finally:
        os.kill(syncer.pid, signal.SIGCONT)
        for fd in fds:
            os.close(fd)


async def test_each_lane_is_a_thread_of_its_own(syncer: SyncProcess) -> None:
    assert len(os.listdir(f"/proc/{syncer.pid}/task")) == len(syncer._lanes) == 4
    lanes = {id(syncer._lane_of(syncer.new_slot())) for _ in range(8)}
    assert len(lanes) == 4  # consecutive stores spread over them
