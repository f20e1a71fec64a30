"""Attacks on a user's own run: `secure-fedllm evaluate --run RUN_DIR`.

The attack matrix (`threat_models.evaluation`) says what the defenses do on models we train; a user
wants to know what *their* released adapter gives away. Everything here is what anyone holding the
run folder could do, plus the run's own records re-derived from its configuration:

* **Membership inference** (`MembershipInference`: loss, zlib, Min-K% and the base model as
  reference) with the run's training records as members and its held-out records as non-members.
  Both sides come from the run's `config.toml` exactly as the run loaded them
  (`secure_fedllm.data.load_federation_data`: the synthetic generator from its seed, or the recorded
  data file with the run's seeded shuffle and partition; under federated evaluation each site's
  held-out part joins the non-members). What cannot be recovered is refused
  (`RunDataUnavailableError`), never approximated: a member that was not trained on makes the
  attack look weaker than it is. Recovery is checked against what the run recorded: the canary
  manifest (synthetic), each client's record and unit counts (report.md), and the base model's
  held-out loss at round 0 (metrics.jsonl), which changes if any held-out record does. The folder
  holds no hash of a data file, so an edit to a training record that leaves its count alone goes
  unseen.
* **Canary exposure** of the canaries planted with the run (`data_manifest.json`; `CanaryExposure`),
  each judged against the guarantee that actually covers it: record-level epsilon does not bound a
  canary repeated k times, group privacy does (`canary_privacy_bound`).
* **What the epsilon allows**: per client, the TPR bound min(1, e^eps FPR + delta, ...) at 1% and
  0.1% FPR (`dp_tpr_bound`) and the largest AUC any attack could have under (epsilon, delta).

The report says what each number means for this run, in words, beside the number.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from secure_fedllm import RunConfig
from secure_fedllm.data import ChatTemplate, TextRecord, TokenizedDataset
from secure_fedllm.logs import json_safe

from .attacks.canary_exposure import (
    MIN_REFERENCES,
    CanaryExposure,
    CanaryExposureConfig,
    ExposureResult,
    canary_privacy_bound,
    canary_probes,
    expected_random_exposure,
)
from .attacks.membership import MembershipConfig, MembershipInference, MembershipResult, ScoreReport
from .errors import RunDataUnavailableError, RunEvaluationError
from .results import MatrixRow
from .stats import HEADLINE_MIN_SAMPLES, dp_tpr_bound

__all__ = [
    "CanaryFinding",
    "ClientPrivacy",
    "DataSummary",
    "MembershipFinding",
    "RunEvaluation",
    "evaluate_run",
]

FPRS: tuple[float, ...] = (0.01, 0.001)
"""The operating points at which each guarantee's TPR bound is quoted."""

CHANCE_LEVEL = 0.01
"""A canary whose exposure would occur by chance with probability below this is called memorised."""

_DATA_COUNTS = re.compile(r"client (\d+): (\d+) records, (\d+) units, (\d+) dropped")


# ---------------------------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------------------------


class ClientPrivacy(BaseModel):
    """One client's guarantee and what it allows an attacker on one of its privacy units."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    client: int
    records: int = Field(description="training records the client kept (after data.max_length)")
    units: int = Field(description="privacy units N_i")
    epsilon: float = Field(description="epsilon spent by the end of the run (inf without DP)")
    delta: float
    unit: str
    neighbouring: str
    tpr_bounds: dict[str, float] = Field(
        description="FPR (as '1%', '0.1%') -> the largest TPR the client's guarantee allows: from its whole privacy "
        "profile (PLD) under local DP-SGD, else from the one (epsilon, delta) pair"
    )
    auc_bound: float = Field(description="the largest AUC any membership attack can have under that guarantee")
    bound_curve: tuple[tuple[float, ...], tuple[float, ...]] | None = Field(
        None, description="(FPR, TPR bound) from the privacy profile, for the ROC plot; None without a DP-SGD history"
    )
    meaning: str


class MembershipFinding(BaseModel):
    """One membership score's headline numbers and what they mean for the run."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    score: str
    auc: float
    auc_ci: tuple[float, float]
    tpr_at_1pct: float
    tpr_at_1pct_ci: tuple[float, float]
    tpr_at_01pct: float | None
    consistent_with_guarantee: bool | None = Field(
        description="TPR at 1% FPR within the adapter's (epsilon, delta) bound (None without DP)"
    )
    meaning: str


class CanaryFinding(BaseModel):
    """One planted canary's exposure, the guarantee that covers it, and what that means."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    canary_id: str
    format_name: str
    client: int
    repeats: int = Field(description="copies in the client's training records")
    exposure: float
    max_exposure: float
    rank: int
    candidates: int
    chance_exposure: float = Field(description="expected exposure of a secret the model never saw")
    p_chance: float = Field(description="probability of an exposure at least this high without training: 2^-exposure")
    extrapolated_exposure: float | None
    group_epsilon: float = Field(description="the epsilon that covers this canary (group privacy over its repeats)")
    group_delta: float
    p_bound: float = Field(description="the largest probability of this exposure the covering guarantee allows")
    tpr_bounds: dict[str, float]
    meaning: str


class DataSummary(BaseModel):
    """Where the members and non-members came from, what was left out and what was checked."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    source: str
    training_records: int = Field(description="every client's training records, canaries included")
    heldout_records: int
    members_available: int
    nonmembers_available: int
    members: int
    nonmembers: int
    excluded: dict[str, int]
    checks: list[str]


class RunEvaluation(BaseModel):
    """Everything `evaluate_run` measured on one run folder, and where it wrote the report."""

    model_config = ConfigDict(extra="forbid")

    run: str
    out: str
    report: str
    results: str
    seed: int
    base_model: str
    privacy: dict[str, Any]
    data: DataSummary
    clients: list[ClientPrivacy]
    membership: MembershipResult
    membership_findings: list[MembershipFinding]
    exposure: ExposureResult | None
    canaries: list[CanaryFinding]
    findings: list[str] = Field(description="the report's headline sentences")
    warnings: list[str]
    seconds: dict[str, float]

    def rows(self) -> list[MatrixRow]:
        """The membership and exposure rows in the matrix's shape; defense = the run folder's name."""
        defense = Path(self.run).name
        rows = [*self.membership.rows()]
        if self.exposure is not None:
            rows += self.exposure.rows()
        for client in self.clients:
            rows.append(MatrixRow(attack="accountant", metric=f"epsilon_client{client.client}", value=client.epsilon))
        return [r.model_copy(update={"defense": defense}) for r in rows]

    def summary(self) -> dict[str, Any]:
        """Headline numbers for the command line."""
        return {
            "run": self.run,
            "members": self.data.members,
            "nonmembers": self.data.nonmembers,
            "membership_auc": {
                f.score: [round(f.auc, 4), *(round(v, 4) for v in f.auc_ci)] for f in self.membership_findings
            },
            "canary_exposure_bits": {c.canary_id: round(c.exposure, 2) for c in self.canaries},
            "epsilon": {str(c.client): _finite_or_none(c.epsilon) for c in self.clients},
            "seconds": round(self.seconds.get("total", 0.0), 1),
        }


