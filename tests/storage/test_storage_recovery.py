"""Recovery: torn tails at every byte, corrupt bytes, damaged older segments."""

from __future__ import annotations

import shutil
from pathlib import Path

from storage_helpers import LogRecorder, msg, open_store, segment_files

from mqd.clock import ManualClock
from mqd.storage import Lease, NewMessage, StorageConfig
from mqd.storage import records as rec
from mqd.storage.index import INDEX_FILE


async def _base_log(part: Path, clock: ManualClock) -> list[int]:
    store = await open_store(part, clock=clock)
    for i in range(3):
        await store.append_messages([msg(i, 40, dedup_id=f"d{i}")])
    await store.delete([1])
    await store.lease([Lease(0, 1, 777, 5)])
    await store.close()
    return [0, 2]


def _torn_record(offset: int, ts: int) -> bytes:
    parts: list[bytes] = []
    sizes: list[int] = []
    m = NewMessage(b"y" * 40, {"k": "v"}, group_id="g", dedup_id="torn")
    rec.encode_messages([m], offset, ts, parts, sizes)
    return b"".join(parts)


async def test_torn_last_record_at_every_byte(part: Path, tmp_path: Path) -> None:
    clock = ManualClock()
    live = await _base_log(part, clock)
    seg = segment_files(part)[0]
    good = seg.read_bytes()
    # The record being written when the process died; the index has not seen it.
    full = good + _torn_record(5, clock.now_ms())
    snapshot = tmp_path / "snapshot"
    shutil.copytree(part, snapshot)

    for cut in range(len(good), len(full) + 1):
        shutil.rmtree(part)
        shutil.copytree(snapshot, part)
        seg.write_bytes(full[:cut])
        log = LogRecorder()
        store = await open_store(part, clock=clock, log=log)
        offsets = [m.offset for m in store.live_messages()]
        if cut == len(full):
            assert offsets == [*live, 5]
            assert not log.named("segment.truncated")
        else:
            assert offsets == live, cut
            assert store.live_messages()[0].receive_count == 1
            truncated = log.named("segment.truncated")
            # A torn prefix of only zero bytes reads like preallocated space: the end of
            # the log, overwritten by the next write, nothing to cut.
            torn = full[len(good) : cut]
            assert bool(truncated) == any(torn), cut
            if truncated:
                assert truncated[0]["bytes_dropped"] == cut - len(good)
            assert seg.stat().st_size == (len(good) if any(torn) else cut)
            assert store.find_dedup("torn", 0) is None
        # The log is still appendable and the result survives a restart.
        new = await store.append_messages([msg(9, 40)])
        await store.close()
        store = await open_store(part, clock=clock)
        assert [m.offset for m in store.live_messages()][-1] == new[0].offset
        got = await store.read([0, 2, new[0].offset])
        assert [g.body for g in got] == [msg(0, 40).body, msg(2, 40).body, msg(9, 40).body]
        await store.close()


