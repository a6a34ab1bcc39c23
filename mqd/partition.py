"""Queue semantics of one partition: ready, delayed and in-flight sets over a store.

The store (`mqd.storage.PartitionStore`) makes every change durable; this
class keeps the derived in-memory view and answers receives from it. Each
message is in exactly one state, read off its `MessageMeta`:
delayed (`due_ms != 0`), in flight (`visible_at_ms != 0`) or ready (neither).
The ready structures and the two heaps are indexes into that state with lazy
deletion: an entry whose message has moved on is skipped when popped.

Standard queues deliver by priority (9 first), oldest first within one.
FIFO queues (protocol.md §4 "FIFO queues") deliver each message group in
order and hold a group back while any of its messages is in flight; a
receive takes consecutive messages of one group, then moves to the next.

Time comes from the injected clock; transitions that are due are applied
lazily at the start of every operation, and a timer wakes long-pollers when
the next delayed message or lease falls due.

Cold messages: a message due past the store's cold watermark (about
`store.cold_horizon_ms`, a minute, ahead) has no state here at all, only a
count in the store and, on FIFO queues, the lowest cold offset of its group
(`_cold_heads`, which holds back the rest of the group as a delayed head
does). The partition pulls them in (`_pull_cold`: `store.load_due`) whenever
the watermark is less than half a horizon ahead: before a receive, from the
housekeeping `expire()` (once a second), and from the long-poll timer. A
pulled message then waits in `_delayed` like any other, so the timer wakes
long polls at its due time.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import hashlib
import heapq
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

from mqd import stages
from mqd.clock import SystemClock
from mqd.errors import ErrorCode, MqdError, QueueNotFound, ServerError
from mqd.protocol.messages import DELAY_NONE, DeliveredMessage, EntryFailure, SendEntry
from mqd.receipts import ReceiptSigner, message_id
from mqd.storage import Lease, MessageMeta, NewMessage, PartitionStore, StoredMessage

log = structlog.get_logger("mqd.partition")

PRIORITIES = 10
# A lease deadline that marks a message being moved to its dead-letter queue
# (protocol.md §4 "Dead-letter queues"): durable before the move starts, so a
# restart finds and finishes every interrupted move.
MOVING_MS = (1 << 62) - 1
# Receives that find only messages due for dead-lettering try again this often.
_DEAD_LETTER_ROUNDS_MAX = 16
# After a move to the dead-letter queue fails (the queue gone, its leader down),
# messages past max_receive_count are delivered as usual for this long, then the
# move is tried again: one unmovable message must not stop its partition.
DEAD_LETTER_RETRY_MS = 30_000
_DELIVERY_OVERHEAD_BYTES = 256

DeadLetterSink = Callable[[str, list[NewMessage]], Awaitable[None]]


class Partition:
    def __init__(
        self,
        queue_id: bytes,
        partition_index: int,
        store: PartitionStore,
        signer: ReceiptSigner,
        *,
        clock: Any = None,
        fifo: bool = False,
        name: str = "",
    ) -> None:
        self.queue_id = queue_id
        self.partition_index = partition_index
        # Every id of this partition starts alike (mqd.receipts.message_id): format it once.
        self._id_prefix = message_id(queue_id, partition_index, 0)[:-16]
        self.store = store
        self.fifo = fifo
        self.name = name
        self._signer = signer
        self._clock = clock or SystemClock()
        self._now_ms: Callable[[], int] = self._clock.now_ms
        self._metas: dict[int, MessageMeta] = {}
        # Standard queues: one deque of offsets per priority.
        self._ready: list[deque[int]] = [deque() for _ in range(PRIORITIES)]
        # FIFO queues: every live message per group in order, the in-flight count of
        # busy groups, and groups that may have a deliverable head.
        self._groups: dict[str, deque[int]] = {}
        self._group_busy: dict[str, int] = {}
        self._ready_groups: deque[str] = deque()
        self._delayed: list[tuple[int, int]] = []  # (due_ms, offset)
        self._leases: list[tuple[int, int]] = []  # (visible_at_ms, offset)
        self._delayed_count = 0
        self._in_flight_count = 0
        self._waiters: set[asyncio.Future[None]] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_due_ms = 0
        self._pending_dedup: dict[str, asyncio.Future[int]] = {}
        self.pending_moves: list[MessageMeta] = []
        self.sent_total = 0
        self.received_total = 0
        self.acked_total = 0
        self.expired_total = 0
        self.dead_lettered_total = 0
        self.deduplicated_total = 0
        # Set from the queue's attributes by the backend (`BackendRole.configure_partitions`).
        self.retention_ms = 4 * 86_400_000
        self.dedup_window_ms = 300_000
        self.content_based_dedup = False
        self.dead_letter_queue = ""
        self.max_receive_count = 0
        self.dead_letter_sink: DeadLetterSink | None = None
        # Until then, no move to the dead-letter queue is tried (the last one failed).
        self.dead_letter_retry_at_ms = 0
        # Set by a cluster backend on a replicated partition it leads.
        self.replication: Any = None
        # The leader's epoch, signed into receipts; receipts from before
        # `receipt_epoch_floor` are refused (set at a promotion: the old leader may
        # have delivered a message whose lease record never reached this copy, and
        # this leader then delivers it with the same receive count).
        self.epoch = 0
        self.receipt_epoch_floor = 0
        self._late_admits: set[asyncio.Task[None]] = set()
        self._closed = False
        # Cold tier (module docstring).
        self._cold_heads: dict[str, int] = {}
        self._heads_refreshing: dict[str, int | None] = {}
        self._cold_lock = asyncio.Lock()
        self._pull_task: asyncio.Task | None = None
        self._pull_retry_at_ms = 0
        # Offsets pulled in from cold: `_metas` is in offset order except for these.
        self._loaded: set[int] = set()
        self._loaded_sent_min_ms = 0  # a lower bound of their sent times
        self._rebuild()

    # --- state ------------------------------------------------------------

    def _rebuild(self) -> None:
        now = self._now_ms()
        for meta in self.store.live_messages():
            self._index_meta(meta, now)
        if self.fifo:
            self._cold_heads.update(self.store.recovered_cold_group_heads())
        self._advance(now)

    def _index_meta(self, meta: MessageMeta, now: int) -> None:
        """Take a stored message into memory, in whatever state it is (in offset order)."""
        self._metas[meta.offset] = meta
        if self.fifo:
            self._groups.setdefault(meta.group_id, deque()).append(meta.offset)
        if meta.visible_at_ms:
            # Leased, so delivered, so due: a delay it was sent with is over. (Left set,
            # the message was never taken again once its lease ran out, and a FIFO
            # group stopped behind it.)
            meta.due_ms = 0
            self._on_leased(meta)
            if meta.visible_at_ms == MOVING_MS:
                self.pending_moves.append(meta)
            else:
                heapq.heappush(self._leases, (meta.visible_at_ms, meta.offset))
        elif meta.due_ms > now:
            self._delayed_count += 1
            heapq.heappush(self._delayed, (meta.due_ms, meta.offset))
        else:
            meta.due_ms = 0
            self._make_ready(meta)

    def _make_ready(self, meta: MessageMeta) -> None:
        """Index a message that just became ready (it may sit behind its group)."""
        if self.fifo:
            if not self._group_busy.get(meta.group_id):
                self._ready_groups.append(meta.group_id)
        else:
            self._ready[meta.priority].append(meta.offset)

    def _on_leased(self, meta: MessageMeta) -> None:
        self._in_flight_count += 1
        if self.fifo:
            busy = self._group_busy
            busy[meta.group_id] = busy.get(meta.group_id, 0) + 1

    def _on_unleased(self, meta: MessageMeta) -> None:
        self._in_flight_count -= 1
        if self.fifo:
            group = meta.group_id
            left = self._group_busy[group] - 1
            if left:
                self._group_busy[group] = left
            else:
                del self._group_busy[group]
                self._ready_groups.append(group)

    def _advance(self, now: int) -> bool:
        """Apply every transition due by `now`, and wake the waiting receives if any
        message became ready (whoever looked: a STATS that came first must not leave
        them asleep for their whole wait); True if one did."""
        woke = False
        delayed = self._delayed
        metas = self._metas
        while delayed and delayed[0][0] <= now:
            due, offset = heapq.heappop(delayed)
            meta = metas.get(offset)
            if meta is None or meta.due_ms != due:
                continue
            meta.due_ms = 0
            self._delayed_count -= 1
            if not meta.visible_at_ms:
                self._make_ready(meta)
                woke = True
        leases = self._leases
        while leases and leases[0][0] <= now:
            deadline, offset = heapq.heappop(leases)
            meta = metas.get(offset)
            if meta is None or meta.visible_at_ms != deadline:
                continue
            meta.visible_at_ms = 0
            self._on_unleased(meta)
            self._make_ready(meta)
            woke = True
        if woke:
            self._wake_waiters()
        return woke

    def _take_ready(self, count: int, skip_groups: set[str] | None = None) -> list[MessageMeta]:
        if self.fifo:
            return self._take_ready_fifo(count, skip_groups)
        taken: list[MessageMeta] = []
        seen: set[int] = set()
        metas = self._metas
        for priority in range(PRIORITIES - 1, -1, -1):
            ready = self._ready[priority]
            while ready and len(taken) < count:
                offset = ready.popleft()
                meta = metas.get(offset)
                if meta is None or meta.visible_at_ms or meta.due_ms or offset in seen:
                    continue
                seen.add(offset)
                taken.append(meta)
            if len(taken) >= count:
                break
        return taken

    def _take_ready_fifo(self, count: int, skip_groups: set[str] | None) -> list[MessageMeta]:
        taken: list[MessageMeta] = []
        taken_groups: set[str] = set()
        skipped: list[str] = []
        metas = self._metas
        ready_groups = self._ready_groups
        while ready_groups and len(taken) < count:
            group = ready_groups.popleft()
            if group in taken_groups or self._group_busy.get(group):
                continue
            if skip_groups and group in skip_groups:
                skipped.append(group)  # ready for other receivers: back in line below
                continue
            members = self._groups.get(group)
            while members and members[0] not in metas:
                members.popleft()
            if not members:
                self._groups.pop(group, None)
                continue
            taken_groups.add(group)
            cold_head = self._cold_heads.get(group)
            for offset in members:
                if cold_head is not None and offset > cold_head:
                    break  # behind a message of the group that is still cold
                meta = metas.get(offset)
                if meta is None:
                    continue
                if meta.due_ms or meta.visible_at_ms:
                    break
                taken.append(meta)
                if len(taken) >= count:
                    break
        ready_groups.extendleft(reversed(skipped))
        return taken

    def _give_back(self, metas: list[MessageMeta]) -> None:
        """Return taken-but-undelivered messages to the front of the line."""
        if self.fifo:
            for group in dict.fromkeys(meta.group_id for meta in metas):
                self._ready_groups.appendleft(group)
        else:
            for meta in reversed(metas):
                self._ready[meta.priority].appendleft(meta.offset)

    # --- replication (mqd.cluster.replication) -------------------------------------

    def _check_writable(self) -> None:
        if self.replication is not None:
            self.replication.check_writable()

    async def _committed(self, end_offset: int) -> None:
        """Wait until the in-sync replicas hold every record below `end_offset`."""
        if self.replication is not None:
            await stages.timed("replication", self.replication.wait_committed(end_offset))

    async def _admit_committed(self, metas: list[MessageMeta]) -> None:
        """Receivers see messages only below the high watermark (DESIGN.md §6)."""
        if not metas:
            return
        try:
            await self._committed(metas[-1].offset + 1)
        except BaseException:
            # The sender hears of a failure, but the records are in our log: should they
            # commit later (the set catches up), they are delivered then, not before.
            if self.replication is not None and not self._closed:
                task = asyncio.get_running_loop().create_task(self._admit_when_committed(metas))
                self._late_admits.add(task)
                task.add_done_callback(self._late_admits.discard)
            raise
        self._admit(metas)

    async def _admit_when_committed(self, metas: list[MessageMeta]) -> None:
        with contextlib.suppress(MqdError):
            await self.replication.wait_committed(metas[-1].offset + 1, timeout_s=None)
            if not self._closed:
                self._admit(metas)

    async def release_all_leases(self) -> int:
        """A new leader makes every in-flight message visible again (protocol.md §7)."""
        released = [
            meta
            for meta in self._metas.values()
            if meta.visible_at_ms and meta.visible_at_ms != MOVING_MS
        ]
        for meta in released:
            meta.visible_at_ms = 0
            self._on_unleased(meta)
            self._make_ready(meta)
        if released:
            await self.store.lease(
                [Lease(m.offset, m.receive_count, 0, m.first_received_at_ms) for m in released]
            )
            self._wake_waiters()
        return len(released)

    def _admit(self, metas: list[MessageMeta]) -> None:
        """Index freshly appended messages and wake whoever waits for them."""
        now = self._now_ms()
        became_ready = False
        store = self.store
        for meta in metas:
            if meta.offset in self._metas:
                continue  # pulled in from cold before this send got here
            if not store.is_hot(meta.offset):
                if store.is_cold(meta.offset):
                    self._on_cold(meta)
                continue  # else purged before this send got here
            self._metas[meta.offset] = meta
            if self.fifo:
                members = self._groups.get(meta.group_id)
                if members is None:
                    members = self._groups[meta.group_id] = deque()
                members.append(meta.offset)
            if meta.due_ms and meta.due_ms > now:
                self._delayed_count += 1
                heapq.heappush(self._delayed, (meta.due_ms, meta.offset))
            else:
                meta.due_ms = 0
                self._make_ready(meta)
                became_ready = True
        if became_ready:
            self._wake_waiters()
        elif self._waiters:
            self._arm_timer()

    def _on_cold(self, meta: MessageMeta) -> None:
        """A message appended cold: only a FIFO group needs to know (its head)."""
        if not self.fifo:
            return
        group, offset = meta.group_id, meta.offset
        head = self._cold_heads.get(group)
        if head is None or offset < head:
            self._cold_heads[group] = offset
        if group in self._heads_refreshing:
            seen = self._heads_refreshing[group]
            self._heads_refreshing[group] = offset if seen is None else min(seen, offset)

    # --- cold tier ------------------------------------------------------------

    def _pull_at_ms(self) -> int:
        """When the cold watermark next needs moving up (0: nothing is cold)."""
        store = self.store
        if not store.cold_count:
            return 0
        return max(store.cold_until - store.cold_horizon_ms // 2, self._pull_retry_at_ms)

    async def _pull_if_due(self, now: int) -> None:
        pull_at = self._pull_at_ms()
        if pull_at and now >= pull_at:
            await self._pull_cold()

    async def _pull_cold(self) -> None:
        """Bring the cold messages due within the horizon into memory (as delayed)."""
        async with self._cold_lock:
            try:
                metas = await self.store.load_due(self._now_ms() + self.store.cold_horizon_ms)
            except Exception:
                self._pull_retry_at_ms = self._now_ms() + 1000
                raise
            self._pull_retry_at_ms = 0
            if not metas:
                return
            self._admit_loaded(metas)
            if self.fifo:
                await self._refresh_cold_heads(
                    {m.group_id for m in metas if m.group_id in self._cold_heads}
                )

    def _admit_loaded(self, metas: list[MessageMeta]) -> None:
        now = self._now_ms()
        became_ready = False
        for meta in metas:
            assert not meta.visible_at_ms, "a cold message was never received"
            offset = meta.offset
            if offset in self._metas:
                continue
            self._metas[offset] = meta
            if not self._loaded:
                self._loaded_sent_min_ms = meta.sent_at_ms
            self._loaded.add(offset)
            self._loaded_sent_min_ms = min(self._loaded_sent_min_ms, meta.sent_at_ms)
            if self.fifo:
                members = self._groups.get(meta.group_id)
                if members is None:
                    members = self._groups[meta.group_id] = deque()
                if not members or members[-1] < offset:
                    members.append(offset)
                else:
                    members.insert(bisect.bisect_left(members, offset), offset)
            if meta.due_ms > now:
                self._delayed_count += 1
                heapq.heappush(self._delayed, (meta.due_ms, offset))
            else:
                meta.due_ms = 0
                self._make_ready(meta)
                became_ready = True
        log.debug("messages.uncooled", queue=self.name, count=len(metas))
        if became_ready:
            self._wake_waiters()
        elif self._waiters:
            self._arm_timer()

    async def _refresh_cold_heads(self, groups: set[str]) -> None:
        """Find the new lowest cold offset of groups whose head left the cold tier.

        Until found, the old head keeps holding the group back (too much, never
        too little). Cold messages appended meanwhile are noted by `_on_cold`.
        """
        released = False
        for group in groups:
            self._heads_refreshing[group] = None
            try:
                head = await self.store.cold_group_head(group)
            finally:
                newer = self._heads_refreshing.pop(group)
            candidates = [o for o in (head, newer) if o is not None]
            if candidates:
                self._cold_heads[group] = min(candidates)
            elif self._cold_heads.pop(group, None) is not None:
                self._ready_groups.append(group)
                released = True
        if released:
            self._wake_waiters()

    def _start_pull(self) -> None:
        if self._pull_task is not None and not self._pull_task.done():
            return
        self._pull_task = asyncio.get_running_loop().create_task(self._pull_in_background())

    async def _pull_in_background(self) -> None:
        try:
            await self._pull_cold()
        except Exception:
            log.exception("cold.pull_failed", queue=self.name)
        if not self._closed:
            self._arm_timer()

    # --- long-poll plumbing ---------------------------------------------------

    def _wake_waiters(self) -> None:
        if not self._waiters:
            return
        waiters, self._waiters = self._waiters, set()
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _next_due_ms(self) -> int:
        candidates = []
        if self._delayed:
            candidates.append(self._delayed[0][0])
        if self._leases:
            candidates.append(self._leases[0][0])
        pull_at = self._pull_at_ms()
        if pull_at:
            candidates.append(pull_at)
        return min(candidates) if candidates else 0

    def _arm_timer(self) -> None:
        """Keep one timer at the next due transition while anyone waits."""
        due = self._next_due_ms()
        if not due or not self._waiters:
            return
        if self._timer is not None:
            if self._timer_due_ms <= due:
                return
            self._timer.cancel()
        delay_s = max(0.0, (due - self._now_ms()) / 1000)
        self._timer_due_ms = due
        self._timer = asyncio.get_running_loop().call_later(delay_s, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_due_ms = 0
        now = self._now_ms()
        pull_at = self._pull_at_ms()
        if pull_at and now >= pull_at:
            self._start_pull()  # re-arms the timer when done
            self._advance(now)
            return
        self._advance(now)
        self._arm_timer()

    # --- send -----------------------------------------------------------------

    async def send(self, entries: list[SendEntry], default_delay_ms: int) -> list[str]:
        """Append a batch; a duplicate within the dedup window returns the original id."""
        now = self._now_ms()
        self._check_writable()
        if self.content_based_dedup or any(entry.dedup_id for entry in entries):
            return await self._send_deduplicated(entries, default_delay_ms, now)
        metas = await self.store.append_messages(
            [self._new_message(entry, entry.dedup_id, default_delay_ms, now) for entry in entries]
        )
        await self._admit_committed(metas)
        self.sent_total += len(metas)
        prefix = self._id_prefix
        return [f"{prefix}{meta.offset:016x}" for meta in metas]

    @staticmethod
    def _new_message(
        entry: SendEntry, dedup_id: str, default_delay_ms: int, now: int
    ) -> NewMessage:
        delay_ms = entry.delay_ms
        if delay_ms == 0:
            delay_ms = default_delay_ms
        elif delay_ms == DELAY_NONE:
            delay_ms = 0
        return NewMessage(
            body=entry.body,
            attributes=entry.attributes,
            due_ms=now + delay_ms if delay_ms else 0,
            group_id=entry.group_id,
            dedup_id=dedup_id,
            priority=entry.priority,
        )

    async def _send_deduplicated(
        self, entries: list[SendEntry], default_delay_ms: int, now: int
    ) -> list[str]:
        since_ms = now - self.dedup_window_ms
        offsets: list[int | None] = [None] * len(entries)
        waits: dict[int, asyncio.Future[int]] = {}
        first_in_batch: dict[str, int] = {}
        copies: dict[int, int] = {}
        to_append: list[NewMessage] = []
        appended_at: list[int] = []
        for position, entry in enumerate(entries):
            dedup_id = entry.dedup_id
            if not dedup_id and self.content_based_dedup:
                dedup_id = hashlib.sha256(entry.body).hexdigest()
            if dedup_id:
                original = self.store.find_dedup(dedup_id, since_ms)
                if original is not None:
                    offsets[position] = original
                    continue
                pending = self._pending_dedup.get(dedup_id)
                if pending is not None:
                    waits[position] = pending
                    continue
                if dedup_id in first_in_batch:
                    copies[position] = first_in_batch[dedup_id]
                    continue
                first_in_batch[dedup_id] = position
            to_append.append(self._new_message(entry, dedup_id, default_delay_ms, now))
            appended_at.append(position)
        loop = asyncio.get_running_loop()
        mine = {dedup_id: loop.create_future() for dedup_id in first_in_batch}
        self._pending_dedup.update(mine)
        try:
            metas = await self.store.append_messages(to_append) if to_append else []
        except BaseException as exc:
            for future in mine.values():
                future.set_exception(exc)
                future.exception()  # retrieved: the waiters get it too
            raise
        finally:
            for dedup_id in mine:
                self._pending_dedup.pop(dedup_id, None)
        await self._admit_committed(metas)
        self.sent_total += len(metas)
        for position, meta in zip(appended_at, metas, strict=True):
            offsets[position] = meta.offset
        for dedup_id, position in first_in_batch.items():
            mine[dedup_id].set_result(offsets[position])  # type: ignore[arg-type]
        for position, source in copies.items():
            offsets[position] = offsets[source]
        for position, future in waits.items():
            offsets[position] = await future
        self.deduplicated_total += len(entries) - len(metas)
        prefix = self._id_prefix
        return [f"{prefix}{offset:016x}" for offset in offsets]

    async def accept_dead_letters(self, messages: list[NewMessage]) -> None:
        """Append messages moved here from another queue (as dead letters or by redrive)."""
        self._check_writable()
        metas = await self.store.append_messages(messages)
        await self._admit_committed(metas)
        self.sent_total += len(metas)

    # --- receive --------------------------------------------------------------

    async def receive(
        self, max_messages: int, wait_ms: int, visibility_timeout_ms: int, *, bytes_max: int
    ) -> list[DeliveredMessage]:
        deadline_ms = self._now_ms() + wait_ms
        # FIFO groups whose head this RECEIVE moved to the dead-letter queue: their later
        # messages are not delivered by it (protocol.md §4.0).
        moved_groups: set[str] = set()
        for _ in range(_DEAD_LETTER_ROUNDS_MAX):
            await self._pull_if_due(self._now_ms())
            self._advance(self._now_ms())
            taken = self._take_ready(max_messages, moved_groups)
            if not taken and wait_ms > 0:
                taken = await self._wait_for_messages(max_messages, deadline_ms, moved_groups)
            if not taken:
                return []
            if self.max_receive_count and await self._divert_dead_letters(taken, moved_groups):
                continue  # take again: the rest went back in line while the move ran
            return await self._deliver(taken, visibility_timeout_ms, bytes_max)
        return []

    async def _wait_for_messages(
        self, max_messages: int, deadline_ms: int, skip_groups: set[str] | None = None
    ) -> list[MessageMeta]:
        while not self._closed:
            remaining_ms = deadline_ms - self._now_ms()
            if remaining_ms <= 0:
                return []
            await self._wait_woken(remaining_ms / 1000)
            self._advance(self._now_ms())
            taken = self._take_ready(max_messages, skip_groups)
            if taken:
                return taken
        return []

    async def _deliver(
        self, taken: list[MessageMeta], visibility_timeout_ms: int, bytes_max: int
    ) -> list[DeliveredMessage]:
        # Keep the response inside one frame: give back what does not fit.
        total = 0
        for position, meta in enumerate(taken):
            total += meta.size + _DELIVERY_OVERHEAD_BYTES
            if total > bytes_max and position > 0:
                self._give_back(taken[position:])
                taken = taken[:position]
                break
        now = self._now_ms()
        visible_at = now + visibility_timeout_ms if visibility_timeout_ms else 0
        leases = []
        for meta in taken:
            meta.receive_count += 1
            if not meta.first_received_at_ms:
                meta.first_received_at_ms = now
            if visible_at:
                meta.visible_at_ms = visible_at
                self._on_leased(meta)
                heapq.heappush(self._leases, (visible_at, meta.offset))
            leases.append(
                Lease(meta.offset, meta.receive_count, visible_at, meta.first_received_at_ms)
            )
        if not visible_at:
            # A zero visibility timeout hands the messages out and leaves them ready.
            self._give_back(taken)
        elif self._waiters:
            self._arm_timer()
        self.received_total += len(taken)
        try:
            # The delivery needs no fsync before it answers (at least once: a lost lease
            # only makes the message visible again early); its record rides the next group.
            await self.store.lease(leases, wait=False)
            stored = await self.store.read([meta.offset for meta in taken])
        except BaseException:
            self._undo_delivery(taken)
            raise
        queue_id, index, sign, epoch = (
            self.queue_id,
            self.partition_index,
            self._signer.sign,
            self.epoch,
        )
        return [
            self._delivered(
                meta, record, sign(queue_id, index, meta.offset, meta.receive_count, epoch)
            )
            for meta, record in zip(taken, stored, strict=True)
        ]

    def _delivered(
        self, meta: MessageMeta, record: StoredMessage, receipt: str
    ) -> DeliveredMessage:
        return DeliveredMessage(
            id=f"{self._id_prefix}{meta.offset:016x}",
            receipt=receipt,
            body=record.body,
            attributes=record.attributes,
            receive_count=meta.receive_count,
            sent_at_ms=meta.sent_at_ms,
            first_received_at_ms=meta.first_received_at_ms,
            group_id=record.group_id,
            dedup_id=record.dedup_id,
            source_queue=record.source_queue,
            original_id=record.original_id,
        )

    def _undo_delivery(self, taken: list[MessageMeta]) -> None:
        undone = [m for m in taken if m.offset in self._metas and m.visible_at_ms]
        for meta in undone:
            meta.visible_at_ms = 0
            self._on_unleased(meta)
        self._give_back(undone)
        self._wake_waiters()

    # --- dead letters ---------------------------------------------------------

    async def _divert_dead_letters(self, taken: list[MessageMeta], moved_groups: set[str]) -> bool:
        """Move the taken messages whose next delivery would exceed max_receive_count,
        giving the rest back to the ready lines first; False if there were none.

        Nothing taken may wait outside those lines across the move's awaits: a send to
        its FIFO group would list the group as ready again, and a second RECEIVE take
        the same messages (delivered twice, two of a group in flight)."""
        limit = self.max_receive_count
        if self._now_ms() < self.dead_letter_retry_at_ms:
            return False
        doomed = [meta for meta in taken if meta.receive_count >= limit]
        if not doomed:
            return False
        self._give_back([meta for meta in taken if meta.receive_count < limit])
        # A group's later messages wait until its head has left for the DLQ.
        held = {meta.group_id for meta in doomed} - moved_groups if self.fifo else set()
        moved_groups |= held
        try:
            await self._dead_letter(doomed)
        except MqdError as exc:
            # The doomed are back in line: the receive takes again and, until the
            # retry, delivers them as usual (as SQS does while its DLQ is missing).
            moved_groups -= held
            self.dead_letter_retry_at_ms = self._now_ms() + DEAD_LETTER_RETRY_MS
            log.error(
                "dead_letter.failed",
                queue=self.name,
                partition=self.partition_index,
                dead_letter_queue=self.dead_letter_queue,
                count=len(doomed),
                code=exc.code.name if isinstance(exc, ServerError) else type(exc).__name__,
                error=str(exc),
                retry_in_s=DEAD_LETTER_RETRY_MS // 1000,
                hint="messages past max_receive_count are delivered as usual until a "
                "move works: create the dead-letter queue or change the redrive_policy",
            )
        return True

    async def _dead_letter(self, doomed: list[MessageMeta]) -> None:
        sink = self.dead_letter_sink
        target = self.dead_letter_queue
        for meta in doomed:
            if meta.visible_at_ms != MOVING_MS:
                if meta.visible_at_ms:
                    self._on_unleased(meta)
                meta.visible_at_ms = MOVING_MS
                self._on_leased(meta)
        try:
            if sink is None or not target:
                raise QueueNotFound(f"queue {self.name!r} has no dead-letter queue configured")
            # 1. Mark durably, so a crash from here on is finished by `recover_moves`.
            await self.store.lease(
                [
                    Lease(m.offset, m.receive_count, MOVING_MS, m.first_received_at_ms)
                    for m in doomed
                ]
            )
            stored = await self.store.read([meta.offset for meta in doomed])
            # 2. Append to the DLQ (durable). 3. Delete here (durable).
            await sink(
                target, [self._dead_letter_copy(m, r) for m, r in zip(doomed, stored, strict=True)]
            )
        except BaseException:
            await self._unmark(doomed)
            raise
        await self._remove(doomed)
        self.dead_lettered_total += len(doomed)
        log.info(
            "messages.dead_lettered", queue=self.name, dead_letter_queue=target, count=len(doomed)
        )

    def _dead_letter_copy(self, meta: MessageMeta, record: StoredMessage) -> NewMessage:
        return NewMessage(
            body=record.body,
            attributes=record.attributes,
            due_ms=0,
            group_id=record.group_id,
            dedup_id=record.dedup_id,
            priority=meta.priority,
            source_queue=self.name,
            original_id=record.original_id
            or message_id(self.queue_id, self.partition_index, meta.offset),
            receive_count=meta.receive_count,
        )

    async def _unmark(self, metas: list[MessageMeta]) -> None:
        for meta in metas:
            if meta.offset in self._metas and meta.visible_at_ms == MOVING_MS:
                meta.visible_at_ms = 0
                self._on_unleased(meta)
                self._make_ready(meta)
        await self.store.lease(
            [Lease(m.offset, m.receive_count, 0, m.first_received_at_ms) for m in metas]
        )
        self._wake_waiters()

    async def _remove(self, metas: list[MessageMeta]) -> None:
        offsets = []
        for meta in metas:
            if meta.offset in self._metas:
                self._forget(meta)
                offsets.append(meta.offset)
        if offsets:
            await self.store.delete(offsets)
            await self._committed(self.store.next_offset)

    async def recover_moves(self, dead_letter_ids: Callable[[str], Awaitable[set[str]]]) -> int:
        """Finish moves to the DLQ that a crash interrupted (found marked at start).

        `dead_letter_ids(name)` gives the original ids already in the DLQ `name`
        that came from this queue: a message found there is deleted here; any
        other is moved again. Either way it ends in exactly one of the two queues.
        """
        pending, self.pending_moves = self.pending_moves, []
        pending = [meta for meta in pending if meta.offset in self._metas]
        if not pending:
            return 0
        if not self.dead_letter_queue:
            await self._unmark(pending)
            return 0
        already = await dead_letter_ids(self.dead_letter_queue)
        # The DLQ copy carries the id `_dead_letter_copy` gives it: the message's own
        # id, or the first id of a message that was redriven before.
        stored = await self.store.read([meta.offset for meta in pending])
        done = [
            meta
            for meta, record in zip(pending, stored, strict=True)
            if self._dead_letter_copy(meta, record).original_id in already
        ]
        await self._remove(done)
        redo = [meta for meta in pending if meta.offset in self._metas]
        if redo:
            await self._dead_letter(redo)
        self.dead_lettered_total += len(done)
        log.warning("dead_letter.recovered", queue=self.name, finished=len(done), redone=len(redo))
        return len(pending)

    async def original_ids_from(self, source_queue: str) -> set[str]:
        """Original ids of the messages here that came from `source_queue` (recovery only)."""
        found: set[str] = set()
        offsets = list(self._metas)
        for start in range(0, len(offsets), 1000):
            for record in await self.store.read(offsets[start : start + 1000]):
                if record.source_queue == source_queue:
                    found.add(record.original_id)
        return found

    async def redrive(
        self,
        sink: Callable[[str, list[NewMessage]], Awaitable[None]],
        *,
        to: str,
        max_messages: int,
        rate_per_s: float,
    ) -> tuple[int, list[str]]:
        """Move ready messages back to their source queue (or `to`), oldest first.

        Returns (moved, problems). Moves append before they delete: a crash in
        between leaves a copy in both queues (at least once), never none.
        """
        moved = 0
        problems: list[str] = []
        chunk_max = 100
        loop = asyncio.get_running_loop()
        started = loop.time()
        skipped: set[int] = set()
        while not self._closed and (not max_messages or moved < max_messages):
            self._advance(self._now_ms())
            want = chunk_max if not max_messages else min(chunk_max, max_messages - moved)
            chunk = [
                meta
                for meta in self._metas.values()
                if not meta.visible_at_ms and not meta.due_ms and meta.offset not in skipped
            ][:want]
            if not chunk:
                break
            # Hold the chunk (in memory only: a redrive is at least once anyway) so no
            # receive delivers a message while it is being moved.
            for meta in chunk:
                meta.visible_at_ms = MOVING_MS
                self._on_leased(meta)
            try:
                moved += await self._redrive_chunk(chunk, sink, to, skipped, problems)
            finally:
                self._release_holds(chunk)
            if rate_per_s > 0:
                ahead_s = moved / rate_per_s - (loop.time() - started)
                if ahead_s > 0:
                    await asyncio.sleep(ahead_s)
        return moved, problems[:20]

    def _release_holds(self, metas: list[MessageMeta]) -> None:
        released = False
        for meta in metas:
            if meta.offset in self._metas and meta.visible_at_ms == MOVING_MS:
                meta.visible_at_ms = 0
                self._on_unleased(meta)
                self._make_ready(meta)
                released = True
        if released:
            self._wake_waiters()

    async def _redrive_chunk(
        self,
        chunk: list[MessageMeta],
        sink: Callable[[str, list[NewMessage]], Awaitable[None]],
        to: str,
        skipped: set[int],
        problems: list[str],
    ) -> int:
        moved = 0
        stored = await self.store.read([meta.offset for meta in chunk])
        by_target: dict[str, list[tuple[MessageMeta, StoredMessage]]] = {}
        for meta, record in zip(chunk, stored, strict=True):
            target = to or record.source_queue
            if not target:
                skipped.add(meta.offset)
                own_id = message_id(self.queue_id, self.partition_index, meta.offset)
                problems.append(f"message {own_id} has no source queue; give `to`")
                continue
            by_target.setdefault(target, []).append((meta, record))
        for target, pairs in by_target.items():
            copies = [
                NewMessage(
                    body=record.body,
                    attributes=record.attributes,
                    group_id=record.group_id,
                    priority=meta.priority,
                    original_id=record.original_id,
                )
                for meta, record in pairs
            ]
            try:
                await sink(target, copies)
            except QueueNotFound as exc:
                skipped.update(meta.offset for meta, _ in pairs)
                problems.append(exc.message)
                continue
            await self._remove([meta for meta, _ in pairs])
            moved += len(pairs)
        return moved

    # --- acks and visibility ----------------------------------------------------

    def _check_receipt(self, receipt: str) -> tuple[MessageMeta | None, str]:
        """(meta, "") for a current receipt; (None, "") if the message is already gone;
        (None, reason) for a receipt that must be refused."""
        fields = self._signer.verify(receipt)
        if fields is None:
            return None, "receipt is malformed or was not issued by this server"
        if fields.queue_id != self.queue_id or fields.partition != self.partition_index:
            return None, "receipt belongs to another queue"
        meta = self._metas.get(fields.offset)
        if meta is None:
            return None, ""
        if fields.epoch < self.receipt_epoch_floor:
            return None, (
                f"receipt is from before the partition's leader changed (epoch "
                f"{fields.epoch}, now {self.epoch}); the message may have been delivered "
                f"again: receive it again"
            )
        if meta.receive_count != fields.receive_count or meta.visible_at_ms == MOVING_MS:
            return None, (
                f"receipt is from delivery {fields.receive_count}; the message has since "
                f"been delivered again (delivery {meta.receive_count}) or dead-lettered"
            )
        return meta, ""

    async def delete(self, receipts: list[str]) -> list[EntryFailure]:
        """Ack by receipt. Acking a message that is already gone succeeds (idempotent retry)."""
        self._check_writable()
        self._advance(self._now_ms())
        failures: list[EntryFailure] = []
        offsets: list[int] = []
        for position, receipt in enumerate(receipts):
            meta, reason = self._check_receipt(receipt)
            if reason:
                failures.append(EntryFailure(position, ErrorCode.RECEIPT_INVALID, reason))
                continue
            if meta is None:
                continue
            self._forget(meta)
            offsets.append(meta.offset)
        if offsets:
            self.acked_total += len(offsets)
            await self.store.delete(offsets)
            await self._committed(self.store.next_offset)
        return failures

    def _forget(self, meta: MessageMeta) -> None:
        del self._metas[meta.offset]
        self._loaded.discard(meta.offset)
        if meta.visible_at_ms:
            self._on_unleased(meta)
            if self.fifo:
                self._wake_waiters()
        elif meta.due_ms:
            self._delayed_count -= 1

    async def change_visibility(self, changes: list[tuple[str, int]]) -> list[EntryFailure]:
        now = self._now_ms()
        self._advance(now)
        failures: list[EntryFailure] = []
        leases: list[Lease] = []
        released = False
        for position, (receipt, timeout_ms) in enumerate(changes):
            meta, reason = self._check_receipt(receipt)
            if meta is None:
                failures.append(
                    EntryFailure(
                        position,
                        ErrorCode.RECEIPT_INVALID,
                        reason or "the message was already deleted",
                    )
                )
                continue
            was_in_flight = bool(meta.visible_at_ms)
            if timeout_ms and not was_in_flight:
                # Its lease ran out and it is ready again (SQS: MessageNotInflight). A
                # late heartbeat took it back into flight, and held a FIFO group.
                failures.append(
                    EntryFailure(
                        position,
                        ErrorCode.RECEIPT_INVALID,
                        "the message is not in flight: its visibility timeout ran out "
                        "(receive it again)",
                    )
                )
                continue
            if timeout_ms:
                meta.visible_at_ms = now + timeout_ms
                heapq.heappush(self._leases, (meta.visible_at_ms, meta.offset))
                if not was_in_flight:
                    self._on_leased(meta)
            else:
                meta.visible_at_ms = 0
                if was_in_flight:
                    self._on_unleased(meta)
                    self._make_ready(meta)
                    released = True
            leases.append(
                Lease(
                    meta.offset, meta.receive_count, meta.visible_at_ms, meta.first_received_at_ms
                )
            )
        if released:
            self._wake_waiters()
        elif self._waiters:
            self._arm_timer()
        if leases:
            await self.store.lease(leases)
        return failures

    # --- inspection and housekeeping ----------------------------------------------

    async def peek(
        self, max_messages: int, after_offset: int, *, bytes_max: int
    ) -> list[DeliveredMessage]:
        """Messages in offset order, in every state: cold ones (due past the horizon) are
        read from the log where the index says, and stay cold. At most about `bytes_max`
        of them (at least one); bodies are read only for those that fit."""
        self._advance(self._now_ms())
        cold = await self.store.peek_cold(
            after_offset, max_messages, bytes_max, _DELIVERY_OVERHEAD_BYTES
        )
        metas = []
        if self._loaded:  # `_metas` is out of offset order
            offsets = heapq.nsmallest(max_messages, (o for o in self._metas if o > after_offset))
            metas = [self._metas[o] for o in offsets]
        else:
            for offset, meta in self._metas.items():
                if offset > after_offset:
                    metas.append(meta)
                    if len(metas) >= max_messages:
                        break
        cold_records = {meta.offset: (meta, record) for meta, record in cold}
        hot = {meta.offset: meta for meta in metas}
        chosen: list[int] = []
        total = 0
        for offset in sorted(hot.keys() | cold_records.keys())[:max_messages]:
            meta = hot[offset] if offset in hot else cold_records[offset][0]
            total += meta.size + _DELIVERY_OVERHEAD_BYTES
            if total > bytes_max and chosen:
                break
            chosen.append(offset)
        to_read = [offset for offset in chosen if offset in hot]
        stored = dict(zip(to_read, await self.store.read(to_read), strict=True))
        return [
            # (A cold one pulled in meanwhile is shown once, from memory.)
            self._delivered(hot[offset], stored[offset], "")
            if offset in hot
            else self._delivered(*cold_records[offset], "")
            for offset in chosen
        ]

    async def purge(self) -> int:
        up_to = self.store.next_offset
        purged = await self.store.purge(up_to)
        # Sends committed while the purge was written come after it in the log and
        # stay: keep them in memory too (dropped here, they were hidden until a restart
        # brought them back).
        later = sorted(
            (meta for offset, meta in self._metas.items() if offset >= up_to),
            key=lambda meta: meta.offset,
        )
        count = len(self._metas) - len(later)
        self._metas.clear()
        for ready in self._ready:
            ready.clear()
        self._groups.clear()
        self._group_busy.clear()
        self._ready_groups.clear()
        self._delayed.clear()
        self._leases.clear()
        self._delayed_count = 0
        self._in_flight_count = 0
        self._cold_heads.clear()
        self._loaded.clear()
        now = self._now_ms()
        for meta in later:
            self._index_meta(meta, now)
        return max(purged, count)

    async def expire(self) -> int:
        """Drop messages older than the queue's retention (in any state); returns how many.

        The backend calls this once a second; it also pulls in cold messages
        that come within the horizon (module docstring).
        """
        now = self._now_ms()
        await self._pull_if_due(now)
        cutoff = now - self.retention_ms
        expired: list[MessageMeta] = []
        for meta in self._metas.values():
            if meta.sent_at_ms >= cutoff:
                break
            if meta.visible_at_ms != MOVING_MS:
                expired.append(meta)
        if self._loaded and self._loaded_sent_min_ms < cutoff:
            # Pulled-in messages sit out of offset order at the end of `_metas`.
            seen = {meta.offset for meta in expired}
            for offset in self._loaded:
                meta = self._metas[offset]
                if (
                    meta.sent_at_ms < cutoff
                    and meta.visible_at_ms != MOVING_MS
                    and offset not in seen
                ):
                    expired.append(meta)
            self._loaded_sent_min_ms = min(
                (self._metas[o].sent_at_ms for o in self._loaded if o not in seen), default=0
            )
        for meta in expired:
            self._forget(meta)
        if expired:
            await self.store.delete([meta.offset for meta in expired])
        count = len(expired) + await self._expire_cold(cutoff)
        if count:
            self.expired_total += count
            log.info("messages.expired", queue=self.name, count=count)
        return count

    async def _expire_cold(self, cutoff: int) -> int:
        if not self.store.cold_count:
            return 0
        async with self._cold_lock:
            gone = await self.store.expire_cold(cutoff)
            if self.fifo and gone:
                await self._refresh_cold_heads(
                    {m.group_id for m in gone if m.group_id in self._cold_heads}
                )
        return len(gone)

    def stats(self) -> dict[str, Any]:
        now = self._now_ms()
        self._advance(now)
        total = len(self._metas)
        oldest_age_s = 0.0
        cold_sent_ms = self.store.cold_sent_min_ms
        if total or cold_sent_ms is not None:
            oldest_ms = now if cold_sent_ms is None else cold_sent_ms
            if total:
                oldest_ms = min(oldest_ms, next(iter(self._metas.values())).sent_at_ms)
            if self._loaded:
                oldest_ms = min(oldest_ms, self._loaded_sent_min_ms)
            oldest_age_s = max(0.0, (now - oldest_ms) / 1000)
        return {
            "visible": total - self._in_flight_count - self._delayed_count,
            "in_flight": self._in_flight_count,
            "delayed": self._delayed_count + self.store.cold_count,
            "oldest_message_age_s": oldest_age_s,
            "sent_total": self.sent_total,
            "received_total": self.received_total,
            "acked_total": self.acked_total,
            "expired_total": self.expired_total,
            "dead_lettered_total": self.dead_lettered_total,
            "deduplicated_total": self.deduplicated_total,
        }

    def stop_waiting(self) -> None:
        """End every long poll now (shutdown): waiters return what is ready, usually nothing."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for task in self._late_admits:
            task.cancel()
        self._wake_waiters()

    async def _stop_pulling(self) -> None:
        task, self._pull_task = self._pull_task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def close(self) -> None:
        self.stop_waiting()
        await self._stop_pulling()
        await self.store.close()

    async def destroy(self) -> None:
        self.stop_waiting()
        await self._stop_pulling()
        await self.store.destroy()

    async def wait_ready(self, wait_ms: int) -> int:
        """Wait up to `wait_ms` until a message is ready; take nothing. How many are ready
        (a lower bound: lazily deleted entries are not counted out). For one long poll
        across the partitions of a queue (mqd.router)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_ms / 1000
        while not self._closed:
            self._advance(self._now_ms())
            ready = self._ready_estimate()
            if ready:
                return ready
            remaining = deadline - loop.time()
            if remaining <= 0:
                return 0
            await self._wait_woken(remaining)
        return 0

    async def _wait_woken(self, seconds: float) -> None:
        """Wait until `_wake_waiters` says a message may be ready, or `seconds` pass."""
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.add(waiter)
        self._arm_timer()
        try:
            # Not asyncio.wait_for: on Python 3.11 it drops a cancel that comes in the
            # turn the waiter is woken, and a cancelled receive (an UNSUBSCRIBE) then
            # took and delivered messages nobody would get (their lease ran out).
            async with asyncio.timeout(seconds):
                await stages.timed("wait", waiter)
        except TimeoutError:
            pass
        finally:
            self._waiters.discard(waiter)

    def _ready_estimate(self) -> int:
        if self.fifo:
            # Ready messages behind a busy or delayed group head cannot be received.
            return 1 if self._fifo_has_deliverable() else 0
        return max(0, len(self._metas) - self._in_flight_count - self._delayed_count)

    def _fifo_has_deliverable(self) -> bool:
        metas = self._metas
        for group in self._ready_groups:
            if self._group_busy.get(group):
                continue
            members = self._groups.get(group)
            if not members:
                continue
            cold_head = self._cold_heads.get(group)
            for offset in members:
                meta = metas.get(offset)
                if meta is None:
                    continue
                if cold_head is not None and offset > cold_head:
                    break
                if not meta.due_ms and not meta.visible_at_ms:
                    return True
                break
        return False
