"""Queue names and queue attributes: syntax, defaults and ranges (protocol.md §5).

Attributes travel as native values (seconds as numbers, bools, strings) and
are stored in the catalog exactly as validated here.
"""

from __future__ import annotations

import re
from typing import Any

from mqd.errors import InvalidArgument
from mqd.limits import Limits

_NAME_RE = re.compile(r"[A-Za-z0-9_-]+")
FIFO_SUFFIX = ".fifo"

DAY_S = 86_400

# name -> (default, low, high) for the numeric attributes, in their public units.
_NUMERIC: dict[str, tuple[float, float, float]] = {
    "visibility_timeout": (30, 0, 12 * 3600),
    "retention": (4 * DAY_S, 60, 14 * DAY_S),
    "max_message_bytes": (1024 * 1024, 1, 16 * 1024 * 1024),
    "delay": (0, 0, 7 * DAY_S),
    # The dedup window is bounded by how long the store remembers dedup ids (15 min).
    "dedup_window": (300, 0, 900),
}
_BOOLEAN: dict[str, bool] = {"content_based_dedup": False}
# Fixed at creation: moving messages between partitions is a rebalance, not an edit.
PARTITIONS = "partitions"
PARTITIONS_MAX = 64
# Copies of each partition and how many must hold a change before it is acknowledged;
# fixed at creation, resolved against the cluster's size (see `resolve_replication`).
REPLICATION = ("replication_factor", "min_insync")
REPLICAS_MAX = 5
REDRIVE_POLICY = "redrive_policy"
MAX_RECEIVE_COUNT_MAX = 1000
_INTEGER_ONLY = frozenset({"max_message_bytes"})
_READ_ONLY = frozenset({"fifo"})
# Fixed when a queue is created: SET_QUEUE_ATTRIBUTES may repeat them, not change them.
FIXED_ATTRIBUTES = frozenset({"fifo", PARTITIONS, *REPLICATION})
# Every attribute a client may give at creation, and those it may change after.
CREATE_ATTRIBUTES = (*_NUMERIC, *_BOOLEAN, PARTITIONS, *REPLICATION, REDRIVE_POLICY)
CHANGEABLE_ATTRIBUTES = tuple(a for a in CREATE_ATTRIBUTES if a not in FIXED_ATTRIBUTES)


def validate_queue_name(name: object, limits: Limits) -> str:
    if not isinstance(name, str) or not name:
        raise InvalidArgument("queue name must be a non-empty string")
    if len(name) > limits.queue_name_chars_max:
        raise InvalidArgument(
            f"queue name is {len(name)} characters; at most {limits.queue_name_chars_max} allowed"
        )
    stem = name[: -len(FIFO_SUFFIX)] if name.endswith(FIFO_SUFFIX) else name
    if not _NAME_RE.fullmatch(stem):
        raise InvalidArgument(
            f"queue name {name!r} may contain only A-Z a-z 0-9 _ - (and end in .fifo for FIFO queues)"
        )
    return name


def is_fifo_name(name: str) -> bool:
    return name.endswith(FIFO_SUFFIX)


def default_attributes(name: str, limits: Limits) -> dict[str, Any]:
    attributes: dict[str, Any] = {key: spec[0] for key, spec in _NUMERIC.items()}
    attributes["max_message_bytes"] = min(attributes["max_message_bytes"], limits.message_bytes_max)
    attributes["fifo"] = is_fifo_name(name)
    attributes[PARTITIONS] = 1
    attributes.update(_BOOLEAN)
    return attributes


