"""`Queue.run_consumer` / `Consumer` against a real `mqd serve`: acks, retries with
backoff, dead letters, lease heartbeats, graceful stops and restarts. No mocks.
"""

from __future__ import annotations

import asyncio
import collections
import random
import subprocess
import sys
import time

import pytest

import mqd.client
from mqd.client import Consumer, Message
from mqd.errors import InvalidArgument, QueueNotFound
from tests.client_logs import capture_client_logs

pytestmark = pytest.mark.timeout(90)


async def _until(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not await predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def _settled(queue) -> bool:
    stats = await queue.stats()
    return stats["visible"] == 0 and stats["in_flight"] == 0 and stats["delayed"] == 0


async def test_run_consumer_handles_and_acks_every_message(client):
    queue = await client.create_queue("basic", visibility_timeout=30)
    ids = await queue.send_batch([b"%d" % i for i in range(200)])
    seen: list[str] = []
    running = 0
    running_max = 0

    async def handler(message: Message) -> None:
        nonlocal running, running_max
        running += 1
        running_max = max(running_max, running)
        await asyncio.sleep(0.005)
        seen.append(message.id)
        running -= 1

    task = asyncio.create_task(queue.run_consumer(handler, concurrency=4, wait=1))
    await _until(lambda: _settled(queue), 20, "every message acked")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert sorted(seen) == sorted(ids)
    assert running_max == 4


async def test_a_plain_function_handler_acks_what_it_handled(client):
    # Its None was awaited (TypeError) and every message retried for ever. It ran,
    # and returned: the message is done (a warning says it blocks the loop).
    queue = await client.create_queue("plain", visibility_timeout=30)
    ids = await queue.send_batch([b"%d" % i for i in range(5)])
    seen: list[str] = []
    with capture_client_logs() as logs:
        task = asyncio.create_task(queue.run_consumer(lambda m: seen.append(m.id), wait=1))
        await _until(lambda: _settled(queue), 20, "every message acked")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert sorted(seen) == sorted(ids)
    assert (await queue.stats())["received_total"] == 5
    assert [e["event"] for e in logs].count("consumer.plain_handler") == 1


async def test_ten_consumers_random_failures_every_message_acked_once_or_dead(server):
    """10,000 messages, 10 consumers on 2 connections, handlers failing 20% of the time."""
    total = 10_000
    rng = random.Random(20240603)
    clients = [await mqd.client.connect(server.address) for _ in range(2)]
    try:
        admin = clients[0]
        dlq = await admin.create_queue("stress-dlq")
        queue = await admin.create_queue(
            "stress",
            visibility_timeout=30,
            redrive_policy={"dead_letter_queue": "stress-dlq", "max_receive_count": 5},
        )
        sent = set(await queue.send_batch([b"%d" % i for i in range(total)]))
        assert len(sent) == total

        acked: collections.Counter[str] = collections.Counter()
        failures = 0

        async def handler(message: Message) -> None:
            nonlocal failures
            if rng.random() < 0.2:
                failures += 1
                raise RuntimeError(f"handler failure on delivery {message.receive_count}")
            acked[message.id] += 1

        consumers = [
            Consumer(
                clients[i % 2].queue("stress"),
                handler,
                concurrency=4,
                wait=0.5,
                retry_delay=0.005,
                retry_delay_max=0.05,
                rng=random.Random(i),
            )
            for i in range(10)
        ]
        start = time.monotonic()
        with capture_client_logs() as logs:
            for consumer in consumers:
                await consumer.start()

            async def all_done() -> bool:
                dead = (await dlq.stats())["visible"]
                return len(acked) + dead >= total and await _settled(queue)

            await _until(all_done, 60, "every message acked or dead-lettered")
            await asyncio.gather(*(c.stop() for c in consumers))
        elapsed = time.monotonic() - start

        dead = []
        async for message in _peek_all(dlq):
            dead.append(message.original_id)
        assert len(dead) == len(set(dead))
        assert max(acked.values()) == 1, "a message was handled successfully twice"
        assert set(acked) | set(dead) == sent, "a message was lost"
        assert not set(acked) & set(dead)
        assert failures > 0.15 * total
        # Five failures in a row at 20% is rare (0.032%): about 3 of 10,000.
        assert len(dead) < 30
        assert sum(c.stats.acked for c in consumers) == total - len(dead)
        assert sum(c.stats.ack_failed + c.stats.leases_lost for c in consumers) == 0
        assert sum(c.stats.failed for c in consumers) == failures
        assert all(c.in_flight == 0 and not c.running for c in consumers)
        failed_events = [e for e in logs if e["event"] == "consumer.handler_failed"]
        assert len(failed_events) == failures
        assert failed_events[0]["exc_info"] is True
        assert elapsed < 40
    finally:
        for c in clients:
            await c.close()


async def _peek_all(queue):
    after = ""
    while True:
        page = await queue.peek(1000, after_id=after)
        if not page:
            return
        for message in page:
            yield message
        after = page[-1].id


async def test_heartbeat_keeps_a_slow_handler_s_message_from_redelivery(server, client):
    queue = await client.create_queue("slow", visibility_timeout=1)
    await queue.send(b"slow work")
    other = await mqd.client.connect(server.address)
    started = asyncio.Event()
    finished: list[str] = []

    async def handler(message: Message) -> None:
        started.set()
        await asyncio.sleep(2.5)
        finished.append(message.id)

    try:
        async with queue.consumer(handler, concurrency=1, wait=0.5) as consumer:
            assert consumer.visibility_timeout == 1.0  # read from the queue
            await asyncio.wait_for(started.wait(), 5)
            # Another consumer polls the whole time the handler runs: nothing for it.
            poll_until = time.monotonic() + 3
            while time.monotonic() < poll_until and not finished:
                assert await other.queue("slow").receive(max_messages=10, wait=0.3) == []
            await _until(lambda: _settled(queue), 5, "the slow message acked")
        assert len(finished) == 1
        assert consumer.stats.extended >= 2
        assert consumer.stats.acked == 1 and consumer.stats.leases_lost == 0
    finally:
        await other.close()


async def test_stop_lets_running_handlers_finish_and_releases_the_rest(client):
    queue = await client.create_queue("graceful", visibility_timeout=60)
    ids = await queue.send_batch([b"%d" % i for i in range(20)])
    entered = 0
    all_entered = asyncio.Event()
    finished: list[str] = []

    async def handler(message: Message) -> None:
        nonlocal entered
        entered += 1
        if entered == 3:
            all_entered.set()
        await asyncio.sleep(0.5)
        finished.append(message.id)

    consumer = queue.consumer(handler, concurrency=3, prefetch=5, wait=0.5)
    await consumer.start()
    await asyncio.wait_for(all_entered.wait(), 5)
    await consumer.stop()
    assert not consumer.running and consumer.in_flight == 0
    assert len(finished) == 3 and consumer.stats.acked == 3
    stats = await queue.stats()
    assert stats["in_flight"] == 0
    assert stats["visible"] == 17  # prefetched ones were released at once
    rest = []
    while len(rest) < 17:
        rest += await queue.receive(max_messages=20, wait=1)
    assert sorted(m.id for m in rest) == sorted(set(ids) - set(finished))
    await consumer.stop()  # idempotent


async def test_cancelling_run_consumer_drains_gracefully(client):
    queue = await client.create_queue("cancel", visibility_timeout=60)
    await queue.send_batch([b"%d" % i for i in range(4)])
    entered = asyncio.Event()
    finished = []

    async def handler(message: Message) -> None:
        entered.set()
        await asyncio.sleep(0.3)
        finished.append(message.id)

    task = asyncio.create_task(queue.run_consumer(handler, concurrency=2, prefetch=0, wait=0.5))
    await asyncio.wait_for(entered.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(finished) == 2
    stats = await queue.stats()
    assert stats["in_flight"] == 0 and stats["visible"] == 2


async def test_drain_timeout_cancels_stuck_handlers_and_releases_their_messages(client):
    queue = await client.create_queue("stuck", visibility_timeout=60)
    await queue.send(b"never finishes")
    entered = asyncio.Event()
    cancelled = asyncio.Event()

    async def handler(message: Message) -> None:
        entered.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    consumer = await queue.consumer(handler, concurrency=1, wait=0.1, drain_timeout=0.5).start()
    await asyncio.wait_for(entered.wait(), 5)
    with capture_client_logs() as logs:
        await asyncio.wait_for(consumer.stop(), 10)
    assert cancelled.is_set()
    assert any(e["event"] == "consumer.drain_timeout" for e in logs)
    [again] = await queue.receive(wait=1)
    assert again.receive_count == 2


async def test_a_failing_handler_is_retried_with_backoff(client):
    queue = await client.create_queue("retry", visibility_timeout=30)
    await queue.send(b"flaky")
    deliveries: list[tuple[int, float]] = []

    async def handler(message: Message) -> None:
        deliveries.append((message.receive_count, time.monotonic()))
        if message.receive_count < 3:
            raise ValueError("not yet")

    with capture_client_logs() as logs:
        async with queue.consumer(handler, wait=0.5, retry_delay=0.2, retry_delay_max=0.3):
            await _until(lambda: _settled(queue), 10, "the flaky message acked")
    assert [count for count, _ in deliveries] == [1, 2, 3]
    first_gap = deliveries[1][1] - deliveries[0][1]
    second_gap = deliveries[2][1] - deliveries[1][1]
    assert first_gap >= 0.15  # 0.2 s
    assert second_gap >= 0.25  # min(0.4, 0.3) s
    failed = [e for e in logs if e["event"] == "consumer.handler_failed"]
    assert [e["retry_in_s"] for e in failed] == [0.2, 0.3]
    assert failed[0]["receive_count"] == 1 and failed[0]["queue"] == "retry"


async def test_a_handler_s_own_cancelled_error_is_a_failure_not_a_stop(client):
    # A handler that awaits something cancelled gets CancelledError without the
    # consumer stopping: retried like any failure, and its worker goes on.
    queue = await client.create_queue("own-cancel", visibility_timeout=30)
    await queue.send_batch([b"first", b"second"])
    handled: list[tuple[bytes, int]] = []

    async def handler(message: Message) -> None:
        handled.append((message.body, message.receive_count))
        if message.receive_count == 1 and message.body == b"first":
            doomed = asyncio.ensure_future(asyncio.sleep(3600))
            doomed.cancel()
            await doomed

    with capture_client_logs() as logs:
        async with queue.consumer(handler, concurrency=1, wait=0.3, retry_delay=0.1):
            await _until(lambda: _settled(queue), 10, "both messages acked")
    assert sorted(handled) == [(b"first", 1), (b"first", 2), (b"second", 1)]
    [failed] = [e for e in logs if e["event"] == "consumer.handler_failed"]
    assert failed["receive_count"] == 1


async def test_the_consumer_rides_out_a_server_restart(server, client):
    queue = await client.create_queue("restart", visibility_timeout=30)
    handled: list[bytes] = []

    async def handler(message: Message) -> None:
        handled.append(message.body)

    async with queue.consumer(handler, concurrency=2, wait=0.3, reconnect_delay_max=0.3):
        await queue.send(b"before")
        await _until(lambda: _settled(queue), 10, "the first message")
        server.kill()
        await asyncio.sleep(0.5)  # the consumer meets the dead server and backs off
        server.restart()
        await _until(_sent_after_restart(queue), 10, "a send after the restart")
        await _until(lambda: _settled(queue), 20, "the second message")
    assert handled == [b"before", b"after"]


def _sent_after_restart(queue):
    async def send() -> bool:
        try:
            await queue.send(b"after", dedup_id="after")
        except mqd.errors.ConnectionClosed:
            return False
        return True

    return send


async def test_a_missing_queue_stops_the_consumer_with_the_error(client):
    consumer = Consumer(client.queue("missing"), _never, visibility_timeout=5, wait=0)
    await consumer.start()
    with pytest.raises(QueueNotFound):
        await asyncio.wait_for(consumer.wait(), 10)
    with pytest.raises(QueueNotFound):
        await client.queue("missing").run_consumer(_never)  # reading its visibility timeout


async def test_consumer_argument_checks(client):
    queue = client.queue("q")
    for kwargs in (
        {"concurrency": 0},
        {"prefetch": -1},
        {"retry_delay": -1},
        {"retry_delay_max": 50_000},
        {"visibility_timeout": 0},
        {"heartbeat_interval": 0},
    ):
        with pytest.raises(InvalidArgument):
            Consumer(queue, _never, **kwargs)
    with pytest.raises(InvalidArgument):
        Consumer(queue, "not callable")  # type: ignore[arg-type]


async def _never(message: Message) -> None:
    raise AssertionError("no message expected")


async def test_an_unknown_consumer_option_is_an_invalid_argument(client):
    queue = await client.create_queue("options")
    with pytest.raises(InvalidArgument, match=r"unknown consumer option.*concurrency"):
        await queue.run_consumer(_never, foo=1)
    with pytest.raises(InvalidArgument, match="prefetch"):
        queue.consumer(_never, prefetchh=2)


LOGGING_SCRIPT = """
import asyncio, sys
import mqd.client

async def main():
    async with await mqd.client.connect(sys.argv[1]) as client:
        queue = await client.create_queue("logged")
        await queue.send(b"x")

        async def handler(message):
            raise ValueError("handler says no")

        async with queue.consumer(handler, wait=0.2, retry_delay=0.05):
            for _ in range(100):
                if (await queue.stats())["received_total"] >= 2:
                    break
                await asyncio.sleep(0.05)
    print("done")

asyncio.run(main())
"""


def test_the_client_logs_through_logging_not_stdout(server):
    # The library printed every event, debug included, to stdout through structlog's
    # defaults, whatever the application had set up. Through `logging` with nothing
    # configured: warnings and errors on stderr, nothing below, stdout the app's own.
    result = subprocess.run(
        [sys.executable, "-c", LOGGING_SCRIPT, server.address],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout == "done\n"
    assert "consumer.handler_failed queue='logged'" in result.stderr
    assert "ValueError: handler says no" in result.stderr  # the traceback
    assert "consumer.started" not in result.stderr  # debug


async def test_a_fifo_group_is_handled_in_order_even_across_a_failure(client):
    # The consumer ran a group's messages side by side: with the head failing once,
    # the review saw them complete 4, 3, 2, 1, 0. Now a group's messages run one at
    # a time, and after a failure the rest wait for the failed one to come again.
    queue = await client.create_queue("ordered.fifo", visibility_timeout=30)
    for i in range(5):
        await queue.send(b"%d" % i, group_id="G")
    await queue.send_batch([{"body": b"h%d" % i, "group_id": "H"} for i in range(5)])
    completed: dict[str, list[bytes]] = {"G": [], "H": []}
    rng = random.Random(7)

    async def handler(message: Message) -> None:
        if message.body == b"0" and message.receive_count == 1:
            raise ValueError("the head fails once")
        await asyncio.sleep(rng.uniform(0, 0.05))
        completed[message.group_id].append(message.body)

    async with queue.consumer(handler, concurrency=8, wait=0.2, retry_delay=0.2):
        await _until(lambda: _settled(queue), 20, "both groups handled")
    assert completed["G"] == [b"%d" % i for i in range(5)]
    assert completed["H"] == [b"h%d" % i for i in range(5)]
