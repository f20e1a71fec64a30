"""One-run DP audit with white-box Dirac canaries (Steinke, Nasr, Jagielski, NeurIPS 2023).

Why this exists: the accountant's epsilon is an *upper* bound derived from the analysis; a bug in clipping,
noise scale, sampling or accounting would not show in it. An audit gives a statistically valid *lower* bound
from what an attacker actually observes. If the audit's lower bound exceeds the accountant's epsilon, the
implementation (or the accounting) is wrong.

The audit, in one training run:

* m canaries, each a Dirac gradient ``C * e_j`` on its own coordinate ``j`` of the LoRA B vector, so that
  per-example clipping to norm C leaves it unchanged; canary i is inserted with probability 1/2 (secret bit
  S_i) into one client's DP-SGD run, as its own "example" in every step in which it is sampled;
* the auditor sees that client's individual update (the sum of noisy clipped gradients or the final
  parameter delta) and scores canary i by the update's value on coordinate ``j_i``;
* it guesses "included" for the k+ highest scores and "excluded" for the k- lowest and abstains otherwise;
* from the number of guesses r and correct guesses v, Theorem 3 of the paper bounds what any (eps, delta)-DP
  mechanism allows: ``P[v' >= v] <= P[Binomial(r, e^eps / (1 + e^eps)) >= v] + 2 m delta alpha``; the
  reported epsilon is the largest eps whose bound is still below the significance ``1 - confidence``.

Because a Dirac canary occupies a coordinate no real gradient needs, the canary part of the mechanism can be
simulated exactly (`OneRunAudit.simulate`): per step, the sum of the sampled canaries' gradients plus
``N(0, (sigma C)^2)`` per coordinate, optionally plus real gradient mass independent of the bits (which only
weakens the audit). `OneRunAudit.audit_update` audits a real trained update instead.

Choosing k+ and k- after seeing the scores is a multiple test. The paper reports the best of a few choices
and says so; here a search is Bonferroni-corrected by default (significance divided by the number of
(k+, k-) pairs tried), which keeps the bound valid; ``correct_for_search=False`` reproduces the paper's
uncorrected reporting and the result records which was used.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from scipy import special, stats

from secure_fedllm.errors import ConfigError
from secure_fedllm.privacy import DPSGDEvent, make_accountant, noise_for_epsilon

from ..errors import AttackConfigError
from ..results import MatrixRow
from ..stats import clopper_pearson

__all__ = [
    "CanaryPlan",
    "DPAuditConfig",
    "DPAuditResult",
    "OneRunAudit",
    "epsilon_lower_bound",
    "one_run_p_value",
]

_DEFAULT_SEARCH = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.45, 0.5)
_BISECTION_TOL = 1e-6
_STEP_CHUNK = 256


# --------------------------------------------------------------------------------------------------------------
# The paper's conversion from (guesses, correct) to an epsilon lower bound
# --------------------------------------------------------------------------------------------------------------


def _check_counts(m: int, r: int, v: int) -> None:
    if not 0 <= v <= r <= m:
        raise AttackConfigError(f"need 0 <= correct ({v}) <= guesses ({r}) <= canaries ({m})")


def one_run_p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """Probability, under (epsilon, delta)-DP, of at least v correct among r guesses on m canaries.

    This is the bound of Steinke, Nasr, Jagielski (2023, Thm. 3 / Alg. 2): an epsilon-DP mechanism can do no
    better than randomized response, whose accuracy is ``p = e^eps / (1 + e^eps)``; delta adds
    ``2 m delta alpha`` with ``alpha = max_i P[v - i <= Binomial(r, p) < v] / i``.

    Args:
        m: number of canaries (each included independently with probability 1/2).
        r: number of guesses (abstentions excluded).
        v: number of correct guesses.
        epsilon: the claimed epsilon (null hypothesis), >= 0.
        delta: the claimed delta, in [0, 1].

    Returns:
        An upper bound on the probability of observing v or more correct guesses, in [0, 1].

    Raises:
        AttackConfigError: for counts outside 0 <= v <= r <= m or a negative epsilon / bad delta.
    """
    _check_counts(m, r, v)
    if epsilon < 0 or not 0 <= delta <= 1:
        raise AttackConfigError(f"need epsilon >= 0 (got {epsilon}) and 0 <= delta <= 1 (got {delta})")
    if v == 0:
        return 1.0
    p = float(special.expit(epsilon))
    beta = float(stats.binom.sf(v - 1, r, p))
    if delta == 0:
        return min(beta, 1.0)
    shifts = np.arange(1, v + 1)
    window = stats.binom.sf(v - shifts - 1, r, p) - beta  # P[v - i <= Binomial < v]
    alpha = float(np.max(window / shifts, initial=0.0))
    return min(beta + alpha * delta * 2 * m, 1.0)


def epsilon_lower_bound(m: int, r: int, v: int, *, delta: float, confidence: float = 0.95) -> float:
    """The largest epsilon that r guesses with v correct reject at `confidence`; 0 if none is rejected.

    Why a lower bound: for every eps below the returned value, an (eps, delta)-DP mechanism would produce this
    many correct guesses with probability below ``1 - confidence`` (`one_run_p_value`). The p-value grows with
    eps, so bisection finds the boundary (the returned value is the rejected end, i.e. conservative). The bound
    is never negative: when not even eps = 0 is rejected the audit found nothing and says 0.

    Args:
        m: number of canaries.
        r: number of guesses.
        v: number of correct guesses.
        delta: the delta of the claim being audited.
        confidence: one minus the significance level, in (0, 1).

    Returns:
        Empirical epsilon lower bound (>= 0).

    Raises:
        AttackConfigError: for invalid counts, delta or confidence.
    """
    _check_counts(m, r, v)
    if not 0 < confidence < 1:
        raise AttackConfigError(f"confidence={confidence} must be in (0, 1)")
    significance = 1.0 - confidence
    if r == 0 or one_run_p_value(m, r, v, 0.0, delta) >= significance:
        return 0.0
    low, high = 0.0, 1.0
    while one_run_p_value(m, r, v, high, delta) < significance:
        low, high = high, 2 * high
        if high > 1e3:  # only reachable with delta = 0 and absurd counts; logistic(eps) == 1.0 well before
            return low
    while high - low > _BISECTION_TOL:
        mid = (low + high) / 2
        if one_run_p_value(m, r, v, mid, delta) < significance:
            low = mid
        else:
            high = mid
    return low


# --------------------------------------------------------------------------------------------------------------
# Configuration, canaries, result
# --------------------------------------------------------------------------------------------------------------


class DPAuditConfig(BaseModel):
    """How many canaries, how the auditor guesses, and at what confidence the bound holds.

    Constructing it directly raises `AttackConfigError` (naming the field) for invalid values.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    num_canaries: Annotated[int, Field(ge=1)] = Field(
        1000, description="m: Dirac canaries; the paper's bound needs ~1,000 to exceed eps ~ 3 at all"
    )
    k_plus: Annotated[int, Field(ge=0)] | None = Field(
        None, description="guesses 'included' for the k+ top scores; None (with k_minus None) searches"
    )
    k_minus: Annotated[int, Field(ge=0)] | None = Field(
        None, description="guesses 'excluded' for the k- bottom scores; None (with k_plus None) searches"
    )
    search_fractions: tuple[Annotated[float, Field(gt=0, le=0.5)], ...] = Field(
        _DEFAULT_SEARCH, min_length=1, description="k+ = k- = fraction * m values tried when searching"
    )
    correct_for_search: bool = Field(
        True, description="Bonferroni-correct the search (valid bound); False = the paper's uncorrected best"
    )
    confidence: Annotated[float, Field(gt=0, lt=1)] = Field(0.95, description="1 - significance of the bound")
    delta: Annotated[float, Field(ge=0, lt=1)] = Field(1e-5, description="delta of the (eps, delta) claim")
    accountant: str = Field("pld", description="registered accountant for the theoretical epsilon")
    seed: int = Field(0, description="seeds canary bits, coordinates, sampling, noise and tie-breaking")

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" for e in exc.errors())
            raise AttackConfigError(f"invalid DPAuditConfig: {problems}") from None

    @model_validator(mode="after")
    def _guesses_fit(self) -> DPAuditConfig:
        if (self.k_plus is None) != (self.k_minus is None):
            raise ValueError("set both k_plus and k_minus (fixed guesses) or neither (search)")
        if self.k_plus is not None and self.k_minus is not None and self.k_plus + self.k_minus > self.num_canaries:
            raise ValueError(f"k_plus + k_minus = {self.k_plus + self.k_minus} exceeds num_canaries")
        return self

    def guess_pairs(self, m: int) -> list[tuple[int, int]]:
        """The (k+, k-) pairs the audit tries for m canaries: the fixed pair, or the distinct searched ones."""
        if self.k_plus is not None and self.k_minus is not None:
            if self.k_plus + self.k_minus > m:
                raise AttackConfigError(f"k_plus + k_minus = {self.k_plus + self.k_minus} exceeds {m} canaries")
            return [(self.k_plus, self.k_minus)]
        pairs = {(max(1, round(f * m)),) * 2 for f in self.search_fractions}
        return sorted((kp, km) for kp, km in pairs if kp + km <= m)


