"""`mqd shell`: a telnet-like, line-oriented debugging tool for the mqd protocol.

One command per protocol op, plus tools for looking at the wire itself
(`raw on`, `frame HEX`, `time on`) and for watching a queue (`tail`, `watch`).
Interactive on a terminal (readline editing, history in ~/.mqd_history, tab
completion); a script runner otherwise (`-c "CMD; CMD"` or commands on stdin,
`--json` for one JSON object per answer).

Why a connection of its own instead of `mqd.client`: the shell is a protocol
debugger. It must show every frame exactly as sent and received, send bytes
that are not a valid request (`frame`), survive a server that closes on it,
and let Ctrl-C abandon one request without tearing anything down. A blocking
socket driven straight through the sans-IO codec (`mqd.protocol`) does all of
that in a few lines: Ctrl-C is just KeyboardInterrupt out of `recv`, the
decoder keeps any partial frame, and an answer that arrives after its request
was cancelled is recognised by its correlation id and reported, not mistaken
for the next answer. The shell runs one request at a time, so it needs none
of the client's pipelining, batching or reconnection policy.

Layout (STYLE.md "dispatch by table"): `COMMANDS`, built from `_ROWS`, is the
single table; the parser, `help` and tab completion all read it.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import json
import os
import select
import shlex
import signal
import socket
import ssl
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from mqd.attributes import CHANGEABLE_ATTRIBUTES, CREATE_ATTRIBUTES
from mqd.errors import ErrorCode, MqdError, ServerError
from mqd.protocol import codec
from mqd.protocol.frame import (
    FLAG_ERROR,
    FLAG_PUSH,
    FLAG_RESPONSE,
    HEADER,
    HEADER_BYTES,
    LENGTH,
    PREFIX_BYTES,
    PROTOCOL_VERSION_MAX,
    PROTOCOL_VERSION_MIN,
    Frame,
    FrameDecoder,
    encode_frame,
)
from mqd.protocol.messages import (
    DELAY_NONE,
    OPS,
    VISIBILITY_DEFAULT,
    ChangeVisibilityRequest,
    CreateQueueRequest,
    DecommissionRequest,
    DeleteQueueRequest,
    DeleteRequest,
    DeliveredMessage,
    DeliverPush,
    ErrorBody,
    GetQueueRequest,
    GrantRequest,
    HelloRequest,
    HelloResponse,
    ListQueuesRequest,
    Opcode,
    PeekRequest,
    PingRequest,
    PurgeQueueRequest,
    QueueInfo,
    RebalanceRequest,
    ReceiveRequest,
    RedriveRequest,
    SendEntry,
    SendRequest,
    SetQueueAttributesRequest,
    StatsRequest,
    SubscribeRequest,
    UnsubscribeRequest,
    VisibilityChange,
)
from mqd.protocol.push import decode_push
from mqd.receipts import parse_message_id

# --- limits and defaults (STYLE.md "a limit on everything") -------------------------

DEFAULT_PORT = 6470
DEFAULT_ADDRESS = f"127.0.0.1:{DEFAULT_PORT}"
CLIENT_NAME = "mqd-shell"
CONNECT_TIMEOUT_S = 10.0
# Every request gets this long for its answer, plus its own wait= if it long-polls.
REQUEST_TIMEOUT_S = 30.0
# `frame`: how long to wait for an answer to arbitrary bytes, and after a fatal
# error how long to wait to see the server close the connection.
FRAME_ANSWER_WAIT_S = 2.0
FATAL_CLOSE_WAIT_S = 1.0
# Answers larger than this break framing as far as the shell is concerned.
RESPONSE_FRAME_BYTES_MAX = 256 * 1024 * 1024
RECV_CHUNK_BYTES = 256 * 1024
TAIL_POLL_S = 0.5
# `subscribe`: credits granted at a time unless N is given, and the subscription id the
# shell uses (one subscription at a time, protocol.md §4.18).
SUBSCRIBE_CREDITS_DEFAULT = 10
SHELL_SUBSCRIPTION_ID = 1
TAIL_PAGE_MESSAGES_MAX = 100
WATCH_INTERVAL_S = 1.0
HISTORY_FILE_NAME = ".mqd_history"
HISTORY_LINES_MAX = 1000
# Text output shortens bodies in tables and in `raw on` dumps to these sizes.
BODY_SHOWN_CHARS_MAX = 64
RAW_BODY_SHOWN_BYTES_MAX = 256


# Error codes of the shell itself, printed like the server's (`ERROR CODE: message`).
USAGE = "USAGE"
CONNECTION_FAILED = "CONNECTION_FAILED"
CONNECTION_CLOSED = "CONNECTION_CLOSED"
CLIENT_TIMEOUT = "CLIENT_TIMEOUT"
BAD_RESPONSE = "BAD_RESPONSE"

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_INTERRUPTED = 130


class ShellError(MqdError):
    """A failure of the shell itself (bad usage, lost connection), with a code name."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class ServerClosed(ShellError):
    def __init__(self, detail: str = "") -> None:
        message = "connection closed by server" + (f" ({detail})" if detail else "")
        super().__init__(CONNECTION_CLOSED, message)


class WireTimeout(ShellError):
    def __init__(self, timeout_s: float) -> None:
        super().__init__(CLIENT_TIMEOUT, f"no answer within {timeout_s:g} s")


class _Quit(Exception):
    """Raised by `quit` to leave the command loop."""


# --- command-line syntax: splitting, values, bodies -------------------------------


def split_commands(line: str) -> list[str]:
    """Split a line on `;` outside quotes; empty pieces are dropped, and so is a `#`
    comment: from a `#` that starts a word, outside quotes, to the end of the line."""
    pieces: list[str] = []
    current: list[str] = []
    quote = ""
    escaped = False
    for ch in line:
        if escaped:
            escaped = False
        elif ch == "\\" and quote != "'":
            escaped = True
        elif quote:
            if ch == quote:
                quote = ""
        elif ch in "'\"":
            quote = ch
        elif ch == ";":
            pieces.append("".join(current))
            current = []
            continue
        elif ch == "#" and (not current or current[-1].isspace()):
            break  # a comment, to the end of the line (quote a word that starts with #)
        current.append(ch)
    if quote:
        raise ShellError(USAGE, f"unbalanced {quote} quote")
    pieces.append("".join(current))
    return [p.strip() for p in pieces if p.strip()]


def parse_value(text: str) -> Any:
    """A key=value value: an int, a float, true/false, a JSON map or list
    (`redrive_policy={"dead_letter_queue":"dlq","max_receive_count":5}`), else the string."""
    if text[:1] in ("{", "["):
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ShellError(USAGE, f"not valid JSON: {text!r} ({exc.msg})") from None
    lowered = text.lower()
    if lowered == "true":
        return True
    if lowered == "false":
        return False
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def parse_seconds_ms(text: str, what: str) -> int:
    """Seconds as typed (`1.5`) to the wire's integer milliseconds."""
    try:
        seconds = float(text)
    except ValueError:
        raise ShellError(USAGE, f"{what} must be a number of seconds, got {text!r}") from None
    if not seconds >= 0 or seconds == float("inf"):
        raise ShellError(USAGE, f"{what} must be a non-negative number of seconds, got {text!r}")
    return round(seconds * 1000)


