"""`mqd bench`: end-to-end throughput and latency against a running server.

Every client runs in this one Python process, as a Python application would
use them: asyncio tasks, each with its own connection (DESIGN.md §10 sets the
target: 20,000 msgs/s end to end on the 2-core development machine). Every
body starts with its sequence number and a send time:

    u64 sequence | u64 send time (time.time_ns) | random bytes up to --size

so a consumer can check that every message arrived (duplicates counted,
missing ones reported) and measure latency. Both times come from this
process's clock, so no clock skew enters.

--workload picks the shape (the same shapes the comparison uses):

- w1  throughput, N = --messages: (a) produce N in `send_batch` windows of
      --batch, each awaited; (b) then consume N with
      `receive(max_messages=--batch, wait=1)` + `ack` of each batch; (c) on a
      fresh queue, 1 producer and 1 consumer started together: N / time until
      the N-th distinct message is acked.
- w2  latency, open loop: --rate sends a second for --duration s, one message
      per `send`, at most --in-flight-max sends unanswered (a slot that finds
      the bound reached is skipped and counted as missed); one consumer with
      `receive(max_messages=100, wait=1)` + `ack`. End-to-end latency is
      receive time - the send call's time (written in the body), so a
      late sender shows up in it rather than hiding (no coordinated
      omission); send->acknowledge is the duration of each `send` call.
      `--w2-consumer push` takes the messages from SUBSCRIBE pushes instead.
      Beside the latencies: the log fsyncs the server made over the run
      (STATS fsync histogram, summed over a cluster frontend's nodes).
- w3  4 producers + 4 consumers together, each with its own connection, N in
      total.
- custom  the shape the options say (--producers, --consumers, --batch,
      --queue): producers and consumers together; the original `mqd bench`.

Each phase checks the sequence numbers (none missing, none duplicated) and
that its queue is empty afterwards; the exit status is 1 if any check fails.
Beside every figure stand the server's CPU time per message (utime + stime
of its processes from /proc/PID/stat, all threads; --server-pid, or found as
the `mqd serve` processes of this user listening on --address's port) and
this process's CPU time per message (`time.process_time`). With --repeats
each workload runs that many times, each on fresh queues, and the figures are
the medians (the raw runs are in --json).

Every loop is bounded by its message count and by --timeout (per phase). The
command talks to --address only and only reads /proc: it signals nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import secrets
import ssl
import statistics
import struct
import sys
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TextIO

from mqd.errors import ConfigError, MqdError, QueueNotFound, ServerError

if TYPE_CHECKING:
    # The client is imported when a benchmark runs, so `mqd serve` never depends on it.
    from mqd.client import Client, Message, Queue

_HEAD = struct.Struct(">QQ")  # sequence number, send time in ns since the epoch
HEAD_BYTES = _HEAD.size
# Bodies take their random tail from a pool at a varying offset, so they differ
# without one os.urandom call per message.
_POOL_SPREAD_BYTES = 4096
# A long-poll receive waits at most this long, so consumers notice the end
# (or the deadline) within a second.
RECEIVE_WAIT_S = 1.0
MISSING_SHOWN_MAX = 20

WORKLOADS = ("w1", "w2", "w3", "all", "custom")
W2_RECEIVE_MAX = 100  # the contract's receive size for the latency workload
# Shorter than the 16-byte header every measured body starts with: never mistaken for one.
W2_WARM_UP_BODY = b"w2 warm-up"
W3_CLIENTS = 4  # producers, and as many consumers
# Limits on the options, so a typo cannot ask for a run that never ends or
# eats the machine's memory (seen[] is one byte per message, latencies 8+).
MESSAGES_MAX = 50_000_000
REPEATS_MAX = 100
W2_SLOTS_MAX = 10_000_000
IN_FLIGHT_MAX_MAX = 100_000
SERVER_PIDS_MAX = 64
# Figures a run-to-run median would hide: a failed check in any run counts.
_WORST_OF_RUNS = {
    "sent": min,
    "delivered": min,
    "duplicates": max,
    "foreign": max,
    "missing": max,
    "ack_failures": max,
    "send_errors": max,
    "missed_slots": max,
    "unsent_slots": max,
    "queue_left": max,
    "ids_duplicated": max,
    "queue_depth_after": min,
    "timed_out": any,
    "ok": all,
}
# The shape of a run, the same in every run: not a figure to take the median of.
_SHAPE_KEYS = {
    "messages",
    "producers",
    "consumers",
    "slots",
    "in_flight_max",
    "w2_consumer",
    "rate_per_s",
    "duration_s",
    "size",
    "batch",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `mqd bench` (the CLI wires the subcommand)."""
    parser.add_argument(
        "--address",
        default="127.0.0.1:6470",
        metavar="HOST:PORT",
        help="server to measure (default 127.0.0.1:6470)",
    )
    parser.add_argument(
        "--workload",
        choices=WORKLOADS,
        default="custom",
        help="w1 throughput (a produce, b consume, c both), w2 open-loop latency, "
        "w3 4 producers + 4 consumers, all of them, or custom: the shape the "
        "options below say (default custom)",
    )
    parser.add_argument(
        "--messages",
        type=int,
        default=None,
        metavar="N",
        help="messages to send and receive, per phase of w1, w3 and custom (default 100000)",
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
        default=None,
        metavar="N",
        help="custom: producer tasks, one connection each (default 1)",
    )
    parser.add_argument(
        "--consumers",
        type=int,
        default=None,
        metavar="N",
        help="custom: consumer tasks, one connection each (default 1)",
    )
    parser.add_argument(
        "--batch",
        type=int,
        default=None,
        metavar="N",
        help="messages per send_batch window and per receive (default 1000)",
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=None,
        metavar="MSGS_PER_S",
        help="w2: scheduled sends per second (default 1000)",
    )
    parser.add_argument(
        "--duration",
        type=float,
        default=None,
        metavar="SECONDS",
        help="w2: how long to send (default 10)",
    )
    parser.add_argument(
        "--in-flight-max",
        type=int,
        default=None,
        metavar="N",
        help="w2: at most this many sends unanswered; a slot beyond it is missed (default 1000)",
    )
    parser.add_argument(
        "--w2-consumer",
        choices=("poll", "push"),
        default=None,
        help="w2: the consumer long-polls `receive(max_messages=100, wait=1)` (poll, the "
        "comparison's shape) or takes pushed messages from `queue.consume(prefetch=100)` "
        "(push, SUBSCRIBE; each message acked without holding up the next) (default poll)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        metavar="N",
        help="run each workload N times, each on fresh queues; report medians (default 1)",
    )
    parser.add_argument(
        "--server-pid",
        type=int,
        action="append",
        default=None,
        metavar="PID",
        help="a server process whose CPU time to count (repeatable; default: the "
        "`mqd serve` processes of this user listening on --address's port)",
    )
    parser.add_argument(
        "--queue",
        default=None,
        metavar="NAME",
        help="custom: an empty queue to use, kept at the end (default: a fresh one, "
        "deleted at the end)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="give up on a phase after this long (default 300)",
    )
    parser.add_argument("--token", default=None, help="authentication token for HELLO")
    parser.add_argument(
        "--tls-ca",
        default=None,
        metavar="FILE",
        help="use TLS, trusting the CA certificates in FILE",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")


# The workloads that read a workload-specific option (others refuse it).
_OPTION_WORKLOADS = {
    "--messages": ("w1", "w3", "all", "custom"),
    "--batch": ("w1", "w3", "all", "custom"),
    "--producers": ("custom",),
    "--consumers": ("custom",),
    "--rate": ("w2", "all"),
    "--duration": ("w2", "all"),
    "--in-flight-max": ("w2", "all"),
    "--w2-consumer": ("w2", "all"),
}


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
    workload: str = "custom"
    repeats: int = 1
    rate_per_s: float = 1000.0
    duration_s: float = 10.0
    in_flight_max: int = 1000
    w2_consumer: str = "poll"
    server_pids: tuple[int, ...] = ()
    # The workload-specific options given on the command line: one the workload
    # does not use is refused rather than silently ignored.
    given: frozenset[str] = frozenset()

    def validate(self) -> None:
        checks = (
            ("--messages", self.messages, 1, MESSAGES_MAX),
            ("--size", self.size, HEAD_BYTES, 1 << 30),
            ("--producers", self.producers, 1, 10_000),
            ("--consumers", self.consumers, 1, 10_000),
            ("--batch", self.batch, 1, 1_000_000),
            ("--repeats", self.repeats, 1, REPEATS_MAX),
            ("--in-flight-max", self.in_flight_max, 1, IN_FLIGHT_MAX_MAX),
        )
        for option, value, low, high in checks:
            if value < low:
                raise ConfigError(f"{option} must be at least {low}, got {value}")
            if value > high:
                raise ConfigError(f"{option} must be at most {high}, got {value}")
        if not self.timeout_s > 0:
            raise ConfigError(f"--timeout must be positive, got {self.timeout_s}")
        if self.workload not in WORKLOADS:
            raise ConfigError(f"--workload must be one of {', '.join(WORKLOADS)}")
        if not 0 < self.rate_per_s <= W2_SLOTS_MAX:
            raise ConfigError(f"--rate must be in (0, {W2_SLOTS_MAX}], got {self.rate_per_s}")
        if not self.duration_s > 0:
            raise ConfigError(f"--duration must be positive, got {self.duration_s}")
        if self.workload in ("w2", "all") and not 1 <= self.w2_slots <= W2_SLOTS_MAX:
            raise ConfigError(
                f"--rate x --duration must give 1 to {W2_SLOTS_MAX} messages, got {self.w2_slots}"
            )
        for option in sorted(self.given):
            uses = _OPTION_WORKLOADS.get(option, WORKLOADS)
            if self.workload not in uses:
                raise ConfigError(
                    f"{option} does not apply to --workload {self.workload}; it applies to "
                    + ", ".join(uses)
                )
        if self.queue is not None and self.workload != "custom":
            raise ConfigError(
                "--queue works with --workload custom only (w1, w2 and w3 make fresh queues)"
            )
        if len(self.server_pids) > SERVER_PIDS_MAX:
            raise ConfigError(f"--server-pid given more than {SERVER_PIDS_MAX} times")
        for pid in self.server_pids:
            if pid <= 0 or proc_cpu_ticks(pid) is None:
                raise ConfigError(f"--server-pid {pid}: no such process to read in /proc")

    @property
    def w2_slots(self) -> int:
        return round(self.rate_per_s * self.duration_s)


# ---------------------------------------------------------------------------
# CPU time from /proc (read-only)


def _clock_ticks_per_s() -> int:
    try:
        return os.sysconf("SC_CLK_TCK")
    except (ValueError, OSError):  # pragma: no cover - Linux always has it
        return 100


_TICKS_PER_S = _clock_ticks_per_s()


def proc_cpu_ticks(pid: int) -> int | None:
    """utime + stime of a process (all its threads) and of its live children (a node's
    sync process, mqd.storage.syncer) in clock ticks, or None if unreadable."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces; the
    # fields after the last ')' start at field 3 (state), so utime (14) and
    # stime (15) are at 11 and 12.
    fields = raw[raw.rfind(b")") + 2 :].split()
    try:
        ticks = int(fields[11]) + int(fields[12])
    except (IndexError, ValueError):
        return None
    for child in live_children(pid):
        ticks += proc_cpu_ticks(child) or 0
    return ticks


def live_children(pid: int) -> list[int]:
    """The pids of a process's children that are running, [] if unreadable (a kernel
    without CONFIG_PROC_CHILDREN, or the process gone)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children", "rb") as f:
            return [int(child) for child in f.read().split()]
    except (OSError, ValueError):
        return []


