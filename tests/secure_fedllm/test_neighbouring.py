"""Finding 7 (issue 12): which neighbouring relation an epsilon is for, and what replace-one costs.

Every reference number here is computed with dp_accounting directly (not through our accountants):
its `PLDAccountant` supports `REPLACE_ONE` for the Poisson-sampled Gaussian (the tight value), its
`RdpAccountant` does not (so our `rdp` accounts replace-one as a group of two, which the tests
recompute from dp_accounting's add/remove RDP). The weakened control is the old statement: noise
calibrated for epsilon 8 add/remove-one, which is far above 8 under replace-one.
"""

from __future__ import annotations

import json
import math

import pytest
from dp_accounting import NeighboringRelation, dp_event
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant
from opacus.accountants import RDPAccountant as OpacusRDP

from secure_fedllm import ConfigError, RunConfig
from secure_fedllm.adapters import AdapterManifest
from secure_fedllm.federation import client_policy
from secure_fedllm.federation.runner import adapter_sidecar
from secure_fedllm.privacy import DPSGDEvent, PrivacyLedger, make_accountant, neighbouring_statement, noise_for_epsilon

pytestmark = [
    pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha"),
    pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning"),  # Opacus' PRV at q = 1
]

# (noise multiplier, q, steps, delta): record-level and user-level defaults, a long low-q run, q = 1.
CASES = [
    (1.0, 0.125, 9, 1e-5),
    (0.98, 0.5, 9, 0.1 / 64),
    (2.0, 0.05, 30, 1e-5),
    (0.8, 1.0, 3, 1e-3),
]
SPLITS = [i / 40 for i in range(1, 40)]  # the first hop's share of delta, as documented in accountants.py


def _event(sigma: float, q: float) -> dp_event.DpEvent:
    return dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma))


def _pld_replace(sigma: float, q: float, steps: int, delta: float) -> float:
    """dp_accounting's tight replace-one epsilon (fine discretisation, pessimistic rounding)."""
    accountant = pld_privacy_accountant.PLDAccountant(
        NeighboringRelation.REPLACE_ONE, value_discretization_interval=1e-4
    )
    accountant.compose(_event(sigma, q), steps)
    return accountant.get_epsilon(delta)


def _pld_add_remove(sigma: float, q: float, steps: int, delta: float) -> float:
    accountant = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4)
    accountant.compose(_event(sigma, q), steps)
    return accountant.get_epsilon(delta)


def _rdp_group_of_two(sigma: float, q: float, steps: int, delta: float) -> float:
    """Group privacy of size two (remove, then add) over dp_accounting's add/remove RDP profile."""
    accountant = rdp_privacy_accountant.RdpAccountant(orders=OpacusRDP.DEFAULT_ALPHAS)
    accountant.compose(_event(sigma, q), steps)
    best = math.inf
    for share in SPLITS:
        first = accountant.get_epsilon(share * delta)
        best = min(best, first + accountant.get_epsilon((delta - share * delta) * math.exp(-first)))
    return best


def _history(sigma: float, q: float, steps: int) -> list[DPSGDEvent]:
    return [DPSGDEvent(noise_multiplier=sigma, sample_rate=q, steps=steps)]


def test_dp_accounting_supports_replace_one_for_the_sampled_gaussian_in_pld_only():
    """Why `rdp` needs the group-of-two bound and `prv` does not."""
    poisson = _event(1.0, 0.1)
    assert pld_privacy_accountant.PLDAccountant(NeighboringRelation.REPLACE_ONE).supports(poisson)
    assert not rdp_privacy_accountant.RdpAccountant(neighboring_relation=NeighboringRelation.REPLACE_ONE).supports(
        poisson
    )


@pytest.mark.parametrize(("sigma", "q", "steps", "delta"), CASES)
def test_prv_replace_is_dp_accountings_replace_one_rounded_up(sigma, q, steps, delta):
    ours = make_accountant("prv", neighbouring="replace").epsilon(_history(sigma, q, steps), delta)
    reference = _pld_replace(sigma, q, steps, delta)
    # Sound: never below the fine-grid value; tolerance: a coarser pessimistic grid adds at most 1%.
    assert reference <= ours <= reference * 1.01 + 1e-3


