"""Body codec of protocol v1 (protocol.md §3 "Types") and whole-frame helpers.

Every message class in `mqd.protocol.messages` lists its wire fields in
`FIELDS`. The first time a class is encoded or decoded, this module compiles
that list into a pair of specialised Python functions (generated source, run
through `exec` once per class) in which runs of fixed-size fields, together
with the length prefix of the variable field after them, are packed or
unpacked by a single precompiled `struct.Struct`. Nothing interprets FIELDS
per call. `tools/bench_codec.py` measures the result on the SEND and RECEIVE
hot paths.

Errors:
- encoding a value the wire cannot carry (an int out of range, a string over
  65535 UTF-8 bytes, a value of the wrong type, maps or lists nested too deep)
  raises `InvalidArgument` naming the field: that is client misuse;
- decoding bytes that break the rules of §3 (truncation, trailing bytes, bad
  UTF-8, a BOOL other than 0/1, an unknown VALUE tag, a count larger than the
  bytes left could hold, a duplicate map key, nesting deeper than
  `VALUE_DEPTH_MAX`) raises `ProtocolError` (MALFORMED_FRAME).

No I/O here (STYLE.md): this module is pure.
"""

from __future__ import annotations

import dataclasses
import struct
from typing import Any

from mqd.errors import (
    InvalidArgument,
    ProtocolError,
    ServerError,
    UnknownOpcode,
    UnsupportedVersion,
)
from mqd.protocol.frame import (
    FLAG_ERROR,
    FLAG_RESPONSE,
    FLAGS_KNOWN,
    HEADER_BYTES,
    PROTOCOL_VERSION,
    PROTOCOL_VERSION_MAX,
    PROTOCOL_VERSION_MIN,
    Frame,
)
from mqd.protocol.messages import OPS, ErrorBody

# --- wire type names (the strings used in messages.FIELDS) ----------------------

U8 = "U8"
U16 = "U16"
U32 = "U32"
U64 = "U64"
I64 = "I64"
BOOL = "BOOL"
STR = "STR"
BLOB = "BLOB"
STR_LIST = "STR_LIST"
STR_MAP = "STR_MAP"
VALUE_MAP = "VALUE_MAP"


def utf8_len(s: str) -> int:
    """Bytes of `s` in UTF-8, without encoding it when it is ASCII (the protocol's sizes
    count attribute names and values, names and ids in UTF-8 bytes)."""
    return len(s) if s.isascii() else len(s.encode("utf-8"))


def ListOf(item: type) -> tuple[str, type]:
    """A u32 count followed by that many `item` structs: `("LIST", item)` in FIELDS."""
    return ("LIST", item)


def StructOf(cls: type) -> type:
    """A nested struct inline: the bare class in FIELDS."""
    return cls


# Maps and lists inside VALUE_MAP fields nest at most this deep, counting the
# field's own VALUE_MAP as level 1 (protocol.md §3).
VALUE_DEPTH_MAX = 8

STR_BYTES_MAX = 0xFFFF

# VALUE tags (protocol.md §3).
TAG_NULL = 0
TAG_BOOL = 1
TAG_INT = 2
TAG_FLOAT = 3
TAG_STR = 4
TAG_MAP = 5
TAG_LIST = 6
TAG_BYTES = 7

_INT_FORMATS = {U8: "B", U16: "H", U32: "I", U64: "Q", I64: "q"}
_INT_RANGES = {
    U8: (0, 0xFF),
    U16: (0, 0xFFFF),
    U32: (0, 0xFFFFFFFF),
    U64: (0, 0xFFFFFFFFFFFFFFFF),
    I64: (-(1 << 63), (1 << 63) - 1),
}
# Fewest bytes one element can take on the wire, to reject a count that the
# bytes left cannot hold before allocating anything for it.
_MIN_BYTES = {U8: 1, U16: 2, U32: 4, U64: 8, I64: 8, BOOL: 1, STR: 2, BLOB: 4}
_MIN_BYTES.update({STR_LIST: 4, STR_MAP: 4, VALUE_MAP: 4})