def _listening_inodes(port: int) -> set[str]:
    """Socket inodes listening on `port` (any local address), from /proc/net/tcp{,6}."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                lines = f.readlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if len(parts) < 10 or parts[3] != "0A":  # 0A: LISTEN
                continue
            local_port = parts[1].rsplit(":", 1)[-1]
            if int(local_port, 16) == port:
                inodes.add(parts[9])
    return inodes


def find_server_pids(address: str) -> list[int]:
    """The `mqd serve` processes of this user listening on the port(s) of `address`.

    Only reads /proc: our own processes' fd links, nobody else's (those are
    not readable anyway). Returns [] when none is found, e.g. a server of
    another user, in a container, or on another host.
    """
    ports = set()
    for item in address.split(","):
        _, _, port_text = item.strip().rpartition(":")
        if port_text.isdigit():
            ports.add(int(port_text))
    targets = {f"socket:[{inode}]" for port in ports for inode in _listening_inodes(port)}
    if not targets:
        return []
    uid, me = os.getuid(), os.getpid()
    found = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for entry in entries:
        if not entry.isdigit() or int(entry) == me:
            continue
        pid = int(entry)
        try:
            if os.stat(f"/proc/{pid}").st_uid != uid:
                continue
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            if b"serve" not in argv or not any(b"mqd" in part for part in argv):
                continue
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") in targets:
                    found.append(pid)
                    break
            except OSError:
                continue
    return sorted(found)


class CpuMeter:
    """Server and client CPU time over one phase, per message."""

    def __init__(self, server_pids: Iterable[int]) -> None:
        self.server_pids = tuple(server_pids)
        self._server_ticks: int | None = None
        self._client_s = 0.0

    def _server_now(self) -> int | None:
        if not self.server_pids:
            return None
        total = 0
        for pid in self.server_pids:
            ticks = proc_cpu_ticks(pid)
            if ticks is None:  # gone (or restarted) mid-run: no figure rather than a wrong one
                return None
            total += ticks
        return total

    def start(self) -> None:
        self._server_ticks = self._server_now()
        self._client_s = time.process_time()

    def figures(self, messages: int) -> dict[str, Any]:
        client_s = time.process_time() - self._client_s
        server_now = self._server_now()
        server_s = None
        if server_now is not None and self._server_ticks is not None:
            server_s = (server_now - self._server_ticks) / _TICKS_PER_S
        per = max(1, messages)
        return {
            "server_cpu_s": None if server_s is None else round(server_s, 3),
            "server_cpu_us_per_msg": None if server_s is None else round(server_s * 1e6 / per, 2),
            "client_cpu_s": round(client_s, 3),
            "client_cpu_us_per_msg": round(client_s * 1e6 / per, 2),
        }


_FSYNC_BUCKET = "mqd_fsync_seconds_bucket{le="


def fsync_buckets(stats: dict[str, Any]) -> dict[float, float]:
    """The cumulative log-fsync time buckets (seconds -> count) of a STATS answer; a
    cluster frontend's answer adds up those of the nodes it reports (`nodes`)."""
    sources = [stats.get("metrics") or {}]
    sources += [
        node.get("metrics") or {} for node in (stats.get("nodes") or {}).values()
        if isinstance(node, dict)
    ]  # fmt: skip
    buckets: dict[float, float] = {}
    for metrics in sources:
        for key, value in metrics.items():
            if key.startswith(_FSYNC_BUCKET):
                le = float(key[len(_FSYNC_BUCKET) : -1])  # "+Inf" reads as inf
                buckets[le] = buckets.get(le, 0.0) + value
    return buckets


