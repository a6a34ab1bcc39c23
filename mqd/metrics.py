"""Prometheus metrics of a node (DESIGN.md §8), built on `prometheus-client`.

Counters and histograms are updated on the hot path by a handful of calls per
request or commit group (never per message); per-queue gauges are read from
the partitions when `/metrics` is scraped. The same figures answer the STATS
op, so `mqd shell stats` and a Prometheus server see one truth.

A scrape runs on the event loop, and with a thousand queues prometheus-client
takes about 0.1 s to format the nine thousand samples. So a scrape reads every
figure at once (one consistent view, a few µs per partition) and then builds
and formats the samples a slice at a time, giving the loop back between
slices: requests wait for a slice (a few ms), not for the whole scrape.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from mqd.storage import fs

log = structlog.get_logger("mqd.metrics")

_LATENCY_BUCKETS_S = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25,
)  # fmt: skip
_GROUP_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
_HTTP_REQUEST_BYTES_MAX = 8192
_HTTP_TIMEOUT_S = 5.0
# Samples formatted between two yields to the event loop (about 14 µs each).
_SAMPLES_PER_SLICE = 256


class NodeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._queues: _QueueFamilies | None = None
        registry = self.registry
        self.request_seconds = Histogram(
            "mqd_request_seconds", "Time to answer a request, by op.", ["op"],
            buckets=_LATENCY_BUCKETS_S, registry=registry,
        )  # fmt: skip
        self.request_errors = Counter(
            "mqd_request_errors", "Requests answered with an error, by op and code.",
            ["op", "code"], registry=registry,
        )  # fmt: skip
        self.entry_failures = Counter(
            "mqd_entry_failures",
            "Entries of a batch refused in an answer that succeeded (DELETE and "
            "CHANGE_VISIBILITY failures: an unknown or expired receipt), by op and code.",
            ["op", "code"], registry=registry,
        )  # fmt: skip
        self.connections = Gauge("mqd_connections", "Open client connections.", registry=registry)
        self.bytes_received = Counter(
            "mqd_received_bytes", "Bytes read from client connections.", registry=registry
        )
        self.bytes_sent = Counter(
            "mqd_sent_bytes", "Bytes written to client connections.", registry=registry
        )
        self.commit_group_records = Histogram(
            "mqd_commit_group_records", "Records written by one commit group (one write, one fsync).",
            buckets=_GROUP_BUCKETS, registry=registry,
        )  # fmt: skip
        self.commit_seconds = Histogram(
            "mqd_commit_write_seconds",
            "Time from a commit group's hand-off to its write and fsync being done.",
            buckets=_LATENCY_BUCKETS_S, registry=registry,
        )  # fmt: skip
        self.fsync_seconds = Histogram(
            "mqd_fsync_seconds",
            "Time of one fdatasync of a log (leader segments and follower replicas).",
            buckets=_LATENCY_BUCKETS_S, registry=registry,
        )  # fmt: skip

    def watch_fsyncs(self) -> None:
        """Count this process's log fsyncs (one node per process: replaces any other)."""
        fs.fsync_observers[:] = [self.fsync_seconds.observe]

    def observe_commit(self, records: int, seconds: float) -> None:
        self.commit_group_records.observe(records)
        self.commit_seconds.observe(seconds)

    def watch_queues(self, partitions: Callable[[], Iterable[Any]]) -> None:
        """Per-queue gauges, read from `partitions()` (objects with .name,
        .partition_index, .stats(), and optionally .replication) at each scrape."""
        self._queues = _QueueFamilies(partitions)

    async def _slices(self) -> AsyncIterator[tuple[Metric, bool]]:
        """Every metric family as (family, first): the node's whole, the queues'
        a slice of partitions at a time, with the loop given back between."""
        for family in self.registry.collect():
            yield family, True
        if self._queues is not None:
            async for part, first in self._queues.slices():
                yield part, first

    async def snapshot(self) -> dict[str, float]:
        """Every sample as {"name{label=value,…}": value}: what STATS reports."""
        figures: dict[str, float] = {}
        async for family, _first in self._slices():
            for sample in family.samples:
                if sample.name.endswith("_created"):
                    continue
                labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                figures[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
        return figures

    async def exposition(self) -> bytes:
        """The Prometheus text format, each slice formatted by prometheus-client;
        a family's later slices drop the HELP and TYPE lines its first carried,
        so the text is what one call over whole families would have made."""
        chunks: list[bytes] = []
        async for family, first in self._slices():
            text = generate_latest(_Families([family]))
            chunks.append(text if first else text.split(b"\n", 2)[2])
        return b"".join(chunks)

    async def serve(self, host: str, port: int) -> tuple[asyncio.Server, str]:
        """A minimal HTTP/1.0 endpoint: GET /metrics in the Prometheus text format."""
        server = await asyncio.start_server(self._handle_http, host, port)
        sockname = server.sockets[0].getsockname()
        return server, f"{sockname[0]}:{sockname[1]}"

    async def _handle_http(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _HTTP_TIMEOUT_S)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, OSError):
            writer.close()
            return
        line = request[:_HTTP_REQUEST_BYTES_MAX].split(b"\r\n", 1)[0].split()
        method = line[0] if line else b""
        if len(line) < 2 or line[1].split(b"?")[0] != b"/metrics":
            body = b"not found: try GET /metrics\n"
            head = b"HTTP/1.0 404 Not Found\r\nContent-Type: text/plain\r\n"
        elif method in (b"GET", b"HEAD"):
            body = await self.exposition()
            head = b"HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n"
        else:
            body = b"method not allowed: try GET /metrics\n"
            head = b"HTTP/1.0 405 Method Not Allowed\r\nAllow: GET, HEAD\r\nContent-Type: text/plain\r\n"
        head += b"Content-Length: %d\r\n\r\n" % len(body)
        # HEAD: the headers GET would have, without the body (RFC 9110 §9.3.2).
        writer.write(head if method == b"HEAD" else head + body)
        with contextlib.suppress(OSError):
            await writer.drain()
        writer.close()


