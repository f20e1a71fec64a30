"""The integer noise samplers against their exact pmfs (chi-square), with controls that must fail.

The reference pmfs are computed here independently of `protocols.dp_noise`: the discrete Gaussian by
summing exp(-k^2 / 2 sigma^2) in Python floats, Skellam by scipy's Bessel-function pmf.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import numpy.typing as npt
import pytest
from scipy import stats

from protocols import DeterministicRandom, LocalProtocolError
from protocols.dp_noise import DiscreteGaussianSampler, PoissonSampler, SkellamSampler

DRAWS = 200_000


def _discrete_gaussian_pmf(sigma: float) -> Callable[[int], float]:
    support = range(-int(40 * sigma) - 5, int(40 * sigma) + 6)
    norm = math.fsum(math.exp(-k * k / (2 * sigma * sigma)) for k in support)
    return lambda k: math.exp(-k * k / (2 * sigma * sigma)) / norm


def _skellam_pmf(mu: float) -> Callable[[int], float]:
    return lambda k: float(stats.skellam.pmf(k, mu, mu))


def _chi_square_p(samples: npt.NDArray[np.int64], pmf: Callable[[int], float]) -> float:
    """Goodness of fit, with the tails pooled into bins of expected count >= 20."""
    values, counts = np.unique(samples, return_counts=True)
    observed = dict(zip(values.tolist(), counts.tolist(), strict=True))
    low, high = int(values.min()) - 3, int(values.max()) + 3
    bins_obs, bins_exp, acc_obs, acc_exp = [], [], 0.0, 0.0
    for k in range(low, high + 1):
        acc_obs += observed.get(k, 0)
        acc_exp += pmf(k) * len(samples)
        if acc_exp >= 20:
            bins_obs.append(acc_obs)
            bins_exp.append(acc_exp)
            acc_obs = acc_exp = 0.0
    bins_obs[-1] += acc_obs + 0.0
    bins_exp[-1] += acc_exp + (1.0 - sum(pmf(k) for k in range(low, high + 1))) * len(samples)
    scale = sum(bins_obs) / sum(bins_exp)
    return float(stats.chisquare(bins_obs, [e * scale for e in bins_exp]).pvalue)


@pytest.mark.parametrize("sigma", [0.8, 3.0, 40.0])
def test_discrete_gaussian_fits_its_exact_pmf(sigma: float) -> None:
    samples = DiscreteGaussianSampler(sigma).sample(DRAWS, rng=DeterministicRandom(int(sigma * 10)))
    assert _chi_square_p(samples, _discrete_gaussian_pmf(sigma)) > 1e-4


def test_control_rounded_continuous_gaussian_is_rejected() -> None:
    """The textbook shortcut (round a float Gaussian) is another distribution: the test must see it."""
    rng = np.random.default_rng(0)
    rounded = np.round(rng.normal(0.0, 0.8, DRAWS)).astype(np.int64)
    assert _chi_square_p(rounded, _discrete_gaussian_pmf(0.8)) < 1e-6


def test_control_a_three_percent_wider_sampler_is_rejected() -> None:
    samples = DiscreteGaussianSampler(3.0 * 1.03).sample(DRAWS, rng=DeterministicRandom(1))
    assert _chi_square_p(samples, _discrete_gaussian_pmf(3.0)) < 1e-6


@pytest.mark.parametrize("mu", [0.7, 12.5, 900.0])
def test_skellam_fits_its_exact_pmf(mu: float) -> None:
    samples = SkellamSampler(mu).sample(DRAWS, rng=DeterministicRandom(int(mu * 10)))
    assert _chi_square_p(samples, _skellam_pmf(mu)) > 1e-4


def test_a_sum_of_skellam_shares_is_skellam_of_the_summed_mu() -> None:
    """Why Skellam: four clients' shares sum to exactly Skellam(4 mu), whoever they are."""
    rng = DeterministicRandom(7)
    total = sum(SkellamSampler(5.0).sample(DRAWS, rng=rng) for _ in range(4))
    assert _chi_square_p(np.asarray(total), _skellam_pmf(20.0)) > 1e-4
    assert _chi_square_p(np.asarray(total), _skellam_pmf(18.0)) < 1e-6  # control: another mu is rejected


def test_the_table_is_within_its_stated_total_variation_bound() -> None:
    sampler = DiscreteGaussianSampler(2.5)
    exact = _discrete_gaussian_pmf(2.5)
    table = sampler.pmf()
    tv = 0.5 * math.fsum(abs(table.get(k, 0.0) - exact(k)) for k in range(-200, 201))
    assert tv <= sampler.total_variation_bound
    assert sampler.total_variation_bound < 1e-15
    assert SkellamSampler(100.0).total_variation_bound < 1e-15


def test_every_uniform_comes_from_the_injected_secret_source() -> None:
    class Counting(DeterministicRandom):
        used = 0

        def token_bytes(self, n: int) -> bytes:
            self.used += n
            return super().token_bytes(n)

    a, b = Counting(3), Counting(3)
    first = DiscreteGaussianSampler(5.0).sample(1000, rng=a)
    second = DiscreteGaussianSampler(5.0).sample(1000, rng=b)
    assert np.array_equal(first, second) and a.used == 8 * 1000
    skellam = Counting(4)
    SkellamSampler(5.0).sample(1000, rng=skellam)
    assert skellam.used == 16 * 1000
    assert not np.array_equal(DiscreteGaussianSampler(5.0).sample(1000), DiscreteGaussianSampler(5.0).sample(1000))


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: DiscreteGaussianSampler(0.0), "sigma"),
        (lambda: DiscreteGaussianSampler(float("nan")), "sigma"),
        (lambda: DiscreteGaussianSampler(1e7), "sigma"),
        (lambda: PoissonSampler(-1.0), "mu"),
        (lambda: SkellamSampler(float("inf")), "mu"),
    ],
)
def test_bad_parameters_are_refused_naming_the_field(make: Callable[[], object], field: str) -> None:
    with pytest.raises(LocalProtocolError, match=field):
        make()
