"""Encryption at rest of message records: key files, the key ring, `mqd storage keygen`.

A key file is one line of JSON, mode 0600:

    {"format": "mqd-storage-key", "version": 1, "key_id": "<16 hex>", "key": "<base64>"}

`key` is 32 random bytes (AES-256-GCM). `key_id` is not chosen: it is the
first 8 bytes of SHA-256 over a label and the key, so a key file whose id and
key disagree is detected at load, and a segment header's key id names the
only key that can open it. A wrong key is therefore always a "key not listed"
error at open, by id, before any record is decrypted. Key id 0 means
"plaintext" in a segment header and is never a key's id.

What is sealed and how is in `records.py` (sealed MESSAGE records). The key
of new segments is `[storage] encryption_key_file`; segments sealed with an
earlier key stay readable while that key's file is listed in
`encryption_old_key_files` (DESIGN.md §4).
"""

from __future__ import annotations

import base64
import binascii
import errno
import hashlib
import json
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from mqd.errors import ConfigError
from mqd.storage.records import NONCE_BYTES

KEY_FILE_FORMAT = "mqd-storage-key"
# Key file format version. To change it: bump KEY_FILE_VERSION, keep `_parse` accepting
# the older versions (key files are long-lived and listed as old keys for years), and
# make `keygen` write only the newest.
KEY_FILE_VERSION = 1
KEY_BYTES = 32  # AES-256
_KEY_ID_LABEL = b"mqd storage key id v1\0"
KEY_FILE_BYTES_MAX = 4096


def key_id_of(key: bytes) -> int:
    """The u64 id of a key: a hash of it, never 0."""
    return int.from_bytes(hashlib.sha256(_KEY_ID_LABEL + key).digest()[:8], "big")


def format_key_id(key_id: int) -> str:
    return f"{key_id:016x}"


class SealingKey:
    """One AES-256-GCM key, with its id and a nonce source (injectable for tests)."""

    __slots__ = ("aead", "key_id", "path", "random_bytes")

    def __init__(
        self, key: bytes, path: str = "", random_bytes: Callable[[int], bytes] = os.urandom
    ) -> None:
        assert len(key) == KEY_BYTES, "AES-256 wants a 32-byte key"
        self.key_id = key_id_of(key)
        assert self.key_id != 0, "key id 0 means plaintext"
        self.aead = AESGCM(key)
        self.path = path
        self.random_bytes = random_bytes

    def nonces(self, count: int) -> bytes:
        """`count` fresh random 96-bit nonces in one buffer (one getrandom call per group).

        Random nonces are safe for about 2**32 records per key (NIST SP 800-38D);
        rotate the key well before that (about 1 TiB of 256-byte messages).
        """
        return self.random_bytes(NONCE_BYTES * count)

    @property
    def id_text(self) -> str:
        return format_key_id(self.key_id)


class Keyring:
    """The current key (for new segments; None = write plaintext) and every readable key."""

    __slots__ = ("_by_id", "current")

    def __init__(self, current: SealingKey | None = None, old: Iterable[SealingKey] = ()) -> None:
        self.current = current
        self._by_id: dict[int, SealingKey] = {}
        for key in (*old, *([current] if current else [])):
            self._by_id[key.key_id] = key

    @property
    def current_id(self) -> int:
        """The key id new segments get in their header (0 = plaintext)."""
        return self.current.key_id if self.current is not None else 0

    def ids(self) -> list[int]:
        return sorted(self._by_id)

    def __bool__(self) -> bool:
        return bool(self._by_id)

    def get(self, key_id: int) -> SealingKey | None:
        """The key with `key_id`, None for a plaintext segment (id 0)."""
        if key_id == 0:
            return None
        return self._by_id.get(key_id)

    def require(self, key_id: int, what: str) -> SealingKey | None:
        """As `get`, but a key that is not listed is a `ConfigError` naming its id and `what`."""
        if key_id == 0:
            return None
        key = self._by_id.get(key_id)
        if key is None:
            raise ConfigError(missing_key_message(key_id, what, self))
        return key


def missing_key_message(key_id: int, what: str, keys: Keyring) -> str:
    listed = ", ".join(format_key_id(k) for k in keys.ids()) or "none"
    return (
        f"{what} is sealed with storage key {format_key_id(key_id)}, which is not listed "
        f"(keys listed: {listed}); set storage.encryption_key_file or add the key's file "
        "to storage.encryption_old_key_files"
    )


