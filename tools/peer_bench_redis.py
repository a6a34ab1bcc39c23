"""W1c and W2 of `mqd bench` against Redis Streams, for the README's peer table.

The same shapes as mqd's workloads (issue 7), driven by redis-py's asyncio
client in one process: 256-byte bodies (8-byte sequence, 8-byte send time,
random rest), each phase checked for missing and duplicate sequence numbers.

- W1c: 1 producer (pipelined XADD windows of 1000, each awaited) and 1
  consumer (XREADGROUP COUNT 1000 BLOCK 1000 + XACK of the batch) together:
  N / time until the N-th distinct message is acked.
- W2: open loop, one XADD per slot at --rate for --duration s; one consumer
  with XREADGROUP COUNT 100 BLOCK 1000 + XACK. End to end: receive time - the
  XADD call's time; send->ack: how long each XADD took.

XACK only (no XDEL): the lighter reading of "ack" for Redis.

    redis-server --port 16479 --appendonly yes --appendfsync always --save '' \\
        --dir /tmp/redis-data &
    pip install redis
    python tools/peer_bench_redis.py --port 16479 --repeats 3

Not part of the test suite and not a dependency of mqd: a measuring tool.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import time

import redis.asyncio as aioredis

# Run as `python tools/peer_bench_redis.py`, which puts tools/ on sys.path.
from peer_common import HEAD, SIZE, cpu_seconds, median_figures, message_body, percentile_ms


async def _fresh(r: aioredis.Redis, stream: str) -> None:
    await r.delete(stream)
    await r.xgroup_create(stream, "g", id="0", mkstream=True)


async def w1c(r: aioredis.Redis, n: int, pid: int) -> dict:
    stream = f"w1c-{time.time_ns()}"
    await _fresh(r, stream)
    pool = os.urandom(SIZE)
    seen = bytearray(n)
    distinct = duplicates = 0
    done = asyncio.Event()

    async def produce() -> None:
        for start in range(0, n, 1000):
            pipe = r.pipeline(transaction=False)
            for seq in range(start, min(start + 1000, n)):
                pipe.xadd(stream, {"b": message_body(seq, pool)})
            await pipe.execute()

    async def consume() -> None:
        nonlocal distinct, duplicates
        while not done.is_set():
            got = await r.xreadgroup("g", "c", {stream: ">"}, count=1000, block=1000)
            if not got:
                continue
            entries = got[0][1]
            await r.xack(stream, "g", *[eid for eid, _ in entries])
            for _eid, fields in entries:
                seq, _ = HEAD.unpack_from(fields[b"b"])
                if seen[seq]:
                    duplicates += 1
                else:
                    seen[seq] = 1
                    distinct += 1
            if distinct == n:
                done.set()

    cpu0 = cpu_seconds(pid)
    started = time.perf_counter()
    await asyncio.gather(produce(), consume())
    elapsed = time.perf_counter() - started
    cpu = cpu_seconds(pid) - cpu0
    await r.delete(stream)
    return {
        "msgs_per_s": round(n / elapsed, 1),
        "server_cpu_us_per_msg": round(cpu * 1e6 / n, 1),
        "missing": n - distinct,
        "duplicates": duplicates,
    }


async def w2(r: aioredis.Redis, rate: float, duration: float, pid: int) -> dict:
    stream = f"w2-{time.time_ns()}"
    await _fresh(r, stream)
    pool = os.urandom(SIZE)
    slots = int(rate * duration)
    seen = bytearray(slots)
    e2e: list[int] = []
    send_ack: list[int] = []
    tasks: set[asyncio.Task] = set()
    sending_done = asyncio.Event()

    async def send_one(seq: int) -> None:
        t0 = time.perf_counter_ns()
        await r.xadd(stream, {"b": message_body(seq, pool)})
        send_ack.append(time.perf_counter_ns() - t0)

    async def consume() -> None:
        while not (sending_done.is_set() and len(e2e) >= slots):
            got = await r.xreadgroup("g", "c", {stream: ">"}, count=100, block=1000)
            if not got:
                continue
            now = time.time_ns()
            entries = got[0][1]
            for _eid, fields in entries:
                seq, sent_ns = HEAD.unpack_from(fields[b"b"])
                if not seen[seq]:
                    seen[seq] = 1
                    e2e.append(now - sent_ns)
            await r.xack(stream, "g", *[eid for eid, _ in entries])

    cpu0 = cpu_seconds(pid)
    consumer = asyncio.create_task(consume())
    perf0 = time.perf_counter() + 0.01
    for slot in range(slots):
        delay = perf0 + slot / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(send_one(slot))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.gather(*tasks)
    sending_done.set()
    await asyncio.wait_for(consumer, 30)
    cpu = cpu_seconds(pid) - cpu0
    await r.delete(stream)
    return {
        "e2e_ms_p50": percentile_ms(e2e, 0.5),
        "e2e_ms_p99": percentile_ms(e2e, 0.99),
        "e2e_ms_p999": percentile_ms(e2e, 0.999),
        "send_ack_ms_p50": percentile_ms(send_ack, 0.5),
        "send_ack_ms_p99": percentile_ms(send_ack, 0.99),
        "server_cpu_us_per_msg": round(cpu * 1e6 / slots, 1),
        "missing": slots - len(e2e),
    }


def _redis_pid(port: int) -> int:
    out = subprocess.run(["pgrep", "-f", f"redis-server.*:{port}"], capture_output=True, text=True)
    return int(out.stdout.split()[0])


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=16479)
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    r = aioredis.Redis(host="127.0.0.1", port=args.port)
    pid = _redis_pid(args.port)
    info = await r.config_get("append*")
    runs = []
    for _ in range(args.repeats):
        runs.append(
            {
                "w1c": await w1c(r, args.messages, pid),
                "w2": await w2(r, args.rate, args.duration, pid),
            }
        )
    medians = median_figures(runs)
    print(json.dumps({"redis_config": info, "medians": medians, "runs": runs}, indent=1))
    await r.aclose()


if __name__ == "__main__":
    asyncio.run(main())
