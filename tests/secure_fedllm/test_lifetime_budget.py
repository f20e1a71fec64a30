"""A site's budget lasts across jobs: one ledger per population, composed by the accountant, never reset."""

from __future__ import annotations

import csv
import json
from types import SimpleNamespace

import pytest

from secure_fedllm.budget import format_state_dir, show_budget, show_state_dir
from secure_fedllm.config import RunConfig
from secure_fedllm.data import SiteDataSpec, load_site_records
from secure_fedllm.errors import ConfigError, PrivacyBudgetExhaustedError
from secure_fedllm.federation import FederatedClient, client_policy
from secure_fedllm.privacy import DPSGDEvent, PrivacyLedger, make_accountant
from secure_fedllm.site import SiteState
from secure_fedllm.site.state import population_id

DELTA = 1e-5
E1 = DPSGDEvent(noise_multiplier=1.1, sample_rate=0.1, steps=5)
E2 = DPSGDEvent(noise_multiplier=0.9, sample_rate=0.05, steps=8)
PEOPLE = [f"person-{i}" for i in range(40)]


def _ledger(site, population, job, budget=50.0, **kw):
    settings = {"epsilon_budget": budget, "delta": DELTA, "accountant": "rdp", "neighbouring": "replace"}
    return site.ledger_for(population, job=job, **{**settings, **kw})


def test_two_jobs_on_the_same_data_compose_by_the_accountant(tmp_path):
    site = SiteState.open(tmp_path / "site")
    population = population_id(PEOPLE)
    first = _ledger(site, population, "job-1", units=PEOPLE)
    for r in range(2):
        first.charge(r, E1, release=f"tag-1-{r}")
    after_first = first.epsilon

    # A second job (another run folder, the same site folder) reopens the same ledger from disk.
    second = _ledger(SiteState.open(tmp_path / "site"), population, "job-2", units=list(reversed(PEOPLE)))
    assert second.path == first.path == tmp_path / "site" / "ledgers" / f"{population}.json"
    assert second.epsilon == pytest.approx(after_first) and second.rounds == []  # this job has charged nothing yet
    for r in range(2):  # round 0 of job 2 is a new release, not a replay of job 1's round 0
        second.charge(r, E2, release=f"tag-2-{r}")

    accountant = make_accountant("rdp", neighbouring="replace")
    composed = accountant.epsilon([E1, E1, E2, E2], DELTA)
    job_two_alone = accountant.epsilon([E2, E2], DELTA)
    assert second.epsilon == pytest.approx(composed)
    assert second.epsilon > after_first
    assert second.epsilon < after_first + job_two_alone - 1e-6  # the accountant's composition, not a sum
    assert second.rounds == [0, 1] and second.jobs == ["job-1", "job-2"]
    on_disk = json.loads(second.path.read_text())
    assert [(e["job"], e["round"]) for e in on_disk["events"]] == [
        ("job-1", 0), ("job-1", 1), ("job-2", 0), ("job-2", 1)
    ]  # fmt: skip
    # The report of job 2 sees its own rounds and the lifetime epsilon, no release tag and no other job.
    public = second.to_dict(public=True)
    assert [e["round"] for e in public["events"]] == [0, 1] and "job" not in public["events"][0]
    assert public["lifetime_epsilon"] == pytest.approx(composed) and "tag-2-0" not in json.dumps(public)


def test_a_replay_within_a_job_is_still_refused(tmp_path):
    ledger = _ledger(SiteState.open(tmp_path / "site"), "clinic", "job-1")
    ledger.charge(0, E1, release="tag")
    assert ledger.charged(0, "tag")
    with pytest.raises(ValueError, match="already charged"):
        ledger.charge(0, E1, release="tag")
    assert not _ledger(SiteState.open(tmp_path / "site"), "clinic", "job-2").charged(0, "tag")


def test_a_job_over_the_lifetime_budget_is_refused_before_training(tmp_path):
    site = SiteState.open(tmp_path / "site")
    accountant = make_accountant("rdp", neighbouring="replace")
    budget = accountant.epsilon([E1] * 3, DELTA) * 1.01  # room for three releases of E1, not four
    first = _ledger(site, "clinic", "job-1", budget=budget)
    first.admit([E1] * 3)
    for r in range(3):
        first.charge(r, E1, release=f"a{r}")

    # The next job asks for a larger budget: the lifetime budget fixed at creation still applies.
    second = _ledger(site, "clinic", "job-2", budget=1e6)
    assert second.epsilon_budget == pytest.approx(budget)
    before = second.path.read_bytes()
    with pytest.raises(PrivacyBudgetExhaustedError, match=r"lifetime budget") as info:
        second.admit([E1, E1])
    assert info.value.spent == pytest.approx(first.epsilon) and info.value.budget == pytest.approx(budget)
    assert str(round(budget, 3))[:4] in str(info.value) and f"{first.epsilon:.3f}" in str(info.value)
    with pytest.raises(PrivacyBudgetExhaustedError, match=r"site ledger .*clinic\.json.*lifetime budget"):
        second.charge(0, E1, release="b0")
    assert second.path.read_bytes() == before  # nothing charged

    # The control: a per-run ledger (the behaviour before lifetime ledgers) admits the same job from zero.
    fresh = PrivacyLedger(tmp_path / "run2.sites" / "ledger.json", client=0, epsilon_budget=budget, delta=DELTA,
                          accountant="rdp", neighbouring="replace")  # fmt: skip
    assert fresh.admit([E1, E1]) < budget


