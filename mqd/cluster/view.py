"""A node's cached copy of the placement, kept fresh by long-polling metadata.

Frontends and backends route from this copy, so sends, receives and acks on
existing queues go on while metadata is down (DESIGN.md §2). A backend also
keeps it on disk, to serve its partitions after a restart without metadata.
"""

from __future__ import annotations

import asyncio
import base64
import contextvars
import json
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import structlog

from mqd.cluster.rpc import PeerPool
from mqd.errors import MqdError, QueueNotFound, ServerError, Unavailable
from mqd.metadata import QueueRecord
from mqd.protocol.messages import (
    GetPlacementRequest,
    GetPlacementResponse,
    NodeInfo,
    PartitionPlacement,
)

log = structlog.get_logger("mqd.cluster.view")

LONG_POLL_MS = 15_000
RETRY_MIN_S = 0.1
RETRY_MAX_S = 2.0


class PlacementView:
    def __init__(
        self, peers: PeerPool, metadata_addresses: list[str], *, cache_file: Path | None = None
    ):
        self._peers = peers
        self._metadata = list(metadata_addresses)
        self._cache_file = cache_file
        self.version = -1
        self.by_name: dict[str, QueueRecord] = {}
        self.by_id: dict[bytes, QueueRecord] = {}
        self.partitions: dict[bytes, list[PartitionPlacement]] = {}
        self.nodes: dict[str, NodeInfo] = {}
        self._listeners: list[Callable[[], Awaitable[None]]] = []
        self._task: asyncio.Task[None] | None = None
        self._notifier: asyncio.Task[None] | None = None
        self._changed_since_notify = False
        self._refreshing: asyncio.Lock = asyncio.Lock()
        # The watch and every refresh (a leader's ISR change, a lookup miss) accept
        # snapshots concurrently; their cache writes go one at a time, newest only.
        self._cache_writing = asyncio.Lock()
        self._cache_version = -1
        self.ready = asyncio.Event()

    def on_change(self, listener: Callable[[], Awaitable[None]]) -> None:
        self._listeners.append(listener)

    def load_cache(self) -> bool:
        if self._cache_file is None or not self._cache_file.exists():
            return False
        try:
            raw = json.loads(self._cache_file.read_text())
            self._apply(_decode_snapshot(raw))
            self._cache_version = self.version
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("placement.cache_unreadable", error=str(exc))
            return False
        return True

    def start(self) -> None:
        self._task = asyncio.create_task(self._watch())

    async def close(self) -> None:
        for task in (self._task, self._notifier):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    async def metadata_call(self, msg: Any, *, timeout_s: float | None = None) -> Any:
        """Send `msg` to the first metadata node that answers."""
        last: MqdError | None = None
        for address in self._metadata:
            try:
                return await self._peers.call(address, msg, timeout_s=timeout_s)
            except Unavailable as exc:
                last = exc
        raise Unavailable(
            f"metadata is unreachable: {last.message if isinstance(last, ServerError) else last}"
        )

    async def refresh(self) -> None:
        """Fetch the placement now (after an admin op, or on a miss)."""
        async with self._refreshing:
            snapshot = await self.metadata_call(GetPlacementRequest(since_version=0, wait_ms=0))
            await self._accept(snapshot)

    async def _watch(self) -> None:
        delay = RETRY_MIN_S
        while True:
            try:
                snapshot = await self.metadata_call(
                    GetPlacementRequest(since_version=max(self.version, 0), wait_ms=LONG_POLL_MS),
                    timeout_s=LONG_POLL_MS / 1000 + 10,
                )
            except MqdError as exc:
                log.debug("placement.watch_failed", error=str(exc))
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)
                continue
            delay = RETRY_MIN_S
            await self._accept(snapshot)

    async def _accept(self, snapshot: GetPlacementResponse) -> None:
        if snapshot.version < self.version:
            return
        changed = snapshot.version != self.version or not self.ready.is_set()
        self._apply(snapshot)
        if not changed:
            return
        if self._cache_file is not None:
            await self._write_cache(snapshot)
        # The listeners (a backend's sync_partitions) run in a task of their own, never
        # in the caller's: a partition's replication task that refreshed would otherwise
        # stop partitions, its own included, and wait for their tasks from inside
        # one; such waits chained across partitions (a RecursionError when a failover
        # cancelled them) and left leaders' in-sync maintenance stuck.
        self._changed_since_notify = True
        if self._notifier is None or self._notifier.done():
            self._notifier = asyncio.get_running_loop().create_task(
                self._notify(), context=contextvars.Context()
            )

    async def _write_cache(self, snapshot: GetPlacementResponse) -> None:
        """Keep the newest snapshot on disk, for a restart without metadata.

        Never fails the caller: the cache only serves a restart, and a caller may be a
        leader's in-sync maintenance, which must outlive a full disk (a write that
        raised out of a refresh once ended it for good, and the partition's restarted
        replica never rejoined the set). Two writers shared one temporary file and
        renamed it from under each other."""
        assert self._cache_file is not None
        async with self._cache_writing:
            if snapshot.version <= self._cache_version:
                return
            try:
                await asyncio.to_thread(_write_cache, self._cache_file, snapshot)
            except OSError as exc:
                log.warning("placement.cache_write_failed", error=str(exc))
                return
            self._cache_version = snapshot.version

    async def _notify(self) -> None:
        while self._changed_since_notify:
            self._changed_since_notify = False
            for listener in self._listeners:
                try:
                    await listener()
                except Exception:
                    log.exception("placement.listener_failed")

    def _apply(self, snapshot: GetPlacementResponse) -> None:
        by_name: dict[str, QueueRecord] = {}
        by_id: dict[bytes, QueueRecord] = {}
        partitions: dict[bytes, list[PartitionPlacement]] = {}
        for queue in snapshot.queues:
            record = QueueRecord(
                name=queue.name,
                queue_id=queue.queue_id,
                attributes=dict(queue.attributes),
                created_at_ms=queue.created_at_ms,
                partitions=len(queue.partitions) or int(queue.attributes.get("partitions", 1)),
                version=queue.version,
            )
            by_name[record.name] = record
            by_id[record.queue_id] = record
            partitions[record.queue_id] = sorted(queue.partitions, key=lambda p: p.index)
        self.by_name, self.by_id, self.partitions = by_name, by_id, partitions
        self.nodes = {node.node_id: node for node in snapshot.nodes}
        self.version = snapshot.version
        self.ready.set()

    # --- lookups --------------------------------------------------------------------

    async def lookup(self, name: str) -> QueueRecord:
        record = self.by_name.get(name)
        if record is not None:
            return record
        try:
            await self.refresh()
        except Unavailable:
            if not self.ready.is_set():
                raise
            raise QueueNotFound(f"queue {name!r} does not exist (metadata unreachable)") from None
        record = self.by_name.get(name)
        if record is None:
            raise QueueNotFound(f"queue {name!r} does not exist")
        return record

    def leader(self, queue_id: bytes, index: int) -> PartitionPlacement:
        placements = self.partitions.get(queue_id)
        if placements is None or index >= len(placements):
            raise QueueNotFound("the queue no longer exists")
        return placements[index]

    def cluster_address(self, node_id: str) -> str:
        node = self.nodes.get(node_id)
        if node is None:
            raise Unavailable(f"node {node_id} is unknown")
        return node.cluster_address

    def describe(self) -> dict[str, Any]:
        return {
            "placement_version": self.version,
            "nodes": [
                {
                    "id": node.node_id,
                    "roles": list(node.roles),
                    "client_address": node.client_address,
                    "cluster_address": node.cluster_address,
                    "up": node.up,
                }
                for node in self.nodes.values()
            ],
            "placement": {
                record.name: [
                    {
                        "index": p.index,
                        "leader": p.leader,
                        "replicas": list(p.replicas),
                        "isr": list(p.isr),
                        "epoch": p.epoch,
                    }
                    for p in self.partitions.get(record.queue_id, [])
                ]
                for record in self.by_name.values()
            },
        }


