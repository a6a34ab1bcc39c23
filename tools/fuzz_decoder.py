"""Fuzz the frame decoder and the request/response decoders (protocol.md §1, §3).

The rule under test (STYLE.md "garbage in → protocol error, never anything
else"): whatever bytes arrive, `FrameDecoder`, `codec.decode_request`,
`codec.decode_response` and `codec.decode_body` (for every message class of the
op table, internal ops included) either hand out a value or raise one of
ProtocolError (FrameTooLarge is one), UnknownOpcode or UnsupportedVersion, or
say "need more data". Anything else is a bug. A value they hand out must also
encode again, and that encoding must decode to an equal encoding.

Two ways to run the same target, `check_input`:

    # hypothesis (what CI runs, briefly, from tests/test_hardening.py)
    python tools/fuzz_decoder.py --examples 20000 [--seed 1]

    # coverage-guided, for as long as you like (pip install atheris; not a dependency)
    python tools/fuzz_decoder.py --write-corpus fuzz-corpus/
    python tools/fuzz_decoder.py --atheris fuzz-corpus/ -max_total_time=3600

Exit status 0: no bug found; 1: a bug, printed with the input that shows it.
The random frame and mutation helpers here (`random_message`, `mutate`,
`storm_frames`) also feed the 50,000-frame storm in tests/test_hardening.py.
"""

from __future__ import annotations

import argparse
import random
import struct
import sys
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from mqd.errors import ProtocolError, ServerError, UnknownOpcode, UnsupportedVersion
from mqd.protocol import codec
from mqd.protocol.frame import HEADER_BYTES, Frame, FrameDecoder
from mqd.protocol.messages import OPS, ErrorBody

# What a decoder may raise on bad input; FrameTooLarge is a ProtocolError.
ALLOWED = (ProtocolError, UnknownOpcode, UnsupportedVersion)
# A small frame limit, so that length-prefix lies hit FRAME_TOO_LARGE often.
FUZZ_FRAME_BYTES_MAX = 64 * 1024
# Every body class a peer can make us decode: both sides of every op, and errors.
BODY_CLASSES: list[type] = [ErrorBody, *(cls for pair in OPS.values() for cls in pair)]
OPCODES: list[int] = sorted(int(op) for op in OPS)
_INT_RANGES = {
    "U8": (0, 0xFF),
    "U16": (0, 0xFFFF),
    "U32": (0, 0xFFFFFFFF),
    "U64": (0, (1 << 64) - 1),
    "I64": (-(1 << 63), (1 << 63) - 1),
}


class FuzzBug(AssertionError):
    """A decoder did something other than decode, refuse with an allowed error, or wait."""


# --- the target -----------------------------------------------------------------------


def check_input(data: bytes, chunk_bytes: int = 7) -> None:
    """Run every decoder over `data`; raise FuzzBug (or let the real error out) on a bug.

    The bytes are fed to a FrameDecoder `chunk_bytes` at a time, as a socket
    would, and every whole frame is decoded as a request and as a response.
    The same bytes are then decoded as the body of every message class.
    """
    assert chunk_bytes >= 1
    decoder = FrameDecoder(FUZZ_FRAME_BYTES_MAX)
    fed = 0
    for start in range(0, len(data), chunk_bytes):
        piece = data[start : start + chunk_bytes]
        decoder.feed(piece)
        fed += len(piece)
        if not _drain(decoder, fed):
            break
    for cls in BODY_CLASSES:
        _check_body(cls, data)


def _drain(decoder: FrameDecoder, fed: int) -> bool:
    """Pull every whole frame; False once the decoder has refused the stream."""
    while True:
        try:
            frame = decoder.next_frame()
        except ALLOWED as exc:
            # The decoder must keep refusing: the stream has no frame boundaries left.
            try:
                decoder.next_frame()
            except type(exc):
                return False
            raise FuzzBug(f"decoder stopped raising {type(exc).__name__}") from None
        if frame is None:
            if not 0 <= decoder.buffered_bytes <= fed:
                raise FuzzBug(f"buffered_bytes {decoder.buffered_bytes} after {fed} fed")
            return True
        _check_frame(frame)


