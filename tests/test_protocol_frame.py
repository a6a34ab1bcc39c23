"""FrameDecoder (protocol.md §1.2, §1.6) and garbage in, protocol errors out.

The decoder must hand out the same frames however the bytes are split, refuse
an oversize frame from its length prefix alone, and turn any garbage into
ProtocolError / FrameTooLarge / UnknownOpcode / UnsupportedVersion or "need
more data", never another exception.
"""

from __future__ import annotations

import struct
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mqd.errors import (
    ErrorCode,
    FrameTooLarge,
    InvalidArgument,
    ProtocolError,
    UnknownOpcode,
    UnsupportedVersion,
)
from mqd.protocol import (
    FLAG_RESPONSE,
    HEADER_BYTES,
    OPS,
    PROTOCOL_VERSION,
    DeliveredMessage,
    ErrorBody,
    Frame,
    FrameDecoder,
    PingRequest,
    ReceiveResponse,
    SendEntry,
    SendRequest,
    decode_body,
    decode_request,
    decode_response,
    encode_body,
    encode_error,
    encode_frame,
    encode_request,
    encode_response,
)
from mqd.protocol.frame import _COMPACT_BYTES

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

SAMPLE_FRAMES = [
    encode_request(1, PingRequest(payload=b"hello")),
    encode_request(2, SendRequest(queue="q", entries=[SendEntry(body=b"x" * 300)])),
    encode_response(
        3,
        ReceiveResponse(
            messages=[DeliveredMessage(id="m", receipt="r", body=b"b", attributes={"k": "v"})]
        ),
    ),
    encode_error(4, 0x0020, ErrorCode.THROTTLED, "slow", {"retry_after_ms": 10}),
    encode_frame(0x0999, 5, b""),  # an unknown opcode still frames fine
    encode_frame(0x0002, 6, b"\x00\x00\x00\x00", version=7),  # and an unknown version
]


def drain(decoder: FrameDecoder) -> list[Frame]:
    return decoder.frames()


def expected_frames(data: bytes) -> list[Frame]:
    decoder = FrameDecoder(1 << 24)
    decoder.feed(data)
    return drain(decoder)


# --- unit -------------------------------------------------------------------------------------


def test_need_more_data_until_the_frame_is_whole() -> None:
    data = SAMPLE_FRAMES[0]
    decoder = FrameDecoder(1024)
    assert decoder.next_frame() is None
    for i, byte in enumerate(data[:-1]):
        decoder.feed(bytes([byte]))
        assert decoder.next_frame() is None
        assert decoder.buffered_bytes == i + 1
    decoder.feed(data[-1:])
    frame = decoder.next_frame()
    assert frame == Frame(PROTOCOL_VERSION, 0, 0x0002, 1, data[12:])
    assert decoder.buffered_bytes == 0 and decoder.next_frame() is None


def test_frame_too_large_is_raised_from_the_length_prefix_alone() -> None:
    decoder = FrameDecoder(100)
    decoder.feed(struct.pack(">I", 101))
    with pytest.raises(FrameTooLarge) as info:
        decoder.next_frame()
    assert info.value.code == ErrorCode.FRAME_TOO_LARGE and info.value.code.fatal
    assert info.value.details == {"frame_bytes": 101, "frame_bytes_max": 100}
    # The decoder stays broken: the connection is to be closed.
    with pytest.raises(FrameTooLarge):
        decoder.next_frame()


def test_frame_of_exactly_the_limit_is_accepted() -> None:
    body = b"z" * (100 - HEADER_BYTES)
    decoder = FrameDecoder(100)
    decoder.feed(encode_frame(1, 1, body))
    frame = decoder.next_frame()
    assert frame is not None and frame.body == body


@pytest.mark.parametrize("length", range(HEADER_BYTES))
def test_length_shorter_than_the_header_is_malformed(length: int) -> None:
    decoder = FrameDecoder(1024)
    decoder.feed(struct.pack(">I", length) + b"\x00" * 16)
    with pytest.raises(ProtocolError) as info:
        decoder.next_frame()
    assert info.value.code == ErrorCode.MALFORMED_FRAME


def test_decoder_does_not_judge_versions_flags_or_opcodes() -> None:
    data = encode_frame(0xFFFF, 0xFFFFFFFF, b"?", flags=0xFF, version=0xFF)
    [frame] = expected_frames(data)
    assert frame == Frame(0xFF, 0xFF, 0xFFFF, 0xFFFFFFFF, b"?")


def test_frame_bytes_max_must_be_sane() -> None:
    with pytest.raises(InvalidArgument):
        FrameDecoder(HEADER_BYTES - 1)
    with pytest.raises(InvalidArgument):
        FrameDecoder(1 << 32)


def test_many_small_frames_in_one_feed() -> None:
    frames = [encode_request(i, PingRequest(payload=bytes([i % 256]))) for i in range(20_000)]
    decoder = FrameDecoder(1024)
    decoder.feed(b"".join(frames))
    got = drain(decoder)
    assert [f.correlation_id for f in got] == list(range(20_000))
    assert decoder.buffered_bytes == 0


def test_compaction_keeps_a_partial_frame_intact() -> None:
    # Enough whole frames to pass the compaction threshold, then half a frame.
    small = encode_request(1, PingRequest(payload=b"p" * 100))
    count = _COMPACT_BYTES // len(small) + 10
    tail = encode_request(2, PingRequest(payload=b"t" * 5000))
    decoder = FrameDecoder(1 << 20)
    decoder.feed(small * count + tail[:2500])
    assert len(drain(decoder)) == count
    assert decoder.buffered_bytes == 2500
    decoder.feed(tail[2500:])
    [frame] = drain(decoder)
    assert decode_request(frame) == PingRequest(payload=b"t" * 5000)


