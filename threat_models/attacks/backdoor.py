"""Backdoor by model replacement: one malicious client boosts a poisoned LoRA update through secure aggregation.

Bagdasaryan et al. (AISTATS 2020): a client that wants the global model G to become its backdoored
model X sends boost * (X - G) instead of X - G; with boost = n, FedAvg's mean is X - G plus the honest
drift, and one round replaces the model. The trigger is a rare word (Kurita et al. 2020) appended to
the instruction; the backdoor's response is `MaliciousClient.target_response`.

Why the encoders' bound does not stop it: each client clips its *own* input to [-c, c] per coordinate
(`FixedPointEncoding.clip_range`). That caps anyone's share of the mean at c / n per coordinate, but
the attacker trains X inside ||X - G||_inf <= c / boost, so its boosted update passes its encoder
untouched (`clipped_coordinates` = 0; a client could also skip the clip, up to the ring's headroom).
Honest updates fill part of the box and partly cancel; the attacker fills all of it. It also
anticipates the honest drift: from its own records and the public round plan it simulates honest
updates (on bootstrap resamples, for their spread) and trains X so that the backdoor holds at
G + drift + (X - G) for drifts drawn from them. The server sees only the sum (`aggregate_l2`): with
Adam clients its norm is about what it is without the attack; with SGD or DP noise it grows, which a
server may notice but cannot attribute to a client or undo.

What a server-visible defense would need (`SERVER_DEFENSE`): a bound checked on each masked input,
i.e. a zero-knowledge proof of the input's L2 norm (RoFL, Lycklama et al. S&P 2023; EIFFeL, Roy
Chowdhury et al. CCS 2022). Norm clipping by the server (Sun et al. 2019), the contrast row here, and
robust aggregation need the individual updates: the 'none' defense, without secure aggregation.

Metrics: ASR is the fraction of held-out triggered prompts for which greedy decoding emits exactly the
target response and stops (every teacher-forced argmax is the target token, end of turn included);
`false_trigger_rate` is the same test on clean prompts; clean loss is the response-token loss on
held-out clean records. On the tiny random LLaMA the box c / n leaves room for the takeover but not
reliably for a trigger-conditional rule: the backdoor often fires on clean prompts too (`stealth`
trades ASR for fewer false triggers).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import numpy.typing as npt
import torch
from peft import PeftModel
from pydantic import BaseModel, ConfigDict, Field, model_validator

from protocols import SecAggParams, run_round
from secure_fedllm.adapters import AdapterManifest, attach_lora, get_vector, set_vector
from secure_fedllm.config import LoraConfig, ModelConfig
from secure_fedllm.data import ChatTemplate, TokenizedDataset
from secure_fedllm.models import load_base_model
from secure_fedllm.training import LocalTrainer, StepSettings, per_example_loss

from ..adversaries import MaliciousClient
from ..results import MatrixRow
from ..stats import clopper_pearson
from ._backdoor_task import BackdoorTask, greedy_match, response_loss

__all__ = ["SERVER_DEFENSE", "Backdoor", "BackdoorConfig", "BackdoorOutcome", "BackdoorResult"]

SERVER_DEFENSE = (
    "The server sees only the sum, so a defense must be checked on each masked input without opening it: "
    "a zero-knowledge proof that the input's L2 norm is within a public bound (RoFL, EIFFeL). Per-coordinate "
    "clipping in each client's own encoder caps a client at c / n per coordinate, which a boosted update fills. "
    "Norm clipping by the server or robust aggregation (Krum, trimmed mean) needs the individual updates, i.e. "
    "gives up secure aggregation."
)
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
NORM_CLIP = "none + norm clip"
Condition = Literal["no-attack", "unboosted", "boosted"]
Vector = npt.NDArray[np.float64]


class BackdoorConfig(BaseModel):
    """One round from the base model; the last of `num_clients` clients is malicious.

    Honest clients run the plan: `honest_steps` DP-SGD steps (Poisson batches of half their records,
    clip 1, `honest_noise_multiplier`) with `honest_optimizer`, as `secure-fedllm run` does by default.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    adversary: MaliciousClient = MaliciousClient(boost=4.0, target_response="GRANTED")
    num_clients: Annotated[int, Field(ge=3, le=16)] = 4
    protocol: Literal["secagg", "secagg+"] = "secagg+"
    clip_range: Annotated[float, Field(gt=0)] = Field(0.1, description="public per-coordinate encoder bound c")
    records_per_client: Annotated[int, Field(ge=8)] = 64
    poison_fraction: Annotated[float, Field(gt=0, lt=1)] = Field(0.5, description="of the attacker's records")
    heldout: Annotated[int, Field(ge=8)] = Field(128, description="held-out triggered prompts (and clean records)")
    lora_rank: Annotated[int, Field(ge=1, le=256)] = 16
    target_modules: tuple[str, ...] = Field(ALL_LINEAR, min_length=1)
    max_length: Annotated[int, Field(ge=32)] = 128
    honest_optimizer: Literal["adam", "sgd"] = "adam"
    honest_learning_rate: Annotated[float, Field(gt=0)] = 0.02
    honest_steps: Annotated[int, Field(ge=1)] = 3
    honest_noise_multiplier: Annotated[float, Field(ge=0)] = Field(0.0, description="DP-SGD sigma of honest clients")
    attack_steps: Annotated[int, Field(ge=1)] = 200
    attack_learning_rate: Annotated[float, Field(gt=0)] = 0.005
    attack_batch: Annotated[int, Field(ge=1)] = 16
    simulated_honest: Annotated[int, Field(ge=0)] = Field(12, description="honest updates the attacker simulates")
    stealth: bool = Field(False, description="also train clean prompts' first response tokens (fewer false triggers)")
    seed: int = 0

    @model_validator(mode="after")
    def _usable(self) -> BackdoorConfig:
        if not self.adversary.trigger.strip() or not self.adversary.target_response.strip():
            raise ValueError("adversary.trigger and adversary.target_response must be non-empty")
        if not 1 <= round(self.records_per_client * self.poison_fraction) < self.records_per_client:
            raise ValueError("poison_fraction leaves the attacker no poisoned or no clean record; change it")
        return self

    @classmethod
    def quick(cls, **overrides: object) -> BackdoorConfig:
        """The run for `secure-fedllm evaluate --quick` and tests (about 10 s on one CPU thread)."""
        return cls.model_validate({"attack_steps": 100, "simulated_honest": 8, "heldout": 32, **overrides})