def _check_frame(frame: Frame) -> None:
    if not HEADER_BYTES + len(frame.body) <= FUZZ_FRAME_BYTES_MAX:
        raise FuzzBug(f"a frame of {len(frame.body)} body bytes passed the frame limit")
    for decode in (codec.decode_request, codec.decode_response):
        try:
            msg = decode(frame)
        except ALLOWED:
            continue
        _check_round_trip(type(msg), msg)
        if isinstance(msg, ErrorBody):
            # What a client does with an error frame must not fail either.
            if not isinstance(codec.error_from_body(msg), ServerError):
                raise FuzzBug("error_from_body returned a non-ServerError")


def _check_body(cls: type, body: bytes) -> None:
    try:
        msg = codec.decode_body(cls, body)
    except ProtocolError:
        return
    _check_round_trip(cls, msg)


def _check_round_trip(cls: type, msg: Any) -> None:
    if type(msg) is not cls:
        raise FuzzBug(f"decoded a {type(msg).__name__}, expected {cls.__name__}")
    try:
        encoded = codec.encode_body(msg)
    except ServerError as exc:
        raise FuzzBug(f"{cls.__name__} decoded but does not encode again: {exc}") from exc
    again = codec.encode_body(codec.decode_body(cls, encoded))
    if again != encoded:
        raise FuzzBug(f"{cls.__name__}: decode(encode(x)) encodes differently")


# --- valid frames from the codec, and mutations of them ---------------------------------


def random_value(rng: random.Random, depth: int = 1) -> Any:
    """A VALUE (protocol.md §3) nesting no deeper than the codec allows."""
    kind = rng.randrange(8 if depth < codec.VALUE_DEPTH_MAX else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.random() < 0.5
    if kind == 2:
        return rng.choice((0, 1, -1, 1 << 62, -(1 << 63), rng.randrange(-(1 << 40), 1 << 40)))
    if kind == 3:
        return rng.choice((0.0, -0.0, 1.5, float("inf"), rng.uniform(-1e9, 1e9)))
    if kind == 4:
        return _random_str(rng)
    if kind == 5:
        return rng.randbytes(rng.randrange(12))
    if kind == 6:
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(3))]
    return {_random_str(rng): random_value(rng, depth + 1) for _ in range(rng.randrange(3))}


def _random_str(rng: random.Random) -> str:
    return "".join(rng.choice("aZ09_.-é€😀\x00") for _ in range(rng.randrange(10)))


def random_field(kind: Any, rng: random.Random) -> Any:
    if kind in _INT_RANGES:
        low, high = _INT_RANGES[kind]
        return rng.choice((low, high, min(high, max(low, rng.randrange(-5, 1000)))))
    if kind == "BOOL":
        return rng.random() < 0.5
    if kind == "STR":
        return _random_str(rng)
    if kind == "BLOB":
        return rng.randbytes(rng.randrange(24))
    if kind == "STR_LIST":
        return [_random_str(rng) for _ in range(rng.randrange(4))]
    if kind == "STR_MAP":
        return {_random_str(rng): _random_str(rng) for _ in range(rng.randrange(4))}
    if kind == "VALUE_MAP":
        return {_random_str(rng): random_value(rng, 2) for _ in range(rng.randrange(4))}
    if isinstance(kind, tuple):  # ("LIST", cls)
        return [random_message(kind[1], rng) for _ in range(rng.randrange(3))]
    return random_message(kind, rng)


def random_message(cls: type, rng: random.Random) -> Any:
    """An instance of a message class with random field values the wire can carry."""
    return cls(**{name: random_field(kind, rng) for name, kind in cls.FIELDS})


def random_valid_frame(rng: random.Random) -> bytes:
    """A well-formed request, response or error frame of a random op."""
    op = rng.choice(OPCODES)
    request_cls, response_cls = OPS[op]  # type: ignore[index]
    correlation_id = rng.randrange(1 << 32)
    roll = rng.random()
    if roll < 0.6:
        return codec.encode_request(correlation_id, random_message(request_cls, rng))
    if roll < 0.9:
        return codec.encode_response(correlation_id, random_message(response_cls, rng))
    body = random_message(ErrorBody, rng)
    return codec.encode_error(correlation_id, op, body.code, body.message, body.details)


# Each mutation: (frame, position, value) -> bytes. `position` and `value` are any
# non-negative ints; the mutation reduces them to what makes sense for the frame.
def _bit_flip(frame: bytes, pos: int, value: int) -> bytes:
    if not frame:
        return frame
    out = bytearray(frame)
    out[pos % len(out)] ^= 1 << (value % 8)
    return bytes(out)


