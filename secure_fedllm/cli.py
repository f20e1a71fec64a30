"""The commands of `secure-fedllm` and the one error path every command line here goes through.

The console script itself is `secure_fedllm_cli`, which assembles these commands and
`threat_models`' `evaluate` on one app; this module registers nothing on anyone else's app and
imports nothing from `threat_models` (imports point one way). `python -m secure_fedllm.cli` runs
the same commands without `evaluate`.

Error path (`run_cli`): a user error is one line on stderr, `error: <where>: <problem>; <fix>`, and
exit status 2; a bug keeps its traceback. Click's usage errors are caught here rather than left to
typer, whose handling changed between releases (typer >= 0.2x vendors click as `typer._click`, and
its rich error panels and tracebacks depend on the version and its settings).
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from enum import StrEnum
from importlib import metadata
from pathlib import Path
from typing import IO, Annotated, Any

import typer
from pydantic import BaseModel

from .budget import format_state_dir, plan_budget, plan_distributed_budget, show_budget, show_state_dir
from .config import RunConfig, toml_value
from .errors import ConfigError, SecureFedLLMError

__all__ = [
    "Accountant",
    "DemoProtocol",
    "Engine",
    "Neighbouring",
    "PrivacyMode",
    "app",
    "budget_commands",
    "build_app",
    "demo",
    "init_config",
    "main",
    "new_app",
    "one_line",
    "run",
    "run_cli",
]

PROG = "secure-fedllm"
CONTEXT_SETTINGS: dict[str, Any] = {"help_option_names": ["-h", "--help"]}
EXIT_USER_ERROR = 2
PACKAGE_DIR = str(Path(__file__).resolve().parent)


class Engine(StrEnum):
    """`run --engine`: where the clients run."""

    inprocess = "inprocess"
    flower = "flower"


class Accountant(StrEnum):
    """`budget plan --accountant` (the run's `privacy.accountant`)."""

    pld = "pld"
    rdp = "rdp"
    prv = "prv"


class Neighbouring(StrEnum):
    """`budget plan --neighbouring` (the run's `privacy.neighbouring`)."""

    replace_one = "replace"  # not `replace`: that would shadow str.replace on every member
    add_remove = "add_remove"


class PrivacyMode(StrEnum):
    """`budget plan --mode` (the run's `privacy.mode`)."""

    local = "local"
    distributed = "distributed"


class DemoProtocol(StrEnum):
    """`demo --protocol`: the secure-aggregation protocols the demo runs."""

    secagg = "secagg"
    secagg_plus = "secagg+"


class TinyArchitecture(StrEnum):
    """`tiny-model --architecture`: the architectures of `secure_fedllm.tiny_model` (same as TINY_ARCHITECTURES)."""

    llama = "llama"
    qwen2 = "qwen2"
    mistral = "mistral"
    gemma = "gemma"
    phi3 = "phi3"
    gpt2 = "gpt2"


def _version(value: bool) -> None:
    if value:
        try:
            version = metadata.version("secure-fedllm")
        except metadata.PackageNotFoundError:  # run from a source tree that was never installed
            version = "unknown (not installed)"
        typer.echo(f"{PROG} {version}")
        raise typer.Exit(0)


def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="print the version and exit")
    ] = False,
) -> None:
    """Federated LoRA fine-tuning with DP-SGD and secure aggregation."""


