"""Issue 14: distributed record-level DP-SGD, each DP step one secure-aggregation round.

What must hold: the per-unit gradients are the textbook ones; each unit's contribution is clipped,
scaled and conditionally rounded so that its L2 norm never exceeds the accounted sensitivity; the
client adds exactly its Skellam share; the shares are sized by the site (never the server) for the
honest survivors it assumes; the server steps along the exact sum of what the clients released;
and the ledger charges the central noise while recording what one share alone gives.
"""

from __future__ import annotations

import glob
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from test_runner import tiny_config

from protocols import DeterministicRandom
from secure_fedllm import ConfigError, PlanRefusedError, RunConfig, run
from secure_fedllm.adapters import AdapterManifest, attach_lora
from secure_fedllm.config import LoraConfig, ModelConfig
from secure_fedllm.data import ChatTemplate, TextRecord, TokenizedDataset
from secure_fedllm.federation.plan import Assignment, client_policy
from secure_fedllm.models import load_base_model
from secure_fedllm.privacy import SkellamRDPAccountant
from secure_fedllm.privacy.distributed import DistributedDP, calibrate_distributed, ring_scale
from secure_fedllm.training import LocalTrainer, per_example_loss

# -- per-unit gradients --------------------------------------------------------------------------


def test_per_unit_gradients_equal_explicit_autograd(tiny_model_dir):
    base, tokenizer = load_base_model(ModelConfig(name=str(tiny_model_dir)))
    model = attach_lora(base, LoraConfig(r=4), a0_seed=7)
    template = ChatTemplate(tokenizer, system_prompt="", max_length=160)
    records = [TextRecord(f"Q {i}?", "", f"Answer {i} {'y' * (i % 4)}.", unit=f"u{i // 2}") for i in range(12)]
    data = TokenizedDataset.build(records, template)
    manifest = AdapterManifest.of(model, "ffa")
    order = list(manifest.check(model).values())
    with torch.no_grad():  # B = 0 at init gives zero gradients for A only; make B non-zero so every part is tested
        for p in order:
            p.normal_(0, 0.05)
    units = [0, 2, 5]
    model.eval()
    expected = []  # before Opacus' hooks are attached (they would capture these forward passes)
    for u in units:
        losses = torch.stack([per_example_loss(model, data.batch_of_rows([r]))[0] for r in data.units[u]])
        grads = torch.autograd.grad(losses.mean(), order)
        expected.append(torch.cat([g.reshape(-1) for g in grads]))
    trainer = LocalTrainer(model)
    got = trainer.per_unit_gradients(data.batch_of_units(units), order)
    for row in range(len(units)):
        torch.testing.assert_close(got[row], expected[row], atol=1e-6, rtol=1e-4)
    assert all(getattr(p, "grad_sample", None) is None and p.grad is None for p in order)  # left clean
    assert trainer.per_unit_gradients(None, order).shape == (0, manifest.dimension)


# -- the mechanism ---------------------------------------------------------------------------------


def _params(**kw) -> DistributedDP:
    base = {"clip": 1.0, "scale": 64.0, "dimension": 50, "sample_rate": 0.1, "parties": 4, "honest": 2, "mu": 500.0}
    return DistributedDP(**{**base, **kw})


def test_each_unit_is_clipped_scaled_and_rounded_to_a_neighbouring_integer():
    params = _params()
    rng = np.random.default_rng(0)
    g = rng.normal(size=(6, 50)) * np.array([[0.01], [0.1], [1.0], [3.0], [10.0], [0.5]])
    x = np.stack([row * params.scale * min(1.0, params.clip / np.linalg.norm(row)) for row in g])
    total = params.quantize(g, np.random.default_rng(1))
    assert total.dtype == np.int64
    assert (total >= np.floor(x).sum(axis=0)).all() and (total <= np.ceil(x).sum(axis=0)).all()
    # unbiased: the mean over rounding draws converges to the exact scaled sum (std of the mean <= 0.5 sqrt(6/400))
    draws = np.stack([params.quantize(g, np.random.default_rng(seed)) for seed in range(400)])
    assert np.abs(draws.mean(axis=0) - x.sum(axis=0)).max() < 5 * 0.5 * math.sqrt(6 / 400)