def test_frames_do_not_alias_the_buffer() -> None:
    decoder = FrameDecoder(1024)
    decoder.feed(SAMPLE_FRAMES[0])
    frame = decoder.next_frame()
    assert frame is not None
    body = frame.body
    decoder.feed(b"\xff" * 100)  # reuse or growth of the buffer must not change the frame
    assert frame.body == body and type(body) is bytes


# --- property: splitting the stream does not matter --------------------------------------------


@FUZZ
@given(
    st.lists(st.sampled_from(SAMPLE_FRAMES), min_size=1, max_size=8),
    st.lists(st.integers(1, 64), min_size=1, max_size=40),
)
def test_any_chunking_yields_the_same_frames(picked: list[bytes], sizes: list[int]) -> None:
    data = b"".join(picked)
    want = expected_frames(data)
    decoder = FrameDecoder(1 << 24)
    got: list[Frame] = []
    pos = 0
    i = 0
    while pos < len(data):
        size = sizes[i % len(sizes)]
        decoder.feed(data[pos : pos + size])
        pos += size
        i += 1
        got += drain(decoder)
    assert got == want
    assert decoder.buffered_bytes == 0


def test_byte_at_a_time_yields_the_same_frames() -> None:
    data = b"".join(SAMPLE_FRAMES) * 3
    want = expected_frames(data)
    decoder = FrameDecoder(1 << 24)
    got: list[Frame] = []
    for i in range(len(data)):
        decoder.feed(data[i : i + 1])
        got += drain(decoder)
    assert got == want


# --- property: garbage in, protocol errors out -------------------------------------------------

EXPECTED_ERRORS = (
    ProtocolError,
    UnknownOpcode,
    UnsupportedVersion,
)  # FrameTooLarge is a ProtocolError


def serve_like(data: bytes, chunk: int, frame_bytes_max: int = 4096) -> list[Any]:
    """Feed `data` as a server would and decode every request; return what came out."""
    decoder = FrameDecoder(frame_bytes_max)
    out: list[Any] = []
    for pos in range(0, len(data), chunk):
        decoder.feed(data[pos : pos + chunk])
        while True:
            try:
                frame = decoder.next_frame()
            except ProtocolError as exc:  # fatal: the connection would close here
                out.append(exc)
                return out
            if frame is None:
                break
            try:
                out.append(decode_request(frame))
            except ProtocolError as exc:
                out.append(exc)
                return out
            except (UnknownOpcode, UnsupportedVersion) as exc:  # answered, carry on
                out.append(exc)
    return out


@FUZZ
@given(st.binary(max_size=300), st.integers(1, 50))
def test_random_bytes_never_raise_anything_else(data: bytes, chunk: int) -> None:
    serve_like(data, chunk)


def plausible_frames() -> st.SearchStrategy[bytes]:
    """Frames with a sane header around a random body: reaches the body decoders."""
    return st.builds(
        lambda op, cid, body: encode_frame(op, cid, body),
        st.sampled_from([int(op) for op in OPS] + [0, 0x0999]),
        st.integers(0, 0xFFFFFFFF),
        st.binary(max_size=200),
    )


@FUZZ
@given(st.lists(plausible_frames(), min_size=1, max_size=4), st.integers(1, 64))
def test_random_bodies_never_raise_anything_else(frames: list[bytes], chunk: int) -> None:
    serve_like(b"".join(frames), chunk)


def valid_bodies() -> st.SearchStrategy[tuple[type, bytes]]:
    samples = [
        (
            SendRequest,
            encode_body(
                SendRequest(
                    queue="orders",
                    entries=[SendEntry(body=b"hi", attributes={"a": "b"}, group_id="g")],
                )
            ),
        ),
        (
            ReceiveResponse,
            encode_body(
                ReceiveResponse(messages=[DeliveredMessage(id="1", receipt="r", body=b"x")])
            ),
        ),
        (
            ErrorBody,
            encode_body(
                ErrorBody(6, "m", {"a": [1, {"b": None}], "c": b"\x00", "d": 1.5, "e": True})
            ),
        ),
    ]
    return st.sampled_from(samples)


@FUZZ
@given(valid_bodies(), st.data())
def test_mutated_bodies_decode_or_are_malformed(
    sample: tuple[type, bytes], data: st.DataObject
) -> None:
    cls, body = sample
    mutated = bytearray(body)
    for _ in range(data.draw(st.integers(1, 4))):
        action = data.draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        pos = data.draw(st.integers(0, max(0, len(mutated) - 1)))
        if action == "flip" and mutated:
            mutated[pos] ^= data.draw(st.integers(1, 255))
        elif action == "insert":
            mutated[pos:pos] = data.draw(st.binary(min_size=1, max_size=4))
        elif action == "delete" and mutated:
            del mutated[pos]
        elif action == "truncate":
            del mutated[pos:]
    try:
        decoded = decode_body(cls, bytes(mutated))
    except ProtocolError:
        return
    # Whatever decodes re-encodes to the same bytes: the encoding is canonical.
    assert encode_body(decoded) == bytes(mutated)


@FUZZ
@given(st.binary(max_size=200))
def test_random_response_frames_never_raise_anything_else(body: bytes) -> None:
    for flags in (FLAG_RESPONSE, FLAG_RESPONSE | 0x02, 0):
        for op in (0x0001, 0x0021, 0x0999):
            frame = Frame(PROTOCOL_VERSION, flags, op, 1, body)
            try:
                decode_response(frame)
            except EXPECTED_ERRORS:
                pass
