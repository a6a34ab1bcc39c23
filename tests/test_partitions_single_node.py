"""A queue with several partitions on the single node: one code path with the cluster."""

from __future__ import annotations

import asyncio

import pytest

import mqd.client
from mqd.errors import InvalidArgument


async def test_partitioned_queue_send_receive_ack_peek(server):
    async with await mqd.client.connect(server.address) as client:
        queue = await client.create_queue("wide", partitions=4)
        sent = []
        for round_number in range(8):
            sent += await queue.send_batch([b"%d-%d" % (round_number, i) for i in range(10)])
        partitions = {message_id.split("-")[1] for message_id in sent}
        assert len(partitions) == 4, "batches spread over every partition"
        peeked = []
        after = ""
        for _ in range(20):
            batch = await queue.peek(max_messages=7, after_id=after)
            if not batch:
                break
            peeked += [m.id for m in batch]
            after = batch[-1].id
        assert sorted(peeked) == sorted(sent)
        stats = await queue.stats()
        assert stats["visible"] == 80
        received = []
        for _ in range(20):
            batch = await queue.receive(max_messages=30)
            if not batch:
                break
            received += batch
            await queue.ack(*batch)
        assert sorted(m.id for m in received) == sorted(sent)
        assert (await queue.stats())["acked_total"] == 80
        with pytest.raises(InvalidArgument):
            await client.set_queue_attributes("wide", partitions=2)


async def test_long_poll_across_partitions_wakes_on_any(server):
    async with await mqd.client.connect(server.address) as client:
        queue = await client.create_queue("wide", partitions=3)
        waiting = asyncio.create_task(queue.receive(wait=10))
        await asyncio.sleep(0.2)
        assert not waiting.done()
        for _ in range(3):  # round robin lands one batch in some partition
            await queue.send(b"wake")
        messages = await asyncio.wait_for(waiting, 5)
        assert [m.body for m in messages] == [b"wake"]


async def test_fifo_groups_stay_in_one_partition(server):
    async with await mqd.client.connect(server.address) as client:
        queue = await client.create_queue("wide.fifo", partitions=4)
        for i in range(5):
            await queue.send_batch(
                [{"body": b"%s-%d" % (g.encode(), i), "group_id": g} for g in ("a", "b", "c")]
            )
        order: dict[str, list[bytes]] = {}
        for _ in range(50):
            batch = await queue.receive(max_messages=10)
            if not batch:
                break
            for message in batch:
                order.setdefault(message.group_id, []).append(message.body)
            await queue.ack(*batch)
        for group in ("a", "b", "c"):
            assert order[group] == [b"%s-%d" % (group.encode(), i) for i in range(5)]
