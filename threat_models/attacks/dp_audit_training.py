"""One-run DP audit of real DP-SGD LoRA training (Steinke, Nasr, Jagielski 2023), in a small federation.

Why this exists: `OneRunAudit.simulate` audits a Gaussian model of DP-SGD, so a bug in the trainer
(a canary clipped differently from a record, noise drawn at the wrong scale or not at all, a
batch divided by the wrong size) would never show in it. Here the canaries go through
`LocalTrainer.step` itself (`extra_unit_gradients`): Opacus clips, sums, noises and scales them
with the records of the very step, and the auditor sees only what a server sees.

The audited run (`TrainingAudit.run`):

* a base model (the tiny random LLaMA in tests and ``evaluate --quick``) with FFA LoRA adapters
  (A frozen at its seeded init, B trained and summed), as the runs build them; synthetic records
  (`synthesize_federation`, `ChatTemplate`, `TokenizedDataset`), one record per privacy unit;
* m Dirac gradient canaries ``C * e_j`` on distinct lora_B coordinates (`OneRunAudit.draw_canaries`),
  each inserted into client 0 with a secret bit (probability 1/2). An inserted canary is a unit of
  client 0 like its records: every step it is Poisson-sampled at the records' rate q, and client
  0's N (its expected batch size q N) counts the inserted canaries;
* ``rounds`` rounds of ``local_steps`` DP-SGD (SGD) steps per client from the global adapter; every
  client draws Gaussian noise at the run's sigma (times ``noise_scale``: 1 correct, 1/4 the
  under-noised control; sigma 0 the clip-only control); the round releases only the sum of the
  clients' adapter deltas, and the global adapter moves by its mean;
* the auditor scores canary i by minus the total of the released sums on its coordinate (SGD
  descends along an inserted canary), guesses and bounds with `OneRunAudit` at ``audit.delta``,
  and the accountant's epsilon is computed at that same delta (`DPSGDEvent(sigma, q, steps)`).

What the records add, and why the auditor subtracts it (``subtract_data``). Each canary is one
unit of client 0's batch: its step on coordinate j is ``lr C / E_0`` with ``E_0 = q (records + inserted)``,
about 1,000 with m = 2,000. The records' mean gradient is not divided like that: on the tiny model
its lora_B coordinates have a spread of ~0.012 per step, ~12 C in units of a canary's step, which
buries the canaries (clip-only audit 1.3 instead of 5.8 when measured). The auditor is white-box:
it knows the records and the initial adapter, not the bits, the sampling or the noise. At each
released global adapter it computes the records' clipped per-unit gradients and subtracts the step
they would take alone (q times their sum over the public ``E_c``, ``E_0`` with m/2 canaries). That
is a function of released outputs and public inputs only, so the bound stays valid; at q = 1 with
one local step it removes the records' part exactly, otherwise up to sampling and drift.

Why SGD. The bound holds for Adam too (the optimiser is post-processing of the noisy clipped
sums), but Adam divides each coordinate by its own running RMS: coordinates that only data and
noise touch get inflated to the canaries' scale, which weakens the audit. The runs' default
(Adam) is therefore not the optimiser audited here; the sums it post-processes are.

Why these defaults (q = 1, 2 rounds x 1 step, m = 2,000, the other client twice client 0's size).
The auditor sees per-round sums, not steps: sampling only adds variance to a canary's total, while
the accountant's amplification by sampling lowers sigma. Each client's delta is its own batch
mean, so the released sum weighs client c's noise by ``E_0 / E_c`` against client 0's canaries: a
second client as large as client 0 gives the sum sqrt(2) times client 0's noise, twice as large
sqrt(1.25). In the Gaussian simulation (`OneRunAudit.simulate`, delta 1e-6, 8 to 10 seeds) the
sigma/4 control averages 0.86 (0.46 to 1.31) at q = 0.5, 10 steps, m = 1,000 and equal clients;
1.24 (0.95 to 1.58) at q = 1, 2 steps, m = 2,000 and equal clients; 1.56 (1.29 to 1.75) with the
other client twice as large. m = 1,000 loses ~0.25; beyond 2,000 (d = 3,072 on the tiny model with
r = 16) little is gained. Measured on real training with these defaults (seeds 0, 1, 2): clip
only 5.83 every time, epsilon 8 2.38 / 2.61 / 2.73, epsilon 1 0.39 / 0.27 / 0.15, the sigma/4
control 1.96 / 1.61 / 1.58 (accountant: inf, 8, 1, 1 at delta 1e-6). One round (``rounds=1``)
gives the same picture (seed 0: 5.83, 2.42, 0.08, 1.58) at less than half the cost.

What it cannot show. A one-run bound saturates near 5.8 (m = 2,000) even without noise, so a claim
of epsilon 8 cannot be refuted; the correct-noise rows can only be checked for staying below the
accountant. A client's update is divided by its own N, which counts its inserted canaries, as a
run's is by its data size (Opacus' normalisation, outside the add/remove accountant): the scale of
client 0's update depends on how many were inserted, which a ranking of its coordinates ignores.
On SmolLM2 the canary rows are dense per-unit gradients (m/2 x d floats per step, 1.5 GB at
d = 368,640), so the tiny model is the practical target.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import numpy.typing as npt
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from secure_fedllm.adapters import AdapterManifest, attach_lora, get_vector, set_vector
from secure_fedllm.config import LoraConfig, ModelConfig
from secure_fedllm.data import ChatTemplate, TextRecord, TokenizedDataset, synthesize_federation
from secure_fedllm.models import load_base_model
from secure_fedllm.privacy import DPSGDEvent
from secure_fedllm.training import LocalTrainer, StepSettings

from ..errors import AttackConfigError
from ..results import MatrixRow
from .dp_audit import CanaryPlan, DPAuditConfig, DPAuditResult, OneRunAudit

__all__ = [
    "TrainingAudit",
    "TrainingAuditConfig",
    "TrainingAuditResult",
    "audit_training",
    "standard_settings",
    "training_audit_rows",
]

_MAX_DELTA_M = 0.1
_GRADIENT_CHUNK = 512  # units per per-unit-gradient call of the auditor's replay


def _default_audit() -> DPAuditConfig:
    return DPAuditConfig(num_canaries=2000, delta=1e-6)


class TrainingAuditConfig(BaseModel):
    """The audited federation, its DP setting, and the audit (module docstring for the defaults).

    Constructing it directly raises `AttackConfigError` (naming the field) for invalid values.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    audit: DPAuditConfig = Field(
        default_factory=_default_audit,
        description="m, guesses, confidence, seed, and the audit's delta (delta * m must stay <= 0.1)",
    )
    target_epsilon: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = Field(
        None, description="declared epsilon at audit.delta that sigma is calibrated for; None: clip only (sigma 0)"
    )
    noise_scale: Annotated[float, Field(ge=0, allow_inf_nan=False)] = Field(
        1.0, description="every client's actual noise is noise_scale * sigma: 1 correct, 0.25 the under-noised control"
    )
    clients: Annotated[int, Field(ge=1)] = Field(2, description="clients summed in every released round")
    rounds: Annotated[int, Field(ge=1)] = Field(2, description="released per-round sums")
    local_steps: Annotated[int, Field(ge=1)] = Field(1, description="DP-SGD steps per client per round")
    sample_rate: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)] = Field(
        1.0, description="q of every record and every inserted canary"
    )
    clip: Annotated[float, Field(gt=0, allow_inf_nan=False)] = Field(1.0, description="C, per-unit clipping norm")
    learning_rate: Annotated[float, Field(gt=0, allow_inf_nan=False)] = Field(0.02, description="SGD step size")
    records: Annotated[int, Field(ge=1)] = Field(32, description="records of the audited client 0")
    other_client_size: Annotated[float, Field(gt=0, allow_inf_nan=False)] = Field(
        2.0,
        description="records of every other client, in units of client 0's expected N (records + m/2): its noise "
        "weighs 1/other_client_size against client 0's in the released sum",
    )
    lora: LoraConfig = Field(default_factory=LoraConfig, description="adapters as the runs build them (ffa only)")
    max_length: Annotated[int, Field(ge=16)] = Field(256, description="tokens per record (the tiny tokenizer is bytes)")
    tokens_per_pass: Annotated[int, Field(ge=1)] | Literal["auto"] | None = Field(
        8192, description="LocalTrainer.tokens_per_pass: 8192 suits the tiny model; 'auto' (512 on the CPU) SmolLM2"
    )
    noise_generator: Literal["csprng", "torch"] = Field(
        "csprng", description="DP noise from the ChaCha20 keystream (the runs' default) or torch's generator"
    )
    subtract_data: bool = Field(
        True, description="the white-box auditor subtracts the records' own step at each released global adapter"
    )

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" for e in exc.errors())
            raise AttackConfigError(f"invalid TrainingAuditConfig: {problems}") from None

    @model_validator(mode="after")
    def _fits(self) -> TrainingAuditConfig:
        m, delta = self.audit.num_canaries, self.audit.delta
        if delta * m > _MAX_DELTA_M:
            raise ValueError(
                f"audit.delta * audit.num_canaries = {delta * m:.3g} > {_MAX_DELTA_M}: the bound's 2 m delta term "
                f"would swamp it; lower audit.delta below {_MAX_DELTA_M / m:.3g}"
            )
        if self.lora.aggregation != "ffa":
            raise ValueError("lora.aggregation must be 'ffa': the canaries live on lora_B, the only trained tensors")
        if self.target_epsilon is None and self.noise_scale != 1.0:
            raise ValueError("noise_scale needs a target_epsilon: without one there is no sigma to scale")
        return self

    @property
    def steps(self) -> int:
        """T, the DP-SGD steps of every client (rounds * local_steps)."""
        return self.rounds * self.local_steps

    @property
    def other_records(self) -> int:
        """Records of every client but client 0."""
        return max(1, math.ceil(self.other_client_size * (self.records + self.audit.num_canaries / 2)))

    @property
    def label(self) -> str:
        """The defense name of the rows: none, dp-eps8, dp-eps1, dp-eps1 noise at sigma/4 (control)."""
        if self.target_epsilon is None:
            return "none"
        label = f"dp-eps{self.target_epsilon:g}"
        if self.noise_scale == 1.0:
            return label
        if self.noise_scale == 0.0:
            return f"{label} without noise (control)"
        inverse = 1.0 / self.noise_scale
        scaled = f"sigma/{inverse:g}" if abs(inverse - round(inverse)) < 1e-9 else f"{self.noise_scale:g} sigma"
        return f"{label} noise at {scaled} (control)"

    def federation_key(self) -> dict[str, Any]:
        """Everything but the DP setting: configs with equal keys can share one built federation."""
        return self.model_dump(exclude={"target_epsilon", "noise_scale"})


