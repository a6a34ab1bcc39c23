#!/usr/bin/env python3
"""Chaos run of an mqd cluster: faults under load, then a checker over the history.

    python tools/chaos.py --duration 60 --seed 7
    python tools/chaos.py --duration 600 --seed 3 --faults kill,partition --rf 3 --json

What it does (DESIGN.md §6, §9):

1. Starts a local cluster with the launcher (`mqd.launcher`; by default 1
   metadata, 3 backends, 2 frontends) with a TCP proxy (`tcp_proxy.py`, 127.0.0.1
   only) in front of every node-to-node link it can cut: one per backend
   (`*->backend-N`: the backend's `[cluster] advertise` address, which every
   other node dials) and one per node and metadata node (`frontend-1->metadata-1`:
   that node's `[cluster] metadata` address).
2. Creates a standard queue (`chaos-std`) and a FIFO queue (`chaos-fifo.fifo`),
   each with one partition per backend, and `replication_factor = --rf` (and
   `min_insync = --min-insync`) if the server knows those attributes (else it
   warns and goes on without them).
3. Runs `--producers` and `--consumers` (each with its own client, spread over
   the frontends). Every message body is a unique id `p{producer}-{seq}`; FIFO
   messages go to groups `p{producer}-g{k}`, with a sequence number per group.
   Consumers receive (long poll, short visibility timeout), ack most messages
   and leave a few (`--skip-ack-pct`) to come back. The history records, one JSON
   line each (`--history`): send_invoke / send_ok / send_fail, recv (one per
   delivered message, with the server's message id, receipt, receive count and
   `t0`, when its receive call started), ack_invoke / ack_ok / ack_fail, and the
   faults. `t` is seconds since the run started (monotonic).
4. Injects faults from `--faults` on a schedule drawn from `--seed`
   (`build_schedule`; one fault at a time, each healed after a few seconds):
   `kill` (SIGKILL a backend: the leader of a random partition, a follower, or
   any; restarted at heal), `pause` (SIGSTOP any node; SIGCONT at heal),
   `partition` (a proxy link set to drop, delay or blackhole; pass at heal),
   `frontend` (SIGKILL a frontend; restarted at heal), `reboot` (a backend's
   machine restart: SIGKILL, then each log it follows loses a random tail, as
   unsynced page cache would, and its boot note is another boot's; restarted
   at heal: `lose_unsynced_tails`). Only pids the launcher
   recorded are signalled, after its /proc check.
5. Stops the load, heals everything (proxies to pass, SIGCONT every node, restart
   every node that is down, wait until every frontend sees every backend up),
   drains every queue (receive and ack until its stats show it empty), checks,
   prints a summary (`--json`: the summary as JSON), stops the cluster. Exit
   status: 0 if every check passed, 1 if one failed, 2 if the run itself failed.

The checks (`check_history`, over the events of the history):

- lost: a message whose send was acknowledged (send_ok) and whose id is never
  received (no recv), drain included. Must be 0.
- redelivered_after_ack: a delivery of message M (server id) by a receive call
  that started (`t0`) after an ack of M returned success (ack_ok). Must be 0.
  A delivery concurrent with the ack is not counted (the order is unknown).
- unknown: a received body that no producer ever tried to send. Must be 0.
- fifo_violations: for each FIFO queue and group, take the first deliveries of
  each id in history order (the order receive calls returned, and the order of
  messages within one receive); keeping only acknowledged sends, their per-group
  send sequence numbers must be strictly increasing. Failed sends (maybe stored,
  maybe not, maybe late) and redeliveries are left out. Each delivery whose
  sequence number is below one delivered before it counts one violation. Must be 0.
- duplicates: deliveries of an id after its first delivery, counted and reported,
  not a failure (delivery is at-least-once). Broken down into after a failed
  ack, never acked (left on purpose, or the consumer gave up), copies (the same
  id stored under two server ids) and other.
- uncertain: a send whose call raised (send_fail) may or may not have stored the
  message: delivered or not, it is neither lost nor a duplicate; reported as
  uncertain_sends_delivered / uncertain_sends_missing. An ack whose call raised
  or whose receipt was refused (ack_fail) may or may not have deleted it: a
  later delivery is not a violation (uncertain_acks counts them).
- availability_pct: of the (queue, second) slots in which sends were attempted,
  the percentage in which at least one send succeeded; send_success_pct is the
  percentage of send attempts acknowledged.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import random
import shutil
import signal
import ssl
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tcp_proxy import TcpProxy

FAULT_KINDS = ("kill", "pause", "partition", "frontend", "reboot")
KILL_TARGETS = ("leader", "follower", "random")
PARTITION_MODES = ("drop", "delay", "blackhole")

STD_QUEUE = "chaos-std"
FIFO_QUEUE = "chaos-fifo.fifo"
FIFO_GROUPS = 3
BATCH_MAX = 5
RECEIVE_MAX = 10
RECEIVE_WAIT_S = 1.0
DRAIN_VISIBILITY_S = 10
CONNECT_TIMEOUT_S = 3.0
REQUEST_TIMEOUT_S = 5.0
# Outer bound of any one client call (the client's own timeouts come first).
CALL_TIMEOUT_S = 15.0
FAILURES_BEFORE_RECONNECT = 2
RETRY_PAUSE_S = 0.2
START_TIMEOUT_S = 90.0
RESTART_TIMEOUT_S = 60.0
HEAL_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 20.0
PROBE_TIMEOUT_S = 3.0
EXAMPLES_MAX = 5

# The schedule: the first fault after WARMUP_S, none starting so late that it
# would not be healed COOLDOWN_S before the end; durations and gaps in these ranges.
WARMUP_S = 3.0
COOLDOWN_S = 2.0
FAULT_DURATION_S = (2.0, 9.0)
FAULT_GAP_S = (1.0, 4.0)
DELAY_S = (0.05, 1.0)


# ---------------------------------------------------------------------------
# The history


class History:
    """The events of a run, in memory and as JSON lines in `path` (if given)."""

    def __init__(self, path: Path | None = None) -> None:
        self.events: list[dict[str, Any]] = []
        self._t0 = time.monotonic()
        self._file = open(path, "w", encoding="utf-8") if path is not None else None

    def now(self) -> float:
        return round(time.monotonic() - self._t0, 6)

    def record(self, ev: str, **fields: Any) -> dict[str, Any]:
        event = {"t": self.now(), "ev": ev, **fields}
        self.events.append(event)
        if self._file is not None:
            self._file.write(json.dumps(event, separators=(",", ":")) + "\n")
        return event

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def read_history(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


# ---------------------------------------------------------------------------
# The checker


def _examples(items: Iterable[Any]) -> list[Any]:
    out = []
    for item in items:
        if len(out) >= EXAMPLES_MAX:
            break
        out.append(item)
    return out


def check_history(events: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Check a history (see the module docstring for each check); returns the report.

    `report["ok"]` is False and `report["failures"]` names the checks when lost,
    redelivered_after_ack, unknown or fifo_violations is not 0.
    """
    invoked: dict[str, dict[str, Any]] = {}
    sent_ok: dict[str, str] = {}  # uid -> server message id
    send_failed: set[str] = set()
    ack_ok_at: dict[str, float] = {}  # message id -> earliest ack_ok time
    acked_receipts: set[str] = set()
    failed_receipts: set[str] = set()
    recvs: list[dict[str, Any]] = []
    counts = defaultdict(int)
    slots: dict[tuple[str, int], bool] = {}
    send_outcome: dict[str, bool] = {}
    for event in events:
        ev = event.get("ev")
        counts[ev] += 1
        if ev == "send_invoke":
            invoked[event["uid"]] = event
        elif ev == "send_ok":
            sent_ok[event["uid"]] = event["mid"]
            send_outcome[event["uid"]] = True
        elif ev == "send_fail":
            send_failed.add(event["uid"])
            send_outcome.setdefault(event["uid"], False)
        elif ev == "recv":
            recvs.append(event)
        elif ev == "ack_ok":
            mid = event["mid"]
            ack_ok_at[mid] = min(ack_ok_at.get(mid, event["t"]), event["t"])
            acked_receipts.add(event["receipt"])
        elif ev == "ack_fail":
            failed_receipts.add(event["receipt"])

    # Availability: (queue, whole second of the attempt) slots with a success.
    for uid, event in invoked.items():
        if uid not in send_outcome:
            continue  # still in flight when the history ended
        key = (event["queue"], int(event["t"]))
        slots[key] = slots.get(key, False) or send_outcome[uid]
    attempts = len(send_outcome)
    availability = 100.0 * sum(slots.values()) / len(slots) if slots else 100.0
    success = 100.0 * sum(send_outcome.values()) / attempts if attempts else 100.0

    deliveries: dict[str, list[dict[str, Any]]] = defaultdict(list)
    unknown: list[str] = []
    redelivered: list[dict[str, Any]] = []
    dup = defaultdict(int)
    for event in recvs:
        uid = event["uid"]
        if uid not in invoked:
            unknown.append(uid)
        mid = event["mid"]
        acked_at = ack_ok_at.get(mid)
        if acked_at is not None and event["t0"] > acked_at:
            redelivered.append(
                {"uid": uid, "mid": mid, "acked_at": acked_at, "received_at": event["t"]}
            )
        previous = deliveries[uid]
        if previous:
            if any(p["mid"] != mid for p in previous):
                dup["copies"] += 1
            else:
                last = previous[-1]["receipt"]
                if last in failed_receipts:
                    dup["after_failed_ack"] += 1
                elif last not in acked_receipts:
                    dup["never_acked"] += 1
                else:
                    dup["other"] += 1
        previous.append(event)

    lost = sorted(uid for uid in sent_ok if uid not in deliveries)
    uncertain_delivered = sum(1 for uid in send_failed if uid in deliveries and uid not in sent_ok)
    uncertain_missing = sum(
        1 for uid in send_failed if uid not in deliveries and uid not in sent_ok
    )

    # FIFO: first deliveries per (queue, group), acknowledged sends only.
    fifo_violations: list[dict[str, Any]] = []
    seen: set[str] = set()
    highest: dict[tuple[str, str], tuple[int, str]] = {}
    for event in recvs:
        uid = event["uid"]
        if uid in seen:
            continue
        seen.add(uid)
        sent = invoked.get(uid)
        if sent is None or uid not in sent_ok or not sent.get("group"):
            continue
        if not str(sent["queue"]).endswith(".fifo"):
            continue
        key = (sent["queue"], sent["group"])
        seq = sent["seq"]
        top = highest.get(key)
        if top is not None and seq < top[0]:
            fifo_violations.append(
                {"queue": key[0], "group": key[1], "uid": uid, "after": top[1], "t": event["t"]}
            )
        elif top is None or seq > top[0]:
            highest[key] = (seq, uid)

    duplicates = sum(dup.values())
    report: dict[str, Any] = {
        "sends_invoked": len(invoked),
        "sends_acknowledged": len(sent_ok),
        "sends_failed": len(send_failed - set(sent_ok)),
        "deliveries": len(recvs),
        "distinct_received": len(deliveries),
        "acks_acknowledged": counts["ack_ok"],
        "acks_failed": counts["ack_fail"],
        "lost": len(lost),
        "lost_examples": _examples(lost),
        "redelivered_after_ack": len(redelivered),
        "redelivered_examples": _examples(redelivered),
        "unknown": len(unknown),
        "unknown_examples": _examples(unknown),
        "fifo_violations": len(fifo_violations),
        "fifo_examples": _examples(fifo_violations),
        "duplicates": duplicates,
        "duplicates_after_failed_ack": dup["after_failed_ack"],
        "duplicates_never_acked": dup["never_acked"],
        "duplicates_copies": dup["copies"],
        "duplicates_other": dup["other"],
        "uncertain_sends_delivered": uncertain_delivered,
        "uncertain_sends_missing": uncertain_missing,
        "uncertain_acks": counts["ack_fail"],
        "availability_pct": round(availability, 2),
        "send_success_pct": round(success, 2),
    }
    failures = [
        name
        for name in ("lost", "redelivered_after_ack", "unknown", "fifo_violations")
        if report[name]
    ]
    report["failures"] = failures
    report["ok"] = not failures
    return report