def server_syncers(stats: dict[str, Any]) -> str | None:
    """Where the server's log fsyncs go when its loop does not make them (STATS
    storage `syncer`: io_uring, sync_process or threads); a cluster frontend's
    answer names its nodes' (joined with "+" where they differ)."""
    sources = [stats, *(n for n in (stats.get("nodes") or {}).values() if isinstance(n, dict))]
    names = {
        syncer
        for source in sources
        if isinstance(syncer := (source.get("storage") or {}).get("syncer"), str)
    }
    return "+".join(sorted(names)) or None


async def _server_stats(client: Client) -> dict[str, Any] | None:
    """The server's STATS now, or None if it is not ours to read."""
    try:
        return await client.stats()
    except MqdError:
        return None


def fsync_figures(
    before: dict[float, float] | None, after: dict[float, float] | None
) -> dict[str, Any]:
    """The server's log fsyncs between two snapshots: how many, the bucket bound
    their p99 is under (ms), and how many took over 1 ms — the disk's share of a
    latency figure (W2 on a disk with slow spells has late messages in runs)."""
    if before is None or after is None or math.inf not in after:
        return {"server_fsyncs": None, "server_fsync_ms_p99_le": None,
                "server_fsyncs_over_1ms": None}  # fmt: skip
    delta = {le: after[le] - before.get(le, 0.0) for le in after}
    total = delta[math.inf]
    p99_le = next((le for le in sorted(delta) if delta[le] >= 0.99 * total), math.inf)
    return {
        "server_fsyncs": round(total),
        "server_fsync_ms_p99_le": None if not total or p99_le == math.inf else p99_le * 1000,
        "server_fsyncs_over_1ms": round(total - delta.get(0.001, 0.0)),
    }


# ---------------------------------------------------------------------------
# Producers and consumers


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


def _ms_percentiles(prefix: str, values_ns: list[int], qs: Iterable[str]) -> dict[str, float]:
    values = sorted(values_ns)
    points = {"p50": 0.50, "p99": 0.99, "p999": 0.999}
    out = {}
    for q in qs:
        value = (values[-1] if values else 0) if q == "max" else _percentile(values, points[q])
        out[f"{prefix}_{q}"] = round(value / 1e6, 3)
    return out


def _bodies(size: int) -> Callable[[int, int], bytes]:
    """A maker of `size`-byte bodies: head (sequence, time) + a slice of random bytes."""
    pack = _HEAD.pack
    tail_bytes = size - HEAD_BYTES
    pool = os.urandom(tail_bytes + _POOL_SPREAD_BYTES)

    def body(seq: int, sent_ns: int) -> bytes:
        offset = seq % _POOL_SPREAD_BYTES
        return pack(seq, sent_ns) + pool[offset : offset + tail_bytes]

    return body


async def _produce(
    queue: Queue, state: _State, first: int, end: int, cfg: BenchConfig, deadline: float
) -> list[str]:
    """Send sequence numbers [first, end) in awaited windows of --batch; the ids sent."""
    body = _bodies(cfg.size)
    loop = asyncio.get_running_loop()
    ids: list[str] = []
    for start in range(first, end, cfg.batch):
        if loop.time() >= deadline:
            break
        stop = min(start + cfg.batch, end)
        now_ns = time.time_ns()
        ids.extend(await queue.send_batch([body(seq, now_ns) for seq in range(start, stop)]))
        state.sent += stop - start
    return ids


