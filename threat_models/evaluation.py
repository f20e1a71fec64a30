"""The attack x defense matrix: `secure-fedllm evaluate`.

Privacy rows (`privacy_rows`): the released adapter of a federation trained without DP (the
positive control, trained until it memorises), with record-level DP-SGD at epsilon 8 and 1, and
with user-level DP at epsilon 8, all with the same data, steps and learning rate; attacked by
membership inference (loss, zlib, Min-K%, base-model reference) and canary exposure, with held-out
perplexity in every row and the ROC bound implied by each run's privacy profile. The DP audit trains
for real with 2,000 Dirac gradient canaries (`dp_audit_training`), with a clip-only and an
under-noised control. Token recovery reads realistic client updates (`token_recovery_rows`).
Protocol rows: a malicious server against our sessions and against weakened controls (model
inconsistency, dropout forging, key substitution, Sybil, replay, forged share, the HE decryption
oracle, and on real Flower nodes rerun, downgrade and Sybil roster), and a malicious client's
backdoor through SecAgg+.

`--quick` runs everything on a tiny random LLaMA (minutes on 2 cores): the mechanics are real, the
model memorises nothing. The default runs the privacy rows and token recovery on the embedded
SmolLM2 (or `--model`); the protocol rows work on vectors and the backdoor and the audit on the tiny
model whatever the model, labelled as such.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from secure_fedllm import RunConfig
from secure_fedllm.data import ChatTemplate
from secure_fedllm.federation import run
from secure_fedllm.tiny_model import save_tiny_llama

from .attacks.backdoor import Backdoor, BackdoorConfig
from .attacks.downgrade import Downgrade, DowngradeConfig
from .attacks.dp_audit import DPAuditConfig
from .attacks.dp_audit_distributed import DistributedAudit, DistributedAuditConfig
from .attacks.dropout_forging import DropoutForging, DropoutForgingConfig
from .attacks.forged_share import ForgedShare, ForgedShareConfig
from .attacks.he_oracle import HEOracle, HEOracleConfig
from .attacks.key_substitution import KeySubstitution, KeySubstitutionConfig
from .attacks.membership import MembershipConfig, MembershipInference
from .attacks.model_inconsistency import ModelInconsistency, ModelInconsistencyConfig
from .attacks.replay import Replay, ReplayConfig
from .attacks.rerun import Rerun, RerunConfig
from .attacks.sybil import Sybil, SybilConfig
from .attacks.sybil_roster import SybilRoster, SybilRosterConfig
from .privacy_rows import PrivacyPlan, PrivacyRows, bound_lines, load_released, privacy_rows
from .report import write_evaluation
from .results import MatrixRow

__all__ = ["EvaluationConfig", "EvaluationResult", "evaluate"]

DISTRIBUTED_EPSILONS: tuple[float, ...] = (8.0, 1.0)
"""Epsilons of the distributed-DP defense rows (`privacy.mode = "distributed"`, full SecAgg; --quick only)."""

Progress = Callable[[str], None]


class EvaluationConfig(BaseModel):
    """What the evaluation runs."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    quick: bool = Field(False, description="a tiny random LLaMA for everything (minutes)")
    model: str | None = Field(
        None, description="base model of the privacy rows: 'embedded' (default), a folder or a hub id"
    )
    seed: int = 0


@dataclass
class EvaluationResult:
    """The matrix rows, utility and where the report went."""

    rows: list[MatrixRow]
    utility: dict[str, float]
    report: Path
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """Headline values per (attack, metric, defense)."""
        return {f"{r.attack}/{r.metric}/{r.defense}": round(r.value, 4) for r in self.rows}


def _model_name(config: EvaluationConfig, work: Path) -> str:
    if config.model is None and config.quick:
        return str(save_tiny_llama(work / "tiny-llama", seed=config.seed))
    if config.model in (None, "embedded"):
        from secure_fedllm.config import EMBEDDED_MODEL

        return EMBEDDED_MODEL
    return config.model


def _privacy_plan(config: EvaluationConfig) -> PrivacyPlan:
    if config.quick:  # a random model memorises nothing: the mechanics at a sample size with narrow intervals
        return PrivacyPlan(
            records_per_client=400, rounds=2, local_steps=30, max_length=256, members=1000, seed=config.seed,
            allow_small=False,
        )  # fmt: skip
    return PrivacyPlan(seed=config.seed)


