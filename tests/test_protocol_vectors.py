"""protocol.md is the contract: its test vectors and error table must match the code.

Every ```vector block in protocol.md is checked both ways (the codec encodes
`value` to exactly `hex`, and decodes `hex` back to `value`), and the table of
§2 must list exactly `mqd.errors.ErrorCode`.

Run this file as a script to render a new vector block for protocol.md:

    .venv/bin/python tests/test_protocol_vectors.py 'PingRequest(payload=b"hi")' [correlation_id]
    .venv/bin/python tests/test_protocol_vectors.py 'ErrorBody(code=14, message="x")' 7 SEND

The annotated hex comes from a second, deliberately naive encoder below
(`_reference_lines`), which the renderer checks against the codec byte for
byte, so the vectors in the document are vouched for by two implementations.
"""

from __future__ import annotations

import re
import struct
import sys
from pathlib import Path
from typing import Any

import pytest

from mqd.errors import ErrorCode
from mqd.protocol import (
    FLAG_ERROR,
    FLAG_RESPONSE,
    FrameDecoder,
    decode_request,
    decode_response,
    encode_error,
    encode_request,
    encode_response,
    messages,
)

PROTOCOL_MD = Path(__file__).resolve().parent.parent / "protocol.md"
_KEY_LINE = re.compile(r"^([a-z_]+):(.*)$")


# --- parsing protocol.md -----------------------------------------------------------


def parse_vectors(text: str) -> list[dict[str, str]]:
    """Each ```vector block as {key: text}; a key's text runs on over indented lines."""
    vectors = []
    for block in re.findall(r"^```vector\n(.*?)^```", text, re.S | re.M):
        fields: dict[str, str] = {}
        key = None
        for line in block.splitlines():
            match = _KEY_LINE.match(line)
            if match:
                key = match.group(1)
                fields[key] = match.group(2).strip()
            elif line.strip():
                assert key is not None, f"continuation line before any key: {line!r}"
                fields[key] += "\n" + line.strip()
        vectors.append(fields)
    return vectors


def vector_bytes(hex_text: str) -> bytes:
    """The bytes of a `hex:` field: hex digits in groups; `#` starts a comment."""
    digits = "".join(line.split("#", 1)[0] for line in hex_text.splitlines())
    return bytes.fromhex("".join(digits.split()))


def vector_value(expression: str) -> Any:
    scope = {name: getattr(messages, name) for name in dir(messages) if not name.startswith("_")}
    return eval(expression, {"__builtins__": {}}, scope)


def parse_error_table(text: str) -> list[tuple[int, str, bool]]:
    lines = text.splitlines()
    start = lines.index("| code | name | fatal | meaning |")
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        rows.append((int(cells[0]), cells[1].strip("`"), {"yes": True, "no": False}[cells[2]]))
    return rows


def _protocol_text() -> str:
    return PROTOCOL_MD.read_text(encoding="utf-8")


def _vectors() -> list[dict[str, str]]:
    return parse_vectors(_protocol_text())


# --- encoding a vector ---------------------------------------------------------------------


def encode_vector(value: Any, correlation_id: int, opcode: int | None) -> bytes:
    if isinstance(value, messages.ErrorBody):
        assert opcode is not None, "an error vector names its `opcode:`"
        return encode_error(correlation_id, opcode, value.code, value.message, value.details)
    if type(value).__name__.endswith("Request"):
        return encode_request(correlation_id, value)
    return encode_response(correlation_id, value)


def _opcode_field(text: str | None) -> int | None:
    if text is None:
        return None
    text = text.split("#", 1)[0].strip()
    return messages.Opcode[text] if text in messages.Opcode.__members__ else int(text, 0)


# --- the tests ------------------------------------------------------------------------------


def test_protocol_md_has_vectors_for_every_op_both_ways() -> None:
    vectors = _vectors()
    classes = {type(vector_value(v["value"])) for v in vectors}
    for request_cls, response_cls in messages.OPS.values():
        assert request_cls in classes, f"no vector for {request_cls.__name__}"
        assert response_cls in classes, f"no vector for {response_cls.__name__}"
    assert messages.ErrorBody in classes, "no error frame vector"
    names = [v["name"] for v in vectors]
    assert len(names) == len(set(names)), "vector names must be unique"


@pytest.mark.parametrize("vector", _vectors(), ids=lambda v: v["name"])
def test_vector_encodes_to_its_hex(vector: dict[str, str]) -> None:
    value = vector_value(vector["value"])
    expected = vector_bytes(vector["hex"])
    got = encode_vector(value, int(vector["correlation_id"]), _opcode_field(vector.get("opcode")))
    assert got.hex() == expected.hex()


