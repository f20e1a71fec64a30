from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from scipy import stats

from secure_fedllm.privacy import DPSGDEvent
from threat_models.attacks.dp_audit import (
    CanaryPlan,
    DPAuditConfig,
    OneRunAudit,
    epsilon_lower_bound,
    one_run_p_value,
)
from threat_models.errors import AttackConfigError

DELTA = 1e-5
M = 1000


# --- conversion (r, v) -> epsilon ----------------------------------------------------------------------------


def test_all_correct_with_many_guesses_gives_a_large_bound():
    assert epsilon_lower_bound(M, 1000, 1000, delta=DELTA) > 5.0
    assert epsilon_lower_bound(M, 100, 100, delta=DELTA) > 2.5


def test_half_correct_gives_zero():
    assert epsilon_lower_bound(M, 1000, 500, delta=DELTA) == 0.0
    assert epsilon_lower_bound(M, 200, 100, delta=DELTA) == 0.0
    assert epsilon_lower_bound(M, 0, 0, delta=DELTA) == 0.0


def test_bound_is_monotone_in_correct_and_in_guesses():
    bounds = [epsilon_lower_bound(M, 600, v, delta=DELTA) for v in range(300, 601, 20)]
    assert all(a <= b for a, b in itertools.pairwise(bounds))
    assert bounds[-1] > bounds[0] == 0.0
    perfect = [epsilon_lower_bound(M, r, r, delta=DELTA) for r in (10, 50, 200, 1000)]
    assert all(a < b for a, b in itertools.pairwise(perfect))


def test_more_delta_or_more_confidence_only_lowers_the_bound():
    base = epsilon_lower_bound(M, 800, 760, delta=0.0)
    assert epsilon_lower_bound(M, 800, 760, delta=1e-3) <= base
    assert epsilon_lower_bound(M, 800, 760, delta=0.0, confidence=0.999) < base


def test_p_value_at_eps_zero_is_the_fair_coin_tail_and_the_bound_sits_on_the_significance():
    assert one_run_p_value(M, 10, 10, 0.0, 0.0) == pytest.approx(2.0**-10)
    assert one_run_p_value(M, 300, 180, 0.0, 0.0) == pytest.approx(stats.binom.sf(179, 300, 0.5))
    eps = epsilon_lower_bound(M, 800, 700, delta=DELTA)
    assert one_run_p_value(M, 800, 700, eps, DELTA) < 0.05 <= one_run_p_value(M, 800, 700, eps + 1e-5, DELTA)


@pytest.mark.parametrize(("r", "v"), [(5, 6), (-1, 0), (M + 1, 10)])
def test_impossible_counts_are_refused(r, v):
    with pytest.raises(AttackConfigError):
        epsilon_lower_bound(M, r, v, delta=DELTA)


# --- simulated mechanism ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("noise", "sample_rate", "steps"), [(0.0, 1.0, 100), (0.0, 0.5, 20), (0.01, 1.0, 10)])
def test_clip_only_positive_control_exceeds_three(noise, sample_rate, steps):
    result = OneRunAudit(DPAuditConfig(num_canaries=M)).simulate(
        noise_multiplier=noise, clip_norm=1.0, steps=steps, sample_rate=sample_rate
    )
    assert result.empirical_epsilon >= 3.0
    assert result.accuracy > 0.99
    assert result.num_canaries == M and 400 < result.num_inserted < 600
    assert result.consistent
    if noise == 0.0:
        assert math.isinf(result.accountant_epsilon)


@pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha")
@pytest.mark.parametrize(("sample_rate", "steps"), [(1.0, 100), (0.1, 200)])
def test_noise_calibrated_for_epsilon_one_is_not_refuted(sample_rate, steps):
    sigma = OneRunAudit().calibrate_noise(1.0, sample_rate=sample_rate, steps=steps)
    for seed in range(3):
        result = OneRunAudit(DPAuditConfig(seed=seed)).simulate(
            noise_multiplier=sigma, clip_norm=2.0, steps=steps, sample_rate=sample_rate
        )
        assert result.accountant_epsilon == pytest.approx(1.0, abs=1e-3)
        assert 0.0 <= result.empirical_epsilon <= 1.0
        assert result.empirical_epsilon <= result.accountant_epsilon
        assert result.consistent


def test_more_noise_or_background_mass_weakens_the_audit():
    audit = OneRunAudit()
    by_noise = [audit.simulate(noise_multiplier=s, clip_norm=1.0, steps=1).empirical_epsilon for s in (0.1, 0.5, 2.0)]
    assert by_noise[0] > by_noise[1] > by_noise[2]
    clean = audit.simulate(noise_multiplier=0.0, clip_norm=1.0, steps=4)
    masked = audit.simulate(noise_multiplier=0.0, clip_norm=1.0, steps=4, background_std=2.0)
    assert masked.empirical_epsilon < clean.empirical_epsilon
    assert not math.isinf(masked.empirical_epsilon)


def test_search_is_bonferroni_corrected_unless_asked_and_fixed_guesses_are_one_test():
    kwargs = {"noise_multiplier": 0.7, "clip_norm": 1.0, "steps": 1}
    corrected = OneRunAudit(DPAuditConfig()).simulate(**kwargs)
    uncorrected = OneRunAudit(DPAuditConfig(correct_for_search=False)).simulate(**kwargs)
    fixed = OneRunAudit(DPAuditConfig(k_plus=100, k_minus=100)).simulate(**kwargs)
    assert corrected.tests == 9 and corrected.search_corrected
    assert not uncorrected.search_corrected
    assert 0 < corrected.empirical_epsilon <= uncorrected.empirical_epsilon
    assert (fixed.tests, fixed.k_plus, fixed.k_minus, fixed.guesses) == (1, 100, 100, 200)