async def _ack_received(queue: Queue, state: _State, messages: list[Message]) -> list[Message]:
    """Ack a batch; the messages whose ack took effect."""
    try:
        await queue.ack(*messages)
    except ServerError as exc:
        # Some receipts were refused (e.g. their visibility ran out); the
        # rest were deleted. Those messages will come again.
        failures = exc.details.get("failures")
        if failures is None:
            raise
        state.ack_failures += len(failures)
        refused = {f["index"] for f in failures}
        return [m for i, m in enumerate(messages) if i not in refused]
    return messages


def _tally(state: _State, messages: list[Message], now_ns: int) -> None:
    """Mark sequence numbers seen; latency now_ns - the body's time for each new one."""
    unpack = _HEAD.unpack_from
    seen = state.seen
    latencies = state.latencies_ns
    total = len(seen)
    for message in messages:
        if len(message.body) < HEAD_BYTES:
            state.foreign += 1
            continue
        seq, sent_ns = unpack(message.body)
        if seq >= total:
            state.foreign += 1
        elif seen[seq]:
            state.duplicates += 1
        else:
            seen[seq] = 1
            latencies.append(now_ns - sent_ns)
    state.distinct = len(latencies)


async def _consume(queue: Queue, state: _State, receive_max: int, deadline: float) -> None:
    """Receive + ack until every message is seen (latency: ack time - send time)."""
    loop = asyncio.get_running_loop()
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
        messages = await _ack_received(queue, state, messages)
        _tally(state, messages, time.time_ns())
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


def _first_real(group_exc: BaseExceptionGroup) -> BaseException:
    first: BaseException = group_exc
    while isinstance(first, BaseExceptionGroup):
        first = first.exceptions[0]
    return first


class _Session:
    """The connections of one phase (or one custom run); all closed at the end."""

    def __init__(self, cfg: BenchConfig) -> None:
        self.cfg = cfg
        self.clients: list[Client] = []

    async def open(self) -> Client:
        from mqd.client import connect

        cfg = self.cfg
        client = await connect(cfg.address, tls=cfg.tls, token=cfg.token, client_name="mqd-bench")
        self.clients.append(client)
        return client

    def receive_max(self, wanted: int) -> int:
        batch_max = self.clients[0].server_limits.get("batch_messages_max", wanted)
        return max(1, min(wanted, batch_max))

    async def close(self) -> None:
        for client in self.clients:
            with contextlib.suppress(MqdError, OSError):
                await client.close()


async def _together(
    state: _State,
    producers: list[Queue],
    consumers: list[Queue],
    cfg: BenchConfig,
    receive_max: int,
    deadline: float,
) -> list[str]:
    """Producers and consumers at once until every message is acked; the ids sent."""
    loop = asyncio.get_running_loop()
    ids: list[str] = []

    async def producers_then_mark() -> None:
        n, p = state.messages, len(producers)
        async with asyncio.TaskGroup() as group:
            sending = [
                group.create_task(
                    _produce(queue, state, i * n // p, (i + 1) * n // p, cfg, deadline)
                )
                for i, queue in enumerate(producers)
            ]
        for task in sending:
            ids.extend(task.result())
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
        raise _first_real(group_exc) from None
    return ids


async def _leftovers(queue: Queue, state: _State, receive_max: int) -> int:
    """After a phase: count (and ack) anything still deliverable, then what the queue holds.

    A message delivered again after all were seen is a duplicate; one that
    is still in flight or delayed is left in the queue. Returns the queue's
    visible + in flight + delayed count.
    """
    extra = await queue.receive(max_messages=receive_max, wait=0)
    if extra:
        _tally(state, await _ack_received(queue, state, extra), time.time_ns())
    return await _leftovers_count(queue)


async def _leftovers_count(queue: Queue) -> int:
    stats = await queue.stats()
    return int(stats.get("visible", 0) + stats.get("in_flight", 0) + stats.get("delayed", 0))


def _checks(state: _State, expected: int) -> dict[str, Any]:
    missing = (
        [seq for seq in range(expected) if not state.seen[seq]] if state.distinct < expected else []
    )
    return {
        "delivered": state.distinct,
        "duplicates": state.duplicates,
        "foreign": state.foreign,
        "ack_failures": state.ack_failures,
        "missing": len(missing),
        "missing_first": missing[:MISSING_SHOWN_MAX],
    }


def _rate(count: int, seconds: float) -> float:
    return round(count / seconds, 1) if seconds > 0 else 0.0


# ---------------------------------------------------------------------------
# custom: the original shape


async def run_bench(
    cfg: BenchConfig, progress_out: TextIO | None = None, server_pids: Iterable[int] = ()
) -> dict[str, Any]:
    """Run the custom shape once and return its figures (the `--json` object)."""
    cfg.validate()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + cfg.timeout_s
    name = cfg.queue or f"bench-{secrets.token_hex(6)}"
    own_queue = cfg.queue is None
    session = _Session(cfg)
    meter = CpuMeter(server_pids)
    state = _State(cfg.messages, bytearray(cfg.messages))
    try:
        control = await session.open()
        if own_queue:
            await control.create_queue(name)
        else:
            if name.endswith(".fifo"):
                raise ConfigError(
                    f"--queue {name}: a FIFO queue; bench sends without group ids and "
                    "measures standard queues only"
                )
            try:
                await control.get_queue(name)
            except QueueNotFound:
                # Made here, it would be left behind with default attributes, which
                # is rarely the queue meant to be measured.
                raise ConfigError(
                    f"--queue {name}: no such queue; create it with the attributes to "
                    "measure first, or leave --queue out for a fresh queue"
                ) from None
            # Bench acks whatever it receives: on a queue of the user's that would
            # delete their messages (and count them as from elsewhere).
            held = await _leftovers_count(control.queue(name))
            if held:
                raise ConfigError(
                    f"--queue {name}: it holds {held} messages; bench needs an empty queue "
                    "(it acks every message it receives)"
                )
        producers = [(await session.open()).queue(name) for _ in range(cfg.producers)]
        consumers = [(await session.open()).queue(name) for _ in range(cfg.consumers)]
        receive_max = session.receive_max(cfg.batch)

        meter.start()
        started = loop.time()
        progress = None
        if progress_out is not None:
            progress = asyncio.create_task(_progress(state, progress_out, started))
        try:
            await _together(state, producers, consumers, cfg, receive_max, deadline)
        finally:
            if progress is not None:
                progress.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await progress
        finished = loop.time()
        cpu = meter.figures(state.distinct)
    finally:
        try:
            if own_queue and session.clients:
                await session.clients[0].delete_queue(name)
        finally:
            await session.close()

    return {**_figures(cfg, name, state, started, finished), **cpu}


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
        "ok": not missing and not state.duplicates,
    }