def test_a_client_of_the_next_job_sits_out_when_the_site_spent_its_lifetime_budget(tmp_path):
    config = RunConfig()
    policy = client_policy(config, 0, 256)
    event = policy.event()
    assert event is not None
    site = SiteState.open(tmp_path / "site")

    def client(job):
        ledger = site.ledger_for(
            "clinic", job=job, client=0, epsilon_budget=policy.epsilon_budget, delta=policy.delta,
            accountant=config.privacy.accountant, neighbouring=config.privacy.neighbouring,
        )  # fmt: skip
        data = SimpleNamespace(num_units=256)
        return FederatedClient(0, data, policy=policy, ledger=ledger, site=site, learning_rate=0.1, optimizer="adam",
                               job=job)  # type: ignore[arg-type]  # fmt: skip

    first = client("job-1")
    for r in range(config.federation.rounds):
        if first.willing(r) is None:
            first.ledger.charge(r, event, release=f"r{r}")  # type: ignore[union-attr]
    assert first.epsilon > 0.9 * policy.epsilon_budget  # the policy's noise spends the budget over one job
    second = client("job-2")
    assert second.rounds_joined == []
    reason = second.willing(0)
    assert reason is not None and "budget" in reason
    # The control: with a fresh ledger per job, job 2 would have joined.
    other = SiteState.open(tmp_path / "elsewhere")
    fresh = FederatedClient(0, SimpleNamespace(num_units=256), policy=policy,  # type: ignore[arg-type]
                            ledger=other.ledger_for("clinic", job="job-2", epsilon_budget=policy.epsilon_budget,
                                                    delta=policy.delta, accountant=config.privacy.accountant,
                                                    neighbouring="replace"),
                            site=other, learning_rate=0.1, optimizer="adam", job="job-2")  # fmt: skip
    assert fresh.willing(0) is None


def _csv(path, rows):
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["q", "a", "who"])
        writer.writeheader()
        writer.writerows(rows)
    return SiteDataSpec(path=path, fields={"instruction": "q", "output": "a", "person": "who"})


def test_correcting_a_record_keeps_the_same_ledger(tmp_path):
    rows = [{"q": f"question {i}", "a": f"answer {i}", "who": f"p{i % 5}"} for i in range(15)]
    spec = _csv(tmp_path / "site.csv", rows)
    site = SiteState.open(tmp_path / "site")
    for by_person in (True, False):
        records = load_site_records(spec, by_person=by_person)
        population = population_id(r.unit for r in records)
        ledger = _ledger(site, population, f"job-{by_person}", units=[r.unit for r in records])
        ledger.charge(0, E1, release="x")
        spent = ledger.epsilon

        corrected = [dict(r) for r in rows]
        corrected[3]["a"] = "a corrected answer"
        fixed = load_site_records(_csv(tmp_path / "fixed.csv", corrected), by_person=by_person)
        assert fixed != records  # the text changed ...
        again = population_id(r.unit for r in fixed)
        assert again == population  # ... the people did not
        reopened = _ledger(site, again, f"job-{by_person}-fixed", units=[r.unit for r in fixed])
        assert reopened.path == ledger.path and reopened.epsilon == pytest.approx(spent)


def test_another_population_gets_its_own_ledger_and_an_overlap_is_refused(tmp_path):
    site = SiteState.open(tmp_path / "site")
    cardiology, oncology = PEOPLE[:20], PEOPLE[20:]
    first = _ledger(site, population_id(cardiology), "job-1", units=cardiology)
    first.charge(0, E1, release="x")
    other = _ledger(site, population_id(oncology), "job-2", units=oncology)
    assert other.path != first.path and other.epsilon == 0.0

    # Adding one person to cardiology is another population that shares 20 people with the first:
    # a fresh budget for them would reset theirs, so it is refused and the fix is named.
    grown = [*cardiology, "person-new"]
    with pytest.raises(ConfigError, match=rf"already in population '{population_id(cardiology)}'.*name the population"):
        _ledger(site, population_id(grown), "job-3", units=grown)
    assert not (tmp_path / "site" / "ledgers" / f"{population_id(grown)}.json").exists()
    named = _ledger(site, population_id(cardiology), "job-3", units=grown)  # the site names the population
    assert named.epsilon == pytest.approx(first.epsilon)
    with pytest.raises(ConfigError, match="population name"):
        _ledger(site, "../escape", "job-4")


