"""The attack x defense matrix: `secure-fedllm evaluate`.

Defenses: none (updates in the clear, no DP), SecAgg+ (the server sees only sums), HE (BFV; the
same view), DP-SGD at epsilon in {inf (clip only), 8, 1} per client, and SecAgg+ with DP. Attacks:
token recovery from updates (the server's view), model inconsistency (a malicious server), a
malicious server against real Flower nodes running our Mod (rerun, downgrade, Sybil roster), one-run
DP audit (the white-box bound on one client's update), membership inference and canary exposure
on the released adapter (which no secure aggregation protects: only DP does). Utility beside it:
held-out perplexity of the released adapter at each epsilon and of the base model.

`quick` runs everything on a tiny random LLaMA (minutes on 2 cores): the mechanics are real, the
numbers describe a random model. The full matrix runs on the embedded SmolLM2.
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict

from secure_fedllm import RunConfig
from secure_fedllm.data import ChatTemplate, TextRecord, synthesize_federation
from secure_fedllm.federation import client_policy, run
from secure_fedllm.models import load_base_model
from secure_fedllm.tiny_model import save_tiny_llama

from .attacks.backdoor import Backdoor, BackdoorConfig
from .attacks.downgrade import Downgrade, DowngradeConfig
from .attacks.dp_audit import DPAuditConfig, OneRunAudit
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
from .report import write_evaluation
from .results import MatrixRow

__all__ = ["EvaluationConfig", "EvaluationResult", "evaluate"]

EPSILONS: tuple[float, ...] = (math.inf, 8.0, 1.0)
DISTRIBUTED_EPSILONS: tuple[float, ...] = (8.0, 1.0)
"""Epsilons of the distributed-DP defense rows (`privacy.mode = "distributed"`, full SecAgg)."""
UTILITY_ONLY: tuple[float, ...] = (3.0,)
"""Epsilons at which only utility is measured (the attacks run at EPSILONS)."""


class EvaluationConfig(BaseModel):
    """What the evaluation runs."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    quick: bool = False
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


def _run_config(model: str, quick: bool, epsilon: float, seed: int, *, distributed: bool = False) -> RunConfig:
    base = [
        f'model.name="{model}"',
        "federation.clients=3",
        "federation.rounds=2",
        "data.records_per_client=400",
        f"federation.seed={seed}",
        "evaluation.generations=0",
        "evaluation.heldout_records=64",
        "privacy.noise_seed=1",
        "secure_aggregation.protocol='secagg+'",
        # the malicious default with 3 clients (n_C = 1) needs t = 3 = n: it tolerates no dropout
        "secure_aggregation.dropout_rate=0.0",
    ]
    if quick:
        base += ["data.max_length=256", "federation.local_steps=30"]
    base += ["privacy.mechanism='none'"] if math.isinf(epsilon) else [f"privacy.target_epsilon={epsilon}"]
    if distributed:  # the same DP steps per client, one full-SecAgg round each
        steps = 2 * (30 if quick else RunConfig().federation.local_steps)
        base += ["privacy.mode='distributed'", "secure_aggregation.protocol='secagg'", f"federation.rounds={steps}"]
    return RunConfig().with_overrides(base)


def _distributed_label(epsilon: float) -> str:
    return f"distributed-dp-eps{epsilon:g}"


def _label(epsilon: float) -> str:
    return "none" if math.isinf(epsilon) else f"dp-eps{epsilon:g}"