_QUEUE_GAUGES = {
    "visible": ("mqd_queue_visible", "Messages ready to receive."),
    "in_flight": ("mqd_queue_in_flight", "Messages received and not yet acked or released."),
    "delayed": ("mqd_queue_delayed", "Messages waiting out a delay."),
    "oldest_message_age_s": ("mqd_queue_oldest_message_age_seconds", "Age of the oldest message."),
}
_QUEUE_COUNTERS = {
    "sent_total": ("mqd_queue_sent", "Messages sent since start."),
    "received_total": ("mqd_queue_received", "Deliveries since start."),
    "acked_total": ("mqd_queue_acked", "Messages acked since start."),
    "expired_total": ("mqd_queue_expired", "Messages dropped by retention since start."),
    "dead_lettered_total": ("mqd_queue_dead_lettered", "Messages moved to a DLQ since start."),
}


class _Families:
    """Families already collected, in the shape `generate_latest` reads."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return self._families


class _QueueFamilies:
    def __init__(self, partitions: Callable[[], Iterable[Any]]) -> None:
        self._partitions = partitions

    def _read(
        self,
    ) -> tuple[list[tuple[tuple[str, ...], dict[str, Any]]], list[tuple[tuple[str, ...], float]]]:
        """Every partition's figures in one pass: the families agree, and no
        partition closes between slices. Tuples and dicts of strings and numbers
        only, which the collector stops tracking: they are alive for the whole
        scrape and would otherwise count toward a full collection."""
        rows = []
        lags = []
        for partition in self._partitions():
            values = (partition.name, str(partition.partition_index))
            rows.append((values, partition.stats()))
            replication = getattr(partition, "replication", None)
            if replication is not None:
                end = replication.store.next_offset
                for replica in replication.replicas:
                    if replica != replication.node_id:
                        behind = max(0, end - replication.acked.get(replica, 0))
                        lags.append(((*values, replica), float(behind)))
        return rows, lags

    async def slices(self) -> AsyncIterator[tuple[Metric, bool]]:
        # Only a slice's samples are alive at once: a scrape that built all of
        # them first kept ~27k objects past two young collections, and each
        # such scrape brought on a full one (100 ms with 1,000 queues).
        rows, lags = self._read()
        labels = ["queue", "partition"]
        for kind, specs in (
            (GaugeMetricFamily, _QUEUE_GAUGES),
            (CounterMetricFamily, _QUEUE_COUNTERS),
        ):
            for key, (name, doc) in specs.items():
                for start in range(0, max(len(rows), 1), _SAMPLES_PER_SLICE):
                    family = kind(name, doc, labels=labels)
                    for values, stats in rows[start : start + _SAMPLES_PER_SLICE]:
                        family.add_metric(values, float(stats.get(key, 0)))
                    yield family, start == 0
                    await asyncio.sleep(0)
        for start in range(0, max(len(lags), 1), _SAMPLES_PER_SLICE):
            family = GaugeMetricFamily(
                "mqd_replication_lag_records",
                "Records a follower is behind its leader (from the leader's view).",
                labels=["queue", "partition", "replica"],
            )
            for values, behind in lags[start : start + _SAMPLES_PER_SLICE]:
                family.add_metric(values, behind)
            yield family, start == 0
            await asyncio.sleep(0)
