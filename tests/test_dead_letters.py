"""Dead-letter queues against a real server: moves, refusal rules, crash atomicity."""

from __future__ import annotations

import asyncio
import time

import pytest

import mqd.client
from mqd.errors import InvalidArgument, MqdError, QueueInUse, QueueNotFound


async def peek_all(queue) -> list:
    found = []
    after = ""
    for _ in range(1000):
        batch = await queue.peek(max_messages=1000, after_id=after)
        if not batch:
            return found
        found.extend(batch)
        after = batch[-1].id
    raise AssertionError("peek did not end")


async def test_dlq_rules(server):
    async with await mqd.client.connect(server.address) as client:
        with pytest.raises(QueueNotFound):
            await client.create_queue(
                "a", redrive_policy={"dead_letter_queue": "missing", "max_receive_count": 3}
            )
        await client.create_queue("dlq")
        await client.create_queue("dlq.fifo")
        with pytest.raises(InvalidArgument):
            await client.create_queue(
                "a", redrive_policy={"dead_letter_queue": "dlq.fifo", "max_receive_count": 3}
            )
        with pytest.raises(InvalidArgument):
            await client.create_queue(
                "a", redrive_policy={"dead_letter_queue": "dlq", "max_receive_count": 0}
            )
        await client.create_queue(
            "a", redrive_policy={"dead_letter_queue": "dlq", "max_receive_count": 3}
        )
        with pytest.raises(QueueInUse) as refused:
            await client.delete_queue("dlq")
        assert "a" in str(refused.value)
        await client.set_queue_attributes("a", redrive_policy={})
        await client.delete_queue("dlq")


async def test_kill9_during_dead_letter_moves_keeps_each_message_in_exactly_one_queue(server):
    total = 3000
    async with await mqd.client.connect(server.address) as client:
        await client.create_queue("dead")
        source = await client.create_queue(
            "work", redrive_policy={"dead_letter_queue": "dead", "max_receive_count": 1}
        )
        sent = set(await source.send_batch([b"%d" % i for i in range(total)]))

    stop = asyncio.Event()

    async def churn() -> None:
        client = await mqd.client.connect(server.address)
        queue = client.queue("work")
        try:
            for _ in range(100_000):
                if stop.is_set():
                    return
                # Visibility 0: each message is delivered once, then moved on its next receive.
                await queue.receive(max_messages=100, visibility_timeout=0)
        except MqdError:
            return
        finally:
            await client.close()

    tasks = [asyncio.create_task(churn()) for _ in range(3)]
    deadline = time.monotonic() + 20
    async with await mqd.client.connect(server.address) as watcher:
        while time.monotonic() < deadline:
            stats = await watcher.queue("work").stats()
            if stats["dead_lettered_total"] >= total // 3:
                break
            await asyncio.sleep(0.01)
        server.kill()
    stop.set()
    await asyncio.wait(tasks, timeout=30)

    server.start()
    async with await mqd.client.connect(server.address) as client:
        in_source = {m.id for m in await peek_all(client.queue("work"))}
        dead = await peek_all(client.queue("dead"))
    in_dlq = [m.original_id for m in dead]
    assert len(in_dlq) == len(set(in_dlq)), "a message is in the DLQ twice"
    assert not in_source & set(in_dlq), "a message is in both queues"
    assert in_source | set(in_dlq) == sent, "a message is in neither queue"
    assert in_dlq, "nothing was dead-lettered before the kill"