def evaluate(config: EvaluationConfig, *, out: str | Path) -> EvaluationResult:
    """Run the matrix and write results.json, report.md and the plots to `out`."""
    started = time.perf_counter()
    out = Path(out)
    work = Path(tempfile.mkdtemp(prefix="secure-fedllm-eval-"))
    if config.quick:
        model = str(save_tiny_llama(work / "tiny-llama", seed=config.seed))
    else:
        from secure_fedllm.config import EMBEDDED_MODEL

        model = EMBEDDED_MODEL
    rows: list[MatrixRow] = []
    utility: dict[str, float] = {}
    roc: dict[str, tuple[list[float], list[float]]] = {}
    notes: list[str] = []

    # released adapters at each epsilon; MIA and canary exposure read them (secure aggregation
    # does not protect what is released: the SecAgg+ column equals the none column for these)
    federation = synthesize_federation(3, 400, seed=config.seed)
    members = [TextRecord(r.instruction, r.input, r.output, unit="m") for c in federation.clients for r in c]
    outsiders = synthesize_federation(1, len(members), seed=config.seed + 7_919, canary_repeats=())
    nonmembers = [TextRecord(r.instruction, r.input, r.output, unit="n") for r in outsiders.clients[0]]
    for epsilon in EPSILONS:
        run_config = _run_config(model, config.quick, epsilon, config.seed)
        result = run(run_config, out=work / f"run-{_label(epsilon)}", progress=False)
        utility[_label(epsilon)] = float(result.metrics[-1]["perplexity"])
        utility.setdefault("base model", float(result.metrics[0]["perplexity"]))
        released, tokenizer = _load_released(run_config, result.adapter)
        template = ChatTemplate(tokenizer, system_prompt="", max_length=run_config.data.max_length)
        mia = MembershipInference(MembershipConfig(allow_small=False)).run(released, template, members, nonmembers)
        for row in mia.rows():
            rows.append(row.model_copy(update={"defense": _label(epsilon)}))
        loss = mia.reports["loss"]
        roc[_label(epsilon)] = (list(loss.roc_fpr), list(loss.roc_tpr))
        rows.extend(
            r.model_copy(update={"defense": _label(epsilon)}) for r in _canaries(released, template, federation)
        )

    rows.extend(_distributed_rows(model, config, work, (members, nonmembers, federation), utility, roc))

    for epsilon in UTILITY_ONLY:  # the utility curve's extra point
        result = run(_run_config(model, config.quick, epsilon, config.seed), out=work / f"run-{_label(epsilon)}",
                     progress=False)  # fmt: skip
        utility[_label(epsilon)] = float(result.metrics[-1]["perplexity"])

    # one-run DP audit of one client's update at the default run's q and steps
    policy = client_policy(_run_config(model, config.quick, 8.0, config.seed), 0, 400)
    steps = policy.steps * policy.max_participations
    audit = OneRunAudit(DPAuditConfig(num_canaries=1000, seed=config.seed, delta=policy.delta))
    for epsilon in EPSILONS:
        sigma = (
            0.0 if math.isinf(epsilon) else audit.calibrate_noise(epsilon, sample_rate=policy.sample_rate, steps=steps)
        )
        outcome = audit.simulate(noise_multiplier=sigma, clip_norm=1.0, steps=steps, sample_rate=policy.sample_rate)
        rows.extend(r.model_copy(update={"defense": _label(epsilon)}) for r in outcome.rows())

    rows.extend(_distributed_audit_rows(config.seed))

    # a malicious server isolating one client's update inside the sum
    target = np.random.default_rng(config.seed).normal(0, 0.02, 4096)
    attack = ModelInconsistency(ModelInconsistencyConfig(num_clients=5))
    for bound, label in ((False, "secagg+ without binding"), (True, "secagg+")):
        rows.extend(r.model_copy(update={"defense": label}) for r in attack.run(target, bound=bound).rows())

    # a malicious server splitting the survivor set to unmask one client
    forging = DropoutForging(DropoutForgingConfig(num_clients=7))
    updates = [np.random.default_rng(config.seed + i).normal(0, 0.02, 4096) for i in range(7)]
    for defended, label in ((False, "secagg semi-honest, t=n/2"), (True, "secagg malicious setting")):
        rows.extend(r.model_copy(update={"defense": label}) for r in forging.run(updates, defended=defended).rows())

    # key substitution, Sybil enrolment and replay: leak against the weakened control, abort against ours
    updates5 = updates[:5]
    for defended, label in ((False, "secagg semi-honest"), (True, "secagg malicious setting")):
        got = KeySubstitution(KeySubstitutionConfig(num_clients=5)).run(updates5, defended=defended)
        rows.extend(r.model_copy(update={"defense": label}) for r in got.rows())
        sybil = Sybil(SybilConfig(num_clients=5, seed=config.seed)).run(updates[0], defended=defended)
        rows.extend(r.model_copy(update={"defense": label}) for r in sybil.rows())
    sybil = Sybil(SybilConfig(num_clients=5, seed=config.seed, server_controls_pki=True)).run(updates[0], defended=True)
    rows.extend(r.model_copy(update={"defense": "secagg malicious, PKI run by the server"}) for r in sybil.rows())
    later = [u + np.random.default_rng(config.seed + 99).normal(0, 0.01, u.shape) for u in updates5]
    for defended, label in ((False, "unbound round, keys reused (modelled)"), (True, "secagg malicious setting")):
        replayed = Replay(ReplayConfig(num_clients=5)).run(updates5, later, defended=defended)
        rows.extend(r.model_copy(update={"defense": label}) for r in replayed.rows())
    rows.extend(_forged_share_and_he_oracle(config.seed))
    rows.extend(_server_against_nodes(config.seed, notes))

    # a malicious client's boosted backdoor through SecAgg+ (rows carry their own defense labels)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model, short sequences: one thread is fastest
    try:
        tiny = model if config.quick else str(save_tiny_llama(work / "tiny-llama-backdoor", seed=config.seed))
        backdoor = BackdoorConfig.quick(seed=config.seed) if config.quick else BackdoorConfig(seed=config.seed)
        rows.extend(Backdoor(backdoor).run(tiny).rows())
    finally:
        torch.set_num_threads(previous)

    rows.extend(_token_recovery(model, config))
    notes += [
        "A malicious client's boosted backdoor stays inside its own encoder's public clip range and implants through "
        "SecAgg+: the server sees only the sum and can neither bound nor remove it. A server-visible defense needs "
        "zero-knowledge proofs of each masked input's norm (RoFL, EIFFeL); server norm clipping or robust "
        "aggregation needs individual updates, which gives up secure aggregation.",
        "Membership inference and canary exposure read the released adapter: secure aggregation does not change "
        "them (its column equals the matching DP column); only DP does.",
        "Token recovery reads what the server receives: one client's update without secure aggregation, only the "
        "sum with SecAgg+ or HE.",
        "The DP audit is the one-run lower bound (Steinke, Nasr, Jagielski 2023) on one client's update with 1,000 "
        "Dirac canaries; it must stay below the accountant's epsilon.",
        "Distributed DP rows: the adapters of privacy.mode='distributed' runs (full SecAgg, Skellam shares sized for "
        "h = n - n_C - d_max) under the same attacks; their audit runs the mechanism's own code on 5,000 Dirac "
        "canaries through real SecAgg sessions (q = 1, one step), and its control draws every share at sigma/4 "
        "with epsilon 1 declared: that row must exceed 1.",
    ]
    if config.quick:
        notes.append("--quick: a tiny random LLaMA; the mechanics are real, the model is not.")
    setting = {"model": "tiny random LLaMA" if config.quick else model, "clients": 3, "rounds": 2, "seed": config.seed}
    order = [
        "base model",
        _label(math.inf),
        *(_label(e) for e in sorted((*EPSILONS, *UTILITY_ONLY), reverse=True)),
        *(_distributed_label(e) for e in DISTRIBUTED_EPSILONS),
    ]
    utility = {k: utility[k] for k in dict.fromkeys(order) if k in utility}
    report = write_evaluation(out, rows, setting=setting, roc_curves=roc, utility=utility, notes=notes)
    return EvaluationResult(rows, utility, report, time.perf_counter() - started)


