"""The supervisor: one process, the roles its config names, an orderly drain.

`run_node` owns the data directory (locked for the life of the process),
wires the roles together in-process (the same interfaces the cluster will
use over the network) and stops them in order on SIGTERM/SIGINT: stop
accepting, end long polls, finish in-flight requests and commits, fsync,
close.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import signal
import ssl
from pathlib import Path

import structlog

from mqd.backend import BackendRole
from mqd.clock import SystemClock
from mqd.config import Config, parse_address
from mqd.errors import ConfigError
from mqd.frontend import FrontendRole
from mqd.log import configure_logging
from mqd.metadata import Catalog, MetadataRole
from mqd.receipts import ReceiptSigner, load_or_create_secret
from mqd.router import LocalCatalog, Router

log = structlog.get_logger("mqd.node")

DRAIN_TIMEOUT_S = 10.0


class DataDirLock:
    """An exclusive flock on DATA_DIR/LOCK, released when the process exits."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / "LOCK"
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise ConfigError(
                f"node.data_dir: {self.path.parent} is in use by another mqd process (pid {holder})"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _node_id(config: Config, data_dir: Path) -> str:
    path = data_dir / "node.json"
    if path.exists():
        stored = json.loads(path.read_text())["node_id"]
        if config.node.id and config.node.id != stored:
            raise ConfigError(
                f"node.id: {config.node.id!r} but {data_dir} belongs to node {stored!r}"
            )
        return stored
    node_id = config.node.id or f"node-{os.urandom(3).hex()}"
    temp = path.with_suffix(".tmp")
    temp.write_text(json.dumps({"node_id": node_id}) + "\n")
    with open(temp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(temp, path)
    return node_id


def _server_ssl_context(config: Config) -> ssl.SSLContext | None:
    if not config.tls.cert:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(config.tls.cert, config.tls.key)
    if config.tls.ca:
        context.load_verify_locations(config.tls.ca)
        context.verify_mode = (
            ssl.CERT_REQUIRED if config.tls.require_client_cert else ssl.CERT_OPTIONAL
        )
    return context


async def run_node(config: Config, *, stop: asyncio.Event | None = None) -> int:
    data_dir = config.data_dir
    data_dir.mkdir(parents=True, exist_ok=True)
    lock = DataDirLock(data_dir)
    lock.acquire()
    try:
        node_id = _node_id(config, data_dir)
        configure_logging(
            config.log.format, config.log.level, node_id=node_id, role="+".join(config.node.roles)
        )
        return await _serve(config, node_id, stop or asyncio.Event())
    finally:
        lock.release()


async def _serve(config: Config, node_id: str, stop: asyncio.Event) -> int:
    data_dir = config.data_dir
    clock = SystemClock()
    host, port = parse_address(config.frontend.listen, key="frontend.listen")
    ssl_context = _server_ssl_context(config)
    signer = ReceiptSigner(load_or_create_secret(data_dir / "receipt.key"))
    catalog = await Catalog.open(data_dir / "catalog.db")
    backend = BackendRole(data_dir / "partitions", config.storage, signer)
    metadata = MetadataRole(catalog, backend, config.limits, clock=clock)
    frontend: FrontendRole | None = None
    try:
        queues = await metadata.start()
        backend.bind_catalog(metadata.lookup)
        await backend.start(queues)
        frontend = FrontendRole(
            router=Router(LocalCatalog(metadata, backend)),
            limits=config.limits,
            node_id=node_id,
            roles=config.node.roles,
            clock=clock,
        )
        try:
            address = await frontend.start(host, port, ssl_context)
        except OSError as exc:
            raise ConfigError(
                f"frontend.listen: cannot listen on {config.frontend.listen}: {exc.strerror}"
            ) from None
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        log.info(
            "server.listening",
            address=address,
            tls=ssl_context is not None,
            data_dir=str(data_dir),
            queues=len(queues),
            fsync=config.storage.fsync,
        )
        await stop.wait()
        log.info("server.draining")
    finally:
        if frontend is not None:
            await frontend.drain(DRAIN_TIMEOUT_S)
        await backend.close()
        await metadata.close()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(signum)
    log.info("server.stopped")
    return 0