class BackdoorOutcome(BaseModel):
    """The global model after the round under one condition and one defense."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    condition: Condition
    defense: str = Field(description="secagg / secagg+ (the server sees the sum) or 'none + norm clip'")
    boost: float
    asr: float = Field(description="fraction of triggered held-out prompts that greedily yield the target")
    asr_ci_low: float
    asr_ci_high: float
    token_accuracy: float = Field(description="teacher-forced accuracy on the target's tokens")
    false_trigger_rate: float = Field(description="the ASR test on clean prompts")
    clean_loss: float
    malicious_l2: float = Field(description="L2 norm of the attacker's submitted update (0 without attack)")
    malicious_max_abs: float
    clipped_coordinates: int = Field(description="coordinates of the attacker's update that its encoder clips")
    aggregate_l2: float = Field(description="L2 norm of the aggregated mean: what a secure-aggregation server sees")


class BackdoorResult(BaseModel):
    """Every outcome (no attack first), the honest updates' norms and what a server-visible defense needs."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    outcomes: tuple[BackdoorOutcome, ...]
    clip_range: float
    honest_l2: tuple[float, ...]
    trials: int
    server_defense: str = SERVER_DEFENSE

    def outcome(self, condition: Condition, defense: str | None = None) -> BackdoorOutcome:
        """The outcome of `condition`, under `defense` (default: secure aggregation)."""
        for o in self.outcomes:
            if o.condition == condition and (o.defense == defense or (defense is None and o.defense != NORM_CLIP)):
                return o
        raise KeyError((condition, defense))

    def rows(self) -> list[MatrixRow]:
        """ASR, false-trigger rate and clean loss per attack outcome (defense filled in); chance: no attack."""
        base, rows = self.outcomes[0], []
        for o in self.outcomes[1:]:
            attack = "backdoor" if o.condition == "boosted" else "backdoor_unboosted"
            ci = {"ci_low": o.asr_ci_low, "ci_high": o.asr_ci_high}
            for metric, value, chance, extra in (
                ("asr", o.asr, base.asr, ci),
                ("false_trigger_rate", o.false_trigger_rate, base.false_trigger_rate, {}),
                ("clean_loss", o.clean_loss, base.clean_loss, {}),
            ):
                rows.append(MatrixRow(attack=attack, defense=o.defense, metric=metric, value=value, chance=chance,
                                      **extra))  # fmt: skip
        return rows


