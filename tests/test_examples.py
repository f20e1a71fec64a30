"""The examples run as documented."""

from __future__ import annotations

import runpy
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_host_loop_example_completes_without_the_crashed_client(capsys):
    runpy.run_path(str(EXAMPLES / "host_loop.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "dropped: [4]" in out
    assert "max abs error" in out