def evaluate(config: EvaluationConfig, *, out: str | Path, progress: Progress | None = None) -> EvaluationResult:
    """Run the matrix and write results.json, report.md and the plots to `out`."""
    say = progress or (lambda _line: None)
    started = time.perf_counter()
    out = Path(out)
    work = Path(tempfile.mkdtemp(prefix="secure-fedllm-eval-"))
    model = _model_name(config, work)
    tiny = model if config.quick and config.model is None else str(save_tiny_llama(work / "tiny", seed=config.seed))
    seconds: dict[str, float] = {}
    notes: list[str] = []

    rows: list[MatrixRow] = []
    stage = time.perf_counter()
    say("DP audit from real training (tiny model)")
    from .attacks.dp_audit_training import training_audit_rows

    audit_label = "" if config.quick and config.model is None else " (tiny model)"
    audited = training_audit_rows(tiny, seed=config.seed)
    rows.extend(r.model_copy(update={"defense": r.defense + audit_label}) for r in audited)
    rows.extend(_distributed_audit_rows(config.seed))
    seconds["DP audit"] = time.perf_counter() - stage

    stage = time.perf_counter()
    say("protocol attacks")
    rows.extend(_protocol_rows(config.seed, notes))
    seconds["protocol attacks"] = time.perf_counter() - stage

    stage = time.perf_counter()
    say("backdoor (tiny model)")
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model, short sequences: one thread is fastest
    try:
        backdoor = BackdoorConfig.quick(seed=config.seed) if config.quick else BackdoorConfig(seed=config.seed)
        label = "" if config.quick and config.model is None else " (tiny model)"
        rows.extend(r.model_copy(update={"defense": r.defense + label}) for r in Backdoor(backdoor).run(tiny).rows())
    finally:
        torch.set_num_threads(previous)
    seconds["backdoor"] = time.perf_counter() - stage

    stage = time.perf_counter()
    say("token recovery")
    from .token_recovery_rows import realistic_token_recovery

    rows.extend(realistic_token_recovery(model, seed=config.seed))
    seconds["token recovery"] = time.perf_counter() - stage

    # the privacy rows last: the hour-long part starts once everything else has run
    stage = time.perf_counter()
    plan = _privacy_plan(config)
    privacy = privacy_rows(model, plan, work, progress=say)
    rows = [*privacy.rows, *rows]
    utility = dict(privacy.utility)
    roc = dict(privacy.roc)
    seconds["privacy rows"] = time.perf_counter() - stage
    notes += privacy.notes

    if config.quick:
        stage = time.perf_counter()
        say("distributed-DP rows")
        rows.extend(_distributed_rows(model, plan, work, privacy, utility, roc))
        seconds["distributed-DP rows"] = time.perf_counter() - stage

    notes += _NOTES + bound_lines(privacy)
    if config.quick:
        notes.append("--quick: a tiny random LLaMA; the mechanics are real, the model memorises nothing.")
    else:
        notes.append(
            "Distributed-DP rows are in --quick only: with one DP step per round, a SmolLM2 run at the privacy rows' "
            "steps takes 24 full-SecAgg rounds with an evaluation each, beyond this evaluation's hour."
        )
    seconds["total"] = time.perf_counter() - started
    setting = {
        "model": "tiny random LLaMA" if config.quick and config.model is None else model,
        "clients": plan.clients,
        "records_per_client": plan.records_per_client,
        "rounds": plan.rounds,
        "local_steps": plan.local_steps,
        "learning_rate": plan.learning_rate,
        "membership_sample": plan.members,
        "seed": config.seed,
        "control_memorised": privacy.control_memorised,
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
    }
    report = write_evaluation(
        out, rows, setting=setting, roc_curves=roc, utility=_ordered(utility), notes=notes,
        roc_bounds=_roc_bounds(privacy),
    )  # fmt: skip
    return EvaluationResult(rows, utility, report, seconds["total"], extra={"seconds": seconds})


_NOTES = [
    "Membership inference and canary exposure read the released adapter: secure aggregation does not change "
    "them; only DP does. The none row is the positive control: trained without DP until it memorises, with the "
    "same data, steps and learning rate as every DP row.",
    "A canary repeated k times is k records: record-level epsilon bounds it only at k * epsilon (group privacy); "
    "the dp-eps8-user row plants all repeats in one person's records, where epsilon bounds the canary itself.",
    "Token recovery reads what the server receives: one client's multi-step update without secure aggregation, "
    "only the sum of 4 clients with SecAgg+, and a DP-SGD update at epsilon 8.",
    "The DP audit is the one-run lower bound (Steinke, Nasr, Jagielski 2023) from real DP-SGD training of the tiny "
    "model (2 clients, 2 rounds of one step at q = 1) with 2,000 Dirac gradient canaries on distinct lora_B "
    "coordinates, clipped, noised and counted like records; the auditor sees only the released per-round sums, at "
    "delta 1e-6 (x 2,000 canaries = 0.002). It must stay below the accountant's epsilon at the same delta; the "
    "clip-only row must reach 3 and the sigma/4 row (epsilon 1 declared) must exceed 1.",
    "A malicious client's boosted backdoor stays inside its own encoder's public clip range and implants through "
    "SecAgg+: the server sees only the sum and can neither bound nor remove it. A server-visible defense needs "
    "zero-knowledge proofs of each masked input's norm (RoFL, EIFFeL).",
    "Distributed DP rows: the adapters of privacy.mode='distributed' runs (full SecAgg, Skellam shares sized for "
    "h = n - n_C - d_max) under the same attacks; their audit runs the mechanism's own code on 5,000 Dirac "
    "canaries through real SecAgg sessions (q = 1, one step), and its control draws every share at sigma/4 "
    "with epsilon 1 declared: that row must exceed 1.",
]


