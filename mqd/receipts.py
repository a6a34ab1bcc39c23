"""Receipt handles and message ids (protocol.md §5 "Receipts").

A receipt names one delivery of one message: queue id, partition, the
message's log offset, its receive count at that delivery and the epoch of the
partition's leader that made it, authenticated with a keyed BLAKE2b MAC under
the node's secret. A client cannot forge one, alter one, or use one from an
earlier delivery once the message has been redelivered (the receive count no
longer matches). The epoch tells a delivery made before a failover from one
the new leader made with the same receive count (the old leader's lease record
had not reached it). The receipt carries the partition so an ack routes without
a catalog lookup.
"""

from __future__ import annotations

import binascii
import hashlib
import hmac
import os
import struct
from pathlib import Path
from typing import NamedTuple

_PAYLOAD = struct.Struct(">8sHQII")  # queue id, partition, offset, receive count, epoch
_MAC_BYTES = 12
_RECEIPT_VERSION = b"\x02"
_RECEIPT_BYTES = 1 + _PAYLOAD.size + _MAC_BYTES
# Before the epoch: still verified (as epoch 0), so an upgrade keeps in-flight receipts.
_PAYLOAD_V1 = struct.Struct(">8sHQI")
_RECEIPT_VERSION_V1 = b"\x01"
_RECEIPT_BYTES_V1 = 1 + _PAYLOAD_V1.size + _MAC_BYTES
SECRET_BYTES = 32
# urlsafe base64 <-> the standard alphabet binascii speaks (half the cost of base64's
# urlsafe functions, which translate through Python code per call).
_FROM_URLSAFE = bytes.maketrans(b"-_", b"+/")
_TO_URLSAFE = bytes.maketrans(b"+/", b"-_")


class ReceiptFields(NamedTuple):
    queue_id: bytes
    partition: int
    offset: int
    receive_count: int
    epoch: int = 0


class ReceiptSigner:
    def __init__(self, secret: bytes) -> None:
        assert len(secret) >= 16, "receipt secret too short"
        # Keyed once: each MAC copies the keyed state instead of hashing the key block
        # again (0.47 -> 0.33 µs; one sign and one verify per message delivered).
        self._keyed = hashlib.blake2b(digest_size=_MAC_BYTES, key=secret)

    def _mac(self, payload: bytes) -> bytes:
        state = self._keyed.copy()
        state.update(payload)
        return state.digest()

    def sign(
        self, queue_id: bytes, partition: int, offset: int, receive_count: int, epoch: int = 0
    ) -> str:
        payload = _RECEIPT_VERSION + _PAYLOAD.pack(
            queue_id, partition, offset, receive_count, epoch
        )
        encoded = binascii.b2a_base64(payload + self._mac(payload), newline=False)
        return encoded.translate(_TO_URLSAFE).decode("ascii")

    def verify(self, receipt: str) -> ReceiptFields | None:
        """The receipt's fields, or None when it is malformed or its MAC is wrong."""
        if not isinstance(receipt, str) or len(receipt) > 128:
            return None
        try:
            raw = binascii.a2b_base64(
                receipt.encode("ascii").translate(_FROM_URLSAFE), strict_mode=True
            )
        except (binascii.Error, UnicodeEncodeError, ValueError):
            return None
        if len(raw) == _RECEIPT_BYTES and raw[:1] == _RECEIPT_VERSION:
            layout = _PAYLOAD
        elif len(raw) == _RECEIPT_BYTES_V1 and raw[:1] == _RECEIPT_VERSION_V1:
            layout = _PAYLOAD_V1
        else:
            return None
        payload, mac = raw[: 1 + layout.size], raw[1 + layout.size :]
        if not hmac.compare_digest(mac, self._mac(payload)):
            return None
        return ReceiptFields(*layout.unpack_from(payload, 1))


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