def _truncate(frame: bytes, pos: int, value: int) -> bytes:
    return frame[: pos % (len(frame) + 1)]


def _length_lie(frame: bytes, pos: int, value: int) -> bytes:
    length = max(0, len(frame) - 4)
    lie = (
        length + 1 + value % 64,
        max(0, length - 1 - value % 64),
        value % HEADER_BYTES,
        FUZZ_FRAME_BYTES_MAX + value % 3,
        0xFFFFFFFF - value % 2,
        value & 0xFFFFFFFF,
    )[pos % 6]
    return struct.pack(">I", lie % (1 << 32)) + frame[4:]


def _set_byte(offset: int) -> Callable[[bytes, int, int], bytes]:
    def mutate(frame: bytes, pos: int, value: int) -> bytes:
        if len(frame) <= offset:
            return frame
        return frame[:offset] + bytes([value % 256]) + frame[offset + 1 :]

    return mutate


def _opcode(frame: bytes, pos: int, value: int) -> bytes:
    if len(frame) < 8:
        return frame
    opcode = OPCODES[value % len(OPCODES)] if pos % 2 else value % 0x10000
    return frame[:6] + struct.pack(">H", opcode) + frame[8:]


def _huge_count(frame: bytes, pos: int, value: int) -> bytes:
    # Counts and lengths are u16/u32 fields inside the body: claim a huge one anywhere.
    start = 4 + HEADER_BYTES
    if len(frame) <= start:
        return frame
    at = start + pos % (len(frame) - start)
    big = (b"\xff\xff\xff\xff", b"\x7f\xff\xff\xff", b"\x00\x01\x00\x00", b"\xff\xff")[value % 4]
    return frame[:at] + big + frame[at + len(big) :]


def _insert(frame: bytes, pos: int, value: int) -> bytes:
    at = pos % (len(frame) + 1)
    junk = random.Random(value).randbytes(1 + value % 16)
    return frame[:at] + junk + frame[at:]


def _delete(frame: bytes, pos: int, value: int) -> bytes:
    at = pos % (len(frame) + 1)
    return frame[:at] + frame[at + 1 + value % 8 :]


MUTATIONS: dict[str, Callable[[bytes, int, int], bytes]] = {
    "bit_flip": _bit_flip,
    "truncate": _truncate,
    "length_lie": _length_lie,
    "version": _set_byte(4),
    "flags": _set_byte(5),
    "opcode": _opcode,
    "huge_count": _huge_count,
    "insert": _insert,
    "delete": _delete,
}
MUTATION_NAMES = sorted(MUTATIONS)


def mutate(frame: bytes, name: str, pos: int, value: int) -> bytes:
    return MUTATIONS[name](frame, pos, value)


def random_mutated_frame(rng: random.Random) -> bytes:
    frame = random_valid_frame(rng)
    for _ in range(1 + int(rng.expovariate(1.0))):
        frame = mutate(
            frame, rng.choice(MUTATION_NAMES), rng.randrange(1 << 16), rng.randrange(1 << 32)
        )
    return frame


def storm_frames(rng: random.Random) -> Iterator[bytes]:
    """An endless mix for the storm: random bytes, mutated frames, valid frames."""
    while True:
        roll = rng.random()
        if roll < 0.2:
            yield rng.randbytes(rng.randrange(1, 64))
        elif roll < 0.9:
            yield random_mutated_frame(rng)
        else:
            yield random_valid_frame(rng)


# --- hypothesis -----------------------------------------------------------------------