def new_app() -> typer.Typer:
    """An empty `secure-fedllm` app with `-h`/`--help` and `--version`, for assembling commands on."""
    # Not no_args_is_help: click 8.2+ turned that into an error whose message is the whole help text;
    # a missing command is a usage error like any other (one line, pointing at --help).
    app = typer.Typer(
        name=PROG,
        no_args_is_help=False,
        add_completion=False,
        pretty_exceptions_enable=False,
        context_settings=CONTEXT_SETTINGS,
    )
    app.callback()(_root)
    return app


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
    quiet: Annotated[
        bool, typer.Option(help="no progress output, and no progress bars or info logs from transformers/peft/hub")
    ] = False,
    engine: Annotated[
        Engine,
        typer.Option(help="inprocess (one process), or flower (Flower's simulation engine, one node per client)"),
    ] = Engine.inprocess,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="print each client's N_i, q_i, noise, steps, expected epsilon and records truncated/dropped by "
            "data.max_length, then stop (no training, no run folder)",
        ),
    ] = False,
    log_json: Annotated[
        str | None,
        typer.Option(
            "--log-json",
            metavar="PATH",
            help="also write one JSON object per line (progress lines, rounds, warnings, the result; a dry run's "
            "table) to PATH; '-' writes them to stdout and the human output to stderr",
        ),
    ] = None,
) -> None:
    """Run a federation (default: SmolLM2-135M, 4 clients, 3 rounds, SecAgg+, DP-SGD at epsilon 8).

    Progress goes to stdout: rich on a terminal, plain unwrapped lines when piped or redirected.
    """
    from .federation import run as run_federation

    if engine is Engine.flower and (resume is not None or merge):
        raise ConfigError("--engine flower: runs fresh runs only; drop --resume and --merge")
    if engine is Engine.flower and log_json is not None and not dry_run:
        raise ConfigError("--log-json: the flower engine's server logs through Flower; drop --log-json or --engine")

    cfg: RunConfig | None = None
    if config is not None:  # with --resume, it must equal the run's config (run() checks)
        cfg = RunConfig.from_file(config).with_overrides(list(set_ or []))
    elif resume is not None:
        cfg = RunConfig.from_file(resume / "config.toml").with_overrides(list(set_ or [])) if set_ or dry_run else None
    else:
        cfg = RunConfig().with_overrides(list(set_ or []))
    human = sys.stderr if log_json == "-" else sys.stdout
    with ExitStack() as stack:
        stack.enter_context(_run_warnings())
        if quiet:
            from .logs import quiet_libraries

            stack.enter_context(quiet_libraries())
        if dry_run:
            _dry_run(cfg or RunConfig(), log_json, human)
            return
        if engine is Engine.flower:
            from .flower.simulation import run_simulation

            target = out or Path("runs") / time.strftime("%Y%m%d-%H%M%S-flower", time.gmtime())
            result = run_simulation(cfg or RunConfig(), out=target)
        else:
            result = run_federation(
                cfg, out=out, resume=resume, merge=merge, progress=not quiet, sites=sites, log_json=log_json,
                stream=human,
            )  # fmt: skip
    ratio = result.final_perplexity_ratio
    typer.echo(f"held-out perplexity ratio (final / round 0): {ratio:.3f}", err=human is sys.stderr)
    typer.echo(f"run folder: {result.out}", err=human is sys.stderr)


def _dry_run(config: RunConfig, log_json: str | None, human: IO[str]) -> None:
    from .federation.dry_run import dry_run, format_dry_run
    from .logs import RunLog

    plan = dry_run(config)
    human.write(format_dry_run(plan) + "\n")
    human.flush()
    if log_json is not None:
        with RunLog(progress=False, json_path=log_json) as log:
            log.event("dry_run", **plan.to_dict())


