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
import errno
import fcntl
import json
import os
import resource
import signal
import socket
import ssl
from pathlib import Path

import structlog

from mqd.auth import AuthCatalog, Authenticator
from mqd.backend import BackendRole
from mqd.clock import SystemClock
from mqd.config import Config, is_loopback, parse_address
from mqd.errors import ConfigError
from mqd.frontend import FrontendRole
from mqd.log import configure_logging
from mqd.metadata import Catalog, MetadataRole
from mqd.metrics import NodeMetrics
from mqd.receipts import ReceiptSigner, load_or_create_secret
from mqd.router import LocalCatalog, Router
from mqd.runtime import settle_heap
from mqd.storage import boot
from mqd.storage.fs import LoopSyncBudget
from mqd.storage.syncer import SyncProcess
from mqd.storage.uring import UringSyncer

log = structlog.get_logger("mqd.node")

DRAIN_TIMEOUT_S = 10.0
OPEN_FILES_WANTED = 1 << 20


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
        try:
            stored = json.loads(path.read_text())["node_id"]
            if not isinstance(stored, str) or not stored:
                raise ValueError("no node id")
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(
                f"node.data_dir (--data-dir): {str(path)!r} is damaged ({exc}); it holds "
                "this node's id: restore it, or remove it to start as a new node"
            ) from None
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
    """The client port's TLS context, or None for plaintext. Every `[tls]` file is
    loaded here, so one that cannot be read or is not PEM stops the start with a
    ConfigError naming its key (a cluster node's contexts load the same files)."""
    if not config.tls.cert:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_tls_chain(context, config.tls.cert, config.tls.key)
    if config.tls.ca:
        _load_tls_ca(context, config.tls.ca)
        context.verify_mode = (
            ssl.CERT_REQUIRED if config.tls.require_client_cert else ssl.CERT_OPTIONAL
        )
    return context


def _load_tls_chain(context: ssl.SSLContext, cert: str, key: str) -> None:
    for name, path in (("tls.cert", cert), ("tls.key", key)):
        _check_readable(name, path)

    def encrypted() -> str:
        # Without a callback OpenSSL would prompt on the terminal; a server starts unattended.
        raise ConfigError(f"tls.key: {key!r} is an encrypted private key; mqd needs it unencrypted")

    try:
        context.load_cert_chain(cert, key, password=encrypted)
    except ssl.SSLError as exc:
        if not _holds_certificate(cert):
            raise ConfigError(f"tls.cert: {cert!r} holds no PEM certificate") from None
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise ConfigError(
                f"tls.key: {key!r} is not the private key of tls.cert {cert!r}"
            ) from None
        if exc.reason is None:  # "PEM lib": the certificate loaded, the key did not
            raise ConfigError(f"tls.key: {key!r} holds no PEM private key") from None
        raise ConfigError(
            f"tls.cert: cannot use {cert!r} with tls.key {key!r}: {_ssl_reason(exc)}"
        ) from None
    except OSError as exc:
        raise ConfigError(
            f"tls.cert/tls.key: cannot read {exc.filename or cert!r}: {exc.strerror}"
        ) from None


def _load_tls_ca(context: ssl.SSLContext, ca: str) -> None:
    _check_readable("tls.ca", ca)
    try:
        context.load_verify_locations(cafile=ca)
    except ssl.SSLError as exc:
        raise ConfigError(
            f"tls.ca: {ca!r} holds no usable PEM CA certificate ({_ssl_reason(exc)})"
        ) from None
    except OSError as exc:
        raise ConfigError(f"tls.ca: cannot read {ca!r}: {exc.strerror}") from None


def _check_readable(name: str, path: str) -> None:
    try:
        with open(path, "rb") as handle:
            handle.read(1)
    except OSError as exc:
        raise ConfigError(f"{name}: cannot read {path!r}: {exc.strerror}") from None


def _holds_certificate(path: str) -> bool:
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=path)
    except (ssl.SSLError, OSError):
        return False
    return True


