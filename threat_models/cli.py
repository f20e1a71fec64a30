"""The `evaluate` command of `secure-fedllm`.

A plain function with typer annotations: it registers itself nowhere. The console script
(`secure_fedllm_cli`) puts it on the app beside `secure_fedllm`'s commands, so neither package
touches the other's app.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

__all__ = ["evaluate"]


def evaluate(
    out: Annotated[Path, typer.Option(help="folder for results.json, report.md and the plots")],
    quick: Annotated[bool, typer.Option(help="tiny random LLaMA models (minutes); default: embedded SmolLM2")] = False,
    seed: Annotated[int, typer.Option(help="seed of data, sampling and canary bits")] = 0,
) -> None:
    """Run the attack x defense matrix and write results.json, report.md and PNG plots."""
    from .evaluation import EvaluationConfig
    from .evaluation import evaluate as run_evaluation

    result = run_evaluation(EvaluationConfig(quick=quick, seed=seed), out=out)
    typer.echo(json.dumps(result.summary(), indent=1))
    typer.echo(f"report: {result.report}")
