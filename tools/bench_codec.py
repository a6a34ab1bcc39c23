"""Measure the codec on the SEND and RECEIVE hot paths (protocol.md §4.9, §4.10).

Encodes and decodes a SEND request of 1000 SendEntry and a RECEIVE response of
1000 DeliveredMessage, each a whole frame through FrameDecoder, and prints the
median of 5 runs in microseconds per entry. Usage:

    .venv/bin/python tools/bench_codec.py [--entries 1000] [--runs 5] [--body-bytes 256]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

# Run from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mqd.protocol import (
    DeliveredMessage,
    FrameDecoder,
    ReceiveResponse,
    SendEntry,
    SendRequest,
    decode_request,
    decode_response,
    encode_request,
    encode_response,
)


def make_send(n: int, body_bytes: int) -> SendRequest:
    body = b"x" * body_bytes
    return SendRequest(
        queue="orders",
        entries=[
            SendEntry(body=body, attributes={"trace": f"t-{i}"} if i % 2 else {}, delay_ms=i % 7)
            for i in range(n)
        ],
    )


def make_receive(n: int, body_bytes: int) -> ReceiveResponse:
    body = b"x" * body_bytes
    return ReceiveResponse(
        messages=[
            DeliveredMessage(
                id=f"01J{i:023d}",
                receipt=f"r1.{i:012d}.AAAABBBBCCCCDDDDEEEEFFFFGGGGHHHH",
                body=body,
                attributes={"trace": f"t-{i}"} if i % 2 else {},
                receive_count=1,
                sent_at_ms=1_700_000_000_000 + i,
                first_received_at_ms=1_700_000_000_500 + i,
            )
            for i in range(n)
        ]
    )


def time_us_per_entry(fn, n: int, runs: int) -> float:
    samples = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) / n * 1e6)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--body-bytes", type=int, default=256)
    args = parser.parse_args()
    n = args.entries

    send = make_send(n, args.body_bytes)
    receive = make_receive(n, args.body_bytes)
    send_frame = encode_request(1, send)
    receive_frame = encode_response(1, receive)

    def decode_one(frame_bytes, decode):
        def run():
            decoder = FrameDecoder(64 * 1024 * 1024)
            decoder.feed(frame_bytes)
            return decode(decoder.next_frame())

        return run

    assert decode_one(send_frame, decode_request)() == send
    assert decode_one(receive_frame, decode_response)() == receive
    # Warm up (compiles the per-class codecs).
    encode_request(1, send)
    encode_response(1, receive)

    rows = [
        ("SendEntry encode", time_us_per_entry(lambda: encode_request(1, send), n, args.runs)),
        (
            "SendEntry decode",
            time_us_per_entry(decode_one(send_frame, decode_request), n, args.runs),
        ),
        (
            "DeliveredMessage encode",
            time_us_per_entry(lambda: encode_response(1, receive), n, args.runs),
        ),
        (
            "DeliveredMessage decode",
            time_us_per_entry(decode_one(receive_frame, decode_response), n, args.runs),
        ),
    ]
    print(f"{n} entries per frame, {args.body_bytes}-byte bodies, median of {args.runs} runs")
    for name, us in rows:
        print(f"  {name:<26} {us:6.2f} us/entry")


if __name__ == "__main__":
    main()
