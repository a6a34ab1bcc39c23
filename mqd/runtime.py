"""Process-wide runtime settings of a server process."""

from __future__ import annotations

import gc


def settle_heap() -> None:
    """Once a server has started: keep the garbage collector off the request path.

    Everything alive at this point (modules, the catalog, recovered partitions) lives as
    long as the process, yet every full collection would walk it again: measured, that was
    a 10-17 ms pause about once a second at 1,000 msgs/s, the whole p99.9 of W2
    (issue 7). `gc.freeze()` moves it out of the collector's sight (p99.9 13 ms -> 4 ms).
    """
    gc.collect()
    gc.freeze()
