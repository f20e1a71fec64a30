"""Writing an evaluation: results.json, report.md and the plots (heatmap, ROC, utility)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import numpy.typing as npt

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from .results import MatrixRow

__all__ = [
    "NO_DEFENSE",
    "REPORTED_FPRS",
    "RocCurves",
    "ScaledMatrix",
    "heatmap_figure",
    "roc_figure",
    "scale_rows",
    "write_evaluation",
]

RocCurves = dict[str, tuple[Sequence[float], Sequence[float]]]
"""Per defense label: (FPR, TPR) of an empirical ROC or of a bound."""

NO_DEFENSE = "none"
"""The defense whose cell is a row's full-leakage reference (colour 1)."""

REPORTED_FPRS: tuple[float, ...] = (1e-2, 1e-3)
"""False-positive rates at which report.md quotes each ROC bound."""

GREY = (0.86, 0.86, 0.86, 1.0)
"""Cells of informational rows (no chance value: nothing to scale against)."""


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if math.isinf(value):
        return "inf"
    return f"{value:.3g}"


def _cell(value: float) -> str:
    """A value short enough for a heatmap cell: three significant digits, tiny magnitudes as one."""
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if value != 0 and abs(value) < 1e-3:
        return f"{value:.0e}"
    return f"{value:.3g}"


@dataclass(frozen=True)
class ScaledMatrix:
    """The heatmap's numbers: raw values and each row's values scaled between chance and no defense.

    `scaled[i, j]` is 0 at the cell's chance value and 1 at row i's reference value (the
    no-defense cell, else the cell farthest from chance), clipped to [0, 1]; NaN where the cell is
    missing or the row has no chance value (informational rows: an epsilon, a query count, drawn
    grey with their values).
    """

    keys: list[tuple[str, str]]
    defenses: list[str]
    values: npt.NDArray[np.float64]
    scaled: npt.NDArray[np.float64]
    informational: npt.NDArray[np.bool_]


def scale_rows(rows: Sequence[MatrixRow]) -> ScaledMatrix:
    """Scale each (attack, metric) row between its chance value (0) and its no-defense value (1).

    Raw values on one colour scale let the largest unit win (an accountant's epsilon of 8 outshone
    every AUC). Per row, `scaled = (value - chance) / (reference - chance)`, clipped to [0, 1],
    reads "how much of the undefended leakage is left" whatever the metric's unit or direction
    (a loss that falls, an AUC that rises). The reference is the row's `none` cell; a row without
    one (protocol attacks compare a control with ours) takes the value farthest from chance. Each
    cell's own chance is used where it has one (token recall's chance differs per defense), else
    the row's.

    Noise is not leakage: a cell whose 95% interval contains its chance value is 0, and cannot be
    the reference. Where the no-defense cell is at chance (exactly, or within its interval) the
    whole row is 0: the undefended attack leaked nothing to scale against, and without this a
    no-defense AUC of 0.4999 would colour every noisy neighbour (or one significantly *below*
    chance) as full leakage. Rows and defenses keep their first appearance order, so an
    evaluation's grouping survives.
    """
    cells: dict[tuple[str, str], dict[str, MatrixRow]] = {}
    defenses: dict[str, None] = {}
    for row in rows:
        cells.setdefault((row.attack, row.metric), {})[row.defense] = row
        defenses.setdefault(row.defense, None)
    keys, names = list(cells), list(defenses)
    values = np.full((len(keys), len(names)), np.nan)
    scaled = np.full_like(values, np.nan)
    informational = np.zeros(len(keys), dtype=bool)
    for i, key in enumerate(keys):
        line = cells[key]
        chances = [r.chance for r in line.values() if r.chance is not None]
        none = line.get(NO_DEFENSE)
        row_chance = none.chance if none is not None and none.chance is not None else (chances or [math.nan])[0]
        deviation = np.full(len(names), np.nan)
        significant = np.zeros(len(names), dtype=bool)
        for j, name in enumerate(names):
            if name in line:
                cell = line[name]
                values[i, j] = cell.value
                chance = row_chance if cell.chance is None else cell.chance
                deviation[j] = cell.value - chance
                inside = cell.ci_low is not None and cell.ci_high is not None and cell.ci_low <= chance <= cell.ci_high
                significant[j] = not inside and deviation[j] != 0
        if not chances:
            informational[i] = True
            continue
        reference_at = names.index(NO_DEFENSE) if none is not None else None
        scaled[i] = _scale(deviation, significant, reference_at)
    return ScaledMatrix(keys, names, values, scaled, informational)


