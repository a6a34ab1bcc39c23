"""`mqd admin`: look at a cluster through any frontend (its STATS carry the cluster view)."""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import sys
from typing import Any

from mqd.errors import MqdError

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


async def _cluster_view(args: argparse.Namespace) -> dict[str, Any]:
    import mqd.client

    tls = ssl.create_default_context(cafile=args.ca) if args.ca else None
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

    tls = ssl.create_default_context(cafile=args.ca) if args.ca else None
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
        print("nothing to move: every partition is where the ring puts it")
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


def main(args: argparse.Namespace) -> int:
    if args.admin_command == "rebalance":
        return _print_rebalance(args)
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
    for queue, partitions in sorted(placement.items()):
        for part in partitions:
            print(
                f"{queue:<32} partition {part['index']:<3} leader {part['leader']:<14} "
                f"epoch {part['epoch']:<4} replicas {','.join(part['replicas'])}"
            )
    return 0