def _ordered(utility: dict[str, float]) -> dict[str, float]:
    first = ["base model", "none"]
    return {k: utility[k] for k in [*first, *sorted(k for k in utility if k not in first)] if k in utility}


def _roc_bounds(privacy: PrivacyRows) -> dict[str, tuple[list[float], list[float]]]:
    """Each DP row's best-attacker ROC from its privacy profile (add/remove: the membership game itself)."""
    from .tradeoff import default_fpr_grid, roc_bound

    fpr = default_fpr_grid()
    return {
        label: (fpr.tolist(), roc_bound(events, fpr, delta=privacy.epsilon[label][1]).tolist())
        for label, events in privacy.events.items()
        if events and events[0].noise_multiplier > 0
    }


def _distributed_rows(
    model: str,
    plan: PrivacyPlan,
    work: Path,
    privacy: PrivacyRows,
    utility: dict[str, float],
    roc: dict[str, tuple[list[float], list[float]]],
) -> list[MatrixRow]:
    """Membership rows on the adapters of distributed-DP runs (the same DP steps per client, one per round)."""
    rows: list[MatrixRow] = []
    for epsilon in DISTRIBUTED_EPSILONS:
        steps = plan.rounds * plan.local_steps
        config = RunConfig().with_overrides(
            [*plan.overrides(model), f"privacy.target_epsilon={epsilon}", "privacy.mode='distributed'",
             "secure_aggregation.protocol='secagg'", f"federation.rounds={steps}", "federation.local_steps=1"]
        )  # fmt: skip
        label = f"distributed-dp-eps{epsilon:g}"
        result = run(config, out=work / f"run-{label}", progress=False)
        utility[label] = float(result.metrics[-1]["perplexity"])
        released, tokenizer = load_released(config, result.adapter)
        template = ChatTemplate(tokenizer, system_prompt="", max_length=config.data.max_length)
        members, nonmembers = privacy.samples
        mia = MembershipInference(MembershipConfig(allow_small=plan.allow_small)).run(
            released, template, members, nonmembers
        )
        rows.extend(row.model_copy(update={"defense": label}) for row in mia.rows())
        roc[label] = (list(mia.reports["loss"].roc_fpr), list(mia.reports["loss"].roc_tpr))
    return rows


def _distributed_audit_rows(seed: int) -> list[MatrixRow]:
    """The one-run audit of distributed DP's released sums, with its under-noised control."""
    rows: list[MatrixRow] = []
    # one-run audit of distributed DP's released sums (the mechanism's own code, real SecAgg sessions), with the
    # under-noised control (shares at sigma/4, declared epsilon 1) that must exceed its declared epsilon
    for epsilon, scale in ((8.0, 1.0), (1.0, 1.0), (1.0, 0.25)):
        audited = DistributedAudit(
            DistributedAuditConfig(
                audit=DPAuditConfig(num_canaries=5000, seed=seed, delta=1e-5),
                target_epsilon=epsilon,
                noise_scale=scale,
            )
        ).run()
        label = f"distributed-dp-eps{epsilon:g}" + (" shares at sigma/4 (control)" if scale != 1.0 else "")
        rows.extend(r.model_copy(update={"defense": label}) for r in audited.rows())
    return rows


