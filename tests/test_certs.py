"""The cluster CA (mqd/certs.py, DESIGN.md §6-7): real files, real TLS over 127.0.0.1."""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import socket
import ssl
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mqd import certs
from mqd.certs import client_context, init_ca, issue, server_context
from mqd.errors import ConfigError

IO_TIMEOUT_S = 10.0


# ---------------------------------------------------------------------------
# Helpers


def _load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _ext(cert: x509.Certificate, cls: type) -> x509.Extension:
    return cert.extensions.get_extension_for_class(cls)


@pytest.fixture
def ca_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "certs"
    init_ca(directory)
    issue(directory, "node1", ["localhost", "127.0.0.1"])
    issue(directory, "client1", client=True)
    return directory


@pytest.fixture
def other_ca_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "other"
    init_ca(directory)
    issue(directory, "intruder", client=True)
    issue(directory, "node1", ["localhost"])
    return directory


def _files(directory: Path, name: str) -> tuple[str, str]:
    return str(directory / f"{name}.pem"), str(directory / f"{name}.key")


class Outcome:
    """What one side of a TLS exchange saw: ok with the peer's certificate, or an error."""

    def __init__(self) -> None:
        self.error: BaseException | None = None
        self.peer_cn: str | None = None
        self.reply: bytes = b""

    @property
    def ok(self) -> bool:
        return self.error is None


def _exchange(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, server_hostname: str
) -> tuple[Outcome, Outcome]:
    """Handshake, then the client sends b"ping" and the server answers b"pong".

    Under TLS 1.3 a client learns that the server refused its certificate only
    on its first read, so both sides' outcomes are reported.
    """
    server, client = Outcome(), Outcome()
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(IO_TIMEOUT_S)
    port = listener.getsockname()[1]

    def serve() -> None:
        try:
            conn, _ = listener.accept()
        except OSError as exc:
            server.error = exc
            return
        with conn:
            conn.settimeout(IO_TIMEOUT_S)
            try:
                with server_ctx.wrap_socket(conn, server_side=True) as tls:
                    peer = tls.getpeercert()
                    if peer:
                        server.peer_cn = dict(x[0] for x in peer["subject"])["commonName"]
                    if tls.recv(4) == b"ping":
                        tls.sendall(b"pong")
            except (ssl.SSLError, OSError) as exc:
                server.error = exc

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT_S) as sock:
            try:
                with client_ctx.wrap_socket(sock, server_hostname=server_hostname) as tls:
                    tls.sendall(b"ping")
                    client.reply = tls.recv(4)
                    if client.reply != b"pong":
                        client.error = ConnectionError(f"no reply: {client.reply!r}")
            except (ssl.SSLError, OSError) as exc:
                client.error = exc
    finally:
        thread.join(IO_TIMEOUT_S)
        listener.close()
    assert not thread.is_alive()
    return server, client


# ---------------------------------------------------------------------------
# init


def test_init_creates_a_p256_ca(tmp_path: Path):
    directory = tmp_path / "new" / "certs"
    cert_path, key_path = init_ca(directory)
    assert (cert_path, key_path) == (directory / "ca.pem", directory / "ca.key")
    assert _mode(directory) == 0o700
    assert _mode(key_path) == 0o600
    assert sorted(p.name for p in directory.iterdir()) == ["ca.key", "ca.pem"]  # no temp files

    cert = _load(cert_path)
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert cert.public_key().curve.name == "secp256r1"
    (cn,) = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    assert cn.value.startswith("mqd cluster CA ") and len(cn.value) > len("mqd cluster CA ")
    assert cert.issuer == cert.subject
    cert.verify_directly_issued_by(cert)

    constraints = _ext(cert, x509.BasicConstraints)
    assert constraints.critical
    assert constraints.value.ca and constraints.value.path_length == 0
    usage = _ext(cert, x509.KeyUsage)
    assert usage.critical
    assert usage.value.key_cert_sign and usage.value.crl_sign
    assert not usage.value.digital_signature
    _ext(cert, x509.SubjectKeyIdentifier)

    now = dt.datetime.now(dt.UTC)
    assert now - dt.timedelta(minutes=30) < cert.not_valid_before_utc < now
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert dt.timedelta(days=3649) < lifetime < dt.timedelta(days=3651)


def test_two_cas_have_different_names(tmp_path: Path):
    a, _ = init_ca(tmp_path / "a")
    b, _ = init_ca(tmp_path / "b")
    assert _load(a).subject != _load(b).subject


def test_init_keeps_the_mode_of_an_existing_directory(tmp_path: Path):
    directory = tmp_path / "existing"
    directory.mkdir(mode=0o755)
    directory.chmod(0o755)
    init_ca(directory)
    assert _mode(directory) == 0o755
    assert _mode(directory / "ca.key") == 0o600


