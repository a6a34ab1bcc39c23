"""The SQLite index of a partition: derived from the log, rebuilt from it at will.

It holds where each live message lives (segment, position, length) and its
state, the dedup ids, and `checkpoint`: the next log offset it has not
applied, so everything below it is in the index. It is written by one task,
one transaction per batch, after the log group is durable (DESIGN.md §4). It
is never fsynced (synchronous=OFF): after a crash the log past the checkpoint
is replayed into it.
"""

from __future__ import annotations

import contextlib
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

import aiosqlite

INDEX_FILE = "index.sqlite"
# Bump when the schema changes: an index with another version is dropped and rebuilt
# from the log (it is derived data, so there is nothing to migrate).
INDEX_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS messages (
    off INTEGER PRIMARY KEY, seg INTEGER NOT NULL, pos INTEGER NOT NULL, len INTEGER NOT NULL,
    sent_at INTEGER NOT NULL, due INTEGER NOT NULL, prio INTEGER NOT NULL,
    grp TEXT NOT NULL, dedup TEXT NOT NULL, rc INTEGER NOT NULL,
    visible_at INTEGER NOT NULL, first_recv INTEGER NOT NULL, size INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS dedup (
    dedup_id TEXT PRIMARY KEY, off INTEGER NOT NULL, sent_at INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS messages_due ON messages (due) WHERE due != 0;
CREATE INDEX IF NOT EXISTS messages_sent_delayed ON messages (sent_at) WHERE due != 0;
CREATE INDEX IF NOT EXISTS messages_grp ON messages (grp, off) WHERE grp != '';
"""
# The three indexes serve the cold tier (`PartitionStore.load_due`): messages due later
# than the store's cold horizon live only here. Adding them did not change the version:
# `CREATE INDEX IF NOT EXISTS` adds them to an index file of an earlier build. The partial
# indexes cost nothing for messages sent without a delay or (standard queues) a group.
_INSERT = "INSERT OR REPLACE INTO messages VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)"
_LEASE = "UPDATE messages SET rc=?, visible_at=?, first_recv=? WHERE off=?"
_DELETE = "DELETE FROM messages WHERE off=?"
_DEDUP = "INSERT OR REPLACE INTO dedup VALUES (?,?,?)"

# Row of the messages table, in column order.
Row = tuple[int, int, int, int, int, int, int, str, str, int, int, int, int]


class IndexUnusable(Exception):
    """The index file is corrupt, from another version, or not SQLite at all."""


@dataclass(slots=True)
class IndexBatch:
    """The index changes of one or more commit groups, applied in one transaction.

    Kept net as changes arrive: a lease of a message inserted in the batch folds into
    its row, a delete of one cancels its row, a later lease of the same message replaces
    the earlier (a lease record holds absolute values). So a message sent, received and
    acked while the batch gathers never reaches SQLite, and `rows()` counts only what
    will (profiled in W1c: the index thread was 16 % of the server's CPU when batches were
    merged and coalesced only at apply time and the raw count cut the gathering short).

    Order within a transaction: inserts, leases, deletes, purges. That is
    equivalent to the log order because a lease or delete always follows the
    insert of its message, and a purge only removes messages below its offset.
    """

    checkpoint: int
    inserts: dict[int, Row] = field(default_factory=dict)  # by offset
    dedups: list[tuple[str, int, int]] = field(default_factory=list)
    leases: dict[int, tuple[int, int, int, int]] = field(
        default_factory=dict
    )  # rc, vis, first, off
    deletes: list[int] = field(default_factory=list)
    purges: list[int] = field(default_factory=list)
    dedup_prune_before_ms: int = 0

    def rows(self) -> int:
        return len(self.inserts) + len(self.leases) + len(self.deletes) + 1

    def insert(self, row: Row) -> None:
        self.inserts[row[0]] = row

    def lease(self, receive_count: int, visible_at: int, first_received: int, off: int) -> None:
        row = self.inserts.get(off)
        if row is not None:
            self.inserts[off] = (*row[:9], receive_count, visible_at, first_received, row[12])
        else:
            self.leases[off] = (receive_count, visible_at, first_received, off)

    def delete(self, off: int) -> None:
        if self.inserts.pop(off, None) is None:
            self.leases.pop(off, None)
            self.deletes.append(off)

    def merge(self, later: IndexBatch) -> None:
        self.checkpoint = later.checkpoint
        self.inserts.update(later.inserts)
        self.dedups += later.dedups
        for lease in later.leases.values():
            self.lease(*lease)
        for off in later.deletes:
            self.delete(off)
        self.purges += later.purges
        self.dedup_prune_before_ms = max(self.dedup_prune_before_ms, later.dedup_prune_before_ms)


class Index:
    """One aiosqlite connection; only the store's index writer task calls `apply`."""

    def __init__(self, db: aiosqlite.Connection, path: Path) -> None:
        self._db = db
        self.path = path

    @classmethod
    async def open(cls, directory: Path) -> Index:
        """Open or create the index; raise IndexUnusable if it must be rebuilt."""
        path = directory / INDEX_FILE
        db = await aiosqlite.connect(path, isolation_level=None)
        try:
            await db.execute("PRAGMA journal_mode=WAL")
            await db.execute("PRAGMA synchronous=OFF")
            await db.executescript(_SCHEMA)
            async with db.execute("SELECT key, value FROM meta") as cur:
                meta = dict(await cur.fetchall())
            if not meta:
                await db.executemany(
                    "INSERT INTO meta VALUES (?, ?)",
                    [("version", INDEX_VERSION), ("checkpoint", 0)],
                )
            elif meta.get("version") != INDEX_VERSION or "checkpoint" not in meta:
                raise IndexUnusable(f"index version {meta.get('version')}")
        except (sqlite3.DatabaseError, IndexUnusable) as exc:
            await db.close()
            raise IndexUnusable(str(exc)) from None
        except BaseException:
            await db.close()
            raise
        return cls(db, path)

    @staticmethod
    def remove_files(directory: Path) -> None:
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                (directory / (INDEX_FILE + suffix)).unlink()

    async def load(
        self, dedup_since_ms: int, hot_until_ms: int
    ) -> tuple[int, list[Row], list[tuple[str, int, int]]]:
        """(checkpoint, live rows due by `hot_until_ms` (or not delayed) in offset order,
        dedup rows sent at/after since). Rows due later (cold) stay here."""
        try:
            async with self._db.execute("SELECT value FROM meta WHERE key='checkpoint'") as cur:
                (checkpoint,) = await cur.fetchone()
            async with self._db.execute(
                "SELECT * FROM messages WHERE due <= ? ORDER BY off", (hot_until_ms,)
            ) as cur:
                rows = await cur.fetchall()
            async with self._db.execute(
                "SELECT dedup_id, off, sent_at FROM dedup WHERE sent_at >= ?", (dedup_since_ms,)
            ) as cur:
                dedups = await cur.fetchall()
            # The cold rows are counted later, through the partial indexes on due and
            # grp that the queries above do not read: read them now, while a damaged
            # page still means "rebuild from the log" rather than a failed open.
            await self.cold_by_segment(hot_until_ms)
            await self.cold_group_heads(hot_until_ms)
        except sqlite3.DatabaseError as exc:
            raise IndexUnusable(str(exc)) from None
        return checkpoint, rows, dedups

    async def apply(self, batch: IndexBatch) -> None:
        db = self._db
        await db.execute("BEGIN")
        try:
            if batch.inserts:
                await db.executemany(_INSERT, list(batch.inserts.values()))
            if batch.dedups:
                await db.executemany(_DEDUP, batch.dedups)
            if batch.leases:
                await db.executemany(_LEASE, list(batch.leases.values()))
            if batch.deletes:
                await db.executemany(_DELETE, [(o,) for o in batch.deletes])
            for up_to in batch.purges:
                await db.execute("DELETE FROM messages WHERE off < ?", (up_to,))
            if batch.dedup_prune_before_ms:
                await db.execute(
                    "DELETE FROM dedup WHERE sent_at < ?", (batch.dedup_prune_before_ms,)
                )
            await db.execute("UPDATE meta SET value=? WHERE key='checkpoint'", (batch.checkpoint,))
            await db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                await db.execute("ROLLBACK")
            raise

    async def cold_by_segment(self, after_ms: int) -> list[tuple[int, int]]:
        """(segment base, rows due after `after_ms`) for every segment holding such rows."""
        sql = "SELECT seg, count(*) FROM messages WHERE due != 0 AND due > ? GROUP BY seg"
        async with self._db.execute(sql, (after_ms,)) as cur:
            return list(await cur.fetchall())

    async def due_between(self, after_ms: int, until_ms: int) -> list[Row]:
        """Rows with after < due <= until, in offset order."""
        sql = "SELECT * FROM messages WHERE due != 0 AND due > ? AND due <= ? ORDER BY off"
        async with self._db.execute(sql, (after_ms, until_ms)) as cur:
            return list(await cur.fetchall())

    async def cold_sent_before(self, after_ms: int, sent_before_ms: int) -> list[Row]:
        """Rows due after `after_ms` (cold) sent before `sent_before_ms`, in offset order."""
        sql = "SELECT * FROM messages WHERE due != 0 AND sent_at < ? AND due > ? ORDER BY off"
        async with self._db.execute(sql, (sent_before_ms, after_ms)) as cur:
            return list(await cur.fetchall())

    async def cold_sent_min(self, after_ms: int) -> int | None:
        """The earliest sent time of the rows due after `after_ms` (cold), or None."""
        sql = "SELECT min(sent_at) FROM messages WHERE due != 0 AND due > ?"
        async with self._db.execute(sql, (after_ms,)) as cur:
            row = await cur.fetchone()
        return None if row is None else row[0]

    async def cold_after(self, after_ms: int, after_offset: int, limit: int) -> list[Row]:
        """Up to `limit` rows due after `after_ms` (cold) past `after_offset`, in offset order."""
        sql = "SELECT * FROM messages WHERE due != 0 AND due > ? AND off > ? ORDER BY off LIMIT ?"
        async with self._db.execute(sql, (after_ms, after_offset, limit)) as cur:
            return list(await cur.fetchall())

    async def cold_group_heads(self, after_ms: int) -> list[tuple[str, int]]:
        """(group, lowest offset) of the rows due after `after_ms`, per non-empty group."""
        sql = (
            "SELECT grp, min(off) FROM messages WHERE due != 0 AND due > ? AND grp != '' "
            "GROUP BY grp"
        )
        async with self._db.execute(sql, (after_ms,)) as cur:
            return list(await cur.fetchall())

    async def cold_group_head(self, group: str, after_ms: int) -> int | None:
        """The lowest offset in `group` of a row due after `after_ms`, or None."""
        sql = (
            "SELECT off FROM messages WHERE grp = ? AND grp != '' AND due != 0 AND due > ? "
            "ORDER BY off LIMIT 1"
        )
        async with self._db.execute(sql, (group, after_ms)) as cur:
            row = await cur.fetchone()
        return None if row is None else row[0]

    async def cold_group_offsets(self, group: str, after_ms: int) -> list[int]:
        """Offsets in `group` of the rows due after `after_ms`, in order."""
        sql = (
            "SELECT off FROM messages WHERE grp = ? AND grp != '' AND due != 0 AND due > ? "
            "ORDER BY off"
        )
        async with self._db.execute(sql, (group, after_ms)) as cur:
            return [row[0] for row in await cur.fetchall()]

    async def count_rows(self) -> int:
        async with self._db.execute("SELECT count(*) FROM messages") as cur:
            (n,) = await cur.fetchone()
        return n

    async def close(self) -> None:
        await self._db.close()
