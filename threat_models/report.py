"""Writing an evaluation: results.json, report.md and the plots (heatmap, ROC, utility)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from .results import MatrixRow

__all__ = ["write_evaluation"]


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if math.isinf(value):
        return "inf"
    return f"{value:.3g}"


def _heatmap(out: Path, rows: Sequence[MatrixRow]) -> str:
    headline = {}
    for row in rows:
        headline.setdefault((row.attack, row.metric), {})[row.defense] = row.value
    keys = sorted(headline)
    defenses = sorted({r.defense for r in rows})
    grid = [[headline[k].get(d, math.nan) for d in defenses] for k in keys]
    fig, ax = plt.subplots(figsize=(1.6 + 1.2 * len(defenses), 0.9 + 0.4 * len(keys)))
    finite = [[0.0 if math.isnan(v) or math.isinf(v) else v for v in line] for line in grid]
    ax.imshow(finite, aspect="auto", cmap="magma")
    ax.set_xticks(range(len(defenses)), defenses, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(keys)), [f"{a}: {m}" for a, m in keys], fontsize=8)
    for i, line in enumerate(grid):
        for j, value in enumerate(line):
            if not math.isnan(value):
                ax.text(j, i, _fmt(value), ha="center", va="center", fontsize=7, color="cyan")
    ax.set_title("attack x defense (raw metric values)")
    fig.tight_layout()
    fig.savefig(out / "matrix.png", dpi=110)
    plt.close(fig)
    return "matrix.png"


def _roc(out: Path, curves: dict[str, tuple[Sequence[float], Sequence[float]]]) -> str | None:
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(4.5, 4.2))
    for label, (fpr, tpr) in curves.items():
        ax.plot(fpr, tpr, label=label)
    ax.plot([1e-4, 1], [1e-4, 1], color="grey", linestyle="--", label="chance")
    ax.set(xscale="log", yscale="log", xlabel="FPR", ylabel="TPR", title="Membership inference (loss score)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "roc.png", dpi=110)
    plt.close(fig)
    return "roc.png"


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
    roc_curves: dict[str, tuple[Sequence[float], Sequence[float]]],
    utility: dict[str, float],
    notes: Sequence[str],
) -> Path:
    """Write results.json, report.md, matrix.png, roc.png and utility.png; return the report path."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(
        json.dumps({"setting": setting, "rows": [r.model_dump() for r in rows], "utility": utility}, indent=1)
    )
    plots = [p for p in (_heatmap(out, rows), _roc(out, roc_curves), _utility(out, utility)) if p]
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
    lines += ["", *[f"- {n}" for n in notes], ""]
    lines += [f"![{p}]({p})" for p in plots]
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report
