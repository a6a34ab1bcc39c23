"""Backend role: owns the partitions placed on this node and serves queue ops.

In the single node every partition of every queue lives here; the cluster
will open only the partitions that placement assigns to this node.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import structlog

from mqd.errors import QueueNotFound, Unavailable
from mqd.metadata import QueueRecord
from mqd.partition import Partition
from mqd.receipts import ReceiptSigner
from mqd.router import split_moved
from mqd.storage import NewMessage, PartitionStore, StorageConfig
from mqd.storage.fs import LoopSyncBudget
from mqd.storage.store import CUMULATIVE_STATS
from mqd.storage.syncer import SyncProcess
from mqd.storage.uring import UringSyncer

log = structlog.get_logger("mqd.backend")

HOUSEKEEPING_INTERVAL_S = 1.0


class BackendRole:
    def __init__(
        self,
        partitions_dir: Path,
        storage_config: StorageConfig,
        signer: ReceiptSigner,
        *,
        clock: Any = None,
    ) -> None:
        self._dir = partitions_dir
        self._storage_config = storage_config
        self.storage_config = storage_config
        self._signer = signer
        self._clock = clock
        self._partitions: dict[tuple[bytes, int], Partition] = {}
        # The cumulative storage counters of partitions closed since the node started.
        self._retired_counters: dict[str, int] = {}
        self._closing = False
        self._housekeeping: asyncio.Task[None] | None = None
        self._lookup: Callable[[str], QueueRecord] | None = None
        # Where dead letters and redriven messages go; a cluster backend routes them
        # to whichever node leads the target partition.
        self.moved_sink: Callable[[str, list[NewMessage]], Awaitable[None]] = self.append_moved
        self._moved_cursor = itertools.count()
        # Set by the node: observes each commit group of every store (mqd.metrics).
        self.commit_observer: Callable[[int, float], None] | None = None
        # Set by a node without replication: its stores may fsync small groups on the
        # loop (mqd.storage.fs.LoopSyncBudget), one budget for them all.
        self.loop_sync: LoopSyncBudget | None = None
        # Set by the node before `start`: its syncer (a cluster node's sync process, a
        # single node's io_uring), for every store; closed by `close` after the stores.
        self.syncer: SyncProcess | UringSyncer | None = None

    def partition_dir(self, queue_id: bytes, index: int) -> Path:
        return self._partition_dir(queue_id, index)

    def _partition_dir(self, queue_id: bytes, index: int) -> Path:
        return self._dir / f"{queue_id.hex()}-{index:04d}"

    async def start(self, queues: list[QueueRecord], *, remove_orphans: bool = True) -> None:
        """Open the partitions of the known queues; remove directories of deleted ones."""
        self._dir.mkdir(parents=True, exist_ok=True)
        if not remove_orphans:
            for queue in queues:
                await self.create_partitions(queue)
            self._housekeeping = asyncio.create_task(self._housekeeping_loop())
            return
        wanted = set()
        for queue in queues:
            for index in range(queue.partitions):
                wanted.add(self._partition_dir(queue.queue_id, index).name)
        for child in sorted(self._dir.iterdir()):
            if child.is_dir() and child.name not in wanted:
                # The catalog no longer has this queue: it was deleted before a crash
                # finished removing its files.
                log.warning("partition.orphan_removed", directory=str(child))
                await asyncio.to_thread(shutil.rmtree, child)
        for queue in queues:
            await self.create_partitions(queue)
        await self.recover_moves()
        self._housekeeping = asyncio.create_task(self._housekeeping_loop())

    async def _housekeeping_loop(self) -> None:
        """Once a second: drop messages past retention (SQS granularity is coarser)."""
        while not self._closing:
            await asyncio.sleep(HOUSEKEEPING_INTERVAL_S)
            for partition in list(self._partitions.values()):
                try:
                    await partition.expire()
                except Exception:
                    log.exception("partition.expire_failed", queue_id=partition.queue_id.hex())

    async def create_partitions(
        self, queue: QueueRecord, indexes: range | list[int] | None = None
    ) -> None:
        for index in range(queue.partitions) if indexes is None else indexes:
            key = (queue.queue_id, index)
            if key in self._partitions:
                continue
            store = await PartitionStore.open(
                self._partition_dir(queue.queue_id, index),
                self._storage_config,
                **({"clock": self._clock} if self._clock else {}),
            )
            if self.commit_observer is not None:
                store.commit_observers.append(self.commit_observer)
            store.loop_sync = self.loop_sync
            store.syncer = self.syncer
            self._partitions[key] = Partition(
                queue.queue_id,
                index,
                store,
                self._signer,
                clock=self._clock,
                fifo=bool(queue.attributes.get("fifo")),
                name=queue.name,
            )
        self.configure_partitions(queue)

    def configure_partitions(self, queue: QueueRecord) -> None:
        """Apply the queue attributes the partitions act on by themselves."""
        attributes = queue.attributes
        redrive = attributes.get("redrive_policy") or {}
        for index in range(queue.partitions):
            partition = self._partitions.get((queue.queue_id, index))
            if partition is None:
                continue
            partition.name = queue.name
            partition.retention_ms = int(attributes["retention"] * 1000)
            partition.dedup_window_ms = int(attributes.get("dedup_window", 300) * 1000)
            partition.content_based_dedup = bool(attributes.get("content_based_dedup", False))
            partition.dead_letter_queue = redrive.get("dead_letter_queue", "")
            partition.max_receive_count = int(redrive.get("max_receive_count", 0))
            partition.dead_letter_sink = self.moved_sink
            partition.dead_letter_retry_at_ms = 0  # a new policy is tried at once

    def bind_catalog(self, lookup: Callable[[str], QueueRecord]) -> None:
        """Where queue names resolve (dead-letter and redrive targets)."""
        self._lookup = lookup

    async def append_moved(self, queue_name: str, messages: list[NewMessage]) -> None:
        """Append messages moved from another queue (dead letters, redrive) to `queue_name`."""
        if self._lookup is None:
            raise QueueNotFound(f"queue {queue_name!r} cannot be resolved on this node")
        record = self._lookup(queue_name)
        fifo = bool(record.attributes.get("fifo"))
        by_index = split_moved(messages, record.partitions, fifo, self._moved_cursor)
        for index, batch in by_index.items():
            await self.partition(record, index).accept_dead_letters(batch)

    async def recover_moves(self) -> None:
        """Finish dead-letter moves interrupted by a crash (all partitions are open now)."""
        for partition in list(self._partitions.values()):
            if not partition.pending_moves:
                continue

            async def ids_in(dlq_name: str, source: Partition = partition) -> set[str]:
                assert self._lookup is not None
                try:
                    dlq = self.partition(self._lookup(dlq_name))
                except QueueNotFound:
                    return set()
                return await dlq.original_ids_from(source.name)

            await partition.recover_moves(ids_in)

    def backend_count(self) -> int:
        """The single node is its own only backend: one copy of each partition."""
        return 1

    def backends_known(self) -> int:
        return 1

    def partitions(self) -> list[Partition]:
        return list(self._partitions.values())

    def has_partition(self, queue_id: bytes, index: int) -> bool:
        return (queue_id, index) in self._partitions

    def open_partitions(self) -> list[tuple[bytes, int]]:
        return list(self._partitions)

    async def close_partition(self, queue_id: bytes, index: int, *, destroy: bool) -> None:
        partition = self._partitions.pop((queue_id, index), None)
        if partition is None:
            return
        self._retire_counters(partition)
        if destroy:
            await partition.destroy()
        else:
            await partition.close()

    async def drop_partitions(self, queue: QueueRecord) -> None:
        for index in range(queue.partitions):
            partition = self._partitions.pop((queue.queue_id, index), None)
            if partition is not None:
                self._retire_counters(partition)
                await partition.destroy()

    def partition(self, queue: QueueRecord, index: int = 0) -> Partition:
        if self._closing:
            raise Unavailable("the server is shutting down")
        partition = self._partitions.get((queue.queue_id, index))
        if partition is None:
            raise QueueNotFound(f"queue {queue.name!r} has no partition {index} on this node")
        return partition

    def _retire_counters(self, partition: Partition) -> None:
        """Keep a closing partition's counters in the node's totals (never going back)."""
        for key, value in partition.store.stats().items():
            if key in CUMULATIVE_STATS:
                self._retired_counters[key] = self._retired_counters.get(key, 0) + value

    def storage_stats(self) -> dict[str, Any]:
        totals: dict[str, Any] = {"partitions": len(self._partitions), **self._retired_counters}
        for partition in self._partitions.values():
            for key, value in partition.store.stats().items():
                if isinstance(value, int) and not isinstance(value, bool):
                    totals[key] = totals.get(key, 0) + value
        # Where fsyncs the loop does not make go: a cluster node's sync process, a
        # single node's io_uring, or executor threads (without one, or once it died).
        syncer = self.syncer
        totals["syncer"] = syncer.name if syncer is not None and syncer.alive else "threads"
        return totals

    def stop_long_polls(self) -> None:
        for partition in self._partitions.values():
            partition.stop_waiting()

    async def close(self) -> None:
        self._closing = True
        if self._housekeeping is not None:
            self._housekeeping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._housekeeping
        partitions = list(self._partitions.values())
        self._partitions.clear()
        try:
            for partition in partitions:
                await partition.close()
        finally:
            if self.syncer is not None:
                await self.syncer.close()
