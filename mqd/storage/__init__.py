"""The storage engine: one durable log per queue partition (DESIGN.md §4)."""

from mqd.storage.config import StorageConfig
from mqd.storage.fs import FileSystem
from mqd.storage.store import PartitionStore
from mqd.storage.types import Lease, MessageMeta, NewMessage, StoredMessage

__all__ = [
    "FileSystem",
    "Lease",
    "MessageMeta",
    "NewMessage",
    "PartitionStore",
    "StorageConfig",
    "StoredMessage",
]