# ---------------------------------------------------------------------------
# The fault schedule


@dataclass(frozen=True, slots=True)
class Fault:
    """One planned fault: from `at_s` (seconds after the load starts) for `duration_s`.

    `target`: kill: leader | follower | random (resolved at run time, `pick`
    choosing among the candidates); pause and frontend: a node id; partition:
    a link name. `mode` and `delay_s`: a partition's proxy mode.
    """

    at_s: float
    duration_s: float
    kind: str
    target: str
    mode: str = ""
    delay_s: float = 0.0
    pick: float = 0.0


def link_names(
    metadata: Sequence[str], backends: Sequence[str], frontends: Sequence[str]
) -> list[str]:
    """The cuttable links: into each backend, and from each other node to each metadata node."""
    links = [f"*->{backend}" for backend in backends]
    links += [f"{node}->{meta}" for node in (*backends, *frontends) for meta in metadata]
    return links


def build_schedule(
    seed: int,
    duration_s: float,
    kinds: Sequence[str],
    *,
    metadata: Sequence[str],
    backends: Sequence[str],
    frontends: Sequence[str],
) -> list[Fault]:
    """The faults of a run, one at a time, drawn from `seed` alone (same seed, same plan)."""
    rng = random.Random(seed)
    links = link_names(metadata, backends, frontends)
    usable = [
        kind
        for kind in kinds
        if (kind in ("kill", "reboot") and backends)
        or (kind == "frontend" and frontends)
        or (kind == "partition" and links)
        or kind == "pause"
    ]
    faults: list[Fault] = []
    at = WARMUP_S
    end = duration_s - COOLDOWN_S
    while usable and len(faults) < 10_000:
        length = round(rng.uniform(*FAULT_DURATION_S), 3)
        if at + length > end:
            break
        kind = rng.choice(usable)
        if kind == "kill":
            fault = Fault(at, length, kind, rng.choice(KILL_TARGETS), pick=round(rng.random(), 6))
        elif kind == "pause":
            fault = Fault(at, length, kind, rng.choice([*metadata, *backends, *frontends]))
        elif kind == "frontend":
            fault = Fault(at, length, kind, rng.choice(list(frontends)))
        elif kind == "reboot":
            fault = Fault(at, length, kind, rng.choice(list(backends)), pick=round(rng.random(), 6))
        else:
            mode = rng.choice(PARTITION_MODES)
            delay = round(rng.uniform(*DELAY_S), 3) if mode == "delay" else 0.0
            fault = Fault(at, length, kind, rng.choice(links), mode=mode, delay_s=delay)
        faults.append(fault)
        at = round(at + length + rng.uniform(*FAULT_GAP_S), 3)
    return faults


