"""Storage engine settings (one `StorageConfig` per node, shared by its partitions)."""

from __future__ import annotations

from dataclasses import dataclass, field

from mqd.errors import ConfigError
from mqd.storage.crypto import Keyring, load_keyring

FSYNC_POLICIES = ("always", "interval", "never")
# What a message record holds beyond its body (header, ids, attributes' framing): a body
# may take up to record_bytes_max less this.
RECORD_HEADROOM_BYTES = 4096


@dataclass(slots=True)
class StorageConfig:
    """Durability, segment and cache limits of a partition store (DESIGN.md §4).

    `fsync`: "always" acknowledges a commit group only after one fdatasync;
    "interval" acknowledges after the write and fsyncs at most every
    `fsync_interval_ms`; "never" leaves flushing to the kernel.
    """

    fsync: str = "always"
    fsync_interval_ms: int = 1000
    segment_bytes_max: int = 64 * 1024 * 1024
    segment_age_max_s: int = 7 * 24 * 3600
    # Write-through cache of recent bodies, so a receive right after a send does not read disk.
    read_cache_bytes_max: int = 64 * 1024 * 1024
    # A record larger than this is refused on write and treated as corruption on read.
    record_bytes_max: int = 64 * 1024 * 1024
    # Dedup ids older than this are forgotten (memory and index); must exceed the longest
    # dedup window the queue layer asks `find_dedup` about (SQS uses 5 minutes).
    dedup_retention_ms: int = 15 * 60 * 1000
    # When this many rows wait for the SQLite index, the log writer waits for it to catch up.
    index_backlog_rows_max: int = 200_000
    # Re-check each record's CRC in the encoded buffer right before it is written (STYLE.md).
    verify_before_write: bool = True
    # Encryption at rest (DESIGN.md §4, `crypto.py`): a key file from `mqd storage keygen`.
    # New segments seal message bodies and attributes with it; "" writes plaintext.
    encryption_key_file: str = ""
    # Key files of earlier keys, to read segments sealed with them until they are reclaimed.
    encryption_old_key_files: list[str] = field(default_factory=list)

    def keyring(self) -> Keyring:
        """Load the key files (read on every call); `ConfigError` naming the key on any problem."""
        return load_keyring(self.encryption_key_file, self.encryption_old_key_files)

    def validate(self) -> None:
        """Raise `ConfigError` naming the first bad key."""
        if self.fsync not in FSYNC_POLICIES:
            raise ConfigError(
                f"storage.fsync must be one of {', '.join(FSYNC_POLICIES)}, not {self.fsync!r}"
            )
        positive = (
            "fsync_interval_ms",
            "segment_bytes_max",
            "segment_age_max_s",
            "record_bytes_max",
            "dedup_retention_ms",
            "index_backlog_rows_max",
        )
        for key in positive:
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"storage.{key} must be a positive integer, not {value!r}")
        value = self.read_cache_bytes_max
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ConfigError(
                f"storage.read_cache_bytes_max must be an integer >= 0, not {value!r}"
            )
        if self.segment_bytes_max < 4096:
            raise ConfigError(
                f"storage.segment_bytes_max must be at least 4096, not {self.segment_bytes_max}"
            )
        if self.record_bytes_max >= 2**32 - 64:
            raise ConfigError("storage.record_bytes_max must be below 4 GiB")
        # Upper bounds where a huge value silently disables what the key is for.
        ceilings = {
            # "interval" acknowledged writes then never fsynced them (10**12 was taken).
            "fsync_interval_ms": 60_000,
            # A segment that never fills is never rolled, so retention never reclaims.
            "segment_bytes_max": 64 * 2**30,
        }
        for key, ceiling in ceilings.items():
            if getattr(self, key) > ceiling:
                raise ConfigError(
                    f"storage.{key} must be at most {ceiling}, not {getattr(self, key)}"
                )
        if not isinstance(self.encryption_key_file, str):
            raise ConfigError("storage.encryption_key_file must be a path (a string)")
        old = self.encryption_old_key_files
        if not isinstance(old, list) or not all(isinstance(x, str) and x for x in old):
            raise ConfigError("storage.encryption_old_key_files must be a list of paths")
        self.keyring()
