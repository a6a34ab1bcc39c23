"""The blocking facade `mqd.client.sync` against the real server fixture."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from mqd.client import Message
from mqd.client.sync import SyncQueue, connect
from mqd.errors import ConnectionClosed, InvalidArgument, QueueNotFound

pytestmark = pytest.mark.timeout(60)


def test_sync_round_trip_from_several_threads(server):
    with connect(server.address) as client:
        assert client.server_limits["batch_messages_max"] >= 1
        queue = client.create_queue("sync", visibility_timeout=30)
        assert isinstance(queue, SyncQueue)
        ids: list[str] = []

        def produce(n: int) -> None:
            ids.extend(queue.send(b"%d" % i) for i in range(n))

        threads = [threading.Thread(target=produce, args=(20,)) for _ in range(5)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(set(ids)) == 100

        received = []
        while len(received) < 100:
            batch = queue.receive(max_messages=50, wait=1)
            assert batch
            received.extend(batch)
        assert all(isinstance(m, Message) for m in received)
        queue.ack(*received)
        assert queue.stats()["in_flight"] == 0
        assert "sync" in client.list_queues()
        with pytest.raises(QueueNotFound):
            client.queue("nope").send(b"x")


def test_the_sync_facade_is_there_after_import_mqd_client():
    # The README's `mqd.client.sync.connect(...)` raised AttributeError after a plain
    # `import mqd.client` (a fresh interpreter: this one may have imported it already).
    script = "import mqd.client\nprint(mqd.client.sync.connect.__name__)"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.stdout == "connect\n", result.stderr


def test_sync_connect_failure_raises(server):
    server.stop()
    with pytest.raises(ConnectionClosed):
        connect(server.address, connect_timeout=2)


def test_sync_facade_from_eight_threads_at_once(server):
    """8 threads share one SyncClient: each sends, receives and acks its share."""
    per_thread = 200
    with connect(server.address) as client:
        queue = client.create_queue("shared", visibility_timeout=30)
        sent: list[str] = []
        acked: list[str] = []
        errors: list[BaseException] = []
        lock = threading.Lock()
        barrier = threading.Barrier(8)

        def work(n: int) -> None:
            try:
                barrier.wait(10)
                ids = [queue.send(b"%d-%d" % (n, i)) for i in range(per_thread // 2)]
                ids += queue.send_batch([b"%d-b%d" % (n, i) for i in range(per_thread // 2)])
                with lock:
                    sent.extend(ids)
                mine = 0
                while mine < per_thread:
                    batch = queue.receive(max_messages=25, wait=0.5)
                    if not batch:
                        with lock:
                            if len(acked) == 8 * per_thread:
                                return
                        continue
                    queue.ack(*batch)
                    mine += len(batch)
                    with lock:
                        acked.extend(m.id for m in batch)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert not errors
        assert len(sent) == len(set(sent)) == 8 * per_thread
        assert sorted(acked) == sorted(sent)
        stats = queue.stats()
        assert stats["visible"] == 0 and stats["in_flight"] == 0
        loop_thread = client._loop_thread._thread
        assert loop_thread.is_alive()
    assert client.closed
    assert not loop_thread.is_alive()
    with pytest.raises(ConnectionClosed):
        queue.send(b"after close")
    client.close()  # idempotent


def test_sync_queue_methods_nack_redrive_peek_purge(server):
    with connect(server.address) as client:
        dlq = client.create_queue("s-dlq")
        queue = client.create_queue(
            "s-work",
            visibility_timeout=30,
            redrive_policy={"dead_letter_queue": "s-dlq", "max_receive_count": 1},
        )
        assert client.get_queue("s-work")["attributes"]["redrive_policy"]["max_receive_count"] == 1
        [message_id] = queue.send_batch([{"body": b"x", "priority": 5}])
        [message] = queue.receive(wait=1)
        queue.change_visibility(message, 30)
        queue.nack(message, delay=0)
        assert queue.receive(wait=0.5) == []  # the second pick dead-letters it
        assert dlq.peek(10)[0].original_id == message_id
        assert dlq.redrive() == 1
        [back] = queue.receive(wait=1)
        assert back.original_id == message_id and back.body == b"x"
        queue.ack(back)
        queue.send(b"y")
        assert queue.purge() == 1
        client.set_queue_attributes("s-work", redrive_policy={})
        client.delete_queue("s-dlq")
        assert client.list_queues() == ["s-work"]
        assert client.stats()["queues"] == 1
        assert SyncQueue.redrive.__doc__ and "REDRIVE" in SyncQueue.redrive.__doc__


def test_sync_consume_is_a_plain_iterator_that_releases_on_break(server):
    with connect(server.address) as client:
        queue = client.create_queue("s-stream", visibility_timeout=60)
        queue.send_batch([b"%d" % i for i in range(10)])
        bodies = []
        for message in queue.consume(prefetch=5, wait=1):
            bodies.append(message.body)
            queue.ack(message)
            if len(bodies) == 3:
                break
        assert bodies == [b"0", b"1", b"2"]
        # The two prefetched but unseen messages were released at the break.
        rest = queue.receive(max_messages=10, wait=0)
        assert sorted(m.body for m in rest) == [b"%d" % i for i in range(3, 10)]
        queue.ack(rest)


CTRL_C_SCRIPT = """
import sys
from mqd.client.sync import connect

with connect(sys.argv[1]) as client:
    queue = client.create_queue("interrupted", exist_ok=True)
    print("waiting", flush=True)
    try:
        for message in queue.consume(prefetch=5, wait=20):
            print("unexpected", message.body, flush=True)
    except KeyboardInterrupt:
        print("interrupted", client.stats()["subscriptions"], flush=True)
