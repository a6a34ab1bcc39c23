"""Node configuration: TOML file + command-line overrides, strictly validated.

An unknown key or a bad value is a startup error naming the key
(`config/single.toml` lists every key with its default).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mqd.auth import Quotas
from mqd.errors import ConfigError
from mqd.limits import Limits
from mqd.storage import StorageConfig
from mqd.storage.config import RECORD_HEADROOM_BYTES

ROLES = ("frontend", "metadata", "backend")
DEFAULT_LISTEN = "127.0.0.1:6470"


@dataclass(slots=True)
class NodeSection:
    id: str = ""  # empty: generated once and kept in the data dir
    roles: list[str] = field(default_factory=lambda: list(ROLES))
    data_dir: str = "./mqd-data"


@dataclass(slots=True)
class FrontendSection:
    listen: str = DEFAULT_LISTEN
    # Listening beyond loopback without TLS needs this said out loud (DESIGN.md §7).
    insecure: bool = False


@dataclass(slots=True)
class ClusterSection:
    # Node-to-node address; empty = a single node running every role in-process.
    listen: str = ""
    # The address other nodes dial for this node (default: `listen`).
    advertise: str = ""
    # Cluster addresses of the metadata nodes.
    metadata: list[str] = field(default_factory=list)
    session_timeout_ms: int = 6000
    heartbeat_interval_ms: int = 1000
    vnodes: int = 128
    # A follower this far behind for this long leaves the in-sync set.
    replica_lag_max_ms: int = 10_000


@dataclass(slots=True)
class TlsSection:
    # PEM certificate chain and key of this node (client port and cluster port).
    cert: str = ""
    key: str = ""
    # PEM CA: the cluster CA. Node-to-node connections must present a certificate
    # signed by it; on the client port a client certificate is checked against it.
    ca: str = ""
    # Refuse clients without a certificate signed by `ca` on the client port.
    require_client_cert: bool = False


@dataclass(slots=True)
class AuthSection:
    # Authenticate clients even on loopback. Listening beyond loopback turns it on
    # anyway unless frontend.insecure (DESIGN.md §7, protocol.md §8).
    required: bool = False
    # A failed HELLO is answered this long after it arrived, whatever failed.
    failure_delay_ms: int = 200


@dataclass(slots=True)
class LogSection:
    format: str = "auto"  # auto | console | json
    level: str = "info"
    # A request slower than this gets a `request.slow` log line (0 = never).
    slow_request_ms: int = 1000


@dataclass(slots=True)
class MetricsSection:
    # HOST:PORT of the Prometheus endpoint (GET /metrics); empty = off.
    listen: str = ""


@dataclass(slots=True)
class Config:
    node: NodeSection = field(default_factory=NodeSection)
    frontend: FrontendSection = field(default_factory=FrontendSection)
    cluster: ClusterSection = field(default_factory=ClusterSection)
    limits: Limits = field(default_factory=Limits)
    storage: StorageConfig = field(default_factory=StorageConfig)
    tls: TlsSection = field(default_factory=TlsSection)
    auth: AuthSection = field(default_factory=AuthSection)
    quotas: Quotas = field(default_factory=Quotas)
    log: LogSection = field(default_factory=LogSection)
    metrics: MetricsSection = field(default_factory=MetricsSection)

    @property
    def data_dir(self) -> Path:
        return Path(self.node.data_dir)

    @property
    def clustered(self) -> bool:
        return bool(self.cluster.listen)

    @property
    def auth_enabled(self) -> bool:
        """Whether clients must authenticate: `[auth] required`, or a client port
        beyond loopback that is not declared `insecure` (DESIGN.md §7)."""
        if self.auth.required:
            return True
        host, _ = parse_address(self.frontend.listen, key="frontend.listen")
        return not is_loopback(host) and not self.frontend.insecure

    @property
    def insecure_exposed(self) -> bool:
        """A client port beyond loopback served as `insecure` (warned about at every start)."""
        host, _ = parse_address(self.frontend.listen, key="frontend.listen")
        return not is_loopback(host) and self.frontend.insecure

    def validate(self) -> None:
        if not self.node.data_dir.strip():
            # Empty, it meant the working directory: the server's files landed there.
            raise ConfigError("node.data_dir: must name a directory (it is empty)")
        if not self.node.roles:
            raise ConfigError("node.roles: name at least one role")
        for role in self.node.roles:
            if role not in ROLES:
                raise ConfigError(
                    f"node.roles: unknown role {role!r}; roles are {', '.join(ROLES)}"
                )
        if len(set(self.node.roles)) != len(self.node.roles):
            raise ConfigError("node.roles: a role is named twice")
        if not self.clustered and set(self.node.roles) != set(ROLES):
            raise ConfigError(
                "node.roles: a node with a subset of the roles is part of a cluster; "
                "set cluster.listen (and cluster.metadata), or run all three roles"
            )
        _validate_cluster_values(self)
        if self.clustered:
            _validate_cluster_section(self)
        host, _ = parse_address(self.frontend.listen, key="frontend.listen")
        if bool(self.tls.cert) != bool(self.tls.key):
            raise ConfigError("tls.cert and tls.key: give both or neither")
        # Client certificates exist only on a TLS client port, checked against `ca`
        # (protocol.md §8.1): a setting that cannot take effect is an error, not a no-op.
        if self.tls.require_client_cert and not self.tls.ca:
            raise ConfigError(
                "tls.require_client_cert needs tls.ca (the CA that signs client certificates)"
                + ("" if self.tls.cert else " and a TLS client port (tls.cert, tls.key)")
            )
        if self.tls.ca and not self.tls.cert:
            raise ConfigError(
                "tls.ca needs tls.cert and tls.key: client certificates are checked only "
                "on a TLS client port"
            )
        for key in ("cert", "key", "ca"):
            path = getattr(self.tls, key)
            if path and not Path(path).is_file():
                raise ConfigError(f"tls.{key}: no such file {path!r}")
        if not self.tls.cert and not is_loopback(host) and not self.frontend.insecure:
            raise ConfigError(
                f"frontend.listen: {self.frontend.listen} is not a loopback address; it needs "
                "TLS and authentication: set [tls] cert/key (authentication then is on), "
                "or frontend.insecure = true to serve plaintext without authentication anyway"
            )
        _validate_auth(self)
        if self.log.format not in ("auto", "console", "json"):
            raise ConfigError(f"log.format: must be auto, console or json, got {self.log.format!r}")
        if self.metrics.listen:
            parse_address(self.metrics.listen, key="metrics.listen")
        if not 0 <= self.log.slow_request_ms <= 3_600_000:
            raise ConfigError(
                f"log.slow_request_ms: must be 0 to 3600000, got {self.log.slow_request_ms}"
            )
        if self.log.level not in ("debug", "info", "warning", "error"):
            raise ConfigError(
                f"log.level: must be debug, info, warning or error, got {self.log.level!r}"
            )
        self.limits.validate()
        self.storage.validate()
        body_max = self.storage.record_bytes_max - RECORD_HEADROOM_BYTES
        if body_max < self.limits.message_bytes_max:
            # Else the node starts, then refuses every message above the store's limit
            # (a record_bytes_max of 100 refused even 3 bytes).
            raise ConfigError(
                f"storage.record_bytes_max: {self.storage.record_bytes_max} holds messages of "
                f"at most {max(0, body_max)} bytes, below limits.message_bytes_max "
                f"({self.limits.message_bytes_max}); raise it to at least "
                f"{self.limits.message_bytes_max + RECORD_HEADROOM_BYTES} or lower the other"
            )


def _validate_auth(config: Config) -> None:
    # A cluster frontend authenticates against metadata's catalog (protocol.md §8.5).
    if not 0 <= config.auth.failure_delay_ms <= 10_000:
        raise ConfigError(
            f"auth.failure_delay_ms: must be an integer from 0 to 10000, got "
            f"{config.auth.failure_delay_ms!r}"
        )
    bounds = {
        "messages_per_s": (0, 10_000_000),
        "bytes_per_s": (0, 1 << 40),
        "burst_ms": (1, 3_600_000),
        "connections_per_principal_max": (0, 1_000_000),
        "queues_per_principal_max": (0, 1_000_000),
    }
    for name, (low, high) in bounds.items():
        value = getattr(config.quotas, name)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ConfigError(
                f"quotas.{name}: must be an integer from {low} to {high}, got {value!r}"
            )


def _validate_cluster_values(config: Config) -> None:
    """The [cluster] values themselves, checked on a single node too: a bad one is a
    mistake there as well, waiting for the day the node joins a cluster."""
    cluster = config.cluster
    if cluster.listen:
        parse_address(cluster.listen, key="cluster.listen")
    if cluster.advertise:
        parse_address(cluster.advertise, key="cluster.advertise")
    for address in cluster.metadata:
        parse_address(address, key="cluster.metadata")
    bounds = {
        "session_timeout_ms": (500, 600_000),
        "heartbeat_interval_ms": (50, 60_000),
        "vnodes": (1, 4096),
        "replica_lag_max_ms": (100, 600_000),
    }
    for name, (low, high) in bounds.items():
        value = getattr(cluster, name)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ConfigError(
                f"cluster.{name}: must be an integer from {low} to {high}, got {value!r}"
            )
    if cluster.heartbeat_interval_ms * 2 > cluster.session_timeout_ms:
        raise ConfigError(
            "cluster.heartbeat_interval_ms: must be at most half of session_timeout_ms"
        )


def _validate_cluster_section(config: Config) -> None:
    cluster = config.cluster
    roles = set(config.node.roles)
    if not cluster.metadata:
        raise ConfigError("cluster.metadata: list the metadata nodes' cluster addresses")
    if not config.node.id:
        raise ConfigError("node.id: every node of a cluster needs an id")
    for key in ("cert", "key", "ca"):
        if not getattr(config.tls, key):
            raise ConfigError(
                f"tls.{key}: node-to-node traffic is mutual TLS; give the node's cert, key "
                "and the cluster CA (`mqd certs init` / `mqd certs issue` make them)"
            )
    if "frontend" not in roles and "backend" not in roles and "metadata" not in roles:
        raise ConfigError("node.roles: name at least one role")


def parse_address(text: str, *, key: str) -> tuple[str, int]:
    host, sep, port_text = text.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"{key}: expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port_text)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_config(path: Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Read `path` (TOML) if given, apply dotted `overrides` ("node.data_dir": …), validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"--config: no such file {str(path)!r}") from None
        except IsADirectoryError:
            raise ConfigError(f"--config: {str(path)!r} is a directory, not a TOML file") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"--config: cannot read {str(path)!r}: {exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    config = Config()
    for section_name, section_value in raw.items():
        if section_name not in _section_names():
            raise ConfigError(
                f"unknown config section [{section_name}]; sections are "
                + ", ".join(f"[{name}]" for name in _section_names())
            )
        if not isinstance(section_value, dict):
            raise ConfigError(f"{section_name}: must be a table [{section_name}]")
        for key, value in section_value.items():
            _set(config, section_name, key, value)
    for dotted, value in (overrides or {}).items():
        section_name, _, key = dotted.partition(".")
        _set(config, section_name, key, value)
    frontend_listen_given = "listen" in raw.get("frontend", {}) or "frontend.listen" in (
        overrides or {}
    )
    if config.clustered and "frontend" in config.node.roles and not frontend_listen_given:
        # A single node may rely on the default; a cluster frontend's client port is
        # part of its identity (other nodes publish it), so it must be said.
        raise ConfigError(
            "frontend.listen: a cluster node with the frontend role needs its client port"
        )
    config.validate()
    return config


def _section_names() -> list[str]:
    return [f.name for f in dataclasses.fields(Config)]


def _set(config: Config, section_name: str, key: str, value: Any) -> None:
    section = getattr(config, section_name)
    fields = {f.name: f for f in dataclasses.fields(section)}
    if key not in fields:
        raise ConfigError(
            f"unknown config key {section_name}.{key}; keys in [{section_name}] are "
            + ", ".join(sorted(fields))
        )
    expected = type(getattr(section, key))
    ok = isinstance(value, expected) and not (expected is int and isinstance(value, bool))
    if expected is list:
        ok = isinstance(value, list) and all(isinstance(item, str) for item in value)
    if not ok:
        raise ConfigError(
            f"{section_name}.{key}: expected {expected.__name__}, got {type(value).__name__} {value!r}"
        )
    setattr(section, key, value)