_H = struct.Struct(">H")
_I = struct.Struct(">I")
_pack_H = _H.pack
_pack_I = _I.pack
_unpack_H = _H.unpack_from
_unpack_I = _I.unpack_from
_unpack_B = struct.Struct(">B").unpack_from
_unpack_q = struct.Struct(">q").unpack_from
_unpack_d = struct.Struct(">d").unpack_from
_pack_tag_q = struct.Struct(">Bq").pack
_pack_tag_d = struct.Struct(">Bd").pack
_pack_tag_H = struct.Struct(">BH").pack
_pack_tag_I = struct.Struct(">BI").pack
_NULL = b"\x00"
_TRUE = b"\x01\x01"
_FALSE = b"\x01\x00"

# Errors a generated encoder can hit on a bad value; all become InvalidArgument.
_ENCODE_ERRORS = (struct.error, TypeError, AttributeError, ValueError, OverflowError)
# Errors a generated decoder can hit on bad bytes; all become ProtocolError.
_DECODE_ERRORS = (struct.error, UnicodeDecodeError)


def _malformed(what: str) -> ProtocolError:
    return ProtocolError(f"malformed body: {what}")


def _truncated() -> ProtocolError:
    return ProtocolError("malformed body: truncated")


# --- VALUE, STR_LIST, STR_MAP, VALUE_MAP (shared helpers) -------------------------


def _enc_str_list(items: list[str], a: Any) -> None:
    for s in items:
        s = s.encode()
        a(_pack_H(len(s)))
        a(s)


def _enc_str_map(mapping: dict[str, str], a: Any) -> None:
    for k, v in mapping.items():
        k = k.encode()
        v = v.encode()
        a(_pack_H(len(k)))
        a(k)
        a(_pack_H(len(v)))
        a(v)


def _enc_value_map(mapping: dict[str, Any], a: Any, depth: int) -> None:
    # `depth` is the level of this map; its values' containers are one deeper.
    for k, v in mapping.items():
        k = k.encode()
        a(_pack_H(len(k)))
        a(k)
        _enc_value(v, a, depth)


def _enc_value(v: Any, a: Any, depth: int) -> None:
    t = type(v)
    if t is str:
        s = v.encode()
        a(_pack_tag_H(TAG_STR, len(s)))
        a(s)
    elif t is int:
        a(_pack_tag_q(TAG_INT, v))
    elif v is None:
        a(_NULL)
    elif t is bool:
        a(_TRUE if v else _FALSE)
    elif t is float:
        a(_pack_tag_d(TAG_FLOAT, v))
    elif t is dict:
        if depth >= VALUE_DEPTH_MAX:
            raise InvalidArgument(f"maps and lists nest deeper than {VALUE_DEPTH_MAX} levels")
        a(_pack_tag_I(TAG_MAP, len(v)))
        _enc_value_map(v, a, depth + 1)
    elif t is list or t is tuple:
        if depth >= VALUE_DEPTH_MAX:
            raise InvalidArgument(f"maps and lists nest deeper than {VALUE_DEPTH_MAX} levels")
        a(_pack_tag_I(TAG_LIST, len(v)))
        for item in v:
            _enc_value(item, a, depth + 1)
    elif t is bytes:
        a(_pack_tag_I(TAG_BYTES, len(v)))
        a(v)
    else:
        _enc_value(_coerce_value(v), a, depth)


def _coerce_value(v: Any) -> Any:
    """Map subclasses and other bytes-likes onto the exact types VALUE carries."""
    if isinstance(v, bool):
        return bool(v)
    if isinstance(v, int):  # IntEnum and friends
        return int(v)
    if isinstance(v, float):
        return float(v)
    if isinstance(v, str):  # StrEnum and friends
        return str(v)
    if isinstance(v, dict):
        return dict(v)
    if isinstance(v, (list, tuple)):
        return list(v)
    if isinstance(v, (bytearray, memoryview)):
        return bytes(v)
    raise InvalidArgument(f"a {type(v).__name__} cannot be sent as a VALUE")


