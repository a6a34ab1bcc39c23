"""`mqd bench`: end-to-end throughput and latency against a running server.

Producers and consumers run together in this one process, each an asyncio
task with its own connection (DESIGN.md §10 sets the target: 20,000 msgs/s
end to end on the 2-core development machine). Every body starts with its
sequence number and its send time:

    u64 sequence | u64 send time (time.time_ns) | random bytes up to --size

so a consumer can check that every message arrived (duplicates counted,
missing ones reported) and measure latency as ack time - send time. Both
times come from this process's clock, so no clock skew enters.

Producers send windows of --batch messages with `send_batch`, each awaited
before the next; consumers `receive(max_messages=--batch, wait=1)` and ack
each batch with one call. Every loop is bounded by its message count and by
--timeout. The command talks to --address only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import ssl
import struct
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TextIO

from mqd.errors import ConfigError, MqdError, ServerError

if TYPE_CHECKING:
    # The client is imported when a benchmark runs, so `mqd serve` never depends on it.
    from mqd.client import Client, Queue

_HEAD = struct.Struct(">QQ")  # sequence number, send time in ns since the epoch
HEAD_BYTES = _HEAD.size
# Bodies take their random tail from a pool at a varying offset, so they differ
# without one os.urandom call per message.
_POOL_SPREAD_BYTES = 4096
# A long-poll receive waits at most this long, so consumers notice the end
# (or the deadline) within a second.
RECEIVE_WAIT_S = 1.0
MISSING_SHOWN_MAX = 20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `mqd bench` (the CLI wires the subcommand)."""
    parser.add_argument(
        "--address",
        default="127.0.0.1:6470",
        metavar="HOST:PORT",
        help="server to measure (default 127.0.0.1:6470)",
    )
    parser.add_argument(
        "--messages",
        type=int,
        default=100_000,
        metavar="N",
        help="messages to send and receive (default 100000)",
    )
    parser.add_argument(
        "--size",
        type=int,
        default=256,
        metavar="BYTES",
        help=f"body size in bytes, at least {HEAD_BYTES} (default 256)",
    )
    parser.add_argument(
        "--producers",
        type=int,
        default=1,
        metavar="N",
        help="producer tasks, one connection each (default 1)",
    )
    parser.add_argument(
        "--consumers",
        type=int,
        default=1,
        metavar="N",
        help="consumer tasks, one connection each (default 1)",
    )
    parser.add_argument(
        "--batch",
        type=int,
        default=1000,
        metavar="N",
        help="messages per send_batch window and per receive (default 1000)",
    )
    parser.add_argument(
        "--queue",
        default=None,
        metavar="NAME",
        help="queue to use (default: a fresh one, deleted at the end)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="give up after this long (default 300)",
    )
    parser.add_argument("--token", default=None, help="authentication token for HELLO")
    parser.add_argument(
        "--tls-ca",
        default=None,
        metavar="FILE",
        help="use TLS, trusting the CA certificates in FILE",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")


@dataclass(slots=True)
class BenchConfig:
    address: str = "127.0.0.1:6470"
    messages: int = 100_000
    size: int = 256
    producers: int = 1
    consumers: int = 1
    batch: int = 1000
    queue: str | None = None
    timeout_s: float = 300.0
    token: str | None = None
    tls: ssl.SSLContext | None = None

    def validate(self) -> None:
        checks = (
            ("--messages", self.messages, 1),
            ("--size", self.size, HEAD_BYTES),
            ("--producers", self.producers, 1),
            ("--consumers", self.consumers, 1),
            ("--batch", self.batch, 1),
        )
        for option, value, low in checks:
            if value < low:
                raise ConfigError(f"{option} must be at least {low}, got {value}")
        if not self.timeout_s > 0:
            raise ConfigError(f"--timeout must be positive, got {self.timeout_s}")


@dataclass(slots=True)
class _State:
    """What producers and consumers share; one event loop, so no locks."""

    messages: int
    seen: bytearray
    latencies_ns: list[int] = field(default_factory=list)
    sent: int = 0
    distinct: int = 0
    duplicates: int = 0
    foreign: int = 0
    ack_failures: int = 0
    first_received_s: float | None = None
    producers_done_s: float | None = None
    all_acked_s: float | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)


def _percentile(sorted_values: list[int], q: float) -> float:
    if not sorted_values:
        return 0.0
    index = min(len(sorted_values) - 1, int(q * len(sorted_values)))
    return sorted_values[index]


async def _produce(
    queue: Queue, state: _State, first: int, end: int, cfg: BenchConfig, deadline: float
) -> None:
    pack = _HEAD.pack
    tail_bytes = cfg.size - HEAD_BYTES
    pool = os.urandom(tail_bytes + _POOL_SPREAD_BYTES)
    loop = asyncio.get_running_loop()
    for start in range(first, end, cfg.batch):
        if loop.time() >= deadline:
            return
        stop = min(start + cfg.batch, end)
        now_ns = time.time_ns()
        bodies = [
            pack(seq, now_ns) + pool[(o := seq % _POOL_SPREAD_BYTES) : o + tail_bytes]
            for seq in range(start, stop)
        ]
        await queue.send_batch(bodies)
        state.sent += stop - start


