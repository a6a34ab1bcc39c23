"""The cluster port: internal ops of the metadata and backend roles (protocol.md §7).

Every cluster node listens on `[cluster] listen` with mutual TLS and answers
HELLO, PING and STATS there; a metadata node adds REGISTER_NODE, HEARTBEAT,
GET_PLACEMENT and the admin ops frontends forward; a backend adds
PARTITION_CALL, PARTITION_WAIT and ACCEPT_MOVED. The connection machinery is
the frontend's (`ClientConnection`), with this table of handlers.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from mqd import __version__, auth, stages
from mqd.backend import BackendRole
from mqd.cluster.replication import Follower, LeaderReplication
from mqd.cluster.rpc import PeerPool
from mqd.cluster.view import PlacementView
from mqd.errors import (
    InternalError,
    InvalidArgument,
    MqdError,
    NotLeader,
    ProtocolError,
    QueueNotFound,
    ServerError,
    Unavailable,
)
from mqd.frontend import (
    RESPONSE_HEADROOM_BYTES,
    ClientConnection,
    FrontendRole,
    handle_hello,
    handle_ping,
    validate_receive,
    validate_send,
)
from mqd.limits import Limits
from mqd.metadata import MetadataRole, QueueRecord
from mqd.protocol import codec, messages
from mqd.protocol.messages import Opcode
from mqd.router import LocalEndpoint, split_moved
from mqd.storage import NewMessage

log = structlog.get_logger("mqd.cluster")

HEARTBEAT_RETRY_S = 0.5
RESYNC_INTERVAL_S = 5.0
LEADER_OPENING_WAIT_S = 1.0
# Partitions a backend takes the lead of at once after a placement change.
PROMOTIONS_AT_ONCE = 8
# A fenced partition serves again after this long if its move never completes.
FENCE_TIMEOUT_S = 60.0
FETCH_CHUNK_BYTES_MAX = 4 * 1024 * 1024


def _flush_and_sync(handle: Any) -> None:
    handle.flush()
    os.fsync(handle.fileno())


def _reset_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)


def _install_dir(incoming: Path, final: Path) -> None:
    """Put a copied partition in place: any stale copy moves aside first, fsync the parent."""
    if final.exists():
        shutil.rmtree(final)
    os.replace(incoming, final)
    fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ClusterServer(FrontendRole):
    """The node-to-node listener; `ClientConnection` calls it `frontend`."""

    def __init__(
        self,
        *,
        limits: Limits,
        node_id: str,
        roles: list[str],
        clock: Any,
        metadata: MetadataRole | None = None,
        placement: Any = None,
        backend: BackendService | None = None,
        view: PlacementView | None = None,
        peers: PeerPool | None = None,
    ) -> None:
        super().__init__(router=None, limits=limits, node_id=node_id, roles=roles, clock=clock)  # type: ignore[arg-type]
        self.metadata = metadata
        self.placement = placement
        self.backend_service = backend
        self.view = view
        self.peers = peers
        handlers: dict[int, Any] = {
            Opcode.HELLO: handle_hello,
            Opcode.PING: handle_ping,
            Opcode.STATS: handle_node_stats,
        }
        if metadata is not None:
            handlers.update(METADATA_HANDLERS)
        if backend is not None:
            handlers.update(BACKEND_HANDLERS)
            # A draining leader's writes in flight wait for its followers' next FETCH
            # (their acknowledgement). Refused, those writes waited out
            # replica_lag_max_ms (10 s) and failed INTERNAL, and a graceful restart of
            # a leader stalled its queues longer than a crash did (review: 16 s, 6.5).
            self.served_while_draining = frozenset({Opcode.FETCH})
        self.handlers = handlers

    async def drain(self, timeout_s: float) -> None:
        self.draining = True
        if self._server is not None:
            self._server.close()
        if self.backend_service is not None:
            self.backend_service.backend.stop_long_polls()
            self.backend_service.end_fetch_waits()
        await self.finish(timeout_s)

    async def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = {
            "node_id": self.node_id,
            "server_version": __version__,
            "roles": list(self.roles),
            "connections": len(self.connections),
            "requests_total": self.requests_total,
        }
        if self.backend_service is not None:
            stats["storage"] = self.backend_service.backend.storage_stats()
        if self.view is not None:
            stats["cluster"] = self.view.describe()
        if self.metrics is not None:
            stats["metrics"] = await self.metrics.snapshot()
        return stats


async def handle_node_stats(
    conn: ClientConnection, request: messages.StatsRequest
) -> messages.StatsResponse:
    return messages.StatsResponse(stats=await conn.frontend.stats())


# --- metadata ops ------------------------------------------------------------------


def _metadata(conn: ClientConnection) -> tuple[MetadataRole, Any]:
    server: ClusterServer = conn.frontend  # type: ignore[assignment]
    assert server.metadata is not None and server.placement is not None
    return server.metadata, server.placement


def _info(record: QueueRecord) -> messages.QueueInfo:
    # Stats live on the backends; the frontend adds them up (mqd.router).
    return messages.QueueInfo(name=record.name, attributes=dict(record.attributes), stats={})


async def handle_register(
    conn: ClientConnection, request: messages.RegisterNodeRequest
) -> messages.RegisterNodeResponse:
    _, placement = _metadata(conn)
    await placement.register(request.node, rebooted_unclean=request.rebooted_unclean)
    log.info(
        "node.registered",
        node=request.node.node_id,
        roles=request.node.roles,
        rebooted_unclean=request.rebooted_unclean,
    )
    return messages.RegisterNodeResponse(
        cluster_id=placement.cluster_id,
        receipt_secret=placement.receipt_secret,
        placement_version=placement.version,
    )


async def handle_heartbeat(
    conn: ClientConnection, request: messages.HeartbeatRequest
) -> messages.HeartbeatResponse:
    _, placement = _metadata(conn)
    if not await placement.heartbeat(request.node_id):
        raise Unavailable(f"node {request.node_id} is not registered; register again")
    return messages.HeartbeatResponse(placement_version=placement.version)


async def handle_node_leaving(
    conn: ClientConnection, request: messages.NodeLeavingRequest
) -> messages.NodeLeavingResponse:
    _, placement = _metadata(conn)
    await placement.node_leaving(request.node_id)
    return messages.NodeLeavingResponse(placement_version=placement.version)


async def handle_get_placement(
    conn: ClientConnection, request: messages.GetPlacementRequest
) -> messages.GetPlacementResponse:
    _, placement = _metadata(conn)
    await placement.wait_newer(request.since_version, min(request.wait_ms, 30_000))
    return placement.snapshot()


async def handle_meta_create(
    conn: ClientConnection, request: messages.CreateQueueRequest
) -> messages.CreateQueueResponse:
    metadata, _ = _metadata(conn)
    record, _ = await metadata.create_queue(
        request.name, request.attributes, exist_ok=request.exist_ok
    )
    return messages.CreateQueueResponse(queue=_info(record))


async def handle_meta_create_owned(
    conn: ClientConnection, request: messages.CreateOwnedQueueRequest
) -> messages.CreateOwnedQueueResponse:
    metadata, _ = _metadata(conn)
    record, _ = await metadata.create_queue(
        request.name,
        request.attributes,
        exist_ok=request.exist_ok,
        owner=auth.validate_principal_name(request.owner),
        owned_max=request.owned_max,
    )
    return messages.CreateOwnedQueueResponse(queue=_info(record))


async def handle_meta_delete(
    conn: ClientConnection, request: messages.DeleteQueueRequest
) -> messages.DeleteQueueResponse:
    metadata, _ = _metadata(conn)
    await metadata.delete_queue(request.name)
    return messages.DeleteQueueResponse()


async def handle_meta_get(
    conn: ClientConnection, request: messages.GetQueueRequest
) -> messages.GetQueueResponse:
    metadata, _ = _metadata(conn)
    return messages.GetQueueResponse(queue=_info(metadata.lookup(request.name)))


async def handle_meta_list(
    conn: ClientConnection, request: messages.ListQueuesRequest
) -> messages.ListQueuesResponse:
    metadata, _ = _metadata(conn)
    return messages.ListQueuesResponse(names=metadata.list_queues(request.prefix))


async def handle_meta_set(
    conn: ClientConnection, request: messages.SetQueueAttributesRequest
) -> messages.SetQueueAttributesResponse:
    metadata, _ = _metadata(conn)
    record = await metadata.set_attributes(request.name, request.attributes)
    return messages.SetQueueAttributesResponse(queue=_info(record))


async def handle_meta_rebalance(
    conn: ClientConnection, request: messages.RebalanceRequest
) -> messages.RebalanceResponse:
    _, placement = _metadata(conn)
    moves = await placement.rebalance(conn.frontend.peers, dry_run=request.dry_run)  # type: ignore[attr-defined]
    return messages.RebalanceResponse(moves=moves, placement_version=placement.version)


async def handle_update_isr(
    conn: ClientConnection, request: messages.UpdateIsrRequest
) -> messages.UpdateIsrResponse:
    _, placement = _metadata(conn)
    await placement.update_isr(request)
    return messages.UpdateIsrResponse(placement_version=placement.version)


async def handle_meta_decommission(
    conn: ClientConnection, request: messages.DecommissionRequest
) -> messages.DecommissionResponse:
    _, placement = _metadata(conn)
    moves = await placement.decommission(request.node_id)
    return messages.DecommissionResponse(moves=moves, placement_version=placement.version)


async def handle_auth_snapshot(
    conn: ClientConnection, request: messages.AuthSnapshotRequest
) -> messages.AuthSnapshotResponse:
    """Principals and grants for a frontend's cache (protocol.md §7.17): creator grants
    first, then the catalog's state unless the frontend holds this version already."""
    metadata, _ = _metadata(conn)
    for wire in request.add_grants:
        grant = auth.Grant(
            auth.validate_principal_name(wire.principal),
            auth.validate_pattern(wire.pattern),
            auth.validate_permission(wire.permission),
            wire.owner,
        )
        await metadata.add_grant(grant)
    # Picks up what `mqd admin user|grant --data-dir` wrote to this node's catalog.
    state = await metadata.refresh_auth()
    if state.version == request.since_version:
        return messages.AuthSnapshotResponse(version=state.version)
    return messages.AuthSnapshotResponse(
        version=state.version,
        principals=[
            messages.AuthPrincipal(p.name, p.token_id, p.verifier, p.created_at_ms, dict(p.limits))
            for p in state.principals.values()
        ],
        grants=[
            messages.AuthGrant(g.principal, g.pattern, g.permission, g.owner)
            for grants in state.grants.values()
            for g in grants
        ],
    )


