"""Partition placement: a consistent-hash ring with virtual nodes (DESIGN.md §6).

A partition's replicas are the first R distinct backends clockwise from the
hash of (queue id, partition). Each backend owns `vnodes` points on a 64-bit
circle, so adding or removing one of N backends moves about 1/N of the
partitions, and only to or from that backend.

The ring is pure and deterministic: no I/O, no clock, no randomness, and a
stable hash (BLAKE2b, 8-byte digest, big-endian), never Python's salted
`hash()`. The same members and vnode count give the same placement in every
process and on every machine, which keeps metadata decisions a function of
catalog state alone.

Changing the hash, the point naming (`node + "#" + index`) or the partition
key encoding moves partitions between backends: treat any such change as a
format change of the catalog and migrate placements explicitly.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Iterable

from mqd.errors import ConfigError

__all__ = ["HashRing", "ring_hash"]

vnodes_max = 4096
partition_max = 2**32 - 1  # A partition number is encoded as 4 big-endian bytes.


def ring_hash(data: bytes) -> int:
    """The position of `data` on the ring: BLAKE2b-64 as a big-endian integer."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


class HashRing:
    """A consistent-hash ring over backend ids.

    `add` of a member and `remove` of a non-member change nothing and return
    False, so a controller can apply the desired membership idempotently.
    """

    __slots__ = ("_nodes", "_owners", "_points", "_vnodes")

    def __init__(self, nodes: Iterable[str] = (), vnodes: int = 128) -> None:
        if isinstance(vnodes, bool) or not isinstance(vnodes, int) or not 1 <= vnodes <= vnodes_max:
            raise ConfigError(f"vnodes: must be an integer from 1 to {vnodes_max}, got {vnodes!r}")
        self._vnodes = vnodes
        self._nodes: set[str] = set()
        # Parallel sorted lists: _points[i] is a position and _owners[i] its node.
        # Ties (a 64-bit collision) are ordered by node id, so still deterministic.
        self._points: list[int] = []
        self._owners: list[str] = []
        if isinstance(nodes, str):
            raise ConfigError("nodes: expected an iterable of node ids, got one string")
        for node in nodes:
            self.add(node)

    @property
    def vnodes(self) -> int:
        return self._vnodes

    @property
    def nodes(self) -> frozenset[str]:
        """The current members."""
        return frozenset(self._nodes)

    def __len__(self) -> int:
        return len(self._nodes)

    def __contains__(self, node: object) -> bool:
        return node in self._nodes

    def __repr__(self) -> str:
        return f"HashRing({sorted(self._nodes)!r}, vnodes={self._vnodes})"

    def _node_points(self, node: str) -> list[int]:
        return [ring_hash(f"{node}#{index}".encode()) for index in range(self._vnodes)]

    def add(self, node: str) -> bool:
        """Add `node`; return False if it was already a member."""
        _check_node(node)
        if node in self._nodes:
            return False
        self._nodes.add(node)
        pairs = sorted(
            [*zip(self._points, self._owners, strict=True)]
            + [(point, node) for point in self._node_points(node)]
        )
        self._points = [point for point, _ in pairs]
        self._owners = [owner for _, owner in pairs]
        return True

    def remove(self, node: str) -> bool:
        """Remove `node`; return False if it was not a member."""
        if node not in self._nodes:
            return False
        self._nodes.remove(node)
        kept = [(p, o) for p, o in zip(self._points, self._owners, strict=True) if o != node]
        self._points = [point for point, _ in kept]
        self._owners = [owner for _, owner in kept]
        return True

    def owners(self, key: bytes, count: int = 1) -> list[str]:
        """The first `count` distinct nodes clockwise from `key`'s position.

        Clockwise means the first point at or after the key's position,
        wrapping around past the top. Fewer than `count` nodes are returned
        when the ring has fewer members; an empty ring gives [].
        """
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ConfigError(f"count: must be a non-negative integer, got {count!r}")
        if not isinstance(key, bytes | bytearray | memoryview):
            raise ConfigError(f"key: must be bytes, got {type(key).__name__}")
        wanted = min(count, len(self._nodes))
        found: list[str] = []
        if wanted == 0:
            return found
        total = len(self._points)
        start = bisect.bisect_left(self._points, ring_hash(bytes(key)))
        for step in range(total):
            owner = self._owners[(start + step) % total]
            if owner not in found:
                found.append(owner)
                if len(found) == wanted:
                    break
        assert len(found) == wanted, (found, wanted)
        return found

    @staticmethod
    def partition_key(queue_id: bytes, partition: int) -> bytes:
        """The ring key of one partition: the queue id then the partition as 4 bytes.

        The fixed-width suffix keeps the encoding unambiguous for queue ids of
        any length and content.
        """
        if not isinstance(queue_id, bytes | bytearray | memoryview):
            raise ConfigError(f"queue_id: must be bytes, got {type(queue_id).__name__}")
        if (
            isinstance(partition, bool)
            or not isinstance(partition, int)
            or not 0 <= partition <= partition_max
        ):
            raise ConfigError(f"partition: must be from 0 to {partition_max}, got {partition!r}")
        return bytes(queue_id) + partition.to_bytes(4, "big")

    def place(self, queue_id: bytes, partition: int, count: int = 1) -> list[str]:
        """The replicas of a partition, preferred leader first."""
        return self.owners(self.partition_key(queue_id, partition), count)


def _check_node(node: str) -> None:
    if not isinstance(node, str) or not node:
        raise ConfigError(f"node: a node id must be a non-empty string, got {node!r}")
    try:
        node.encode()
    except UnicodeEncodeError as exc:
        raise ConfigError(f"node: {node!r} is not encodable as UTF-8") from exc
