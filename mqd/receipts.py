"""Receipt handles and message ids (protocol.md §5 "Receipts").

A receipt names one delivery of one message: queue id, partition, the
message's log offset and its receive count at that delivery, authenticated
with a keyed BLAKE2b MAC under the node's secret. A client cannot forge one,
alter one, or use one from an earlier delivery once the message has been
redelivered (the receive count no longer matches). The receipt carries the
partition so an ack routes without a catalog lookup.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import struct
from pathlib import Path
from typing import NamedTuple

_PAYLOAD = struct.Struct(">8sHQI")  # queue id, partition, offset, receive count
_MAC_BYTES = 12
_RECEIPT_VERSION = b"\x01"
SECRET_BYTES = 32


class ReceiptFields(NamedTuple):
    queue_id: bytes
    partition: int
    offset: int
    receive_count: int


class ReceiptSigner:
    def __init__(self, secret: bytes) -> None:
        assert len(secret) >= 16, "receipt secret too short"
        self._secret = secret

    def _mac(self, payload: bytes) -> bytes:
        return hashlib.blake2b(payload, digest_size=_MAC_BYTES, key=self._secret).digest()

    def sign(self, queue_id: bytes, partition: int, offset: int, receive_count: int) -> str:
        payload = _RECEIPT_VERSION + _PAYLOAD.pack(queue_id, partition, offset, receive_count)
        return base64.urlsafe_b64encode(payload + self._mac(payload)).decode("ascii")

    def verify(self, receipt: str) -> ReceiptFields | None:
        """The receipt's fields, or None when it is malformed or its MAC is wrong."""
        if not isinstance(receipt, str) or len(receipt) > 128:
            return None
        try:
            raw = base64.urlsafe_b64decode(receipt.encode("ascii"))
        except (binascii.Error, UnicodeEncodeError, ValueError):
            return None
        if len(raw) != 1 + _PAYLOAD.size + _MAC_BYTES or raw[:1] != _RECEIPT_VERSION:
            return None
        payload, mac = raw[: 1 + _PAYLOAD.size], raw[1 + _PAYLOAD.size :]
        if not hmac.compare_digest(mac, self._mac(payload)):
            return None
        return ReceiptFields(*_PAYLOAD.unpack_from(payload, 1))


def load_or_create_secret(path: Path) -> bytes:
    """The node's receipt secret, created on first start (temp file, fsync, rename)."""
    if path.exists():
        secret = path.read_bytes()
        if len(secret) != SECRET_BYTES:
            raise ValueError(
                f"{path}: receipt secret has {len(secret)} bytes, expected {SECRET_BYTES}"
            )
        return secret
    secret = os.urandom(SECRET_BYTES)
    temp = path.with_suffix(".tmp")
    with open(temp, "wb") as handle:
        handle.write(secret)
        handle.flush()
        os.fsync(handle.fileno())
    os.chmod(temp, 0o600)
    os.replace(temp, path)
    return secret


def message_id(queue_id: bytes, partition: int, offset: int) -> str:
    return f"{queue_id.hex()}-{partition:04x}-{offset:016x}"


def parse_message_id(text: str) -> tuple[bytes, int, int] | None:
    parts = text.split("-")
    if len(parts) != 3 or len(parts[0]) != 16 or len(parts[1]) != 4 or len(parts[2]) != 16:
        return None
    try:
        return bytes.fromhex(parts[0]), int(parts[1], 16), int(parts[2], 16)
    except ValueError:
        return None