@contextmanager
def _run_warnings() -> Iterator[None]:
    """A run's warnings: library noise filtered, this package's own warnings one line each on stderr.

    The package's warnings (`data.max_length` cutting records, a large delta) are advice to the
    user, so they read `warning: <message>` like the error path's `error: <message>`; anything
    else keeps Python's format, which names the code that raised it.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Optimal order is the (largest|smallest) alpha.*")
        warnings.filterwarnings("ignore", message=".*Full backward hook is firing.*")
        warnings.filterwarnings("ignore", category=FutureWarning)
        show = warnings.showwarning

        def one_line_for_ours(
            message: Warning | str,
            category: type[Warning],
            filename: str,
            lineno: int,
            file: Any = None,
            line: str | None = None,
        ) -> None:
            if str(Path(filename).resolve()).startswith(PACKAGE_DIR):
                typer.secho(f"warning: {one_line(str(message))}", err=True, fg=typer.colors.YELLOW)
            else:
                show(message, category, filename, lineno, file, line)

        warnings.showwarning = one_line_for_ours
        yield


def init_config(
    path: Annotated[Path, typer.Argument(help="where to write (.toml or .yaml)")] = Path("secure-fedllm.toml"),
    force: Annotated[bool, typer.Option(help="overwrite an existing file")] = False,
) -> None:
    """Write the default configuration, every field commented."""
    if path.exists() and not force:
        raise ConfigError(f"{path}: exists; pass --force to overwrite")
    if path.suffix == ".toml":
        path.write_text(commented_toml(RunConfig()))
    else:
        RunConfig().to_file(path)
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


def budget_plan(
    epsilon: Annotated[float | None, typer.Option(help="target epsilon -> noise multiplier")] = None,
    noise: Annotated[float | None, typer.Option(help="noise multiplier -> epsilon")] = None,
    sample_rate: Annotated[float | None, typer.Option(help="Poisson rate q (or give --batch and --records)")] = None,
    batch: Annotated[int, typer.Option(help="expected batch size")] = 32,
    records: Annotated[int, typer.Option(help="privacy units at the client (N_i)")] = 256,
    steps: Annotated[int, typer.Option(help="DP-SGD steps per joined round")] = 3,
    rounds: Annotated[int, typer.Option(help="joins K = min(rounds, max participations)")] = 3,
    delta: Annotated[float | None, typer.Option(help="delta (default 0.1 / records)")] = None,
    accountant: Annotated[Accountant, typer.Option(help="pld (tight), rdp or prv")] = Accountant.pld,
    neighbouring: Annotated[
        Neighbouring, typer.Option(help="replace (one unit swapped; a run's default) or add_remove")
    ] = Neighbouring.replace_one,
    mode: Annotated[
        PrivacyMode, typer.Option(help="local (each client's own noise) or distributed (shares in SecAgg)")
    ] = PrivacyMode.local,
    clients: Annotated[int, typer.Option(help="distributed: clients per round n")] = 4,
    corrupt: Annotated[int, typer.Option(help="distributed: colluding clients n_C")] = 1,
    dropouts: Annotated[int, typer.Option(help="distributed: dropouts d_max")] = 1,
    dimension: Annotated[int, typer.Option(help="distributed: adapter length d")] = 368_640,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Noise for a target epsilon, or epsilon for a noise, over K joins at rate q (or distributed DP's shares)."""
    if records < 1:
        raise ConfigError(f"--records {records}: must be at least 1; give the number of privacy units")
    q = sample_rate if sample_rate is not None else min(1.0, batch / records)
    if mode is PrivacyMode.distributed:
        _plan_distributed(epsilon, noise, q, rounds, delta, records, clients, corrupt, dropouts, dimension,
                          neighbouring.value, as_json)  # fmt: skip
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = plan_budget(
            sample_rate=q,
            steps_per_round=steps,
            rounds=rounds,
            delta=delta if delta is not None else 0.1 / records,
            epsilon=epsilon,
            noise_multiplier=noise,
            accountant=accountant.value,
            neighbouring=neighbouring.value,
        )
    if as_json:
        typer.echo(json.dumps(plan, indent=1))
        return
    typer.echo(
        f"q={plan['sample_rate']:.4g}, {steps} steps x {rounds} joins, delta={plan['delta']:.3g}, "
        f"{accountant.value} ({neighbouring.value}): noise multiplier {plan['noise_multiplier']:.4f} -> epsilon "
        f"{plan['epsilon']:.3f}"
    )
    typer.echo("epsilon after each join: " + ", ".join(f"{e:.3f}" for e in plan["epsilon_after_round"]))
    if "epsilon_rdp" in plan:
        rdp_noise = plan.get("noise_multiplier_rdp")
        typer.echo(
            f"rdp, for comparison: epsilon {plan['epsilon_rdp']:.3f} at this noise"
            + (f"; noise {rdp_noise:.4f} for the same target" if rdp_noise is not None else "")
        )


