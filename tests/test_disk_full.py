"""A real full disk (a small tmpfs): sends fail with STORAGE_FULL, nothing stored is lost."""

from __future__ import annotations

import contextlib
import subprocess
import uuid

import pytest

import mqd.client
from mqd.errors import ErrorCode, ServerError

from .conftest import ServerProcess


@pytest.fixture
def small_disk(tmp_path):
    mount_point = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    mount_point.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {result.stderr.strip()}")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


async def test_full_disk_refuses_sends_keeps_serving_and_loses_nothing(small_disk):
    server = ServerProcess(small_disk / "data", extra_args=("--fsync", "always"))
    server.start()
    try:
        acknowledged: list[str] = []
        async with await mqd.client.connect(server.address) as client:
            queue = await client.create_queue("fill")
            body = b"x" * 4000
            error = None
            for _ in range(2000):
                try:
                    acknowledged += await queue.send_batch([body] * 10)
                except ServerError as exc:
                    error = exc
                    break
            assert error is not None, "the disk never filled"
            assert error.code in (ErrorCode.STORAGE_FULL, ErrorCode.INTERNAL), error
            assert acknowledged
            # Still serving: reads work, and the server answers pings.
            await client.ping()
            received = await queue.receive(max_messages=10)
            assert len(received) == 10
            stats = await queue.stats()
            assert stats["visible"] + stats["in_flight"] == len(acknowledged)
        assert server.stop() == 0

        # Restart on the same, still full disk: it opens, and every acknowledged
        # message is there.
        server.start()
        async with await mqd.client.connect(server.address) as client:
            stats = await client.queue("fill").stats()
            assert stats["visible"] + stats["in_flight"] == len(acknowledged)
    finally:
        with contextlib.suppress(Exception):
            server.kill()
