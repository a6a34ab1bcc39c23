"""Random concurrent operations against a plain-dict model, across restarts and rolls."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

from storage_helpers import open_store

from mqd.clock import ManualClock
from mqd.storage import Lease, NewMessage, StorageConfig
from mqd.storage.index import Index


async def _tagged(batch, call):
    return batch, await call


async def test_random_operations_match_model(part: Path) -> None:
    rng = random.Random(20240501)
    clock = ManualClock()
    config = StorageConfig(segment_bytes_max=8192, read_cache_bytes_max=2048)
    model: dict[int, list] = {}  # offset -> [body, receive_count, visible_at, first_received]
    store = await open_store(part, clock=clock, config=config)
    for round_no in range(12):
        live = sorted(model)
        rng.shuffle(live)
        chosen_delete = live[: len(live) // 4]
        chosen_lease = live[len(live) // 4 : len(live) // 2]
        calls = []
        for _ in range(rng.randint(1, 8)):
            batch = [
                NewMessage(rng.randbytes(rng.randint(0, 300)), {})
                for _ in range(rng.randint(1, 20))
            ]
            calls.append(_tagged(batch, store.append_messages(batch)))
        for i in range(0, len(chosen_delete), 3):
            calls.append(store.delete(chosen_delete[i : i + 3]))
            for o in chosen_delete[i : i + 3]:
                del model[o]
        leases = []
        for o in chosen_lease:
            lease = Lease(o, model[o][1] + 1, clock.now_ms() + 1000, clock.now_ms())
            leases.append(lease)
            model[o][1:] = [lease.receive_count, lease.visible_at_ms, lease.first_received_at_ms]
        if leases:
            calls.append(store.lease(leases))
        rng.shuffle(calls)
        results = await asyncio.gather(*calls)
        for result in results:
            if isinstance(result, tuple):
                batch, metas = result
                for meta, m in zip(metas, batch, strict=True):
                    model[meta.offset] = [m.body, 0, 0, 0]
        clock.advance(10)
        got = await store.read(sorted(model))
        assert {g.offset: g.body for g in got} == {o: v[0] for o, v in model.items()}
        if round_no % 3 == 2:
            await store.close()
            if round_no % 6 == 5:
                Index.remove_files(part)
            store = await open_store(part, clock=clock, config=config)
            recovered = {
                m.offset: [m.receive_count, m.visible_at_ms, m.first_received_at_ms]
                for m in store.live_messages()
            }
            assert recovered == {o: v[1:] for o, v in model.items()}
    assert store.stats()["segments"] >= 1
    await store.close()
