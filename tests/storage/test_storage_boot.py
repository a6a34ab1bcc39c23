"""A backend's note of the boot it runs under (mqd.storage.boot), on real files: its
follower copies are at risk exactly after an unclean stop across a machine restart."""

from __future__ import annotations

import json
from pathlib import Path

from mqd.storage import boot


def recorded(data_dir: Path) -> dict:
    return json.loads((data_dir / boot.BOOT_FILE).read_text())


def test_the_kernel_has_a_boot_id_here() -> None:
    # The rule below rests on it on Linux; elsewhere every unclean stop counts.
    assert boot.current_boot_id()


def test_a_new_data_directory_has_nothing_at_risk(tmp_path: Path) -> None:
    assert boot.start_running(tmp_path) is False
    assert recorded(tmp_path) == {"boot_id": boot.current_boot_id(), "clean": False}


def test_a_crash_of_the_process_alone_leaves_the_page_cache_and_nothing_at_risk(
    tmp_path: Path,
) -> None:
    boot.start_running(tmp_path)  # then killed: "clean" stays false
    assert boot.start_running(tmp_path) is False


def test_an_unclean_stop_across_a_machine_restart_puts_the_copies_at_risk(
    tmp_path: Path,
) -> None:
    # What a machine restart leaves: the last run's note, under another boot id.
    (tmp_path / boot.BOOT_FILE).write_text(
        json.dumps({"boot_id": "an-earlier-boot", "clean": False})
    )
    assert boot.start_running(tmp_path) is True
    # Told once: the note is now this boot's.
    assert recorded(tmp_path)["boot_id"] == boot.current_boot_id()
    assert boot.start_running(tmp_path) is False


def test_a_clean_stop_before_the_restart_leaves_nothing_at_risk(tmp_path: Path) -> None:
    boot.start_running(tmp_path)
    boot.stopped_cleanly(tmp_path)
    assert recorded(tmp_path)["clean"] is True
    state = recorded(tmp_path) | {"boot_id": "an-earlier-boot"}
    (tmp_path / boot.BOOT_FILE).write_text(json.dumps(state))
    assert boot.start_running(tmp_path) is False


def test_an_unreadable_note_counts_as_at_risk(tmp_path: Path) -> None:
    (tmp_path / boot.BOOT_FILE).write_text("{not json")
    assert boot.start_running(tmp_path) is True
    (tmp_path / boot.BOOT_FILE).write_text("[]")
    assert boot.start_running(tmp_path) is True