def _dec_str_list(b: bytes, p: int, end: int, n: int) -> tuple[list[str], int]:
    if n * 2 > end - p:
        raise _malformed(f"STR_LIST count {n} exceeds the bytes left")
    out = []
    ap = out.append
    for _ in range(n):
        (ln,) = _unpack_H(b, p)
        p += 2
        e = p + ln
        if e > end:
            raise _truncated()
        ap(b[p:e].decode())
        p = e
    return out, p


def _dec_str_map(b: bytes, p: int, end: int, n: int) -> tuple[dict[str, str], int]:
    if n * 4 > end - p:
        raise _malformed(f"STR_MAP count {n} exceeds the bytes left")
    out = {}
    for _ in range(n):
        (ln,) = _unpack_H(b, p)
        p += 2
        e = p + ln
        if e > end:
            raise _truncated()
        k = b[p:e].decode()
        (ln,) = _unpack_H(b, e)
        p = e + 2
        e = p + ln
        if e > end:
            raise _truncated()
        out[k] = b[p:e].decode()
        p = e
    if len(out) != n:
        raise _malformed("duplicate key in STR_MAP")
    return out, p


def _dec_value_map(b: bytes, p: int, end: int, n: int, depth: int) -> tuple[dict[str, Any], int]:
    if n * 3 > end - p:
        raise _malformed(f"VALUE_MAP count {n} exceeds the bytes left")
    out = {}
    for _ in range(n):
        (ln,) = _unpack_H(b, p)
        p += 2
        e = p + ln
        if e > end:
            raise _truncated()
        k = b[p:e].decode()
        out[k], p = _dec_value(b, e, end, depth)
    if len(out) != n:
        raise _malformed("duplicate key in a map")
    return out, p


def _dec_value(b: bytes, p: int, end: int, depth: int) -> tuple[Any, int]:
    if p >= end:
        raise _truncated()
    tag = b[p]
    p += 1
    if tag == TAG_STR:
        (ln,) = _unpack_H(b, p)
        p += 2
        e = p + ln
        if e > end:
            raise _truncated()
        return b[p:e].decode(), e
    if tag == TAG_INT:
        return _unpack_q(b, p)[0], p + 8
    if tag == TAG_NULL:
        return None, p
    if tag == TAG_BOOL:
        (v,) = _unpack_B(b, p)
        if v > 1:
            raise _malformed(f"bool byte {v}")
        return v == 1, p + 1
    if tag == TAG_FLOAT:
        return _unpack_d(b, p)[0], p + 8
    if tag == TAG_MAP or tag == TAG_LIST:
        if depth >= VALUE_DEPTH_MAX:
            raise _malformed(f"maps and lists nest deeper than {VALUE_DEPTH_MAX} levels")
        (n,) = _unpack_I(b, p)
        p += 4
        if tag == TAG_MAP:
            return _dec_value_map(b, p, end, n, depth + 1)
        if n > end - p:
            raise _malformed(f"list count {n} exceeds the bytes left")
        out = []
        ap = out.append
        for _ in range(n):
            v, p = _dec_value(b, p, end, depth + 1)
            ap(v)
        return out, p
    if tag == TAG_BYTES:
        (n,) = _unpack_I(b, p)
        p += 4
        e = p + n
        if e > end:
            raise _truncated()
        return b[p:e], e
    raise _malformed(f"unknown VALUE tag {tag}")


# --- per-class compilation ----------------------------------------------------------


class _Compiled:
    """The generated encoder and decoder of one message class."""

    __slots__ = ("decode", "encode", "min_bytes", "source")

    def __init__(self, encode: Any, decode: Any, min_bytes: int, source: str) -> None:
        self.encode = encode  # encode(obj, append) -> None
        self.decode = decode  # decode(buf, pos, end) -> (obj, pos)
        self.min_bytes = min_bytes  # the fewest body bytes an instance takes
        self.source = source


_COMPILED: dict[type, _Compiled] = {}


def _compiled(cls: type) -> _Compiled:
    c = _COMPILED.get(cls)
    if c is None:
        c = _compile(cls)
    return c


