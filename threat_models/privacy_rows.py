"""The privacy rows: attacks on the adapter a federation releases, trained under each defense.

Why a positive control. Membership inference and canary exposure on a model that memorised
nothing show nothing about a defense: every row sits at chance. So the first row trains *without*
DP, for long enough that the model demonstrably memorises (x16 canaries ranked near the top of
10,000 reference secrets, or loss-based membership AUC well above 0.5), and every DP row trains
with exactly the same data, steps, learning rate, rank, target modules and adapter mode. The only
difference between rows is the noise (and, for the user-level row, the privacy unit), so whatever
the DP rows lose against the control is what DP removed.

What is attacked: the released adapter (secure aggregation does not protect what is released;
only DP does). Members are the training records (canary records excluded: they are duplicates),
non-members fresh records from the same generator. Canaries of one format share one prompt
(`data.canary_prompts = "shared"`), so each format's 10,000 reference secrets are scored once per
model. Held-out perplexity is reported in every row: a DP row that learned nothing is no defense.

What bounds what. Record-level (epsilon, delta) bounds a membership attacker's ROC (the tight
curve from the accountant's privacy profile is drawn beside the empirical one); it does not bound
a canary repeated k times, which is k units (group privacy: k * epsilon). The user-level row plants
every repeat of a canary in one person's records, and there (epsilon, delta) applies to the canary
itself.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from secure_fedllm import RunConfig
from secure_fedllm.data import ChatTemplate, TextRecord, synthesize_federation
from secure_fedllm.federation import client_policy, run
from secure_fedllm.models import load_base_model
from secure_fedllm.privacy import DPSGDEvent

from .attacks.canary_exposure import CanaryExposure, ExposureResult, canary_probes
from .attacks.membership import MembershipConfig, MembershipInference, MembershipResult, RecordStats
from .results import MatrixRow

__all__ = ["DEFENSES", "PrivacyDefense", "PrivacyPlan", "PrivacyRows", "bound_lines", "load_released", "privacy_rows"]

Progress = Callable[[str], None]


class PrivacyPlan(BaseModel):
    """The training every privacy row shares, and the attack samples.

    Only epochs (rounds x local steps) and the learning rate were raised to make the control
    memorise; rank, target modules and the adapter mode are the run defaults for every row.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    clients: int = Field(3, ge=1)
    records_per_client: int = Field(200, ge=1)
    rounds: int = Field(3, ge=1)
    local_steps: int = Field(8, ge=1)
    learning_rate: float = Field(0.02, gt=0)
    max_length: int = Field(64, ge=16)
    members: int = Field(500, ge=1, description="records per side of the membership attack")
    heldout_records: int = Field(64, ge=1)
    seed: int = 0
    allow_small: bool = Field(True, description="membership samples below 1,000 per side (wider intervals)")

    def overrides(self, model: str) -> list[str]:
        """The run-config settings common to every defense."""
        return [
            f'model.name="{model}"',
            f"federation.clients={self.clients}",
            f"federation.rounds={self.rounds}",
            f"federation.local_steps={self.local_steps}",
            f"federation.seed={self.seed}",
            f"data.records_per_client={self.records_per_client}",
            f"data.max_length={self.max_length}",
            "data.canary_prompts='shared'",
            f"training.learning_rate={self.learning_rate}",
            "evaluation.generations=0",
            f"evaluation.heldout_records={self.heldout_records}",
            "privacy.noise_seed=1",
            "secure_aggregation.protocol='secagg+'",
            # the malicious default with 3 clients (n_C = 1) needs t = 3 = n: it tolerates no dropout
            "secure_aggregation.dropout_rate=0.0",
        ]


@dataclass(frozen=True)
class PrivacyDefense:
    """One row of defenses: a label and the settings that differ from the control."""

    label: str
    settings: tuple[str, ...]
    unit: str = "record"

    @property
    def dp(self) -> bool:
        """Whether the row trains under DP (the control does not)."""
        return not any("mechanism='none'" in s for s in self.settings)


DEFENSES: tuple[PrivacyDefense, ...] = (
    PrivacyDefense("none", ("privacy.mechanism='none'",)),
    PrivacyDefense("dp-eps8", ("privacy.target_epsilon=8",)),
    PrivacyDefense("dp-eps1", ("privacy.target_epsilon=1",)),
    # persons hold 4 records (a canary's owner 4 + its repeats): 8 persons per batch keeps about the
    # record-level rows' 32 records per step
    PrivacyDefense(
        "dp-eps8-user",
        (
            "privacy.target_epsilon=8",
            "privacy.unit='user'",
            "privacy.user_field='person_id'",
            "privacy.expected_batch_size=8",
        ),
        unit="user",
    ),
)
"""The control, record-level DP at epsilon 8 and 1, and user-level DP at epsilon 8."""


@dataclass
class PrivacyRows:
    """Matrix rows of every defense, plus what the report draws and says about them."""

    rows: list[MatrixRow] = field(default_factory=list)
    utility: dict[str, float] = field(default_factory=dict)
    roc: dict[str, tuple[list[float], list[float]]] = field(default_factory=dict)
    events: dict[str, list[DPSGDEvent]] = field(default_factory=dict)
    epsilon: dict[str, tuple[float, float]] = field(default_factory=dict)
    exposures: dict[str, ExposureResult] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    control_memorised: bool = False
    notes: list[str] = field(default_factory=list)
    samples: tuple[list[TextRecord], list[TextRecord]] = field(default_factory=lambda: ([], []))
    """The membership attack's members and non-members (the same for every row)."""


