"""W1c and W2 of `mqd bench` against NATS JetStream, for the README's peer table.

The same shapes as mqd's workloads (issue 7), driven by nats-py's asyncio
client in one process, the producer and the consumer each with its own
connection, on a fresh stream per phase (file storage, one replica,
work-queue retention: an acked message leaves the stream) with a durable
pull consumer (explicit acks, the server's defaults otherwise). 256-byte
bodies (8-byte sequence, 8-byte send time, random rest), each phase checked
for missing and duplicate sequence numbers and for messages left in the
stream.

- W1c: 1 producer (windows of 1000 js.publish calls gathered concurrently,
  each window awaited: every publish waits for its PubAck) and 1 consumer
  (fetch(batch=1000, timeout=1) + an ack of each message of the batch)
  together: N / time until the N-th distinct message is acked.
- W2: open loop, one js.publish per slot at --rate for --duration s, at most
  --in-flight-max unanswered (a slot that finds the bound reached is skipped
  and counted in missed_slots); one consumer with fetch(batch=100,
  timeout=1) + acks. End to end: receive time - the publish call's time;
  send->ack: how long each js.publish took (until its PubAck).

--ack picks how a batch is acked: `ack` (the default, nats-py's usual path)
sends msg.ack() for each message, which publishes +ACK without waiting for
an answer, then flushes the connection once per batch (a PING answered by
the server, so the acks have reached it; JetStream applies them after);
`sync` awaits msg.ack_sync() for each message, gathered concurrently (each
waits for the consumer's confirmation). After each phase the stream is
polled (up to 5 s) until the acks have emptied it; what is still there is
queue_left.

Durability: nats-server 2.9 has no `sync_interval` option (2.10 added it;
2.9.10 refuses the field). Its file store writes each message to the
stream's block file before the PubAck (no fsync) and fsyncs the block files
every 2 minutes: an acknowledged publish survives a crash of the server
process, not one of the machine.

Beside each figure: the server's CPU time per message (utime + stime from
/proc/PID/stat, all threads; --server-pid, or the nats-server process of
this user with -p PORT) and this process's (`time.process_time`). With
--repeats the figures are medians; --json prints them with the raw runs.

    nats-server -js -sd /tmp/peer-nats-data -a 127.0.0.1 -p 14299 &
    pip install nats-py
    python tools/peer_bench_nats.py --port 14299 --repeats 3

Not part of the test suite and not a dependency of mqd: a measuring tool.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from importlib import metadata

import nats
import nats.errors
from nats.js.api import AckPolicy, ConsumerConfig, RetentionPolicy, StorageType, StreamConfig

# Found beside this script: `python tools/peer_bench_nats.py` puts tools/ on sys.path.
from peer_common import (
    HEAD,
    SIZE,
    CpuMeter,
    command_line,
    median_figures,
    message_body,
    own_server_pid,
    w1c_summary,
    w2_latency_figures,
    w2_summary,
)

WINDOW = 1000
W2_FETCH = 100


class Bench:
    """Two connections to one server: one for the producer, one for the consumer."""

    def __init__(self, url: str, pid: int, ack: str, timeout: float) -> None:
        self.url = url
        self.pid = pid
        self.ack = ack
        self.timeout = timeout

    async def __aenter__(self) -> Bench:
        self.pnc = await nats.connect(self.url, allow_reconnect=False)
        self.cnc = await nats.connect(self.url, allow_reconnect=False)
        self.pjs = self.pnc.jetstream()
        self.cjs = self.cnc.jetstream()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.pnc.close()
        await self.cnc.close()

    async def fresh(self, prefix: str) -> tuple[str, str, object]:
        name = f"{prefix}_{time.time_ns()}"
        subject = name.lower()
        await self.pjs.add_stream(
            StreamConfig(
                name=name,
                subjects=[subject],
                retention=RetentionPolicy.WORK_QUEUE,
                storage=StorageType.FILE,
                num_replicas=1,
            )
        )
        sub = await self.cjs.pull_subscribe(
            subject, durable="c", stream=name, config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT)
        )
        return name, subject, sub

    async def acked(self, msgs: list) -> None:
        if self.ack == "sync":
            await asyncio.gather(*(msg.ack_sync(timeout=5) for msg in msgs))
        else:
            for msg in msgs:
                await msg.ack()
            await self.cnc.flush(timeout=5)

    async def left(self, name: str) -> int:
        """Messages still in the stream once the acks are applied (polled up to 5 s)."""
        for _ in range(50):
            remaining = (await self.pjs.stream_info(name)).state.messages
            if remaining == 0:
                break
            await asyncio.sleep(0.1)
        await self.pjs.delete_stream(name)
        return remaining

    async def w1c(self, n: int) -> dict:
        name, subject, sub = await self.fresh("W1C")
        pool = os.urandom(SIZE)
        seen = bytearray(n)
        distinct = duplicates = 0
        deadline = time.monotonic() + self.timeout

        async def produce() -> None:
            for start in range(0, n, WINDOW):
                await asyncio.gather(
                    *(
                        self.pjs.publish(subject, message_body(seq, pool))
                        for seq in range(start, min(start + WINDOW, n))
                    )
                )
                if time.monotonic() >= deadline:
                    return

        async def consume() -> None:
            nonlocal distinct, duplicates
            while distinct < n and time.monotonic() < deadline:
                try:
                    msgs = await sub.fetch(batch=WINDOW, timeout=1)
                except TimeoutError:  # nats.errors.TimeoutError is one too
                    continue
                await self.acked(msgs)
                for msg in msgs:
                    seq, _ = HEAD.unpack_from(msg.data)
                    if seen[seq]:
                        duplicates += 1
                    else:
                        seen[seq] = 1
                        distinct += 1

        meter = CpuMeter((self.pid,))
        started = time.perf_counter()
        await asyncio.gather(produce(), consume())
        elapsed = time.perf_counter() - started
        cpu = meter.figures(n)
        await sub.unsubscribe()
        return {
            "msgs_per_s": round(n / elapsed, 1),
            **cpu,
            "missing": n - distinct,
            "duplicates": duplicates,
            "queue_left": await self.left(name),
        }

    async def w2(self, rate: float, duration: float, in_flight_max: int) -> dict:
        name, subject, sub = await self.fresh("W2")
        pool = os.urandom(SIZE)
        slots = int(rate * duration)
        seen = bytearray(slots)
        e2e: list[int] = []
        send_ack: list[int] = []
        late: list[int] = []
        counts = {"in_flight": 0, "sent": 0, "missed_slots": 0, "send_errors": 0, "duplicates": 0}
        tasks: set[asyncio.Task] = set()
        sending_done = asyncio.Event()
        deadline = time.monotonic() + self.timeout

        async def send_one(seq: int) -> None:
            t0 = time.perf_counter_ns()
            try:
                await self.pjs.publish(subject, message_body(seq, pool))
            except nats.errors.Error:
                counts["send_errors"] += 1
            else:
                send_ack.append(time.perf_counter_ns() - t0)
            finally:
                counts["in_flight"] -= 1

        async def consume() -> None:
            while not (
                sending_done.is_set() and len(e2e) >= counts["sent"] - counts["send_errors"]
            ):
                if time.monotonic() >= deadline:
                    return
                try:
                    msgs = await sub.fetch(batch=W2_FETCH, timeout=1)
                except TimeoutError:  # nats.errors.TimeoutError is one too
                    continue
                now = time.time_ns()
                for msg in msgs:
                    seq, sent_ns = HEAD.unpack_from(msg.data)
                    if seen[seq]:
                        counts["duplicates"] += 1
                    else:
                        seen[seq] = 1
                        e2e.append(now - sent_ns)
                await self.acked(msgs)

        meter = CpuMeter((self.pid,))
        consumer = asyncio.create_task(consume())
        perf0 = time.perf_counter() + 0.01
        for slot in range(slots):
            due = perf0 + slot / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if time.monotonic() >= deadline:
                break
            late.append(round((time.perf_counter() - due) * 1e9))
            if counts["in_flight"] >= in_flight_max:
                counts["missed_slots"] += 1
                continue
            counts["in_flight"] += 1
            task = asyncio.create_task(send_one(counts["sent"]))
            counts["sent"] += 1
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        schedule_s = time.perf_counter() - perf0
        if tasks:
            await asyncio.wait_for(asyncio.gather(*tasks), max(1.0, deadline - time.monotonic()))
        sending_done.set()
        await asyncio.wait_for(consumer, max(1.0, deadline - time.monotonic()))
        sent = counts["sent"]
        cpu = meter.figures(sent)
        await sub.unsubscribe()
        return {
            **w2_latency_figures(e2e, send_ack, late),
            "sent_per_s": round(sent / schedule_s, 1),
            **cpu,
            "sent": sent,
            "missed_slots": counts["missed_slots"],
            "send_errors": counts["send_errors"],
            "missing": sent - counts["send_errors"] - len(e2e),
            "duplicates": counts["duplicates"],
            "queue_left": await self.left(name),
        }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=14299)
    parser.add_argument("--server-pid", type=int, default=0)
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--in-flight-max", type=int, default=1000)
    parser.add_argument("--ack", choices=("ack", "sync"), default="ack")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=300.0, help="per phase, s")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    if not (0 < args.messages <= 10_000_000 and 0 < args.rate * args.duration <= 10_000_000):
        raise SystemExit("--messages and --rate x --duration: 1 to 10,000,000")
    if not (1 <= args.repeats <= 100 and 1 <= args.in_flight_max <= 100_000):
        raise SystemExit("--repeats: 1 to 100; --in-flight-max: 1 to 100,000")
    pid = args.server_pid or own_server_pid(
        "nats-server", args.port, (b"-p", b"--port"), joined=False
    )
    runs = []
    async with Bench(f"nats://127.0.0.1:{args.port}", pid, args.ack, args.timeout) as bench:
        v = bench.pnc.connected_server_version
        version = f"{v.major}.{v.minor}.{v.patch}"
        for _ in range(args.repeats):
            runs.append(
                {
                    "w1c": await bench.w1c(args.messages),
                    "w2": await bench.w2(args.rate, args.duration, args.in_flight_max),
                }
            )
    medians = median_figures(runs)
    command = command_line(pid)
    server = {
        "version": version,
        "command": command,
        "nats-py": metadata.version("nats-py"),
        "ack": args.ack,
    }
    if args.json:
        print(json.dumps({"server": server, "medians": medians, "runs": runs}, indent=1))
    else:
        print(f"nats-server {version}: {command}; nats-py {server['nats-py']}, --ack {args.ack}")
        print(w1c_summary(medians, runs))
        print(w2_summary(medians, runs))


if __name__ == "__main__":
    asyncio.run(main())
