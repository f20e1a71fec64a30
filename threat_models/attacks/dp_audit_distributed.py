"""One-run DP audit of distributed record-level DP-SGD, run through the mechanism's own code.

Why this exists: `OneRunAudit.simulate` audits a Gaussian model of DP-SGD. Distributed mode
(`privacy.mode = "distributed"`, `secure_fedllm.privacy.distributed`) is a different mechanism:
scaling to the ring, conditional randomized rounding, Skellam noise shares drawn from a keystream,
an integer sum through secure aggregation, and its own accountant (`SkellamRDPAccountant`). A bug
in any of these (a share drawn at the wrong mu, a miscounted number of honest shares, a scale that
does not match the sensitivity the accountant charges) leaves the accountant's epsilon unchanged;
an audit of what the server actually receives is what can catch it.

The audited run (`DistributedAudit.run`), with the parameters `calibrate_distributed` derives for a
declared epsilon:

* m Dirac canaries, canary i a gradient ``C * e_{j_i}`` on its own coordinate ``j_i`` of a
  d-dimensional vector (d = m + slack), inserted with probability 1/2 (secret bit S_i, from the
  seeded `OneRunAudit.draw_canaries`). An inserted canary is one record of ONE client (canary i
  belongs to client i mod n);
* each of T steps: every client Poisson-samples its canaries at the common rate q, passes the rows
  of its sampled inserted canaries to `DistributedDP.quantize` (clip to C, scale by s, conditional
  rounding, exactly what a client does with its per-unit gradients), adds its
  `DistributedDP.noise_share` drawn from a real `SecretSource`, and the n integer vectors are summed
  by a full semi-honest SecAgg session (`protocols.run_sessions` with a `SecAggFamily`, integer ring
  inputs; ``aggregation="ring"`` sums the same vectors mod 2^b directly, bit-identical and faster);
* the auditor sees only the T released signed sums, scores canary i by their total on ``j_i``,
  guesses and bounds with `OneRunAudit.audit_update` (Steinke, Nasr, Jagielski 2023, Thm. 3;
  the (k+, k-) search Bonferroni-corrected by default).

Which noise. Shares are calibrated for h = n - n_C - d_max honest survivors, each Skellam(mu / h).
``shares="honest-only"`` (default) lets exactly h clients add a share, so every sum carries
Skellam(mu): exactly the accounted mechanism. ``shares="all"`` lets all n clients add one, as in an
honest run with no dropouts; the sum then carries Skellam(n mu / h), MORE noise than the accountant
assumes, so that audit can only under-estimate the mechanism the accountant describes.
``noise_scale`` multiplies every share's standard deviation (share parameter times noise_scale^2):
1.0 is the implementation, 0.25 an under-noised one (each share at sigma/4, i.e. mu/16), 0 the
clip-only control (no share at all).

Which delta. The audit's delta (``audit.delta``) enters the bound as ``2 m delta``; it must stay
well below 1 (``delta * m <= 0.1`` is enforced). The accountant's epsilon is recomputed at that
same delta and under add/remove neighbouring (a canary is present or absent), so the two numbers
compare like with like; the declared epsilon (at the calibration delta and relation) is reported
beside them.

What it can and cannot show (measured at n = 5, h = 3, declared epsilon 1, delta 1e-5, q = 1, T = 1):
the calibrated noise reaches ~0.1 (m = 1000) to ~0.3 (m = 5000) against the accountant's 1; shares
at sigma/4 reach ~1.4 (m = 1000) to ~2.0 (m = 5000); with m = 5000 the audit refutes epsilon 1 only
once the shares' std is below about 0.4 sigma. More canaries stop helping near m = 5000 (the
``2 m delta`` term). A one-run bound saturates near 5 (m = 1000) or 6 (m = 5000) even without noise,
so a claim of epsilon 8 cannot be refuted by it at all. The canaries are Dirac gradients on
coordinates no real gradient uses and the clients hold no other records: real gradient mass on
those coordinates would only add noise the auditor cannot remove, so leaving it out can only make
the audit stronger, never unsound. The auditor sees only the sum of the T releases, which loses the
per-step information an adaptive attacker has; with q < 1 that and the loose subsampling bound the
accountant uses (Zhu and Wang's general Theorem 5) make the audit far weaker than at q = 1.
"""

from __future__ import annotations

import math
import time
from typing import Annotated, Any, Literal

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from protocols import DeterministicRandom, OsRandom, SecAggFamily, SecAggParams, SecretSource, run_sessions
from secure_fedllm.errors import ConfigError
from secure_fedllm.federation.aggregation import signed_sum
from secure_fedllm.privacy import IntegerNoiseEvent, SkellamRDPAccountant
from secure_fedllm.privacy.distributed import DistributedDP, calibrate_distributed