METADATA_HANDLERS: dict[int, Any] = {
    Opcode.DECOMMISSION: handle_meta_decommission,
    Opcode.UPDATE_ISR: handle_update_isr,
    Opcode.REBALANCE: handle_meta_rebalance,
    Opcode.REGISTER_NODE: handle_register,
    Opcode.HEARTBEAT: handle_heartbeat,
    Opcode.GET_PLACEMENT: handle_get_placement,
    Opcode.NODE_LEAVING: handle_node_leaving,
    Opcode.AUTH_SNAPSHOT: handle_auth_snapshot,
    Opcode.CREATE_QUEUE: handle_meta_create,
    Opcode.CREATE_OWNED_QUEUE: handle_meta_create_owned,
    Opcode.DELETE_QUEUE: handle_meta_delete,
    Opcode.GET_QUEUE: handle_meta_get,
    Opcode.LIST_QUEUES: handle_meta_list,
    Opcode.SET_QUEUE_ATTRIBUTES: handle_meta_set,
}


# --- backend ops -------------------------------------------------------------------


class BackendService:
    """A backend's side of the cluster: which partitions it leads, and serving them."""

    def __init__(
        self,
        backend: BackendRole,
        view: PlacementView,
        peers: PeerPool,
        *,
        node_id: str,
        limits: Limits,
        replica_lag_max_ms: int = 10_000,
    ) -> None:
        self.replica_lag_max_ms = replica_lag_max_ms
        self.backend = backend
        self.view = view
        self.peers = peers
        self.node_id = node_id
        self.limits = limits
        self._cursor = itertools.count()
        self._syncing = asyncio.Lock()
        # Partitions being copied away: (queue id, index) -> loop time the fence lifts.
        self._fenced: dict[tuple[bytes, int], float] = {}
        # Partitions moved away: (queue id, index) -> the epoch they had here. Until our
        # placement shows a newer epoch we refuse, never re-create an empty partition.
        self._released: dict[tuple[bytes, int], int] = {}
        self._exported_epoch: dict[tuple[bytes, int], int] = {}
        self._leaders: dict[tuple[bytes, int], LeaderReplication] = {}
        # Set (and replaced) each time this node starts leading a partition: wakes
        # followers' fetches that arrived first (`_opening_leader`).
        self._leading_started = asyncio.Event()
        self._resync: asyncio.Task[None] | None = None
        self._followers: dict[tuple[bytes, int], Follower] = {}
        # A leader's commits never fsync on the loop (tried: the cluster's W2 p99 went
        # from ~50 ms to seconds); followers' appends do not fsync at all on their way.
        # Set by the node: stop it, with a reason (a leader's log that can no longer be
        # synced; its partitions must fail over to replicas that can take writes).
        self.fail_stop: Callable[[str], None] | None = None
        backend.moved_sink = self.append_moved
        backend.bind_catalog(self._lookup_name)
        view.on_change(self.sync_partitions)

    def _lookup_name(self, name: str) -> QueueRecord:
        record = self.view.by_name.get(name)
        if record is None:
            raise QueueNotFound(f"queue {name!r} does not exist")
        return record

    async def sync_partitions(self) -> None:
        """Lead what placement says this node leads, follow what it replicates, drop
        what was deleted; promote a follower that became leader, demote a leader that
        lost its place (DESIGN.md §6)."""
        async with self._syncing:
            lead: dict[tuple[bytes, int], tuple[QueueRecord, Any]] = {}
            follow: dict[tuple[bytes, int], tuple[QueueRecord, Any]] = {}
            for queue_id, placements in self.view.partitions.items():
                record = self.view.by_id[queue_id]
                for placement in placements:
                    key = (queue_id, placement.index)
                    if placement.leader == self.node_id:
                        lead[key] = (record, placement)
                    elif self.node_id in placement.replicas:
                        follow[key] = (record, placement)
            # What it already leads first: an in-sync set shrunk by a node leaving is
            # a quick update, and it waited behind the promotions (each ~0.1 s: a
            # store to open) of whatever this node takes over (review: writes held
            # 5.3 s). Those then go side by side, a few at a time: one after another,
            # a failover of a hundred partitions left the last ~10 s without a leader.
            taking = []
            for key, (record, placement) in lead.items():
                if self._leads_now(key, placement):
                    await self._lead_logged(key, record, placement)
                else:
                    taking.append((key, record, placement))
            if taking:
                room = asyncio.Semaphore(PROMOTIONS_AT_ONCE)

                async def take(key: Any, record: QueueRecord, placement: Any) -> None:
                    async with room:
                        await self._lead_logged(key, record, placement)

                await asyncio.gather(*(take(*item) for item in taking))
            for key, (record, _placement) in follow.items():
                try:
                    await self._follow(key, record)
                except Exception:
                    log.exception("partition.follow_failed", queue=record.name, partition=key[1])
            for key in self.backend.open_partitions():
                if key in lead or key in follow:
                    continue
                deleted = key[0] not in self.view.by_id
                await self._stop_leading(key)
                await self.backend.close_partition(*key, destroy=deleted)
                log.info(
                    "partition.closed", queue_id=key[0].hex(), partition=key[1], deleted=deleted
                )
            for key in list(self._followers):
                if key in lead or key in follow:
                    continue
                follower = self._followers.pop(key)
                await follower.stop()
                if key[0] not in self.view.by_id:
                    await asyncio.to_thread(shutil.rmtree, follower.directory, True)

    async def _lead_logged(
        self, key: tuple[bytes, int], record: QueueRecord, placement: Any
    ) -> None:
        try:
            await self._lead(key, record, placement)
        except Exception:
            # One partition's trouble must not hold back the others; the periodic
            # resync (`_resync_loop`) tries it again.
            log.exception("partition.lead_failed", queue=record.name, partition=key[1])

    def _leads_now(self, key: tuple[bytes, int], placement: Any) -> bool:
        leader = self._leaders.get(key)
        return leader is not None and leader.epoch == placement.epoch

    async def _lead(self, key: tuple[bytes, int], record: QueueRecord, placement: Any) -> None:
        queue_id, index = key
        if self._is_fenced(queue_id, index):
            return
        released_at = self._released.get(key)
        if released_at is not None:
            if released_at >= placement.epoch:
                return
            del self._released[key]
        promoted = False
        follower = self._followers.pop(key, None)
        if follower is not None:
            await follower.stop()
            promoted = True
        leader = self._leaders.get(key)
        if leader is not None and leader.epoch != placement.epoch:
            # Leader again at a newer epoch (a failover came back here): start afresh.
            await self._stop_leading(key)
            await self.backend.close_partition(queue_id, index, destroy=False)
            leader = None
        if not self.backend.has_partition(queue_id, index):
            await self.backend.create_partitions(record, [index])
            partition = self.backend.partition(record, index)
            if len(placement.replicas) > 1:
                leader = LeaderReplication(
                    partition.store,
                    node_id=self.node_id,
                    replicas=list(placement.replicas),
                    isr=list(placement.isr or placement.replicas),
                    epoch=placement.epoch,
                    min_insync=int(record.attributes.get("min_insync", 1)),
                    change_isr=self._isr_changer(queue_id, index, placement.epoch),
                    lag_max_s=self.replica_lag_max_ms / 1000,
                    on_storage_failure=self._storage_failed,
                )
                leader.start()
                self._leaders[key] = leader
                self._leading_started.set()
                self._leading_started = asyncio.Event()
                partition.replication = leader
            partition.epoch = placement.epoch
            if promoted:
                partition.receipt_epoch_floor = placement.epoch
                released = await partition.release_all_leases()
                log.warning(
                    "partition.promoted",
                    queue=record.name,
                    partition=index,
                    epoch=placement.epoch,
                    in_flight_released=released,
                )
            else:
                log.info(
                    "partition.opened", queue=record.name, partition=index, epoch=placement.epoch
                )
        elif leader is not None:
            leader.update(list(placement.isr), placement.epoch, list(placement.replicas))
        self.backend.configure_partitions(record)

    def _storage_failed(self, reason: str) -> None:
        log.error("node.fail_stop", reason=reason)
        if self.fail_stop is not None:
            self.fail_stop(reason)

    async def _stop_leading(self, key: tuple[bytes, int]) -> int:
        leader = self._leaders.pop(key, None)
        if leader is None:
            return 0
        await leader.close()
        return leader.high_watermark

    async def _follow(self, key: tuple[bytes, int], record: QueueRecord) -> None:
        existing = self._followers.get(key)
        if existing is not None:
            if existing.running:
                return
            # Its fetch loop ended on an error it could not ride out: start afresh.
            log.warning("follower.restarted", queue=record.name, partition=key[1])
            del self._followers[key]
            await existing.stop()
        if self.backend.has_partition(*key):
            # Demoted: a newer leader took over; keep our log, cut it back when following.
            await self._stop_leading(key)
            await self.backend.close_partition(*key, destroy=False)
            log.warning("partition.demoted", queue=record.name, partition=key[1])
        follower = Follower(
            self.backend.partition_dir(*key),
            self.backend.storage_config,
            peers=self.peers,
            view=self.view,
            queue_id=key[0],
            index=key[1],
            node_id=self.node_id,
        )
        await follower.start()
        self._followers[key] = follower

    def _isr_changer(self, queue_id: bytes, index: int, epoch: int) -> Any:
        async def change(isr: list[str]) -> bool:
            try:
                await self.view.metadata_call(
                    messages.UpdateIsrRequest(queue_id, index, epoch, self.node_id, isr)
                )
            except NotLeader as exc:
                # Metadata says this leader's epoch is gone: the set stays as it was
                # until placement catches up here (worth seeing if it lasts).
                log.warning(
                    "isr.change_refused",
                    queue_id=queue_id.hex(),
                    partition=index,
                    epoch=epoch,
                    isr=isr,
                    reason=exc.message,
                )
                return False
            with contextlib.suppress(MqdError):
                await self.view.refresh()
            return True

        return change

    async def fetch(self, request: messages.FetchRequest) -> messages.FetchResponse:
        key = (request.queue_id, request.partition)
        leader = self._leaders.get(key)
        if leader is None:
            leader = await self._opening_leader(key, request.epoch)
        return await leader.fetch(request)

    def end_fetch_waits(self) -> None:
        for leader in self._leaders.values():
            leader.end_fetch_waits()

    async def _opening_leader(self, key: tuple[bytes, int], epoch: int) -> LeaderReplication:
        """Wait a moment for a partition this node is about to lead.

        On a new queue (or a failover) the followers start fetching within a few ms,
        before the leader has opened its store; refused, they would back off, and the
        queue's first writes would wait out that back-off (~50 ms). So a fetch for a
        partition this node does not lead yet waits, up to LEADER_OPENING_WAIT_S,
        unless this node's placement already says another node leads it, or that the
        fetch's epoch is gone."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + LEADER_OPENING_WAIT_S
        while True:
            try:
                placement = self.view.leader(*key)
            except QueueNotFound:
                placement = None  # not in this node's view yet: it may be about to be
            if placement is not None and (
                placement.epoch > epoch
                or (placement.epoch == epoch and placement.leader != self.node_id)
            ):
                break
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            started = self._leading_started
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await started.wait()
            leader = self._leaders.get(key)
            if leader is not None:
                return leader
        raise NotLeader("this backend does not lead the partition")

    def start(self) -> None:
        self._resync = asyncio.create_task(self._resync_loop())

    async def _resync_loop(self) -> None:
        """Placement changes drive `sync_partitions`; this catches anything a failed or
        missed run left behind (a follower that did not start would leave the set)."""
        while True:
            await asyncio.sleep(RESYNC_INTERVAL_S)
            try:
                await self.sync_partitions()
            except Exception:
                log.exception("partition.resync_failed")

    async def close(self) -> None:
        if self._resync is not None:
            self._resync.cancel()
            await asyncio.gather(self._resync, return_exceptions=True)
        for key in list(self._leaders):
            await self._stop_leading(key)
        for follower in self._followers.values():
            await follower.stop()
        self._followers.clear()

    def _is_fenced(self, queue_id: bytes, index: int) -> bool:
        until = self._fenced.get((queue_id, index))
        if until is None:
            return False
        if asyncio.get_running_loop().time() < until:
            return True
        # The move never finished (metadata or the target died): serve again.
        del self._fenced[(queue_id, index)]
        log.warning("partition.fence_expired", queue_id=queue_id.hex(), partition=index)
        return False

    async def export(self, queue_id: bytes, index: int) -> list[messages.FileInfo]:
        """Fence the partition, flush and close it, and list its log segments."""
        if not self.backend.has_partition(queue_id, index):
            await self.local(queue_id, index)
        self._fenced[(queue_id, index)] = asyncio.get_running_loop().time() + FENCE_TIMEOUT_S
        self._exported_epoch[(queue_id, index)] = self.view.leader(queue_id, index).epoch
        await self.backend.close_partition(queue_id, index, destroy=False)
        directory = self.backend.partition_dir(queue_id, index)
        files = await asyncio.to_thread(
            lambda: sorted((p.name, p.stat().st_size) for p in directory.glob("*.log"))
        )
        log.info("partition.exported", queue_id=queue_id.hex(), partition=index, files=len(files))
        return [messages.FileInfo(name, size) for name, size in files]

    async def read_file(
        self, queue_id: bytes, index: int, name: str, offset: int, bytes_max: int
    ) -> tuple[bytes, bool]:
        if (queue_id, index) not in self._fenced:
            raise InvalidArgument("FETCH_FILE: export the partition first")
        # A copy in progress keeps the fence up, however large the partition.
        self._fenced[(queue_id, index)] = asyncio.get_running_loop().time() + FENCE_TIMEOUT_S
        if "/" in name or not name.endswith(".log"):
            raise InvalidArgument(f"FETCH_FILE: {name!r} is not a log segment")
        path = self.backend.partition_dir(queue_id, index) / name

        def read() -> tuple[bytes, bool]:
            with open(path, "rb") as handle:
                handle.seek(offset)
                data = handle.read(min(bytes_max, FETCH_CHUNK_BYTES_MAX))
                return data, handle.tell() >= path.stat().st_size

        return await asyncio.to_thread(read)

    async def adopt(self, queue_id: bytes, index: int, source_address: str) -> tuple[int, int]:
        """Copy a partition's log from its (fenced) leader into a fresh directory here."""
        exported = await self.peers.call(
            source_address, messages.ExportPartitionRequest(queue_id, index)
        )
        final = self.backend.partition_dir(queue_id, index)
        incoming = final.with_name(final.name + ".incoming")
        await asyncio.to_thread(_reset_dir, incoming)
        total = 0
        for info in exported.files:
            offset = 0
            handle = await asyncio.to_thread(open, incoming / info.name, "wb")
            try:
                while True:
                    chunk = await self.peers.call(
                        source_address,
                        messages.FetchFileRequest(
                            queue_id, index, info.name, offset, FETCH_CHUNK_BYTES_MAX
                        ),
                    )
                    await asyncio.to_thread(handle.write, chunk.data)
                    offset += len(chunk.data)
                    if chunk.eof or not chunk.data:
                        break
                await asyncio.to_thread(_flush_and_sync, handle)
            finally:
                handle.close()
            if offset != info.size:
                raise InternalError(f"copied {offset} bytes of {info.name}, expected {info.size}")
            total += offset
        await asyncio.to_thread(_install_dir, incoming, final)
        log.info("partition.adopted", queue_id=queue_id.hex(), partition=index, bytes=total)
        return len(exported.files), total

    async def release(self, queue_id: bytes, index: int, destroy: bool) -> None:
        self._fenced.pop((queue_id, index), None)
        exported_epoch = self._exported_epoch.pop((queue_id, index), None)
        if destroy and exported_epoch is not None:
            self._released[(queue_id, index)] = exported_epoch
            await self.backend.close_partition(queue_id, index, destroy=True)
            directory = self.backend.partition_dir(queue_id, index)
            await asyncio.to_thread(shutil.rmtree, directory, True)
            log.info("partition.released", queue_id=queue_id.hex(), partition=index)

    async def local(
        self, queue_id: bytes, index: int, epoch: int = 0
    ) -> tuple[QueueRecord, LocalEndpoint]:
        """The queue and this node's endpoint for a partition it leads; NOT_LEADER otherwise."""
        if self._is_fenced(queue_id, index):
            raise Unavailable(
                "the partition is moving to another backend; retry shortly",
                details={"not_applied": True},
            )
        record = self.view.by_id.get(queue_id)
        if record is None:
            # Placement may be newer than ours (a queue just created): look once.
            with contextlib.suppress(MqdError):
                await self.view.refresh()
            record = self.view.by_id.get(queue_id)
            if record is None:
                raise QueueNotFound("the queue does not exist")
        placement = self.view.leader(queue_id, index)
        if epoch > placement.epoch or self._released.get((queue_id, index), -1) >= placement.epoch:
            # The caller, or a move, knows newer placement than we do: catch up first.
            with contextlib.suppress(MqdError):
                await self.view.refresh()
            placement = self.view.leader(queue_id, index)
            if self._released.get((queue_id, index), -1) >= placement.epoch:
                raise Unavailable(
                    "the partition has just moved; retry shortly", details={"not_applied": True}
                )
        if placement.leader != self.node_id:
            node = self.view.nodes.get(placement.leader)
            raise NotLeader(
                f"partition {index} of {record.name!r} is led by {placement.leader}",
                details={
                    "leader": placement.leader,
                    "address": node.cluster_address if node else "",
                },
            )
        if not self.backend.has_partition(queue_id, index):
            await self.sync_partitions()
        return record, LocalEndpoint(self.backend, index)

    async def append_moved(self, queue_name: str, moved: list[NewMessage]) -> None:
        """Dead letters and redriven messages: append to the target queue, wherever it lives."""
        record = self._lookup_name(queue_name)
        placements = self.view.partitions.get(record.queue_id, [])
        if not placements:
            raise QueueNotFound(f"queue {queue_name!r} has no partitions")
        fifo = bool(record.attributes.get("fifo"))
        by_index = split_moved(moved, len(placements), fifo, self._cursor)
        for index, batch in by_index.items():
            placement = placements[index]
            if placement.leader == self.node_id:
                await self.backend.partition(record, index).accept_dead_letters(batch)
                continue
            address = self.view.cluster_address(placement.leader)
            moved_messages = [messages.MovedMessage(**_moved_fields(m)) for m in batch]
            await self.peers.call(
                address, messages.AcceptMovedRequest(record.queue_id, index, moved_messages)
            )


