"""The ledger charges distributed-DP (Skellam) rounds: one RDP composition with the Gaussian history, an own-share
epsilon for a failed secure aggregation, the same file format, and unchanged numbers for Gaussian-only ledgers."""

from __future__ import annotations

import json

import numpy as np
import pytest
from opacus.accountants.analysis.rdp import compute_rdp
from pydantic import ValidationError

from secure_fedllm.errors import ConfigError, PrivacyBudgetExhaustedError
from secure_fedllm.privacy import (
    DP_SGD,
    GAUSSIAN,
    INTEGER_RDP_ORDERS,
    SKELLAM,
    DPSGDEvent,
    IntegerNoiseEvent,
    PrivacyLedger,
    SkellamRDPAccountant,
    group_of_two_epsilon,
    make_accountant,
    mixed_rdp_epsilon,
    poisson_subsampled_rdp,
    rdp_to_epsilon,
    skellam_rdp,
)

DELTA = 1e-5
MU = 1e4
# one distributed-DP round: central Skellam(MU) for the honest survivors, this client's own share is MU / 8
SK = IntegerNoiseEvent(mu=MU, l1=400, l2=40, sample_rate=0.1, steps=1, own_mu=MU / 8)
SK_NO_OWN = IntegerNoiseEvent(mu=MU, l1=400, l2=40, sample_rate=0.1, steps=2)
G = DPSGDEvent(noise_multiplier=1.0, sample_rate=0.1, steps=5)  # a local-DP-SGD round
EVAL = DPSGDEvent(noise_multiplier=2.0, sample_rate=1.0, steps=1)  # a federated evaluation
RELATIONS = ("add_remove", "replace")


def _ledger(tmp_path, *, accountant="pld", neighbouring="replace", budget=50.0, name="ledger.json"):
    return PrivacyLedger(
        tmp_path / name, client=3, epsilon_budget=budget, delta=DELTA, accountant=accountant, neighbouring=neighbouring
    )


def _skellam_curve(event: IntegerNoiseEvent) -> np.ndarray:
    """Poisson-subsampled Skellam RDP at INTEGER_RDP_ORDERS for `event.steps` steps, from the published bounds."""
    base = [skellam_rdp(a, mu=event.mu, l1=event.l1, l2=event.l2) for a in range(2, max(INTEGER_RDP_ORDERS) + 1)]
    one = [min(base[a - 2], poisson_subsampled_rdp(a, event.sample_rate, base)) for a in INTEGER_RDP_ORDERS]
    return event.steps * np.asarray(one)


def _gaussian_curve(event: DPSGDEvent) -> np.ndarray:
    return np.asarray(
        compute_rdp(
            q=event.sample_rate,
            noise_multiplier=event.noise_multiplier,
            steps=event.steps,
            orders=list(INTEGER_RDP_ORDERS),
        )
    )


def _epsilon_of_curve(curve: np.ndarray, neighbouring: str) -> float:
    def at(d: float) -> float:
        return rdp_to_epsilon(INTEGER_RDP_ORDERS, curve, d)

    return group_of_two_epsilon(at, DELTA) if neighbouring == "replace" else at(DELTA)


def test_skellam_entries_round_trip_through_the_file(tmp_path):
    ledger = _ledger(tmp_path)
    ledger.charge(0, G, release="train-0")
    ledger.charge(0, EVAL, release="eval-0", mechanism=GAUSSIAN)
    ledger.charge(1, SK, release="train-1", mechanism=SKELLAM)
    ledger.charge(2, SK_NO_OWN, release="train-2", mechanism=SKELLAM)

    on_disk = json.loads(ledger.path.read_text())["events"]
    assert [e.get("mechanism", DP_SGD) for e in on_disk] == [DP_SGD, GAUSSIAN, SKELLAM, SKELLAM]
    assert on_disk[2] == {
        "round": 1, "mu": MU, "l1": 400.0, "l2": 40.0, "sample_rate": 0.1, "steps": 1, "own_mu": MU / 8,
        "mechanism": SKELLAM, "release": "train-1",
    }  # fmt: skip
    assert "own_mu" not in on_disk[3]  # not recorded: not written as null

    reopened = PrivacyLedger.open(ledger.path, client=3, epsilon_budget=1.0, delta=0.1, accountant="rdp")
    assert reopened.entries == ledger.entries
    assert isinstance(reopened.entries[2].event, IntegerNoiseEvent) and reopened.entries[2].event.own_mu == MU / 8
    assert reopened.epsilon == ledger.epsilon and reopened.epsilon_own_share == ledger.epsilon_own_share
    assert reopened.rounds == [0, 1, 2] and reopened.releases == ["train-0", "train-1", "train-2"]
    assert reopened.evaluations == [0]
    public = reopened.to_dict(public=True)
    assert public["events"][2]["mechanism"] == SKELLAM and "train-1" not in json.dumps(public)

    # Controls: the mechanism tag is what makes the entry readable; an unknown one is still refused.
    for tag in (DP_SGD, "laplace"):
        raw = json.loads(ledger.path.read_text())
        raw["events"][2]["mechanism"] = tag
        ledger.path.write_text(json.dumps(raw))
        with pytest.raises(ConfigError, match="not a readable privacy ledger"):
            PrivacyLedger.open(ledger.path, client=3, epsilon_budget=1.0, delta=0.1, accountant="rdp")


