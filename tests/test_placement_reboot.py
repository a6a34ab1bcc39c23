"""Metadata's placement on a real SQLite store: what a backend's registration after a
machine restart (`rebooted_unclean`, protocol.md §7.2) and a silent node do to leaders
and in-sync sets."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from mqd.cluster import placement as placement_module
from mqd.cluster.placement import PlacementManager, RecordStore
from mqd.metadata import QueueRecord
from mqd.protocol.messages import NodeInfo

BACKENDS = ("b1", "b2", "b3")


def node(node_id: str) -> NodeInfo:
    return NodeInfo(node_id, ["backend"], "", f"127.0.0.1:{7300 + int(node_id[1:])}")


@pytest.fixture
async def manager(tmp_path: Path):
    queue = QueueRecord("q", b"\x01" * 8, {"replication_factor": 3}, 0, partitions=2)
    manager = PlacementManager(
        await RecordStore.open(tmp_path / "placement.db"), vnodes=16, session_timeout_ms=500
    )
    await manager.start(lambda: [queue])
    for node_id in BACKENDS:
        await manager.register(node(node_id))
    await manager.create_partitions(queue)
    yield manager
    await manager.close()


def parts(manager: PlacementManager):
    (placements,) = manager.placements.values()
    return placements


async def test_a_rebooted_follower_leaves_every_in_sync_set_it_follows(manager) -> None:
    before = parts(manager)
    follower = next(r for r in before[0].replicas if r != before[0].leader)
    await manager.register(node(follower), rebooted_unclean=True)
    for old, new in zip(before, parts(manager), strict=True):
        if old.leader == follower:
            continue
        assert (new.leader, new.epoch) == (old.leader, old.epoch)
        assert new.isr == [r for r in old.isr if r != follower]


async def test_a_rebooted_leader_hands_over_to_an_in_sync_replica_that_is_up(manager) -> None:
    before = parts(manager)[0]
    leader = before.leader
    await manager.register(node(leader), rebooted_unclean=True)
    after = parts(manager)[0]
    assert after.leader != leader and after.epoch == before.epoch + 1
    assert leader not in after.isr and set(after.isr) == set(before.isr) - {leader}
    # Said again after a plain restart: nothing moves.
    await manager.register(node(after.leader))
    assert parts(manager)[0] == after


async def test_a_rebooted_leader_with_no_other_replica_up_keeps_the_lead(manager) -> None:
    before = parts(manager)[0]
    leader = before.leader
    for other in before.replicas:
        if other != leader:
            manager.nodes[other].up = False
    await manager.register(node(leader), rebooted_unclean=True)
    after = parts(manager)[0]
    assert (after.leader, after.epoch, after.isr) == (leader, before.epoch, before.isr)


async def test_nodes_silent_together_are_all_down_before_any_failover(manager, monkeypatch) -> None:
    # The leader and one follower go silent in the same check: the follower must not be
    # chosen to lead (it is as dead as the leader); the third replica is.
    monkeypatch.setattr(placement_module, "LIVENESS_CHECK_S", 0.05)
    before = parts(manager)[0]
    leader = before.leader
    # The silent follower first in the in-sync set, and checked after the leader.
    silent_follower, live = (r for r in before.isr if r != leader)
    for node_id in (leader, silent_follower, live):
        manager.nodes[node_id] = manager.nodes.pop(node_id)
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and parts(manager)[0].leader == leader:
        await manager.heartbeat(live)
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.2)  # any further failover of the same check has happened
    after = parts(manager)[0]
    # One failover, straight to the live replica (not one to the dead follower first).
    assert (after.leader, after.epoch, after.isr) == (live, before.epoch + 1, [live])


async def test_a_follower_silent_since_the_leader_died_is_not_chosen_to_lead(
    manager, monkeypatch
) -> None:
    # The leader and a follower die together, the follower a heartbeat later: when the
    # leader expires the follower is still up, but silent for most of a session. The
    # replica that keeps heartbeating leads, at once (not after a second failover).
    monkeypatch.setattr(placement_module, "LIVENESS_CHECK_S", 0.05)
    before = parts(manager)[0]
    leader = before.leader
    silent_follower, live = (r for r in before.isr if r != leader)  # the silent one first
    await asyncio.sleep(0.3)  # past the check still on the old period (it reads as a stall)
    await manager.heartbeat(leader)
    await asyncio.sleep(0.1)  # when the leader expires, silent for 0.4 s of its 0.5
    await manager.heartbeat(silent_follower)
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and parts(manager)[0].leader == leader:
        await manager.heartbeat(live)
        await asyncio.sleep(0.05)
    chosen = parts(manager)[0]
    assert (chosen.leader, chosen.epoch) == (live, before.epoch + 1)
