"""A node's placement cache on disk (mqd.cluster.view): kept by the watch and by
every refresh at once, and never a reason for a refresh to fail."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path

from mqd.cluster.view import PlacementView
from mqd.protocol.messages import (
    GetPlacementResponse,
    NodeInfo,
    PartitionPlacement,
    QueuePlacement,
)


class Metadata:
    """Stands in for the metadata node's GET_PLACEMENT: a newer version every call."""

    def __init__(self) -> None:
        self.versions = itertools.count(1)
        self.calls = 0

    async def call(self, address, request, *, timeout_s=None):  # type: ignore[no-untyped-def]
        self.calls += 1
        await asyncio.sleep(0)
        version = next(self.versions)
        partition = PartitionPlacement(0, ["b1", "b2"], "b1", 1, ["b1", "b2"])
        queue = QueuePlacement(
            f"q{version}", version.to_bytes(8, "big"), {}, 0, version, [partition]
        )
        return GetPlacementResponse(version, [queue], [NodeInfo("b1", ["backend"])])


async def test_the_watch_and_refreshes_at_once_leave_the_newest_snapshot_in_the_cache(
    tmp_path: Path,
) -> None:
    # They shared one temporary file and renamed it from under each other: a refresh
    # raised FileNotFoundError (out of a leader's in-sync maintenance, which it ended).
    cache = tmp_path / "placement.json"
    metadata = Metadata()
    view = PlacementView(metadata, ["m1"], cache_file=cache)  # type: ignore[arg-type]
    view.start()
    try:
        results = await asyncio.gather(
            *(view.refresh() for _ in range(200)), return_exceptions=True
        )
        assert [r for r in results if r is not None] == []
        assert metadata.calls > 200  # the watch ran alongside
    finally:
        await view.close()
    reloaded = PlacementView(Metadata(), ["m1"], cache_file=cache)  # type: ignore[arg-type]
    assert reloaded.load_cache()
    assert reloaded.version >= 200 and list(reloaded.by_name) == [f"q{reloaded.version}"]


async def test_a_refresh_succeeds_when_the_cache_cannot_be_written(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    view = PlacementView(Metadata(), ["m1"], cache_file=blocker / "placement.json")  # type: ignore[arg-type]
    await view.refresh()
    await view.refresh()
    assert view.version == 2 and list(view.by_name) == ["q2"]
    await view.close()
