"""Framing of protocol v1 (protocol.md §1): a length prefix, an 8-byte header, a body.

This module does no I/O (STYLE.md "the codec does no I/O"): `encode_frame` is a
pure function and `FrameDecoder` is fed bytes and hands out whole frames or
`None` ("need more data"), like h11's `receive_data` / `next_event`.

    u32 length | u8 version | u8 flags | u16 opcode | u32 correlation_id | body
               '------------------ `length` bytes ---------------------------'

The length prefix and the header layout are the same in every protocol
version, so a peer can always read a frame it cannot understand and answer it
with an error frame.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from mqd.errors import FrameTooLarge, InvalidArgument, ProtocolError

# Changing the frame layout means a new PROTOCOL_VERSION: bump it, teach the
# server to accept both (HELLO negotiates, protocol.md §1.4), add vectors.
PROTOCOL_VERSION = 1
# The range of versions this codec speaks; the server advertises it in an
# UNSUPPORTED_VERSION error's details (protocol.md §1.4).
PROTOCOL_VERSION_MIN = 1
PROTOCOL_VERSION_MAX = 1

LENGTH = struct.Struct(">I")  # the number of bytes after this field: header rest + body
HEADER = struct.Struct(">BBHI")  # version, flags, opcode, correlation_id
HEADER_BYTES = 8
PREFIX_BYTES = 4
_PREFIX_AND_HEADER = struct.Struct(">IBBHI")
assert HEADER.size == HEADER_BYTES and LENGTH.size == PREFIX_BYTES

FLAG_RESPONSE = 0x01
FLAG_ERROR = 0x02
# A frame the server sends on its own for a subscription (protocol.md §4.18): never
# with RESPONSE; its correlation id is the subscription id, not a request's.
FLAG_PUSH = 0x04
# The flags a request or a response may carry; every other bit is reserved and must
# be zero in v1 (protocol.md §1.3). PUSH appears only on push frames (§4.18).
FLAGS_KNOWN = FLAG_RESPONSE | FLAG_ERROR

# The largest length prefix representable on the wire.
_LENGTH_WIRE_MAX = 0xFFFFFFFF

# Consumed bytes are dropped from the front of the buffer once this many have
# accumulated (or whenever the buffer is fully consumed), so many small frames
# per feed cost one memmove now and then instead of one per frame.
_COMPACT_BYTES = 64 * 1024


class Frame(NamedTuple):
    """One decoded frame. `body` is `bytes` (a copy owned by the frame)."""

    version: int
    flags: int
    opcode: int
    correlation_id: int
    body: bytes

    @property
    def is_response(self) -> bool:
        return bool(self.flags & FLAG_RESPONSE)

    @property
    def is_error(self) -> bool:
        return bool(self.flags & FLAG_ERROR)


def encode_frame(
    opcode: int,
    correlation_id: int,
    body: bytes,
    *,
    flags: int = 0,
    version: int = PROTOCOL_VERSION,
) -> bytes:
    """Return one whole frame (length prefix, header, body) as bytes.

    Raises InvalidArgument if a header field is out of range or the frame
    cannot be represented (body over 4 GiB).
    """
    length = HEADER_BYTES + len(body)
    try:
        head = _PREFIX_AND_HEADER.pack(length, version, flags, opcode, correlation_id)
    except struct.error as exc:
        raise InvalidArgument(
            f"frame header out of range (length={length}, version={version}, flags={flags}, "
            f"opcode={opcode}, correlation_id={correlation_id}): {exc}"
        ) from None
    return head + body


class FrameDecoder:
    """Incremental frame parser: `feed` bytes in, pull `Frame`s out with `next_frame`.

    `next_frame` returns None when the buffer holds no whole frame yet. It
    raises FrameTooLarge as soon as a length prefix exceeds `frame_bytes_max`
    (before any of that frame's body is buffered), and ProtocolError for a
    length prefix smaller than the header. Both are fatal for the connection
    (protocol.md §1.6); after either, the decoder keeps raising the same error.
    Unknown versions, flags and opcodes are not the decoder's business: the
    receiver answers those with an error frame and carries on.

    `frame_bytes_max` bounds the length prefix, i.e. a frame's size not
    counting the 4-byte prefix itself.
    """

    __slots__ = ("_buf", "_frame_bytes_max", "_off")

    def __init__(self, frame_bytes_max: int) -> None:
        if not HEADER_BYTES <= frame_bytes_max <= _LENGTH_WIRE_MAX:
            raise InvalidArgument(
                f"frame_bytes_max must be in [{HEADER_BYTES}, {_LENGTH_WIRE_MAX}], "
                f"got {frame_bytes_max}"
            )
        self._frame_bytes_max = frame_bytes_max
        self._buf = bytearray()
        self._off = 0  # bytes at the front of _buf already handed out

    @property
    def frame_bytes_max(self) -> int:
        return self._frame_bytes_max

    @property
    def buffered_bytes(self) -> int:
        """Bytes fed but not yet returned in a frame (for read backpressure)."""
        return len(self._buf) - self._off

    def feed(self, data: bytes) -> None:
        """Append received bytes (any bytes-like object) to the buffer."""
        if data:
            self._buf += data

    def next_frame(self) -> Frame | None:
        """Return the next whole frame, or None if more data is needed."""
        buf = self._buf
        off = self._off
        avail = len(buf) - off
        if avail < PREFIX_BYTES:
            if avail == 0 and off:
                buf.clear()
                self._off = 0
            return None
        (length,) = LENGTH.unpack_from(buf, off)
        if length > self._frame_bytes_max:
            raise FrameTooLarge(
                f"frame of {length} bytes exceeds frame_bytes_max {self._frame_bytes_max}",
                details={"frame_bytes": length, "frame_bytes_max": self._frame_bytes_max},
            )
        if length < HEADER_BYTES:
            raise ProtocolError(
                f"frame length {length} is shorter than the {HEADER_BYTES}-byte header"
            )
        end = off + PREFIX_BYTES + length
        if end > len(buf):
            if off >= _COMPACT_BYTES:
                del buf[:off]
                self._off = 0
            return None
        version, flags, opcode, correlation_id = HEADER.unpack_from(buf, off + PREFIX_BYTES)
        # One copy out of the receive buffer; the temporary memoryview is
        # released at once, so the bytearray can still grow afterwards.
        body = bytes(memoryview(buf)[off + PREFIX_BYTES + HEADER_BYTES : end])
        if end == len(buf):
            buf.clear()
            self._off = 0
        elif end >= _COMPACT_BYTES:
            del buf[:end]
            self._off = 0
        else:
            self._off = end
        return Frame(version, flags, opcode, correlation_id, body)

    def frames(self) -> list[Frame]:
        """Every whole frame now buffered (convenience over `next_frame`)."""
        out = []
        while (frame := self.next_frame()) is not None:
            out.append(frame)
        return out