# ---------------------------------------------------------------------------
# The cluster, with proxies on its links


def _toml_list(values: Iterable[str]) -> str:
    return "[" + ", ".join(json.dumps(value) for value in values) + "]"


def patch_config(
    text: str, *, advertise: str | None = None, metadata: list[str] | None = None
) -> str:
    """Set `[cluster] advertise` and/or replace `[cluster] metadata` in a launcher config."""
    out: list[str] = []
    section = ""
    done = {"advertise": advertise is None, "metadata": metadata is None}
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("["):
            section = stripped
        elif section == "[cluster]":
            if metadata is not None and stripped.startswith("metadata ="):
                line = f"metadata = {_toml_list(metadata)}"
                done["metadata"] = True
            elif stripped.startswith("advertise ="):
                continue  # replaced below
            elif advertise is not None and stripped.startswith("listen ="):
                out.append(line)
                line = f"advertise = {json.dumps(advertise)}"
                done["advertise"] = True
        out.append(line)
    missing = [key for key, ok in done.items() if not ok]
    if missing:
        raise ValueError(f"config has no [cluster] line to patch for: {', '.join(missing)}")
    return "\n".join(out) + "\n"


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


async def make_proxies(manifest: Any, fsync: str = "always") -> dict[str, TcpProxy]:
    """Start one proxy per link and point the nodes' configs at them (before the nodes start)."""
    from mqd import launcher

    proxies: dict[str, TcpProxy] = {}
    metadata_nodes = manifest.by_role("metadata")
    advertise: dict[str, str] = {}
    meta_lists: dict[str, list[str]] = {}
    for backend in manifest.by_role("backend"):
        name = f"*->{backend.id}"
        proxy = TcpProxy(*_split(backend.cluster_address), name=name)
        await proxy.start()
        proxies[name] = proxy
        advertise[backend.id] = proxy.address
    for node in [*manifest.by_role("backend"), *manifest.by_role("frontend")]:
        meta_lists[node.id] = []
        for meta in metadata_nodes:
            name = f"{node.id}->{meta.id}"
            proxy = TcpProxy(*_split(meta.cluster_address), name=name)
            await proxy.start()
            proxies[name] = proxy
            meta_lists[node.id].append(proxy.address)
    for node in manifest.nodes:
        if node.role == "metadata":
            continue
        text = patch_config(
            launcher.render_config(manifest, node, fsync),
            advertise=advertise.get(node.id),
            metadata=meta_lists[node.id],
        )
        manifest.path(node.config).write_text(text, encoding="utf-8")
    return proxies


# ---------------------------------------------------------------------------
# The run


