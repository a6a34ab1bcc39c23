"""Replication and failover with real processes: a killed leader loses nothing acknowledged."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import mqd.client
from mqd import launcher
from mqd.bench import live_children
from mqd.cluster.replication import read_persisted
from mqd.errors import MqdError, Unavailable
from tests.cluster_helpers import running, tls_for

pytestmark = pytest.mark.timeout(240)


def fast_failure_detection(manifest: launcher.Manifest) -> None:
    """Shorter sessions and lag limits than the defaults, so the tests wait seconds."""
    for node in manifest.nodes:
        path = manifest.path(node.config)
        text = path.read_text()
        text = text.replace("session_timeout_ms = 6000", "session_timeout_ms = 2000")
        text = text.replace("heartbeat_interval_ms = 1000", "heartbeat_interval_ms = 300")
        text = text.replace("\n[tls]\n", "\nreplica_lag_max_ms = 1500\n\n[tls]\n")
        # Followers log their refused fetches at debug (test_new_queue_...).
        text = text.replace('[log]\nformat = "json"\n', '[log]\nformat = "json"\nlevel = "debug"\n')
        if node.role == "backend":
            text += '\n[metrics]\nlisten = "127.0.0.1:0"\n'
            # Slow-request lines from the leaders (test_the_leader_exports_...).
            text = text.replace(
                '[log]\nformat = "json"\n', '[log]\nformat = "json"\nslow_request_ms = 300\n'
            )
        path.write_text(text)


@pytest.fixture
def cluster(tmp_path: Path):
    manifest = launcher.create_cluster(tmp_path / "rep", metadata=1, backends=3, frontends=1)
    fast_failure_detection(manifest)
    with running(manifest):
        yield manifest


def refused_fetches(manifest: launcher.Manifest) -> list[str]:
    """Followers' fetches the leader turned away as not its partition (node logs)."""
    return [
        line
        for node in manifest.by_role("backend")
        for line in manifest.path(node.log).read_text().splitlines()
        if "follower.fetch_failed" in line and "NOT_LEADER" in line
    ]


def metrics_address(manifest: launcher.Manifest, node_id: str) -> tuple[str, int]:
    """Where a node serves /metrics (an ephemeral port, from its `metrics.listening` line)."""
    for line in manifest.path(manifest.node(node_id).log).read_text().splitlines():
        if '"metrics.listening"' in line:
            host, _, port = json.loads(line)["address"].rpartition(":")
            return host, int(port)
    raise AssertionError(f"{node_id} logged no metrics.listening line")


async def scrape(address: tuple[str, int]) -> str:
    reader, writer = await asyncio.open_connection(*address)
    writer.write(b"GET /metrics HTTP/1.0\r\n\r\n")
    body = await reader.read()
    writer.close()
    return body.decode()


def lag_of(exposition: str, queue: str, replica: str) -> float | None:
    for line in exposition.splitlines():
        if line.startswith("mqd_replication_lag_records{") and f'queue="{queue}"' in line:
            if f'replica="{replica}"' in line:
                return float(line.rsplit(" ", 1)[1])
    return None


def slow_request(
    manifest: launcher.Manifest, node_id: str, carries: str, entries: int, timeout_s: float = 10
) -> dict:
    """A node's first `request.slow` line for a carried op of `entries` entries, waiting
    for it: a request is logged once answered."""
    deadline = time.monotonic() + timeout_s
    while True:
        for line in manifest.path(manifest.node(node_id).log).read_text().splitlines():
            if '"request.slow"' in line:
                event = json.loads(line)
                if event.get("carries") == carries and event["entries"] == entries:
                    return event
        if time.monotonic() >= deadline:
            raise AssertionError(f"{node_id} logged no slow {carries} within {timeout_s} s")
        time.sleep(0.05)


async def placement_of(client, queue: str) -> list[dict]:
    return (await client.stats())["cluster"]["placement"][queue]