def _plan_distributed(
    epsilon: float | None,
    noise: float | None,
    q: float,
    rounds: int,
    delta: float | None,
    records: int,
    clients: int,
    corrupt: int,
    dropouts: int,
    dimension: int,
    neighbouring: str,
    as_json: bool,
) -> None:
    if epsilon is None or noise is not None:
        raise ConfigError("budget plan --mode distributed: give --epsilon (the central noise is calibrated for it)")
    plan = plan_distributed_budget(
        epsilon=epsilon, sample_rate=q, steps=rounds, delta=delta if delta is not None else 0.1 / (clients * records),
        clients=clients, corrupt=corrupt, dropouts=dropouts, dimension=dimension, neighbouring=neighbouring,
    )  # fmt: skip
    if as_json:
        typer.echo(json.dumps(plan, indent=1))
        return
    typer.echo(
        f"distributed: q={q:.4g}, {rounds} DP steps (one per round), delta={plan['delta']:.3g}, skellam-rdp "
        f"({neighbouring}), n={clients}, n_C={corrupt}, d_max={dropouts} -> h={plan['honest_shares']} honest shares"
    )
    typer.echo(
        f"central noise multiplier {plan['noise_multiplier']:.4f} (Skellam mu {plan['mu']:.4g}) -> epsilon "
        f"{plan['epsilon']:.3f}: against the server and {corrupt} colluding clients while secure aggregation holds"
    )
    typer.echo(
        f"each client's share: noise multiplier {plan['share_noise_multiplier']:.4f} -> epsilon "
        f"{plan['epsilon_own_share']:.3f}: what holds against anyone if secure aggregation fails"
    )


