"""`secure-fedllm`: a thin command line over the Python API (`secure_fedllm.run` and friends)."""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Annotated

import typer
from pydantic import BaseModel

from .budget import plan_budget, show_budget
from .config import RunConfig, toml_value
from .errors import ConfigError, SecureFedLLMError

__all__ = ["app", "main"]

app = typer.Typer(
    name="secure-fedllm",
    help="Federated LoRA fine-tuning with DP-SGD and secure aggregation.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
budget_app = typer.Typer(help="Plan privacy budgets before a run, show what a run spent.", no_args_is_help=True)
app.add_typer(budget_app, name="budget")


def _fail(exc: Exception) -> typer.Exit:
    typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
    return typer.Exit(code=2)


@app.command()
def run(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="TOML/YAML run configuration")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="override: section.field=value (repeatable)")] = None,
    out: Annotated[Path | None, typer.Option(help="run folder (default runs/<UTC time>)")] = None,
    resume: Annotated[Path | None, typer.Option(help="continue the run in this folder")] = None,
    sites: Annotated[
        Path | None,
        typer.Option(help="folder of the clients' private state folders (default <run>.sites, beside the run)"),
    ] = None,
    merge: Annotated[bool, typer.Option(help="also save the merged model (merge_and_unload)")] = False,
    quiet: Annotated[bool, typer.Option(help="no progress output")] = False,
    engine: Annotated[
        str, typer.Option(help="inprocess (one process), or flower (Flower's simulation engine, one node per client)")
    ] = "inprocess",
) -> None:
    """Run a federation (default: SmolLM2-135M, 4 clients, 3 rounds, SecAgg+, DP-SGD at epsilon 8)."""
    from .federation import run as run_federation

    if engine not in ("inprocess", "flower"):
        raise _fail(ConfigError(f"--engine {engine}: choose inprocess or flower"))
    if engine == "flower" and (resume is not None or merge):
        raise _fail(ConfigError("--engine flower runs fresh runs only: drop --resume and --merge"))

    try:
        cfg: RunConfig | None = None
        if config is not None:  # with --resume, it must equal the run's config (run() checks)
            cfg = RunConfig.from_file(config).with_overrides(list(set_ or []))
        elif resume is not None:
            cfg = RunConfig.from_file(resume / "config.toml").with_overrides(list(set_ or [])) if set_ else None
        else:
            cfg = RunConfig().with_overrides(list(set_ or []))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*Optimal order is the (largest|smallest) alpha.*")
            warnings.filterwarnings("ignore", message=".*Full backward hook is firing.*")
            warnings.filterwarnings("ignore", category=FutureWarning)
            if engine == "flower":
                from .flower.simulation import run_simulation

                target = out or Path("runs") / time.strftime("%Y%m%d-%H%M%S-flower", time.gmtime())
                result = run_simulation(cfg or RunConfig(), out=target)
            else:
                result = run_federation(cfg, out=out, resume=resume, merge=merge, progress=not quiet, sites=sites)
    except SecureFedLLMError as exc:
        raise _fail(exc) from exc
    ratio = result.final_perplexity_ratio
    typer.echo(f"held-out perplexity ratio (final / round 0): {ratio:.3f}")
    typer.echo(f"run folder: {result.out}")


@app.command("init-config")
def init_config(
    path: Annotated[Path, typer.Argument(help="where to write (.toml or .yaml)")] = Path("secure-fedllm.toml"),
    force: Annotated[bool, typer.Option(help="overwrite an existing file")] = False,
) -> None:
    """Write the default configuration, every field commented."""
    if path.exists() and not force:
        raise _fail(FileExistsError(f"{path} exists; pass --force to overwrite"))
    if path.suffix == ".toml":
        path.write_text(commented_toml(RunConfig()))
    else:
        try:
            RunConfig().to_file(path)
        except SecureFedLLMError as exc:
            raise _fail(exc) from exc
    typer.echo(f"wrote {path}")


def commented_toml(config: RunConfig) -> str:
    """The config as TOML with each field's description above it (unset fields commented out)."""
    lines = [
        "# secure-fedllm run configuration. Load with `secure-fedllm run --config FILE`;",
        "# override single fields with --set section.field=value.",
        f'kind = "{config.kind}"',
        f"schema_version = {config.schema_version}",
    ]
    for section_name, section_field in type(config).model_fields.items():
        section = getattr(config, section_name)
        if not isinstance(section, BaseModel):
            continue
        lines += ["", f"# {(type(section).__doc__ or '').strip().splitlines()[0]}", f"[{section_name}]"]
        for name, info in type(section).model_fields.items():
            value = getattr(section, name)
            if info.description:
                lines.append(f"# {info.description}")
            if value is None:
                lines.append(f"# {name} =")
            else:
                lines.append(f"{name} = {toml_value(value)}")
        del section_field
    return "\n".join(lines) + "\n"


