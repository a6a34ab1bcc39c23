"""The frontend's view of queues: catalog lookups and partition endpoints.

Handlers in `mqd.frontend` speak only to a `Router`. The router holds the
multi-partition logic (which partition a send goes to, one long poll across
partitions, acks routed by receipt, stats summed), over two seams:

- a `Catalog` (queue records by name, admin ops), and
- `PartitionEndpoint`s (the queue ops of one partition).

The single node plugs in the metadata role and local partitions, in-process
(`LocalCatalog`, `LocalEndpoint`); a cluster frontend plugs in the same
interfaces over the network (`mqd.cluster.remote`). So there is one code
path for queue semantics (DESIGN.md §2).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import hashlib
import itertools
import zlib
from collections.abc import Awaitable, Iterable, Iterator, Sequence
from typing import Any, Protocol

import structlog

from mqd.errors import (
    ErrorCode,
    InvalidArgument,
    MqdError,
    QueueNotFound,
    RequestTimeout,
    Unavailable,
)
from mqd.metadata import QueueRecord
from mqd.protocol.codec import utf8_len
from mqd.protocol.messages import (
    DecommissionResponse,
    DeliveredMessage,
    EntryFailure,
    QueueInfo,
    RebalanceResponse,
    SendEntry,
)
from mqd.receipts import parse_message_id

log = structlog.get_logger("mqd.router")

# What a delivered message costs in a RECEIVE response beyond its body (an upper
# estimate: ids, receipt, attributes are small next to the headroom kept).
MESSAGE_OVERHEAD_BYTES = 512
WAKE_RETRY_S = 0.01
# A receive over partitions that all failed their waits looks again after this.
DOWN_RETRY_S = 0.1
# What a partition that is down answers: skipped by a receive over several partitions.
PARTITION_DOWN = (Unavailable, RequestTimeout)
# Stats that add up across partitions; the rest take the maximum.
_MAX_STATS = frozenset({"oldest_message_age_s"})


class PartitionEndpoint(Protocol):
    """The queue ops of one partition of one queue (local or remote)."""

    index: int

    async def send(self, queue: QueueRecord, entries: list[SendEntry]) -> list[str]: ...
    async def receive(
        self,
        queue: QueueRecord,
        max_messages: int,
        wait_ms: int,
        visibility_ms: int,
        bytes_max: int,
        *,
        patient: bool = True,
    ) -> list[DeliveredMessage]: ...
    async def wait_ready(self, queue: QueueRecord, wait_ms: int) -> int: ...
    async def delete(self, queue: QueueRecord, receipts: list[str]) -> list[EntryFailure]: ...
    async def change_visibility(
        self, queue: QueueRecord, changes: list[tuple[str, int]]
    ) -> list[EntryFailure]: ...
    async def peek(
        self, queue: QueueRecord, max_messages: int, after_id: str, bytes_max: int
    ) -> list[DeliveredMessage]: ...
    async def purge(self, queue: QueueRecord) -> int: ...
    async def stats(self, queue: QueueRecord, *, patient: bool = True) -> dict[str, Any]: ...
    async def redrive(
        self, queue: QueueRecord, to: str, max_messages: int, rate_per_s: int
    ) -> tuple[int, list[str]]: ...


class Catalog(Protocol):
    async def lookup(self, name: str) -> QueueRecord: ...
    async def create_queue(
        self,
        name: str,
        attributes: dict[str, Any],
        exist_ok: bool,
        *,
        owner: str = "",
        owned_max: int = 0,
    ) -> QueueRecord: ...
    async def delete_queue(self, name: str) -> None: ...
    async def set_attributes(self, name: str, attributes: dict[str, Any]) -> QueueRecord: ...
    async def list_queues(self, prefix: str) -> list[str]: ...
    def endpoints(self, queue: QueueRecord) -> Sequence[PartitionEndpoint]: ...
    def stats(self) -> dict[str, Any]: ...
    async def node_stats(self, own_id: str) -> dict[str, Any] | None: ...
    def stop_long_polls(self) -> None: ...
    async def rebalance(self, dry_run: bool) -> RebalanceResponse: ...
    async def decommission(self, node_id: str) -> DecommissionResponse: ...


def peek_cursors(queue: QueueRecord, partitions: int, after_id: str) -> tuple[int, dict[int, str]]:
    """PEEK's `after_id` (protocol.md §4.13) as the partition to start at and the id to
    continue after in each partition. One id pages on: the partitions before its own are
    done. Ids each followed by a comma are a cursor per partition, for following a
    queue: the partitions they name continue after them, the rest start at the oldest."""
    if not after_id:
        return 0, {}
    listed = after_id.endswith(",")
    cursors: dict[int, str] = {}
    for text in after_id[:-1].split(",") if listed else [after_id]:
        parsed = parse_message_id(text)
        if parsed is None or parsed[0] != queue.queue_id or parsed[1] >= partitions:
            raise InvalidArgument(f"after_id {text!r} is not a message id of this queue")
        if parsed[1] in cursors:
            raise InvalidArgument(f"after_id names partition {parsed[1]} twice")
        cursors[parsed[1]] = text
    return (0, cursors) if listed else (next(iter(cursors)), cursors)


def dedup_key(dedup_id: str, body: bytes, content_based: bool) -> str | None:
    """A standard message's deduplication key, as its partition will compute it."""
    if dedup_id:
        return dedup_id
    if content_based:
        return hashlib.sha256(body).hexdigest()
    return None