def _check_fields(cls: type) -> list[tuple[str, Any]]:
    fields = getattr(cls, "FIELDS", None)
    if fields is None:
        raise TypeError(f"{cls.__name__} has no FIELDS")
    names = [name for name, _ in fields]
    if dataclasses.is_dataclass(cls):
        attrs = [f.name for f in dataclasses.fields(cls)]
        if attrs != names:
            raise TypeError(
                f"{cls.__name__}.FIELDS {names} differ from its dataclass fields {attrs}"
            )
    for name, kind in fields:
        if not isinstance(kind, type) and not (
            kind in _INT_FORMATS
            or kind in _MIN_BYTES
            or (isinstance(kind, tuple) and len(kind) == 2 and kind[0] == "LIST")
        ):
            raise TypeError(f"{cls.__name__}.{name}: unknown wire type {kind!r}")
    return list(fields)


def _compile(cls: type) -> _Compiled:
    """Generate, exec and cache the encoder and decoder of `cls` (and its children)."""
    fields = _check_fields(cls)
    ns: dict[str, Any] = {
        "_cls": cls,
        "_new": object.__new__,
        "_enc_str_list": _enc_str_list,
        "_enc_str_map": _enc_str_map,
        "_enc_value_map": _enc_value_map,
        "_dec_str_list": _dec_str_list,
        "_dec_str_map": _dec_str_map,
        "_dec_value_map": _dec_value_map,
        "_malformed": _malformed,
        "_truncated": _truncated,
    }
    structs: dict[str, str] = {}

    def struct_name(fmt: str, op: str) -> str:
        key = f"_{op}_{fmt.replace('?', 'Z')}"  # "?" (BOOL) is no identifier
        if key not in ns:
            s = struct.Struct(">" + fmt)
            ns[key] = s.pack if op == "pack" else s.unpack_from
            structs[key] = fmt
        return key

    # ---- encoder ----
    enc = ["def encode(o, a):"]
    pend_fmt: list[str] = []
    pend_expr: list[str] = []

    def enc_flush() -> None:
        if pend_fmt:
            fn = struct_name("".join(pend_fmt), "pack")
            enc.append(f"    a({fn}({', '.join(pend_expr)}))")
            pend_fmt.clear()
            pend_expr.clear()

    min_bytes = 0
    for i, (name, kind) in enumerate(fields):
        v = f"v{i}"
        if kind in _INT_FORMATS:
            pend_fmt.append(_INT_FORMATS[kind])
            pend_expr.append(f"o.{name}")
            min_bytes += _MIN_BYTES[kind]
        elif kind == BOOL:
            pend_fmt.append("?")
            pend_expr.append(f"o.{name}")
            min_bytes += 1
        elif kind == STR:
            enc.append(f"    {v} = o.{name}.encode()")
            pend_fmt.append("H")
            pend_expr.append(f"len({v})")
            enc_flush()
            enc.append(f"    a({v})")
            min_bytes += 2
        elif kind == BLOB:
            enc.append(f"    {v} = o.{name}")
            pend_fmt.append("I")
            pend_expr.append(f"len({v})")
            enc_flush()
            enc.append(f"    a({v})")
            min_bytes += 4
        elif kind in (STR_LIST, STR_MAP, VALUE_MAP) or isinstance(kind, tuple):
            enc.append(f"    {v} = o.{name}")
            pend_fmt.append("I")
            pend_expr.append(f"len({v})")
            enc_flush()
            if kind == STR_LIST:
                enc.append(f"    if {v}: _enc_str_list({v}, a)")
            elif kind == STR_MAP:
                enc.append(f"    if {v}: _enc_str_map({v}, a)")
            elif kind == VALUE_MAP:
                enc.append(f"    if {v}: _enc_value_map({v}, a, 1)")
            else:
                item = kind[1]
                if not isinstance(item, type):
                    raise TypeError(f"{cls.__name__}.{name}: LIST of {item!r} is not supported")
                sub = _compiled(item)
                if sub.min_bytes == 0:
                    raise TypeError(f"{cls.__name__}.{name}: LIST of an empty struct")
                ns[f"_enc_{i}"] = sub.encode
                enc.append(f"    for e in {v}: _enc_{i}(e, a)")
            min_bytes += 4
        else:  # a nested struct inline
            sub = _compiled(kind)
            ns[f"_enc_{i}"] = sub.encode
            enc_flush()
            enc.append(f"    _enc_{i}(o.{name}, a)")
            min_bytes += sub.min_bytes
    enc_flush()
    if len(enc) == 1:
        enc.append("    pass")

    # ---- decoder ----
    dec = ["def decode(b, p, end):"]
    pend_fmt = []
    pend_expr = []
    post: list[str] = []

    def dec_flush() -> None:
        if pend_fmt:
            fmt = "".join(pend_fmt)
            fn = struct_name(fmt, "unpack")
            targets = ", ".join(pend_expr)
            dec.append(f"    {targets}, = {fn}(b, p)")
            dec.append(f"    p += {struct.calcsize('>' + fmt)}")
            dec.extend(post)
            pend_fmt.clear()
            pend_expr.clear()
            post.clear()

    for i, (name, kind) in enumerate(fields):
        v = f"f{i}"
        if kind in _INT_FORMATS:
            pend_fmt.append(_INT_FORMATS[kind])
            pend_expr.append(v)
        elif kind == BOOL:
            pend_fmt.append("B")
            pend_expr.append(v)
            post.append(f"    if {v} > 1: raise _malformed('BOOL byte ' + str({v}))")
            post.append(f"    {v} = {v} == 1")
        elif kind in (STR, BLOB):
            pend_fmt.append("H" if kind == STR else "I")
            pend_expr.append("n")
            dec_flush()
            # Empty strings and blobs are common (group_id, dedup_id, …) and
            # skipping the slice for them saves about 30 ns each.
            dec.append("    if n:")
            dec.append("        e = p + n")
            dec.append("        if e > end: raise _truncated()")
            if kind == STR:
                dec.append(f"        {v} = b[p:e].decode()")
            else:
                dec.append(f"        {v} = b[p:e]")
            dec.append("        p = e")
            empty = '""' if kind == STR else 'b""'
            dec.append(f"    else: {v} = {empty}")
        elif kind in (STR_LIST, STR_MAP, VALUE_MAP) or isinstance(kind, tuple):
            pend_fmt.append("I")
            pend_expr.append("n")
            dec_flush()
            if kind == STR_LIST:
                dec.append(f"    {v}, p = _dec_str_list(b, p, end, n)")
            elif kind == STR_MAP:
                dec.append(f"    if n: {v}, p = _dec_str_map(b, p, end, n)")
                dec.append(f"    else: {v} = {{}}")
            elif kind == VALUE_MAP:
                dec.append(f"    if n: {v}, p = _dec_value_map(b, p, end, n, 1)")
                dec.append(f"    else: {v} = {{}}")
            else:
                sub = _compiled(kind[1])
                ns[f"_dec_{i}"] = sub.decode
                dec.append(f"    if n * {sub.min_bytes} > end - p:")
                dec.append(
                    f"        raise _malformed(f'{name} count {{n}} exceeds the bytes left')"
                )
                dec.append(f"    {v} = []")
                dec.append(f"    ap = {v}.append")
                dec.append("    for _ in range(n):")
                dec.append(f"        x, p = _dec_{i}(b, p, end)")
                dec.append("        ap(x)")
        else:
            sub = _compiled(kind)
            ns[f"_dec_{i}"] = sub.decode
            dec_flush()
            dec.append(f"    {v}, p = _dec_{i}(b, p, end)")
    dec_flush()
    # Build the instance without running the dataclass __init__ (no defaults
    # or factories to evaluate: every field is on the wire).
    dec.append("    o = _new(_cls)")
    for i, (name, _) in enumerate(fields):
        dec.append(f"    o.{name} = f{i}")
    dec.append("    return o, p")

    source = "\n".join(enc) + "\n\n" + "\n".join(dec) + "\n"
    code = compile(source, f"<mqd.protocol.codec {cls.__name__}>", "exec")
    exec(code, ns)
    compiled = _Compiled(ns["encode"], ns["decode"], min_bytes, source)
    compiled.encode.__qualname__ = f"encode_{cls.__name__}"
    compiled.decode.__qualname__ = f"decode_{cls.__name__}"
    _COMPILED[cls] = compiled
    return compiled


