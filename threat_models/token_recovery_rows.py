"""Token recovery on realistic updates: one client's multi-step SGD LoRA round, as the server receives it.

Why this setting. The matrix's other token-recovery rows attack one SGD step on a 2-token record, where the span
check of `attacks.token_recovery` is exact because fewer distinct tokens than the LoRA rank r reach layer 0. A
real client-round is several Poisson-sampled steps over records of tens of tokens: a hundred or more distinct
tokens, far above r = 16. These rows measure what survives that, with the project's own DP-SGD trainer
(`LocalTrainer`), SmolLM2's chat template and the synthetic private records (16-64 tokens each), under three
views of the server:

* ``none``: the target client's own update, in the clear (noise 0; per-record clipping still on, as in a run with
  ``privacy.mechanism = "none"``);
* ``secagg+ (sum of 4)``: only the sum of 4 clients' updates from the same adapter, unmasked by a real SecAgg+
  round (`protocols.run_round`); tokens are scored against the target's, since the server cannot attribute them;
* ``dp-eps8``: the target's update with DP-SGD noise at the accountant's sigma for the run's q and steps
  (`client_policy` on the same `RunConfig`; all rounds' steps are charged, the attacker sees one round).

Two adapter modes, because the answer depends on it:

* **FFA, the project default** (`lora.aggregation`): A is frozen and never sent; the server sees only B, whose
  rows lie in ``span{A0 x_t}``, a subspace of R^r. With n_vis >> r that span is all of R^r, so the exact check is
  vacuous even without any defense: it recovers nothing (and says so); only a soft ranking is left
  (``precision_at_T``). This is the finding for the default configuration. Metric names are plain.
* **fedit** (A trained and sent), labelled ``fedit_*``: the stacked layer-0 lora_A updates have rows in
  ``span{x_t}`` in R^576 and `SparseTokenRecovery` recovers the token set jointly (see its docstring; the per-token
  span check cannot, the update having rank <= r). It needs B != 0, so the attacked round is round 2: the adapter
  the server distributes comes from a noise-free warm-up round on other records.

The inner optimiser is SGD here, not the project's default Adam: Adam's per-coordinate scaling takes the update out
of the token span (module docstring of `attacks.token_recovery`), so the default Adam run defeats the exact attack
as well. SecAgg's encoding clip range is set just above the largest coordinate (a deployment whose
``secure_aggregation.clip_range`` clips coordinates also breaks the span; that is not counted as a defense here).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from protocols import SecAggParams, run_round
from secure_fedllm import RunConfig
from secure_fedllm.adapters import AdapterManifest, attach_lora
from secure_fedllm.config import LoraConfig
from secure_fedllm.data import ChatTemplate, TextRecord, TokenizedDataset, synthesize_federation
from secure_fedllm.federation import ClientPolicy, client_policy
from secure_fedllm.models import load_base_model
from secure_fedllm.training import LocalTrainer, StepSettings

from .attacks.token_recovery import (
    ATTACK,
    SparseTokenRecovery,
    TokenRecovery,
    TokenRecoveryConfig,
    visible_tokens,
)
from .attacks.updates import LocalUpdate, flatten_update, local_update, split_update
from .errors import AttackConfigError
from .results import MatrixRow

__all__ = ["TokenRecoveryCase", "TokenRecoveryPlan", "measure_token_recovery", "realistic_token_recovery"]

Progress = Callable[[str], None]
Mode = Literal["ffa", "fedit"]


class TokenRecoveryPlan(BaseModel):
    """The client-round every row attacks. Defaults: a client of 64 records, 4 SGD steps at q = 4/64, r = 16."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    clients: int = Field(4, ge=3, description="clients in the SecAgg+ sum (the target is client 0)")
    records_per_client: int = Field(64, ge=1)
    expected_batch_size: int = Field(4, ge=1, description="Poisson rate q = expected_batch_size / records")
    local_steps: int = Field(4, ge=1, description="SGD steps in the attacked round")
    rounds: int = Field(3, ge=1, description="rounds the client joins: the DP accountant charges all their steps")
    learning_rate: float = Field(0.5, gt=0, description="SGD step size (scale only; clip 1, batch ~4)")
    warmup_steps: int = Field(4, ge=1, description="fedit: steps of the round before, on other records (B != 0)")
    max_length: int = Field(64, ge=16, description="tokens per record, template included (the run default)")
    epsilon: float = Field(8.0, gt=0, description="the DP row's per-client epsilon")
    rank: int = Field(16, ge=1, description="LoRA rank (the run default)")
    modes: tuple[Mode, ...] = Field(("ffa", "fedit"), min_length=1)