@pytest.mark.parametrize(("sigma", "q", "steps", "delta"), CASES)
def test_rdp_replace_is_the_group_of_two_bound_and_above_the_tight_value(sigma, q, steps, delta):
    ours = make_accountant("rdp", neighbouring="replace").epsilon(_history(sigma, q, steps), delta)
    group = _rdp_group_of_two(sigma, q, steps, delta)
    assert ours == pytest.approx(group, rel=0.01)  # Opacus' and dp_accounting's RDP conversions differ by < 0.5%
    tight = _pld_replace(sigma, q, steps, delta)
    assert ours >= tight  # sound
    assert ours <= 2.5 * tight  # the stated looseness of the group-of-two bound at these settings (1.1x to 2.4x)


@pytest.mark.parametrize(("sigma", "q", "steps", "delta"), CASES)
def test_replace_one_costs_more_than_add_remove_one_of_the_same_noise(sigma, q, steps, delta):
    for name in ("rdp", "prv"):
        add_remove = make_accountant(name, neighbouring="add_remove").epsilon(_history(sigma, q, steps), delta)
        replace = make_accountant(name, neighbouring="replace").epsilon(_history(sigma, q, steps), delta)
        assert replace > add_remove
    assert _pld_replace(sigma, q, steps, delta) > _pld_add_remove(sigma, q, steps, delta)


# Values from the accountants before the relation was a setting (git HEAD at issue 12), to 1e-9.
PINNED_ADD_REMOVE = [
    ([(1.0, 0.125, 9)], 1e-5, {"rdp": 3.923263010933777, "prv": 3.3059382301921527}),
    ([(0.8, 0.125, 3), (1.5, 0.125, 3), (1.1, 0.05, 6)], 1e-5, {"rdp": 4.653309059933298, "prv": 3.8820208859895873}),
    ([(0.9801210835576057, 0.5, 9)], 0.1 / 64, {"rdp": 7.999993667555373, "prv": 6.849181618701603}),
]


@pytest.mark.parametrize(("history", "delta", "expected"), PINNED_ADD_REMOVE)
def test_add_remove_numbers_are_unchanged(history, delta, expected):
    events = [DPSGDEvent(noise_multiplier=s, sample_rate=q, steps=t) for s, q, t in history]
    for name, value in expected.items():
        assert make_accountant(name, neighbouring="add_remove").epsilon(events, delta) == pytest.approx(value, rel=1e-9)
        assert make_accountant(name).epsilon(events, delta) == pytest.approx(value, rel=1e-9)  # library default


@pytest.mark.parametrize("name", ["rdp", "prv"])
def test_noise_calibrated_for_replace_meets_the_target_under_replace(name):
    replace = make_accountant(name, neighbouring="replace")
    sigma = noise_for_epsilon(8.0, delta=1e-5, sample_rate=0.125, steps=9, accountant=replace)
    assert replace.epsilon(_history(sigma, 0.125, 9), 1e-5) <= 8.0
    assert replace.epsilon(_history(sigma - 1e-3, 0.125, 9), 1e-5) > 8.0  # tight: a little less noise misses
    # Independently of our code: dp_accounting's tight replace-one epsilon of that noise is within the target.
    assert _pld_replace(sigma, 0.125, 9, 1e-5) <= 8.0 + 0.01
    add_remove = make_accountant(name, neighbouring="add_remove")
    assert sigma > noise_for_epsilon(8.0, delta=1e-5, sample_rate=0.125, steps=9, accountant=add_remove)


def _user_config(neighbouring: str, accountant: str = "rdp") -> RunConfig:
    return RunConfig().with_overrides(
        [
            "privacy.unit='user'",
            "privacy.user_field='person_id'",
            f"privacy.neighbouring='{neighbouring}'",
            f"privacy.accountant='{accountant}'",
        ]
    )


# N_i of the default synthetic federation at user level (4 clients, 256 records, 4 per person): 63, 59, 60, 64.
USER_UNITS = 63