def _distributed_rows(
    model: str,
    config: EvaluationConfig,
    work: Path,
    data: tuple[list[TextRecord], list[TextRecord], Any],
    utility: dict[str, float],
    roc: dict[str, tuple[list[float], list[float]]],
) -> list[MatrixRow]:
    """Membership and canary rows on the adapters of distributed-DP runs (same DP steps per client)."""
    members, nonmembers, federation = data
    rows: list[MatrixRow] = []
    for epsilon in DISTRIBUTED_EPSILONS:  # distributed DP: noise shares inside SecAgg, same steps per client
        run_config = _run_config(model, config.quick, epsilon, config.seed, distributed=True)
        label = _distributed_label(epsilon)
        result = run(run_config, out=work / f"run-{label}", progress=False)
        utility[label] = float(result.metrics[-1]["perplexity"])
        released, tokenizer = _load_released(run_config, result.adapter)
        template = ChatTemplate(tokenizer, system_prompt="", max_length=run_config.data.max_length)
        mia = MembershipInference(MembershipConfig(allow_small=False)).run(released, template, members, nonmembers)
        rows.extend(row.model_copy(update={"defense": label}) for row in mia.rows())
        roc[label] = (list(mia.reports["loss"].roc_fpr), list(mia.reports["loss"].roc_tpr))
        rows.extend(r.model_copy(update={"defense": label}) for r in _canaries(released, template, federation))
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
        label = _distributed_label(epsilon) + (" shares at sigma/4 (control)" if scale != 1.0 else "")
        rows.extend(r.model_copy(update={"defense": label}) for r in audited.rows())
    return rows