@dataclass(frozen=True)
class TokenRecoveryCase:
    """One (adapter mode, defense) cell and what it rests on.

    Attributes:
        mode: "ffa" or "fedit".
        defense: the row label.
        n_vis: distinct tokens of the target's sampled records that reach layer 0's gradient (the ground truth).
        observed_tokens: distinct tokens behind what the server observed (the union over the sum for SecAgg+).
        records: records the target's steps used.
        recovered: size of the recovered set; hits: how many of them are the target's.
        certified: whether the attacker could tell its answer is exact (span check informative and consistent;
            sparse recovery reaching the rounding floor).
        noise_multiplier: sigma of the DP row (0 otherwise).
        seconds: time to train and attack this cell.
        rows: the matrix rows (labelled).
    """

    mode: Mode
    defense: str
    n_vis: int
    observed_tokens: int
    records: int
    recovered: int
    hits: int
    certified: bool
    noise_multiplier: float
    seconds: float
    rows: tuple[MatrixRow, ...]

    def value(self, metric: str) -> float:
        """The value of one metric (plain name, without the mode prefix)."""
        prefix = _prefix(self.mode)
        return next(r.value for r in self.rows if r.metric == prefix + metric)


def realistic_token_recovery(
    model_name: str, *, seed: int, progress: Progress | None = None, plan: TokenRecoveryPlan | None = None
) -> list[MatrixRow]:
    """Token recovery from one client's multi-step SGD LoRA round under none, SecAgg+ (sum of 4) and DP at epsilon 8.

    Rows: attack "token_recovery"; defense "none", "secagg+ (sum of 4)", "dp-eps8"; metrics "precision", "recall",
    "precision_at_T" and "certified" for the project's default adapter mode (FFA), and the same prefixed "fedit_"
    for fedit (module docstring). SmolLM2: 225 s on one thread of a busy 2-core machine (both modes).

    Raises:
        AttackConfigError: the model is not LLaMA-like (the layer-0 check needs RoPE), or has no q/v projections.
    """
    return [
        row for case in measure_token_recovery(model_name, seed=seed, progress=progress, plan=plan) for row in case.rows
    ]


def measure_token_recovery(
    model_name: str,
    *,
    seed: int,
    progress: Progress | None = None,
    plan: TokenRecoveryPlan | None = None,
    records: Sequence[Sequence[TextRecord]] | None = None,
) -> list[TokenRecoveryCase]:
    """Every (mode, defense) cell of `realistic_token_recovery`, with the counts behind it.

    Args:
        model_name: a `model.name` (e.g. the embedded SmolLM2) of a LLaMA-architecture model.
        seed: seeds the records, the A0 draw, the Poisson sampling and the DP noise.
        progress: called with one line per stage.
        plan: the client-round (default `TokenRecoveryPlan()`).
        records: per client, its records (each its own privacy unit), then one more list for fedit's warm-up
            round; by default the synthetic private records (`synthesize_federation`, no canaries).

    Raises:
        AttackConfigError: `records` does not hold plan.clients + 1 lists, or the target sampled no record.
    """
    plan = plan if plan is not None else TokenRecoveryPlan()
    say = progress or (lambda _line: None)
    config = _run_config(model_name, plan, seed)
    if records is None:
        federation = synthesize_federation(plan.clients + 1, plan.records_per_client, seed=seed, canary_repeats=())
        records = [
            [TextRecord(r.instruction, r.input, r.output, f"c{c}-r{i}") for i, r in enumerate(client)]
            for c, client in enumerate(federation.clients)
        ]
    if len(records) != plan.clients + 1:
        raise AttackConfigError(
            f"records holds {len(records)} lists; give plan.clients + 1 = {plan.clients + 1} (the last: warm-up)"
        )
    base, tokenizer = load_base_model(config.model)
    template = ChatTemplate(tokenizer, system_prompt="", max_length=plan.max_length)
    datasets = [TokenizedDataset.build(list(client), template) for client in records]
    policy = client_policy(config, 0, datasets[0].num_units)
    cases: list[TokenRecoveryCase] = []
    for index, mode in enumerate(plan.modes):
        last = index == len(plan.modes) - 1
        cases.extend(
            _mode_cases(base if last else copy.deepcopy(base), mode, datasets, policy, plan, seed=seed, say=say)
        )
    return cases


