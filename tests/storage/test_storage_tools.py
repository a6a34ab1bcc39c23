"""verify / dump / rebuild_index on real partition and data directories."""

from __future__ import annotations

import io
from pathlib import Path

from storage_helpers import msg, open_store, segment_files

from mqd.clock import ManualClock
from mqd.storage import Lease, NewMessage, StorageConfig
from mqd.storage.index import INDEX_FILE
from mqd.storage.tools import dump, rebuild_index, rebuild_index_async, verify


async def _populate(part: Path, n: int = 30, **config) -> None:
    store = await open_store(part, clock=ManualClock(), config=StorageConfig(**config))
    for i in range(n):
        await store.append_messages([msg(i, 100, dedup_id=f"d{i}")])
    await store.delete([0, 1, 2])
    await store.lease([Lease(3, 1, 5000, 4000)])
    await store.purge(up_to_offset=5)
    await store.close()


async def test_verify_clean_data_dir_recursively(tmp_path: Path) -> None:
    data = tmp_path / "data"
    await _populate(data / "queues" / "a" / "0", segment_bytes_max=4096)
    await _populate(data / "queues" / "b" / "1")
    report = verify(data)
    assert report.ok, report.text()
    assert len(report.partitions) == 2
    a = report.partitions[0]
    assert a.segments > 1 and a.live_messages == 25 and a.index_rows == 25
    assert "OK" in report.text()
    # A partition directory on its own works too.
    single = verify(data / "queues" / "b" / "1")
    assert single.ok and len(single.partitions) == 1


async def test_verify_reports_corruption_and_index_mismatch(part: Path) -> None:
    await _populate(part)
    seg = segment_files(part)[0]
    data = bytearray(seg.read_bytes())
    data[len(data) - 300] ^= 0xFF  # inside one of the last (live) messages
    seg.write_bytes(bytes(data))
    report = verify(part)
    assert not report.ok
    text = report.text()
    assert "damaged" in text and "FAILED" in text
    assert any("index row" in p or "missing" in p for p in report.partitions[0].problems)


def test_verify_empty_dir_is_not_ok(tmp_path: Path) -> None:
    report = verify(tmp_path)
    assert not report.ok and "no partition" in report.text()


async def test_verify_torn_tail_and_lagging_index(part: Path) -> None:
    await _populate(part)
    seg = segment_files(part)[0]
    with seg.open("ab") as f:
        f.write(b"\x00\x00\x01\x00garbage")
    report = verify(part)
    assert not report.ok
    assert "tail" in report.partitions[0].problems[0]


async def test_dump_lists_every_record(part: Path) -> None:
    await _populate(part, n=5)
    store = await open_store(part)
    await store.append_messages([NewMessage(b"hello dump", {"a": "b"}, group_id="g1")])
    await store.close()
    out = io.StringIO()
    count = dump(part, out)
    lines = [x for x in out.getvalue().splitlines() if not x.startswith("#")]
    assert count == len(lines) == 9  # 5 messages, delete, lease, purge, 1 message
    assert "MESSAGE" in lines[0] and "offset=0" in lines[0]
    assert "DELETE offsets=[0, 1, 2]" in lines[5]
    assert "LEASE 3:rc=1,visible_at=5000,first=4000" in lines[6]
    assert "PURGE up_to=5" in lines[7]
    assert "b'hello dump'" in lines[8] and "group='g1'" in lines[8]
    # A single segment file can be dumped too.
    out2 = io.StringIO()
    assert dump(segment_files(part)[0], out2) == count


async def test_rebuild_index(part: Path) -> None:
    await _populate(part)
    (part / INDEX_FILE).write_bytes(b"junk")
    assert not verify(part).ok
    report = await rebuild_index_async(part)
    assert report.ok and report.partitions[part]["live_messages"] == 25
    assert verify(part).ok


def test_rebuild_index_sync(tmp_path: Path) -> None:
    import asyncio

    part = tmp_path / "p"
    asyncio.run(_populate(part))
    (part / INDEX_FILE).unlink()
    report = rebuild_index(tmp_path)
    assert "live=25" in report.text()
    assert verify(tmp_path).ok
