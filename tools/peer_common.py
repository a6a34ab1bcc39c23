"""Helpers shared by the peer benchmarks, tools/peer_bench_*.py.

Standard library only: each peer script runs in that peer's client venv, where
mqd and its dependencies need not be installed.
"""

from __future__ import annotations

import os
import statistics
import struct
import time
from collections.abc import Iterator

# The body of mqd's workloads (issue 7), so that every peer carries the same bytes.
HEAD = struct.Struct(">QQ")
SIZE = 256
TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def message_body(seq: int, pool: bytes) -> bytes:
    """SIZE bytes: the sequence number, the send time (time.time_ns), then `pool`'s bytes."""
    return HEAD.pack(seq, time.time_ns()) + pool[: SIZE - HEAD.size]


def proc_stat_fields(pid: int) -> list[bytes]:
    """The fields of /proc/PID/stat after the command name: [1] is the ppid, [11] utime."""
    with open(f"/proc/{pid}/stat", "rb") as handle:
        # The name, in parentheses, may itself hold spaces and ")": split after the last one.
        return handle.read().rsplit(b")", 1)[1].split()


def cpu_ticks(pid: int) -> int:
    """User + system CPU time of the process, all its threads, in clock ticks."""
    fields = proc_stat_fields(pid)
    return int(fields[11]) + int(fields[12])


def server_ticks(pids: tuple[int, ...]) -> int | None:
    """CPU ticks of all the processes; None if one of them is gone."""
    total = 0
    for pid in pids:
        try:
            total += cpu_ticks(pid)
        except OSError:  # gone mid-run: no figure rather than a wrong one
            return None
    return total


class CpuMeter:
    """Server and client (this process) CPU per message, from its creation on."""

    def __init__(self, pids: tuple[int, ...]) -> None:
        self.pids = pids
        self._server = server_ticks(pids)
        self._client = time.process_time()

    def figures(self, messages: int) -> dict[str, float | None]:
        client_s = time.process_time() - self._client
        now = server_ticks(self.pids)
        server_s = (
            None if now is None or self._server is None else (now - self._server) / TICKS_PER_S
        )
        per = max(1, messages)
        return {
            "server_cpu_us_per_msg": None if server_s is None else round(server_s * 1e6 / per, 1),
            "client_cpu_us_per_msg": round(client_s * 1e6 / per, 1),
        }


def command_line(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as handle:
        return handle.read().rstrip(b"\0").replace(b"\0", b" ").decode()


def own_processes(program: str) -> Iterator[tuple[int, list[bytes]]]:
    """(pid, argv) of each process of this user whose argv[0] is `program`."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.stat(f"/proc/{entry}").st_uid != os.getuid():
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                argv = handle.read().split(b"\0")
        except OSError:  # gone since listdir, or not ours to read
            continue
        if os.path.basename(argv[0]) == os.fsencode(program):
            yield int(entry), argv


def own_server_pid(program: str, port: int, flags: tuple[bytes, ...], *, joined: bool) -> int:
    """The `program` process of this user whose command line gives `port` after one of
    `flags` (`-p 11399`; with `joined`, also `-p11399`); exits asking for --server-pid."""
    wanted = str(port).encode()
    for pid, argv in own_processes(program):
        ports = [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg in flags]
        if joined:
            ports += [arg[2:] for arg in argv if arg[:2] in flags and len(arg) > 2]
        if wanted in ports:
            return pid
    raise SystemExit(f"no {program} of this user with -p {port}; pass --server-pid")


def percentile_ms(values_ns: list[int], q: float) -> float:
    """The value with a fraction q of the nanosecond figures below it, in ms; 0.0 for none."""
    ordered = sorted(values_ns)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1e6 if ordered else 0.0


def max_ms(values_ns: list[int]) -> float:
    return max(values_ns) / 1e6 if values_ns else 0.0


def w2_latency_figures(e2e_ns: list[int], send_ack_ns: list[int], late_ns: list[int]) -> dict:
    """W2's latencies in ms to the µs: end to end, send->ack, and how late each send went out."""
    figures = {
        "e2e_ms_p50": percentile_ms(e2e_ns, 0.5),
        "e2e_ms_p99": percentile_ms(e2e_ns, 0.99),
        "e2e_ms_p999": percentile_ms(e2e_ns, 0.999),
        "e2e_ms_max": max_ms(e2e_ns),
        "send_ack_ms_p50": percentile_ms(send_ack_ns, 0.5),
        "send_ack_ms_p99": percentile_ms(send_ack_ns, 0.99),
        "send_late_ms_p50": percentile_ms(late_ns, 0.5),
        "send_late_ms_p99": percentile_ms(late_ns, 0.99),
        "send_late_ms_max": max_ms(late_ns),
    }
    return {key: round(value, 3) for key, value in figures.items()}


def median_figures(runs: list[dict]) -> dict:
    """{workload: {figure: median over the runs}}, from runs of {workload: {figure: value}}."""
    return {
        name: {key: statistics.median(run[name][key] for run in runs) for key in runs[0][name]}
        for name in runs[0]
    }


def _per_run(runs: list[dict], name: str, key: str) -> str:
    return " / ".join(str(run[name][key]) for run in runs)


def w1c_summary(medians: dict, runs: list[dict]) -> str:
    """The W1c line of a text report, for W1c figures that include client CPU and queue_left."""
    m = medians["w1c"]
    return (
        f"W1c {m['msgs_per_s']} msgs/s (runs {_per_run(runs, 'w1c', 'msgs_per_s')}), server "
        f"{m['server_cpu_us_per_msg']} µs/msg, client {m['client_cpu_us_per_msg']} µs/msg, "
        f"missing {m['missing']}, duplicates {m['duplicates']}, left {m['queue_left']}"
    )


def w2_summary(medians: dict, runs: list[dict]) -> str:
    """The W2 line of a text report: latencies, the send rate (and missed slots, where the
    sender skips them), CPU, and the checks."""
    m = medians["w2"]
    missed = f", missed slots {m['missed_slots']}" if "missed_slots" in m else ""
    return (
        f"{w2_latency_summary(medians, runs)}; sent {m['sent_per_s']}/s{missed}; server "
        f"{m['server_cpu_us_per_msg']} µs/msg, client {m['client_cpu_us_per_msg']} µs/msg, "
        f"missing {m['missing']}, duplicates {m['duplicates']}, left {m['queue_left']}"
    )


def w2_latency_summary(medians: dict, runs: list[dict]) -> str:
    """The start of the W2 line of a text report: the figures of `w2_latency_figures`."""
    m = medians["w2"]
    return (
        f"W2 e2e ms p50 {m['e2e_ms_p50']} p99 {m['e2e_ms_p99']} "
        f"(runs {_per_run(runs, 'w2', 'e2e_ms_p99')}) p99.9 "
        f"{m['e2e_ms_p999']} max {m['e2e_ms_max']}; send->ack p50 {m['send_ack_ms_p50']} "
        f"p99 {m['send_ack_ms_p99']}; send late p99 {m['send_late_ms_p99']} max "
        f"{m['send_late_ms_max']}"
    )
