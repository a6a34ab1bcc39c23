"""Did this machine restart since a node last wrote its data, without a clean stop?

A follower acknowledges records once written, before they are synced
(`mqd.storage.replica`): its copy is in the page cache, which a crash or
`kill -9` of the process leaves intact, but a restart of the machine (power
loss, kernel panic, reboot) may not. So a backend notes, in its data
directory, the kernel's boot id while it runs and whether it stopped
cleanly (every log synced on close). Starting again, its follower copies may
lack records they acknowledged exactly when it did not stop cleanly and the
boot id changed since; it then registers with `rebooted_unclean`
(protocol.md §7.2) and metadata takes it out of every in-sync set it does
not lead, until it has caught up again.

Where the kernel has no boot id to read (not Linux), every unclean stop
counts as one across a restart of the machine: the safe side.
"""

from __future__ import annotations

import json
from pathlib import Path

from mqd.storage.fs import replace_file

BOOT_FILE = "boot.json"
BOOT_ID_PATH = Path("/proc/sys/kernel/random/boot_id")


def current_boot_id() -> str | None:
    try:
        return BOOT_ID_PATH.read_text().strip() or None
    except OSError:
        return None


def _write(path: Path, state: dict[str, object]) -> None:
    replace_file(path, json.dumps(state, sort_keys=True).encode())


def start_running(data_dir: Path) -> bool:
    """Record that the node runs under this boot, and answer whether unsynced writes of
    its last run may have been lost: it did not stop cleanly, and the machine has
    restarted since (or whether it has cannot be told). A data directory without the
    file (new, or from before it existed) has nothing at risk."""
    path = data_dir / BOOT_FILE
    try:
        previous = json.loads(path.read_text())
    except FileNotFoundError:
        previous = None
    except (OSError, ValueError):
        previous = {}  # unreadable: nothing proves a clean stop under this boot
    boot_id = current_boot_id()
    if previous is None:
        at_risk = False
    elif not isinstance(previous, dict):
        at_risk = True
    else:
        same_boot = boot_id is not None and previous.get("boot_id") == boot_id
        at_risk = previous.get("clean") is not True and not same_boot
    _write(path, {"boot_id": boot_id, "clean": False})
    return at_risk


def stopped_cleanly(data_dir: Path) -> None:
    """Record a clean stop: every log was synced on close."""
    _write(data_dir / BOOT_FILE, {"boot_id": current_boot_id(), "clean": True})
