"""Observability: the Prometheus endpoint, STATS figures, slow-request lines."""

from __future__ import annotations

import asyncio
import struct

from prometheus_client.parser import text_string_to_metric_families

import mqd.client
from mqd.launcher import allocate_ports
from mqd.protocol import codec, messages


async def http_request(address: str, method: str, path: str) -> bytes:
    """The whole raw answer to one HTTP/1.0 request."""
    host, port = address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(f"{method} {path} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    await writer.wait_closed()
    return data


async def http_get(address: str, path: str) -> tuple[int, str]:
    head, _, body = (await http_request(address, "GET", path)).decode().partition("\r\n\r\n")
    return int(head.split()[1]), body


async def test_metrics_endpoint_and_stats(server_factory, tmp_path):
    # Below the ephemeral range, as the server's own port: an ephemeral one can be
    # taken by an outgoing connection before the server binds it.
    (metrics_port,) = allocate_ports(1)
    metrics_address = f"127.0.0.1:{metrics_port}"
    config = tmp_path / "metrics.toml"
    config.write_text(f'[metrics]\nlisten = "{metrics_address}"\n\n[log]\nslow_request_ms = 1\n')
    server = server_factory("m", config=config)
    async with await mqd.client.connect(server.address) as client:
        queue = await client.create_queue("observed")
        await queue.send_batch([b"a", b"b", b"c"])
        got = await queue.receive(max_messages=2)
        await queue.ack(got[0])
        # A receipt refused inside a DELETE that succeeded counts too (it counted nowhere).
        assert len(await queue._delete(["AAAAnotareceipt"])) == 1
        stats = await client.stats()

    status, body = await http_get(metrics_address, "/metrics")
    assert status == 200
    assert 'mqd_queue_visible{partition="0",queue="observed"} 1.0' in body
    assert 'mqd_queue_in_flight{partition="0",queue="observed"} 1.0' in body
    assert 'mqd_queue_acked_total{partition="0",queue="observed"} 1.0' in body
    assert 'mqd_request_seconds_count{op="SEND"} 1.0' in body
    assert "mqd_commit_group_records_count" in body
    assert "mqd_commit_write_seconds_bucket" in body
    fsyncs = float(body.split("\nmqd_fsync_seconds_count ")[1].split()[0])
    assert fsyncs >= 2  # at least the SEND's and the DELETE's (fsync "always")
    assert "mqd_connections" in body
    assert 'mqd_entry_failures_total{code="RECEIPT_INVALID",op="DELETE"} 1.0' in body
    assert (await http_get(metrics_address, "/nope"))[0] == 404

    # The ack (a one-record durable group, in space the send preallocated) fsynced on
    # the loop's thread: the single node lends its stores a LoopSyncBudget. Only while
    # the disk's recent fsyncs were fast (LoopSyncBudget.slow_sync_s): on a busy
    # machine a few more rounds may be needed before one is.
    async with await mqd.client.connect(server.address) as client:
        queue = client.queue("observed")
        for _ in range(30):
            if stats["storage"]["commits_synced_on_loop"] >= 1:
                break
            await asyncio.sleep(0.05)
            await queue.send(b"again")
            await queue.ack(*await queue.receive(max_messages=1))
            stats = await client.stats()
    assert stats["storage"]["commits_synced_on_loop"] >= 1
    figures = stats["metrics"]
    assert figures["mqd_request_seconds_count{op=SEND}"] == 1.0
    assert figures["mqd_queue_sent_total{partition=0,queue=observed}"] == 3.0
    async with await mqd.client.connect(server.address) as client:
        bulk = await client.create_queue("bulk")
        await bulk.send_batch([bytes(1024)] * 1000)
    # slow_request_ms = 1: a request slower than 1 ms says so, with its sizes and
    # where the time went: a 1 MB batch spends most of it in the log's write + fsync.
    # The line is written after the reply, so it may trail it.
    big = await asyncio.to_thread(
        server.wait_for_event,
        "request.slow",
        lambda event: event["op"] == "SEND" and event["entries"] == 1000,
    )
    assert big["queue"] == "bulk" and big["outcome"] == "ok"
    # Creating a queue: its partition stores and its catalog row (all in "other" before).
    created = await asyncio.to_thread(
        server.wait_for_event, "request.slow", lambda event: event["op"] == "CREATE_QUEUE"
    )
    assert {"partitions", "catalog"} <= set(created["stages_ms"])
    assert big["request_bytes"] > 1_000_000 and big["response_bytes"] > 0
    stages_ms = big["stages_ms"]
    assert {"queued", "log", "respond"} <= set(stages_ms)
    assert sum(v for k, v in stages_ms.items() if k != "other") <= big["elapsed_ms"] + 0.1


async def test_refused_requests_count_and_a_receive_that_did_not_wait_is_slow(
    server_factory, tmp_path
):
    (metrics_port,) = allocate_ports(1)
    metrics_address = f"127.0.0.1:{metrics_port}"
    config = tmp_path / "metrics.toml"
    config.write_text(
        f'[metrics]\nlisten = "{metrics_address}"\n\n[log]\nslow_request_ms = 4\n\n'
        "[limits]\nrequests_in_flight_max = 2\n"
    )
    server = server_factory("m", config=config)
    host, port = server.address.rsplit(":", 1)
    _reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(codec.encode_request(1, messages.HelloRequest(client_name="raw")))
    async with await mqd.client.connect(server.address) as client:
        await client.create_queue("busy")
        # Two long polls fill the connection; the third and fourth are refused at
        # once, and an unknown opcode is refused too: before, none was counted.
        for correlation_id in range(2, 6):
            request = messages.ReceiveRequest(queue="busy", max_messages=1, wait_ms=1500)
            writer.write(codec.encode_request(correlation_id, request))
        writer.write(struct.pack(">IBBHI", 8, 1, 0, 0x7777, 9))
        await writer.drain()
        await asyncio.sleep(0.3)
        body = (await http_get(metrics_address, "/metrics"))[1]
        refused = 'mqd_request_errors_total{code="TOO_MANY_REQUESTS",op="RECEIVE"} 2.0'
        assert refused in body
        assert 'mqd_request_errors_total{code="UNKNOWN_OPCODE",op="unknown"} 1.0' in body
        writer.close()

        # 15 MB ready at once: a RECEIVE with a wait that did not wait is slow all the
        # same (before, any wait_ms > 0 exempted it); one that waited for 0.3 s is not.
        big = await client.create_queue("big")
        await big.send_batch([bytes(1_000_000)] * 15)
        got = await big.receive(max_messages=15, wait=5)
        assert len(got) == 15
        await big.ack(*got)
        slow = await asyncio.to_thread(
            server.wait_for_event, "request.slow", lambda event: event["op"] == "RECEIVE"
        )
        assert slow["queue"] == "big" and slow["response_bytes"] > 15_000_000
        assert slow["entries"] == 15  # the messages it got (it said 0)
        assert "wait" not in slow["stages_ms"]
        assert await big.receive(wait=0.3) == []
        await asyncio.sleep(0.2)
        waited = [e for e in server.events("request.slow") if e["op"] == "RECEIVE"]
        assert len(waited) == 1

    head = await http_request(metrics_address, "HEAD", "/metrics")
    assert head.startswith(b"HTTP/1.0 200 OK") and head.endswith(b"\r\n\r\n")
    assert int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0]) > 1000
    assert (await http_request(metrics_address, "POST", "/metrics")).startswith(b"HTTP/1.0 405")