_MOVED_FIELDS = tuple(name for name, _ in messages.MovedMessage.FIELDS)


def _moved_fields(message: Any) -> dict[str, Any]:
    """The fields a moved message keeps (the same names on NewMessage and MovedMessage)."""
    return {name: getattr(message, name) for name in _MOVED_FIELDS}


def _service(conn: ClientConnection) -> BackendService:
    service = conn.frontend.backend_service  # type: ignore[attr-defined]
    assert service is not None
    return service


async def _inner_send(
    service: BackendService, record: QueueRecord, endpoint: LocalEndpoint, inner: Any
) -> Any:
    validate_send(service.limits, record, inner.entries)
    return messages.SendResponse(message_ids=await endpoint.send(record, inner.entries))


async def _inner_receive(
    service: BackendService, record: QueueRecord, endpoint: LocalEndpoint, inner: Any
) -> Any:
    validate_receive(service.limits, inner)
    visibility = inner.visibility_timeout_ms
    if visibility == messages.VISIBILITY_DEFAULT:
        visibility = record.visibility_timeout_ms
    delivered = await endpoint.receive(
        record,
        inner.max_messages,
        inner.wait_ms,
        visibility,
        service.limits.frame_bytes_max - RESPONSE_HEADROOM_BYTES,
    )
    return messages.ReceiveResponse(messages=delivered)


