"""The server against raw frames: handshake, bad input and limits (protocol.md §1, §2, §5).

These tests speak the wire protocol directly over a socket to a real
`mqd serve`, so they read like transcripts of what a client in any language
would see.
"""

from __future__ import annotations

import asyncio
import socket
import struct

import pytest

import mqd.client
from mqd.errors import ErrorCode
from mqd.protocol import codec, messages
from mqd.protocol.frame import FrameDecoder, encode_frame
from mqd.protocol.messages import VISIBILITY_DEFAULT, ErrorBody


class RawConnection:
    def __init__(self, address: str) -> None:
        host, port = address.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=10)
        self.decoder = FrameDecoder(64 * 1024 * 1024)
        self.next_id = 1

    def send_bytes(self, data: bytes) -> None:
        self.sock.sendall(data)

    def request(self, msg) -> object:
        correlation_id = self.next_id
        self.next_id += 1
        self.send_bytes(codec.encode_request(correlation_id, msg))
        frame = self.read_frame()
        assert frame.correlation_id == correlation_id
        return codec.decode_response(frame)

    def read_frame(self):
        while True:
            frame = self.decoder.next_frame()
            if frame is not None:
                return frame
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("server closed the connection")
            self.decoder.feed(data)

    def read_response(self):
        return codec.decode_response(self.read_frame())

    def is_closed_by_server(self) -> bool:
        self.sock.settimeout(5)
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def hello(self) -> messages.HelloResponse:
        response = self.request(messages.HelloRequest(client_name="test"))
        assert isinstance(response, messages.HelloResponse)
        return response

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def raw(server):
    conn = RawConnection(server.address)
    yield conn
    conn.close()


def expect_error(response, code: ErrorCode) -> ErrorBody:
    assert isinstance(response, ErrorBody), response
    assert response.code == code, (ErrorCode(response.code).name, response.message)
    return response


def test_hello_advertises_limits(raw):
    hello = raw.hello()
    assert hello.version == 1
    assert set(hello.roles) == {"frontend", "metadata", "backend"}
    assert hello.limits["batch_messages_max"] == 1000
    assert hello.limits["message_bytes_max"] == 1024 * 1024
    assert hello.limits["frame_bytes_max"] >= 16 * 1024 * 1024
    assert hello.node_id


def test_request_before_hello_is_refused_and_connection_stays(raw):
    expect_error(raw.request(messages.ListQueuesRequest()), ErrorCode.HELLO_REQUIRED)
    raw.hello()
    assert raw.request(messages.ListQueuesRequest()).names == []


def test_unknown_opcode_gets_error_and_connection_stays(raw):
    raw.hello()
    raw.send_bytes(encode_frame(0x0999, 42, b"whatever"))
    frame = raw.read_frame()
    assert frame.correlation_id == 42
    expect_error(codec.decode_response(frame), ErrorCode.UNKNOWN_OPCODE)
    assert isinstance(raw.request(messages.PingRequest(b"x")), messages.PingResponse)


def test_unsupported_version_gets_error_and_connection_stays(raw):
    raw.hello()
    raw.send_bytes(encode_frame(messages.Opcode.PING, 5, b"", version=9))
    error = expect_error(raw.read_response(), ErrorCode.UNSUPPORTED_VERSION)
    assert error.details["version_max"] == 1
    assert isinstance(raw.request(messages.PingRequest(b"y")), messages.PingResponse)


def test_hello_with_no_common_version_is_refused(raw):
    expect_error(
        raw.request(messages.HelloRequest(version_min=2, version_max=3)),
        ErrorCode.UNSUPPORTED_VERSION,
    )


def test_malformed_body_gets_error_then_close(raw):
    raw.hello()
    # A SEND whose entry count promises more than the body holds.
    raw.send_bytes(encode_frame(messages.Opcode.SEND, 7, b"\x00\x01q\xff\xff\xff\xff"))
    expect_error(raw.read_response(), ErrorCode.MALFORMED_FRAME)
    assert raw.is_closed_by_server()


