"""The blocking facade `mqd.client.sync` against the real server fixture."""

from __future__ import annotations

import threading

import pytest

from mqd.client import Message
from mqd.client.sync import SyncQueue, connect
from mqd.errors import ConnectionClosed, QueueNotFound

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


def test_sync_connect_failure_raises(server):
    server.stop()
    with pytest.raises(ConnectionClosed):
        connect(server.address, connect_timeout=2)