def test_conditional_rounding_never_exceeds_the_accounted_sensitivity():
    # s C = 5 spread evenly over d = 100: every coordinate is 0.5, so plain randomized rounding gives
    # ||r||^2 ~ Binomial(100, 1/2) (mean 50), over the bound l2^2 = 25 + 25 + (5 + 5) = 60 about 2% of the time.
    params = DistributedDP(clip=5.0, scale=1.0, dimension=100, sample_rate=0.1, parties=4, honest=2, mu=10.0)
    assert params.l2**2 == pytest.approx(60.0)
    row = np.full((1, 100), 0.5)
    norms = [float(np.linalg.norm(params.quantize(row, np.random.default_rng(s)))) for s in range(600)]
    assert max(norms) <= params.l2
    # control: the same rounding without the condition exceeds the bound
    plain = [np.linalg.norm(np.floor(row[0]) + (np.random.default_rng(s).random(100) < 0.5)) for s in range(600)]
    assert max(plain) > params.l2


def test_contribution_adds_exactly_a_skellam_share_of_mu_over_h():
    params = _params(dimension=20_000, mu=900.0, honest=3)
    g = np.zeros((0, 20_000))
    share = params.contribution(g, rounding=np.random.default_rng(0), noise=DeterministicRandom(5))
    assert params.share_mu == pytest.approx(300.0)
    assert abs(share.mean()) < 5 * math.sqrt(600 / 20_000)
    assert share.var() == pytest.approx(2 * 300.0, rel=0.05)  # Skellam(mu/h): variance 2 mu / h
    # a second draw from another stream differs: nothing is reused
    other = params.contribution(g, rounding=np.random.default_rng(0), noise=DeterministicRandom(6))
    assert (share != other).any()


def test_calibration_meets_the_target_for_the_h_honest_shares_only():
    q, steps, delta = 0.125, 9, 1e-4
    params = calibrate_distributed(
        target_epsilon=1.0, delta=delta, sample_rate=q, steps=steps, clip=1.0, dimension=368_640,
        parties=4, corrupt=1, dropouts=1, neighbouring="replace",
    )  # fmt: skip
    assert params.honest == 2 and params.share_mu == pytest.approx(params.mu / 2)
    assert params.scale == ring_scale(1.0, 368_640) == 4096.0
    assert params.l2 / (params.scale * params.clip) < 1.01  # rounding inflates the sensitivity by < 1%
    accountant = SkellamRDPAccountant(neighbouring="replace")
    central = accountant.epsilon([params.event(steps)], delta)
    assert 0.97 <= central <= 1.0
    alone = params.event(steps).model_copy(update={"mu": params.share_mu, "own_mu": None})
    assert accountant.epsilon([alone], delta) > 1.3  # one share alone: what holds if secure aggregation fails
    assert params.wrap_probability(total_units=1024) < 1e-9


# -- the site owns the shares ----------------------------------------------------------------------


def _policy(**overrides: str):
    config = RunConfig().with_overrides(
        [
            'privacy.mode="distributed"',
            'secure_aggregation.protocol="secagg"',
            *[f"{k}={v}" for k, v in overrides.items()],
        ]
    )
    return client_policy(config, 0, 256, dimension=4096)