async def wait_for(condition, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await condition():
            return
        await asyncio.sleep(0.2)
    raise AssertionError("condition not met in time")


async def drain(queue, expected: int) -> dict[str, bytes]:
    seen: dict[str, bytes] = {}
    deadline = time.monotonic() + 60
    while len(seen) < expected and time.monotonic() < deadline:
        try:
            batch = await queue.receive(max_messages=100, wait=1, visibility_timeout=60)
        except Unavailable:
            await asyncio.sleep(0.2)
            continue
        for message in batch:
            seen[message.id] = message.body
        if batch:
            await queue.ack(*batch)
    return seen


async def test_queue_defaults_to_three_replicas_two_in_sync(cluster):
    (frontend,) = cluster.by_role("frontend")
    async with await mqd.client.connect(frontend.client_address, tls=tls_for(cluster)) as client:
        queue = await client.create_queue("copies")
        attributes = await queue.attributes()
        assert attributes["replication_factor"] == 3
        assert attributes["min_insync"] == 2
        (part,) = await placement_of(client, "copies")
        assert sorted(part["replicas"]) == ["backend-1", "backend-2", "backend-3"]
        assert sorted(part["isr"]) == sorted(part["replicas"])
        with pytest.raises(MqdError):
            await client.create_queue("too-many", replication_factor=4)


async def test_new_queue_followers_are_not_turned_away_while_the_leader_opens(cluster):
    """A new queue's followers start fetching before its leader has opened the
    partition; the leader holds those fetches a moment rather than refusing them
    (refused, they backed off 50 ms, and so did the queue's first send)."""
    (frontend,) = cluster.by_role("frontend")
    assert any('level = "debug"' in cluster.path(n.config).read_text() for n in cluster.nodes)
    async with await mqd.client.connect(frontend.client_address, tls=tls_for(cluster)) as client:
        for name in ("fresh-a", "fresh-b", "fresh-c"):
            queue = await client.create_queue(name)
            await queue.send(name.encode())
            (part,) = await placement_of(client, name)
            assert sorted(part["isr"]) == ["backend-1", "backend-2", "backend-3"]
        assert len(await drain(client.queue("fresh-c"), 1)) == 1
    assert refused_fetches(cluster) == []


async def test_killing_the_leader_loses_no_acknowledged_message(cluster):
    (frontend,) = cluster.by_role("frontend")
    tls = tls_for(cluster)
    async with await mqd.client.connect(frontend.client_address, tls=tls) as client:
        queue = await client.create_queue("survive", replication_factor=3, min_insync=2)
        acked = set()
        for round_number in range(10):
            acked |= set(await queue.send_batch([b"r%d-%d" % (round_number, i) for i in range(50)]))
        # A delivered-and-acked message must stay deleted after the failover.
        consumed = await queue.receive(max_messages=20, visibility_timeout=60)
        await queue.ack(*consumed)
        acked_deletes = {m.id for m in consumed}
        in_flight = await queue.receive(max_messages=10, visibility_timeout=300)

        (part,) = await placement_of(client, "survive")
        old_leader = part["leader"]
        await asyncio.to_thread(
            launcher.stop_nodes, cluster, [cluster.node(old_leader)], 0.1
        )  # SIGTERM then SIGKILL after 0.1 s: the leader dies mid-flight

        async def new_leader() -> bool:
            (now,) = await placement_of(client, "survive")
            return now["leader"] != old_leader and now["epoch"] > part["epoch"]

        await wait_for(new_leader)
        # Sends work on the new leader (2 of 3 replicas left = min_insync).
        more = set()
        for _ in range(20):
            try:
                more |= set(await queue.send_batch([b"after"] * 10))
                break
            except Unavailable:
                await asyncio.sleep(0.3)
        assert more, "no send succeeded after the failover"

        remaining = (acked - acked_deletes) | more
        seen = await drain(queue, len(remaining))
        assert set(seen) >= remaining, f"lost {len(remaining - set(seen))} acknowledged messages"
        assert not set(seen) & acked_deletes, "an acknowledged delete came back"
        # In-flight messages became visible again on the new leader (protocol.md §7).
        assert {m.id for m in in_flight} <= set(seen)


# A backend on a disk whose fdatasync fails with EIO once TRIGGER exists: the
# storage seam (mqd.storage.fs.FileSystem) faulted in a real node process.
FAULTY_DISK_NODE = """
import errno, os, pathlib, sys
from mqd.storage import fs, syncer
trigger = sys.argv.pop(1)
synced = fs.FileSystem.fdatasync
def fdatasync(self, fd):
    if os.path.exists(trigger):
        raise OSError(errno.EIO, os.strerror(errno.EIO))
    synced(self, fd)
fs.FileSystem.fdatasync = fdatasync
# The node's sync process (mqd.storage.syncer) makes a leader's small-group fsyncs:
# run it with the same fault, as a wrapper around the real one.
helper = pathlib.Path(trigger).with_name("faulty_sync_helper.py")
helper.write_text(
    "import errno, os, runpy\\n"
    f"trigger = {trigger!r}\\n"
    "real = os.fdatasync\\n"
    "def fdatasync(fd):\\n"
    "    if os.path.exists(trigger):\\n"
    "        raise OSError(errno.EIO, os.strerror(errno.EIO))\\n"
    "    real(fd)\\n"
    "os.fdatasync = fdatasync\\n"
    f"runpy.run_path({str(syncer.HELPER)!r}, run_name='__main__')\\n"
)
syncer.HELPER = helper
from mqd.cli import main
sys.exit(main(sys.argv[1:]))
"""


def registrations_of(manifest: launcher.Manifest, node_id: str) -> int:
    """How many times metadata has logged `node_id` registering."""
    (metadata,) = manifest.by_role("metadata")
    count = 0
    for line in manifest.path(metadata.log).read_text().splitlines():
        if '"node.registered"' in line:
            count += json.loads(line).get("node") == node_id
    return count


def spawn_on_faulty_disk(
    manifest: launcher.Manifest, node_id: str, script: Path, trigger: Path
) -> subprocess.Popen:
    """Start `node_id` as `mqd serve` does, with FAULTY_DISK_NODE's storage seam."""
    node = manifest.node(node_id)
    config = str(manifest.path(node.config).resolve())
    script.write_text(FAULTY_DISK_NODE)
    with open(manifest.path(node.log), "ab") as log_file:
        return subprocess.Popen(
            [sys.executable, str(script), str(trigger), "serve", "--config", config,
             "--log-format", "json"],
            stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
        )  # fmt: skip


async def test_a_leader_whose_fsync_fails_stops_and_its_partitions_fail_over(cluster, tmp_path):
    """protocol.md §7.13 "A leader's failed fsync": the writes of that group fail
    with an unknown outcome, the node stops (exit status 1), metadata moves its
    partitions, and nothing acknowledged is lost."""
    (frontend,) = cluster.by_role("frontend")
    faulty = cluster.node("backend-1")
    await asyncio.to_thread(launcher.stop_nodes, cluster, [faulty])
    log_offset = cluster.path(faulty.log).stat().st_size
    registrations = registrations_of(cluster, "backend-1")
    trigger = tmp_path / "disk-fails"
    process = spawn_on_faulty_disk(cluster, "backend-1", tmp_path / "faulty_node.py", trigger)
    try:

        async def registered_again() -> bool:
            return registrations_of(cluster, "backend-1") > registrations

        await wait_for(registered_again)
        async with await mqd.client.connect(
            frontend.client_address, tls=tls_for(cluster)
        ) as client:
            queue = await client.create_queue("faulty-disk", partitions=3)
            parts = await placement_of(client, "faulty-disk")
            (led,) = [p for p in parts if p["leader"] == "backend-1"]
            acked = set()
            for round_number in range(5):
                acked |= set(await queue.send_batch([b"b%d" % round_number] * 20))

            trigger.touch()
            errors: list[str] = []
            for round_number in range(60):  # until a send reaches backend-1's partition
                try:
                    acked |= set(await queue.send_batch([b"a%d" % round_number] * 5))
                except MqdError as exc:
                    errors.append(type(exc).__name__)
                if process.poll() is not None:
                    break
            assert await asyncio.to_thread(process.wait, 30) == 1
            trigger.unlink()
            log_text = cluster.path(faulty.log).read_bytes()[log_offset:].decode()
            assert '"log.fsync_failed_after_ship"' in log_text
            assert '"node.fail_stop"' in log_text
            # The failed group's writers learn the outcome is unknown (INTERNAL).
            assert "InternalError" in errors, errors

            async def moved() -> bool:
                now = await placement_of(client, "faulty-disk")
                return now[led["index"]]["leader"] != "backend-1"

            await wait_for(moved)
            for _ in range(20):  # writes go on without backend-1 (2 of 3 = min_insync)
                try:
                    acked |= set(await queue.send_batch([b"after"] * 10))
                    break
                except Unavailable:
                    await asyncio.sleep(0.3)
            seen = await drain(queue, len(acked))
            assert set(seen) >= acked, f"lost {len(acked - set(seen))} acknowledged messages"
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()


async def test_the_leader_exports_each_followers_replication_lag(cluster):
    (frontend,) = cluster.by_role("frontend")
    async with await mqd.client.connect(frontend.client_address, tls=tls_for(cluster)) as client:
        queue = await client.create_queue("lagged")
        await queue.send_batch([b"x"] * 5)  # acknowledged: both followers hold all of it
        (part,) = await placement_of(client, "lagged")
        leader = metrics_address(cluster, part["leader"])
        followers = sorted(r for r in part["replicas"] if r != part["leader"])
        exposition = await scrape(leader)
        assert [lag_of(exposition, "lagged", f) for f in followers] == [0.0, 0.0]
        # The same figures through the frontend's STATS, under the leader's node id.
        nodes = (await client.stats())["nodes"]
        assert set(nodes) == {"metadata-1", "backend-1", "backend-2", "backend-3"}
        leader_metrics = nodes[part["leader"]]["metrics"]
        for follower in followers:
            key = f"mqd_replication_lag_records{{partition=0,queue=lagged,replica={follower}}}"
            assert leader_metrics[key] == 0.0
        assert nodes[part["leader"]]["storage"]["commits"] >= 1

        # A follower that stops fetching falls behind by what is written meanwhile.
        paused = cluster.node(followers[0])
        pid = int(cluster.path(paused.pid_file).read_text())
        os.kill(pid, signal.SIGSTOP)
        try:
            # Acknowledged once the leader drops it from the in-sync set (replica_lag_max).
            await queue.send_batch([b"y"] * 3)
            exposition = await scrape(leader)
            assert lag_of(exposition, "lagged", followers[0]) >= 3
            assert lag_of(exposition, "lagged", followers[1]) == 0.0
        finally:
            os.kill(pid, signal.SIGCONT)

        async def caught_up() -> bool:
            return lag_of(await scrape(leader), "lagged", followers[0]) == 0.0

        await wait_for(caught_up)

        # The leader's slow-request line names the client op its PARTITION_CALL carried,
        # and where the time went: waiting for the in-sync set to drop the paused follower.
        slow = await asyncio.to_thread(slow_request, cluster, part["leader"], "SEND", 3)
        assert slow["op"] == "PARTITION_CALL" and slow["queue"] == "lagged"
        assert slow["partition"] == 0 and slow["elapsed_ms"] >= 300
        assert max(slow["stages_ms"], key=slow["stages_ms"].get) == "replication"
        # A long poll through PARTITION_CALL is slow on purpose: no line for it.
        idle = await client.create_queue("idle-poll")
        (idle_part,) = await placement_of(client, "idle-poll")
        assert await idle.receive(max_messages=1, wait=0.6) == []
        await asyncio.sleep(1)  # (a line would follow the answer within microseconds)
        idle_leader = cluster.path(cluster.node(idle_part["leader"]).log).read_text()
        assert "idle-poll" in idle_leader  # the queue's partition opened there
        slow_lines = [
            json.loads(line) for line in idle_leader.splitlines() if '"request.slow"' in line
        ]
        assert not [e for e in slow_lines if e["elapsed_ms"] >= 550 and e.get("carries") != "SEND"]


async def test_writes_refused_below_min_insync(cluster):
    (frontend,) = cluster.by_role("frontend")
    async with await mqd.client.connect(frontend.client_address, tls=tls_for(cluster)) as client:
        queue = await client.create_queue("strict", replication_factor=3, min_insync=3)
        await queue.send(b"all three")
        (part,) = await placement_of(client, "strict")
        follower = next(r for r in part["replicas"] if r != part["leader"])
        await asyncio.to_thread(launcher.stop_nodes, cluster, [cluster.node(follower)])

        async def shrunk() -> bool:
            (now,) = await placement_of(client, "strict")
            return follower not in now["isr"]

        await wait_for(shrunk)
        with pytest.raises(Unavailable) as refused:
            await queue.send(b"not enough copies")
        assert "min_insync" in str(refused.value)
        # The old message is still readable from the leader.
        (got,) = await queue.receive()
        assert got.body == b"all three"

        await asyncio.to_thread(launcher.restart_node, cluster, cluster.node(follower))

        async def rejoined() -> bool:
            (now,) = await placement_of(client, "strict")
            return follower in now["isr"]

        await wait_for(rejoined)
        await queue.send(b"three again")


async def test_calls_in_flight_to_a_stopped_leader_end_once_a_new_leader_is_elected(cluster):
    """A SIGSTOPped leader neither answers nor closes its connections: the frontend's
    calls to it waited out their 30 s and failed TIMEOUT, though a new leader was
    elected within seconds. Now they are given up once placement names the new leader
    (protocol.md §7.10): a send safe to repeat goes there, one that is not fails
    UNAVAILABLE (its outcome unknown)."""
    (frontend,) = cluster.by_role("frontend")
    tls = tls_for(cluster)
    async with await mqd.client.connect(
        frontend.client_address, tls=tls, request_timeout=60
    ) as client:
        queue = await client.create_queue("paused", replication_factor=3, min_insync=2)
        await queue.send(b"before")
        (part,) = await placement_of(client, "paused")
        pid = int(cluster.path(cluster.node(part["leader"]).pid_file).read_text())
        os.kill(pid, signal.SIGSTOP)
        try:
            safe, unsafe = await asyncio.gather(
                queue.send(b"safe", dedup_id="paused-1"),
                queue.send(b"unsafe"),
                return_exceptions=True,
            )
            (now,) = await placement_of(client, "paused")
        finally:
            os.kill(pid, signal.SIGCONT)
        assert now["epoch"] > part["epoch"] and now["leader"] != part["leader"]
        assert isinstance(safe, str), safe
        assert isinstance(unsafe, Unavailable), unsafe
        assert "outcome is unknown" in str(unsafe)
        bodies = sorted((await drain(queue, 2)).values())
        assert bodies[:2] == [b"before", b"safe"] and set(bodies) <= {b"before", b"safe", b"unsafe"}
    # The frontend's slow line for the retried send names the wait between its tries.
    slow = [
        json.loads(line)
        for line in cluster.path(frontend.log).read_text().splitlines()
        if '"request.slow"' in line and '"SEND"' in line
    ]
    assert any(event["stages_ms"].get("failover", 0) > 0 for event in slow), slow


async def test_decommission_rereplicates_a_dead_backend(tmp_path: Path):
    manifest = launcher.create_cluster(tmp_path / "dec", metadata=1, backends=3, frontends=1)
    fast_failure_detection(manifest)
    try:
        # Inside the try: a start that fails half way leaves no node running.
        await asyncio.to_thread(launcher.start_cluster, manifest, 90)
        (frontend,) = manifest.by_role("frontend")
        async with await mqd.client.connect(
            frontend.client_address, tls=tls_for(manifest)
        ) as client:
            queue = await client.create_queue(
                "retire", replication_factor=2, min_insync=1, partitions=3
            )
            sent = set()
            for _ in range(5):
                sent |= set(await queue.send_batch([b"x"] * 20))
            # A queue with one copy per partition: the dead node's copies have nowhere
            # to go. Before, they made DECOMMISSION refuse whole (INVALID_ARGUMENT), so
            # a node gone for good could not be retired and "retire" stayed one short.
            solo = await client.create_queue("solo", replication_factor=1, partitions=6)
            await solo.send_batch([b"s"] * 12)
            parts = await placement_of(client, "retire")
            solo_leaders = {part["leader"] for part in await placement_of(client, "solo")}
            victim = next(r for part in parts for r in part["replicas"] if r in solo_leaders)
            await asyncio.to_thread(launcher.stop_nodes, manifest, [manifest.node(victim)], 0.1)

            from mqd.protocol.messages import DecommissionRequest

            async def seen_down() -> bool:
                nodes = (await client.stats())["cluster"]["nodes"]
                return not any(n["id"] == victim and n["up"] for n in nodes)

            await wait_for(seen_down)
            answer = await client._call(DecommissionRequest(node_id=victim))
            by_queue = {
                name: [m.status for m in answer.moves if m.queue == name]
                for name in ("retire", "solo")
            }
            assert by_queue["retire"] and set(by_queue["retire"]) == {"moved"}
            assert by_queue["solo"]
            assert set(by_queue["solo"]) == {"failed: no in-sync replica can take over"}
            after = await placement_of(client, "retire")
            assert all(victim not in part["replicas"] for part in after)
            assert all(len(part["replicas"]) == 2 for part in after)

            async def caught_up() -> bool:
                return all(len(p["isr"]) == 2 for p in await placement_of(client, "retire"))

            await wait_for(caught_up)
            seen = await drain(queue, len(sent))
            assert set(seen) == sent
    finally:
        await asyncio.to_thread(
            launcher.stop_nodes, manifest, manifest.in_order(["frontend", "backend", "metadata"])
        )


def kill(manifest: launcher.Manifest, node_id: str) -> None:
    os.kill(int(manifest.path(manifest.node(node_id).pid_file).read_text()), signal.SIGKILL)


def as_after_a_machine_restart(data_dir: Path, keep_bytes) -> dict:
    """What a restart of a killed backend's machine may leave: the last segment of its
    partition 0 cut to `keep_bytes(size)` (unsynced pages lost), and its boot note
    another boot's. Returns the note as it was."""
    (segment,) = sorted((data_dir / "partitions").glob("*-0000/*.log"))[-1:]
    os.truncate(segment, keep_bytes(segment.stat().st_size))
    note = json.loads((data_dir / "boot.json").read_text())
    (data_dir / "boot.json").write_text(json.dumps(note | {"boot_id": "an-earlier-boot"}))
    return note


def metadata_lines(manifest: launcher.Manifest, event: str) -> list[dict]:
    (metadata,) = manifest.by_role("metadata")
    lines = manifest.path(metadata.log).read_text().splitlines()
    return [json.loads(line) for line in lines if f'"{event}"' in line]


async def test_a_follower_back_from_a_machine_restart_is_out_of_sync_until_caught_up(cluster):
    # A follower acknowledges records once written (protocol.md §7.13 "Copying"); a
    # restart of its machine may take the unsynced ones. Here: kill -9, cut its log
    # short as a power loss would, and leave the note a restart leaves (another boot).
    (frontend,) = cluster.by_role("frontend")
    async with await mqd.client.connect(frontend.client_address, tls=tls_for(cluster)) as client:
        queue = await client.create_queue("rebooted", replication_factor=3, min_insync=2)
        sent = set(await queue.send_batch([b"m%d" % i for i in range(50)]))
        (part,) = await placement_of(client, "rebooted")
        follower_id = sorted(r for r in part["replicas"] if r != part["leader"])[0]
        follower = cluster.node(follower_id)
        data_dir = cluster.path(follower.data_dir)

        # A crash of the process alone: the page cache kept its copy; it stays in sync.
        kill(cluster, follower_id)
        await asyncio.to_thread(launcher.restart_node, cluster, follower)
        registered = [
            r for r in metadata_lines(cluster, "node.registered") if r["node"] == follower_id
        ]
        assert registered[-1]["rebooted_unclean"] is False
        sent |= set(await queue.send_batch([b"n%d" % i for i in range(50)]))

        async def back_in_sync() -> bool:
            (now,) = await placement_of(client, "rebooted")
            return follower_id in now["isr"]

        # (It keeps its log at the same epoch; had the lag limit taken it out of the set
        # while it was down, it is back once caught up.)
        await wait_for(back_in_sync)
        kill(cluster, follower_id)
        await asyncio.sleep(0.2)
        note = as_after_a_machine_restart(data_dir, lambda size: size // 2)  # half lost
        assert note["clean"] is False
        await asyncio.to_thread(launcher.restart_node, cluster, follower)

        # Metadata took it out of the in-sync set as it registered...
        dropped = [
            r for r in metadata_lines(cluster, "node.rebooted_unclean") if r["node"] == follower_id
        ]
        assert dropped and dropped[-1]["out_of_sync"] == 1
        changes = [r["reason"] for r in metadata_lines(cluster, "placement.changed")]
        assert f"node {follower_id} restarted with its machine: out of 1 isr" in changes

        # ... and its leader takes it back once it has caught up.
        await wait_for(back_in_sync)
        # It holds every acknowledged message: with the other two gone, it leads them all.
        for other in part["replicas"]:
            if other != follower_id:
                kill(cluster, other)

        async def leads() -> bool:
            (now,) = await placement_of(client, "rebooted")
            return now["leader"] == follower_id

        await wait_for(leads)
        # Received, not acked: one in-sync replica is below min_insync for deletes.
        seen: set[str] = set()
        deadline = time.monotonic() + 60
        while seen != sent and time.monotonic() < deadline:
            with contextlib.suppress(Unavailable):
                batch = await queue.receive(max_messages=100, wait=1, visibility_timeout=300)
                seen |= {message.id for message in batch}
        assert seen == sent


async def test_a_copy_that_may_be_short_never_leads_the_partition_waits_for_its_leader(cluster):
    # Every replica goes down; the one back first comes from a machine restart with a
    # cut log. Electing it would lose acknowledged messages: the partition waits,
    # offline, for its leader (protocol.md §7.13 "A restarted machine").
    (frontend,) = cluster.by_role("frontend")
    async with await mqd.client.connect(frontend.client_address, tls=tls_for(cluster)) as client:
        queue = await client.create_queue("waits", replication_factor=3, min_insync=2)
        sent = set(await queue.send_batch([b"w%d" % i for i in range(200)]))
        (part,) = await placement_of(client, "waits")
        leader_id = part["leader"]
        short_id, other_id = sorted(r for r in part["replicas"] if r != leader_id)
        for node_id in (other_id, short_id, leader_id):
            kill(cluster, node_id)
        await asyncio.sleep(0.2)
        short_dir = cluster.path(cluster.node(short_id).data_dir)
        as_after_a_machine_restart(short_dir, lambda size: 200)  # a few records of 200
        await asyncio.to_thread(launcher.restart_node, cluster, cluster.node(short_id))

        # Past the leader's session timeout (2 s here), twice over: still not elected.
        # Metadata may notice the leader's silence a heartbeat before the other
        # follower's and hand that one the lead: it was only killed, so its page cache
        # holds every committed record and it is as good a leader as the old one.
        await asyncio.sleep(4.5)
        (now,) = await placement_of(client, "waits")
        assert now["leader"] in (leader_id, other_id) and short_id not in now["isr"]

        await asyncio.to_thread(launcher.restart_node, cluster, cluster.node(leader_id))
        await asyncio.to_thread(launcher.restart_node, cluster, cluster.node(other_id))
        seen = await drain(queue, len(sent))
        assert set(seen) == sent


def ended(pid: int) -> bool:
    """Whether process `pid` exited within 15 s."""
    return not launcher._wait_exited({"sync process": pid}, 15.0)


async def test_a_backend_syncs_what_it_leads_in_a_child_process_that_ends_with_it(cluster):
    # A replicated leader's fsyncs run in the backend's sync process (mqd.storage.syncer);
    # it must not outlive its node, whether the node stops cleanly or is killed.
    (frontend,) = cluster.by_role("frontend")
    async with await mqd.client.connect(frontend.client_address, tls=tls_for(cluster)) as client:
        queue = await client.create_queue("synced", replication_factor=3, min_insync=2)
        for i in range(20):  # one at a time: small groups
            await queue.send(b"s%d" % i)
        (part,) = await placement_of(client, "synced")
        storage = (await client.stats())["nodes"][part["leader"]]["storage"]
    assert storage["fsyncs_in_sync_process"] >= 15 and storage["syncer"] == "sync_process"
    assert storage["fsyncs_in_io_uring"] == 0  # a cluster backend keeps its sync process
    leader = cluster.node(part["leader"])
    (helper,) = live_children(launcher.running_pid(cluster, leader))
    assert any(arg.endswith("sync_helper.py") for arg in launcher._proc_argv(helper) or [])

    await asyncio.to_thread(launcher.stop_nodes, cluster, [leader])
    assert await asyncio.to_thread(ended, helper)
    await asyncio.to_thread(launcher.restart_node, cluster, leader)
    (helper,) = live_children(launcher.running_pid(cluster, leader))
    kill(cluster, leader.id)
    assert await asyncio.to_thread(ended, helper)  # end of file: the kernel closed its peer


async def test_a_leader_stopped_gracefully_finishes_its_writes_in_flight(cluster):
    # A draining leader refused its followers' FETCH, so the writes it still had in
    # flight never got their acknowledgement: they waited out replica_lag_max_ms and
    # failed INTERNAL, and a graceful restart stalled the queue longer than a crash
    # (review: 16 s against 6.5 s with the default 10 s lag limit).
    (frontend,) = cluster.by_role("frontend")
    async with await mqd.client.connect(frontend.client_address, tls=tls_for(cluster)) as client:
        queue = await client.create_queue("graceful", replication_factor=3, min_insync=2)
        (part,) = await placement_of(client, "graceful")
        leader = cluster.node(part["leader"])
        stop = asyncio.Event()

        async def sender(worker: int) -> None:
            for n in range(3000):
                if stop.is_set():
                    return
                with contextlib.suppress(MqdError):
                    await queue.send(b"%d-%d" % (worker, n), dedup_id=f"{worker}-{n}")

        senders = [asyncio.create_task(sender(worker)) for worker in range(4)]
        await asyncio.sleep(0.5)  # writes in flight on the leader
        await asyncio.to_thread(launcher.stop_nodes, cluster, [leader], 30)
        stop.set()
        await asyncio.gather(*senders)
    lines = cluster.path(leader.log).read_text().splitlines()
    drained = lines[next(i for i, line in enumerate(lines) if '"server.draining"' in line) :]
    assert any('"server.stopped"' in line for line in drained)
    # Each write it still held finished; before, each waited for the lag limit and
    # failed (UNAVAILABLE here, with the fixture's 1.5 s; INTERNAL at 10 s).
    failed = [
        event
        for event in (json.loads(line) for line in drained if '"request.slow"' in line)
        if event.get("carries") and event["outcome"] != "ok"
    ]
    assert not failed, failed[:2]
    # Then it said it was leaving: metadata moved the lead at once (protocol.md §7.19),
    # not after its session ran out.
    assert any('"node.left"' in line for line in drained)
    (leaving,) = metadata_lines(cluster, "node.leaving")
    assert leaving["node"] == leader.id
    moved = [
        e for e in metadata_lines(cluster, "partition.failover") if "is leaving" in e["reason"]
    ]
    assert moved and all(e["leader"] != leader.id for e in moved)


async def test_a_queue_created_while_a_backend_is_down_says_its_copies_are_fewer(cluster):
    # Its replication_factor defaults to the backends up (README) and stays so when
    # the backend returns; nothing said so.
    (frontend,) = cluster.by_role("frontend")
    async with await mqd.client.connect(frontend.client_address, tls=tls_for(cluster)) as client:
        kill(cluster, "backend-3")

        async def marked_down() -> bool:
            nodes = (await client.stats())["cluster"]["nodes"]
            return not next(n for n in nodes if n["id"] == "backend-3")["up"]

        await wait_for(marked_down)
        info = await (await client.create_queue("fewer")).info()
        assert info["attributes"]["replication_factor"] == 2
        (warning,) = metadata_lines(cluster, "queue.replication_reduced")
        assert warning["queue"] == "fewer" and warning["backends_known"] == 3
        assert warning["replication_factor"] == 2 and warning["backends_up"] == 2
        # Asked for explicitly, three copies are refused rather than reduced.
        with pytest.raises(MqdError, match="replication_factor is 3"):
            await client.create_queue("three", replication_factor=3)


async def test_a_leader_promoted_with_its_set_short_keeps_the_high_watermark_it_knew(cluster):
    # A new leader's high watermark started at 0 and stayed there while its in-sync
    # set was short of min_insync; 0 was written to its file, and a later restart
    # as a follower cut its whole log and fetched it again.
    (frontend,) = cluster.by_role("frontend")
    async with await mqd.client.connect(frontend.client_address, tls=tls_for(cluster)) as client:
        queue = await client.create_queue("kept-hw", replication_factor=3, min_insync=2)
        await queue.send_batch([b"m%d" % i for i in range(50)])
        await asyncio.sleep(2.5)  # a follower learns the high watermark at its next FETCH
        (part,) = await placement_of(client, "kept-hw")
        first, (second, third) = (
            part["leader"],
            [r for r in part["replicas"] if r != part["leader"]],
        )
        kill(cluster, third)
        await asyncio.sleep(0.5)  # (its session and lag limit: 2 s and 1.5 s)
        kill(cluster, first)

        async def promoted() -> bool:
            (now,) = await placement_of(client, "kept-hw")
            return now["leader"] == second

        await wait_for(promoted)
    await asyncio.to_thread(launcher.stop_nodes, cluster, [cluster.node(second)], 30)
    (directory,) = (cluster.path(cluster.node(second).data_dir) / "partitions").glob("*-0000")
    high_watermark, _epoch = read_persisted(directory)
    assert high_watermark == 50
