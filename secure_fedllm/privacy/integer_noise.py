"""Rényi-DP accounting for integer (Skellam, discrete Gaussian) noise under Poisson subsampling.

Why a separate accountant. The `pld`/`prv`/`rdp` accountants model continuous Gaussian noise. Integer
noise that travels through secure aggregation's modular ring is a different mechanism, and no
dominance argument (integer noise is at least as private as the Gaussian of the same variance) is
written down and tested here, so its epsilon is computed from its own RDP:

* Skellam. Agarwal, Kairouz, Liu, "The Skellam Mechanism for Differentially Private Federated
  Learning" (NeurIPS 2021, arXiv:2110.04995), RDP of the multi-dimensional Skellam mechanism
  (Corollary 3.6 of the NeurIPS version; google-research/federated `distributed_dp/accounting_utils.py`
  cites it as Corollary 4.1 of the arXiv version): with per-coordinate noise of variance ``v`` (a
  symmetric Skellam, difference of two Poissons of mean v/2) and integer sensitivities
  ``||Δ||_1 = l1``, ``||Δ||_2 = l2``, for integer alpha > 1,

      eps(alpha) <= alpha l2^2 / (2 v) + min(((2 alpha - 1) l2^2 + 6 l1) / (4 v^2), 3 l1 / (2 v)).

  Here the noise is Skellam(mu, mu) = Poisson(mu) - Poisson(mu) as `protocols.dp_noise.SkellamSampler`
  draws it, so v = 2 mu. The shifted Skellam is symmetric, so the bound holds for D(P+Δ || P) and
  D(P || P+Δ) alike. A sum of clients' Skellam(mu_i) shares is exactly Skellam(sum mu_i): pass the
  central mu (the sum over the clients whose noise is guaranteed to be in the release).
* Discrete Gaussian. Canonne, Kamath, Steinke, "The Discrete Gaussian for Differential Privacy"
  (NeurIPS 2020, Theorem 4 there): N_Z(0, sigma^2) per coordinate with l2 sensitivity Δ is
  (Δ^2 / (2 sigma^2))-zCDP, i.e. RDP alpha Δ^2 / (2 sigma^2) at every alpha > 1. This covers ONE
  discrete Gaussian per coordinate (central noise). A sum of n clients' discrete Gaussians is not a
  discrete Gaussian; its bound (Kairouz, Liu, Steinke, ICML 2021, with the dimension-dependent tau
  term) is not implemented here: use Skellam for distributed noise.
* Poisson subsampling. Zhu and Wang, "Poisson Subsampled Rényi Differential Privacy" (ICML 2019,
  PMLR v97 zhu19c), Theorem 5 ("general upper bound", valid for any mechanism with the given RDP;
  the tighter Theorem 6 needs a condition on the mechanism that is not established for Skellam and is
  deliberately not used). For integer alpha >= 2 and sampling probability q:

      (alpha - 1) eps'(alpha) <= log[ (1-q)^(alpha-1) (alpha q - q + 1)
                                      + C(alpha, 2) q^2 (1-q)^(alpha-2) e^{eps(2)}
                                      + 3 sum_{l=3}^{alpha} C(alpha, l) q^l (1-q)^(alpha-l) e^{(l-1) eps(l)} ].

  Subsampling never hurts (exp((alpha-1) D_alpha) is jointly convex), so min(eps', eps) is used.
  The neighbouring relation of this theorem is add/remove-one; replace-one is accounted as a group of
  two add/remove steps (`group_of_two_epsilon`), sound and loose.
* Conversion to (epsilon, delta): Balle et al. 2020 (Theorem 21) / Canonne, Kamath, Steinke 2020
  (Proposition 12): eps = min over alpha of rdp(alpha) + log((alpha-1)/alpha) - (log delta + log alpha)/(alpha-1),
  the same conversion Opacus' RDP accountant uses.

* Mixed histories (`mixed_rdp_epsilon`). A site's ledger may hold Gaussian DP-SGD rounds (and
  Gaussian evaluations) and distributed-DP Skellam rounds. Their epsilon must be one composition of
  all of them, never a sum of per-part epsilons. The `pld` and `prv` accountants cannot do it: there
  is no privacy loss distribution of the (Poisson-subsampled) Skellam mechanism here (dp_accounting
  has no Skellam event, and an RDP curve cannot be turned back into a PLD), so a history that holds
  any Skellam event is composed entirely by RDP at `INTEGER_RDP_ORDERS`: the sum of the Skellam
  curves above and of the Poisson-subsampled Gaussian curves (Mironov, Talwar, Zhang 2019, Opacus'
  `compute_rdp`, exact at integer orders and valid in both directions of add/remove, their
  Theorem 4), converted once. RDP is looser than the PLD in (epsilon, delta), so the Gaussian part
  of a mixed history reads higher than the same Gaussian rounds alone under `pld`: the first Skellam
  round also re-reads the Gaussian history that precedes it. A history without Skellam events is
  not affected (the ledger keeps its own accountant for it).
* Own share (`own_share_events`). With distributed noise the release carries the sum of the honest
  survivors' shares, Skellam(mu); if secure aggregation fails (the aggregator sees a client's masked
  update unmasked, or colluders subtract their own shares), only the client's own share,
  Skellam(own_mu), protects it. Its epsilon is the same composition with each Skellam mu replaced
  by `own_mu`.

tests/secure_fedllm/test_integer_noise_accounting.py checks the Skellam and subsampled bounds against
Rényi divergences summed directly from the Skellam pmf on small cases; tests/secure_fedllm/
test_ledger_skellam.py checks the mixed composition against curves summed independently.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Annotated

import numpy as np
from opacus.accountants.analysis import rdp as _rdp_analysis
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from scipy.special import gammaln, logsumexp  # type: ignore[import-untyped]

from ..errors import ConfigError
from .accountants import check_neighbouring, group_of_two_epsilon
from .events import DPSGDEvent

__all__ = [
    "INTEGER_RDP_ORDERS",
    "IntegerNoiseEvent",
    "SkellamRDPAccountant",
    "discrete_gaussian_rdp",
    "mixed_rdp",
    "mixed_rdp_epsilon",
    "own_share_events",
    "poisson_subsampled_rdp",
    "rdp_to_epsilon",
    "skellam_mu_for_epsilon",
    "skellam_rdp",
]

INTEGER_RDP_ORDERS: tuple[int, ...] = (*range(2, 65), 72, 80, 96, 112, 128, 160, 192, 256)
"""Integer orders the accountant evaluates (the subsampling theorem is for integer alpha only)."""


def _check_order(alpha: int) -> int:
    if isinstance(alpha, bool) or int(alpha) != alpha or alpha < 2:
        raise ConfigError(f"alpha={alpha!r} must be an integer Rényi order >= 2")
    return int(alpha)


def _check_positive(name: str, value: float) -> float:
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{name}={value!r} must be a positive finite number")
    return float(value)


def _check_sensitivities(l1: float, l2: float) -> tuple[float, float]:
    l1 = _check_positive("l1", l1)
    l2 = _check_positive("l2", l2)
    # ||x||_2 <= ||x||_1 <= ||x||_2^2 for a nonzero integer vector
    if l1 < l2 - 1e-9 or l1 > l2 * l2 + 1e-9:
        raise ConfigError(f"l1={l1} with l2={l2} is impossible for an integer difference: need l2 <= l1 <= l2**2")
    return l1, l2


def skellam_rdp(alpha: int, *, mu: float, l1: float, l2: float) -> float:
    """RDP at integer order `alpha` of adding Skellam(mu, mu) per coordinate (variance 2 mu), integer sensitivities.

    Agarwal, Kairouz, Liu 2021 (module docstring) with variance v = 2 mu.

    Raises:
        ConfigError: a non-integer order, non-positive mu, or impossible sensitivities (naming the field).
    """
    a = _check_order(alpha)
    mu = _check_positive("mu", mu)
    l1, l2 = _check_sensitivities(l1, l2)
    var = 2.0 * mu
    return a * l2 * l2 / (2.0 * var) + min(
        ((2 * a - 1) * l2 * l2 + 6.0 * l1) / (4.0 * var * var), 3.0 * l1 / (2.0 * var)
    )


def discrete_gaussian_rdp(alpha: float, *, sigma: float, l2: float, dimension: int) -> float:
    """RDP of ONE discrete Gaussian N_Z(0, sigma^2) per coordinate of a `dimension`-vector, l2 sensitivity `l2`.

    Canonne, Kamath, Steinke 2020: (l2^2 / (2 sigma^2))-zCDP, so alpha l2^2 / (2 sigma^2); the
    coordinates are independent and the bound adds over them, so `dimension` only bounds l2 (an
    integer difference in `dimension` coordinates). Not valid for a sum of several clients' discrete
    Gaussians (see the module docstring).

    Raises:
        ConfigError: alpha <= 1, non-positive sigma or l2, or a dimension below 1.
    """
    if not math.isfinite(alpha) or alpha <= 1:
        raise ConfigError(f"alpha={alpha!r} must be a Rényi order > 1")
    sigma = _check_positive("sigma", sigma)
    l2 = _check_positive("l2", l2)
    if isinstance(dimension, bool) or int(dimension) != dimension or dimension < 1:
        raise ConfigError(f"dimension={dimension!r} must be a positive integer")
    return float(alpha) * l2 * l2 / (2.0 * sigma * sigma)


def _log_comb(n: int, k: np.ndarray) -> np.ndarray:
    result: np.ndarray = gammaln(n + 1) - gammaln(k + 1) - gammaln(n - k + 1)
    return result


def poisson_subsampled_rdp(alpha: int, q: float, base_rdp: Callable[[int], float] | Sequence[float]) -> float:
    """Zhu & Wang 2019 Theorem 5 (general upper bound): RDP at integer `alpha` of the Poisson-subsampled mechanism.

    `base_rdp` is the base mechanism's RDP, valid in both directions: a function of the integer order,
    or a sequence whose i-th entry is the RDP at order i + 2 (orders 2..alpha needed). The sum is taken
    in log space; the result is not min'ed with the base RDP (the accountant does that).

    Raises:
        ConfigError: alpha not an integer >= 2, q outside (0, 1], or too few base values.
    """
    a = _check_order(alpha)
    if not (0 < q <= 1) or not math.isfinite(q):
        raise ConfigError(f"sample_rate={q!r} must be in (0, 1]")
    if callable(base_rdp):
        eps = np.array([float(base_rdp(order)) for order in range(2, a + 1)])
    else:
        if len(base_rdp) < a - 1:
            raise ConfigError(f"base_rdp has {len(base_rdp)} values; orders 2..{a} need {a - 1}")
        eps = np.asarray(base_rdp[: a - 1], dtype=float)
    if np.any(eps < 0) or not np.all(np.isfinite(eps)):
        raise ConfigError("base_rdp must be finite and non-negative at orders 2..alpha")
    if q == 1:
        return float(eps[a - 2])
    log_q, log_1q = math.log(q), math.log1p(-q)
    # (1-q)^(a-1) (a q - q + 1)
    terms = [(a - 1) * log_1q + math.log1p((a - 1) * q)]
    # C(a, 2) q^2 (1-q)^(a-2) e^{eps(2)}
    terms.append(math.log(a * (a - 1) / 2) + 2 * log_q + (a - 2) * log_1q + float(eps[0]))
    if a >= 3:
        ls = np.arange(3, a + 1)
        rest = math.log(3.0) + _log_comb(a, ls) + ls * log_q + (a - ls) * log_1q + (ls - 1) * eps[1:]
        terms.extend(rest.tolist())
    return float(logsumexp(terms)) / (a - 1)


def rdp_to_epsilon(orders: Sequence[int], rdp: Sequence[float] | np.ndarray, delta: float) -> float:
    """(epsilon, delta) from an RDP curve: Balle et al. 2020 Thm 21 / Canonne-Kamath-Steinke 2020 Prop 12.

    Raises:
        ConfigError: delta outside (0, 1).
    """
    if not (0 < delta < 1):
        raise ConfigError(f"delta={delta!r} must be in (0, 1)")
    a = np.asarray(orders, dtype=float)
    r = np.asarray(rdp, dtype=float)
    eps = r + np.log1p(-1.0 / a) - (math.log(delta) + np.log(a)) / (a - 1)
    return float(max(0.0, np.min(eps)))


class IntegerNoiseEvent(BaseModel):
    """`steps` Poisson-sampled steps at `sample_rate`, each adding Skellam(mu, mu) per coordinate.

    `l1`, `l2` are the integer sensitivities of one unit's contribution after scaling and rounding to
    the ring (in ring units); `mu` is the central (summed) Skellam parameter, variance 2 mu.
    `own_mu`, when given, is the parameter of the charging client's own share alone (mu divided by the
    honest survivors it was calibrated for): what still protects the client if secure aggregation
    fails. It is part of the sum, so it cannot exceed `mu`.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    mu: Annotated[float, Field(gt=0, allow_inf_nan=False)] = Field(description="Skellam parameter: variance 2 mu")
    l1: Annotated[float, Field(gt=0, allow_inf_nan=False)] = Field(description="L1 sensitivity in ring units")
    l2: Annotated[float, Field(gt=0, allow_inf_nan=False)] = Field(description="L2 sensitivity in ring units")
    sample_rate: Annotated[float, Field(gt=0, le=1)] = Field(description="Poisson sampling probability q")
    steps: Annotated[int, Field(ge=1)] = Field(description="number of noisy steps")
    own_mu: Annotated[float | None, Field(gt=0, allow_inf_nan=False)] = Field(
        default=None, description="Skellam parameter of this client's own share alone (<= mu)"
    )
    parties: Annotated[int | None, Field(ge=1)] = Field(
        default=None, description="the round's n the shares were sized for (a record of the assumption)"
    )
    honest: Annotated[int | None, Field(ge=1)] = Field(
        default=None, description="h = n - n_C - d_max honest shares the site assumed in every released sum"
    )

    @field_validator("own_mu")
    @classmethod
    def _own_share_within_sum(cls, value: float | None, info: ValidationInfo) -> float | None:
        mu = info.data.get("mu")
        if value is not None and mu is not None and value > mu:
            raise ValueError(
                f"own_mu={value} exceeds mu={mu}: a client's own share is part of the summed noise; pass "
                "own_mu = mu / (honest survivors the noise was calibrated for)"
            )
        return value

    def own_share(self) -> IntegerNoiseEvent:
        """This event with only the client's own share of noise (itself when `own_mu` is not recorded)."""
        if self.own_mu is None or self.own_mu == self.mu:
            return self
        return IntegerNoiseEvent(**{**self.model_dump(), "mu": self.own_mu})