def key_partition(key: str, partitions: int) -> int:
    """The partition a FIFO group or a deduplication key always goes to, on every node
    (sends and moves alike)."""
    return zlib.crc32(key.encode()) % partitions


def split_moved(
    messages: list[Any], partitions: int, fifo: bool, cursor: Iterator[int]
) -> dict[int, list[Any]]:
    """Messages moved into a queue (dead letters, redrive) by target partition: a FIFO
    message to its group's (so the group keeps its order and one-in-flight rule), the
    others round robin, message by message (protocol.md §7.7 ACCEPT_MOVED)."""
    by_index: dict[int, list[Any]] = {}
    for message in messages:
        if fifo:
            index = key_partition(message.group_id, partitions)
        else:
            index = next(cursor) % partitions
        by_index.setdefault(index, []).append(message)
    return by_index


def receipt_partition(receipt: str) -> int | None:
    """The partition a receipt names, read without checking its MAC (routing only:
    the partition's owner verifies it, protocol.md §5.4)."""
    try:
        raw = base64.urlsafe_b64decode(receipt.encode("ascii"))
    except (binascii.Error, UnicodeEncodeError, ValueError):
        return None
    if len(raw) < 11:
        return None
    return int.from_bytes(raw[9:11], "big")


async def _all(calls: Iterable[Awaitable[None]]) -> None:
    """Await the calls side by side; one alone directly. (A gather of one still costs a
    task and a callback, two loop turns: a W2 DELETE's `other` stage was p50 0.12 ms,
    p90 0.34, against a SEND's 0.03; a non-FIFO send to a partitioned queue is one
    partition's too.)"""
    calls = list(calls)
    if len(calls) == 1:
        await calls[0]
    else:
        await asyncio.gather(*calls)