def _write_cache(path: Path, snapshot: GetPlacementResponse) -> None:
    data = {
        "version": snapshot.version,
        "queues": [
            {
                "name": q.name,
                "queue_id": base64.b64encode(q.queue_id).decode(),
                "attributes": q.attributes,
                "created_at_ms": q.created_at_ms,
                "version": q.version,
                "partitions": [
                    {
                        "index": p.index,
                        "replicas": p.replicas,
                        "leader": p.leader,
                        "epoch": p.epoch,
                        "isr": p.isr,
                    }
                    for p in q.partitions
                ],
            }
            for q in snapshot.queues
        ],
        "nodes": [
            {
                "node_id": n.node_id,
                "roles": n.roles,
                "client_address": n.client_address,
                "cluster_address": n.cluster_address,
                "up": n.up,
            }
            for n in snapshot.nodes
        ],
    }
    temp = path.with_suffix(".tmp")
    with open(temp, "w") as handle:
        json.dump(data, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temp, path)


def _decode_snapshot(raw: dict[str, Any]) -> GetPlacementResponse:
    from mqd.protocol.messages import QueuePlacement

    return GetPlacementResponse(
        version=raw["version"],
        queues=[
            QueuePlacement(
                name=q["name"],
                queue_id=base64.b64decode(q["queue_id"]),
                attributes=q["attributes"],
                created_at_ms=q["created_at_ms"],
                version=q["version"],
                partitions=[
                    PartitionPlacement(
                        p["index"],
                        p["replicas"],
                        p["leader"],
                        p["epoch"],
                        p.get("isr", p["replicas"]),
                    )
                    for p in q["partitions"]
                ],
            )
            for q in raw["queues"]
        ],
        nodes=[NodeInfo(**n) for n in raw["nodes"]],
    )