def generated_source(cls: type) -> str:
    """The source this module generates for `cls` (for debugging and review)."""
    return _compiled(cls).source


# --- diagnosing a failed encode --------------------------------------------------


def _diagnose(cls: type, obj: Any, path: str) -> str | None:
    """Walk `obj` slowly and describe the first value the wire cannot carry."""
    if not isinstance(obj, cls):
        return f"{path}: expected {cls.__name__}, got {type(obj).__name__}"
    for name, kind in cls.FIELDS:
        where = f"{path}.{name}"
        try:
            v = getattr(obj, name)
        except AttributeError:
            return f"{where}: missing"
        problem = _diagnose_field(kind, v, where)
        if problem:
            return problem
    return None


def _diagnose_str(v: Any, where: str) -> str | None:
    if not isinstance(v, str):
        return f"{where}: expected str, got {type(v).__name__}"
    try:
        n = len(v.encode())
    except UnicodeEncodeError as exc:
        return f"{where}: not encodable as UTF-8 ({exc.reason})"
    if n > STR_BYTES_MAX:
        return f"{where}: string of {n} UTF-8 bytes exceeds {STR_BYTES_MAX}"
    return None


def _diagnose_field(kind: Any, v: Any, where: str) -> str | None:
    if kind in _INT_RANGES:
        lo, hi = _INT_RANGES[kind]
        if not isinstance(v, int):
            return f"{where}: expected int, got {type(v).__name__}"
        if not lo <= v <= hi:
            return f"{where}: {v} is out of range for {kind} [{lo}, {hi}]"
    elif kind == STR:
        return _diagnose_str(v, where)
    elif kind == BLOB:
        if not isinstance(v, (bytes, bytearray, memoryview)):
            return f"{where}: expected bytes, got {type(v).__name__}"
        if len(v) > 0xFFFFFFFF:
            return f"{where}: {len(v)} bytes exceed a BLOB's 4 GiB"
    elif kind == STR_LIST:
        if not isinstance(v, (list, tuple)):
            return f"{where}: expected a list of str, got {type(v).__name__}"
        for j, s in enumerate(v):
            if problem := _diagnose_str(s, f"{where}[{j}]"):
                return problem
    elif kind == STR_MAP or kind == VALUE_MAP:
        if not isinstance(v, dict):
            return f"{where}: expected a dict, got {type(v).__name__}"
        for k, item in v.items():
            if problem := _diagnose_str(k, f"{where} key {k!r}"):
                return problem
            if kind == STR_MAP:
                problem = _diagnose_str(item, f"{where}[{k!r}]")
            else:
                problem = _diagnose_value(item, f"{where}[{k!r}]", 1)
            if problem:
                return problem
    elif isinstance(kind, tuple):
        if not isinstance(v, (list, tuple)):
            return f"{where}: expected a list, got {type(v).__name__}"
        for j, item in enumerate(v):
            if problem := _diagnose(kind[1], item, f"{where}[{j}]"):
                return problem
    elif isinstance(kind, type):
        return _diagnose(kind, v, where)
    return None


