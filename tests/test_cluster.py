"""The cluster with real processes on loopback: routing, placement, metadata loss,
mutual TLS, rebalance. Started with the local launcher (`mqd cluster`)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import ssl
import time
import zlib
from collections import Counter
from pathlib import Path

import pytest

import mqd.client
from mqd import certs, launcher
from mqd.errors import MqdError, Unavailable
from tests.cluster_helpers import running, tls_for

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    directory = tmp_path_factory.mktemp("cluster")
    manifest = launcher.create_cluster(directory, metadata=1, backends=3, frontends=2)
    with running(manifest):
        yield manifest


def frontend_addresses(manifest: launcher.Manifest) -> list[str]:
    return [node.client_address for node in manifest.by_role("frontend")]


async def test_every_op_from_every_frontend(cluster):
    fe1, fe2 = frontend_addresses(cluster)
    tls = tls_for(cluster)
    async with (
        await mqd.client.connect(fe1, tls=tls) as one,
        await mqd.client.connect(fe2, tls=tls) as two,
    ):
        created = await one.create_queue("every-op", visibility_timeout=20, partitions=2)
        assert created.name == "every-op"
        assert "every-op" in await two.list_queues()
        info = await two.get_queue("every-op")
        assert info["attributes"]["visibility_timeout"] == 20
        await two.set_queue_attributes("every-op", visibility_timeout=25)
        q1, q2 = one.queue("every-op"), two.queue("every-op")
        ids = await q1.send_batch([b"a", b"b", b"c"])
        ids += await q2.send_batch([b"d", b"e"])
        peeked = await q2.peek(max_messages=10)
        assert sorted(m.id for m in peeked) == sorted(ids)
        # Followed with a cursor, page by page, through either frontend (§4.13).
        cursor, followed = "", []
        for q in (q1, q2, q1, q2, q1, q2):
            page = await q.peek(max_messages=2, after_id=cursor)
            followed += [m.id for m in page]
            cursor = mqd.client.peek_cursor(page, cursor)
        assert sorted(followed) == sorted(ids)
        assert cursor.count(",") == len({message_id.split("-")[1] for message_id in ids})
        got = []
        for _ in range(10):
            got += await q2.receive(max_messages=10)
            if len(got) == 5:
                break
        assert sorted(m.body for m in got) == [b"a", b"b", b"c", b"d", b"e"]
        assert got[0].receive_count == 1
        # Receipts route to their partition from any frontend.
        await q1.change_visibility(got[0], 0)
        await q1.ack(*got[1:])
        (again,) = await q2.receive(max_messages=10, wait=2)
        assert again.id == got[0].id and again.receive_count == 2
        await q1.ack(again)
        stats = await q1.stats()
        assert stats["acked_total"] == 5 and stats["visible"] == 0
        await q2.send(b"purge me")
        assert await q1.purge() == 1
        await one.delete_queue("every-op")
        assert "every-op" not in await two.list_queues()


async def test_partitions_spread_over_every_backend(cluster):
    (fe1, _) = frontend_addresses(cluster)
    async with await mqd.client.connect(fe1, tls=tls_for(cluster)) as client:
        await client.create_queue("spread", partitions=6)
        stats = await client.stats()
    placement = stats["cluster"]["placement"]["spread"]
    leaders = Counter(part["leader"] for part in placement)
    assert set(leaders) == {"backend-1", "backend-2", "backend-3"}, leaders


async def test_long_poll_across_partitions_on_several_backends(cluster):
    (fe1, fe2) = frontend_addresses(cluster)
    tls = tls_for(cluster)
    async with (
        await mqd.client.connect(fe1, tls=tls) as consumer,
        await mqd.client.connect(fe2, tls=tls) as producer,
    ):
        await consumer.create_queue("poll", partitions=6)
        waiting = asyncio.create_task(consumer.queue("poll").receive(wait=15))
        await asyncio.sleep(0.5)
        assert not waiting.done()
        await producer.queue("poll").send(b"wake up")
        messages = await asyncio.wait_for(waiting, 10)
        assert [m.body for m in messages] == [b"wake up"]


async def test_dead_letters_cross_backends(cluster):
    (fe1, _) = frontend_addresses(cluster)
    async with await mqd.client.connect(fe1, tls=tls_for(cluster)) as client:
        await client.create_queue("dlq-x", partitions=3)
        source = await client.create_queue(
            "work-x",
            partitions=3,
            redrive_policy={"dead_letter_queue": "dlq-x", "max_receive_count": 1},
        )
        sent = set(await source.send_batch([b"%d" % i for i in range(9)]))
        for _ in range(3):
            await source.send_batch([b"filler"])
        delivered = []
        for _ in range(20):
            delivered += await source.receive(max_messages=10, visibility_timeout=0)
        assert delivered
        dead = []
        for _ in range(20):
            batch = await client.queue("dlq-x").receive(max_messages=10)
            dead += batch
            if not batch:
                break
        assert {m.original_id for m in dead} >= sent & {m.id for m in delivered}
        assert all(m.source_queue == "work-x" for m in dead)


async def test_existing_queues_keep_working_without_metadata(cluster):
    (fe1, fe2) = frontend_addresses(cluster)
    tls = tls_for(cluster)
    async with await mqd.client.connect(fe1, tls=tls) as client:
        queue = await client.create_queue("no-meta", partitions=2)
        await queue.send(b"before")
    metadata = cluster.by_role("metadata")[0]
    await asyncio.to_thread(launcher.stop_nodes, cluster, [metadata])
    try:
        async with await mqd.client.connect(fe2, tls=tls) as client:
            queue = client.queue("no-meta")
            await queue.send_batch([b"during"] * 3)
            got = []
            for _ in range(10):
                got += await queue.receive(max_messages=10)
                if len(got) == 4:
                    break
            assert sorted(m.body for m in got) == [b"before"] + [b"during"] * 3
            await queue.ack(*got)
            with pytest.raises(Unavailable):
                await client.create_queue("needs-meta")
    finally:
        await asyncio.to_thread(launcher.restart_node, cluster, metadata)


def test_cluster_port_refuses_a_foreign_certificate(cluster, tmp_path):
    foreign = tmp_path / "foreign"
    certs.init_ca(foreign)
    cert, key = certs.issue(foreign, "intruder", sans=["localhost", "127.0.0.1"])
    backend = cluster.by_role("backend")[0]
    host, port = backend.cluster_address.rsplit(":", 1)
    for client_cert in (cert, None):
        context = ssl.create_default_context(cafile=str(cluster.client_ca))
        if client_cert is not None:
            context.load_cert_chain(str(cert), str(key))
        refused = False
        with socket.create_connection((host, int(port)), timeout=5) as raw:
            try:
                with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                    # TLS 1.3 reports a refused client certificate on the first read.
                    tls.settimeout(5)
                    data = tls.recv(1)
                    refused = data == b""
            except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
                refused = True
        assert refused, f"a node with {'a foreign' if client_cert else 'no'} certificate got in"


# --- growing the cluster: a cluster of its own ----------------------------------------


async def wait_backend_up(address: str, tls: ssl.SSLContext, node_id: str) -> None:
    deadline = time.monotonic() + 30
    async with await mqd.client.connect(address, tls=tls) as client:
        while time.monotonic() < deadline:
            nodes = (await client.stats())["cluster"]["nodes"]
            if any(n["id"] == node_id and n["up"] for n in nodes):
                return
            await asyncio.sleep(0.2)
    raise AssertionError(f"{node_id} never came up")


async def test_rebalance_after_adding_a_backend_loses_nothing(tmp_path: Path):
    manifest = launcher.create_cluster(tmp_path / "grow", metadata=1, backends=2, frontends=1)
    try:
        # Inside the try: a start that fails half way leaves no node running.
        await asyncio.to_thread(launcher.start_cluster, manifest, 90)
        (address,) = frontend_addresses(manifest)
        tls = tls_for(manifest)
        async with await mqd.client.connect(address, tls=tls) as client:
            sent: set[str] = set()
            for name in ("grow-a", "grow-b", "grow-c"):
                queue = await client.create_queue(name, partitions=8, replication_factor=1)
                for _ in range(8):
                    sent |= set(await queue.send_batch([b"%s" % name.encode()] * 25))
            # Some messages in flight across the move: their receipts must still work after it.
            in_flight = await client.queue("grow-a").receive(
                max_messages=20, visibility_timeout=120
            )
            assert in_flight

            await asyncio.to_thread(launcher.add_backend, manifest, "backend-3")
            await wait_backend_up(address, tls, "backend-3")

            from mqd.protocol.messages import RebalanceRequest

            plan = await client._call(RebalanceRequest(dry_run=True))
            assert 0 < len(plan.moves) < 24, "about a third of 24 partitions move"
            assert all(move.target == "backend-3" for move in plan.moves)
            done = await client._call(RebalanceRequest(dry_run=False), timeout_s=120)
            assert [m.status for m in done.moves] == ["moved"] * len(plan.moves)
            assert (await client._call(RebalanceRequest(dry_run=True))).moves == []

            placement = (await client.stats())["cluster"]["placement"]
            leaders = Counter(p["leader"] for parts in placement.values() for p in parts)
            assert leaders["backend-3"] == len(plan.moves)

            await client.queue("grow-a").ack(*in_flight)
            received: set[str] = {m.id for m in in_flight}
            duplicates = 0
            for name in ("grow-a", "grow-b", "grow-c"):
                queue = client.queue(name)
                for _ in range(100):
                    batch = await queue.receive(max_messages=100, visibility_timeout=120)
                    if not batch:
                        break
                    duplicates += sum(1 for m in batch if m.id in received)
                    received |= {m.id for m in batch}
                    await queue.ack(*batch)
            assert received == sent, f"lost {len(sent - received)}"
            assert duplicates == 0
    finally:
        await asyncio.to_thread(
            launcher.stop_nodes, manifest, manifest.in_order(["frontend", "backend", "metadata"])
        )


async def test_client_with_two_frontends_survives_losing_one(tmp_path: Path):
    manifest = launcher.create_cluster(tmp_path / "two", metadata=1, backends=1, frontends=2)
    try:
        # Inside the try: a start that fails half way leaves no node running.
        await asyncio.to_thread(launcher.start_cluster, manifest, 90)
        fe1, fe2 = frontend_addresses(manifest)
        async with await mqd.client.connect(f"{fe1},{fe2}", tls=tls_for(manifest)) as client:
            queue = await client.create_queue("ha")
            await queue.send(b"one")
            first = manifest.by_role("frontend")[0]
            await asyncio.to_thread(launcher.stop_nodes, manifest, [first])
            sent_after = 0
            for _ in range(5):
                try:
                    await queue.send(b"two")
                    sent_after += 1
                except MqdError:
                    continue
            assert sent_after >= 4, "the client moved to the other frontend"
            got = await queue.receive(max_messages=10)
            assert len(got) == 1 + sent_after
    finally:
        await asyncio.to_thread(
            launcher.stop_nodes, manifest, manifest.in_order(["frontend", "backend", "metadata"])
        )


def test_admin_nodes_and_placement_commands(cluster):
    import json
    import subprocess
    import sys

    (fe1, _) = frontend_addresses(cluster)
    common = ["--address", fe1, "--ca", str(cluster.client_ca), "--json"]

    def admin(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "mqd", "admin", *args, *common],
            capture_output=True,
            text=True,
            timeout=60,
        )

    nodes = admin("nodes")
    assert nodes.returncode == 0, nodes.stderr
    listed = {node["id"]: node for node in json.loads(nodes.stdout)}
    assert {"metadata-1", "backend-1", "backend-2", "backend-3", "frontend-1", "frontend-2"} <= set(
        listed
    )
    assert all(listed[f"backend-{i}"]["up"] for i in (1, 2, 3))

    asyncio.run(_create(fe1, cluster, "placed", 4))
    placement = admin("placement", "placed")
    assert placement.returncode == 0, placement.stderr
    parts = json.loads(placement.stdout)["queues"]["placed"]
    assert [p["index"] for p in parts] == [0, 1, 2, 3]
    assert all(p["leader"].startswith("backend-") for p in parts)

    plan = admin("rebalance", "--dry-run")
    assert plan.returncode == 0, plan.stderr
    assert json.loads(plan.stdout)["moves"] == []


async def _create(address: str, manifest: launcher.Manifest, name: str, partitions: int) -> None:
    async with await mqd.client.connect(address, tls=tls_for(manifest)) as client:
        await client.create_queue(name, partitions=partitions)


@pytest.fixture
def small_cluster(tmp_path: Path):
    """One backend that takes at most 16 requests in flight per connection."""
    manifest = launcher.create_cluster(tmp_path / "small", metadata=1, backends=1, frontends=1)
    for node in manifest.by_role("backend"):
        path = manifest.path(node.config)
        path.write_text(path.read_text() + "\n[limits]\nrequests_in_flight_max = 16\n")
    with running(manifest):
        yield manifest


async def test_long_polls_across_partitions_do_not_pile_up_on_the_backend(small_cluster):
    # A receive over several partitions waits on each (PARTITION_WAIT); woken by one, it
    # abandons the others, which the backend keeps for their whole wait. One per
    # receive filled the frontend's connection to the backend: after 16 rounds every
    # request through it was refused with TOO_MANY_REQUESTS. Now the receives share.
    (address,) = frontend_addresses(small_cluster)
    async with await mqd.client.connect(address, tls=tls_for(small_cluster)) as client:
        queue = await client.create_queue("wide", partitions=2, replication_factor=1)
        # Keys that all land in partition 0 (crc32(key) mod 2, protocol.md §7.10): the
        # waits on partition 1 are the abandoned ones, never woken.
        keys = [k for k in (f"k{i}" for i in range(200)) if zlib.crc32(k.encode()) % 2 == 0]
        for round_number in range(30):
            waiting = asyncio.create_task(queue.receive(wait=20))
            await asyncio.sleep(0.2)  # (parked on both partitions by now)
            await queue.send(b"%d" % round_number, dedup_id=keys[round_number])
            (message,) = await asyncio.wait_for(waiting, 10)
            await queue.ack(message)
        assert (await queue.stats())["acked_total"] == 30


@pytest.fixture
def two_backends(tmp_path: Path):
    manifest = launcher.create_cluster(tmp_path / "two", metadata=1, backends=2, frontends=1)
    with running(manifest):
        yield manifest


async def test_a_receive_over_partitions_skips_one_that_is_down(two_backends):
    # One copy per partition, spread over two backends; one backend dies for good.
    # Before, a receive that met its partition first retried it for 15 s and then
    # failed whole (UNAVAILABLE), though the other partitions held messages.
    (address,) = frontend_addresses(two_backends)
    async with await mqd.client.connect(address, tls=tls_for(two_backends)) as client:
        for attempt in range(10):  # a queue whose partitions the ring puts on both
            name = f"spread-{attempt}"
            queue = await client.create_queue(name, partitions=4, replication_factor=1)
            placement = (await client.stats())["cluster"]["placement"][name]
            leaders = {part["index"]: part["leader"] for part in placement}
            if set(leaders.values()) == {"backend-1", "backend-2"}:
                break
        assert set(leaders.values()) == {"backend-1", "backend-2"}
        ids = await queue.send_batch([{"body": b"%d" % i, "dedup_id": f"k{i}"} for i in range(40)])
        dead = "backend-2"
        pid_file = two_backends.path(two_backends.node(dead).pid_file)
        os.kill(int(pid_file.read_text()), signal.SIGKILL)
        live = {i for i in ids if leaders[int(i.split("-")[1], 16)] != dead}
        got: set[str] = set()
        for _ in range(len(leaders) * 2):
            started = time.monotonic()
            batch = await queue.receive(max_messages=40, wait=1)
            assert time.monotonic() - started < 5
            got |= {m.id for m in batch}
            if batch:
                await queue.ack(*batch)
            if got == live:
                break
        assert got == live
        # Its figures too: the live partitions' sums, and which are missing. Before,
        # GET_QUEUE retried the dead one for 15 s and then failed whole.
        down = sorted(i for i, leader in leaders.items() if leader == dead)
        stats = await queue.stats()
        assert stats["partitions_unavailable"] == down
        assert stats["acked_total"] == len(live) and stats["visible"] == 0