def test_control_a_user_level_client_at_epsilon_8_add_remove_is_at_11_5_replace_one():
    """The finding: the old statement (add/remove-one) hides a replace-one epsilon far above the budget."""
    old = client_policy(_user_config("add_remove"), 0, USER_UNITS)
    event = old.event()
    assert event is not None
    events, delta = [event] * old.max_participations, old.delta
    add_remove = make_accountant("rdp", neighbouring="add_remove").epsilon(events, delta)
    tight = _pld_replace(event.noise_multiplier, event.sample_rate, event.steps * old.max_participations, delta)
    group = make_accountant("rdp", neighbouring="replace").epsilon(events, delta)
    assert 7.9 < add_remove <= 8.0
    assert 11.0 < tight < 12.0  # the "11.5"
    assert group > tight
    # The default (replace) calibrates more noise, and then both replace-one numbers are within 8.
    new = client_policy(_user_config("replace"), 0, USER_UNITS)
    new_event = new.event()
    assert new_event is not None and new_event.noise_multiplier > event.noise_multiplier
    total_steps = new_event.steps * new.max_participations
    assert make_accountant("rdp", neighbouring="replace").epsilon([new_event] * new.max_participations, delta) <= 8.0
    assert _pld_replace(new_event.noise_multiplier, new_event.sample_rate, total_steps, delta) <= 8.0


def test_prv_replace_is_the_cheaper_sound_choice_for_a_user_level_client():
    rdp = client_policy(_user_config("replace", "rdp"), 0, USER_UNITS)
    prv = client_policy(_user_config("replace", "prv"), 0, USER_UNITS)
    assert prv.noise_multiplier < rdp.noise_multiplier
    steps = prv.steps * prv.max_participations
    assert _pld_replace(prv.noise_multiplier, prv.sample_rate, steps, prv.delta) <= 8.0 + 0.01


def test_config_defaults_to_replace_and_refuses_other_relations():
    assert RunConfig().privacy.neighbouring == "replace"
    assert RunConfig().with_overrides(["privacy.neighbouring='add_remove'"]).privacy.neighbouring == "add_remove"
    for bad in ("'replace_one'", "'add-remove'", "1"):
        with pytest.raises(ConfigError, match=r"privacy\.neighbouring"):
            RunConfig().with_overrides([f"privacy.neighbouring={bad}"])
    with pytest.raises(ConfigError, match=r"privacy\.neighbouring"):
        make_accountant("rdp", neighbouring="swap")
    with pytest.raises(ConfigError, match=r"privacy\.neighbouring"):
        neighbouring_statement("zero-out")


def test_client_policy_calibrates_for_the_configured_relation():
    replace = client_policy(RunConfig(), 0, 256)
    add_remove = client_policy(RunConfig().with_overrides(["privacy.neighbouring='add_remove'"]), 0, 256)
    assert replace.noise_multiplier > add_remove.noise_multiplier
    for policy, relation in ((replace, "replace"), (add_remove, "add_remove")):
        event = policy.event()
        assert event is not None
        accountant = make_accountant(RunConfig().privacy.accountant, neighbouring=relation)
        spent = accountant.epsilon([event] * policy.max_participations, policy.delta)
        assert 7.9 < spent <= 8.0


def test_ledger_records_its_relation_and_reads_old_files_as_add_remove(tmp_path):
    event = DPSGDEvent(noise_multiplier=1.0, sample_rate=0.125, steps=9)
    spent = {}
    for relation in ("replace", "add_remove"):
        path = tmp_path / f"{relation}.json"
        ledger = PrivacyLedger(path, client=0, epsilon_budget=50.0, delta=1e-5, accountant="rdp", neighbouring=relation)
        spent[relation] = ledger.charge(0, event)
        data = json.loads(path.read_text())
        assert data["neighbouring"] == relation
        again = PrivacyLedger.open(path, client=0, epsilon_budget=1.0, delta=0.1, accountant="prv")
        assert again.neighbouring == relation and again.epsilon == pytest.approx(spent[relation])
    assert spent["replace"] > spent["add_remove"]
    old = json.loads((tmp_path / "add_remove.json").read_text())
    del old["neighbouring"]  # a ledger written before the relation was recorded
    (tmp_path / "old.json").write_text(json.dumps(old))
    reread = PrivacyLedger.open(tmp_path / "old.json", client=0, epsilon_budget=1.0, delta=0.1, accountant="prv")
    assert reread.neighbouring == "add_remove" and reread.epsilon == pytest.approx(spent["add_remove"])
    with pytest.raises(ConfigError, match=r"privacy\.neighbouring"):
        PrivacyLedger(tmp_path / "x.json", client=0, epsilon_budget=1.0, delta=1e-5, accountant="rdp", neighbouring="z")