def _diagnose_value(v: Any, where: str, depth: int) -> str | None:
    if v is None or isinstance(v, (bool, float, bytes, bytearray, memoryview)):
        return None
    if isinstance(v, int):
        lo, hi = _INT_RANGES[I64]
        return None if lo <= v <= hi else f"{where}: {v} is out of range for a VALUE int (i64)"
    if isinstance(v, str):
        return _diagnose_str(v, where)
    if isinstance(v, (dict, list, tuple)):
        if depth >= VALUE_DEPTH_MAX:
            return f"{where}: maps and lists nest deeper than {VALUE_DEPTH_MAX} levels"
        if isinstance(v, dict):
            for k, item in v.items():
                if problem := _diagnose_str(k, f"{where} key {k!r}"):
                    return problem
                if problem := _diagnose_value(item, f"{where}[{k!r}]", depth + 1):
                    return problem
        else:
            for j, item in enumerate(v):
                if problem := _diagnose_value(item, f"{where}[{j}]", depth + 1):
                    return problem
        return None
    return f"{where}: a {type(v).__name__} cannot be sent as a VALUE"


def _encode_failed(msg: Any, exc: BaseException) -> InvalidArgument:
    cls = type(msg)
    problem = None
    if hasattr(cls, "FIELDS"):
        problem = _diagnose(cls, msg, cls.__name__)
    return InvalidArgument(problem or f"cannot encode {cls.__name__}: {exc}")