async def _inner_delete(
    service: BackendService, record: QueueRecord, endpoint: LocalEndpoint, inner: Any
) -> Any:
    return messages.DeleteResponse(failures=await endpoint.delete(record, inner.receipts))


async def _inner_visibility(
    service: BackendService, record: QueueRecord, endpoint: LocalEndpoint, inner: Any
) -> Any:
    changes = [(change.receipt, change.timeout_ms) for change in inner.changes]
    return messages.ChangeVisibilityResponse(
        failures=await endpoint.change_visibility(record, changes)
    )


async def _inner_peek(
    service: BackendService, record: QueueRecord, endpoint: LocalEndpoint, inner: Any
) -> Any:
    return messages.PeekResponse(
        # The frontend trims to its client's frame; this keeps the call's answer in one.
        messages=await endpoint.peek(
            record,
            inner.max_messages,
            inner.after_id,
            service.limits.frame_bytes_max - RESPONSE_HEADROOM_BYTES,
        )
    )


async def _inner_purge(
    service: BackendService, record: QueueRecord, endpoint: LocalEndpoint, inner: Any
) -> Any:
    return messages.PurgeQueueResponse(purged=await endpoint.purge(record))


async def _inner_stats(
    service: BackendService, record: QueueRecord, endpoint: LocalEndpoint, inner: Any
) -> Any:
    stats = await endpoint.stats(record)
    return messages.GetQueueResponse(
        queue=messages.QueueInfo(name=record.name, attributes=dict(record.attributes), stats=stats)
    )