def format_report(result: dict[str, Any]) -> str:
    r = result
    lines = [
        f"mqd bench: {r['messages']} messages of {r['size']} B, {r['producers']} producer(s), "
        f"{r['consumers']} consumer(s), batch {r['batch']}, queue {r['queue']} at {r['address']}"
        + (f", median of {r['repeats']} runs" if r.get("repeats", 1) > 1 else ""),
        f"  send:         {r['send_msgs_per_s']:>12,.0f} msgs/s",
        f"  receive+ack:  {r['receive_ack_msgs_per_s']:>12,.0f} msgs/s",
        f"  end to end:   {r['e2e_msgs_per_s']:>12,.0f} msgs/s  ({r['elapsed_s']:.2f} s)",
        f"  latency ms:   p50 {r['latency_ms_p50']:.2f}  p99 {r['latency_ms_p99']:.2f}  "
        f"p99.9 {r['latency_ms_p999']:.2f}  max {r['latency_ms_max']:.2f}",
    ]
    if "client_cpu_us_per_msg" in r:
        server = r.get("server_cpu_us_per_msg")
        lines.append(
            f"  cpu µs/msg:   server {'n/a' if server is None else f'{server:.1f}'}  "
            f"client {r['client_cpu_us_per_msg']:.1f}"
        )
    lines.append(
        f"  delivered {r['delivered']}/{r['messages']}, duplicates {r['duplicates']}, "
        f"missing {r['missing']}, refused acks {r['ack_failures']}"
        + (f", from elsewhere {r['foreign']}" if r["foreign"] else "")
    )
    if r["missing"]:
        shown = ", ".join(map(str, r["missing_first"]))
        more = " …" if r["missing"] > len(r["missing_first"]) else ""
        lines.append(f"  MISSING sequence numbers: {shown}{more}")
        if r["timed_out"]:
            lines.append("  (gave up at --timeout)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# w1, w2, w3


async def _fresh_queue(session: _Session, label: str) -> str:
    name = f"bench-{label}-{secrets.token_hex(4)}"
    await session.clients[0].create_queue(name)
    return name


async def _with_queue(
    cfg: BenchConfig, label: str, body: Callable[[_Session, str], Awaitable[dict[str, Any]]]
) -> dict[str, Any]:
    """Run `body` on a fresh queue with a control connection; delete the queue after."""
    session = _Session(cfg)
    name = None
    try:
        await session.open()
        name = await _fresh_queue(session, label)
        return await body(session, name)
    finally:
        try:
            if name is not None:
                with contextlib.suppress(MqdError):
                    await session.clients[0].delete_queue(name)
        finally:
            await session.close()


async def _w1(cfg: BenchConfig, server_pids: tuple[int, ...]) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    n = cfg.messages

    async def a_then_b(session: _Session, name: str) -> dict[str, Any]:
        queue = session.clients[0].queue(name)
        receive_max = session.receive_max(cfg.batch)
        state = _State(n, bytearray(n))
        meter = CpuMeter(server_pids)

        # (a) produce N in awaited send_batch windows.
        deadline = loop.time() + cfg.timeout_s
        meter.start()
        started = loop.time()
        ids = await _produce(queue, state, 0, n, cfg, deadline)
        elapsed = loop.time() - started
        stats = await queue.stats()
        depth = int(stats.get("visible", 0) + stats.get("in_flight", 0) + stats.get("delayed", 0))
        ids_duplicated = len(ids) - len(set(ids))
        a = {
            "messages": n,
            "sent": state.sent,
            "ids_duplicated": ids_duplicated,
            "queue_depth_after": depth,
            "elapsed_s": round(elapsed, 3),
            "msgs_per_s": _rate(state.sent, elapsed),
            **meter.figures(state.sent),
            "timed_out": state.sent < n,
            # The sequence numbers themselves are checked when (b) reads them.
            "ok": state.sent == n and ids_duplicated == 0 and depth == n,
        }

        # (b) consume them: receive(max_messages=batch, wait=1) + ack per batch.
        deadline = loop.time() + cfg.timeout_s
        meter.start()
        started = loop.time()
        await _consume(queue, state, receive_max, deadline)
        elapsed = (state.all_acked_s or loop.time()) - started
        cpu = meter.figures(state.distinct)
        left = await _leftovers(queue, state, receive_max)
        checks = _checks(state, n)
        b = {
            "messages": n,
            **checks,
            "queue_left": left,
            "elapsed_s": round(elapsed, 3),
            "msgs_per_s": _rate(state.distinct, elapsed),
            **cpu,
            "timed_out": state.distinct < n,
            "ok": _clean(checks) and left == 0,
        }
        return {"a": a, "b": b}

    phases = await _with_queue(cfg, "w1ab", a_then_b)
    phases["c"] = await _with_queue(
        cfg, "w1c", lambda session, name: _together_phase(cfg, session, name, 1, server_pids)
    )
    return phases


def _clean(checks: dict[str, Any]) -> bool:
    return not (checks["missing"] or checks["duplicates"] or checks["foreign"])


async def _together_phase(
    cfg: BenchConfig, session: _Session, name: str, clients: int, server_pids: tuple[int, ...]
) -> dict[str, Any]:
    """`clients` producers and as many consumers at once: N / time to the N-th distinct ack."""
    loop = asyncio.get_running_loop()
    n = cfg.messages
    producers = [(await session.open()).queue(name) for _ in range(clients)]
    consumers = [(await session.open()).queue(name) for _ in range(clients)]
    receive_max = session.receive_max(cfg.batch)
    state = _State(n, bytearray(n))
    meter = CpuMeter(server_pids)
    deadline = loop.time() + cfg.timeout_s
    meter.start()
    started = loop.time()
    await _together(state, producers, consumers, cfg, receive_max, deadline)
    finished = state.all_acked_s or loop.time()
    cpu = meter.figures(state.distinct)
    left = await _leftovers(session.clients[0].queue(name), state, receive_max)
    checks = _checks(state, n)
    send_s = (state.producers_done_s or finished) - started
    return {
        "messages": n,
        "producers": clients,
        "consumers": clients,
        "sent": state.sent,
        **checks,
        "queue_left": left,
        "elapsed_s": round(finished - started, 3),
        "msgs_per_s": _rate(state.distinct, finished - started),
        "send_msgs_per_s": _rate(state.sent, send_s),
        # Here latency is queueing delay: ack time - send time while a backlog builds.
        **_ms_percentiles("latency_ms", state.latencies_ns, ("p50", "p99", "p999", "max")),
        **cpu,
        "timed_out": state.distinct < n,
        "ok": _clean(checks) and left == 0,
    }


async def _w3(cfg: BenchConfig, server_pids: tuple[int, ...]) -> dict[str, Any]:
    return await _with_queue(
        cfg,
        "w3",
        lambda session, name: _together_phase(cfg, session, name, W3_CLIENTS, server_pids),
    )


async def _w2(cfg: BenchConfig, server_pids: tuple[int, ...]) -> dict[str, Any]:
    return await _with_queue(
        cfg, "w2", lambda session, name: _w2_phase(cfg, session, name, server_pids)
    )


async def _w2_warm_up(producer: Queue, consumer: Queue, deadline: float) -> float:
    """One message through the new queue before the clock starts; its round trip (ms).

    A new queue's first write waits for the queue to be ready everywhere (in a
    cluster, its followers start fetching: 30-40 ms on the development machine),
    a one-off cost of creating the queue, not the latency W2 measures. It is
    reported apart, as warmup_ms."""
    loop = asyncio.get_running_loop()
    started = time.perf_counter()
    await producer.send(W2_WARM_UP_BODY)
    while loop.time() < deadline:
        messages = await consumer.receive(max_messages=1, wait=RECEIVE_WAIT_S)
        if messages:
            await consumer.ack(messages)
            if any(m.body == W2_WARM_UP_BODY for m in messages):
                break
    return round((time.perf_counter() - started) * 1000, 2)


async def _w2_phase(
    cfg: BenchConfig, session: _Session, name: str, server_pids: tuple[int, ...]
) -> dict[str, Any]:
    """Open loop: a send per slot at fixed times, never waiting for the previous one."""
    loop = asyncio.get_running_loop()
    producer = (await session.open()).queue(name)
    consumer = (await session.open()).queue(name)
    slots = cfg.w2_slots
    interval_s = 1.0 / cfg.rate_per_s
    # Sequence numbers go to sends actually made, so they stay contiguous when
    # a slot is missed; there are at most `slots` of them.
    state = _State(slots, bytearray(slots))
    body = _bodies(cfg.size)
    send_ack_ns: list[int] = []
    send_tasks: set[asyncio.Task[None]] = set()
    ack_tasks: set[asyncio.Task[None]] = set()  # push: acks that do not hold up the stream
    counts = {"in_flight": 0, "send_errors": 0, "missed_slots": 0, "sent": 0}
    sending_done = asyncio.Event()
    all_seen = asyncio.Event()
    late_ns: list[int] = []

    async def send_one(seq: int) -> None:
        started_ns = time.perf_counter_ns()
        try:
            await producer.send(body(seq, time.time_ns()))
        except MqdError:
            counts["send_errors"] += 1
        else:
            send_ack_ns.append(time.perf_counter_ns() - started_ns)
        finally:
            counts["in_flight"] -= 1

    def check_done() -> None:
        if sending_done.is_set() and state.distinct >= counts["sent"] - counts["send_errors"]:
            all_seen.set()

    async def consume(deadline: float) -> None:
        # End to end: receive time - the send call's time in the body.
        if cfg.w2_consumer == "push":
            # Acks go out while the stream yields the next message (one at a time, each
            # awaited, caps this consumer near the rate of the acks' fsyncs).
            async def ack_one(message: Message, received_ns: int) -> None:
                _tally(state, await _ack_received(consumer, state, [message]), received_ns)
                check_done()

            async with consumer.consume(prefetch=W2_RECEIVE_MAX) as stream:
                async for message in stream:
                    acking = asyncio.create_task(ack_one(message, time.time_ns()))
                    ack_tasks.add(acking)
                    acking.add_done_callback(ack_tasks.discard)
                    if loop.time() >= deadline:
                        return
            return
        while loop.time() < deadline:
            messages = await consumer.receive(
                max_messages=W2_RECEIVE_MAX, wait=min(RECEIVE_WAIT_S, deadline - loop.time())
            )
            if not messages:
                continue
            received_ns = time.time_ns()
            _tally(state, await _ack_received(consumer, state, messages), received_ns)
            check_done()

    deadline = loop.time() + cfg.timeout_s
    warmup_ms = await _w2_warm_up(producer, consumer, deadline)
    stats_before = await _server_stats(session.clients[0])
    meter = CpuMeter(server_pids)
    waiting: asyncio.Task[Any] | None = None
    meter.start()
    consuming = asyncio.create_task(consume(deadline))
    started = loop.time()
    try:
        # The schedule runs on perf_counter (uvloop's loop.time() has 1 ms steps). The
        # body carries the wall-clock time of the send call: how late the client's own
        # timer woke (uvloop timers have 1 ms steps too) is reported apart, as
        # send_late_ms; the server cannot hold the sender back (open loop).
        perf0 = time.perf_counter() + 0.01
        for slot in range(slots):
            due = perf0 + slot * interval_s
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if loop.time() >= deadline or consuming.done():
                break
            late_ns.append(round((time.perf_counter() - due) * 1e9))
            if counts["in_flight"] >= cfg.in_flight_max:
                counts["missed_slots"] += 1
                continue
            counts["in_flight"] += 1
            seq = counts["sent"]
            counts["sent"] += 1
            task = asyncio.create_task(send_one(seq))
            send_tasks.add(task)
            task.add_done_callback(send_tasks.discard)
        schedule_s = time.perf_counter() - perf0
        if send_tasks:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(deadline):
                    await asyncio.gather(*send_tasks)
        sending_done.set()
        check_done()
        waiting = asyncio.create_task(all_seen.wait())
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout_at(deadline):
                await asyncio.wait([waiting, consuming], return_when=asyncio.FIRST_COMPLETED)
        finished = loop.time()
    finally:
        others = [*send_tasks, *ack_tasks, consuming] + ([waiting] if waiting is not None else [])
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)
    if consuming.done() and not consuming.cancelled() and consuming.exception() is not None:
        raise consuming.exception()  # type: ignore[misc]
    cpu = meter.figures(state.distinct)
    stats_after = await _server_stats(session.clients[0])
    fsyncs = fsync_figures(
        None if stats_before is None else fsync_buckets(stats_before),
        None if stats_after is None else fsync_buckets(stats_after),
    )
    fsyncs["server_syncer"] = None if stats_after is None else server_syncers(stats_after)
    left = await _leftovers(session.clients[0].queue(name), state, W2_RECEIVE_MAX)
    sent = counts["sent"]
    checks = _checks(state, sent)
    # Slots the schedule never reached: the run ended (--timeout) before its duration.
    unsent = slots - sent - counts["missed_slots"]
    timed_out = state.distinct < sent or unsent > 0
    return {
        "rate_per_s": cfg.rate_per_s,
        "duration_s": cfg.duration_s,
        "slots": slots,
        "sent": sent,
        "missed_slots": counts["missed_slots"],
        "unsent_slots": unsent,
        "send_errors": counts["send_errors"],
        "in_flight_max": cfg.in_flight_max,
        "w2_consumer": cfg.w2_consumer,
        **checks,
        "queue_left": left,
        "elapsed_s": round(finished - started, 3),
        "msgs_per_s": _rate(sent, schedule_s),
        "warmup_ms": warmup_ms,
        **_ms_percentiles("e2e_ms", state.latencies_ns, ("p50", "p99", "p999", "max")),
        **_ms_percentiles("send_ack_ms", send_ack_ns, ("p50", "p99", "p999", "max")),
        **_ms_percentiles("send_late_ms", late_ns, ("p50", "p99", "max")),
        **cpu,
        **fsyncs,
        "timed_out": timed_out,
        "ok": _clean(checks) and left == 0 and counts["send_errors"] == 0 and not timed_out,
    }