def test_oversize_frame_gets_error_then_close(raw, server):
    hello = raw.hello()
    too_big = hello.limits["frame_bytes_max"] + 1
    raw.send_bytes(struct.pack(">I", too_big) + b"\x01\x00\x00\x20\x00\x00\x00\x01")
    expect_error(raw.read_response(), ErrorCode.FRAME_TOO_LARGE)
    assert raw.is_closed_by_server()


def test_garbage_bytes_do_not_crash_the_server(server):
    for garbage in (b"\x00\x00\x00\x01\x00", b"GET / HTTP/1.1\r\n\r\n", bytes(range(256)) * 4):
        conn = RawConnection(server.address)
        conn.send_bytes(garbage)
        conn.sock.settimeout(5)
        try:
            conn.sock.recv(65536)
        except (TimeoutError, ConnectionResetError):
            pass
        conn.close()
    conn = RawConnection(server.address)
    assert conn.hello().version == 1
    conn.close()
    assert server.proc.poll() is None


def test_bad_queue_names_and_attributes(raw):
    raw.hello()
    for name in ("", "has space", "x" * 81, "semi;colon", ".fifo"):
        expect_error(
            raw.request(messages.CreateQueueRequest(name=name)), ErrorCode.INVALID_ARGUMENT
        )
    for attributes in (
        {"visibility_timeout": -1},
        {"visibility_timeout": 43201},
        {"retention": 10},
        {"delay": "soon"},
        {"max_message_bytes": 0},
        {"colour": "blue"},
        {"fifo": True},
    ):
        error = expect_error(
            raw.request(messages.CreateQueueRequest(name="ok", attributes=attributes)),
            ErrorCode.INVALID_ARGUMENT,
        )
        assert next(iter(attributes)) in error.message
    assert raw.request(messages.ListQueuesRequest()).names == []


def test_queue_lifecycle_errors(raw):
    raw.hello()
    created = raw.request(
        messages.CreateQueueRequest(name="jobs", attributes={"visibility_timeout": 5})
    )
    assert created.queue.attributes["visibility_timeout"] == 5
    expect_error(raw.request(messages.CreateQueueRequest(name="jobs")), ErrorCode.QUEUE_EXISTS)
    again = raw.request(messages.CreateQueueRequest(name="jobs", exist_ok=True))
    assert again.queue.name == "jobs"
    expect_error(
        raw.request(
            messages.CreateQueueRequest(
                name="jobs", attributes={"visibility_timeout": 6}, exist_ok=True
            )
        ),
        ErrorCode.QUEUE_EXISTS,
    )
    expect_error(raw.request(messages.GetQueueRequest(name="nope")), ErrorCode.QUEUE_NOT_FOUND)
    expect_error(
        raw.request(messages.SendRequest(queue="nope", entries=[messages.SendEntry(b"x")])),
        ErrorCode.QUEUE_NOT_FOUND,
    )
    raw.request(messages.DeleteQueueRequest(name="jobs"))
    expect_error(raw.request(messages.DeleteQueueRequest(name="jobs")), ErrorCode.QUEUE_NOT_FOUND)


def test_every_send_limit_has_its_error(raw):
    raw.hello()
    raw.request(messages.CreateQueueRequest(name="small", attributes={"max_message_bytes": 100}))

    def send(*entries):
        return raw.request(messages.SendRequest(queue="small", entries=list(entries)))

    expect_error(send(), ErrorCode.INVALID_ARGUMENT)
    expect_error(send(*[messages.SendEntry(b"x")] * 1001), ErrorCode.BATCH_TOO_LARGE)
    expect_error(send(messages.SendEntry(b"x" * 101)), ErrorCode.MESSAGE_TOO_LARGE)
    expect_error(
        send(messages.SendEntry(b"x" * 90, attributes={"k": "v" * 20})), ErrorCode.MESSAGE_TOO_LARGE
    )
    expect_error(
        send(messages.SendEntry(b"x", attributes={f"a{i}": "v" for i in range(17)})),
        ErrorCode.INVALID_ARGUMENT,
    )
    expect_error(
        send(messages.SendEntry(b"x", attributes={"bad name": "v"})), ErrorCode.INVALID_ARGUMENT
    )
    expect_error(send(messages.SendEntry(b"x", delay_ms=604_800_001)), ErrorCode.INVALID_ARGUMENT)
    expect_error(send(messages.SendEntry(b"x", priority=10)), ErrorCode.INVALID_ARGUMENT)
    # Nothing above was stored.
    info = raw.request(messages.GetQueueRequest(name="small")).queue
    assert info.stats["visible"] == 0
    assert send(messages.SendEntry(b"x" * 100)).message_ids


