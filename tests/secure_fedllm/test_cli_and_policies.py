"""The command line, client policies and the errors a user meets first."""

from __future__ import annotations

import json

import pytest

from secure_fedllm import ConfigError, PlanRefusedError, RunConfig, plan_budget
from secure_fedllm.cli import commented_toml, main
from secure_fedllm.data import load_alpaca, partition
from secure_fedllm.federation import client_policy
from secure_fedllm.privacy import make_accountant


def test_init_config_writes_a_commented_file_that_loads_back(tmp_path, capsys):
    path = tmp_path / "c.toml"
    assert main(["init-config", str(path)]) == 0
    text = path.read_text()
    assert "# per-client epsilon" in text and "# delta =" in text  # unset fields are commented out
    assert RunConfig.from_file(path) == RunConfig()
    assert main(["init-config", str(path)]) == 2
    assert "--force" in capsys.readouterr().err
    assert commented_toml(RunConfig()) == text


def test_budget_plan_both_directions_agree(capsys):
    assert main(["budget", "plan", "--epsilon", "8", "--records", "256", "--batch", "32", "--json"]) == 0
    forward = json.loads(capsys.readouterr().out)
    assert forward["epsilon"] <= 8.0 and forward["sample_rate"] == 0.125 and forward["delta"] == 0.1 / 256
    sigma = forward["noise_multiplier"]
    assert main(["budget", "plan", "--noise", str(sigma), "--records", "256", "--json"]) == 0
    backward = json.loads(capsys.readouterr().out)
    assert backward["epsilon"] == pytest.approx(8.0, abs=1e-3)
    assert backward["epsilon_after_round"] == sorted(backward["epsilon_after_round"])


def test_budget_plan_needs_exactly_one_direction():
    with pytest.raises(ConfigError, match="exactly one"):
        plan_budget(sample_rate=0.1, steps_per_round=3, rounds=3, delta=1e-4)
    assert main(["budget", "plan", "--epsilon", "1", "--noise", "1"]) == 2


def test_budget_show_refuses_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert main(["budget", "show", str(tmp_path)]) == 2
    assert "not a run folder" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (["privacy.delta=0.01"], "privacy.delta"),
        (["federation.clients=2"], "at least 3 clients"),
        (["privacy.max_grad_norm=-1"], "privacy.max_grad_norm"),
        (["lora.aggregation='avg'"], "lora.aggregation"),
        (["privacy.max_grad_nrom=1"], "privacy.max_grad_nrom: unknown key"),
        (["privacy.unit='user'"], "privacy.user_field"),
    ],
)
def test_bad_configuration_names_the_field(overrides, field):
    with pytest.raises(ConfigError, match=field):
        config = RunConfig().with_overrides(overrides)
        client_policy(config, 0, 256)


def test_delta_above_the_per_client_cap_is_refused_for_small_clients():
    config = RunConfig().with_overrides(["privacy.delta=1e-3"])
    assert client_policy(config, 0, 64).delta == 1e-3  # 0.1 / 64 = 1.6e-3: allowed
    with pytest.raises(ConfigError, match=r"privacy.delta=0.001 exceeds 0.1/N_i"):
        client_policy(config, 1, 256)


def test_noise_is_calibrated_per_client_for_its_own_sampling_rate_and_joins():
    config = RunConfig().with_overrides(["privacy.max_participations=2"])
    small, large = client_policy(config, 0, 64), client_policy(config, 1, 1024)
    assert small.sample_rate == 0.5 and large.sample_rate == 32 / 1024
    assert small.max_participations == 2 and small.noise_multiplier > large.noise_multiplier
    # the run's accountant (pld) and relation (replace by default)
    accountant = make_accountant(config.privacy.accountant, neighbouring=config.privacy.neighbouring)
    for policy in (small, large):
        event = policy.event()
        assert event is not None
        spent = accountant.epsilon([event, event], policy.delta)
        assert 7.9 < spent <= 8.0


def test_local_epochs_set_the_steps_from_each_clients_sampling_rate():
    config = RunConfig().with_overrides(["federation.local_epochs=0.5"])
    assert client_policy(config, 0, 256).steps == 4  # 0.5 / (32 / 256)
    assert client_policy(config, 1, 64).steps == 1  # 0.5 / 0.5


@pytest.mark.parametrize(
    ("change", "name"),
    [
        ({"noise_multiplier": 0.1}, "noise_multiplier"),
        ({"max_grad_norm": 5.0}, "max_grad_norm"),
        ({"sample_rate": 0.9}, "sample_rate"),
        ({"steps": 30}, "steps"),
    ],
)
def test_a_client_refuses_a_plan_weaker_than_its_policy(change, name):
    from secure_fedllm.federation import Assignment

    policy = client_policy(RunConfig(), 0, 256)
    fair = Assignment(
        client=0,
        noise_multiplier=policy.noise_multiplier,
        max_grad_norm=policy.max_grad_norm,
        sample_rate=policy.sample_rate,
        steps=policy.steps,
        weight=1.0,
    )
    policy.check(fair)
    policy.check(fair.model_copy(update={"noise_multiplier": policy.noise_multiplier * 2}))  # more privacy: fine
    with pytest.raises(PlanRefusedError, match=name):
        policy.check(fair.model_copy(update=change))


def test_alpaca_loader_and_partitions(tmp_path):
    rows = [{"instruction": f"i{k}", "input": "", "output": f"o{k}", "site": f"s{k % 7}"} for k in range(100)]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert load_alpaca(tmp_path / "a.json") == load_alpaca(tmp_path / "a.jsonl") == rows
    (tmp_path / "bad.json").write_text(json.dumps([{"instruction": "x"}]))
    with pytest.raises(ConfigError, match="record 0 needs"):
        load_alpaca(tmp_path / "bad.json")
    for how in ("iid", "dirichlet", "field"):
        parts = partition(rows, 4, how=how, seed=1, alpha=0.3, by="site")
        flat = sorted(i for p in parts for i in p)
        assert flat == list(range(100)) and all(parts)
    by_site = partition(rows, 4, how="field", seed=1, by="site")
    for part in by_site:
        sites = {rows[i]["site"] for i in part}
        assert all(rows[j]["site"] not in sites for other in by_site if other is not part for j in other)


def test_user_level_dp_keeps_each_person_at_one_client(tmp_path):
    from secure_fedllm.data import load_federation_data

    rows = [{"instruction": f"i{k}", "input": "", "output": f"o{k}", "who": f"p{k % 13}"} for k in range(200)]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    for how in ("iid", "dirichlet"):
        config = RunConfig().with_overrides(
            [
                "data.source='alpaca'",
                f"data.path='{tmp_path / 'a.json'}'",
                f"data.partition='{how}'",
                "privacy.unit='user'",
                "privacy.user_field='who'",
                "evaluation.heldout_records=20",
            ]
        )
        clients = load_federation_data(config).clients
        owners = {}
        for c, records in enumerate(clients):
            for record in records:
                assert owners.setdefault(record.unit, c) == c
        assert sum(len(r) for r in clients) == 180 and all(clients)
