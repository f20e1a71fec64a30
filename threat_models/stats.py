"""Statistics every attack reports with: ROC, AUC with an interval, TPR at a fixed FPR, and a DP check.

Membership numbers are only comparable across papers and defenses when they are reported the same way:
AUC *and* TPR at a low FPR on a log-scale ROC (Carlini et al., *Membership Inference Attacks From First
Principles*, S&P 2022), because AUC alone hides the low-FPR regime where an attack is actually
dangerous. A TPR at an FPR is meaningless without an interval and without enough non-members to
resolve that FPR at all, so this module refuses to report one from too few samples:

* TPR at an FPR below 1% needs at least ``ceil(5 / fpr)`` non-members (5,000 at 0.1%), so that the
  threshold rests on at least five false positives; this rule has no override.
* The headline numbers (AUC, TPR at 1% FPR) need at least 1,000 members and 1,000 non-members;
  unit tests on tiny models pass ``allow_small=True``.

Scores follow one convention throughout: **higher means "member"**.

The DP check is the hypothesis-testing view of differential privacy (Kairouz, Oh, Viswanath, ICML 2015):
an (epsilon, delta)-DP mechanism caps every attack at TPR <= e^epsilon * FPR + delta (plus the symmetric
bound on the false-negative side, see `dp_tpr_bound`). An attack whose TPR interval lies wholly
above that bound is statistical evidence that the claimed epsilon is wrong (a DP audit, Jagielski et al.,
NeurIPS 2020).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict

from .errors import AttackConfigError

__all__ = [
    "HEADLINE_MIN_SAMPLES",
    "AucEstimate",
    "DpConsistency",
    "OperatingPoint",
    "RocCurve",
    "auc",
    "auc_with_ci",
    "clopper_pearson",
    "dp_consistency",
    "dp_tpr_bound",
    "min_nonmembers_for_fpr",
    "require_sample_sizes",
    "roc_curve",
    "tpr_at_fpr",
]

HEADLINE_MIN_SAMPLES = 1_000
"""Members and non-members each needed for a reported AUC or TPR at 1% FPR (override: allow_small)."""

ArrayLike = Sequence[float] | npt.NDArray[np.floating]


# ---------------------------------------------------------------------------------------------------------------
# Result types
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RocCurve:
    """ROC points from the strictest threshold (0, 0) to the loosest (1, 1), for plotting on a log FPR axis.

    Attributes:
        fpr: false-positive rate after each distinct threshold, non-decreasing.
        tpr: true-positive rate after each distinct threshold, non-decreasing.
        thresholds: the score at or above which a record is called a member (``inf`` for the first point).
    """

    fpr: npt.NDArray[np.float64]
    tpr: npt.NDArray[np.float64]
    thresholds: npt.NDArray[np.float64]


class AucEstimate(BaseModel):
    """An AUC with a two-sided confidence interval and how it was obtained."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    value: float
    ci_low: float
    ci_high: float
    confidence: float
    method: Literal["delong", "bootstrap"]


class OperatingPoint(BaseModel):
    """TPR at (at most) a target FPR, with Clopper-Pearson intervals on both rates.

    The threshold is chosen on the same non-members the FPR is measured on (as every MIA paper does),
    so the achieved FPR is at most the target by construction; the FPR interval says how well the
    non-member sample pins the true FPR down.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    target_fpr: float
    threshold: float
    tpr: float
    tpr_ci_low: float
    tpr_ci_high: float
    fpr: float
    fpr_ci_low: float
    fpr_ci_high: float
    true_positives: int
    false_positives: int
    members: int
    nonmembers: int
    confidence: float

    def dp_consistency(self, *, epsilon: float, delta: float) -> DpConsistency:
        """Whether this operating point is consistent with an (epsilon, delta)-DP claim; see `dp_consistency`."""
        return dp_consistency(self.tpr_ci_low, self.fpr_ci_high, epsilon=epsilon, delta=delta, tpr=self.tpr)


class DpConsistency(BaseModel):
    """The outcome of checking an empirical (FPR, TPR) against the trade-off curve of (epsilon, delta)-DP."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    epsilon: float
    delta: float
    fpr_high: float
    tpr_low: float
    tpr: float | None
    bound: float
    consistent: bool
    epsilon_lower_bound: float


# ---------------------------------------------------------------------------------------------------------------
# Sample-size policy
# ---------------------------------------------------------------------------------------------------------------


def min_nonmembers_for_fpr(fpr: float) -> int:
    """Non-members needed before a TPR at `fpr` below 1% is reported: five expected false positives.

    Why five: with fewer, the threshold is set by one or two non-member scores and the reported TPR is
    the TPR at an FPR the data cannot distinguish from zero.
    """
    return math.ceil(5.0 / fpr - 1e-9)


