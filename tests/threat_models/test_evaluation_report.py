"""The evaluation's outputs and its place in the CLI (the full --quick matrix is exercised by CI's evaluate run)."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
from matplotlib import pyplot as plt
from matplotlib.colors import to_rgba

from threat_models import MatrixRow
from threat_models.report import heatmap_figure, roc_figure, scale_rows, write_evaluation


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


def _row(attack, metric, defense, value, chance=None, ci=None):
    low, high = ci if ci else (None, None)
    return MatrixRow(
        attack=attack, defense=defense, metric=metric, value=value, chance=chance, ci_low=low, ci_high=high
    )


def _scaled(matrix, attack, metric, defense):
    return matrix.scaled[matrix.keys.index((attack, metric)), matrix.defenses.index(defense)]


def test_heatmap_colour_is_zero_at_chance_one_at_no_defense_and_an_epsilon_of_8_does_not_dominate():
    rows = [
        _row("membership_loss", "auc", "none", 0.8, 0.5),
        _row("membership_loss", "auc", "dp-eps8", 0.65, 0.5),
        _row("membership_loss", "auc", "dp-eps1", 0.5, 0.5),
        _row("dp_audit", "empirical_epsilon", "none", 8.0, 0.0),
        _row("dp_audit", "empirical_epsilon", "dp-eps8", 2.0, 0.0),
        _row("dp_audit", "accountant_epsilon", "dp-eps8", 8.0),  # no chance: informational
        _row("dp_audit", "accountant_epsilon", "dp-eps1", 1.0),
    ]
    matrix = scale_rows(rows)
    assert _scaled(matrix, "membership_loss", "auc", "none") == 1.0
    assert _scaled(matrix, "membership_loss", "auc", "dp-eps8") == 0.5
    assert _scaled(matrix, "membership_loss", "auc", "dp-eps1") == 0.0
    # an AUC of 0.8 is as bright as an empirical epsilon of 8 (raw scaling put it at 0.8 / 8 = 0.1)
    assert _scaled(matrix, "dp_audit", "empirical_epsilon", "none") == 1.0
    assert _scaled(matrix, "dp_audit", "empirical_epsilon", "dp-eps8") == 0.25
    assert np.nanmax(matrix.scaled) == 1.0 and np.nanmin(matrix.scaled) == 0.0
    info = matrix.keys.index(("dp_audit", "accountant_epsilon"))
    assert matrix.informational[info] and np.all(np.isnan(matrix.scaled[info]))
    assert matrix.values[info, matrix.defenses.index("dp-eps8")] == 8.0  # still printed in its (grey) cell


def test_heatmap_scaling_follows_the_metric_direction_and_falls_back_without_a_no_defense_cell():
    rows = [
        _row("backdoor", "clean_loss", "none", 4.25, 5.25),  # a loss that falls is the leak
        _row("backdoor", "clean_loss", "dp-eps8", 4.75, 5.25),
        _row("backdoor", "clean_loss", "dp-eps1", 5.5, 5.25),  # the other side of chance: none left
        _row("model_inconsistency", "cosine_with_target", "secagg+ without binding", 0.9, 0.0),
        _row("model_inconsistency", "cosine_with_target", "secagg+", 0.0, 0.0),
        _row("token_recovery", "recall", "none", 1.0, 0.05),
        _row("token_recovery", "recall", "secagg+", 0.0, 0.0),  # its own chance
    ]
    matrix = scale_rows(rows)
    assert _scaled(matrix, "backdoor", "clean_loss", "dp-eps8") == 0.5
    assert _scaled(matrix, "backdoor", "clean_loss", "dp-eps1") == 0.0
    assert _scaled(matrix, "model_inconsistency", "cosine_with_target", "secagg+ without binding") == 1.0
    assert _scaled(matrix, "model_inconsistency", "cosine_with_target", "secagg+") == 0.0
    assert _scaled(matrix, "token_recovery", "recall", "secagg+") == 0.0
    assert math.isnan(_scaled(matrix, "token_recovery", "recall", "dp-eps1"))  # no such cell


def test_heatmap_noise_is_not_leakage():
    """A no-defense AUC within its interval of chance makes the row 0; an interval that excludes chance does not."""
    noisy = [
        _row("membership_zlib", "auc", "none", 0.5001, 0.5, (0.477, 0.523)),
        _row("membership_zlib", "auc", "dp-eps8", 0.49, 0.5, (0.47, 0.51)),
        _row("membership_zlib", "auc", "dp-eps1", 0.47, 0.5, (0.455, 0.485)),  # significantly *below* chance
    ]
    assert np.all(scale_rows(noisy).scaled == 0.0)
    leaking = [noisy[0].model_copy(update={"value": 0.6, "ci_low": 0.58, "ci_high": 0.62}), noisy[1]]
    matrix = scale_rows(leaking)
    assert _scaled(matrix, "membership_zlib", "auc", "none") == 1.0
    assert _scaled(matrix, "membership_zlib", "auc", "dp-eps8") == 0.0  # its interval holds chance


def test_heatmap_is_sized_by_its_counts_and_prints_every_value_for_30_rows_by_12_defenses():
    rows = [
        _row(f"attack_{i}", "metric", f"defense {j}", float(i * j), 0.0 if i % 5 else None)
        for i in range(30)
        for j in range(12)
    ]
    fig = heatmap_figure(rows)
    width, height = fig.get_size_inches()
    assert height >= 30 * 0.27 and width >= 12 * 0.62
    (ax,) = (a for a in fig.axes if a.get_ylabel() == "" and len(a.get_yticklabels()) == 30)
    assert len(ax.texts) == 30 * 12 and {t.get_text() for t in ax.texts} >= {"0", "29", "319"}
    assert ax.get_yticklabels()[1].get_text() == "attack_1 / metric"
    plt.close(fig)


def test_roc_bounds_are_drawn_dashed_in_their_defenses_colour_and_quoted_in_the_report(tmp_path):
    fpr = [0.0, 1e-3, 1e-2, 0.5, 1.0]
    curves = {
        "none": ([0.0, 0.01, 1.0], [0.0, 0.3, 1.0]),
        "dp-eps8": ([0.0, 0.001, 0.01, 1.0], [0.0, 0.002, 0.02, 1.0]),
    }
    bounds = {"dp-eps8": (fpr, [1e-5, 0.004, 0.03, 0.6, 1.0])}
    fig = roc_figure(curves, bounds)
    for ax in fig.axes:
        lines = {line.get_label(): line for line in ax.get_lines()}
        bound, empirical = lines["dp-eps8 bound (PLD)"], lines["dp-eps8"]
        assert bound.get_linestyle() == "--" and empirical.get_linestyle() == "-"
        assert to_rgba(bound.get_color()) == to_rgba(empirical.get_color()) != to_rgba(lines["none"].get_color())
    assert [ax.get_xscale() for ax in fig.axes] == ["log", "linear"]
    plt.close(fig)
    report = write_evaluation(
        tmp_path, [], setting={}, roc_curves=curves, utility={}, notes=[], roc_bounds=bounds
    ).read_text()
    assert (
        "- dp-eps8 bound (PLD): the best membership attacker's TPR is at most 0.03 at FPR 1.0%, 0.004 at FPR 0.1%"
        in report
    )
    assert "(the loss attack reached 0.02, 0.002)" in report
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["roc_bounds"] == {"dp-eps8": {"tpr_at_fpr_0.01": 0.03, "tpr_at_fpr_0.001": 0.004}}


def test_a_bound_between_grid_points_is_quoted_at_the_next_point_up(tmp_path):
    """Between grid points the bound is quoted where it is larger (sound), not interpolated below."""
    bounds = {"dp-eps1": ([0.0, 0.0005, 0.002, 0.05, 1.0], [0.0, 0.001, 0.004, 0.08, 1.0])}
    report = write_evaluation(tmp_path, [], setting={}, roc_curves={}, utility={}, notes=[], roc_bounds=bounds)
    assert "at most 0.08 at FPR 1.0%, 0.004 at FPR 0.1%." in report.read_text()


def test_the_console_script_adds_evaluate_without_secure_fedllm_importing_threat_models(capsys, monkeypatch):
    # monkeypatch puts the modules back afterwards: a later test's `except ThreatModelError` must still
    # match the class that secure_fedllm_cli.USER_ERRORS holds
    for name in [m for m in sys.modules if m.startswith("threat_models")]:
        monkeypatch.delitem(sys.modules, name)
    import secure_fedllm.cli  # noqa: F401

    assert not any(m.startswith("threat_models") for m in sys.modules)
    from secure_fedllm_cli import main

    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "evaluate" in out and "run" in out and "budget" in out