@lru_cache(maxsize=1024)
def _skellam_curve(mu: float, l1: float, l2: float, sample_rate: float, orders: tuple[int, ...]) -> np.ndarray:
    top = max(orders)
    base = [skellam_rdp(a, mu=mu, l1=l1, l2=l2) for a in range(2, top + 1)]
    curve = []
    for a in orders:
        unsampled = base[a - 2]
        if sample_rate < 1:
            unsampled = min(unsampled, poisson_subsampled_rdp(a, sample_rate, base))
        curve.append(unsampled)
    result = np.asarray(curve)
    result.setflags(write=False)
    return result


@lru_cache(maxsize=1024)
def _gaussian_curve(noise_multiplier: float, sample_rate: float, orders: tuple[int, ...]) -> np.ndarray:
    result: np.ndarray = np.asarray(
        _rdp_analysis.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=list(orders)),
        dtype=float,
    )
    result.setflags(write=False)
    return result


def _one_step_curve(event: IntegerNoiseEvent, orders: Sequence[int]) -> np.ndarray:
    """One step's add/remove RDP at `orders` (read-only; cached per parameters)."""
    return _skellam_curve(event.mu, event.l1, event.l2, event.sample_rate, tuple(orders))


def mixed_rdp(
    events: Sequence[DPSGDEvent | IntegerNoiseEvent], orders: Sequence[int] = INTEGER_RDP_ORDERS
) -> np.ndarray:
    """Composed add/remove RDP curve at integer `orders` of Gaussian DP-SGD and Skellam events (sum of curves).

    A Gaussian event with zero noise gives an infinite curve.

    Raises:
        ConfigError: a non-integer order, or an event of another type.
    """
    checked = tuple(_check_order(a) for a in orders)
    total = np.zeros(len(checked))
    for event in events:
        if isinstance(event, IntegerNoiseEvent):
            curve = _skellam_curve(event.mu, event.l1, event.l2, event.sample_rate, checked)
        elif isinstance(event, DPSGDEvent):
            if event.noise_multiplier == 0:
                return np.full(len(checked), math.inf)
            curve = _gaussian_curve(event.noise_multiplier, event.sample_rate, checked)
        else:
            raise ConfigError(f"cannot account {type(event).__name__}: an event is a DPSGDEvent or IntegerNoiseEvent")
        total += event.steps * curve
    return total


