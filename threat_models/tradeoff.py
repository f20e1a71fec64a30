"""The membership attacker's ROC bound implied by DP-SGD's tight privacy profile (f-DP from the PLD).

Why not the single (epsilon, delta) line. A run reports one pair, and a pair only says
TPR <= e^epsilon FPR + delta: at epsilon 8 that line is above 1 for every FPR above 3e-4, so it
allows a perfect attacker and shows nothing. The mechanism satisfies a whole privacy profile
delta(epsilon) (every epsilon at once), and the profile is equivalent to a trade-off function
f = 1 - TPR_max: for a pair of output distributions (P with the target record, Q without it) that
is (epsilon, delta(epsilon))-indistinguishable in both orders, any test with false-positive rate
FPR has

    TPR <= min over epsilon of min(1, e^eps FPR + delta(eps), 1 - e^-eps (1 - delta(eps) - FPR)),

the first line from P(S) <= e^eps Q(S) + delta, the second from Q(S^c) <= e^eps P(S^c) + delta
(Dong, Roth, Su 2019, "Gaussian Differential Privacy", Proposition 2.12 and its dual; used for
DP-SGD audits by Nasr, Hayes, Steinke, Balle et al. 2023, "Tight Auditing of Differentially
Private Machine Learning"). With the exact profile the minimum is the exact trade-off curve; for
the Gaussian mechanism it is G_mu, TPR = Phi(Phi^-1(FPR) + mu) with mu = 1/sigma.

The profile comes from dp_accounting's privacy loss distribution (PLD) with pessimistic
discretisation, built exactly as `secure_fedllm.privacy.PLDAccountant` builds it (one
Poisson-sampled Gaussian PLD per event, self-composed over its steps, composed across events;
the default interval is that accountant's), so the curve is the one the run's epsilon is read
from. `secure_fedllm.privacy` exposes only epsilon(delta), one composition per delta; this module
needs delta(epsilon) at ~200 epsilons, which dp_accounting gives from one PLD in one vectorised
call. Both error sources only raise the curve: pessimistic rounding over-states delta, and a
finite epsilon grid takes the minimum over fewer lines. The bound stays sound.

Which game. ``add_remove`` (the default) is the membership game itself: the target record is in
the training set or absent, and Poisson sampling sees only that. dp_accounting reports the larger
of the add and the remove directions, so the bound covers both orders of P and Q.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import numpy.typing as npt
from dp_accounting import NeighboringRelation
from dp_accounting.pld import privacy_loss_distribution

from secure_fedllm.privacy import DPSGDEvent, PLDAccountant, check_neighbouring

from .errors import AttackConfigError

__all__ = [
    "EPSILON_GRID_POINTS",
    "default_fpr_grid",
    "epsilon_grid",
    "privacy_profile",
    "roc_bound",
    "tpr_bound_from_profile",
]

EPSILON_GRID_POINTS = 200
"""Epsilons the bound minimises over: 0, the run's own epsilon, the rest log-spaced."""

_DEFAULT_INTERVAL = PLDAccountant().value_discretization


def _steps(events: Sequence[DPSGDEvent]) -> tuple[tuple[float, float, int], ...]:
    if not events:
        raise AttackConfigError("events is empty; pass the DPSGDEvents of the released model (at least one)")
    for i, event in enumerate(events):
        if not isinstance(event, DPSGDEvent):
            raise AttackConfigError(f"events[{i}] is a {type(event).__name__}; pass secure_fedllm.privacy.DPSGDEvent")
        if event.noise_multiplier == 0:
            raise AttackConfigError(
                f"events[{i}].noise_multiplier is 0: without noise there is no finite privacy profile and the "
                "attacker's TPR bound is 1 everywhere; draw no bound for that defense"
            )
    return tuple((float(e.sample_rate), float(e.noise_multiplier), int(e.steps)) for e in events)


@lru_cache(maxsize=64)
def _pld(
    steps: tuple[tuple[float, float, int], ...], neighbouring: str, interval: float
) -> privacy_loss_distribution.PrivacyLossDistribution:
    """One PLD per history (a composition takes a fraction of a second; reports ask more than once)."""
    relation = NeighboringRelation.REPLACE_ONE if neighbouring == "replace" else NeighboringRelation.ADD_OR_REMOVE_ONE
    pld = privacy_loss_distribution.identity(value_discretization_interval=interval)
    for sample_rate, noise_multiplier, count in steps:
        step = privacy_loss_distribution.from_gaussian_mechanism(
            standard_deviation=noise_multiplier,
            sampling_prob=sample_rate,
            value_discretization_interval=interval,
            neighboring_relation=relation,
        )
        pld = pld.compose(step.self_compose(count))
    return pld


