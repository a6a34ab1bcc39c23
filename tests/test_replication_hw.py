"""A partition's persisted high watermark is written off the loop, at most once an
interval, one write at a time, and the last value reaches the disk on flush."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from mqd.cluster import replication
from mqd.cluster.replication import HW_FILE, HighWatermarkFile, read_persisted


@pytest.fixture
def write_threads(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """The real persist_hw, noting (thread, value) of each write."""
    seen: list[tuple[int, int]] = []
    real = replication.persist_hw

    def noting(directory: Path, high_watermark: int, epoch: int | None = None) -> None:
        seen.append((threading.get_ident(), high_watermark))
        real(directory, high_watermark, epoch)

    monkeypatch.setattr(replication, "persist_hw", noting)
    return seen


async def test_writes_in_a_thread_and_at_most_once_an_interval(
    tmp_path: Path, write_threads: list[tuple[int, int]]
) -> None:
    hw_file = HighWatermarkFile(tmp_path, interval_s=60)
    hw_file.offer(10)
    await asyncio.sleep(0)  # the write starts, with 10
    for value in range(11, 200):  # a burst of commits meanwhile: no write each
        hw_file.offer(value)
    await hw_file.flush()

    loop_thread = threading.get_ident()
    assert [value for _, value in write_threads] == [10, 199]
    assert all(thread != loop_thread for thread, _ in write_threads)
    assert read_persisted(tmp_path)[0] == 199
    assert not (tmp_path / HW_FILE).with_suffix(".tmp").exists()


async def test_a_write_takes_the_value_current_when_it_starts(
    tmp_path: Path, write_threads: list[tuple[int, int]]
) -> None:
    hw_file = HighWatermarkFile(tmp_path, interval_s=0)
    hw_file.offer(5)
    hw_file.offer(6)  # before the write has started: it writes 6, once
    await hw_file.flush()
    assert [value for _, value in write_threads] == [6]

    hw_file.offer(6)  # unchanged: nothing to write
    await hw_file.flush()
    assert len(write_threads) == 1
    assert read_persisted(tmp_path)[0] == 6


async def test_a_failed_write_is_retried_by_the_next_offer(tmp_path: Path) -> None:
    missing = tmp_path / "gone"
    hw_file = HighWatermarkFile(missing, interval_s=0)
    hw_file.offer(3)
    await hw_file.flush()  # the directory is missing: logged nowhere, nothing written
    assert hw_file.written is None

    missing.mkdir()
    hw_file.offer(4)
    for _ in range(100):
        if hw_file.written == 4:
            break
        await asyncio.sleep(0.01)
    assert read_persisted(missing)[0] == 4