async def _inner_redrive(
    service: BackendService, record: QueueRecord, endpoint: LocalEndpoint, inner: Any
) -> Any:
    moved, problems = await endpoint.redrive(record, inner.to, inner.max_messages, inner.rate_per_s)
    return messages.RedriveResponse(moved=moved, problems=problems)


# The client ops a PARTITION_CALL may carry, and what runs them on the partition.
PARTITION_OPS: dict[int, Any] = {
    Opcode.SEND: _inner_send,
    Opcode.RECEIVE: _inner_receive,
    Opcode.DELETE: _inner_delete,
    Opcode.CHANGE_VISIBILITY: _inner_visibility,
    Opcode.PEEK: _inner_peek,
    Opcode.PURGE_QUEUE: _inner_purge,
    Opcode.GET_QUEUE: _inner_stats,
    Opcode.REDRIVE: _inner_redrive,
}


async def handle_partition_call(
    conn: ClientConnection, request: messages.PartitionCallRequest
) -> messages.PartitionCallResponse:
    service = _service(conn)
    run = PARTITION_OPS.get(request.opcode)
    if run is None:
        raise InvalidArgument(f"PARTITION_CALL cannot carry opcode 0x{request.opcode:04x}")
    try:
        inner = codec.decode_body(messages.OPS[Opcode(request.opcode)][0], request.body)
    except ProtocolError as exc:
        # The frame itself was fine: a bad inner body is a bad argument, not a broken stream.
        raise InvalidArgument(f"PARTITION_CALL body: {exc.message}") from None
    stages.carry(Opcode(request.opcode).name, inner, request.partition)
    record, endpoint = await service.local(request.queue_id, request.partition, request.epoch)
    response = await run(service, record, endpoint, inner)
    return messages.PartitionCallResponse(body=codec.encode_body(response))


