"""The README's client example runs as written against a real server."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_client_example_runs(server):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "README has a Python example"
    for block in blocks:
        code = block.replace("127.0.0.1:6470", server.address)
        result = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, result.stderr


def test_readme_set_up_commands_are_the_ci_ones():
    text = README.read_text()
    ci = (README.parent / ".ci" / "run").read_text()
    test_command = next(
        line for line in text.splitlines() if "pytest" in line and "pip install" in line
    )
    assert test_command.strip() in ci
    assert "mqd serve" in text