def _load_released(run_config: RunConfig, adapter: Path) -> tuple[Any, Any]:
    from peft import PeftModel

    base, tokenizer = load_base_model(run_config.model)
    return PeftModel.from_pretrained(base, adapter), tokenizer


def _canaries(model: Any, template: ChatTemplate, federation: Any) -> list[MatrixRow]:
    from .attacks.canary_exposure import CanaryExposure, canary_probes

    records = [r for client in federation.clients for r in client]
    return list(CanaryExposure().run(model, template, canary_probes(federation.canaries, records)).rows())


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


def _token_recovery(model_name: str, config: EvaluationConfig) -> list[MatrixRow]:
    """Token recovery from what the server receives, under each defense (one short target record).

    none / DP: the target's own one-step update (DP noise from the accountant's sigma for the run's
    q and steps); SecAgg+ / HE: the decrypted or unmasked sum over three clients' updates, recovered
    against the target's tokens (the server cannot attribute tokens to a client).
    """
    import torch

    from protocols import SecAggParams, run_round
    from protocols.he import HEParams
    from secure_fedllm.adapters import AdapterManifest, attach_lora, get_vector
    from secure_fedllm.config import LoraConfig
    from secure_fedllm.data import TokenizedDataset

    from .attacks.token_recovery import TokenRecovery, dp_step_update, split_update, visible_tokens

    run_config = _run_config(model_name, config.quick, 8.0, config.seed)
    base, tokenizer = load_base_model(run_config.model)
    model = attach_lora(base, LoraConfig(r=16), a0_seed=config.seed + 11)
    manifest = AdapterManifest.of(model, "ffa")
    template = ChatTemplate(tokenizer, system_prompt="", max_length=run_config.data.max_length)
    records = [TextRecord("Hi", "", "hi", "t"), TextRecord("Ok?", "", "ok", "a"), TextRecord("Yo", "", "yo", "b")]
    data = TokenizedDataset.build(records, template)
    batches = [data.batch_of_rows([i]) for i in range(3)]
    truth = visible_tokens(model, batches[0])
    attack = TokenRecovery()
    rows: list[MatrixRow] = []
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny per-record steps: thread hand-off costs more than the work
    try:
        for epsilon in EPSILONS:
            sigma = 0.0
            if not math.isinf(epsilon):
                policy = client_policy(_run_config(model_name, config.quick, epsilon, config.seed), 0, 400)
                sigma = policy.noise_multiplier
            update = dp_step_update(model, batches[0], noise_multiplier=sigma, noise_seed=config.seed)
            result = attack.run(model, update, true_tokens=truth)
            rows.extend(r.model_copy(update={"defense": _label(epsilon)}) for r in result.rows())
        start = get_vector(model, manifest)
        flats = []
        for batch in batches:
            update = dp_step_update(model, batch, noise_multiplier=0.0)
            flats.append(np.concatenate([update[name].detach().numpy().ravel() for name, _ in manifest.entries]))
        clip = float(max(np.abs(f).max() for f in flats)) * 1.01
        for label, params, protocol in (
            ("secagg+", SecAggParams.secagg_plus(3, dimension=len(start), clip_range=clip), "secagg"),
            ("he-bfv", HEParams.bfv_packed(3, dimension=len(start), clip_range=clip), "he"),
        ):
            total = run_round(params, [f.astype(np.float64) for f in flats], protocol=protocol)  # type: ignore[arg-type]
            summed = split_update(manifest, np.asarray(total.result.decoded.weighted_sum, dtype=np.float32))
            result = attack.run(model, summed, true_tokens=truth)
            rows.extend(r.model_copy(update={"defense": label}) for r in result.rows())
    finally:
        torch.set_num_threads(previous)
    return rows
