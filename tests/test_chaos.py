"""The chaos tool (tools/chaos.py): its checker on hand-written histories, its TCP
proxy against a real echo server, its seeded schedule, and one short real run."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parent.parent / "tools"
sys.path.insert(0, str(TOOLS))

import chaos  # noqa: E402
from tcp_proxy import TcpProxy, check_loopback  # noqa: E402

# --- the checker ------------------------------------------------------------------


class H:
    """A hand-written history: each call appends one event at the next time step."""

    def __init__(self) -> None:
        self.events: list[dict] = []
        self.t = 0.0

    def add(self, ev: str, **fields) -> float:
        self.t += 1.0
        self.events.append({"t": self.t, "ev": ev, **fields})
        return self.t

    def send(self, uid: str, mid: str | None, queue: str = "q", group: str = "", seq: int = 0):
        self.add("send_invoke", uid=uid, queue=queue, group=group, seq=seq)
        if mid is None:
            self.add("send_fail", uid=uid, queue=queue, error="ConnectionClosed")
        else:
            self.add("send_ok", uid=uid, queue=queue, mid=mid)

    def recv(self, uid: str, mid: str, receipt: str, queue: str = "q", t0: float | None = None):
        start = self.t + 0.5 if t0 is None else t0
        self.add("recv", uid=uid, queue=queue, mid=mid, receipt=receipt, t0=start, group="")

    def ack(self, uid: str, mid: str, receipt: str, ok: bool = True, queue: str = "q"):
        self.add("ack_invoke", uid=uid, queue=queue, mid=mid, receipt=receipt)
        if ok:
            self.add("ack_ok", uid=uid, queue=queue, mid=mid, receipt=receipt)
        else:
            self.add("ack_fail", uid=uid, queue=queue, mid=mid, receipt=receipt, error="x")


def test_clean_history_passes():
    h = H()
    h.send("p0-1", "m1")
    h.send("p0-2", "m2")
    h.recv("p0-1", "m1", "r1")
    h.ack("p0-1", "m1", "r1")
    h.recv("p0-2", "m2", "r2")
    h.ack("p0-2", "m2", "r2")
    report = chaos.check_history(h.events)
    assert report["ok"] and report["failures"] == []
    assert report["lost"] == report["duplicates"] == report["redelivered_after_ack"] == 0
    assert report["sends_acknowledged"] == 2 and report["distinct_received"] == 2
    assert report["availability_pct"] == 100.0


def test_acknowledged_send_never_received_is_lost():
    h = H()
    h.send("p0-1", "m1")
    h.send("p0-2", "m2")
    h.recv("p0-1", "m1", "r1")
    report = chaos.check_history(h.events)
    assert report["lost"] == 1 and report["lost_examples"] == ["p0-2"]
    assert not report["ok"] and report["failures"] == ["lost"]


def test_failed_send_is_uncertain_not_lost_nor_duplicate():
    h = H()
    h.send("p0-1", None)  # failed, never seen: may not have been stored
    h.send("p0-2", None)  # failed, but it was stored: shows up later
    h.recv("p0-2", "m2", "r2")
    h.ack("p0-2", "m2", "r2")
    report = chaos.check_history(h.events)
    assert report["ok"], report
    assert report["lost"] == 0 and report["duplicates"] == 0
    assert report["uncertain_sends_delivered"] == 1
    assert report["uncertain_sends_missing"] == 1
    assert report["sends_failed"] == 2


def test_delivery_after_an_acknowledged_ack_is_a_violation():
    h = H()
    h.send("p0-1", "m1")
    h.recv("p0-1", "m1", "r1")
    h.ack("p0-1", "m1", "r1")
    h.recv("p0-1", "m1", "r1b")  # its receive started after the ack returned
    report = chaos.check_history(h.events)
    assert report["redelivered_after_ack"] == 1
    assert report["redelivered_examples"][0]["mid"] == "m1"
    assert report["failures"] == ["redelivered_after_ack"]


def test_delivery_concurrent_with_the_ack_is_not_a_violation():
    h = H()
    h.send("p0-1", "m1")
    h.recv("p0-1", "m1", "r1")
    started = h.t + 0.1  # a receive call starts before the ack returns...
    h.ack("p0-1", "m1", "r1")
    h.recv("p0-1", "m1", "r1b", t0=started)  # ...and returns after it
    report = chaos.check_history(h.events)
    assert report["redelivered_after_ack"] == 0 and report["ok"]
    assert report["duplicates"] == 1 and report["duplicates_other"] == 1


def test_redelivery_after_a_failed_ack_is_a_counted_duplicate_not_a_violation():
    h = H()
    h.send("p0-1", "m1")
    h.send("p0-2", "m2")
    h.recv("p0-1", "m1", "r1")
    h.ack("p0-1", "m1", "r1", ok=False)  # uncertain: may or may not have deleted it
    h.recv("p0-1", "m1", "r1b")
    h.ack("p0-1", "m1", "r1b")
    h.recv("p0-2", "m2", "r2")  # never acked: comes back after its visibility timeout
    h.recv("p0-2", "m2", "r2b")
    h.ack("p0-2", "m2", "r2b")
    report = chaos.check_history(h.events)
    assert report["ok"], report
    assert report["duplicates"] == 2
    assert report["duplicates_after_failed_ack"] == 1
    assert report["duplicates_never_acked"] == 1
    assert report["uncertain_acks"] == 1


def test_same_id_stored_twice_is_a_copy():
    h = H()
    h.send("p0-1", "m1")
    h.recv("p0-1", "m1", "r1")
    h.ack("p0-1", "m1", "r1")
    h.recv("p0-1", "m9", "r9")  # the same body under another server id
    report = chaos.check_history(h.events)
    assert report["ok"] and report["duplicates_copies"] == 1


def test_unknown_body_is_a_violation():
    h = H()
    h.send("p0-1", "m1")
    h.recv("p0-1", "m1", "r1")
    h.recv("garbage", "m7", "r7")
    report = chaos.check_history(h.events)
    assert report["unknown"] == 1 and report["failures"] == ["unknown"]


def fifo_history(order: list[str], failed: set[str] = frozenset()) -> H:
    h = H()
    for seq, uid in enumerate(["a1", "a2", "a3", "a4"], start=1):
        h.send(uid, None if uid in failed else f"m-{uid}", queue="f.fifo", group="g", seq=seq)
    h.send("b1", "m-b1", queue="f.fifo", group="other", seq=1)
    for uid in order:
        h.recv(uid, f"m-{uid}", f"r-{uid}-{h.t}", queue="f.fifo")
        h.ack(uid, f"m-{uid}", f"r-{uid}-{h.t}", queue="f.fifo")
    return h


def test_fifo_in_order_passes_and_groups_are_independent():
    report = chaos.check_history(fifo_history(["b1", "a1", "a2", "a3", "a4"]).events)
    assert report["ok"] and report["fifo_violations"] == 0


def test_fifo_out_of_order_is_a_violation():
    report = chaos.check_history(fifo_history(["a1", "a3", "a2", "a4", "b1"]).events)
    assert report["fifo_violations"] == 1
    assert report["fifo_examples"][0] == {
        "queue": "f.fifo",
        "group": "g",
        "uid": "a2",
        "after": "a3",
        "t": pytest.approx(report["fifo_examples"][0]["t"]),
    }
    assert report["failures"] == ["fifo_violations"]


def test_fifo_ignores_failed_sends_and_redeliveries():
    # a2's send failed: wherever it shows up, it is not an order violation.
    report = chaos.check_history(fifo_history(["a1", "a3", "a2", "a4", "b1"], {"a2"}).events)
    assert report["ok"] and report["fifo_violations"] == 0
    # a1 delivered again after a3 (a redelivery): only first deliveries count.
    h = fifo_history(["a1", "a2", "a3", "a4", "b1"])
    h.recv("a1", "m-a1", "again", queue="f.fifo", t0=0.0)
    assert chaos.check_history(h.events)["fifo_violations"] == 0


def test_availability_counts_seconds_with_a_successful_send():
    events = []
    for second, ok in ((0, True), (1, False), (2, True), (3, False)):
        uid = f"p0-{second}"
        events.append({"t": second + 0.1, "ev": "send_invoke", "uid": uid, "queue": "q"})
        if ok:
            events.append(
                {"t": second + 0.2, "ev": "send_ok", "uid": uid, "queue": "q", "mid": uid}
            )
            events.append(
                {
                    "t": 9,
                    "ev": "recv",
                    "uid": uid,
                    "queue": "q",
                    "mid": uid,
                    "receipt": uid,
                    "t0": 9,
                }
            )
        else:
            events.append({"t": second + 0.2, "ev": "send_fail", "uid": uid, "queue": "q"})
    report = chaos.check_history(events)
    assert report["availability_pct"] == 50.0 and report["send_success_pct"] == 50.0


def test_history_file_round_trips(tmp_path):
    history = chaos.History(tmp_path / "h.jsonl")
    history.record("send_invoke", uid="p0-1", queue="q", group="", seq=1)
    history.record("send_ok", uid="p0-1", queue="q", mid="m1")
    history.close()
    events = chaos.read_history(tmp_path / "h.jsonl")
    assert [e["ev"] for e in events] == ["send_invoke", "send_ok"]
    assert chaos.check_history(events)["lost"] == 1


# --- the schedule -----------------------------------------------------------------

NODES = {"metadata": ["metadata-1"], "backends": ["backend-1", "backend-2", "backend-3"]}


def schedule(seed: int, kinds=chaos.FAULT_KINDS, duration: float = 120.0):
    return chaos.build_schedule(
        seed, duration, kinds, frontends=["frontend-1", "frontend-2"], **NODES
    )


def test_schedule_is_deterministic_for_a_seed():
    first = schedule(7)
    assert first == schedule(7)
    assert first != schedule(8)
    assert len(first) >= 5
    assert {f.kind for f in first} <= set(chaos.FAULT_KINDS)
    for before, after in itertools.pairwise(first):
        assert after.at_s >= before.at_s + before.duration_s  # one fault at a time
    assert first[-1].at_s + first[-1].duration_s <= 120.0 - chaos.COOLDOWN_S
    links = chaos.link_names(["metadata-1"], NODES["backends"], ["frontend-1", "frontend-2"])
    for fault in first:
        if fault.kind == "partition":
            assert fault.target in links and fault.mode in chaos.PARTITION_MODES
        if fault.kind == "kill":
            assert fault.target in chaos.KILL_TARGETS


def test_schedule_uses_only_the_kinds_asked_for():
    assert {f.kind for f in schedule(3, ("partition",))} == {"partition"}
    assert schedule(3, ()) == []
    assert schedule(3, duration=4.0) == []


def test_a_reboot_cuts_only_the_logs_the_node_followed_and_leaves_another_boots_note(
    tmp_path: Path,
):
    from mqd.storage import boot
    from mqd.storage.records import HEADER_BYTES

    data_dir = tmp_path / "data"
    followed, led = bytes.fromhex("aa" * 8), bytes.fromhex("bb" * 8)
    cache = {
        "version": 3,
        "queues": [
            {"queue_id": base64.b64encode(queue_id).decode(), "partitions": [
                {"index": 0, "replicas": ["b1", "b2", "b3"], "leader": leader},
            ]}
            for queue_id, leader in ((followed, "b2"), (led, "b1"))
        ],
    }  # fmt: skip
    data_dir.mkdir()
    (data_dir / "placement.json").write_text(json.dumps(cache))
    records = bytes(range(1, 256)) * 4096  # ~1 MiB with no zero byte, then preallocation
    for queue_id in (followed, led):
        part = data_dir / "partitions" / f"{queue_id.hex()}-0000"
        part.mkdir(parents=True)
        (part / "00000000000000000000.log").write_bytes(
            b"H" * HEADER_BYTES + records + bytes(64 * 1024)
        )
    boot.start_running(data_dir)

    cut = chaos.lose_unsynced_tails(data_dir, "b1", pick=0.25)
    followed_log = data_dir / "partitions" / f"{followed.hex()}-0000" / "00000000000000000000.log"
    led_log = data_dir / "partitions" / f"{led.hex()}-0000" / "00000000000000000000.log"
    assert list(cut) == [f"{followed.hex()}-0000"]
    assert 0 < cut[f"{followed.hex()}-0000"] <= chaos.REBOOT_LOST_BYTES_MAX
    assert (
        followed_log.stat().st_size == HEADER_BYTES + len(records) - cut[f"{followed.hex()}-0000"]
    )
    assert led_log.stat().st_size == HEADER_BYTES + len(records) + 64 * 1024
    assert boot.start_running(data_dir) is True  # what the restarted node will find


def test_parse_faults():
    assert chaos.parse_faults("kill, pause") == ("kill", "pause")
    assert chaos.parse_faults("all") == chaos.FAULT_KINDS
    assert chaos.parse_faults("none") == ()
    with pytest.raises(Exception, match="unknown fault kind"):
        chaos.parse_faults("kill,meteor")


def test_patch_config_sets_advertise_and_metadata():
    text = '[node]\nid = "b"\n\n[cluster]\nlisten = "127.0.0.1:1"\nmetadata = ["127.0.0.1:2"]\n'
    patched = chaos.patch_config(text, advertise="127.0.0.1:3", metadata=["127.0.0.1:4"])
    assert 'advertise = "127.0.0.1:3"' in patched
    assert 'metadata = ["127.0.0.1:4"]' in patched and "127.0.0.1:2" not in patched
    with pytest.raises(ValueError):
        chaos.patch_config("[node]\n", advertise="127.0.0.1:3")


# --- the proxy --------------------------------------------------------------------


async def echo_server():
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def roundtrip(port: int, payload: bytes, wait_s: float = 5.0) -> tuple[bytes, float]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        started = time.monotonic()
        writer.write(payload)
        await writer.drain()
        data = await asyncio.wait_for(reader.readexactly(len(payload)), wait_s)
        return data, time.monotonic() - started
    finally:
        writer.close()
        await writer.wait_closed()


def test_proxy_refuses_non_loopback():
    with pytest.raises(ValueError, match="loopback"):
        check_loopback("10.0.0.1")
    with pytest.raises(ValueError, match="loopback"):
        TcpProxy("example.com", 80)
    assert check_loopback("127.0.0.1") == "127.0.0.1"


@pytest.mark.timeout(30)
async def test_proxy_pass_delay_drop_blackhole():
    server, port = await echo_server()
    proxy = TcpProxy("127.0.0.1", port, name="test")
    try:
        proxy_port = await proxy.start()
        # pass
        data, _ = await roundtrip(proxy_port, b"hello" * 1000)
        assert data == b"hello" * 1000
        # delay: both directions are late
        proxy.set_mode("delay", delay_s=0.2)
        data, took = await roundtrip(proxy_port, b"slow")
        assert data == b"slow" and took >= 0.35
        # drop: an open connection is cut, a new one is refused
        proxy.set_mode("pass")
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy_port)
        writer.write(b"x")
        assert await asyncio.wait_for(reader.readexactly(1), 5) == b"x"
        proxy.set_mode("drop")
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
            writer.write(b"y")
            await writer.drain()
            await asyncio.wait_for(reader.readexactly(1), 5)
        writer.close()
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
            await roundtrip(proxy_port, b"z")
        assert proxy.open_connections == 0 and proxy.refused_total >= 1
        # blackhole: nothing comes back until healed, then the held bytes flow
        proxy.set_mode("blackhole")
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy_port)
        writer.write(b"held")
        await writer.drain()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.readexactly(4), 0.5)
        proxy.set_mode("pass")
        assert await asyncio.wait_for(reader.readexactly(4), 5) == b"held"
        writer.close()
        await writer.wait_closed()
        # healed: a fresh round trip works again
        data, _ = await roundtrip(proxy_port, b"again")
        assert data == b"again"
    finally:
        await proxy.close()
        server.close()
        await server.wait_closed()


# --- a real run -------------------------------------------------------------------


@pytest.mark.timeout(150)
def test_short_chaos_run_passes(tmp_path):
    history = tmp_path / "history.jsonl"
    command = [
        sys.executable,
        str(TOOLS / "chaos.py"),
        "--duration",
        "20",
        "--seed",
        "1",
        "--backends",
        "2",
        "--frontends",
        "1",
        "--producers",
        "2",
        "--consumers",
        "2",
        "--dir",
        str(tmp_path / "cluster"),
        "--history",
        str(history),
        "--json",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=140, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["ok"] and report["lost"] == 0 and report["redelivered_after_ack"] == 0
    assert report["fifo_violations"] == 0 and report["drained"]
    assert report["sends_acknowledged"] > 100
    assert report["faults"] >= 1
    events = chaos.read_history(history)
    assert chaos.check_history(events)["lost"] == 0
    assert {"send_invoke", "send_ok", "recv", "ack_ok", "fault", "heal"} <= {
        e["ev"] for e in events
    }