# ---------------------------------------------------------------------------------------------------------------
# Progress
# ---------------------------------------------------------------------------------------------------------------


class _Progress:
    """A tqdm bar per long stage on a terminal; plain lines elsewhere (a pipe, a log file), as runs do."""

    def __init__(self, enabled: bool, stream: IO[str] | None = None) -> None:
        self.enabled = enabled
        self.stream: IO[str] = stream if stream is not None else sys.stdout
        isatty = getattr(self.stream, "isatty", None)
        self.terminal = enabled and callable(isatty) and bool(isatty())

    def line(self, text: str) -> None:
        if not self.enabled:
            return
        if self.terminal:
            from tqdm import tqdm  # type: ignore[import-untyped, unused-ignore]

            tqdm.write(f"evaluate: {text}", file=self.stream)
        else:
            self.stream.write(f"evaluate: {text}\n")
            self.stream.flush()

    @contextlib.contextmanager
    def stage(self, name: str, unit: str, total: int | None = None) -> Iterator[Callable[[int, int | None], None]]:
        """`update(done, total)` for one stage: a bar on a terminal, a line at each quarter otherwise."""
        start = time.perf_counter()
        if not self.enabled:

            def ignore(done: int, new_total: int | None = None) -> None:
                return None

            yield ignore
            return
        if self.terminal:
            from tqdm import tqdm  # type: ignore[import-untyped, unused-ignore]

            bar = tqdm(total=total, desc=name, unit=unit, file=self.stream, disable=False, leave=True)

            def update_bar(done: int, new_total: int | None = None) -> None:
                if new_total is not None and new_total != bar.total:
                    bar.total = new_total
                    bar.refresh()
                if done > bar.n:
                    bar.update(done - bar.n)  # redrawn at most every 0.1 s, however often it is called

            try:
                yield update_bar
            finally:
                bar.close()
            return
        whole, quarter, last = total, 0, 0
        self.line(f"{name}: started" + (f" ({total} {unit})" if total else ""))

        def update_line(done: int, new_total: int | None = None) -> None:
            nonlocal whole, quarter, last
            whole = new_total if new_total is not None else whole
            last = done
            if whole and quarter < min(3, 4 * done // whole):
                quarter = min(3, 4 * done // whole)
                self.line(f"{name}: {done}/{whole} {unit}")

        yield update_line
        done_text = f"{last}/{whole} {unit}, " if whole else ""
        self.line(f"{name}: done ({done_text}{time.perf_counter() - start:.1f} s)")


@contextlib.contextmanager
def _counting_forwards(model: torch.nn.Module, update: Callable[[int, int | None], None],
                       total: int | None) -> Iterator[None]:  # fmt: skip
    """Report every call of `model` (one batch each) to `update`: progress for attacks that take no callback."""
    count = 0

    def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
        nonlocal count
        count += 1
        update(count, total)

    handle = model.register_forward_hook(hook)
    try:
        update(0, total)
        yield
    finally:
        handle.remove()


# ---------------------------------------------------------------------------------------------------------------
# The run folder and its data
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class _Run:
    """What the run folder holds, read and checked before any model is loaded."""

    root: Path
    config: RunConfig
    rows: list[Any]
    sidecar: dict[str, Any]
    canaries: list[dict[str, Any]]
    data_counts: dict[int, tuple[int, int, int]] | None
    """Per client (records, units, dropped) as report.md states them; None when it states none."""


@dataclass
class _Data:
    """The run's records as re-derived: each client's training records and every held-out record."""

    clients: list[list[TextRecord]]
    heldout: list[TextRecord]
    server_heldout: list[TextRecord]
    canaries: list[dict[str, Any]]
    checks: list[str] = field(default_factory=list)


def _open_run(run_dir: Path) -> _Run:
    """Read config.toml, metrics.jsonl, the adapter's sidecar, the canary manifest and report.md's data counts.

    Raises:
        RunEvaluationError: not a finished run folder (no config, no released adapter, unreadable files).
    """
    from secure_fedllm.errors import ConfigError
    from secure_fedllm.federation import RunPaths

    paths = RunPaths(run_dir)
    if not run_dir.is_dir():
        raise RunEvaluationError(f"--run {run_dir}: not a folder; give the folder a `secure-fedllm run --out` wrote")
    if not paths.config.is_file():
        raise RunEvaluationError(f"--run {run_dir}: no config.toml; give the folder a `secure-fedllm run --out` wrote")
    try:
        config = RunConfig.from_file(paths.config)
    except ConfigError as exc:
        if "data." in str(exc):  # e.g. a data source this version does not know
            raise RunDataUnavailableError(
                f"--run {run_dir}: the run's records cannot be re-derived: {exc}; evaluate with the secure-fedllm "
                "version that made the run"
            ) from None
        raise RunEvaluationError(f"--run {run_dir}: {exc}") from None
    try:
        rows = paths.read_metrics()
    except ConfigError as exc:
        raise RunEvaluationError(f"--run {run_dir}: {exc}") from None
    sidecar_path = paths.adapter / "secure_fedllm_adapter.json"
    if not sidecar_path.is_file() or len(rows) < config.federation.rounds + 1:
        raise RunEvaluationError(
            f"--run {run_dir}: the run has not released its adapter (no {sidecar_path.name} in adapter/ or fewer "
            f"than {config.federation.rounds + 1} rounds in metrics.jsonl); finish it with "
            f"`secure-fedllm run --resume {run_dir}`"
        )
    sidecar = _read_json(sidecar_path)
    manifest_path = run_dir / "data_manifest.json"
    canaries = list(_read_json(manifest_path).get("canaries", [])) if manifest_path.is_file() else []
    counts = None
    if paths.report.is_file():
        found = _DATA_COUNTS.findall(paths.report.read_text(errors="replace"))
        if found:
            counts = {int(c): (int(r), int(u), int(d)) for c, r, u, d in found}
    return _Run(run_dir, config, rows, sidecar, canaries, counts)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        loaded = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunEvaluationError(f"{path}: unreadable ({exc}); restore it from the run") from None
    if not isinstance(loaded, dict):
        raise RunEvaluationError(f"{path}: expected a JSON object; restore it from the run")
    return loaded


def _recover_records(run: _Run) -> _Data:
    """The run's records, loaded as the run loaded them; refused when the source is not the run's.

    Raises:
        RunDataUnavailableError: the data file is missing or unreadable, the `datasets` package is
            missing for a dataset folder, or the synthetic canaries differ from the manifest.
    """
    from secure_fedllm.data import load_federation_data
    from secure_fedllm.errors import ConfigError

    config, root = run.config, run.root
    data = config.data
    where = "config.toml's data.path"
    if data.source != "synthetic":
        assert data.path is not None  # DataConfig requires it
        path = Path(data.path)
        if not path.exists():
            relative = "" if path.is_absolute() else f" (relative to the current directory {Path.cwd()})"
            raise RunDataUnavailableError(
                f"--run {root}: the run's records came from {where} = {data.path!r}, which does not exist{relative}; "
                "put the data back at that path, or run evaluate from the directory the run was started in: the "
                "attack's members and non-members are the run's own training and held-out records, re-derived from it"
            )
    try:
        loaded = load_federation_data(config)
    except ConfigError as exc:
        raise RunDataUnavailableError(
            f"--run {root}: the run's records cannot be re-derived from config.toml ({exc}); restore the data "
            f"source the run used ({data.source}" + (f" at {data.path!r})" if data.path else ")")
        ) from None
    checks = []
    if data.source == "synthetic":
        regenerated = json.loads(json.dumps(loaded.canaries))
        if regenerated != run.canaries:
            missing = "is missing" if not run.canaries else "lists other canaries"
            raise RunDataUnavailableError(
                f"--run {root}: data_manifest.json {missing} than the synthetic generator plants for config.toml "
                f"(federation.seed={config.federation.seed}, data.records_per_client={data.records_per_client}); "
                "the records cannot be the run's: restore data_manifest.json, or evaluate with the secure-fedllm "
                "version that made the run"
            )
        checks.append(
            f"synthetic records regenerated from federation.seed={config.federation.seed}: the {len(run.canaries)} "
            "planted canaries equal data_manifest.json's"
        )
    else:
        checks.append(f"records read from data.path={data.path!r} with the run's seeded shuffle and partition")
    clients, heldout = loaded.clients, list(loaded.heldout)
    if config.evaluation.mode == "federated":
        from secure_fedllm.federation.evaluation import site_split

        parts = [site_split(config, records) for records in clients]
        clients = [train for train, _ in parts]
        heldout += [r for _, held in parts for r in held]
        checks.append("federated evaluation: each site's held-out part (evaluation.site_heldout_fraction) joins the "
                      "non-members")  # fmt: skip
    return _Data(clients, heldout, list(loaded.heldout), list(loaded.canaries) or run.canaries, checks)


def _check_counts(run: _Run, datasets: list[TokenizedDataset]) -> str:
    """Each client's (records, units, dropped) must be report.md's.

    Raises:
        RunDataUnavailableError: a count differs (another file, another partition, or a Flower node's own data).
    """
    mine = {c: (len(d.examples), d.num_units, d.dropped) for c, d in enumerate(datasets)}
    if run.data_counts is None:
        return "report.md states no per-client data counts: record counts not checked"
    if mine != run.data_counts:
        differ = [c for c in sorted(set(mine) | set(run.data_counts)) if mine.get(c) != run.data_counts.get(c)]
        c = differ[0]
        data = run.config.data
        where = f"data.source={data.source!r}" + (f", data.path={data.path!r}" if data.path else "")
        engine = run.sidecar.get("engine", "in-process")
        why = (
            " The run used Flower: nodes that read their own data (node_config data-path) hold records this "
            "machine cannot see; evaluate at each site."
            if engine == "flower"
            else ""
        )
        raise RunDataUnavailableError(
            f"--run {run.root}: client {c} has (records, units, dropped) = {mine.get(c)} here but "
            f"{run.data_counts.get(c)} in the run's report.md: the data source changed since the run "
            f"({where}); restore the data the run was trained on.{why}"
        )
    return f"every client's record, unit and dropped counts equal report.md's ({len(mine)} clients)"


def _loss_tolerance(config: RunConfig) -> float:
    """Relative tolerance of a recomputed held-out loss: float32 agrees to rounding, half precision less so.

    Tight on purpose: on a model that has learned nothing (a random tiny model) every token costs about
    the same, and editing every held-out record moved the mean loss by only 5e-4.
    """
    return 1e-4 if config.training.dtype == "float32" else 2e-2


def _check_heldout(run: _Run, model: Any, heldout: TokenizedDataset, warnings: list[str]) -> list[str]:
    """The base model's held-out loss must be round 0's, and the adapter's should be the last round's.

    The first catches a changed held-out set (any record changes it). The second only warns: an
    adapter replaced after the run is still what gets attacked, but it is not what the run recorded.

    Raises:
        RunDataUnavailableError: the base model's loss differs from metrics.jsonl's round 0.
    """
    from secure_fedllm.training import evaluate

    config = run.config
    if config.evaluation.mode == "federated":
        return ["held-out losses not compared: under federated evaluation the run's recorded losses are noised"]
    tolerance = _loss_tolerance(config)
    batch = config.evaluation.batch_size
    with model.disable_adapter():
        base = evaluate(model, heldout, batch_size=batch).loss
    recorded = float(run.rows[0].eval_loss)
    if not math.isclose(base, recorded, rel_tol=tolerance):
        raise RunDataUnavailableError(
            f"--run {run.root}: the base model's loss on the re-derived held-out records is {base:.6f}, but the run "
            f"recorded {recorded:.6f} at round 0 (metrics.jsonl): the held-out records are not the run's (data "
            "source changed since the run) or the base model differs; restore the data the run used"
        )
    checks = [f"base model's held-out loss {base:.5f} equals round 0's recorded {recorded:.5f}"]
    final = float(run.rows[-1].eval_loss)
    adapted = evaluate(model, heldout, batch_size=batch).loss
    if math.isclose(adapted, final, rel_tol=tolerance):
        checks.append(f"released adapter's held-out loss {adapted:.5f} equals the last round's recorded {final:.5f}")
    else:
        warnings.append(
            f"the adapter in adapter/ gives held-out loss {adapted:.5f}, but the run recorded {final:.5f} after its "
            "last round: it is not the adapter this run released (replaced or edited since); the attacks below "
            "measure the adapter that is there now"
        )
    return checks


@dataclass
class _Samples:
    """Members and non-members for the membership attack, and what was left out of each."""

    members: list[TextRecord]
    nonmembers: list[TextRecord]
    members_available: int
    nonmembers_available: int
    excluded: dict[str, int]


def _text(record: TextRecord) -> tuple[str, str, str]:
    return (record.instruction, record.input, record.output)


def _distinct(
    records: Iterable[TextRecord],
    leave_out: Callable[[TextRecord], str | None],
    repeated: str,
    excluded: dict[str, int],
) -> tuple[list[TextRecord], set[tuple[str, str, str]]]:
    """The records `leave_out` keeps, each text once, counting every left-out record under its reason."""
    kept: list[TextRecord] = []
    seen: set[tuple[str, str, str]] = set()
    for record in records:
        reason = leave_out(record) or (repeated if _text(record) in seen else None)
        if reason is not None:
            excluded[reason] += 1
        else:
            seen.add(_text(record))
            kept.append(record)
    return kept, seen


def _samples(data: _Data, template: ChatTemplate, seed: int) -> _Samples:
    """Members (training records less canaries) and non-members (held-out), deduplicated, fitting, balanced.

    A record whose prompt alone fills data.max_length was dropped by the run (never trained on) and
    cannot be scored either; a non-member whose text equals a member's was effectively trained on;
    a text that occurs twice on one side counts once (the synthetic generator may ask the same
    question about a person twice, and equal scores are not independent samples); canary records
    are measured by exposure, not here. The larger side is subsampled (seeded) to the smaller, so
    AUC and TPR rest on equal counts.
    """
    canary_outputs = {c["prefix"] + c["secret"] for c in data.canaries}
    excluded = {"canary records": 0, "records data.max_length dropped": 0, "repeated training texts": 0,
                "repeated held-out texts": 0, "held-out records also in training": 0}  # fmt: skip

    def dropped(record: TextRecord) -> str | None:
        too_long = template.example(record.instruction, record.input, record.output) is None
        return "records data.max_length dropped" if too_long else None

    members, seen = _distinct(
        (r for records in data.clients for r in records),
        lambda r: "canary records" if r.output in canary_outputs else dropped(r),
        "repeated training texts",
        excluded,
    )
    nonmembers, _ = _distinct(
        data.heldout,
        lambda r: "held-out records also in training" if _text(r) in seen else dropped(r),
        "repeated held-out texts",
        excluded,
    )
    if not members or not nonmembers:
        raise RunDataUnavailableError(
            f"membership needs records on both sides: {len(members)} training and {len(nonmembers)} held-out records "
            "are left after leaving out canaries, duplicates and records data.max_length dropped; raise "
            "evaluation.heldout_records or data.max_length in a new run"
        )
    available = (len(members), len(nonmembers))
    rng = np.random.default_rng([seed, 16])
    n = min(available)
    if len(members) > n:
        members = [members[i] for i in sorted(rng.choice(len(members), size=n, replace=False).tolist())]
    if len(nonmembers) > n:
        nonmembers = [nonmembers[i] for i in sorted(rng.choice(len(nonmembers), size=n, replace=False).tolist())]
    return _Samples(members, nonmembers, available[0], available[1], {k: v for k, v in excluded.items() if v})


# ---------------------------------------------------------------------------------------------------------------
# Privacy: what the run's epsilon allows
# ---------------------------------------------------------------------------------------------------------------


def _fpr_label(fpr: float) -> str:
    return f"{fpr * 100:g}%"


def dp_auc_bound(epsilon: float, delta: float) -> float:
    """The largest AUC of any membership attack on an (epsilon, delta)-DP mechanism: the area under its trade-off curve.

    Integrates TPR <= min(1, e^eps FPR + delta, 1 - e^-eps (1 - delta - FPR)) over FPR in [0, 1]
    (Kairouz et al. 2015): 0.5 at epsilon 0 and delta 0, about 0.76 at epsilon 1, 1 - 1e-3 at epsilon 8.
    """
    if math.isinf(epsilon) or delta >= 1:
        return 1.0
    fpr = np.linspace(0.0, 1.0, 200_001)
    e = math.exp(min(epsilon, 700.0))
    tpr = np.minimum.reduce([np.ones_like(fpr), e * fpr + delta, 1.0 - (1.0 - delta - fpr) / e])
    return float(np.clip(np.trapezoid(np.clip(tpr, 0.0, 1.0), fpr), 0.5, 1.0))


def _tpr_bounds(epsilon: float, delta: float) -> dict[str, float]:
    if math.isinf(epsilon):
        return {_fpr_label(f): 1.0 for f in FPRS}
    return {_fpr_label(f): dp_tpr_bound(f, epsilon=epsilon, delta=min(delta, 1.0)) for f in FPRS}


def _tight_bounds(
    events: Sequence[Any], delta: float
) -> tuple[dict[str, float], float, tuple[tuple[float, ...], tuple[float, ...]]]:
    """TPR bounds at FPRS and the AUC bound from the client's whole privacy profile (PLD), not one (eps, delta).

    One (epsilon, delta) pair allows TPR e^eps x FPR + delta: at epsilon 8 that is 1 at 1% FPR, which
    says nothing; the profile of the same DP-SGD history bounds it far lower (`tradeoff.roc_bound`).
    """
    from .tradeoff import default_fpr_grid, roc_bound

    grid = np.union1d(default_fpr_grid(), np.linspace(0.0, 1.0, 2001))
    tpr = roc_bound(events, grid, delta=delta)
    bounds = {_fpr_label(f): float(np.interp(f, grid, tpr)) for f in FPRS}
    return bounds, float(np.clip(np.trapezoid(tpr, grid), 0.5, 1.0)), (tuple(grid.tolist()), tuple(tpr.tolist()))


def _unit_words(unit: str) -> str:
    return {"record": "one training record", "user": "one person (all of their records)",
            "client": "one client's whole data"}.get(unit, f"one {unit}")  # fmt: skip


def _client_privacy(run: _Run, datasets: list[TokenizedDataset], update: Callable[[int, int | None], None]
                    ) -> list[ClientPrivacy]:  # fmt: skip
    """Each client's epsilon (metrics.jsonl's last round), delta (its policy, from its N_i) and their bounds."""
    from secure_fedllm.federation import client_policy

    config = run.config
    privacy = config.privacy
    dimension = sum(math.prod(shape) for _, shape in run.sidecar.get("manifest", [])) or None
    last = run.rows[-1].epsilon
    out = []
    for c, dataset in enumerate(datasets):
        update(c, len(datasets))
        private = privacy.mechanism != "none"
        events: list[Any] = []
        if private:
            policy = client_policy(config, c, dataset.num_units, dimension=dimension)
            epsilon, delta = float(last.get(c, 0.0)), float(policy.delta)
            if privacy.mode == "local" and privacy.unit != "client" and policy.noise_multiplier > 0:
                from secure_fedllm.privacy import DPSGDEvent

                joins = sum(1 for row in run.rows if c in row.included)
                step = DPSGDEvent(
                    noise_multiplier=policy.noise_multiplier, sample_rate=policy.sample_rate, steps=policy.steps
                )
                events = [step] * joins
        else:
            epsilon, delta = math.inf, 0.0
        curve = None
        if events:  # the tight curve of this client's DP-SGD history
            bounds, auc_bound, curve = _tight_bounds(events, delta)
        else:  # no history to draw it from (distributed or client-level DP): the one-pair line
            bounds, auc_bound = _tpr_bounds(epsilon, delta), dp_auc_bound(epsilon, delta)
        out.append(
            ClientPrivacy(
                client=c,
                records=len(dataset.examples),
                units=dataset.num_units,
                epsilon=epsilon,
                delta=delta,
                unit=privacy.unit,
                neighbouring=privacy.neighbouring,
                tpr_bounds=bounds,
                auc_bound=auc_bound,
                bound_curve=curve,
                meaning=_privacy_meaning(epsilon, delta, privacy.unit, bounds, auc_bound, dataset.num_units),
            )
        )
    update(len(datasets), len(datasets))
    return out


def _privacy_meaning(epsilon: float, delta: float, unit: str, bounds: Mapping[str, float], auc_bound: float,
                     units: int) -> str:  # fmt: skip
    if math.isinf(epsilon):
        return "no differential privacy: nothing bounds what an attacker learns about this client's records"
    at1, at01 = bounds["1%"], bounds["0.1%"]
    words = (
        f"epsilon {epsilon:.3g} at delta {delta:.2g} for {_unit_words(unit)}: an attacker who wrongly accuses 1% of "
        f"non-members may catch at most {at1:.1%} of members ({at01:.1%} at 0.1%), and no attack can exceed AUC "
        f"{auc_bound:.3f}"
    )
    if at1 >= 0.999:
        words += "; at this epsilon the guarantee rules out no practical attack"
    elif at1 <= 0.05:
        words += "; a strong guarantee: a 1%-FPR attack can barely beat chance"
    if delta * units > 0:
        words += f"; delta x N_i = {delta * units:.2g} is the chance that some unit is not covered at all"
    return words


# ---------------------------------------------------------------------------------------------------------------
# Interpretation
# ---------------------------------------------------------------------------------------------------------------


_SCORE_WORDS = {
    "loss": "scoring each record by the adapter's loss on it",
    "zlib": "scoring by the adapter's loss over the text's zlib-compressed size",
    "min_k": "scoring by the record's least likely tokens, Min-K%",
    "reference": "scoring by the adapter's loss against the base model's, the strongest attack on a LoRA release",
}


def _membership_finding(report: ScoreReport, members: int, nonmembers: int,
                        guarantee: ClientPrivacy | None) -> MembershipFinding:  # fmt: skip
    auc = report.auc
    point = report.tpr_at_fpr
    low = report.tpr_at_low_fpr
    if auc.ci_low <= 0.5 <= auc.ci_high:
        verdict = (
            f"the released adapter does not separate this run's training records from its held-out records better "
            f"than chance at this sample size ({members} + {nonmembers} records); the interval still allows an AUC "
            f"up to {auc.ci_high:.2f}"
        )
    elif auc.ci_low > 0.5:
        verdict = (
            f"the released adapter does separate this run's training records from its held-out records: given one of "
            f"each, this score picks the training record {auc.value:.0%} of the time (chance 50%)"
        )
    else:
        verdict = (
            "below chance: training records look less likely than held-out ones under this score (the held-out "
            "records are easier for the model); no leak is shown"
        )
    tpr_words = (
        f"At a threshold that wrongly flags {point.target_fpr:.0%} of held-out records it flags {point.tpr:.1%} "
        f"[{point.tpr_ci_low:.1%}, {point.tpr_ci_high:.1%}] of training records (chance {point.target_fpr:.0%})"
    )
    if nonmembers * point.target_fpr < 1:
        tpr_words += (
            f"; with {nonmembers} held-out records that threshold allows no false positive at all, so this number "
            "is coarse"
        )
    consistent = None
    if guarantee is not None and not math.isinf(guarantee.epsilon):
        check = point.dp_consistency(epsilon=guarantee.epsilon, delta=guarantee.delta)
        # the client's privacy-profile bound at this FPR where it has one (never above the one-pair check's)
        bound = min(check.bound, guarantee.tpr_bounds.get(_fpr_label(point.target_fpr), check.bound))
        consistent = check.consistent and point.tpr_ci_low <= bound
        if consistent and bound >= 0.999:
            tpr_words += f"; epsilon {guarantee.epsilon:.3g} would allow up to {bound:.0%}, so it does not limit this"
        elif consistent:
            tpr_words += f"; within the bound {bound:.1%} that epsilon {guarantee.epsilon:.3g} allows"
        else:
            tpr_words += (
                f"; ABOVE the bound {bound:.1%} that epsilon {guarantee.epsilon:.3g} allows even at the "
                f"interval's ends: the run's privacy accounting or its implementation is broken (empirical epsilon >= "
                f"{check.epsilon_lower_bound:.2f})"
            )
    meaning = f"AUC {auc.value:.2f} [{auc.ci_low:.2f}, {auc.ci_high:.2f}], {_SCORE_WORDS[report.score]}: {verdict}. "
    return MembershipFinding(
        score=report.score,
        auc=auc.value,
        auc_ci=(auc.ci_low, auc.ci_high),
        tpr_at_1pct=point.tpr,
        tpr_at_1pct_ci=(point.tpr_ci_low, point.tpr_ci_high),
        tpr_at_01pct=low.tpr if low is not None else None,
        consistent_with_guarantee=consistent,
        meaning=meaning + tpr_words + ".",
    )


def _canary_finding(result: Any, client: int, guarantee: ClientPrivacy | None, unit: str) -> CanaryFinding:
    exposure = float(result.exposure)
    p_chance = 2.0**-exposure
    chance = expected_random_exposure(result.candidates)
    if guarantee is None or math.isinf(guarantee.epsilon):
        group_eps, group_delta = math.inf, 1.0
    elif result.repeats < 1:
        group_eps, group_delta = 0.0, 0.0
    else:
        group_eps, group_delta = canary_privacy_bound(
            guarantee.epsilon, guarantee.delta, result.repeats, unit="record" if unit == "record" else "user"
        )
    # DP caps Pr[rank <= r] for the trained model at e^eps x (its probability untrained, r / candidates) + delta
    finite = not math.isinf(group_eps) and group_eps <= 700
    p_bound = min(1.0, math.exp(group_eps) * p_chance + group_delta) if finite else 1.0
    bounds = _tpr_bounds(group_eps, group_delta)
    above = 1.0 - p_chance
    if exposure >= result.max_exposure - 1e-9:
        level = (
            f"the adapter ranks this secret first among all {result.candidates:,} candidates: it can be extracted by "
            "searching the secret space"
        )
    elif p_chance < CHANCE_LEVEL:
        level = (
            f"memorised: the adapter ranks the secret above {above:.1%} of random secrets, which a model that never "
            f"saw it does with probability {p_chance:.2g}"
        )
    else:
        level = (
            f"no evidence of memorisation: a model that never saw the secret reaches this exposure with probability "
            f"{p_chance:.2g} (chance level {chance:.2f} bits)"
        )
    if guarantee is None or math.isinf(guarantee.epsilon):
        cover = "no differential privacy covers it"
    elif result.repeats < 1:
        cover = "no copy was trained on (all held out): a control whose exposure should be at chance"
    else:
        if unit == "record" and result.repeats > 1:
            cover = (
                f"record-level epsilon {guarantee.epsilon:.3g} does not bound a canary repeated {result.repeats} "
                f"times: group privacy over its copies gives epsilon {group_eps:.3g}, delta {min(group_delta, 1.0):.2g}"
            )
        else:
            cover = f"covered as {_unit_words(unit)} by epsilon {group_eps:.3g}, delta {group_delta:.2g}"
        if p_bound >= 1.0:
            cover += ", which allows any exposure (e^epsilon x 2^-exposure >= 1)"
        else:
            cover += f", under which an exposure this high has probability at most {p_bound:.2g}"
            if p_bound < CHANCE_LEVEL:
                cover += ": so unlikely under the guarantee that the run's accounting or implementation is suspect"
    meaning = (
        f"exposure {exposure:.1f} bits of a possible {result.max_exposure:.1f} (rank {result.rank:,} of "
        f"{result.candidates:,}): {level}; {cover}"
    )
    return CanaryFinding(
        canary_id=result.canary_id,
        format_name=result.format_name,
        client=client,
        repeats=result.repeats,
        exposure=exposure,
        max_exposure=result.max_exposure,
        rank=result.rank,
        candidates=result.candidates,
        chance_exposure=chance,
        p_chance=p_chance,
        extrapolated_exposure=result.extrapolated_exposure,
        group_epsilon=group_eps,
        group_delta=min(group_delta, 1.0),
        p_bound=p_bound,
        tpr_bounds=bounds,
        meaning=meaning,
    )


# ---------------------------------------------------------------------------------------------------------------
# The evaluation
# ---------------------------------------------------------------------------------------------------------------


def evaluate_run(
    run_dir: str | Path,
    *,
    out: str | Path,
    seed: int = 0,
    progress: bool = True,
    stream: IO[str] | None = None,
    canary_references: int = MIN_REFERENCES,
) -> RunEvaluation:
    """Attack a finished run's released adapter and write report.md, results.json and roc.png to `out`.

    Args:
        run_dir: the folder `secure-fedllm run --out` wrote (finished: its adapter released).
        out: where the report goes (created; may not be the run folder, which stays as the run left it).
        seed: seed of the member subsample and of the canaries' reference secrets.
        progress: a progress bar per stage on a terminal, plain lines otherwise; False prints nothing.
        stream: where progress goes (default stdout).
        canary_references: reference secrets per canary format; fewer than 10,000 (which caps exposure at
            log2 of the count) is for tests.

    Raises:
        RunEvaluationError: not a finished run folder, or `out` inside it.
        RunDataUnavailableError: the run's training or held-out records cannot be recovered as the run used
            them (the message names what is missing and the fix).
    """
    started = time.perf_counter()
    log = _Progress(progress, stream)
    with contextlib.ExitStack() as stack:
        if not log.terminal:  # library progress bars (weight loading) only garble a log file
            from secure_fedllm.logs import quiet_libraries

            stack.enter_context(quiet_libraries())
        return _evaluate(Path(run_dir), Path(out), seed, log, canary_references, started)


def _evaluate(root: Path, out: Path, seed: int, log: _Progress, canary_references: int,
              started: float) -> RunEvaluation:  # fmt: skip
    from secure_fedllm import load_adapter

    seconds: dict[str, float] = {}
    if out.resolve() == root.resolve() or out.resolve().is_relative_to(root.resolve()):
        raise RunEvaluationError(f"--out {out}: inside the run folder {root}; give a folder outside it")
    run = _open_run(root)
    config = run.config
    log.line(f"run {root}: {config.model.name}, {config.federation.clients} clients, {config.federation.rounds} "
             f"rounds, privacy {config.privacy.mechanism} ({config.privacy.unit} level)")  # fmt: skip
    data = _recover_records(run)  # before the model: a missing file fails in a second, not after a load
    log.line("loading the released adapter and its base model")
    t = time.perf_counter()
    try:
        model, tokenizer = load_adapter(root)
    except FileNotFoundError as exc:
        raise RunEvaluationError(f"--run {root}: {exc}") from None
    model.eval()
    seconds["load"] = time.perf_counter() - t
    template = ChatTemplate(tokenizer, system_prompt=config.data.system_prompt, max_length=config.data.max_length)
    warnings: list[str] = []

    t = time.perf_counter()
    datasets = [TokenizedDataset.build(records, template) for records in data.clients]
    checks = [*data.checks, _check_counts(run, datasets)]
    with log.stage("checking the held-out records", "passes", 2) as update:
        server_heldout = TokenizedDataset.build(data.server_heldout, template)
        update(0, 2)
        checks += _check_heldout(run, model, server_heldout, warnings)
        update(2, 2)
    seconds["data"] = time.perf_counter() - t

    t = time.perf_counter()
    samples = _samples(data, template, seed)
    small = min(len(samples.members), len(samples.nonmembers)) < HEADLINE_MIN_SAMPLES
    membership_config = MembershipConfig(allow_small=small, seed=seed)
    total = len(samples.members) + len(samples.nonmembers)
    passes = 2 if "reference" in membership_config.scores else 1
    batches = passes * math.ceil(total / membership_config.batch_size)
    with log.stage("membership inference", "batches", batches) as update, _counting_forwards(model, update, batches):
        membership = MembershipInference(membership_config).run(model, template, samples.members, samples.nonmembers)
    seconds["membership"] = time.perf_counter() - t

    t = time.perf_counter()
    with log.stage("privacy bounds", "clients", len(datasets)) as update:
        clients = _client_privacy(run, datasets, update)
    worst = max(clients, key=lambda c: c.epsilon) if clients else None
    seconds["privacy"] = time.perf_counter() - t

    t = time.perf_counter()
    exposure, canary_findings = _canaries(data, model, template, seed, clients, config.privacy.unit, log, warnings,
                                          canary_references)  # fmt: skip
    seconds["canaries"] = time.perf_counter() - t

    findings_m = [
        _membership_finding(membership.reports[name], membership.members, membership.nonmembers,
                            worst if config.privacy.mechanism != "none" else None)
        for name in membership_config.scores
    ]  # fmt: skip
    summary = DataSummary(
        source=config.data.source if config.data.source == "synthetic" else f"{config.data.source}: {config.data.path}",
        training_records=sum(len(c) for c in data.clients),
        heldout_records=len(data.heldout),
        members_available=samples.members_available,
        nonmembers_available=samples.nonmembers_available,
        members=len(samples.members),
        nonmembers=len(samples.nonmembers),
        excluded=samples.excluded,
        checks=checks,
    )
    seconds["total"] = time.perf_counter() - started
    out.mkdir(parents=True, exist_ok=True)
    evaluation = RunEvaluation(
        run=str(root),
        out=str(out),
        report=str(out / "report.md"),
        results=str(out / "results.json"),
        seed=seed,
        base_model=str(run.sidecar.get("base_model", config.model.name)),
        privacy={
            "mechanism": config.privacy.mechanism,
            "mode": config.privacy.mode,
            "unit": config.privacy.unit,
            "neighbouring": config.privacy.neighbouring,
            "accountant": config.privacy.accountant,
            "target_epsilon": config.privacy.target_epsilon,
        },
        data=summary,
        clients=clients,
        membership=membership,
        membership_findings=findings_m,
        exposure=exposure,
        canaries=canary_findings,
        findings=[],
        warnings=warnings,
        seconds={k: round(v, 2) for k, v in seconds.items()},
    )
    evaluation.findings = _headlines(evaluation, small)
    _write(evaluation, config, small)
    log.line(f"report: {evaluation.report} ({seconds['total']:.0f} s)")
    return evaluation


def _canaries(
    data: _Data,
    model: Any,
    template: ChatTemplate,
    seed: int,
    clients: Sequence[ClientPrivacy],
    unit: str,
    log: _Progress,
    warnings: list[str],
    references: int,
) -> tuple[ExposureResult | None, list[CanaryFinding]]:
    """Exposure of every planted canary, with the number of copies that were actually trained on."""
    if not data.canaries:
        log.line("no canaries were planted in this run (only the synthetic source plants them): exposure skipped")
        return None, []
    records = [r for part in data.clients for r in part]
    probes = canary_probes(data.canaries, [*records, *data.heldout])
    trained = []
    for canary, probe in zip(data.canaries, probes, strict=True):
        copies = sum(r.output == canary["prefix"] + canary["secret"] for r in data.clients[int(canary["client"])])
        if copies != probe.repeats:
            warnings.append(
                f"canary {probe.canary_id}: planted x{probe.repeats}, {copies} copies in the training records "
                f"(the rest were held out by federated evaluation's split); judged as repeated {copies} times"
            )
        trained.append(probe.model_copy(update={"repeats": copies}))
    attack = CanaryExposure(
        CanaryExposureConfig(seed=seed, references_per_format=references, allow_small=references < MIN_REFERENCES)
    )
    takes_progress = "progress" in inspect.signature(attack.run).parameters
    with log.stage("canary exposure", "rows" if takes_progress else "forwards") as update:
        if takes_progress:
            result = attack.run(model, template, trained, progress=update)  # type: ignore[call-arg, unused-ignore]
        else:
            with _counting_forwards(model, update, None):
                result = attack.run(model, template, trained)
    by_client = {c.client: c for c in clients}
    findings = [
        _canary_finding(r, int(c["client"]), by_client.get(int(c["client"])), unit)
        for r, c in zip(result.canaries, data.canaries, strict=True)
    ]
    return result, findings


def _headlines(evaluation: RunEvaluation, small: bool) -> list[str]:
    """The few sentences at the top of the report: the strongest membership score, the canaries, the guarantee."""
    lines = []
    best = max(evaluation.membership_findings, key=lambda f: f.auc)
    lines.append(f"Membership ({best.score}, the strongest of {len(evaluation.membership_findings)} scores): "
                 f"{best.meaning}")  # fmt: skip
    if small:
        lines.append(
            f"Sample size: {evaluation.data.members} training and {evaluation.data.nonmembers} held-out records, "
            f"fewer than the {HEADLINE_MIN_SAMPLES:,} per side a headline number needs: the intervals are wide, and "
            "a small leak would go unseen (raise evaluation.heldout_records in the run for a sharper measurement)."
        )
    if evaluation.canaries:
        top = max(evaluation.canaries, key=lambda c: (c.repeats, c.exposure))
        lines.append(f"Canary {top.canary_id} (x{top.repeats}): {top.meaning}.")
        memorised = [c for c in evaluation.canaries if c.p_chance < CHANCE_LEVEL]
        lines.append(
            f"{len(memorised)} of {len(evaluation.canaries)} canaries show memorisation (an exposure a model that "
            f"never saw them reaches with probability below {CHANCE_LEVEL:g})."
        )
    clients = evaluation.clients
    if clients and not math.isinf(clients[0].epsilon):
        worst = max(clients, key=lambda c: c.epsilon)
        lines.append(f"Guarantee (client {worst.client}, the largest epsilon): {worst.meaning}.")
    elif clients:
        lines.append("No differential privacy: the numbers above are all that limits an attacker.")
    return lines


# ---------------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------------


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _fmt(value: float | None, digits: str = ".3g") -> str:
    if value is None:
        return "-"
    if math.isinf(value):
        return "inf"
    return format(value, digits)


def _write(evaluation: RunEvaluation, config: RunConfig, small: bool) -> None:
    out = Path(evaluation.out)
    payload = json_safe(evaluation.model_dump(mode="python"))
    payload["rows"] = [json_safe(r.model_dump()) for r in evaluation.rows()]
    Path(evaluation.results).write_text(json.dumps(payload, indent=1, allow_nan=False))
    plotted = _plot_roc(evaluation, out / "roc.png")
    Path(evaluation.report).write_text(_report(evaluation, config, small, plotted))


def _plot_roc(evaluation: RunEvaluation, path: Path) -> bool:
    """Empirical ROC of each score (log-log) beside the (epsilon, delta) bound of the largest epsilon."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib ships with the venv
        return False
    figure, axes = plt.subplots(figsize=(5.5, 4.5))
    floor = 1.0 / max(evaluation.data.nonmembers, 1)
    grid = np.logspace(math.log10(floor / 2), 0, 200)
    for name, report in evaluation.membership.reports.items():
        fpr, tpr = np.asarray(report.roc_fpr), np.asarray(report.roc_tpr)
        keep = fpr > 0
        axes.plot(fpr[keep], np.maximum(tpr[keep], floor / 2), label=f"{name} (AUC {report.auc.value:.2f})")
    axes.plot(grid, grid, "k:", label="chance")
    private = [c for c in evaluation.clients if not math.isinf(c.epsilon)]
    if private:
        worst = max(private, key=lambda c: c.epsilon)
        if worst.bound_curve is not None:
            bound = list(np.interp(grid, worst.bound_curve[0], worst.bound_curve[1]))
            label = f"bound at epsilon {worst.epsilon:.3g} (privacy profile)"
        else:
            bound = [dp_tpr_bound(float(f), epsilon=worst.epsilon, delta=min(worst.delta, 1.0)) for f in grid]
            label = f"bound at epsilon {worst.epsilon:.3g}"
        axes.plot(grid, bound, "r--", label=label)
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlabel("false-positive rate (held-out records flagged)")
    axes.set_ylabel("true-positive rate (training records flagged)")
    axes.set_title(f"membership on {Path(evaluation.run).name}: {evaluation.data.members} + "
                   f"{evaluation.data.nonmembers} records", fontsize=9)  # fmt: skip
    axes.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def _report(evaluation: RunEvaluation, config: RunConfig, small: bool, plotted: bool) -> str:
    data, privacy = evaluation.data, evaluation.privacy
    dp = (
        "no differential privacy"
        if privacy["mechanism"] == "none"
        else f"DP-SGD ({privacy['mode']}) at {privacy['unit']} level, target epsilon {privacy['target_epsilon']:g} "
        f"per client, accountant `{privacy['accountant']}`, {privacy['neighbouring']} neighbours"
    )
    lines = [
        f"# Attacks on run `{evaluation.run}`",
        "",
        f"The released adapter of this run (base `{evaluation.base_model}`, LoRA r={config.lora.r} "
        f"{config.lora.aggregation}, {config.federation.clients} clients, {config.federation.rounds} rounds; {dp}) "
        "attacked as anyone holding the adapter can attack it, with the run's own training records as members and "
        f"its held-out records as non-members. Seed {evaluation.seed}; {evaluation.seconds.get('total', 0):.0f} s.",
        "",
        "## In short",
        "",
        *[f"- {line}" for line in evaluation.findings],
        "",
    ]
    if evaluation.warnings:
        lines += ["## Warnings", "", *[f"- {w}" for w in evaluation.warnings], ""]
    lines += [
        "## What this run's epsilon allows",
        "",
        "Any attack on one privacy unit of an (epsilon, delta)-DP release has TPR <= min(1, e^epsilon x FPR + delta, "
        "1 - e^-epsilon (1 - delta - FPR)) (Kairouz et al. 2015); the largest AUC is the area under that curve. "
        "Epsilon per client is what its ledger had spent after the last round (metrics.jsonl); delta is its policy's.",
        "",
        "| client | records | units N_i | epsilon | delta | TPR bound at 1% FPR | at 0.1% FPR | AUC bound |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in evaluation.clients:
        lines.append(
            f"| {c.client} | {c.records} | {c.units} | {_fmt(c.epsilon)} | {_fmt(c.delta, '.2g')} | "
            f"{c.tpr_bounds['1%']:.3g} | {c.tpr_bounds['0.1%']:.3g} | {c.auc_bound:.3f} |"
        )
    lines.append("")
    by_meaning: dict[str, list[int]] = {}
    for c in evaluation.clients:
        by_meaning.setdefault(c.meaning, []).append(c.client)
    for meaning, ids in by_meaning.items():
        who = f"Client {ids[0]}" if len(ids) == 1 else f"Clients {', '.join(map(str, ids))}"
        lines.append(f"- {who}: {meaning}.")
    lines.append("")
    excluded = ", ".join(f"{v} {k}" for k, v in data.excluded.items()) or "none"
    lines += [
        "## Membership inference",
        "",
        f"Members: {data.members} of the run's {data.members_available} usable training records (of "
        f"{data.training_records}; subsampled, seeded, to the held-out count so both sides weigh the same). "
        f"Non-members: {data.nonmembers} of its {data.nonmembers_available} usable held-out records (of "
        f"{data.heldout_records}). Left out: {excluded}. Source: {data.source}.",
        "",
    ]
    if small:
        lines += [
            f"**Fewer than {HEADLINE_MIN_SAMPLES:,} records per side ({data.members} members, {data.nonmembers} "
            "non-members): the intervals below are wide.** An AUC interval of about +-"
            f"{1.96 * math.sqrt(1 / 12 * (1 / max(data.members, 1) + 1 / max(data.nonmembers, 1))):.2f} at chance "
            "means a leak smaller than that would not show; TPR at 1% FPR rests on a handful of held-out records.",
            "",
        ]
    lines += [
        "| score | AUC [95% CI] | TPR at 1% FPR [95% CI] | TPR at 0.1% FPR | what it means for this run |",
        "|---|---|---|---|---|",
    ]
    for f in evaluation.membership_findings:
        lines.append(
            f"| {f.score} | {f.auc:.3f} [{f.auc_ci[0]:.3f}, {f.auc_ci[1]:.3f}] | {f.tpr_at_1pct:.3f} "
            f"[{f.tpr_at_1pct_ci[0]:.3f}, {f.tpr_at_1pct_ci[1]:.3f}] | {_fmt(f.tpr_at_01pct)} | {f.meaning} |"
        )
    lines.append("")
    if plotted:
        lines += ["![membership ROC](roc.png)", ""]
    lines += ["## Canary exposure", ""]
    if not evaluation.canaries:
        lines += ["No canaries were planted in this run (only the synthetic source plants them).", ""]
    else:
        lines += [
            "Each planted secret is ranked among reference secrets of its format under the adapter, prompted as in "
            "training (Carlini et al. 2019): exposure = log2(candidates) - log2(rank). A model that never saw the "
            "secret ranks it uniformly: it reaches an exposure of e bits with probability 2^-e (expected about 1.44 "
            "bits). A DP guarantee (epsilon, delta) that covers the canary caps that probability at "
            "e^epsilon x 2^-e + delta.",
            "",
            "| canary | client | copies trained | exposure (bits) | of max | rank / candidates | P(this by chance) | "
            "covering epsilon | P bound under it | what it means for this run |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for k in evaluation.canaries:
            lines.append(
                f"| {k.canary_id} | {k.client} | {k.repeats} | {k.exposure:.2f} | {k.max_exposure:.1f} | "
                f"{k.rank:,} / {k.candidates:,} | {k.p_chance:.2g} | {_fmt(k.group_epsilon)} | {k.p_bound:.2g} | "
                f"{k.meaning} |"
            )
        lines.append("")
    lines += [
        "## How the records were recovered",
        "",
        *[f"- {check}" for check in data.checks],
        "",
        "## Files",
        "",
        "`results.json` (every number above, the per-record scores and the matrix rows), `report.md`, `roc.png`.",
        "",
    ]
    return "\n".join(lines)