@budget_app.command("plan")
def budget_plan(
    epsilon: Annotated[float | None, typer.Option(help="target epsilon -> noise multiplier")] = None,
    noise: Annotated[float | None, typer.Option(help="noise multiplier -> epsilon")] = None,
    sample_rate: Annotated[float | None, typer.Option(help="Poisson rate q (or give --batch and --records)")] = None,
    batch: Annotated[int, typer.Option(help="expected batch size")] = 32,
    records: Annotated[int, typer.Option(help="privacy units at the client (N_i)")] = 256,
    steps: Annotated[int, typer.Option(help="DP-SGD steps per joined round")] = 3,
    rounds: Annotated[int, typer.Option(help="joins K = min(rounds, max participations)")] = 3,
    delta: Annotated[float | None, typer.Option(help="delta (default 0.1 / records)")] = None,
    accountant: Annotated[str, typer.Option(help="rdp or prv")] = "rdp",
    neighbouring: Annotated[str, typer.Option(help="replace (one unit swapped; a run's default) or add_remove")] = (
        "replace"
    ),
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Noise for a target epsilon, or epsilon for a noise, over K joins at rate q."""
    q = sample_rate if sample_rate is not None else min(1.0, batch / records)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            plan = plan_budget(
                sample_rate=q,
                steps_per_round=steps,
                rounds=rounds,
                delta=delta if delta is not None else 0.1 / records,
                epsilon=epsilon,
                noise_multiplier=noise,
                accountant=accountant,
                neighbouring=neighbouring,
            )
    except SecureFedLLMError as exc:
        raise _fail(exc) from exc
    if as_json:
        typer.echo(json.dumps(plan, indent=1))
        return
    typer.echo(
        f"q={plan['sample_rate']:.4g}, {steps} steps x {rounds} joins, delta={plan['delta']:.3g}, "
        f"{accountant} ({neighbouring}): noise multiplier {plan['noise_multiplier']:.4f} -> epsilon "
        f"{plan['epsilon']:.3f}"
    )
    typer.echo("epsilon after each join: " + ", ".join(f"{e:.3f}" for e in plan["epsilon_after_round"]))


@budget_app.command("show")
def budget_show(
    run_dir: Annotated[Path, typer.Argument(help="a run folder")],
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    sites: Annotated[
        Path | None, typer.Option(help="folder of the clients' state folders (default <run>.sites)")
    ] = None,
) -> None:
    """Per client: epsilon spent, delta, rounds joined, remaining budget."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rows = show_budget(run_dir, sites=sites)
    except SecureFedLLMError as exc:
        raise _fail(exc) from exc
    if as_json:
        typer.echo(json.dumps(rows, indent=1))
        return
    typer.echo(f"{'client':>6} {'epsilon':>9} {'budget':>7} {'remaining':>9} {'delta':>9}  rounds joined")
    for r in rows:
        typer.echo(
            f"{r['client']:>6} {r['epsilon']:>9.3f} {r['budget']:>7g} {r['remaining']:>9.3f} {r['delta']:>9.3g}  "
            f"{r['rounds_joined']}"
        )


@app.command()
def demo(
    clients: int = 20,
    dimension: Annotated[int | None, typer.Option(help="update length (default: SmolLM2 q,v r=16)")] = None,
    protocol: str = "secagg+",
    dropout: Annotated[float, typer.Option(help="fraction of clients that drop mid-round")] = 0.1,
    seed: int = 0,
) -> None:
    """One secure-aggregation round over simulated clients, with dropouts (no model)."""
    from .demo import SMOLLM2_QV_LORA_R16, DemoConfig, run_demo

    try:
        lines: list[str] = []
        cfg = DemoConfig(
            clients=clients,
            dimension=dimension or SMOLLM2_QV_LORA_R16,
            protocol=protocol,
            dropout=dropout,
            seed=seed,
        )
        run_demo(cfg, out=lines)
    except SecureFedLLMError as exc:
        raise _fail(exc) from exc
    typer.echo("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    try:
        status = app(args=argv, standalone_mode=False)
    except typer.Exit as exc:
        return int(exc.exit_code)
    except SystemExit as exc:  # click's usage errors
        return int(exc.code or 0)
    except Exception as exc:  # click.UsageError and friends
        if exc.__class__.__module__.startswith("click"):
            typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
            return 2
        raise
    return status if isinstance(status, int) else 0


if __name__ == "__main__":
    raise SystemExit(main())
