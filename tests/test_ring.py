"""The consistent-hash ring (mqd/ring.py, DESIGN.md §6): balance, movement, determinism."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mqd.errors import ConfigError
from mqd.ring import HashRing, ring_hash

BACKENDS = ["backend-a", "backend-b", "backend-c"]


def _partitions(seed: int, queues: int, per_queue: int) -> list[tuple[bytes, int]]:
    rng = random.Random(seed)
    return [(rng.randbytes(16), partition) for _ in range(queues) for partition in range(per_queue)]


def _placement(ring: HashRing, partitions: list[tuple[bytes, int]]) -> list[str]:
    return [ring.place(queue_id, partition)[0] for queue_id, partition in partitions]


def test_hash_is_stable_blake2b_64():
    # A fixed vector: if this changes, every partition in every cluster moves.
    assert ring_hash(b"") == 0xE4A6A0577479B2B4
    assert ring_hash(b"backend-a#0") == 0x2845D96D03FF1727


def test_balance_300_partitions_over_3_backends():
    ring = HashRing(BACKENDS, vnodes=128)
    partitions = _partitions(seed=1, queues=30, per_queue=10)
    counts = Counter(_placement(ring, partitions))
    mean = len(partitions) / len(BACKENDS)
    assert set(counts) == set(BACKENDS)
    for backend in BACKENDS:
        assert 0.75 * mean <= counts[backend] <= 1.25 * mean, counts


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_adding_a_backend_moves_about_a_quarter_and_only_to_it(seed):
    partitions = _partitions(seed=seed, queues=100, per_queue=10)
    ring = HashRing(BACKENDS)
    before = _placement(ring, partitions)
    assert ring.add("backend-d")
    after = _placement(ring, partitions)
    moved = [(old, new) for old, new in zip(before, after, strict=True) if old != new]
    assert 0.15 * len(partitions) <= len(moved) <= 0.40 * len(partitions), len(moved)
    assert all(new == "backend-d" for _, new in moved)


def test_removing_a_backend_moves_only_its_partitions():
    partitions = _partitions(seed=4, queues=100, per_queue=10)
    ring = HashRing([*BACKENDS, "backend-d"])
    before = _placement(ring, partitions)
    assert ring.remove("backend-b")
    after = _placement(ring, partitions)
    for old, new in zip(before, after, strict=True):
        if old == "backend-b":
            assert new != "backend-b"
        else:
            assert new == old


def test_add_then_remove_restores_placement():
    partitions = _partitions(seed=5, queues=50, per_queue=4)
    ring = HashRing(BACKENDS)
    before = _placement(ring, partitions)
    ring.add("backend-d")
    ring.remove("backend-d")
    assert _placement(ring, partitions) == before


def test_replicas_move_minimally_too():
    # With R=3 of 4 backends, removing one keeps each partition's surviving replicas.
    partitions = _partitions(seed=6, queues=50, per_queue=4)
    ring = HashRing([*BACKENDS, "backend-d"])
    before = [ring.place(q, p, 3) for q, p in partitions]
    ring.remove("backend-a")
    after = [ring.place(q, p, 3) for q, p in partitions]
    for old, new in zip(before, after, strict=True):
        survivors = [node for node in old if node != "backend-a"]
        assert new[: len(survivors)] == survivors


def test_owners_three_distinct_nodes():
    ring = HashRing([*BACKENDS, "backend-d", "backend-e"])
    for queue_id, partition in _partitions(seed=7, queues=20, per_queue=5):
        owners = ring.place(queue_id, partition, 3)
        assert len(owners) == 3
        assert len(set(owners)) == 3
        assert owners[0] == ring.place(queue_id, partition)[0]


def test_fewer_nodes_than_count():
    ring = HashRing(["only", "two"])
    assert sorted(ring.owners(b"key", 5)) == ["only", "two"]
    assert ring.owners(b"key", 0) == []


def test_empty_ring():
    ring = HashRing()
    assert ring.owners(b"key") == []
    assert ring.owners(b"key", 3) == []
    assert ring.place(b"queue", 0, 3) == []
    assert ring.nodes == frozenset()


def test_add_and_remove_are_idempotent():
    ring = HashRing(["a"])
    assert not ring.add("a")
    assert not ring.remove("b")
    assert ring.nodes == {"a"}
    assert ring.remove("a")
    assert ring.nodes == frozenset()
    assert len(ring) == 0


def test_partition_key_is_unambiguous():
    assert HashRing.partition_key(b"q", 1) == b"q\x00\x00\x00\x01"
    assert HashRing.partition_key(b"q\x00", 1) != HashRing.partition_key(b"q", 256)


@pytest.mark.parametrize(
    ("call", "names"),
    [
        (lambda: HashRing(vnodes=0), "vnodes"),
        (lambda: HashRing(vnodes=10**6), "vnodes"),
        (lambda: HashRing("abc"), "nodes"),
        (lambda: HashRing([""]), "node"),
        (lambda: HashRing(["\udcff"]), "node"),
        (lambda: HashRing(["a"]).owners(b"k", -1), "count"),
        (lambda: HashRing(["a"]).owners("k"), "key"),
        (lambda: HashRing.partition_key(b"q", -1), "partition"),
        (lambda: HashRing.partition_key(b"q", 2**32), "partition"),
        (lambda: HashRing.partition_key("q", 0), "queue_id"),
    ],
)
def test_bad_arguments_raise_config_error(call, names):
    with pytest.raises(ConfigError, match=names):
        call()


_PLACEMENT_SCRIPT = """
import json, random
from mqd.ring import HashRing
ring = HashRing(["backend-a", "backend-b", "backend-c", "backend-d"], vnodes=64)
rng = random.Random(11)
print(json.dumps([ring.place(rng.randbytes(8), p, 2) for p in range(200)]))
"""


def test_same_placement_in_another_process():
    # Different PYTHONHASHSEEDs prove that Python's salted hash() plays no part.
    results = []
    for seed in ("1", "2"):
        proc = subprocess.run(
            [sys.executable, "-c", _PLACEMENT_SCRIPT],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": seed},
            timeout=60,
        )
        results.append(json.loads(proc.stdout))
    ring = HashRing(["backend-d", "backend-c", "backend-b", "backend-a"], vnodes=64)
    rng = random.Random(11)
    here = [ring.place(rng.randbytes(8), p, 2) for p in range(200)]
    assert results[0] == results[1] == here


node_ids = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=12)


@given(
    nodes=st.lists(node_ids, min_size=0, max_size=8, unique=True),
    keys=st.lists(st.binary(max_size=32), min_size=1, max_size=10),
    count=st.integers(min_value=0, max_value=10),
    vnodes=st.integers(min_value=1, max_value=16),
)
def test_owners_are_distinct_members_and_stable(nodes, keys, count, vnodes):
    ring = HashRing(nodes, vnodes=vnodes)
    rebuilt = HashRing(reversed(nodes), vnodes=vnodes)
    for key in keys:
        owners = ring.owners(key, count)
        assert len(owners) == min(count, len(nodes))
        assert len(set(owners)) == len(owners)
        assert set(owners) <= set(nodes)
        assert rebuilt.owners(key, count) == owners
        # A prefix property: asking for fewer replicas gives the head of the list.
        assert ring.owners(key, max(count - 1, 0)) == owners[: max(count - 1, 0)]