def privacy_profile(
    events: Sequence[DPSGDEvent],
    epsilons: npt.ArrayLike,
    *,
    neighbouring: str = "add_remove",
    value_discretization: float = _DEFAULT_INTERVAL,
) -> npt.NDArray[np.float64]:
    """delta(epsilon) of the composed events at each of `epsilons` (the larger of both directions).

    Raises:
        AttackConfigError: no events, an event without noise, or an unknown `neighbouring`.
    """
    relation = _relation(neighbouring)
    pld = _pld(_steps(events), relation, float(value_discretization))
    eps = np.asarray(epsilons, dtype=np.float64).ravel()
    order = np.argsort(eps, kind="stable")  # dp_accounting wants them ascending
    deltas = np.empty_like(eps)
    deltas[order] = np.asarray(pld.get_delta_for_epsilon(eps[order]), dtype=np.float64)
    return np.clip(deltas, 0.0, 1.0)


def _relation(neighbouring: str) -> str:
    try:
        return check_neighbouring(neighbouring)
    except ValueError as err:
        raise AttackConfigError(f"neighbouring={neighbouring!r} is unknown; use 'add_remove' or 'replace'") from err


def epsilon_grid(
    events: Sequence[DPSGDEvent],
    *,
    delta: float = 1e-5,
    points: int = EPSILON_GRID_POINTS,
    factor: float = 4.0,
    neighbouring: str = "add_remove",
    value_discretization: float = _DEFAULT_INTERVAL,
) -> npt.NDArray[np.float64]:
    """0, the events' own epsilon at `delta`, and log-spaced values up to `factor` times it.

    The run's own epsilon is in the grid so that the bound is never above its single
    (epsilon, delta) line; the top reaches the tangents of the curve at FPR far below 1e-5
    (for G_mu the tangent at FPR a has slope e^eps with eps = -mu Phi^-1(a) - mu^2 / 2).
    """
    if points < 3:
        raise AttackConfigError(f"points={points} is too few; pass at least 3 (the default is {EPSILON_GRID_POINTS})")
    relation = _relation(neighbouring)
    pld = _pld(_steps(events), relation, float(value_discretization))
    own = float(pld.get_epsilon_for_delta(delta))
    top = max(factor * own, 1.0)
    logs = np.geomspace(top * 1e-4, top, points - 2)
    return np.unique(np.concatenate([[0.0, own], logs]))


def tpr_bound_from_profile(
    fpr: npt.ArrayLike, epsilons: npt.ArrayLike, deltas: npt.ArrayLike
) -> npt.NDArray[np.float64]:
    """The largest TPR any test at each `fpr` can have against pairs (epsilon_i, delta_i)-DP both ways.

    Vectorised over an (fpr x epsilon) grid: the minimum of the two lines of each pair, then over pairs.
    """
    alpha = np.asarray(fpr, dtype=np.float64)[:, None]
    eps = np.asarray(epsilons, dtype=np.float64)[None, :]
    dlt = np.asarray(deltas, dtype=np.float64)[None, :]
    if eps.shape != dlt.shape:
        raise AttackConfigError(f"epsilons ({eps.size}) and deltas ({dlt.size}) must have the same length")
    if np.any((alpha < 0) | (alpha > 1)):
        raise AttackConfigError("fpr must lie in [0, 1]")
    upper = np.exp(eps) * alpha + dlt
    lower_side = 1.0 - np.exp(-eps) * (1.0 - dlt - alpha)
    bound: npt.NDArray[np.float64] = np.minimum(1.0, np.minimum(upper, lower_side).min(axis=1))
    return bound


def roc_bound(
    events: Sequence[DPSGDEvent],
    fpr: npt.ArrayLike,
    *,
    delta: float = 1e-5,
    points: int = EPSILON_GRID_POINTS,
    neighbouring: str = "add_remove",
    value_discretization: float = _DEFAULT_INTERVAL,
) -> npt.NDArray[np.float64]:
    """Upper bound on the membership attacker's TPR at each `fpr`, for a model released after `events`.

    `delta` only places the run's own epsilon in the grid (the bound is then never above the
    single-pair line at that delta); the bound itself uses the whole profile.

    Raises:
        AttackConfigError: see `privacy_profile`, or `fpr` outside [0, 1].
    """
    eps = epsilon_grid(
        events, delta=delta, points=points, neighbouring=neighbouring, value_discretization=value_discretization
    )
    profile = privacy_profile(events, eps, neighbouring=neighbouring, value_discretization=value_discretization)
    return tpr_bound_from_profile(fpr, eps, profile)


def default_fpr_grid(lowest: float = 1e-5, points: int = 300) -> npt.NDArray[np.float64]:
    """0, log-spaced FPRs from `lowest` to 1, and exactly 1e-3 and 1e-2 (the report quotes those)."""
    return np.unique(np.concatenate([[0.0, 1e-3, 1e-2], np.geomspace(lowest, 1.0, points)]))