def _scale(
    deviation: npt.NDArray[np.float64], significant: npt.NDArray[np.bool_], reference_at: int | None
) -> npt.NDArray[np.float64]:
    """One row's deviations from chance scaled by the reference's (NaN where missing)."""
    if reference_at is None and significant.any():
        reference_at = int(np.argmax(np.where(significant, np.abs(deviation), -1.0)))
    if reference_at is None or not significant[reference_at]:  # nothing beat chance, or no defense did not
        return np.where(np.isnan(deviation), np.nan, 0.0)
    reference = float(deviation[reference_at])
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = deviation / reference
    if math.isinf(reference):  # infinite leakage as the reference: only another infinity reaches it
        ratio = np.where(np.isinf(deviation) & (np.sign(deviation) == np.sign(reference)), 1.0, 0.0)
    ratio = np.where(significant, np.clip(ratio, 0.0, 1.0), 0.0)
    return np.where(np.isnan(deviation), np.nan, ratio)


def _heatmap(out: Path, rows: Sequence[MatrixRow]) -> str | None:
    if not rows:
        return None
    fig = heatmap_figure(rows)
    fig.savefig(out / "matrix.png", dpi=110)
    plt.close(fig)
    return "matrix.png"


def heatmap_figure(rows: Sequence[MatrixRow]) -> Figure:
    """Colour per row (0 = chance, 1 = no defense); informational rows grey; the value in every cell.

    Sized from the counts (0.62 in per defense, 0.27 in per row, plus the labels), so ~30 rows by
    ~12 defenses keep 6.5 pt values legible.
    """
    matrix = scale_rows(rows)
    n_rows, n_cols = matrix.values.shape
    cmap = plt.get_cmap("YlOrRd")
    image = np.ones((n_rows, n_cols, 4))  # missing cells white
    for i in range(n_rows):
        for j in range(n_cols):
            if math.isnan(matrix.values[i, j]):
                continue
            image[i, j] = GREY if matrix.informational[i] else cmap(float(matrix.scaled[i, j]))
    label_width = max((len(f"{a} / {m}") for a, m in matrix.keys), default=10) * 0.065
    fig, ax = plt.subplots(figsize=(1.2 + label_width + 0.62 * n_cols, 1.8 + 0.27 * n_rows))
    ax.imshow(image, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(n_cols), matrix.defenses, rotation=40, ha="right", fontsize=7)
    ax.set_yticks(range(n_rows), [f"{a} / {m}" for a, m in matrix.keys], fontsize=7)
    for tick, info in zip(ax.get_yticklabels(), matrix.informational, strict=True):
        if info:
            tick.set_color("dimgrey")
            tick.set_fontstyle("italic")
    ax.set_xticks(np.arange(-0.5, n_cols), minor=True)
    ax.set_yticks(np.arange(-0.5, n_rows), minor=True)
    ax.grid(which="minor", color="white", linewidth=0.8)
    ax.tick_params(which="minor", length=0)
    for i in range(n_rows):
        for j in range(n_cols):
            value = matrix.values[i, j]
            if math.isnan(value):
                continue
            dark = not matrix.informational[i] and matrix.scaled[i, j] > 0.6
            ax.text(j, i, _cell(value), ha="center", va="center", fontsize=6.5, color="white" if dark else "black")
    bar = fig.colorbar(plt.cm.ScalarMappable(norm=Normalize(0, 1), cmap=cmap), ax=ax, fraction=0.025, pad=0.01)
    bar.set_label("per row: 0 = chance, 1 = no-defense value", fontsize=7)
    bar.ax.tick_params(labelsize=7)
    ax.set_title(
        "attack x defense: colour scaled per row between chance and no defense (grey, italic: no chance value)",
        fontsize=9,
    )
    fig.tight_layout()
    return fig


def _roc(out: Path, curves: RocCurves, bounds: RocCurves) -> str | None:
    if not curves and not bounds:
        return None
    fig = roc_figure(curves, bounds)
    fig.savefig(out / "roc.png", dpi=110)
    plt.close(fig)
    return "roc.png"


def roc_figure(curves: RocCurves, bounds: RocCurves) -> Figure:
    """Empirical ROCs and each DP defense's PLD bound (dashed, same colour), log-log and linear."""
    palette = plt.get_cmap("tab10")
    colour = {label: palette(i % 10) for i, label in enumerate(dict.fromkeys([*curves, *bounds]))}
    positive = [x for fpr, _ in (*curves.values(), *bounds.values()) for x in fpr if x > 0]
    low = max(1e-5, min(positive, default=1e-4))
    fig, (log_ax, lin_ax) = plt.subplots(1, 2, figsize=(9.6, 4.4))
    for ax in (log_ax, lin_ax):
        for label, (fpr, tpr) in curves.items():
            ax.plot(fpr, tpr, color=colour[label], label=label)
        for label, (fpr, tpr) in bounds.items():
            ax.plot(fpr, tpr, color=colour[label], linestyle="--", label=f"{label} bound (PLD)")
        ax.plot([low, 1], [low, 1], color="grey", linestyle=":", label="chance")
        ax.set(xlabel="FPR", ylabel="TPR")
    log_ax.set(xscale="log", yscale="log", xlim=(low, 1.05), ylim=(low, 1.05), title="Membership inference (log-log)")
    lin_ax.set(xlim=(0, 1), ylim=(0, 1.01), title="linear")
    lin_ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(
        "loss-score ROC; dashed: the best attacker's TPR allowed by the accountant's privacy profile", fontsize=9
    )
    fig.tight_layout()
    return fig


