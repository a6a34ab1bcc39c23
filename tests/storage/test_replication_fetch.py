"""A leader's FETCH on a real log: receive leases (written without an fsync) do not
send a follower round trip of their own; they travel with the next durable group. A
group goes to the followers while the leader's own fsync runs, and what that means
when the fsync fails or the leader's machine loses the group."""

from __future__ import annotations

import asyncio
import os
import shutil
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
from storage_helpers import EIO, FaultyFS, LogRecorder, msg, open_store, record_offsets, wait_for

from mqd.cluster.replication import Follower, LeaderReplication, persist_hw
from mqd.errors import InternalError, NotLeader, Unavailable
from mqd.protocol.messages import FetchRequest
from mqd.storage import FileSystem, Lease, StorageConfig


async def no_isr_change(isr: list[str]) -> bool:
    return False


def leading(
    store,
    epoch: int = 1,
    *,
    replicas=("b1", "b2"),
    min_insync: int = 1,
    change_isr=no_isr_change,
    **options,
) -> LeaderReplication:
    """b1 leading `store`, every replica in sync."""
    return LeaderReplication(
        store, node_id="b1", replicas=list(replicas), isr=list(replicas), epoch=epoch,
        min_insync=min_insync, change_isr=change_isr, **options,
    )  # fmt: skip


def fetch_request(from_offset: int, wait_ms: int = 0) -> FetchRequest:
    return FetchRequest(b"q", 0, 1, "b2", from_offset, wait_ms, 1 << 20)


