"""`mqd bench` as a subprocess against the real server fixture."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import mqd.client
from mqd.bench import format_report

pytestmark = pytest.mark.timeout(120)


def _bench(address: str, *args: str, timeout_s: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mqd", "bench", "--address", address, *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        stdin=subprocess.DEVNULL,
    )


async def test_bench_json_reports_every_message_delivered(server):
    done = _bench(server.address, "--messages", "2000", "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["ok"] is True
    assert result["messages"] == result["sent"] == result["delivered"] == 2000
    assert result["missing"] == 0 and result["missing_first"] == []
    assert result["duplicates"] == 0
    for key in ("send_msgs_per_s", "receive_ack_msgs_per_s", "e2e_msgs_per_s"):
        assert result[key] > 0
    assert 0 <= result["latency_ms_p50"] <= result["latency_ms_p99"] <= result["latency_ms_p999"]
    assert result["latency_ms_p999"] < 60_000
    assert done.stderr == ""  # no progress bar when not a terminal / with --json

    # The fresh queue it made is gone again.
    async with await mqd.client.connect(server.address) as client:
        assert result["queue"] not in await client.list_queues()


async def test_bench_many_producers_and_consumers_on_a_named_queue(server):
    async with await mqd.client.connect(server.address) as client:
        await client.create_queue("bench-named")
    done = _bench(
        server.address,
        "--messages", "1500", "--size", "64", "--producers", "3", "--consumers", "2",
        "--batch", "200", "--queue", "bench-named",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "missing 0" in done.stdout
    assert "delivered 1500/1500" in done.stdout
    async with await mqd.client.connect(server.address) as client:
        assert "bench-named" in await client.list_queues()  # a named queue is left alone


async def test_bench_refuses_a_named_queue_that_holds_messages(server):
    # It acks whatever it receives: the user's message was deleted, then a short body
    # crashed the run and left bench's own messages behind.
    async with await mqd.client.connect(server.address) as client:
        queue = await client.create_queue("users")
        await queue.send(b"hi")
    done = _bench(server.address, "--messages", "100", "--queue", "users", "--json")
    assert done.returncode == 1
    result = json.loads(done.stdout)
    assert result["ok"] is False and "holds 1 messages" in result["error"]
    async with await mqd.client.connect(server.address) as client:
        stats = await client.queue("users").stats()
        assert stats["visible"] == 1 and stats["acked_total"] == 0 and stats["sent_total"] == 1


async def test_bench_refuses_a_named_queue_that_does_not_exist(server):
    # It used to make one, with default attributes, and leave it behind.
    done = _bench(server.address, "--messages", "100", "--queue", "typo", "--json")
    assert done.returncode == 1
    result = json.loads(done.stdout)
    assert result["ok"] is False and "no such queue" in result["error"]
    # A FIFO queue said "entry 0: a FIFO queue needs a group_id on every message".
    done = _bench(server.address, "--messages", "100", "--queue", "jobs.fifo", "--json")
    assert done.returncode == 1 and "standard queues only" in json.loads(done.stdout)["error"]
    async with await mqd.client.connect(server.address) as client:
        assert "typo" not in await client.list_queues()


def test_bench_rejects_bad_options():
    done = _bench("127.0.0.1:1", "--size", "8", timeout_s=30)
    assert done.returncode == 2
    assert "--size" in done.stderr


def test_bench_without_a_server_fails_cleanly():
    done = _bench("127.0.0.1:1", "--messages", "10", "--json", timeout_s=30)
    assert done.returncode == 1
    result = json.loads(done.stdout)
    assert result["ok"] is False and "connect" in result["error"]


def test_report_names_missing_messages():
    result = {
        "address": "a:1", "queue": "q", "messages": 10, "size": 16, "producers": 1,
        "consumers": 1, "batch": 5, "sent": 10, "delivered": 8, "duplicates": 1,
        "foreign": 0, "ack_failures": 0, "missing": 2, "missing_first": [3, 7],
        "send_msgs_per_s": 1.0, "receive_ack_msgs_per_s": 1.0, "e2e_msgs_per_s": 1.0,
        "latency_ms_p50": 1.0, "latency_ms_p99": 2.0, "latency_ms_p999": 3.0,
        "latency_ms_max": 3.0, "elapsed_s": 1.0, "timed_out": True, "ok": False,
    }  # fmt: skip
    text = format_report(result)
    assert "MISSING sequence numbers: 3, 7" in text
    assert "duplicates 1" in text
