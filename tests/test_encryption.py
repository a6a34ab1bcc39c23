"""Encryption at rest end to end: a real `mqd serve` with `[storage] encryption_key_file`."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import mqd.client
from mqd.storage.crypto import format_key_id, keygen
from mqd.storage.records import parse_header

from .conftest import ServerProcess

MARKER = b"PLAINTEXT-MARKER-"


def _config(tmp_path: Path, name: str, key_file: str, old: tuple[str, ...] = ()) -> Path:
    path = tmp_path / name
    old_list = ", ".join(f'"{p}"' for p in old)
    path.write_text(
        f'[storage]\nencryption_key_file = "{key_file}"\nencryption_old_key_files = [{old_list}]\n'
    )
    return path


def _segments(data_dir: Path) -> list[Path]:
    return sorted(p for p in data_dir.rglob("*.log*") if p.is_file())


async def _send_and_receive(address: str, queue_name: str, start: int, count: int) -> None:
    async with await mqd.client.connect(address) as client:
        queue = await client.create_queue(queue_name)
        await queue.send(MARKER + b"single", attributes={"secret": "ATTR-MARKER"})
        await queue.send_batch([MARKER + b"%d" % i for i in range(start, start + count)])
        got = await queue.receive(max_messages=1, visibility_timeout=30)
        assert got[0].body == MARKER + b"single"
        assert got[0].attributes.get("secret") == "ATTR-MARKER"
        await queue.ack(*got)


async def test_sealed_end_to_end_restart_and_wrong_key(server_factory, tmp_path: Path) -> None:
    key_a = tmp_path / "a.key"
    id_a = format_key_id(keygen(key_a))
    server = server_factory(config=_config(tmp_path, "a.toml", str(key_a)))
    await _send_and_receive(server.address, "secret", 0, 200)
    assert server.stop() == 0

    segments = _segments(server.data_dir)
    assert segments
    for seg in segments:
        data = seg.read_bytes()
        assert MARKER not in data and b"ATTR-MARKER" not in data
        assert format_key_id(parse_header(data).key_id) == id_a

    # Restart with the key: every message is still there and readable.
    server.start()
    async with await mqd.client.connect(server.address) as client:
        queue = client.queue("secret")
        bodies = set()
        while batch := await queue.receive(max_messages=100, wait=0.2, visibility_timeout=30):
            bodies.update(m.body for m in batch)
            await queue.ack(*batch)
    assert bodies == {MARKER + b"%d" % i for i in range(200)}
    assert server.stop() == 0

    # Without the key, and with another key: a clear startup error naming the key id.
    key_b = tmp_path / "b.key"
    keygen(key_b)
    for config in (None, _config(tmp_path, "b.toml", str(key_b))):
        probe = ServerProcess(server.data_dir, config=config)
        result = await asyncio.to_thread(
            subprocess.run,
            probe.command(),
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        assert result.returncode != 0
        assert id_a in result.stderr and "not listed" in result.stderr, result.stderr[-2000:]

    # rebuild-index without the node's --config: refused before any index is dropped
    # (it emptied the first index, then failed on the key; review).
    indexes = {p: p.read_bytes() for p in server.data_dir.glob("partitions/*/index*")}
    assert indexes
    rebuild = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "mqd", "storage", "rebuild-index", str(server.data_dir)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert rebuild.returncode == 2 and "nothing was changed" in rebuild.stderr, rebuild.stderr
    assert {p: p.read_bytes() for p in server.data_dir.glob("partitions/*/index*")} == indexes


async def test_rotation_through_the_server(server_factory, tmp_path: Path) -> None:
    key_a, key_b = tmp_path / "a.key", tmp_path / "b.key"
    id_a, id_b = format_key_id(keygen(key_a)), format_key_id(keygen(key_b))
    server = server_factory(config=_config(tmp_path, "a.toml", str(key_a)))
    async with await mqd.client.connect(server.address) as client:
        queue = await client.create_queue("rot")
        await queue.send_batch([MARKER + b"old%d" % i for i in range(10)])
    assert server.stop() == 0

    server.config = _config(tmp_path, "b.toml", str(key_b), (str(key_a),))
    server.start()
    async with await mqd.client.connect(server.address) as client:
        queue = client.queue("rot")
        await queue.send_batch([MARKER + b"new%d" % i for i in range(10)])
        bodies = set()
        while batch := await queue.receive(max_messages=100, wait=0.2, visibility_timeout=30):
            bodies.update(m.body for m in batch)
    assert bodies == {MARKER + b"%s%d" % (w, i) for w in (b"old", b"new") for i in range(10)}
    assert server.stop() == 0
    ids = {format_key_id(parse_header(s.read_bytes()).key_id) for s in _segments(server.data_dir)}
    assert {id_a, id_b} <= ids
    assert all(MARKER not in s.read_bytes() for s in _segments(server.data_dir))