from ..errors import AttackConfigError
from ..results import MatrixRow
from .dp_audit import CanaryPlan, DPAuditConfig, DPAuditResult, OneRunAudit

__all__ = ["DistributedAudit", "DistributedAuditConfig", "DistributedAuditResult", "audit_distributed"]

_MAX_DELTA_M = 0.1


class DistributedAuditConfig(BaseModel):
    """The audited deployment (clients, collusion and dropout assumptions, q, T, C) and the audit itself.

    Constructing it directly raises `AttackConfigError` (naming the field) for invalid values.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    audit: DPAuditConfig = Field(
        default_factory=DPAuditConfig,
        description="m, guesses, confidence, seed, and the audit's delta (delta * m must stay <= 0.1)",
    )
    target_epsilon: Annotated[float, Field(gt=0, allow_inf_nan=False)] = Field(
        1.0, description="the declared epsilon the mechanism is calibrated for"
    )
    delta: Annotated[float, Field(gt=0, lt=1)] = Field(1e-5, description="the calibration's delta")
    clients: Annotated[int, Field(ge=1)] = Field(5, description="n: clients in every round")
    corrupt: Annotated[int, Field(ge=0)] = Field(1, description="n_C the shares are sized for")
    dropouts: Annotated[int, Field(ge=0)] = Field(1, description="d_max the shares are sized for")
    sample_rate: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)] = Field(1.0, description="q")
    steps: Annotated[int, Field(ge=1)] = Field(1, description="T: released sums")
    clip: Annotated[float, Field(gt=0, allow_inf_nan=False)] = Field(1.0, description="C")
    slack: Annotated[int, Field(ge=0)] = Field(64, description="coordinates beyond the m canaries: d = m + slack")
    neighbouring: Literal["add_remove", "replace"] = Field(
        "add_remove", description="relation the noise is calibrated under (the audit always tests add/remove)"
    )
    shares: Literal["honest-only", "all"] = Field(
        "honest-only", description="who adds a noise share: the h accounted for (exact) or all n (more noise)"
    )
    noise_scale: Annotated[float, Field(ge=0, allow_inf_nan=False)] = Field(
        1.0, description="multiplies each share's std: 1 correct, 0.25 under-noised control, 0 clip-only"
    )
    aggregation: Literal["secagg", "ring"] = Field(
        "secagg", description="a full SecAgg session per step, or the same integer vectors summed mod 2^b"
    )
    secret_source: Literal["deterministic", "os"] = Field(
        "deterministic", description="noise shares and SecAgg keys: seeded DeterministicRandom or os.urandom"
    )

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" for e in exc.errors())
            raise AttackConfigError(f"invalid DistributedAuditConfig: {problems}") from None

    @model_validator(mode="after")
    def _audit_fits(self) -> DistributedAuditConfig:
        m, delta = self.audit.num_canaries, self.audit.delta
        if delta * m > _MAX_DELTA_M:
            raise ValueError(
                f"audit.delta * audit.num_canaries = {delta * m:.3g} > {_MAX_DELTA_M}: the bound's 2 m delta term "
                f"would swamp it; lower audit.delta below {_MAX_DELTA_M / m:.3g}"
            )
        if self.clients - self.corrupt - self.dropouts < 1:
            raise ValueError(
                f"clients={self.clients} with corrupt={self.corrupt} and dropouts={self.dropouts} leave no honest share"
            )
        return self

    @property
    def honest(self) -> int:
        """The honest shares the calibration counts on: h = n - n_C - d_max."""
        return self.clients - self.corrupt - self.dropouts

    @property
    def dimension(self) -> int:
        """The audited vector's length: d = m + slack."""
        return self.audit.num_canaries + self.slack