@dataclass(frozen=True)
class CanaryPlan:
    """Where the canaries live and which were inserted: the secret the auditor scores against.

    Attributes:
        coordinates: distinct flat indices into the audited vector (the LoRA B vector), one per canary.
        bits: True where the canary was inserted (S_i = +1), drawn independently with probability 1/2.
        dimension: length of the audited vector.
    """

    coordinates: np.ndarray
    bits: np.ndarray
    dimension: int

    def __post_init__(self) -> None:
        coords = np.asarray(self.coordinates)
        bits = np.asarray(self.bits)
        if coords.ndim != 1 or bits.shape != coords.shape or coords.size == 0:
            raise AttackConfigError(
                f"canary coordinates {coords.shape} and bits {bits.shape} must be equal-length non-empty 1-D arrays"
            )
        if not np.issubdtype(coords.dtype, np.integer):
            raise AttackConfigError(f"canary coordinates must be integers, got {coords.dtype}")
        if np.unique(coords).size != coords.size:
            raise AttackConfigError("canary coordinates must be distinct: each Dirac canary needs its own coordinate")
        if coords.min() < 0 or coords.max() >= self.dimension:
            raise AttackConfigError(f"canary coordinates must lie in [0, {self.dimension})")
        if bits.dtype != np.bool_ and not np.isin(bits, (0, 1)).all():
            raise AttackConfigError("canary bits must be booleans or 0/1")
        object.__setattr__(self, "coordinates", coords.astype(np.int64))
        object.__setattr__(self, "bits", bits.astype(bool))

    @property
    def num_canaries(self) -> int:
        """m, the number of canaries (inserted or not)."""
        return int(self.coordinates.size)

    def inserted_gradient_sum(self, clip_norm: float, sampled: np.ndarray | None = None) -> torch.Tensor:
        """One step's sum of clipped canary gradients, to add to the clipped real sum before the noise.

        Each inserted canary that is sampled this step contributes ``clip_norm * e_j``; clipping leaves it
        unchanged because its norm already equals the clipping norm.

        Args:
            clip_norm: C, the per-example clipping norm.
            sampled: per-canary mask of this step's Poisson sample; None = every canary sampled.

        Returns:
            A dense float32 tensor of length `dimension`.
        """
        active = self.bits if sampled is None else self.bits & np.asarray(sampled, dtype=bool)
        out = torch.zeros(self.dimension, dtype=torch.float32)
        out[torch.from_numpy(self.coordinates[active])] = float(clip_norm)
        return out