def test_a_smaller_round_gets_larger_shares_and_none_without_an_honest_share():
    policy = _policy()  # 4 clients, n_C = ceil(0.05 * 4) = 1 over the roster, d_max = ceil(0.1 n)
    assert policy.distributed is not None and policy.distributed.honest == 2
    offer = Assignment(client=0, noise_multiplier=policy.noise_multiplier, max_grad_norm=1.0,
                       sample_rate=policy.sample_rate, steps=1, weight=1.0)  # fmt: skip
    full = policy.round_dp(offer, 4)
    assert full.share_mu == pytest.approx(policy.distributed.mu / 2)
    small = policy.round_dp(offer, 3)  # h = 3 - 1 - 1 = 1: this client's share must carry all of mu
    assert small.honest == 1 and small.share_mu == pytest.approx(policy.distributed.mu)
    assert small.event().own_mu == pytest.approx(policy.distributed.mu)
    # control: a share sized for the calibrated cohort would leave the guaranteed noise at half of mu
    assert small.honest * full.share_mu < 0.51 * policy.distributed.mu
    with pytest.raises(PlanRefusedError, match="no honest noise share"):
        policy.round_dp(offer, 2)
    # the server cannot shrink the noise: a plan with lower noise is refused, a higher one raises mu
    louder = policy.round_dp(offer.model_copy(update={"noise_multiplier": 2 * policy.noise_multiplier}), 4)
    assert louder.mu == pytest.approx(4 * policy.distributed.mu)
    with pytest.raises(PlanRefusedError, match="noise_multiplier"):
        policy.check(offer.model_copy(update={"noise_multiplier": 0.5 * policy.noise_multiplier}))


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ('secure_aggregation.protocol="secagg+"', "secure_aggregation.protocol"),
        ('secure_aggregation.protocol="he-bfv"', "secure_aggregation.protocol"),
        ('evaluation.mode="federated"', "evaluation.mode"),
        ('federation.weighting="size"', "federation.weighting"),
    ],
)
def test_distributed_mode_refuses_what_could_release_a_share(override, field):
    base = ['privacy.mode="distributed"', 'secure_aggregation.protocol="secagg"']
    with pytest.raises(ConfigError, match=field.split(".")[-1]):
        RunConfig().with_overrides([*base, override])
    RunConfig().with_overrides([*base])  # control: the plain distributed config is valid


# -- end to end in process -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def one_step(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    config = tiny_config(
        tiny_model_dir,
        'privacy.mode="distributed"',
        'secure_aggregation.protocol="secagg"',
        "federation.clients=4",
        "federation.rounds=1",
        "secure_aggregation.dropout_rate=0.1",
        "evaluation.generations=0",
    )
    return config, run(config, out=root / "run", progress=False), root


def test_the_server_steps_along_the_exact_sum_of_the_released_vectors(one_step):
    config, result, root = one_step
    outputs = [
        np.fromfile(f, dtype="<i8") for f in sorted(glob.glob(str(root / "run.sites" / "*" / "releases" / "*.i64")))
    ]
    assert len(outputs) == 4  # each site kept its own integer release
    total = np.sum(outputs, axis=0)
    assert np.abs(total).max() < 2**31  # no wrap-around here: the ring sum is the plain sum
    final = np.fromfile(next((result.out / "checkpoint").glob("global-*.f32")), dtype="<f4")
    # FFA starts from B = 0; Adam's first step is lr * g / (|g| + eps) = -lr sign(g) where g != 0
    lr = config.training.learning_rate
    moved = total != 0
    np.testing.assert_allclose(final[moved], -lr * np.sign(total[moved]), rtol=1e-3)
    assert (final[~moved] == 0).all()
    state = json.loads((result.out / "checkpoint" / "state.json").read_text())
    assert state["optimizer"]["steps"] == 1  # the server optimiser's state travels with the checkpoint


