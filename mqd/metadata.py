"""Metadata role: the catalog of queues (DESIGN.md §2, §6).

The catalog sits behind a small record interface (`Catalog`: load, put,
delete) so that a later etcd implementation can replace SQLite; decisions
made here depend only on catalog state. In the single node the metadata role
calls the backend in-process (`BackendApi`), through the same methods a
cluster will call over the network.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import aiosqlite
import structlog

from mqd import auth, stages
from mqd.attributes import (
    FIXED_ATTRIBUTES,
    REDRIVE_POLICY,
    check_delay_within_retention,
    default_attributes,
    resolve_replication,
    validate_attributes,
    validate_queue_name,
)
from mqd.clock import SystemClock
from mqd.errors import InvalidArgument, QueueExists, QueueInUse, QueueNotFound
from mqd.limits import Limits

log = structlog.get_logger("mqd.metadata")


@dataclass(slots=True)
class QueueRecord:
    name: str
    queue_id: bytes
    attributes: dict[str, Any]
    created_at_ms: int
    partitions: int = 1
    # Bumped on every change, so caches can tell stale copies (placement version later).
    version: int = 1
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def visibility_timeout_ms(self) -> int:
        return int(self.attributes["visibility_timeout"] * 1000)

    @property
    def delay_ms(self) -> int:
        return int(self.attributes["delay"] * 1000)

    @property
    def retention_ms(self) -> int:
        return int(self.attributes["retention"] * 1000)

    @property
    def max_message_bytes(self) -> int:
        return int(self.attributes["max_message_bytes"])


class BackendApi(Protocol):
    async def create_partitions(self, queue: QueueRecord) -> None: ...
    async def drop_partitions(self, queue: QueueRecord) -> None: ...
    def configure_partitions(self, queue: QueueRecord) -> None: ...
    def backend_count(self) -> int: ...
    def backends_known(self) -> int: ...


async def open_durable_db(path: Path) -> aiosqlite.Connection:
    """SQLite for records that are not derived from anything: WAL, synchronous=FULL."""
    db = await aiosqlite.connect(path)
    await db.execute("PRAGMA journal_mode=WAL")
    await db.execute("PRAGMA synchronous=FULL")
    return db


class Catalog:
    """Queue records in SQLite (WAL, synchronous=FULL: the catalog is not derived)."""

    def __init__(self, db: aiosqlite.Connection) -> None:
        self._db = db

    @classmethod
    async def open(cls, path: Path) -> Catalog:
        db = await open_durable_db(path)
        await db.execute(
            "CREATE TABLE IF NOT EXISTS queues ("
            " name TEXT PRIMARY KEY, queue_id BLOB NOT NULL UNIQUE, attributes TEXT NOT NULL,"
            " created_at_ms INTEGER NOT NULL, partitions INTEGER NOT NULL, version INTEGER NOT NULL)"
        )
        for statement in auth.SCHEMA:
            await db.execute(statement)
        await db.commit()
        return cls(db)

    async def load(self) -> list[QueueRecord]:
        async with self._db.execute(
            "SELECT name, queue_id, attributes, created_at_ms, partitions, version FROM queues"
        ) as cursor:
            rows = await cursor.fetchall()
        return [
            QueueRecord(
                name,
                bytes(qid),
                {"partitions": partitions} | json.loads(attrs),
                created,
                partitions,
                version,
            )
            for name, qid, attrs, created, partitions, version in rows
        ]

    async def put(self, record: QueueRecord) -> None:
        await self._db.execute(
            "INSERT OR REPLACE INTO queues VALUES (?, ?, ?, ?, ?, ?)",
            (
                record.name,
                record.queue_id,
                json.dumps(record.attributes, sort_keys=True),
                record.created_at_ms,
                record.partitions,
                record.version,
            ),
        )
        await self._db.commit()

    async def delete(self, name: str) -> None:
        await self._db.execute("DELETE FROM queues WHERE name = ?", (name,))
        await self._db.commit()

    # --- principals and grants (mqd.auth; `mqd admin user|grant` writes them too) ---------

    async def load_auth(self) -> auth.AuthState:
        async with self._db.execute(auth.SELECT_PRINCIPALS) as cursor:
            principals = [auth.principal_from_row(row) for row in await cursor.fetchall()]
        async with self._db.execute(auth.SELECT_GRANTS) as cursor:
            grants = [auth.grant_from_row(row) for row in await cursor.fetchall()]
        return auth.AuthState(principals, grants)

    async def data_version(self) -> int:
        """Changes when another connection (the admin CLI) commits to the catalog."""
        async with self._db.execute("PRAGMA data_version") as cursor:
            row = await cursor.fetchone()
        assert row is not None
        return int(row[0])

    async def put_grant(self, grant: auth.Grant) -> None:
        await self._db.execute(auth.PUT_GRANT, auth.grant_row(grant))
        await self._db.commit()

    async def delete_queue_grants(self, name: str) -> None:
        await self._db.execute(auth.DELETE_QUEUE_GRANTS, (name,))
        await self._db.commit()

    async def close(self) -> None:
        await self._db.close()


class MetadataRole:
    def __init__(
        self, catalog: Catalog, backend: BackendApi, limits: Limits, *, clock: Any = None
    ) -> None:
        self._catalog = catalog
        self._backend = backend
        self._limits = limits
        self._clock = clock or SystemClock()
        self._queues: dict[str, QueueRecord] = {}
        self._auth = auth.AuthState()
        self._auth_data_version = -1
        # Per owner: held from the queue quota's check to the creator grant, so that
        # creates in flight together (from any frontend) are counted one by one.
        self._creating: dict[str, list[Any]] = {}
        # Per queue name: held by a change of the catalog (create, delete, set
        # attributes) from its checks to its write, on the queue and on the dead-letter
        # queue it names. Changes that await in between (backend calls, SQLite) must not
        # interleave: a set lost another's update, a dead-letter queue was deleted while
        # a policy naming it was written, a delete racing a set left a queue listed with
        # no partitions. Per name, so a slow create (a backend that does not answer)
        # holds up only changes to the same queues. [lock, users] per name.
        self._name_locks: dict[str, list[Any]] = {}

    async def start(self) -> list[QueueRecord]:
        for record in await self._catalog.load():
            self._queues[record.name] = record
        for record in self._queues.values():
            target = _redrive_target(record.attributes)
            if target and target not in self._queues:
                # Possible in a catalog written before changes were serialized: the
                # queue's messages due to move are delivered as usual (each failed
                # move logged) until this is fixed.
                log.error(
                    "queue.dead_letter_queue_missing",
                    queue=record.name,
                    dead_letter_queue=target,
                    fix=f"set {record.name}'s redrive_policy to {{}} or create {target}",
                )
        await self.refresh_auth()
        return list(self._queues.values())

    def lookup(self, name: str) -> QueueRecord:
        record = self._queues.get(name)
        if record is None:
            raise QueueNotFound(f"queue {name!r} does not exist")
        return record

    def queues(self) -> list[QueueRecord]:
        return list(self._queues.values())

    async def create_queue(
        self,
        name: str,
        attributes: dict[str, Any],
        *,
        exist_ok: bool = False,
        owner: str = "",
        owned_max: int = 0,
    ) -> tuple[QueueRecord, bool]:
        """Create a queue; (record, created). An existing queue is an error unless
        `exist_ok` and every given attribute already has the given value.

        With `owner`, a principal creates it: a new queue is refused (FORBIDDEN) if
        the owner has created `owned_max` queues already (0: no limit), and gets the
        owner's creator grant (protocol.md §8.2, §8.3)."""
        if not owner:
            return await self._create_queue(name, attributes, exist_ok)
        async with _locked(self._creating, owner):
            if owned_max and name not in self._queues:
                # Picks up grants `mqd admin` revoked meanwhile, too.
                state = await self.refresh_auth()
                auth.require_queue_room(state, owner, owned_max)
            record, created = await self._create_queue(name, attributes, exist_ok)
            if created:
                await self.add_grant(auth.Grant(owner, record.name, "admin", owner=True))
            return record, created

    async def _create_queue(
        self, name: str, attributes: dict[str, Any], exist_ok: bool
    ) -> tuple[QueueRecord, bool]:
        async with _locked(self._name_locks, name, _redrive_target(attributes)):
            return await self._create_queue_locked(name, attributes, exist_ok)

    async def _create_queue_locked(
        self, name: str, attributes: dict[str, Any], exist_ok: bool
    ) -> tuple[QueueRecord, bool]:
        validate_queue_name(name, self._limits)
        changes = validate_attributes(name, attributes, self._limits, creating=True)
        existing = self._queues.get(name)
        if existing is not None:
            differing = {
                k: v for k, v in changes.items() if not _same_attribute(existing.attributes, k, v)
            }
            if exist_ok and not differing:
                return existing, False
            detail = f" with different attributes: {sorted(differing)}" if differing else ""
            raise QueueExists(f"queue {name!r} already exists{detail}")
        merged = default_attributes(name, self._limits) | changes
        backends_up = self._backend.backend_count()
        merged |= resolve_replication(merged, backends_up)
        backends_known = self._backend.backends_known()
        if "replication_factor" not in changes and backends_up < backends_known:
            # The default is capped by the backends up, and kept when the others return.
            log.warning(
                "queue.replication_reduced",
                queue=name,
                replication_factor=merged["replication_factor"],
                backends_up=backends_up,
                backends_known=backends_known,
                hint="created while backends are down: it keeps these copies for good; "
                "recreate it with the cluster whole, or pass replication_factor to be refused",
            )
        if not merged.get(REDRIVE_POLICY, True):
            del merged[REDRIVE_POLICY]  # none: as a queue created without one
        check_delay_within_retention(merged)
        self._check_redrive_target(name, merged)
        record = QueueRecord(
            name, os.urandom(8), merged, self._clock.now_ms(), partitions=merged["partitions"]
        )
        self._queues[name] = record
        try:
            # Partitions first: a crash before the catalog row leaves orphan partitions,
            # which the backend removes at start; never a catalog row without them.
            await stages.timed("partitions", self._backend.create_partitions(record))
            try:
                await stages.timed("catalog", self._catalog.put(record))
            except BaseException:
                await self._backend.drop_partitions(record)
                raise
        except BaseException:
            self._queues.pop(name, None)
            raise
        log.info("queue.created", queue=name, queue_id=record.queue_id.hex())
        return record, True

    def _check_redrive_target(self, name: str, attributes: dict[str, Any]) -> None:
        target_name = _redrive_target(attributes)
        if not target_name:
            return
        if target_name == name:
            raise InvalidArgument(f"queue {name!r} cannot be its own dead-letter queue")
        target = self._queues.get(target_name)
        if target is None:
            raise QueueNotFound(
                f"redrive_policy.dead_letter_queue: queue {target_name!r} does not exist; create it first"
            )
        if bool(target.attributes.get("fifo")) != bool(attributes.get("fifo")):
            kind = "FIFO" if attributes.get("fifo") else "standard"
            raise InvalidArgument(
                f"redrive_policy.dead_letter_queue: {target_name!r} must be a {kind} queue like {name!r}"
            )

    def dependents(self, name: str) -> list[str]:
        """Queues whose dead-letter queue is `name`."""
        return sorted(
            record.name
            for record in self._queues.values()
            if _redrive_target(record.attributes) == name
        )

    async def delete_queue(self, name: str) -> QueueRecord:
        async with _locked(self._name_locks, name):
            return await self._delete_queue_locked(name)

    async def _delete_queue_locked(self, name: str) -> QueueRecord:
        record = self.lookup(name)
        users = [user for user in self.dependents(name) if user != name]
        if users:
            raise QueueInUse(
                f"queue {name!r} is the dead-letter queue of {', '.join(users)}; "
                "remove their redrive_policy first (set it to {})"
            )
        del self._queues[name]
        await stages.timed("catalog", self._catalog.delete(name))
        await stages.timed("partitions", self._backend.drop_partitions(record))
        # Grants on exactly this name go with the queue: a new queue of the same
        # name (perhaps another principal's) starts with none (protocol.md §8.2).
        await self._catalog.delete_queue_grants(name)
        await self.refresh_auth(force=True)
        log.info("queue.deleted", queue=name, queue_id=record.queue_id.hex())
        return record

    async def set_attributes(self, name: str, attributes: dict[str, Any]) -> QueueRecord:
        async with _locked(self._name_locks, name, _redrive_target(attributes)):
            return await self._set_attributes_locked(name, attributes)

    async def _set_attributes_locked(self, name: str, attributes: dict[str, Any]) -> QueueRecord:
        record = self.lookup(name)
        # The attributes fixed at creation may be given again as they are (a read, edit
        # and write back of the whole map); only a change of them is refused.
        current = {**record.attributes, "partitions": record.partitions}
        attributes = {
            key: value
            for key, value in attributes.items()
            if not (key in FIXED_ATTRIBUTES and key in current and _same(value, current[key]))
        }
        changes = validate_attributes(name, attributes, self._limits, creating=False)
        merged = record.attributes | changes
        if not merged.get(REDRIVE_POLICY, True):
            del merged[REDRIVE_POLICY]  # removed: as a queue created without one
        if "delay" in changes or "retention" in changes:
            check_delay_within_retention(merged)
        self._check_redrive_target(name, merged)
        updated = QueueRecord(
            record.name,
            record.queue_id,
            merged,
            record.created_at_ms,
            record.partitions,
            record.version + 1,
        )
        await stages.timed("catalog", self._catalog.put(updated))
        self._queues[name] = updated
        self._backend.configure_partitions(updated)
        return updated

    def list_queues(self, prefix: str = "") -> list[str]:
        return sorted(name for name in self._queues if name.startswith(prefix))

    # --- principals and grants: the `mqd.auth.AuthCatalog` seam ---------------------------

    def auth_state(self) -> auth.AuthState:
        return self._auth

    async def refresh_auth(self, *, force: bool = False) -> auth.AuthState:
        """Re-read principals and grants if another writer (the admin CLI) changed them."""
        version = await self._catalog.data_version()
        if force or version != self._auth_data_version:
            self._auth = await self._catalog.load_auth()
            self._auth_data_version = version
        return self._auth

    async def add_grant(self, grant: auth.Grant) -> None:
        await self._catalog.put_grant(grant)
        await self.refresh_auth(force=True)

    async def close(self) -> None:
        await self._catalog.close()