"""


def interrupt_script(script: str, address: str, ready: str, settle_s: float = 0.0):
    """Run `script` against `address`; once it prints `ready` (and `settle_s` later),
    SIGINT it as Ctrl-C would. Returns (exit status, stdout after `ready`, stderr)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", script, address],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == ready
        time.sleep(settle_s)
        os.kill(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, out, err


def test_ctrl_c_in_a_sync_consume_loop_is_a_keyboard_interrupt(server):
    # The interrupted wait for the next message unwinds the stream (its subscription
    # closed on the server) before the loop's cleanup closes it: the caller gets
    # KeyboardInterrupt, not "asynchronous generator is already running".
    status, out, err = interrupt_script(CTRL_C_SCRIPT, server.address, "waiting", settle_s=0.5)
    assert out.strip() == "interrupted 0", err
    assert status == 0, err


RUN_CONSUMER_CTRL_C_SCRIPT = """
import asyncio, sys
from mqd.client.sync import connect

with connect(sys.argv[1]) as client:
    queue = client.create_queue("graceful", visibility_timeout=60, exist_ok=True)
    queue.send_batch([b"%d" % i for i in range(20)])
    started = []
    finished = []

    async def handler(message):
        started.append(message.body)
        if len(started) == 2:
            print("running", flush=True)
        await asyncio.sleep(1.0)
        finished.append(message.body)

    try:
        queue.run_consumer(handler, concurrency=2, prefetch=2, wait=1)
    except KeyboardInterrupt:
        stats = queue.stats()
        print("stopped", len(started), len(finished), stats["in_flight"], stats["visible"],
              flush=True)
"""


def test_ctrl_c_stops_a_sync_run_consumer_gracefully(server):
    # Ctrl-C cancels run_consumer, whose stop lets the running handlers finish and their
    # messages be acked, and releases the prefetched ones; the caller gets
    # KeyboardInterrupt once that is done, so nothing is left in flight.
    status, out, err = interrupt_script(RUN_CONSUMER_CTRL_C_SCRIPT, server.address, "running")
    assert status == 0, err
    words = out.split()
    assert words[0] == "stopped", (out, err)
    started, finished, in_flight, visible = map(int, words[1:])
    assert started == finished == 2  # the two running handlers finished
    assert in_flight == 0 and visible == 18  # acked; the prefetched two released


def test_a_plain_function_handler_runs_in_a_thread_and_acks(server):
    # A plain function (the natural handler in synchronous code) was called, its None
    # awaited (TypeError), and every message retried for ever: 23 deliveries of 10 in
    # 3 s (review). Now the facade runs it in a thread, and the message is acked.
    handled: list[bytes] = []
    threads: set[str] = set()

    def handler(message) -> None:
        threads.add(threading.current_thread().name)
        handled.append(message.body)

    with connect(server.address) as client:
        queue = client.create_queue("plain-handler")
        queue.send_batch([b"%d" % i for i in range(10)])
        ended: list[BaseException | None] = []

        def consume() -> None:
            try:
                queue.run_consumer(handler, concurrency=2, wait=1)
                ended.append(None)
            except BaseException as exc:  # the client closing under it
                ended.append(exc)

        consumer = threading.Thread(target=consume)
        consumer.start()
        deadline = time.monotonic() + 20
        while queue.stats()["acked_total"] < 10 and time.monotonic() < deadline:
            time.sleep(0.1)
        stats = queue.stats()
    consumer.join(30)
    assert not consumer.is_alive() and ended
    assert sorted(handled) == sorted(b"%d" % i for i in range(10))
    assert stats["received_total"] == 10 and stats["acked_total"] == 10
    assert "mqd-client-sync" not in threads  # not on the client's loop


def test_closing_the_client_ends_blocked_calls_with_client_closed(server):
    # A run_consumer or consume blocked in another thread got a bare
    # concurrent.futures.CancelledError (not an MqdError) when the client closed.
    import concurrent.futures

    from mqd.errors import ClientClosed

    client = connect(server.address)
    queue = client.create_queue("close-under")

    async def handler(message) -> None:
        pass

    def consume() -> None:
        for _ in queue.consume(wait=1):
            pass

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        calls = [pool.submit(queue.run_consumer, handler), pool.submit(consume)]
        time.sleep(1)
        client.close()
        for call in calls:
            with pytest.raises(ClientClosed):
                call.result(15)


def test_async_only_objects_are_refused_not_handed_out(server):
    # subscribe() handed out an async Subscription nobody could await; its credits
    # then took messages that a later run_consumer never saw. consumer() gave an
    # async Consumer whose start() was "never awaited".
    with connect(server.address) as client:
        queue = client.create_queue("sync-async-only")
        with pytest.raises(InvalidArgument, match="consume"):
            queue.subscribe(2)
        with pytest.raises(InvalidArgument, match="run_consumer"):
            queue.consumer(lambda message: None)
        queue.send_batch([b"a", b"b"])
        assert sorted(m.body for m in queue.receive(max_messages=10, wait=1)) == [b"a", b"b"]


@pytest.mark.parametrize(
    ("options", "named"),
    [({"request_timeout": "x"}, "request_timeout"), ({"foo": 1}, "unknown options ['foo']")],
)
def test_a_bad_connect_option_is_an_invalid_argument_and_starts_no_thread(options, named):
    before = {t.name for t in threading.enumerate()}
    with pytest.raises(InvalidArgument, match=re.escape(named)):
        connect("127.0.0.1:1", **options)
    assert not [t for t in threading.enumerate() if t.name not in before and t.is_alive()]