async def handle_partition_wait(
    conn: ClientConnection, request: messages.PartitionWaitRequest
) -> messages.PartitionWaitResponse:
    service = _service(conn)
    record, endpoint = await service.local(request.queue_id, request.partition)
    ready = await endpoint.wait_ready(
        record, min(request.wait_ms, service.limits.receive_wait_ms_max)
    )
    return messages.PartitionWaitResponse(ready=ready)


async def handle_accept_moved(
    conn: ClientConnection, request: messages.AcceptMovedRequest
) -> messages.AcceptMovedResponse:
    service = _service(conn)
    record, _ = await service.local(request.queue_id, request.partition)
    partition = service.backend.partition(record, request.partition)
    await partition.accept_dead_letters([NewMessage(**_moved_fields(m)) for m in request.messages])
    return messages.AcceptMovedResponse()


async def handle_adopt(
    conn: ClientConnection, request: messages.AdoptPartitionRequest
) -> messages.AdoptPartitionResponse:
    files, total = await _service(conn).adopt(
        request.queue_id, request.partition, request.source_address
    )
    return messages.AdoptPartitionResponse(files=files, bytes=total)


async def handle_export(
    conn: ClientConnection, request: messages.ExportPartitionRequest
) -> messages.ExportPartitionResponse:
    return messages.ExportPartitionResponse(
        files=await _service(conn).export(request.queue_id, request.partition)
    )