def _ssl_reason(exc: ssl.SSLError) -> str:
    return (exc.reason or "not valid PEM").lower().replace("_", " ")


def _raise_open_files_limit() -> None:
    """Take the hard limit on open files as the soft one, as servers (and Go's
    runtime) do: a partition holds ~4 descriptors (its segment, the syncer's copy,
    its index and WAL), so the usual soft 1,024 would cap a node near 200 of them."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # No hard limit: as many as Linux allows a process by default (fs.nr_open).
    wanted = OPEN_FILES_WANTED if hard == resource.RLIM_INFINITY else hard
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    except (ValueError, OSError) as exc:
        log.warning("node.open_files_limit", soft=soft, hard=hard, error=str(exc))
        return
    log.debug("node.open_files_limit", soft=wanted, was=soft)


async def run_node(config: Config, *, stop: asyncio.Event | None = None) -> int:
    # Every [tls] file is read before anything is written: a bad one names its key.
    ssl_context = _server_ssl_context(config)
    _check_ports_free(config)
    data_dir = config.data_dir
    _make_data_dir(data_dir)
    lock = DataDirLock(data_dir)
    try:
        lock.acquire()
    except OSError as exc:
        raise ConfigError(
            f"node.data_dir (--data-dir): cannot write {str(lock.path)!r}: {exc.strerror}"
        ) from None
    try:
        node_id = _node_id(config, data_dir)
        configure_logging(
            config.log.format, config.log.level, node_id=node_id, role="+".join(config.node.roles)
        )
        _raise_open_files_limit()
        _warn_open_key_files(config)
        if config.clustered:
            return await _serve_cluster(config, node_id, stop or asyncio.Event(), ssl_context)
        return await _serve(config, node_id, stop or asyncio.Event(), ssl_context)
    finally:
        lock.release()


# How long a stopping backend waits for metadata to take note that it is leaving.
LEAVE_TIMEOUT_S = 3.0


def _check_ports_free(config: Config) -> None:
    """A port another process holds fails the start before the data directory is
    touched: found only at the real bind, after recovery, it left node.json,
    receipt.key and catalog.db behind in a directory meant to be new. (A port
    taken between this check and that bind is still named there.)"""
    wanted = []
    if "frontend" in config.node.roles:
        wanted.append(("frontend.listen", config.frontend.listen))
    if config.metrics.listen:
        wanted.append(("metrics.listen", config.metrics.listen))
    if config.clustered and config.cluster.listen:
        wanted.append(("cluster.listen", config.cluster.listen))
    for key, text in wanted:
        host, port = parse_address(text, key=key)
        if port == 0:
            continue
        try:
            family, kind, proto, _, address = socket.getaddrinfo(
                host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )[0]
        except OSError:
            continue  # an unknown host: the real bind names it
        with socket.socket(family, kind, proto) as probe:
            # As asyncio's listener does, so a port in TIME_WAIT is not "in use".
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise ConfigError(
                        f"{key}: cannot listen on {text}: {exc.strerror} (another process "
                        "holds the port: stop it or choose another)"
                    ) from None


def _warn_open_key_files(config: Config) -> None:
    """Private keys others on the machine can read (as ssh warns of an open key)."""
    keys = [
        ("tls.key", config.tls.key),
        ("storage.encryption_key_file", config.storage.encryption_key_file),
        *(("storage.encryption_old_key_files", p) for p in config.storage.encryption_old_key_files),
    ]
    for key, path in keys:
        if not path:
            continue
        try:
            mode = os.stat(path).st_mode
        except OSError:
            continue  # loading it names the problem
        if mode & 0o077:
            log.warning(
                "key_file.open",
                key=key,
                path=path,
                mode=oct(mode & 0o777),
                hint=f"other users can read this private key: chmod 600 {path}",
            )


def _make_data_dir(data_dir: Path) -> None:
    """DATA_DIR and its parents; one that cannot be made names `node.data_dir`."""
    if data_dir.exists() and not data_dir.is_dir():
        raise ConfigError(f"node.data_dir (--data-dir): {str(data_dir)!r} is not a directory")
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"node.data_dir (--data-dir): cannot create {str(data_dir)!r}: {exc.strerror}"
        ) from None


async def _serve(
    config: Config, node_id: str, stop: asyncio.Event, ssl_context: ssl.SSLContext | None
) -> int:
    data_dir = config.data_dir
    clock = SystemClock()
    host, port = parse_address(config.frontend.listen, key="frontend.listen")
    signer = ReceiptSigner(load_or_create_secret(data_dir / "receipt.key"))
    catalog = await Catalog.open(data_dir / "catalog.db")
    backend = BackendRole(data_dir / "partitions", config.storage, signer)
    backend.loop_sync = LoopSyncBudget()  # no followers to serve meanwhile
    # Where the budget says no, io_uring rather than executor threads (mqd.storage.uring).
    backend.syncer = UringSyncer.open()
    metrics = NodeMetrics()
    metrics.watch_fsyncs()
    backend.commit_observer = metrics.observe_commit
    metrics.watch_queues(backend.partitions)
    metadata = MetadataRole(catalog, backend, config.limits, clock=clock)
    frontend: FrontendRole | None = None
    metrics_server: asyncio.Server | None = None
    try:
        queues = await metadata.start()
        backend.bind_catalog(metadata.lookup)
        await backend.start(queues)
        frontend = _frontend(
            config, Router(LocalCatalog(metadata, backend)), metadata, node_id, config.node.roles,
            clock, metrics,
        )  # fmt: skip
        try:
            address = await frontend.start(host, port, ssl_context)
        except OSError as exc:
            raise ConfigError(
                f"frontend.listen: cannot listen on {config.frontend.listen}: {exc.strerror}"
            ) from None
        metrics_server = await _serve_metrics(config, metrics)
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        _warn_if_insecure(config)
        settle_heap()
        log.info(
            "server.listening",
            address=address,
            tls=ssl_context is not None,
            auth=config.auth_enabled,
            data_dir=str(data_dir),
            queues=len(queues),
            fsync=config.storage.fsync,
        )
        await stop.wait()
        log.info("server.draining")
    finally:
        if metrics_server is not None:
            metrics_server.close()
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


def _frontend(
    config: Config,
    router: Router,
    auth_catalog: AuthCatalog | None,
    node_id: str,
    roles: list[str],
    clock: SystemClock,
    metrics: NodeMetrics,
) -> FrontendRole:
    """The client-facing role over `router`, authenticating against `auth_catalog`."""
    frontend = FrontendRole(
        router=router,
        limits=config.limits,
        node_id=node_id,
        roles=roles,
        clock=clock,
        auth=Authenticator(
            auth_catalog,
            enabled=config.auth_enabled,
            quotas=config.quotas,
            failure_delay_ms=config.auth.failure_delay_ms,
        ),
    )
    frontend.use_metrics(metrics, config.log.slow_request_ms)
    return frontend


def _warn_if_insecure(config: Config) -> None:
    """Said at every start: a client port beyond loopback without TLS or authentication."""
    if config.insecure_exposed:
        log.warning(
            "server.insecure",
            address=config.frontend.listen,
            tls=bool(config.tls.cert),
            auth=config.auth_enabled,
            reason="frontend.insecure = true: clients beyond loopback are served"
            + ("" if config.tls.cert else " in plaintext")
            + ("" if config.auth_enabled else " without authentication"),
        )


async def _serve_metrics(config: Config, metrics: NodeMetrics) -> asyncio.Server | None:
    if not config.metrics.listen:
        return None
    host, port = parse_address(config.metrics.listen, key="metrics.listen")
    try:
        server, address = await metrics.serve(host, port)
    except OSError as exc:
        raise ConfigError(
            f"metrics.listen: cannot listen on {config.metrics.listen}: {exc.strerror}"
        ) from None
    log.info("metrics.listening", address=address, path="/metrics")
    if not is_loopback(host):
        # Plain HTTP with no authentication: queue names and traffic for anyone who asks.
        log.warning(
            "metrics.exposed",
            address=address,
            hint="the metrics endpoint has no TLS or authentication; keep it on a "
            "trusted network or behind a proxy that adds them",
        )
    return server


async def _listen(
    server: FrontendRole, address_text: str, key: str, context: ssl.SSLContext | None
) -> str:
    host, port = parse_address(address_text, key=key)
    try:
        return await server.start(host, port, context)
    except OSError as exc:
        raise ConfigError(f"{key}: cannot listen on {address_text}: {exc.strerror}") from None


async def _serve_cluster(
    config: Config, node_id: str, stop: asyncio.Event, ssl_context: ssl.SSLContext | None
) -> int:
    """One node of a cluster: the roles its config names, each in its own process.

    Every node listens on the cluster port (mutual TLS), registers with metadata
    and heartbeats; a backend serves the partitions placement gives it, a
    frontend routes clients with a cached placement (DESIGN.md §2, §6).
    """
    from mqd.cluster.placement import PlacementManager, RecordStore
    from mqd.cluster.remote import RemoteAuthCatalog, RemoteCatalog
    from mqd.cluster.rpc import PeerPool
    from mqd.cluster.service import BackendService, ClusterServer, Membership
    from mqd.cluster.tls import cluster_client_context, cluster_server_context
    from mqd.cluster.view import PlacementView
    from mqd.protocol.messages import NodeInfo

    data_dir = config.data_dir
    clock = SystemClock()
    roles = config.node.roles
    cluster_address = config.cluster.advertise or config.cluster.listen
    peers = PeerPool(node_id, cluster_client_context(config))
    view = PlacementView(
        peers,
        config.cluster.metadata,
        cache_file=data_dir / "placement.json" if "backend" in roles else None,
    )
    membership = Membership(
        view,
        NodeInfo(
            node_id=node_id,
            roles=list(roles),
            client_address=config.frontend.listen if "frontend" in roles else "",
            cluster_address=cluster_address,
        ),
        config.cluster.heartbeat_interval_ms,
    )
    metadata: MetadataRole | None = None
    placement: PlacementManager | None = None
    backend: BackendRole | None = None
    service: BackendService | None = None
    cluster_server: ClusterServer | None = None
    frontend: FrontendRole | None = None
    loop = asyncio.get_running_loop()
    metrics = NodeMetrics()
    metrics.watch_fsyncs()
    metrics_server: asyncio.Server | None = None
    failures: list[str] = []
    drained = False

    def fail_stop(reason: str) -> None:
        failures.append(reason)
        stop.set()

    try:
        if "metadata" in roles:
            placement = PlacementManager(
                await RecordStore.open(data_dir / "placement.db"),
                vnodes=config.cluster.vnodes,
                session_timeout_ms=config.cluster.session_timeout_ms,
            )
            metadata = MetadataRole(
                await Catalog.open(data_dir / "catalog.db"), placement, config.limits, clock=clock
            )
            await metadata.start()
            await placement.start(metadata.queues)
        if "backend" in roles:
            # Before registering: metadata learns from it whether this node's follower
            # copies may have lost acknowledged records (mqd.storage.boot).
            membership.rebooted_unclean = await asyncio.to_thread(boot.start_running, data_dir)
            if membership.rebooted_unclean:
                log.warning("node.rebooted_unclean", data_dir=str(data_dir))
            view.load_cache()
            secret_file = data_dir / "cluster-receipt.key"
            secret = await _cluster_receipt_secret(membership, secret_file, placement)
            backend = BackendRole(data_dir / "partitions", config.storage, ReceiptSigner(secret))
            backend.commit_observer = metrics.observe_commit
            metrics.watch_queues(backend.partitions)
            # A replicated leader's fsyncs overlap its followers' fetches; handed to
            # a thread they wait on the GIL (mqd.storage.syncer). A single node syncs
            # small groups on its loop instead (LoopSyncBudget, measured better there).
            # io_uring in its place measured the same here (README, Performance).
            backend.syncer = await SyncProcess.start()
            await backend.start([], remove_orphans=False)
            service = BackendService(
                backend,
                view,
                peers,
                node_id=node_id,
                limits=config.limits,
                replica_lag_max_ms=config.cluster.replica_lag_max_ms,
            )
            service.fail_stop = fail_stop
            await service.sync_partitions()
            service.start()
        cluster_server = ClusterServer(
            limits=config.limits,
            node_id=node_id,
            roles=roles,
            clock=clock,
            metadata=metadata,
            placement=placement,
            backend=service,
            view=view,
            peers=peers,
        )
        cluster_server.use_metrics(metrics, config.log.slow_request_ms)
        address = await _listen(
            cluster_server, config.cluster.listen, "cluster.listen", cluster_server_context(config)
        )
        log.info("server.listening", address=address, port="cluster", roles=roles)
        membership.start()
        view.start()
        if "frontend" in roles:
            # Principals and grants live in metadata's catalog: a cached copy (protocol.md
            # §7.17, §8.5), fetched once now so the first HELLO finds it.
            auth_catalog = RemoteAuthCatalog(view) if config.auth_enabled else None
            if auth_catalog is not None:
                await auth_catalog.refresh_auth()
            frontend = _frontend(
                config, Router(RemoteCatalog(view, peers)), auth_catalog, node_id, roles, clock,
                metrics,
            )  # fmt: skip
            client_address = await _listen(
                frontend, config.frontend.listen, "frontend.listen", ssl_context
            )
            log.info(
                "server.listening",
                address=client_address,
                port="client",
                tls=bool(config.tls.cert),
                auth=config.auth_enabled,
            )
            _warn_if_insecure(config)
        metrics_server = await _serve_metrics(config, metrics)
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        settle_heap()
        await stop.wait()
        log.info("server.draining")
        drained = True
    finally:
        if placement is not None:
            await placement.stop_deciding()
        if metrics_server is not None:
            metrics_server.close()
        if frontend is not None:
            await frontend.drain(DRAIN_TIMEOUT_S)
        if cluster_server is not None:
            await cluster_server.drain(DRAIN_TIMEOUT_S)
        if drained and service is not None and placement is None:
            # Its writes in flight are done: its partitions can move now (a co-located
            # metadata node takes the placement with it, so it says nothing).
            await membership.leave(LEAVE_TIMEOUT_S)
        await membership.close()
        await view.close()
        if service is not None:
            await service.close()
        if backend is not None:
            await backend.close()
        if metadata is not None:
            await metadata.close()
        if placement is not None:
            await placement.close()
        if drained and not failures and backend is not None:
            await asyncio.to_thread(boot.stopped_cleanly, data_dir)
        await peers.close()
        for signum in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(signum)
    if failures:
        # Fail-stop: a supervisor sees the exit status, and metadata moves the node's
        # partitions to their other in-sync replicas once its heartbeats have stopped
        # (protocol.md §7.13 "A leader's failed fsync").
        log.error("server.stopped", failures=failures)
        return 1
    log.info("server.stopped")
    return 0


async def _cluster_receipt_secret(membership, secret_file: Path, placement) -> bytes:  # type: ignore[no-untyped-def]
    """The cluster-wide receipt secret: from metadata (itself, if co-located), else the copy
    kept from the last registration, so a backend serves while metadata is down."""
    if placement is not None:
        secret = placement.receipt_secret
    else:
        try:
            await membership.register()
            secret = membership.receipt_secret
        except Exception as exc:
            if not await asyncio.to_thread(secret_file.exists):
                raise ConfigError(
                    f"cluster.metadata: cannot reach metadata to join the cluster ({exc})"
                ) from None
            log.warning("cluster.metadata_unreachable", error=str(exc))
            return await asyncio.to_thread(secret_file.read_bytes)
    await asyncio.to_thread(_keep_secret, secret_file, secret)
    return secret


def _keep_secret(path: Path, secret: bytes) -> None:
    if path.exists() and path.read_bytes() == secret:
        return
    temp = path.with_suffix(".tmp")
    temp.write_bytes(secret)
    os.chmod(temp, 0o600)
    with open(temp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(temp, path)
