"""`mqd` command line: a thin layer over the modules that do the work."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

from mqd import __version__
from mqd.errors import ConfigError, MqdError


def _serve(args: argparse.Namespace) -> int:
    from mqd.config import load_config
    from mqd.node import run_node

    overrides = {}
    if args.data_dir is not None:
        overrides["node.data_dir"] = args.data_dir
    if args.listen is not None:
        overrides["frontend.listen"] = args.listen
    if args.log_format is not None:
        overrides["log.format"] = args.log_format
    if args.fsync is not None:
        overrides["storage.fsync"] = args.fsync
    config = load_config(Path(args.config) if args.config else None, overrides)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; stay usable without it
        return asyncio.run(run_node(config))
    return uvloop.run(run_node(config))


def _storage(args: argparse.Namespace) -> int:
    from mqd.storage import tools

    if args.storage_command == "keygen":
        from mqd.storage.crypto import keygen_main

        return keygen_main(args.file)
    path = Path(args.dir)
    if not path.is_dir():
        problem = (
            f"{args.dir!r} is a file, not a directory"
            if path.exists()
            else f"no such directory {args.dir!r}"
        )
        raise ConfigError(
            f"DIR: {problem} (the node's data directory: node.data_dir, or --data-dir)"
        )
    if args.storage_command == "verify":
        # On a running node it reads a log and an index that move under it, and reports
        # damage that is not there (an index checkpoint past the log's end it has read).
        keys = tools.load_keys(args.key_file)
        with _data_dir_held(
            path, "verify needs the node stopped: it would read writes in progress"
        ):
            report = tools.verify(path, keys=keys)
        print(report.text(), end="")
        return 0 if report.ok else 1
    if args.storage_command == "dump":
        if not tools.find_partitions(path):
            # As verify says: an empty dump reads as "nothing stored", which a
            # mistyped directory is not.
            print(
                f"mqd: no partition directories (with *.log segments) under {args.dir}",
                file=sys.stderr,
            )
            return 1
        tools.dump(path, sys.stdout, keys=tools.load_keys(args.key_file))
        return 0
    storage_config = None
    if args.config:
        from mqd.config import load_config

        # Sealed segments need the node's keys: read them from its config.
        storage_config = load_config(Path(args.config)).storage
    # Rewriting the index under a running server would race its index writer.
    with _data_dir_held(path, "rebuild-index needs the node stopped"):
        report = tools.rebuild_index(path, storage_config)
    print(report.text(), end="")
    return 0 if report.ok else 1


@contextlib.contextmanager
def _data_dir_held(path: Path, why: str) -> Iterator[None]:
    """Hold the node's data directory lock (of `path` or the data directory above it)
    while a storage tool runs; ConfigError naming `why` if a running node holds it."""
    from mqd.node import DataDirLock

    data_dir = next((p for p in (path, *path.resolve().parents[:2]) if (p / "LOCK").exists()), None)
    if data_dir is None:
        yield
        return
    lock = DataDirLock(data_dir)
    try:
        lock.acquire()
    except ConfigError as exc:
        raise ConfigError(f"{exc}; {why}") from None
    try:
        yield
    finally:
        lock.release()


def _bench(args: argparse.Namespace) -> int:
    from mqd import bench

    return bench.main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mqd", description="mqd: a durable message queue")
    parser.add_argument("--version", action="version", version=f"mqd {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run a node (all roles with no config)")
    serve.add_argument("--config", metavar="FILE", help="TOML config file (see config/single.toml)")
    serve.add_argument("--data-dir", metavar="DIR", help="data directory (default ./mqd-data)")
    serve.add_argument(
        "--listen", metavar="HOST:PORT", help="client address (default 127.0.0.1:6470)"
    )
    serve.add_argument(
        "--log-format",
        choices=["console", "json"],
        help="log format (default: console on a terminal, else json)",
    )
    from mqd.launcher import FSYNC_POLICIES  # (mqd.storage would slow every command)

    serve.add_argument("--fsync", choices=FSYNC_POLICIES, help="override [storage] fsync")
    serve.set_defaults(func=_serve)

    storage = commands.add_parser("storage", help="inspect or repair a data directory")
    storage_commands = storage.add_subparsers(
        dest="storage_command", required=True, metavar="ACTION"
    )
    for name, help_text in (
        ("verify", "check every record's CRC and the index against the log"),
        ("dump", "print records as text"),
        ("rebuild-index", "rebuild the SQLite index from the log"),
    ):
        action = storage_commands.add_parser(name, help=help_text)
        action.add_argument(
            "dir", metavar="DIR", help="a data directory or one partition directory"
        )
        if name == "rebuild-index":
            action.add_argument(
                "--config", metavar="FILE", help="the node's config (its [storage] keys)"
            )
        else:
            action.add_argument(
                "--key-file",
                action="append",
                default=[],
                metavar="FILE",
                help="storage key file (repeatable): check tags, show sealed bodies",
            )
    keygen = storage_commands.add_parser(
        "keygen", help="write a new random storage key (mode 0600)"
    )
    keygen.add_argument("file", metavar="FILE")
    storage.set_defaults(func=_storage)

    shell = commands.add_parser("shell", help="interactive protocol shell (telnet-like debugger)")
    from mqd import shell as shell_module

    shell_module.add_arguments(shell)
    shell.set_defaults(func=shell_module.main)

    certs = commands.add_parser("certs", help="make a cluster CA and node or client certificates")
    from mqd import certs as certs_module

    certs_module.add_arguments(certs)
    certs.set_defaults(func=certs_module.main)

    cluster = commands.add_parser(
        "cluster", help="run a local cluster: start, status, stop, kill, restart"
    )
    from mqd import launcher as launcher_module

    launcher_module.add_arguments(cluster)
    cluster.set_defaults(func=launcher_module.main)

    admin = commands.add_parser("admin", help="look at a cluster: nodes, placement")
    from mqd import admin as admin_module

    admin_module.add_arguments(admin)
    admin.set_defaults(func=admin_module.main)

    bench = commands.add_parser("bench", help="measure throughput and latency against a server")
    from mqd import bench as bench_module

    bench_module.add_arguments(bench)
    bench.set_defaults(func=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"mqd: configuration error: {exc}", file=sys.stderr)
        return 2
    except MqdError as exc:
        print(f"mqd: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