@dataclass(slots=True)
class Options:
    duration_s: float = 60.0
    seed: int = 1
    faults: tuple[str, ...] = FAULT_KINDS
    rf: int | None = None
    min_insync: int | None = None
    producers: int = 4
    consumers: int = 4
    metadata: int = 1
    backends: int = 3
    frontends: int = 2
    partitions: int | None = None
    interval_s: float = 0.05
    visibility_s: int = 5
    skip_ack_pct: float = 2.0
    drain_timeout_s: float = 60.0
    fsync: str = "always"


@dataclass(slots=True)
class Run:
    options: Options
    manifest: Any
    history: History
    tls: ssl.SSLContext
    proxies: dict[str, TcpProxy] = field(default_factory=dict)
    queues: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    attributes: dict[str, Any] = field(default_factory=dict)

    @property
    def addresses(self) -> list[str]:
        return [node.client_address for node in self.manifest.by_role("frontend")]

    def note(self, text: str) -> None:
        self.notes.append(text)
        print(f"chaos: {text}", file=sys.stderr, flush=True)


CALL_ERRORS: tuple[type[BaseException], ...] = (OSError, TimeoutError)


def _call_errors() -> tuple[type[BaseException], ...]:
    from mqd.errors import MqdError

    return (MqdError, *CALL_ERRORS)


def _describe(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"[:200]


class Link:
    """A worker's client: connects on demand, reconnects (to the next frontend) after failures."""

    def __init__(self, run: Run, index: int, name: str) -> None:
        self.run = run
        self.index = index
        self.name = name
        self.client: Any = None
        self.failures = 0

    async def get(self) -> Any:
        if self.client is None:
            import mqd.client

            addresses = self.run.addresses
            start = self.index % len(addresses)
            rotated = addresses[start:] + addresses[:start]
            self.client = await asyncio.wait_for(
                mqd.client.connect(
                    rotated,
                    tls=self.run.tls,
                    client_name=self.name,
                    connect_timeout=CONNECT_TIMEOUT_S,
                    request_timeout=REQUEST_TIMEOUT_S,
                ),
                CALL_TIMEOUT_S,
            )
        return self.client

    def ok(self) -> None:
        self.failures = 0

    async def failed(self) -> None:
        self.failures += 1
        if self.failures >= FAILURES_BEFORE_RECONNECT:
            self.failures = 0
            self.index += 1
            await self.close()

    async def close(self) -> None:
        client, self.client = self.client, None
        if client is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.close(), CALL_TIMEOUT_S)


async def _pause(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


async def producer(run: Run, index: int, queue: str, stop: asyncio.Event) -> None:
    history = run.history
    rng = random.Random(f"{run.options.seed}-producer-{index}")
    link = Link(run, index, f"chaos-producer-{index}")
    fifo = queue.endswith(".fifo")
    seq = 0
    group_seq: dict[str, int] = defaultdict(int)
    errors = _call_errors()
    try:
        while not stop.is_set():
            entries: list[dict[str, Any]] = []
            uids: list[str] = []
            for _ in range(rng.randint(1, BATCH_MAX)):
                seq += 1
                uid = f"p{index}-{seq}"
                uids.append(uid)
                if fifo:
                    group = f"p{index}-g{rng.randrange(FIFO_GROUPS)}"
                    group_seq[group] += 1
                    entries.append({"body": uid.encode(), "group_id": group, "dedup_id": uid})
                    history.record(
                        "send_invoke", uid=uid, queue=queue, group=group, seq=group_seq[group]
                    )
                else:
                    entries.append({"body": uid.encode()})
                    history.record("send_invoke", uid=uid, queue=queue, group="", seq=seq)
            try:
                client = await link.get()
                ids = await asyncio.wait_for(
                    client.queue(queue).send_batch(entries), CALL_TIMEOUT_S
                )
            except errors as exc:
                reason = _describe(exc)
                for uid in uids:
                    history.record("send_fail", uid=uid, queue=queue, error=reason)
                await link.failed()
                await _pause(stop, RETRY_PAUSE_S)
                continue
            link.ok()
            for uid, mid in zip(uids, ids, strict=True):
                history.record("send_ok", uid=uid, queue=queue, mid=mid)
            await _pause(stop, run.options.interval_s)
    finally:
        await link.close()


async def ack_messages(run: Run, link: Link, queue: str, messages: list[Any], who: str) -> None:
    """Ack `messages` in one call; records ack_invoke and, per message, ack_ok or ack_fail."""
    if not messages:
        return
    from mqd.errors import ServerError

    history = run.history
    for m in messages:
        history.record(
            "ack_invoke", uid=m.uid, queue=queue, mid=m.id, receipt=m.receipt, consumer=who
        )
    failed: dict[int, str] = {}
    try:
        client = await link.get()
        await asyncio.wait_for(
            client.queue(queue).ack(*[m.receipt for m in messages]), CALL_TIMEOUT_S
        )
        link.ok()
    except ServerError as exc:
        entries = exc.details.get("failures") if isinstance(exc.details, dict) else None
        if isinstance(entries, list) and entries:
            for entry in entries:
                failed[int(entry["index"])] = f"{entry.get('code')}: {entry.get('message')}"[:200]
        else:
            failed = {i: _describe(exc) for i in range(len(messages))}
            await link.failed()
    except _call_errors() as exc:
        failed = {i: _describe(exc) for i in range(len(messages))}
        await link.failed()
    for i, m in enumerate(messages):
        if i in failed:
            history.record(
                "ack_fail", uid=m.uid, queue=queue, mid=m.id, receipt=m.receipt, error=failed[i]
            )
        else:
            history.record("ack_ok", uid=m.uid, queue=queue, mid=m.id, receipt=m.receipt)


class _Got:
    """What the history needs of a delivered message."""

    __slots__ = ("id", "receipt", "uid")

    def __init__(self, uid: str, mid: str, receipt: str) -> None:
        self.uid = uid
        self.id = mid
        self.receipt = receipt


async def receive_once(
    run: Run, link: Link, queue: str, who: str, visibility_s: float
) -> list[_Got] | None:
    """One receive call, each message recorded; None if the call failed."""
    t0 = run.history.now()
    try:
        client = await link.get()
        messages = await asyncio.wait_for(
            client.queue(queue).receive(
                max_messages=RECEIVE_MAX, wait=RECEIVE_WAIT_S, visibility_timeout=visibility_s
            ),
            CALL_TIMEOUT_S,
        )
    except _call_errors() as exc:
        run.history.record("recv_fail", queue=queue, consumer=who, error=_describe(exc), t0=t0)
        await link.failed()
        return None
    link.ok()
    got = []
    for m in messages:
        uid = m.body.decode("utf-8", errors="replace")
        run.history.record(
            "recv",
            uid=uid,
            queue=queue,
            mid=m.id,
            receipt=m.receipt,
            receive_count=m.receive_count,
            group=m.group_id,
            consumer=who,
            t0=t0,
        )
        got.append(_Got(uid, m.id, m.receipt))
    return got


async def consumer(run: Run, index: int, queue: str, stop: asyncio.Event) -> None:
    rng = random.Random(f"{run.options.seed}-consumer-{index}")
    link = Link(run, index, f"chaos-consumer-{index}")
    who = f"c{index}"
    try:
        while not stop.is_set():
            got = await receive_once(run, link, queue, who, run.options.visibility_s)
            if got is None:
                await _pause(stop, RETRY_PAUSE_S)
                continue
            keep = [m for m in got if rng.random() * 100 >= run.options.skip_ack_pct]
            await ack_messages(run, link, queue, keep, who)
    finally:
        await link.close()


def _queue_backlog(stats: dict[str, Any]) -> int:
    return sum(int(stats.get(key, 0) or 0) for key in ("visible", "in_flight", "delayed"))


async def drain(run: Run) -> dict[str, bool]:
    """Receive and ack every queue until its stats show it empty; {queue: drained}."""
    deadline = time.monotonic() + run.options.drain_timeout_s
    link = Link(run, 0, "chaos-drain")
    done: dict[str, bool] = {}
    try:
        for queue in run.queues:
            done[queue] = False
            while time.monotonic() < deadline:
                got = await receive_once(run, link, queue, "drain", DRAIN_VISIBILITY_S)
                if got:
                    await ack_messages(run, link, queue, got, "drain")
                    continue
                if got is None:
                    await asyncio.sleep(RETRY_PAUSE_S)
                    continue
                try:
                    client = await link.get()
                    info = await asyncio.wait_for(client.get_queue(queue), CALL_TIMEOUT_S)
                except _call_errors():
                    await link.failed()
                    await asyncio.sleep(RETRY_PAUSE_S)
                    continue
                if _queue_backlog(info.get("stats") or {}) == 0:
                    done[queue] = True
                    break
                # In flight: it comes back when its visibility timeout runs out.
                await asyncio.sleep(0.5)
    finally:
        await link.close()
    return done


# --- faults -----------------------------------------------------------------


def _node_signal(run: Run, node_id: str, signum: int) -> int | None:
    """Send `signum` to a node's recorded pid, if the launcher still sees it as that node."""
    from mqd import launcher

    node = run.manifest.node(node_id)
    pid = launcher.running_pid(run.manifest, node)
    if pid is None:
        return None
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)
    return pid