def require_sample_sizes(members: int, nonmembers: int, *, allow_small: bool, what: str) -> None:
    """Refuse headline numbers from fewer than `HEADLINE_MIN_SAMPLES` members or non-members.

    Raises:
        AttackConfigError: a sample is too small and `allow_small` is False.
    """
    if members < 1 or nonmembers < 1:
        raise AttackConfigError(f"{what}: needs at least one member and one non-member (got {members}, {nonmembers})")
    if allow_small:
        return
    if members < HEADLINE_MIN_SAMPLES or nonmembers < HEADLINE_MIN_SAMPLES:
        raise AttackConfigError(
            f"{what}: {members} members / {nonmembers} non-members; a reported number needs at least "
            f"{HEADLINE_MIN_SAMPLES} of each (pass allow_small=True only for tests and smoke runs)"
        )


# ---------------------------------------------------------------------------------------------------------------
# ROC and AUC
# ---------------------------------------------------------------------------------------------------------------


def _as_scores(values: ArrayLike, name: str) -> npt.NDArray[np.float64]:
    array = np.asarray(values, dtype=np.float64).ravel()
    if array.size == 0:
        raise AttackConfigError(f"{name}: no scores")
    if not np.all(np.isfinite(array)):
        raise AttackConfigError(f"{name}: scores must be finite (found NaN or inf)")
    return array


def roc_curve(member_scores: ArrayLike, nonmember_scores: ArrayLike) -> RocCurve:
    """The empirical ROC curve, one point per distinct score (ties move both rates at once)."""
    pos = _as_scores(member_scores, "member_scores")
    neg = _as_scores(nonmember_scores, "nonmember_scores")
    scores = np.concatenate([pos, neg])
    labels = np.concatenate([np.ones(pos.size), np.zeros(neg.size)])
    order = np.argsort(-scores, kind="mergesort")
    scores, labels = scores[order], labels[order]
    last_of_group = np.flatnonzero(np.r_[scores[1:] != scores[:-1], True])
    tp = np.cumsum(labels)[last_of_group]
    fp = (last_of_group + 1) - tp
    return RocCurve(
        fpr=np.r_[0.0, fp / neg.size],
        tpr=np.r_[0.0, tp / pos.size],
        thresholds=np.r_[np.inf, scores[last_of_group]],
    )


def _midranks(values: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """1-based ranks with ties given their average rank (what the Mann-Whitney statistic needs)."""
    order = np.argsort(values, kind="mergesort")
    ordered = values[order]
    bounds = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1], True])
    group_rank = (bounds[:-1] + 1 + bounds[1:]) / 2.0
    ranks = np.empty(values.size, dtype=np.float64)
    ranks[order] = np.repeat(group_rank, np.diff(bounds))
    return ranks


def auc(member_scores: ArrayLike, nonmember_scores: ArrayLike) -> float:
    """Area under the ROC curve = P(member score > non-member score) + P(tie) / 2 (Mann-Whitney U)."""
    pos = _as_scores(member_scores, "member_scores")
    neg = _as_scores(nonmember_scores, "nonmember_scores")
    ranks = _midranks(np.concatenate([pos, neg]))
    u = ranks[: pos.size].sum() - pos.size * (pos.size + 1) / 2.0
    return float(u / (pos.size * neg.size))


def _delong_variance(pos: npt.NDArray[np.float64], neg: npt.NDArray[np.float64]) -> tuple[float, float]:
    """AUC and its DeLong variance, via midranks (Sun & Xu, IEEE SPL 2014): O(n log n), no pair matrix."""
    m, n = pos.size, neg.size
    combined = _midranks(np.concatenate([pos, neg]))
    v10 = (combined[:m] - _midranks(pos)) / n  # per member: fraction of non-members it beats
    v01 = 1.0 - (combined[m:] - _midranks(neg)) / m  # per non-member: fraction of members that beat it
    value = float(v10.mean())
    s10 = float(v10.var(ddof=1)) if m > 1 else 0.0
    s01 = float(v01.var(ddof=1)) if n > 1 else 0.0
    return value, s10 / m + s01 / n


def _normal_quantile(p: float) -> float:
    """Inverse standard normal CDF (scipy if present, else bisection on erf: accurate to ~1e-12)."""
    try:
        from scipy.stats import norm  # type: ignore[import-untyped, unused-ignore]

        return float(norm.ppf(p))
    except ImportError:  # pragma: no cover - scipy ships with the venv
        lo, hi = -40.0, 40.0
        for _ in range(200):
            mid = (lo + hi) / 2
            if 0.5 * math.erfc(-mid / math.sqrt(2)) < p:
                lo = mid
            else:
                hi = mid
        return (lo + hi) / 2