_RUNNERS: dict[str, Callable[[BenchConfig, tuple[int, ...]], Awaitable[dict[str, Any]]]] = {
    "w1": _w1,
    "w2": _w2,
    "w3": _w3,
}


def _median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One dict: medians of the numbers, the worst of the checks, the first run's rest."""
    merged = dict(runs[0])
    for key, first in runs[0].items():
        values = [run.get(key) for run in runs]
        if key in _WORST_OF_RUNS:
            merged[key] = _WORST_OF_RUNS[key](values)
        elif key in _SHAPE_KEYS or isinstance(first, bool) or not isinstance(first, int | float):
            continue
        elif any(value is None for value in values):
            merged[key] = None
        else:
            median = statistics.median(values)
            merged[key] = round(median, 3) if isinstance(median, float) else median
    if "missing_first" in merged:
        merged["missing_first"] = next(
            (run["missing_first"] for run in runs if run.get("missing_first")), []
        )
    return merged


def _phases(workload: dict[str, Any]) -> Iterable[tuple[str, dict[str, Any]]]:
    """(label, figures) of each phase of one workload's result."""
    if "ok" in workload:
        yield "", workload
    else:
        yield from workload.items()


def _machine() -> dict[str, Any]:
    try:
        import uvloop  # noqa: F401

        event_loop = "uvloop"
    except ImportError:  # pragma: no cover - uvloop is a dependency
        event_loop = "asyncio"
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "event_loop": event_loop,
    }