def load_key_file(path: str, config_key: str = "key file") -> SealingKey:
    """Read and check a key file; any problem is a `ConfigError` naming `config_key`."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(KEY_FILE_BYTES_MAX + 1)
    except FileNotFoundError:
        raise ConfigError(f"{config_key}: no such key file {path!r}") from None
    except OSError as exc:
        raise ConfigError(f"{config_key}: cannot read key file {path!r}: {exc.strerror}") from None
    key = _parse(data, path, config_key)
    return SealingKey(key, path)


def _parse(data: bytes, path: str, config_key: str) -> bytes:
    def bad(why: str) -> ConfigError:
        return ConfigError(f"{config_key}: {path!r} is not an mqd storage key file ({why})")

    if len(data) > KEY_FILE_BYTES_MAX:
        raise bad("too large")
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise bad("not JSON") from None
    if not isinstance(doc, dict) or doc.get("format") != KEY_FILE_FORMAT:
        raise bad(f'no "format": "{KEY_FILE_FORMAT}"')
    if doc.get("version") != KEY_FILE_VERSION:
        raise bad(f"unknown version {doc.get('version')!r}")
    text = doc.get("key")
    try:
        key = base64.b64decode(text, validate=True) if isinstance(text, str) else b""
    except binascii.Error:
        raise bad("key is not base64") from None
    if len(key) != KEY_BYTES:
        raise bad(f"key must be {KEY_BYTES} bytes")
    if doc.get("key_id") != format_key_id(key_id_of(key)):
        raise bad("key_id does not match the key; the file is damaged")
    return key


def key_file_text(key: bytes) -> str:
    doc = {
        "format": KEY_FILE_FORMAT,
        "version": KEY_FILE_VERSION,
        "key_id": format_key_id(key_id_of(key)),
        "key": base64.b64encode(key).decode("ascii"),
    }
    return json.dumps(doc) + "\n"


def load_keyring(current_file: str, old_files: Iterable[str]) -> Keyring:
    """Load `[storage] encryption_key_file` and `encryption_old_key_files` (ConfigError on any)."""
    current = load_key_file(current_file, "storage.encryption_key_file") if current_file else None
    old = [
        load_key_file(path, f"storage.encryption_old_key_files[{i}]")
        for i, path in enumerate(old_files)
    ]
    return Keyring(current, old)


def keygen(path: Path, random_bytes: Callable[[int], bytes] = os.urandom) -> int:
    """Write a new key file at `path` (0600, temp + fsync + link); return its key id.

    Never overwrites: an existing `path` is a `ConfigError`. The file appears
    whole or not at all (a hard link of the synced temp file; where the file
    system has no hard links, a rename after an existence check).
    """
    path = Path(path)
    if path.exists():
        raise ConfigError(f"{path}: already exists; keygen never overwrites a key")
    key = random_bytes(KEY_BYTES)
    while key_id_of(key) == 0:  # pragma: no cover - probability 2**-64
        key = random_bytes(KEY_BYTES)
    directory = path.parent if str(path.parent) else Path(".")
    temp = directory / f".{path.name}.{os.getpid()}.tmp"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        try:
            os.fchmod(fd, 0o600)  # whatever the umask
            os.write(fd, key_file_text(key).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(temp, path)
        except FileExistsError:
            raise ConfigError(f"{path}: already exists; keygen never overwrites a key") from None
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EXDEV, errno.EMLINK):
                raise
            if path.exists():
                raise ConfigError(
                    f"{path}: already exists; keygen never overwrites a key"
                ) from None
            os.rename(temp, path)
    finally:
        if temp.exists():
            temp.unlink()
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return key_id_of(key)


def keygen_main(path: str) -> int:
    """`mqd storage keygen FILE`: exit status 0, or 1 with a message on stderr."""
    try:
        key_id = keygen(Path(path))
    except ConfigError as exc:
        print(f"mqd: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"mqd: cannot write key file {path!r}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    print(f"wrote storage key {format_key_id(key_id)} to {path} (mode 0600)")
    print("set [storage] encryption_key_file to it; keep a copy: without it the data is lost")
    return 0