async def _placement(run: Run) -> dict[str, Any]:
    """The cluster's placement as a frontend sees it ({} if no frontend answers)."""
    from mqd import launcher

    for address in run.addresses:
        try:
            view = await asyncio.wait_for(
                launcher.frontend_cluster_view(address, run.manifest.client_ca, PROBE_TIMEOUT_S),
                PROBE_TIMEOUT_S * 2,
            )
        except Exception:  # any failure: try the next frontend; callers fall back
            continue
        placement = view.get("placement")
        if isinstance(placement, dict):
            return placement
    return {}


async def kill_candidates(run: Run, target: str) -> list[str]:
    """Backends to choose a kill from: leaders, followers (of our queues) or all."""
    backends = sorted(node.id for node in run.manifest.by_role("backend"))
    if target == "random":
        return backends
    placement = await _placement(run)
    chosen: set[str] = set()
    for queue in run.queues:
        for part in placement.get(queue, []):
            leader = part.get("leader")
            replicas = part.get("replicas") or []
            if target == "leader" and leader:
                chosen.add(leader)
            elif target == "follower":
                chosen.update(r for r in replicas if r != leader)
    return sorted(chosen & set(backends)) or backends


async def restart(run: Run, node_id: str) -> bool:
    from mqd import launcher

    node = run.manifest.node(node_id)
    try:
        await asyncio.to_thread(launcher.restart_node, run.manifest, node, RESTART_TIMEOUT_S)
    except launcher.LauncherError as exc:
        run.note(f"{node_id}: restart failed: {str(exc).splitlines()[0]}")
        return False
    return True


# What a restart of a backend's machine may take with its page cache: the tail of each
# log it follows, written but not yet synced (a follower acknowledges on write and syncs
# about once a second). Up to this much of each, at random; more than a second holds at
# the rates of a chaos run, so the fault is harsher than the power loss it stands for.
REBOOT_LOST_BYTES_MAX = 256 * 1024