async def handle_fetch_file(
    conn: ClientConnection, request: messages.FetchFileRequest
) -> messages.FetchFileResponse:
    data, eof = await _service(conn).read_file(
        request.queue_id, request.partition, request.name, request.offset, request.bytes_max
    )
    return messages.FetchFileResponse(data=data, eof=eof)


async def handle_release(
    conn: ClientConnection, request: messages.ReleasePartitionRequest
) -> messages.ReleasePartitionResponse:
    await _service(conn).release(request.queue_id, request.partition, request.destroy)
    return messages.ReleasePartitionResponse()


async def handle_fetch(
    conn: ClientConnection, request: messages.FetchRequest
) -> messages.FetchResponse:
    return await _service(conn).fetch(request)


BACKEND_HANDLERS: dict[int, Any] = {
    Opcode.FETCH: handle_fetch,
    Opcode.ADOPT_PARTITION: handle_adopt,
    Opcode.EXPORT_PARTITION: handle_export,
    Opcode.FETCH_FILE: handle_fetch_file,
    Opcode.RELEASE_PARTITION: handle_release,
    Opcode.PARTITION_CALL: handle_partition_call,
    Opcode.PARTITION_WAIT: handle_partition_wait,
    Opcode.ACCEPT_MOVED: handle_accept_moved,
}


