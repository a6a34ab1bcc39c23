"""Encryption at rest: key files, sealed records, rotation, wrong keys, tampering, tools."""

from __future__ import annotations

import base64
import io
import json
import os
import stat
import struct
from pathlib import Path
from zlib import crc32

import pytest
from storage_helpers import LogRecorder, msg, open_store, segment_files

from mqd.clock import ManualClock
from mqd.errors import ConfigError, InternalError, StorageError
from mqd.storage import NewMessage, StorageConfig
from mqd.storage import records as rec
from mqd.storage.crypto import (
    Keyring,
    SealingKey,
    format_key_id,
    key_id_of,
    keygen,
    keygen_main,
    load_key_file,
)
from mqd.storage.scan import scan_segment
from mqd.storage.tools import dump, load_keys, verify

SECRET = b"TOP-SECRET-BODY-"  # a marker that must never reach a segment file in clear
ATTR_SECRET = "ATTRIBUTE-SECRET-VALUE"


def make_key(tmp_path: Path, name: str) -> tuple[str, str]:
    """A key file; returns (path, key id as hex)."""
    path = tmp_path / name
    key_id = keygen(path)
    return str(path), format_key_id(key_id)


def enc(current: str = "", *old: str, **kw) -> StorageConfig:
    return StorageConfig(encryption_key_file=current, encryption_old_key_files=list(old), **kw)


def secret_msg(i: int) -> NewMessage:
    return NewMessage(SECRET + b"%04d" % i + b"." * 200, {"k": f"{ATTR_SECRET}{i}"}, group_id="g1")


def _key_bytes(path: str) -> bytes:
    return base64.b64decode(json.loads(Path(path).read_text())["key"])


def header_of(path: Path) -> rec.SegmentHeader:
    return rec.parse_header(path.read_bytes()[:64])


def index_files(part: Path) -> list[Path]:
    return [p for p in part.iterdir() if p.name.startswith("index")]


def drop_index(part: Path) -> None:
    for path in index_files(part):
        path.unlink()


def all_log_bytes(part: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(part.glob("*.log*")))


# ------------------------------------------------------------------ key files


def test_keygen_writes_a_0600_key_file_and_never_overwrites(tmp_path: Path, capsys) -> None:
    path = tmp_path / "k.key"
    assert keygen_main(str(path)) == 0
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    doc = json.loads(path.read_text())
    key = load_key_file(str(path))
    assert doc["key_id"] == key.id_text == format_key_id(key_id_of(_key_bytes(str(path))))
    assert key.id_text in capsys.readouterr().out
    before = path.read_bytes()
    assert keygen_main(str(path)) == 1
    assert "already exists" in capsys.readouterr().err
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["k.key"]  # no temp file left behind


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (b"", "not JSON"),
        (b'{"format": "other"}', "format"),
        (b'{"format": "mqd-storage-key", "version": 9}', "unknown version"),
        (b'{"format": "mqd-storage-key", "version": 1, "key_id": "00", "key": "!!"}', "base64"),
        (b'{"format": "mqd-storage-key", "version": 1, "key_id": "00", "key": "AAAA"}', "32 bytes"),
    ],
)
def test_bad_key_file_is_a_config_error_naming_the_key(tmp_path, content, why) -> None:
    path = tmp_path / "bad.key"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as caught:
        enc(str(path)).validate()
    assert "storage.encryption_key_file" in str(caught.value) and why in str(caught.value)


def test_key_file_with_a_mismatched_id_or_missing_is_refused(tmp_path) -> None:
    path, _ = make_key(tmp_path, "a.key")
    doc = json.loads(Path(path).read_text())
    doc["key_id"] = "0" * 16
    Path(path).write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match="does not match"):
        enc(path).validate()
    with pytest.raises(ConfigError, match=r"storage.encryption_old_key_files\[0\].*no such"):
        enc("", str(tmp_path / "nope.key")).validate()


# -------------------------------------------------------------------- records


