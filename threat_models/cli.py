"""The `secure-fedllm` command with `evaluate` added.

`secure_fedllm` must not import this package (imports point one way), so the console script lives
here: it is `secure_fedllm.cli.app` plus the `evaluate` command.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from secure_fedllm.cli import app
from secure_fedllm.cli import main as _main

__all__ = ["main"]


@app.command()
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


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `secure-fedllm` console script."""
    return _main(argv)
