"""One-run audit of distributed DP-SGD through its own code: rounding, Skellam shares, SecAgg sums.

Soundness: with the calibrated noise, the empirical lower bound stays below the accountant's epsilon
at the audit's delta. Controls that must fail the claim: shares drawn at sigma/4 (mu/16) beat the
declared epsilon 1, and no noise at all gives a large epsilon. Every run is seeded (DeterministicRandom
for the shares and SecAgg keys, numpy generators for sampling and rounding) unless it says otherwise.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from secure_fedllm.privacy import SkellamRDPAccountant
from threat_models.attacks import DistributedAudit, DistributedAuditConfig
from threat_models.attacks.dp_audit import DPAuditConfig
from threat_models.attacks.dp_audit_distributed import audit_distributed
from threat_models.errors import AttackConfigError

DELTA = 1e-5


def _audit(m: int = 1000, **kw: object) -> DPAuditConfig:
    return DPAuditConfig(num_canaries=m, delta=DELTA, **kw)


# --- soundness ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("epsilon", "m", "sample_rate", "steps"),
    [(1.0, 2000, 1.0, 5), (8.0, 2000, 1.0, 1), (1.0, 1000, 0.5, 10)],
)
def test_calibrated_noise_is_not_refuted(epsilon, m, sample_rate, steps):
    result = audit_distributed(audit=_audit(m), target_epsilon=epsilon, sample_rate=sample_rate, steps=steps)
    assert result.aggregation == "secagg" and result.shares == "honest-only"
    # honest-only: the sums carry exactly the accounted Skellam(mu), from h shares of mu / h
    assert result.noising_clients == result.honest == 3
    assert result.central_mu == pytest.approx(result.accounted_mu)
    assert result.actual_epsilon == pytest.approx(result.accountant_epsilon)
    # the audit's delta is the calibration's, so the accountant reads the declared epsilon back
    assert result.accountant_epsilon <= epsilon + 1e-9 and result.accountant_epsilon > 0.99 * epsilon
    assert result.empirical_epsilon <= result.accountant_epsilon
    assert result.consistent


def test_accountant_epsilon_is_recomputed_at_the_audits_delta():
    result = audit_distributed(audit=DPAuditConfig(num_canaries=1000, delta=1e-6), aggregation="ring")
    event = DistributedAudit(DistributedAuditConfig()).mechanism().event(1)  # same d = 1064
    assert result.delta == 1e-6 and result.declared_delta == DELTA
    assert result.accountant_epsilon == pytest.approx(SkellamRDPAccountant().epsilon([event], 1e-6))
    assert result.accountant_epsilon > result.declared_epsilon  # a smaller delta costs epsilon
    assert result.consistent


def test_os_urandom_shares_and_keys_are_not_refuted():
    """Not seeded: the shares and SecAgg keys come from os.urandom (the bound fails with probability <= 5%,
    and at the calibrated noise the audit reaches ~0.1 against 1, so a failure here is not chance)."""
    result = audit_distributed(audit=_audit(1000), secret_source="os")
    assert result.secret_source == "os"
    assert result.empirical_epsilon <= result.accountant_epsilon


# --- controls that must fail the claim ------------------------------------------------------------------------------


def test_control_shares_at_sigma_over_four_beat_the_declared_epsilon_one():
    """Each share drawn at mu/16 (std sigma/4); the accountant still charges the calibrated mu.

    m = 5000 canaries at q = 1 and T = 1 reach ~2.0 (m = 1000 reaches ~1.4, too close to 1 for comfort;
    q = 0.5 over 10 steps reaches only ~1.1 at m = 5000 because the auditor sees only the summed releases).
    """
    result = audit_distributed(audit=_audit(5000), target_epsilon=1.0, noise_scale=0.25)
    assert result.central_mu == pytest.approx(result.accounted_mu / 16)
    assert result.accountant_epsilon <= 1.0
    assert result.empirical_epsilon > 1.5
    assert not result.consistent
    # the audit is still a valid lower bound for the mechanism that actually ran
    assert result.empirical_epsilon <= result.actual_epsilon


def test_control_clip_only_gives_a_large_epsilon():
    result = audit_distributed(audit=_audit(1000), noise_scale=0.0)
    assert result.noising_clients == 0 and result.central_mu == 0.0 and math.isinf(result.actual_epsilon)
    assert result.empirical_epsilon >= 3.0
    assert result.audit.accuracy == 1.0
    assert not result.consistent


def test_all_shares_carry_n_over_h_more_noise_and_only_weaken_the_audit():
    honest = audit_distributed(audit=_audit(5000), noise_scale=0.25, aggregation="ring")
    everyone = audit_distributed(audit=_audit(5000), noise_scale=0.25, aggregation="ring", shares="all")
    assert everyone.noising_clients == 5
    assert everyone.central_mu == pytest.approx(honest.central_mu * 5 / 3)
    assert everyone.actual_epsilon < honest.actual_epsilon
    assert everyone.empirical_epsilon < honest.empirical_epsilon


# --- the released sums are what the result says -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("shares", "noise_scale", "ratio"), [("honest-only", 1.0, 1.0), ("all", 1.0, 5 / 3), ("honest-only", 0.25, 1 / 16)]
)
def test_released_noise_has_the_reported_variance(shares, noise_scale, ratio):
    """On coordinates no inserted canary touches, the released total is pure Skellam: variance 2 mu T."""
    config = DistributedAuditConfig(
        audit=_audit(1000), slack=3000, steps=2, shares=shares, noise_scale=noise_scale, aggregation="ring"
    )
    audit = DistributedAudit(config)
    dp, plan = audit.mechanism(), audit.plan()
    released = audit.release(dp, plan)
    empty = np.ones(config.dimension, dtype=bool)
    empty[plan.coordinates[plan.bits]] = False
    expected = 2 * dp.mu * ratio * config.steps
    assert released[empty].var() == pytest.approx(expected, rel=0.1)
    assert abs(released[empty].mean()) < 4 * math.sqrt(expected / empty.sum())


def test_clip_only_release_is_s_c_per_sampled_inserted_canary():
    config = DistributedAuditConfig(audit=_audit(1000), noise_scale=0.0, steps=3, sample_rate=0.5)
    audit = DistributedAudit(config)
    dp, plan = audit.mechanism(), audit.plan()
    released = audit.release(dp, plan)
    assert dp.scale * dp.clip == 256  # s C is an integer, so rounding is exact
    on = released[plan.coordinates]
    assert (on[~plan.bits] == 0).all() and released.sum() == on.sum()
    counts = on[plan.bits] // 256
    assert (on[plan.bits] % 256 == 0).all() and counts.min() >= 0 and counts.max() <= 3
    assert 0.4 < counts.mean() / 3 < 0.6  # Poisson sampling at q = 0.5


def test_secagg_sessions_and_the_direct_ring_sum_release_the_same_sums():
    config = DistributedAuditConfig(audit=_audit(1000), steps=2, sample_rate=0.5)
    ring = DistributedAudit(config.model_copy(update={"aggregation": "ring"}))
    secagg = DistributedAudit(config)
    dp, plan = secagg.mechanism(), secagg.plan()
    assert np.array_equal(secagg.release(dp, plan), ring.release(dp, plan))


# --- reproducibility and configuration ---------------------------------------------------------------------------


def test_same_seed_same_result_and_rows():
    first = audit_distributed(audit=_audit(1000, seed=3), noise_scale=0.25)
    again = audit_distributed(audit=_audit(1000, seed=3), noise_scale=0.25)
    other = audit_distributed(audit=_audit(1000, seed=4), noise_scale=0.25)
    assert first.model_dump(exclude={"seconds"}) == again.model_dump(exclude={"seconds"})
    assert other.audit.num_inserted != first.audit.num_inserted  # another seed, other canary bits
    rows = {row.metric: row for row in first.rows()}
    assert rows["empirical_epsilon"].value == first.empirical_epsilon
    assert rows["accountant_epsilon"].value == first.accountant_epsilon
    assert rows["actual_noise_epsilon"].value == first.actual_epsilon
    assert all(row.defense == "distributed/honest-only/noise_scale=0.25" for row in rows.values())


@pytest.mark.parametrize(
    "kwargs",
    [
        {"audit": DPAuditConfig(num_canaries=1000, delta=1e-3)},  # delta * m = 1
        {"clients": 3, "corrupt": 1, "dropouts": 2},  # no honest share
        {"noise_scale": -0.5},
        {"shares": "some"},
        {"sample_rate": 0.0},
    ],
)
def test_invalid_config_raises_attack_config_error(kwargs):
    with pytest.raises(AttackConfigError):
        DistributedAuditConfig(**kwargs)
