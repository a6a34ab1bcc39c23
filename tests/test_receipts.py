"""Receipts are authenticated: forged, altered and foreign receipts do not verify."""

from __future__ import annotations

import base64
import hashlib
import struct

from hypothesis import given
from hypothesis import strategies as st

from mqd.receipts import ReceiptSigner, message_id, parse_message_id

SIGNER = ReceiptSigner(b"k" * 32)
QUEUE_ID = bytes(range(8))


def test_round_trip():
    receipt = SIGNER.sign(QUEUE_ID, 3, 12345, 2, 9)
    fields = SIGNER.verify(receipt)
    assert fields == (QUEUE_ID, 3, 12345, 2, 9)


def test_other_secret_rejects():
    receipt = SIGNER.sign(QUEUE_ID, 0, 1, 1)
    assert ReceiptSigner(b"x" * 32).verify(receipt) is None


@given(st.integers(min_value=0, max_value=33), st.integers(min_value=1, max_value=255))
def test_any_altered_byte_rejects(position, flip):
    raw = bytearray(base64.urlsafe_b64decode(SIGNER.sign(QUEUE_ID, 0, 99, 1)))
    raw[position % len(raw)] ^= flip
    assert SIGNER.verify(base64.urlsafe_b64encode(bytes(raw)).decode()) is None


@given(st.text(max_size=200))
def test_garbage_is_refused_without_raising(text):
    assert SIGNER.verify(text) is None


def test_message_id_round_trip():
    text = message_id(QUEUE_ID, 1, 77)
    assert parse_message_id(text) == (QUEUE_ID, 1, 77)
    assert parse_message_id("nonsense") is None


def test_receipts_made_before_epochs_still_verify_as_epoch_zero():
    # v1 receipts (no epoch), handed out before an upgrade, stay good on a single node.
    payload = b"\x01" + struct.pack(">8sHQI", QUEUE_ID, 0, 7, 2)
    mac = hashlib.blake2b(payload, digest_size=12, key=b"k" * 32).digest()
    receipt = base64.urlsafe_b64encode(payload + mac).decode()
    fields = SIGNER.verify(receipt)
    assert fields is not None and (fields.offset, fields.receive_count, fields.epoch) == (7, 2, 0)
    assert SIGNER.verify(SIGNER.sign(QUEUE_ID, 0, 7, 2, 5)).epoch == 5