def _protocol_rows(seed: int, notes: list[str]) -> list[MatrixRow]:
    """A malicious server against our sessions and against weakened controls (vectors, no model)."""
    rows: list[MatrixRow] = []
    # a malicious server isolating one client's update inside the sum
    target = np.random.default_rng(seed).normal(0, 0.02, 4096)
    attack = ModelInconsistency(ModelInconsistencyConfig(num_clients=5))
    for bound, label in ((False, "secagg+ without binding"), (True, "secagg+")):
        rows.extend(r.model_copy(update={"defense": label}) for r in attack.run(target, bound=bound).rows())

    # a malicious server splitting the survivor set to unmask one client
    forging = DropoutForging(DropoutForgingConfig(num_clients=7))
    updates = [np.random.default_rng(seed + i).normal(0, 0.02, 4096) for i in range(7)]
    for defended, label in ((False, "secagg semi-honest, t=n/2"), (True, "secagg malicious setting")):
        rows.extend(r.model_copy(update={"defense": label}) for r in forging.run(updates, defended=defended).rows())

    # key substitution, Sybil enrolment and replay: leak against the weakened control, abort against ours
    updates5 = updates[:5]
    for defended, label in ((False, "secagg semi-honest"), (True, "secagg malicious setting")):
        got = KeySubstitution(KeySubstitutionConfig(num_clients=5)).run(updates5, defended=defended)
        rows.extend(r.model_copy(update={"defense": label}) for r in got.rows())
        sybil = Sybil(SybilConfig(num_clients=5, seed=seed)).run(updates[0], defended=defended)
        rows.extend(r.model_copy(update={"defense": label}) for r in sybil.rows())
    sybil = Sybil(SybilConfig(num_clients=5, seed=seed, server_controls_pki=True)).run(updates[0], defended=True)
    rows.extend(r.model_copy(update={"defense": "secagg malicious, PKI run by the server"}) for r in sybil.rows())
    later = [u + np.random.default_rng(seed + 99).normal(0, 0.01, u.shape) for u in updates5]
    for defended, label in ((False, "unbound round, keys reused (modelled)"), (True, "secagg malicious setting")):
        replayed = Replay(ReplayConfig(num_clients=5)).run(updates5, later, defended=defended)
        rows.extend(r.model_copy(update={"defense": label}) for r in replayed.rows())
    rows.extend(_forged_share_and_he_oracle(seed))
    rows.extend(_server_against_nodes(seed, notes))
    return rows


def _forged_share_and_he_oracle(seed: int) -> list[MatrixRow]:
    """A malicious share holder forging one share, and the HE decryption oracle: ours vs the weakened control.

    Forged share: one survivor returns a forged share of the target's self-mask seed, once with
    exactly t responders (the attack: nothing is left to cross-check) and once with one spare (where
    ours completes the round and names the forger). HE oracle: the server binary-searches 4 of the
    target's quantized words through a non-releasing client's replies to crafted aggregates.
    """
    rng = np.random.default_rng(seed + 12)
    updates = [rng.normal(0, 0.02, 4096) for _ in range(5)]
    rows: list[MatrixRow] = []
    for spare, suffix in ((0, ""), (1, ", t+1 responders")):
        attack = ForgedShare(ForgedShareConfig(num_clients=5, spare_responders=spare))
        for defended, label in ((False, "shares unverified (control)"), (True, "secagg malicious setting")):
            got = attack.run(updates, defended=defended)
            rows.extend(r.model_copy(update={"defense": label + suffix}) for r in got.rows())
    small = [rng.uniform(-0.1, 0.1, 16) for _ in range(4)]
    oracle = HEOracle(HEOracleConfig(num_clients=4, coordinates=4))
    for defended, label in ((False, "he, decrypts server total (control)"), (True, "he-bfv")):
        rows.extend(r.model_copy(update={"defense": label}) for r in oracle.run(small, defended=defended).rows())
    return rows


def _server_against_nodes(seed: int, notes: list[str]) -> list[MatrixRow]:
    """Rerun, downgrade and Sybil roster: a malicious server against real Flower nodes running our Mod.

    Each runs on `LocalGrid` nodes (5 parties, 64-value updates): the control recovers the target's
    encoded update bit for bit, ours refuses with a typed error and nothing is recovered. Needs the
    `flower` extra; without it the rows are left out and a note says so.
    """
    import importlib.util

    if importlib.util.find_spec("flwr") is None:
        notes.append(
            "rerun, downgrade and sybil_roster were not run: they need Flower (pip install secure-fedllm[flower])."
        )
        return []
    rng = np.random.default_rng(seed + 13)
    updates = [rng.normal(0, 0.02, 64) for _ in range(5)]
    rows: list[MatrixRow] = []
    for defended, label in ((False, "bindings lost on node restart (control)"), (True, "release bound to one session")):
        got = Rerun(RerunConfig(num_clients=5)).run(updates, defended=defended)
        rows.extend(r.model_copy(update={"defense": label}) for r in got.rows())
    for defended, label in ((False, "node without site policy (control)"), (True, "site policy")):
        got = Downgrade(DowngradeConfig(num_clients=5)).run(updates, defended=defended)
        rows.extend(r.model_copy(update={"defense": label}) for r in got.rows())
    for defended, label in ((False, "node checks only its own key (control)"), (True, "site policy, pinned roster")):
        got = SybilRoster(SybilRosterConfig(num_clients=5)).run(updates, defended=defended)
        rows.extend(r.model_copy(update={"defense": label}) for r in got.rows())
    return rows
