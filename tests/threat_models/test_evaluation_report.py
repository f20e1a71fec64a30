"""The evaluation's outputs and its place in the CLI (the full --quick matrix is exercised by CI's evaluate run)."""

from __future__ import annotations

import json
import sys

from threat_models import MatrixRow
from threat_models.report import write_evaluation


def test_write_evaluation_produces_the_json_rows_report_and_plots(tmp_path):
    rows = [
        MatrixRow(attack="token_recovery", defense="none", metric="precision", value=1.0, chance=0.05),
        MatrixRow(attack="token_recovery", defense="secagg+", metric="precision", value=0.0, chance=0.05),
        MatrixRow(
            attack="membership_loss", defense="dp-eps1", metric="auc", value=0.51, chance=0.5, ci_low=0.48, ci_high=0.54
        ),
    ]
    report = write_evaluation(
        tmp_path,
        rows,
        setting={"model": "tiny"},
        roc_curves={"none": ([0.0, 0.5, 1.0], [0.0, 0.6, 1.0])},
        utility={"base model": 10.0, "dp-eps1": 9.5},
        notes=["a note"],
    )
    data = json.loads((tmp_path / "results.json").read_text())
    assert [set(r) for r in data["rows"]] == [
        {"attack", "defense", "metric", "value", "chance", "ci_low", "ci_high"}
    ] * 3
    text = report.read_text()
    assert "| token_recovery | secagg+ | precision | 0 | 0.05 | - |" in text and "[0.48, 0.54]" in text
    for name in ("matrix.png", "roc.png", "utility.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_the_console_script_adds_evaluate_without_secure_fedllm_importing_threat_models(capsys):
    for name in [m for m in sys.modules if m.startswith("threat_models")]:
        del sys.modules[name]
    import secure_fedllm.cli  # noqa: F401

    assert not any(m.startswith("threat_models") for m in sys.modules)
    from secure_fedllm_cli import main

    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "evaluate" in out and "run" in out and "budget" in out
