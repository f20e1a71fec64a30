"""`secure-fedllm run --dry-run`: what each client would spend and how its data fits, before any training.

A first run should not take an hour to reveal that `data.max_length` cut most records, or that a
small client's noise is far above the others'. The dry run loads the configuration, the tokenizer
(the model too, only under `privacy.mode = "distributed"`, whose calibration depends on the
adapter's length) and the data, tokenizes every client's records as the run would, and derives
each client's policy through the run's own path (`plan.client_policy`, then
`evaluation.policy_with_evaluation`, as `federation.make_client` does). The expected epsilon is the
composition the client's ledger would hold after its K joins (and, with federated evaluation, its
rounds + 1 evaluations), computed by `PrivacyLedger.epsilon_of` on a ledger that is never written.
Nothing is trained, no run folder and no site state folder is written.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..config import RunConfig
from ..data.tokenized import LengthStats, TokenizedDataset

__all__ = ["DryRun", "DryRunRow", "dry_run", "format_dry_run"]


@dataclass(frozen=True)
class DryRunRow:
    """One client as the run would set it up: its data, its calibrated policy and what it would spend."""

    client: int
    records: int
    """Records given to the client (before any is dropped)."""
    truncated: int
    """Records kept with their response cut by data.max_length."""
    dropped: int
    """Records dropped: the prompt alone fills data.max_length."""
    units: int
    """N_i: the privacy units left (what q_i and delta refer to)."""
    sample_rate: float
    noise_multiplier: float
    steps: int
    """DP-SGD steps per joined round."""
    joins: int
    """K = min(rounds, max_participations): the joins the noise is calibrated for."""
    evaluations: int
    """Federated evaluations charged to the client's ledger (0 unless evaluation.mode = 'federated')."""
    delta: float
    epsilon: float
    """The epsilon the client's ledger holds after `joins` joins and `evaluations` evaluations of this job."""
    budget: float
    private: bool


@dataclass(frozen=True)
class DryRun:
    """Every client's row, the length statistics of all clients and of the held-out set, and the warning."""

    config: RunConfig
    rows: list[DryRunRow]
    stats: LengthStats
    heldout: LengthStats | None = None
    warning: str | None = None
    dimension: int | None = None
    """The adapter's aggregated length, when the model was loaded (distributed mode only)."""
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: rows, totals and the warning."""
        return {
            "clients": [{**asdict(r), "budget": r.budget if math.isfinite(r.budget) else None} for r in self.rows],
            "records": self.stats.records,
            "truncated": self.stats.truncated,
            "dropped": self.stats.dropped,
            "length_p95": self.stats.percentile(95.0),
            "max_length": self.stats.max_length,
            "suggested_max_length": self.stats.suggested_max_length(),
            "heldout": None
            if self.heldout is None
            else {
                "records": self.heldout.records,
                "truncated": self.heldout.truncated,
                "dropped": self.heldout.dropped,
            },
            "warning": self.warning,
            "dimension": self.dimension,
        }


def dry_run(config: RunConfig) -> DryRun:
    """Set up every client of `config` as a run would (data, tokenization, policy) and report it; train nothing.

    Raises:
        ConfigError: whatever the run would refuse before training: a setting the sites refuse, a model
            or data that cannot be loaded, a client with no record that fits data.max_length, a policy
            that cannot be calibrated.
    """
    from ..site import check_setting
    from .evaluation import EvaluationSettings, policy_with_evaluation, site_split
    from .plan import client_policy
    from .runner import check_data_fits

    check_setting(config)
    distributed = config.privacy.mode == "distributed" and config.privacy.mechanism != "none"
    dimension: int | None = None
    if distributed:  # the calibration needs the adapter's length: build the job as the run does
        from .federation import Job

        job = Job.build(config)
        template, loaded, dimension = job.template, job.data, job.manifest.dimension
        clients, heldout_records = loaded.clients, loaded.heldout
    else:
        from ..data import ChatTemplate, load_federation_data
        from ..models import load_tokenizer

        tokenizer = load_tokenizer(config.model)
        template = ChatTemplate(tokenizer, system_prompt=config.data.system_prompt, max_length=config.data.max_length)
        loaded = load_federation_data(config)
        clients, heldout_records = loaded.clients, loaded.heldout
        if config.evaluation.mode == "federated":
            clients = [site_split(config, records)[0] for records in clients]
    datasets = [TokenizedDataset.build(records, template) for records in clients]
    heldout = TokenizedDataset.build(heldout_records, template)
    warnings_seen: list[str] = []
    check_data_fits(config, datasets, heldout, warn=lambda message, _category: warnings_seen.append(message))
    federated = config.evaluation.mode == "federated"
    evaluations = config.federation.rounds + 1 if federated else 0
    rows = []
    for client, data in enumerate(datasets):
        policy = policy_with_evaluation(client_policy(config, client, data.num_units, dimension=dimension), config)
        epsilon = 0.0
        if policy.private:
            event = policy.event()
            assert event is not None
            planned = [event] * policy.max_participations
            if federated:
                planned += [EvaluationSettings.of(config).event()] * evaluations
            epsilon = _ledger(config, client, policy.epsilon_budget, policy.delta).epsilon_of(planned)
        assert data.stats is not None
        rows.append(
            DryRunRow(
                client=client,
                records=data.stats.records,
                truncated=data.stats.truncated,
                dropped=data.stats.dropped,
                units=data.num_units,
                sample_rate=policy.sample_rate,
                noise_multiplier=policy.noise_multiplier,
                steps=policy.steps,
                joins=policy.max_participations,
                evaluations=evaluations if policy.private else 0,
                delta=policy.delta,
                epsilon=epsilon,
                budget=policy.epsilon_budget,
                private=policy.private,
            )
        )
    stats = LengthStats.combine([d.stats for d in datasets if d.stats is not None])
    notes = []
    cohort = config.federation.clients_per_round
    if cohort is not None and cohort < config.federation.clients:
        notes.append(
            f"{cohort} of {config.federation.clients} clients per round: a client spends the epsilon above only if "
            "it is sampled for all its K joins; fewer joins spend less"
        )
    return DryRun(
        config,
        rows,
        stats,
        heldout.stats,
        warning=warnings_seen[0] if warnings_seen else None,
        dimension=dimension,
        notes=notes,
    )


def _ledger(config: RunConfig, client: int, budget: float, delta: float) -> Any:
    """A ledger of the run's accountant and relation that is read, never written (its path is never opened)."""
    from ..privacy import PrivacyLedger

    return PrivacyLedger(
        Path(os.devnull),
        client=client,
        epsilon_budget=budget,
        delta=delta,
        accountant=config.privacy.accountant,
        neighbouring=config.privacy.neighbouring,
    )


