"""Partition replication: leaders, followers, the high watermark (DESIGN.md §6).

A follower fetches the leader's records from its own log end (FETCH); asking
for offset N acknowledges that it has written every record below N (to its
page cache; see mqd.storage.replica for why that is enough, and
mqd.storage.boot for the restart of a machine, which it is not). The
leader's high watermark is the lowest log end over its in-sync set (itself
included, counted only once synced): every in-sync replica holds every record
below it, so any of them can take over without losing one. The leader
acknowledges a send, an ack or a dead-letter move only once its records are
below the high watermark, and refuses writes while fewer than `min_insync`
replicas are in sync.

The in-sync set changes only through metadata, with the leader's epoch
(UPDATE_ISR): a follower that lags more than `replica_lag_max` leaves it, and
rejoins once caught up. A stale leader's change is refused, so an isolated
old leader can never shrink its set to commit alone.

On a change of leader a follower cuts its log back to the high watermark it
last learned (everything below is the same on every in-sync replica;
anything above was never acknowledged) and fetches from the new leader.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import json
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import structlog

from mqd.cluster.rpc import PeerPool
from mqd.cluster.view import PlacementView
from mqd.errors import MqdError, NotLeader, StorageError, Unavailable
from mqd.protocol.messages import FetchRequest, FetchResponse
from mqd.storage import PartitionStore, StorageConfig
from mqd.storage.records import record_offset
from mqd.storage.replica import ReplicaLog

log = structlog.get_logger("mqd.cluster.replication")

REPLICA_LAG_MAX_S = 10.0
COMMIT_TIMEOUT_S = 30.0
MAINTAIN_INTERVAL_S = 0.5
FETCH_WAIT_MS = 2000
FETCH_BYTES_MAX = 4 * 1024 * 1024
HW_FILE = "replication.json"
HW_PERSIST_INTERVAL_S = 1.0
RETRY_MIN_S = 0.05
RETRY_MAX_S = 1.0


def read_persisted(directory: Path) -> tuple[int, int | None]:
    """The persisted high watermark, and the epoch whose leader the copy followed (or
    led) when it was written (None if not recorded)."""
    try:
        state = json.loads((directory / HW_FILE).read_text())
        epoch = state.get("epoch")
        return int(state["high_watermark"]), epoch if isinstance(epoch, int) else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return 0, None


def persist_hw(directory: Path, high_watermark: int, epoch: int | None = None) -> None:
    """A lower bound of the committed end: cutting back to it is always safe."""
    path = directory / HW_FILE
    temp = path.with_suffix(".tmp")
    state: dict[str, int] = {"high_watermark": high_watermark}
    if epoch is not None:
        state["epoch"] = epoch
    temp.write_text(json.dumps(state))
    with open(temp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(temp, path)


class HighWatermarkFile:
    """A partition's persisted high watermark, written at most once an interval, in a
    thread: a write (temp file, fsync, rename) takes 0.4-0.9 ms, and a node leading or
    following hundreds of partitions must not block its loop, or a follower's next
    FETCH, for each of them every second. What is on disk may lag: it is a lower
    bound of the committed end either way, and `flush` writes the last one on close.
    One write at a time, so two never race on the temp file."""

    def __init__(self, directory: Path, *, interval_s: float = HW_PERSIST_INTERVAL_S) -> None:
        self.directory = directory
        self.interval_s = interval_s
        # The epoch the log is kept at: written with the high watermark, so a follower
        # restarted at the same epoch knows its log is a prefix of its leader's.
        self.epoch: int | None = None
        self.latest = 0
        self.written: int | None = None
        self._last_started = 0.0
        self._writing: asyncio.Task[None] | None = None

    def offer(self, high_watermark: int) -> None:
        """Note the current high watermark; start a write if one is due."""
        self.latest = high_watermark
        if self._writing is not None or high_watermark == self.written:
            return
        now = time.monotonic()
        if now - self._last_started >= self.interval_s:
            self._last_started = now
            self._writing = asyncio.get_running_loop().create_task(self._write())

    async def _write(self) -> None:
        try:
            await self._persist(self.latest)
        finally:
            self._writing = None

    async def flush(self) -> None:
        """Wait for a write in flight, then write the latest value if it is newer."""
        if self._writing is not None:
            await asyncio.shield(self._writing)
        if self.latest != self.written:
            await self._persist(self.latest)

    async def _persist(self, value: int) -> None:
        # A failed write leaves the older (lower, still safe) value; the next offer retries.
        with contextlib.suppress(OSError):
            await asyncio.to_thread(persist_hw, self.directory, value, self.epoch)
            self.written = value


class LeaderReplication:
    def __init__(
        self,
        store: PartitionStore,
        *,
        node_id: str,
        replicas: list[str],
        isr: list[str],
        epoch: int,
        min_insync: int,
        change_isr: Callable[[list[str]], Awaitable[bool]],
        lag_max_s: float = REPLICA_LAG_MAX_S,
        on_storage_failure: Callable[[str], None] | None = None,
    ) -> None:
        self.store = store
        self.node_id = node_id
        self.replicas = list(replicas)
        self.isr = list(isr)
        self.epoch = epoch
        self.min_insync = min_insync
        self._change_isr = change_isr
        self._lag_max_s = lag_max_s
        self.acked: dict[str, int] = {}
        started = time.monotonic()
        self._caught_up_at: dict[str, float] = {r: started for r in replicas}
        # What this copy last knew committed (as a follower, or leading before): a
        # lower bound that stays true. From 0, it stayed 0 until every follower in
        # the set had fetched (forever, with the set short of min_insync), and a 0
        # written now and then to the file made a later restart cut the whole log
        # and fetch it again (review: `replica.truncated to_offset 0`).
        self.high_watermark = min(read_persisted(store.directory)[0], store.next_offset)
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._waiter_seq = 0
        self._data = asyncio.Event()
        # The end of the last group written to be synced (shipped once written, maybe
        # before its fsync returns; everything in the log at open counts). Past it
        # there are only receive leases (written without an fsync).
        self._durable_end = store.next_offset
        self._polling: set[str] = set()
        self._check_now = asyncio.Event()  # check the set before the next interval
        self._closed = False
        self._maintainer: asyncio.Task[None] | None = None
        self._hw_file = HighWatermarkFile(store.directory)
        self._hw_file.epoch = epoch
        store.durable_listeners.append(self._on_durable)
        # Groups go to followers while the leader's own fsync runs; the high watermark
        # still counts the leader's log end only once that returns (`next_offset`).
        store.ship_before_sync = True
        store.synced_listeners.append(self._recompute)
        # A failed fsync of a shipped group leaves the log unable to take writes
        # (PartitionStore._fail_shipped); the node is told, and stops (fail-stop, as a
        # Kafka broker halts on a log I/O error) so that metadata moves its partitions.
        self._on_storage_failure = on_storage_failure
        store.failure_listeners.append(self._storage_failed)
        self._recompute()

    def start(self) -> None:
        self._maintainer = asyncio.create_task(self._maintain())

    def _storage_failed(self, exc: OSError) -> None:
        if self._on_storage_failure is not None:
            self._on_storage_failure(
                f"the log of {self.store.directory.name} could not be synced: {exc}"
            )

    # --- the high watermark ------------------------------------------------------

    def _on_durable(self, end: int) -> None:
        # A durable group can be shipped: wake the fetches. The high watermark moves
        # once the store's end does (`synced_listeners` -> `_recompute`).
        self._durable_end = max(self._durable_end, end)
        self._data.set()

    def _recompute(self) -> None:
        if len(self.isr) < self.min_insync:
            # Too few copies: nothing new is committed (a writer released here was
            # acknowledged with the leader's copy alone when the set shrank to it while
            # the write waited); `_set_isr` fails the waiting writers instead.
            return
        ends = [self.store.next_offset]
        ends += [self.acked.get(r, 0) for r in self.isr if r != self.node_id]
        high_watermark = min(ends)
        if high_watermark > self.high_watermark:
            self.high_watermark = high_watermark
        waiters = self._waiters
        while waiters and waiters[0][0] <= self.high_watermark:
            _, _, future = heapq.heappop(waiters)
            if not future.done():
                future.set_result(None)
        self._hw_file.offer(self.high_watermark)

    def check_writable(self) -> None:
        """Refuse a write before anything is stored (`not_applied`: safe to retry)."""
        if self._closed:
            raise Unavailable(
                "this backend no longer leads the partition", details={"not_applied": True}
            )
        if len(self.isr) < self.min_insync:
            raise Unavailable(
                f"only {len(self.isr)} in-sync replica(s) ({', '.join(self.isr)}); "
                f"the queue needs min_insync={self.min_insync}",
                details={"not_applied": True},
            )

    async def wait_committed(
        self, end_offset: int, *, timeout_s: float | None = COMMIT_TIMEOUT_S
    ) -> None:
        """Return once every record below `end_offset` is below the high watermark."""
        if end_offset <= self.high_watermark:
            return
        if self._closed:
            # Never woken once closed (a demoted leader's late admissions waited for
            # ever, and were destroyed pending with their partition).
            raise Unavailable("leadership of the partition moved; retry")
        if timeout_s is not None:
            self.check_writable()
        future = asyncio.get_running_loop().create_future()
        self._waiter_seq += 1
        heapq.heappush(self._waiters, (end_offset, self._waiter_seq, future))
        try:
            await asyncio.wait_for(asyncio.shield(future), timeout_s)
        except TimeoutError:
            raise Unavailable(
                f"the in-sync replicas did not confirm within {COMMIT_TIMEOUT_S:g} s"
            ) from None

    # --- followers' fetches ---------------------------------------------------------

    async def fetch(self, request: FetchRequest) -> FetchResponse:
        if self._closed or request.epoch != self.epoch:
            raise NotLeader(f"epoch {request.epoch} is not the current epoch {self.epoch}")
        if request.replica not in self.replicas:
            raise NotLeader(f"{request.replica} is not a replica of this partition")
        written_end = self.store.written_end
        if request.from_offset > written_end:
            # The follower holds records this log does not: shipped before their fsync,
            # then lost with this node's page cache (a crash of its machine), with the
            # epoch unchanged. None of them was acknowledged (the high watermark never
            # passes this node's synced end), so the follower cuts back (§7.14).
            raise NotLeader(
                f"{request.replica} asks from {request.from_offset}, past this leader's "
                f"log end {written_end}",
                details={"log_end": written_end},
            )
        previous = self.acked.get(request.replica, -1)
        self.acked[request.replica] = request.from_offset
        if request.from_offset < previous and request.replica in self.isr:
            # It no longer holds what it acknowledged: its machine restarted and took
            # unsynced records with it. Out of the set now, not after the lag limit;
            # back once caught up.
            log.warning("isr.follower_lost_records", replica=request.replica,
                        acknowledged=previous, asks_from=request.from_offset)  # fmt: skip
            self._caught_up_at[request.replica] = float("-inf")
            self._check_now.set()
        # Past the durable end are only receive leases: nobody waits for their
        # replication, so a follower that holds everything durable waits for the next
        # durable group (or its long poll's end) and takes them with it, rather than
        # spend a round trip and an fsync on each lease (W2 with a push consumer: a
        # lease per message between the sends, and the sends' replication waited
        # behind them, p99 40-72 ms).
        if request.from_offset >= self._durable_end:
            self._caught_up_at[request.replica] = time.monotonic()
        if request.from_offset != previous:
            self._recompute()
        if request.from_offset >= self._durable_end and request.wait_ms:
            # Waiting at the end of the log is being in sync (a follower that stops
            # fetching stops counting as caught up, and leaves the set after the lag limit).
            self._polling.add(request.replica)
            self._data.clear()
            try:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._data.wait(), request.wait_ms / 1000)
            finally:
                self._polling.discard(request.replica)
        data, next_offset = await self.store.read_raw(
            request.from_offset, min(request.bytes_max, FETCH_BYTES_MAX)
        )
        return FetchResponse(data, next_offset, self.store.next_offset, self.high_watermark)

    def end_fetch_waits(self) -> None:
        """Answer the followers' waiting FETCHes now (a draining node): their next one
        acknowledges the writes still in flight, and none holds up the drain."""
        self._data.set()

    # --- the in-sync set ---------------------------------------------------------------

    async def _maintain(self) -> None:
        while not self._closed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._check_now.wait(), MAINTAIN_INTERVAL_S)
            self._check_now.clear()
            now = time.monotonic()
            end = self._durable_end  # receive leases past it need not be held to be in sync
            isr = list(self.isr)
            for replica in self.replicas:
                if replica == self.node_id:
                    continue
                if replica in self._polling:
                    self._caught_up_at[replica] = now
                caught_up = now - self._caught_up_at.get(replica, 0) < self._lag_max_s / 2 and (
                    self.acked.get(replica, -1) >= end
                )
                lagging = now - self._caught_up_at.get(replica, now) > self._lag_max_s
                if replica in isr and lagging:
                    isr.remove(replica)
                elif replica not in isr and caught_up:
                    isr.append(replica)
            if sorted(isr) != sorted(self.isr):
                try:
                    accepted = await self._change_isr(isr)
                except MqdError as exc:
                    log.warning("isr.change_failed", error=str(exc))
                    continue
                except Exception:
                    # Whatever it was, the next check tries again: a maintainer that
                    # ended here left the set as it was for good, with nothing logged.
                    log.exception("isr.change_failed")
                    continue
                if accepted:
                    log.info("isr.changed", isr=isr, epoch=self.epoch)
                    self._set_isr(isr)

    def _set_isr(self, isr: list[str]) -> None:
        for replica in self.isr:
            if replica not in isr and replica != self.node_id:
                # It rejoins on fetches made from now on, not on figures from before it
                # left (metadata takes a restarted machine's copies out: they may be short).
                self.acked.pop(replica, None)
                self._caught_up_at[replica] = float("-inf")
        self.isr = list(isr)
        self._recompute()
        if len(self.isr) < self.min_insync:
            # Too few copies to commit anything: tell the waiting writers now.
            self._fail_waiters(
                Unavailable(
                    f"only {len(self.isr)} in-sync replica(s); the queue needs "
                    f"min_insync={self.min_insync}"
                )
            )

    def _fail_waiters(self, error: Exception) -> None:
        for _, _, future in self._waiters:
            if not future.done():
                future.set_exception(error)
                future.exception()
        self._waiters.clear()

    def update(self, isr: list[str], epoch: int, replicas: list[str]) -> None:
        """Placement moved on (metadata is the authority on the set and the replicas)."""
        if epoch != self.epoch:
            return
        if replicas != self.replicas:
            # A replica replaced (decommission): the newcomer fetches, catches up, joins.
            self.replicas = list(replicas)
            now = time.monotonic()
            for replica in replicas:
                self._caught_up_at.setdefault(replica, now)
        if sorted(isr) != sorted(self.isr):
            self._set_isr(isr)

    async def close(self) -> None:
        self._closed = True
        self.store.ship_before_sync = False
        with contextlib.suppress(ValueError):
            self.store.durable_listeners.remove(self._on_durable)
        with contextlib.suppress(ValueError):
            self.store.synced_listeners.remove(self._recompute)
        with contextlib.suppress(ValueError):
            self.store.failure_listeners.remove(self._storage_failed)
        if self._maintainer is not None:
            self._maintainer.cancel()
            await asyncio.gather(self._maintainer, return_exceptions=True)
        self._fail_waiters(Unavailable("leadership of the partition moved; retry"))
        self._data.set()
        self._hw_file.offer(self.high_watermark)
        await self._hw_file.flush()


class Follower:
    """Keeps a partition's log in step with its leader."""

    def __init__(
        self,
        directory: Path,
        config: StorageConfig,
        *,
        peers: PeerPool,
        view: PlacementView,
        queue_id: bytes,
        index: int,
        node_id: str,
    ) -> None:
        self.directory = directory
        self.config = config
        self.peers = peers
        self.view = view
        self.queue_id = queue_id
        self.index = index
        self.node_id = node_id
        self.replica: ReplicaLog | None = None
        self.high_watermark = 0
        self._epoch = -1
        self._task: asyncio.Task[None] | None = None
        self._hw_file = HighWatermarkFile(directory)

    async def start(self) -> None:
        self.replica = await ReplicaLog.open(self.directory, self.config)
        self.high_watermark, epoch = await asyncio.to_thread(read_persisted, self.directory)
        if epoch is not None:
            # Following that epoch's leader when it stopped: its log is a prefix of that
            # leader's (or longer, if the leader lost records: NOT_LEADER `log_end`), so
            # it keeps what it has rather than cut back to a high watermark up to a
            # second old and fetch it again (out of the in-sync set meanwhile).
            self._epoch = self._hw_file.epoch = epoch
        self._task = asyncio.create_task(self._run())

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def _run(self) -> None:
        assert self.replica is not None
        delay = RETRY_MIN_S
        while True:
            try:
                placement = self.view.leader(self.queue_id, self.index)
                if placement.leader == self.node_id:
                    return  # promoted: the backend service takes over
                if placement.epoch != self._epoch:
                    # A new leader: drop what may not be on it, then follow it.
                    await self.replica.truncate(self.high_watermark)
                    self._epoch = self._hw_file.epoch = placement.epoch
                address = self.view.cluster_address(placement.leader)
                response = await self.peers.call(
                    address,
                    FetchRequest(
                        self.queue_id,
                        self.index,
                        placement.epoch,
                        self.node_id,
                        self.replica.next_offset,
                        self.replica.fetch_wait_ms(FETCH_WAIT_MS),
                        FETCH_BYTES_MAX,
                    ),
                    timeout_s=FETCH_WAIT_MS / 1000 + 10,
                )
                if response.data:
                    first = record_offset(response.data, 0)[1]
                    if first != self.replica.next_offset:
                        # The leader reclaimed what we lacked (all of it deleted): start over there.
                        await self.replica.truncate(0)
                    await self.replica.append(response.data, first)
                self.high_watermark = max(
                    self.high_watermark, min(response.high_watermark, self.replica.next_offset)
                )
                self._hw_file.offer(self.high_watermark)
                await self.replica.sync_if_due()
                delay = RETRY_MIN_S
            except asyncio.CancelledError:
                raise
            except (MqdError, StorageError, OSError) as exc:
                log.debug("follower.fetch_failed", error=str(exc), partition=self.index)
                if isinstance(exc, NotLeader) and isinstance(exc.details.get("log_end"), int):
                    await self._cut_back_to(exc.details["log_end"])
                with contextlib.suppress(MqdError):
                    await self.view.refresh()
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)

    async def _cut_back_to(self, leader_end: int) -> None:
        """The leader's log ends below ours at the same epoch: it lost records it had
        shipped before they were synced (never acknowledged). Drop ours above the high
        watermark, as on a new epoch, and fetch from there."""
        assert self.replica is not None
        if self.replica.next_offset <= leader_end:
            return
        to_offset = min(self.high_watermark, leader_end)
        log.warning("follower.ahead_of_leader", partition=self.index,
                    log_end=self.replica.next_offset, leader_end=leader_end,
                    to_offset=to_offset)  # fmt: skip
        with contextlib.suppress(StorageError, OSError):
            await self.replica.truncate(to_offset)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self.replica is not None:
            await self.replica.close()
        self._hw_file.offer(self.high_watermark)
        await self._hw_file.flush()