def _run_config(model_name: str, plan: TokenRecoveryPlan, seed: int) -> RunConfig:
    return RunConfig().with_overrides(
        [
            f'model.name="{model_name}"',
            f"federation.clients={plan.clients}",
            f"federation.rounds={plan.rounds}",
            f"federation.local_steps={plan.local_steps}",
            f"federation.seed={seed}",
            f"data.records_per_client={plan.records_per_client}",
            f"data.max_length={plan.max_length}",
            f"privacy.expected_batch_size={plan.expected_batch_size}",
            f"privacy.target_epsilon={plan.epsilon}",
            "training.optimizer='sgd'",
            f"training.learning_rate={plan.learning_rate}",
            f"lora.r={plan.rank}",
        ]
    )


def _prefix(mode: Mode) -> str:
    return "" if mode == LoraConfig().aggregation else f"{mode}_"


def _mode_cases(
    base: Any,
    mode: Mode,
    datasets: Sequence[TokenizedDataset],
    policy: ClientPolicy,
    plan: TokenRecoveryPlan,
    *,
    seed: int,
    say: Progress,
) -> list[TokenRecoveryCase]:
    """Train the clients of one adapter mode from one distributed adapter and attack the three views."""
    model = attach_lora(base, LoraConfig(r=plan.rank, aggregation=mode), a0_seed=seed + 11)
    trainer = LocalTrainer(model)
    settings = StepSettings(
        noise_multiplier=0.0,
        max_grad_norm=policy.max_grad_norm,
        sample_rate=policy.sample_rate,
        expected_batch_size=plan.expected_batch_size,
        steps=plan.local_steps,
        learning_rate=plan.learning_rate,
        optimizer="sgd",
    )
    dp = dataclasses.replace(settings, noise_multiplier=policy.noise_multiplier)
    try:
        started = time.perf_counter()
        if mode == "fedit":  # the adapter of the round before: B != 0, so A's gradient is non-zero
            say(f"token recovery [{mode}]: warm-up round ({plan.warmup_steps} steps on other records)")
            warm = dataclasses.replace(settings, steps=plan.warmup_steps)
            local_update(model, datasets[-1], warm, sample_seed=seed + 7_000, trainer=trainer, keep=True)
        manifest = AdapterManifest.of(model, mode)
        updates: list[LocalUpdate] = []
        for client in range(plan.clients):
            say(f"token recovery [{mode}]: client {client} ({plan.local_steps} SGD steps)")
            updates.append(
                local_update(model, datasets[client], settings, sample_seed=seed * 1_000 + client, trainer=trainer)
            )
        say(f"token recovery [{mode}]: target with DP-SGD noise (sigma {policy.noise_multiplier:.3f})")
        noised = local_update(model, datasets[0], dp, sample_seed=seed * 1_000, noise_seed=seed, trainer=trainer)
        shared = time.perf_counter() - started
        modules = ("q_proj",) if mode == "ffa" else ("q_proj", "v_proj")
        truths = [_truth(model, datasets[c], u.batches, modules) for c, u in enumerate(updates)]
        truth = truths[0]
        if not truth:
            raise AttackConfigError("the target's Poisson sampling drew no record: raise plan.expected_batch_size")
        assert noised.batches == updates[0].batches  # same sample seed: the DP row is scored on the same records
        records = sum(len(b) for b in updates[0].batches)
        kept = {name for name, _ in manifest.entries}
        views: list[tuple[str, dict[str, torch.Tensor], int, float, int, float]] = [
            ("none", _restrict(updates[0].update, kept), 1, 0.0, len(truth), 0.0),
            (f"dp-eps{plan.epsilon:g}", _restrict(noised.update, kept), 1, 0.0, len(truth), policy.noise_multiplier),
        ]
        flats = [flatten_update(manifest, u.update) for u in updates]
        clip = 1.01 * max(float(np.abs(f).max()) for f in flats)
        params = SecAggParams.secagg_plus(plan.clients, dimension=manifest.dimension, clip_range=clip)
        say(f"token recovery [{mode}]: SecAgg+ round over {plan.clients} clients")
        total = run_round(params, flats, protocol="secagg")
        summed = split_update(manifest, np.asarray(total.result.decoded.weighted_sum, dtype=np.float64))
        extra = math.sqrt(plan.clients) / (2 * params.encoding.scale)
        views.insert(
            1, (f"secagg+ (sum of {plan.clients})", summed, plan.clients, extra, len(set().union(*truths)), 0.0)
        )
        cases = []
        for defense, observed, parties, extra_std, observed_tokens, sigma in views:
            began = time.perf_counter()
            say(f"token recovery [{mode}]: attacking the {defense} view")
            rows, recovered, hits, certified = _attack(
                model, mode, observed, truth, roundings=parties * plan.local_steps, extra_std=extra_std
            )
            prefix = _prefix(mode)
            labelled = tuple(r.model_copy(update={"defense": defense, "metric": prefix + r.metric}) for r in rows)
            cases.append(
                TokenRecoveryCase(
                    mode=mode,
                    defense=defense,
                    n_vis=len(truth),
                    observed_tokens=observed_tokens,
                    records=records,
                    recovered=recovered,
                    hits=hits,
                    certified=certified,
                    noise_multiplier=sigma,
                    seconds=time.perf_counter() - began + shared / len(views),
                    rows=labelled,
                )
            )
        return cases
    finally:
        trainer.module.to_standard_module()