def hypothesis_test(examples: int, seed: int | None = None) -> Callable[[], None]:
    """The hypothesis test over `check_input`: call it to run `examples` examples."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import seed as hypothesis_seed
    from hypothesis import strategies as st

    def message_strategy(cls: type) -> st.SearchStrategy[Any]:
        return st.builds(cls, **{name: field_strategy(kind) for name, kind in cls.FIELDS})

    short_text = st.text(max_size=8)
    leaves = (
        st.none()
        | st.booleans()
        | st.integers(*_INT_RANGES["I64"])
        | st.floats()
        | short_text
        | st.binary(max_size=8)
    )
    values = st.recursive(
        leaves,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(short_text, inner, max_size=3),
        max_leaves=6,
    )

    def field_strategy(kind: Any) -> st.SearchStrategy[Any]:
        if kind in _INT_RANGES:
            return st.integers(*_INT_RANGES[kind])
        simple = {
            "BOOL": st.booleans(),
            "STR": short_text,
            "BLOB": st.binary(max_size=16),
            "STR_LIST": st.lists(short_text, max_size=3),
            "STR_MAP": st.dictionaries(short_text, short_text, max_size=3),
            "VALUE_MAP": st.dictionaries(short_text, values, max_size=3),
        }
        if kind in simple:
            return simple[kind]
        if isinstance(kind, tuple):
            return st.lists(st.deferred(lambda: message_strategy(kind[1])), max_size=2)
        return st.deferred(lambda: message_strategy(kind))

    def encoded_frame(op: int) -> st.SearchStrategy[bytes]:
        request_cls, response_cls = OPS[op]  # type: ignore[index]
        ids = st.integers(0, 0xFFFFFFFF)
        return st.one_of(
            st.builds(codec.encode_request, ids, message_strategy(request_cls)),
            st.builds(codec.encode_response, ids, message_strategy(response_cls)),
            st.builds(codec.encode_error, ids, st.just(op), st.integers(0, 0xFFFF), short_text),
        )

    valid = st.sampled_from(OPCODES).flatmap(encoded_frame)
    mutation = st.tuples(
        st.sampled_from(MUTATION_NAMES),
        st.integers(0, 1 << 16),
        st.integers(0, 0xFFFFFFFF),
    )

    @st.composite
    def mutated(draw: Any) -> bytes:
        frame = draw(valid)
        for name, pos, value in draw(st.lists(mutation, min_size=1, max_size=3)):
            frame = mutate(frame, name, pos, value)
        return frame

    piece = st.one_of(st.binary(max_size=64), valid, mutated())
    stream = st.lists(piece, min_size=1, max_size=4).map(b"".join)

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(data=stream, chunk_bytes=st.integers(1, 64))
    def test(data: bytes, chunk_bytes: int) -> None:
        check_input(data, chunk_bytes)

    if seed is not None:
        test = hypothesis_seed(seed)(test)
    return test


# --- atheris --------------------------------------------------------------------------


def atheris_main(argv: list[str]) -> None:
    try:
        import atheris
    except ImportError:
        sys.exit("--atheris needs atheris: pip install atheris (it is not an mqd dependency)")
    with atheris.instrument_imports():
        import mqd.protocol.codec
        import mqd.protocol.frame  # noqa: F401
    atheris.instrument_all()

    def one_input(data: bytes) -> None:
        if not data:
            return
        # The first byte picks the feeding chunk size; the rest is the stream.
        check_input(data[1:], 1 + data[0] % 64)

    atheris.Setup([sys.argv[0], *argv], one_input)
    atheris.Fuzz()


def write_corpus(directory: Path, count: int, seed: int) -> None:
    """Seed inputs for atheris: valid and mutated frames, in its input format."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for i in range(count):
        frame = random_valid_frame(rng) if i % 2 else random_mutated_frame(rng)
        (directory / f"seed-{i:05d}").write_bytes(bytes([rng.randrange(64)]) + frame)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=5000, help="hypothesis examples")
    parser.add_argument("--seed", type=int, default=None, help="hypothesis seed")
    parser.add_argument(
        "--atheris",
        nargs=argparse.REMAINDER,
        metavar="ARG",
        help="run under atheris; the remaining arguments (corpus dirs, -flags) go to it",
    )
    parser.add_argument("--write-corpus", type=Path, metavar="DIR", help="write seed inputs")
    parser.add_argument("--corpus-size", type=int, default=500)
    args = parser.parse_args()
    if args.write_corpus is not None:
        write_corpus(args.write_corpus, args.corpus_size, args.seed or 0)
        print(f"wrote {args.corpus_size} seed inputs to {args.write_corpus}")
        return 0
    if args.atheris is not None:
        atheris_main(args.atheris)
        return 0
    try:
        hypothesis_test(args.examples, args.seed)()
    except Exception:
        traceback.print_exc()
        print("fuzz_decoder: BUG FOUND (the falsifying example is printed above)")
        return 1
    print(f"fuzz_decoder: {args.examples} examples, no bug found")
    return 0


if __name__ == "__main__":
    sys.exit(main())