def mixed_rdp_epsilon(
    events: Sequence[DPSGDEvent | IntegerNoiseEvent],
    delta: float,
    *,
    neighbouring: str = "add_remove",
    orders: Sequence[int] = INTEGER_RDP_ORDERS,
) -> float:
    """(epsilon, delta) epsilon of composing Gaussian and Skellam events by RDP (module docstring); 0 if empty.

    ``replace`` is the group-of-two bound over the add/remove profile, as for `SkellamRDPAccountant`.

    Raises:
        ConfigError: delta outside (0, 1), an unknown relation, a non-integer order or an unknown event type.
    """
    relation = check_neighbouring(neighbouring)
    if not (0 < delta < 1):
        raise ConfigError(f"delta={delta!r} must be in (0, 1)")
    if not events:
        return 0.0
    checked = tuple(_check_order(a) for a in orders)
    total = mixed_rdp(events, checked)
    if np.all(np.isinf(total)):
        return math.inf
    if relation == "replace":
        return group_of_two_epsilon(lambda d: rdp_to_epsilon(checked, total, d), delta)
    return rdp_to_epsilon(checked, total, delta)


def own_share_events(events: Sequence[DPSGDEvent | IntegerNoiseEvent]) -> list[DPSGDEvent | IntegerNoiseEvent]:
    """`events` with every Skellam event's mu replaced by its `own_mu` (others, and Gaussian events, unchanged)."""
    return [e.own_share() if isinstance(e, IntegerNoiseEvent) else e for e in events]