@pytest.mark.parametrize("relation", ["replace", "add_remove"])
def test_sidecar_and_statement_name_the_relation(relation):
    config = RunConfig().with_overrides([f"privacy.neighbouring='{relation}'"])
    manifest = AdapterManifest(entries=(("lora_B", (2, 3)),))
    sidecar = adapter_sidecar(config, manifest, {"base_sha256": "0" * 64}, epsilon_max=8.0, delta_max=1e-5)
    assert sidecar["neighbouring"] == relation and sidecar["privacy_unit"] == "record"
    json.dumps(sidecar)  # it is written as JSON beside the adapter
    statement = neighbouring_statement(relation, "user")
    if relation == "replace":
        assert "replace-one" in statement and "group-of-two" in statement and "N_i is public" in statement
    else:
        assert "add/remove-one" in statement and "public N that does not depend on the data" in statement


@pytest.mark.parametrize("relation", ["replace", "add_remove"])
def test_report_states_the_relation(tmp_path, relation):
    from secure_fedllm.federation.checkpoint import RunPaths
    from secure_fedllm.federation.record import RoundRecord
    from secure_fedllm.federation.report import write_report

    config = RunConfig().with_overrides([f"privacy.neighbouring='{relation}'"])
    policy = client_policy(config, 0, 256)
    rows = [RoundRecord(round=0, eval_loss=2.0, perplexity=7.4, epsilon={0: 0.0})]
    sidecar = {"base_sha256": "0" * 64, "epsilon_max_over_contributors": 0.0, "delta_max_over_contributors": 1e-5}
    paths = RunPaths(tmp_path)
    write_report(paths, config, rows, [{"events": []}], [policy], sidecar)
    report = paths.report.read_text()
    assert f"neighbouring relation `{relation}`" in report
    assert neighbouring_statement(relation, "record") in report
    warning = "**privacy.neighbouring is 'add_remove'"
    assert (warning in report) == (relation == "add_remove")


def test_budget_plan_uses_the_run_default_relation():
    from secure_fedllm import plan_budget

    common = {"sample_rate": 0.125, "steps_per_round": 3, "rounds": 3, "delta": 1e-5, "epsilon": 8.0}
    default, classical = plan_budget(**common), plan_budget(**common, neighbouring="add_remove")
    assert default["neighbouring"] == "replace" and classical["neighbouring"] == "add_remove"
    assert default["noise_multiplier"] > classical["noise_multiplier"]
    with pytest.raises(ConfigError, match=r"privacy\.neighbouring"):
        plan_budget(**common, neighbouring="swap")


def test_a_client_refuses_a_ledger_accounted_under_another_relation(tmp_path):
    """A resumed run must not state 'replace' over a ledger that accounted add/remove (or back)."""
    from types import SimpleNamespace

    from secure_fedllm.federation.runner import make_client, open_site

    counts = SimpleNamespace(num_units=256)  # only N_i matters to the policy and the ledger
    old = RunConfig().with_overrides(["privacy.neighbouring='add_remove'"])
    site = open_site(old, tmp_path, 0)
    ledger = PrivacyLedger.open(
        site.ledger_path, client=0, epsilon_budget=8.0, delta=1e-5, accountant="rdp", neighbouring="add_remove"
    )
    ledger.charge(0, DPSGDEvent(noise_multiplier=1.0, sample_rate=0.125, steps=3))
    assert make_client(old, tmp_path, 0, counts, {}).ledger.neighbouring == "add_remove"  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"accounts privacy\.neighbouring='add_remove' but the config says 'replace'"):
        make_client(RunConfig(), tmp_path, 0, counts, {})  # type: ignore[arg-type]