@pytest.mark.parametrize("neighbouring", RELATIONS)
def test_a_skellam_only_ledger_is_the_skellam_accountant(tmp_path, neighbouring):
    ledger = _ledger(tmp_path, neighbouring=neighbouring)  # a pld ledger: the pld accountant cannot read Skellam
    events = [SK, SK_NO_OWN, SK.model_copy(update={"mu": 3e4, "own_mu": None})]
    for r, event in enumerate(events):
        ledger.charge(r, event, mechanism=SKELLAM)
    expected = SkellamRDPAccountant(neighbouring=neighbouring).epsilon(events, DELTA)
    assert ledger.epsilon == expected
    # ... which is the published bounds, summed here from skellam_rdp and poisson_subsampled_rdp
    independent = _epsilon_of_curve(sum(_skellam_curve(e) for e in events), neighbouring)
    assert ledger.epsilon == pytest.approx(independent, rel=1e-12)
    assert 0 < ledger.epsilon < 50
    summary = ledger.summary()
    assert summary["epsilon_rdp"] == summary["epsilon"] == ledger.epsilon  # already RDP
    assert summary["mechanisms"] == {SKELLAM: 3}


@pytest.mark.parametrize("neighbouring", RELATIONS)
def test_a_mixed_history_is_the_smaller_of_rdp_and_basic_composition(tmp_path, neighbouring):
    mixed = _ledger(tmp_path, neighbouring=neighbouring, name="mixed.json")
    mixed.charge(0, G)
    mixed.charge(0, EVAL, mechanism=GAUSSIAN)
    mixed.charge(1, SK, mechanism=SKELLAM)
    mixed.charge(2, SK_NO_OWN, mechanism=SKELLAM)

    # Bound 1, exact: the sum of Opacus' integer-order sampled-Gaussian curves and the Skellam curves, converted once.
    curve = _gaussian_curve(G) + _gaussian_curve(EVAL) + _skellam_curve(SK) + _skellam_curve(SK_NO_OWN)
    rdp = _epsilon_of_curve(curve, neighbouring)
    assert rdp == pytest.approx(mixed_rdp_epsilon(mixed.events, DELTA, neighbouring=neighbouring), rel=1e-9)
    # Bound 2, basic composition: the Gaussian part by pld at f delta plus the Skellam part by RDP at (1 - f) delta.
    pld = make_accountant("pld", neighbouring=neighbouring)
    basic = min(
        pld.epsilon([G, EVAL], f * DELTA)
        + mixed_rdp_epsilon([SK, SK_NO_OWN], (1 - f) * DELTA, neighbouring=neighbouring)
        for f in (0.25, 0.5, 0.75)
    )
    assert mixed.epsilon == pytest.approx(min(rdp, basic), rel=1e-9)
    if neighbouring == "replace":  # RDP's group-of-two re-reading of the Gaussian history is the loose one here
        assert basic < 0.8 * rdp and mixed.epsilon == pytest.approx(basic, rel=1e-9)
    # Against the parts read alone: above each (a composition never releases less than a part).
    gaussian_pld = mixed.epsilon_of([G, EVAL])  # how the ledger reads a Gaussian-only history: its pld accountant
    skellam_part = mixed.epsilon_of([SK, SK_NO_OWN])
    assert gaussian_pld == pld.epsilon([G, EVAL], DELTA)
    assert mixed.epsilon > max(gaussian_pld, skellam_part)
    assert mixed.summary()["mechanisms"] == {DP_SGD: 1, GAUSSIAN: 1, SKELLAM: 2}


