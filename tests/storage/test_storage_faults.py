"""Disk full and I/O errors through the filesystem seam (real files, no mocks of the store)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from storage_helpers import EIO, ENOSPC, FaultyFS, msg, open_store, segment_files

from mqd.errors import InternalError, StorageFull
from mqd.storage import StorageConfig


async def test_enospc_fails_the_group_and_keeps_the_log_valid(part: Path) -> None:
    fs = FaultyFS()
    store = await open_store(part, fs=fs, config=StorageConfig(read_cache_bytes_max=0))
    kept = await store.append_messages([msg(i, 100) for i in range(5)])
    seg = segment_files(part)[0]
    records = seg.read_bytes().rstrip(b"\0")  # without the preallocated tail
    fs.write_errno = ENOSPC
    results = await asyncio.gather(
        *(store.append_messages([msg(i, 100)]) for i in range(10)),
        store.delete([kept[0].offset]),
        return_exceptions=True,
    )
    assert all(isinstance(r, StorageFull) for r in results)
    assert seg.read_bytes() == records  # the half-written group was cut off again
    assert store.next_offset == 5
    # Reads go on while the disk is full.
    got = await store.read([m.offset for m in kept])
    assert len(got) == 5
    # Once space is back, appends work and offsets carry on without a gap.
    fs.write_errno = None
    again = await store.append_messages([msg(50, 100)])
    assert again[0].offset == 5
    await store.delete([kept[0].offset])
    await store.close()
    store = await open_store(part)
    assert [m.offset for m in store.live_messages()] == [1, 2, 3, 4, 5]
    await store.close()


async def test_enospc_on_segment_roll(part: Path) -> None:
    fs = FaultyFS()
    config = StorageConfig(segment_bytes_max=4096)
    store = await open_store(part, fs=fs, config=config)
    for i in range(15):
        await store.append_messages([msg(i, 200)])
    fs.write_errno = ENOSPC
    with pytest.raises(StorageFull):
        for i in range(30):
            await store.append_messages([msg(i, 200)])
    fs.write_errno = None
    n = store.next_offset
    await store.append_messages([msg(99, 200)])
    await store.close()
    store = await open_store(part, config=config)
    assert len(store.live_messages()) == n + 1
    await store.close()


async def test_eio_on_fsync_is_internal_error(part: Path) -> None:
    fs = FaultyFS()
    store = await open_store(part, fs=fs)
    await store.append_messages([msg(0)])
    seg = segment_files(part)[0]
    records = seg.read_bytes().rstrip(b"\0")  # without the preallocated tail
    fs.fsync_errno = EIO
    with pytest.raises(InternalError):
        await store.append_messages([msg(1)])
    assert seg.read_bytes() == records
    fs.fsync_errno = None
    assert (await store.append_messages([msg(2)]))[0].offset == 1
    assert store.stats()["write_errors"] == 1
    await store.close()


async def test_eio_on_write_is_internal_error(part: Path) -> None:
    fs = FaultyFS()
    store = await open_store(part, fs=fs)
    fs.write_errno = EIO
    with pytest.raises(InternalError):
        await store.lease([])  # no-op, nothing written
        await store.append_messages([msg(1)])
    fs.write_errno = None
    await store.close()
    store = await open_store(part)
    assert store.live_messages() == []
    await store.close()