def test_sealed_records_round_trip_and_bind_their_offset() -> None:
    key = SealingKey(b"k" * 32)
    keys = Keyring(key)
    msgs = [secret_msg(1), NewMessage(b"plain", {}), NewMessage(b"", {"a": "b"}, dedup_id="d")]
    parts, sizes = [], []
    rec.encode_messages(msgs, 7, 1234, parts, sizes, key)
    buf = b"".join(parts)
    rec.verify_buffer(buf, sizes)
    assert SECRET not in buf and ATTR_SECRET.encode() not in buf
    pos = 0
    for i, (m, size) in enumerate(zip(msgs, sizes, strict=True)):
        assert rec.check_record(buf, pos, len(buf), 1 << 20) == size
        r = rec.decode_record(buf, pos, size, keys=keys)
        assert (r.offset, r.body, r.attributes, r.dedup_id) == (
            7 + i,
            m.body,
            m.attributes,
            m.dedup_id,
        )
        assert r.size == rec.decode_record(buf, pos, size, with_body=False).size
        assert rec.sealed_key_id(buf, pos, size) == key.key_id
        with pytest.raises(rec.CorruptRecord, match="no key"):
            rec.decode_record(buf, pos, size)  # never ciphertext as a body
        with pytest.raises(rec.KeyMissing):
            rec.decode_record(buf, pos, size, keys=Keyring(SealingKey(b"o" * 32)))
        pos += size
    # Move the first record to another offset (CRC recomputed): the tag catches it.
    moved = bytearray(buf[: sizes[0]])
    struct.pack_into(">Q", moved, rec.PREFIX_BYTES + 1, 99)
    struct.pack_into(">I", moved, 4, crc32(moved[rec.PREFIX_BYTES :]))
    rec.check_record(moved, 0, len(moved), 1 << 20)
    with pytest.raises(rec.TagMismatch):
        rec.decode_record(moved, 0, len(moved), keys=keys)


def test_v1_headers_stay_readable() -> None:
    v1 = rec.HEADER_V1.pack(rec.MAGIC, 1, 0, 42, 1000)
    assert rec.parse_header(v1) == rec.SegmentHeader(1, 42, 1000, 0, 24)
    v2 = rec.encode_header(42, 1000, 7)
    assert rec.parse_header(v2) == rec.SegmentHeader(rec.FORMAT_VERSION, 42, 1000, 7, 32)


# ---------------------------------------------------------------------- store


async def test_round_trip_sealed_nothing_in_clear_and_restart(tmp_path: Path, part: Path) -> None:
    key_a, id_a = make_key(tmp_path, "a.key")
    config = enc(key_a, read_cache_bytes_max=0)
    store = await open_store(part, config=config)
    metas = await store.append_messages([secret_msg(i) for i in range(50)])
    got = await store.read([m.offset for m in metas])
    assert [g.body for g in got] == [secret_msg(i).body for i in range(50)]
    assert got[3].attributes == {"k": f"{ATTR_SECRET}3"} and got[3].group_id == "g1"
    await store.close()
    data = all_log_bytes(part)
    assert SECRET not in data and ATTR_SECRET.encode() not in data
    # The index holds positions and metadata only.
    index = b"".join(p.read_bytes() for p in index_files(part))
    assert index and SECRET not in index and ATTR_SECRET.encode() not in index
    (seg,) = segment_files(part)
    assert format_key_id(header_of(seg).key_id) == id_a

    store = await open_store(part, config=config)
    live = store.live_messages()
    assert [m.size for m in live] == [m.size for m in metas]  # same accounting after restart
    got = await store.read([m.offset for m in live])
    assert got[49].body == secret_msg(49).body and got[49].attributes == {"k": f"{ATTR_SECRET}49"}
    await store.close()


async def test_missing_or_wrong_key_is_a_clear_error_at_open(tmp_path: Path, part: Path) -> None:
    key_a, id_a = make_key(tmp_path, "a.key")
    key_b, id_b = make_key(tmp_path, "b.key")
    store = await open_store(part, config=enc(key_a))
    await store.append_messages([secret_msg(1)])
    await store.close()
    with pytest.raises(ConfigError) as caught:
        await open_store(part, config=StorageConfig())
    assert id_a in str(caught.value) and "not listed" in str(caught.value)
    with pytest.raises(ConfigError) as caught:
        await open_store(part, config=enc(key_b))  # a different key is a different id
    assert id_a in str(caught.value) and id_b in str(caught.value)
    # Nothing was changed by the failed opens.
    store = await open_store(part, config=enc(key_a))
    (got,) = await store.read([0])
    assert got.body == secret_msg(1).body
    await store.close()