def test_charging_past_the_budget_is_refused_and_changes_nothing(tmp_path):
    scratch = _ledger(tmp_path, name="scratch.json")
    one, two = scratch.epsilon_of([G, SK]), scratch.epsilon_of([G, SK, SK])
    assert one < two
    ledger = _ledger(tmp_path, budget=(one + two) / 2)
    ledger.charge(0, G, release="g")
    assert not ledger.would_exceed(SK)
    ledger.charge(1, SK, release="s1", mechanism=SKELLAM)
    before_bytes, before_entries = ledger.path.read_bytes(), list(ledger.entries)

    assert ledger.would_exceed(SK)
    with pytest.raises(PrivacyBudgetExhaustedError) as refused:
        ledger.charge(2, SK, release="s2", mechanism=SKELLAM)
    assert refused.value.requested == pytest.approx(two) and refused.value.spent == pytest.approx(one)
    with pytest.raises(PrivacyBudgetExhaustedError):
        ledger.admit([SK])
    assert ledger.path.read_bytes() == before_bytes and ledger.entries == before_entries
    assert PrivacyLedger.open(ledger.path).entries == before_entries

    # Control: with room in the budget the same charge goes through and is written.
    roomy = PrivacyLedger.open(ledger.path)
    roomy.epsilon_budget = two + 1e-9
    assert roomy.admit([SK]) == pytest.approx(two)
    assert roomy.charge(2, SK, release="s2", mechanism=SKELLAM) == pytest.approx(two)
    assert PrivacyLedger.open(ledger.path).rounds == [0, 1, 2]


@pytest.mark.parametrize("neighbouring", RELATIONS)
def test_the_own_share_epsilon_counts_only_the_clients_own_noise(tmp_path, neighbouring):
    ledger = _ledger(tmp_path, neighbouring=neighbouring)
    ledger.charge(0, G)
    for r in range(1, 6):
        ledger.charge(r, SK, mechanism=SKELLAM)
    ledger.charge(6, SK_NO_OWN, mechanism=SKELLAM)  # no own_mu recorded: counted with its mu
    own = SK.model_copy(update={"mu": MU / 8, "own_mu": None})
    assert ledger.epsilon_own_share == mixed_rdp_epsilon([G, *[own] * 5, SK_NO_OWN], DELTA, neighbouring=neighbouring)
    assert ledger.epsilon_own_share > ledger.epsilon + 0.2  # measured +0.29 (add_remove), +0.66 (replace)
    summary = ledger.summary()
    assert summary["epsilon_own_share"] == ledger.epsilon_own_share and summary["epsilon"] == ledger.epsilon

    # Control: a client whose own share is the whole noise (one honest survivor) loses nothing.
    whole = _ledger(tmp_path, neighbouring=neighbouring, name="whole.json")
    whole.charge(0, G)
    whole.charge(1, SK.model_copy(update={"own_mu": MU}), mechanism=SKELLAM)
    assert whole.epsilon_own_share == whole.epsilon
    # and a ledger without Skellam entries states the same epsilon twice
    gaussian = _ledger(tmp_path, neighbouring=neighbouring, name="gaussian.json")
    gaussian.charge(0, G)
    assert gaussian.epsilon_own_share == gaussian.summary()["epsilon_own_share"] == gaussian.epsilon


def test_own_mu_must_be_a_positive_part_of_mu():
    with pytest.raises(ValidationError, match="own_mu"):
        IntegerNoiseEvent(mu=MU, l1=400, l2=40, sample_rate=0.1, steps=1, own_mu=2 * MU)
    with pytest.raises(ValidationError, match="own_mu"):
        IntegerNoiseEvent(mu=MU, l1=400, l2=40, sample_rate=0.1, steps=1, own_mu=0)
    assert IntegerNoiseEvent(mu=MU, l1=400, l2=40, sample_rate=0.1, steps=1, own_mu=MU).own_share().mu == MU
    assert SK.own_share().mu == MU / 8 and SK_NO_OWN.own_share() == SK_NO_OWN