def test_an_old_single_run_ledger_is_migrated_not_forgotten(tmp_path):
    site = SiteState.open(tmp_path / "site")
    old = PrivacyLedger(site.ledger_path, client=2, epsilon_budget=50.0, delta=DELTA, accountant="rdp",
                        neighbouring="replace")  # fmt: skip
    old.charge(0, E1)
    old.charge(1, E1)
    data = json.loads(site.ledger_path.read_text())
    for key in ("version", "population"):  # exactly the format written before lifetime ledgers
        data.pop(key, None)
    site.ledger_path.write_text(json.dumps(data))
    assert PrivacyLedger.open(site.ledger_path, client=0, epsilon_budget=1.0, delta=0.1, accountant="prv").rounds == [
        0,
        1,
    ]  # an old file still loads on its own

    lifetime = _ledger(site, "clinic", "job-new")
    assert lifetime.epsilon == pytest.approx(old.epsilon)  # the old spending counts
    assert lifetime.rounds == []  # and is no round of the new job
    assert not site.ledger_path.exists() and (tmp_path / "site" / "ledger.json.migrated").exists()
    lifetime.charge(0, E1, release="t")
    assert lifetime.epsilon == pytest.approx(make_accountant("rdp", neighbouring="replace").epsilon([E1] * 3, DELTA))
    # Reopened, it is not migrated twice.
    assert _ledger(site, "clinic", "job-new").epsilon == pytest.approx(lifetime.epsilon)


def test_a_ledger_under_another_relation_is_refused(tmp_path):
    site = SiteState.open(tmp_path / "site")
    _ledger(site, "clinic", "job-1", neighbouring="add_remove").charge(0, E1, release="x")
    with pytest.raises(ConfigError, match=r"accounts privacy\.neighbouring='add_remove' but the config says 'replace'"):
        _ledger(site, "clinic", "job-2")


def test_a_corrupted_ledger_names_its_file(tmp_path):
    site = SiteState.open(tmp_path / "site")
    _ledger(site, "clinic", "job-1").charge(0, E1, release="x")
    path = tmp_path / "site" / "ledgers" / "clinic.json"
    path.write_text(path.read_text()[:40])
    with pytest.raises(ConfigError, match=r"clinic\.json: not a readable privacy ledger"):
        _ledger(site, "clinic", "job-2")


def test_budget_show_state_dir_lists_spending_across_jobs(tmp_path):
    site = SiteState.open(tmp_path / "site")
    for job, event in (("job-1", E1), ("job-2", E2)):
        ledger = _ledger(site, "clinic", job)
        ledger.charge(0, event, release=job)
        ledger.charge(1, event, release=job)
    report = show_state_dir(tmp_path / "site")
    (clinic,) = report["ledgers"]
    assert clinic["population"] == "clinic" and clinic["budget"] == 50.0
    assert [j["job"] for j in clinic["jobs"]] == ["job-1", "job-2"] and clinic["jobs"][0]["rounds"] == [0, 1]
    accountant = make_accountant("rdp", neighbouring="replace")
    assert clinic["epsilon"] == pytest.approx(accountant.epsilon([E1, E1, E2, E2], DELTA))
    assert clinic["jobs"][1]["epsilon_alone"] == pytest.approx(accountant.epsilon([E2, E2], DELTA))
    assert clinic["remaining"] == pytest.approx(50.0 - clinic["epsilon"])
    text = format_state_dir(report)
    assert "population clinic" in text and "job job-1" in text and "job job-2" in text
    assert f"{clinic['epsilon']:.3f}" in text
    json.dumps(report)  # what --json prints
    with pytest.raises(ConfigError, match="not a site state folder"):
        show_state_dir(tmp_path)


def test_budget_show_of_a_run_reads_lifetime_ledgers(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    RunConfig().to_file(run / "config.toml")
    site = SiteState.open(tmp_path / "run.sites" / "client-0000")
    _ledger(site, "clinic", "job-1", client=0).charge(0, E1, release="x")
    rows = show_budget(run)
    assert len(rows) == 1 and rows[0]["population"] == "clinic" and rows[0]["rounds_joined"] == [0]
