"""`mqd cluster`: a whole cluster on one machine, for tests and for trying it out.

    mqd cluster start --dir D [--backends 3] [--frontends 2] [--metadata 1]
                      [--fsync always|interval|never]
    mqd cluster status --dir D [--json]
    mqd cluster stop --dir D
    mqd cluster kill --dir D NODE_ID
    mqd cluster restart --dir D NODE_ID

`start` writes everything a cluster needs into D (DESIGN.md §6): a CA and one
certificate per node (`mqd.certs`), one TOML config per node (the format
`mqd serve --config` reads, see `config/cluster/`), and `D/cluster.json`, the
manifest every other subcommand reads. Each node is then a background
`mqd serve` process (its own session, so it outlives the launcher) with its
data dir, log file and pid file under `D/nodes/ID/`:

    D/cluster.json
    D/root.token  (principal root's token, mode 0600; used when [auth] is on)
    D/certs/ca.pem, ca.key, ID.pem, ID.key
    D/nodes/ID/config.toml, node.log, pid, data/

The launcher only ever signals a pid it recorded, and only after checking in
/proc that the pid still runs `mqd serve --config D/nodes/ID/config.toml`
(pids get reused). Every wait is bounded.

`--fsync` sets `[storage] fsync` in every node's config: when the cluster is
made, or, for a stopped cluster, by rewriting that one line of each config
(the rest of a config, edits included, is kept).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import signal
import socket
import ssl
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MANIFEST_NAME = "cluster.json"
# Version of the manifest layout; a reader refuses a version it does not know.
# To change it: bump, keep reading the old layout (or refuse it with a message
# telling the user to start a fresh directory), and say so here.
MANIFEST_FORMAT = 1

ROLES_START_ORDER = ("metadata", "backend", "frontend")
ROLES_STOP_ORDER = ("frontend", "backend", "metadata")
ROLE_GROUP_KEYS = {"frontend": "frontends", "backend": "backends", "metadata": "metadata"}

START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 20.0
KILL_WAIT_S = 5.0
EXEC_WAIT_S = 5.0
POLL_INTERVAL_S = 0.2
# Per attempt while polling a frontend; the overall deadline bounds the total.
PROBE_TIMEOUT_S = 2.0
LOG_TAIL_LINES = 20
NODE_COUNT_MAX = 64

SESSION_TIMEOUT_MS = 6000
HEARTBEAT_INTERVAL_MS = 1000
CERT_SANS = ("localhost", "127.0.0.1")

LISTENING_EVENT = "server.listening"
# The token of principal `root`, made with the cluster (protocol.md §8.5).
ROOT_TOKEN_NAME = "root.token"


class LauncherError(Exception):
    """A launcher failure reported to the user as a message (exit status 1)."""


# ---------------------------------------------------------------------------
# The manifest


@dataclass(slots=True)
class NodeEntry:
    """One node of a launched cluster. Paths are relative to the cluster directory."""

    id: str
    role: str
    cluster_address: str
    client_address: str = ""  # frontends only
    config: str = ""
    log: str = ""
    pid_file: str = ""
    data_dir: str = ""
    cert: str = ""
    key: str = ""

    @property
    def address(self) -> str:
        """The address a user talks to: the client port of a frontend, else the cluster port."""
        return self.client_address or self.cluster_address


@dataclass(slots=True)
class Manifest:
    """`D/cluster.json`: what `start` made, read by status, stop, kill and restart."""

    directory: Path
    nodes: list[NodeEntry] = field(default_factory=list)
    ca: str = "certs/ca.pem"
    ca_key: str = "certs/ca.key"
    format: int = MANIFEST_FORMAT

    def path(self, relative: str) -> Path:
        return self.directory / relative

    def node(self, node_id: str) -> NodeEntry:
        for node in self.nodes:
            if node.id == node_id:
                return node
        raise LauncherError(
            f"no node {node_id!r} in {self.directory}; nodes are "
            + ", ".join(node.id for node in self.nodes)
        )

    def by_role(self, role: str) -> list[NodeEntry]:
        return [node for node in self.nodes if node.role == role]

    def in_order(self, roles: Sequence[str]) -> list[NodeEntry]:
        return [node for role in roles for node in self.by_role(role)]

    @property
    def client_ca(self) -> Path:
        return self.path(self.ca)

    def save(self) -> None:
        data = {
            "format": self.format,
            "ca": self.ca,
            "ca_key": self.ca_key,
            "nodes": [asdict(node) for node in self.nodes],
        }
        _write_atomic(self.directory / MANIFEST_NAME, json.dumps(data, indent=2) + "\n")

    @classmethod
    def load(cls, directory: Path) -> Manifest:
        path = directory / MANIFEST_NAME
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise LauncherError(
                f"{directory}: no cluster here (no {MANIFEST_NAME}); "
                f"`mqd cluster start --dir {directory}` makes one"
            ) from None
        except (OSError, ValueError) as exc:
            raise LauncherError(f"{path}: unreadable manifest: {exc}") from None
        if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
            raise LauncherError(
                f"{path}: manifest format {data.get('format') if isinstance(data, dict) else '?'!r}"
                f" is not {MANIFEST_FORMAT}; start a fresh directory"
            )
        try:
            nodes = [NodeEntry(**node) for node in data["nodes"]]
            return cls(directory=directory, nodes=nodes, ca=data["ca"], ca_key=data["ca_key"])
        except (KeyError, TypeError) as exc:
            raise LauncherError(f"{path}: malformed manifest: {exc}") from None

    @classmethod
    def exists(cls, directory: Path) -> bool:
        return (directory / MANIFEST_NAME).is_file()


def _write_atomic(path: Path, text: str) -> None:
    """Write to a temp file, fsync, rename (STYLE.md: metadata files)."""
    temp = path.with_name(path.name + ".tmp")
    with open(temp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temp, path)


# ---------------------------------------------------------------------------
# Ports, certificates, configs


def allocate_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct free ports on `host`, below the kernel's ephemeral range.

    A node keeps its port across restarts; a port from the ephemeral range
    (bind to port 0) can meanwhile be handed to any outgoing connection on the
    machine — the cluster's own node-to-node links included — and the restart
    then fails to listen. Ports below that range are only taken by listeners.
    """
    low, high = _LISTEN_PORT_RANGE
    rng = random.Random()
    sockets: list[socket.socket] = []
    ports: list[int] = []
    try:
        for _ in range(count * 50):
            if len(ports) == count:
                break
            port = rng.randrange(low, high)
            if port in ports:
                continue
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                sock.bind((host, port))
            except OSError:
                sock.close()
                continue
            sock.listen()  # held until all are chosen, so they are distinct
            sockets.append(sock)
            ports.append(port)
        if len(ports) < count:
            raise LauncherError(f"could not find {count} free ports in {low}-{high} on {host}")
        return ports
    finally:
        for sock in sockets:
            sock.close()


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as handle:
            return int(handle.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


# Listening ports for launched nodes: below the ephemeral range (see allocate_ports).
_LISTEN_PORT_RANGE = (max(10_000, _ephemeral_low() - 12_768), _ephemeral_low())


def plan_nodes(metadata: int, backends: int, frontends: int) -> Manifest:
    """The node list of a new cluster (paths relative to its directory, no ports yet)."""
    manifest = Manifest(directory=Path("."))
    for role, count in (("metadata", metadata), ("backend", backends), ("frontend", frontends)):
        for index in range(1, count + 1):
            manifest.nodes.append(node_entry(f"{role}-{index}", role))
    return manifest


def node_entry(node_id: str, role: str) -> NodeEntry:
    """A node's entry with the standard layout under the cluster directory (no ports yet)."""
    base = f"nodes/{node_id}"
    return NodeEntry(
        id=node_id,
        role=role,
        cluster_address="",
        config=f"{base}/config.toml",
        log=f"{base}/node.log",
        pid_file=f"{base}/pid",
        data_dir=f"{base}/data",
        cert=f"certs/{node_id}.pem",
        key=f"certs/{node_id}.key",
    )


def add_backend(manifest: Manifest, node_id: str, timeout_s: float = START_TIMEOUT_S) -> NodeEntry:
    """Grow a launched cluster by one backend: port, certificate, config, start it."""
    if any(node.id == node_id for node in manifest.nodes):
        raise LauncherError(f"{node_id}: a node with this id exists already")
    node = node_entry(node_id, "backend")
    (port,) = allocate_ports(1)
    node.cluster_address = f"127.0.0.1:{port}"
    _make_certificates(Manifest(manifest.directory, [node], manifest.ca, manifest.ca_key))
    manifest.path(node.data_dir).mkdir(parents=True, exist_ok=True)
    _write_atomic(manifest.path(node.config), render_config(manifest, node))
    manifest.nodes.append(node)
    manifest.save()
    restart_node(manifest, node, timeout_s)
    return node


def _toml_string(value: str) -> str:
    # A JSON string (", \\, \n, \uXXXX escapes) is a valid TOML basic string.
    return json.dumps(value)


def _toml_list(values: Iterable[str]) -> str:
    return "[" + ", ".join(_toml_string(value) for value in values) + "]"


# mqd.storage.config.FSYNC_POLICIES, spelled out: importing the storage package here
# would slow every `mqd` command, which all build this parser (a test keeps them equal).
FSYNC_POLICIES = ("always", "interval", "never")
# The line `render_config` writes in [storage]; `set_fsync` rewrites only it.
_FSYNC_LINE = re.compile(r'^fsync = "[a-z]+"$', re.MULTILINE)


def render_config(manifest: Manifest, node: NodeEntry, fsync: str = "always") -> str:
    """The TOML `mqd serve --config` reads for `node`; paths absolute, so any cwd works."""
    directory = manifest.directory.resolve()
    metadata_addresses = [entry.cluster_address for entry in manifest.by_role("metadata")]
    lines = [
        f"# {node.id}: written by `mqd cluster start`; `mqd cluster restart` reuses it.",
        "# Every key not set here has its default (config/single.toml lists them all).",
        "",
        "[node]",
        f"id = {_toml_string(node.id)}",
        f"roles = {_toml_list([node.role])}",
        f"data_dir = {_toml_string(str(directory / node.data_dir))}",
        "",
    ]
    if node.role == "frontend":
        lines += [
            "[frontend]",
            "# Client port: TLS with this node's certificate (see [tls]).",
            f"listen = {_toml_string(node.client_address)}",
            "",
        ]
    lines += [
        "[cluster]",
        "# Node-to-node port (mutual TLS with the cluster CA).",
        f"listen = {_toml_string(node.cluster_address)}",
        f"metadata = {_toml_list(metadata_addresses)}",
        f"session_timeout_ms = {SESSION_TIMEOUT_MS}",
        f"heartbeat_interval_ms = {HEARTBEAT_INTERVAL_MS}",
        "",
        "[tls]",
        f"cert = {_toml_string(str(directory / node.cert))}",
        f"key = {_toml_string(str(directory / node.key))}",
        f"ca = {_toml_string(str(directory / manifest.ca))}",
        "# Client certificates are optional on the client port.",
        "require_client_cert = false",
        "",
        "[storage]",
        f"fsync = {_toml_string(fsync)}",
        "",
        "[log]",
        'format = "json"',
        "",
    ]
    return "\n".join(lines)


def _make_certificates(manifest: Manifest) -> None:
    """The cluster CA and one node certificate per node, kept if already there."""
    from mqd import certs

    directory = manifest.directory / "certs"
    directory.mkdir(parents=True, exist_ok=True)
    if not manifest.client_ca.is_file():
        certs.init_ca(directory)
    for node in manifest.nodes:
        if not manifest.path(node.cert).is_file():
            certs.issue(directory, node.id, sans=list(CERT_SANS))
    missing = [
        path
        for path in (manifest.client_ca, *(manifest.path(n.cert) for n in manifest.nodes))
        if not path.is_file()
    ]
    if missing:
        raise LauncherError(
            "mqd.certs did not write the expected files: " + ", ".join(str(p) for p in missing)
        )


def create_cluster(
    directory: Path, *, metadata: int, backends: int, frontends: int, fsync: str = "always"
) -> Manifest:
    """Write ports, certificates, configs and the manifest of a new cluster into `directory`."""
    _check_fsync(fsync)
    for name, count, low in (("metadata", metadata, 1), ("backends", backends, 1)):
        if not low <= count <= NODE_COUNT_MAX:
            raise LauncherError(f"--{name}: must be from {low} to {NODE_COUNT_MAX}, got {count}")
    if not 1 <= frontends <= NODE_COUNT_MAX:
        raise LauncherError(f"--frontends: must be from 1 to {NODE_COUNT_MAX}, got {frontends}")
    manifest = plan_nodes(metadata, backends, frontends)
    manifest.directory = directory
    frontends_list = manifest.by_role("frontend")
    ports = allocate_ports(len(manifest.nodes) + len(frontends_list))
    for node in manifest.nodes:
        node.cluster_address = f"127.0.0.1:{ports.pop()}"
    for node in frontends_list:
        node.client_address = f"127.0.0.1:{ports.pop()}"
    directory.mkdir(parents=True, exist_ok=True)
    _make_certificates(manifest)
    for node in manifest.nodes:
        manifest.path(node.data_dir).mkdir(parents=True, exist_ok=True)
        _write_atomic(manifest.path(node.config), render_config(manifest, node, fsync))
    _create_root(manifest)
    manifest.save()
    return manifest


def _check_fsync(fsync: str) -> None:
    if fsync not in FSYNC_POLICIES:
        raise LauncherError(f"--fsync: must be one of {', '.join(FSYNC_POLICIES)}, got {fsync!r}")


def set_fsync(manifest: Manifest, fsync: str) -> list[str]:
    """Set `[storage] fsync` in every node's config; the ids of the configs it changed.

    Checks every config before writing any, so a config edited beyond recognition
    leaves them all as they were."""
    _check_fsync(fsync)
    texts = {}
    for node in manifest.nodes:
        path = manifest.path(node.config)
        text = path.read_text(encoding="utf-8")
        if len(_FSYNC_LINE.findall(text)) != 1:
            raise LauncherError(
                f"{path}: no single `fsync = ...` line to set; set [storage] fsync there by hand"
            )
        texts[node.id] = (path, text)
    changed = []
    for node_id, (path, text) in texts.items():
        new = _FSYNC_LINE.sub(f"fsync = {_toml_string(fsync)}", text)
        if new != text:
            _write_atomic(path, new)
            changed.append(node_id)
    return changed


def _create_root(manifest: Manifest) -> None:
    """Principal `root` in every metadata node's catalog, its token in D/root.token (0600).

    Written before the nodes first start, as `mqd admin user add root --data-dir`
    would; authentication stays off unless a node's config turns it on.
    """
    import sqlite3

    from mqd import auth

    path = manifest.path(ROOT_TOKEN_NAME)
    if path.exists():
        return
    token_id, secret, token = auth.new_token()
    root = auth.Principal(
        auth.ROOT, token_id, auth.make_verifier(secret), int(time.time() * 1000), {}
    )
    for node in manifest.by_role("metadata"):
        db = sqlite3.connect(manifest.path(node.data_dir) / "catalog.db", isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            for statement in auth.SCHEMA:
                db.execute(statement)
            db.execute(auth.PUT_PRINCIPAL, auth.principal_row(root))
        finally:
            db.close()
    temp = path.with_name(path.name + ".tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with open(fd, "w", encoding="utf-8") as handle:
        handle.write(token + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temp, path)


def root_token(manifest: Manifest) -> str | None:
    """Principal root's token (D/root.token), if the cluster has one."""
    try:
        return manifest.path(ROOT_TOKEN_NAME).read_text(encoding="utf-8").strip() or None
    except FileNotFoundError:
        return None


# ---------------------------------------------------------------------------
# Processes


def _proc_argv(pid: int) -> list[str] | None:
    """The argv of a live process, or None (gone, a zombie, or not ours to read)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    if not raw:  # zombies and kernel threads have no cmdline
        return None
    return [part.decode(errors="replace") for part in raw.rstrip(b"\0").split(b"\0")]


def is_node_process(pid: int, config_path: Path) -> bool:
    """Whether `pid` runs `mqd serve --config config_path` (pids get reused)."""
    argv = _proc_argv(pid)
    if argv is None:
        return False
    try:
        index = argv.index("--config")
    except ValueError:
        return False
    if index + 1 >= len(argv) or "serve" not in argv[:index]:
        return False
    runs_mqd = any(arg == "mqd" or arg.endswith("/mqd") for arg in argv[:index])
    return runs_mqd and Path(argv[index + 1]) == config_path.resolve()


def _reap(pid: int) -> None:
    # A node started by this process (e.g. under pytest) is our child: collect
    # its exit status so it does not linger as a zombie. Otherwise a no-op.
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def recorded_pid(manifest: Manifest, node: NodeEntry) -> int | None:
    try:
        text = manifest.path(node.pid_file).read_text().strip()
    except FileNotFoundError:
        return None
    return int(text) if text.isdigit() else None


def running_pid(manifest: Manifest, node: NodeEntry) -> int | None:
    """The node's recorded pid if that process is alive and still this node, else None."""
    pid = recorded_pid(manifest, node)
    if pid is None:
        return None
    _reap(pid)
    return pid if is_node_process(pid, manifest.path(node.config)) else None


def node_command(manifest: Manifest, node: NodeEntry) -> list[str]:
    config = str(manifest.path(node.config).resolve())
    return [sys.executable, "-m", "mqd", "serve", "--config", config, "--log-format", "json"]


def spawn_node(manifest: Manifest, node: NodeEntry) -> tuple[int, int]:
    """Start `node` in the background; returns (pid, log offset where this run begins).

    `os.posix_spawn` rather than `subprocess.Popen`: the node must outlive the
    launcher, and a Popen object dropped while its child runs warns (and is
    an error under the test suite's filterwarnings). `setsid` puts the node in
    its own session, as `start_new_session=True` would.
    """
    log_path = manifest.path(node.log)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    manifest.path(node.data_dir).mkdir(parents=True, exist_ok=True)
    offset = log_path.stat().st_size if log_path.exists() else 0
    argv = node_command(manifest, node)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    pid = os.posix_spawn(
        argv[0],
        argv,
        env,
        file_actions=[
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
            (os.POSIX_SPAWN_OPEN, 1, str(log_path), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644),
            (os.POSIX_SPAWN_DUP2, 1, 2),
        ],
        setsid=True,
    )
    _write_atomic(manifest.path(node.pid_file), f"{pid}\n")
    _wait_exec(pid)
    return pid, offset


def _wait_exec(pid: int, timeout_s: float = EXEC_WAIT_S) -> None:
    """Wait until the child has its new argv in place. posix_spawn returns once the
    child is inside execve, a moment before the kernel publishes the new command line
    (/proc/PID/cmdline read empty right after 24 of 300 spawns on the dev VM): a
    check then (`is_node_process`) would take a starting node for one that exited."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if _proc_argv(pid) is not None or pid_exited(pid):
            return  # exec'd, or gone (the exec failed, or no /proc: nothing to wait for)
        time.sleep(0.001)


def _signal(manifest: Manifest, node: NodeEntry, signum: int) -> int | None:
    """Send `signum` to the node if it is running; returns the pid signalled."""
    pid = running_pid(manifest, node)
    if pid is None:
        return None
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)
    return pid


def pid_exited(pid: int) -> bool:
    """Whether `pid` has exited: gone, or a zombie with every thread gone.

    A dying process loses its cmdline before it closes its files, so the
    cmdline check alone would let a restart race the old process for its
    port; and a process's main thread can be a zombie while its other threads
    (SQLite workers) still hold the sockets.
    """
    _reap(pid)
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True
    fields = dict(line.partition(":")[::2] for line in status.splitlines())
    state = fields.get("State", "").strip()[:1]
    threads = fields.get("Threads", "1").strip()
    return state in ("Z", "X", "x") and threads in ("0", "1")


def _wait_exited(pids: dict[str, int], timeout_s: float) -> list[str]:
    """Wait until every pid (by node id) has exited; returns the ids still running at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        alive = [node_id for node_id, pid in pids.items() if not pid_exited(pid)]
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(min(POLL_INTERVAL_S / 2, max(0.0, deadline - time.monotonic())))


def stop_nodes(
    manifest: Manifest, nodes: Sequence[NodeEntry], timeout_s: float = STOP_TIMEOUT_S
) -> list[str]:
    """SIGTERM `nodes`, wait up to `timeout_s`, SIGKILL stragglers; one report line per node."""
    report: list[str] = []
    signalled: dict[str, int] = {}
    for node in nodes:
        pid = _signal(manifest, node, signal.SIGTERM)
        if pid is None:
            report.append(f"{node.id}: not running")
        else:
            signalled[node.id] = pid
    stragglers = _wait_exited(signalled, timeout_s)
    for node_id in stragglers:
        # The pid was checked to be this node when it got SIGTERM, moments ago.
        with contextlib.suppress(ProcessLookupError):
            os.kill(signalled[node_id], signal.SIGKILL)
    still = set(_wait_exited({i: signalled[i] for i in stragglers}, KILL_WAIT_S))
    for node in nodes:
        if node.id not in signalled:
            continue
        pid = signalled[node.id]
        if node.id in still:
            report.append(f"{node.id}: still running after SIGKILL (pid {pid})")
        elif node.id in stragglers:
            report.append(f"{node.id}: killed after {timeout_s:g} s (pid {pid})")
        else:
            report.append(f"{node.id}: stopped (pid {pid})")
    return report


# ---------------------------------------------------------------------------
# Readiness and health


def expected_listen_ports(node: NodeEntry) -> set[int]:
    """The ports a node announces with `server.listening`: its cluster port (+ client port)."""
    return {
        int(address.rsplit(":", 1)[1])
        for address in (node.cluster_address, node.client_address)
        if address
    }


def listening_ports(log_path: Path, offset: int = 0) -> set[int] | None:
    """Ports announced by `server.listening` events in the log from `offset` on.

    An event without an address counts as port 0 (announced, port unknown).
    None if the log has no such event at all.
    """
    try:
        with open(log_path, "rb") as handle:
            handle.seek(offset)
            data = handle.read()
    except FileNotFoundError:
        return None
    ports: set[int] = set()
    seen = False
    for line in data.splitlines():
        if LISTENING_EVENT.encode() not in line:
            continue
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if not isinstance(event, dict) or event.get("event") != LISTENING_EVENT:
            continue
        seen = True
        address = event.get("address")
        port_text = str(address).rsplit(":", 1)[-1] if address else ""
        ports.add(int(port_text) if port_text.isdigit() else 0)
    return ports if seen else None


def log_ready(node: NodeEntry, log_path: Path, offset: int) -> bool:
    """Whether the log (this run's part) announces every listening socket of the node."""
    ports = listening_ports(log_path, offset)
    if ports is None:
        return False
    return expected_listen_ports(node) <= ports


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - 64 * 1024))
            data = handle.read()
    except FileNotFoundError:
        return "(no log)"
    text = data.decode(errors="replace").splitlines()[-lines:]
    return "\n".join(text) if text else "(log is empty)"


def client_ssl_context(ca_path: Path | str) -> ssl.SSLContext:
    """A client TLS context trusting the cluster CA (`client_ca` of status)."""
    from mqd import certs

    return certs.client_context(str(ca_path))


async def frontend_cluster_view(
    address: str, ca_path: Path, timeout_s: float = PROBE_TIMEOUT_S, token: str | None = None
) -> dict[str, Any]:
    """`stats()["cluster"]` of one frontend, over TLS trusting the cluster CA (as `token`'s
    principal: root's, in case authentication is on)."""
    from mqd.client import connect

    client = await connect(
        address,
        tls=client_ssl_context(ca_path),
        token=token,
        client_name="mqd-cluster",
        connect_timeout=timeout_s,
        request_timeout=timeout_s,
    )
    try:
        stats = await client.stats()
    finally:
        await client.close()
    view = stats.get("cluster") if isinstance(stats, dict) else None
    if not isinstance(view, dict):
        raise LauncherError(f"{address}: stats has no cluster view (is it a cluster frontend?)")
    return view


def backends_not_up(view: dict[str, Any], backend_ids: Iterable[str]) -> list[str]:
    """Backend ids of the manifest that the frontend's cluster view does not list as up."""
    up = {
        node.get("id")
        for node in view.get("nodes", [])
        if isinstance(node, dict) and node.get("up") is True
    }
    return [node_id for node_id in backend_ids if node_id not in up]


@dataclass(slots=True)
class _Watch:
    """One node being waited for: where this run's log begins, and why it is not ready."""

    node: NodeEntry
    offset: int
    ready: bool = False
    reason: str = "starting"


async def _wait_ready(
    manifest: Manifest,
    watches: Sequence[_Watch],
    deadline: float,
    *,
    check_frontends: bool,
) -> list[_Watch]:
    """Poll until every watched node is ready; returns the ones that are not at the deadline.

    A node is ready when its process is alive and its log announces every
    listening socket; a frontend (with `check_frontends`) also when its
    cluster view lists every backend of the manifest as up. A node that dies
    ends the wait at once: waiting longer would not bring it back.
    """
    backend_ids = [node.id for node in manifest.by_role("backend")]
    while True:
        for watch in watches:
            node = watch.node
            if running_pid(manifest, node) is None:
                watch.ready = False
                watch.reason = "process exited"
                continue
            if not log_ready(node, manifest.path(node.log), watch.offset):
                watch.ready = False
                watch.reason = f"no {LISTENING_EVENT} for every port in its log yet"
                continue
            if node.role == "frontend" and check_frontends:
                remaining = max(0.05, deadline - time.monotonic())
                try:
                    view = await frontend_cluster_view(
                        node.client_address,
                        manifest.client_ca,
                        timeout_s=min(PROBE_TIMEOUT_S, remaining),
                        token=root_token(manifest),
                    )
                except Exception as exc:  # any failure is "not yet"; the deadline bounds it
                    watch.ready = False
                    watch.reason = f"stats failed: {type(exc).__name__}: {exc}"
                    continue
                missing = backends_not_up(view, backend_ids)
                if missing:
                    watch.ready = False
                    watch.reason = "sees backends not up: " + ", ".join(missing)
                    continue
            watch.ready = True
            watch.reason = "ready"
        pending = [watch for watch in watches if not watch.ready]
        if not pending or any(w.reason == "process exited" for w in pending):
            return pending
        if time.monotonic() >= deadline:
            return pending
        await asyncio.sleep(min(POLL_INTERVAL_S, max(0.0, deadline - time.monotonic())))


def _not_ready_report(manifest: Manifest, pending: Sequence[_Watch]) -> str:
    parts = []
    for watch in pending:
        log_path = manifest.path(watch.node.log)
        parts.append(
            f"{watch.node.id} ({watch.node.role}) is not ready: {watch.reason}\n"
            f"  last lines of {log_path}:\n"
            + "\n".join("    " + line for line in log_tail(log_path).splitlines())
        )
    return "\n".join(parts)


def start_cluster(manifest: Manifest, timeout_s: float = START_TIMEOUT_S) -> None:
    """Start every node (metadata, then backends, then frontends) and wait until healthy.

    Each role group is started once the previous one listens, so backends
    find metadata up and frontends find backends registered. Raises
    LauncherError naming the nodes not ready (left running) at the deadline.
    """
    deadline = time.monotonic() + timeout_s
    watches: list[_Watch] = []
    for role in ROLES_START_ORDER:
        group = []
        for node in manifest.by_role(role):
            _pid, offset = spawn_node(manifest, node)
            group.append(_Watch(node, offset))
        watches += group
        last = role == ROLES_START_ORDER[-1]
        pending = asyncio.run(_wait_ready(manifest, watches, deadline, check_frontends=last))
        if pending:
            raise LauncherError(
                f"the cluster in {manifest.directory} is not healthy "
                + (
                    "(a node exited)"
                    if any(w.reason == "process exited" for w in pending)
                    else f"after {timeout_s:g} s"
                )
                + f"; the nodes are left running (`mqd cluster stop --dir {manifest.directory}`)"
                + "\n"
                + _not_ready_report(manifest, pending)
            )


def restart_node(manifest: Manifest, node: NodeEntry, timeout_s: float = START_TIMEOUT_S) -> str:
    """Stop the node if it runs, start it with the same config, wait for its listening sockets."""
    lines = stop_nodes(manifest, [node]) if running_pid(manifest, node) is not None else []
    pid, offset = spawn_node(manifest, node)
    watch = _Watch(node, offset)
    deadline = time.monotonic() + timeout_s
    pending = asyncio.run(_wait_ready(manifest, [watch], deadline, check_frontends=False))
    if pending:
        raise LauncherError(_not_ready_report(manifest, pending))
    return "\n".join([*lines, f"{node.id}: started (pid {pid})"])


# ---------------------------------------------------------------------------
# Status


def _accepts_tcp(address: str, timeout_s: float = 1.0) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            return True
    except (OSError, ValueError):
        return False


def cluster_status(manifest: Manifest) -> dict[str, Any]:
    """The status object (`status --json`): nodes by role group, and `client_ca`."""
    status: dict[str, Any] = {key: [] for key in ("frontends", "backends", "metadata")}
    for node in manifest.in_order(ROLES_STOP_ORDER):
        pid = running_pid(manifest, node)
        up = pid is not None
        if up and node.role == "frontend":
            up = _accepts_tcp(node.client_address)
        status[ROLE_GROUP_KEYS[node.role]].append(
            {"id": node.id, "address": node.address, "pid": pid, "up": up}
        )
    status["client_ca"] = str(manifest.client_ca) if manifest.client_ca.is_file() else None
    return status


def format_status(status: dict[str, Any]) -> str:
    rows = [("NODE", "ADDRESS", "PID", "STATE")]
    for key in ("frontends", "backends", "metadata"):
        for entry in status[key]:
            pid = "-" if entry["pid"] is None else str(entry["pid"])
            rows.append((entry["id"], entry["address"], pid, "up" if entry["up"] else "down"))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row[:3], widths, strict=True))
        + "  "
        + row[3]
        for row in rows
    ]
    lines.append(f"client CA: {status['client_ca'] or '(none)'}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# The command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The subcommands of `mqd cluster` (the CLI wires the command)."""
    actions = parser.add_subparsers(dest="cluster_command", required=True, metavar="ACTION")

    def with_dir(action: argparse.ArgumentParser) -> argparse.ArgumentParser:
        action.add_argument(
            "--dir",
            required=True,
            metavar="DIR",
            help="the cluster's directory (configs, certs, data, logs)",
        )
        return action

    start = with_dir(
        actions.add_parser(
            "start",
            help="write configs and certificates into DIR (first time), start every node, wait until healthy",
        )
    )
    for name, default in (("backends", 3), ("frontends", 2), ("metadata", 1)):
        start.add_argument(
            f"--{name}",
            type=int,
            default=None,
            metavar="N",
            help=f"number of {name} nodes of a new cluster (default {default})",
        )
    start.add_argument(
        "--fsync",
        choices=FSYNC_POLICIES,
        default=None,
        help='[storage] fsync of every node (default "always"; on a stopped cluster, '
        "rewrites that line of each node's config)",
    )
    start.add_argument(
        "--timeout",
        type=float,
        default=START_TIMEOUT_S,
        metavar="SECONDS",
        help=f"how long to wait for a healthy cluster (default {START_TIMEOUT_S:g})",
    )
    start.add_argument("--json", action="store_true", help="print the status as JSON when healthy")

    status = with_dir(actions.add_parser("status", help="show each node's address, pid and state"))
    status.add_argument("--json", action="store_true", help="print JSON")

    with_dir(actions.add_parser("stop", help="stop every node (SIGTERM, then SIGKILL after 20 s)"))

    kill = with_dir(actions.add_parser("kill", help="SIGKILL one node"))
    kill.add_argument("node_id", metavar="NODE_ID", help="e.g. backend-2")

    restart = with_dir(
        actions.add_parser("restart", help="stop one node if it runs, then start it again")
    )
    restart.add_argument("node_id", metavar="NODE_ID", help="e.g. backend-2")
    restart.add_argument(
        "--timeout",
        type=float,
        default=START_TIMEOUT_S,
        metavar="SECONDS",
        help=f"how long to wait for it to listen (default {START_TIMEOUT_S:g})",
    )


_DEFAULT_COUNTS = {"metadata": 1, "backends": 3, "frontends": 2}


def _start(args: argparse.Namespace, directory: Path) -> int:
    counts = {name: getattr(args, name, None) for name in _DEFAULT_COUNTS}
    fsync = getattr(args, "fsync", None)
    if Manifest.exists(directory):
        manifest = Manifest.load(directory)
        running = [node.id for node in manifest.nodes if running_pid(manifest, node) is not None]
        if running:
            raise LauncherError(
                f"a cluster is already running in {directory} (running: {', '.join(running)}); "
                f"`mqd cluster status --dir {directory}` shows it, `mqd cluster stop` stops it, "
                "`mqd cluster restart NODE_ID` starts one node again"
            )
        have = {
            "metadata": len(manifest.by_role("metadata")),
            "backends": len(manifest.by_role("backend")),
            "frontends": len(manifest.by_role("frontend")),
        }
        conflicts = [
            f"--{name} {count} (it has {have[name]})"
            for name, count in counts.items()
            if count is not None and count != have[name]
        ]
        if conflicts:
            raise LauncherError(
                f"{directory} already holds a cluster; its size is fixed: "
                + ", ".join(conflicts)
                + "; use a new directory for a different size"
            )
        print(f"starting the existing cluster in {directory} (data kept)", file=sys.stderr)
        if fsync is not None and set_fsync(manifest, fsync):
            print(f'fsync = "{fsync}" in every node\'s config now', file=sys.stderr)
    else:
        sizes = {
            name: _DEFAULT_COUNTS[name] if count is None else count
            for name, count in counts.items()
        }
        manifest = create_cluster(directory, **sizes, fsync=fsync or "always")
        print(
            f"principal root's token is in {manifest.path(ROOT_TOKEN_NAME)} (mode 0600); "
            "authentication is off unless the nodes' configs set [auth] required = true",
            file=sys.stderr,
        )
    start_cluster(manifest, timeout_s=args.timeout)
    if getattr(args, "json", False):
        print(json.dumps(cluster_status(manifest), indent=2))
    else:
        for node in manifest.by_role("frontend"):
            print(node.client_address)
    return 0


def _status(args: argparse.Namespace, directory: Path) -> int:
    status = cluster_status(Manifest.load(directory))
    print(json.dumps(status, indent=2) if args.json else format_status(status))
    return 0


def _stop(args: argparse.Namespace, directory: Path) -> int:
    manifest = Manifest.load(directory)
    # Group by group: frontends finish their in-flight requests while backends
    # still serve them, and backends deregister while metadata still listens.
    report: list[str] = []
    for role in ROLES_STOP_ORDER:
        lines = stop_nodes(manifest, manifest.by_role(role))
        print("\n".join(lines), flush=True)
        report += lines
    left = [node.id for node in manifest.nodes if running_pid(manifest, node) is not None]
    if left or any("still running" in line for line in report):
        print(f"still running: {', '.join(left)}", file=sys.stderr)
        return 1
    return 0


def _kill(args: argparse.Namespace, directory: Path) -> int:
    manifest = Manifest.load(directory)
    node = manifest.node(args.node_id)
    pid = _signal(manifest, node, signal.SIGKILL)
    if pid is None:
        print(f"{node.id}: not running", file=sys.stderr)
        return 1
    if _wait_exited({node.id: pid}, KILL_WAIT_S):
        print(f"{node.id}: still running after SIGKILL (pid {pid})", file=sys.stderr)
        return 1
    print(f"{node.id}: killed (pid {pid})")
    return 0


def _restart(args: argparse.Namespace, directory: Path) -> int:
    manifest = Manifest.load(directory)
    node = manifest.node(args.node_id)
    print(restart_node(manifest, node, timeout_s=args.timeout))
    return 0


_ACTIONS = {
    "start": _start,
    "status": _status,
    "stop": _stop,
    "kill": _kill,
    "restart": _restart,
}


def main(args: argparse.Namespace) -> int:
    """Run one `mqd cluster` action; 0 on success, 1 on a reported failure."""
    directory = Path(args.dir).absolute()
    try:
        return _ACTIONS[args.cluster_command](args, directory)
    except LauncherError as exc:
        print(f"mqd cluster {args.cluster_command}: {exc}", file=sys.stderr)
        return 1


def build_parser() -> argparse.ArgumentParser:
    """A stand-alone parser (`python -m mqd.launcher`), the same options as `mqd cluster`."""
    parser = argparse.ArgumentParser(prog="mqd cluster", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return parser


if __name__ == "__main__":  # python -m mqd.launcher, for use before the CLI wires it
    sys.exit(main(build_parser().parse_args()))