def lose_unsynced_tails(data_dir: Path, node_id: str, pick: float) -> dict[str, int]:
    """A machine restart, after the node was killed: the logs it followed (by its own
    cached placement) lose a random tail, and its boot note is left as another boot's
    (protocol.md §7.13 "A restarted machine"). Logs it led keep everything: a leader
    syncs what it commits. Bytes cut per partition directory."""
    from mqd.storage.records import HEADER_BYTES

    rng = random.Random(pick)
    followed: set[str] = set()
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        cache = json.loads((data_dir / "placement.json").read_text())
        for queue in cache["queues"]:
            queue_hex = base64.b64decode(queue["queue_id"]).hex()
            for part in queue["partitions"]:
                if node_id in part["replicas"] and part["leader"] != node_id:
                    followed.add(f"{queue_hex}-{part['index']:04d}")
    cut: dict[str, int] = {}
    for name in sorted(followed):
        segments = sorted((data_dir / "partitions" / name).glob("*.log"))
        if not segments:
            continue
        data = segments[-1].read_bytes()
        end = len(data.rstrip(b"\0"))  # past it: preallocated zeros
        keep = max(HEADER_BYTES, end - rng.randint(0, REBOOT_LOST_BYTES_MAX))
        if keep < end:
            os.truncate(segments[-1], keep)
            cut[name] = end - keep
    note = data_dir / "boot.json"
    with contextlib.suppress(OSError, ValueError):
        state = json.loads(note.read_text())
        note.write_text(json.dumps(state | {"boot_id": f"before-chaos-reboot-{pick}"}))
    return cut


async def run_fault(run: Run, fault: Fault) -> None:
    """Apply one fault, hold it for its duration, heal it; each step in the history."""
    history = run.history
    target = fault.target
    if fault.kind == "kill":
        candidates = await kill_candidates(run, fault.target)
        target = candidates[min(int(fault.pick * len(candidates)), len(candidates) - 1)]
    info = {"kind": fault.kind, "target": target, "plan": asdict(fault)}
    if fault.kind in ("kill", "frontend"):
        pid = _node_signal(run, target, signal.SIGKILL)
        history.record("fault", **info, pid=pid)
        await asyncio.sleep(fault.duration_s)
        await restart(run, target)
    elif fault.kind == "reboot":
        pid = _node_signal(run, target, signal.SIGKILL)
        await asyncio.sleep(0.2)  # the kernel has closed its files
        data_dir = run.manifest.path(run.manifest.node(target).data_dir)
        cut = await asyncio.to_thread(lose_unsynced_tails, data_dir, target, fault.pick)
        history.record("fault", **info, pid=pid, bytes_lost=cut)
        await asyncio.sleep(fault.duration_s)
        await restart(run, target)
    elif fault.kind == "pause":
        pid = _node_signal(run, target, signal.SIGSTOP)
        history.record("fault", **info, pid=pid)
        try:
            await asyncio.sleep(fault.duration_s)
        finally:
            _node_signal(run, target, signal.SIGCONT)
    elif fault.kind == "partition":
        proxy = run.proxies[target]
        proxy.set_mode(fault.mode, fault.delay_s)
        history.record("fault", **info)
        try:
            await asyncio.sleep(fault.duration_s)
        finally:
            proxy.set_mode("pass")
    else:
        raise ValueError(f"unknown fault kind {fault.kind!r}")
    history.record("heal", kind=fault.kind, target=target)


async def inject(run: Run, schedule: Sequence[Fault], started: float, end: float) -> None:
    """Run the schedule, one fault at a time; no fault starts after `end` (monotonic)."""
    for fault in schedule:
        at = started + fault.at_s
        if max(at, time.monotonic()) + fault.duration_s > end:
            break
        await asyncio.sleep(max(0.0, at - time.monotonic()))
        await run_fault(run, fault)


async def heal_all(run: Run) -> list[str]:
    """Every proxy to pass, SIGCONT every node, restart every node that is down; wait healthy.

    Returns what is still not healthy at the deadline (empty: healthy).
    """
    from mqd import launcher

    for proxy in run.proxies.values():
        proxy.set_mode("pass")
    manifest = run.manifest
    for node in manifest.nodes:
        _node_signal(run, node.id, signal.SIGCONT)
    for node in manifest.in_order(launcher.ROLES_START_ORDER):
        if launcher.running_pid(manifest, node) is None:
            run.note(f"{node.id} is down at heal time: restarting it")
            await restart(run, node.id)
    backend_ids = [node.id for node in manifest.by_role("backend")]
    deadline = time.monotonic() + HEAL_TIMEOUT_S
    problems: list[str] = ["not checked"]
    while time.monotonic() < deadline:
        problems = []
        for node in manifest.by_role("frontend"):
            try:
                view = await launcher.frontend_cluster_view(
                    node.client_address, manifest.client_ca, PROBE_TIMEOUT_S
                )
            except Exception as exc:  # not healthy yet; the deadline bounds the wait
                problems.append(f"{node.id}: {_describe(exc)}")
                continue
            missing = launcher.backends_not_up(view, backend_ids)
            if missing:
                problems.append(f"{node.id} sees down: {', '.join(missing)}")
        if not problems:
            return []
        await asyncio.sleep(0.5)
    return problems


async def create_queues(run: Run) -> None:
    """Create the queues; replication attributes only if the server knows them."""
    from mqd.errors import InvalidArgument

    options = run.options
    partitions = options.partitions or options.backends
    extra: dict[str, Any] = {}
    if options.rf is not None:
        extra["replication_factor"] = options.rf
    if options.min_insync is not None:
        extra["min_insync"] = options.min_insync
    link = Link(run, 0, "chaos-admin")
    try:
        client = await link.get()
        for name in (STD_QUEUE, FIFO_QUEUE):
            attributes = {"visibility_timeout": options.visibility_s, "partitions": partitions}
            try:
                await client.create_queue(name, **attributes, **extra)
            except InvalidArgument as exc:
                if not extra or not any(key in str(exc) for key in extra):
                    raise
                run.note(
                    f"the server refuses {', '.join(extra)} ({exc}); "
                    "going on without them (no replication)"
                )
                extra = {}
                await client.create_queue(name, **attributes)
            info = await client.get_queue(name)
            run.attributes[name] = info.get("attributes", {})
            run.queues.append(name)
    finally:
        await link.close()


