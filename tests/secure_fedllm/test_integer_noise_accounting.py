"""Integer-noise RDP accounting checked against Rényi divergences summed directly from the pmf."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.special import logsumexp
from scipy.stats import skellam

from secure_fedllm.errors import ConfigError
from secure_fedllm.privacy import (
    IntegerNoiseEvent,
    SkellamRDPAccountant,
    discrete_gaussian_rdp,
    poisson_subsampled_rdp,
    skellam_mu_for_epsilon,
    skellam_rdp,
)

ORDERS = (2, 3, 4, 8, 16, 32)
MUS = (2.0, 5.0, 20.0)
RATES = (0.05, 0.3, 0.7)


def _skellam_logpmf(mu: float, shift: int) -> np.ndarray:
    """log pmf of Skellam(mu, mu) + shift on [-K, K], K wide enough that the truncated tail is negligible."""
    k = np.arange(-(int(mu + 40 * math.sqrt(mu)) + 200), int(mu + 40 * math.sqrt(mu)) + 201)
    return np.asarray(skellam.logpmf(k - shift, mu, mu))


def _renyi(log_p: np.ndarray, log_q: np.ndarray, alpha: int) -> float:
    """D_alpha(P || Q) = log sum p^alpha q^(1-alpha) / (alpha - 1), over the common finite support."""
    finite = np.isfinite(log_p) & np.isfinite(log_q)
    return float(logsumexp(alpha * log_p[finite] + (1 - alpha) * log_q[finite])) / (alpha - 1)


def _exact_subsampled(mu: float, q: float, alpha: int) -> float:
    """Both directions of add/remove: mixture (1-q) P + q Q against P, P = Sk(mu), Q = Sk(mu) + 1."""
    p, shifted = _skellam_logpmf(mu, 0), _skellam_logpmf(mu, 1)
    mixture = np.logaddexp(math.log1p(-q) + p, math.log(q) + shifted)
    return max(_renyi(mixture, p, alpha), _renyi(p, mixture, alpha))


def test_skellam_rdp_upper_bounds_exact_divergence_and_is_not_loose() -> None:
    for mu in MUS:
        p, shifted = _skellam_logpmf(mu, 0), _skellam_logpmf(mu, 1)
        for alpha in ORDERS:
            exact = max(_renyi(shifted, p, alpha), _renyi(p, shifted, alpha))
            bound = skellam_rdp(alpha, mu=mu, l1=1, l2=1)
            assert exact <= bound, (mu, alpha, exact, bound)
            # measured: at most 2.98x (mu=2, alpha=32); at most 1.15x from mu=20
            assert bound <= (3.5 if mu < 20 else 1.2) * exact, (mu, alpha, exact, bound)


def test_skellam_exact_check_can_fail_on_a_wrong_bound() -> None:
    # control: counting the variance of Skellam(mu, mu) as 4 mu (twice too much noise) is not a bound
    p, shifted = _skellam_logpmf(2.0, 0), _skellam_logpmf(2.0, 1)
    exact = _renyi(shifted, p, 2)
    assert skellam_rdp(2, mu=4.0, l1=1, l2=1) < exact


def test_poisson_subsampled_rdp_upper_bounds_exact_mixture_divergence() -> None:
    for mu in MUS:
        base = [skellam_rdp(a, mu=mu, l1=1, l2=1) for a in range(2, max(ORDERS) + 1)]
        for q in RATES:
            for alpha in ORDERS:
                exact = _exact_subsampled(mu, q, alpha)
                bound = poisson_subsampled_rdp(alpha, q, base)
                assert exact <= bound, (mu, q, alpha, exact, bound)
                # the callable form gives the same number
                assert poisson_subsampled_rdp(alpha, q, lambda a, mu=mu: skellam_rdp(a, mu=mu, l1=1, l2=1)) == (
                    pytest.approx(bound)
                )


def test_subsampling_check_can_fail_on_wrong_bounds() -> None:
    # control 1: "q^2 times the base RDP" falls below the exact subsampled divergence
    mu, q, alpha = 2.0, 0.05, 16
    exact = _exact_subsampled(mu, q, alpha)
    assert q * q * skellam_rdp(alpha, mu=mu, l1=1, l2=1) < exact
    # control 2: Zhu-Wang with the l >= 3 terms dropped is not a bound either
    eps2 = skellam_rdp(2, mu=mu, l1=1, l2=1)
    truncated = logsumexp(
        [
            (alpha - 1) * math.log1p(-q) + math.log1p((alpha - 1) * q),
            math.log(alpha * (alpha - 1) / 2) + 2 * math.log(q) + (alpha - 2) * math.log1p(-q) + eps2,
        ]
    ) / (alpha - 1)
    assert truncated < exact


def test_subsampled_rdp_at_full_rate_is_the_base_rdp() -> None:
    base = [skellam_rdp(a, mu=5.0, l1=1, l2=1) for a in range(2, 9)]
    assert poisson_subsampled_rdp(8, 1.0, base) == base[-1]


def test_skellam_approaches_gaussian_for_large_mu() -> None:
    for mu in (1e4, 1e6):
        for alpha in (2, 16, 64):
            gaussian = alpha * 1.0 / (2 * (2 * mu))
            assert skellam_rdp(alpha, mu=mu, l1=1, l2=1) == pytest.approx(gaussian, rel=0.03)


def test_discrete_gaussian_rdp_upper_bounds_exact_divergence() -> None:
    for sigma in (0.8, 2.0, 5.0):
        k = np.arange(-400, 401)
        log_p = -(k**2) / (2 * sigma**2)
        log_p -= logsumexp(log_p)
        log_shift = -((k - 1) ** 2) / (2 * sigma**2)
        log_shift -= logsumexp(log_shift)
        for alpha in (2, 4, 16):
            exact = _renyi(log_shift, log_p, alpha)
            bound = discrete_gaussian_rdp(alpha, sigma=sigma, l2=1, dimension=1)
            assert exact <= bound + 1e-12
            assert bound <= 1.5 * exact
    with pytest.raises(ConfigError, match="dimension"):
        discrete_gaussian_rdp(2, sigma=1.0, l2=1.0, dimension=0)


def test_calibration_meets_target_tightly_and_scales_with_sensitivity() -> None:
    delta, q, steps = 1e-5, 0.125, 9
    accountant = SkellamRDPAccountant()
    mus = []
    for l2 in (4.0, 16.0):
        mu = skellam_mu_for_epsilon(8.0, delta=delta, sample_rate=q, steps=steps, l1=l2 * l2, l2=l2)
        at = accountant.epsilon([IntegerNoiseEvent(mu=mu, l1=l2 * l2, l2=l2, sample_rate=q, steps=steps)], delta)
        below = accountant.epsilon(
            [IntegerNoiseEvent(mu=0.99 * mu, l1=l2 * l2, l2=l2, sample_rate=q, steps=steps)], delta
        )
        assert at <= 8.0 < below
        mus.append(mu)
    assert mus[1] > mus[0] * 10  # 4x the sensitivity needs about 16x the variance


def test_replace_is_at_least_add_remove_and_history_composes() -> None:
    event = IntegerNoiseEvent(mu=200.0, l1=16.0, l2=4.0, sample_rate=0.125, steps=9)
    add_remove = SkellamRDPAccountant().epsilon([event], 1e-5)
    assert SkellamRDPAccountant(neighbouring="replace").epsilon([event], 1e-5) > add_remove
    twice = SkellamRDPAccountant().epsilon([event, event], 1e-5)
    assert twice > add_remove
    doubled = event.model_copy(update={"steps": 18})
    assert SkellamRDPAccountant().epsilon([doubled], 1e-5) == pytest.approx(twice)
    assert SkellamRDPAccountant().epsilon([], 1e-5) == 0.0


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"delta": 0.0}, "delta"),
        ({"sample_rate": 1.5}, "sample_rate"),
        ({"steps": 0}, "steps"),
        ({"l1": 1.0, "l2": 4.0}, "l1"),
        ({"l2": -1.0}, "l2"),
    ],
)
def test_calibration_refuses_bad_parameters(kwargs: dict[str, float], field: str) -> None:
    params: dict[str, float] = {"delta": 1e-5, "sample_rate": 0.125, "steps": 9, "l1": 1.0, "l2": 1.0}
    params.update(kwargs)
    with pytest.raises(ConfigError, match=field):
        skellam_mu_for_epsilon(8.0, **params)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="target"):
        skellam_mu_for_epsilon(0.0, delta=1e-5, sample_rate=0.125, steps=9, l1=1.0, l2=1.0)
    with pytest.raises(ConfigError, match="alpha"):
        skellam_rdp(1, mu=1.0, l1=1.0, l2=1.0)
