"""W1c and W2 of `mqd bench` against a RabbitMQ quorum queue, for the README's peer table.

The same shapes as mqd's workloads (issue 7), driven by aio-pika (asyncio) in
one process: 256-byte bodies (8-byte sequence, 8-byte send time, random rest),
each phase on a fresh durable quorum queue (`x-queue-type: quorum`), checked
for missing and duplicate sequence numbers and for messages left in the queue.

- W1c: 1 producer and 1 consumer, each with its own connection, started
  together. The producer publishes windows of 1000 on a channel with publisher
  confirms (1000 publishes gathered, each waiting for its confirm); the
  consumer has prefetch 1000 and acks with `multiple=True`, one ack for each
  burst of deliveries. N / time until the N-th distinct message is acked (the
  ack written and a passive queue.declare on the same channel answered, so
  the broker's channel has taken it: basic.ack itself has no reply).
- W2: open loop, one publish (with confirm) per slot at --rate for --duration
  s, at most --in-flight-max unconfirmed (a slot beyond it is skipped and
  counted as missed); one consumer with prefetch 100 and the same acks. End
  to end: receive time - the publish call's time (in the body);
  publish->confirm: how long each publish took.

Beside every figure stand the broker's CPU time per message (utime + stime
from /proc of the processes listening on --port and --epmd-port, i.e.
beam.smp and epmd, and of their descendants such as erl_child_setup;
--server-pid overrides) and this process's (`time.process_time`). With
--repeats each workload runs that many times and the figures are the medians
(the raw runs are in --json).

    apt-get install rabbitmq-server       # 3.10 on Debian 12; not its service: an own node
    d=/tmp/peer-rabbit; mkdir -p $d/mnesia $d/log $d/home && echo '[].' > $d/enabled_plugins
    : > $d/rabbitmq-env.conf; echo 'listeners.tcp.1 = 127.0.0.1:16572' > $d/rabbitmq.conf
    echo '[{kernel, [{inet_dist_use_interface, {127,0,0,1}}]}].' > $d/advanced.config
    env HOME=$d/home RABBITMQ_NODENAME=peerbench@localhost RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 \\
        RABBITMQ_NODE_PORT=16572 RABBITMQ_DIST_PORT=25672 ERL_EPMD_PORT=14369 \\
        ERL_EPMD_ADDRESS=127.0.0.1 RABBITMQ_MNESIA_BASE=$d/mnesia RABBITMQ_LOG_BASE=$d/log \\
        RABBITMQ_ENABLED_PLUGINS_FILE=$d/enabled_plugins \\
        RABBITMQ_CONF_ENV_FILE=$d/rabbitmq-env.conf RABBITMQ_CONFIG_FILE=$d/rabbitmq.conf \\
        RABBITMQ_ADVANCED_CONFIG_FILE=$d/advanced.config \\
        /usr/lib/rabbitmq/bin/rabbitmq-server &    # as root: /usr/sbin's wrapper su's to rabbitmq
    python3 -m venv /tmp/peer-venv-rmq && /tmp/peer-venv-rmq/bin/pip install aio-pika
    /tmp/peer-venv-rmq/bin/python tools/peer_bench_rabbitmq.py --port 16572 --repeats 3

Every loop is bounded by its message count and by --timeout (per phase).
Not part of the test suite and not a dependency of mqd: a measuring tool.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import json
import os
import statistics
import time
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from aio_pika.exceptions import AMQPError

# Found beside this script: `python tools/peer_bench_rabbitmq.py` puts tools/ on sys.path.
from peer_common import (
    HEAD,
    SIZE,
    CpuMeter,
    max_ms,
    message_body,
    percentile_ms,
    proc_stat_fields,
)

W1C_WINDOW = 1000
W1C_PREFETCH = 1000
W2_PREFETCH = 100
QUEUE_ARGS = {"x-queue-type": "quorum"}
# The checks take the worst run; every other number its median.
WORST = {"missing": max, "duplicates": max, "foreign": max, "queue_left": max, "send_errors": max}


def _message(body: bytes) -> aio_pika.Message:
    return aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT)


# ---------------------------------------------------------------------------
# The broker's processes, from /proc (read-only)


def _listening_pids(ports: set[int]) -> set[int]:
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as handle:
            for line in handle.readlines()[1:]:
                parts = line.split()
                if parts[3] == "0A" and int(parts[1].rsplit(":", 1)[1], 16) in ports:
                    inodes.add(f"socket:[{parts[9]}]")
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{entry}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{entry}/fd/{fd}") in inodes:
                        found.add(int(entry))
                        break
    return found


def _with_descendants(roots: set[int]) -> tuple[int, ...]:
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                parents[int(entry)] = int(proc_stat_fields(int(entry))[1])
    found = set(roots)
    for _ in range(len(parents)):  # one generation a pass
        more = {pid for pid, ppid in parents.items() if ppid in found} - found
        if not more:
            break
        found |= more
    return tuple(sorted(found))


def _names(pids: tuple[int, ...]) -> list[str]:
    out = []
    for pid in pids:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/comm") as handle:
            out.append(f"{pid} {handle.read().strip()}")
    return out


# ---------------------------------------------------------------------------
# Consumer side


class Tally:
    """Sequence-number checks and acks: one `multiple=True` ack per burst of deliveries."""

    def __init__(self, expected: int) -> None:
        self.seen = bytearray(expected)
        self.distinct = self.duplicates = self.foreign = self.acks_sent = 0
        self.e2e_ns: list[int] = []
        self.latest: AbstractIncomingMessage | None = None
        self.wake = asyncio.Event()
        self.changed = asyncio.Event()

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        now_ns = time.time_ns()
        seq, sent_ns = HEAD.unpack_from(message.body)
        if seq >= len(self.seen):
            self.foreign += 1
        elif self.seen[seq]:
            self.duplicates += 1
        else:
            self.seen[seq] = 1
            self.distinct += 1
            self.e2e_ns.append(now_ns - sent_ns)
        self.latest = message
        self.wake.set()
        self.changed.set()

    async def flush(self) -> None:
        message, self.latest = self.latest, None
        if message is not None:
            await message.ack(multiple=True)
            self.acks_sent += 1

    async def acker(self) -> None:
        # Ends by cancellation when its phase ends (each phase is bounded by --timeout).
        while True:
            await self.wake.wait()
            self.wake.clear()
            await asyncio.sleep(0)  # let the rest of this burst's callbacks run first
            await self.flush()

    async def wait_for(self, count: int) -> None:
        while self.distinct < count:
            self.changed.clear()
            await self.changed.wait()


async def _queue_left(setup: AbstractChannel, name: str) -> int:
    declared = await setup.declare_queue(name, passive=True)
    left = declared.declaration_result.message_count
    await setup.queue_delete(name)
    return left


async def _open(url: str, confirms: bool) -> tuple[Any, AbstractChannel]:
    connection = await aio_pika.connect(url)
    return connection, await connection.channel(publisher_confirms=confirms)


# ---------------------------------------------------------------------------
# Workloads


async def w1c(url: str, n: int, pids: tuple[int, ...], limit_s: float) -> dict:
    name = f"w1c-{time.time_ns()}"
    pool = os.urandom(SIZE)
    setup_conn, setup = await _open(url, False)
    await setup.declare_queue(name, durable=True, arguments=QUEUE_ARGS)
    prod_conn, prod = await _open(url, True)
    cons_conn, cons = await _open(url, False)
    await cons.set_qos(prefetch_count=W1C_PREFETCH)
    queue = await cons.get_queue(name, ensure=False)
    exchange = prod.default_exchange
    tally = Tally(n)
    send_errors = 0

    async def produce() -> None:
        nonlocal send_errors
        for start in range(0, n, W1C_WINDOW):
            results = await asyncio.gather(
                *(
                    exchange.publish(_message(message_body(seq, pool)), routing_key=name)
                    for seq in range(start, min(start + W1C_WINDOW, n))
                ),
                return_exceptions=True,
            )
            send_errors += sum(isinstance(result, BaseException) for result in results)

    async def consume() -> None:
        await queue.consume(tally.on_message)
        await tally.wait_for(n)
        await tally.flush()
        await cons.declare_queue(name, passive=True)  # the channel has taken the last ack

    acker = asyncio.create_task(tally.acker())
    meter = CpuMeter(pids)
    started = time.perf_counter()
    timed_out = False
    try:
        async with asyncio.timeout(limit_s):
            await asyncio.gather(produce(), consume())
    except TimeoutError:
        timed_out = True
    elapsed = time.perf_counter() - started
    cpu = meter.figures(n)
    acker.cancel()
    await asyncio.gather(acker, return_exceptions=True)
    await cons_conn.close()  # unacked messages, if any, go back to the queue
    await prod_conn.close()
    left = await _queue_left(setup, name)
    await setup_conn.close()
    return {
        "msgs_per_s": round(n / elapsed, 1),
        **cpu,
        "elapsed_s": round(elapsed, 3),
        "acks_sent": tally.acks_sent,
        "missing": n - tally.distinct,
        "duplicates": tally.duplicates,
        "foreign": tally.foreign,
        "send_errors": send_errors,
        "queue_left": left,
        "timed_out": timed_out,
    }


async def w2(
    url: str,
    rate: float,
    duration: float,
    in_flight_max: int,
    pids: tuple[int, ...],
    limit_s: float,
) -> dict:
    name = f"w2-{time.time_ns()}"
    pool = os.urandom(SIZE)
    setup_conn, setup = await _open(url, False)
    await setup.declare_queue(name, durable=True, arguments=QUEUE_ARGS)
    prod_conn, prod = await _open(url, True)
    cons_conn, cons = await _open(url, False)
    await cons.set_qos(prefetch_count=W2_PREFETCH)
    queue = await cons.get_queue(name, ensure=False)
    exchange = prod.default_exchange
    slots = round(rate * duration)
    tally = Tally(slots)
    confirm_ns: list[int] = []
    late_ns: list[int] = []
    tasks: set[asyncio.Task] = set()
    counts = {"in_flight": 0, "sent": 0, "missed_slots": 0, "send_errors": 0}

    async def send_one(seq: int) -> None:
        t0 = time.perf_counter_ns()
        try:
            await exchange.publish(_message(message_body(seq, pool)), routing_key=name)
        except AMQPError:
            counts["send_errors"] += 1
        else:
            confirm_ns.append(time.perf_counter_ns() - t0)
        finally:
            counts["in_flight"] -= 1

    async def send_all() -> None:
        perf0 = time.perf_counter() + 0.01
        for slot in range(slots):
            due = perf0 + slot / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            late_ns.append(round((time.perf_counter() - due) * 1e9))
            if counts["in_flight"] >= in_flight_max:
                counts["missed_slots"] += 1
                continue
            counts["in_flight"] += 1
            task = asyncio.create_task(send_one(counts["sent"]))
            counts["sent"] += 1
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.gather(*tasks)
        await tally.wait_for(counts["sent"] - counts["send_errors"])

    acker = asyncio.create_task(tally.acker())
    meter = CpuMeter(pids)
    await queue.consume(tally.on_message)
    timed_out = False
    started = time.perf_counter()
    try:
        async with asyncio.timeout(limit_s):
            await send_all()
    except TimeoutError:
        timed_out = True
    elapsed = time.perf_counter() - started
    await tally.flush()
    await cons.declare_queue(name, passive=True)
    cpu = meter.figures(tally.distinct)
    for task in [*tasks, acker]:
        task.cancel()
    await asyncio.gather(*tasks, acker, return_exceptions=True)
    await cons_conn.close()
    await prod_conn.close()
    left = await _queue_left(setup, name)
    await setup_conn.close()
    e2e = tally.e2e_ns
    return {
        "e2e_ms_p50": percentile_ms(e2e, 0.5),
        "e2e_ms_p99": percentile_ms(e2e, 0.99),
        "e2e_ms_p999": percentile_ms(e2e, 0.999),
        "e2e_ms_max": max_ms(e2e),
        "confirm_ms_p50": percentile_ms(confirm_ns, 0.5),
        "confirm_ms_p99": percentile_ms(confirm_ns, 0.99),
        "confirm_ms_max": max_ms(confirm_ns),
        "send_late_ms_p99": percentile_ms(late_ns, 0.99),
        **cpu,
        "elapsed_s": round(elapsed, 3),
        "slots": slots,
        "sent": counts["sent"],
        "missed_slots": counts["missed_slots"],
        "acks_sent": tally.acks_sent,
        "missing": counts["sent"] - tally.distinct,
        "duplicates": tally.duplicates,
        "foreign": tally.foreign,
        "send_errors": counts["send_errors"],
        "queue_left": left,
        "timed_out": timed_out,
    }


# ---------------------------------------------------------------------------
# Command line


def _median(runs: list[dict]) -> dict:
    out: dict[str, Any] = {}
    for key, first in runs[0].items():
        values = [run[key] for run in runs]
        if key in WORST:
            out[key] = WORST[key](values)
        elif isinstance(first, bool):
            out[key] = any(values)
        elif any(value is None for value in values):
            out[key] = None
        else:
            out[key] = statistics.median(values)
    return out


def _ok(f: dict) -> bool:
    return not (any(f[key] for key in WORST) or f["timed_out"])


def _report(result: dict) -> str:
    b = result["broker"]
    one, two = result["medians"]["w1c"], result["medians"]["w2"]
    runs = result["runs"]
    w1c_runs = ", ".join(f"{run['w1c']['msgs_per_s']:,.0f}" for run in runs)
    return "\n".join(
        [
            f"RabbitMQ {b['version']} ({b['platform']}), quorum queue {b['queue_arguments']}, "
            f"aio-pika {b['aio_pika']}, median of {len(runs)}, server pids {b['server_pids']}",
            f"  w1c  N {result['messages']}: {one['msgs_per_s']:,.0f} msgs/s "
            f"(runs {w1c_runs}), "
            f"server {one['server_cpu_us_per_msg']} µs/msg, "
            f"client {one['client_cpu_us_per_msg']} µs/msg, "
            f"{'ok' if _ok(one) else 'FAILED (see --json)'}",
            f"  w2   {two['sent']}/{two['slots']} sent, missed slots {two['missed_slots']}: "
            f"e2e ms p50 {two['e2e_ms_p50']:.2f} p99 {two['e2e_ms_p99']:.2f} "
            f"p99.9 {two['e2e_ms_p999']:.2f} max {two['e2e_ms_max']:.2f}; publish->confirm ms "
            f"p50 {two['confirm_ms_p50']:.2f} p99 {two['confirm_ms_p99']:.2f}; "
            f"server {two['server_cpu_us_per_msg']} µs/msg, "
            f"client {two['client_cpu_us_per_msg']} µs/msg, "
            f"{'ok' if _ok(two) else 'FAILED (see --json)'}",
        ]
    )


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=16572)
    parser.add_argument("--epmd-port", type=int, default=14369)
    parser.add_argument("--server-pid", type=int, action="append", default=[])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--in-flight-max", type=int, default=1000)
    parser.add_argument("--timeout", type=float, default=600.0, help="per phase, s")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workloads", default="w1c,w2")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    url = f"amqp://guest:guest@127.0.0.1:{args.port}/"
    roots = set(args.server_pid) or _listening_pids({args.port, args.epmd_port})
    pids = _with_descendants(roots) if not args.server_pid else tuple(sorted(roots))
    probe = await aio_pika.connect(url)
    props = probe.transport.connection.server_properties
    await probe.close()
    wanted = args.workloads.split(",")
    runs = []
    for _ in range(args.repeats):
        run = {}
        if "w1c" in wanted:
            run["w1c"] = await w1c(url, args.messages, pids, args.timeout)
        if "w2" in wanted:
            run["w2"] = await w2(
                url, args.rate, args.duration, args.in_flight_max, pids, args.timeout
            )
        runs.append(run)
    medians = {name: _median([run[name] for run in runs]) for name in runs[0]}
    result = {
        "broker": {
            "version": str(props.get("version")),
            "platform": str(props.get("platform")),
            "queue_arguments": QUEUE_ARGS,
            "aio_pika": importlib.metadata.version("aio-pika"),
            "server_pids": _names(pids),
        },
        "messages": args.messages,
        "medians": medians,
        "runs": runs,
    }
    if args.json:
        print(json.dumps(result, indent=1))
    elif set(medians) == {"w1c", "w2"}:
        print(_report(result))
    else:
        print(json.dumps(medians, indent=1))
    return 0 if all(_ok(m) for m in medians.values()) else 1


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