def auc_with_ci(
    member_scores: ArrayLike,
    nonmember_scores: ArrayLike,
    *,
    confidence: float = 0.95,
    method: Literal["delong", "bootstrap"] = "delong",
    bootstrap_samples: int = 1000,
    seed: int = 0,
    allow_small: bool = False,
) -> AucEstimate:
    """AUC with a two-sided interval: DeLong's normal approximation (default) or a percentile bootstrap.

    DeLong is exact in its variance estimate and needs no resampling, so it is the default for
    the 10^3..10^4-sample evaluations we run; the bootstrap resamples members and non-members
    separately (stratified) and makes no normality assumption. Both collapse to a zero-width interval
    at perfect separation (every member above every non-member): read such an interval as "AUC is 1
    on this sample", not as certainty.

    Raises:
        AttackConfigError: fewer than 1,000 members or non-members and not `allow_small`, or a bad argument.
    """
    if not 0 < confidence < 1:
        raise AttackConfigError(f"confidence={confidence}: must lie in (0, 1)")
    pos = _as_scores(member_scores, "member_scores")
    neg = _as_scores(nonmember_scores, "nonmember_scores")
    require_sample_sizes(pos.size, neg.size, allow_small=allow_small, what="AUC")
    alpha = 1.0 - confidence
    if method == "delong":
        value, variance = _delong_variance(pos, neg)
        half = _normal_quantile(1 - alpha / 2) * math.sqrt(max(variance, 0.0))
        low, high = max(0.0, value - half), min(1.0, value + half)
    elif method == "bootstrap":
        if bootstrap_samples < 100:
            raise AttackConfigError(f"bootstrap_samples={bootstrap_samples}: use at least 100")
        value = auc(pos, neg)
        rng = np.random.default_rng(seed)
        draws = np.empty(bootstrap_samples)
        for b in range(bootstrap_samples):
            draws[b] = auc(rng.choice(pos, pos.size), rng.choice(neg, neg.size))
        low, high = (float(q) for q in np.quantile(draws, [alpha / 2, 1 - alpha / 2]))
    else:
        raise AttackConfigError(f"method={method!r}: use 'delong' or 'bootstrap'")
    return AucEstimate(value=value, ci_low=low, ci_high=high, confidence=confidence, method=method)


# ---------------------------------------------------------------------------------------------------------------
# Clopper-Pearson
# ---------------------------------------------------------------------------------------------------------------


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz; Numerical Recipes 6.4)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b), the CDF of Beta(a, b) at x."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def _beta_ppf_fallback(q: float, a: float, b: float) -> float:
    """Quantile of Beta(a, b) by bisection on `_betainc` (monotone in x), to ~1e-15."""
    lo, hi = 0.0, 1.0
    for _ in range(100):
        mid = (lo + hi) / 2.0
        if _betainc(a, b, mid) < q:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2.0


def _beta_ppf(q: float, a: float, b: float) -> float:
    try:
        from scipy.stats import beta  # type: ignore[import-untyped, unused-ignore]
    except ImportError:  # pragma: no cover - scipy ships with the venv; the fallback is tested directly
        return _beta_ppf_fallback(q, a, b)
    return float(beta.ppf(q, a, b))


def clopper_pearson(successes: int, trials: int, *, confidence: float = 0.95) -> tuple[float, float]:
    """Exact (conservative) binomial interval: coverage >= `confidence` for every true rate.

    Why exact rather than normal/Wilson: at 1% and 0.1% FPR the counts are small (often 0-20 true
    positives), exactly where normal approximations undercover. Uses scipy's beta quantile when
    available, else a bisection on the regularized incomplete beta.

    Raises:
        AttackConfigError: counts out of range or confidence not in (0, 1).
    """
    if trials < 1 or not 0 <= successes <= trials:
        raise AttackConfigError(
            f"clopper_pearson: need 0 <= successes <= trials and trials >= 1 (got {successes}/{trials})"
        )
    if not 0 < confidence < 1:
        raise AttackConfigError(f"confidence={confidence}: must lie in (0, 1)")
    alpha = 1.0 - confidence
    low = 0.0 if successes == 0 else _beta_ppf(alpha / 2, successes, trials - successes + 1)
    high = 1.0 if successes == trials else _beta_ppf(1 - alpha / 2, successes + 1, trials - successes)
    return low, high


# ---------------------------------------------------------------------------------------------------------------
# TPR at a fixed FPR
# ---------------------------------------------------------------------------------------------------------------