@pytest.mark.parametrize("accountant", ["pld", "rdp"])
@pytest.mark.parametrize("neighbouring", RELATIONS)
def test_a_gaussian_only_ledger_keeps_its_accountants_numbers(tmp_path, accountant, neighbouring):
    ledger = _ledger(tmp_path, accountant=accountant, neighbouring=neighbouring)
    ledger.charge(0, G)
    ledger.charge(0, EVAL, mechanism=GAUSSIAN)
    ledger.charge(1, G)
    events = [G, EVAL, G]
    expected = make_accountant(accountant, neighbouring=neighbouring).epsilon(events, DELTA)
    assert ledger.epsilon == expected
    assert ledger.epsilon_of(events) == expected and ledger.admit([]) == expected
    summary = ledger.summary()
    assert summary["epsilon_rdp"] == make_accountant("rdp", neighbouring=neighbouring).epsilon(events, DELTA)
    assert summary["mechanisms"] == {DP_SGD: 2, GAUSSIAN: 1} and ledger.rounds == [0, 1]
    if accountant == "pld":  # control: the integer-order RDP reading of the same history differs
        assert mixed_rdp_epsilon(events, DELTA, neighbouring=neighbouring) > expected * 1.05


OLD_V2 = """{"version": 2, "client": 1, "epsilon_budget": 20.0, "delta": 1e-05, "accountant": "pld",
 "neighbouring": "replace", "population": "clinic", "events": [
 {"round": 0, "noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 5, "job": "job-1", "release": "t0"},
 {"round": 0, "noise_multiplier": 2.0, "sample_rate": 1.0, "steps": 1, "mechanism": "gaussian", "job": "job-1",
  "release": "e0"}]}"""
OLD_V1 = """{"client": 1, "epsilon_budget": 20.0, "delta": 1e-05, "accountant": "rdp",
 "events": [{"round": 0, "noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 5},
            {"round": 1, "noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 5}]}"""


def test_a_ledger_file_written_before_skellam_still_loads(tmp_path):
    v2 = tmp_path / "v2.json"
    v2.write_text(OLD_V2)
    old = PrivacyLedger.open(v2, job="job-2", client=1, epsilon_budget=20.0, delta=DELTA, accountant="pld")
    assert [(e.job, e.mechanism, e.event) for e in old.entries] == [("job-1", DP_SGD, G), ("job-1", GAUSSIAN, EVAL)]
    assert old.epsilon == make_accountant("pld", neighbouring="replace").epsilon([G, EVAL], DELTA)
    # a distributed-DP round charged onto it composes with the old spending
    old.charge(0, SK, release="s0", mechanism=SKELLAM)
    assert old.epsilon == old.epsilon_of([G, EVAL, SK])
    gaussian = make_accountant("pld", neighbouring="replace").epsilon([G, EVAL], DELTA)
    # above the old spending, and (basic composition of the parts) below the RDP re-reading: 5.59 against 8.34
    assert gaussian < old.epsilon < mixed_rdp_epsilon([G, EVAL, SK], DELTA, neighbouring="replace")
    assert old.rounds == [0] and PrivacyLedger.open(v2, job="job-2", client=1).entries == old.entries

    v1 = tmp_path / "v1.json"
    v1.write_text(OLD_V1)
    single = PrivacyLedger.open(v1)
    assert single.neighbouring == "add_remove" and single.rounds == [0, 1]
    assert single.epsilon == make_accountant("rdp").epsilon([G, G], DELTA)


def test_an_event_must_fit_its_mechanism_and_a_round_is_trained_once(tmp_path):
    ledger = _ledger(tmp_path)
    with pytest.raises(ValueError, match="does not fit mechanism='dp-sgd'"):
        ledger.charge(0, SK)
    with pytest.raises(ValueError, match="does not fit mechanism='skellam'"):
        ledger.charge(0, G, mechanism=SKELLAM)
    with pytest.raises(ValueError, match="mechanism='laplace'"):
        ledger.charge(0, G, mechanism="laplace")
    assert ledger.entries == [] and not ledger.path.exists()
    ledger.charge(0, G)
    with pytest.raises(ValueError, match="already charged"):  # the round's training release, either mechanism
        ledger.charge(0, SK, mechanism=SKELLAM)
    ledger.charge(0, EVAL, mechanism=GAUSSIAN)  # an evaluation of the same round is another release
    ledger.charge(1, SK, release="a", mechanism=SKELLAM)
    ledger.charge(1, SK, release="b", mechanism=SKELLAM)  # a distinct release of the round costs its own epsilon
    assert ledger.rounds == [0, 1, 1] and ledger.evaluations == [0]