async def test_a_nodes_storage_counters_never_go_back_when_a_queue_is_deleted(client):
    # They were summed over the open partitions only: deleting a queue took its
    # commits, fsyncs and bytes out of the node's totals (a counter going back).
    kept = await client.create_queue("kept")
    doomed = await client.create_queue("doomed")
    await doomed.send_batch([b"x" * 100] * 10)
    await kept.send(b"y")
    before = (await client.stats())["storage"]
    await client.delete_queue("doomed")
    after = (await client.stats())["storage"]
    assert after["partitions"] == before["partitions"] - 1
    for counter in ("commits", "fsyncs", "messages_appended", "bytes_written"):
        assert after[counter] >= before[counter], counter
    assert after["messages_appended"] == 11
    assert after["live_messages"] == 1  # a gauge: the deleted queue's are gone


async def test_a_scrape_of_many_partitions_lists_each_family_once_with_every_partition(
    server_factory, tmp_path
):
    # 258 partitions: more than one slice (256) of samples per family, so the
    # families are built and formatted in parts that must join into one each.
    (metrics_port,) = allocate_ports(1)
    metrics_address = f"127.0.0.1:{metrics_port}"
    config = tmp_path / "metrics.toml"
    config.write_text(f'[metrics]\nlisten = "{metrics_address}"\n')
    server = server_factory("many", config=config)
    widths = {"wide-0": 64, "wide-1": 64, "wide-2": 64, "wide-3": 64, "narrow": 2}
    async with await mqd.client.connect(server.address) as client:
        await asyncio.gather(
            *(client.create_queue(name, partitions=width) for name, width in widths.items())
        )
        await client.queue("wide-3").send_batch([b"x"] * 7)
        stats = await client.stats()

    status, body = await http_get(metrics_address, "/metrics")
    assert status == 200
    families = {family.name: family for family in text_string_to_metric_families(body)}
    expected = {(name, str(index)) for name, width in widths.items() for index in range(width)}
    for name in ("mqd_queue_visible", "mqd_queue_sent", "mqd_queue_oldest_message_age_seconds"):
        assert body.count(f"# HELP {name}") == 1
        assert body.count(f"# TYPE {name}") == 1
        samples = families[name].samples
        assert len(samples) == 258
        assert {(s.labels["queue"], s.labels["partition"]) for s in samples} == expected
    visible = {
        (s.labels["queue"], s.labels["partition"]): s.value
        for s in families["mqd_queue_visible"].samples
    }
    assert sum(visible.values()) == 7
    assert sum(v for (queue, _), v in visible.items() if queue == "wide-3") == 7
    # STATS reads the same slices.
    sent = {k: v for k, v in stats["metrics"].items() if k.startswith("mqd_queue_sent_total{")}
    assert len(sent) == 258 and sum(sent.values()) == 7