def tpr_at_fpr(
    member_scores: ArrayLike,
    nonmember_scores: ArrayLike,
    fpr: float,
    *,
    confidence: float = 0.95,
    allow_small: bool = False,
) -> OperatingPoint:
    """TPR at the strictest threshold whose empirical FPR does not exceed `fpr`.

    A record is called a member when its score is strictly above the threshold, and the threshold is
    the (k+1)-th largest non-member score with k = floor(fpr * non-members), so at most k non-members
    (ties included) are false positives. The TPR interval is Clopper-Pearson over the members.

    Raises:
        AttackConfigError: `fpr` outside (0, 1); below 1% FPR with fewer than ceil(5 / fpr) non-members
            (no override); fewer than 1,000 members or non-members without `allow_small`.
    """
    if not 0 < fpr < 1:
        raise AttackConfigError(f"fpr={fpr}: must lie in (0, 1)")
    pos = _as_scores(member_scores, "member_scores")
    neg = _as_scores(nonmember_scores, "nonmember_scores")
    if fpr < 0.01 and neg.size < min_nonmembers_for_fpr(fpr):
        raise AttackConfigError(
            f"TPR at {fpr:.4%} FPR needs at least {min_nonmembers_for_fpr(fpr)} non-members "
            f"(five expected false positives), got {neg.size}; add non-members or report a higher FPR"
        )
    require_sample_sizes(pos.size, neg.size, allow_small=allow_small, what=f"TPR at {fpr:.2%} FPR")
    allowed = math.floor(fpr * neg.size + 1e-9)
    if allowed >= neg.size:
        threshold = -math.inf
    else:
        threshold = float(np.sort(neg)[::-1][allowed])
    tp = int(np.count_nonzero(pos > threshold))
    fp = int(np.count_nonzero(neg > threshold))
    tpr_low, tpr_high = clopper_pearson(tp, pos.size, confidence=confidence)
    fpr_low, fpr_high = clopper_pearson(fp, neg.size, confidence=confidence)
    return OperatingPoint(
        target_fpr=fpr,
        threshold=threshold,
        tpr=tp / pos.size,
        tpr_ci_low=tpr_low,
        tpr_ci_high=tpr_high,
        fpr=fp / neg.size,
        fpr_ci_low=fpr_low,
        fpr_ci_high=fpr_high,
        true_positives=tp,
        false_positives=fp,
        members=pos.size,
        nonmembers=neg.size,
        confidence=confidence,
    )


# ---------------------------------------------------------------------------------------------------------------
# DP consistency
# ---------------------------------------------------------------------------------------------------------------


def dp_tpr_bound(fpr: float, *, epsilon: float, delta: float) -> float:
    """The largest TPR any attack can have at `fpr` against an (epsilon, delta)-DP mechanism.

    Both inequalities of the DP trade-off region (Kairouz et al. 2015): FPR + e^eps * FNR >= 1 - delta
    and FNR + e^eps * FPR >= 1 - delta, i.e. TPR <= min(e^eps * FPR + delta, 1 - e^-eps * (1 - delta - FPR)).
    """
    if epsilon < 0 or not 0 <= delta <= 1 or not 0 <= fpr <= 1:
        raise AttackConfigError(
            f"dp_tpr_bound: need epsilon >= 0 and delta, fpr in [0, 1] (got {epsilon}, {delta}, {fpr})"
        )
    first = math.exp(epsilon) * fpr + delta if epsilon < 700 else math.inf
    second = 1.0 - math.exp(-epsilon) * (1.0 - delta - fpr)
    return min(1.0, first, second)


def _epsilon_lower_bound(tpr_low: float, fpr_high: float, delta: float) -> float:
    """The smallest epsilon that (tpr_low, fpr_high) forces, from both trade-off inequalities (0 if none)."""
    candidates = [0.0]
    if tpr_low - delta > 0:
        candidates.append(math.inf if fpr_high <= 0 else math.log((tpr_low - delta) / fpr_high))
    if 1.0 - delta - fpr_high > 0:
        fnr_high = 1.0 - tpr_low
        candidates.append(math.inf if fnr_high <= 0 else math.log((1.0 - delta - fpr_high) / fnr_high))
    return max(candidates)


def dp_consistency(
    tpr_low: float, fpr_high: float, *, epsilon: float, delta: float, tpr: float | None = None
) -> DpConsistency:
    """Is TPR <= e^eps * FPR + delta (and the symmetric bound) within the measurement's intervals?

    Conservative in the direction of *not* accusing the mechanism: the lower end of the TPR interval is
    compared with the bound at the upper end of the FPR interval. `consistent=False` is therefore
    evidence (at roughly the product of the two confidence levels) that the mechanism is not
    (epsilon, delta)-DP, or that the accounting or implementation is broken. `epsilon_lower_bound` is the
    empirical epsilon this measurement certifies (an audit lower bound).
    """
    bound = dp_tpr_bound(fpr_high, epsilon=epsilon, delta=delta)
    return DpConsistency(
        epsilon=epsilon,
        delta=delta,
        fpr_high=fpr_high,
        tpr_low=tpr_low,
        tpr=tpr,
        bound=bound,
        consistent=tpr_low <= bound + 1e-12,
        epsilon_lower_bound=_epsilon_lower_bound(tpr_low, fpr_high, delta),
    )
