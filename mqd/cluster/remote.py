"""A cluster frontend's `Catalog` and `PartitionEndpoint`s, over the network.

Admin ops go to metadata; queue ops go to the backend leading the partition
as PARTITION_CALL (protocol.md §7), which wraps the client op's own request
body. On NOT_LEADER the frontend refreshes its placement and retries once.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import time
from typing import Any

import structlog

from mqd import auth, stages
from mqd.cluster.rpc import PeerPool
from mqd.cluster.view import PlacementView
from mqd.errors import MqdError, NotLeader, QueueNotFound, Unavailable
from mqd.metadata import QueueRecord
from mqd.protocol import codec
from mqd.protocol.messages import (
    OPS,
    VISIBILITY_DEFAULT,
    AuthSnapshotRequest,
    AuthSnapshotResponse,
    ChangeVisibilityRequest,
    CreateOwnedQueueRequest,
    CreateQueueRequest,
    DecommissionRequest,
    DecommissionResponse,
    DeleteQueueRequest,
    DeleteRequest,
    DeliveredMessage,
    EntryFailure,
    GetQueueRequest,
    ListQueuesRequest,
    Opcode,
    PartitionCallRequest,
    PartitionWaitRequest,
    PeekRequest,
    PurgeQueueRequest,
    RebalanceRequest,
    RebalanceResponse,
    ReceiveRequest,
    RedriveRequest,
    SendEntry,
    SendRequest,
    SetQueueAttributesRequest,
    StatsRequest,
    VisibilityChange,
)

log = structlog.get_logger("mqd.cluster.remote")

# How long a frontend keeps retrying a call whose partition is failing over
# (a session timeout to notice the dead leader, plus an election).
FAILOVER_RETRY_S = 15.0
RETRY_MIN_S = 0.1
RETRY_MAX_S = 1.0
# A partition call that long-polls gets its wait plus this much before the frontend gives up.
CALL_MARGIN_S = 10.0
# A shared PARTITION_WAIT asks for the longest wait (the backend caps it at its
# receive_wait_ms_max): receives that want less stop listening sooner.
SHARED_WAIT_MS = 20_000
_NO_TIMEOUT = float("inf")
# A call in flight to a partition's leader when placement names a new leader (a new
# epoch) gets this long to be answered before it is given up as of unknown outcome:
# a leader that moved on its own answers at once (NOT_LEADER, or its result); one
# that is stopped or cut off would hold the call for its whole timeout (30 s).
LEADER_GONE_GRACE_S = 2.0
# GET_QUEUE of a queue with several partitions reports without one slower than this.
PARTITION_STATS_TIMEOUT_S = 5.0
# STATS asks every node at once; one that is slower than this is reported, not waited for.
NODE_STATS_TIMEOUT_S = 1.0


class RemoteEndpoint:
    def __init__(self, view: PlacementView, peers: PeerPool, queue_id: bytes, index: int) -> None:
        self._view = view
        self._peers = peers
        self._queue_id = queue_id
        self.index = index
        # The PARTITION_WAIT this frontend's receives share (`wait_ready`).
        self._wait: asyncio.Task[int] | None = None
        # Calls in flight, by the epoch of the leader they went to (`leader_moved`).
        self._calls: dict[asyncio.Timeout, int] = {}

    async def _call(
        self,
        opcode: Opcode,
        inner: Any,
        *,
        timeout_s: float | None = None,
        retry: bool = True,
        idempotent: bool = True,
    ) -> Any:
        """Call the partition's leader. NOT_LEADER refreshes placement and tries again at
        once; UNAVAILABLE (a leader gone, a failover under way, a move) is retried with
        backoff for up to FAILOVER_RETRY_S when the op is safe to repeat (DESIGN.md §6)."""
        body = codec.encode_body(inner)
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + (FAILOVER_RETRY_S if retry else 0)
        delay = RETRY_MIN_S
        stale_leader = 0
        while True:
            placement = self._view.leader(self._queue_id, self.index)
            address = self._view.cluster_address(placement.leader)
            request = PartitionCallRequest(
                self._queue_id, self.index, placement.epoch, int(opcode), body
            )
            try:
                response = await self._call_leader(address, request, timeout_s)
            except QueueNotFound:
                if stale_leader:
                    raise
                stale_leader += 1
                await self._view.refresh()
                continue
            except (NotLeader, Unavailable) as exc:
                if isinstance(exc, NotLeader) and stale_leader == 0:
                    stale_leader += 1
                    await self._view.refresh()
                    continue
                not_applied = isinstance(exc, NotLeader) or exc.details.get("not_applied")
                if loop.time() + delay > give_up_at or not (idempotent or not_applied):
                    if isinstance(exc, NotLeader):
                        raise Unavailable(
                            f"partition {self.index} is changing leader; retry"
                        ) from exc
                    raise
                # A failover's wait: its own stage, not `other` (review: a 6.5 s SEND
                # said other 6512 ms, peer 27 ms).
                await stages.timed("failover", self._back_off(delay))
                delay = min(delay * 2, RETRY_MAX_S)
                continue
            return codec.decode_body(OPS[opcode][1], response.body)

    async def _back_off(self, delay: float) -> None:
        await asyncio.sleep(delay)
        with contextlib.suppress(MqdError):
            await self._view.refresh()

    async def _call_leader(
        self, address: str, request: PartitionCallRequest, timeout_s: float | None
    ) -> Any:
        try:
            async with asyncio.timeout(None) as abandon:
                self._calls[abandon] = request.epoch
                try:
                    return await self._peers.call(address, request, timeout_s=timeout_s)
                finally:
                    del self._calls[abandon]
        except TimeoutError:
            if not abandon.expired():
                raise
            # Maybe applied (a paused leader acts on it when it wakes, unable to commit
            # it: §7.13), so retried only when safe to repeat, as a lost connection.
            raise Unavailable(
                f"partition {self.index}'s leader changed while the call was in flight "
                f"and the old leader did not answer; the outcome is unknown"
            ) from None

    def leader_moved(self) -> None:
        """Placement changed: calls in flight to a leader placement no longer names get
        LEADER_GONE_GRACE_S more to be answered, then are given up (`_call_leader`)."""
        if not self._calls:
            return
        try:
            epoch = self._view.leader(self._queue_id, self.index).epoch
        except QueueNotFound:
            epoch = -1
        deadline = asyncio.get_running_loop().time() + LEADER_GONE_GRACE_S
        for abandon, called_epoch in self._calls.items():
            if called_epoch != epoch and abandon.when() is None:
                abandon.reschedule(deadline)

    async def send(self, queue: QueueRecord, entries: list[SendEntry]) -> list[str]:
        # A send is repeated after an UNAVAILABLE of unknown outcome only when every
        # entry has a dedup id: the new leader then stores it once (protocol.md §7.10).
        response = await self._call(
            Opcode.SEND,
            SendRequest(queue.name, entries),
            idempotent=all(entry.dedup_id for entry in entries),
        )
        return response.message_ids

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
        """`patient=False`: an unavailable leader is not waited for (a receive over
        several partitions takes the others' messages meanwhile)."""
        request = ReceiveRequest(queue.name, max_messages, wait_ms, visibility_ms)
        response = await self._call(
            Opcode.RECEIVE, request, timeout_s=wait_ms / 1000 + CALL_MARGIN_S, retry=patient
        )
        return response.messages

    async def wait_ready(self, queue: QueueRecord, wait_ms: int) -> int:
        """How many messages the partition has ready, once it has any or `wait_ms` is
        over (0). Every receive of this frontend waiting on the partition shares one
        PARTITION_WAIT: a receive woken by another partition abandons its wait, and the
        backend keeps an abandoned one for its whole wait (there is no cancel), so one
        per receive piled up there and filled the connection's requests_in_flight_max."""
        shared = self._wait
        if shared is None or shared.done():
            # Its own context: it outlives the request that started it.
            shared = self._wait = asyncio.get_running_loop().create_task(
                self._wait_once(SHARED_WAIT_MS), context=contextvars.Context()
            )
            # Its error reaches the receives still listening; with none, it is dropped.
            shared.add_done_callback(lambda task: task.cancelled() or task.exception())
        try:
            async with asyncio.timeout(wait_ms / 1000):
                return await asyncio.shield(shared)
        except TimeoutError:
            return 0

    async def _wait_once(self, wait_ms: int) -> int:
        placement = self._view.leader(self._queue_id, self.index)
        address = self._view.cluster_address(placement.leader)
        try:
            response = await self._peers.call(
                address,
                PartitionWaitRequest(self._queue_id, self.index, wait_ms),
                timeout_s=wait_ms / 1000 + CALL_MARGIN_S,
            )
        except NotLeader:
            # A hint only: refresh placement and let the receive loop look again.
            await self._view.refresh()
            return 1
        return response.ready

    async def delete(self, queue: QueueRecord, receipts: list[str]) -> list[EntryFailure]:
        return (await self._call(Opcode.DELETE, DeleteRequest(queue.name, receipts))).failures

    async def change_visibility(
        self, queue: QueueRecord, changes: list[tuple[str, int]]
    ) -> list[EntryFailure]:
        request = ChangeVisibilityRequest(queue.name, [VisibilityChange(r, t) for r, t in changes])
        return (await self._call(Opcode.CHANGE_VISIBILITY, request)).failures

    async def peek(
        self, queue: QueueRecord, max_messages: int, after_id: str, bytes_max: int
    ) -> list[DeliveredMessage]:
        # (The backend caps its answer at a frame; the router trims it to `bytes_max`.)
        response = await self._call(Opcode.PEEK, PeekRequest(queue.name, max_messages, after_id))
        return response.messages

    async def purge(self, queue: QueueRecord) -> int:
        response = await self._call(
            Opcode.PURGE_QUEUE, PurgeQueueRequest(queue.name), idempotent=False
        )
        return response.purged

    async def stats(self, queue: QueueRecord, *, patient: bool = True) -> dict[str, Any]:
        """`patient=False`: a leader that is down is not waited for, nor one slower
        than PARTITION_STATS_TIMEOUT_S (its queue's other partitions are reported)."""
        response = await self._call(
            Opcode.GET_QUEUE,
            GetQueueRequest(queue.name),
            retry=patient,
            timeout_s=None if patient else PARTITION_STATS_TIMEOUT_S,
        )
        return response.queue.stats

    async def redrive(
        self, queue: QueueRecord, to: str, max_messages: int, rate_per_s: int
    ) -> tuple[int, list[str]]:
        response = await self._call(
            Opcode.REDRIVE,
            RedriveRequest(queue.name, to, max_messages, rate_per_s),
            timeout_s=_NO_TIMEOUT,
            idempotent=False,
        )
        return response.moved, response.problems


class RemoteCatalog:
    def __init__(self, view: PlacementView, peers: PeerPool) -> None:
        self.view = view
        self._peers = peers
        self._endpoints: dict[tuple[bytes, int], list[RemoteEndpoint]] = {}
        view.on_change(self._placement_changed)

    async def _placement_changed(self) -> None:
        for endpoints in self._endpoints.values():
            for endpoint in endpoints:
                endpoint.leader_moved()

    async def lookup(self, name: str) -> QueueRecord:
        return await self.view.lookup(name)

    async def create_queue(
        self,
        name: str,
        attributes: dict[str, Any],
        exist_ok: bool,
        *,
        owner: str = "",
        owned_max: int = 0,
    ) -> QueueRecord:
        if owner:
            await self.view.metadata_call(
                CreateOwnedQueueRequest(name, attributes, exist_ok, owner, owned_max)
            )
        else:
            await self.view.metadata_call(CreateQueueRequest(name, attributes, exist_ok))
        await self.view.refresh()
        return await self.view.lookup(name)

    async def delete_queue(self, name: str) -> None:
        await self.view.metadata_call(DeleteQueueRequest(name))
        await self.view.refresh()

    async def set_attributes(self, name: str, attributes: dict[str, Any]) -> QueueRecord:
        await self.view.metadata_call(SetQueueAttributesRequest(name, attributes))
        await self.view.refresh()
        return await self.view.lookup(name)

    async def list_queues(self, prefix: str) -> list[str]:
        return (await self.view.metadata_call(ListQueuesRequest(prefix))).names

    def endpoints(self, queue: QueueRecord) -> list[RemoteEndpoint]:
        key = (queue.queue_id, queue.partitions)
        endpoints = self._endpoints.get(key)
        if endpoints is None:
            endpoints = self._endpoints[key] = [
                RemoteEndpoint(self.view, self._peers, queue.queue_id, index)
                for index in range(queue.partitions)
            ]
        return endpoints

    def stats(self) -> dict[str, Any]:
        return {"queues": len(self.view.by_name), "cluster": self.view.describe()}

    async def node_stats(self, own_id: str) -> dict[str, Any] | None:
        """Every other node's own STATS (its cluster port, protocol.md §4.15), by node id:
        the backends' storage, fsync and replication-lag figures live there. A node that
        is down or does not answer within NODE_STATS_TIMEOUT_S: {"error": why}."""

        async def one(node: Any) -> tuple[str, dict[str, Any]]:
            if not node.up:
                return node.node_id, {"error": "down (missed its heartbeats)"}
            try:
                response = await self._peers.call(
                    node.cluster_address, StatsRequest(), timeout_s=NODE_STATS_TIMEOUT_S
                )
            except MqdError as exc:
                return node.node_id, {"error": f"{exc.code.name}: {exc.message}"}
            return node.node_id, response.stats

        others = [n for n in self.view.nodes.values() if n.node_id != own_id]
        return dict(await asyncio.gather(*(one(node) for node in others)))

    async def rebalance(self, dry_run: bool) -> RebalanceResponse:
        response = await self.view.metadata_call(RebalanceRequest(dry_run), timeout_s=_NO_TIMEOUT)
        await self.view.refresh()
        return response

    async def decommission(self, node_id: str) -> DecommissionResponse:
        response = await self.view.metadata_call(DecommissionRequest(node_id))
        await self.view.refresh()
        return response

    def stop_long_polls(self) -> None:
        """Long polls run on the backends; a draining frontend just stops waiting for them."""


# An auth snapshot call gives up after this long (a HELLO waits for it) …
AUTH_CALL_TIMEOUT_S = 2.0
# … and after a failure the cached snapshot is used without asking for this long.
AUTH_RETRY_S = 1.0


class RemoteAuthCatalog:
    """A cluster frontend's `auth.AuthCatalog`: a cached copy of the principals and
    grants in the metadata role's catalog, fetched with AUTH_SNAPSHOT (protocol.md §7.17).

    `Authenticator` refreshes it at every HELLO and at most every second otherwise;
    a refresh costs one small call (metadata answers "unchanged" to the version it
    holds). While metadata is unreachable the last snapshot stays in use, so known
    tokens keep logging in and grants keep being enforced.
    """

    def __init__(self, view: PlacementView, *, monotonic: Any = time.monotonic) -> None:
        self._view = view
        self._monotonic = monotonic
        self._state = auth.AuthState()
        self._version = 0
        self._failed_s: float | None = None
        # One call at a time, so an older answer never replaces a newer one.
        self._calling = asyncio.Lock()

    @property
    def version(self) -> int:
        """The version of the cached snapshot; 0 before the first one arrived."""
        return self._version

    def auth_state(self) -> auth.AuthState:
        return self._state

    async def refresh_auth(self) -> auth.AuthState:
        """The latest snapshot, or the cached one if metadata does not answer."""
        if (
            self._failed_s is not None
            and self._version
            and self._monotonic() - self._failed_s < AUTH_RETRY_S
        ):
            return self._state
        try:
            await self._call(AuthSnapshotRequest())
        except (MqdError, OSError) as exc:
            if self._failed_s is None:
                log.warning(
                    "auth.metadata_unreachable",
                    error=str(exc),
                    principals=len(self._state.principals),
                    using="cached principals and grants" if self._version else "none yet",
                )
            self._failed_s = self._monotonic()
            return self._state
        if self._failed_s is not None:
            log.info("auth.metadata_reachable", principals=len(self._state.principals))
            self._failed_s = None
        return self._state

    async def _call(self, request: AuthSnapshotRequest) -> None:
        async with self._calling:
            request.since_version = self._version  # as of now, inside the lock
            # The bound covers connecting too: a HELLO never waits long on metadata.
            response: AuthSnapshotResponse = await asyncio.wait_for(
                self._view.metadata_call(request), AUTH_CALL_TIMEOUT_S
            )
            if response.version == self._version:
                return
            self._state = auth.AuthState(
                [
                    auth.Principal(p.name, p.token_id, p.verifier, p.created_at_ms, dict(p.limits))
                    for p in response.principals
                ],
                [
                    auth.Grant(g.principal, g.pattern, g.permission, g.owner)
                    for g in response.grants
                ],
            )
            self._version = response.version


__all__ = ["VISIBILITY_DEFAULT", "RemoteAuthCatalog", "RemoteCatalog", "RemoteEndpoint"]
