"""`mqd admin`: look at a cluster through any frontend (its STATS carry the cluster view),
and manage principals and their permissions (`user`, `grant`, `revoke`, `acl`).

Principals and grants are written straight into the catalog in the data
directory (`--data-dir`, SQLite in WAL mode, so this works while the server
runs; the server notices within a second, at once for a new token). Being
able to write the node's data directory is what makes a person an
administrator here: that is how the first principal is made on a fresh node
with `[auth] required = true` (protocol.md §8.4).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import ssl
import sys
import time
from pathlib import Path
from typing import Any

from mqd import auth
from mqd.errors import ConfigError, MqdError

DEFAULT_ADDRESS = "127.0.0.1:6470"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="admin_command", required=True, metavar="ACTION")
    for name, help_text in (
        ("nodes", "list the cluster's nodes and whether they are up"),
        ("placement", "show where each queue partition lives"),
    ):
        action = actions.add_parser(name, help=help_text)
        action.add_argument("--address", default=DEFAULT_ADDRESS, help="a frontend (HOST:PORT)")
        action.add_argument("--ca", metavar="FILE", help="CA file to trust (TLS client port)")
        action.add_argument("--token", default=None)
        action.add_argument("--json", action="store_true", help="print JSON")
        if name == "placement":
            action.add_argument("queue", nargs="?", help="one queue (default: all)")
    rebalance = actions.add_parser(
        "rebalance", help="move partitions to where the ring over live backends puts them"
    )
    rebalance.add_argument("--address", default=DEFAULT_ADDRESS, help="a frontend (HOST:PORT)")
    rebalance.add_argument("--ca", metavar="FILE", help="CA file to trust (TLS client port)")
    rebalance.add_argument("--token", default=None)
    rebalance.add_argument("--json", action="store_true", help="print JSON")
    rebalance.add_argument("--dry-run", action="store_true", help="print the plan, move nothing")
    retire = actions.add_parser(
        "decommission", help="retire a backend for good: its replicas move to other backends"
    )
    retire.add_argument("node", metavar="NODE", help="the backend's node id")
    retire.add_argument("--address", default=DEFAULT_ADDRESS, help="a frontend (HOST:PORT)")
    retire.add_argument("--ca", metavar="FILE", help="CA file to trust (TLS client port)")
    retire.add_argument("--token", default=None)
    retire.add_argument("--json", action="store_true", help="print JSON")
    _add_auth_arguments(actions)


def _add_auth_arguments(actions: Any) -> None:
    def local(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        parser.add_argument(
            "--data-dir",
            metavar="DIR",
            default=None,
            help="the node's data directory, holding its catalog (default: node.data_dir of "
            "--config, else ./mqd-data); on a cluster, a metadata node's",
        )
        parser.add_argument("--config", metavar="FILE", help="the node's TOML config file")
        return parser

    def quota_options(parser: argparse.ArgumentParser) -> None:
        for name in auth.QUOTA_NAMES:
            parser.add_argument(
                "--" + name.replace("_", "-"),
                type=int,
                metavar="N",
                help=f"override [quotas] {name} for this principal (0 = no limit)",
            )

    user = actions.add_parser("user", help="principals with tokens: add, list, remove, rotate")
    users = user.add_subparsers(dest="user_command", required=True, metavar="ACTION")
    add = local(users.add_parser("add", help="add a principal; prints its token, once"))
    add.add_argument("name")
    quota_options(add)
    listing = local(users.add_parser("list", help="list principals (never their tokens)"))
    listing.add_argument("--json", action="store_true", help="print JSON")
    remove = local(users.add_parser("remove", help="remove a principal and its grants"))
    remove.add_argument("name")
    rotate = local(
        users.add_parser("rotate", help="give a principal a new token; the old one stops working")
    )
    rotate.add_argument("name")
    limits = local(users.add_parser("limits", help="set or clear a principal's quota overrides"))
    limits.add_argument("name")
    quota_options(limits)
    limits.add_argument("--clear", action="store_true", help="drop every override first")
    for name, help_text in (
        ("grant", "give a principal a permission on a queue pattern"),
        ("revoke", "take a permission on a queue pattern away"),
    ):
        action = local(actions.add_parser(name, help=help_text))
        action.add_argument("name", help="principal (a token user or a certificate's CN)")
        action.add_argument("permission", choices=auth.PERMISSIONS)
        action.add_argument("pattern", help="a queue name, `*`, or a prefix like `orders-*`")
    acl = local(actions.add_parser("acl", help="list grants (of one principal)"))
    acl.add_argument("name", nargs="?")
    acl.add_argument("--json", action="store_true", help="print JSON")


async def _cluster_view(args: argparse.Namespace) -> dict[str, Any]:
    import mqd.client

    tls = _tls(args.ca)
    async with await mqd.client.connect(args.address, tls=tls, token=args.token) as client:
        stats = await client.stats()
    cluster = stats.get("cluster")
    if cluster is None:
        # A single node: every role in one process, every partition here.
        cluster = {
            "placement_version": 0,
            "nodes": [
                {
                    "id": stats.get("node_id", "?"),
                    "roles": ["frontend", "metadata", "backend"],
                    "client_address": args.address,
                    "cluster_address": "",
                    "up": True,
                }
            ],
            "placement": {},
        }
    return cluster


async def _rebalance(args: argparse.Namespace) -> Any:
    import math

    import mqd.client
    from mqd.protocol.messages import RebalanceRequest

    tls = _tls(args.ca)
    async with await mqd.client.connect(args.address, tls=tls, token=args.token) as client:
        return await client._call(RebalanceRequest(dry_run=args.dry_run), timeout_s=math.inf)


def _print_rebalance(args: argparse.Namespace) -> int:
    try:
        answer = asyncio.run(_rebalance(args))
    except MqdError as exc:
        print(f"mqd admin: {exc}", file=sys.stderr)
        return 1
    moves = [
        {
            "queue": m.queue,
            "partition": m.partition,
            "from": m.source,
            "to": m.target,
            "status": m.status,
        }
        for m in answer.moves
    ]
    if args.json:
        print(json.dumps({"placement_version": answer.placement_version, "moves": moves}))
    elif not moves:
        print(
            "nothing to move: every single-copy partition is where the ring puts it "
            "(replicated partitions are not moved by rebalance; see admin placement)"
        )
    else:
        verb = "would move" if args.dry_run else "moves"
        print(f"{verb} {len(moves)} partition(s):")
        for move in moves:
            print(
                f"  {move['queue']} partition {move['partition']}: {move['from']} -> {move['to']}"
                f"  [{move['status']}]"
            )
    failed = [m for m in moves if not args.dry_run and m["status"] != "moved"]
    return 1 if failed else 0


async def _decommission(args: argparse.Namespace) -> Any:
    import mqd.client
    from mqd.protocol.messages import DecommissionRequest

    tls = _tls(args.ca)
    async with await mqd.client.connect(args.address, tls=tls, token=args.token) as client:
        return await client._call(DecommissionRequest(node_id=args.node))


def _print_decommission(args: argparse.Namespace) -> int:
    try:
        answer = asyncio.run(_decommission(args))
    except MqdError as exc:
        print(f"mqd admin: {exc}", file=sys.stderr)
        return 1
    moves = [
        {"queue": m.queue, "partition": m.partition, "new_replica": m.target, "status": m.status}
        for m in answer.moves
    ]
    if args.json:
        print(json.dumps({"placement_version": answer.placement_version, "moves": moves}))
    else:
        print(f"{args.node} decommissioned; {len(moves)} replica(s) reassigned")
        for move in moves:
            print(
                f"  {move['queue']} partition {move['partition']}: {move['new_replica'] or '-'}  [{move['status']}]"
            )
    return 1 if any(m["status"].startswith("failed") for m in moves) else 0


def main(args: argparse.Namespace) -> int:
    if args.admin_command == "rebalance":
        return _print_rebalance(args)
    if args.admin_command == "decommission":
        return _print_decommission(args)
    if args.admin_command in ("user", "grant", "revoke", "acl"):
        try:
            return _auth_command(args)
        except MqdError as exc:
            print(f"mqd admin: {exc}", file=sys.stderr)
            return 1
    try:
        cluster = asyncio.run(_cluster_view(args))
    except MqdError as exc:
        print(f"mqd admin: {exc}", file=sys.stderr)
        return 1
    if args.admin_command == "nodes":
        nodes = sorted(cluster["nodes"], key=lambda n: n["id"])
        if args.json:
            print(json.dumps(nodes))
            return 0
        print(f"{'id':<16} {'roles':<28} {'up':<5} {'client':<22} cluster")
        for node in nodes:
            print(
                f"{node['id']:<16} {','.join(node['roles']):<28} {'yes' if node['up'] else 'NO':<5} "
                f"{node['client_address'] or '-':<22} {node['cluster_address'] or '-'}"
            )
        return 0
    placement = cluster["placement"]
    if args.queue:
        if args.queue not in placement:
            print(f"mqd admin: no placement for queue {args.queue!r}", file=sys.stderr)
            return 1
        placement = {args.queue: placement[args.queue]}
    if args.json:
        print(json.dumps({"placement_version": cluster["placement_version"], "queues": placement}))
        return 0
    print(f"placement version {cluster['placement_version']}")
    if not placement and not cluster["placement_version"]:
        # A single node has no placement to show: it is every partition's only replica.
        print("no placement: not a cluster (a single node holds every partition itself)")
    for queue, partitions in sorted(placement.items()):
        for part in partitions:
            print(
                f"{queue:<32} partition {part['index']:<3} leader {part['leader']:<14} "
                f"epoch {part['epoch']:<4} replicas {','.join(part['replicas'])}"
            )
    return 0


# --- principals and grants, in the data directory's catalog ------------------------------


def _catalog_path(args: argparse.Namespace) -> Path:
    data_dir = args.data_dir
    if data_dir is None and args.config:
        from mqd.config import load_config

        data_dir = load_config(Path(args.config)).node.data_dir
    path = Path(data_dir or "./mqd-data")
    if not path.is_dir():
        raise ConfigError(
            f"--data-dir: no such directory {str(path)!r} (the node's data directory, "
            "which `mqd serve` makes on its first start)"
        )
    return path / "catalog.db"


def _open_catalog(args: argparse.Namespace) -> sqlite3.Connection:
    # The server may hold the catalog open: WAL lets both write; wait out its locks.
    db = sqlite3.connect(_catalog_path(args), timeout=10.0, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    for statement in auth.SCHEMA:
        db.execute(statement)
    return db


def _load_principal(db: sqlite3.Connection, name: str) -> auth.Principal:
    row = db.execute(auth.SELECT_PRINCIPALS + " WHERE name = ?", (name,)).fetchone()
    if row is None:
        raise ConfigError(f"no principal named {name!r} (see `mqd admin user list`)")
    return auth.principal_from_row(row)


def _quota_overrides(args: argparse.Namespace) -> dict[str, int]:
    overrides = {}
    for name in auth.QUOTA_NAMES:
        value = getattr(args, name, None)
        if value is not None:
            if value < 0:
                raise ConfigError(f"--{name.replace('_', '-')}: must be 0 or more")
            overrides[name] = value
    return overrides


def _issue_token(db: sqlite3.Connection, name: str, created_at_ms: int, limits: dict) -> str:
    token_id, secret, token = auth.new_token()
    principal = auth.Principal(name, token_id, auth.make_verifier(secret), created_at_ms, limits)
    db.execute(auth.PUT_PRINCIPAL, auth.principal_row(principal))
    return token


def _auth_command(args: argparse.Namespace) -> int:
    db = _open_catalog(args)
    try:
        if args.admin_command == "user":
            return _user_command(db, args)
        if args.admin_command == "acl":
            return _print_acl(db, args)
        auth.validate_principal_name(args.name)
        auth.validate_pattern(args.pattern)
        grant = auth.Grant(args.name, args.pattern, args.permission)
        if args.admin_command == "grant":
            db.execute(auth.PUT_GRANT, auth.grant_row(grant))
            print(f"granted {args.permission} on {args.pattern} to {args.name}", file=sys.stderr)
            known = db.execute("SELECT 1 FROM principals WHERE name = ?", (args.name,)).fetchone()
            if known is None and args.name != auth.ROOT:
                # Not an error: a client certificate's name needs no token. But a typo
                # in a token holder's name would pass unnoticed.
                print(
                    f"note: no principal {args.name!r} has a token (`mqd admin user list`); "
                    "the grant applies to a client certificate with that name",
                    file=sys.stderr,
                )
            return 0
        cursor = db.execute(auth.DELETE_GRANT, auth.grant_row(grant)[:3])
        if cursor.rowcount == 0:
            print(
                f"mqd admin: {args.name} has no {args.permission} grant on {args.pattern!r} "
                "(a permission from a wider pattern is revoked on that pattern)",
                file=sys.stderr,
            )
            return 1
        print(f"revoked {args.permission} on {args.pattern} from {args.name}", file=sys.stderr)
        return 0
    finally:
        db.close()


def _user_command(db: sqlite3.Connection, args: argparse.Namespace) -> int:
    command = args.user_command
    if command == "list":
        principals = [
            auth.principal_from_row(row)
            for row in db.execute(auth.SELECT_PRINCIPALS + " ORDER BY name")
        ]
        rows = [
            {
                "name": p.name,
                "token_id": p.token_id,
                "created_at_ms": p.created_at_ms,
                "limits": p.limits,
            }
            for p in principals
        ]
        if args.json:
            print(json.dumps(rows))
            return 0
        for row in rows:
            limits = " ".join(f"{k}={v}" for k, v in sorted(row["limits"].items()))
            created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(row["created_at_ms"] / 1000))
            print(f"{row['name']:<24} token mqd_{row['token_id']}_…  created {created}  {limits}")
        return 0
    name = auth.validate_principal_name(args.name)
    if command == "add":
        # BEGIN IMMEDIATE: check-then-insert as one write transaction.
        db.execute("BEGIN IMMEDIATE")
        try:
            if db.execute("SELECT 1 FROM principals WHERE name = ?", (name,)).fetchone():
                raise ConfigError(f"principal {name!r} exists; `mqd admin user rotate {name}`")
            token = _issue_token(db, name, int(time.time() * 1000), _quota_overrides(args))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        print(token)
        print(
            f"principal {name!r} added; the token above is shown only this once"
            + (" (root has every permission)" if name == auth.ROOT else ""),
            file=sys.stderr,
        )
        return 0
    principal = _load_principal(db, name)
    if command == "remove":
        db.execute("BEGIN IMMEDIATE")
        db.execute(auth.DELETE_PRINCIPAL, (name,))
        db.execute(auth.DELETE_PRINCIPAL_GRANTS, (name,))
        db.execute("COMMIT")
        print(f"principal {name!r} removed, with its grants", file=sys.stderr)
        return 0
    if command == "rotate":
        token = _issue_token(db, name, principal.created_at_ms, principal.limits)
        print(token)
        print(f"principal {name!r} has a new token; the old one no longer works", file=sys.stderr)
        return 0
    assert command == "limits"
    limits = {} if args.clear else dict(principal.limits)
    limits |= _quota_overrides(args)
    db.execute(
        auth.PUT_PRINCIPAL,
        auth.principal_row(
            auth.Principal(
                name, principal.token_id, principal.verifier, principal.created_at_ms, limits
            )
        ),
    )
    print(json.dumps(limits))
    return 0


def _print_acl(db: sqlite3.Connection, args: argparse.Namespace) -> int:
    query = auth.SELECT_GRANTS
    params: tuple[str, ...] = ()
    if args.name:
        query += " WHERE principal = ?"
        params = (args.name,)
    grants = [
        auth.grant_from_row(row)
        for row in db.execute(query + " ORDER BY principal, pattern, permission", params)
    ]
    if args.json:
        print(
            json.dumps(
                [
                    {
                        "principal": g.principal,
                        "pattern": g.pattern,
                        "permission": g.permission,
                        "owner": g.owner,
                    }
                    for g in grants
                ]
            )
        )
        return 0
    for g in grants:
        note = "  (creator)" if g.owner else ""
        print(f"{g.principal:<24} {g.permission:<8} {g.pattern}{note}")
    return 0


def _tls(ca: str | None) -> ssl.SSLContext | None:
    """The client context trusting `--ca`; a file it cannot use is a ConfigError naming it."""
    if not ca:
        return None
    try:
        return ssl.create_default_context(cafile=ca)
    except FileNotFoundError:
        raise ConfigError(f"--ca: no such file {ca!r}") from None
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"--ca: cannot use {ca!r} as a CA file: {exc}") from None
