"""A queue with several partitions on the single node: one code path with the cluster."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys

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
        emptied = await queue.stats()
        assert emptied["acked_total"] == 80
        # A float, as protocol.md §5.3 says, on a queue of several partitions too.
        assert type(emptied["oldest_message_age_s"]) is float
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


async def test_dedup_keys_are_caught_across_a_standard_queue_s_partitions(server):
    # A message with a key goes to its key's partition, so a repeat meets the first
    # whichever batch it comes in (protocol.md §4.0 "Deduplication").
    async with await mqd.client.connect(server.address) as client:
        queue = await client.create_queue("wide-dedup", partitions=4)
        ids = [await queue.send(b"order", dedup_id="k1") for _ in range(3)]
        assert len(set(ids)) == 1
        batch = await queue.send_batch([{"body": b"b", "dedup_id": "k2"}, b"no key"])
        again = await queue.send_batch([b"other", {"body": b"b2", "dedup_id": "k2"}])
        assert again[1] == batch[0]
        content = await client.create_queue("wide-content", partitions=3, content_based_dedup=True)
        assert len({await content.send(b"same body") for _ in range(4)}) == 1
        stats = await queue.stats()
        assert stats["visible"] == 4 and stats["deduplicated_total"] == 3
        assert (await content.stats())["deduplicated_total"] == 3


async def test_a_redriven_fifo_message_rejoins_its_group_s_partition(server):
    # Moves (dead letters, redrive) into a FIFO queue with several partitions go to the
    # group's partition: the group keeps one message in flight at a time.
    async with await mqd.client.connect(server.address) as client:
        await client.create_queue("back-dlq.fifo")
        source = await client.create_queue(
            "back.fifo",
            partitions=4,
            redrive_policy={"dead_letter_queue": "back-dlq.fifo", "max_receive_count": 1},
        )
        await source.send(b"m1", group_id="g1")
        (m1,) = await source.receive(max_messages=1)
        await source.change_visibility(m1, 0)
        assert await source.receive(max_messages=10) == []  # m1 moved to the DLQ
        await source.send_batch(
            [{"body": b"m2", "group_id": "g1"}, {"body": b"m3", "group_id": "g1"}]
        )
        moved = await client.queue("back-dlq.fifo").redrive(to="back.fifo")
        assert moved == 1
        first = await source.receive(max_messages=1)
        assert [m.body for m in first] == [b"m2"]
        assert await source.receive(max_messages=10) == []  # g1 has one in flight
        await source.ack(*first)
        rest = await source.receive(max_messages=10)
        assert [m.body for m in rest] == [b"m3", b"m1"]


async def test_following_a_partitioned_queue_with_a_peek_cursor_skips_nothing(server):
    # One id as `after_id` takes the partitions before its own as read, so a message
    # stored there meanwhile was skipped; a cursor names the last id of every
    # partition (protocol.md §4.13).
    async with await mqd.client.connect(server.address) as client:
        queue = await client.create_queue("followed", partitions=3)
        sent: list[str] = []
        seen: list[str] = []
        cursor = ""
        for round_number in range(6):
            for i in range(round_number % 3 + 1):  # one message per partition, in turn
                sent.append(await queue.send(b"%d-%d" % (round_number, i)))
            for _ in range(10):
                page = await queue.peek(2, after_id=cursor)
                seen += [m.id for m in page]
                cursor = mqd.client.peek_cursor(page, cursor)
                if len(page) < 2:
                    break
        assert {message_id.split("-")[1] for message_id in sent} == {"0000", "0001", "0002"}
        assert sorted(seen) == sorted(sent)
        assert len(seen) == len(set(seen))
        assert cursor.count(",") == 3
        assert await queue.peek(10, after_id=cursor) == []
        first = cursor.split(",")[0]
        with pytest.raises(InvalidArgument, match="twice"):
            await queue.peek(1, after_id=f"{first},{first},")
        other = await client.create_queue("other")
        with pytest.raises(InvalidArgument, match="not a message id of this queue"):
            await other.peek(1, after_id=cursor)


@pytest.mark.parametrize("partitions", [1, 3])
async def test_a_peek_answer_stays_within_one_frame_and_pages_on(server, partitions):
    # PEEK had no byte cap: peek(100) of 1 MiB messages built one 100 MiB answer (a
    # client that enforces frame_bytes_max refuses it; the server's memory paid for it).
    async with await mqd.client.connect(server.address) as client:
        frame_bytes_max = client.server_limits["frame_bytes_max"]
        queue = await client.create_queue(f"big-peek-{partitions}", partitions=partitions)
        body = bytes(1 << 20)
        for _ in range(5):
            await queue.send_batch([body] * 8)
        seen: list[str] = []
        cursor = ""
        for _ in range(10):
            page = await queue.peek(max_messages=100, after_id=cursor)
            if not page:
                break
            assert sum(len(m.body) for m in page) < frame_bytes_max
            seen += [m.id for m in page]
            cursor = mqd.client.peek_cursor(page, cursor) if partitions > 1 else page[-1].id
        assert len(seen) == len(set(seen)) == 40


async def test_a_queue_whose_dead_letter_queue_is_gone_delivers_as_usual_until_fixed(server):
    # A queue whose dead-letter queue is gone (a catalog from before changes were
    # serialized): the RECEIVE of a partition holding a message due to move failed
    # QUEUE_NOT_FOUND, every time, so that partition's healthy messages were stuck
    # behind it. Now the failed move is logged and the messages are delivered as
    # usual until a move works (tried again after 30 s, or at a policy change).
    async with await mqd.client.connect(server.address) as client:
        await client.create_queue("gone-dlq")
        policy = {"dead_letter_queue": "gone-dlq", "max_receive_count": 1}
        source = await client.create_queue("src4", partitions=4, redrive_policy=policy)
        await source.send_batch([b"poison-%d" % i for i in range(8)])
        taken = await source.receive(max_messages=10, wait=1)
        while len(taken) < 8:
            taken += await source.receive(max_messages=10, wait=1)
        await source.change_visibility_many(taken, 0)  # each moves to the DLQ when next due
        await source.send_batch([b"healthy-%d" % i for i in range(8)])
    server.stop()
    with sqlite3.connect(server.data_dir / "catalog.db") as db:
        db.execute("DELETE FROM queues WHERE name = 'gone-dlq'")
    server.start()
    assert any("queue.dead_letter_queue_missing" in line for line in server.log_lines)
    async with await mqd.client.connect(server.address) as client:
        source = client.queue("src4")
        got = []
        for _ in range(40):
            got += await source.receive(max_messages=10, wait=0)
            if len(got) == 16:
                break
        assert sorted(m.body for m in got) == sorted(
            [b"poison-%d" % i for i in range(8)] + [b"healthy-%d" % i for i in range(8)]
        )
        assert {m.receive_count for m in got if m.body.startswith(b"poison")} == {2}
        failed = [line for line in server.log_lines if '"dead_letter.failed"' in line]
        assert failed and all('"QUEUE_NOT_FOUND"' in line for line in failed)
        assert len(failed) <= 4  # once per partition, not once per receive

        # Fixed by a new policy: the next receive moves them, without waiting 30 s.
        poison = [m for m in got if m.body.startswith(b"poison")]
        await source.ack(*[m for m in got if m.body.startswith(b"healthy")])
        await source.change_visibility_many(poison, 0)
        dlq = await client.create_queue("new-dlq")
        await client.set_queue_attributes(
            "src4", redrive_policy={"dead_letter_queue": "new-dlq", "max_receive_count": 1}
        )
        assert await source.receive(max_messages=10, wait=0) == []
        moved = await dlq.receive(max_messages=10, wait=1)
        while len(moved) < 8:
            moved += await dlq.receive(max_messages=10, wait=1)
        assert sorted(m.body for m in moved) == sorted(m.body for m in poison)
        assert (await source.stats())["visible"] == 0


def test_admin_placement_on_a_single_node_says_there_is_none(server):
    # It printed "placement version 0" and nothing else, with queues there.
    result = subprocess.run(
        [sys.executable, "-m", "mqd", "admin", "placement", "--address", server.address],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "not a cluster" in result.stdout


@pytest.mark.parametrize("command", ["nodes", "placement", "rebalance", "decommission"])
def test_admin_with_a_ca_file_that_is_not_there_names_it(tmp_path, command):
    # A traceback ending in a FileNotFoundError that named no file.
    missing = tmp_path / "nope.pem"
    argv = ["admin", command, "--address", "127.0.0.1:1", "--ca", str(missing)]
    if command == "decommission":
        argv.append("backend-9")
    result = subprocess.run(
        [sys.executable, "-m", "mqd", *argv], capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert f"--ca: no such file {str(missing)!r}" in result.stderr