class SkellamRDPAccountant:
    """Epsilon of a history of Poisson-subsampled Skellam steps, by RDP (module docstring).

    Not in the `ACCOUNTANTS` registry: that registry's accountants take `DPSGDEvent`s (a Gaussian
    noise multiplier), which do not describe integer noise. Same `epsilon(events, delta)` shape and
    the same neighbouring relations. It is `mixed_rdp_epsilon` restricted to Skellam events (and
    accepts Gaussian ones too, composed the same way).
    """

    name = "skellam_rdp"

    def __init__(self, *, neighbouring: str = "add_remove", orders: Sequence[int] = INTEGER_RDP_ORDERS) -> None:
        self.neighbouring = check_neighbouring(neighbouring)
        self.orders = tuple(_check_order(a) for a in orders)

    def rdp(self, events: Sequence[DPSGDEvent | IntegerNoiseEvent]) -> np.ndarray:
        """Composed add/remove RDP curve at `self.orders` (RDP adds over steps and events)."""
        return mixed_rdp(events, self.orders)

    def epsilon(self, events: Sequence[DPSGDEvent | IntegerNoiseEvent], delta: float) -> float:
        """(epsilon, delta) epsilon of composing `events` under this relation; 0 for an empty history."""
        return mixed_rdp_epsilon(events, delta, neighbouring=self.neighbouring, orders=self.orders)