async def test_torn_tail_without_index(part: Path) -> None:
    clock = ManualClock()
    live = await _base_log(part, clock)
    seg = segment_files(part)[0]
    good = seg.read_bytes()
    torn = _torn_record(5, clock.now_ms())
    for cut in (1, 8, len(torn) // 2, len(torn) - 1):
        seg.write_bytes(good + torn[:cut])
        (part / INDEX_FILE).unlink()
        store = await open_store(part, clock=clock)
        assert [m.offset for m in store.live_messages()] == live
        assert store.next_offset == 5
        await store.close()


async def test_index_ahead_of_log_is_rebuilt(part: Path) -> None:
    """With fsync "never" a power loss can leave the index ahead of the log."""
    clock = ManualClock()
    await _base_log(part, clock)
    seg = segment_files(part)[0]
    good = seg.read_bytes()
    store = await open_store(part, clock=clock)
    await store.append_messages([msg(7, 40), msg(8, 40)])
    await store.close()
    seg.write_bytes(good)  # the log lost its last group; the index still has it
    log = LogRecorder()
    store = await open_store(part, clock=clock, log=log)
    assert [m.offset for m in store.live_messages()] == [0, 2]
    assert log.named("index.rebuild")
    assert store.next_offset == 5
    await store.close()


async def test_corrupt_byte_in_last_record_truncates(part: Path) -> None:
    clock = ManualClock()
    await _base_log(part, clock)
    store = await open_store(part, clock=clock)
    await store.append_messages([msg(10, 40)])  # offset 5, the last record
    await store.close()
    seg = segment_files(part)[0]
    data = bytearray(seg.read_bytes())
    data[-10] ^= 0xFF
    seg.write_bytes(bytes(data))
    log = LogRecorder()
    store = await open_store(part, clock=clock, log=log)
    assert [m.offset for m in store.live_messages()] == [0, 2]
    (event,) = log.named("segment.truncated")
    assert event["reason"] == "crc mismatch" and event["bytes_dropped"] > 40
    await store.close()


async def test_corrupt_byte_mid_segment_renames_bad_and_keeps_the_rest(part: Path) -> None:
    """A damaged record with good records after it is not a torn tail: keep everything readable."""
    clock = ManualClock()
    store = await open_store(part, clock=clock)
    metas = []
    for i in range(6):
        metas += await store.append_messages([msg(i, 40)])
    await store.close()
    seg = segment_files(part)[0]
    data = bytearray(seg.read_bytes())
    sizes = {m.offset: None for m in metas}
    # Find record 2 and flip a byte of its body.
    pos = rec.HEADER_BYTES
    for off in sizes:
        size = rec.check_record(data, pos, len(data), 1 << 20)
        if off == 2:
            data[pos + size - 5] ^= 0x55
        pos += size
    seg.write_bytes(bytes(data))

    log = LogRecorder()
    store = await open_store(
        part, clock=clock, log=log, config=StorageConfig(read_cache_bytes_max=0)
    )
    assert [m.offset for m in store.live_messages()] == [0, 1, 3, 4, 5]
    (event,) = log.named("segment.damaged")
    assert "crc mismatch" in event["damage"]
    assert event["renamed_to"] == seg.name + ".bad"
    assert (part / (seg.name + ".bad")).exists() and not seg.exists()
    got = await store.read([0, 1, 3, 4, 5])
    assert [g.body for g in got] == [msg(i, 40).body for i in (0, 1, 3, 4, 5)]
    new = await store.append_messages([msg(6, 40)])
    assert new[0].offset == 6
    assert [f.name for f in segment_files(part)] == ["00000000000000000006.log"]
    await store.close()

    # The .bad file stays and is still read on the next start; deletes in it work.
    log = LogRecorder()
    store = await open_store(part, clock=clock, log=log)
    assert [m.offset for m in store.live_messages()] == [0, 1, 3, 4, 5, 6]
    assert log.named("segment.damaged")[0]["already_renamed"] is True
    await store.delete([0, 1, 3, 4, 5])
    await store.close()
    (part / INDEX_FILE).unlink()
    store = await open_store(part, clock=clock)
    assert [m.offset for m in store.live_messages()] == [6]
    assert (part / (seg.name + ".bad")).exists()  # never silently deleted
    await store.close()


async def test_corrupt_older_segment_is_renamed_and_open_goes_on(part: Path) -> None:
    clock = ManualClock()
    config = StorageConfig(segment_bytes_max=4096, read_cache_bytes_max=0)
    store = await open_store(part, clock=clock, config=config)
    for i in range(40):
        await store.append_messages([msg(i, 200)])
    await store.close()
    first = segment_files(part)[0]
    data = bytearray(first.read_bytes())
    data[-3] ^= 0x01  # the last record of a sealed segment
    first.write_bytes(bytes(data))
    (part / INDEX_FILE).unlink()
    log = LogRecorder()
    store = await open_store(part, clock=clock, config=config, log=log)
    offsets = [m.offset for m in store.live_messages()]
    assert len(offsets) == 39 and offsets == sorted(offsets)
    assert log.named("segment.damaged")[0]["renamed_to"].endswith(".log.bad")
    got = await store.read(offsets)
    assert len(got) == 39
    await store.close()


async def test_garbage_segment_header(part: Path) -> None:
    clock = ManualClock()
    store = await open_store(part, clock=clock, config=StorageConfig(segment_bytes_max=4096))
    for i in range(40):
        await store.append_messages([msg(i, 200)])
    await store.close()
    files = segment_files(part)
    files[0].write_bytes(b"NOPE" + files[0].read_bytes()[4:])
    log = LogRecorder()
    store = await open_store(part, clock=clock, log=log)
    assert log.named("segment.damaged")
    assert store.live_messages()[0].offset > 0
    assert log.named("index.rows_lost")
    await store.close()


async def test_torn_segment_creation(part: Path) -> None:
    """A crash right after creating a new segment file leaves a short header."""
    clock = ManualClock()
    await _base_log(part, clock)
    (part / rec.segment_name(5)).write_bytes(b"MQD")
    log = LogRecorder()
    store = await open_store(part, clock=clock, log=log)
    assert [m.offset for m in store.live_messages()] == [0, 2]
    assert log.named("segment.truncated")
    assert (await store.append_messages([msg(1)]))[0].offset == 5
    await store.close()


async def test_preallocated_tail_reads_as_the_end_after_a_crash(part: Path, tmp_path: Path) -> None:
    """The active segment grows ahead of its records; a crash leaves the zeros behind."""
    clock = ManualClock()
    store = await open_store(part, clock=clock)
    metas = await store.append_messages([msg(i, 40) for i in range(20)])
    seg = segment_files(part)[0]
    records = seg.read_bytes().rstrip(b"\0")
    assert seg.stat().st_size > len(records)  # preallocated ahead
    crashed = tmp_path / "crashed"
    shutil.copytree(part, crashed)  # the files as a kill -9 now would leave them
    await store.close()
    assert seg.read_bytes() == records  # a clean close gives the space back

    log = LogRecorder()
    store = await open_store(crashed, clock=clock, log=log)
    assert [m.offset for m in store.live_messages()] == [m.offset for m in metas]
    assert not log.named("segment.truncated") and not log.named("segment.damaged")
    new = await store.append_messages([msg(99, 40)])
    await store.close()
    store = await open_store(crashed, clock=clock)
    got = await store.read([0, new[0].offset])
    assert [g.body for g in got] == [msg(0, 40).body, msg(99, 40).body]
    await store.close()
