"""The README's embedding example runs as written (and uses only public names)."""

from __future__ import annotations

import re
from pathlib import Path

import protocols

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README lost its example"
    for name in re.findall(r"from protocols import ([\w, ]+)", blocks[0])[0].split(", "):
        assert name in protocols.__all__
    exec(compile(blocks[0], "README.md", "exec"), {})
    assert "(3,)" in capsys.readouterr().out


def test_readme_has_exactly_two_setup_commands():
    text = README.read_text()
    quickstart = text.split("## Quickstart", 1)[1].split("##", 1)[0]
    commands = re.findall(r"^bash scripts/\w+\.sh", quickstart, flags=re.M)
    assert commands == ["bash scripts/run.sh", "bash scripts/test.sh"]