# --- membership: register once, then heartbeat ------------------------------------------


class Membership:
    """Registers this node with metadata and keeps its session alive."""

    def __init__(self, view: PlacementView, node: messages.NodeInfo, interval_ms: int) -> None:
        self._view = view
        self._node = node
        self._interval_s = interval_ms / 1000
        self._task: asyncio.Task[None] | None = None
        self.registered = asyncio.Event()
        self.receipt_secret = b""
        # Said until metadata has heard it once (mqd.storage.boot, protocol.md §7.2).
        self.rebooted_unclean = False

    async def register(self) -> messages.RegisterNodeResponse:
        response = await self._view.metadata_call(
            messages.RegisterNodeRequest(self._node, self.rebooted_unclean)
        )
        self.rebooted_unclean = False
        self.receipt_secret = response.receipt_secret
        self.registered.set()
        return response

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def _loop(self) -> None:
        while True:
            try:
                if not self.registered.is_set():
                    await self.register()
                await self._view.metadata_call(
                    messages.HeartbeatRequest(self._node.node_id), timeout_s=self._interval_s * 3
                )
            except ServerError as exc:
                # Metadata restarted or forgot us: register again on the next beat.
                log.debug("heartbeat.failed", error=str(exc))
                self.registered.clear()
                await asyncio.sleep(HEARTBEAT_RETRY_S)
                continue
            except MqdError as exc:
                log.debug("heartbeat.failed", error=str(exc))
            await asyncio.sleep(self._interval_s)

    async def leave(self, timeout_s: float) -> None:
        """Stop heartbeating and tell metadata this node is going (protocol.md §7.19), so
        its partitions fail over now rather than once its session runs out. Best effort:
        without an answer, the session's end does it."""
        await self.close()  # a heartbeat after this would mark it up again
        try:
            await self._view.metadata_call(
                messages.NodeLeavingRequest(self._node.node_id), timeout_s=timeout_s
            )
        except MqdError as exc:
            log.info("node.leave_unannounced", error=str(exc))  # (metadata gone first)
        else:
            log.info("node.left")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