class DPAuditResult(BaseModel):
    """What one audit found, next to what the accountant claims.

    `empirical_epsilon` holds with probability >= `confidence` as a lower bound on the mechanism's epsilon
    at `delta`; exceeding `accountant_epsilon` therefore indicates a bug (see `consistent`).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    empirical_epsilon: float = Field(ge=0, description="one-run lower bound on epsilon at delta")
    accountant_epsilon: float | None = Field(
        description="the accountant's epsilon; inf for zero noise; None if unknown"
    )
    delta: float
    confidence: float
    num_canaries: int = Field(description="m")
    num_inserted: int = Field(description="canaries with S_i = 1")
    guesses: int = Field(description="r = k+ + k- of the reported pair")
    correct: int = Field(description="v, correct guesses of the reported pair")
    k_plus: int
    k_minus: int
    tests: int = Field(description="(k+, k-) pairs tried; the significance was divided by this if corrected")
    search_corrected: bool
    source: Literal["simulated", "update", "training"]
    noise_multiplier: float | None = None
    clip_norm: float | None = None
    sample_rate: float | None = None
    steps: int | None = None

    @property
    def accuracy(self) -> float:
        """Fraction of non-abstaining guesses that were right (0.5 is chance)."""
        return self.correct / self.guesses if self.guesses else 0.0

    @property
    def consistent(self) -> bool:
        """False when the empirical lower bound exceeds the accountant's epsilon, i.e. DP is broken somewhere."""
        return self.accountant_epsilon is None or self.empirical_epsilon <= self.accountant_epsilon

    def rows(self) -> list[MatrixRow]:
        """Matrix rows: the empirical epsilon (chance 0), the accountant's epsilon, and the guess accuracy."""

        def row(
            metric: str, value: float, chance: float | None, interval: tuple[float | None, float | None]
        ) -> MatrixRow:
            return MatrixRow(
                attack="dp_audit",
                defense="",
                metric=metric,
                value=value,
                chance=chance,
                ci_low=interval[0],
                ci_high=interval[1],
            )

        rows = [row("empirical_epsilon", self.empirical_epsilon, 0.0, (None, None))]
        if self.accountant_epsilon is not None:
            rows.append(row("accountant_epsilon", self.accountant_epsilon, None, (None, None)))
        rows.append(
            row("guess_accuracy", self.accuracy, 0.5, _clopper_pearson(self.correct, self.guesses, self.confidence))
        )
        return rows