async def test_rotation_old_key_reads_new_segments_use_new_key(tmp_path: Path, part: Path) -> None:
    key_a, id_a = make_key(tmp_path, "a.key")
    key_b, id_b = make_key(tmp_path, "b.key")
    store = await open_store(part, config=enc(key_a, read_cache_bytes_max=0))
    await store.append_messages([secret_msg(i) for i in range(5)])
    await store.close()

    store = await open_store(part, config=enc(key_b, key_a, read_cache_bytes_max=0))
    await store.append_messages([secret_msg(i) for i in range(5, 10)])
    got = await store.read(list(range(10)))
    assert [g.body for g in got] == [secret_msg(i).body for i in range(10)]
    await store.close()
    ids = [format_key_id(header_of(p).key_id) for p in segment_files(part)]
    assert ids == [id_a, id_b]
    assert SECRET not in all_log_bytes(part)

    with pytest.raises(ConfigError) as caught:
        await open_store(part, config=enc(key_b))
    assert id_a in str(caught.value) and segment_files(part)[0].name in str(caught.value)

    # Turning encryption off keeps sealed segments readable while their keys are listed.
    store = await open_store(part, config=enc("", key_a, key_b, read_cache_bytes_max=0))
    await store.append_messages([NewMessage(b"clear now")])
    assert (await store.read([10]))[0].body == b"clear now"
    assert (await store.read([2]))[0].body == secret_msg(2).body
    await store.close()
    assert [header_of(p).key_id for p in segment_files(part)][-1] == 0


async def test_empty_active_segment_is_reheaded_in_place(tmp_path: Path, part: Path) -> None:
    key_a, id_a = make_key(tmp_path, "a.key")
    store = await open_store(part)
    await store.close()
    (seg,) = segment_files(part)
    assert header_of(seg).key_id == 0
    store = await open_store(part, config=enc(key_a))
    await store.append_messages([secret_msg(1)])
    await store.close()
    (seg,) = segment_files(part)
    assert format_key_id(header_of(seg).key_id) == id_a


async def test_plaintext_v1_segment_stays_readable_after_turning_encryption_on(
    tmp_path: Path, part: Path
) -> None:
    store = await open_store(part, config=StorageConfig(read_cache_bytes_max=0))
    await store.append_messages([msg(i, 40, attributes={"x": str(i)}) for i in range(3)])
    await store.close()
    # Rewrite the segment as the version-1 format had it (24-byte header, same records).
    (seg,) = segment_files(part)
    data = seg.read_bytes()
    h = rec.parse_header(data)
    seg.write_bytes(rec.HEADER_V1.pack(rec.MAGIC, 1, 0, h.base, h.created_ms) + data[h.size :])
    drop_index(part)  # replay the v1 segment from scratch

    key_a, _ = make_key(tmp_path, "a.key")
    store = await open_store(part, config=enc(key_a, read_cache_bytes_max=0))
    await store.append_messages([secret_msg(3)])
    got = await store.read([0, 1, 2, 3])
    assert [g.body for g in got[:3]] == [msg(i, 40).body for i in range(3)]
    assert got[1].attributes == {"x": "1"} and got[3].body == secret_msg(3).body
    await store.close()
    versions = [(header_of(p).version, header_of(p).key_id) for p in segment_files(part)]
    assert versions == [(1, 0), (rec.FORMAT_VERSION, key_id_of(_key_bytes(key_a)))]
    assert verify(part, keys=load_keys([key_a])).ok