async def _consume(queue: Queue, state: _State, receive_max: int, deadline: float) -> None:
    loop = asyncio.get_running_loop()
    unpack = _HEAD.unpack_from
    seen = state.seen
    latencies = state.latencies_ns
    total = state.messages
    while not state.done.is_set():
        left = deadline - loop.time()
        if left <= 0:
            return
        started = loop.time()
        messages = await queue.receive(max_messages=receive_max, wait=min(RECEIVE_WAIT_S, left))
        if not messages:
            continue
        if state.first_received_s is None:
            state.first_received_s = started
        try:
            await queue.ack(messages)
        except ServerError as exc:
            # Some receipts were refused (e.g. their visibility ran out); the
            # rest were deleted. Those messages will come again.
            failures = exc.details.get("failures")
            if failures is None:
                raise
            state.ack_failures += len(failures)
            refused = {f["index"] for f in failures}
            messages = [m for i, m in enumerate(messages) if i not in refused]
        acked_ns = time.time_ns()
        for message in messages:
            seq, sent_ns = unpack(message.body)
            if seq >= total:
                state.foreign += 1
            elif seen[seq]:
                state.duplicates += 1
            else:
                seen[seq] = 1
                latencies.append(acked_ns - sent_ns)
        state.distinct = len(latencies)
        if state.distinct >= total and state.all_acked_s is None:
            state.all_acked_s = loop.time()
            state.done.set()


async def _progress(state: _State, out: TextIO, started: float) -> None:
    loop = asyncio.get_running_loop()
    total = state.messages
    width = 30
    try:
        while True:
            await asyncio.sleep(0.25)
            elapsed = loop.time() - started
            filled = width * state.distinct // total
            bar = "#" * filled + "-" * (width - filled)
            rate = state.distinct / elapsed if elapsed > 0 else 0.0
            out.write(
                f"\r[{bar}] sent {state.sent}/{total} acked {state.distinct}/{total} "
                f"{rate:,.0f} msgs/s {elapsed:.1f} s "
            )
            out.flush()
    finally:
        out.write("\r" + " " * (width + 80) + "\r")
        out.flush()


