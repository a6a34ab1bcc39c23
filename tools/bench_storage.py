"""Storage micro-benchmark: µs per message for append, read and delete (DESIGN.md §10).

    .venv/bin/python tools/bench_storage.py [--calls 20] [--batch 1000] [--size 256]
        [--runs 5] [--fsync always] [--profile]

Each run opens a fresh partition in a temp dir, appends `calls` batches of
`batch` messages of `size` bytes (one await per batch, fsync per policy),
reads them all back from the write-through cache and again from disk (cache
off, one pread per contiguous run), deletes them in batches, and finally
waits until the SQLite index has caught up. Figures are the median of the
runs. The machine, its disk and the page cache all matter: state them with
the numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import structlog

from mqd.storage import NewMessage, PartitionStore, StorageConfig


async def one_run(args) -> dict[str, float]:
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        config = StorageConfig(fsync=args.fsync)
        store = await PartitionStore.open(Path(tmp) / "p0", config)
        body = b"x" * args.size
        batches = [[NewMessage(body, {}) for _ in range(args.batch)] for _ in range(args.calls)]
        n = args.calls * args.batch
        t0 = time.perf_counter()
        offsets = []
        for batch in batches:
            metas = await store.append_messages(batch)
            offsets.append([m.offset for m in metas])
        t1 = time.perf_counter()
        for offs in offsets:
            await store.read(offs)
        t2 = time.perf_counter()
        store._cache.clear()  # measure disk reads (page cache) too
        store._cache_bytes = 0
        for offs in offsets:
            await store.read(offs)
        t3 = time.perf_counter()
        for offs in offsets:
            await store.delete(offs)
        t4 = time.perf_counter()
        await store._index_drained()
        t5 = time.perf_counter()
        stats = store.stats()
        await store.close()
    us = 1e6 / n
    return {
        "append_us": (t1 - t0) * us,
        "read_cache_us": (t2 - t1) * us,
        "read_disk_us": (t3 - t2) * us,
        "delete_us": (t4 - t3) * us,
        "index_catch_up_ms": (t5 - t4) * 1000,
        "total_with_index_us": (t5 - t0) * us,
        "fsyncs": stats["fsyncs"],
        "commits": stats["commits"],
    }


async def main_async(args) -> None:
    results = []
    for _ in range(args.runs):
        results.append(await one_run(args))
    print(
        f"{args.runs} runs, {args.calls} calls x {args.batch} messages x {args.size} B,"
        f" fsync={args.fsync}, median:"
    )
    for key in results[0]:
        values = [r[key] for r in results]
        print(f"  {key:22s} {statistics.median(values):10.2f}   (min {min(values):.2f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--fsync", default="always")
    parser.add_argument("--dir", default=None, help="where to put the temp partitions")
    parser.add_argument("--profile", action="store_true", help="cProfile one run, print top 25")
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    if args.profile:
        args.runs = 1
        prof = cProfile.Profile()
        prof.enable()
        runner(main_async(args))
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    else:
        runner(main_async(args))


if __name__ == "__main__":
    main()