def test_every_client_charges_the_central_noise_and_records_its_own_share(one_step):
    _, result, root = one_step
    record = result.metrics[1]
    assert record.included == [0, 1, 2, 3] and record.distributed is not None
    assert record.protocol is not None and record.protocol.neighbours == 3 and record.protocol.threshold == 3
    for ledger_file in sorted(glob.glob(str(root / "run.sites" / "*" / "ledgers" / "*.json"))):
        (event,) = json.loads(Path(ledger_file).read_text())["events"]
        assert event["mechanism"] == "skellam" and event["steps"] == 1
        assert event["own_mu"] == pytest.approx(event["mu"] / 2)  # h = 4 - 1 - 1
        assert (event["parties"], event["honest"]) == (4, 2)  # the assumptions the share was sized for
        assert event["sample_rate"] == pytest.approx(8 / 64)  # the common q, not the client's own N_i
    assert all(0.97 * 8.0 <= eps <= 8.0 for eps in result.epsilons.values())


def test_semi_honest_distributed_rounds_keep_the_survivor_floor_and_refuse_a_lower_threshold(tiny_model_dir):
    from protocols import InsecureParameterError
    from secure_fedllm.federation import aggregate_updates
    from secure_fedllm.federation.aggregation import secagg_params

    base = [
        'privacy.mode="distributed"',
        'secure_aggregation.protocol="secagg"',
        'secure_aggregation.setting="semi-honest"',
        "federation.clients=10",
        "secure_aggregation.dropout_rate=0.2",
    ]
    config = RunConfig().with_overrides(base)
    params = secagg_params(config, 10, 8)
    assert params.neighbours == 9 and params.threshold >= 10 - 2  # full SecAgg, t >= n - d_max
    updates = [np.arange(8, dtype=np.int64) * (i + 1) for i in range(10)]
    outcome = aggregate_updates(config, updates, [1.0] * 10, round_number=1, context=b"c", drop_at={})
    assert outcome.ring_sum is not None and (outcome.ring_sum == np.arange(8) * 55).all()
    # a server (or operator) announcing t below n - d_max is refused by every site before any input goes out
    low = RunConfig().with_overrides([*base, "secure_aggregation.threshold=5"])
    with pytest.raises(InsecureParameterError, match="threshold"):
        aggregate_updates(low, updates, [1.0] * 10, round_number=1, context=b"c", drop_at={})
    # control: in local mode the same threshold is accepted (no survivor floor beyond t)
    local = RunConfig().with_overrides(
        [*base[2:], 'secure_aggregation.protocol="secagg"', "secure_aggregation.threshold=5"]
    )
    floats = [u.astype(np.float32) * 1e-3 for u in updates]
    assert aggregate_updates(local, floats, [1.0] * 10, round_number=1, context=b"c", drop_at={}).mean is not None


def test_budget_plan_states_the_charged_and_the_own_share_epsilon(capsys):
    from secure_fedllm.cli import main

    argv = ["budget", "plan", "--mode", "distributed", "--epsilon", "8", "--rounds", "9", "--records", "256"]
    assert main([*argv, "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["honest_shares"] == 2 and 7.9 <= plan["epsilon"] <= 8.0
    assert plan["delta"] == pytest.approx(0.1 / (4 * 256))  # 0.1 / sum N_i
    assert plan["share_mu"] == pytest.approx(plan["mu"] / 2) and plan["epsilon_own_share"] > 12
    # fewer assumed colluders or dropouts: more honest shares, so each share is smaller and alone weaker
    assert main([*argv, "--corrupt", "0", "--dropouts", "0", "--json"]) == 0
    trusted = json.loads(capsys.readouterr().out)
    assert trusted["honest_shares"] == 4 and trusted["mu"] == pytest.approx(plan["mu"], rel=1e-6)
    assert trusted["epsilon_own_share"] > plan["epsilon_own_share"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "while secure aggregation holds" in text and "if secure aggregation fails" in text


def test_the_report_says_which_guarantee_holds_against_whom(one_step):
    _, result, _root = one_step
    report = result.report.read_text()
    assert "Distributed DP" in report and "h = n - n_C - d_max = 4 - 1 - 1 = 2" in report
    assert "Anyone, if secure aggregation fails" in report and "client 0:" in report
    assert "Each client's epsilon is a property of its own DP-SGD noise" not in report  # the local-mode claim