class HeldSyncFS(FileSystem):
    """Real calls; while `release` is clear, an fdatasync waits for it (in its thread)."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()
        self.release.set()
        self.holding = threading.Event()

    def fdatasync(self, fd: int) -> None:
        if not self.release.is_set():
            self.holding.set()
            assert self.release.wait(10), "the test never released the fsync"
        super().fdatasync(fd)


async def test_a_follower_holding_every_durable_record_waits_for_the_next_durable_group(
    part: Path,
) -> None:
    store = await open_store(part)
    leader = leading(store)

    def fetch(from_offset: int, wait_ms: int) -> asyncio.Task:
        request = FetchRequest(b"q", 0, 1, "b2", from_offset, wait_ms, 1 << 20)
        return asyncio.create_task(leader.fetch(request))

    sent = (await store.append_messages([msg(0)]))[0].offset
    first = fetch(0, 1000)
    assert record_offsets((await first).data) == [sent]
    durable_end = store.next_offset

    # A receive's lease: written, no fsync, nobody waits for its replication.
    await store.lease([Lease(sent, 1, 2**40, 1)], wait=False)
    await wait_for(lambda: store.next_offset == durable_end + 1)
    waiting = fetch(durable_end, 5000)
    await asyncio.sleep(0.1)
    assert not waiting.done()  # no round trip (and follower fsync) for the lease alone
    assert leader.acked["b2"] == durable_end

    # The next send's durable group wakes it: the lease travels with it.
    second = (await store.append_messages([msg(1)]))[0].offset
    answer = await asyncio.wait_for(waiting, 2)
    assert record_offsets(answer.data) == [durable_end, second]

    # A lease with no durable group after it goes when the long poll runs out.
    before = store.next_offset
    await store.lease([Lease(second, 1, 2**40, 1)], wait=False)
    await wait_for(lambda: store.next_offset == before + 1)
    lease_only = await asyncio.wait_for(fetch(store.next_offset - 1, 150), 2)
    assert record_offsets(lease_only.data) == [store.next_offset - 1]

    await leader.close()
    await store.close()


async def test_a_group_reaches_the_followers_while_the_leaders_fsync_runs(part: Path) -> None:
    fs = HeldSyncFS()
    store = await open_store(part, fs=fs)
    leader = leading(store)
    await store.append_messages([msg(0)])
    assert record_offsets((await leader.fetch(fetch_request(0))).data) == [0]

    fs.release.clear()
    sending = asyncio.create_task(store.append_messages([msg(1)]))
    await asyncio.to_thread(fs.holding.wait, 5)
    # The leader's fsync of offset 1 has not returned, and the follower has it already.
    answer = await leader.fetch(fetch_request(1))
    assert record_offsets(answer.data) == [1]
    assert not sending.done()
    assert (store.next_offset, store.written_end) == (1, 2)
    # The follower holding it does not commit it: the leader's own copy is not synced.
    await leader.fetch(fetch_request(2))
    assert leader.acked["b2"] == 2
    assert leader.high_watermark == 1

    fs.release.set()
    assert (await asyncio.wait_for(sending, 5))[0].offset == 1
    await wait_for(lambda: leader.high_watermark == 2)
    assert store.next_offset == store.written_end == 2
    await leader.close()
    await store.close()


async def test_an_fsync_failing_after_the_group_was_shipped_keeps_it_and_stops_writes(
    part: Path,
) -> None:
    fs, log = FaultyFS(), LogRecorder()
    store = await open_store(part, fs=fs, log=log)
    stop_reasons: list[str] = []
    leader = leading(store, on_storage_failure=stop_reasons.append)
    await store.append_messages([msg(0)])
    await leader.fetch(fetch_request(1))  # the follower holds offset 0

    fs.fsync_errno = EIO
    with pytest.raises(InternalError, match="outcome is unknown"):
        await store.append_messages([msg(1)])
    assert log.named("log.fsync_failed_after_ship")
    # The node is told, once, so that it stops and its partitions fail over.
    assert len(stop_reasons) == 1 and "could not be synced" in stop_reasons[0]
    assert os.strerror(EIO) in stop_reasons[0]
    # Not cut back (a follower may hold it) and not committed (not known to be on disk).
    assert record_offsets((await leader.fetch(fetch_request(1))).data) == [1]
    await leader.fetch(fetch_request(2))
    assert leader.high_watermark == 1
    # Offset 1 is never written again with something else: the log takes no writes.
    fs.fsync_errno = None
    with pytest.raises(InternalError, match="until its node restarts"):
        await store.append_messages([msg(2)])
    assert store.written_end == 2
    assert len(stop_reasons) == 1  # a refused write is not a new failure
    await leader.close()
    assert not store.failure_listeners
    await store.close()

    # A restart recovers the log from disk: the group is there, as the followers have it.
    reopened = await open_store(part)
    assert reopened.next_offset == 2
    assert (await reopened.append_messages([msg(2)]))[0].offset == 2
    await reopened.close()


class InProcessLeader:
    """The follower's two seams onto its leader, served by a LeaderReplication in this
    process: the placement (b1 leads at epoch 1) and the FETCH call."""

    def __init__(self, leader: LeaderReplication) -> None:
        self.leader = leader
        self.asked: list[int] = []  # each FETCH's from_offset, in order

    def leader_of(self, queue_id: bytes, index: int) -> SimpleNamespace:
        return SimpleNamespace(leader="b1", epoch=1)

    def cluster_address(self, node_id: str) -> str:
        return "in-process"

    async def refresh(self) -> None:
        return None

    async def call(self, address: str, request: FetchRequest, timeout_s: float) -> object:
        self.asked.append(request.from_offset)
        return await self.leader.fetch(request)


def following(directory: Path, seam: InProcessLeader) -> Follower:
    view = SimpleNamespace(
        leader=seam.leader_of, cluster_address=seam.cluster_address, refresh=seam.refresh
    )
    return Follower(
        directory, StorageConfig(), peers=seam, view=view, queue_id=b"q", index=0,
        node_id="b2",
    )  # fmt: skip


async def test_a_follower_ahead_of_its_leader_at_the_same_epoch_cuts_back(
    tmp_path: Path,
) -> None:
    """The leader's machine crashed after shipping a group it had not synced, and came
    back leading at the same epoch without it: the follower must not keep the group
    (the leader would write other records at its offsets)."""
    lost, kept = tmp_path / "leader", tmp_path / "leader-after-crash"
    store = await open_store(lost)
    await store.append_messages([msg(i) for i in range(3)])
    await store.close()
    shutil.copytree(lost, kept)  # what the disk will hold after the crash

    store = await open_store(lost)
    seam = InProcessLeader(leading(store))
    follower = following(tmp_path / "follower", seam)
    await follower.start()
    await wait_for(lambda: follower.high_watermark == 3)
    await store.append_messages([msg(3), msg(4)])  # shipped, then "lost"
    await wait_for(lambda: follower.replica.next_offset == 5)
    lost_records, _ = await store.read_raw(3, 1 << 20)
    await follower.stop()
    await seam.leader.close()
    await store.close()

    store = await open_store(kept)
    seam.leader = leading(store)
    with pytest.raises(NotLeader) as refused:
        await seam.leader.fetch(fetch_request(5))
    assert refused.value.details == {"log_end": 3}
    assert "b2" not in seam.leader.acked  # a refused fetch acknowledges nothing

    follower = following(tmp_path / "follower", seam)
    await follower.start()
    await wait_for(lambda: follower.replica.next_offset == 3)
    replaced = (await store.append_messages([msg(30)]))[0].offset
    assert replaced == 3
    await wait_for(lambda: follower.replica.next_offset == 4)
    new_record, _ = await store.read_raw(3, 1 << 20)
    follower_log = b"".join(p.read_bytes() for p in sorted((tmp_path / "follower").glob("*.log")))
    assert new_record in follower_log
    assert lost_records[: len(new_record)] not in follower_log
    await follower.stop()
    await seam.leader.close()
    await store.close()


async def test_a_follower_asking_from_below_what_it_acknowledged_leaves_the_set_at_once(
    part: Path,
) -> None:
    # Its machine restarted and took unsynced records with it (mqd.storage.replica):
    # out now, not after the lag limit; back once it has caught up.
    store = await open_store(part)
    proposals: list[list[str]] = []

    async def accept(isr: list[str]) -> bool:
        proposals.append(sorted(isr))
        return True

    leader = leading(store, change_isr=accept, lag_max_s=60)
    leader.start()
    for i in range(3):
        await store.append_messages([msg(i)])
    end = store.next_offset
    await leader.fetch(fetch_request(end))
    assert leader.high_watermark == end and proposals == []

    await leader.fetch(fetch_request(1))  # the copy now ends at 1
    await wait_for(lambda: proposals == [["b1"]], timeout_s=2)
    assert leader.isr == ["b1"] and leader.high_watermark == end  # never goes back

    # Caught up again: it rejoins on the next check.
    await leader.fetch(fetch_request(end))
    await wait_for(lambda: proposals[-1] == ["b1", "b2"], timeout_s=2)
    assert sorted(leader.isr) == ["b1", "b2"]
    await leader.close()
    await store.close()


async def test_the_in_sync_set_is_kept_after_a_change_that_raised(part: Path) -> None:
    # A change that raised anything (it was a FileNotFoundError from the placement
    # cache) ended the maintenance for good: a replica that came back never rejoined.
    store = await open_store(part)
    proposals: list[list[str]] = []

    async def flaky(isr: list[str]) -> bool:
        proposals.append(sorted(isr))
        if len(proposals) == 1:
            raise FileNotFoundError("placement.tmp")
        return True

    leader = leading(store, change_isr=flaky, lag_max_s=60)
    leader.start()
    await store.append_messages([msg(0)])
    end = store.next_offset
    await leader.fetch(fetch_request(end))
    await leader.fetch(fetch_request(0))  # lost what it acknowledged: out at once
    await wait_for(lambda: len(proposals) >= 2, timeout_s=3)
    assert proposals[:2] == [["b1"], ["b1"]] and leader.isr == ["b1"]

    await leader.fetch(fetch_request(end))  # caught up: back in
    await wait_for(lambda: leader.isr == ["b1", "b2"], timeout_s=3)
    assert proposals[-1] == ["b1", "b2"]
    await leader.close()
    await store.close()


async def test_a_write_waiting_when_the_set_shrinks_below_min_insync_fails(part: Path) -> None:
    # Review: both followers killed while a send waited; the set shrank in two steps,
    # and at the second the high watermark moved to the leader's own end and released
    # the writer (acknowledged with one copy, min_insync 2) before the check that
    # fails waiting writers found none left.
    store = await open_store(part)
    leader = leading(store, replicas=("b1", "b2", "b3"), min_insync=2)
    await store.append_messages([msg(0)])
    end = store.next_offset
    waiting = asyncio.create_task(leader.wait_committed(end))
    await asyncio.sleep(0.05)
    assert not waiting.done() and leader.high_watermark == 0
    leader.update(["b1", "b2"], 1, ["b1", "b2", "b3"])
    await asyncio.sleep(0.05)
    assert not waiting.done()
    leader.update(["b1"], 1, ["b1", "b2", "b3"])
    with pytest.raises(Unavailable, match="min_insync"):
        await asyncio.wait_for(waiting, 2)
    assert leader.high_watermark == 0  # nothing committed on one copy
    # A follower back in the set: what it holds commits.
    await leader.fetch(FetchRequest(b"q", 0, 1, "b2", end, 0, 1 << 20))
    leader.update(["b1", "b2"], 1, ["b1", "b2", "b3"])
    assert leader.high_watermark == end
    await leader.close()
    await store.close()


async def test_a_follower_restarted_at_the_same_epoch_keeps_its_log(tmp_path: Path) -> None:
    # Its high watermark on disk may be a second old; the epoch beside it says the
    # leader did not change, so nothing above it is divergent: no cut, no refetch.
    store = await open_store(tmp_path / "leader")
    seam = InProcessLeader(leading(store))
    follower = following(tmp_path / "follower", seam)
    await follower.start()
    await store.append_messages([msg(i) for i in range(3)])
    await wait_for(lambda: follower.high_watermark == 3)
    await follower.stop()  # writes high watermark 3 at epoch 1
    await store.append_messages([msg(3), msg(4)])
    follower = following(tmp_path / "follower", seam)
    await follower.start()
    await wait_for(lambda: follower.replica.next_offset == 5)
    await follower.stop()

    # As if killed with the file behind: it says 3 at epoch 1, the log holds 5.
    persist_hw(tmp_path / "follower", 3, 1)
    seam.asked.clear()
    follower = following(tmp_path / "follower", seam)
    await follower.start()
    await wait_for(lambda: bool(seam.asked))
    assert seam.asked[0] == 5 and follower.replica.next_offset == 5
    await follower.stop()
    await seam.leader.close()
    await store.close()


async def test_a_follower_restarted_into_a_new_epoch_cuts_back_to_its_high_watermark(
    tmp_path: Path,
) -> None:
    store = await open_store(tmp_path / "leader")
    await store.append_messages([msg(i) for i in range(5)])
    seam = InProcessLeader(leading(store))
    follower = following(tmp_path / "follower", seam)
    await follower.start()
    await wait_for(lambda: follower.replica.next_offset == 5)
    await follower.stop()
    persist_hw(tmp_path / "follower", 3, 0)  # it last followed epoch 0's leader
    follower = following(tmp_path / "follower", seam)
    seam.asked.clear()
    await follower.start()
    await wait_for(lambda: bool(seam.asked))
    assert seam.asked[0] == 3
    await follower.stop()
    await seam.leader.close()
    await store.close()


async def test_waiting_on_a_closed_leader_fails_at_once(part: Path) -> None:
    # A demoted leader's partition started late admissions (waits with no timeout) as
    # it closed; nothing wakes a closed leader, so they hung until destroyed pending.
    store = await open_store(part)
    leader = leading(store)
    await store.append_messages([msg(0)])
    await leader.close()
    with pytest.raises(Unavailable, match="moved"):
        await asyncio.wait_for(leader.wait_committed(store.next_offset, timeout_s=None), 2)
    await store.close()
