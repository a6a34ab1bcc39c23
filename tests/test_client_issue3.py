"""Client additions of issue 3 against a real `mqd serve`: REDRIVE, nack, send options,
Message fields, and the `consume()` stream.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from mqd.client import MessageStream, RedriveResult
from mqd.errors import ConnectionClosed, InvalidArgument, QueueInUse, QueueNotFound
from tests.client_logs import capture_client_logs

pytestmark = pytest.mark.timeout(60)


async def _dead_letter(queue, dlq, count: int, max_receive_count: int) -> None:
    """Receive and nack every message until all `count` have moved to the DLQ."""
    deadline = time.monotonic() + 20
    while (await dlq.stats())["visible"] < count:
        assert time.monotonic() < deadline, "messages were not dead-lettered"
        for message in await queue.receive(max_messages=100, wait=0.2):
            assert message.receive_count <= max_receive_count
            await queue.nack(message)


async def _with_dlq(client, name: str, dlq_name: str, max_receive_count: int = 2):
    dlq = await client.create_queue(dlq_name)
    queue = await client.create_queue(
        name,
        visibility_timeout=30,
        redrive_policy={"dead_letter_queue": dlq_name, "max_receive_count": max_receive_count},
    )
    return queue, dlq


# --- redrive -----------------------------------------------------------------------------


async def test_redrive_moves_dead_letters_back_to_their_source(client):
    queue, dlq = await _with_dlq(client, "work", "work-dlq", max_receive_count=2)
    ids = await queue.send_batch([b"a", b"b", b"c"])
    await _dead_letter(queue, dlq, 3, 2)
    dead = await dlq.peek(10)
    assert {m.original_id for m in dead} == set(ids)
    assert {m.source_queue for m in dead} == {"work"}
    assert all(m.receive_count == 2 for m in dead)

    moved = await dlq.redrive()
    assert moved == 3 and isinstance(moved, RedriveResult)
    assert moved.moved == 3 and moved.problems == []
    assert (await dlq.stats())["visible"] == 0

    back = await queue.receive(max_messages=10, wait=1)
    assert sorted(m.body for m in back) == [b"a", b"b", b"c"]
    assert {m.original_id for m in back} == set(ids)
    assert all(m.id not in ids for m in back)  # new messages with new ids
    assert all(m.receive_count == 1 and m.source_queue == "" for m in back)
    await queue.ack(*back)


async def test_redrive_to_another_queue_and_at_most_n(client):
    queue, dlq = await _with_dlq(client, "jobs", "jobs-dlq", max_receive_count=1)
    other = await client.create_queue("other")
    ids = await queue.send_batch([b"1", b"2", b"3"])
    await _dead_letter(queue, dlq, 3, 1)

    assert await dlq.redrive(max_messages=1) == 1
    assert (await dlq.stats())["visible"] == 2
    assert (await queue.stats())["visible"] == 1

    assert await dlq.redrive(to="other", rate=1000) == 2
    moved = await other.receive(max_messages=10, wait=1)
    assert len(moved) == 2
    assert {m.original_id for m in moved} < set(ids)
    assert await dlq.redrive() == 0  # nothing left; safe to repeat


async def test_redrive_problems_are_returned_and_logged(client):
    plain = await client.create_queue("plain")
    await plain.send(b"never dead-lettered")
    with capture_client_logs() as logs:
        result = await plain.redrive()
    assert result == 0
    assert len(result.problems) >= 1
    warnings = [e for e in logs if e["event"] == "queue.redrive_problems"]
    assert warnings and warnings[0]["problems"] == result.problems
    assert (await plain.stats())["visible"] == 1  # left where it was


async def test_redrive_argument_checks(client):
    dlq = await client.create_queue("d")
    for kwargs in ({"max_messages": 0}, {"max_messages": -1}, {"rate": 0}, {"to": ""}):
        with pytest.raises(InvalidArgument):
            await dlq.redrive(**kwargs)
    with pytest.raises(QueueNotFound):
        await dlq.redrive(to="missing")
    with pytest.raises(InvalidArgument):
        await dlq.redrive(to="d")  # the queue itself, refused by the server


# --- nack and send options ----------------------------------------------------------------


async def test_nack_with_a_delay_hides_the_message_for_that_long(client):
    queue = await client.create_queue("n", visibility_timeout=30)
    await queue.send(b"x")
    [message] = await queue.receive(wait=1)
    await queue.nack(message, delay=0.5)
    assert await queue.receive(wait=0) == []
    start = time.monotonic()
    [again] = await queue.receive(wait=5)
    assert 0.2 < time.monotonic() - start < 4
    assert again.receive_count == 2
    await queue.nack(again.receipt)  # delay 0: ready at once, by receipt string
    [third] = await queue.receive(wait=1)
    assert third.receive_count == 3
    assert third.first_received_at == message.first_received_at


async def test_send_options_and_message_fields(client):
    fifo = await client.create_queue("orders.fifo", content_based_dedup=True)
    first = await fifo.send(b"one", group_id="g1", dedup_id="d-1")
    assert await fifo.send(b"ignored", group_id="g1", dedup_id="d-1") == first
    ids = await fifo.send_batch(
        [{"body": b"two", "group_id": "g1"}, {"body": b"three", "group_id": "g2", "delay": 0}]
    )
    before = time.time()
    got = await fifo.receive(max_messages=10, wait=1)
    by_body = {m.body: m for m in got}
    assert by_body[b"one"].id == first
    assert by_body[b"one"].group_id == "g1" and by_body[b"one"].dedup_id == "d-1"
    assert by_body[b"three"].id == ids[1]
    assert len(by_body[b"two"].dedup_id) == 64  # content-based key, hex SHA-256
    one = by_body[b"one"]
    assert one.receive_count == 1
    assert one.source_queue == "" and one.original_id == ""
    assert abs(one.sent_at - before) < 30 and abs(one.first_received_at - before) < 30
    await fifo.ack(*got)

    standard = await client.create_queue("prio", retention=14 * 24 * 3600)
    await standard.send_batch([{"body": b"low", "priority": 0}, {"body": b"high", "priority": 9}])
    await standard.send(b"later", delay=7 * 24 * 3600)  # the longest delay allowed
    got = await standard.receive(max_messages=10, wait=1)
    assert [m.body for m in got] == [b"high", b"low"]
    assert (await standard.stats())["delayed"] == 1
    with pytest.raises(InvalidArgument):
        await standard.send(b"too late", delay=7 * 24 * 3600 + 1)


# --- consume() ------------------------------------------------------------------------------


async def test_consume_yields_messages_sent_before_and_after_it_starts(client):
    queue = await client.create_queue("stream", visibility_timeout=30)
    await queue.send_batch([b"early-%d" % i for i in range(5)])

    async def send_later() -> None:
        await asyncio.sleep(0.3)
        await queue.send_batch([b"late-%d" % i for i in range(5)])

    sender = asyncio.create_task(send_later())
    seen = []
    stream = queue.consume(prefetch=3, wait=2)
    assert isinstance(stream, MessageStream)
    async with stream:
        async for message in stream:
            seen.append(message.body)
            await queue.ack(message)
            if len(seen) == 10:
                break
    await sender
    assert sorted(seen) == sorted(
        [b"early-%d" % i for i in range(5)] + [b"late-%d" % i for i in range(5)]
    )
    stats = await queue.stats()
    assert stats["visible"] == 0 and stats["in_flight"] == 0


async def test_leaving_a_consume_loop_releases_the_prefetched_messages(client):
    queue = await client.create_queue("prefetched", visibility_timeout=60)
    await queue.send_batch([b"%d" % i for i in range(10)])

    # With `async with`, the release is done when the block ends.
    async with queue.consume(prefetch=10, wait=1) as stream:
        async for message in stream:
            await queue.ack(message)
            break
        assert stream.buffered == 9
    assert stream.buffered == 0
    again = await queue.receive(max_messages=10, wait=0)
    assert len(again) == 9
    assert all(m.receive_count == 2 for m in again)
    await queue.nack(again)

    # A plain `break`: the abandoned stream is closed by the event loop soon after.
    async for message in queue.consume(prefetch=10, wait=1):
        await queue.ack(message)
        break
    start = time.monotonic()
    again = []
    while len(again) < 8:
        again += await queue.receive(max_messages=10, wait=5)
    assert time.monotonic() - start < 5  # far sooner than the 60 s lease
    await queue.ack(again)
    assert (await queue.stats())["in_flight"] == 0


async def test_cancelling_a_consumer_task_releases_its_messages(client):
    queue = await client.create_queue("cancelled", visibility_timeout=60)
    await queue.send_batch([b"%d" % i for i in range(6)])
    first = asyncio.Event()

    async def consume_forever() -> None:
        async for message in queue.consume(prefetch=6, wait=1):
            await queue.ack(message)
            first.set()
            await asyncio.sleep(3600)

    task = asyncio.create_task(consume_forever())
    await asyncio.wait_for(first.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    again = []
    async with asyncio.timeout(10):
        while len(again) < 5:
            again += await queue.receive(max_messages=10, wait=5)
    assert len(again) == 5


async def test_consume_waits_through_a_server_restart(server, client):
    queue = await client.create_queue("durable", visibility_timeout=30)
    got: list[bytes] = []

    async def consume() -> None:
        async for message in queue.consume(prefetch=2, wait=0.5, reconnect_delay_max=0.5):
            got.append(message.body)
            await queue.ack(message)
            if len(got) == 2:
                return

    task = asyncio.create_task(consume())
    await queue.send(b"before")
    await asyncio.sleep(0.3)
    server.restart()
    # The client notices the restart through the calls outstanding on the old
    # connection; a send may meet it too, and is safe to retry with a dedup_id.
    for _ in range(3):
        try:
            await queue.send(b"after", dedup_id="after")
            break
        except ConnectionClosed:
            continue
    await asyncio.wait_for(task, 20)
    assert got == [b"before", b"after"]


async def test_consume_raises_errors_it_cannot_retry(client):
    with pytest.raises(QueueNotFound):
        async for _ in client.queue("missing").consume(wait=0):
            pass
    with pytest.raises(InvalidArgument):
        client.queue("x").consume(prefetch=0)


async def test_a_cancelled_long_poll_gives_back_what_the_server_sends_it_later(client):
    queue = await client.create_queue("abandoned", visibility_timeout=60)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.2):
            await queue.receive(wait=5)
    # The server's poll still waits, takes this message, and its answer has
    # no caller any more: the client releases the message at once.
    await queue.send(b"taken by the abandoned poll")
    start = time.monotonic()
    [message] = await queue.receive(wait=5)
    assert time.monotonic() - start < 5
    assert message.receive_count == 2


async def test_an_idle_stream_with_wait_0_does_not_spin(client):
    queue = await client.create_queue("idle")
    before = (await client.stats())["requests_total"]

    async def consume() -> None:
        async for _ in queue.consume(wait=0):
            pass

    task = asyncio.create_task(consume())
    await asyncio.sleep(1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert (await client.stats())["requests_total"] - before < 30


async def test_seconds_attributes_are_kept_to_the_millisecond(client):
    # 0.0004 s was accepted and shown, and acted as 0 (no lease at all).
    with pytest.raises(InvalidArgument, match="millisecond"):
        await client.create_queue("sub-ms", visibility_timeout=0.0004)
    queue = await client.create_queue("ms", visibility_timeout=0.25, delay=1.5)
    assert (await queue.attributes())["visibility_timeout"] == 0.25
    with pytest.raises(InvalidArgument, match="millisecond"):
        await queue.set_attributes(delay=0.0015)
    with pytest.raises(InvalidArgument, match="replication_factor"):
        await client.create_queue("typo", visibilty_timeout=5)  # the known ones, listed


async def test_set_attributes_takes_the_fixed_ones_back_as_they_are(client):
    # Reading a queue's attributes and writing them all back was refused: fifo,
    # partitions, replication_factor and min_insync are fixed at creation. Repeating
    # them unchanged is fine; changing them is still refused.
    queue = await client.create_queue("round-trip.fifo", partitions=2)
    attributes = await queue.attributes()
    attributes["visibility_timeout"] = 45
    await queue.set_attributes(**attributes)
    assert (await queue.attributes())["visibility_timeout"] == 45
    for change in ({"partitions": 3}, {"fifo": False}, {"replication_factor": 2}):
        with pytest.raises(InvalidArgument):
            await queue.set_attributes(**change)


async def test_delay_zero_overrides_the_queues_delay(client):
    # As SQS's DelaySeconds=0: a send without `delay` takes the queue's delay, and
    # an explicit 0 means none. 0 used to mean "the queue's" on the wire as well,
    # so no message could skip a queue's delay.
    queue = await client.create_queue("delayed-by-default", delay=60)
    await queue.send(b"queue's delay")
    await queue.send(b"at once", delay=0)
    await queue.send(b"rounds to none", delay=0.0001)
    await queue.send_batch([{"body": b"batch at once", "delay": 0}, b"batch queue's delay"])
    await queue.send(b"own delay", delay=30)
    stats = await queue.stats()
    assert (stats["visible"], stats["delayed"]) == (3, 3)
    got = await queue.receive(max_messages=10)
    assert sorted(m.body for m in got) == [b"at once", b"batch at once", b"rounds to none"]


async def test_a_delay_must_be_shorter_than_the_retention(client):
    # Accepted before: every such message expired without ever being receivable.
    with pytest.raises(InvalidArgument, match="shorter than retention"):
        await client.create_queue("never", delay=5 * 24 * 3600)  # retention: 4 days
    queue = await client.create_queue("short-lived", retention=120)
    with pytest.raises(InvalidArgument, match=r"entry 1: .*not shorter than the queue's retention"):
        await queue.send_batch([b"fine", {"body": b"doomed", "delay": 120}])
    with pytest.raises(InvalidArgument, match="shorter than retention"):
        await queue.set_attributes(delay=120)
    await queue.send(b"just in time", delay=119)
    await queue.set_attributes(delay=90)
    with pytest.raises(InvalidArgument, match="shorter than retention"):
        await queue.set_attributes(retention=60)
    stats = await queue.stats()
    assert (stats["visible"], stats["delayed"]) == (0, 1)  # nothing of the refused batch


async def test_a_redrive_policy_is_removed_with_none_or_an_empty_map(client):
    dlq = await client.create_queue("rp-dlq")
    policy = {"dead_letter_queue": "rp-dlq", "max_receive_count": 3}
    for removal in (None, {}):
        queue = await client.create_queue("rp-src", redrive_policy=policy)
        with pytest.raises(QueueInUse, match=r"set it to \{\}"):
            await dlq.delete()
        await queue.set_attributes(redrive_policy=removal)
        assert "redrive_policy" not in await queue.attributes()  # as if never set
        await queue.delete()
    await dlq.delete()


async def test_catalog_changes_made_together_do_not_interleave(client):
    # Each change awaited its writes between its checks and its update, so changes
    # made together interleaved: one of two sets was lost; a dead-letter queue was
    # deleted while a policy naming it was written (every receive of the poison
    # message then failed QUEUE_NOT_FOUND); a delete racing a set left the queue
    # listed but without partitions. (Review: 20 of 20 runs each.)
    for _ in range(5):
        await client.create_queue("both")
        await asyncio.gather(
            client.set_queue_attributes("both", visibility_timeout=5),
            client.set_queue_attributes("both", delay=3),
        )
        attributes = await client.queue("both").attributes()
        assert (attributes["visibility_timeout"], attributes["delay"]) == (5, 3)
        await client.delete_queue("both")

        await client.create_queue("dead")
        await client.create_queue("source")
        policy = {"dead_letter_queue": "dead", "max_receive_count": 1}
        set_policy, delete_dlq = await asyncio.gather(
            client.set_queue_attributes("source", redrive_policy=policy),
            client.delete_queue("dead"),
            return_exceptions=True,
        )
        succeeded = [not isinstance(r, Exception) for r in (set_policy, delete_dlq)]
        assert succeeded.count(True) == 1, (set_policy, delete_dlq)
        has_policy = "redrive_policy" in await client.queue("source").attributes()
        assert has_policy == ("dead" in await client.list_queues())
        await client.delete_queue("source")
        if has_policy:
            await client.delete_queue("dead")

        await client.create_queue("racing")
        await asyncio.gather(
            client.set_queue_attributes("racing", visibility_timeout=60),
            client.delete_queue("racing"),
            return_exceptions=True,
        )
        if "racing" in await client.list_queues():
            await client.queue("racing").send(b"it has partitions")
            await client.delete_queue("racing")
        await client.create_queue("racing")  # the name is free again
        await client.delete_queue("racing")
