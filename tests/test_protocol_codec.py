"""The body codec and the frame helpers (protocol.md §1.3-§1.6, §2.1, §3).

Unit tests of each rule, then hypothesis round trips of every message type.
"""

from __future__ import annotations

import ast
import dataclasses
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mqd.protocol
from mqd.errors import (
    ErrorCode,
    InvalidArgument,
    ProtocolError,
    Throttled,
    UnknownOpcode,
    UnsupportedVersion,
)
from mqd.protocol import (
    FLAG_ERROR,
    FLAG_RESPONSE,
    HEADER_BYTES,
    OPS,
    PROTOCOL_VERSION,
    VISIBILITY_DEFAULT,
    ChangeVisibilityRequest,
    CreateQueueRequest,
    DeleteRequest,
    DeliveredMessage,
    ErrorBody,
    Frame,
    FrameDecoder,
    HelloResponse,
    Opcode,
    PingRequest,
    PingResponse,
    QueueInfo,
    ReceiveResponse,
    SendEntry,
    SendRequest,
    StatsResponse,
    VisibilityChange,
    decode_body,
    decode_request,
    decode_response,
    encode_body,
    encode_error,
    encode_exception,
    encode_frame,
    encode_request,
    encode_response,
    error_from_body,
    messages,
)
from mqd.protocol.codec import VALUE_DEPTH_MAX, generated_source

PROTOCOL_DIR = Path(mqd.protocol.__file__).parent
MESSAGE_CLASSES = sorted(
    (
        value
        for value in vars(messages).values()
        if isinstance(value, type) and hasattr(value, "FIELDS") and dataclasses.is_dataclass(value)
    ),
    key=lambda cls: cls.__name__,
)
I64_MIN, I64_MAX = -(1 << 63), (1 << 63) - 1


def one_frame(data: bytes) -> Frame:
    decoder = FrameDecoder(1 << 24)
    decoder.feed(data)
    frame = decoder.next_frame()
    assert frame is not None and decoder.buffered_bytes == 0
    return frame


def value_map_body(pairs: bytes, count: int) -> bytes:
    """An ErrorBody (code 1, message "") whose details are `count` raw pairs."""
    return struct.pack(">HHI", 1, 0, count) + pairs


def key(name: str) -> bytes:
    data = name.encode()
    return struct.pack(">H", len(data)) + data


def nested_list_value(depth: int) -> Any:
    """A VALUE of `depth` nested lists: [[...[1]...]]."""
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


# --- layering ------------------------------------------------------------------------------

FORBIDDEN_MODULES = {"asyncio", "ssl", "socket", "selectors"}


@pytest.mark.parametrize("path", sorted(PROTOCOL_DIR.glob("*.py")), ids=lambda p: p.name)
def test_protocol_sources_import_no_io_modules(path: Path) -> None:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            imported.add(node.module.split(".")[0])
    assert not imported & FORBIDDEN_MODULES


def test_importing_the_protocol_loads_no_io_modules() -> None:
    code = (
        "import sys, mqd.protocol; "
        f"print(sorted(set({sorted(FORBIDDEN_MODULES)!r}) & set(sys.modules)))"
    )
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


def test_package_reexports_the_whole_schema() -> None:
    public = {
        name
        for name, value in vars(messages).items()
        if not name.startswith("_")
        and (getattr(value, "__module__", None) == messages.__name__ or name.isupper())
    }
    assert public <= set(mqd.protocol.__all__)
    for name in public:
        assert getattr(mqd.protocol, name) is getattr(messages, name)
    # The explicit import list in mqd/protocol/__init__.py is up to date.
    assert mqd.protocol._LATE_NAMES == []


def test_every_message_class_compiles() -> None:
    for cls in MESSAGE_CLASSES:
        source = generated_source(cls)
        assert "def encode" in source and "def decode" in source


# --- frames ----------------------------------------------------------------------------------


def test_encode_frame_layout() -> None:
    data = encode_frame(0x0020, 7, b"abc", flags=FLAG_RESPONSE)
    assert data == bytes.fromhex("0000000b 01 01 0020 00000007 616263")


def test_encode_frame_rejects_out_of_range_header() -> None:
    with pytest.raises(InvalidArgument):
        encode_frame(0x10000, 1, b"")
    with pytest.raises(InvalidArgument):
        encode_frame(1, 1 << 32, b"")
    with pytest.raises(InvalidArgument):
        encode_frame(1, 1, b"", flags=256)