def validate_attributes(
    name: str, changes: dict[str, Any], limits: Limits, *, creating: bool
) -> dict[str, Any]:
    """Return the validated subset `changes`; raise InvalidArgument naming the bad key."""
    if not isinstance(changes, dict):
        raise InvalidArgument("attributes must be a map")
    validated: dict[str, Any] = {}
    for key, value in changes.items():
        if key in _READ_ONLY:
            fifo = is_fifo_name(name)
            if value is not fifo or not creating:
                raise InvalidArgument(
                    f"attribute fifo is fixed by the queue name (a FIFO queue's name ends in .fifo); "
                    f"{name!r} has fifo={fifo}"
                )
            continue
        if key in _BOOLEAN:
            if not isinstance(value, bool):
                raise InvalidArgument(f"attribute {key} must be true or false, got {value!r}")
            validated[key] = value
            continue
        if key in REPLICATION:
            if not creating:
                raise InvalidArgument(f"attribute {key} is fixed when the queue is created")
            if (
                isinstance(value, bool)
                or not isinstance(value, int)
                or not 1 <= value <= REPLICAS_MAX
            ):
                raise InvalidArgument(
                    f"attribute {key} must be a whole number from 1 to {REPLICAS_MAX}, got {value!r}"
                )
            validated[key] = value
            continue
        if key == PARTITIONS:
            if not creating:
                raise InvalidArgument("attribute partitions is fixed when the queue is created")
            if (
                isinstance(value, bool)
                or not isinstance(value, int)
                or not 1 <= value <= PARTITIONS_MAX
            ):
                raise InvalidArgument(
                    f"attribute partitions must be a whole number from 1 to {PARTITIONS_MAX}, got {value!r}"
                )
            validated[key] = value
            continue
        if key == REDRIVE_POLICY:
            validated[key] = _validate_redrive_policy(value)
            continue
        spec = _NUMERIC.get(key)
        if spec is None:
            known = ", ".join(
                sorted(
                    [*_NUMERIC, *_READ_ONLY, *_BOOLEAN, REDRIVE_POLICY, PARTITIONS, *REPLICATION]
                )
            )
            raise InvalidArgument(f"unknown queue attribute {key!r}; known: {known}")
        _, low, high = spec
        if key == "max_message_bytes":
            high = min(high, limits.message_bytes_max)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidArgument(f"attribute {key} must be a number, got {type(value).__name__}")
        if key in _INTEGER_ONLY and not float(value).is_integer():
            raise InvalidArgument(f"attribute {key} must be a whole number, got {value!r}")
        if not low <= value <= high:
            raise InvalidArgument(f"attribute {key} must be from {low} to {high}, got {value!r}")
        if key not in _INTEGER_ONLY and abs(value * 1000 - round(value * 1000)) > 1e-6:
            # Kept in milliseconds: 0.0004 s was shown as set and acted as 0.
            raise InvalidArgument(
                f"attribute {key} is in seconds to the millisecond (0.001), got {value!r}"
            )
        validated[key] = int(value) if float(value).is_integer() else float(value)
    return validated


def check_delay_within_retention(attributes: dict[str, Any]) -> None:
    """A queue's `delay` must be shorter than its `retention`: its messages would expire
    before they could be received (protocol.md §5.2)."""
    delay, retention = attributes.get("delay", 0), attributes.get("retention")
    if retention is not None and delay >= retention:
        raise InvalidArgument(
            f"attribute delay ({delay:g} s) must be shorter than retention ({retention:g} s): "
            "its messages would expire before they could be received"
        )


def _validate_redrive_policy(value: Any) -> dict[str, Any]:
    """{dead_letter_queue: NAME, max_receive_count: N}; an empty map or null removes the
    policy. Whether the named queue exists and is of the same kind is checked by metadata."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidArgument(
            "attribute redrive_policy must be a map {dead_letter_queue: NAME, max_receive_count: N}, "
            "or {} (or null) for none"
        )
    if not value:
        return {}
    unknown = set(value) - {"dead_letter_queue", "max_receive_count"}
    if unknown:
        raise InvalidArgument(f"redrive_policy: unknown keys {sorted(unknown)}")
    target = value.get("dead_letter_queue")
    if not isinstance(target, str) or not target:
        raise InvalidArgument("redrive_policy.dead_letter_queue must name a queue")
    count = value.get("max_receive_count")
    if (
        isinstance(count, bool)
        or not isinstance(count, int)
        or not 1 <= count <= MAX_RECEIVE_COUNT_MAX
    ):
        raise InvalidArgument(
            f"redrive_policy.max_receive_count must be a whole number from 1 to {MAX_RECEIVE_COUNT_MAX}, got {count!r}"
        )
    return {"dead_letter_queue": target, "max_receive_count": count}


def resolve_replication(attributes: dict[str, Any], backends: int) -> dict[str, Any]:
    """Fill in `replication_factor` (default 3, capped by the backends there are) and
    `min_insync` (default 2, capped by the replication factor); refuse what cannot hold."""
    backends = max(backends, 1)
    factor = attributes.get("replication_factor")
    if factor is None:
        factor = min(3, backends)
    elif factor > backends:
        raise InvalidArgument(
            f"attribute replication_factor is {factor} but only {backends} backend(s) can hold copies"
        )
    insync = attributes.get("min_insync")
    if insync is None:
        insync = min(2, factor)
    elif insync > factor:
        raise InvalidArgument(
            f"attribute min_insync ({insync}) cannot exceed replication_factor ({factor})"
        )
    return {"replication_factor": factor, "min_insync": insync}
