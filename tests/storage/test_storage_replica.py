"""A follower's ReplicaLog on real files: preallocated appends, crash tails, promotion."""

from __future__ import annotations

import shutil
from pathlib import Path

from storage_helpers import msg, open_store, segment_files

from mqd.storage import StorageConfig
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
