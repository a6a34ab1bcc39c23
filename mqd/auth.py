"""Principals, tokens, permissions and per-principal quotas (DESIGN.md §7, protocol.md §8).

Pure logic and the SQL of the catalog's two auth tables; no sockets. The
frontend holds one `Authenticator`, which answers "who is this HELLO?",
"may this principal do this to this queue?" and "is this principal over its
rate?", over an `AuthCatalog` seam (the single node: the metadata role in
process, `mqd.metadata.MetadataRole`).

- **Tokens** look like `mqd_<id>_<secret>`: the id (12 hex digits) finds the
  principal in O(1), and only the secret is checked, against a salted scrypt
  hash (the catalog never holds a token). Comparison is constant time, an
  unknown id costs the same scrypt as a known one, and a failure is answered
  only after a fixed delay, so the answer's timing says nothing.
- **Permissions** are `send`, `receive` and `admin`, granted per principal on
  a queue pattern: an exact name, `*`, or a prefix such as `orders-*`. The
  principal `root` has every permission; when authentication is off every
  client is the anonymous principal, which also has every permission.
- **Quotas**: token buckets for messages/s and bytes/s per principal, and
  counts of connections and owned queues per principal. A limit of 0 means
  none. Per-principal overrides live with the principal in the catalog.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import json
import re
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from mqd.errors import Forbidden, InvalidArgument, Throttled, Unauthenticated, Unavailable

PERMISSIONS = ("send", "receive", "admin")
ROOT = "root"
ANONYMOUS = "anonymous"
# The quota names that a principal may override (the keys of `[quotas]`, less burst_ms).
QUOTA_NAMES = (
    "messages_per_s",
    "bytes_per_s",
    "connections_per_principal_max",
    "queues_per_principal_max",
)

TOKEN_PREFIX = "mqd"
TOKEN_ID_BYTES = 6
TOKEN_SECRET_BYTES = 32
# scrypt cost: 16 MiB and ~50 ms per check on a laptop (not measured on servers).
# The verifier string carries its parameters, so raising them later keeps old
# verifiers valid: change the constants here, and rotate tokens to upgrade them.
SCRYPT_N = 2**14
SCRYPT_R = 8
SCRYPT_P = 1
SCRYPT_SALT_BYTES = 16
SCRYPT_HASH_BYTES = 32
SCRYPT_MAXMEM_BYTES = 64 * 1024 * 1024
VERIFIER_SCHEME = "scrypt"

_PRINCIPAL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")
_PATTERN = re.compile(r"\*|[A-Za-z0-9_-]+(\.fifo)?|[A-Za-z0-9_.-]*\*")
_TOKEN_ID = re.compile(r"[0-9a-f]{12}")


# --- tokens ---------------------------------------------------------------------


def new_token() -> tuple[str, str, str]:
    """A fresh token: (token_id, secret, the token text a client sends in HELLO)."""
    token_id = secrets.token_hex(TOKEN_ID_BYTES)
    secret = secrets.token_urlsafe(TOKEN_SECRET_BYTES)
    return token_id, secret, f"{TOKEN_PREFIX}_{token_id}_{secret}"


def parse_token(token: str) -> tuple[str, str] | None:
    """(token_id, secret) of a well-formed token, else None."""
    prefix, sep1, rest = token.partition("_")
    token_id, sep2, secret = rest.partition("_")
    if prefix != TOKEN_PREFIX or not sep1 or not sep2 or not secret:
        return None
    if not _TOKEN_ID.fullmatch(token_id):
        return None
    return token_id, secret


def make_verifier(secret: str, *, salt: bytes | None = None) -> str:
    """The stored form of a secret: `scrypt$N$r$p$salt$hash` (hex)."""
    salt = salt if salt is not None else secrets.token_bytes(SCRYPT_SALT_BYTES)
    digest = _scrypt(secret, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
    return f"{VERIFIER_SCHEME}${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${salt.hex()}${digest.hex()}"


def check_secret(secret: str, verifier: str) -> bool:
    """Whether `secret` matches `verifier`, compared in constant time."""
    try:
        scheme, n, r, p, salt_hex, hash_hex = verifier.split("$")
        if scheme != VERIFIER_SCHEME:
            return False
        salt, expected = bytes.fromhex(salt_hex), bytes.fromhex(hash_hex)
        digest = _scrypt(secret, salt, int(n), int(r), int(p))
    except ValueError:
        return False
    return hmac.compare_digest(digest, expected)


def _scrypt(secret: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(
        secret.encode("utf-8"),
        salt=salt,
        n=n,
        r=r,
        p=p,
        maxmem=SCRYPT_MAXMEM_BYTES,
        dklen=SCRYPT_HASH_BYTES,
    )


@functools.cache
def dummy_verifier() -> str:
    """Checked against an unknown token id, so it costs what a known one does."""
    return make_verifier("not a token", salt=bytes(SCRYPT_SALT_BYTES))


# --- names and patterns -----------------------------------------------------------


def validate_principal_name(name: str) -> str:
    if not isinstance(name, str) or not _PRINCIPAL_NAME.fullmatch(name):
        raise InvalidArgument(
            f"principal name {name!r}: 1-64 characters of A-Z a-z 0-9 _ . @ -, "
            "starting with a letter or digit"
        )
    if name == ANONYMOUS:
        raise InvalidArgument(f"principal name {ANONYMOUS!r} is reserved")
    return name


def validate_permission(permission: str) -> str:
    if permission not in PERMISSIONS:
        raise InvalidArgument(f"permission {permission!r}: must be one of {', '.join(PERMISSIONS)}")
    return permission


def validate_pattern(pattern: str) -> str:
    """A queue pattern: `*`, an exact queue name, or a prefix ending in `*`."""
    if not isinstance(pattern, str) or not _PATTERN.fullmatch(pattern) or len(pattern) > 81:
        raise InvalidArgument(
            f"queue pattern {pattern!r}: a queue name, `*`, or a prefix ending in `*` "
            "(like `orders-*`)"
        )
    return pattern


def pattern_matches(pattern: str, queue: str) -> bool:
    if pattern.endswith("*"):
        return queue.startswith(pattern[:-1])
    return pattern == queue


# --- the auth state: principals and grants ----------------------------------------------


@dataclass(slots=True, frozen=True)
class Principal:
    """A principal with a token. Certificate principals need no row (their CN is the name)."""

    name: str
    token_id: str
    verifier: str
    created_at_ms: int
    limits: dict[str, int] = field(default_factory=dict)


@dataclass(slots=True, frozen=True)
class Grant:
    principal: str
    pattern: str
    permission: str
    # Made by creating the queue (counts toward queues_per_principal_max).
    owner: bool = False


class AuthState:
    """An immutable snapshot of principals and grants, indexed for the hot path."""

    def __init__(self, principals: Iterable[Principal] = (), grants: Iterable[Grant] = ()) -> None:
        self.principals: dict[str, Principal] = {p.name: p for p in principals}
        self.by_token_id: dict[str, Principal] = {p.token_id: p for p in self.principals.values()}
        self.grants: dict[str, list[Grant]] = {}
        for grant in grants:
            self.grants.setdefault(grant.principal, []).append(grant)

    def allows(self, name: str, permission: str, queue: str) -> bool:
        if name == ROOT:
            return True
        return any(
            g.permission == permission and pattern_matches(g.pattern, queue)
            for g in self.grants.get(name, ())
        )

    def visible(self, name: str, queue: str) -> bool:
        """Whether the principal holds any permission on the queue."""
        if name == ROOT:
            return True
        return any(pattern_matches(g.pattern, queue) for g in self.grants.get(name, ()))

    def owned_queues(self, name: str) -> int:
        return sum(1 for g in self.grants.get(name, ()) if g.owner)

    def limits_of(self, name: str) -> dict[str, int]:
        principal = self.principals.get(name)
        return principal.limits if principal is not None else {}

    @functools.cached_property
    def version(self) -> int:
        """A digest of the whole state (never 0): equal versions, equal states. A cluster
        frontend sends it back to metadata to hear "unchanged" (protocol.md §7.17)."""
        rows = sorted(principal_row(p) for p in self.principals.values())
        grants = sorted(grant_row(g) for gs in self.grants.values() for g in gs)
        text = json.dumps([rows, grants], separators=(",", ":"))
        digest = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")
        return digest or 1


# --- the catalog tables (SQL shared by the server's aiosqlite and the CLI's sqlite3) --------

SCHEMA = (
    "CREATE TABLE IF NOT EXISTS principals ("
    " name TEXT PRIMARY KEY, token_id TEXT NOT NULL UNIQUE, verifier TEXT NOT NULL,"
    " created_at_ms INTEGER NOT NULL, limits TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS grants ("
    " principal TEXT NOT NULL, pattern TEXT NOT NULL, permission TEXT NOT NULL,"
    " owner INTEGER NOT NULL, PRIMARY KEY (principal, pattern, permission))",
)
SELECT_PRINCIPALS = "SELECT name, token_id, verifier, created_at_ms, limits FROM principals"
SELECT_GRANTS = "SELECT principal, pattern, permission, owner FROM grants"
PUT_PRINCIPAL = "INSERT OR REPLACE INTO principals VALUES (?, ?, ?, ?, ?)"
DELETE_PRINCIPAL = "DELETE FROM principals WHERE name = ?"
DELETE_PRINCIPAL_GRANTS = "DELETE FROM grants WHERE principal = ?"
# An existing grant keeps its owner flag unless this one is an owner grant.
PUT_GRANT = (
    "INSERT INTO grants VALUES (?, ?, ?, ?) ON CONFLICT (principal, pattern, permission)"
    " DO UPDATE SET owner = MAX(owner, excluded.owner)"
)
DELETE_GRANT = "DELETE FROM grants WHERE principal = ? AND pattern = ? AND permission = ?"
DELETE_QUEUE_GRANTS = "DELETE FROM grants WHERE pattern = ?"


def principal_row(principal: Principal) -> tuple[Any, ...]:
    return (
        principal.name,
        principal.token_id,
        principal.verifier,
        principal.created_at_ms,
        json.dumps(principal.limits, sort_keys=True),
    )


def principal_from_row(row: Iterable[Any]) -> Principal:
    name, token_id, verifier, created_at_ms, limits = row
    return Principal(name, token_id, verifier, created_at_ms, json.loads(limits))


def grant_row(grant: Grant) -> tuple[Any, ...]:
    return (grant.principal, grant.pattern, grant.permission, int(grant.owner))


def grant_from_row(row: Iterable[Any]) -> Grant:
    principal, pattern, permission, owner = row
    return Grant(principal, pattern, permission, bool(owner))


def require_queue_room(state: AuthState, name: str, limit: int) -> None:
    """FORBIDDEN if principal `name` has created `limit` queues already (0: no limit)."""
    owned = state.owned_queues(name)
    if limit and owned >= limit:
        raise Forbidden(
            f"principal {name!r} has created {owned} queues; queues_per_principal_max={limit}",
            details={"limit": "queues_per_principal_max"},
        )


class AuthCatalog(Protocol):
    """Where principals and grants live (the single node: `MetadataRole`)."""

    def auth_state(self) -> AuthState: ...
    async def refresh_auth(self) -> AuthState: ...


# --- rate limits ------------------------------------------------------------------------


class TokenBucket:
    """`rate` tokens per second, holding at most `capacity`.

    A request for n tokens goes through when the bucket holds min(n, capacity)
    (so a batch larger than the bucket is not refused forever) and may take it
    below zero; the debt is paid back before the next request goes through.
    """

    def __init__(self, rate_per_s: float, capacity: float, now_s: float) -> None:
        assert rate_per_s > 0 and capacity > 0
        self.rate_per_s = rate_per_s
        self.capacity = capacity
        self.tokens = capacity
        self._updated_s = now_s

    def _refill(self, now_s: float) -> None:
        elapsed = max(0.0, now_s - self._updated_s)
        self.tokens = min(self.capacity, self.tokens + elapsed * self.rate_per_s)
        self._updated_s = now_s

    def wait_s(self, amount: float, now_s: float) -> float:
        """Seconds until `amount` could be taken; 0 if it can be now."""
        self._refill(now_s)
        need = min(amount, self.capacity)
        if self.tokens >= need:
            return 0.0
        return (need - self.tokens) / self.rate_per_s

    def take(self, amount: float, now_s: float) -> None:
        self._refill(now_s)
        self.tokens -= amount


@dataclass(slots=True)
class Quotas:
    """Per-principal defaults from `[quotas]`; 0 = no limit."""

    messages_per_s: int = 0
    bytes_per_s: int = 0
    burst_ms: int = 1000
    connections_per_principal_max: int = 1000
    queues_per_principal_max: int = 1000


class RateLimiter:
    """The message and byte buckets of one principal."""

    def __init__(self, messages_per_s: int, bytes_per_s: int, burst_ms: int, now_s: float) -> None:
        burst_s = burst_ms / 1000
        self.limits = (messages_per_s, bytes_per_s)
        self.messages = (
            TokenBucket(messages_per_s, max(1.0, messages_per_s * burst_s), now_s)
            if messages_per_s
            else None
        )
        self.bytes = (
            TokenBucket(bytes_per_s, max(1.0, bytes_per_s * burst_s), now_s)
            if bytes_per_s
            else None
        )

    def check(self, messages: int, nbytes: int, now_s: float) -> float:
        """Seconds to wait before `messages` and `nbytes` may pass; 0: go."""
        wait = 0.0
        if self.messages is not None and messages:
            wait = max(wait, self.messages.wait_s(messages, now_s))
        if self.bytes is not None and nbytes:
            wait = max(wait, self.bytes.wait_s(nbytes, now_s))
        return wait

    def take(self, messages: int, nbytes: int, now_s: float) -> None:
        if self.messages is not None:
            self.messages.take(messages, now_s)
        if self.bytes is not None:
            self.bytes.take(nbytes, now_s)


# --- the frontend's authenticator ----------------------------------------------------------


@dataclass(slots=True, frozen=True)
class Session:
    """Who a connection is, fixed at HELLO."""

    name: str
    # The token id the principal logged in with ("" for a certificate or anonymous):
    # a rotated or removed token ends the connection at its next request.
    token_id: str = ""
    anonymous: bool = False


ANONYMOUS_SESSION = Session(ANONYMOUS, anonymous=True)
# How often a frontend looks for principals and grants changed by another writer
# (`mqd admin user …` on the node's host writes the catalog directly).
AUTH_REFRESH_S = 1.0


class Authenticator:
    """Authentication, authorisation and quotas for one frontend."""

    def __init__(
        self,
        catalog: AuthCatalog | None,
        *,
        enabled: bool,
        quotas: Quotas,
        failure_delay_ms: int = 200,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        assert catalog is not None or not enabled, "authentication needs a catalog"
        self.catalog = catalog
        self.enabled = enabled
        self.quotas = quotas
        self.failure_delay_s = failure_delay_ms / 1000
        self._monotonic = monotonic
        self._state = catalog.auth_state() if catalog is not None else AuthState()
        self._checked_s = monotonic()
        self._refreshing: asyncio.Future[AuthState] | None = None
        self._limiters: dict[str, RateLimiter] = {}
        self.connections: dict[str, int] = {}

    # --- the catalog snapshot ----------------------------------------------------------

    async def state(self, *, force: bool = False) -> AuthState:
        """The current snapshot, re-read from the catalog at most every AUTH_REFRESH_S."""
        if self.catalog is None:
            return self._state
        if not force and self._monotonic() - self._checked_s < AUTH_REFRESH_S:
            return self._state
        if self._refreshing is None:
            self._refreshing = asyncio.ensure_future(self._refresh())
        refreshing = self._refreshing
        return await asyncio.shield(refreshing)

    async def _refresh(self) -> AuthState:
        assert self.catalog is not None
        try:
            state = await self.catalog.refresh_auth()
            self._state = state
            self._checked_s = self._monotonic()
            self._limiters = {
                name: limiter
                for name, limiter in self._limiters.items()
                if limiter.limits == self._rates_of(state, name)
            }
            return state
        finally:
            self._refreshing = None

    # --- authentication ------------------------------------------------------------------

    async def authenticate(self, token: str, certificate_name: str | None) -> Session:
        """The session of a HELLO, or Unauthenticated (after the fixed failure delay)."""
        if not self.enabled:
            return ANONYMOUS_SESSION
        started_s = self._monotonic()
        # Always the catalog's latest (one cheap query when nothing changed): a token
        # or grant made, rotated or removed a moment ago by `mqd admin` counts at once.
        await self.state(force=True)
        session = None
        reason = "HELLO needs a token (or a client certificate)"
        if token:
            session = await self._check_token(token)
            reason = "the token is not valid"
        elif certificate_name:
            session = Session(certificate_name)
        if session is None:
            # The same answer after the same time, whatever went wrong (no timing oracle).
            await asyncio.sleep(max(0.0, started_s + self.failure_delay_s - self._monotonic()))
            raise Unauthenticated(reason)
        return session

    async def _check_token(self, token: str) -> Session | None:
        parsed = parse_token(token)
        token_id, secret = parsed if parsed is not None else ("", token)
        state = self._state
        principal = state.by_token_id.get(token_id)
        verifier = principal.verifier if principal is not None else dummy_verifier()
        ok = await asyncio.to_thread(check_secret, secret, verifier)
        if principal is None or not ok:
            return None
        return Session(principal.name, principal.token_id)

    def still_valid(self, session: Session) -> bool:
        """False once the session's token was rotated or its principal removed."""
        if not session.token_id:
            return True
        principal = self._state.principals.get(session.name)
        return principal is not None and principal.token_id == session.token_id

    # --- connections ---------------------------------------------------------------------

    def connection_opened(self, session: Session) -> None:
        """Count a connection against its principal, or raise Unavailable at the limit."""
        if session.anonymous:
            return
        limit = self._limit(session.name, "connections_per_principal_max")
        count = self.connections.get(session.name, 0)
        if limit and count >= limit:
            raise Unavailable(
                f"principal {session.name!r} has {count} connections open; "
                f"connections_per_principal_max={limit}",
                details={"limit": "connections_per_principal_max"},
            )
        self.connections[session.name] = count + 1

    def connection_closed(self, session: Session) -> None:
        if session.anonymous:
            return
        count = self.connections.get(session.name, 0) - 1
        if count > 0:
            self.connections[session.name] = count
        else:
            self.connections.pop(session.name, None)

    # --- authorisation --------------------------------------------------------------------

    def allows(self, session: Session, permission: str, queue: str) -> bool:
        return session.anonymous or self._state.allows(session.name, permission, queue)

    def require(
        self, session: Session, permission: str, queue: str, *, or_: tuple[str, ...] = ()
    ) -> None:
        """Raise FORBIDDEN naming the permission unless the session holds it (or one of
        `or_`) on `queue`.

        The check looks at the name only, before any lookup, so the answer is the
        same whether or not the queue exists (protocol.md §8.2).
        """
        if any(self.allows(session, p, queue) for p in (permission, *or_)):
            return
        target = "every queue" if queue == "*" else f"queue {queue!r}"
        raise Forbidden(
            f"principal {session.name!r} lacks the {permission!r} permission on {target}",
            details={"permission": permission},
        )

    def require_visible(self, session: Session, queue: str) -> None:
        if session.anonymous or self._state.visible(session.name, queue):
            return
        raise Forbidden(
            f"principal {session.name!r} has no permission on queue {queue!r} "
            "(send, receive or admin)",
            details={"permission": "send|receive|admin"},
        )

    def visible(self, session: Session, names: list[str]) -> list[str]:
        if session.anonymous:
            return names
        state = self._state
        return [name for name in names if state.visible(session.name, name)]

    def queue_owner(self, session: Session) -> tuple[str, int]:
        """Who a CREATE_QUEUE of this session creates for, and their queue quota (0: no
        limit): the catalog checks it, creates and records the creator grant as one
        step (protocol.md §8.2, §8.3). The anonymous principal owns nothing."""
        if session.anonymous:
            return "", 0
        if session.name == ROOT:
            return ROOT, 0
        return session.name, self._limit(session.name, "queues_per_principal_max")

    # --- rates ------------------------------------------------------------------------------

    def _limit(self, name: str, key: str) -> int:
        override = self._state.limits_of(name).get(key)
        return int(override) if override is not None else int(getattr(self.quotas, key))

    def _rates_of(self, state: AuthState, name: str) -> tuple[int, int]:
        limits = state.limits_of(name)
        return (
            int(limits.get("messages_per_s", self.quotas.messages_per_s)),
            int(limits.get("bytes_per_s", self.quotas.bytes_per_s)),
        )

    def _limiter(self, session: Session) -> RateLimiter | None:
        limiter = self._limiters.get(session.name)
        if limiter is None:
            messages_per_s, bytes_per_s = self._rates_of(self._state, session.name)
            if not messages_per_s and not bytes_per_s:
                return None
            limiter = self._limiters[session.name] = RateLimiter(
                messages_per_s, bytes_per_s, self.quotas.burst_ms, self._monotonic()
            )
        return limiter

    def metered(self, session: Session) -> bool:
        """Whether the principal has a rate limit (else its bytes need not be counted)."""
        return self._limiter(session) is not None

    def admit(self, session: Session, messages: int, nbytes: int, *, take: bool = True) -> None:
        """Take `messages` and `nbytes` from the principal's buckets, or raise THROTTLED.
        With `take=False` only check that they could be taken (charge later)."""
        limiter = self._limiter(session)
        if limiter is None:
            return
        now_s = self._monotonic()
        wait_s = limiter.check(messages, nbytes, now_s)
        if wait_s > 0:
            retry_after_ms = max(1, int(wait_s * 1000 + 0.999))
            raise Throttled(
                f"principal {session.name!r} is over its rate "
                f"(messages_per_s={limiter.limits[0]}, bytes_per_s={limiter.limits[1]}); "
                f"retry after {retry_after_ms} ms",
                details={"retry_after_ms": retry_after_ms},
            )
        if take:
            limiter.take(messages, nbytes, now_s)

    def charge(self, session: Session, messages: int, nbytes: int) -> None:
        """Take what a request used after the fact (RECEIVE: what it delivered)."""
        limiter = self._limiter(session)
        if limiter is not None:
            limiter.take(messages, nbytes, self._monotonic())

    def stats(self) -> dict[str, Any]:
        return {
            "auth": self.enabled,
            "principals_connected": len(self.connections),
        }
