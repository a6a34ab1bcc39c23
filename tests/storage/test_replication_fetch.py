"""A leader's FETCH on a real log: receive leases (written without an fsync) do not
send a follower round trip of their own; they travel with the next durable group."""

from __future__ import annotations

import asyncio
from pathlib import Path

from storage_helpers import msg, open_store, record_offsets, wait_for

from mqd.cluster.replication import LeaderReplication
from mqd.protocol.messages import FetchRequest
from mqd.storage import Lease


async def test_a_follower_holding_every_durable_record_waits_for_the_next_durable_group(
    part: Path,
) -> None:
    store = await open_store(part)

    async def no_isr_change(isr: list[str]) -> bool:
        return False

    leader = LeaderReplication(
        store, node_id="b1", replicas=["b1", "b2"], isr=["b1", "b2"], epoch=1,
        min_insync=1, change_isr=no_isr_change,
    )  # fmt: skip

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
