"""The error tree shared by the server, the client and the shell.

`ErrorCode` is the wire enum of protocol.md §2 ("Errors"); a test checks that
the two agree. Codes marked fatal make the server close the connection after
sending the error frame (protocol.md §2.1).
"""

from __future__ import annotations

from enum import IntEnum
from typing import Any


class ErrorCode(IntEnum):
    """Numbered error codes, the same on the wire and in protocol.md."""

    UNKNOWN_OPCODE = 1
    UNSUPPORTED_VERSION = 2
    MALFORMED_FRAME = 3
    FRAME_TOO_LARGE = 4
    HELLO_REQUIRED = 5
    INVALID_ARGUMENT = 6
    QUEUE_NOT_FOUND = 7
    QUEUE_EXISTS = 8
    MESSAGE_TOO_LARGE = 9
    BATCH_TOO_LARGE = 10
    RECEIPT_INVALID = 11
    UNAUTHENTICATED = 12
    FORBIDDEN = 13
    THROTTLED = 14
    NOT_LEADER = 15
    UNAVAILABLE = 16
    STORAGE_FULL = 17
    INTERNAL = 18
    TOO_MANY_REQUESTS = 19
    QUEUE_IN_USE = 20
    TIMEOUT = 21

    @property
    def fatal(self) -> bool:
        """Whether the server closes the connection after this error."""
        return self in _FATAL_CODES


_FATAL_CODES = frozenset(
    {ErrorCode.MALFORMED_FRAME, ErrorCode.FRAME_TOO_LARGE, ErrorCode.UNAUTHENTICATED}
)


class MqdError(Exception):
    """Root of every exception mqd raises across a public API."""


class ServerError(MqdError):
    """An error with a protocol error code, raised by the server or reported by it.

    `details` carries the optional structured fields of the error frame (for
    example `retry_after_ms` with THROTTLED or `failures` with a batch ack).
    """

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(
        self,
        message: str = "",
        *,
        code: ErrorCode | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        if code is not None:
            self.code = code
        self.message = message or self.code.name
        self.details = details or {}
        super().__init__(f"{self.code.name}: {self.message}")

    @classmethod
    def from_code(
        cls, code: int, message: str = "", details: dict[str, Any] | None = None
    ) -> ServerError:
        """Build the most specific subclass for a code received on the wire."""
        try:
            enum_code = ErrorCode(code)
        except ValueError:
            return ServerError(f"unknown error code {code}: {message}", code=ErrorCode.INTERNAL)
        subclass = _BY_CODE.get(enum_code, ServerError)
        return subclass(message, code=enum_code, details=details)


class ProtocolError(ServerError):
    """The peer broke the framing or the codec rules (protocol.md §1)."""

    code = ErrorCode.MALFORMED_FRAME


class UnknownOpcode(ServerError):
    code = ErrorCode.UNKNOWN_OPCODE


class UnsupportedVersion(ServerError):
    code = ErrorCode.UNSUPPORTED_VERSION


class FrameTooLarge(ProtocolError):
    code = ErrorCode.FRAME_TOO_LARGE


class HelloRequired(ServerError):
    code = ErrorCode.HELLO_REQUIRED


class InvalidArgument(ServerError):
    code = ErrorCode.INVALID_ARGUMENT


class QueueNotFound(ServerError):
    code = ErrorCode.QUEUE_NOT_FOUND


class QueueExists(ServerError):
    code = ErrorCode.QUEUE_EXISTS


class QueueInUse(ServerError):
    code = ErrorCode.QUEUE_IN_USE


class MessageTooLarge(ServerError):
    code = ErrorCode.MESSAGE_TOO_LARGE


class BatchTooLarge(ServerError):
    code = ErrorCode.BATCH_TOO_LARGE


class ReceiptInvalid(ServerError):
    code = ErrorCode.RECEIPT_INVALID


class Unauthenticated(ServerError):
    code = ErrorCode.UNAUTHENTICATED


class Forbidden(ServerError):
    code = ErrorCode.FORBIDDEN


class Throttled(ServerError):
    code = ErrorCode.THROTTLED


class NotLeader(ServerError):
    code = ErrorCode.NOT_LEADER


class Unavailable(ServerError):
    code = ErrorCode.UNAVAILABLE


class StorageFull(ServerError):
    code = ErrorCode.STORAGE_FULL


class InternalError(ServerError):
    code = ErrorCode.INTERNAL


class TooManyRequests(ServerError):
    code = ErrorCode.TOO_MANY_REQUESTS


class RequestTimeout(ServerError):
    code = ErrorCode.TIMEOUT


_BY_CODE: dict[ErrorCode, type[ServerError]] = {
    cls.code: cls
    for cls in (
        UnknownOpcode,
        UnsupportedVersion,
        ProtocolError,
        FrameTooLarge,
        HelloRequired,
        InvalidArgument,
        QueueNotFound,
        QueueExists,
        QueueInUse,
        MessageTooLarge,
        BatchTooLarge,
        ReceiptInvalid,
        Unauthenticated,
        Forbidden,
        Throttled,
        NotLeader,
        Unavailable,
        StorageFull,
        InternalError,
        TooManyRequests,
        RequestTimeout,
    )
}


class ClientError(MqdError):
    """The client library was misused or lost its connection (no server code: `code`
    is None). `details` as a ServerError's: e.g. `sent_message_ids` from send_batch."""

    code: ErrorCode | None = None

    def __init__(self, message: str = "", *, details: dict[str, Any] | None = None) -> None:
        self.message = message
        self.details = details or {}
        super().__init__(message)


class ConnectionClosed(ClientError):
    """The connection to the server closed while a request was outstanding."""


class ClientClosed(ConnectionClosed):
    """The client itself was closed (`close()`): its calls fail, and its streams and
    consumers end with this instead of waiting for a connection that will not come."""


class ConfigError(MqdError):
    """A configuration file or option is invalid; the message names the key."""


class StorageError(MqdError):
    """The storage engine found damaged data or could not write."""