class TrainingAuditResult(BaseModel):
    """What the audit of one training run found, next to what the accountant claims, and the run's settings.

    `empirical_epsilon` is a lower bound (at `confidence`) on the epsilon at `delta` of the mechanism
    that ran; `accountant_epsilon` is the accountant's for the declared sigma at the same delta (the
    control must exceed it, the correct-noise rows must not: `consistent`); `actual_noise_epsilon`
    is the accountant's for the noise really drawn (inf without noise).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    label: str = Field(description="defense name of the rows")
    empirical_epsilon: float = Field(ge=0)
    accountant_epsilon: float = Field(description="declared sigma, q, steps at `delta`; inf for sigma 0")
    actual_noise_epsilon: float = Field(description="the same for noise_scale * sigma; inf for none")
    declared_epsilon: float | None = Field(description="the calibration target (at `delta`); None: clip only")
    delta: float
    confidence: float
    audit: DPAuditResult = Field(description="guess details (k+, k-, tests), source 'training'")
    model: str
    clients: int
    records: list[int] = Field(description="records per client (client 0 first)")
    num_canaries: int = Field(description="m")
    num_inserted: int
    expected_batch_sizes: list[float] = Field(description="q N per client; client 0's N counts the inserted canaries")
    sample_rate: float
    rounds: int
    local_steps: int
    steps: int
    clip: float
    learning_rate: float
    noise_multiplier: float = Field(description="declared sigma")
    noise_scale: float
    subtract_data: bool
    seconds: float = Field(description="wall time of the training, the replay and the audit")

    @property
    def consistent(self) -> bool:
        """False when the lower bound exceeds the accountant's epsilon: the declared DP does not hold."""
        return self.empirical_epsilon <= self.accountant_epsilon

    def rows(self) -> list[MatrixRow]:
        """`DPAuditResult.rows` (attack dp_audit) plus the actual-noise epsilon, with defense = `label`."""
        extra = MatrixRow(
            attack="dp_audit", metric="actual_noise_epsilon", value=self.actual_noise_epsilon, chance=None
        )
        return [row.model_copy(update={"defense": self.label}) for row in [*self.audit.rows(), extra]]