def test_request_and_response_frames() -> None:
    request = PingRequest(payload=b"x")
    frame = one_frame(encode_request(5, request))
    assert frame == Frame(PROTOCOL_VERSION, 0, Opcode.PING, 5, b"\x00\x00\x00\x01x")
    assert type(frame.body) is bytes
    assert decode_request(frame) == request
    frame = one_frame(encode_response(6, PingResponse(payload=b"", server_time_ms=1)))
    assert frame.flags == FLAG_RESPONSE and frame.is_response and not frame.is_error
    assert decode_response(frame) == PingResponse(payload=b"", server_time_ms=1)


def test_error_frames() -> None:
    frame = one_frame(
        encode_error(9, Opcode.SEND, ErrorCode.THROTTLED, "slow", {"retry_after_ms": 5})
    )
    assert frame.flags == FLAG_RESPONSE | FLAG_ERROR and frame.opcode == Opcode.SEND
    body = decode_response(frame)
    assert body == ErrorBody(code=14, message="slow", details={"retry_after_ms": 5})
    error = error_from_body(body)
    assert isinstance(error, Throttled) and error.details == {"retry_after_ms": 5}
    # No details → an empty map; an unknown opcode is echoed as is.
    frame = one_frame(encode_error(3, 0x0999, ErrorCode.UNKNOWN_OPCODE, "what"))
    assert frame.opcode == 0x0999
    assert decode_response(frame) == ErrorBody(code=1, message="what", details={})
    exc = UnsupportedVersion("no", details={"version_min": 1, "version_max": 1})
    frame = one_frame(encode_exception(4, Opcode.PING, exc))
    assert decode_response(frame) == ErrorBody(2, "no", {"version_min": 1, "version_max": 1})


def test_decode_request_rejects_unknown_opcode_without_closing() -> None:
    frame = Frame(PROTOCOL_VERSION, 0, 0x0999, 1, b"")
    with pytest.raises(UnknownOpcode) as info:
        decode_request(frame)
    assert info.value.code == ErrorCode.UNKNOWN_OPCODE and not info.value.code.fatal
    assert info.value.details == {"opcode": 0x0999}


def test_decode_request_rejects_other_versions_with_the_supported_range() -> None:
    frame = Frame(2, 0, Opcode.PING, 1, b"\x00\x00\x00\x00")
    with pytest.raises(UnsupportedVersion) as info:
        decode_request(frame)
    assert not info.value.code.fatal
    assert info.value.details == {"version_min": 1, "version_max": 1}


@pytest.mark.parametrize("flags", [FLAG_RESPONSE, FLAG_ERROR, 0x04, 0x80])
def test_decode_request_rejects_flags(flags: int) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_request(Frame(PROTOCOL_VERSION, flags, Opcode.PING, 1, b"\x00\x00\x00\x00"))
    assert info.value.code.fatal


@pytest.mark.parametrize("flags", [0, FLAG_ERROR, FLAG_RESPONSE | 0x04])
def test_decode_response_rejects_non_response_flags(flags: int) -> None:
    with pytest.raises(ProtocolError):
        decode_response(Frame(PROTOCOL_VERSION, flags, Opcode.PING, 1, b""))


def test_decode_response_unknown_opcode() -> None:
    with pytest.raises(UnknownOpcode):
        decode_response(Frame(PROTOCOL_VERSION, FLAG_RESPONSE, 0x0999, 1, b""))


def test_decode_request_reports_a_bad_body_as_malformed() -> None:
    frame = Frame(PROTOCOL_VERSION, 0, Opcode.PING, 1, b"\x00\x00\x00\x05ab")
    with pytest.raises(ProtocolError) as info:
        decode_request(frame)
    assert info.value.code == ErrorCode.MALFORMED_FRAME


# --- decoding rules (protocol.md §3) ---------------------------------------------------------


def test_truncation_at_every_byte_is_malformed() -> None:
    msg = SendRequest(
        queue="q",
        entries=[SendEntry(body=b"abc", attributes={"k": "v"}, group_id="g", priority=3)],
    )
    body = encode_body(msg)
    for cut in range(len(body)):
        with pytest.raises(ProtocolError):
            decode_body(SendRequest, body[:cut])


def test_trailing_bytes_are_malformed() -> None:
    body = encode_body(PingRequest(payload=b"x"))
    with pytest.raises(ProtocolError, match="trailing"):
        decode_body(PingRequest, body + b"\x00")