def _clopper_pearson(v: int, r: int, confidence: float) -> tuple[float | None, float | None]:
    return (None, None) if r == 0 else clopper_pearson(v, r, confidence=confidence)


# --------------------------------------------------------------------------------------------------------------
# The audit
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Outcome:
    epsilon: float
    r: int
    v: int
    k_plus: int
    k_minus: int
    tests: int


class OneRunAudit:
    """One-run DP audit with Dirac canaries: simulate the mechanism, or audit a real update."""

    def __init__(self, config: DPAuditConfig | None = None) -> None:
        self.config = config if config is not None else DPAuditConfig()

    def calibrate_noise(self, target_epsilon: float, *, sample_rate: float, steps: int) -> float:
        """The accountant's noise multiplier for `target_epsilon` at the config's delta (for the eps=1 check).

        Raises:
            AttackConfigError: if the target is unreachable or invalid.
        """
        try:
            return noise_for_epsilon(
                target_epsilon,
                delta=self.config.delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant=make_accountant(self.config.accountant),
            )
        except ConfigError as exc:
            raise AttackConfigError(str(exc)) from exc

    def accountant_epsilon(self, events: Sequence[DPSGDEvent]) -> float:
        """The accountant's epsilon for `events` at the config's delta (inf for zero noise)."""
        try:
            return make_accountant(self.config.accountant).epsilon(list(events), self.config.delta)
        except ConfigError as exc:
            raise AttackConfigError(str(exc)) from exc

    def draw_canaries(self, dimension: int) -> CanaryPlan:
        """Pick m distinct coordinates of a vector of length `dimension` and the secret bits, from the seed."""
        m = self.config.num_canaries
        if dimension < m:
            raise AttackConfigError(f"a vector of {dimension} coordinates cannot hold {m} Dirac canaries")
        rng = np.random.default_rng(np.random.SeedSequence([self.config.seed, 0]))
        coordinates = rng.choice(dimension, size=m, replace=False)
        bits = rng.random(m) < 0.5
        return CanaryPlan(coordinates=coordinates, bits=bits, dimension=dimension)

    def simulate(
        self,
        *,
        noise_multiplier: float,
        clip_norm: float,
        steps: int,
        sample_rate: float = 1.0,
        background_std: float = 0.0,
    ) -> DPAuditResult:
        """Run the canary part of DP-SGD exactly and audit the summed update it produces.

        Per step, each inserted canary is Poisson-sampled with `sample_rate` and, if sampled, adds its Dirac
        gradient ``clip_norm * e_j`` (unchanged by clipping); every canary coordinate receives
        ``N(0, (noise_multiplier * clip_norm)^2)`` noise and, optionally, ``N(0, background_std^2)`` of real
        gradient mass that does not depend on the bits. Only the m canary coordinates are simulated: the others
        are independent of the bits and cannot help the auditor.

        Args:
            noise_multiplier: sigma (noise std / clip norm); 0 is the clip-only positive control.
            clip_norm: C.
            steps: DP-SGD steps of the audited client.
            sample_rate: Poisson sampling rate q of each canary (and of the accountant's event).
            background_std: per-step std of real gradient mass on each canary coordinate.

        Returns:
            The audit result with the accountant's epsilon for ``DPSGDEvent(noise_multiplier, sample_rate, steps)``.

        Raises:
            AttackConfigError: for a negative/non-finite parameter or steps < 1.
        """
        _check_mechanism(noise_multiplier, clip_norm, steps, sample_rate, background_std)
        m = self.config.num_canaries
        seeds = np.random.SeedSequence([self.config.seed, 1]).spawn(2)
        bits = np.random.default_rng(seeds[0]).random(m) < 0.5
        rng = np.random.default_rng(seeds[1])
        total = np.zeros(m)
        per_step_std = math.hypot(noise_multiplier * clip_norm, background_std)
        for start in range(0, steps, _STEP_CHUNK):
            chunk = min(_STEP_CHUNK, steps - start)
            sampled = rng.random((chunk, m)) < sample_rate if sample_rate < 1 else np.ones((chunk, m), dtype=bool)
            total += clip_norm * (sampled & bits).sum(axis=0)
            if per_step_std > 0:
                total += rng.normal(0.0, per_step_std, size=(chunk, m)).sum(axis=0)
        event = DPSGDEvent(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps)
        outcome = self._guess(total, bits, rng)
        return self._result(
            outcome,
            bits,
            source="simulated",
            accountant_epsilon=self.accountant_epsilon([event]),
            noise_multiplier=noise_multiplier,
            clip_norm=clip_norm,
            sample_rate=sample_rate,
            steps=steps,
        )

    def audit_update(
        self,
        update: np.ndarray | torch.Tensor,
        plan: CanaryPlan,
        *,
        update_kind: Literal["gradient_sum", "parameter_delta"] = "gradient_sum",
        events: Sequence[DPSGDEvent] = (),
    ) -> DPAuditResult:
        """Audit a real client update in which the canaries of `plan` were (or were not) inserted.

        Args:
            update: the client's flattened audited vector (e.g. LoRA B), as numpy or torch.
            plan: canary coordinates and secret bits (`draw_canaries`, or the trainer's own).
            update_kind: ``gradient_sum`` (sum of noisy clipped gradients: inserted canaries push up) or
                ``parameter_delta`` (after - before under SGD: descent pushes inserted canaries down, so the
                score is negated).
            events: the client's DP-SGD history, for the accountant's epsilon; empty = not reported.

        Returns:
            The audit result; `num_canaries` is the plan's m (which also enters the delta term of the bound).

        Raises:
            AttackConfigError: for a length mismatch or non-finite values in `update`.
        """
        values = update.detach().cpu().double().numpy() if isinstance(update, torch.Tensor) else np.asarray(update)
        values = values.reshape(-1).astype(np.float64)
        if values.size != plan.dimension:
            raise AttackConfigError(
                f"update has {values.size} coordinates but the canary plan expects {plan.dimension}"
            )
        scores = values[plan.coordinates]
        if not np.isfinite(scores).all():
            raise AttackConfigError("the update is not finite on the canary coordinates")
        if update_kind == "parameter_delta":
            scores = -scores
        elif update_kind != "gradient_sum":
            raise AttackConfigError(f"update_kind={update_kind!r} must be 'gradient_sum' or 'parameter_delta'")
        rng = np.random.default_rng(np.random.SeedSequence([self.config.seed, 2]))
        outcome = self._guess(scores, plan.bits, rng)
        return self._result(
            outcome,
            plan.bits,
            source="update",
            accountant_epsilon=self.accountant_epsilon(events) if events else None,
        )

    def _guess(self, scores: np.ndarray, bits: np.ndarray, rng: np.random.Generator) -> _Outcome:
        """Score, guess for every (k+, k-) pair and keep the best bound (corrected for the search if asked)."""
        m = scores.size
        pairs = self.config.guess_pairs(m)
        if not pairs:
            raise AttackConfigError(f"no (k+, k-) pair fits {m} canaries; lower search_fractions")
        # Random tie-breaking (ties are common without noise): the order is independent of the bits.
        shuffle = rng.permutation(m)
        order = shuffle[np.argsort(scores[shuffle], kind="stable")]
        ranked_bits = bits[order]  # ascending score
        excluded_correct = np.concatenate([[0], np.cumsum(~ranked_bits)])  # correct among the j lowest
        included_correct = np.concatenate([[0], np.cumsum(ranked_bits[::-1])])  # correct among the j highest
        tests = len(pairs) if self.config.correct_for_search else 1
        confidence = 1 - (1 - self.config.confidence) / tests
        best: _Outcome | None = None
        for k_plus, k_minus in pairs:
            v = int(included_correct[k_plus] + excluded_correct[k_minus])
            r = k_plus + k_minus
            eps = epsilon_lower_bound(m, r, v, delta=self.config.delta, confidence=confidence)
            if best is None or eps > best.epsilon:
                best = _Outcome(eps, r, v, k_plus, k_minus, len(pairs))
        assert best is not None
        return best

    def _result(
        self,
        outcome: _Outcome,
        bits: np.ndarray,
        *,
        source: Literal["simulated", "update"],
        accountant_epsilon: float | None,
        **mechanism: Any,
    ) -> DPAuditResult:
        return DPAuditResult(
            empirical_epsilon=outcome.epsilon,
            accountant_epsilon=accountant_epsilon,
            delta=self.config.delta,
            confidence=self.config.confidence,
            num_canaries=int(bits.size),
            num_inserted=int(bits.sum()),
            guesses=outcome.r,
            correct=outcome.v,
            k_plus=outcome.k_plus,
            k_minus=outcome.k_minus,
            tests=outcome.tests,
            search_corrected=self.config.correct_for_search,
            source=source,
            **mechanism,
        )


def _check_mechanism(
    noise_multiplier: float, clip_norm: float, steps: int, sample_rate: float, background_std: float
) -> None:
    """Reject parameters the simulation (or the accountant) cannot mean."""
    for name, value in (("noise_multiplier", noise_multiplier), ("background_std", background_std)):
        if not math.isfinite(value) or value < 0:
            raise AttackConfigError(f"{name}={value} must be finite and >= 0")
    if not math.isfinite(clip_norm) or clip_norm <= 0:
        raise AttackConfigError(f"clip_norm={clip_norm} must be finite and > 0")
    if steps < 1:
        raise AttackConfigError(f"steps={steps} must be >= 1")
    if not 0 < sample_rate <= 1:
        raise AttackConfigError(f"sample_rate={sample_rate} must be in (0, 1]")