# --------------------------------------------------------------------------------------------------------------
# The federation the settings share
# --------------------------------------------------------------------------------------------------------------


@dataclass
class _Federation:
    """One model with its trainer, the clients' records, the canaries, and the auditor's replay cache."""

    model_name: str
    config: TrainingAuditConfig
    model: Any
    manifest: AdapterManifest
    trainer: LocalTrainer
    data: list[TokenizedDataset]
    plan: CanaryPlan
    to_trainer: npt.NDArray[np.int64]  # manifest coordinate -> coordinate in the trainer's parameter order
    replays: dict[bytes, npt.NDArray[np.float64]] = field(default_factory=dict)

    @classmethod
    def build(cls, model_name: str, config: TrainingAuditConfig) -> _Federation:
        base, tokenizer = load_base_model(ModelConfig(name=model_name))
        model = attach_lora(base, config.lora, a0_seed=config.audit.seed)
        manifest = AdapterManifest.of(model, "ffa")
        if manifest.dimension < config.audit.num_canaries:
            raise AttackConfigError(
                f"audit.num_canaries={config.audit.num_canaries} exceeds the {manifest.dimension} lora_B coordinates; "
                "lower it or raise lora.r"
            )
        trainer = LocalTrainer(model, tokens_per_pass=config.tokens_per_pass)
        template = ChatTemplate(tokenizer, system_prompt="", max_length=config.max_length)
        sizes = [config.records] + [config.other_records] * (config.clients - 1)
        federation = synthesize_federation(config.clients, max(sizes), seed=config.audit.seed, canary_repeats=())
        data = []
        for client, size in enumerate(sizes):
            records = [
                TextRecord(r.instruction, r.input, r.output, unit=f"client{client}-record-{i}")
                for i, r in enumerate(federation.clients[client][:size])
            ]
            data.append(TokenizedDataset.build(records, template))
        plan = OneRunAudit(config.audit).draw_canaries(manifest.dimension)
        return cls(model_name, config, model, manifest, trainer, data, plan, _trainer_order(manifest, model, trainer))

    def expected_batch(self, client: int, inserted: float) -> float:
        """The expected batch size q N of `client`; client 0's N counts `inserted` canaries."""
        units = self.data[client].num_units + (inserted if client == 0 else 0.0)
        return self.config.sample_rate * units

    def records_step(self, vector: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
        """The auditor's replay: what the records alone add to one round's released sum, from `vector`.

        Per client, q times the sum of the records' clipped per-unit gradients (at `vector`) over the
        public expected batch size (client 0's with m/2 canaries), times -lr and the local steps.
        """
        key = hashlib.sha256(np.ascontiguousarray(vector).tobytes()).digest()
        if key in self.replays:
            return self.replays[key]
        cfg = self.config
        order = list(self.manifest.check(self.model).values())
        total = np.zeros(self.manifest.dimension)
        set_vector(self.model, self.manifest, vector)
        try:
            for client, data in enumerate(self.data):
                clipped = np.zeros(self.manifest.dimension)
                for start in range(0, data.num_units, _GRADIENT_CHUNK):
                    units = list(range(start, min(start + _GRADIENT_CHUNK, data.num_units)))
                    grads = self.trainer.per_unit_gradients(data.batch_of_units(units), order).double()
                    factor = (cfg.clip / (grads.norm(dim=1) + 1e-6)).clamp(max=1.0)  # Opacus' clip factor
                    clipped += (grads * factor[:, None]).sum(dim=0).numpy()
                expected = self.expected_batch(client, cfg.audit.num_canaries / 2)
                total += -cfg.learning_rate * cfg.local_steps * cfg.sample_rate * clipped / expected
        finally:
            set_vector(self.model, self.manifest, np.zeros(self.manifest.dimension, dtype=np.float32))
        self.replays[key] = total
        return total


def _trainer_order(manifest: AdapterManifest, model: Any, trainer: LocalTrainer) -> npt.NDArray[np.int64]:
    """For each coordinate of the manifest's flat vector, its index in the trainer's flattened parameters."""
    offsets, at = {}, 0
    for p in trainer.params:
        offsets[id(p)] = at
        at += p.numel()
    parts = []
    for p in manifest.check(model).values():
        if id(p) not in offsets:
            raise AttackConfigError("a manifest tensor is not trained: the canaries would never reach it")
        parts.append(offsets[id(p)] + np.arange(p.numel()))
    return np.concatenate(parts).astype(np.int64)


# --------------------------------------------------------------------------------------------------------------
# The audit
# --------------------------------------------------------------------------------------------------------------


class TrainingAudit:
    """Train a small federation with DP-SGD and Dirac canaries in client 0, and audit its released sums."""

    def __init__(self, config: TrainingAuditConfig | None = None) -> None:
        self.config = config if config is not None else TrainingAuditConfig()

    def sigma(self) -> float:
        """The declared noise multiplier: calibrated at audit.delta for target_epsilon, 0 for clip only.

        Raises:
            AttackConfigError: the target is unreachable.
        """
        cfg = self.config
        if cfg.target_epsilon is None:
            return 0.0
        audit = OneRunAudit(cfg.audit)
        return audit.calibrate_noise(cfg.target_epsilon, sample_rate=cfg.sample_rate, steps=cfg.steps)

    def run(self, model: str | Path) -> TrainingAuditResult:
        """Build the federation on `model` (a folder or a model name), train, release, and audit."""
        return self._run(_Federation.build(str(model), self.config))

    def _run(self, fed: _Federation) -> TrainingAuditResult:
        cfg = self.config
        start = time.perf_counter()
        sigma = self.sigma()
        actual = sigma * cfg.noise_scale
        released, replay = self.train(fed, actual)
        auditor = OneRunAudit(cfg.audit)
        event = DPSGDEvent(noise_multiplier=sigma, sample_rate=cfg.sample_rate, steps=cfg.steps)
        scores = released - replay if cfg.subtract_data else released
        result = auditor.audit_update(scores, fed.plan, update_kind="parameter_delta", events=[event])
        accountant = float(result.accountant_epsilon) if result.accountant_epsilon is not None else math.inf
        actual_eps = (
            auditor.accountant_epsilon([event.model_copy(update={"noise_multiplier": actual})])
            if actual > 0
            else math.inf
        )
        result = result.model_copy(
            update={
                "source": "training",
                "noise_multiplier": sigma,
                "clip_norm": cfg.clip,
                "sample_rate": cfg.sample_rate,
                "steps": cfg.steps,
            }
        )
        inserted = int(fed.plan.bits.sum())
        return TrainingAuditResult(
            label=cfg.label,
            empirical_epsilon=result.empirical_epsilon,
            accountant_epsilon=accountant,
            actual_noise_epsilon=actual_eps,
            declared_epsilon=cfg.target_epsilon,
            delta=cfg.audit.delta,
            confidence=cfg.audit.confidence,
            audit=result,
            model=fed.model_name,
            clients=cfg.clients,
            records=[d.num_units for d in fed.data],
            num_canaries=fed.plan.num_canaries,
            num_inserted=inserted,
            expected_batch_sizes=[fed.expected_batch(c, inserted) for c in range(cfg.clients)],
            sample_rate=cfg.sample_rate,
            rounds=cfg.rounds,
            local_steps=cfg.local_steps,
            steps=cfg.steps,
            clip=cfg.clip,
            learning_rate=cfg.learning_rate,
            noise_multiplier=sigma,
            noise_scale=cfg.noise_scale,
            subtract_data=cfg.subtract_data,
            seconds=time.perf_counter() - start,
        )

    def train(
        self, fed: _Federation, noise_multiplier: float
    ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        """Run the rounds; return the total of the released sums and the auditor's replay of the records' part.

        Everything the auditor uses is released or public: the per-round sums, the global adapters
        they imply, the records and the initial adapter (for the replay). The shared model is left
        at the zero adapter whatever happens.
        """
        cfg = self.config
        d = fed.manifest.dimension
        inserted = int(fed.plan.bits.sum())
        canary_rows = torch.from_numpy(fed.to_trainer[fed.plan.coordinates])
        global_vector = np.zeros(d, dtype=np.float32)
        released = np.zeros(d)
        replay = np.zeros(d)
        try:
            for round_number in range(cfg.rounds):
                if cfg.subtract_data:
                    replay += fed.records_step(global_vector)
                total = np.zeros(d)
                for client, data in enumerate(fed.data):
                    set_vector(fed.model, fed.manifest, global_vector)
                    settings = StepSettings(
                        noise_multiplier=noise_multiplier,
                        max_grad_norm=cfg.clip,
                        sample_rate=cfg.sample_rate,
                        expected_batch_size=fed.expected_batch(client, inserted),
                        steps=cfg.local_steps,
                        learning_rate=cfg.learning_rate,
                        optimizer="sgd",
                    )
                    optimizer = fed.trainer.optimizer(settings, **self._noise_source(round_number, client))
                    for step in range(cfg.local_steps):
                        rng = np.random.default_rng(
                            np.random.SeedSequence([cfg.audit.seed, 30, round_number, client, step])
                        )
                        units = np.flatnonzero(rng.random(data.num_units) < cfg.sample_rate).tolist()
                        batch = data.batch_of_units(units) if units else None
                        extra = None
                        if client == 0:
                            # every canary is sampled, inserted or not, so the draws do not depend on the bits
                            sampled = rng.random(fed.plan.num_canaries) < cfg.sample_rate
                            chosen = canary_rows[torch.from_numpy(sampled & fed.plan.bits)]
                            extra = torch.zeros((chosen.numel(), d), dtype=torch.float32)
                            extra[torch.arange(chosen.numel()), chosen] = float(cfg.clip)
                        with torch.random.fork_rng(devices=[]):  # model dropout, if any, from the seed
                            torch.manual_seed(_seed_int(cfg.audit.seed, "dropout", round_number, client, step))
                            fed.trainer.step(optimizer, batch, extra_unit_gradients=extra)
                    total += get_vector(fed.model, fed.manifest).astype(np.float64) - global_vector
                released += total  # the round's release: the sum of the clients' deltas, nothing else
                global_vector = (global_vector.astype(np.float64) + total / cfg.clients).astype(np.float32)
        finally:
            fed.trainer.reset()
            set_vector(fed.model, fed.manifest, np.zeros(d, dtype=np.float32))
        return released, replay

    def _noise_source(self, round_number: int, client: int) -> dict[str, Any]:
        cfg = self.config
        parts = (cfg.audit.seed, "noise", cfg.label, round_number, client)
        if cfg.noise_generator == "csprng":
            return {"noise_key": hashlib.sha256(repr(parts).encode()).digest()}
        return {"noise_generator": torch.Generator().manual_seed(_seed_int(*parts))}


def _seed_int(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "big")


# --------------------------------------------------------------------------------------------------------------
# The evaluation's four settings
# --------------------------------------------------------------------------------------------------------------


def standard_settings(seed: int = 0, **overrides: Any) -> list[TrainingAuditConfig]:
    """Clip only (the control that must reach >= 3), epsilon 8, epsilon 1, and epsilon 1 noised at sigma/4.

    `overrides` set the shared fields (rounds, sample_rate, records, ...); ``audit`` may be a
    `DPAuditConfig` or a dict of its fields, whose seed defaults to `seed`.

    Raises:
        AttackConfigError: an invalid override (named).
    """
    audit = overrides.pop("audit", None)
    if isinstance(audit, DPAuditConfig):
        audit_config = audit
    else:
        fields = {"num_canaries": 2000, "delta": 1e-6, "seed": seed, **(audit or {})}
        audit_config = DPAuditConfig(**fields)
    shared = {"audit": audit_config, **overrides}
    return [
        TrainingAuditConfig(**shared),
        TrainingAuditConfig(**shared, target_epsilon=8.0),
        TrainingAuditConfig(**shared, target_epsilon=1.0),
        TrainingAuditConfig(**shared, target_epsilon=1.0, noise_scale=0.25),
    ]


def audit_training(model: str | Path, settings: Sequence[TrainingAuditConfig]) -> list[TrainingAuditResult]:
    """Run every setting on one federation built once (they may differ only in target_epsilon and noise_scale).

    The replay of the records at the initial adapter is shared, so four settings cost about four
    trainings and five replays of one round.

    Raises:
        AttackConfigError: no settings, or settings that differ in more than the DP setting.
    """
    if not settings:
        raise AttackConfigError("settings is empty: give at least one TrainingAuditConfig")
    key = settings[0].federation_key()
    for config in settings[1:]:
        if config.federation_key() != key:
            raise AttackConfigError("settings may differ only in target_epsilon and noise_scale; run them separately")
    fed = _Federation.build(str(model), settings[0])
    results = []
    for config in settings:
        fed.config = config
        results.append(TrainingAudit(config)._run(fed))
    return results


def training_audit_rows(model: str | Path, *, seed: int = 0, **overrides: Any) -> list[MatrixRow]:
    """The evaluation's dp_audit rows from real training: `audit_training(model, standard_settings(seed))`.

    Defense labels: "none" (clip only: the control), "dp-eps8", "dp-eps1", "dp-eps1 noise at sigma/4 (control)".
    """
    return [row for result in audit_training(model, standard_settings(seed, **overrides)) for row in result.rows()]
