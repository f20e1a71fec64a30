from __future__ import annotations

import math

import numpy as np
import pytest

from threat_models.errors import AttackConfigError
from threat_models.stats import (
    _beta_ppf_fallback,
    _betainc,
    _delong_variance,
    auc,
    auc_with_ci,
    clopper_pearson,
    dp_consistency,
    dp_tpr_bound,
    min_nonmembers_for_fpr,
    roc_curve,
    tpr_at_fpr,
)

# ----------------------------------------------------------------------------------------------------------- ROC/AUC


def test_roc_curve_runs_from_origin_to_one_and_handles_ties() -> None:
    roc = roc_curve([3.0, 2.0, 1.0], [2.0, 0.0])
    assert roc.fpr.tolist() == [0.0, 0.0, 0.5, 0.5, 1.0]
    assert roc.tpr.tolist() == pytest.approx([0.0, 1 / 3, 2 / 3, 1.0, 1.0])
    assert roc.thresholds[0] == math.inf
    # the tie at 2.0 moves both rates at once: no point at (0, 2/3) or (0.5, 1/3)
    assert (0.0, 2 / 3) not in set(zip(roc.fpr.tolist(), roc.tpr.tolist(), strict=True))


def test_auc_perfect_separation_reversed_and_identical() -> None:
    members, nonmembers = np.arange(10, 20.0), np.arange(10.0)
    assert auc(members, nonmembers) == 1.0
    assert auc(nonmembers, members) == 0.0
    assert auc(members, members) == 0.5  # every pair a tie
    # the trapezoid under the ROC curve is the same number
    roc = roc_curve(members, nonmembers)
    assert np.trapezoid(roc.tpr, roc.fpr) == pytest.approx(1.0)