def test_empty_body_for_a_message_without_fields() -> None:
    assert decode_body(messages.StatsRequest, b"") == messages.StatsRequest()
    with pytest.raises(ProtocolError):
        decode_body(messages.StatsRequest, b"\x00")


@pytest.mark.parametrize("byte", [2, 0xFF])
def test_bool_other_than_0_or_1_is_malformed(byte: int) -> None:
    body = encode_body(CreateQueueRequest(name="q", exist_ok=True))
    assert body[-1] == 1
    with pytest.raises(ProtocolError, match="BOOL"):
        decode_body(CreateQueueRequest, body[:-1] + bytes([byte]))
    with pytest.raises(ProtocolError, match="bool"):
        decode_body(ErrorBody, value_map_body(key("a") + bytes([1, byte]), 1))


@pytest.mark.parametrize("data", [b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xc0\x80"])
def test_invalid_utf8_is_malformed(data: bytes) -> None:
    body = struct.pack(">H", len(data)) + data
    with pytest.raises(ProtocolError, match="UTF-8"):
        decode_body(messages.GetQueueRequest, body)


@pytest.mark.parametrize("tag", [8, 9, 0x7F, 0xFF])
def test_unknown_value_tag_is_malformed(tag: int) -> None:
    with pytest.raises(ProtocolError, match="tag"):
        decode_body(ErrorBody, value_map_body(key("a") + bytes([tag]), 1))


def test_duplicate_keys_are_malformed() -> None:
    pair = key("k") + key("v")
    body = encode_body(SendEntry(body=b""))
    # SendEntry: body BLOB (4 bytes for b""), then attributes STR_MAP.
    forged = body[:4] + struct.pack(">I", 2) + pair + pair + body[8:]
    with pytest.raises(ProtocolError, match="duplicate"):
        decode_body(SendEntry, forged)
    value_pair = key("k") + b"\x00"
    with pytest.raises(ProtocolError, match="duplicate"):
        decode_body(ErrorBody, value_map_body(value_pair + value_pair, 2))
    nested = key("m") + b"\x05" + struct.pack(">I", 2) + value_pair + value_pair
    with pytest.raises(ProtocolError, match="duplicate"):
        decode_body(ErrorBody, value_map_body(nested, 1))


@pytest.mark.parametrize(
    ("cls", "body"),
    [
        (messages.ListQueuesResponse, struct.pack(">I", 0xFFFFFFFF)),
        (messages.ListQueuesResponse, struct.pack(">I", 3) + key("a") + key("b")),
        (ReceiveResponse, struct.pack(">I", 1_000_000) + b"\x00" * 100),
        (ErrorBody, value_map_body(b"\x00" * 10, 0xFFFFFFFF)),
        (ErrorBody, value_map_body(key("l") + b"\x06" + struct.pack(">I", 0x7FFFFFFF), 1)),
    ],
)
def test_counts_larger_than_the_bytes_left_are_malformed(cls: type, body: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_body(cls, body)


def test_nesting_depth_limit() -> None:
    # The field's VALUE_MAP is level 1, so 7 nested lists inside it make 8 levels.
    ok = ErrorBody(1, "", {"a": nested_list_value(VALUE_DEPTH_MAX - 1)})
    assert decode_body(ErrorBody, encode_body(ok)) == ok
    too_deep = ErrorBody(1, "", {"a": nested_list_value(VALUE_DEPTH_MAX)})
    with pytest.raises(InvalidArgument, match="nest"):
        encode_body(too_deep)
    # Forge the too-deep bytes by hand: the decoder refuses them too.
    payload = b"\x02" + struct.pack(">q", 1)
    for _ in range(VALUE_DEPTH_MAX):
        payload = b"\x06" + struct.pack(">I", 1) + payload
    with pytest.raises(ProtocolError, match="nest"):
        decode_body(ErrorBody, value_map_body(key("a") + payload, 1))


def test_decode_accepts_any_bytes_like() -> None:
    msg = PingRequest(payload=b"abc")
    body = encode_body(msg)
    for view in (bytearray(body), memoryview(body)):
        decoded = decode_body(PingRequest, view)
        assert decoded == msg and type(decoded.payload) is bytes


# --- encoding rules: client misuse is InvalidArgument ---------------------------------------


@pytest.mark.parametrize(
    "msg",
    [
        SendEntry(body=b"", priority=256),
        SendEntry(body=b"", delay_ms=-1),
        SendEntry(body=b"", delay_ms=1 << 32),
        PingResponse(payload=b"", server_time_ms=1 << 64),
        PingResponse(payload=b"", server_time_ms=-1),
        SendEntry(body=b"", group_id="x" * 65536),
        SendEntry(body=b"", group_id="\u00e9" * 32768),  # 65536 UTF-8 bytes
        SendEntry(body=b"", group_id="\ud800"),  # a lone surrogate has no UTF-8
        SendEntry(body="text"),  # type: ignore[arg-type]
        SendEntry(body=b"", attributes={"k": 1}),  # type: ignore[dict-item]
        SendEntry(body=b"", attributes={1: "v"}),  # type: ignore[dict-item]
        SendEntry(body=b"", attributes=["k"]),  # type: ignore[arg-type]
        SendEntry(body=b"", group_id=None),  # type: ignore[arg-type]
        SendRequest(queue="q", entries=[PingRequest()]),  # type: ignore[list-item]
        SendRequest(queue="q", entries=None),  # type: ignore[arg-type]
        ErrorBody(1, "", {"a": 1 << 63}),
        ErrorBody(1, "", {"a": I64_MIN - 1}),
        ErrorBody(1, "", {"a": object()}),
        ErrorBody(1, "", {"a": {1, 2}}),
        ErrorBody(1, "", {1: "a"}),  # type: ignore[dict-item]
        ErrorBody(1, "", {"a": {"b": "x" * 70000}}),
        DeleteRequest(queue="q", receipts=["ok", 5]),  # type: ignore[list-item]
        HelloResponse(version=1, server_version="", node_id="", roles=[], limits=None),  # type: ignore[arg-type]
    ],
    ids=repr,
)
def test_unencodable_values_raise_invalid_argument(msg: Any) -> None:
    with pytest.raises(InvalidArgument):
        encode_body(msg)
    if hasattr(msg, "OPCODE"):
        with pytest.raises(InvalidArgument):
            encode_request(1, msg)


def test_invalid_argument_names_the_field() -> None:
    msg = SendRequest(queue="q", entries=[SendEntry(body=b""), SendEntry(body=b"", priority=999)])
    with pytest.raises(InvalidArgument, match=r"SendRequest\.entries\[1\]\.priority"):
        encode_body(msg)
    with pytest.raises(InvalidArgument, match=r"65535"):
        encode_body(SendEntry(body=b"", dedup_id="x" * 65536))


def test_cyclic_values_hit_the_depth_limit() -> None:
    cycle: dict[str, Any] = {}
    cycle["self"] = cycle
    with pytest.raises(InvalidArgument):
        encode_body(ErrorBody(1, "", cycle))


def test_non_messages_are_invalid_arguments() -> None:
    with pytest.raises(InvalidArgument):
        encode_body(object())
    with pytest.raises(InvalidArgument):
        encode_request(1, SendEntry(body=b""))  # a struct with no opcode
    with pytest.raises(InvalidArgument):
        encode_request(1 << 32, PingRequest())


def test_boundary_values_encode() -> None:
    msg = SendEntry(body=b"", delay_ms=(1 << 32) - 1, group_id="x" * 65535, priority=255)
    assert decode_body(SendEntry, encode_body(msg)) == msg
    body = ErrorBody(1, "", {"min": I64_MIN, "max": I64_MAX, "inf": float("inf")})
    assert decode_body(ErrorBody, encode_body(body)) == body


def test_value_kinds_are_kept_exactly() -> None:
    from enum import IntEnum

    class Color(IntEnum):
        RED = 3

    details = {
        "t": True,
        "one": 1,
        "f": 1.0,
        "neg_zero": -0.0,
        "tuple": (1, "a"),
        "bytearray": bytearray(b"ab"),
        "enum": Color.RED,
        "none": None,
    }
    decoded = decode_body(ErrorBody, encode_body(ErrorBody(1, "", details))).details
    assert decoded["t"] is True
    assert type(decoded["one"]) is int and type(decoded["f"]) is float
    assert str(decoded["neg_zero"]) == "-0.0"
    assert decoded["tuple"] == [1, "a"]
    assert decoded["bytearray"] == b"ab" and type(decoded["bytearray"]) is bytes
    assert decoded["enum"] == 3 and type(decoded["enum"]) is int
    assert decoded["none"] is None


def test_visibility_default_round_trips() -> None:
    change = ChangeVisibilityRequest(
        queue="q", changes=[VisibilityChange(receipt="r", timeout_ms=VISIBILITY_DEFAULT)]
    )
    assert decode_request(one_frame(encode_request(1, change))) == change


# --- hypothesis round trips of every message type ----------------------------------------------

_INT_RANGES = {
    "U8": (0, 0xFF),
    "U16": (0, 0xFFFF),
    "U32": (0, 0xFFFFFFFF),
    "U64": (0, (1 << 64) - 1),
    "I64": (I64_MIN, I64_MAX),
}
short_text = st.text(max_size=12)


def values(depth: int = 1) -> st.SearchStrategy[Any]:
    """VALUEs that nest no deeper than the limit, below a field's VALUE_MAP (level 1)."""
    leaves = (
        st.none()
        | st.booleans()
        | st.integers(I64_MIN, I64_MAX)
        | st.floats(allow_nan=False)
        | short_text
        | st.binary(max_size=12)
    )
    if depth >= VALUE_DEPTH_MAX:
        return leaves
    deeper = st.deferred(lambda: values(depth + 1))
    return leaves | st.lists(deeper, max_size=3) | st.dictionaries(short_text, deeper, max_size=3)


def field_strategy(kind: Any) -> st.SearchStrategy[Any]:
    if kind in _INT_RANGES:
        return st.integers(*_INT_RANGES[kind])
    if kind == "BOOL":
        return st.booleans()
    if kind == "STR":
        return short_text
    if kind == "BLOB":
        return st.binary(max_size=24)
    if kind == "STR_LIST":
        return st.lists(short_text, max_size=4)
    if kind == "STR_MAP":
        return st.dictionaries(short_text, short_text, max_size=4)
    if kind == "VALUE_MAP":
        return st.dictionaries(short_text, values(), max_size=4)
    if isinstance(kind, tuple):
        return st.lists(message_strategy(kind[1]), max_size=3)
    return message_strategy(kind)


def message_strategy(cls: type) -> st.SearchStrategy[Any]:
    return st.builds(cls, **{name: field_strategy(kind) for name, kind in cls.FIELDS})


any_message = st.sampled_from(MESSAGE_CLASSES).flatmap(message_strategy)
ROUND_TRIP = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("cls", MESSAGE_CLASSES, ids=lambda cls: cls.__name__)
def test_round_trip_every_message_type(cls: type) -> None:
    @ROUND_TRIP
    @given(message_strategy(cls))
    def check(msg: Any) -> None:
        decoded = decode_body(cls, encode_body(msg))
        assert decoded == msg
        # repr tells True from 1 and -0.0 from 0.0, which == does not.
        assert repr(decoded) == repr(msg)

    check()


@ROUND_TRIP
@given(
    st.sampled_from(sorted(OPS)).flatmap(
        lambda op: st.tuples(
            st.integers(0, 0xFFFFFFFF), message_strategy(OPS[op][0]), message_strategy(OPS[op][1])
        )
    )
)
def test_round_trip_through_frames(case: tuple[int, Any, Any]) -> None:
    correlation_id, request, response = case
    frame = one_frame(encode_request(correlation_id, request))
    assert frame.correlation_id == correlation_id and frame.flags == 0
    assert decode_request(frame) == request
    frame = one_frame(encode_response(correlation_id, response))
    assert frame.correlation_id == correlation_id and frame.flags == FLAG_RESPONSE
    assert decode_response(frame) == response
    assert len(encode_response(correlation_id, response)) == 4 + HEADER_BYTES + len(
        encode_body(response)
    )


def test_hot_path_messages_round_trip_in_bulk() -> None:
    entries = [
        SendEntry(body=bytes([i % 256]) * (i % 50), attributes={"i": str(i)} if i % 3 else {})
        for i in range(1000)
    ]
    send = SendRequest(queue="q", entries=entries)
    assert decode_request(one_frame(encode_request(1, send))) == send
    delivered = [
        DeliveredMessage(id=str(i), receipt=f"r{i}", body=b"x" * i, receive_count=i)
        for i in range(1000)
    ]
    receive = ReceiveResponse(messages=delivered)
    assert decode_response(one_frame(encode_response(1, receive))) == receive


def test_queue_info_nests_inline() -> None:
    info = QueueInfo(name="q", attributes={"fifo": False}, stats={"visible": 1})
    msg = messages.GetQueueResponse(queue=info)
    assert encode_body(msg) == encode_body(info)
    assert decode_body(messages.GetQueueResponse, encode_body(msg)) == msg


def test_stats_with_nested_maps() -> None:
    msg = StatsResponse(stats={"storage": {"segments": 2, "bytes": [1, 2]}, "up": 1.5})
    assert decode_body(StatsResponse, encode_body(msg)) == msg
