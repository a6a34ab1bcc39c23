"""`mqd storage verify|dump|rebuild-index` on a real server's data dir."""

from __future__ import annotations

import subprocess
import sys

import mqd.client


def mqd_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mqd", *args], capture_output=True, text=True, timeout=60
    )


async def test_verify_dump_rebuild(server):
    async with await mqd.client.connect(server.address) as client:
        queue = await client.create_queue("tools")
        await queue.send_batch([b"alpha", b"beta", b"gamma"])
        (message,) = await queue.receive()
        await queue.ack(message)

    refused = mqd_cli("storage", "rebuild-index", str(server.data_dir))
    assert refused.returncode == 2 and "in use" in refused.stderr
    # Verify on a running node read writes in progress and reported false damage
    # (review: 2 of 4 runs FAILED under load); it is refused the same way now.
    refused = mqd_cli("storage", "verify", str(server.data_dir / "partitions"))
    assert refused.returncode == 2 and "verify needs the node stopped" in refused.stderr
    assert server.stop() == 0

    verified = mqd_cli("storage", "verify", str(server.data_dir))
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "OK" in verified.stdout and "live=2" in verified.stdout

    dumped = mqd_cli("storage", "dump", str(server.data_dir))
    assert dumped.returncode == 0
    assert dumped.stdout.count("MESSAGE") == 3 and "DELETE" in dumped.stdout

    rebuilt = mqd_cli("storage", "rebuild-index", str(server.data_dir))
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert "live=2" in rebuilt.stdout

    # Flip one byte inside the first record's body: verify must say so and fail.
    (segment,) = server.data_dir.glob("partitions/*/*.log")
    data = bytearray(segment.read_bytes())
    position = data.find(b"alpha")
    data[position] ^= 0xFF
    segment.write_bytes(bytes(data))
    damaged = mqd_cli("storage", "verify", str(server.data_dir))
    assert damaged.returncode == 1
    assert "FAILED" in damaged.stdout


def test_missing_dir_is_a_clear_error(tmp_path):
    result = mqd_cli("storage", "verify", str(tmp_path / "nope"))
    assert result.returncode == 2
    assert "no such directory" in result.stderr
    # A config file given where the data directory goes (it said "no such directory").
    config = tmp_path / "serve.toml"
    config.write_text("")
    result = mqd_cli("storage", "verify", str(config))
    assert result.returncode == 2
    assert "is a file, not a directory" in result.stderr


def test_dump_of_a_directory_without_partitions_fails(tmp_path):
    # It printed nothing and exited 0: "nothing stored" for a mistyped directory.
    result = mqd_cli("storage", "dump", str(tmp_path))
    assert result.returncode == 1
    assert "no partition directories" in result.stderr and result.stdout == ""
