"""The `evaluate` command of `secure-fedllm`.

A plain function with typer annotations: it registers itself nowhere. The console script
(`secure_fedllm_cli`) puts it on the app beside `secure_fedllm`'s commands, so neither package
touches the other's app.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer

__all__ = ["evaluate"]


def evaluate(
    out: Annotated[Path, typer.Option(help="folder for results.json, report.md and the plots")],
    quick: Annotated[bool, typer.Option(help="tiny random LLaMA models (minutes); default: embedded SmolLM2")] = False,
    seed: Annotated[int, typer.Option(help="seed of data, sampling and canary bits")] = 0,
    model: Annotated[
        str | None,
        typer.Option(help="base model of the matrix's privacy rows: 'embedded' (default), a folder or a hub id"),
    ] = None,
    run: Annotated[
        Path | None,
        typer.Option(
            "--run",
            help="attack this finished run folder's released adapter instead (membership on its own training vs "
            "held-out records, its canaries, what its epsilon allows)",
        ),
    ] = None,
) -> None:
    """Run the attack x defense matrix (or, with --run, the attacks on one run) and write results.json and report.md."""
    if run is not None:
        if quick or model is not None:
            raise typer.BadParameter(
                "--quick and --model choose the matrix's models; --run attacks the run's own adapter on its own base: "
                "drop them",
                param_hint="--run",
            )
        from .run_evaluation import evaluate_run

        evaluation = evaluate_run(run, out=out, seed=seed)
        typer.echo(json.dumps(evaluation.summary(), indent=1))
        typer.echo(f"report: {evaluation.report}")
        return
    from .evaluation import EvaluationConfig
    from .evaluation import evaluate as run_evaluation

    options: dict[str, Any] = {"quick": quick, "seed": seed}
    if model is not None:
        options["model"] = model
    started = time.perf_counter()

    def progress(stage: str) -> None:  # one line per stage: an hour-long evaluation says where it is
        typer.echo(f"evaluate [{time.perf_counter() - started:7.0f} s] {stage}", err=True)

    result = run_evaluation(EvaluationConfig(**options), out=out, progress=progress)
    typer.echo(json.dumps(result.summary(), indent=1))
    typer.echo(f"report: {result.report}")
