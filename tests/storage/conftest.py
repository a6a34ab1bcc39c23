from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def part(tmp_path: Path) -> Path:
    """A partition directory that does not exist yet."""
    return tmp_path / "q1" / "p0"