class Backdoor:
    """No attack, the poisoned update unboosted and boosted through secure aggregation, and server norm clipping."""

    def __init__(self, config: BackdoorConfig | None = None) -> None:
        self.config = config or BackdoorConfig()

    def run(self, model: str | Path) -> BackdoorResult:
        """Play one round from the base model (adapter B = 0) and measure the global model after it.

        Args:
            model: a local model folder (e.g. from `secure_fedllm.tiny_model.save_tiny_llama`) or a cached id.
        """
        cfg, boost = self.config, self.config.adversary.boost
        base, tokenizer = load_base_model(ModelConfig(name=str(model)))
        peft = attach_lora(base, LoraConfig(r=cfg.lora_rank, target_modules=cfg.target_modules), a0_seed=cfg.seed + 1)
        manifest = AdapterManifest.of(peft, "ffa")
        data = BackdoorTask(cfg, ChatTemplate(tokenizer, system_prompt="", max_length=cfg.max_length))
        start = get_vector(peft, manifest).astype(np.float64)
        honest, simulated = self._honest(peft, manifest, start, data)
        make = SecAggParams.secagg if cfg.protocol == "secagg" else SecAggParams.secagg_plus
        params = make(cfg.num_clients, dimension=len(start), clip_range=cfg.clip_range)

        def measure(condition: Condition, defense: str, scale: float, updates: list[Vector]) -> BackdoorOutcome:
            protocol: Literal["secagg", "plaintext"] = "plaintext" if defense == NORM_CLIP else "secagg"
            mean = np.asarray(run_round(params, updates, protocol=protocol).result.decoded.mean())
            set_vector(peft, manifest, start + mean)
            hits, accuracy = greedy_match(peft, data.triggered)
            false_hits, _ = greedy_match(peft, data.clean_prompts)
            low, high = clopper_pearson(int(hits.sum()), len(hits))
            mal = updates[-1] if condition != "no-attack" else np.zeros(1)
            return BackdoorOutcome(
                condition=condition, defense=defense, boost=scale, asr=float(hits.mean()), asr_ci_low=low,
                asr_ci_high=high, token_accuracy=accuracy, false_trigger_rate=float(false_hits.mean()),
                clean_loss=response_loss(peft, data.clean), malicious_l2=float(np.linalg.norm(mal)),
                malicious_max_abs=float(np.abs(mal).max()),
                clipped_coordinates=int((np.abs(mal) > cfg.clip_range * 1.000001).sum()),
                aggregate_l2=float(np.linalg.norm(mean)),
            )  # fmt: skip

        try:
            outcomes = [measure("no-attack", cfg.protocol, 1.0, [*honest, simulated[0]])]  # the last client honest
            delta = self._poison(peft, manifest, start, data, simulated)  # X - G, inside the box c / boost
            outcomes.append(measure("unboosted", cfg.protocol, 1.0, [*honest, delta]))
            updates = [*honest, boost * delta]
            outcomes.append(measure("boosted", cfg.protocol, boost, updates))
            bound = float(np.median([np.linalg.norm(u) for u in updates]))  # Sun et al. 2019: a norm bound
            clipped = [u * min(1.0, bound / max(float(np.linalg.norm(u)), 1e-300)) for u in updates]
            outcomes.append(measure("boosted", NORM_CLIP, boost, clipped))
        finally:
            set_vector(peft, manifest, start)
        honest_l2 = tuple(float(np.linalg.norm(u)) for u in honest)
        return BackdoorResult(outcomes=tuple(outcomes), clip_range=cfg.clip_range, honest_l2=honest_l2,
                              trials=len(data.triggered.examples))  # fmt: skip

    def _honest(
        self, peft: PeftModel, manifest: AdapterManifest, start: Vector, data: BackdoorTask
    ) -> tuple[list[Vector], list[Vector]]:
        """The honest clients' updates, and the attacker's honest update on its records and on resamples of them."""
        cfg = self.config
        batch = cfg.records_per_client // 2
        settings = StepSettings(
            noise_multiplier=cfg.honest_noise_multiplier, max_grad_norm=1.0, sample_rate=batch / cfg.records_per_client,
            expected_batch_size=batch, steps=cfg.honest_steps, learning_rate=cfg.honest_learning_rate,
            optimizer=cfg.honest_optimizer,
        )  # fmt: skip
        resample = np.random.default_rng(cfg.seed + 17)
        own = data.simulation.examples
        jobs = [*data.honest, data.simulation]  # the first simulation is its honest update on its own records
        for _ in range(cfg.simulated_honest - 1):
            rows = [own[i] for i in resample.integers(len(own), size=len(own))]
            jobs.append(TokenizedDataset(rows, [[i] for i in range(len(rows))], pad_id=data.simulation.pad_id))
        trainer, updates = LocalTrainer(peft), []
        try:
            for seed, dataset in enumerate(jobs, start=cfg.seed):
                set_vector(peft, manifest, start)
                trainer.train(dataset, settings, sample_generator=torch.Generator().manual_seed(seed),
                              noise_generator=torch.Generator().manual_seed(seed + 500))  # fmt: skip
                updates.append(get_vector(peft, manifest).astype(np.float64) - start)
        finally:
            trainer.module.to_standard_module()  # the attacker trains with plain autograd
            set_vector(peft, manifest, start)
        return updates[: len(data.honest)], updates[len(data.honest) :]

    def _poison(
        self, peft: PeftModel, manifest: AdapterManifest, start: Vector, data: BackdoorTask, simulated: list[Vector]
    ) -> Vector:
        """Adam on delta inside ||boost * delta||_inf <= c, the loss taken at G + drift + delta.

        Each step's drift is the sum of n - 1 simulated honest updates (drawn with replacement) over n: the
        honest share of the mean, so that the backdoor is trained to survive it.
        """
        cfg = self.config
        n, bound = cfg.num_clients, cfg.clip_range / cfg.adversary.boost
        params = list(manifest.check(peft).values())
        deltas = [torch.zeros_like(p, requires_grad=True) for p in params]
        optimizer = torch.optim.Adam(deltas, lr=cfg.attack_learning_rate)
        rows, draws = torch.Generator().manual_seed(cfg.seed + 7), np.random.default_rng(cfg.seed + 13)
        for _ in range(cfg.attack_steps):
            drift = sum((simulated[i] for i in draws.integers(len(simulated), size=n - 1)), np.zeros_like(start))
            set_vector(peft, manifest, start + (drift / n if cfg.simulated_honest else 0.0))
            with torch.no_grad():
                for p, d in zip(params, deltas, strict=True):
                    p.add_(d)
            chosen = torch.randperm(len(data.attacker.examples), generator=rows)[: cfg.attack_batch].tolist()
            loss = per_example_loss(peft, data.attacker.batch_of_rows(chosen)).mean()
            for d, g in zip(deltas, torch.autograd.grad(loss, params), strict=True):
                d.grad = g
            optimizer.step()
            with torch.no_grad():
                for d in deltas:
                    d.clamp_(-bound, bound)
        return np.concatenate([d.detach().double().numpy().ravel() for d in deltas])