@contextlib.asynccontextmanager
async def _locked(locks: dict[str, list[Any]], *keys: str | None) -> AsyncIterator[None]:
    """Hold the locks of these keys in `locks` ([lock, users] by key; an entry goes when
    no one uses it), taken in sorted order: no deadlock. An entry is counted from the
    moment it is waited for: dropped when only `locked()` says it is free, a waiter
    woken but not yet running could find a second lock made beside it."""
    counted: list[tuple[str, list[Any]]] = []
    acquired: list[asyncio.Lock] = []
    try:
        for key in sorted({key for key in keys if key}):
            entry = locks.get(key)
            if entry is None:
                entry = locks[key] = [asyncio.Lock(), 0]
            entry[1] += 1
            counted.append((key, entry))
            await entry[0].acquire()
            acquired.append(entry[0])
        yield
    finally:
        for lock in reversed(acquired):
            lock.release()
        for key, entry in counted:
            entry[1] -= 1
            if not entry[1]:
                del locks[key]


def _redrive_target(attributes: Any) -> str | None:
    """The dead-letter queue a change's attributes name, if they name one (unvalidated)."""
    policy = attributes.get(REDRIVE_POLICY) if isinstance(attributes, dict) else None
    target = policy.get("dead_letter_queue") if isinstance(policy, dict) else None
    return target if isinstance(target, str) else None


def _same_attribute(attributes: dict[str, Any], key: str, value: Any) -> bool:
    """Whether a queue's attribute already has `value` (an empty redrive_policy is the
    same as none, as in SET_QUEUE_ATTRIBUTES where it removes the policy)."""
    if key == REDRIVE_POLICY and not value:
        return not attributes.get(key)
    return attributes.get(key) == value


def _same(given: Any, current: Any) -> bool:
    """A value given again as it is (a bool is not an int here: True is not 1)."""
    return type(given) is type(current) and given == current
