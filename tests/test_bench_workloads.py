"""`mqd bench --workload`: the comparison's shapes (w1, w2, w3), CPU figures, medians.

Shape and correctness only; performance is measured by running `mqd bench`,
never asserted here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import mqd.client
from mqd.bench import (
    _median_of,
    find_server_pids,
    format_workloads,
    fsync_buckets,
    fsync_figures,
    proc_cpu_ticks,
    server_syncers,
)
from tests.test_bench import _bench

pytestmark = pytest.mark.timeout(120)

W1_PHASES = ("a", "b", "c")


def _phases(result: dict) -> dict[str, dict]:
    workloads = result["workloads"]
    phases = {f"w1{p}": workloads["w1"][p] for p in W1_PHASES if "w1" in workloads}
    phases.update({name: workloads[name] for name in ("w2", "w3") if name in workloads})
    return phases


def _assert_clean(name: str, f: dict) -> None:
    assert f["ok"] is True, (name, f)
    assert f["timed_out"] is False, name
    assert f["msgs_per_s"] > 0, name
    assert f["client_cpu_us_per_msg"] >= 0, name
    if name == "w1a":
        assert f["sent"] == f["messages"] and f["ids_duplicated"] == 0
        assert f["queue_depth_after"] == f["messages"]
    else:
        assert f["missing"] == 0 and f["missing_first"] == [], name
        assert f["duplicates"] == 0 and f["foreign"] == 0, name
        assert f["queue_left"] == 0, name


async def test_all_workloads_json(server):
    pid = server.proc.pid
    done = _bench(
        server.address,
        "--messages", "2000", "--workload", "all", "--repeats", "1",
        "--duration", "1", "--rate", "200", "--json", "--server-pid", str(pid),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    result = json.loads(done.stdout)
    assert result["ok"] is True
    assert result["repeats"] == 1 and len(result["runs"]) == 1
    assert result["machine"]["cpus"] == os.cpu_count()
    assert result["machine"]["python"]
    assert result["server_pids"] == [pid]
    assert set(result["workloads"]) == {"w1", "w2", "w3"}
    assert set(result["workloads"]["w1"]) == set(W1_PHASES)
    phases = _phases(result)
    for name, f in phases.items():
        _assert_clean(name, f)
        assert f["server_cpu_us_per_msg"] is not None and f["server_cpu_us_per_msg"] >= 0, name
    for name in ("w1b", "w1c", "w3"):
        assert phases[name]["delivered"] == 2000
    assert phases["w1c"]["producers"] == phases["w1c"]["consumers"] == 1
    assert phases["w3"]["producers"] == phases["w3"]["consumers"] == 4
    for name in ("w1c", "w3"):
        f = phases[name]
        assert 0 <= f["latency_ms_p50"] <= f["latency_ms_p99"] <= f["latency_ms_max"]

    w2 = phases["w2"]
    assert w2["slots"] == 200
    assert w2["sent"] + w2["missed_slots"] == w2["slots"]
    assert w2["delivered"] == w2["sent"] > 0
    assert w2["send_errors"] == 0
    assert 0 <= w2["e2e_ms_p50"] <= w2["e2e_ms_p99"] <= w2["e2e_ms_p999"] <= w2["e2e_ms_max"]
    assert 0 <= w2["send_ack_ms_p50"] <= w2["send_ack_ms_p99"]
    # One message went through the new queue before the clock: timed apart, not counted.
    assert w2["warmup_ms"] > 0 and w2["sent"] <= w2["slots"]

    # Every queue the run made is gone again.
    async with await mqd.client.connect(server.address) as client:
        assert [q for q in await client.list_queues() if q.startswith("bench-")] == []


def test_repeats_give_medians_and_the_server_is_found_by_port(server):
    done = _bench(server.address, "--workload", "w1", "--messages", "600", "--batch", "200",
                  "--repeats", "3", "--json")  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["server_pids"] == [server.proc.pid]
    assert result["repeats"] == 3 and len(result["runs"]) == 3
    assert set(result["workloads"]) == {"w1"}
    for phase in W1_PHASES:
        median = result["workloads"]["w1"][phase]
        _assert_clean(f"w1{phase}", median)
        assert median["server_cpu_us_per_msg"] is not None
        assert median["messages"] == 600  # a shape, not a median
        rates = sorted(run["w1"][phase]["msgs_per_s"] for run in result["runs"])
        assert median["msgs_per_s"] == rates[1]


def test_w2_open_loop_counts_what_it_could_not_send(server):
    done = _bench(server.address, "--workload", "w2", "--rate", "2000", "--duration", "0.25",
                  "--in-flight-max", "1", "--json")  # fmt: skip
    assert done.returncode == 0, done.stderr
    w2 = json.loads(done.stdout)["workloads"]["w2"]
    _assert_clean("w2", w2)
    assert w2["slots"] == 500 and w2["in_flight_max"] == 1
    assert w2["sent"] + w2["missed_slots"] == 500
    assert w2["delivered"] == w2["sent"] >= 1


def test_w2_cut_short_by_the_timeout_is_not_ok(server):
    done = _bench(server.address, "--workload", "w2", "--rate", "100", "--duration", "5",
                  "--timeout", "1", "--json")  # fmt: skip
    assert done.returncode == 1, done.stderr
    w2 = json.loads(done.stdout)["workloads"]["w2"]
    assert w2["timed_out"] is True and w2["ok"] is False
    assert w2["sent"] < 200 and w2["unsent_slots"] == 500 - w2["sent"] - w2["missed_slots"]


FSYNC_BUCKETS_MS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000)


def test_w2_reports_the_servers_fsyncs_over_the_run(server_factory):
    """Beside W2's latency, the log fsyncs the server made meanwhile (from its STATS):
    a disk with slow spells shows there. Under fsync "never" there are none."""
    durable = server_factory("always")
    done = _bench(durable.address, "--workload", "w2", "--rate", "400", "--duration", "0.5",
                  "--w2-consumer", "push", "--json")  # fmt: skip
    assert done.returncode == 0, done.stderr
    w2 = json.loads(done.stdout)["workloads"]["w2"]
    _assert_clean("w2", w2)
    # Every send and every ack is synced before its answer (commit groups may share).
    assert 1 <= w2["server_fsyncs"] <= 2 * w2["sent"] + 10
    assert w2["server_fsync_ms_p99_le"] in FSYNC_BUCKETS_MS
    assert 0 <= w2["server_fsyncs_over_1ms"] <= w2["server_fsyncs"]
    # Where its fsyncs go off the loop: io_uring where this kernel gives a ring.
    assert w2["server_syncer"] in ("io_uring", "threads")
    text = _bench(durable.address, "--workload", "w2", "--rate", "400", "--duration", "0.25")
    assert text.returncode == 0, text.stderr
    assert "server log fsyncs" in text.stdout

    lazy = server_factory("never", extra_args=("--fsync", "never"))
    done = _bench(lazy.address, "--workload", "w2", "--rate", "400", "--duration", "0.5",
                  "--json")  # fmt: skip
    assert done.returncode == 0, done.stderr
    w2 = json.loads(done.stdout)["workloads"]["w2"]
    _assert_clean("w2", w2)
    assert w2["server_fsyncs"] == 0 and w2["server_fsyncs_over_1ms"] == 0
    assert w2["server_fsync_ms_p99_le"] is None


def test_fsync_buckets_add_up_a_cluster_frontends_nodes():
    """A cluster frontend's STATS carries each node's own figures under `nodes`."""

    def node(fast: float, slow: float) -> dict:
        return {"metrics": {
            "mqd_fsync_seconds_bucket{le=0.001}": fast,
            "mqd_fsync_seconds_bucket{le=0.0025}": fast + slow,
            "mqd_fsync_seconds_bucket{le=+Inf}": fast + slow,
            "mqd_fsync_seconds_count": fast + slow,
        }}  # fmt: skip

    before = fsync_buckets({"metrics": {}, "nodes": {"backend-1": node(10, 0),
                            "backend-2": node(5, 0), "backend-3": {"error": "timed out"}}})  # fmt: skip
    after = fsync_buckets({"metrics": {}, "nodes": {"backend-1": node(400, 3),
                           "backend-2": node(200, 1), "backend-3": {"error": "timed out"}}})  # fmt: skip
    assert after == {0.001: 600, 0.0025: 604, float("inf"): 604}
    assert fsync_figures(before, after) == {
        "server_fsyncs": 589,
        "server_fsync_ms_p99_le": 1.0,
        "server_fsyncs_over_1ms": 4,
    }
    assert fsync_figures(None, after)["server_fsyncs"] is None


def test_the_syncers_of_a_node_or_a_clusters_nodes():
    assert server_syncers({"storage": {"syncer": "io_uring"}}) == "io_uring"
    frontend = {"storage": {}, "nodes": {
        "b1": {"storage": {"syncer": "sync_process"}},
        "b2": {"storage": {"syncer": "threads"}},
        "b3": {"error": "timed out"},
        "f2": {"metrics": {}},
    }}  # fmt: skip
    assert server_syncers(frontend) == "sync_process+threads"
    assert server_syncers({"metrics": {}}) is None


def test_w2_with_a_push_consumer(server):
    """`--w2-consumer push`: the consumer takes SUBSCRIBE pushes; every message seen and acked."""
    done = _bench(server.address, "--workload", "w2", "--rate", "400", "--duration", "0.5",
                  "--w2-consumer", "push", "--json")  # fmt: skip
    assert done.returncode == 0, done.stderr
    w2 = json.loads(done.stdout)["workloads"]["w2"]
    _assert_clean("w2", w2)
    assert w2["w2_consumer"] == "push"
    assert w2["delivered"] == w2["sent"] == 200
    assert w2["queue_left"] == 0 and w2["duplicates"] == 0
    assert 0 <= w2["e2e_ms_p50"] <= w2["e2e_ms_p99"] <= w2["e2e_ms_max"]
    assert server.events("request.failed") == [] and server.events("subscription.failed") == []


def test_workload_table_is_readable(server):
    done = _bench(server.address, "--workload", "w3", "--messages", "400", "--batch", "100")
    assert done.returncode == 0, done.stderr
    assert "4 producers + 4 consumers" in done.stdout
    assert "server µs/msg" in done.stdout and "client µs/msg" in done.stdout
    assert f"server pid(s) {server.proc.pid}" in done.stdout


def test_custom_shape_gains_cpu_figures(server):
    done = _bench(server.address, "--messages", "500", "--json", "--server-pid",
                  str(server.proc.pid))  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["ok"] is True and result["delivered"] == 500
    assert result["server_cpu_us_per_msg"] is not None
    assert result["client_cpu_us_per_msg"] >= 0


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (("--workload", "w9"), "--workload"),
        (("--repeats", "0"), "--repeats"),
        (("--rate", "0", "--workload", "w2"), "--rate"),
        (("--duration", "-1", "--workload", "w2"), "--duration"),
        (("--in-flight-max", "0", "--workload", "w2"), "--in-flight-max"),
        # An option the workload does not read is refused, not silently ignored.
        (("--duration", "5", "--workload", "w1"), "--duration does not apply to --workload w1"),
        (("--rate", "50", "--workload", "w3"), "--rate does not apply"),
        (("--producers", "4", "--workload", "w2"), "--producers does not apply"),
        (("--messages", "10", "--workload", "w2"), "--messages does not apply"),
        (("--server-pid", "0"), "--server-pid"),
        (("--workload", "w1", "--queue", "jobs"), "--queue"),
        (("--messages", "0", "--workload", "all"), "--messages"),
    ],
)
def test_bad_option_values_exit_2(args, named):
    done = _bench("127.0.0.1:1", *args, timeout_s=30)
    assert done.returncode == 2, done.stderr
    assert named in done.stderr
    assert done.stdout == ""


def test_server_pids_from_proc(server):
    pid = server.proc.pid
    assert find_server_pids(server.address) == [pid]
    assert find_server_pids("127.0.0.1:1") == []
    assert proc_cpu_ticks(pid) is not None and proc_cpu_ticks(pid) >= 0
    assert proc_cpu_ticks(os.getpid()) > 0


def _phase(ok: bool, rate: float, missing: int = 0) -> dict:
    return {
        "messages": 10, "delivered": 10 - missing, "duplicates": 0, "foreign": 0,
        "missing": missing, "missing_first": list(range(missing)), "queue_left": 0,
        "msgs_per_s": rate, "latency_ms_p50": 1.0, "latency_ms_p99": 2.0,
        "latency_ms_p999": 3.0, "latency_ms_max": 4.0, "server_cpu_us_per_msg": None,
        "client_cpu_us_per_msg": 5.0, "timed_out": False, "ok": ok,
    }  # fmt: skip


def test_a_failed_check_in_any_run_fails_the_median():
    merged = _median_of([_phase(True, 100.0), _phase(False, 300.0, missing=2), _phase(True, 200.0)])
    assert merged["msgs_per_s"] == 200.0
    assert merged["ok"] is False
    assert merged["missing"] == 2 and merged["missing_first"] == [0, 1]
    assert merged["server_cpu_us_per_msg"] is None
    assert merged["messages"] == 10

    result = {
        "workloads": {"w3": merged}, "repeats": 3, "address": "a:1", "size": 256,
        "messages": 10, "batch": 5, "server_pids": [],
        "machine": {"cpus": 2, "python": "3.11"},
    }  # fmt: skip
    text = format_workloads(result)
    assert "FAILED missing 2" in text
    assert "none found (pass --server-pid)" in text
    assert "N 10, batch 5," in text

    # W2 is a rate for a time, said on its own line: no N it does not use in the header.
    w2 = _phase(True, 1000.0) | {
        "rate_per_s": 1000.0, "duration_s": 10.0, "sent": 10, "slots": 10, "missed_slots": 0,
        "in_flight_max": 1, "send_ack_ms_p50": 1.0, "send_ack_ms_p99": 2.0,
        "send_late_ms_p99": 0.1, "warmup_ms": 1.0,
    }  # fmt: skip
    text = format_workloads(result | {"workloads": {"w2": w2}})
    assert "N 10" not in text and "target 1000/s for 10 s" in text


def test_server_cpu_counts_the_server_s_live_children() -> None:
    # A node's sync process (mqd.storage.syncer) does the fdatasyncs: its CPU is the
    # server's. The child burns ~0.3 s of CPU, then sleeps so that it stays a child.
    child = subprocess.Popen(
        [sys.executable, "-c", "import time\nend = time.process_time() + 0.3\n"
         "while time.process_time() < end: pass\nprint('done', flush=True)\ntime.sleep(30)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert child.stdout is not None and child.stdout.readline() == "done\n"
        child_ticks = proc_cpu_ticks(child.pid)
        assert child_ticks is not None and child_ticks >= 20  # 0.2 s at 100 ticks/s
        with open(f"/proc/{os.getpid()}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        own_ticks = int(fields[11]) + int(fields[12])
        assert proc_cpu_ticks(os.getpid()) >= own_ticks + child_ticks
    finally:
        child.kill()
        child.communicate()