@pytest.mark.parametrize("vector", _vectors(), ids=lambda v: v["name"])
def test_vector_hex_decodes_to_its_value(vector: dict[str, str]) -> None:
    value = vector_value(vector["value"])
    decoder = FrameDecoder(16 * 1024 * 1024)
    decoder.feed(vector_bytes(vector["hex"]))
    frame = decoder.next_frame()
    assert frame is not None and decoder.next_frame() is None and decoder.buffered_bytes == 0
    assert frame.correlation_id == int(vector["correlation_id"])
    if isinstance(value, messages.ErrorBody):
        assert frame.flags == FLAG_RESPONSE | FLAG_ERROR
        assert frame.opcode == _opcode_field(vector["opcode"])
        assert decode_response(frame) == value
    elif type(value).__name__.endswith("Request"):
        assert frame.flags == 0 and frame.opcode == value.OPCODE
        assert decode_request(frame) == value
    else:
        assert frame.flags == FLAG_RESPONSE and frame.opcode == value.OPCODE
        assert decode_response(frame) == value


@pytest.mark.parametrize("vector", _vectors(), ids=lambda v: v["name"])
def test_vector_annotations_match_a_second_encoder(vector: dict[str, str]) -> None:
    # The naive reference encoder below agrees with the document too.
    value = vector_value(vector["value"])
    cid = int(vector["correlation_id"])
    lines = _reference_frame_lines(value, cid, _opcode_field(vector.get("opcode")))
    assert b"".join(b"".join(chunks) for chunks, _ in lines) == vector_bytes(vector["hex"])


def test_error_table_matches_error_code() -> None:
    rows = parse_error_table(_protocol_text())
    assert rows == [(code.value, code.name, code.fatal) for code in ErrorCode]


def test_parse_vectors_reads_continuations_and_comments() -> None:
    text = (
        "```vector\nname: x\ncorrelation_id: 1\nvalue: PingRequest(\n"
        '  payload=b"hi")\nhex:\n  0000000e 01 00 0002  # header\n'
        "  00000001 # more\n  00000002 6869\n```\n"
    )
    [vector] = parse_vectors(text)
    assert vector_value(vector["value"]) == messages.PingRequest(payload=b"hi")
    assert vector_bytes(vector["hex"]) == bytes.fromhex("0000000e010000020000000100000002" + "6869")


# --- a second, naive encoder that also explains each byte (for rendering vectors) -----------------

_INT_FORMATS = {"U8": ">B", "U16": ">H", "U32": ">I", "U64": ">Q", "I64": ">q"}
_TAG_NAMES = ["null", "bool", "int", "float", "str", "map", "list", "bytes"]
Line = tuple[list[bytes], str]


def _short(value: Any, limit: int = 48) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _str_chunks(text: str) -> list[bytes]:
    data = text.encode("utf-8")
    return [struct.pack(">H", len(data)), data]


def _reference_value(key_chunks: list[bytes], label: str, v: Any, indent: str) -> list[Line]:
    if v is None:
        return [([*key_chunks, b"\x00"], f"{label}: null")]
    if isinstance(v, bool):
        return [([*key_chunks, b"\x01", bytes([v])], f"{label}: bool {v}")]
    if isinstance(v, int):
        return [([*key_chunks, b"\x02", struct.pack(">q", v)], f"{label}: int {v}")]
    if isinstance(v, float):
        return [([*key_chunks, b"\x03", struct.pack(">d", v)], f"{label}: float {v!r}")]
    if isinstance(v, str):
        return [([*key_chunks, b"\x04", *_str_chunks(v)], f"{label}: str {_short(v)}")]
    if isinstance(v, bytes):
        return [
            ([*key_chunks, b"\x07", struct.pack(">I", len(v)), v], f"{label}: bytes {_short(v)}")
        ]
    if isinstance(v, dict):
        lines = [
            (
                [*key_chunks, b"\x05", struct.pack(">I", len(v))],
                f"{label}: map, {_count(len(v), 'pair')}",
            )
        ]
        for k, item in v.items():
            lines += _reference_value(_str_chunks(k), f"{indent}  {k!r}", item, indent + "  ")
        return lines
    if isinstance(v, list):
        lines = [
            (
                [*key_chunks, b"\x06", struct.pack(">I", len(v))],
                f"{label}: list, {_count(len(v), 'item')}",
            )
        ]
        for i, item in enumerate(v):
            lines += _reference_value([], f"{indent}  [{i}]", item, indent + "  ")
        return lines
    raise TypeError(type(v))