class DistributedAuditResult(BaseModel):
    """What the audit found next to what the accountant claims, and which noise the sums really carried.

    `empirical_epsilon` is a lower bound (at `confidence`) on the add/remove epsilon at `delta` of the
    mechanism that ran; `accountant_epsilon` is the accountant's epsilon for the calibrated mechanism
    at the same delta and relation. Exceeding it means the implementation or the accounting is wrong
    (see `consistent`). `actual_epsilon` is the accountant's epsilon for the noise actually in the sums
    (inf without noise): the audit must stay below it whatever `noise_scale` was.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    empirical_epsilon: float = Field(ge=0, description="one-run lower bound at `delta`")
    accountant_epsilon: float = Field(description="SkellamRDPAccountant, add/remove, at `delta`, calibrated mu")
    actual_epsilon: float = Field(description="the same for the central mu actually in the sums; inf for none")
    declared_epsilon: float = Field(description="the target the parameters were calibrated for")
    declared_delta: float = Field(description="the calibration's delta")
    declared_neighbouring: str
    delta: float = Field(description="the audit's delta (also the accountant_epsilon's)")
    confidence: float
    num_canaries: int = Field(description="m")
    guesses: int = Field(description="r")
    correct: int = Field(description="v")
    audit: DPAuditResult = Field(description="the guess details (k+, k-, tests) of the one-run audit")
    shares: Literal["honest-only", "all"]
    noise_scale: float
    noising_clients: int = Field(description="clients that added a share to every sum")
    clients: int
    honest: int
    accounted_mu: float = Field(description="central Skellam mu the accountant charges")
    share_mu: float = Field(description="Skellam mu of each share actually drawn (0: none)")
    central_mu: float = Field(description="Skellam mu actually in every released sum")
    noise_multiplier: float = Field(description="accounted std / l2")
    l2: float
    scale: float
    dimension: int
    sample_rate: float
    steps: int
    aggregation: Literal["secagg", "ring"]
    secret_source: Literal["deterministic", "os"]
    seconds: float = Field(description="wall time of the T steps and the audit")

    @property
    def consistent(self) -> bool:
        """False when the empirical lower bound exceeds the accountant's epsilon: DP is broken somewhere."""
        return self.empirical_epsilon <= self.accountant_epsilon

    def rows(self) -> list[MatrixRow]:
        """The one-run audit's rows plus the actual-noise epsilon, tagged with the distributed defense."""
        extra = MatrixRow(
            attack="dp_audit", defense="", metric="actual_noise_epsilon", value=self.actual_epsilon, chance=None
        )
        tag = f"distributed/{self.shares}/noise_scale={self.noise_scale:g}"
        return [row.model_copy(update={"defense": tag}) for row in [*self.audit.rows(), extra]]