async def run_workloads(
    cfg: BenchConfig, server_pids: tuple[int, ...], notes: TextIO | None = None
) -> dict[str, Any]:
    """Run w1/w2/w3 (or all) --repeats times; medians and the raw runs."""
    cfg.validate()
    names = ["w1", "w2", "w3"] if cfg.workload == "all" else [cfg.workload]
    runs: list[dict[str, Any]] = []
    for repeat in range(cfg.repeats):
        run: dict[str, Any] = {}
        for name in names:
            if notes is not None:
                notes.write(f"mqd bench: {name} run {repeat + 1}/{cfg.repeats}\n")
                notes.flush()
            run[name] = await _RUNNERS[name](cfg, server_pids)
        runs.append(run)
    workloads: dict[str, Any] = {}
    for name in names:
        first = runs[0][name]
        if "ok" in first:
            workloads[name] = _median_of([run[name] for run in runs])
        else:
            workloads[name] = {
                phase: _median_of([run[name][phase] for run in runs]) for phase in first
            }
    ok = all(figures["ok"] for w in workloads.values() for _, figures in _phases(w))
    return {
        "workloads": workloads,
        "repeats": cfg.repeats,
        "machine": _machine(),
        "address": cfg.address,
        "size": cfg.size,
        "messages": cfg.messages,
        "batch": cfg.batch,
        "server_pids": list(server_pids),
        "ok": ok,
        "runs": runs,
    }


_PHASE_TITLES = {
    ("w1", "a"): "w1a produce, send_batch windows",
    ("w1", "b"): "w1b consume, receive + ack",
    ("w1", "c"): "w1c 1 producer + 1 consumer",
    ("w2", ""): "w2  open loop, one send each",
    ("w3", ""): f"w3  {W3_CLIENTS} producers + {W3_CLIENTS} consumers",
}


def _number(value: Any, spec: str, width: int) -> str:
    return f"{'-' if value is None else format(value, spec):>{width}}"


def _check_text(f: dict[str, Any]) -> str:
    if f["ok"]:
        return "ok"
    problems = [
        f"{key} {f[key]}"
        for key in ("missing", "duplicates", "foreign", "queue_left", "send_errors")
        if f.get(key)
    ]
    if "ids_duplicated" in f and (f["ids_duplicated"] or f["sent"] != f["messages"]):
        problems.append(f"sent {f['sent']}/{f['messages']}")
    if f.get("timed_out"):
        problems.append("timed out")
    return "FAILED " + ", ".join(problems or ["(see --json)"])