def _percent(part: int, whole: int) -> str:
    return f"{part / whole:.0%}" if whole else "-"


def format_dry_run(plan: DryRun) -> str:
    """The dry run as a table, one line per client, plus totals, the warning and what to change."""
    config = plan.config
    privacy, fed = config.privacy, config.federation
    if privacy.mechanism == "none":
        privacy_text = "no DP (not private)"
    else:
        privacy_text = (
            f"{privacy.mechanism} ({privacy.mode}, {privacy.unit}-level, {privacy.accountant}, "
            f"{privacy.neighbouring}), target epsilon {privacy.target_epsilon} per client"
        )
    lines = [
        f"dry run: {fed.clients} clients, {fed.rounds} rounds, {config.secure_aggregation.protocol}, {privacy_text}, "
        f"data.max_length={config.data.max_length}",
        "",
    ]
    header = ("client", "records", "truncated", "dropped", "N_i", "q_i", "noise", "steps", "joins", "delta",
              "epsilon")  # fmt: skip
    table: list[Sequence[str]] = [header]
    for r in plan.rows:
        table.append(
            (
                str(r.client),
                str(r.records),
                f"{r.truncated} ({_percent(r.truncated, r.records)})",
                f"{r.dropped} ({_percent(r.dropped, r.records)})",
                str(r.units),
                f"{r.sample_rate:.4g}",
                f"{r.noise_multiplier:.4f}" if r.private else "-",
                str(r.steps),
                str(r.joins) + (f"+{r.evaluations} eval" if r.evaluations else ""),
                f"{r.delta:.3g}",
                f"{r.epsilon:.4f}" if r.private else "none",
            )
        )
    s = plan.stats
    total = ("all", str(s.records), f"{s.truncated} ({_percent(s.truncated, s.records)})",
             f"{s.dropped} ({_percent(s.dropped, s.records)})", str(sum(r.units for r in plan.rows)))  # fmt: skip
    table.append((*total, *[""] * (len(header) - len(total))))
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        lines.append("  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    lines.append("")
    lines.append(
        f"record lengths (prompt + response + end of turn): 95% at most {s.percentile(95.0)} tokens, longest "
        f"{max(s.lengths, default=0)}; data.max_length={s.max_length}"
    )
    if plan.heldout is not None:
        h = plan.heldout
        lines.append(
            f"server held-out set: {h.records} records, {h.truncated} truncated, {h.dropped} dropped "
            "(evaluation.heldout_records)"
        )
    if any(r.private for r in plan.rows):
        lines.append(
            "epsilon: what each client's ledger holds after its K joins"
            + (" and its federated evaluations" if any(r.evaluations for r in plan.rows) else "")
            + f" of this job (budget {plan.rows[0].budget:g}); a site's earlier jobs add to it"
        )
    if plan.dimension is not None:
        lines.append(f"adapter: {plan.dimension:,} aggregated parameters")
    lines += plan.notes
    if plan.warning is not None:
        lines.append(f"warning: {plan.warning}")
    lines.append("dry run: nothing was trained or written; drop --dry-run to run")
    return "\n".join(lines)
