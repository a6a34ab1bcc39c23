"""Durability with a real server: clean restarts, kill -9 under load, the data-dir lock."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys

import pytest

import mqd.client
from mqd.errors import MqdError

from .conftest import ServerProcess


async def drain(queue, *, expect_at_most: int, wait: float = 0.5) -> dict[str, bytes]:
    """Receive and ack everything visible; returns id -> body."""
    seen: dict[str, bytes] = {}
    for _ in range(expect_at_most // 100 + 20):
        batch = await queue.receive(max_messages=1000, wait=wait, visibility_timeout=60)
        if not batch:
            break
        for message in batch:
            seen[message.id] = message.body
        await queue.ack(*batch)
    return seen


async def test_sigterm_exits_zero_and_restart_keeps_every_message(server):
    async with await mqd.client.connect(server.address) as client:
        queue = await client.create_queue("keep")
        ids = await queue.send_batch([b"m%d" % i for i in range(500)])
        received = await queue.receive(max_messages=100, visibility_timeout=1)
        await queue.ack(*received[:50])

    assert server.stop() == 0
    assert server.events("server.stopped")
    server.start()

    async with await mqd.client.connect(server.address) as client:
        queue = client.queue("keep")
        stats = await queue.stats()
        assert stats["visible"] + stats["in_flight"] == 450
        await asyncio.sleep(1.1)  # the 50 unacked leases run out
        seen = await drain(queue, expect_at_most=450)
    acked = {m.id for m in received[:50]}
    assert set(seen) == set(ids) - acked


async def test_kill9_under_load_loses_no_acknowledged_send_or_delete(server):
    """Every send the server acknowledged is there after kill -9; every ack stays acked."""
    acknowledged_sends: set[str] = set()
    acknowledged_deletes: set[str] = set()
    # An ack cut off by the kill may or may not have been applied: such a message
    # may be gone, but only such a message.
    attempted_deletes: set[str] = set()
    stop = asyncio.Event()
    enough = asyncio.Event()

    async with await mqd.client.connect(server.address) as admin:
        await admin.create_queue("crash", visibility_timeout=600)

    async def produce(client, worker: int) -> None:
        queue = client.queue("crash")
        for round_number in range(10_000):
            if stop.is_set():
                return
            try:
                ids = await queue.send_batch(
                    [b"%d-%d-%d" % (worker, round_number, i) for i in range(50)]
                )
            except MqdError:
                return
            acknowledged_sends.update(ids)
            if len(acknowledged_sends) >= 5000:
                enough.set()

    async def consume(client) -> None:
        queue = client.queue("crash")
        for _ in range(10_000):
            if stop.is_set():
                return
            try:
                batch = await queue.receive(max_messages=20, wait=0.2)
                if batch:
                    attempted_deletes.update(m.id for m in batch)
                    await queue.ack(*batch)
                    acknowledged_deletes.update(m.id for m in batch)
            except MqdError:
                return

    clients = [await mqd.client.connect(server.address) for _ in range(3)]
    tasks = [
        asyncio.create_task(produce(clients[0], 0)),
        asyncio.create_task(produce(clients[1], 1)),
        asyncio.create_task(consume(clients[2])),
    ]
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(enough.wait(), 15)
    server.kill()
    stop.set()
    await asyncio.wait(tasks, timeout=30)
    for client in clients:
        await client.close()
    assert len(acknowledged_sends) >= 5000
    assert acknowledged_deletes, "the consumer acked nothing before the kill"

    server.start()
    async with await mqd.client.connect(server.address) as client:
        queue = client.queue("crash")
        # Leases survive the restart: release them by waiting is too slow, so peek sees all.
        remaining: set[str] = set()
        after = ""
        for _ in range(1000):
            batch = await queue.peek(max_messages=1000, after_id=after)
            if not batch:
                break
            remaining.update(m.id for m in batch)
            after = batch[-1].id
    lost = acknowledged_sends - attempted_deletes - remaining
    assert not lost, f"{len(lost)} acknowledged sends lost"
    resurrected = acknowledged_deletes & remaining
    assert not resurrected, f"{len(resurrected)} acknowledged deletes came back"


def test_data_dir_is_locked(server, tmp_path):
    second = ServerProcess(server.data_dir)
    result = subprocess.run(second.command(), capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "in use by another mqd process" in result.stderr


def test_unknown_config_key_stops_the_server(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text("[storage]\nfsync = 'always'\nsegment_size = 5\n")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mqd",
            "serve",
            "--config",
            str(config),
            "--data-dir",
            str(tmp_path / "d"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "storage.segment_size" in result.stderr


async def test_visibility_expiry_redelivers(server):
    async with await mqd.client.connect(server.address) as client:
        queue = await client.create_queue("vis", visibility_timeout=1)
        await queue.send(b"once")
        (first,) = await queue.receive()
        assert await queue.receive() == []
        (second,) = await queue.receive(wait=5)
        assert second.id == first.id
        assert second.receive_count == 2
        with pytest.raises(mqd.errors.ReceiptInvalid):
            await queue.ack(first)
        await queue.ack(second)


@pytest.mark.parametrize("hard", [False, True])
async def test_a_delayed_message_received_before_a_restart_is_delivered_after(server, hard):
    # Its lease outlives the restart; once that runs out it is delivered again, and a
    # FIFO group behind it moves on (before, both stayed visible and were never taken).
    async with await mqd.client.connect(server.address) as client:
        plain = await client.create_queue("late", visibility_timeout=2)
        fifo = await client.create_queue("late.fifo", visibility_timeout=2)
        await plain.send(b"delayed", delay=1)
        await fifo.send(b"head", group_id="g", delay=1)
        await fifo.send(b"next", group_id="g")
        (first,) = await plain.receive(wait=5)
        head = await fifo.receive(max_messages=1, wait=5)
        assert [m.body for m in head] == [b"head"]
    await asyncio.to_thread(server.restart, hard=hard)
    async with await mqd.client.connect(server.address) as client:
        (again,) = await client.queue("late").receive(wait=10)
        assert again.id == first.id and again.receive_count == 2
        group = await client.queue("late.fifo").receive(max_messages=10, wait=10)
        assert [(m.body, m.receive_count) for m in group] == [(b"head", 2), (b"next", 1)]


async def test_long_poll_wakes_on_send(server):
    async with await mqd.client.connect(server.address) as client:
        queue = await client.create_queue("lp")
        waiting = asyncio.create_task(queue.receive(wait=20))
        await asyncio.sleep(0.2)
        assert not waiting.done()
        await queue.send(b"ping")
        messages = await asyncio.wait_for(waiting, 10)
        assert [m.body for m in messages] == [b"ping"]


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_serve_with_no_options_uses_the_documented_defaults(tmp_path):
    if not _port_free(6470):
        pytest.skip("127.0.0.1:6470 is taken on this machine")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mqd", "serve", "--log-format", "json"],
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        line = ""
        for line in proc.stderr:
            if "server.listening" in line:
                break
        assert '"address": "127.0.0.1:6470"' in line
        assert (tmp_path / "mqd-data" / "catalog.db").exists()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(20) == 0
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()
