"""`mqd serve` refuses a config it cannot honour: one line naming the key, no traceback.

A real `mqd serve` subprocess, real files, real certificates from `mqd certs`
(config/single.toml: "a bad value stops the server at start with a message
naming the key"; protocol.md §8.1: "With `require_client_cert = true` every
client must present one").
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import pytest

import mqd.client
from mqd.certs import client_context, init_ca, issue
from mqd.errors import ConnectionClosed
from mqd.launcher import allocate_ports

# A server that starts anyway would run until killed: this long is plenty for a refusal.
REFUSAL_TIMEOUT_S = 20.0


@pytest.fixture
def certs(tmp_path: Path) -> Path:
    directory = tmp_path / "certs"
    init_ca(directory)
    issue(directory, "node1", ["localhost", "127.0.0.1"])
    issue(directory, "other", ["localhost"])
    issue(directory, "carol", client=True)
    return directory


def serve_refused(config: Path, data_dir: Path) -> str:
    """Run `mqd serve`, expect it to refuse to start; its stderr."""
    (port,) = allocate_ports(1)
    options = {"--config": config, "--data-dir": data_dir, "--listen": f"127.0.0.1:{port}"}
    try:
        result = subprocess.run(
            [sys.executable, "-m", "mqd", "serve", "--log-format", "json"]
            + [str(part) for option in options.items() for part in option],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=REFUSAL_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired as exc:  # run() has killed it
        pytest.fail(f"mqd serve started instead of refusing the config: {exc.stderr!r}")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mqd: configuration error: "), result.stderr
    return lines[0]


def tls_config(tmp_path: Path, **keys: object) -> Path:
    body = "".join(
        f"{key} = {str(value).lower() if isinstance(value, bool) else repr(str(value))}\n"
        for key, value in keys.items()
    )
    path = tmp_path / "node.toml"
    path.write_text("[tls]\n" + body)
    return path


# --- bug 1: require_client_cert / ca that cannot take effect ------------------------------------


def test_require_client_cert_without_ca_on_a_tls_port_is_refused(tmp_path, certs):
    config = tls_config(
        tmp_path, cert=certs / "node1.pem", key=certs / "node1.key", require_client_cert=True
    )
    line = serve_refused(config, tmp_path / "data")
    assert "tls.require_client_cert needs tls.ca" in line
    assert not (tmp_path / "data").exists()


def test_require_client_cert_without_any_tls_is_refused(tmp_path):
    line = serve_refused(tls_config(tmp_path, require_client_cert=True), tmp_path / "data")
    assert "tls.require_client_cert needs tls.ca" in line and "tls.cert" in line
    assert not (tmp_path / "data").exists()


def test_ca_without_cert_and_key_is_refused(tmp_path, certs):
    line = serve_refused(tls_config(tmp_path, ca=certs / "ca.pem"), tmp_path / "data")
    assert "tls.ca needs tls.cert and tls.key" in line
    assert not (tmp_path / "data").exists()


def test_a_full_client_cert_setup_serves_and_refuses_clients_without_one(
    server_factory, tmp_path, certs
):
    """The working setup still starts (also from one PEM file holding key and chain)."""
    combined = tmp_path / "node1-combined.pem"
    combined.write_bytes((certs / "node1.key").read_bytes() + (certs / "node1.pem").read_bytes())
    config = tls_config(
        tmp_path, cert=combined, key=combined, ca=certs / "ca.pem", require_client_cert=True
    )
    server = server_factory(config=config)
    ca = str(certs / "ca.pem")

    async def main() -> None:
        # TLS 1.3: the client's handshake ends before the server has checked; the
        # server's refusal then closes the connection under the first request.
        with pytest.raises((ssl.SSLError, ConnectionClosed)):
            client = await mqd.client.connect(server.address, tls=client_context(ca))
            await client.list_queues()
        carol = client_context(ca, str(certs / "carol.pem"), str(certs / "carol.key"))
        async with await mqd.client.connect(server.address, tls=carol) as client:
            assert await client.list_queues() == []

    asyncio.run(main())


# --- bug 2: a bad file or data dir names its key -----------------------------------------------


def _not_pem(tmp_path: Path) -> Path:
    path = tmp_path / "not-pem.txt"
    path.write_text("this is not PEM\n")
    return path


@pytest.mark.parametrize(
    ("files", "named", "bad"),
    [
        ({"cert": "NOT_PEM", "key": "node1.key"}, "tls.cert", "NOT_PEM"),
        ({"cert": "node1.key", "key": "node1.key"}, "tls.cert", "node1.key"),
        ({"cert": "node1.pem", "key": "NOT_PEM"}, "tls.key", "NOT_PEM"),
        ({"cert": "node1.pem", "key": "other.key"}, "tls.key", "other.key"),
        ({"cert": "node1.pem", "key": "node1.key", "ca": "NOT_PEM"}, "tls.ca", "NOT_PEM"),
        ({"cert": "node1.pem", "key": "node1.key", "ca": "ca.key"}, "tls.ca", "ca.key"),
    ],
)
def test_a_tls_file_that_is_not_valid_pem_names_the_key_and_the_file(
    tmp_path, certs, files, named, bad
):
    def path(name: str) -> Path:
        return _not_pem(tmp_path) if name == "NOT_PEM" else certs / name

    config = tls_config(tmp_path, **{key: path(name) for key, name in files.items()})
    line = serve_refused(config, tmp_path / "data")
    assert f"configuration error: {named}: " in line
    assert str(path(bad)) in line
    assert not (tmp_path / "data").exists(), "the data dir was made before the TLS files were read"


def test_an_encrypted_key_is_refused_without_prompting(tmp_path, certs):
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key((certs / "node1.key").read_bytes(), password=None)
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    config = tls_config(tmp_path, cert=certs / "node1.pem", key=encrypted)
    line = serve_refused(config, tmp_path / "data")
    assert "tls.key: " in line and str(encrypted) in line and "encrypted" in line


def test_a_data_dir_under_a_regular_file_names_the_option(tmp_path):
    (tmp_path / "afile").write_text("")
    config = tmp_path / "empty.toml"
    config.write_text("")
    data_dir = tmp_path / "afile" / "data"
    line = serve_refused(config, data_dir)
    assert "node.data_dir (--data-dir)" in line and str(data_dir) in line


def test_a_data_dir_that_is_a_regular_file_names_the_option(tmp_path):
    (tmp_path / "afile").write_text("")
    config = tmp_path / "empty.toml"
    config.write_text("")
    line = serve_refused(config, tmp_path / "afile")
    assert "node.data_dir (--data-dir)" in line and str(tmp_path / "afile") in line
    assert "not a directory" in line


def test_a_damaged_node_file_names_it(tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "node.json").write_text("{not json")
    config = tmp_path / "empty.toml"
    config.write_text("")
    line = serve_refused(config, data_dir)
    assert "node.data_dir (--data-dir)" in line and "node.json" in line and "damaged" in line


@pytest.mark.parametrize("held", ["frontend.listen", "metrics.listen"])
def test_a_port_in_use_is_refused_before_the_data_dir_is_touched(tmp_path, held):
    # Found only at the real bind, after recovery: node.json, receipt.key and
    # catalog.db were left behind in a directory meant to be new.
    listen_port, metrics_port = allocate_ports(2)
    holder = socket.socket()
    holder.bind(("127.0.0.1", listen_port if held == "frontend.listen" else metrics_port))
    holder.listen()
    try:
        config = tmp_path / "ports.toml"
        config.write_text(f'[metrics]\nlisten = "127.0.0.1:{metrics_port}"\n')
        data_dir = tmp_path / "new"
        result = subprocess.run(
            [sys.executable, "-m", "mqd", "serve", "--config", str(config),
             "--data-dir", str(data_dir), "--listen", f"127.0.0.1:{listen_port}"],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=REFUSAL_TIMEOUT_S,
        )  # fmt: skip
    finally:
        holder.close()
    assert result.returncode == 2, result.stderr
    assert f"{held}: cannot listen on" in result.stderr and "in use" in result.stderr
    assert not data_dir.exists()


def test_a_private_key_others_can_read_is_warned_of(server_factory, tmp_path, certs):
    key = tmp_path / "open.key"
    key.write_bytes((certs / "node1.key").read_bytes())
    key.chmod(0o644)
    server = server_factory(config=tls_config(tmp_path, cert=certs / "node1.pem", key=key))
    (warning,) = server.events("key_file.open")
    assert warning["key"] == "tls.key" and warning["mode"] == "0o644"
    assert f"chmod 600 {key}" in warning["hint"]
