"""The cluster's certificate authority: `mqd certs init` and `mqd certs issue`.

Node-to-node traffic is mutual TLS with one cluster CA (DESIGN.md §6). This
module makes that CA, the node and client certificates it signs, and the
`ssl.SSLContext`s that use them (TLS 1.2 or later, DESIGN.md §7).

Files in a certs directory D:

- `D/ca.pem`, `D/ca.key`: the CA, ECDSA P-256, self-signed, valid 10 years.
- `D/NAME.pem`, `D/NAME.key`: a node or client certificate, ECDSA P-256,
  valid 825 days (or until the CA expires, if that is sooner).

`NAME.pem` holds the leaf certificate only, not the leaf followed by the CA.
Every peer already trusts `ca.pem` directly (there is no intermediate), so
sending the root in the handshake would only add bytes the peer ignores; a
chain file would also have to be rewritten if the CA were ever re-issued.

Keys are unencrypted PKCS#8 PEM, mode 0600, and are protected by file
permissions only (the node reads them unattended at start). Every file is
written to a temporary file, fsynced and renamed into place (STYLE.md "Data
and disk"), so a crash never leaves a half-written key.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import ipaddress
import os
import re
import secrets
import ssl
import sys
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mqd.errors import ConfigError

__all__ = [
    "CA_CERT_FILE",
    "CA_KEY_FILE",
    "add_arguments",
    "client_context",
    "init_ca",
    "issue",
    "main",
    "server_context",
]

CA_CERT_FILE = "ca.pem"
CA_KEY_FILE = "ca.key"

ca_validity_days = 3650
leaf_validity_days = 825  # The CA/Browser Forum's old ceiling; clients such as macOS enforce it.
# Backdating not_valid_before tolerates a peer whose clock runs a little behind ours.
clock_skew_allowance_s = 300

_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_DNS_LABEL_RE = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
_dns_name_chars_max = 253
# Names that would collide with the CA's own files or be hidden/relative paths.
_RESERVED_NAMES = frozenset({"ca"})

_KEY_MODE = 0o600
_CERT_MODE = 0o644
_DIR_MODE = 0o700


# ---------------------------------------------------------------------------
# Files


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write `data` to `path` via a temporary file, fsync and rename.

    The temporary file is created with `mode` from the start (never briefly
    world-readable) and chmodded to exactly `mode` whatever the umask. The
    directory is fsynced so that the rename itself survives a crash.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        try:
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _now(now: dt.datetime | None) -> dt.datetime:
    if now is None:
        return dt.datetime.now(dt.UTC)
    if now.tzinfo is None:
        raise ConfigError("now: must be a timezone-aware datetime")
    return now


def _refuse_existing(paths: Sequence[Path], hint: str) -> None:
    for path in paths:
        if path.exists():
            raise ConfigError(f"{path}: already exists; {hint}")


# ---------------------------------------------------------------------------
# CA


def init_ca(directory: Path, *, now: dt.datetime | None = None) -> tuple[Path, Path]:
    """Create a new cluster CA in `directory`; return (ca.pem, ca.key).

    `directory` is created with mode 0700 if it does not exist (an existing
    directory keeps its mode). An existing `ca.pem` or `ca.key` is never
    overwritten: replacing the CA would invalidate every certificate it
    signed, so the operator must remove the old files deliberately.
    """
    directory = Path(directory)
    cert_path, key_path = directory / CA_CERT_FILE, directory / CA_KEY_FILE
    _refuse_existing(
        (cert_path, key_path),
        "refusing to overwrite an existing CA (every certificate it signed depends on it)",
    )
    _make_directory(directory)
    now = _now(now)

    key = ec.generate_private_key(ec.SECP256R1())
    # The random suffix tells apart CAs of different clusters in error messages.
    name = x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, f"mqd cluster CA {secrets.token_hex(4)}")]
    )
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(seconds=clock_skew_allowance_s))
        .not_valid_after(now + dt.timedelta(days=ca_validity_days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    # The key goes first: a crash between the two writes leaves a lone key,
    # which init refuses to overwrite, rather than a certificate with no key.
    _write_atomic(key_path, _key_pem(key), _KEY_MODE)
    _write_atomic(cert_path, _cert_pem(cert), _CERT_MODE)
    return cert_path, key_path


def _make_directory(directory: Path) -> None:
    if directory.is_dir():
        return
    if directory.exists():
        raise ConfigError(f"--dir: {directory} exists and is not a directory")
    try:
        directory.mkdir(parents=True, mode=_DIR_MODE)
    except OSError as exc:
        raise ConfigError(f"--dir: cannot create {directory}: {exc.strerror}") from exc
    os.chmod(directory, _DIR_MODE)  # mkdir's mode is filtered by the umask.


def _load_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert_path, key_path = directory / CA_CERT_FILE, directory / CA_KEY_FILE
    for path in (cert_path, key_path):
        if not path.is_file():
            raise ConfigError(f"{path}: no CA here; run `mqd certs init --dir {directory}` first")
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{cert_path}: not a readable PEM certificate: {exc}") from exc
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"{key_path}: not a readable unencrypted PEM key: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{key_path}: not an ECDSA key")
    if key.public_key() != cert.public_key():
        raise ConfigError(f"{key_path}: does not match {cert_path}")
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        raise ConfigError(f"{cert_path}: not a CA certificate")
    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise ConfigError(f"{cert_path}: not a self-signed CA certificate") from exc
    return cert, key


# ---------------------------------------------------------------------------
# Node and client certificates


def _check_name(name: str) -> None:
    if not _NAME_RE.fullmatch(name):
        raise ConfigError(f"--name: {name!r} must be 1-64 characters of A-Z a-z 0-9 _ . -")
    if name.startswith(".") or name in _RESERVED_NAMES:
        raise ConfigError(f"--name: {name!r} is reserved (names may not start with '.' or be 'ca')")


def _parse_san(value: str) -> x509.GeneralName:
    """An IP address if `value` parses as one, else a DNS name (RFC 1123 labels)."""
    try:
        return x509.IPAddress(ipaddress.ip_address(value))
    except ValueError:
        pass
    host = value[2:] if value.startswith("*.") else value  # One leading wildcard label.
    if (
        not value
        or len(value) > _dns_name_chars_max
        or not all(_DNS_LABEL_RE.fullmatch(label) for label in host.split("."))
    ):
        raise ConfigError(f"--san: {value!r} is neither an IP address nor a DNS name")
    return x509.DNSName(value.lower())


def issue(
    directory: Path,
    name: str,
    sans: Sequence[str] = (),
    *,
    client: bool = False,
    force: bool = False,
    now: dt.datetime | None = None,
) -> tuple[Path, Path]:
    """Issue a certificate signed by the CA in `directory`; return (NAME.pem, NAME.key).

    A node certificate (the default) carries ExtendedKeyUsage serverAuth and
    clientAuth, because nodes are both servers and clients of each other, and
    needs at least one SAN: TLS clients check the host name against SANs only.
    A `client` certificate carries clientAuth only and needs no SAN.
    Existing files for `name` are an error unless `force`.
    """
    directory = Path(directory)
    _check_name(name)
    if isinstance(sans, str):
        raise ConfigError("sans: expected a sequence of strings, got one string")
    general_names = list(dict.fromkeys(_parse_san(s) for s in sans))
    if not client and not general_names:
        raise ConfigError(
            f"--san: the node certificate {name!r} needs at least one --san "
            "(a host name or IP address peers will dial), or use --client"
        )
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    if not force:
        _refuse_existing((cert_path, key_path), "use --force to replace it")
    ca_cert, ca_key = _load_ca(directory)
    now = _now(now)

    key = ec.generate_private_key(ec.SECP256R1())
    not_after = min(now + dt.timedelta(days=leaf_validity_days), ca_cert.not_valid_after_utc)
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    if not client:
        usages.insert(0, ExtendedKeyUsageOID.SERVER_AUTH)
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(seconds=clock_skew_allowance_s))
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                # ECDHE key exchange needs only signatures from the certificate's key.
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
    )
    if general_names:
        builder = builder.add_extension(x509.SubjectAlternativeName(general_names), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    _write_atomic(key_path, _key_pem(key), _KEY_MODE)
    _write_atomic(cert_path, _cert_pem(cert), _CERT_MODE)
    return cert_path, key_path


# ---------------------------------------------------------------------------
# SSL contexts


def _load_chain(context: ssl.SSLContext, cert: str, key: str | None) -> None:
    for option, path in (("cert", cert), ("key", key)):
        if path is not None and not Path(path).is_file():
            raise ConfigError(f"{option}: no such file {path!r}")
    try:
        context.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        raise ConfigError(
            f"cert/key: cannot load {cert!r} with key {key!r}: {exc.reason or exc}"
        ) from exc


def _load_ca_file(context: ssl.SSLContext, ca: str) -> None:
    if not Path(ca).is_file():
        raise ConfigError(f"ca: no such file {ca!r}")
    try:
        context.load_verify_locations(cafile=ca)
    except ssl.SSLError as exc:
        raise ConfigError(f"ca: cannot load {ca!r}: {exc.reason or exc}") from exc


def _harden(context: ssl.SSLContext) -> None:
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # Strict RFC 5280 checks, the default for create_default_context from Python 3.13.
    context.verify_flags |= ssl.VERIFY_X509_STRICT


def server_context(
    cert: str, key: str, ca: str | None, *, require_client_cert: bool
) -> ssl.SSLContext:
    """A TLS server context presenting `cert`/`key`.

    With `ca`, client certificates are verified against that CA only (never
    the system's trust store): required if `require_client_cert`, else
    optional (a client that sends none is let through, one that sends a bad
    one is refused). Without `ca`, clients are not asked for certificates.
    """
    if ca is None and require_client_cert:
        raise ConfigError("ca: require_client_cert needs a CA file to verify clients against")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _harden(context)
    _load_chain(context, cert, key)
    if ca is not None:
        _load_ca_file(context, ca)
        context.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    return context


def client_context(ca: str, cert: str | None = None, key: str | None = None) -> ssl.SSLContext:
    """A TLS client context trusting `ca`, with host name checking on.

    `cert`/`key` (a certificate with clientAuth) are presented to servers
    that ask for one, for mutual TLS between nodes.
    """
    if cert is None and key is not None:
        raise ConfigError("cert: a client key was given without its certificate")
    if not Path(ca).is_file():
        raise ConfigError(f"ca: no such file {ca!r}")
    try:
        context = ssl.create_default_context(cafile=ca)
    except ssl.SSLError as exc:
        raise ConfigError(f"ca: cannot load {ca!r}: {exc.reason or exc}") from exc
    _harden(context)
    assert context.check_hostname and context.verify_mode == ssl.CERT_REQUIRED
    if cert is not None:
        _load_chain(context, cert, key)
    return context


# ---------------------------------------------------------------------------
# Command line: `mqd certs init|issue`


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `init` and `issue` actions to the `mqd certs` parser."""
    actions = parser.add_subparsers(dest="certs_command", required=True, metavar="ACTION")
    init = actions.add_parser("init", help="create a cluster CA (ca.pem, ca.key)")
    init.add_argument("--dir", required=True, metavar="DIR", help="certs directory")

    issue_parser = actions.add_parser(
        "issue", help="issue a node or client certificate signed by the CA"
    )
    issue_parser.add_argument("--dir", required=True, metavar="DIR", help="certs directory")
    issue_parser.add_argument(
        "--name", required=True, metavar="NAME", help="writes NAME.pem and NAME.key; the CN"
    )
    issue_parser.add_argument(
        "--san",
        action="append",
        default=[],
        metavar="HOST_OR_IP",
        help="subject alternative name (repeat); an IP if it parses as one, else a DNS name",
    )
    issue_parser.add_argument(
        "--client",
        action="store_true",
        help="a client certificate (clientAuth only, no SAN needed)",
    )
    issue_parser.add_argument(
        "--force", action="store_true", help="replace existing NAME.pem and NAME.key"
    )


def _fingerprint(cert_path: Path) -> str:
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    return cert.fingerprint(hashes.SHA256()).hex(":")


def main(args: argparse.Namespace) -> int:
    """Run `mqd certs ACTION`; print `mqd: ...` and return 2 on a configuration error."""
    try:
        directory = Path(args.dir)
        if args.certs_command == "init":
            cert_path, key_path = init_ca(directory)
        elif args.certs_command == "issue":
            cert_path, key_path = issue(
                directory, args.name, args.san, client=args.client, force=args.force
            )
        else:  # pragma: no cover - argparse only accepts the actions above
            raise AssertionError(args.certs_command)
    except ConfigError as exc:
        print(f"mqd: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {cert_path}")
    print(f"wrote {key_path}")
    print(f"sha256 fingerprint {_fingerprint(cert_path)}")
    return 0