def test_receive_limits(raw):
    raw.hello()
    raw.request(messages.CreateQueueRequest(name="r"))

    def receive(**kwargs):
        return raw.request(messages.ReceiveRequest(queue="r", **kwargs))

    expect_error(receive(max_messages=0), ErrorCode.INVALID_ARGUMENT)
    expect_error(receive(max_messages=1001), ErrorCode.INVALID_ARGUMENT)
    expect_error(receive(wait_ms=20_001), ErrorCode.INVALID_ARGUMENT)
    expect_error(receive(visibility_timeout_ms=43_200_001), ErrorCode.INVALID_ARGUMENT)
    assert receive(max_messages=1000, wait_ms=0).messages == []
    expect_error(
        raw.request(messages.DeleteRequest(queue="r", receipts=["x"] * 1001)),
        ErrorCode.BATCH_TOO_LARGE,
    )


def test_pipelined_requests_answer_out_of_order(raw):
    """A long poll in flight does not hold back a later send on the same connection."""
    raw.hello()
    raw.request(messages.CreateQueueRequest(name="pipe"))
    raw.send_bytes(codec.encode_request(100, messages.ReceiveRequest(queue="pipe", wait_ms=5000)))
    raw.send_bytes(
        codec.encode_request(
            101, messages.SendRequest(queue="pipe", entries=[messages.SendEntry(b"hi")])
        )
    )
    first = raw.read_frame()
    assert first.correlation_id == 101
    second = raw.read_frame()
    assert second.correlation_id == 100
    received = codec.decode_response(second)
    assert [m.body for m in received.messages] == [b"hi"]


def test_forged_receipt_is_refused_valid_one_still_acks(raw):
    raw.hello()
    raw.request(messages.CreateQueueRequest(name="acks"))
    raw.request(messages.SendRequest(queue="acks", entries=[messages.SendEntry(b"a")]))
    (message,) = raw.request(messages.ReceiveRequest(queue="acks")).messages
    forged = message.receipt[:-4] + ("AAAA" if not message.receipt.endswith("AAAA") else "BBBB")
    response = raw.request(messages.DeleteRequest(queue="acks", receipts=[forged, message.receipt]))
    assert [(f.index, f.code) for f in response.failures] == [(0, ErrorCode.RECEIPT_INVALID)]
    stats = raw.request(messages.GetQueueRequest(name="acks")).queue.stats
    assert stats["visible"] == 0 and stats["in_flight"] == 0


def test_stats_op(raw):
    raw.hello()
    stats = raw.request(messages.StatsRequest()).stats
    assert stats["connections"] >= 1
    assert "storage" in stats


async def test_a_long_poll_whose_client_left_gives_back_what_it_took(server):
    # Its answer went nowhere, and the message it leased stayed in flight for the whole
    # visibility timeout (review: 25 of 50 stuck after close() with long polls waiting).
    async with await mqd.client.connect(server.address) as client:
        queue = await client.create_queue("left", visibility_timeout=60)
        raw = RawConnection(server.address)
        raw.request(messages.HelloRequest())
        raw.send_bytes(
            codec.encode_request(7, messages.ReceiveRequest("left", 1, 5000, VISIBILITY_DEFAULT))
        )
        await asyncio.sleep(0.3)
        raw.close()
        await asyncio.sleep(0.3)
        await queue.send(b"for nobody")
        for _ in range(50):
            stats = await queue.stats()
            if stats["received_total"]:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)
        stats = await queue.stats()
        assert (stats["received_total"], stats["in_flight"], stats["visible"]) == (1, 0, 1)