def test_init_refuses_to_overwrite_a_ca(tmp_path: Path):
    cert_path, key_path = init_ca(tmp_path)
    before = cert_path.read_bytes(), key_path.read_bytes()
    with pytest.raises(ConfigError, match=r"ca\.pem: already exists"):
        init_ca(tmp_path)
    assert (cert_path.read_bytes(), key_path.read_bytes()) == before


def test_init_refuses_a_lone_key(tmp_path: Path):
    (tmp_path / "ca.key").write_text("left from a crash")
    with pytest.raises(ConfigError, match=r"ca\.key: already exists"):
        init_ca(tmp_path)


def test_init_refuses_a_file_as_directory(tmp_path: Path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="--dir"):
        init_ca(tmp_path / "file")


# ---------------------------------------------------------------------------
# issue


def test_node_certificate(ca_dir: Path):
    ca = _load(ca_dir / "ca.pem")
    cert_path = ca_dir / "node1.pem"
    assert _mode(ca_dir / "node1.key") == 0o600
    # NAME.pem holds the leaf only (see the module docstring).
    assert len(x509.load_pem_x509_certificates(cert_path.read_bytes())) == 1
    cert = _load(cert_path)

    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "node1"
    assert cert.issuer == ca.subject
    cert.verify_directly_issued_by(ca)
    assert cert.public_key().curve.name == "secp256r1"

    sans = _ext(cert, x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost"]
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert list(_ext(cert, x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH,
        ExtendedKeyUsageOID.CLIENT_AUTH,
    ]
    constraints = _ext(cert, x509.BasicConstraints)
    assert constraints.critical and not constraints.value.ca
    aki = _ext(cert, x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == _ext(ca, x509.SubjectKeyIdentifier).value.digest

    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert dt.timedelta(days=825) <= lifetime < dt.timedelta(days=825, minutes=30)


def test_client_certificate_has_client_auth_only_and_no_san(ca_dir: Path):
    cert = _load(ca_dir / "client1.pem")
    assert list(_ext(cert, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    with pytest.raises(x509.ExtensionNotFound):
        _ext(cert, x509.SubjectAlternativeName)
    assert _mode(ca_dir / "client1.key") == 0o600


def test_san_kinds(tmp_path: Path):
    init_ca(tmp_path)
    cert_path, _ = issue(tmp_path, "n", ["::1", "Node-1.example.com", "10.0.0.7", "::1"])
    sans = _ext(_load(cert_path), x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["node-1.example.com"]
    assert sans.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("::1"),
        ipaddress.ip_address("10.0.0.7"),
    ]


def test_issue_refuses_existing_files_unless_forced(ca_dir: Path):
    before = _load(ca_dir / "node1.pem")
    with pytest.raises(ConfigError, match=r"node1\.pem: already exists.*--force"):
        issue(ca_dir, "node1", ["localhost"])
    assert _load(ca_dir / "node1.pem") == before
    issue(ca_dir, "node1", ["localhost"], force=True)
    after = _load(ca_dir / "node1.pem")
    assert after.serial_number != before.serial_number
    assert _mode(ca_dir / "node1.key") == 0o600
    assert not [p for p in ca_dir.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("name", ["", "a/b", "a b", "x" * 65, "..", ".hidden", "ca", "nöde"])
def test_issue_rejects_bad_names(ca_dir: Path, name: str):
    with pytest.raises(ConfigError, match="--name"):
        issue(ca_dir, name, ["localhost"])


@pytest.mark.parametrize("san", ["", "-bad", "a..b", "bad_underscore", "nöde", "a" * 64])
def test_issue_rejects_bad_sans(ca_dir: Path, san: str):
    with pytest.raises(ConfigError, match="--san"):
        issue(ca_dir, "n2", [san])


def test_node_certificate_needs_a_san(ca_dir: Path):
    with pytest.raises(ConfigError, match="--san"):
        issue(ca_dir, "n2")
    assert not (ca_dir / "n2.key").exists()


def test_issue_without_a_ca(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"ca\.pem: no CA here.*mqd certs init"):
        issue(tmp_path, "node1", ["localhost"])


def test_issue_with_a_mismatched_ca_key(ca_dir: Path, other_ca_dir: Path):
    (ca_dir / "ca.key").write_bytes((other_ca_dir / "ca.key").read_bytes())
    with pytest.raises(ConfigError, match=r"ca\.key: does not match"):
        issue(ca_dir, "n2", ["localhost"])


def test_leaf_never_outlives_its_ca(tmp_path: Path):
    then = dt.datetime.now(dt.UTC) - dt.timedelta(days=3600)
    ca_path, _ = init_ca(tmp_path, now=then)
    cert_path, _ = issue(tmp_path, "n", ["localhost"], now=then + dt.timedelta(days=3500))
    assert _load(cert_path).not_valid_after_utc == _load(ca_path).not_valid_after_utc


# ---------------------------------------------------------------------------
# TLS


@pytest.mark.parametrize("hostname", ["localhost", "127.0.0.1"])
def test_default_context_verifies_a_node(ca_dir: Path, hostname: str):
    server = server_context(*_files(ca_dir, "node1"), None, require_client_cert=False)
    client = ssl.create_default_context(cafile=str(ca_dir / "ca.pem"))
    server_outcome, client_outcome = _exchange(server, client, hostname)
    assert client_outcome.ok, client_outcome.error
    assert server_outcome.ok, server_outcome.error
    assert server_outcome.peer_cn is None  # no client certificate was asked for


def test_hostname_not_in_sans_is_refused(ca_dir: Path):
    server = server_context(*_files(ca_dir, "node1"), None, require_client_cert=False)
    client = client_context(str(ca_dir / "ca.pem"))
    _, client_outcome = _exchange(server, client, "node2.example.com")
    assert isinstance(client_outcome.error, ssl.SSLCertVerificationError)
    assert "match" in client_outcome.error.verify_message.lower()


def test_server_from_another_ca_is_refused(ca_dir: Path, other_ca_dir: Path):
    server = server_context(*_files(other_ca_dir, "node1"), None, require_client_cert=False)
    client = client_context(str(ca_dir / "ca.pem"))
    _, client_outcome = _exchange(server, client, "localhost")
    assert isinstance(client_outcome.error, ssl.SSLCertVerificationError)


@pytest.mark.parametrize("name", ["client1", "node1"])
def test_mutual_tls_accepts_a_certificate_from_the_ca(ca_dir: Path, name: str):
    ca = str(ca_dir / "ca.pem")
    server = server_context(*_files(ca_dir, "node1"), ca, require_client_cert=True)
    client = client_context(ca, *_files(ca_dir, name))
    server_outcome, client_outcome = _exchange(server, client, "localhost")
    assert client_outcome.ok, client_outcome.error
    assert server_outcome.ok, server_outcome.error
    assert server_outcome.peer_cn == name


def test_mutual_tls_refuses_a_certificate_from_another_ca(ca_dir: Path, other_ca_dir: Path):
    ca = str(ca_dir / "ca.pem")
    server = server_context(*_files(ca_dir, "node1"), ca, require_client_cert=True)
    client = client_context(ca, *_files(other_ca_dir, "intruder"))
    server_outcome, client_outcome = _exchange(server, client, "localhost")
    assert isinstance(server_outcome.error, ssl.SSLCertVerificationError)
    assert not client_outcome.ok
    assert client_outcome.reply == b""


def test_mutual_tls_refuses_a_client_without_a_certificate(ca_dir: Path):
    ca = str(ca_dir / "ca.pem")
    server = server_context(*_files(ca_dir, "node1"), ca, require_client_cert=True)
    client = client_context(ca)
    server_outcome, client_outcome = _exchange(server, client, "localhost")
    assert isinstance(server_outcome.error, ssl.SSLError)
    assert "CERTIFICATE" in str(server_outcome.error).upper()
    assert not client_outcome.ok
    assert client_outcome.reply == b""


def test_optional_client_certificate(ca_dir: Path, other_ca_dir: Path):
    ca = str(ca_dir / "ca.pem")
    server = server_context(*_files(ca_dir, "node1"), ca, require_client_cert=False)
    assert server.verify_mode == ssl.CERT_OPTIONAL
    # No certificate: let through, anonymous.
    server_outcome, client_outcome = _exchange(server, client_context(ca), "localhost")
    assert client_outcome.ok and server_outcome.ok and server_outcome.peer_cn is None
    # A certificate from the CA: identified.
    server_outcome, _ = _exchange(
        server, client_context(ca, *_files(ca_dir, "client1")), "localhost"
    )
    assert server_outcome.peer_cn == "client1"
    # A certificate from another CA: refused, not ignored.
    server_outcome, client_outcome = _exchange(
        server, client_context(ca, *_files(other_ca_dir, "intruder")), "localhost"
    )
    assert isinstance(server_outcome.error, ssl.SSLCertVerificationError)
    assert not client_outcome.ok


def test_a_client_certificate_cannot_serve(tmp_path: Path):
    init_ca(tmp_path)
    issue(tmp_path, "sneaky", ["localhost"], client=True)
    server = server_context(*_files(tmp_path, "sneaky"), None, require_client_cert=False)
    _, client_outcome = _exchange(server, client_context(str(tmp_path / "ca.pem")), "localhost")
    assert isinstance(client_outcome.error, ssl.SSLCertVerificationError)
    assert "purpose" in client_outcome.error.verify_message.lower()


def test_expired_certificate_is_refused(tmp_path: Path):
    then = dt.datetime.now(dt.UTC) - dt.timedelta(days=900)
    init_ca(tmp_path, now=then)
    issue(tmp_path, "old", ["localhost"], now=then)
    server = server_context(*_files(tmp_path, "old"), None, require_client_cert=False)
    _, client_outcome = _exchange(server, client_context(str(tmp_path / "ca.pem")), "localhost")
    assert isinstance(client_outcome.error, ssl.SSLCertVerificationError)
    assert "expired" in client_outcome.error.verify_message


def test_contexts_require_tls_1_2(ca_dir: Path):
    ca = str(ca_dir / "ca.pem")
    server = server_context(*_files(ca_dir, "node1"), ca, require_client_cert=True)
    client = client_context(ca, *_files(ca_dir, "client1"))
    for context in (server, client):
        assert context.minimum_version >= ssl.TLSVersion.TLSv1_2
        assert context.verify_flags & ssl.VERIFY_X509_STRICT
    assert server.verify_mode == ssl.CERT_REQUIRED
    assert client.check_hostname and client.verify_mode == ssl.CERT_REQUIRED


def test_context_errors_name_the_option(ca_dir: Path, tmp_path: Path):
    cert, key = _files(ca_dir, "node1")
    missing = str(tmp_path / "missing.pem")
    with pytest.raises(ConfigError, match="cert: no such file"):
        server_context(missing, key, None, require_client_cert=False)
    with pytest.raises(ConfigError, match="key: no such file"):
        server_context(cert, missing, None, require_client_cert=False)
    with pytest.raises(ConfigError, match="ca: no such file"):
        server_context(cert, key, missing, require_client_cert=True)
    with pytest.raises(ConfigError, match="ca: require_client_cert needs a CA"):
        server_context(cert, key, None, require_client_cert=True)
    with pytest.raises(ConfigError, match="cert/key: cannot load"):
        server_context(cert, str(ca_dir / "client1.key"), None, require_client_cert=False)
    with pytest.raises(ConfigError, match="ca: no such file"):
        client_context(missing)
    with pytest.raises(ConfigError, match="ca: cannot load"):
        client_context(key)
    with pytest.raises(ConfigError, match="cert: a client key was given"):
        client_context(str(ca_dir / "ca.pem"), None, key)


# ---------------------------------------------------------------------------
# Command line (the `mqd certs` subcommand is wired in mqd/cli.py by its owner)


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mqd certs")
    certs.add_arguments(parser)
    return parser.parse_args(argv)


def test_cli_init_and_issue(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    directory = tmp_path / "c"
    assert certs.main(_parse(["init", "--dir", str(directory)])) == 0
    out = capsys.readouterr().out
    assert f"wrote {directory / 'ca.pem'}" in out and "sha256 fingerprint" in out

    argv = ["issue", "--dir", str(directory), "--name", "n1"]
    assert certs.main(_parse([*argv, "--san", "localhost", "--san", "127.0.0.1"])) == 0
    sans = _ext(_load(directory / "n1.pem"), x509.SubjectAlternativeName).value
    assert len(list(sans)) == 2

    client_argv = ["issue", "--dir", str(directory), "--name", "app", "--client"]
    assert certs.main(_parse(client_argv)) == 0
    eku = _ext(_load(directory / "app.pem"), x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    capsys.readouterr()

    assert certs.main(_parse([*argv, "--san", "localhost"])) == 2
    assert "n1.pem: already exists" in capsys.readouterr().err
    assert certs.main(_parse([*argv, "--san", "localhost", "--force"])) == 0


def test_cli_refuses_to_overwrite_a_ca_in_a_subprocess(tmp_path: Path):
    script = (
        "import argparse, sys\n"
        "from mqd.certs import add_arguments, main\n"
        "parser = argparse.ArgumentParser(prog='mqd certs')\n"
        "add_arguments(parser)\n"
        "sys.exit(main(parser.parse_args(sys.argv[1:])))\n"
    )
    run = [sys.executable, "-c", script, "init", "--dir", str(tmp_path)]
    first = subprocess.run(run, capture_output=True, text=True, timeout=60)
    assert first.returncode == 0, first.stderr
    second = subprocess.run(run, capture_output=True, text=True, timeout=60)
    assert second.returncode == 2
    assert second.stderr.startswith("mqd: ")
    assert str(tmp_path / "ca.pem") in second.stderr
