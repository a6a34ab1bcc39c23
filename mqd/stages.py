"""Where a request's time went, for the slow-request log line (issue 7 §5).

Each request runs in its own task; `begin` gives that task's context a fresh
record, and the layers below add the time they waited to it with `timed`: the
log's commit group and fsync ("log"), the in-sync replicas ("replication"),
reads of message bodies ("read"), another node ("peer"), a cluster frontend's
waits between tries while a partition fails over ("failover"), a long poll's
wait for a message ("wait"). The connection adds
its own: waiting for a task to start ("queued"), authorization ("auth") and
encoding the answer ("respond"). Outside a request (a follower's fetch loop,
a timer) there is no record and `timed` only awaits.

Parts that run side by side (a receive over several partitions) add up, so
the stages of one request may sum to more than its elapsed time.
"""

from __future__ import annotations

from collections.abc import Awaitable
from contextvars import ContextVar
from time import perf_counter
from typing import Any, TypeVar

T = TypeVar("T")


class Trace:
    """One request's stages (seconds by name) and sizes (bytes of its frames)."""

    __slots__ = ("carried", "request_bytes", "response_bytes", "response_messages", "spans")

    def __init__(self, request_bytes: int = 0) -> None:
        self.spans: dict[str, float] = {}
        self.request_bytes = request_bytes
        self.response_bytes = 0
        # Messages the answer carried (RECEIVE, PEEK): their count is a RECEIVE's size.
        self.response_messages = 0
        # A node-to-node request that carries a client op (PARTITION_CALL): the op's
        # name, its decoded request and the partition, for the slow-request line.
        self.carried: tuple[str, Any, int] | None = None

    def add(self, stage: str, seconds: float) -> None:
        self.spans[stage] = self.spans.get(stage, 0.0) + seconds

    def summary_ms(self, elapsed_s: float) -> dict[str, float]:
        """The stages in ms, largest first, with what no stage claimed as "other"."""
        out = {name: round(seconds * 1000, 2) for name, seconds in self.spans.items()}
        other = elapsed_s - sum(self.spans.values())
        if other > 0:
            out["other"] = round(other * 1000, 2)
        return dict(sorted(out.items(), key=lambda item: -item[1]))


_current: ContextVar[Trace | None] = ContextVar("mqd_request_trace", default=None)


def begin(request_bytes: int = 0) -> Trace:
    """Start recording the current task's request."""
    trace = Trace(request_bytes)
    _current.set(trace)
    return trace


def carry(op: str, request: Any, partition: int) -> None:
    """Note the client op the current request carries to a partition's leader."""
    trace = _current.get()
    if trace is not None:
        trace.carried = (op, request, partition)


def respond(response_bytes: int, seconds: float, messages: int = 0) -> None:
    trace = _current.get()
    if trace is not None:
        trace.response_bytes = response_bytes
        trace.response_messages = messages
        trace.add("respond", seconds)


async def timed(stage: str, awaitable: Awaitable[T]) -> T:
    """Await `awaitable`, adding the wait to `stage` of the current request, if any."""
    trace = _current.get()
    if trace is None:
        return await awaitable
    started = perf_counter()
    try:
        return await awaitable
    finally:
        trace.add(stage, perf_counter() - started)