async def run_load(run: Run, schedule: Sequence[Fault]) -> dict[str, Any]:
    options = run.options
    history = run.history
    stop = asyncio.Event()
    history.record("phase", name="load", duration_s=options.duration_s)
    started = time.monotonic()
    end = started + options.duration_s
    workers = [
        asyncio.create_task(producer(run, i, run.queues[i % len(run.queues)], stop))
        for i in range(options.producers)
    ]
    workers += [
        asyncio.create_task(consumer(run, i, run.queues[i % len(run.queues)], stop))
        for i in range(options.consumers)
    ]
    injector = asyncio.create_task(inject(run, schedule, started, end))
    try:
        await asyncio.sleep(max(0.0, end - time.monotonic()))
        # The injector starts no fault that would not be healed by `end`; a slow
        # restart may run over, so wait for it (bounded by the restart timeout).
        try:
            await asyncio.wait_for(asyncio.shield(injector), RESTART_TIMEOUT_S + 10)
        except TimeoutError:
            run.note("the last fault did not heal in time; healing everything now")
    finally:
        stop.set()
        done, pending = await asyncio.wait(workers, timeout=CALL_TIMEOUT_S * 2)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=5)
        if not injector.done():
            injector.cancel()
            await asyncio.wait([injector], timeout=RESTART_TIMEOUT_S)
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
    history.record("phase", name="heal")
    problems = await heal_all(run)
    if problems:
        run.note("not healthy after healing: " + "; ".join(problems))
    history.record("phase", name="drain")
    drained = await drain(run)
    history.record("phase", name="check")
    return {"healthy": not problems, "drained": drained}


async def run_async(options: Options, directory: Path, history: History) -> dict[str, Any]:
    from mqd import launcher

    manifest = launcher.create_cluster(
        directory,
        metadata=options.metadata,
        backends=options.backends,
        frontends=options.frontends,
        fsync=options.fsync,
    )
    run = Run(options, manifest, history, launcher.client_ssl_context(manifest.client_ca))
    schedule = build_schedule(
        options.seed,
        options.duration_s,
        options.faults,
        metadata=[n.id for n in manifest.by_role("metadata")],
        backends=[n.id for n in manifest.by_role("backend")],
        frontends=[n.id for n in manifest.by_role("frontend")],
    )
    history.record("schedule", faults=[asdict(f) for f in schedule])
    try:
        run.proxies = await make_proxies(manifest, options.fsync)
        await asyncio.to_thread(launcher.start_cluster, manifest, START_TIMEOUT_S)
        await create_queues(run)
        outcome = await run_load(run, schedule)
    finally:
        for node in manifest.nodes:
            _node_signal(run, node.id, signal.SIGCONT)
        lines = await asyncio.to_thread(
            launcher.stop_nodes,
            manifest,
            manifest.in_order(launcher.ROLES_STOP_ORDER),
            STOP_TIMEOUT_S,
        )
        for line in lines:
            if "stopped" not in line and "not running" not in line:
                run.note(line)
        for proxy in run.proxies.values():
            await proxy.close()
    report = check_history(history.events)
    drained = outcome["drained"]
    report["drained"] = all(drained.values())
    report["healthy_after_heal"] = outcome["healthy"]
    if not report["drained"]:
        report["failures"].append("drain")
        report["ok"] = False
    report["faults"] = len([e for e in history.events if e["ev"] == "fault"])
    report["fault_kinds"] = dict(
        sorted(
            (kind, sum(1 for e in history.events if e["ev"] == "fault" and e["kind"] == kind))
            for kind in {e["kind"] for e in history.events if e["ev"] == "fault"}
        )
    )
    report["queues"] = {
        name: {
            key: run.attributes.get(name, {}).get(key)
            for key in ("partitions", "replication_factor", "min_insync", "fifo")
        }
        for name in run.queues
    }
    report["fsync"] = run.options.fsync
    report["notes"] = run.notes
    return report


# ---------------------------------------------------------------------------
# The command line


SUMMARY_ROWS = (
    ("sends invoked", "sends_invoked", None),
    ("sends acknowledged", "sends_acknowledged", None),
    ("sends failed (uncertain)", "sends_failed", None),
    ("  of which delivered", "uncertain_sends_delivered", None),
    ("deliveries", "deliveries", None),
    ("distinct ids received", "distinct_received", None),
    ("acks acknowledged", "acks_acknowledged", None),
    ("acks failed (uncertain)", "acks_failed", None),
    ("lost", "lost", 0),
    ("redelivered after ack", "redelivered_after_ack", 0),
    ("unknown bodies", "unknown", 0),
    ("FIFO order violations", "fifo_violations", 0),
    ("duplicates", "duplicates", None),
    ("  after a failed ack", "duplicates_after_failed_ack", None),
    ("  never acked", "duplicates_never_acked", None),
    ("  stored twice", "duplicates_copies", None),
    ("  other", "duplicates_other", None),
    ("availability %", "availability_pct", None),
    ("send success %", "send_success_pct", None),
    ("faults injected", "faults", None),
)


def format_summary(report: dict[str, Any]) -> str:
    lines = []
    for label, key, must in SUMMARY_ROWS:
        value = report.get(key)
        verdict = ""
        if must is not None:
            verdict = "ok" if value == must else "FAIL"
        lines.append(f"{label:<28} {value!s:>10}  {verdict}".rstrip())
    lines.append(f"{'fault kinds':<28} {report.get('fault_kinds')}")
    lines.append(f"{'drained':<28} {report.get('drained')!s:>10}")
    lines.append(f"{'nodes fsync':<28} {report.get('fsync')!s:>10}")
    for name, attrs in report.get("queues", {}).items():
        lines.append(f"queue {name}: {attrs}")
    for key in ("lost_examples", "redelivered_examples", "unknown_examples", "fifo_examples"):
        if report.get(key):
            lines.append(f"{key}: {report[key]}")
    lines.append(
        "result: " + ("PASS" if report["ok"] else "FAIL: " + ", ".join(report["failures"]))
    )
    return "\n".join(lines)


def parse_faults(text: str) -> tuple[str, ...]:
    if text.strip() in ("", "none"):
        return ()
    if text.strip() == "all":
        return FAULT_KINDS
    kinds = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [kind for kind in kinds if kind not in FAULT_KINDS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown fault kind {', '.join(unknown)}; kinds are {', '.join(FAULT_KINDS)} (or all, none)"
        )
    return tuple(dict.fromkeys(kinds))