async def run_bench(cfg: BenchConfig, progress_out: TextIO | None = None) -> dict[str, Any]:
    """Run one benchmark and return its figures (the `--json` object)."""
    cfg.validate()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + cfg.timeout_s
    name = cfg.queue or f"bench-{secrets.token_hex(6)}"
    own_queue = cfg.queue is None
    clients: list[Client] = []

    async def open_client() -> Client:
        from mqd.client import connect

        client = await connect(cfg.address, tls=cfg.tls, token=cfg.token, client_name="mqd-bench")
        clients.append(client)
        return client

    control = await open_client()
    state = _State(cfg.messages, bytearray(cfg.messages))
    try:
        await control.create_queue(name, exist_ok=not own_queue)
        producers = [(await open_client()).queue(name) for _ in range(cfg.producers)]
        consumers = [(await open_client()).queue(name) for _ in range(cfg.consumers)]
        batch_max = control.server_limits.get("batch_messages_max", cfg.batch)
        receive_max = max(1, min(cfg.batch, batch_max))

        started = loop.time()
        progress = None
        if progress_out is not None:
            progress = asyncio.create_task(_progress(state, progress_out, started))

        async def producers_then_mark() -> None:
            n, p = cfg.messages, cfg.producers
            async with asyncio.TaskGroup() as group:
                for i, queue in enumerate(producers):
                    group.create_task(
                        _produce(queue, state, i * n // p, (i + 1) * n // p, cfg, deadline)
                    )
            state.producers_done_s = loop.time()

        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(producers_then_mark())
                consuming = [
                    group.create_task(_consume(queue, state, receive_max, deadline))
                    for queue in consumers
                ]

                async def stop_consumers_when_done() -> None:
                    # Consumers still in a long poll when the last message is
                    # acked would otherwise idle for up to RECEIVE_WAIT_S.
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout_at(deadline):
                            await state.done.wait()
                    for task in consuming:
                        task.cancel()

                group.create_task(stop_consumers_when_done())
        except BaseExceptionGroup as group_exc:
            # Report the first real failure as itself, not wrapped in a group.
            first = group_exc.exceptions[0]
            while isinstance(first, BaseExceptionGroup):
                first = first.exceptions[0]
            raise first from None
        finally:
            if progress is not None:
                progress.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await progress
        finished = loop.time()
    finally:
        try:
            if own_queue:
                await control.delete_queue(name)
        finally:
            for client in clients:
                await client.close()

    return _figures(cfg, name, state, started, finished)


def _figures(
    cfg: BenchConfig, name: str, state: _State, started: float, finished: float
) -> dict[str, Any]:
    n = cfg.messages
    latencies = sorted(state.latencies_ns)
    missing = [seq for seq in range(n) if not state.seen[seq]] if state.distinct < n else []
    send_s = (state.producers_done_s or finished) - started
    e2e_s = (state.all_acked_s or finished) - started
    consume_s = (state.all_acked_s or finished) - (state.first_received_s or started)
    return {
        "address": cfg.address,
        "queue": name,
        "messages": n,
        "size": cfg.size,
        "producers": cfg.producers,
        "consumers": cfg.consumers,
        "batch": cfg.batch,
        "sent": state.sent,
        "delivered": state.distinct,
        "duplicates": state.duplicates,
        "foreign": state.foreign,
        "ack_failures": state.ack_failures,
        "missing": len(missing),
        "missing_first": missing[:MISSING_SHOWN_MAX],
        "send_msgs_per_s": round(state.sent / send_s, 1) if send_s > 0 else 0.0,
        "receive_ack_msgs_per_s": round(state.distinct / consume_s, 1) if consume_s > 0 else 0.0,
        "e2e_msgs_per_s": round(state.distinct / e2e_s, 1) if e2e_s > 0 else 0.0,
        "latency_ms_p50": round(_percentile(latencies, 0.50) / 1e6, 3),
        "latency_ms_p99": round(_percentile(latencies, 0.99) / 1e6, 3),
        "latency_ms_p999": round(_percentile(latencies, 0.999) / 1e6, 3),
        "latency_ms_max": round((latencies[-1] if latencies else 0) / 1e6, 3),
        "elapsed_s": round(finished - started, 3),
        "timed_out": state.distinct < n,
        "ok": not missing,
    }


def format_report(result: dict[str, Any]) -> str:
    r = result
    lines = [
        f"mqd bench: {r['messages']} messages of {r['size']} B, {r['producers']} producer(s), "
        f"{r['consumers']} consumer(s), batch {r['batch']}, queue {r['queue']} at {r['address']}",
        f"  send:         {r['send_msgs_per_s']:>12,.0f} msgs/s",
        f"  receive+ack:  {r['receive_ack_msgs_per_s']:>12,.0f} msgs/s",
        f"  end to end:   {r['e2e_msgs_per_s']:>12,.0f} msgs/s  ({r['elapsed_s']:.2f} s)",
        f"  latency ms:   p50 {r['latency_ms_p50']:.2f}  p99 {r['latency_ms_p99']:.2f}  "
        f"p99.9 {r['latency_ms_p999']:.2f}  max {r['latency_ms_max']:.2f}",
        f"  delivered {r['delivered']}/{r['messages']}, duplicates {r['duplicates']}, "
        f"missing {r['missing']}, refused acks {r['ack_failures']}"
        + (f", from elsewhere {r['foreign']}" if r["foreign"] else ""),
    ]
    if r["missing"]:
        shown = ", ".join(map(str, r["missing_first"]))
        more = " …" if r["missing"] > len(r["missing_first"]) else ""
        lines.append(f"  MISSING sequence numbers: {shown}{more}")
        if r["timed_out"]:
            lines.append("  (gave up at --timeout)")
    return "\n".join(lines)


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    tls = None
    if getattr(args, "tls_ca", None):
        try:
            tls = ssl.create_default_context(cafile=args.tls_ca)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"--tls-ca: cannot load {args.tls_ca!r}: {exc}") from exc
    cfg = BenchConfig(
        address=args.address,
        messages=args.messages,
        size=args.size,
        producers=args.producers,
        consumers=args.consumers,
        batch=args.batch,
        queue=args.queue,
        timeout_s=args.timeout,
        token=getattr(args, "token", None),
        tls=tls,
    )
    cfg.validate()
    return cfg


def _run(coro: Any) -> Any:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency
        return asyncio.run(coro)
    return uvloop.run(coro)


def main(args: argparse.Namespace) -> int:
    """Run `mqd bench`; exit status 0 if every message arrived, 1 if any is missing."""
    cfg = config_from_args(args)
    show_progress = not args.json and sys.stderr.isatty()
    try:
        result = _run(run_bench(cfg, sys.stderr if show_progress else None))
    except MqdError as exc:
        if args.json:
            print(json.dumps({"ok": False, "error": str(exc), "error_type": type(exc).__name__}))
            return 1
        raise
    if args.json:
        print(json.dumps(result))
    else:
        print(format_report(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":  # python -m mqd.bench, for use without the CLI
    _parser = argparse.ArgumentParser(prog="mqd bench", description=__doc__.splitlines()[0])
    add_arguments(_parser)
    sys.exit(main(_parser.parse_args()))