# --- public API ------------------------------------------------------------------


def _encode_parts(msg: Any, head_slot: bool) -> list[Any]:
    try:
        enc = _compiled(type(msg)).encode
    except (TypeError, AttributeError):
        raise InvalidArgument(f"{type(msg).__name__} is not a protocol message") from None
    parts: list[Any] = [b""] if head_slot else []
    try:
        enc(msg, parts.append)
    except (*_ENCODE_ERRORS, InvalidArgument) as exc:
        raise _encode_failed(msg, exc) from exc
    return parts


def encode_body(msg: Any) -> bytes:
    """Encode any message dataclass of `mqd.protocol.messages` to its body bytes.

    Raises InvalidArgument for a value the wire cannot carry.
    """
    parts = _encode_parts(msg, head_slot=False)
    try:
        return b"".join(parts)
    except TypeError as exc:  # a BLOB that is not bytes-like
        raise _encode_failed(msg, exc) from exc


def decode_body(cls: type, body: bytes | bytearray | memoryview) -> Any:
    """Decode a whole body as an instance of `cls`.

    `body` may be any bytes-like object; one that is not `bytes` is copied
    first, since decoded BLOB fields are `bytes` slices of it. Raises
    ProtocolError (MALFORMED_FRAME) if the bytes break the rules of
    protocol.md §3, including trailing bytes after the last field.
    """
    if type(body) is not bytes:
        body = bytes(body)
    dec = _compiled(cls).decode
    end = len(body)
    try:
        obj, p = dec(body, 0, end)
    except _DECODE_ERRORS as exc:
        if isinstance(exc, UnicodeDecodeError):
            raise _malformed(f"invalid UTF-8 in a string ({exc.reason})") from None
        raise _truncated() from None
    if p != end:
        raise _malformed(f"{end - p} trailing bytes after {cls.__name__}")
    return obj


_HEAD = struct.Struct(">IBBHI")  # length prefix + header, packed together


def _encode_message_frame(correlation_id: int, opcode: int, flags: int, msg: Any) -> bytes:
    parts = _encode_parts(msg, head_slot=True)
    try:
        length = HEADER_BYTES + sum(map(len, parts))
        parts[0] = _HEAD.pack(length, PROTOCOL_VERSION, flags, opcode, correlation_id)
    except struct.error as exc:
        raise InvalidArgument(
            f"frame header out of range (opcode={opcode}, correlation_id={correlation_id}): {exc}"
        ) from None
    try:
        return b"".join(parts)
    except TypeError as exc:
        raise _encode_failed(msg, exc) from exc


def _opcode_of(msg: Any) -> int:
    opcode = getattr(type(msg), "OPCODE", None)
    if opcode is None:
        raise InvalidArgument(f"{type(msg).__name__} is not a request or response message")
    return opcode


def encode_request(correlation_id: int, msg: Any) -> bytes:
    """A whole request frame for `msg` (opcode `msg.OPCODE`, flags 0)."""
    return _encode_message_frame(correlation_id, _opcode_of(msg), 0, msg)


def encode_response(correlation_id: int, msg: Any) -> bytes:
    """A whole response frame for `msg` (opcode `msg.OPCODE`, flags RESPONSE)."""
    return _encode_message_frame(correlation_id, _opcode_of(msg), FLAG_RESPONSE, msg)


def encode_error(
    correlation_id: int,
    opcode: int,
    code: int,
    message: str,
    details: dict[str, Any] | None = None,
) -> bytes:
    """A whole error frame (flags RESPONSE|ERROR, body ErrorBody), echoing `opcode`."""
    body = ErrorBody(int(code), message, details if details is not None else {})
    return _encode_message_frame(correlation_id, opcode, FLAG_RESPONSE | FLAG_ERROR, body)