class Router:
    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self._send_cursor = itertools.count()
        self._receive_cursor = itertools.count()

    async def lookup(self, name: str) -> QueueRecord:
        if not isinstance(name, str) or not name:
            raise InvalidArgument("queue name is required")
        return await self.catalog.lookup(name)

    async def queue_info(self, queue: QueueRecord) -> QueueInfo:
        endpoints = self.catalog.endpoints(queue)
        if len(endpoints) == 1:
            stats = await endpoints[0].stats(queue)
        else:
            # A partition whose leader is down is named, not waited for: its figures
            # are missing from the sums, the others' are there (protocol.md §5.3).
            results = await asyncio.gather(
                *(endpoint.stats(queue, patient=False) for endpoint in endpoints),
                return_exceptions=True,
            )
            parts: list[dict[str, Any]] = []
            missing: list[int] = []
            for endpoint, result in zip(endpoints, results, strict=True):
                if not isinstance(result, BaseException):
                    parts.append(result)
                elif isinstance(result, MqdError):
                    missing.append(endpoint.index)
                else:
                    raise result
            if not parts:
                raise results[0]
            stats = merge_stats(parts)
            if missing:
                stats["partitions_unavailable"] = missing
        return QueueInfo(name=queue.name, attributes=dict(queue.attributes), stats=stats)

    # --- sends --------------------------------------------------------------

    async def send(self, queue: QueueRecord, entries: list[SendEntry]) -> list[str]:
        endpoints = self.catalog.endpoints(queue)
        if len(endpoints) == 1:
            return await endpoints[0].send(queue, entries)
        by_partition: dict[int, list[int]] = {}
        if queue.attributes.get("fifo"):
            # A group always lands in one partition, so its order holds (protocol.md §4 FIFO).
            for position, entry in enumerate(entries):
                index = key_partition(entry.group_id, len(endpoints))
                by_partition.setdefault(index, []).append(position)
        else:
            # Round robin per batch: a batch stays together, batches spread. But a message
            # with a deduplication key goes where that key always goes, so a repeat meets
            # the first in the same partition's dedup index (protocol.md §4.0).
            index = next(self._send_cursor) % len(endpoints)
            content = bool(queue.attributes.get("content_based_dedup"))
            if content:
                entries = list(entries)
            elif not any(entry.dedup_id for entry in entries):
                return await endpoints[index].send(queue, entries)  # no keys: as one batch
            for position, entry in enumerate(entries):
                key = dedup_key(entry.dedup_id, entry.body, content)
                target = index if key is None else key_partition(key, len(endpoints))
                by_partition.setdefault(target, []).append(position)
                if key is not None and not entry.dedup_id:
                    # The body's hash is the key: hand it over, or the partition hashes
                    # the body again (it stores the same key either way, §4.0).
                    entries[position] = dataclasses.replace(entry, dedup_id=key)
        ids: list[str] = [""] * len(entries)

        async def send_part(index: int, positions: list[int]) -> None:
            part_ids = await endpoints[index].send(queue, [entries[p] for p in positions])
            for position, message_id in zip(positions, part_ids, strict=True):
                ids[position] = message_id

        await _all(send_part(i, ps) for i, ps in by_partition.items())
        return ids

    # --- receives -------------------------------------------------------------

    async def receive(
        self,
        queue: QueueRecord,
        max_messages: int,
        wait_ms: int,
        visibility_ms: int,
        bytes_max: int,
    ) -> list[DeliveredMessage]:
        endpoints = self.catalog.endpoints(queue)
        if len(endpoints) == 1:
            return await endpoints[0].receive(
                queue, max_messages, wait_ms, visibility_ms, bytes_max
            )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_ms / 1000
        start = next(self._receive_cursor)
        order = [endpoints[(start + i) % len(endpoints)] for i in range(len(endpoints))]
        woken_for_nothing = False
        while True:
            collected: list[DeliveredMessage] = []
            budget = bytes_max
            down: list[PartitionEndpoint] = []
            for endpoint in order:
                need = max_messages - len(collected)
                if need <= 0 or budget <= 0:
                    break
                try:
                    # Not patient: a partition that is down (its leader gone, a failover
                    # under way) is skipped at once, and the others still serve.
                    got = await endpoint.receive(
                        queue, need, 0, visibility_ms, budget, patient=False
                    )
                except PARTITION_DOWN:
                    down.append(endpoint)
                    continue
                except MqdError as exc:
                    if not collected:
                        raise
                    # What the partitions before it gave is leased to this RECEIVE:
                    # answer with it rather than strand it in flight for the whole
                    # visibility timeout. The error comes again to a later RECEIVE
                    # that reaches this partition first, if it lasts.
                    log.warning(
                        "receive.partition_failed",
                        queue=queue.name,
                        partition=endpoint.index,
                        error=str(exc),
                        returned=len(collected),
                    )
                    return collected
                collected += got
                # The whole answer must fit one frame (protocol.md §5.1).
                budget -= sum(_delivered_bytes(m) for m in got)
            remaining_ms = int((deadline - loop.time()) * 1000)
            if collected or (remaining_ms <= 0 and len(down) < len(order)):
                return collected
            if len(down) == len(order):
                # Every partition is down: ride out a failover on one, as a queue of
                # one partition would (protocol.md §7.13), or give its error.
                return await order[0].receive(
                    queue, max_messages, max(0, remaining_ms), visibility_ms, bytes_max
                )
            if woken_for_nothing:
                # A partition said it had messages, then another consumer took them:
                # pause a moment rather than spin on the hint.
                await asyncio.sleep(WAKE_RETRY_S)
            up = [endpoint for endpoint in order if endpoint not in down]
            woken_for_nothing = await self._wait_any(queue, up, remaining_ms)

    async def _wait_any(
        self, queue: QueueRecord, endpoints: list[PartitionEndpoint], wait_ms: int
    ) -> bool:
        """One long poll across `endpoints`: until the first says it has a message
        (True) or the wait is over (False). A partition whose wait fails is left out."""
        waits = [asyncio.ensure_future(e.wait_ready(queue, wait_ms)) for e in endpoints]
        try:
            pending = set(waits)
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                answered = [f for f in done if not f.cancelled() and f.exception() is None]
                if answered:
                    return any(f.result() > 0 for f in answered)
                for failed in done:
                    exc = failed.exception()
                    if exc is not None and not isinstance(exc, PARTITION_DOWN):
                        raise exc
            # Every wait failed: look again (the receives find which are down).
            await asyncio.sleep(DOWN_RETRY_S)
            return False
        finally:
            for waiting in waits:
                waiting.cancel()
            await asyncio.gather(*waits, return_exceptions=True)

    # --- acks and visibility ------------------------------------------------------

    async def delete(self, queue: QueueRecord, receipts: list[str]) -> list[EntryFailure]:
        return await self._by_receipt_partition(
            queue, receipts, receipts, lambda endpoint, items: endpoint.delete(queue, items)
        )

    async def change_visibility(
        self, queue: QueueRecord, changes: list[tuple[str, int]]
    ) -> list[EntryFailure]:
        return await self._by_receipt_partition(
            queue,
            [receipt for receipt, _ in changes],
            changes,
            lambda endpoint, items: endpoint.change_visibility(queue, items),
        )

    async def _by_receipt_partition(
        self, queue: QueueRecord, receipts: list[str], items: list[Any], call: Any
    ) -> list[EntryFailure]:
        endpoints = self.catalog.endpoints(queue)
        failures: list[EntryFailure] = []
        groups: dict[int, list[int]] = {}
        for position, receipt in enumerate(receipts):
            index = 0 if len(endpoints) == 1 else receipt_partition(receipt)
            if index is None or index >= len(endpoints):
                failures.append(
                    EntryFailure(position, ErrorCode.RECEIPT_INVALID, "receipt is malformed")
                )
                continue
            groups.setdefault(index, []).append(position)

        async def run(index: int, positions: list[int]) -> None:
            part_failures = await call(endpoints[index], [items[p] for p in positions])
            for failure in part_failures:
                failure.index = positions[failure.index]
                failures.append(failure)

        await _all(run(index, positions) for index, positions in groups.items())
        failures.sort(key=lambda failure: failure.index)
        return failures

    # --- the rest -------------------------------------------------------------------

    async def peek(
        self, queue: QueueRecord, max_messages: int, after_id: str, bytes_max: int
    ) -> list[DeliveredMessage]:
        """Up to `max_messages`, in at most about `bytes_max` (always at least one)."""
        endpoints = self.catalog.endpoints(queue)
        first, cursors = peek_cursors(queue, len(endpoints), after_id)
        found: list[DeliveredMessage] = []
        budget = bytes_max
        for index in range(first, len(endpoints)):
            cursor = cursors.get(index, "")
            part = await endpoints[index].peek(queue, max_messages - len(found), cursor, budget)
            for message in part:
                size = _delivered_bytes(message)
                if size > budget and found:
                    return found  # full: the caller pages on from the last one
                found.append(message)
                budget -= size
            if len(found) >= max_messages or budget <= 0:
                break
        return found

    async def purge(self, queue: QueueRecord) -> int:
        counts = await asyncio.gather(*(e.purge(queue) for e in self.catalog.endpoints(queue)))
        return sum(counts)

    async def redrive(
        self, queue: QueueRecord, to: str, max_messages: int, rate_per_s: int
    ) -> tuple[int, list[str]]:
        endpoints = self.catalog.endpoints(queue)
        moved = 0
        problems: list[str] = []
        for endpoint in endpoints:
            budget = max_messages - moved if max_messages else 0
            if max_messages and budget <= 0:
                break
            rate = max(1, rate_per_s // len(endpoints)) if rate_per_s else 0
            part_moved, part_problems = await endpoint.redrive(queue, to, budget, rate)
            moved += part_moved
            problems += part_problems
        return moved, problems[:20]


def _delivered_bytes(message: DeliveredMessage) -> int:
    """About what the message takes in a RECEIVE answer: attributes in UTF-8 bytes."""
    attributes = sum(utf8_len(k) + utf8_len(v) for k, v in message.attributes.items())
    return len(message.body) + attributes + MESSAGE_OVERHEAD_BYTES


def merge_stats(parts: list[dict[str, Any]]) -> dict[str, Any]:
    if len(parts) == 1:
        return parts[0]
    merged: dict[str, Any] = {}
    for part in parts:
        for key, value in part.items():
            if key in _MAX_STATS:
                # The first partition's value starts it, so a float stays a float.
                merged[key] = max(merged[key], value) if key in merged else value
            elif isinstance(value, int | float) and not isinstance(value, bool):
                merged[key] = merged.get(key, 0) + value
            else:
                merged.setdefault(key, value)
    return merged


# --- the single node: in-process catalog and partitions -------------------------------


class LocalEndpoint:
    """One partition of this process's backend role."""

    def __init__(self, backend: Any, index: int) -> None:
        self._backend = backend
        self.index = index

    def _partition(self, queue: QueueRecord) -> Any:
        return self._backend.partition(queue, self.index)

    async def send(self, queue: QueueRecord, entries: list[SendEntry]) -> list[str]:
        return await self._partition(queue).send(entries, queue.delay_ms)

    async def receive(
        self,
        queue: QueueRecord,
        max_messages: int,
        wait_ms: int,
        visibility_ms: int,
        bytes_max: int,
        *,
        patient: bool = True,
    ) -> list[DeliveredMessage]:
        return await self._partition(queue).receive(
            max_messages, wait_ms, visibility_ms, bytes_max=bytes_max
        )

    async def wait_ready(self, queue: QueueRecord, wait_ms: int) -> int:
        return await self._partition(queue).wait_ready(wait_ms)

    async def delete(self, queue: QueueRecord, receipts: list[str]) -> list[EntryFailure]:
        return await self._partition(queue).delete(receipts)

    async def change_visibility(
        self, queue: QueueRecord, changes: list[tuple[str, int]]
    ) -> list[EntryFailure]:
        return await self._partition(queue).change_visibility(changes)

    async def peek(
        self, queue: QueueRecord, max_messages: int, after_id: str, bytes_max: int
    ) -> list[DeliveredMessage]:
        after_offset = -1
        if after_id:
            parsed = parse_message_id(after_id)
            if parsed is None or parsed[0] != queue.queue_id or parsed[1] != self.index:
                raise InvalidArgument(
                    f"after_id {after_id!r} is not a message id of this partition"
                )
            after_offset = parsed[2]
        return await self._partition(queue).peek(max_messages, after_offset, bytes_max=bytes_max)

    async def purge(self, queue: QueueRecord) -> int:
        return await self._partition(queue).purge()

    async def stats(self, queue: QueueRecord, *, patient: bool = True) -> dict[str, Any]:
        return self._partition(queue).stats()

    async def redrive(
        self, queue: QueueRecord, to: str, max_messages: int, rate_per_s: int
    ) -> tuple[int, list[str]]:
        return await self._partition(queue).redrive(
            self._backend.moved_sink, to=to, max_messages=max_messages, rate_per_s=rate_per_s
        )


class LocalCatalog:
    """The metadata and backend roles of this process, behind the `Catalog` seam."""

    def __init__(self, metadata: Any, backend: Any) -> None:
        self.metadata = metadata
        self.backend = backend
        self._endpoints: dict[tuple[bytes, int], list[LocalEndpoint]] = {}

    async def lookup(self, name: str) -> QueueRecord:
        return self.metadata.lookup(name)

    async def create_queue(
        self,
        name: str,
        attributes: dict[str, Any],
        exist_ok: bool,
        *,
        owner: str = "",
        owned_max: int = 0,
    ) -> QueueRecord:
        record, _ = await self.metadata.create_queue(
            name, attributes, exist_ok=exist_ok, owner=owner, owned_max=owned_max
        )
        return record

    async def delete_queue(self, name: str) -> None:
        await self.metadata.delete_queue(name)

    async def set_attributes(self, name: str, attributes: dict[str, Any]) -> QueueRecord:
        return await self.metadata.set_attributes(name, attributes)

    async def list_queues(self, prefix: str) -> list[str]:
        return self.metadata.list_queues(prefix)

    def endpoints(self, queue: QueueRecord) -> list[LocalEndpoint]:
        key = (queue.queue_id, queue.partitions)
        endpoints = self._endpoints.get(key)
        if endpoints is None:
            endpoints = self._endpoints[key] = [
                LocalEndpoint(self.backend, index) for index in range(queue.partitions)
            ]
        return endpoints

    def stats(self) -> dict[str, Any]:
        return {"queues": len(self.metadata.queues()), "storage": self.backend.storage_stats()}

    async def node_stats(self, own_id: str) -> dict[str, Any] | None:
        return None  # one process: its STATS is the whole node

    def stop_long_polls(self) -> None:
        self.backend.stop_long_polls()

    async def rebalance(self, dry_run: bool) -> RebalanceResponse:
        """One node holds every partition: nothing to move."""
        return RebalanceResponse(moves=[], placement_version=0)

    async def decommission(self, node_id: str) -> DecommissionResponse:
        raise InvalidArgument("a single node has no other backend to take its partitions")


__all__ = ["Catalog", "LocalCatalog", "PartitionEndpoint", "QueueNotFound", "Router", "merge_stats"]