def _tamper(seg: Path, offset: int, *, fix_crc: bool) -> None:
    """Flip a byte near the end (the sealed body) of the record at `offset`."""
    data = bytearray(seg.read_bytes())
    h = rec.parse_header(data)
    _scan, found = scan_segment(seg, bytes(data), 1 << 20, h.base)
    pos, size, _t, _o = next(f for f in found if f[3] == offset)
    data[pos + size - 20] ^= 0x01
    if fix_crc:
        struct.pack_into(">I", data, pos + 4, crc32(data[pos + 8 : pos + size]))
    seg.write_bytes(bytes(data))


async def test_tag_failure_in_replay_refuses_to_open_and_never_truncates(
    tmp_path: Path, part: Path
) -> None:
    key_a, _ = make_key(tmp_path, "a.key")
    store = await open_store(part, config=enc(key_a))
    await store.append_messages([secret_msg(i) for i in range(4)])
    await store.close()
    drop_index(part)  # every record is replayed at open
    (seg,) = segment_files(part)
    _tamper(seg, 3, fix_crc=True)  # the last record: where a torn tail would be
    before = seg.read_bytes()
    with pytest.raises(StorageError, match="authentication tag mismatch at offset 3"):
        await open_store(part, config=enc(key_a))
    assert seg.read_bytes() == before


async def test_tag_failure_outside_replay_fails_the_read_not_garbage(
    tmp_path: Path, part: Path
) -> None:
    key_a, _ = make_key(tmp_path, "a.key")
    config = enc(key_a, read_cache_bytes_max=0)
    store = await open_store(part, config=config)
    await store.append_messages([secret_msg(i) for i in range(4)])
    await store.close()
    (seg,) = segment_files(part)
    _tamper(seg, 1, fix_crc=True)
    log = LogRecorder()
    store = await open_store(part, config=config, log=log, clock=ManualClock())
    with pytest.raises(InternalError, match="authentication tag"):
        await store.read([1])
    assert [g.offset for g in await store.read([0, 2, 3])] == [0, 2, 3]
    await store.close()


# ---------------------------------------------------------------------- tools


async def test_verify_checks_tags_with_keys_and_finds_tampering(tmp_path: Path, part: Path) -> None:
    key_a, id_a = make_key(tmp_path, "a.key")
    key_b, _ = make_key(tmp_path, "b.key")
    store = await open_store(part, config=enc(key_a))
    await store.append_messages([secret_msg(i) for i in range(6)])
    await store.delete([0])
    await store.close()
    keys = load_keys([key_a])
    report = verify(part, keys=keys)
    assert report.ok, report.text()
    assert report.partitions[0].sealed_records == 6
    # Without keys: CRCs only, and it says so.
    plain = verify(part)
    assert plain.ok and "not authenticated" in plain.text()
    # With only another key: the missing key is named.
    other = verify(part, keys=load_keys([key_b]))
    assert not other.ok and id_a in other.text()

    (seg,) = segment_files(part)
    pristine = seg.read_bytes()
    _tamper(seg, 2, fix_crc=False)
    report = verify(part, keys=keys)
    assert not report.ok and "crc mismatch" in report.text()
    seg.write_bytes(pristine)
    _tamper(seg, 4, fix_crc=True)
    report = verify(part, keys=keys)
    assert not report.ok and "authentication tag mismatch at offset 4" in report.text()
    assert verify(part).ok  # the CRC alone cannot see it


async def test_dump_shows_sealed_bodies_only_with_keys(tmp_path: Path, part: Path) -> None:
    key_a, id_a = make_key(tmp_path, "a.key")
    store = await open_store(part, config=enc(key_a))
    await store.append_messages([secret_msg(1)])
    await store.close()
    out = io.StringIO()
    assert dump(part, out) == 1
    assert SECRET.decode() not in out.getvalue() and f"key={id_a}" in out.getvalue()
    out = io.StringIO()
    dump(part, out, keys=load_keys([key_a]))
    assert SECRET.decode() in out.getvalue() and ATTR_SECRET in out.getvalue()


def test_keys_file_listed_twice_or_as_current_and_old_is_fine(tmp_path: Path) -> None:
    key_a, _ = make_key(tmp_path, "a.key")
    ring = enc(key_a, key_a).keyring()
    assert len(ring.ids()) == 1 and ring.current_id == ring.ids()[0]
    assert os.stat(key_a).st_mode & 0o077 == 0