def encode_exception(correlation_id: int, opcode: int, exc: ServerError) -> bytes:
    """The error frame that reports `exc` (its code, message and details)."""
    return encode_error(correlation_id, opcode, exc.code, exc.message, exc.details)


def unsupported_version_details() -> dict[str, int]:
    """The `details` of an UNSUPPORTED_VERSION error: the range this codec speaks."""
    return {"version_min": PROTOCOL_VERSION_MIN, "version_max": PROTOCOL_VERSION_MAX}


_REQUESTS: dict[int, type] = {int(op): req for op, (req, _) in OPS.items()}
_RESPONSES: dict[int, type] = {int(op): resp for op, (_, resp) in OPS.items()}


def decode_request(frame: Frame) -> Any:
    """Decode a request frame into its request dataclass.

    Raises, in this order of checks:
    - UnsupportedVersion (non-fatal) for a version other than PROTOCOL_VERSION,
      with the supported range in `details`;
    - ProtocolError (fatal) if any flag is set (requests carry flags 0);
    - UnknownOpcode (non-fatal) for an opcode not in OPS;
    - ProtocolError (fatal) for a body that does not decode.
    """
    if frame.version != PROTOCOL_VERSION:
        raise UnsupportedVersion(
            f"protocol version {frame.version} is not supported",
            details=unsupported_version_details(),
        )
    if frame.flags:
        raise ProtocolError(f"a request must have flags 0, got 0x{frame.flags:02x}")
    cls = _REQUESTS.get(frame.opcode)
    if cls is None:
        raise UnknownOpcode(
            f"unknown opcode 0x{frame.opcode:04x}", details={"opcode": frame.opcode}
        )
    return decode_body(cls, frame.body)


def decode_response(frame: Frame) -> Any:
    """Decode a response frame: the response dataclass, or ErrorBody if ERROR is set.

    Raises ProtocolError if the RESPONSE flag is missing or a reserved flag is
    set, UnsupportedVersion for a non-error frame of another version,
    UnknownOpcode for an opcode not in OPS, ProtocolError for a bad body.
    An error frame decodes whatever its opcode or version: ErrorBody's layout
    is the same in every version.
    """
    flags = frame.flags
    if not flags & FLAG_RESPONSE or flags & ~FLAGS_KNOWN:
        raise ProtocolError(f"not a response frame: flags 0x{flags:02x}")
    if flags & FLAG_ERROR:
        return decode_body(ErrorBody, frame.body)
    if frame.version != PROTOCOL_VERSION:
        raise UnsupportedVersion(
            f"protocol version {frame.version} is not supported",
            details=unsupported_version_details(),
        )
    cls = _RESPONSES.get(frame.opcode)
    if cls is None:
        raise UnknownOpcode(
            f"unknown opcode 0x{frame.opcode:04x}", details={"opcode": frame.opcode}
        )
    return decode_body(cls, frame.body)


def error_from_body(body: ErrorBody) -> ServerError:
    """The exception a client raises for an error frame's body."""
    return ServerError.from_code(body.code, body.message, body.details)


__all__ = [
    "BLOB",
    "BOOL",
    "I64",
    "STR",
    "STR_BYTES_MAX",
    "STR_LIST",
    "STR_MAP",
    "U8",
    "U16",
    "U32",
    "U64",
    "VALUE_DEPTH_MAX",
    "VALUE_MAP",
    "ListOf",
    "StructOf",
    "decode_body",
    "decode_request",
    "decode_response",
    "encode_body",
    "encode_error",
    "encode_exception",
    "encode_request",
    "encode_response",
    "error_from_body",
    "generated_source",
    "unsupported_version_details",
]


# Compile every message of the op table at import: a schema mistake in
# messages.py then fails loudly at startup, and no request pays for compiling.
for _cls in (ErrorBody, *(cls for pair in OPS.values() for cls in pair)):
    _compiled(_cls)
del _cls