def test_auc_matches_pairwise_count_with_ties() -> None:
    rng = np.random.default_rng(1)
    pos, neg = rng.integers(0, 5, 40).astype(float), rng.integers(0, 5, 30).astype(float)
    pairs = (pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean()
    assert auc(pos, neg) == pytest.approx(pairs)
    roc = roc_curve(pos, neg)
    assert np.trapezoid(roc.tpr, roc.fpr) == pytest.approx(pairs)


def test_delong_variance_matches_structural_components() -> None:
    rng = np.random.default_rng(2)
    pos, neg = rng.normal(0.5, 1, 60).round(1), rng.normal(0, 1, 45).round(1)
    psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    v10, v01 = psi.mean(axis=1), psi.mean(axis=0)
    expected = v10.var(ddof=1) / pos.size + v01.var(ddof=1) / neg.size
    value, variance = _delong_variance(pos, neg)
    assert value == pytest.approx(psi.mean())
    assert variance == pytest.approx(expected)


def test_identical_distributions_give_chance_auc_with_ci_covering_half() -> None:
    rng = np.random.default_rng(3)
    pos, neg = rng.normal(size=2000), rng.normal(size=2000)
    delong = auc_with_ci(pos, neg)
    assert abs(delong.value - 0.5) < 0.03
    assert delong.ci_low < 0.5 < delong.ci_high
    boot = auc_with_ci(pos, neg, method="bootstrap", bootstrap_samples=300, seed=1)
    assert boot.value == pytest.approx(delong.value)
    assert boot.ci_low == pytest.approx(delong.ci_low, abs=0.01)
    assert boot.ci_high == pytest.approx(delong.ci_high, abs=0.01)


def test_shifted_gaussians_give_the_textbook_auc() -> None:
    rng = np.random.default_rng(4)
    estimate = auc_with_ci(rng.normal(1, 1, 3000), rng.normal(0, 1, 3000))
    true_auc = 0.5 * math.erfc(-1 / 2)  # Phi(1 / sqrt(2))
    assert estimate.ci_low < true_auc < estimate.ci_high
    assert estimate.ci_high - estimate.ci_low < 0.04


def test_perfect_separation_ci_collapses_to_one() -> None:
    estimate = auc_with_ci(np.arange(10, 20.0), np.arange(10.0), allow_small=True)
    assert (estimate.value, estimate.ci_low, estimate.ci_high) == (1.0, 1.0, 1.0)


def test_headline_numbers_need_a_thousand_of_each() -> None:
    with pytest.raises(AttackConfigError, match="at least 1000"):
        auc_with_ci(np.arange(999.0), np.arange(1000.0))
    with pytest.raises(AttackConfigError, match="at least 1000"):
        tpr_at_fpr(np.arange(1000.0), np.arange(999.0), 0.01)
    tpr_at_fpr(np.arange(10.0), np.arange(10.0), 0.1, allow_small=True)


def test_tpr_at_low_fpr_needs_five_thousand_nonmembers_even_when_small_is_allowed() -> None:
    assert min_nonmembers_for_fpr(0.001) == 5000
    with pytest.raises(AttackConfigError, match="5000 non-members"):
        tpr_at_fpr(np.arange(2000.0), np.arange(4999.0), 0.001, allow_small=True)
    point = tpr_at_fpr(np.arange(2000.0), np.arange(5000.0), 0.001)
    assert point.false_positives <= 5


def test_rejects_nan_scores_and_bad_fpr() -> None:
    with pytest.raises(AttackConfigError, match="finite"):
        auc([1.0, float("nan")], [0.0])
    with pytest.raises(AttackConfigError, match="fpr"):
        tpr_at_fpr([1.0], [0.0], 0.0, allow_small=True)


# --------------------------------------------------------------------------------------------------- TPR at FPR


def test_tpr_at_fpr_on_hand_built_scores() -> None:
    nonmembers = np.arange(1000) / 1000  # 0.000 .. 0.999
    members = np.r_[np.full(500, 2.0), np.full(500, -1.0)]
    point = tpr_at_fpr(members, nonmembers, 0.01)
    assert point.threshold == pytest.approx(0.989)  # exactly 10 non-members above it
    assert (point.false_positives, point.fpr) == (10, 0.01)
    assert (point.true_positives, point.tpr) == (500, 0.5)
    assert (point.tpr_ci_low, point.tpr_ci_high) == pytest.approx(clopper_pearson(500, 1000))
    assert (point.fpr_ci_low, point.fpr_ci_high) == pytest.approx(clopper_pearson(10, 1000))


def test_tied_scores_never_exceed_the_target_fpr() -> None:
    point = tpr_at_fpr(np.ones(20), np.ones(100), 0.05, allow_small=True)
    assert point.fpr == 0.0 and point.tpr == 0.0  # calling the tie "member" would give FPR 100%


# ------------------------------------------------------------------------------------------------ Clopper-Pearson


@pytest.mark.parametrize(
    ("k", "n", "low", "high"),
    [
        (0, 10, 0.0, 0.30849710781876),  # 1 - 0.025 ** (1 / 10)
        (10, 10, 0.69150289218124, 1.0),
        (3, 10, 0.06673951117773, 0.65245285000000),  # R: binom.test(3, 10)$conf.int
        (5, 1000, 0.00162541952, 0.01162947056),  # scipy.stats.binomtest(5, 1000), method='exact'
    ],
)
def test_clopper_pearson_known_values(k: int, n: int, low: float, high: float) -> None:
    assert clopper_pearson(k, n) == pytest.approx((low, high), abs=1e-7)


def test_clopper_pearson_fallback_matches_scipy() -> None:
    from scipy.stats import beta

    for a, b in [(1, 10), (3, 8), (4, 7), (50, 951), (0.5, 0.5), (200, 3)]:
        for q in (0.005, 0.025, 0.5, 0.975):
            assert _beta_ppf_fallback(q, a, b) == pytest.approx(beta.ppf(q, a, b), abs=1e-9)
        assert _betainc(a, b, 0.3) == pytest.approx(beta.cdf(0.3, a, b), abs=1e-12)


def test_clopper_pearson_rejects_bad_counts() -> None:
    with pytest.raises(AttackConfigError):
        clopper_pearson(11, 10)
    with pytest.raises(AttackConfigError):
        clopper_pearson(1, 10, confidence=1.0)


# ---------------------------------------------------------------------------------------------------- DP check


def test_dp_tpr_bound_both_sides_of_the_tradeoff() -> None:
    assert dp_tpr_bound(0.01, epsilon=0.0, delta=0.0) == pytest.approx(0.01)  # no attack beats a coin
    assert dp_tpr_bound(0.01, epsilon=1.0, delta=1e-5) == pytest.approx(math.e * 0.01 + 1e-5)
    assert dp_tpr_bound(0.5, epsilon=1.0, delta=0.0) == pytest.approx(1 - 0.5 / math.e)  # FNR side binds
    assert dp_tpr_bound(0.01, epsilon=8.0, delta=0.0) > 0.999  # vacuous at 1% FPR


def test_dp_consistency_flags_an_attack_above_the_bound() -> None:
    violated = dp_consistency(0.5, 0.01, epsilon=1.0, delta=1e-5)
    assert not violated.consistent
    assert violated.epsilon_lower_bound == pytest.approx(math.log((0.5 - 1e-5) / 0.01))
    fine = dp_consistency(0.02, 0.01, epsilon=1.0, delta=1e-5)
    assert fine.consistent and fine.epsilon_lower_bound < 1.0


def test_operating_point_check_uses_the_conservative_interval_ends() -> None:
    nonmembers = np.arange(1000) / 1000
    members = np.r_[np.full(40, 2.0), np.full(960, -1.0)]  # TPR 4% at FPR 1%
    point = tpr_at_fpr(members, nonmembers, 0.01)
    check = point.dp_consistency(epsilon=1.0, delta=0.0)
    # 0.04 > e * 0.01 = 0.027 on the point estimates, but not outside the intervals: no accusation
    assert point.tpr > math.e * point.fpr
    assert check.consistent
    assert (check.tpr_low, check.fpr_high) == (point.tpr_ci_low, point.fpr_ci_high)