def _bound_at(fpr: Sequence[float], tpr: Sequence[float], at: float) -> float:
    """The bound at `at`: its value at the nearest grid FPR at or above `at` (a bound only grows)."""
    order = np.argsort(np.asarray(fpr, dtype=np.float64), kind="stable")
    x, y = np.asarray(fpr, dtype=np.float64)[order], np.asarray(tpr, dtype=np.float64)[order]
    index = int(np.searchsorted(x, at - 1e-15, side="left"))
    return 1.0 if index >= len(x) else float(y[index])


def _empirical_at(fpr: Sequence[float], tpr: Sequence[float], at: float) -> float:
    """The empirical ROC's best TPR at a false-positive rate of at most `at`."""
    x, y = np.asarray(fpr, dtype=np.float64), np.asarray(tpr, dtype=np.float64)
    inside = y[x <= at + 1e-15]
    return float(inside.max()) if inside.size else 0.0


def _bound_lines(curves: RocCurves, bounds: RocCurves) -> list[str]:
    lines = []
    for label, (fpr, tpr) in bounds.items():
        at = ", ".join(f"{_fmt(_bound_at(fpr, tpr, x))} at FPR {x:.1%}" for x in REPORTED_FPRS)
        text = f"- {label} bound (PLD): the best membership attacker's TPR is at most {at}"
        if label in curves:
            seen = ", ".join(f"{_fmt(_empirical_at(*curves[label], x))}" for x in REPORTED_FPRS)
            text += f" (the loss attack reached {seen})"
        lines.append(text + ".")
    return lines


def _utility(out: Path, utility: dict[str, float]) -> str | None:
    if not utility:
        return None
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    labels = list(utility)
    ax.bar(labels, [utility[k] for k in labels])
    ax.set(ylabel="held-out perplexity", title="Utility against epsilon")
    fig.tight_layout()
    fig.savefig(out / "utility.png", dpi=110)
    plt.close(fig)
    return "utility.png"


def write_evaluation(
    out: Path,
    rows: Sequence[MatrixRow],
    *,
    setting: dict[str, Any],
    roc_curves: RocCurves,
    utility: dict[str, float],
    notes: Sequence[str],
    roc_bounds: RocCurves | None = None,
) -> Path:
    """Write results.json, report.md, matrix.png, roc.png and utility.png; return the report path.

    `roc_bounds` maps a DP defense's label (as in `roc_curves`) to (FPR, TPR bound) from
    `threat_models.tradeoff.roc_bound`; each is drawn dashed beside that defense's empirical ROC,
    and report.md and results.json quote it at FPR 1% and 0.1%.
    """
    bounds = dict(roc_bounds or {})
    out.mkdir(parents=True, exist_ok=True)
    data: dict[str, Any] = {"setting": setting, "rows": [r.model_dump() for r in rows], "utility": utility}
    if bounds:
        data["roc_bounds"] = {
            label: {f"tpr_at_fpr_{x:g}": _bound_at(fpr, tpr, x) for x in REPORTED_FPRS}
            for label, (fpr, tpr) in bounds.items()
        }
    (out / "results.json").write_text(json.dumps(data, indent=1))
    plots = [p for p in (_heatmap(out, rows), _roc(out, roc_curves, bounds), _utility(out, utility)) if p]
    lines = [
        "# secure-fedllm attack / defense evaluation",
        "",
        "Setting: " + ", ".join(f"{k}={v}" for k, v in setting.items()) + ".",
        "",
        "| attack | defense | metric | value | chance | 95% interval |",
        "|---|---|---|---:|---:|---|",
    ]
    for r in rows:
        interval = f"[{_fmt(r.ci_low)}, {_fmt(r.ci_high)}]" if r.ci_low is not None else "-"
        lines.append(f"| {r.attack} | {r.defense} | {r.metric} | {_fmt(r.value)} | {_fmt(r.chance)} | {interval} |")
    if utility:
        lines += ["", "Utility (held-out perplexity of the released adapter):", ""]
        lines += [f"- {k}: {v:.3f}" for k, v in utility.items()]
    if bounds:
        lines += ["", "Membership ROC bounds from the accountant's privacy profile (f-DP via the PLD):", ""]
        lines += _bound_lines(roc_curves, bounds)
    lines += ["", *[f"- {n}" for n in notes], ""]
    lines += [f"![{p}]({p})" for p in plots]
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report
