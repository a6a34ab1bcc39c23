"""Observability: the Prometheus endpoint, STATS figures, slow-request lines."""

from __future__ import annotations

import asyncio

import mqd.client
from mqd.launcher import allocate_ports


async def http_get(address: str, path: str) -> tuple[int, str]:
    host, port = address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(f"GET {path} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    await writer.wait_closed()
    head, _, body = data.decode().partition("\r\n\r\n")
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
    assert (await http_get(metrics_address, "/nope"))[0] == 404

    # The ack (a one-record durable group, in space the send preallocated) fsynced on
    # the loop's thread: the single node lends its stores a LoopSyncBudget.
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
    assert big["request_bytes"] > 1_000_000 and big["response_bytes"] > 0
    stages_ms = big["stages_ms"]
    assert {"queued", "log", "respond"} <= set(stages_ms)
    assert sum(v for k, v in stages_ms.items() if k != "other") <= big["elapsed_ms"] + 0.1
