"""Queue semantics of one partition: ready, delayed and in-flight sets over a store.

The store (`mqd.storage.PartitionStore`) makes every change durable; this
class keeps the derived in-memory view and answers receives from it. Each
message is in exactly one state, read off its `MessageMeta`:
delayed (`due_ms != 0`), in flight (`visible_at_ms != 0`) or ready (neither).
The ready deque and the two heaps are indexes into that state with lazy
deletion: an entry whose message has moved on is skipped when popped.

Time comes from the injected clock; transitions that are due are applied
lazily at the start of every operation, and a timer wakes long-pollers when
the next delayed message or lease falls due (protocol.md §4 RECEIVE).
"""

from __future__ import annotations

import asyncio
import heapq
from collections import deque
from collections.abc import Callable
from typing import Any

import structlog

from mqd.clock import SystemClock
from mqd.errors import ErrorCode
from mqd.protocol.messages import DeliveredMessage, EntryFailure, SendEntry
from mqd.receipts import ReceiptSigner, message_id
from mqd.storage import Lease, MessageMeta, NewMessage, PartitionStore

log = structlog.get_logger("mqd.partition")


class Partition:
    def __init__(
        self,
        queue_id: bytes,
        partition_index: int,
        store: PartitionStore,
        signer: ReceiptSigner,
        *,
        clock: Any = None,
    ) -> None:
        self.queue_id = queue_id
        self.partition_index = partition_index
        self.store = store
        self._signer = signer
        self._clock = clock or SystemClock()
        self._now_ms: Callable[[], int] = self._clock.now_ms
        self._metas: dict[int, MessageMeta] = {}
        self._ready: deque[int] = deque()
        self._delayed: list[tuple[int, int]] = []  # (due_ms, offset)
        self._leases: list[tuple[int, int]] = []  # (visible_at_ms, offset)
        self._delayed_count = 0
        self._in_flight_count = 0
        self._waiters: set[asyncio.Future[None]] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_due_ms = 0
        self.sent_total = 0
        self.received_total = 0
        self.acked_total = 0
        self.expired_total = 0
        # Set from the queue's attributes by the backend (`configure`).
        self.retention_ms = 4 * 86_400_000
        self._closed = False
        self._rebuild()

    # --- state ------------------------------------------------------------

    def _rebuild(self) -> None:
        now = self._now_ms()
        for meta in self.store.live_messages():
            self._metas[meta.offset] = meta
            if meta.visible_at_ms:
                self._in_flight_count += 1
                heapq.heappush(self._leases, (meta.visible_at_ms, meta.offset))
            elif meta.due_ms > now:
                self._delayed_count += 1
                heapq.heappush(self._delayed, (meta.due_ms, meta.offset))
            else:
                meta.due_ms = 0
                self._ready.append(meta.offset)
        self._advance(now)

    def _advance(self, now: int) -> bool:
        """Apply every transition due by `now`; True if any message became ready."""
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
                self._ready.append(offset)
                woke = True
        leases = self._leases
        while leases and leases[0][0] <= now:
            deadline, offset = heapq.heappop(leases)
            meta = metas.get(offset)
            if meta is None or meta.visible_at_ms != deadline:
                continue
            meta.visible_at_ms = 0
            self._in_flight_count -= 1
            self._ready.append(offset)
            woke = True
        return woke

    def _take_ready(self, count: int) -> list[MessageMeta]:
        taken: list[MessageMeta] = []
        ready = self._ready
        metas = self._metas
        while ready and len(taken) < count:
            meta = metas.get(ready.popleft())
            if meta is None or meta.visible_at_ms or meta.due_ms:
                continue
            taken.append(meta)
        return taken

    def _mark_ready(self, meta: MessageMeta) -> None:
        self._ready.append(meta.offset)
        self._wake_waiters()

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
        if self._advance(self._now_ms()):
            self._wake_waiters()
        self._arm_timer()

    # --- operations -----------------------------------------------------------

    async def send(
        self, entries: list[SendEntry], default_delay_ms: int
    ) -> list[str]:
        now = self._now_ms()
        new_messages = [
            NewMessage(
                body=entry.body,
                attributes=entry.attributes,
                due_ms=now + (entry.delay_ms or default_delay_ms)
                if (entry.delay_ms or default_delay_ms)
                else 0,
                group_id=entry.group_id,
                dedup_id=entry.dedup_id,
                priority=entry.priority,
            )
            for entry in entries
        ]
        metas = await self.store.append_messages(new_messages)
        now = self._now_ms()
        queue_id, index = self.queue_id, self.partition_index
        ready_before = len(self._ready)
        for meta in metas:
            self._metas[meta.offset] = meta
            if meta.due_ms and meta.due_ms > now:
                self._delayed_count += 1
                heapq.heappush(self._delayed, (meta.due_ms, meta.offset))
            else:
                meta.due_ms = 0
                self._ready.append(meta.offset)
        self.sent_total += len(metas)
        if len(self._ready) != ready_before:
            self._wake_waiters()
        elif self._waiters:
            self._arm_timer()
        return [message_id(queue_id, index, meta.offset) for meta in metas]

    async def receive(
        self, max_messages: int, wait_ms: int, visibility_timeout_ms: int, *, bytes_max: int
    ) -> list[DeliveredMessage]:
        now = self._now_ms()
        self._advance(now)
        taken = self._take_ready(max_messages)
        if not taken and wait_ms > 0:
            taken = await self._wait_for_messages(max_messages, now + wait_ms)
        if not taken:
            return []
        return await self._deliver(taken, visibility_timeout_ms, bytes_max)

    async def _wait_for_messages(self, max_messages: int, deadline_ms: int) -> list[MessageMeta]:
        loop = asyncio.get_running_loop()
        while not self._closed:
            remaining_ms = deadline_ms - self._now_ms()
            if remaining_ms <= 0:
                return []
            waiter = loop.create_future()
            self._waiters.add(waiter)
            self._arm_timer()
            try:
                await asyncio.wait_for(waiter, remaining_ms / 1000)
            except TimeoutError:
                pass
            finally:
                self._waiters.discard(waiter)
            self._advance(self._now_ms())
            taken = self._take_ready(max_messages)
            if taken:
                return taken
        return []

    async def _deliver(
        self, taken: list[MessageMeta], visibility_timeout_ms: int, bytes_max: int
    ) -> list[DeliveredMessage]:
        # Keep the response inside one frame: give back what does not fit.
        total = 0
        for position, meta in enumerate(taken):
            total += meta.size + 256
            if total > bytes_max and position > 0:
                for returned in reversed(taken[position:]):
                    self._ready.appendleft(returned.offset)
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
                heapq.heappush(self._leases, (visible_at, meta.offset))
            else:
                # A zero visibility timeout hands the message out and leaves it ready.
                self._ready.append(meta.offset)
            leases.append(Lease(meta.offset, meta.receive_count, visible_at, meta.first_received_at_ms))
        if visible_at:
            self._in_flight_count += len(taken)
            if self._waiters:
                self._arm_timer()
        self.received_total += len(taken)
        try:
            await self.store.lease(leases)
            stored = await self.store.read([meta.offset for meta in taken])
        except BaseException:
            self._undo_delivery(taken)
            raise
        queue_id, index, sign = self.queue_id, self.partition_index, self._signer.sign
        return [
            DeliveredMessage(
                id=message_id(queue_id, index, meta.offset),
                receipt=sign(queue_id, index, meta.offset, meta.receive_count),
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
            for meta, record in zip(taken, stored, strict=True)
        ]

    def _undo_delivery(self, taken: list[MessageMeta]) -> None:
        for meta in taken:
            if meta.offset in self._metas and meta.visible_at_ms:
                meta.visible_at_ms = 0
                self._in_flight_count -= 1
                self._ready.appendleft(meta.offset)
        self._wake_waiters()

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
        if meta.receive_count != fields.receive_count:
            return None, (
                f"receipt is from delivery {fields.receive_count}; the message has since "
                f"been delivered again (delivery {meta.receive_count})"
            )
        return meta, ""

    async def delete(self, receipts: list[str]) -> list[EntryFailure]:
        """Ack by receipt. Acking a message that is already gone succeeds (idempotent retry)."""
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
        return failures

    def _forget(self, meta: MessageMeta) -> None:
        del self._metas[meta.offset]
        if meta.visible_at_ms:
            self._in_flight_count -= 1
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
            if timeout_ms:
                meta.visible_at_ms = now + timeout_ms
                heapq.heappush(self._leases, (meta.visible_at_ms, meta.offset))
                if not was_in_flight:
                    self._in_flight_count += 1
            else:
                meta.visible_at_ms = 0
                if was_in_flight:
                    self._in_flight_count -= 1
                    self._ready.append(meta.offset)
                    released = True
            leases.append(
                Lease(meta.offset, meta.receive_count, meta.visible_at_ms, meta.first_received_at_ms)
            )
        if released:
            self._wake_waiters()
        elif self._waiters:
            self._arm_timer()
        if leases:
            await self.store.lease(leases)
        return failures

    async def peek(self, max_messages: int, after_offset: int) -> list[DeliveredMessage]:
        self._advance(self._now_ms())
        metas = [meta for offset, meta in self._metas.items() if offset > after_offset]
        metas = metas[:max_messages]
        stored = await self.store.read([meta.offset for meta in metas])
        queue_id, index = self.queue_id, self.partition_index
        return [
            DeliveredMessage(
                id=message_id(queue_id, index, meta.offset),
                receipt="",
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
            for meta, record in zip(metas, stored, strict=True)
        ]

    async def purge(self) -> int:
        purged = await self.store.purge(self.store.next_offset)
        count = len(self._metas)
        self._metas.clear()
        self._ready.clear()
        self._delayed.clear()
        self._leases.clear()
        self._delayed_count = 0
        self._in_flight_count = 0
        return max(purged, count)

    async def expire(self) -> int:
        """Drop messages older than the queue's retention (in any state); returns how many."""
        cutoff = self._now_ms() - self.retention_ms
        expired: list[MessageMeta] = []
        for meta in self._metas.values():
            if meta.sent_at_ms >= cutoff:
                break
            expired.append(meta)
        if not expired:
            return 0
        for meta in expired:
            self._forget(meta)
        self.expired_total += len(expired)
        await self.store.delete([meta.offset for meta in expired])
        log.info("messages.expired", queue_id=self.queue_id.hex(), count=len(expired))
        return len(expired)

    def stats(self) -> dict[str, Any]:
        now = self._now_ms()
        self._advance(now)
        total = len(self._metas)
        oldest_age_s = 0.0
        if total:
            oldest = next(iter(self._metas.values()))
            oldest_age_s = max(0.0, (now - oldest.sent_at_ms) / 1000)
        return {
            "visible": total - self._in_flight_count - self._delayed_count,
            "in_flight": self._in_flight_count,
            "delayed": self._delayed_count,
            "oldest_message_age_s": oldest_age_s,
            "sent_total": self.sent_total,
            "received_total": self.received_total,
            "acked_total": self.acked_total,
            "expired_total": self.expired_total,
        }

    def stop_waiting(self) -> None:
        """End every long poll now (shutdown): waiters return what is ready, usually nothing."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._wake_waiters()

    async def close(self) -> None:
        self.stop_waiting()
        await self.store.close()

    async def destroy(self) -> None:
        self.stop_waiting()
        await self.store.destroy()