def _reference_lines(cls: type, obj: Any, indent: str = "") -> list[Line]:
    lines: list[Line] = []
    for name, kind in cls.FIELDS:
        v = getattr(obj, name)
        label = f"{indent}{name}"
        if kind in _INT_FORMATS:
            shown = f"0x{v:x}" if kind == "U32" and v == 0xFFFFFFFF else str(v)
            lines.append(([struct.pack(_INT_FORMATS[kind], v)], f"{label}: {kind} {shown}"))
        elif kind == "BOOL":
            lines.append(([bytes([v])], f"{label}: BOOL {v}"))
        elif kind == "STR":
            lines.append((_str_chunks(v), f"{label}: STR {_short(v)}"))
        elif kind == "BLOB":
            lines.append(([struct.pack(">I", len(v)), v], f"{label}: BLOB {_short(v)}"))
        elif kind == "STR_LIST":
            lines.append(
                ([struct.pack(">I", len(v))], f"{label}: STR_LIST, {_count(len(v), 'item')}")
            )
            for i, s in enumerate(v):
                lines.append((_str_chunks(s), f"{indent}  [{i}] {_short(s)}"))
        elif kind == "STR_MAP":
            lines.append(
                ([struct.pack(">I", len(v))], f"{label}: STR_MAP, {_count(len(v), 'pair')}")
            )
            for k, s in v.items():
                lines.append(([*_str_chunks(k), *_str_chunks(s)], f"{indent}  {k!r}: {s!r}"))
        elif kind == "VALUE_MAP":
            lines.append(
                ([struct.pack(">I", len(v))], f"{label}: VALUE_MAP, {_count(len(v), 'pair')}")
            )
            for k, item in v.items():
                lines += _reference_value(_str_chunks(k), f"{indent}  {k!r}", item, indent + "  ")
        elif isinstance(kind, tuple):
            item_cls = kind[1]
            lines.append(
                (
                    [struct.pack(">I", len(v))],
                    f"{label}: LIST of {item_cls.__name__}, count {len(v)}",
                )
            )
            for i, item in enumerate(v):
                lines.append(([], f"{indent}  [{i}] {item_cls.__name__}"))
                lines += _reference_lines(item_cls, item, indent + "    ")
        else:
            lines.append(([], f"{label}: {kind.__name__}"))
            lines += _reference_lines(kind, v, indent + "  ")
    return lines


def _reference_frame_lines(value: Any, correlation_id: int, opcode: int | None) -> list[Line]:
    body_lines = _reference_lines(type(value), value)
    length = 8 + sum(len(chunk) for chunks, _ in body_lines for chunk in chunks)
    if isinstance(value, messages.ErrorBody):
        assert opcode is not None
        flags, kind = FLAG_RESPONSE | FLAG_ERROR, "RESPONSE|ERROR"
    elif type(value).__name__.endswith("Request"):
        opcode, flags, kind = value.OPCODE, 0, "request"
    else:
        opcode, flags, kind = value.OPCODE, FLAG_RESPONSE, "RESPONSE"
    op_name = messages.Opcode(opcode).name if opcode in messages.Opcode._value2member_map_ else "?"
    header = (
        [
            struct.pack(">I", length),
            struct.pack(">B", 1),
            struct.pack(">B", flags),
            struct.pack(">H", opcode),
            struct.pack(">I", correlation_id),
        ],
        f"length {length}, version 1, flags {flags:#04x} {kind}, "
        f"opcode {opcode:#06x} {op_name}, correlation id {correlation_id}",
    )
    return [header, *body_lines]


def render_vector(
    name: str, expression: str, correlation_id: int, opcode_name: str | None = None
) -> str:
    value = vector_value(expression)
    opcode = _opcode_field(opcode_name)
    lines = _reference_frame_lines(value, correlation_id, opcode)
    wire = encode_vector(value, correlation_id, opcode)
    assert b"".join(b"".join(c) for c, _ in lines) == wire, "reference encoder disagrees"
    out = ["```vector", f"name: {name}"]
    if opcode_name is not None:
        out.append(f"opcode: {opcode_name}")
    out.append(f"correlation_id: {correlation_id}")
    out.append(f"value: {expression}")
    out.append("hex:")
    out += hex_rows(lines)
    out.append("```")
    return "\n".join(out)


def hex_rows(lines, width: int = 60) -> list[str]:  # type: ignore[no-untyped-def]
    """Annotated vector lines: each (chunks, comment) as hex rows of at most `width`."""
    out: list[str] = []
    for chunks, comment in lines:
        tokens: list[str] = []
        for chunk in chunks:
            if not chunk:
                continue
            hexed = chunk.hex()
            tokens += [hexed[i : i + 48] for i in range(0, len(hexed), 48)]
        rows: list[str] = []
        for token in tokens:
            if rows and len(rows[-1]) + 1 + len(token) <= width:
                rows[-1] += " " + token
            else:
                rows.append(token)
        if not rows:
            out.append(f"  {'':<{width}}  # {comment}")
            continue
        out.append(f"  {rows[0]:<{width}}  # {comment}")
        out += [f"  {row}" for row in rows[1:]]
    return out


if __name__ == "__main__":
    args = sys.argv[1:]
    print(
        render_vector(
            "NAME",
            args[0],
            int(args[1]) if len(args) > 1 else 1,
            args[2] if len(args) > 2 else None,
        )
    )
