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

tests/secure_fedllm/test_integer_noise_accounting.py checks the Skellam and subsampled bounds against
Rényi divergences summed directly from the Skellam pmf on small cases.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Annotated

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from scipy.special import gammaln, logsumexp  # type: ignore[import-untyped]

from ..errors import ConfigError
from .accountants import check_neighbouring, group_of_two_epsilon

__all__ = [
    "INTEGER_RDP_ORDERS",
    "IntegerNoiseEvent",
    "SkellamRDPAccountant",
    "discrete_gaussian_rdp",
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
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    mu: Annotated[float, Field(gt=0, allow_inf_nan=False)] = Field(description="Skellam parameter: variance 2 mu")
    l1: Annotated[float, Field(gt=0, allow_inf_nan=False)] = Field(description="L1 sensitivity in ring units")
    l2: Annotated[float, Field(gt=0, allow_inf_nan=False)] = Field(description="L2 sensitivity in ring units")
    sample_rate: Annotated[float, Field(gt=0, le=1)] = Field(description="Poisson sampling probability q")
    steps: Annotated[int, Field(ge=1)] = Field(description="number of noisy steps")


def _one_step_curve(event: IntegerNoiseEvent, orders: Sequence[int]) -> np.ndarray:
    top = max(orders)
    base = [skellam_rdp(a, mu=event.mu, l1=event.l1, l2=event.l2) for a in range(2, top + 1)]
    curve = []
    for a in orders:
        unsampled = base[a - 2]
        if event.sample_rate < 1:
            unsampled = min(unsampled, poisson_subsampled_rdp(a, event.sample_rate, base))
        curve.append(unsampled)
    return np.asarray(curve)


class SkellamRDPAccountant:
    """Epsilon of a history of Poisson-subsampled Skellam steps, by RDP (module docstring).

    Not in the `ACCOUNTANTS` registry: that registry's accountants take `DPSGDEvent`s (a Gaussian
    noise multiplier), which do not describe integer noise. Same `epsilon(events, delta)` shape and
    the same neighbouring relations.
    """

    name = "skellam_rdp"

    def __init__(self, *, neighbouring: str = "add_remove", orders: Sequence[int] = INTEGER_RDP_ORDERS) -> None:
        self.neighbouring = check_neighbouring(neighbouring)
        self.orders = tuple(_check_order(a) for a in orders)

    def rdp(self, events: Sequence[IntegerNoiseEvent]) -> np.ndarray:
        """Composed add/remove RDP curve at `self.orders` (RDP adds over steps and events)."""
        total = np.zeros(len(self.orders))
        for event in events:
            total += event.steps * _one_step_curve(event, self.orders)
        return total

    def epsilon(self, events: Sequence[IntegerNoiseEvent], delta: float) -> float:
        """(epsilon, delta) epsilon of composing `events` under this relation; 0 for an empty history."""
        if not events:
            return 0.0
        total = self.rdp(events)
        if self.neighbouring == "replace":
            return group_of_two_epsilon(lambda d: rdp_to_epsilon(self.orders, total, d), delta)
        return rdp_to_epsilon(self.orders, total, delta)


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