def test_same_seed_same_result_and_rows():
    config = DPAuditConfig(seed=7)
    first = OneRunAudit(config).simulate(noise_multiplier=0.5, clip_norm=1.0, steps=3)
    assert first == OneRunAudit(config).simulate(noise_multiplier=0.5, clip_norm=1.0, steps=3)
    rows = {row.metric: row for row in first.rows()}
    assert set(rows) == {"empirical_epsilon", "accountant_epsilon", "guess_accuracy"}
    assert all(row.attack == "dp_audit" for row in rows.values())
    assert rows["empirical_epsilon"].value == first.empirical_epsilon and rows["empirical_epsilon"].chance == 0.0
    assert rows["guess_accuracy"].chance == 0.5
    assert rows["guess_accuracy"].ci_low <= first.accuracy <= rows["guess_accuracy"].ci_high


# --- auditing a real update vector ---------------------------------------------------------------------------


def _train_like(plan: CanaryPlan, *, clip: float, sigma: float, steps: int, seed: int = 0) -> torch.Tensor:
    """Sum of noisy clipped gradients: real mass off the canary coordinates, canaries, Gaussian noise."""
    gen = torch.Generator().manual_seed(seed)
    total = torch.zeros(plan.dimension)
    free = torch.ones(plan.dimension, dtype=torch.bool)
    free[torch.from_numpy(plan.coordinates)] = False
    for _ in range(steps):
        real = torch.randn(plan.dimension, generator=gen) * free
        total += real * (clip / real.norm()) + plan.inserted_gradient_sum(clip)
        total += torch.randn(plan.dimension, generator=gen) * sigma * clip
    return total


def test_inserted_gradient_sum_is_a_dirac_per_inserted_canary_with_the_clip_norm():
    plan = OneRunAudit().draw_canaries(4096)
    vector = plan.inserted_gradient_sum(1.5)
    assert vector.shape == (4096,)
    assert torch.count_nonzero(vector) == plan.bits.sum()
    assert torch.all(vector[torch.from_numpy(plan.coordinates[plan.bits])] == 1.5)
    assert torch.count_nonzero(plan.inserted_gradient_sum(1.5, sampled=np.zeros(M, dtype=bool))) == 0


def test_update_audit_finds_a_clip_only_update_and_follows_the_sign_of_a_parameter_delta():
    audit = OneRunAudit()
    plan = audit.draw_canaries(4096)
    update = _train_like(plan, clip=1.0, sigma=0.0, steps=5)
    as_sum = audit.audit_update(update, plan)
    assert as_sum.empirical_epsilon >= 3.0 and as_sum.source == "update" and as_sum.accountant_epsilon is None
    delta = -0.01 * update.numpy()  # SGD: params_after - params_before
    assert audit.audit_update(delta, plan, update_kind="parameter_delta").empirical_epsilon == pytest.approx(
        as_sum.empirical_epsilon
    )
    assert audit.audit_update(delta, plan).empirical_epsilon == 0.0  # wrong sign: the guesses are inverted


def test_update_audit_flags_an_update_noisier_in_the_claim_than_in_fact():
    audit = OneRunAudit()
    plan = audit.draw_canaries(2048)
    claimed = [
        DPSGDEvent(noise_multiplier=audit.calibrate_noise(1.0, sample_rate=1.0, steps=5), sample_rate=1.0, steps=5)
    ]
    honest = audit.audit_update(
        _train_like(plan, clip=1.0, sigma=claimed[0].noise_multiplier, steps=5), plan, events=claimed
    )
    broken = audit.audit_update(_train_like(plan, clip=1.0, sigma=0.05, steps=5), plan, events=claimed)
    assert honest.consistent and honest.empirical_epsilon <= 1.0
    assert not broken.consistent and broken.empirical_epsilon > 2.0


# --- configuration errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_canaries": 0},
        {"k_plus": 10},
        {"k_plus": 600, "k_minus": 500},
        {"confidence": 1.0},
        {"delta": -1e-5},
        {"search_fractions": (0.7,)},
        {"unknown": 1},
    ],
)
def test_invalid_config_raises_attack_config_error(kwargs):
    with pytest.raises(AttackConfigError):
        DPAuditConfig(**kwargs)


def test_invalid_mechanism_plan_and_update_raise_attack_config_error():
    audit = OneRunAudit(DPAuditConfig(num_canaries=4))
    for bad in ({"noise_multiplier": -1.0}, {"clip_norm": 0.0}, {"steps": 0}, {"sample_rate": 0.0}):
        with pytest.raises(AttackConfigError):
            audit.simulate(**{"noise_multiplier": 1.0, "clip_norm": 1.0, "steps": 1, **bad})
    with pytest.raises(AttackConfigError):
        CanaryPlan(coordinates=np.array([1, 1, 2]), bits=np.array([True, False, True]), dimension=8)
    with pytest.raises(AttackConfigError):
        CanaryPlan(coordinates=np.array([1, 9]), bits=np.array([True, False]), dimension=8)
    with pytest.raises(AttackConfigError):
        CanaryPlan(coordinates=np.array([1, 2]), bits=np.array([True]), dimension=8)
    with pytest.raises(AttackConfigError):
        audit.draw_canaries(3)
    plan = audit.draw_canaries(8)
    with pytest.raises(AttackConfigError):
        audit.audit_update(np.zeros(9), plan)
    with pytest.raises(AttackConfigError):
        OneRunAudit(DPAuditConfig(accountant="nope")).simulate(noise_multiplier=1.0, clip_norm=1.0, steps=1)
    with pytest.raises(AttackConfigError):
        audit.calibrate_noise(-1.0, sample_rate=1.0, steps=1)
