"""The metadata role's cluster state: nodes, liveness and partition placement.

`PlacementManager` is what `MetadataRole` calls when queues come and go (the
`BackendApi` seam the single node fills with its local backend). It decides
placement with the consistent-hash ring over live backends (DESIGN.md §6),
keeps node liveness from heartbeats, and serves the whole placement to
frontends and backends, which long-poll it by version.

State is kept as records in SQLite (a key/value table: get, put, delete), so
that another store (etcd) can take its place later; every decision here is a
function of that state.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiosqlite
import structlog

from mqd.errors import InvalidArgument, MqdError, NotLeader, QueueNotFound, Unavailable
from mqd.metadata import QueueRecord, open_durable_db
from mqd.protocol.messages import (
    AdoptPartitionRequest,
    GetPlacementResponse,
    NodeInfo,
    PartitionMove,
    PartitionPlacement,
    QueuePlacement,
    ReleasePartitionRequest,
)
from mqd.ring import HashRing

log = structlog.get_logger("mqd.cluster.placement")

LIVENESS_CHECK_S = 0.25


class RecordStore:
    """Catalog records as JSON under string keys, in SQLite (WAL, synchronous=FULL)."""

    def __init__(self, db: aiosqlite.Connection) -> None:
        self._db = db

    @classmethod
    async def open(cls, path: Path) -> RecordStore:
        db = await open_durable_db(path)
        await db.execute(
            "CREATE TABLE IF NOT EXISTS records (key TEXT PRIMARY KEY, value TEXT NOT NULL)"
        )
        await db.commit()
        return cls(db)

    async def load(self, prefix: str) -> dict[str, Any]:
        async with self._db.execute(
            "SELECT key, value FROM records WHERE key >= ? AND key < ?", (prefix, prefix + "\uffff")
        ) as cursor:
            rows = await cursor.fetchall()
        return {key: json.loads(value) for key, value in rows}

    async def put(self, key: str, value: Any) -> None:
        await self._db.execute(
            "INSERT OR REPLACE INTO records VALUES (?, ?)", (key, json.dumps(value, sort_keys=True))
        )
        await self._db.commit()

    async def delete(self, key: str) -> None:
        await self._db.execute("DELETE FROM records WHERE key = ?", (key,))
        await self._db.commit()

    async def close(self) -> None:
        await self._db.close()


class PlacementManager:
    def __init__(
        self,
        store: RecordStore,
        *,
        vnodes: int,
        session_timeout_ms: int,
    ) -> None:
        self._store = store
        self._vnodes = vnodes
        self._session_timeout_s = session_timeout_ms / 1000
        self.version = 0
        self.cluster_id = ""
        self.receipt_secret = b""
        self.nodes: dict[str, NodeInfo] = {}
        self._last_seen: dict[str, float] = {}
        # queue id (hex) -> placements of its partitions
        self.placements: dict[str, list[PartitionPlacement]] = {}
        self._changed = asyncio.Event()
        self._liveness: asyncio.Task[None] | None = None
        self._queues_source: Any = None
        self._rebalancing = asyncio.Lock()

    async def start(self, queues_source: Any) -> None:
        """Load state; `queues_source()` lists the catalog's QueueRecords."""
        self._queues_source = queues_source
        meta = await self._store.load("meta/")
        self.version = int(meta.get("meta/version", 0))
        self.cluster_id = meta.get("meta/cluster_id") or f"mqd-{os.urandom(4).hex()}"
        secret_hex = meta.get("meta/receipt_secret")
        if secret_hex is None:
            secret_hex = os.urandom(32).hex()
            await self._store.put("meta/receipt_secret", secret_hex)
            await self._store.put("meta/cluster_id", self.cluster_id)
        self.receipt_secret = bytes.fromhex(secret_hex)
        for key, value in (await self._store.load("node/")).items():
            node = NodeInfo(
                node_id=value["node_id"],
                roles=value["roles"],
                client_address=value["client_address"],
                cluster_address=value["cluster_address"],
                up=True,
            )
            self.nodes[node.node_id] = node
            # A restarted metadata node gives every known node a full session to check in.
            self._last_seen[node.node_id] = time.monotonic()
            del key
        for key, value in (await self._store.load("placement/")).items():
            self.placements[key.removeprefix("placement/")] = [
                PartitionPlacement(
                    p["index"], p["replicas"], p["leader"], p["epoch"], p.get("isr", p["replicas"])
                )
                for p in value
            ]
        self._liveness = asyncio.create_task(self._liveness_loop())

    async def stop_deciding(self) -> None:
        """First step of a shutdown: no more liveness verdicts (a draining metadata node
        refuses heartbeats, which must not read as dead backends and set off failovers),
        and long-polling readers are answered now rather than held through the drain."""
        if self._liveness is not None:
            self._liveness.cancel()
            await asyncio.gather(self._liveness, return_exceptions=True)
            self._liveness = None
        self._changed.set()

    async def close(self) -> None:
        await self.stop_deciding()
        await self._store.close()

    # --- versions ---------------------------------------------------------------

    async def _bump(self, reason: str) -> None:
        self.version += 1
        await self._store.put("meta/version", self.version)
        log.info("placement.changed", version=self.version, reason=reason)
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def wait_newer(self, since_version: int, wait_ms: int) -> None:
        if self.version > since_version or wait_ms <= 0:
            return
        try:
            await asyncio.wait_for(self._changed.wait(), wait_ms / 1000)
        except TimeoutError:
            pass

    # --- nodes ------------------------------------------------------------------

    async def register(self, node: NodeInfo, *, rebooted_unclean: bool = False) -> None:
        """Record a node and start its session. A backend that says its machine restarted
        since it last stopped cleanly leaves every in-sync set: its copies were
        acknowledged once written, and may have lost records with the page cache. Where
        it leads, another in-sync replica that is up takes over; with none, it keeps
        the lead. Leaders take it back once it has caught up (protocol.md §7.13)."""
        if rebooted_unclean:
            node_id = node.node_id
            dropped = await self._drop_from_isrs(node_id, f"{node_id} restarted with its machine")
            if dropped:
                log.warning("node.rebooted_unclean", node=node_id, out_of_sync=dropped)
                await self._bump(f"node {node_id} restarted with its machine: out of {dropped} isr")
        node.up = True
        previous = self.nodes.get(node.node_id)
        self.nodes[node.node_id] = node
        self._last_seen[node.node_id] = time.monotonic()
        if previous is None or (
            previous.roles,
            previous.client_address,
            previous.cluster_address,
            previous.up,
        ) != (node.roles, node.client_address, node.cluster_address, True):
            await self._store.put(
                f"node/{node.node_id}",
                {
                    "node_id": node.node_id,
                    "roles": node.roles,
                    "client_address": node.client_address,
                    "cluster_address": node.cluster_address,
                },
            )
            await self._bump(f"node {node.node_id} registered")

    async def heartbeat(self, node_id: str) -> bool:
        node = self.nodes.get(node_id)
        if node is None:
            return False
        self._last_seen[node_id] = time.monotonic()
        if not node.up:
            node.up = True
            await self._bump(f"node {node_id} is up")
        return True

    async def node_leaving(self, node_id: str) -> None:
        """A node stopping on purpose, its writes in flight finished (protocol.md §7.19):
        down now, out of every in-sync set, and its partitions led by another in-sync
        replica that is up, without waiting out its session (or, for the sets it
        follows, the leaders' lag limit)."""
        node = self.nodes.get(node_id)
        if node is None or not node.up:
            return
        node.up = False
        log.info("node.leaving", node=node_id)
        await self._drop_from_isrs(node_id, f"{node_id} is leaving")
        await self._bump(f"node {node_id} is leaving")

    async def _liveness_loop(self) -> None:
        last_tick = time.monotonic()
        while True:
            await asyncio.sleep(LIVENESS_CHECK_S)
            now = time.monotonic()
            gap_s = now - last_tick
            last_tick = now
            if gap_s > self._session_timeout_s / 2:
                # We were paused (SIGSTOP, a stalled host): the silence was ours, not the
                # nodes'. Give every node a fresh session instead of failing them over.
                log.warning("liveness.stalled", seconds=round(gap_s, 1))
                for node_id in self._last_seen:
                    self._last_seen[node_id] = now
                continue
            expired = [
                node_id
                for node_id, node in self.nodes.items()
                if node.up and now - self._last_seen.get(node_id, 0) > self._session_timeout_s
            ]
            # Every silent node is down before any failover, so that none of them is
            # chosen to lead in place of another (it would lead from a dead process, and
            # come back leading with whatever its log kept).
            for node_id in expired:
                self.nodes[node_id].up = False
                log.warning("node.down", node=node_id)
            for node_id in expired:
                await self._fail_over(node_id)
                await self._bump(f"node {node_id} missed heartbeats")

    async def _drop_from_isrs(self, node_id: str, reason: str) -> int:
        """Take `node_id` out of every in-sync set; where it leads, the first other
        in-sync replica that is up leads instead (`reason` logged). How many changed."""

        def change(queue_hex: str, placement: PartitionPlacement) -> PartitionPlacement | None:
            if node_id not in placement.isr:
                return None
            if placement.leader == node_id:
                # It synced what it committed as leader, but it may have been chosen
                # while it was down, with a follower's log. Another in-sync replica
                # that is up holds every committed record: it leads instead. With
                # none, it keeps the lead: nothing better is there.
                up = self._up_in(placement.isr, node_id)
                if not up:
                    return None
                return self._new_leader(queue_hex, placement, up, reason=reason)
            isr = [r for r in placement.isr if r != node_id]
            return PartitionPlacement(
                placement.index, placement.replicas, placement.leader, placement.epoch, isr
            )

        return await self._rewrite_placements(change)

    async def _fail_over(self, dead: str) -> None:
        """New leaders, with a new epoch, for the partitions the dead node led: the first
        live member of the in-sync set. With none, the partition waits for the node."""

        def change(queue_hex: str, placement: PartitionPlacement) -> PartitionPlacement | None:
            if placement.leader != dead:
                return None
            candidates = self._freshest_first(self._up_in(placement.isr, dead))
            if not candidates:
                log.error("partition.offline", queue_id=queue_hex, partition=placement.index)
                return None
            return self._new_leader(queue_hex, placement, candidates)

        await self._rewrite_placements(change)

    def _freshest_first(self, members: list[str]) -> list[str]:
        """`members` heard from within half a session first (in their order), then the
        rest. Replicas that died with the leader but a heartbeat later are still "up"
        when it expires; one of them chosen would lead from a dead process (unavailable
        until it expires too, and with only what its log kept if its machine restarted).
        A live node heartbeats at least twice a session (config check), so it is fresh."""
        suspect_after = time.monotonic() - self._session_timeout_s / 2
        fresh = [r for r in members if self._last_seen.get(r, 0) >= suspect_after]
        return fresh + [r for r in members if r not in fresh]

    def _up_in(self, isr: list[str], without: str) -> list[str]:
        """The members of an in-sync set, other than `without`, whose nodes are up."""
        return [r for r in isr if r != without and self.nodes.get(r) and self.nodes[r].up]

    @staticmethod
    def _new_leader(
        queue_hex: str, placement: PartitionPlacement, isr: list[str], **why: str
    ) -> PartitionPlacement:
        """The first of `isr` leads, at the next epoch, with `isr` as its in-sync set."""
        log.warning("partition.failover", queue_id=queue_hex, partition=placement.index,
                    leader=isr[0], epoch=placement.epoch + 1, **why)  # fmt: skip
        return PartitionPlacement(
            placement.index, placement.replicas, isr[0], placement.epoch + 1, isr
        )

    async def _rewrite_placements(
        self, change: Callable[[str, PartitionPlacement], PartitionPlacement | None]
    ) -> int:
        """Put `change(queue_hex, placement)` in place of every partition it answers for
        (None: unchanged), persisting each queue it changed; how many it changed."""
        records = {record.queue_id.hex(): record for record in self._queues_source()}
        count = 0
        for queue_hex, placements in self.placements.items():
            changed = False
            for position, placement in enumerate(placements):
                new = change(queue_hex, placement)
                if new is not None:
                    placements[position] = new
                    changed = True
                    count += 1
            record = records.get(queue_hex)
            if changed and record is not None:
                await self._put_placements(record, placements)
        return count

    async def update_isr(self, request: Any) -> None:
        """A leader's change to its in-sync set, refused unless it is the current leader
        at the current epoch (an old leader cannot shrink the set to commit alone)."""
        placements = self.placements.get(request.queue_id.hex())
        if placements is None or request.partition >= len(placements):
            raise QueueNotFound("the queue no longer exists")
        current = placements[request.partition]
        if request.epoch != current.epoch or request.leader != current.leader:
            raise NotLeader(
                f"epoch {request.epoch} of {request.leader} is stale; the leader is "
                f"{current.leader} at epoch {current.epoch}",
                details={"leader": current.leader, "epoch": current.epoch},
            )
        isr = [r for r in current.replicas if r in request.isr]
        if current.leader not in isr:
            raise InvalidArgument("the in-sync set must contain the leader")
        if isr == current.isr:
            return
        placements[request.partition] = PartitionPlacement(
            current.index, current.replicas, current.leader, current.epoch, isr
        )
        record = next(r for r in self._queues_source() if r.queue_id == request.queue_id)
        await self._put_placements(record, placements)
        await self._bump(f"isr of {record.name}/{request.partition} is now {','.join(isr)}")

    def backend_count(self) -> int:
        return len(self.live_backends())

    def backends_known(self) -> int:
        """Backends registered, up or not (a decommissioned one is gone from `nodes`)."""
        return sum(1 for n in self.nodes.values() if "backend" in n.roles)

    def live_backends(self) -> list[str]:
        return sorted(n.node_id for n in self.nodes.values() if n.up and "backend" in n.roles)

    # --- the BackendApi of MetadataRole ---------------------------------------------

    async def create_partitions(self, queue: QueueRecord) -> None:
        backends = self.live_backends()
        if not backends:
            raise Unavailable("no backend is up to hold the queue's partitions")
        ring = HashRing(backends, vnodes=self._vnodes)
        factor = int(queue.attributes.get("replication_factor", 1))
        placements = []
        led: dict[str, int] = {}
        for index in range(queue.partitions):
            replicas = ring.place(queue.queue_id, index, factor)
            # Spread leadership: the replica leading fewest of this queue's partitions so far.
            leader = min(replicas, key=lambda node: (led.get(node, 0), replicas.index(node)))
            led[leader] = led.get(leader, 0) + 1
            ordered = [leader, *(r for r in replicas if r != leader)]
            placements.append(PartitionPlacement(index, ordered, leader, 1, list(ordered)))
        await self._put_placements(queue, placements)
        await self._bump(f"queue {queue.name} created")

    async def drop_partitions(self, queue: QueueRecord) -> None:
        self.placements.pop(queue.queue_id.hex(), None)
        await self._store.delete(f"placement/{queue.queue_id.hex()}")
        await self._bump(f"queue {queue.name} deleted")

    def configure_partitions(self, queue: QueueRecord) -> None:
        asyncio.get_running_loop().create_task(self._bump(f"queue {queue.name} changed"))

    async def _put_placements(
        self, queue: QueueRecord, placements: list[PartitionPlacement]
    ) -> None:
        self.placements[queue.queue_id.hex()] = placements
        await self._store.put(
            f"placement/{queue.queue_id.hex()}",
            [
                {
                    "index": p.index,
                    "replicas": p.replicas,
                    "leader": p.leader,
                    "epoch": p.epoch,
                    "isr": p.isr,
                }
                for p in placements
            ],
        )

    # --- rebalance ---------------------------------------------------------------------

    def plan(self) -> list[PartitionMove]:
        """Moves that bring every partition to where the ring over live backends puts it."""
        backends = self.live_backends()
        if not backends:
            return []
        ring = HashRing(backends, vnodes=self._vnodes)
        moves = []
        for record in self._queues_source():
            for placement in self.placements.get(record.queue_id.hex(), []):
                if len(placement.replicas) > 1:
                    continue  # moving replicated partitions is not built yet
                (target,) = ring.place(record.queue_id, placement.index, 1)
                if target != placement.leader:
                    moves.append(
                        PartitionMove(record.name, placement.index, placement.leader, target)
                    )
        return moves

    async def rebalance(self, peers: Any, *, dry_run: bool) -> list[PartitionMove]:
        """Move partitions one at a time: the target copies the fenced source's log, then
        placement switches to it with a new epoch, then the source drops its copy. A move
        that fails leaves the partition where it was (the source's fence is lifted)."""
        moves = self.plan()
        if dry_run:
            return moves
        async with self._rebalancing:
            records = {record.name: record for record in self._queues_source()}
            for move in moves:
                record = records.get(move.queue)
                source = self.nodes.get(move.source)
                target = self.nodes.get(move.target)
                if record is None or target is None:
                    move.status = "skipped: the queue or the target is gone"
                    continue
                if source is None or not source.up:
                    move.status = f"skipped: source {move.source} is down"
                    continue
                try:
                    await peers.call(
                        target.cluster_address,
                        AdoptPartitionRequest(
                            record.queue_id, move.partition, source.cluster_address
                        ),
                        timeout_s=float("inf"),
                    )
                except MqdError as exc:
                    move.status = f"failed: {exc}"
                    with contextlib.suppress(MqdError):
                        await peers.call(
                            source.cluster_address,
                            ReleasePartitionRequest(record.queue_id, move.partition, destroy=False),
                        )
                    continue
                placements = self.placements[record.queue_id.hex()]
                old = placements[move.partition]
                placements[move.partition] = PartitionPlacement(
                    move.partition, [move.target], move.target, old.epoch + 1, [move.target]
                )
                await self._put_placements(record, placements)
                await self._bump(
                    f"partition {move.partition} of {record.name} moved to {move.target}"
                )
                with contextlib.suppress(MqdError):
                    await peers.call(
                        source.cluster_address,
                        ReleasePartitionRequest(record.queue_id, move.partition, destroy=True),
                    )
                move.status = "moved"
                log.info(
                    "partition.moved",
                    queue=record.name,
                    partition=move.partition,
                    source=move.source,
                    target=move.target,
                )
        return moves

    # --- decommission ------------------------------------------------------------------

    async def decommission(self, node_id: str) -> list[PartitionMove]:
        """Retire a backend: every partition replica it held moves to another live backend
        (the next on the ring not already a replica), which catches up from the leader and
        joins the in-sync set; a partition it led first fails over to an in-sync replica."""
        node = self.nodes.get(node_id)
        if node is None or "backend" not in node.roles:
            raise InvalidArgument(f"{node_id!r} is not a backend of this cluster")
        others = [b for b in self.live_backends() if b != node_id]
        ring = HashRing(others, vnodes=self._vnodes) if others else None
        stranded = [
            f"{record.name}/{placement.index}"
            for record in self._queues_source()
            for placement in self.placements.get(record.queue_id.hex(), [])
            if node_id in placement.replicas and not [r for r in placement.isr if r != node_id]
        ]
        if stranded and node.up:
            # Nothing else holds these, and the node is up: a rebalance can move them
            # first, so retiring it now would throw them away. Refuse whole. A node that
            # is down may be gone for good: its other partitions get new replicas, and
            # these are reported failed, left as they are (offline while it is gone).
            raise InvalidArgument(
                f"{node_id} holds the only in-sync copy of {', '.join(stranded[:10])}"
                + (" …" if len(stranded) > 10 else "")
                + "; rebalance them to another backend first (mqd admin rebalance) "
                "or bring the node back"
            )
        moves: list[PartitionMove] = []
        for record in self._queues_source():
            placements = self.placements.get(record.queue_id.hex(), [])
            changed = False
            for position, placement in enumerate(placements):
                if node_id not in placement.replicas:
                    continue
                remaining = [r for r in placement.replicas if r != node_id]
                candidates = (
                    ring.place(record.queue_id, placement.index, len(others)) if ring else []
                )
                replacement = next((c for c in candidates if c not in remaining), None)
                replicas = remaining + ([replacement] if replacement else [])
                isr = [r for r in placement.isr if r != node_id]
                leader, epoch = placement.leader, placement.epoch
                if leader == node_id:
                    if not isr:
                        moves.append(
                            PartitionMove(
                                record.name,
                                placement.index,
                                node_id,
                                "",
                                "failed: no in-sync replica can take over",
                            )
                        )
                        continue
                    leader, epoch = isr[0], epoch + 1
                if not replicas:
                    moves.append(
                        PartitionMove(
                            record.name, placement.index, node_id, "", "failed: no other backend"
                        )
                    )
                    continue
                placements[position] = PartitionPlacement(
                    placement.index, replicas, leader, epoch, isr or [leader]
                )
                changed = True
                moves.append(
                    PartitionMove(
                        record.name,
                        placement.index,
                        node_id,
                        replacement or "",
                        "moved" if replacement else "dropped: fewer replicas left",
                    )
                )
            if changed:
                await self._put_placements(record, placements)
        self.nodes.pop(node_id, None)
        self._last_seen.pop(node_id, None)
        await self._store.delete(f"node/{node_id}")
        await self._bump(f"node {node_id} decommissioned")
        log.warning("node.decommissioned", node=node_id, replicas_moved=len(moves))
        return moves

    # --- what everyone reads ------------------------------------------------------------

    def snapshot(self) -> GetPlacementResponse:
        queues = [
            QueuePlacement(
                name=record.name,
                queue_id=record.queue_id,
                attributes=dict(record.attributes),
                created_at_ms=record.created_at_ms,
                version=record.version,
                partitions=list(self.placements.get(record.queue_id.hex(), [])),
            )
            for record in self._queues_source()
        ]
        nodes = [
            NodeInfo(n.node_id, list(n.roles), n.client_address, n.cluster_address, n.up)
            for n in sorted(self.nodes.values(), key=lambda n: n.node_id)
        ]
        return GetPlacementResponse(version=self.version, queues=queues, nodes=nodes)
