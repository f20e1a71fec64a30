"""The tight accountant: calibrated noise checked against an independent PLD computation.

The reference here is dp_accounting's `PrivacyLossDistribution` built directly in the test, at a ten
times finer discretisation than the accountant under test, with pessimistic rounding and the
truncated tail mass counted in delta: an upper bound on the true epsilon. Calibration must land at
or below the target under that reference (sound) and within 1% of it (tight).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import pytest
from dp_accounting import NeighboringRelation
from dp_accounting.pld import privacy_loss_distribution

from secure_fedllm.privacy import DPSGDEvent, PLDAccountant, make_accountant, noise_for_epsilon

RELATIONS = {"add_remove": NeighboringRelation.ADD_OR_REMOVE_ONE, "replace": NeighboringRelation.REPLACE_ONE}


def _reference_pld(
    events: Sequence[DPSGDEvent], neighbouring: str, interval: float = 1e-4
) -> privacy_loss_distribution.PrivacyLossDistribution:
    composed = None
    for e in events:
        step = _one_event(e.noise_multiplier, e.sample_rate, e.steps, neighbouring, interval)
        composed = step if composed is None else composed.compose(step)
    assert composed is not None
    return composed


@functools.lru_cache(maxsize=64)
def _one_event(
    sigma: float, q: float, steps: int, neighbouring: str, interval: float
) -> privacy_loss_distribution.PrivacyLossDistribution:
    return privacy_loss_distribution.from_gaussian_mechanism(
        sigma,
        sampling_prob=q,
        pessimistic_estimate=True,
        value_discretization_interval=interval,
        neighboring_relation=RELATIONS[neighbouring],
    ).self_compose(steps)


def _reference_epsilon(events: Sequence[DPSGDEvent], delta: float, neighbouring: str) -> float:
    return float(_reference_pld(events, neighbouring).get_epsilon_for_delta(delta))


# (label, sample rate q_i, DP-SGD steps, delta): record level with the default client (batch 32 of
# 256 records, 3 rounds x 3 steps), heterogeneous clients of 100 and 1,000 records with the same
# batch, and a user-level client sampling 8 of 40 persons per step.
SETTINGS = [
    ("record, default N_i=256", 32 / 256, 9, 0.1 / 256),
    ("record, small N_i=100", 32 / 100, 9, 0.1 / 100),
    ("record, large N_i=1000", 32 / 1000, 9, 0.1 / 1000),
    ("user level, 40 persons", 8 / 40, 9, 0.1 / 40),
]


CASES = [(*s, "replace") for s in SETTINGS] + [(*SETTINGS[0], "add_remove")]


@pytest.mark.parametrize(
    ("label", "q", "steps", "delta", "neighbouring"), CASES, ids=[f"{c[0]}, {c[4]}" for c in CASES]
)
def test_calibrated_noise_meets_the_target_and_wastes_under_one_percent(
    label: str, q: float, steps: int, delta: float, neighbouring: str
) -> None:
    accountant = make_accountant("pld", neighbouring=neighbouring)
    sigma = noise_for_epsilon(8.0, delta=delta, sample_rate=q, steps=steps, accountant=accountant)
    reference = _reference_epsilon(
        [DPSGDEvent(noise_multiplier=sigma, sample_rate=q, steps=steps)], delta, neighbouring
    )
    assert reference <= 8.0, f"{label}: sigma={sigma} gives epsilon {reference} > 8 under the reference"
    assert reference >= 0.99 * 8.0, f"{label}: sigma={sigma} gives only {reference}: calibration is loose"


def test_heterogeneous_clients_each_calibrate_to_their_own_target() -> None:
    """Three sites of different sizes, one target: each lands at the target for its own q_i and delta_i."""
    accountant = make_accountant("pld", neighbouring="replace")
    sigmas = []
    for records in (100, 256, 1000):
        q, delta = 32 / records, 0.1 / records
        sigma = noise_for_epsilon(1.0, delta=delta, sample_rate=q, steps=9, accountant=accountant)
        eps = _reference_epsilon([DPSGDEvent(noise_multiplier=sigma, sample_rate=q, steps=9)], delta, "replace")
        assert 0.99 <= eps <= 1.0
        sigmas.append(sigma)
    assert sigmas[0] > sigmas[1] > sigmas[2]  # a larger q (fewer records) needs more noise


def test_tight_default_needs_less_noise_than_rdp_at_the_default_setting() -> None:
    """The issue's measurement: at epsilon 8 the default client needs ~0.54 (add/remove) under PLD, not 0.598."""
    q, steps, delta = 32 / 256, 9, 0.1 / 256
    pld = noise_for_epsilon(8.0, delta=delta, sample_rate=q, steps=steps, accountant=make_accountant("pld"))
    rdp = noise_for_epsilon(8.0, delta=delta, sample_rate=q, steps=steps, accountant=make_accountant("rdp"))
    assert pld == pytest.approx(0.54, abs=0.005)
    assert rdp == pytest.approx(0.598, abs=0.002)
    assert pld < 0.92 * rdp