class DistributedAudit:
    """Audit distributed DP-SGD's released sums with Dirac canaries (module docstring)."""

    def __init__(self, config: DistributedAuditConfig | None = None) -> None:
        self.config = config if config is not None else DistributedAuditConfig()

    def mechanism(self) -> DistributedDP:
        """The parameters every party derives from the declared epsilon (`calibrate_distributed`).

        Raises:
            AttackConfigError: the target is unreachable or a parameter is out of range.
        """
        cfg = self.config
        try:
            return calibrate_distributed(
                target_epsilon=cfg.target_epsilon,
                delta=cfg.delta,
                sample_rate=cfg.sample_rate,
                steps=cfg.steps,
                clip=cfg.clip,
                dimension=cfg.dimension,
                parties=cfg.clients,
                corrupt=cfg.corrupt,
                dropouts=cfg.dropouts,
                neighbouring=cfg.neighbouring,
            )
        except ConfigError as exc:
            raise AttackConfigError(str(exc)) from exc

    def run(self) -> DistributedAuditResult:
        """Run T steps of the mechanism with the canaries in, release the sums, and audit them."""
        cfg = self.config
        start = time.perf_counter()
        dp = self.mechanism()
        plan = self.plan()
        released = self.release(dp, plan)
        audit = OneRunAudit(cfg.audit).audit_update(released.astype(np.float64), plan)
        noising, noisy = self._noise(dp)
        share_mu = noisy.share_mu if noisy is not None else 0.0
        central_mu = noising * share_mu
        accountant = SkellamRDPAccountant(neighbouring="add_remove")
        accounted = accountant.epsilon([dp.event(cfg.steps)], cfg.audit.delta)
        actual = (
            accountant.epsilon([_event(dp, central_mu, cfg.steps)], cfg.audit.delta) if central_mu > 0 else math.inf
        )
        audit = audit.model_copy(
            update={
                "accountant_epsilon": accounted,
                "clip_norm": cfg.clip,
                "sample_rate": cfg.sample_rate,
                "steps": cfg.steps,
                "noise_multiplier": dp.noise_multiplier,
            }
        )
        return DistributedAuditResult(
            empirical_epsilon=audit.empirical_epsilon,
            accountant_epsilon=accounted,
            actual_epsilon=actual,
            declared_epsilon=cfg.target_epsilon,
            declared_delta=cfg.delta,
            declared_neighbouring=cfg.neighbouring,
            delta=cfg.audit.delta,
            confidence=cfg.audit.confidence,
            num_canaries=audit.num_canaries,
            guesses=audit.guesses,
            correct=audit.correct,
            audit=audit,
            shares=cfg.shares,
            noise_scale=cfg.noise_scale,
            noising_clients=noising,
            clients=cfg.clients,
            honest=cfg.honest,
            accounted_mu=dp.mu,
            share_mu=share_mu,
            central_mu=central_mu,
            noise_multiplier=dp.noise_multiplier,
            l2=dp.l2,
            scale=dp.scale,
            dimension=cfg.dimension,
            sample_rate=cfg.sample_rate,
            steps=cfg.steps,
            aggregation=cfg.aggregation,
            secret_source=cfg.secret_source,
            seconds=time.perf_counter() - start,
        )

    def plan(self) -> CanaryPlan:
        """The canaries' coordinates in [0, d) and their secret bits (seeded by ``audit.seed``)."""
        return OneRunAudit(self.config.audit).draw_canaries(self.config.dimension)

    def release(self, dp: DistributedDP, plan: CanaryPlan) -> npt.NDArray[np.int64]:
        """The total of the T released signed sums: everything the auditor gets to see."""
        noising, noisy = self._noise(dp)
        released = np.zeros(self.config.dimension, dtype=np.int64)
        for step in range(self.config.steps):
            released += self._aggregate(self._contributions(dp, noisy, noising, plan, step), step)
        return released

    # -- one step ------------------------------------------------------------------------------

    def _noise(self, dp: DistributedDP) -> tuple[int, DistributedDP | None]:
        """How many clients add a share, and the parameters their shares are drawn with (None: no noise)."""
        cfg = self.config
        noising = cfg.honest if cfg.shares == "honest-only" else cfg.clients
        if cfg.noise_scale == 0:
            return 0, None
        return noising, dp.model_copy(update={"mu": dp.mu * cfg.noise_scale**2})

    def _source(self, purpose: str, step: int, party: int) -> SecretSource:
        if self.config.secret_source == "os":
            return OsRandom()
        return DeterministicRandom(f"dp-audit-distributed/{self.config.audit.seed}/{purpose}/{step}/{party}".encode())

    def _contributions(
        self, dp: DistributedDP, noisy: DistributedDP | None, noising: int, plan: CanaryPlan, step: int
    ) -> list[npt.NDArray[np.int64]]:
        """Each client's z_i: its sampled inserted canaries through `quantize`, plus its noise share."""
        cfg = self.config
        owner = np.arange(plan.num_canaries) % cfg.clients
        seed = cfg.audit.seed
        sampling = np.random.default_rng(np.random.SeedSequence([seed, 10, step]))
        # Poisson sampling of every canary, inserted or not, so the draws do not depend on the bits
        sampled = sampling.random(plan.num_canaries) < cfg.sample_rate
        inputs = []
        for client in range(cfg.clients):
            chosen = plan.coordinates[(owner == client) & plan.bits & sampled]
            rows = np.zeros((chosen.size, cfg.dimension))
            rows[np.arange(chosen.size), chosen] = cfg.clip
            rounding = np.random.default_rng(np.random.SeedSequence([seed, 11, step, client]))
            z = dp.quantize(rows, rounding)
            if noisy is not None and client < noising:
                z = z + noisy.noise_share(self._source("noise", step, client))
            inputs.append(z)
        return inputs

    def _aggregate(self, inputs: list[npt.NDArray[np.int64]], step: int) -> npt.NDArray[np.int64]:
        """The released signed sum of one step: a full SecAgg session, or the same ring sum computed directly."""
        cfg = self.config
        if cfg.aggregation == "ring":
            ring = (np.sum(inputs, axis=0) & 0xFFFFFFFF).astype(np.uint32)  # Z_(2^32), SecAgg's default ring
            return np.asarray(ring.view(np.int32), dtype=np.int64)
        params = SecAggParams.secagg(cfg.clients, dimension=cfg.dimension, clip_range=1.0)
        report = run_sessions(
            SecAggFamily(params),
            inputs,
            round_number=step,
            context=b"dp-audit-distributed",
            rng_for=lambda party: self._source("secagg", step, party),
        )
        result = report.result
        if result.ring_sum is None or len(result.included) != cfg.clients:
            raise AttackConfigError(f"step {step}: SecAgg released no sum of all {cfg.clients} clients")
        return signed_sum(np.asarray(result.ring_sum))


def _event(dp: DistributedDP, mu: float, steps: int) -> IntegerNoiseEvent:
    return IntegerNoiseEvent(mu=mu, l1=dp.l1, l2=dp.l2, sample_rate=dp.sample_rate, steps=steps)


def audit_distributed(**settings: Any) -> DistributedAuditResult:
    """`DistributedAudit(DistributedAuditConfig(**settings)).run()`.

    Raises:
        AttackConfigError: an invalid setting (named).
    """
    return DistributedAudit(DistributedAuditConfig(**settings)).run()
