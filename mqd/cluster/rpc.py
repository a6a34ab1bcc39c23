"""Node-to-node calls: pooled, multiplexed connections over mutual TLS.

A node keeps one connection per peer address (the client library's
`Connection`, which multiplexes many requests with correlation ids) and
reopens it on the next call after it is lost. A call is never retried after
its request may have left: only the caller knows whether that is safe.
"""

from __future__ import annotations

import asyncio
import math
import ssl
from typing import Any

import structlog

from mqd import stages
from mqd.client.connection import Connection
from mqd.config import parse_address
from mqd.errors import ConnectionClosed, RequestTimeout, Unavailable

log = structlog.get_logger("mqd.cluster.rpc")

CONNECT_TIMEOUT_S = 5.0
REQUEST_TIMEOUT_S = 30.0


class PeerPool:
    def __init__(self, node_id: str, tls: ssl.SSLContext | None) -> None:
        self._node_id = node_id
        self._tls = tls
        self._connections: dict[str, Connection] = {}
        self._opening: dict[str, asyncio.Lock] = {}
        self._closed = False

    async def _connection(self, address: str) -> Connection:
        conn = self._connections.get(address)
        if conn is not None and conn.usable():
            return conn
        lock = self._opening.setdefault(address, asyncio.Lock())
        async with lock:
            conn = self._connections.get(address)
            if conn is not None and conn.usable():
                return conn
            if self._closed:
                raise Unavailable("this node is shutting down")
            host, port = parse_address(address, key="peer address")
            try:
                conn = await Connection.open(
                    host,
                    port,
                    tls=self._tls,
                    client_name=f"mqd-node/{self._node_id}",
                    connect_timeout_s=CONNECT_TIMEOUT_S,
                    request_timeout_s=REQUEST_TIMEOUT_S,
                )
            except (OSError, ConnectionClosed, RequestTimeout, ssl.SSLError) as exc:
                raise Unavailable(
                    f"node at {address} is unreachable: {exc}", details={"not_applied": True}
                ) from exc
            self._connections[address] = conn
            return conn

    async def call(self, address: str, msg: Any, *, timeout_s: float | None = None) -> Any:
        """Send `msg` to the node at `address`; its response, or the error it raised.

        Unreachable peers and connections lost mid-call raise Unavailable.
        """
        conn = await self._connection(address)
        try:
            return await stages.timed("peer", conn.request(msg, timeout_s=timeout_s))
        except ConnectionClosed as exc:
            raise Unavailable(f"lost the connection to {address}: {exc}") from exc

    async def close(self) -> None:
        self._closed = True
        connections, self._connections = list(self._connections.values()), {}
        for conn in connections:
            await conn.close()


NO_TIMEOUT = math.inf