class _AddDirectionOnly(PLDAccountant):
    """A weakened accountant: composes only the add direction (the pitfall of one-pair accounting)."""

    name = "add_only"

    def _add_remove_epsilon(self, events: Sequence[DPSGDEvent], delta: float) -> float:
        return float(_reference_pld(events, "add_remove", 1e-3)._pmf_add.get_epsilon_for_delta(delta))


GRID = [(q, sigma, steps) for q in (0.01, 0.125, 0.5) for sigma in (0.6, 1.5) for steps in (1, 20)]
"""Where the two directions differ most: small and large q, low and high noise, one and many steps."""


def _covers_both_directions(name: str, accountant: object) -> list[str]:
    delta = 1e-5
    failures = []
    for q, sigma, steps in GRID:
        events = [DPSGDEvent(noise_multiplier=sigma, sample_rate=q, steps=steps)]
        both = float(_reference_pld(events, "add_remove", 1e-3).get_epsilon_for_delta(delta))
        ours = accountant.epsilon(events, delta)  # type: ignore[attr-defined]
        if not ours >= both - 2e-3:
            failures.append(f"{name} at q={q}, sigma={sigma}, steps={steps}: {ours:.4f} < {both:.4f}")
    return failures


@pytest.mark.parametrize("name", ["pld", "prv"])
def test_add_remove_epsilon_covers_both_directions(name: str) -> None:
    """Lebeda, Regehr, Kamath, Steinke 2024: a Poisson-sampled add/remove epsilon must bound adding AND removing."""
    assert _covers_both_directions(name, make_accountant(name, neighbouring="add_remove")) == []


def test_control_one_direction_alone_falls_below_both() -> None:
    failures = _covers_both_directions("add_only", _AddDirectionOnly(neighbouring="add_remove"))
    assert len(failures) >= len(GRID) // 2


def test_replace_one_is_never_below_add_remove_for_the_same_noise() -> None:
    accountant_ar = make_accountant("pld", neighbouring="add_remove")
    accountant_r = make_accountant("pld", neighbouring="replace")
    events = [DPSGDEvent(noise_multiplier=0.7, sample_rate=0.125, steps=9)]
    assert accountant_r.epsilon(events, 1e-4) >= accountant_ar.epsilon(events, 1e-4)
    assert math.isinf(accountant_r.epsilon([DPSGDEvent(noise_multiplier=0.0, sample_rate=0.1, steps=1)], 1e-4))


def test_the_default_accountant_is_the_tight_one_and_rdp_is_reported_beside_it(tmp_path) -> None:
    from secure_fedllm import RunConfig, plan_budget
    from secure_fedllm.privacy import PrivacyLedger

    assert RunConfig().privacy.accountant == "pld"
    plan = plan_budget(sample_rate=0.125, steps_per_round=3, rounds=3, delta=0.1 / 256, epsilon=8.0)
    assert plan["accountant"] == "pld" and plan["noise_multiplier"] == pytest.approx(0.566, abs=0.002)
    assert plan["noise_multiplier_rdp"] == pytest.approx(0.938, abs=0.002)  # replace-one, group of two
    assert plan["epsilon_rdp"] > plan["epsilon"]  # the same noise, the loose accountant's larger epsilon
    ledger = PrivacyLedger(tmp_path / "l.json", client=0, epsilon_budget=8.0, delta=1e-3, accountant="pld")
    event = DPSGDEvent(noise_multiplier=0.8, sample_rate=0.125, steps=9)
    ledger.charge(1, event)
    summary = ledger.summary()
    rdp = make_accountant("rdp", neighbouring=ledger.neighbouring)
    assert summary["epsilon_rdp"] == pytest.approx(rdp.epsilon([event], 1e-3))
    assert summary["epsilon"] < summary["epsilon_rdp"]
