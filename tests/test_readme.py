"""The README's embedding example runs as written (and uses only public names)."""

from __future__ import annotations

import re
from pathlib import Path

import protocols

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs(capsys):
    blocks = [b for b in re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S) if "from protocols" in b]
    assert blocks, "README lost its embedding example"
    for name in re.findall(r"from protocols import ([\w, ]+)", blocks[0])[0].split(", "):
        assert name in protocols.__all__
    exec(compile(blocks[0], "README.md", "exec"), {})
    assert "(3,)" in capsys.readouterr().out


def test_readme_has_exactly_two_setup_commands():
    text = README.read_text()
    quickstart = text.split("## Quickstart", 1)[1].split("##", 1)[0]
    commands = re.findall(r"^bash scripts/\w+\.sh", quickstart, flags=re.M)
    assert commands == ["bash scripts/run.sh", "bash scripts/test.sh"]


def test_readme_api_example_uses_public_names():
    import secure_fedllm

    blocks = [b for b in re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S) if "secure_fedllm" in b]
    assert blocks
    for name in re.findall(r"from secure_fedllm import ([\w, ]+)", blocks[0])[0].split(", "):
        assert name in secure_fedllm.__all__
    compile(blocks[0], "README.md", "exec")


def test_readme_he_example_runs(capsys):
    blocks = [b for b in re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S) if "protocols.he" in b]
    assert blocks, "README lost its HE example"
    exec(compile(blocks[0], "README.md", "exec"), {})
    assert "(0, 1, 2, 3, 4)" in capsys.readouterr().out


def test_readme_flower_example_runs(capsys):
    import pytest

    pytest.importorskip("flwr")
    found = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    blocks = [b for b in found if "secure_fedllm.flower" in b]
    assert blocks, "README lost its Flower example"
    exec(compile(blocks[0], "README.md", "exec"), {})
    assert "[1, 2, 3, 4, 5] [0.02 0.02 0.02 0.02]" in capsys.readouterr().out