def skellam_mu_for_epsilon(
    target: float,
    *,
    delta: float,
    sample_rate: float,
    steps: int,
    l1: float,
    l2: float,
    neighbouring: str = "add_remove",
) -> float:
    """Smallest Skellam mu (to within 1%) whose `steps` subsampled steps stay within epsilon `target`.

    The returned mu has epsilon <= target, and 0.99 mu has epsilon > target.

    Raises:
        ConfigError: a bad parameter, naming it.
    """
    target = _check_positive("target", target)
    if not (0 < delta < 1):
        raise ConfigError(f"delta={delta!r} must be in (0, 1)")
    if not (0 < sample_rate <= 1) or not math.isfinite(sample_rate):
        raise ConfigError(f"sample_rate={sample_rate!r} must be in (0, 1]")
    if isinstance(steps, bool) or int(steps) != steps or steps < 1:
        raise ConfigError(f"steps={steps!r} must be a positive integer")
    l1, l2 = _check_sensitivities(l1, l2)
    accountant = SkellamRDPAccountant(neighbouring=neighbouring)

    def eps(mu: float) -> float:
        event = IntegerNoiseEvent(mu=mu, l1=l1, l2=l2, sample_rate=sample_rate, steps=int(steps))
        return accountant.epsilon([event], delta)

    low, high = 1e-3, 1.0
    while eps(high) > target:
        low, high = high, high * 4
        if high > 1e15:
            raise ConfigError(f"target={target} is not reachable with mu <= 1e15")
    if eps(low) <= target:
        return low
    # eps(low) > target >= eps(high); bisect in log space to 0.5% relative width
    while high / low > 1.005:
        mid = math.sqrt(low * high)
        if eps(mid) > target:
            low = mid
        else:
            high = mid
    return high