def build_parser() -> argparse.ArgumentParser:
    from mqd import launcher

    parser = argparse.ArgumentParser(
        prog="tools/chaos.py",
        description=__doc__.splitlines()[0],
        epilog="See the module docstring.",
    )
    add = parser.add_argument
    add(
        "--duration",
        type=float,
        default=60.0,
        metavar="S",
        help="seconds of load and faults (default 60)",
    )
    add("--seed", type=int, default=1, help="seed of the fault schedule and the load (default 1)")
    add(
        "--faults",
        type=parse_faults,
        default=FAULT_KINDS,
        metavar="LIST",
        help="comma list of kill,pause,partition,frontend; all (default) or none",
    )
    add(
        "--rf",
        type=int,
        default=None,
        metavar="N",
        help="queue attribute replication_factor (default: the server's)",
    )
    add(
        "--min-insync",
        type=int,
        default=None,
        metavar="N",
        help="queue attribute min_insync (default: the server's)",
    )
    add("--producers", type=int, default=4, metavar="N", help="producer tasks (default 4)")
    add("--consumers", type=int, default=4, metavar="N", help="consumer tasks (default 4)")
    add("--metadata", type=int, default=1, metavar="N", help="metadata nodes (default 1)")
    add("--backends", type=int, default=3, metavar="N", help="backend nodes (default 3)")
    add("--frontends", type=int, default=2, metavar="N", help="frontend nodes (default 2)")
    add(
        "--partitions",
        type=int,
        default=None,
        metavar="N",
        help="partitions per queue (default: one per backend)",
    )
    add(
        "--interval",
        type=float,
        default=0.05,
        metavar="S",
        help="pause between a producer's batches (default 0.05)",
    )
    add(
        "--visibility",
        type=int,
        default=5,
        metavar="S",
        help="consumers' visibility timeout (default 5)",
    )
    add(
        "--skip-ack-pct",
        type=float,
        default=2.0,
        metavar="P",
        help="percent of deliveries left unacked (default 2)",
    )
    add(
        "--drain-timeout",
        type=float,
        default=60.0,
        metavar="S",
        help="bound on the final drain (default 60)",
    )
    add(
        "--dir",
        type=Path,
        default=None,
        help="cluster directory (default: a new temp dir, removed if the run passes)",
    )
    add("--keep", action="store_true", help="keep the cluster directory even if the run passes")
    add(
        "--history",
        type=Path,
        default=Path("chaos-history.jsonl"),
        metavar="FILE",
        help="where to write the history, JSON lines (default ./chaos-history.jsonl)",
    )
    add(
        "--fsync",
        choices=launcher.FSYNC_POLICIES,
        default="always",
        help='every node\'s [storage] fsync (default "always"): "never" still loses nothing to '
        "the kills, pauses and cuts here, as a killed process's writes stay in the page cache",
    )
    add("--json", action="store_true", help="print the summary as JSON")
    return parser


def options_from(args: argparse.Namespace) -> Options:
    positive = {
        "--duration": args.duration,
        "--producers": args.producers,
        "--consumers": args.consumers,
        "--backends": args.backends,
        "--frontends": args.frontends,
        "--metadata": args.metadata,
    }
    for name, value in positive.items():
        if value <= 0:
            raise SystemExit(f"tools/chaos.py: {name} must be positive, got {value}")
    return Options(
        duration_s=args.duration,
        seed=args.seed,
        faults=args.faults,
        rf=args.rf,
        min_insync=args.min_insync,
        producers=args.producers,
        consumers=args.consumers,
        metadata=args.metadata,
        backends=args.backends,
        frontends=args.frontends,
        partitions=args.partitions,
        interval_s=args.interval,
        visibility_s=args.visibility,
        skip_ack_pct=args.skip_ack_pct,
        drain_timeout_s=args.drain_timeout,
        fsync=args.fsync,
    )


def _stop_leftovers(directory: Path) -> None:
    """After the event loop: stop any node of this run still running (pids the launcher recorded)."""
    from mqd import launcher

    if not launcher.Manifest.exists(directory):
        return
    manifest = launcher.Manifest.load(directory)
    running = [n for n in manifest.nodes if launcher.running_pid(manifest, n) is not None]
    for node in running:
        pid = launcher.running_pid(manifest, node)
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
    if running:
        launcher.stop_nodes(manifest, running, STOP_TIMEOUT_S)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    options = options_from(args)
    temporary = args.dir is None
    directory = Path(tempfile.mkdtemp(prefix="mqd-chaos-")) if temporary else args.dir.absolute()
    if not temporary and directory.exists() and any(directory.iterdir()):
        print(
            f"tools/chaos.py: --dir {directory} is not empty; give a new directory", file=sys.stderr
        )
        return 2
    history = History(args.history)
    print(
        f"chaos: seed {options.seed}, {options.duration_s:g} s, faults "
        f"{','.join(options.faults) or 'none'}, cluster in {directory}, history in {args.history}",
        file=sys.stderr,
        flush=True,
    )
    try:
        report = asyncio.run(run_async(options, directory, history))
    except Exception as exc:
        print(f"tools/chaos.py: the run failed: {_describe(exc)}", file=sys.stderr)
        print(f"tools/chaos.py: the cluster directory is kept: {directory}", file=sys.stderr)
        return 2
    finally:
        history.close()
        _stop_leftovers(directory)
    report["seed"] = options.seed
    report["duration_s"] = options.duration_s
    report["history"] = str(args.history)
    report["directory"] = str(directory)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_summary(report))
    if report["ok"] and temporary and not args.keep:
        shutil.rmtree(directory, ignore_errors=True)
    elif not report["ok"]:
        print(f"chaos: the cluster directory is kept: {directory}", file=sys.stderr)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
