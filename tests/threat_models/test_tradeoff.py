"""The membership ROC bound from the tight accountant's privacy profile (threat_models.tradeoff)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import norm

from secure_fedllm.privacy import DPSGDEvent, PLDAccountant
from threat_models import AttackConfigError
from threat_models.tradeoff import (
    default_fpr_grid,
    epsilon_grid,
    privacy_profile,
    roc_bound,
    tpr_bound_from_profile,
)

FPR = default_fpr_grid()
GRID_SLACK = 1e-3
"""How far above the exact curve the bound may sit (see the Gaussian test for where it comes from)."""

# about epsilon 7.9 at delta 1e-5 under the PLD accountant (add/remove): a typical "epsilon 8" run
EPS8 = [DPSGDEvent(noise_multiplier=0.55, sample_rate=0.02, steps=120)]


def _gaussian(sigma: float) -> list[DPSGDEvent]:
    return [DPSGDEvent(noise_multiplier=sigma, sample_rate=1.0, steps=1)]


def _g_mu(fpr: np.ndarray, mu: float) -> np.ndarray:
    """The exact trade-off of the Gaussian mechanism as an ROC: TPR = Phi(Phi^-1(FPR) + mu)."""
    return norm.cdf(norm.ppf(fpr) + mu)


def _gaussian_profile(eps: np.ndarray, mu: float) -> np.ndarray:
    """Exact delta(eps) of the Gaussian mechanism (Balle, Wang 2018, Theorem 8)."""
    return norm.cdf(-eps / mu + mu / 2) - np.exp(eps) * norm.cdf(-eps / mu - mu / 2)


@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.0])
def test_one_gaussian_step_gives_g_mu_from_above_within_the_grid_slack(sigma):
    """q = 1, one step: the exact f-DP curve is G_mu with mu = 1/sigma (Dong, Roth, Su 2019).

    The tolerance, in two measured parts. (1) Grid: the bound is the lower envelope of the tangent
    lines at ~200 epsilons, log-spaced with neighbours 4.8% apart, so it overshoots the curve
    between tangent points by a second-order amount; with the *exact* Gaussian profile on the same
    grid the overshoot is at most 4.9e-4 (mu = 2), 1.5e-4 (mu = 1), 5.6e-5 (mu = 0.5). (2) PLD:
    the pessimistic discretisation (interval 3e-3) raises delta by ~1e-6, asserted below 1e-4.
    Both are upward only, so the bound never drops below G_mu.
    """
    mu = 1.0 / sigma
    exact = _g_mu(FPR, mu)
    bound = roc_bound(_gaussian(sigma), FPR)
    assert np.all(bound >= exact - 1e-6)  # sound: never below the exact curve
    assert np.all(bound <= exact + GRID_SLACK)
    eps = epsilon_grid(_gaussian(sigma))
    grid_only = tpr_bound_from_profile(FPR, eps, _gaussian_profile(eps, mu))
    assert np.all(grid_only <= exact + 5e-4)
    assert np.all(np.abs(bound - grid_only) <= 1e-4)


def test_the_gaussian_check_fails_for_a_profile_with_too_little_noise():
    """Control: a profile that under-states delta (sigma taken 25% too large) drops below G_mu."""
    exact = _g_mu(FPR, 1.0)
    too_optimistic = roc_bound(_gaussian(1.25), FPR)
    assert np.any(too_optimistic < exact - GRID_SLACK)


def test_replace_one_is_the_gaussian_with_twice_the_sensitivity():
    """Replacing a record moves the sum by up to 2 clip norms: G_(2/sigma)."""
    exact = _g_mu(FPR, 2.0 / 2.0)
    bound = roc_bound(_gaussian(2.0), FPR, neighbouring="replace")
    assert np.all(bound >= exact - 1e-6) and np.all(bound <= exact + GRID_SLACK)


def test_the_profile_is_the_accountants_own():
    """The curve comes from the same PLD the run's epsilon is read from."""
    delta = 1e-5
    epsilon = PLDAccountant().epsilon(EPS8, delta)
    at, below = privacy_profile(EPS8, [epsilon, epsilon - 0.05])
    assert at <= delta * (1 + 1e-6) < below


def test_the_bound_is_below_the_single_pair_line_and_far_below_it_where_that_line_is_vacuous():
    delta = 1e-5
    epsilon = PLDAccountant().epsilon(EPS8, delta)
    assert 7.5 < epsilon < 8.5
    line = np.minimum(1.0, np.exp(epsilon) * FPR + delta)
    bound = roc_bound(EPS8, FPR, delta=delta)
    assert np.all(bound <= line + 1e-12)
    at_1pct = FPR == 1e-2
    assert line[at_1pct] == 1.0  # e^8 * 1% > 1: the single pair allows a perfect attacker
    assert bound[at_1pct] < 0.2
    assert np.any(bound < line - 0.5)


def test_the_bound_is_monotone_at_least_chance_and_one_at_fpr_one():
    bound = roc_bound(EPS8, FPR)
    assert np.all(np.diff(bound) >= 0)
    assert np.all(bound >= FPR)
    assert bound[-1] == 1.0 and FPR[-1] == 1.0


def test_events_compose_like_their_steps_and_more_steps_allow_more():
    half = DPSGDEvent(noise_multiplier=0.8, sample_rate=0.05, steps=50)
    whole = DPSGDEvent(noise_multiplier=0.8, sample_rate=0.05, steps=100)
    two = roc_bound([half, half], FPR)
    assert np.allclose(two, roc_bound([whole], FPR), atol=1e-6)
    assert np.all(two >= roc_bound([half], FPR) - 1e-9)
    assert np.any(two > roc_bound([half], FPR) + 1e-2)


def test_pure_dp_pairs_give_the_known_two_line_trade_off():
    """(eps, 0) both ways: TPR_max = min(e^eps FPR, 1 - e^-eps (1 - FPR)) (Kairouz, Oh, Viswanath 2015)."""
    fpr = np.linspace(0, 1, 101)
    got = tpr_bound_from_profile(fpr, [0.0, 1.0, 3.0], [1.0, 0.0, 0.0])
    assert np.allclose(got, np.minimum(np.exp(1.0) * fpr, 1 - np.exp(-1.0) * (1 - fpr)))


def test_refusals_name_the_field():
    with pytest.raises(AttackConfigError, match="noise_multiplier is 0"):
        roc_bound([DPSGDEvent(noise_multiplier=0.0, sample_rate=0.1, steps=1)], FPR)
    with pytest.raises(AttackConfigError, match="events is empty"):
        roc_bound([], FPR)
    with pytest.raises(AttackConfigError, match="fpr"):
        roc_bound(EPS8, [0.5, 1.5])
    with pytest.raises(AttackConfigError, match="neighbouring"):
        roc_bound(EPS8, FPR, neighbouring="swap")
