"""Push frames of subscriptions (protocol.md §4.18): encoding and decoding, no I/O.

A push frame is the one frame the server sends without being asked. Its
header carries the PUSH flag (never RESPONSE) and, in the correlation id
field, the subscription id the client chose in SUBSCRIBE, so a client routes
it by (flags, id) before it looks at the body:

    flags PUSH        opcode DELIVER   body DeliverPush (the messages)
    flags PUSH|ERROR  opcode DELIVER   body ErrorBody   (the subscription ended)
"""

from __future__ import annotations

from typing import Any

from mqd.errors import ProtocolError
from mqd.protocol.codec import decode_body, encode_body
from mqd.protocol.frame import FLAG_ERROR, FLAG_PUSH, Frame, encode_frame
from mqd.protocol.messages import PUSHES, DeliverPush, ErrorBody, Opcode


def encode_push(subscription_id: int, msg: Any) -> bytes:
    """A whole push frame carrying `msg` (a DeliverPush) for `subscription_id`."""
    return encode_frame(msg.OPCODE, subscription_id, encode_body(msg), flags=FLAG_PUSH)


def encode_push_end(subscription_id: int, code: int, message: str, details: Any = None) -> bytes:
    """The push frame that ends a subscription on the server's side, with the reason."""
    body = encode_body(ErrorBody(int(code), message, dict(details or {})))
    return encode_frame(Opcode.DELIVER, subscription_id, body, flags=FLAG_PUSH | FLAG_ERROR)


def decode_push(frame: Frame) -> DeliverPush | ErrorBody:
    """The body of a push frame: DeliverPush, or ErrorBody for the end of a subscription.

    Raises ProtocolError for a frame that is not a well-formed push frame.
    """
    if frame.flags not in (FLAG_PUSH, FLAG_PUSH | FLAG_ERROR):
        raise ProtocolError(
            f"a push frame must have flags PUSH or PUSH|ERROR, got {frame.flags:#04x}"
        )
    if frame.flags & FLAG_ERROR:
        return decode_body(ErrorBody, frame.body)
    cls = PUSHES.get(frame.opcode)  # type: ignore[call-overload]
    if cls is None:
        raise ProtocolError(f"unknown push opcode 0x{frame.opcode:04x}")
    return decode_body(cls, frame.body)


__all__ = ["decode_push", "encode_push", "encode_push_end"]