def _attack(
    model: Any, mode: Mode, observed: dict[str, torch.Tensor], truth: set[int], *, roundings: int, extra_std: float
) -> tuple[list[MatrixRow], int, int, bool]:
    """FFA: the span check on layer 0's q lora_B. fedit: joint sparse recovery from layer 0's lora_A updates."""
    if mode == "ffa":
        result = TokenRecovery(TokenRecoveryConfig(module="q_proj")).run(model, observed, true_tokens=truth)
        certified, recovered = result.self_consistent, result.recovered
        rows = [*result.rows(), MatrixRow(attack=ATTACK, metric="certified", value=float(certified))]
    else:
        sparse = SparseTokenRecovery().run(model, observed, roundings=roundings, extra_std=extra_std, true_tokens=truth)
        certified, recovered, rows = sparse.certified, sparse.recovered, sparse.rows()
    return rows, len(recovered), len(recovered & frozenset(truth)), certified


def _truth(model: Any, data: TokenizedDataset, batches: Sequence[Sequence[int]], modules: Sequence[str]) -> set[int]:
    """Distinct tokens of the sampled records that reach the gradient of any of the attacked projections."""
    seen: set[int] = set()
    for units in batches:
        if units:
            batch = data.batch_of_units(list(units))
            for module in modules:
                seen |= visible_tokens(model, batch, module)
    return seen


def _restrict(update: dict[str, torch.Tensor], names: set[str]) -> dict[str, torch.Tensor]:
    """What the server receives of an update: the manifest's tensors only (in FFA, B alone)."""
    return {name: tensor for name, tensor in update.items() if name in names}
