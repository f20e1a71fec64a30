from __future__ import annotations

import json
import math

import pytest
from dp_accounting import dp_event
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant
from opacus.accountants import RDPAccountant as OpacusRDP

from secure_fedllm import ConfigError
from secure_fedllm.errors import PrivacyBudgetExhaustedError
from secure_fedllm.privacy import DPSGDEvent, PrivacyLedger, make_accountant, noise_for_epsilon

DELTA = 1e-5
HISTORIES = [
    [DPSGDEvent(noise_multiplier=1.0, sample_rate=0.125, steps=9)],
    [
        DPSGDEvent(noise_multiplier=0.8, sample_rate=0.125, steps=3),
        DPSGDEvent(noise_multiplier=1.5, sample_rate=0.125, steps=3),
        DPSGDEvent(noise_multiplier=1.1, sample_rate=0.05, steps=6),
    ],
]


def _reference(events: list[DPSGDEvent], accountant) -> float:
    for e in events:
        event = dp_event.PoissonSampledDpEvent(e.sample_rate, dp_event.GaussianDpEvent(e.noise_multiplier))
        accountant.compose(event, e.steps)
    return accountant.get_epsilon(DELTA)


@pytest.mark.parametrize("events", HISTORIES)
def test_rdp_matches_dp_accounting_within_half_a_percent(events):
    ours = make_accountant("rdp").epsilon(events, DELTA)
    ref = _reference(events, rdp_privacy_accountant.RdpAccountant(orders=OpacusRDP.DEFAULT_ALPHAS))
    assert abs(ours - ref) <= 0.005 * ref


@pytest.mark.parametrize("events", HISTORIES)
def test_prv_matches_pld_and_pld_is_below_rdp(events):
    ours = make_accountant("prv").epsilon(events, DELTA)
    pld = _reference(events, pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4))
    assert abs(ours - pld) <= max(0.01 * pld, 0.02)
    assert pld <= make_accountant("rdp").epsilon(events, DELTA)


def test_zero_noise_is_infinite_epsilon_and_empty_history_is_zero():
    rdp = make_accountant("rdp")
    assert rdp.epsilon([], DELTA) == 0.0
    assert math.isinf(rdp.epsilon([DPSGDEvent(noise_multiplier=0.0, sample_rate=0.1, steps=1)], DELTA))


@pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha")
def test_calibration_meets_the_target_tightly():
    accountant = make_accountant("rdp")
    sigma = noise_for_epsilon(8.0, delta=DELTA, sample_rate=0.125, steps=9, accountant=accountant)
    event = DPSGDEvent(noise_multiplier=sigma, sample_rate=0.125, steps=9)
    assert accountant.epsilon([event], DELTA) <= 8.0
    looser = DPSGDEvent(noise_multiplier=sigma - 1e-3, sample_rate=0.125, steps=9)
    assert accountant.epsilon([looser], DELTA) > 8.0
    with pytest.raises(ConfigError, match="out of reach"):
        noise_for_epsilon(1e-4, delta=DELTA, sample_rate=1.0, steps=10_000, accountant=accountant)


def test_ledger_refuses_an_over_budget_round_and_changes_nothing(tmp_path):
    path = tmp_path / "ledger" / "client-0.json"
    ledger = PrivacyLedger(path, client=0, epsilon_budget=4.5, delta=DELTA, accountant="rdp")
    heavy = DPSGDEvent(noise_multiplier=1.0, sample_rate=0.125, steps=9)
    first = ledger.charge(0, heavy)
    assert 0 < first <= 4.5
    on_disk = path.read_text()
    assert ledger.would_exceed(heavy)
    with pytest.raises(PrivacyBudgetExhaustedError) as info:
        ledger.charge(1, heavy)
    assert info.value.spent == pytest.approx(first) and info.value.requested > 4.5
    assert ledger.epsilon == pytest.approx(first) and ledger.rounds == [0]
    assert path.read_text() == on_disk


def test_ledger_persists_and_reloads(tmp_path):
    path = tmp_path / "client-1.json"
    ledger = PrivacyLedger(path, client=1, epsilon_budget=8.0, delta=DELTA, accountant="rdp")
    for r, sigma in enumerate((1.2, 0.9)):
        ledger.charge(r, DPSGDEvent(noise_multiplier=sigma, sample_rate=0.1, steps=3))
    again = PrivacyLedger.open(path, client=1, epsilon_budget=99.0, delta=0.1, accountant="prv")
    assert again.to_dict() == ledger.to_dict() == json.loads(path.read_text())
    assert again.epsilon == pytest.approx(ledger.epsilon)


def test_unknown_accountant_names_the_choices():
    with pytest.raises(ConfigError, match="prv"):
        make_accountant("moments")