def parse_count(text: str, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ShellError(USAGE, f"{what} must be a whole number, got {text!r}") from None
    if value < 0:
        raise ShellError(USAGE, f"{what} must not be negative, got {value}")
    return value


def parse_hex(text: str) -> bytes:
    """Hex digits with optional spaces, `:`, `_`, and `0x` / `hex:` prefixes."""
    cleaned = text.strip()
    for prefix in ("hex:", "0x", "0X"):
        if cleaned.startswith(prefix):
            cleaned = cleaned[len(prefix) :]
    cleaned = "".join(cleaned.replace(":", " ").replace("_", " ").split())
    try:
        return bytes.fromhex(cleaned)
    except ValueError:
        raise ShellError(USAGE, f"not hex: {text!r}") from None


def parse_body(text: str) -> bytes:
    """A message body: `@file`, `hex:...`, `text:...` (literally), else the UTF-8 text."""
    if text.startswith("@") and len(text) > 1:
        path = Path(text[1:]).expanduser()
        try:
            return path.read_bytes()
        except OSError as exc:
            raise ShellError(USAGE, f"cannot read {path}: {exc.strerror or exc}") from None
    if text.startswith("hex:"):
        return parse_hex(text)
    if text.startswith("text:"):
        return text[len("text:") :].encode()
    return text.encode()


def parse_onoff(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("on", "true", "1", "yes"):
        return True
    if lowered in ("off", "false", "0", "no"):
        return False
    raise ShellError(USAGE, f"expected on or off, got {text!r}")


def parse_address(text: str) -> tuple[str, int]:
    """HOST:PORT, [IPv6]:PORT, or HOST alone (port 6470)."""
    host, port = text, DEFAULT_PORT
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ShellError(USAGE, f"bad address {text!r}")
        host, rest = text[1:end], text[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise ShellError(USAGE, f"bad address {text!r}")
            port = _port(rest[1:], text)
    elif text.count(":") == 1:
        host, port_text = text.split(":")
        port = _port(port_text, text)
    if not host:
        raise ShellError(USAGE, f"bad address {text!r}: no host")
    return host, port


def _port(text: str, address: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise ShellError(USAGE, f"bad port in {address!r}") from None
    if not 0 < port < 65536:
        raise ShellError(USAGE, f"bad port in {address!r}")
    return port


# --- showing values ------------------------------------------------------------------


def show_body(body: bytes, limit: int | None = BODY_SHOWN_CHARS_MAX) -> str:
    """Text when the body is printable UTF-8, else `hex:...` (the syntax `send` accepts)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and text.isprintable():
        shown = text if text else '""'
        if limit is not None and len(shown) > limit:
            shown = f"{shown[: limit - 1]}… ({len(body)} bytes)"
        return shown
    shown = "hex:" + body.hex()
    if limit is not None and len(shown) > limit:
        shown = f"{shown[: limit - 1]}… ({len(body)} bytes)"
    return shown


def jsonable(value: Any) -> Any:
    """JSON-ready form: dataclasses become objects; a bytes value under key K becomes
    K (its UTF-8 text) or, when not UTF-8, K_b64 (base64)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            key = str(key)
            if isinstance(item, bytes | bytearray | memoryview):
                item = bytes(item)
                try:
                    out[key] = item.decode("utf-8")
                except UnicodeDecodeError:
                    out[f"{key}_b64"] = base64.b64encode(item).decode("ascii")
            else:
                out[key] = jsonable(item)
        return out
    if isinstance(value, list | tuple):
        return [jsonable(item) for item in value]
    if isinstance(value, bytes | bytearray | memoryview):
        return {"b64": base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, ErrorCode | Opcode):
        return value.name
    return value


def render_table(headers: list[str] | None, rows: list[list[str]], indent: str = "") -> str:
    """Left-aligned columns separated by two spaces; the last column is not padded."""
    all_rows = ([headers] if headers else []) + rows
    if not all_rows:
        return ""
    widths = [max(len(row[i]) for row in all_rows) for i in range(len(all_rows[0]))]
    lines = []
    for row in all_rows:
        cells = [cell.ljust(widths[i]) for i, cell in enumerate(row[:-1])] + [row[-1]]
        lines.append(indent + "  ".join(cells).rstrip())
    return "\n".join(lines)


def _value_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, bytes):
        return show_body(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_value_text(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_value_text(v) for v in value) + "]"
    return str(value)


def _flatten(mapping: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    for key, value in mapping.items():
        if isinstance(value, dict) and value:
            rows += _flatten(value, f"{prefix}{key}.")
        else:
            rows.append((f"{prefix}{key}", value))
    return rows


def _kv_table(mapping: dict[str, Any], indent: str = "  ") -> str:
    rows = [[key, _value_text(value)] for key, value in _flatten(mapping)]
    return render_table(None, rows, indent) if rows else f"{indent}(none)"


def _clock_ms(epoch_ms: int) -> str:
    """Local wall-clock time of a server timestamp, to the millisecond."""
    if not epoch_ms:
        return "-"
    seconds = epoch_ms / 1000
    return time.strftime("%H:%M:%S", time.localtime(seconds)) + f".{epoch_ms % 1000:03d}"


def _opcode_name(opcode: int) -> str:
    try:
        return Opcode(opcode).name
    except ValueError:
        return f"0x{opcode:04x}"


def _flags_text(flags: int) -> str:
    known = ((FLAG_RESPONSE, "RESPONSE"), (FLAG_ERROR, "ERROR"), (FLAG_PUSH, "PUSH"))
    names = [n for bit, n in known if flags & bit]
    rest = flags & ~(FLAG_RESPONSE | FLAG_ERROR | FLAG_PUSH)
    if rest:
        names.append(f"0x{rest:02x}")
    return f"0x{flags:02x}" + (f" {'|'.join(names)}" if names else "")


def _fields_text(value: Any) -> str:
    """A decoded body as `Type(field=value, ...)`, bodies shown like `show_body`."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        inner = ", ".join(
            f"{f.name}={_fields_text(getattr(value, f.name))}" for f in dataclasses.fields(value)
        )
        return f"{type(value).__name__}({inner})"
    if isinstance(value, bytes):
        return show_body(value, RAW_BODY_SHOWN_BYTES_MAX)
    if isinstance(value, list):
        return "[" + ", ".join(_fields_text(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k!r}: {_fields_text(v)}" for k, v in value.items()) + "}"
    return repr(value)


# --- frames as the shell shows them (`raw on`, `frame`) -------------------------------


def frame_bytes(frame: Frame) -> bytes:
    """The exact bytes of a received frame (the layout is fixed, so re-encoding is exact)."""
    return encode_frame(
        frame.opcode, frame.correlation_id, frame.body, flags=frame.flags, version=frame.version
    )


def _parse_head(data: bytes) -> tuple[int, int, int, int, int] | None:
    """(length, version, flags, opcode, correlation_id) of raw bytes, if long enough."""
    if len(data) < PREFIX_BYTES + HEADER_BYTES:
        return None
    (length,) = LENGTH.unpack_from(data, 0)
    version, flags, opcode, cid = HEADER.unpack_from(data, PREFIX_BYTES)
    return length, version, flags, opcode, cid


def decode_frame_body(data: bytes) -> tuple[Any, str | None]:
    """Decode raw frame bytes' body: (the message, None) or (None, why it does not decode)."""
    head = _parse_head(data)
    if head is None:
        return None, f"{len(data)} bytes: shorter than a frame header"
    length, version, flags, opcode, cid = head
    body = data[PREFIX_BYTES + HEADER_BYTES :]
    if len(body) != length - HEADER_BYTES:
        return None, f"length field says {length} but {len(data) - PREFIX_BYTES} bytes follow it"
    try:
        if flags & FLAG_PUSH:
            return decode_push(Frame(version, flags, opcode, cid, body)), None
        if flags & FLAG_RESPONSE:
            return codec.decode_response(Frame(version, flags, opcode, cid, body)), None
        row = OPS.get(opcode)  # type: ignore[call-overload]
        if row is None:
            return None, f"unknown opcode 0x{opcode:04x}"
        return codec.decode_body(row[0], body), None
    except ServerError as exc:
        return None, exc.message


def frame_json(direction: str, data: bytes) -> dict[str, Any]:
    out: dict[str, Any] = {"dir": direction, "hex": data.hex()}
    head = _parse_head(data)
    if head is not None:
        length, version, flags, opcode, cid = head
        out.update(
            length=length,
            version=version,
            flags=flags,
            opcode=_opcode_name(opcode),
            correlation_id=cid,
        )
        message, problem = decode_frame_body(data)
        if problem is None:
            out["type"] = type(message).__name__
            out["body"] = jsonable(message)
            if isinstance(message, ErrorBody):
                out["error"] = _code_name(message.code)
        else:
            out["decode_error"] = problem
    return out


def frame_text(direction: str, data: bytes) -> str:
    """`>> 0000000c 01 00 0002 00000007 | 00000000` and, below, the decoded header and body."""
    arrow = ">>" if direction == "sent" else "<<"
    head = _parse_head(data)
    if head is None:
        return f"{arrow} {data.hex()}  ({len(data)} bytes: shorter than a frame header)"
    length, version, flags, opcode, cid = head
    body = data[PREFIX_BYTES + HEADER_BYTES :]
    shown = body[:RAW_BODY_SHOWN_BYTES_MAX].hex()
    if len(body) > RAW_BODY_SHOWN_BYTES_MAX:
        shown += f"… ({len(body)} bytes)"
    line = f"{arrow} {data[0:4].hex()} {data[4:5].hex()} {data[5:6].hex()} {data[6:8].hex()} {data[8:12].hex()}"
    if body:
        line += f" | {shown}"
    lines = [
        line,
        f"   length={length} version={version} flags={_flags_text(flags)} "
        f"opcode={_opcode_name(opcode)} correlation_id={cid}",
    ]
    message, problem = decode_frame_body(data)
    if problem is None:
        if isinstance(message, ErrorBody):
            lines.append(f"   ERROR {_code_name(message.code)}: {message.message}")
            if message.details:
                lines.append(f"   details {_fields_text(message.details)}")
        else:
            lines.append("   " + _fields_text(message))
    else:
        lines.append(f"   (body does not decode: {problem})")
    return "\n".join(lines)


def _code_name(code: int) -> str:
    try:
        return ErrorCode(code).name
    except ValueError:
        return f"CODE_{code}"


# --- the connection: one blocking socket through the sans-IO codec ---------------------


class Wire:
    """One connection to a server, one request at a time.

    `trace(direction, data)` sees every frame sent and received, as bytes;
    `on_stray(frame)` sees answers nobody waits for any more (their request
    was cancelled with Ctrl-C or timed out).
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        tls: ssl.SSLContext | None,
        trace: Callable[[str, bytes], None],
        on_stray: Callable[[Frame], None],
    ) -> None:
        self.host = host
        self.port = port
        self.tls = tls
        self.trace = trace
        self.on_stray = on_stray
        self.sock: socket.socket | None = None
        self.decoder = FrameDecoder(RESPONSE_FRAME_BYTES_MAX)
        self._next_cid = 1
        # RECEIVEs given up (Ctrl-C, timeout) by correlation id: their queue, so
        # what the server still sends them can be released (§1.5).
        self.abandoned_receives: dict[int, str] = {}
        # Requests the shell made on its own (those releases): answers not shown.
        self.own_requests: set[int] = set()

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def is_open(self) -> bool:
        return self.sock is not None

    def open(self) -> None:
        try:
            sock = socket.create_connection((self.host, self.port), timeout=CONNECT_TIMEOUT_S)
        except OSError as exc:
            raise ShellError(
                CONNECTION_FAILED, f"cannot connect to {self.address}: {exc.strerror or exc}"
            ) from None
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.tls is not None:
                sock = self.tls.wrap_socket(sock, server_hostname=self.host)
        except OSError as exc:
            sock.close()
            raise ShellError(
                CONNECTION_FAILED, f"TLS handshake with {self.address} failed: {exc}"
            ) from None
        except BaseException:
            sock.close()
            raise
        self.sock = sock
        self.decoder = FrameDecoder(RESPONSE_FRAME_BYTES_MAX)

    def close(self) -> None:
        sock, self.sock = self.sock, None
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass

    def take_cid(self) -> int:
        cid = self._next_cid
        self._next_cid = cid % 0xFFFFFFFF + 1  # 1 .. 2**32-1; 0 is the connection's own
        return cid

    def _socket(self) -> socket.socket:
        if self.sock is None:
            raise ShellError(CONNECTION_CLOSED, "not connected")
        return self.sock

    def send(self, data: bytes) -> None:
        sock = self._socket()
        try:
            sock.settimeout(REQUEST_TIMEOUT_S)
            sock.sendall(data)
        except OSError as exc:
            self.close()
            raise ShellError(CONNECTION_CLOSED, f"connection lost while sending: {exc}") from None
        except BaseException:
            # Part of a frame may be on the wire: the stream cannot be trusted any more.
            self.close()
            raise
        self.trace("sent", data)

    def read_frame(self, deadline: float) -> Frame:
        """The next whole frame; WireTimeout at `deadline`, ServerClosed on EOF."""
        while True:
            try:
                frame = self.decoder.next_frame()
            except ServerError as exc:
                self.close()
                raise ShellError(BAD_RESPONSE, f"the server broke framing: {exc.message}") from None
            if frame is not None:
                self.trace("received", frame_bytes(frame))
                return frame
            sock = self._socket()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise WireTimeout(0)
            sock.settimeout(remaining)
            try:
                data = sock.recv(RECV_CHUNK_BYTES)
            except TimeoutError:
                raise WireTimeout(0) from None
            except OSError as exc:
                self.close()
                raise ServerClosed(str(exc)) from None
            if not data:
                self.close()
                raise ServerClosed()
            self.decoder.feed(data)

    def peer_gone(self) -> bool:
        """Without blocking: has the server closed this connection (say, idle timeout)?

        Whatever arrived meanwhile is decoded and handed to `on_stray`.
        """
        sock = self.sock
        if sock is None:
            return True
        gone = False
        try:
            while True:
                pending = isinstance(sock, ssl.SSLSocket) and sock.pending()
                if not pending and not select.select([sock], [], [], 0)[0]:
                    break
                sock.settimeout(0)
                data = sock.recv(RECV_CHUNK_BYTES)
                if not data:
                    gone = True
                    break
                self.decoder.feed(data)
        except (BlockingIOError, ssl.SSLWantReadError, TimeoutError):
            pass
        except OSError:
            gone = True
        try:
            while (frame := self.decoder.next_frame()) is not None:
                self.trace("received", frame_bytes(frame))
                self.on_stray(frame)
        except ServerError:
            gone = True
        if gone:
            self.close()
        return gone

    def request(self, message: Any, timeout_s: float = REQUEST_TIMEOUT_S) -> Any:
        """Send one request; return its decoded answer or raise the server's error."""
        cid = self.take_cid()
        self.send(codec.encode_request(cid, message))
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                try:
                    frame = self.read_frame(deadline)
                except WireTimeout:
                    raise WireTimeout(timeout_s) from None
                if frame.correlation_id == cid and not frame.flags & FLAG_PUSH:
                    break  # (a push frame's id is a subscription's, protocol.md §4.18)
                if frame.correlation_id == 0 and frame.flags & FLAG_ERROR:
                    break  # an error about the connection itself (protocol.md §2)
                self.on_stray(frame)
        except BaseException:
            if isinstance(message, ReceiveRequest) and self.sock is not None:
                self.abandoned_receives[cid] = message.queue
            raise
        try:
            answer = codec.decode_response(frame)
        except ServerError as exc:
            raise ShellError(BAD_RESPONSE, f"cannot decode the answer: {exc.message}") from None
        if isinstance(answer, ErrorBody):
            error = codec.error_from_body(answer)
            if frame.correlation_id == 0 or error.code.fatal:
                self.close()  # the server closes after a fatal error (protocol.md §2.1)
            raise error
        if frame.opcode != message.OPCODE:
            raise ShellError(
                BAD_RESPONSE,
                f"asked {message.OPCODE.name}, answered {_opcode_name(frame.opcode)}",
            )
        return answer


# --- results -----------------------------------------------------------------------


@dataclass
class Answer:
    """What one command produced: `data` for --json, `text` for people.

    An answer with `error` set (a code name and a message) is a failed command,
    possibly with data (a batch ack that partly failed, a `frame` that got an
    error back).
    """

    data: dict[str, Any] | None = None
    text: str | None = None
    error: tuple[str, str] | None = None
    details: dict[str, Any] = field(default_factory=dict)


def _error_answer(exc: BaseException) -> Answer:
    if isinstance(exc, ServerError):
        return Answer(error=(exc.code.name, exc.message), details=dict(exc.details))
    if isinstance(exc, ShellError):
        return Answer(error=(exc.code, exc.message))
    return Answer(error=("CLIENT_ERROR", str(exc)))


# --- the command table ----------------------------------------------------------------


@dataclass(frozen=True)
class Param:
    """A positional argument. `kind` picks its conversion and its tab completion:
    queue, count, seconds, body, receipt, hex, onoff, command, text, line."""

    name: str
    kind: str
    optional: bool = False
    many: bool = False


@dataclass(frozen=True)
class Option:
    """A key=value argument. `kind`: seconds (to ms), count, text, bool."""

    key: str
    kind: str
    help: str
    metavar: str = ""


@dataclass(frozen=True)
class Command:
    name: str
    summary: str
    run: Callable[[Shell, Call], Answer]
    params: tuple[Param, ...] = ()
    options: tuple[Option, ...] = ()
    # Other key=value arguments: "attributes" (any key, a native value) or
    # "attr." (string message attributes under that prefix).
    extra: str = ""
    # The Opcode member this command speaks; the row is left out while the
    # Opcode enum has no such member (e.g. REDRIVE before it exists).
    op: str | None = None
    # Safe to repeat under `watch`: it changes nothing on the server.
    read_only: bool = False
    # Further Opcode members this command speaks (subscribe: GRANT, UNSUBSCRIBE, DELIVER).
    also_ops: tuple[str, ...] = ()
    details: str = ""
    aliases: tuple[str, ...] = ()

    @property
    def usage(self) -> str:
        parts = [self.name]
        for p in self.params:
            word = f"{p.name} ..." if p.many else p.name
            parts.append(f"[{word}]" if p.optional else word)
        if self.extra == "attributes":
            parts.append("[key=value ...]")
        elif self.extra:
            parts.append(f"[{self.extra}K=V ...]")
        parts += [f"[{o.key}={o.metavar or 'S'}]" for o in self.options]
        return " ".join(parts)


@dataclass
class Call:
    """One parsed command line: converted positionals by name, options by key."""

    command: Command
    args: dict[str, Any]
    options: dict[str, Any]
    extra: dict[str, Any]


_OPTION_CONVERTERS: dict[str, Callable[[str, str], Any]] = {
    "seconds": lambda text, what: parse_seconds_ms(text, what),
    "count": lambda text, what: parse_count(text, what),
    "text": lambda text, what: text,
    "bool": lambda text, what: parse_onoff(text),
}


def _convert_param(param: Param, text: str) -> Any:
    kind = param.kind
    if kind == "count":
        return parse_count(text, param.name)
    if kind == "seconds":
        return parse_seconds_ms(text, param.name)
    if kind == "body":
        return parse_body(text)
    if kind == "onoff":
        return parse_onoff(text)
    if kind == "command":
        if text not in COMMANDS:
            raise ShellError(USAGE, f"no command {text!r}; `help` lists them")
        return text
    return text  # queue, receipt, text, hex (joined by the handler), line


def parse_call(tokens: list[str]) -> Call:
    """Match tokens against the command table: positionals in order, then key=value."""
    if not tokens:
        raise ShellError(USAGE, "empty command")
    name = tokens[0]
    command = COMMANDS.get(name)
    if command is None:
        raise ShellError(USAGE, f"unknown command {name!r}; `help` lists the commands")
    options_by_key = {o.key: o for o in command.options}
    positional: list[str] = []
    options: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    words = tokens[1:]
    rest_is_line = bool(command.params) and command.params[-1].kind == "line"
    for i, word in enumerate(words):
        if rest_is_line and len(positional) == len(command.params) - 1:
            positional.append(" ".join(shlex.quote(w) for w in words[i:]))
            break
        key, eq, value = word.partition("=")
        if eq and key in options_by_key:
            option = options_by_key[key]
            options[key] = _OPTION_CONVERTERS[option.kind](value, key)
        elif eq and key and command.extra == "attributes":
            # Dotted keys build maps: redrive_policy.max_receive_count=5.
            target = extra
            *parents, leaf = key.split(".")
            for parent in parents:
                nested = target.setdefault(parent, {})
                if not isinstance(nested, dict):
                    raise ShellError(USAGE, f"{parent} is both a value and a map")
                target = nested
            target[leaf] = parse_value(value)
        elif (
            eq and command.extra and key.startswith(command.extra) and len(key) > len(command.extra)
        ):
            extra[key[len(command.extra) :]] = value
        else:
            positional.append(word)
    args: dict[str, Any] = {}
    for index, param in enumerate(command.params):
        if param.many:
            values = positional[index:]
            positional = positional[:index]
            if not values and not param.optional:
                raise ShellError(USAGE, f"missing {param.name}; usage: {command.usage}")
            args[param.name] = [_convert_param(param, v) for v in values]
            break
        if index < len(positional):
            args[param.name] = _convert_param(param, positional[index])
        elif not param.optional:
            raise ShellError(USAGE, f"missing {param.name}; usage: {command.usage}")
    taken = sum(1 for p in command.params if not p.many)
    if len(positional) > taken and not any(p.many for p in command.params):
        unexpected = " ".join(positional[taken:])
        raise ShellError(USAGE, f"unexpected {unexpected!r}; usage: {command.usage}")
    return Call(command, args, options, extra)


# --- command handlers ---------------------------------------------------------------


def _queue_info(info: QueueInfo, verb: str = "") -> Answer:
    text = "\n".join(
        [
            f"{verb}queue {info.name}",
            "attributes:",
            _kv_table(info.attributes),
            "stats:",
            _kv_table(info.stats),
        ]
    )
    return Answer(data={"queue": jsonable(info)}, text=text)


def _messages_answer(messages: list[DeliveredMessage], *, receipts: bool, empty: str) -> Answer:
    data = {"messages": [dict(jsonable(m), index=i) for i, m in enumerate(messages, 1)]}
    if not messages:
        return Answer(data=data, text=empty)
    mark = "$" if receipts else "#"  # $n stands for a receipt in ack, nack and vis
    headers = [mark, "id"] + (["receipt"] if receipts else []) + ["count", "sent", "body"]
    rows = []
    for i, m in enumerate(messages, 1):
        body = show_body(m.body)
        extras = dict(m.attributes)
        for name in ("group_id", "dedup_id", "source_queue", "original_id"):
            if getattr(m, name):
                extras[name] = getattr(m, name)
        if extras:
            body += "  {" + ", ".join(f"{k}={v}" for k, v in extras.items()) + "}"
        row = [f"{mark}{i}", m.id] + ([m.receipt] if receipts else [])
        rows.append([*row, str(m.receive_count), _clock_ms(m.sent_at_ms), body])
    return Answer(data=data, text=render_table(headers, rows))


def _cmd_ping(sh: Shell, call: Call) -> Answer:
    payload = call.args.get("PAYLOAD", b"")
    answer = sh.request(PingRequest(payload))
    text = "PONG"
    if answer.payload:
        text += f" {show_body(answer.payload)}"
    text += f"  server time {_clock_ms(answer.server_time_ms)}"
    return Answer(data=jsonable(answer), text=text)


def _cmd_queues(sh: Shell, call: Call) -> Answer:
    prefix = call.args.get("PREFIX", "")
    answer = sh.request(ListQueuesRequest(prefix))
    if not prefix:
        sh.queue_names = list(answer.names)
    else:
        sh.remember_queues(answer.names)
    text = "\n".join(answer.names) if answer.names else "(no queues)"
    return Answer(data={"queues": list(answer.names)}, text=text)


def _cmd_create(sh: Shell, call: Call) -> Answer:
    name = call.args["NAME"]
    exist_ok = bool(call.options.get("exist_ok", False))
    answer = sh.request(CreateQueueRequest(name, call.extra, exist_ok))
    sh.remember_queues([name])
    # With exist_ok the answer does not say which it was (protocol.md §4.1).
    return _queue_info(answer.queue, "created or found " if exist_ok else "created ")


def _cmd_drop(sh: Shell, call: Call) -> Answer:
    name = call.args["NAME"]
    sh.request(DeleteQueueRequest(name))
    if sh.queue_names is not None and name in sh.queue_names:
        sh.queue_names.remove(name)
    return Answer(data={"dropped": name}, text=f"dropped queue {name}")


def _cmd_info(sh: Shell, call: Call) -> Answer:
    return _queue_info(sh.request(GetQueueRequest(call.args["NAME"])).queue)


def _cmd_set(sh: Shell, call: Call) -> Answer:
    if not call.extra:
        raise ShellError(USAGE, f"nothing to set; usage: {call.command.usage}")
    answer = sh.request(SetQueueAttributesRequest(call.args["NAME"], call.extra))
    return _queue_info(answer.queue, "updated ")


def _cmd_rebalance(sh: Shell, call: Call) -> Answer:
    dry_run = bool(call.options.get("dry_run", False))
    answer = sh.request(RebalanceRequest(dry_run=dry_run))
    rows = [[m.queue, str(m.partition), m.source, m.target, m.status] for m in answer.moves]
    text = (
        render_table(["queue", "partition", "from", "to", "status"], rows)
        if rows
        else "nothing to move: every partition is where the ring puts it"
    )
    return Answer(data=jsonable(answer), text=text)


def _cmd_decommission(sh: Shell, call: Call) -> Answer:
    answer = sh.request(DecommissionRequest(node_id=call.args["NODE"]))
    rows = [[m.queue, str(m.partition), m.target or "-", m.status] for m in answer.moves]
    text = (
        render_table(["queue", "partition", "new replica", "status"], rows)
        if rows
        else f"{call.args['NODE']} held no partitions"
    )
    return Answer(data=jsonable(answer), text=text)


def _cmd_purge(sh: Shell, call: Call) -> Answer:
    name = call.args["NAME"]
    purged = sh.request(PurgeQueueRequest(name)).purged
    return Answer(data={"purged": purged}, text=f"purged {purged} messages from {name}")


def _cmd_send(sh: Shell, call: Call) -> Answer:
    # Without delay= the queue's delay applies; delay=0 asks for none (DELAY_NONE).
    delay_ms = call.options.get("delay")
    entry = SendEntry(
        body=call.args["BODY"],
        attributes=dict(call.extra),
        delay_ms=0 if delay_ms is None else delay_ms or DELAY_NONE,
        group_id=call.options.get("group", ""),
        dedup_id=call.options.get("dedup", ""),
        priority=call.options.get("priority", 0),
    )
    ids = sh.request(SendRequest(call.args["NAME"], [entry])).message_ids
    return Answer(data={"message_ids": list(ids)}, text="sent " + " ".join(ids))


def _cmd_recv(sh: Shell, call: Call) -> Answer:
    wait_ms = call.options.get("wait", 0)
    request = ReceiveRequest(
        call.args["NAME"],
        max_messages=call.args.get("N", 1),
        wait_ms=wait_ms,
        visibility_timeout_ms=call.options.get("vis", VISIBILITY_DEFAULT),
    )
    messages = sh.request(request, REQUEST_TIMEOUT_S + wait_ms / 1000).messages
    sh.last_received = list(messages)
    return _messages_answer(messages, receipts=True, empty="(no messages)")


def _batch_failures(answer: Any, receipts: list[str], done: str, verb: str) -> Answer:
    failures = list(answer.failures)
    ok = len(receipts) - len(failures)
    data = {done: ok, "failures": [jsonable(f) for f in failures]}
    text = f"{verb} {ok} of {len(receipts)}" if failures else f"{verb} {ok}"
    if not failures:
        return Answer(data=data, text=text)
    lines = [text] + [
        f"  {receipts[f.index] if f.index < len(receipts) else f.index}: "
        f"{_code_name(f.code)}: {f.message}"
        for f in failures
    ]
    first = failures[0]
    return Answer(
        data=data,
        text="\n".join(lines),
        error=(
            _code_name(first.code),
            f"{len(failures)} of {len(receipts)} failed: {first.message}",
        ),
    )


def _cmd_ack(sh: Shell, call: Call) -> Answer:
    receipts = [sh.receipt(r) for r in call.args["RECEIPT"]]
    answer = sh.request(DeleteRequest(call.args["NAME"], receipts))
    return _batch_failures(answer, receipts, "acked", "acked")


def _change_visibility(sh: Shell, name: str, receipt: str, timeout_ms: int, verb: str) -> Answer:
    receipt = sh.receipt(receipt)
    answer = sh.request(ChangeVisibilityRequest(name, [VisibilityChange(receipt, timeout_ms)]))
    result = _batch_failures(answer, [receipt], "changed", verb)
    if result.error is None:
        result.text = f"{verb} 1 (visible again in {timeout_ms / 1000:g} s)"
    return result


def _cmd_nack(sh: Shell, call: Call) -> Answer:
    delay_ms = call.options.get("delay", 0)
    return _change_visibility(sh, call.args["NAME"], call.args["RECEIPT"], delay_ms, "released")


def _cmd_vis(sh: Shell, call: Call) -> Answer:
    timeout_ms = call.args["SECONDS"]
    return _change_visibility(sh, call.args["NAME"], call.args["RECEIPT"], timeout_ms, "changed")


def _cmd_peek(sh: Shell, call: Call) -> Answer:
    request = PeekRequest(call.args["NAME"], call.args.get("N", 1), call.options.get("after", ""))
    messages = sh.request(request).messages
    return _messages_answer(messages, receipts=False, empty="(no messages)")


def _cmd_stats(sh: Shell, call: Call) -> Answer:
    stats = sh.request(StatsRequest()).stats
    return Answer(data={"stats": jsonable(stats)}, text=_kv_table(stats, ""))


def _cmd_redrive(sh: Shell, call: Call) -> Answer:
    """`redrive NAME [to=QUEUE] [max=N] [rate=N]`."""
    options = dict(call.extra)
    unknown = set(options) - {"to", "max", "rate"}
    if unknown:
        raise ShellError(USAGE, f"redrive takes to=QUEUE max=N rate=N, not {sorted(unknown)}")
    request = RedriveRequest(
        queue=call.args["NAME"],
        to=str(options.get("to", "")),
        max_messages=parse_count(str(options.get("max", 0)), "max"),
        # `rate=5/s` as the help writes it, or `rate=5`.
        rate_per_s=parse_count(str(options.get("rate", 0)).removesuffix("/s"), "rate"),
    )
    answer = sh.request(request)
    lines = [f"moved {answer.moved} messages from {request.queue}"]
    lines += [f"  problem: {problem}" for problem in answer.problems]
    return Answer(data=jsonable(answer), text="\n".join(lines))


def _cmd_hello(sh: Shell, call: Call) -> Answer:
    sh.connection()
    if sh.hello is None:
        raise ShellError(USAGE, "this connection skipped HELLO (`reconnect` sends it)")
    return _hello_answer(sh.hello, sh.address)


def _hello_answer(hello: HelloResponse, address: str) -> Answer:
    text = "\n".join(
        [
            f"connected to {address}: node {hello.node_id}, roles {', '.join(hello.roles) or '-'}, "
            f"protocol v{hello.version}, server {hello.server_version}",
            "limits:",
            _kv_table(hello.limits),
        ]
    )
    return Answer(data=dict(jsonable(hello), address=address), text=text)


def _cmd_reconnect(sh: Shell, call: Call) -> Answer:
    sh.disconnect()
    if not call.options.get("hello", True):
        sh.connect(hello=False)
        return Answer(
            data={"address": sh.address, "hello": False},
            text=f"connected to {sh.address} without HELLO",
        )
    sh.connect()
    assert sh.hello is not None
    return _hello_answer(sh.hello, sh.address)


def _cmd_raw(sh: Shell, call: Call) -> Answer:
    sh.raw = call.args["on|off"]
    return Answer(data={"raw": sh.raw}, text=f"raw {'on' if sh.raw else 'off'}")


def _cmd_time(sh: Shell, call: Call) -> Answer:
    sh.timing = call.args["on|off"]
    return Answer(data={"time": sh.timing}, text=f"time {'on' if sh.timing else 'off'}")


def _cmd_frame(sh: Shell, call: Call) -> Answer:
    data = parse_hex(" ".join(call.args["HEX"]))
    if not data:
        raise ShellError(USAGE, "no bytes to send")
    head = _parse_head(data)
    expected_cid = head[4] if head is not None else None
    wire = sh.connection()
    # Text output shows both frames whatever `raw` says; --json has them in the answer.
    with contextlib.nullcontext() if sh.json_mode else sh.tracing():
        wire.send(data)
        answer_bytes: bytes | None = None
        closed = False
        deadline = time.monotonic() + FRAME_ANSWER_WAIT_S
        try:
            while answer_bytes is None:
                frame = wire.read_frame(deadline)
                if expected_cid is None or frame.correlation_id in (expected_cid, 0):
                    answer_bytes = frame_bytes(frame)
                else:
                    sh.on_stray(frame)
            message, _ = decode_frame_body(answer_bytes)
            if isinstance(message, ErrorBody) and (
                message.code in _FATAL_CODES or frame.correlation_id == 0
            ):
                # A fatal error: the server closes next (protocol.md §2.1); show it.
                try:
                    while True:
                        sh.on_stray(wire.read_frame(time.monotonic() + FATAL_CLOSE_WAIT_S))
                except WireTimeout:
                    pass
        except ServerClosed:
            closed = True
        except WireTimeout:
            pass
    data_out: dict[str, Any] = {"sent": data.hex(), "closed": closed}
    notes: list[str] = []
    error = None
    if answer_bytes is None:
        data_out["answer"] = None
        if not closed:
            notes.append(
                f"no answer within {FRAME_ANSWER_WAIT_S:g} s (if the frame is incomplete the "
                "server is waiting for the rest: send more with `frame`, or `reconnect`)"
            )
    else:
        data_out["answer"] = frame_json("received", answer_bytes)
        message, _ = decode_frame_body(answer_bytes)
        if isinstance(message, ErrorBody):
            error = (_code_name(message.code), message.message)
    if closed:
        notes.append("connection closed by server")
    return Answer(data=data_out, text="\n".join(notes) or None, error=error)


_FATAL_CODES = frozenset(int(code) for code in ErrorCode if code.fatal)


def _cmd_tail(sh: Shell, call: Call) -> Answer:
    name = call.args["NAME"]
    start = call.options.get("from", "end")
    if start not in ("start", "end"):
        raise ShellError(USAGE, f"from= takes start or end, got {start!r}")
    page = TAIL_PAGE_MESSAGES_MAX
    # The last id seen in each partition: PEEK's cursor form (protocol.md §4.13), so a
    # message stored in one partition while we read another is not skipped.
    seen: dict[int, str] = {}

    def peek() -> list[DeliveredMessage]:
        after = "".join(f"{message_id}," for message_id in seen.values())
        found = sh.request(PeekRequest(name, page, after)).messages
        for m in found:
            parsed = parse_message_id(m.id)
            if parsed is not None:
                seen[parsed[1]] = m.id
        return found

    if start == "end":
        # Skip what is already there: page to the newest message.
        while len(peek()) == page:
            pass
    sh.note(f"tailing {name} (Ctrl-C to stop)")
    try:
        while True:
            messages = peek()
            for m in messages:
                line = f"{_clock_ms(m.sent_at_ms)}  {m.id}  {show_body(m.body, None)}"
                if m.attributes:
                    line += "  {" + ", ".join(f"{k}={v}" for k, v in m.attributes.items()) + "}"
                sh.emit(Answer(data=dict(jsonable(m), queue=name), text=line))
            if len(messages) < page:
                time.sleep(TAIL_POLL_S)
    except KeyboardInterrupt:
        return Answer()


def _cmd_subscribe(sh: Shell, call: Call) -> Answer:
    """SUBSCRIBE, print each pushed message, GRANT as they are printed; UNSUBSCRIBE at the end."""
    name = call.args["NAME"]
    credits = call.args.get("N", SUBSCRIBE_CREDITS_DEFAULT)
    most = call.options.get("max")
    if credits < 1 or (most is not None and most < 1):
        raise ShellError(USAGE, "N and max= must be at least 1")
    if most is not None:
        credits = min(credits, most)
    wire = sh.connection()
    sid = SHELL_SUBSCRIPTION_ID
    visibility = call.options.get("vis", VISIBILITY_DEFAULT)
    answer = wire.request(SubscribeRequest(sid, name, credits, visibility))
    sh.note(
        f"subscribed to {name}: {credits} credits, lease "
        f"{answer.visibility_timeout_ms / 1000:g} s (Ctrl-C to stop)"
    )
    pushed: list[DeliveredMessage] = []
    grants: set[int] = set()  # GRANT requests not answered yet
    state = {"outstanding": credits, "ended": None}

    def on_frame(frame: Frame) -> bool:
        """Handle a frame for this subscription; False if it is none of ours."""
        if frame.flags & FLAG_PUSH and frame.correlation_id == sid:
            body = decode_push(frame)
            if isinstance(body, ErrorBody):
                state["ended"] = codec.error_from_body(body)
                return True
            assert isinstance(body, DeliverPush)
            for m in body.messages:
                pushed.append(m)
                line = f"${len(pushed)}  {m.id}  {show_body(m.body, None)}"
                if m.attributes:
                    line += "  {" + ", ".join(f"{k}={v}" for k, v in m.attributes.items()) + "}"
                sh.emit(Answer(data=dict(jsonable(m), queue=name, index=len(pushed)), text=line))
            state["outstanding"] -= len(body.messages)
            want = credits - state["outstanding"]
            if most is not None:
                want = min(want, most - len(pushed) - state["outstanding"])
            if want > 0 and state["ended"] is None:
                cid = wire.take_cid()
                wire.send(codec.encode_request(cid, GrantRequest(sid, want)))
                grants.add(cid)
                state["outstanding"] += want
            return True
        if frame.correlation_id in grants and not frame.flags & FLAG_PUSH:
            grants.discard(frame.correlation_id)
            return True
        return False

    sh.push_handler = on_frame
    try:
        try:
            while state["ended"] is None and (most is None or len(pushed) < most):
                try:
                    frame = wire.read_frame(time.monotonic() + TAIL_POLL_S)
                except WireTimeout:
                    continue
                if not on_frame(frame):
                    sh.on_stray(frame)
        except KeyboardInterrupt:
            pass
        if state["ended"] is None and wire.is_open:
            # Pushes that come before the answer are printed too (they are ours).
            wire.request(UnsubscribeRequest(sid))
    finally:
        sh.push_handler = None
        sh.last_received = list(pushed)
    ended = state["ended"]
    text = f"{len(pushed)} pushed (in flight: ack $1 … ${len(pushed)})" if pushed else "none pushed"
    answer = Answer(data={"subscribed": name, "pushed": len(pushed)}, text=text)
    if ended is not None:
        answer.error = (ended.code.name, f"the subscription ended: {ended.message}")
    return answer


def _cmd_watch(sh: Shell, call: Call) -> Answer:
    line = call.args["COMMAND"]
    inner = parse_call(shlex.split(line))
    if not inner.command.read_only:
        readable = ", ".join(c.name for c in _unique_commands() if c.read_only)
        raise ShellError(USAGE, f"watch repeats read-only commands ({readable})")
    redraw = sh.out.isatty() and not sh.json_mode
    try:
        while True:
            started = time.monotonic()
            if redraw:
                sh.out.write("\x1b[H\x1b[2J")
                sh.out.write(
                    f"every {WATCH_INTERVAL_S:g}s: {line}    {time.strftime('%H:%M:%S')}"
                    "    (Ctrl-C to stop)\n\n"
                )
            try:
                answer = inner.command.run(sh, inner)
            except (MqdError, OSError) as exc:
                answer = _error_answer(exc)
            sh.emit(answer)
            time.sleep(max(0.0, WATCH_INTERVAL_S - (time.monotonic() - started)))
    except KeyboardInterrupt:
        return Answer()


def _cmd_help(sh: Shell, call: Call) -> Answer:
    name = call.args.get("COMMAND")
    if name is None:
        commands = _unique_commands()
        rows = [[c.usage, c.summary] for c in commands]
        return Answer(
            data={
                "commands": [
                    {"name": c.name, "usage": c.usage, "summary": c.summary} for c in commands
                ]
            },
            text=render_table(None, rows)
            + "\n\ntimes are in seconds; `help CMD` for more; Ctrl-C cancels, Ctrl-D or quit exits",
        )
    c = COMMANDS[name]
    lines = [f"usage: {c.usage}", f"  {c.summary}"]
    if c.details:
        lines += [f"  {line}" for line in c.details.splitlines()]
    if c.options:
        lines.append("options:")
        lines.append(
            render_table(None, [[f"{o.key}={o.metavar or 'S'}", o.help] for o in c.options], "  ")
        )
    if c.aliases:
        lines.append(f"also: {', '.join(c.aliases)}")
    data = {
        "name": c.name,
        "usage": c.usage,
        "summary": c.summary,
        "details": c.details,
        "options": {o.key: o.help for o in c.options},
    }
    return Answer(data=data, text="\n".join(lines))


def _cmd_quit(sh: Shell, call: Call) -> Answer:
    raise _Quit


_NAME = Param("NAME", "queue")
_RECEIPT_DETAILS = "RECEIPT may be $1, $2 … for the messages of the last recv."

# fmt: off
_ROWS: tuple[Command, ...] = (
    Command("ping", "round trip to the server (PING)", _cmd_ping,
            (Param("PAYLOAD", "body", optional=True),), op="PING", read_only=True),
    Command("queues", "list queues (LIST_QUEUES); refreshes tab completion", _cmd_queues,
            (Param("PREFIX", "text", optional=True),), op="LIST_QUEUES", read_only=True),
    Command("create", "create a queue (CREATE_QUEUE)", _cmd_create, (_NAME,),
            (Option("exist_ok", "bool", "no error if it exists with the same attributes", "true"),),
            extra="attributes", op="CREATE_QUEUE",
            details="attributes: visibility_timeout=30 retention=345600 max_message_bytes=N "
            "delay=0 (seconds), dedup_window=300 content_based_dedup=false partitions=1 "
            "replication_factor=3 min_insync=2,\n"
            "redrive_policy='{\"dead_letter_queue\": \"dlq\", \"max_receive_count\": 5}' "
            "(JSON, quoted)\nvalues: ints, floats, true/false, JSON maps, else strings; "
            "a name ending in .fifo makes a FIFO queue"),
    Command("drop", "delete a queue and its messages (DELETE_QUEUE)", _cmd_drop, (_NAME,),
            op="DELETE_QUEUE"),
    Command("info", "a queue's attributes and stats (GET_QUEUE)", _cmd_info, (_NAME,),
            op="GET_QUEUE", read_only=True),
    Command("set", "change queue attributes (SET_QUEUE_ATTRIBUTES)", _cmd_set, (_NAME,),
            extra="attributes", op="SET_QUEUE_ATTRIBUTES",
            details="e.g. set q visibility_timeout=60 delay=0.5"),
    Command("purge", "delete every message of a queue (PURGE_QUEUE)", _cmd_purge, (_NAME,),
            op="PURGE_QUEUE"),
    Command("send", "send one message (SEND)", _cmd_send, (_NAME, Param("BODY", "body")),
            (Option("delay", "seconds", "seconds before it becomes visible (default: the queue's delay; 0: none)"),
             Option("group", "text", "FIFO group id", "G"),
             Option("dedup", "text", "deduplication id", "D"),
             Option("priority", "count", "priority 0-9 (standard queues)", "P")),
            extra="attr.", op="SEND",
            details="BODY: a word, a \"quoted string\", @file, hex:0a0b…, or text:… (literal)\n"
            "attr.K=V adds the string attribute K"),
    Command("recv", "receive messages (RECEIVE); they become $1, $2 …", _cmd_recv,
            (_NAME, Param("N", "count", optional=True)),
            (Option("wait", "seconds", "long-poll up to this many seconds"),
             Option("vis", "seconds", "visibility timeout (default: the queue's)")),
            op="RECEIVE", aliases=("receive",)),
    Command("ack", "delete received messages (DELETE)", _cmd_ack,
            (_NAME, Param("RECEIPT", "receipt", many=True)), op="DELETE",
            details=_RECEIPT_DETAILS),
    Command("nack", "release a received message (CHANGE_VISIBILITY to delay)", _cmd_nack,
            (_NAME, Param("RECEIPT", "receipt")),
            (Option("delay", "seconds", "seconds until it is visible again (default 0)"),),
            op="CHANGE_VISIBILITY", details=_RECEIPT_DETAILS),
    Command("vis", "change a message's visibility timeout (CHANGE_VISIBILITY)", _cmd_vis,
            (_NAME, Param("RECEIPT", "receipt"), Param("SECONDS", "seconds")),
            op="CHANGE_VISIBILITY", details=_RECEIPT_DETAILS),
    Command("peek", "look at messages without receiving them (PEEK)", _cmd_peek,
            (_NAME, Param("N", "count", optional=True)),
            (Option("after", "text", "start after this message id", "ID"),),
            op="PEEK", read_only=True),
    Command("redrive", "move dead-lettered messages back to their source [to=Q max=N rate=N/s] (REDRIVE)",
            _cmd_redrive, (_NAME,), extra="attributes", op="REDRIVE"),
    Command("stats", "server statistics (STATS)", _cmd_stats, op="STATS", read_only=True),
    Command("rebalance", "move partitions to match the ring over live backends (REBALANCE)",
            _cmd_rebalance, (),
            (Option("dry_run", "bool", "only print the plan", "true"),),
            op="REBALANCE"),
    Command("decommission", "retire a backend: its replicas move elsewhere (DECOMMISSION)",
            _cmd_decommission, (Param("NODE", "text"),), op="DECOMMISSION"),
    Command("hello", "show the server's HELLO answer for this connection", _cmd_hello,
            read_only=True),
    Command("reconnect", "close the connection and connect again (HELLO)", _cmd_reconnect,
            options=(Option("hello", "bool", "false: connect without sending HELLO", "false"),)),
    Command("raw", "show every frame sent and received, as hex and decoded", _cmd_raw,
            (Param("on|off", "onoff"),)),
    Command("time", "show the round-trip time of each command", _cmd_time,
            (Param("on|off", "onoff"),)),
    Command("frame", "send bytes exactly as given and show what comes back", _cmd_frame,
            (Param("HEX", "hex", many=True),),
            details="e.g. frame 00000009 01 00 0020 00000001 ff\n"
            "spaces are ignored; a closed connection is reopened by the next command"),
    Command("tail", "print new messages as they arrive (PEEK after_id), until Ctrl-C",
            _cmd_tail, (_NAME,),
            (Option("from", "text", "end (default: only new messages) or start", "end|start"),)),
    Command("subscribe", "print messages as the server pushes them (SUBSCRIBE), until Ctrl-C",
            _cmd_subscribe, (_NAME, Param("N", "count", optional=True)),
            (Option("vis", "seconds", "visibility timeout of each pushed message"),
             Option("max", "count", "stop after this many messages", "N")),
            op="SUBSCRIBE", also_ops=("GRANT", "UNSUBSCRIBE", "DELIVER"),
            details="grants N credits (default 10) and more as messages are printed;\n"
            "the pushed messages are in flight: they become $1, $2 … for ack, nack, vis"),
    Command("watch", "re-run a read-only command every second, until Ctrl-C", _cmd_watch,
            (Param("COMMAND", "line"),), details="e.g. watch info q"),
    Command("help", "list the commands, or explain one", _cmd_help,
            (Param("COMMAND", "command", optional=True),)),
    Command("quit", "leave the shell (or Ctrl-D)", _cmd_quit, aliases=("exit",)),
)
# fmt: on


def _build_table(rows: Iterable[Command]) -> dict[str, Command]:
    table: dict[str, Command] = {}
    for row in rows:
        for param in row.params[:-1]:
            assert not param.many and param.kind != "line", f"{row.name}: only the last may"
        if row.op is not None and row.op not in Opcode.__members__:
            continue  # that op does not exist yet (protocol.md §4)
        for name in (row.name, *row.aliases):
            assert name not in table, f"duplicate command {name}"
            table[name] = row
    return table


COMMANDS: dict[str, Command] = _build_table(_ROWS)


def _unique_commands() -> list[Command]:
    seen: dict[str, Command] = {}
    for command in COMMANDS.values():
        seen.setdefault(command.name, command)
    return list(seen.values())


# --- the shell ----------------------------------------------------------------------


class Shell:
    """State of one session: the connection, display modes and what the last recv saw."""

    def __init__(
        self,
        address: str,
        *,
        tls: ssl.SSLContext | None = None,
        token: str = "",
        json_mode: bool = False,
        interactive: bool = False,
        keep_going: bool = False,
        out: TextIO | None = None,
        err: TextIO | None = None,
    ) -> None:
        host, port = parse_address(address)
        self.tls = tls
        self.token = token
        self.json_mode = json_mode
        self.interactive = interactive
        self.keep_going = keep_going
        # Any command failed: the exit status is 1, even if a later `quit` ends the run.
        self.failed = False
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.raw = False
        self.timing = False
        self.wire = Wire(host, port, tls=tls, trace=self._trace, on_stray=self.on_stray)
        self.address = self.wire.address
        self.hello: HelloResponse | None = None
        self.queue_names: list[str] | None = None
        self.last_received: list[DeliveredMessage] = []
        # While `subscribe` runs: takes the frames of its subscription (True if it did).
        self.push_handler: Callable[[Frame], bool] | None = None
        self._force_trace = 0
        self._quiet = 0
        self._frames: list[dict[str, Any]] = []

    # --- connection ---

    def connect(self, *, hello: bool = True) -> HelloResponse | None:
        self.wire.close()
        self.hello = None
        self.wire.open()
        if not hello:
            return None
        request = HelloRequest(PROTOCOL_VERSION_MIN, PROTOCOL_VERSION_MAX, CLIENT_NAME, self.token)
        try:
            self.hello = self.wire.request(request, CONNECT_TIMEOUT_S)
        except ServerClosed as exc:
            self.wire.close()
            if self.tls is None:
                # A TLS-only server closes a plaintext connection without a word.
                raise ServerClosed(
                    "before answering HELLO; if it requires TLS, pass --tls (or --ca FILE)"
                ) from exc
            raise
        except BaseException:
            self.wire.close()
            raise
        return self.hello

    def disconnect(self) -> None:
        self.wire.close()
        self.hello = None

    def connection(self) -> Wire:
        """The open connection; reconnects (with HELLO) if the server closed it."""
        if self.wire.is_open and not self.wire.peer_gone():
            return self.wire
        was_open = self.hello is not None
        self.connect()
        if was_open:
            self.note(f"reconnected to {self.address}")
        return self.wire

    def request(self, message: Any, timeout_s: float = REQUEST_TIMEOUT_S) -> Any:
        return self.connection().request(message, timeout_s)

    # --- shell state helpers ---

    def receipt(self, text: str) -> str:
        """`$n` is the receipt of the n-th message of the last recv."""
        if not text.startswith("$") or not text[1:].isdigit():
            return text
        n = int(text[1:])
        if not 1 <= n <= len(self.last_received):
            raise ShellError(
                USAGE, f"no {text}: the last recv returned {len(self.last_received)} messages"
            )
        return self.last_received[n - 1].receipt

    def remember_queues(self, names: Iterable[str]) -> None:
        known = self.queue_names if self.queue_names is not None else []
        self.queue_names = sorted(set(known) | set(names))

    # --- tracing and output ---

    @contextlib.contextmanager
    def tracing(self) -> Iterator[None]:
        """Show frames for the duration, whatever `raw` says (used by `frame`)."""
        self._force_trace += 1
        try:
            yield
        finally:
            self._force_trace -= 1

    def _trace(self, direction: str, data: bytes) -> None:
        if self._quiet or not (self.raw or self._force_trace):
            return
        if self.json_mode:
            self._frames.append(frame_json(direction, data))
        else:
            print(frame_text(direction, data), file=self.out, flush=True)

    def on_stray(self, frame: Frame) -> None:
        if self.push_handler is not None and self.push_handler(frame):
            return
        if frame.flags & FLAG_PUSH:
            message, _ = decode_frame_body(frame_bytes(frame))
            count = len(message.messages) if isinstance(message, DeliverPush) else 0
            self.note(
                f"a push for subscription {frame.correlation_id} that ended here "
                f"({count} messages now in flight until their lease runs out)"
            )
            return
        what = f"correlation id {frame.correlation_id}, {_opcode_name(frame.opcode)}"
        message, _ = decode_frame_body(frame_bytes(frame))
        queue = self.wire.abandoned_receives.pop(frame.correlation_id, None)
        if frame.correlation_id in self.wire.own_requests:
            self.wire.own_requests.discard(frame.correlation_id)
            if isinstance(message, ErrorBody) or getattr(message, "failures", None):
                self.note(f"releasing the messages of an abandoned receive failed: {message}")
            return
        if isinstance(message, ErrorBody):
            what += f": {_code_name(message.code)} {message.message}"
        elif frame.opcode == Opcode.RECEIVE and getattr(message, "messages", None):
            ids = ", ".join(m.id for m in message.messages)
            if queue is not None and self._release(queue, message.messages):
                # As the client library does: a poll given up with Ctrl-C must not
                # hide what it was sent for a whole lease (protocol.md §1.5).
                what += f": {len(message.messages)} messages, released at once: {ids}"
            else:
                what += f": {len(message.messages)} messages now in flight: {ids}"
        self.note(f"answer to an abandoned request ({what})")

    def _release(self, queue: str, delivered: list[Any]) -> bool:
        """Make `delivered` visible again, without waiting for the answer."""
        cid = self.wire.take_cid()
        changes = [VisibilityChange(m.receipt, 0) for m in delivered]
        try:
            self.wire.send(codec.encode_request(cid, ChangeVisibilityRequest(queue, changes)))
        except ShellError:
            return False
        self.wire.own_requests.add(cid)
        return True

    def note(self, text: str) -> None:
        """A remark for a person: stderr, and never in the way of --json output."""
        print(text, file=self.out if self.interactive else self.err, flush=True)

    def emit(self, answer: Answer, rtt_ms: float | None = None) -> None:
        if self.json_mode:
            frames, self._frames = self._frames, []
            if answer.data is None and answer.error is None and not frames:
                return
            obj: dict[str, Any] = {}
            if answer.error is not None:
                obj["error"], obj["message"] = answer.error
                if answer.details:
                    obj["details"] = jsonable(answer.details)
            obj.update(answer.data or {})
            if frames:
                obj["frames"] = frames
            if rtt_ms is not None:
                obj["rtt_ms"] = round(rtt_ms, 3)
            line = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), default=str)
            print(line, file=self.out, flush=True)
            return
        if answer.error is not None:
            code, message = answer.error
            stream = self.out if self.interactive else self.err
            text = f"ERROR {code}: {message}"
            if answer.details:
                text += f"\n  details: {_value_text(answer.details)}"
            print(text, file=stream, flush=True)
        if answer.text:
            print(answer.text, file=self.out, flush=True)
        if rtt_ms is not None:
            print(f"({rtt_ms:.3f} ms)", file=self.out, flush=True)

    # --- running commands ---

    def run_command(self, text: str) -> bool:
        """Run one command and show its answer; False if it failed. `quit` raises _Quit."""
        started = time.perf_counter()
        try:
            call = parse_call(shlex.split(text))
            answer = call.command.run(self, call)
        except _Quit:
            raise
        except ValueError as exc:  # shlex: "No closing quotation"
            answer = Answer(error=(USAGE, str(exc)))
        except MqdError as exc:
            answer = _error_answer(exc)
        except OSError as exc:
            self.wire.close()
            answer = Answer(error=(CONNECTION_CLOSED, f"{type(exc).__name__}: {exc}"))
        except Exception as exc:
            # A bug in the shell: report it like any error rather than end the session.
            answer = Answer(error=("SHELL_BUG", f"{type(exc).__name__}: {exc}"))
        except KeyboardInterrupt:
            if not self.interactive:
                raise
            self._frames.clear()
            # The terminal has echoed ^C already.
            print(" cancelled", file=self.out, flush=True)
            return False
        rtt_ms = (time.perf_counter() - started) * 1000 if self.timing else None
        self.emit(answer, rtt_ms)
        return answer.error is None

    def run_line(self, line: str) -> bool:
        """Run every `;`-separated command of a line; stop at the first failure
        unless keep_going. Returns False if any failed."""
        try:
            commands = split_commands(line)
        except ShellError as exc:
            self.emit(_error_answer(exc))
            self.failed = True
            return False
        ok = True
        for command in commands:
            if not self.run_command(command):
                ok = False
                self.failed = True
                if not self.keep_going and not self.interactive:
                    break
        return ok

    def run_script(self, lines: Iterable[str]) -> int:
        try:
            for line in lines:
                if not self.run_line(line) and not self.keep_going:
                    break
        except _Quit:
            pass
        finally:
            self.wire.close()
        return EXIT_ERROR if self.failed else EXIT_OK

    # --- interactive ---

    def completions(self, before: str, text: str) -> list[str]:
        """Candidates for the word `text`, given the line before it (the same table as the parser)."""
        segment = before.rsplit(";", 1)[-1]
        words = segment.split()
        while words and words[0] == "watch":
            words = words[1:]
        if not words:
            return sorted(n for n in COMMANDS if n.startswith(text))
        command = COMMANDS.get(words[0])
        if command is None:
            return []
        positional = [w for w in words[1:] if "=" not in w]
        index = len(positional)
        candidates: list[str] = []
        params = command.params
        param = None
        if index < len(params):
            param = params[index]
        elif params and params[-1].many:
            param = params[-1]
        if param is not None:
            candidates += self._candidates(param.kind)
        candidates += [f"{o.key}=" for o in command.options]
        if command.extra == "attributes" and command.name in ("create", "set"):
            # (It offered 4 of them; the server's own lists now, protocol.md §5.2.)
            names = CREATE_ATTRIBUTES if command.name == "create" else CHANGEABLE_ATTRIBUTES
            candidates += [f"{a}=" for a in names]
        elif command.extra == "attr.":
            candidates.append("attr.")
        return sorted({c for c in candidates if c.startswith(text)})

    def _candidates(self, kind: str) -> list[str]:
        if kind == "queue":
            if self.queue_names is None:
                self._refresh_queue_names()
            return list(self.queue_names or [])
        if kind == "onoff":
            return ["on", "off"]
        if kind in ("command", "line"):
            return list(COMMANDS)
        if kind == "receipt":
            return [f"${i}" for i in range(1, len(self.last_received) + 1)]
        return []

    def _refresh_queue_names(self) -> None:
        """LIST_QUEUES for completion, quietly (no raw dump in the middle of the prompt)."""
        self._quiet += 1
        try:
            self.queue_names = list(self.request(ListQueuesRequest("")).names)
        except (MqdError, OSError):
            pass
        finally:
            self._quiet -= 1

    def interact(self, history_path: Path | None) -> int:
        # Ctrl-C must cancel a command even if whatever started us ignored SIGINT
        # (a background job of a non-interactive sh does; Python then leaves it ignored).
        signal.signal(signal.SIGINT, signal.default_int_handler)
        readline = _setup_readline(self, history_path)
        try:
            self.emit(_hello_answer(*self._first_connect()))
        except (MqdError, OSError) as exc:
            self.emit(_error_answer(exc))
        except KeyboardInterrupt:
            print("^C", file=self.out)
        if not self.json_mode:
            print("type help for the commands, quit or Ctrl-D to leave", file=self.out)
        try:
            while True:
                try:
                    line = input(self.prompt())
                except EOFError:
                    print(file=self.out)
                    break
                except KeyboardInterrupt:
                    print(file=self.out)
                    continue
                try:
                    self.run_line(line)
                except KeyboardInterrupt:  # between commands, or while printing
                    print(" cancelled", file=self.out, flush=True)
                finally:
                    _save_history(readline, history_path)
        except _Quit:
            pass
        finally:
            _save_history(readline, history_path)
            self.wire.close()
        return EXIT_OK

    def _first_connect(self) -> tuple[HelloResponse, str]:
        hello = self.connect()
        assert hello is not None
        return hello, self.address

    def prompt(self) -> str:
        state = "" if self.wire.is_open else " (disconnected)"
        return f"mqd {self.address}{state}> "


def _setup_readline(shell: Shell, history_path: Path | None) -> Any:
    try:
        import readline
    except ImportError:  # pragma: no cover - a Python built without readline
        return None
    if "libedit" in (readline.__doc__ or ""):
        readline.parse_and_bind("bind ^I rl_complete")  # pragma: no cover - macOS
    else:
        readline.parse_and_bind("tab: complete")
    readline.set_completer_delims(" \t;")
    matches: list[str] = []

    def complete(text: str, state: int) -> str | None:
        nonlocal matches
        if state == 0:
            try:
                before = readline.get_line_buffer()[: readline.get_begidx()]
                # CPython's readline appends nothing to a completion: add the space
                # here, except after `key=` and `attr.`, which want a value next.
                matches = [
                    m if m.endswith(("=", ".")) else m + " "
                    for m in shell.completions(before, text)
                ]
            except Exception:  # a completer that raises is silently disabled by readline
                matches = []
        return matches[state] if state < len(matches) else None

    readline.set_completer(complete)
    readline.set_history_length(HISTORY_LINES_MAX)
    if history_path is not None:
        try:
            readline.read_history_file(history_path)
        except OSError:
            pass
    return readline


def _save_history(readline: Any, history_path: Path | None) -> None:
    if readline is None or history_path is None:
        return
    try:
        readline.write_history_file(history_path)
    except OSError:
        pass


def history_path() -> Path:
    """~/.mqd_history, honouring $HOME."""
    home = os.environ.get("HOME")
    return (Path(home) if home else Path.home()) / HISTORY_FILE_NAME


def _tls_context(args: argparse.Namespace) -> ssl.SSLContext | None:
    if not (args.tls or args.ca or args.cert):
        return None
    try:
        context = ssl.create_default_context(cafile=args.ca)
        if args.cert:
            context.load_cert_chain(args.cert, args.key)
    except (OSError, ssl.SSLError) as exc:
        raise ShellError(USAGE, f"TLS setup: {exc}") from None
    return context


# --- command-line entry ---------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `mqd shell` (the lead's cli.py calls this)."""
    parser.add_argument(
        "address",
        nargs="?",
        default=DEFAULT_ADDRESS,
        metavar="HOST:PORT",
        help=f"server address (default {DEFAULT_ADDRESS})",
    )
    parser.add_argument("--tls", action="store_true", help="connect with TLS")
    parser.add_argument(
        "--ca", metavar="FILE", help="CA bundle to verify the server (implies --tls)"
    )
    parser.add_argument("--cert", metavar="FILE", help="client certificate (implies --tls)")
    parser.add_argument("--key", metavar="FILE", help="private key of --cert")
    parser.add_argument("--token", metavar="TOKEN", default="", help="token sent in HELLO")
    parser.add_argument("--json", action="store_true", help="one JSON object per answer")
    parser.add_argument(
        "-c",
        dest="commands",
        metavar='"CMD; CMD"',
        action="append",
        help="run these commands and exit (repeatable); no prompt, no banner",
    )
    parser.add_argument(
        "--keep-going",
        action="store_true",
        help="in scripts, carry on after a failed command (the exit status is still 1)",
    )


def main(args: argparse.Namespace) -> int:
    """Run `mqd shell`; returns the exit status (0, 1 after a failed command, 130 on Ctrl-C)."""
    interactive = not args.commands and sys.stdin.isatty()
    try:
        shell = Shell(
            args.address,
            tls=_tls_context(args),
            token=args.token or "",
            json_mode=args.json,
            interactive=interactive,
            keep_going=args.keep_going,
        )
    except ShellError as exc:
        print(f"ERROR {exc.code}: {exc.message}", file=sys.stderr)
        return EXIT_ERROR
    try:
        if interactive:
            return shell.interact(history_path())
        lines: Iterable[str] = args.commands if args.commands else sys.stdin
        return shell.run_script(lines)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return EXIT_ERROR


def _standalone(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mqd shell", description="mqd protocol shell")
    add_arguments(parser)
    return main(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(_standalone())