def privacy_rows(
    model: str,
    plan: PrivacyPlan,
    work: Path,
    *,
    defenses: Sequence[PrivacyDefense] = DEFENSES,
    progress: Progress | None = None,
) -> PrivacyRows:
    """Train the federation once per defense and attack each released adapter.

    Args:
        model: the base model (`model.name`: the embedded default, a folder or a hub id).
        plan: data, steps and learning rate shared by every defense.
        work: scratch folder for the runs.
        defenses: which rows to train (the control first).
        progress: called with one line per stage.
    """
    say = progress or (lambda _line: None)
    out = PrivacyRows()
    federation = synthesize_federation(
        plan.clients, plan.records_per_client, seed=plan.seed, shared_canary_prompts=True
    )
    planted = {c.prefix + c.secret for c in federation.canaries}
    members_all = [
        TextRecord(r.instruction, r.input, r.output, unit="m")
        for client in federation.clients
        for r in client
        if r.output not in planted
    ]
    outsiders = synthesize_federation(1, plan.members, seed=plan.seed + 7_919, canary_repeats=())
    nonmembers = [TextRecord(r.instruction, r.input, r.output, unit="n") for r in outsiders.clients[0]]
    members = random.Random(plan.seed).sample(members_all, min(plan.members, len(members_all)))
    out.samples = (members, nonmembers)
    records = [r for client in federation.clients for r in client]
    probes = canary_probes(federation.canaries, records)
    reference: RecordStats | None = None
    for index, defense in enumerate(defenses, start=1):
        config = RunConfig().with_overrides([*plan.overrides(model), *defense.settings])
        started = time.perf_counter()
        say(f"privacy row {index}/{len(defenses)} ({defense.label}): training")
        result = run(config, out=work / f"run-{defense.label}", progress=False)
        out.utility[defense.label] = float(result.metrics[-1]["perplexity"])
        out.utility.setdefault("base model", float(result.metrics[0]["perplexity"]))
        released, tokenizer = load_released(config, result.adapter)
        template = ChatTemplate(tokenizer, system_prompt=config.data.system_prompt, max_length=config.data.max_length)
        say(f"privacy row {index}/{len(defenses)} ({defense.label}): membership inference")
        attack = MembershipInference(MembershipConfig(allow_small=plan.allow_small))
        if reference is None:  # the base model's statistics: the same for every row
            with released.disable_adapter():
                reference = attack.record_stats(released, template, [*members, *nonmembers])
        mia = attack.run(released, template, members, nonmembers, reference_stats=reference)
        out.rows.extend(r.model_copy(update={"defense": defense.label}) for r in mia.rows())
        loss = mia.reports["loss"]
        out.roc[defense.label] = (list(loss.roc_fpr), list(loss.roc_tpr))
        say(f"privacy row {index}/{len(defenses)} ({defense.label}): canary exposure")
        exposure = CanaryExposure().run(released, template, probes)
        out.exposures[defense.label] = exposure
        out.rows.extend(r.model_copy(update={"defense": defense.label}) for r in exposure.rows())
        out.rows.append(
            MatrixRow(
                attack="utility", defense=defense.label, metric="heldout_perplexity", value=out.utility[defense.label]
            )
        )
        if defense.dp:
            out.events[defense.label], out.epsilon[defense.label] = _events(config, result)
        out.seconds[defense.label] = time.perf_counter() - started
        if defense.label == "none":
            out.control_memorised = _memorised(mia, exposure)
        del released
    if not out.control_memorised:
        out.notes.append(
            "The non-DP control did NOT memorise (x16 exposure < 10 bits and membership AUC < 0.70): the DP rows "
            "below show nothing about the defense; raise PrivacyPlan.rounds, local_steps or learning_rate."
        )
    return out


def _memorised(mia: MembershipResult, exposure: ExposureResult) -> bool:
    """The issue's success criteria for the positive control: either memorisation signal suffices."""
    x16 = [c.exposure for c in exposure.canaries if c.repeats == 16]
    return (bool(x16) and max(x16) >= 10.0) or mia.reports["loss"].auc.value >= 0.70


def _events(config: RunConfig, result: Any) -> tuple[list[DPSGDEvent], tuple[float, float]]:
    """Client 0's DP-SGD history (every client has the same N_i here) and its (epsilon, delta) as spent."""
    policy = client_policy(config, 0, _units_of_client0(config))
    joins = min(config.federation.rounds, config.privacy.max_participations or config.federation.rounds)
    events = [
        DPSGDEvent(noise_multiplier=policy.noise_multiplier, sample_rate=policy.sample_rate, steps=policy.steps)
        for _ in range(joins)
    ]
    return events, (float(result.epsilons[0]), policy.delta)


def _units_of_client0(config: RunConfig) -> int:
    from secure_fedllm.data import load_federation_data

    data = load_federation_data(config)
    if config.privacy.unit == "user":
        return len({r.unit for r in data.clients[0]})
    return len(data.clients[0])


def load_released(run_config: RunConfig, adapter: Path) -> tuple[Any, Any]:
    """The run's base model with its released adapter, and the tokenizer."""
    from peft import PeftModel

    base, tokenizer = load_base_model(run_config.model)
    return PeftModel.from_pretrained(base, adapter), tokenizer


def bound_lines(rows: PrivacyRows) -> list[str]:
    """What each DP row's (epsilon, delta) bounds, in words, for the report."""
    lines = []
    for label, (epsilon, delta) in rows.epsilon.items():
        unit = "person" if label.endswith("-user") else "record"
        lines.append(
            f"{label}: (epsilon {epsilon:.2f}, delta {delta:.2g}) per {unit}; a canary repeated k times is "
            + (
                "covered by it (all repeats are one person)."
                if unit == "person"
                else f"covered only at k * epsilon (x16: {16 * epsilon:.0f}), which bounds nothing."
            )
        )
    return lines
