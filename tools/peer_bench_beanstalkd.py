"""W1c and W2 of `mqd bench` against beanstalkd, for the README's peer table.

The same shapes as mqd's workloads (issue 7), driven by greenstalk, a
blocking client, from threads of one process as a Python application would
use it: the producer and the consumer each on its own thread with its own
connection, on a fresh tube per phase. 256-byte bodies (8-byte sequence,
8-byte send time, random rest), each phase checked for missing and duplicate
sequence numbers and for jobs left in the tube.

- W1c: 1 producer (PUT per message, in windows of 1000) and 1 consumer
  (RESERVE-WITH-TIMEOUT 1 + DELETE per job) together: N / time until the
  N-th distinct job is deleted.
- W2: open loop, one PUT per slot at --rate for --duration s; one consumer
  with RESERVE + DELETE per job. End to end: receive time - the PUT call's
  time; send->ack: how long each PUT took.

greenstalk has no pipelining, and beanstalkd has no batch reserve or batch
delete: a W1c "window" is 1000 PUTs, each a request-reply round trip waited
for before the next, and the consumer pays two round trips per job. A PUT
answers after the job is in the binlog, a DELETE after its delete record is
(with -f 0, each write fsync'd first). W2's sender is one thread with one
connection, so at most one PUT is in flight (not 1000): a slot whose time
comes while a PUT is unanswered is sent as soon as that PUT returns, and how
late each slot was sent is reported apart as send_late_ms.

Beside each figure: the server's CPU time per message (utime + stime from
/proc/PID/stat; --server-pid, or the beanstalkd process of this user with
-p PORT) and this process's (`time.process_time`, all threads). With
--repeats the figures are medians; --json prints them with the raw runs.

    beanstalkd -l 127.0.0.1 -p 11399 -b /tmp/peer-beanstalkd-data -f 0 &
    pip install greenstalk
    python tools/peer_bench_beanstalkd.py --port 11399 --repeats 3

Not part of the test suite and not a dependency of mqd: a measuring tool.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from collections.abc import Callable
from importlib import metadata

import greenstalk

# Found beside this script: `python tools/peer_bench_beanstalkd.py` puts tools/ on sys.path.
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


def _connect(port: int, tube: str) -> greenstalk.Client:
    return greenstalk.Client(("127.0.0.1", port), encoding=None, use=tube, watch=tube)


def _left(port: int, tube: str) -> int:
    with greenstalk.Client(("127.0.0.1", port), encoding=None) as client:
        try:
            stats = client.stats_tube(tube)
        except greenstalk.NotFoundError:  # an empty tube nobody watches is gone
            return 0
    return sum(
        int(stats[k])
        for k in (
            "current-jobs-ready",
            "current-jobs-reserved",
            "current-jobs-delayed",
            "current-jobs-buried",
        )
    )


def _run(targets: list[Callable[[], None]], timeout: float) -> None:
    """Run each target on its own thread; re-raise the first error."""
    errors: list[BaseException] = []

    def guard(target: Callable[[], None]) -> None:
        try:
            target()
        except BaseException as exc:  # reported in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=guard, args=(t,), daemon=True) for t in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
    if errors:
        raise errors[0]
    if any(thread.is_alive() for thread in threads):
        raise TimeoutError(f"a thread still runs after {timeout} s")


def w1c(port: int, n: int, pid: int, timeout: float) -> dict:
    tube = f"w1c-{time.time_ns()}"
    pool = os.urandom(SIZE)
    seen = bytearray(n)
    counts = {"distinct": 0, "duplicates": 0}
    finished: list[float] = []
    deadline = time.monotonic() + timeout

    def produce() -> None:
        with _connect(port, tube) as client:
            for start in range(0, n, WINDOW):
                # No pipelining: each PUT is answered before the next goes out.
                for seq in range(start, min(start + WINDOW, n)):
                    client.put(message_body(seq, pool))
                if time.monotonic() >= deadline:
                    return

    def consume() -> None:
        with _connect(port, tube) as client:
            while counts["distinct"] < n and time.monotonic() < deadline:
                try:
                    job = client.reserve(timeout=1)
                except greenstalk.TimedOutError:
                    continue
                client.delete(job)
                seq, _ = HEAD.unpack_from(job.body)
                if seen[seq]:
                    counts["duplicates"] += 1
                else:
                    seen[seq] = 1
                    counts["distinct"] += 1
            finished.append(time.perf_counter())

    meter = CpuMeter((pid,))
    started = time.perf_counter()
    _run([produce, consume], timeout + 5)
    elapsed = finished[0] - started
    cpu = meter.figures(n)
    return {
        "msgs_per_s": round(n / elapsed, 1),
        **cpu,
        "missing": n - counts["distinct"],
        "duplicates": counts["duplicates"],
        "queue_left": _left(port, tube),
    }


def w2(port: int, rate: float, duration: float, pid: int, timeout: float) -> dict:
    tube = f"w2-{time.time_ns()}"
    pool = os.urandom(SIZE)
    slots = int(rate * duration)
    seen = bytearray(slots)
    e2e: list[int] = []
    send_ack: list[int] = []
    late: list[int] = []
    counts = {"sent": 0, "duplicates": 0}
    sending_done = threading.Event()
    deadline = time.monotonic() + timeout
    schedule: list[float] = []

    def produce() -> None:
        with _connect(port, tube) as client:
            perf0 = time.perf_counter() + 0.01
            for slot in range(slots):
                due = perf0 + slot / rate
                delay = due - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                if time.monotonic() >= deadline:
                    break
                late.append(round((time.perf_counter() - due) * 1e9))
                t0 = time.perf_counter_ns()
                client.put(message_body(slot, pool))
                send_ack.append(time.perf_counter_ns() - t0)
                counts["sent"] += 1
            schedule.append(time.perf_counter() - perf0)
        sending_done.set()

    def consume() -> None:
        with _connect(port, tube) as client:
            while not (sending_done.is_set() and len(e2e) >= counts["sent"]):
                if time.monotonic() >= deadline:
                    return
                try:
                    job = client.reserve(timeout=1)
                except greenstalk.TimedOutError:
                    continue
                now = time.time_ns()
                client.delete(job)
                seq, sent_ns = HEAD.unpack_from(job.body)
                if seen[seq]:
                    counts["duplicates"] += 1
                else:
                    seen[seq] = 1
                    e2e.append(now - sent_ns)

    meter = CpuMeter((pid,))
    _run([produce, consume], timeout + 5)
    sent = counts["sent"]
    cpu = meter.figures(sent)
    return {
        **w2_latency_figures(e2e, send_ack, late),
        "sent_per_s": round(sent / schedule[0], 1) if schedule and schedule[0] > 0 else 0.0,
        **cpu,
        "sent": sent,
        "missing": slots - len(e2e),
        "duplicates": counts["duplicates"],
        "queue_left": _left(port, tube),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=11399)
    parser.add_argument("--server-pid", type=int, default=0)
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=600.0, help="per phase, s")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    if not (0 < args.messages <= 10_000_000 and 0 < args.rate * args.duration <= 10_000_000):
        raise SystemExit("--messages and --rate x --duration: 1 to 10,000,000")
    if not 1 <= args.repeats <= 100:
        raise SystemExit("--repeats: 1 to 100")
    pid = args.server_pid or own_server_pid("beanstalkd", args.port, (b"-p",), joined=True)
    with greenstalk.Client(("127.0.0.1", args.port)) as client:
        version = client.stats()["version"]
    runs = []
    for _ in range(args.repeats):
        runs.append(
            {
                "w1c": w1c(args.port, args.messages, pid, args.timeout),
                "w2": w2(args.port, args.rate, args.duration, pid, args.timeout),
            }
        )
    medians = median_figures(runs)
    command = command_line(pid)
    server = {"version": version, "command": command, "greenstalk": metadata.version("greenstalk")}
    if args.json:
        print(json.dumps({"server": server, "medians": medians, "runs": runs}, indent=1))
    else:
        print(f"beanstalkd {version}: {command}; greenstalk {server['greenstalk']}")
        print(w1c_summary(medians, runs))
        print(w2_summary(medians, runs))


if __name__ == "__main__":
    main()
