"""Push consumption (protocol.md §4.18) against a real `mqd serve`: SUBSCRIBE, credits,
GRANT, UNSUBSCRIBE, the end of a subscription with its connection, `consume()` and the
Consumer on top of it, and the push vectors of protocol.md §6.19.

Run as a script to render a push vector block for protocol.md:

    .venv/bin/python tests/test_subscribe.py 'DeliverPush(messages=[])' 7
    .venv/bin/python tests/test_subscribe.py 'ErrorBody(code=4, message="x")' 7
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import statistics
import struct
import sys
import time
from pathlib import Path

import pytest

import mqd.client
from mqd.client.connection import Connection
from mqd.errors import InvalidArgument, QueueNotFound, TooManyRequests, UnknownOpcode
from mqd.protocol import (
    FLAG_ERROR,
    FLAG_PUSH,
    FrameDecoder,
    decode_push,
    encode_push,
    encode_push_end,
    messages,
)
from mqd.protocol.messages import (
    DeliverPush,
    ErrorBody,
    GrantRequest,
    Opcode,
    SubscribeRequest,
    UnsubscribeRequest,
)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
from tcp_proxy import TcpProxy

if __name__ != "__main__":
    from tests.test_protocol_vectors import (
        _protocol_text,
        _reference_lines,
        vector_bytes,
        vector_value,
    )

pytestmark = pytest.mark.timeout(90)


class Pushes:
    """A raw subscription on a `Connection`: what its listener was handed, in order."""

    def __init__(self, conn: Connection) -> None:
        self.bodies: list = []
        self.event = asyncio.Event()
        self.sid = conn.add_push_listener(self._on)

    def _on(self, body) -> None:
        self.bodies.append(body)
        self.event.set()

    @property
    def messages(self) -> list:
        return [m for b in self.bodies if isinstance(b, DeliverPush) for m in b.messages]

    async def until(self, count: int, timeout_s: float = 5.0) -> None:
        async with asyncio.timeout(timeout_s):
            while len(self.messages) < count:
                self.event.clear()
                await self.event.wait()


async def _raw(server) -> Connection:
    host, port = server.address.rsplit(":", 1)
    return await Connection.open(host, int(port))


async def _stats(client, name: str) -> dict:
    return (await client.get_queue(name))["stats"]


# --- the protocol, on a bare connection -----------------------------------------------------


async def test_pushes_arrive_without_polling_and_respect_credits(server, client):
    queue = await client.create_queue("credits", visibility_timeout=30)
    conn = await _raw(server)
    try:
        pushes = Pushes(conn)
        answer = await conn.request(SubscribeRequest(pushes.sid, "credits", 3))
        assert answer.visibility_timeout_ms == 30_000
        # Nothing there yet: sends after SUBSCRIBE are pushed, no RECEIVE involved.
        await queue.send_batch([b"%d" % i for i in range(10)])
        await pushes.until(3)
        await asyncio.sleep(0.3)
        assert len(pushes.messages) == 3, "at most 3 pushed on 3 credits"
        assert (await _stats(client, "credits"))["in_flight"] == 3
        # GRANT 4 more: exactly 4 more come.
        granted = await conn.request(GrantRequest(pushes.sid, 4))
        assert granted.credits <= 4
        await pushes.until(7)
        await asyncio.sleep(0.3)
        assert len(pushes.messages) == 7
        assert len({m.id for m in pushes.messages}) == 7
        assert all(m.receipt and m.receive_count == 1 for m in pushes.messages)
        # Pushed messages are acked like received ones.
        await queue.ack(*[m.receipt for m in pushes.messages])
        stats = await _stats(client, "credits")
        assert stats["in_flight"] == 0 and stats["visible"] == 3
        # GRANT 0 asks how many credits are left.
        assert (await conn.request(GrantRequest(pushes.sid, 0))).credits == 0
    finally:
        await conn.close()


async def test_unsubscribe_stops_pushes_and_pushed_messages_keep_their_lease(server, client):
    queue = await client.create_queue("unsub", visibility_timeout=30)
    conn = await _raw(server)
    try:
        pushes = Pushes(conn)
        await conn.request(SubscribeRequest(pushes.sid, "unsub", 100))
        await queue.send(b"one")
        await pushes.until(1)
        await conn.request(UnsubscribeRequest(pushes.sid))
        # After the answer nothing more is pushed for it; the id is free again.
        await queue.send_batch([b"two", b"three"])
        await asyncio.sleep(0.3)
        assert len(pushes.messages) == 1
        stats = await _stats(client, "unsub")
        assert stats["in_flight"] == 1 and stats["visible"] == 2
        # UNSUBSCRIBE is idempotent; GRANT on an ended subscription is refused.
        await conn.request(UnsubscribeRequest(pushes.sid))
        with pytest.raises(InvalidArgument):
            await conn.request(GrantRequest(pushes.sid, 1))
    finally:
        await conn.close()


async def test_connection_close_ends_the_subscription(server, client):
    queue = await client.create_queue("closing", visibility_timeout=1)
    conn = await _raw(server)
    pushes = Pushes(conn)
    await conn.request(SubscribeRequest(pushes.sid, "closing", 2))
    await queue.send_batch([b"a", b"b", b"c"])
    await pushes.until(2)
    await conn.close()
    assert isinstance(pushes.bodies[-1], mqd.errors.ConnectionClosed)
    # The pushed two wait out their lease (1 s), then anyone can receive them.
    stats = await _stats(client, "closing")
    assert stats["in_flight"] == 2 and stats["visible"] == 1
    got = await queue.receive(10, wait=5, visibility_timeout=30)
    got += await queue.receive(10, wait=3, visibility_timeout=30)
    assert sorted(m.body for m in got) == [b"a", b"b", b"c"]
    assert {m.receive_count for m in got if m.body in (b"a", b"b")} == {2}
    assert (await client.stats())["subscriptions"] == 0


async def test_subscribe_is_refused_for_bad_arguments(server, client):
    await client.create_queue("refused", visibility_timeout=0)
    await client.create_queue("fine", visibility_timeout=5)
    conn = await _raw(server)
    try:
        with pytest.raises(QueueNotFound):
            await conn.request(SubscribeRequest(7, "nope", 1))
        with pytest.raises(InvalidArgument, match="visibility"):
            await conn.request(SubscribeRequest(7, "refused", 1))
        with pytest.raises(InvalidArgument, match="subscription_id"):
            await conn.request(SubscribeRequest(0, "fine", 1))
        with pytest.raises(InvalidArgument, match="subscription_credits_max"):
            await conn.request(SubscribeRequest(7, "fine", 10_000_000))
        pushes = Pushes(conn)
        await conn.request(SubscribeRequest(pushes.sid, "fine", 0))
        with pytest.raises(InvalidArgument, match="already open"):
            await conn.request(SubscribeRequest(pushes.sid, "fine", 0))
        with pytest.raises(InvalidArgument, match="subscription_credits_max"):
            await conn.request(GrantRequest(pushes.sid, 10_000_000))
        limit = conn.limits["subscriptions_per_connection_max"]
        listeners = [Pushes(conn) for _ in range(limit)]
        for p in listeners[: limit - 1]:
            await conn.request(SubscribeRequest(p.sid, "fine", 0))
        with pytest.raises(TooManyRequests):
            await conn.request(SubscribeRequest(listeners[-1].sid, "fine", 0))
    finally:
        await conn.close()


async def test_deleting_the_queue_ends_the_subscription_with_an_end_frame(server, client):
    await client.create_queue("doomed", visibility_timeout=5)
    conn = await _raw(server)
    try:
        pushes = Pushes(conn)
        await conn.request(SubscribeRequest(pushes.sid, "doomed", 5))
        await client.delete_queue("doomed")
        # The long poll under way ends with the queue; the next lookup fails.
        async with asyncio.timeout(30):
            while not pushes.bodies:
                pushes.event.clear()
                await pushes.event.wait()
        end = pushes.bodies[-1]
        assert isinstance(end, ErrorBody) and end.code == QueueNotFound.code
        with pytest.raises(InvalidArgument):
            await conn.request(GrantRequest(pushes.sid, 1))
    finally:
        await conn.close()


# --- the client API ---------------------------------------------------------------------------


async def test_queue_subscribe_next_batch_grant_and_close(client):
    queue = await client.create_queue("api", visibility_timeout=30)
    subscription = await queue.subscribe(2)
    assert subscription.visibility_timeout == 30
    await queue.send_batch([b"1", b"2", b"3"])
    got = []
    async with asyncio.timeout(5):
        while len(got) < 2:
            got += await subscription.next_batch()
    assert subscription.outstanding == 0
    subscription.grant(5)
    async with asyncio.timeout(5):
        got += await subscription.next_batch()
    assert sorted(m.body for m in got) == [b"1", b"2", b"3"]
    await queue.ack(got)
    await queue.send(b"4")
    await asyncio.sleep(0.3)
    left = await subscription.close()  # pushed, not taken: the caller's to release
    assert [m.body for m in left] == [b"4"]
    assert subscription.ended


async def test_consume_uses_push_and_releases_what_it_did_not_yield(client):
    queue = await client.create_queue("stream", visibility_timeout=30)
    await queue.send_batch([b"%d" % i for i in range(20)])
    bodies = []
    async with queue.consume(prefetch=5) as stream:
        async for message in stream:
            bodies.append(message.body)
            await queue.ack(message)
            if len(bodies) == 12:
                break
        assert (await client.stats())["subscriptions"] == 1
    await asyncio.sleep(0.1)
    stats = await _stats(client, "stream")
    assert stats["in_flight"] == 0 and stats["visible"] == 8
    assert (await client.stats())["subscriptions"] == 0


async def test_consume_waits_for_new_messages_by_push(client):
    queue = await client.create_queue("later", visibility_timeout=30)
    stream = queue.consume(prefetch=1, wait=20)
    first = asyncio.create_task(stream.__anext__())
    await asyncio.sleep(0.3)
    sent_at = time.perf_counter()
    await queue.send(b"late")
    message = await asyncio.wait_for(first, 5)
    assert message.body == b"late"
    assert time.perf_counter() - sent_at < 1.0
    await queue.ack(message)
    await stream.aclose()


def server_with_limits(server_factory, tmp_path, **limits: int):
    """A server of its own with some [limits] changed."""
    config = tmp_path / "limits.toml"
    config.write_text("[limits]\n" + "".join(f"{k} = {v}\n" for k, v in limits.items()))
    return server_factory("limited", config=config)


async def test_a_stream_holds_its_request_slot_so_a_full_connection_still_grants(
    server_factory, tmp_path
):
    # The server counts an open subscription as an outstanding request; a client that
    # did not would send one request too many at a full connection, and a GRANT refused
    # that way left the stream waiting for ever for messages that were there.
    server = server_with_limits(server_factory, tmp_path, requests_in_flight_max=8)
    async with await mqd.client.connect(server.address) as client:
        queue = await client.create_queue("full", visibility_timeout=30)
        idle = await client.create_queue("idle")
        await queue.send_batch([b"%d" % i for i in range(10)])
        stream = queue.consume(prefetch=1, wait=20)
        first = await asyncio.wait_for(stream.__anext__(), 5)
        await queue.ack(first)
        # Every slot the client thinks free, taken by a long poll; then the next message.
        polls = [asyncio.create_task(idle.receive(wait=1)) for _ in range(8)]
        second = await asyncio.wait_for(stream.__anext__(), 10)
        assert second.body == b"1"
        assert [await poll for poll in polls] == [[]] * 8  # none refused
        await queue.ack(second)
        await stream.aclose()
        # Closed, the subscription gives its slot back: 8 at once go through again.
        assert await asyncio.gather(*(idle.receive(wait=0) for _ in range(8))) == [[]] * 8


async def test_streams_past_the_connection_s_subscription_limit_poll_instead(
    server_factory, tmp_path
):
    server = server_with_limits(server_factory, tmp_path, subscriptions_per_connection_max=1)
    async with await mqd.client.connect(server.address) as client:
        queues = [await client.create_queue(f"q{i}", visibility_timeout=30) for i in range(2)]
        for queue in queues:
            await queue.send(queue.name.encode())
        streams = [queue.consume(prefetch=1, wait=1) for queue in queues]
        got = [await asyncio.wait_for(stream.__anext__(), 10) for stream in streams]
        assert [m.body for m in got] == [b"q0", b"q1"]
        assert (await client.stats())["subscriptions"] == 1  # the second one polled
        for stream in streams:
            await stream.aclose()

        handled: list[bytes] = []
        both = asyncio.Event()

        async def handler(message) -> None:
            handled.append(message.body)
            if len(handled) == 2:
                both.set()

        for queue in queues:
            await queue.send(b"again " + queue.name.encode())
        consumers = [await queue.consumer(handler, wait=0.5).start() for queue in queues]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(both.wait(), 10)
        for consumer in consumers:
            await consumer.stop()
        assert sorted(handled) == [b"again q0", b"again q1"]


async def test_a_stream_whose_link_goes_silent_gives_it_up_and_subscribes_again(server):
    # A link that dies with no FIN or reset (the proxy's blackhole: connections stay
    # open, nothing passes) raises nothing; without the keepalive PING the stream
    # would wait on it for ever.
    proxy = TcpProxy("127.0.0.1", int(server.address.rsplit(":", 1)[1]), name="client")
    proxy_port = await proxy.start()
    try:
        async with await mqd.client.connect(
            f"127.0.0.1:{proxy_port}", keepalive=0.5, connect_timeout=1
        ) as client:
            queue = await client.create_queue("silent", visibility_timeout=2)
            stream = queue.consume(prefetch=1, wait=1)
            waiting = asyncio.create_task(stream.__anext__())
            await asyncio.sleep(0.3)  # subscribed, waiting for a push
            assert client.connected
            proxy.set_mode("blackhole")
            for _ in range(100):  # 0.5 s quiet, then 0.5 s for the PING's answer
                if not client.connected:
                    break
                await asyncio.sleep(0.05)
            assert not client.connected
            proxy.set_mode("pass")
            async with await mqd.client.connect(server.address) as direct:
                await direct.queue("silent").send(b"after")
            message = await asyncio.wait_for(waiting, 20)
            assert message.body == b"after"
            await queue.ack(message)
            await stream.aclose()
    finally:
        await proxy.close()


async def test_a_push_after_an_unanswered_unsubscribe_leaves_the_connection_up(server):
    # UNSUBSCRIBE that times out: the server may still push to the subscription until
    # it sees the request. Such a push is dropped (its lease runs out), not taken for a
    # broken server, which would end every other request on the shared connection.
    proxy = TcpProxy("127.0.0.1", int(server.address.rsplit(":", 1)[1]), name="client")
    proxy_port = await proxy.start()
    try:
        async with await mqd.client.connect(
            f"127.0.0.1:{proxy_port}", request_timeout=0.5
        ) as client:
            queue = await client.create_queue("late", visibility_timeout=2)
            subscription = await queue.subscribe(5)
            proxy.set_mode("delay", delay_s=1.0)
            async with await mqd.client.connect(server.address) as direct:
                await direct.queue("late").send(b"late push")
            assert await subscription.close() == []  # UNSUBSCRIBE unanswered in 0.5 s
            proxy.set_mode("pass")
            await asyncio.sleep(2.5)  # the push (1 s late), then the answer, come in
            assert client.connected
            await client.ping()
            [again] = await queue.receive(wait=5)  # its lease ran out
            assert again.body == b"late push" and again.receive_count == 2
            await queue.ack(again)
    finally:
        await proxy.close()


async def test_unsubscribe_racing_a_message_coming_due_is_answered_and_pushes_nothing(server):
    # A message falls due in the turn the server cancels the subscription's receive for
    # UNSUBSCRIBE: the cancel must land (on Python 3.11 asyncio.wait_for dropped it), or
    # the message was pushed after UNSUBSCRIBE, leased to nobody, and UNSUBSCRIBE never
    # answered (22 of 200 closes, found by a stress run).
    rng = random.Random(7)
    async with await mqd.client.connect(server.address, request_timeout=3) as client:
        queue = await client.create_queue("race-unsub", visibility_timeout=60)

        async def trial(i: int) -> float:
            subscription = await queue.subscribe(1)
            await queue.send(b"%d" % i, delay=0.05)
            await asyncio.sleep(0.05 + rng.uniform(-0.004, 0.004))
            started = time.monotonic()
            left = await subscription.close()
            took = time.monotonic() - started
            for message in left:  # pushed before the answer: ours to give back
                await queue.change_visibility(message, 0)
            return took

        for round_number in range(15):
            took = await asyncio.gather(*(trial(round_number * 20 + i) for i in range(20)))
            assert max(took) < 2.0, f"an UNSUBSCRIBE took {max(took):.2f} s"
        stats = await queue.stats()
        assert stats["in_flight"] == 0 and stats["visible"] + stats["delayed"] == 300


async def test_run_consumer_on_push_handles_everything(client):
    queue = await client.create_queue("handled", visibility_timeout=30)
    await queue.send_batch([b"%d" % i for i in range(100)])
    seen = []

    async def handler(message) -> None:
        await asyncio.sleep(0.001)
        seen.append(message.body)

    consumer = await queue.consumer(handler, concurrency=4, prefetch=4).start()
    try:
        async with asyncio.timeout(20):
            while len(seen) < 100 or consumer.stats.acked < 100:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        assert consumer._subscribed
        assert (await client.stats())["subscriptions"] == 1
    finally:
        await consumer.stop()
    assert sorted(seen) == sorted(b"%d" % i for i in range(100))
    stats = await _stats(client, "handled")
    assert stats["in_flight"] == 0 and stats["visible"] == 0
    assert (await client.stats())["subscriptions"] == 0


async def test_consumer_stop_releases_pushed_messages_it_did_not_start(client):
    queue = await client.create_queue("stopping", visibility_timeout=30)
    await queue.send_batch([b"%d" % i for i in range(50)])
    gate = asyncio.Event()

    async def handler(message) -> None:
        await gate.wait()

    consumer = await queue.consumer(handler, concurrency=2, prefetch=3).start()
    await asyncio.sleep(0.5)
    # Credits bound what it holds: 2 running + 3 prefetched.
    assert consumer.in_flight <= 5
    stop = asyncio.create_task(consumer.stop(drain_timeout=5))
    await asyncio.sleep(0.1)
    gate.set()
    await stop
    stats = await _stats(client, "stopping")
    assert stats["in_flight"] == 0
    assert stats["visible"] == 50 - consumer.stats.acked


async def test_fallback_to_long_polling_when_subscribe_is_unknown(client, monkeypatch):
    queue = await client.create_queue("old", visibility_timeout=30)
    real = mqd.client.subscription.Subscription.open

    async def refuse(*args, **kwargs):
        raise UnknownOpcode("unknown opcode 0x0026")

    monkeypatch.setattr(mqd.client.subscription.Subscription, "open", refuse)
    await queue.send_batch([b"a", b"b"])
    got = []
    async with queue.consume(prefetch=2, wait=1) as stream:
        async for message in stream:
            got.append(message.body)
            await queue.ack(message)
            if len(got) == 2:
                break
    assert sorted(got) == [b"a", b"b"] and client._push_unsupported
    monkeypatch.setattr(mqd.client.subscription.Subscription, "open", real)


# --- the shell ---------------------------------------------------------------------------------


def test_shell_subscribe_prints_pushes_and_they_can_be_acked(server):
    from tests.test_shell import json_lines, run_shell

    script = [
        "create sq visibility_timeout=30",
        "send sq one",
        "send sq two",
        "send sq three",
        "subscribe sq 2 max=3",
        "ack sq $1 $2 $3",
        "info sq",
    ]
    result = run_shell(server.address, "--json", "-c", "; ".join(script))
    assert result.returncode == 0, result.stdout + result.stderr
    answers = json_lines(result.stdout)
    pushed = [a for a in answers if "queue" in a and a.get("queue") == "sq"]
    assert sorted(a["body"] for a in pushed) == ["one", "three", "two"]
    assert {"subscribed": "sq", "pushed": 3} in answers
    assert {"acked": 3, "failures": []} in answers
    stats = answers[-1]["queue"]["stats"]
    assert stats["visible"] == 0 and stats["in_flight"] == 0


# --- latency (measured, not asserted) -------------------------------------------------------


async def _latency(client, name: str, consume, count: int, rate_per_s: float) -> list[float]:
    queue = await client.create_queue(name, visibility_timeout=30)
    sent: dict[bytes, float] = {}
    latencies: list[float] = []
    done = asyncio.Event()

    acks: list[asyncio.Task] = []

    async def consumer() -> None:
        # Acks go in the background: this measures delivery, not the DELETE round trip.
        async with consume(queue) as stream:
            async for message in stream:
                latencies.append(time.perf_counter() - sent[message.body])
                acks.append(asyncio.create_task(queue.ack(message)))
                if len(latencies) == count:
                    done.set()
                    return

    task = asyncio.create_task(consumer())
    await asyncio.sleep(0.2)
    interval = 1 / rate_per_s
    start = time.perf_counter()
    for i in range(count):
        delay = start + i * interval - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        body = b"%d" % i
        sent[body] = time.perf_counter()
        await queue.send(body)
    await asyncio.wait_for(done.wait(), 30)
    await task
    await asyncio.gather(*acks)
    return latencies


def _describe(latencies: list[float]) -> str:
    ordered = sorted(latencies)
    p50 = statistics.median(ordered) * 1000
    p99 = ordered[int(len(ordered) * 0.99) - 1] * 1000
    return f"p50 {p50:.2f} ms, p99 {p99:.2f} ms, max {ordered[-1] * 1000:.2f} ms"


async def test_send_to_push_latency_is_measured(server, capsys):
    """1,000 messages at ~500/s: send → consume() latency, push vs long polling."""
    push_client = await mqd.client.connect(server.address)
    poll_client = await mqd.client.connect(server.address)
    poll_client._push_unsupported = True  # the long-poll path of consume()
    try:
        push = await _latency(push_client, "lat-push", lambda q: q.consume(prefetch=10), 1000, 500)
        poll = await _latency(
            poll_client, "lat-poll", lambda q: q.consume(prefetch=10, wait=20), 1000, 500
        )
    finally:
        await push_client.close()
        await poll_client.close()
    with capsys.disabled():
        print(f"\nsend→consume latency, 1000 msgs @500/s, push:         {_describe(push)}")
        print(f"send→consume latency, 1000 msgs @500/s, long polling: {_describe(poll)}")


# --- push vectors (protocol.md §6.19) -------------------------------------------------------


def _push_vectors() -> list[dict[str, str]]:
    from tests.test_protocol_vectors import parse_vectors

    blocks = re.findall(r"^```push-vector\n(.*?)^```", _protocol_text(), re.S | re.M)
    return parse_vectors("".join(f"```vector\n{block}```\n" for block in blocks))


def _encode_push_vector(value, subscription_id: int) -> bytes:
    if isinstance(value, ErrorBody):
        return encode_push_end(subscription_id, value.code, value.message, value.details)
    return encode_push(subscription_id, value)


def test_protocol_md_has_push_vectors() -> None:
    classes = {type(vector_value(v["value"])) for v in _push_vectors()}
    assert classes >= {DeliverPush, ErrorBody}


@pytest.mark.parametrize("vector", _push_vectors() if __name__ != "__main__" else [])
def test_push_vector_both_ways(vector: dict[str, str]) -> None:
    value = vector_value(vector["value"])
    sid = int(vector["subscription_id"])
    wire = vector_bytes(vector["hex"])
    assert _encode_push_vector(value, sid) == wire
    decoder = FrameDecoder(1 << 24)
    decoder.feed(wire)
    frame = decoder.next_frame()
    assert frame is not None and decoder.buffered_bytes == 0
    assert frame.correlation_id == sid and frame.opcode == Opcode.DELIVER
    assert frame.flags == (FLAG_PUSH | FLAG_ERROR if isinstance(value, ErrorBody) else FLAG_PUSH)
    assert decode_push(frame) == value
    # The annotated lines agree with the second, naive encoder of test_protocol_vectors.
    body = b"".join(b"".join(chunks) for chunks, _ in _reference_lines(type(value), value))
    assert wire[12:] == body


def render_push_vector(expression: str, subscription_id: int) -> str:
    from tests.test_protocol_vectors import _reference_lines as lines_of
    from tests.test_protocol_vectors import vector_value as value_of

    value = value_of(expression)
    body_lines = lines_of(type(value), value)
    length = 8 + sum(len(c) for chunks, _ in body_lines for c in chunks)
    error = isinstance(value, ErrorBody)
    flags = FLAG_PUSH | FLAG_ERROR if error else FLAG_PUSH
    kind = "PUSH|ERROR" if error else "PUSH"
    head = struct.pack(">IBBHI", length, 1, flags, Opcode.DELIVER, subscription_id)
    wire = _encode_push_vector(value, subscription_id)
    assert head + b"".join(b"".join(c) for c, _ in body_lines) == wire
    out = ["```push-vector", "name: NAME", f"subscription_id: {subscription_id}"]
    out += [f"value: {expression}", "hex:"]
    width = 60
    header_hex = f"{length:08x} 01 {flags:02x} {int(Opcode.DELIVER):04x} {subscription_id:08x}"
    out.append(
        f"  {header_hex:<{width}}  # length {length}, version 1, flags {flags:#04x} {kind}, "
        f"opcode {int(Opcode.DELIVER):#06x} DELIVER, subscription id {subscription_id}"
    )
    from tests.test_protocol_vectors import hex_rows

    out += hex_rows(body_lines, width)
    out.append("```")
    return "\n".join(out)


assert messages.PUSHES[Opcode.DELIVER] is DeliverPush

if __name__ == "__main__":
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent.parent))
    args = sys.argv[1:]
    print(render_push_vector(args[0], int(args[1]) if len(args) > 1 else 1))


@pytest.mark.parametrize("push", [True, False])
async def test_a_slow_stream_keeps_the_leases_of_what_it_has_not_yielded(client, push):
    # Messages waiting in a stream's buffer (and, pushed, in its subscription) ran out
    # their leases while the caller worked on earlier ones: yielded late, their acks
    # failed RECEIPT_INVALID, and they came round again (review: 3 of 8 acked in 14 s,
    # 28 deliveries). Now the stream extends what it holds and has not yielded.
    if not push:
        client._push_unsupported = True  # the polling path
    queue = await client.create_queue(f"slow-stream-{push}", visibility_timeout=1.5)
    await queue.send_batch([b"s%d" % i for i in range(6)])
    done: list[bytes] = []
    async with queue.consume(prefetch=4, wait=1) as stream:
        async for message in stream:
            await asyncio.sleep(0.8)  # slower than the lease, given what waits behind it
            await queue.ack(message)  # raises if its lease ran out meanwhile
            assert message.receive_count == 1
            done.append(message.body)
            if len(done) == 6:
                break
    assert sorted(done) == [b"s%d" % i for i in range(6)]
    stats = await queue.stats()
    assert stats["received_total"] == 6 and stats["acked_total"] == 6