def budget_show(
    run_dir: Annotated[Path | None, typer.Argument(help="a run folder")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    sites: Annotated[
        Path | None, typer.Option(help="folder of the clients' state folders (default <run>.sites)")
    ] = None,
    state_dir: Annotated[
        Path | None, typer.Option(help="one site's state folder: its spending over all of its jobs")
    ] = None,
) -> None:
    """Per client: epsilon spent, delta, rounds joined, remaining budget (or one site's, with --state-dir)."""
    if (run_dir is None) == (state_dir is None):
        raise ConfigError(
            f"{PROG} budget show: give a run folder or --state-dir (one of them); see `{PROG} budget show --help`"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if state_dir is not None:
            report = show_state_dir(state_dir)
            typer.echo(json.dumps(report, indent=1) if as_json else format_state_dir(report))
            return
        assert run_dir is not None
        rows = show_budget(run_dir, sites=sites)
    if as_json:
        typer.echo(json.dumps(rows, indent=1))
        return
    shares = any(r["epsilon_own_share"] != r["epsilon"] for r in rows)
    own = f" {'own share':>9}" if shares else ""
    typer.echo(f"{'client':>6} {'epsilon':>9}{own} {'budget':>7} {'remaining':>9} {'delta':>9}  rounds joined")
    for r in rows:
        own = f" {r['epsilon_own_share']:>9.3f}" if shares else ""
        typer.echo(
            f"{r['client']:>6} {r['epsilon']:>9.3f}{own} {r['budget']:>7g} {r['remaining']:>9.3f} "
            f"{r['delta']:>9.3g}  {r['rounds_joined']}"
        )
    if shares:
        typer.echo(
            "distributed DP: 'epsilon' holds against the server and the assumed colluding clients while secure "
            "aggregation holds; 'own share' is what one client's noise alone gives if it fails"
        )


def demo(
    clients: int = 20,
    dimension: Annotated[int | None, typer.Option(help="update length (default: SmolLM2 q,v r=16)")] = None,
    protocol: Annotated[DemoProtocol, typer.Option(help="secure-aggregation protocol")] = DemoProtocol.secagg_plus,
    dropout: Annotated[float, typer.Option(help="fraction of clients that drop mid-round")] = 0.1,
    seed: int = 0,
) -> None:
    """One secure-aggregation round over simulated clients, with dropouts (no model)."""
    from .demo import SMOLLM2_QV_LORA_R16, DemoConfig, run_demo

    lines: list[str] = []
    cfg = DemoConfig(
        clients=clients,
        dimension=dimension or SMOLLM2_QV_LORA_R16,
        protocol=protocol.value,
        dropout=dropout,
        seed=seed,
    )
    run_demo(cfg, out=lines)
    typer.echo("\n".join(lines))


def tiny_model(
    folder: Annotated[Path, typer.Argument(help="where to write the model (a new or empty folder)")],
    architecture: Annotated[TinyArchitecture, typer.Option(help="model family")] = TinyArchitecture.llama,
    seed: int = 0,
) -> None:
    """Write a tiny random model (2 layers, hidden 64, byte-level tokenizer) for smoke tests: it learns nothing."""
    from .tiny_model import save_tiny_model

    if folder.exists() and any(folder.iterdir()):
        raise ConfigError(f"{folder}: not empty; give a new folder")
    save_tiny_model(folder, architecture.value, seed=seed)
    typer.echo(f"tiny {architecture.value} model: {folder} (use --set model.name='\"{folder}\"')")


def budget_commands() -> typer.Typer:
    """The `budget` command group (`plan`, `show`)."""
    budget = typer.Typer(
        help="Plan privacy budgets before a run, show what a run (or a site) spent.",
        add_completion=False,
        pretty_exceptions_enable=False,
        context_settings=CONTEXT_SETTINGS,
    )
    budget.command("plan")(budget_plan)
    budget.command("show")(budget_show)
    return budget


def build_app() -> typer.Typer:
    """This package's commands (`run`, `init-config`, `budget`, `demo`, `tiny-model`) on a fresh app."""
    app = new_app()
    app.command("run")(run)
    app.command("init-config")(init_config)
    app.add_typer(budget_commands(), name="budget")
    app.command("demo")(demo)
    app.command("tiny-model")(tiny_model)
    return app


app = build_app()


def _click_classes() -> tuple[type[Exception], type[Exception]]:
    """`ClickException` and `UsageError` of the click that typer runs on.

    Older typers use the `click` package; newer ones vendor it as `typer._click`. `typer.BadParameter`
    is a `UsageError` of whichever it is, so its ancestors name both classes without importing either.
    """
    ancestors = {cls.__name__: cls for cls in typer.BadParameter.__mro__}
    return ancestors["ClickException"], ancestors["UsageError"]


def one_line(text: str) -> str:
    """`text` with every run of whitespace (newlines included) made one space."""
    return " ".join(text.split())


def _usage_message(exc: Exception) -> str:
    ctx = getattr(exc, "ctx", None)
    where = str(getattr(ctx, "command_path", "") or PROG)
    option, possibilities = getattr(exc, "option_name", None), getattr(exc, "possibilities", None)
    if option and possibilities is not None:  # NoSuchOption: its own message differs between clicks
        problem = f"no such option {option}"
        if possibilities:
            problem += " (did you mean " + " or ".join(sorted(possibilities)) + "?)"
    else:
        format_message = getattr(exc, "format_message", None)
        problem = one_line(str(format_message() if callable(format_message) else exc)).rstrip(".")
        problem = problem[:1].lower() + problem[1:]
    return f"{where}: {problem}; see `{where} --help`"


def _os_message(exc: OSError) -> str:
    where = exc.filename if exc.filename2 is None else f"{exc.filename} -> {exc.filename2}"
    problem = exc.strerror or type(exc).__name__
    return f"{where}: {problem}; check the path (an input must exist and be readable, an output folder writable)"


def _error(message: str) -> int:
    typer.secho(f"error: {one_line(message)}", err=True, fg=typer.colors.RED)
    return EXIT_USER_ERROR


def run_cli(
    command_app: typer.Typer,
    argv: Sequence[str] | None = None,
    *,
    user_errors: tuple[type[BaseException], ...] = (SecureFedLLMError,),
) -> int:
    """Run `command_app` on `argv` and return the exit status, with one error path.

    Usage errors (a misspelt option, a missing argument, an unknown command), the `user_errors`
    (whose messages already read `<where>: <problem>; <fix>`) and OSErrors that name a path print
    one line, `error: <message>`, on stderr and give 2. `--help`/`-h` and `--version` give 0.
    Anything else is a bug and propagates with its traceback.
    """
    click_exception, usage_error = _click_classes()
    command = typer.main.get_command(command_app)
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        status = command.main(args=args, prog_name=PROG, standalone_mode=False)
    except typer.Exit as exc:  # raised by --help, --version and commands that stop early
        return int(exc.exit_code)
    except typer.Abort:
        typer.secho("error: aborted", err=True, fg=typer.colors.RED)
        return 1
    except usage_error as exc:
        return _error(_usage_message(exc))
    except click_exception as exc:  # e.g. a FileError of a typer.FileText option
        return _error(_usage_message(exc))
    except user_errors as exc:
        return _error(str(exc))
    except OSError as exc:
        if exc.filename is None:
            raise  # no path the user gave: a bug, keep the traceback
        return _error(_os_message(exc))
    return status if isinstance(status, int) else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m secure_fedllm.cli` (no `evaluate`); returns the exit status."""
    return run_cli(app, argv)


if __name__ == "__main__":
    raise SystemExit(main())