def format_workloads(result: dict[str, Any]) -> str:
    r = result
    pids = ", ".join(map(str, r["server_pids"])) or "none found (pass --server-pid)"
    # N and the batch size shape every workload but W2 (a rate for a time, on its line).
    shape = ""
    if any(name != "w2" for name in r["workloads"]):
        shape = f"N {r['messages']}, batch {r['batch']}, "
    lines = [
        f"mqd bench: {r['size']} B bodies, {shape}"
        f"median of {r['repeats']} run(s), {r['address']}, server pid(s) {pids}, "
        f"{r['machine']['cpus']} cpus, Python {r['machine']['python']}",
        f"  {'phase':<34}{'msgs/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'p99.9 ms':>10}{'max ms':>9}"
        f"{'server µs/msg':>15}{'client µs/msg':>15}  check",
    ]
    for name, workload in r["workloads"].items():
        for phase, f in _phases(workload):
            title = _PHASE_TITLES.get((name, phase), f"{name}{phase}")
            prefix = "e2e_ms" if "e2e_ms_p50" in f else "latency_ms"
            lines.append(
                f"  {title:<34}{_number(f['msgs_per_s'], ',.0f', 10)}"
                f"{_number(f.get(prefix + '_p50'), '.2f', 9)}"
                f"{_number(f.get(prefix + '_p99'), '.2f', 9)}"
                f"{_number(f.get(prefix + '_p999'), '.2f', 10)}"
                f"{_number(f.get(prefix + '_max'), '.2f', 9)}"
                f"{_number(f['server_cpu_us_per_msg'], '.1f', 15)}"
                f"{_number(f['client_cpu_us_per_msg'], '.1f', 15)}  {_check_text(f)}"
            )
            if name == "w2":
                lines.append(
                    f"      target {f['rate_per_s']:g}/s for {f['duration_s']:g} s: sent "
                    f"{f['sent']}/{f['slots']}, missed slots {f['missed_slots']} "
                    f"(in flight max {f['in_flight_max']}), send->ack ms p50 "
                    f"{f['send_ack_ms_p50']:.2f} p99 {f['send_ack_ms_p99']:.2f}, "
                    f"sender timer late p99 {f['send_late_ms_p99']:.1f} ms, "
                    f"warm-up {f['warmup_ms']:.1f} ms"
                )
                if f.get("server_fsyncs") is not None:
                    p99_le = f["server_fsync_ms_p99_le"]
                    lines.append(
                        f"      server log fsyncs {f['server_fsyncs']}, p99 "
                        + ("-" if p99_le is None else f"<= {p99_le:g} ms")
                        + f", {f['server_fsyncs_over_1ms']} over 1 ms"
                        + (
                            f" (off the loop: {f['server_syncer']})"
                            if f.get("server_syncer")
                            else ""
                        )
                    )
    lines.append(
        "  latency: w1c/w3 ack - send time (queueing delay under a backlog); "
        "w2 receive - send call time"
    )
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# Command line


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    tls = None
    if getattr(args, "tls_ca", None):
        try:
            tls = ssl.create_default_context(cafile=args.tls_ca)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"--tls-ca: cannot load {args.tls_ca!r}: {exc}") from exc
    given = {
        option: value
        for option, value in (
            ("--messages", getattr(args, "messages", None)),
            ("--batch", getattr(args, "batch", None)),
            ("--producers", getattr(args, "producers", None)),
            ("--consumers", getattr(args, "consumers", None)),
            ("--rate", getattr(args, "rate", None)),
            ("--duration", getattr(args, "duration", None)),
            ("--in-flight-max", getattr(args, "in_flight_max", None)),
            ("--w2-consumer", getattr(args, "w2_consumer", None)),
        )
        if value is not None
    }
    defaults = BenchConfig()
    cfg = BenchConfig(
        address=args.address,
        messages=given.get("--messages", defaults.messages),
        size=args.size,
        producers=given.get("--producers", defaults.producers),
        consumers=given.get("--consumers", defaults.consumers),
        batch=given.get("--batch", defaults.batch),
        queue=args.queue,
        timeout_s=args.timeout,
        token=getattr(args, "token", None),
        tls=tls,
        workload=getattr(args, "workload", "custom"),
        repeats=getattr(args, "repeats", 1),
        rate_per_s=given.get("--rate", defaults.rate_per_s),
        duration_s=given.get("--duration", defaults.duration_s),
        in_flight_max=given.get("--in-flight-max", defaults.in_flight_max),
        w2_consumer=given.get("--w2-consumer", defaults.w2_consumer),
        server_pids=tuple(getattr(args, "server_pid", None) or ()),
        given=frozenset(given),
    )
    cfg.validate()
    return cfg


def _run(coro: Any) -> Any:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency
        return asyncio.run(coro)
    return uvloop.run(coro)


async def _custom_repeated(
    cfg: BenchConfig, server_pids: tuple[int, ...], progress_out: TextIO | None
) -> dict[str, Any]:
    runs = [await run_bench(cfg, progress_out, server_pids) for _ in range(cfg.repeats)]
    if len(runs) == 1:
        return {**runs[0], "server_pids": list(server_pids)}
    return {
        **_median_of(runs),
        "repeats": len(runs),
        "server_pids": list(server_pids),
        "runs": runs,
    }


def main(args: argparse.Namespace) -> int:
    """Run `mqd bench`; exit status 0 if every check passed, 1 if any failed."""
    cfg = config_from_args(args)
    server_pids = cfg.server_pids or tuple(find_server_pids(cfg.address))
    show_progress = not args.json and sys.stderr.isatty()
    out = sys.stderr if show_progress else None
    try:
        if cfg.workload == "custom":
            result = _run(_custom_repeated(cfg, server_pids, out))
        else:
            result = _run(run_workloads(cfg, server_pids, out))
    except MqdError as exc:
        if args.json:
            print(json.dumps({"ok": False, "error": str(exc), "error_type": type(exc).__name__}))
            return 1
        raise
    if args.json:
        print(json.dumps(result))
    elif cfg.workload == "custom":
        print(format_report(result))
    else:
        print(format_workloads(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":  # python -m mqd.bench, for use without the CLI
    _parser = argparse.ArgumentParser(prog="mqd bench", description=__doc__.splitlines()[0])
    add_arguments(_parser)
    sys.exit(main(_parser.parse_args()))
