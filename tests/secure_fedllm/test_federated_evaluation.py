"""Federated evaluation as a DP release (issue 13): clipped, noised, charged, securely summed, one per round."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
from test_runner import tiny_config

from protocols import FixedPointEncoding, decode_message
from secure_fedllm import PrivacyBudgetExhaustedError, RunConfig, run
from secure_fedllm.adapters import AdapterManifest, attach_lora, get_vector
from secure_fedllm.data import ChatTemplate, TextRecord, TokenizedDataset, load_federation_data, split_heldout
from secure_fedllm.federation import aggregate_updates
from secure_fedllm.federation.client import FederatedClient
from secure_fedllm.federation.evaluation import (
    EvaluationBook,
    EvaluationRefusedError,
    EvaluationSettings,
    clipped_sums,
    gaussian,
    release_noise,
    site_split,
    unit_losses,
)
from secure_fedllm.federation.federation import Job, job_id
from secure_fedllm.federation.plan import client_policy
from secure_fedllm.models import load_base_model
from secure_fedllm.privacy import DPSGDEvent, PrivacyLedger, make_accountant
from secure_fedllm.site import SiteState
from secure_fedllm.training import per_example_loss

FEDERATED = ('evaluation.mode="federated"', "evaluation.loss_clip=8.0")


def _sites(result) -> Path:
    return result.out.with_name(result.out.name + ".sites")


@pytest.fixture(scope="module")
def federated(tiny_model_dir, tmp_path_factory):
    """One federated-evaluation run, with every message a client sends the server tapped."""
    config = tiny_config(tiny_model_dir, *FEDERATED)
    wires: list[tuple[int, int, bytes]] = []
    result = run(
        config, out=tmp_path_factory.mktemp("fed") / "run", progress=False, tap=lambda r, c, w: wires.append((r, c, w))
    )
    return config, result, wires


@pytest.fixture(scope="module")
def model_parts(tiny_model_dir):
    config = tiny_config(tiny_model_dir, *FEDERATED)
    base, tokenizer = load_base_model(config.model)
    model = attach_lora(base, config.lora, a0_seed=1)
    manifest = AdapterManifest.of(model, "ffa")
    template = ChatTemplate(tokenizer, system_prompt="", max_length=config.data.max_length)
    train, held = site_split(config, load_federation_data(config).clients[0])
    data, heldout = TokenizedDataset.build(train, template), TokenizedDataset.build(held, template)
    return config, model, manifest, template, data, heldout, get_vector(model, manifest)


@pytest.fixture
def site(model_parts, tmp_path):
    """make(budget, name): a lone site with its own state folder and ledger, evaluating for job 'job'."""
    config, _, _, _, data, heldout, _ = model_parts

    def make(budget: float = 8.0, name: str = "site") -> FederatedClient:
        policy = client_policy(config, 0, data.num_units)
        ledger = PrivacyLedger.open(
            tmp_path / f"{name}-ledger.json", client=0, epsilon_budget=budget, delta=policy.delta,
            accountant=config.privacy.accountant, neighbouring=config.privacy.neighbouring, job="job",
        )  # fmt: skip
        return FederatedClient(
            0, data, policy=policy, ledger=ledger, site=SiteState.open(tmp_path / name), learning_rate=0.1,
            optimizer="adam", job="job", heldout=heldout, evaluation=EvaluationSettings.of(config),
        )  # fmt: skip

    return make


def _hand_unit_losses(model, data: TokenizedDataset) -> list[float]:
    """Oracle: each record scored alone, each unit's token-weighted mean written out by hand."""
    import torch

    out = []
    for rows in data.units:
        total, tokens = 0.0, 0
        for row in rows:
            batch = data.batch_of_rows([row])
            count = int((batch.labels[:, 1:] != -100).sum())
            with torch.no_grad():
                total += float(per_example_loss(model, batch)[0]) * count
            tokens += count
        out.append(total / tokens)
    return out


def test_one_unit_with_a_huge_loss_moves_the_released_sum_by_at_most_loss_clip(model_parts):
    _, model, manifest, template, _, _, start = model_parts
    from secure_fedllm.adapters import set_vector

    set_vector(model, manifest, start)
    records = [
        TextRecord(f"Question {i}?", "", f"Answer {i} is {'x' * (i % 5)}.", unit=f"person-{i // 2}") for i in range(10)
    ]
    data = TokenizedDataset.build(records, template)  # 5 units of two records each (user-level)
    hand = _hand_unit_losses(model, data)
    losses = unit_losses(model, data, batch_size=3)  # batched, padded: must equal the one-by-one oracle
    assert np.allclose(losses, hand, rtol=1e-5)
    clip = float(np.median(hand))  # some units above the clip, some below
    expected = [sum(min(max(v, 0.0), clip) for v in hand), len(hand)]
    assert np.allclose(clipped_sums(losses, clip), expected, rtol=1e-9)
    assert any(v > clip for v in hand) and any(v < clip for v in hand)

    # one more unit whose loss is far above the clip (a crafted model's target, say): the pair moves by (<= C, 1)
    for huge in (max(hand) * 3, 1e30, math.inf, math.nan):
        with_it = clipped_sums([*losses, huge], clip)
        change = with_it - clipped_sums(losses, clip)
        assert 0 <= change[0] <= clip and change[1] == 1
        add_remove = EvaluationSettings(clip, 1.0, 1e6, 0.1, 1, 8, neighbouring="add_remove")
        assert np.linalg.norm(change) <= add_remove.sensitivity + 1e-12
        # replace-one: the same unit in place of another moves only the loss sum, by at most C
        replaced = clipped_sums([*losses[:-1], huge], clip) - clipped_sums(losses, clip)
        assert replaced[1] == 0 and abs(replaced[0]) <= EvaluationSettings(clip, 1.0, 1e6, 0.1, 1, 8).sensitivity
    # control: without the clip, the same unit moves the sum by its whole loss, far beyond loss_clip
    unclipped = clipped_sums([*losses, 1e30], math.inf)[0] - clipped_sums(losses, math.inf)[0]
    assert unclipped > 1e29


def test_the_noise_is_a_seeded_csprng_gaussian():
    seed = os.urandom(32)
    draws = gaussian(seed, 40_000)
    assert abs(draws.mean()) < 0.03 and abs(draws.std() - 1) < 0.02
    assert np.array_equal(gaussian(seed, 5), draws[:5])  # a stored seed replays its noise
    assert not np.array_equal(gaussian(os.urandom(32), 5), draws[:5])


def _heldout_units(config: RunConfig) -> int:
    """Held-out units over all sites, computed here from the sites' data (what an exact count must give)."""
    clients = load_federation_data(config).clients
    return sum(len(site_split(config, clients[c])[1]) for c in range(config.federation.clients))


def test_a_federated_run_releases_only_noised_sums_and_reports_them(federated):
    config, result, _ = federated
    rows = result.metrics
    assert [r.round for r in rows] == [0, 1, 2]
    settings = EvaluationSettings.of(config)
    enc = FixedPointEncoding(clip_range=config.secure_aggregation.clip_range, max_parties=3)
    for row in rows:
        fe = row.federated_evaluation
        assert fe is not None and fe.aborted is None and fe.sites == [0, 1, 2] and not fe.replayed
        assert fe.loss_sum is not None and fe.count is not None and fe.loss is not None and fe.perplexity is not None
        # replace-one (the default): the unit count is public, so it is released exactly and never below 1
        assert config.privacy.neighbouring == "replace" and round(fe.count) == _heldout_units(config) > 0
        assert fe.loss == pytest.approx(fe.loss_sum / fe.count) and fe.perplexity == pytest.approx(math.exp(fe.loss))
        assert (row.eval_loss, row.perplexity) == (fe.loss, fe.perplexity)  # the server scored nothing itself
        # the server's figures are the sum of what each site stored as its release (within the encoding's rounding)
        stored = [EvaluationBook(_sites(result) / f"client-{c:04d}", job_id(config)).entry(row.round) for c in range(3)]
        assert all(s is not None for s in stored)
        total = np.sum([s["values"] for s in stored], axis=0)  # type: ignore[index]
        assert np.allclose([fe.loss_sum, fe.count], total, atol=3 * settings.scale / enc.scale + 1e-9)
    report = (result.out / "report.md").read_text()
    assert "### Federated evaluation" in report and "epsilon of this release" in report
    assert RunConfig().evaluation.mode == "server"  # the default run is unchanged


def test_no_site_value_crosses_the_transport_in_the_clear(federated):
    """The tapped bytes of every client message never hold a site's encoded evaluation values (control: plaintext)."""
    config, result, wires = federated
    settings = EvaluationSettings.of(config)
    enc = FixedPointEncoding(clip_range=config.secure_aggregation.clip_range, max_parties=3)
    sites = [[EvaluationBook(_sites(result) / f"client-{c:04d}", job_id(config)).entry(r) for r in range(3)]
             for c in range(3)]  # fmt: skip
    values = [np.asarray(e["values"]) for per_site in sites for e in per_site if e is not None]
    assert len(values) == 9

    def plain(v: np.ndarray) -> np.ndarray:
        return np.floor(settings.encode(v) * enc.scale).astype(np.int64) % (1 << 32)

    def near(words: np.ndarray, target: int) -> np.ndarray:
        return np.minimum((words - target) % (1 << 32), (target - words) % (1 << 32)) <= 1  # stochastic rounding

    def carriers(messages: list[bytes]) -> int:
        """Messages holding some site's two encoded values side by side, or their float bytes."""
        hits = 0
        for wire in messages:
            data = getattr(decode_message(wire), "data", None)
            words = np.frombuffer(data, dtype="<u4").astype(np.int64) if data else np.zeros(0, np.int64)
            for v in values:
                loss, count = plain(v)
                hits += int(np.count_nonzero(near(words[:-1], loss) & near(words[1:], count)))
                hits += sum(np.float64(x).tobytes() in wire or np.float32(x).tobytes() in wire for x in v)
        return hits

    masked = [w for _, _, w in wires if type(decode_message(w)).__name__ == "MaskedInput"]
    assert len(masked) == 3 * 2 + 3 * 3  # 2 training rounds and 3 evaluations, 3 sites each
    assert carriers([w for _, _, w in wires]) == 0
    # control: the same values through the plaintext protocol are there for the server to read
    control = RunConfig().with_overrides(['secure_aggregation.protocol="none"', "federation.clients=3"])
    seen: list[bytes] = []
    outcome = aggregate_updates(
        control, [settings.encode(v).astype(np.float32) for v in values[:3]], [1.0] * 3, round_number=0,
        context=b"c", drop_at={}, tap=lambda _p, w: seen.append(w),
    )  # fmt: skip
    assert outcome.mean is not None and carriers(seen) >= 3
    # nothing per site is published in the run folder either
    published = b"".join(p.read_bytes() for p in result.out.rglob("*") if p.is_file())
    assert not any(repr(float(x)).encode() in published for v in values for x in v)


def test_each_evaluation_is_charged_and_composed_with_training(federated):
    config, result, _ = federated
    z = config.evaluation.noise_multiplier
    accountant = make_accountant(config.privacy.accountant, neighbouring=config.privacy.neighbouring)
    last = result.metrics[-1]
    for c in range(3):
        (path,) = (_sites(result) / f"client-{c:04d}" / "ledgers").glob("*.json")
        ledger = json.loads(path.read_text())
        gaussian_events = [e for e in ledger["events"] if e.get("mechanism") == "gaussian"]
        training = [e for e in ledger["events"] if e.get("mechanism", "dp-sgd") == "dp-sgd"]
        assert [e["round"] for e in gaussian_events] == [0, 1, 2] and [e["round"] for e in training] == [1, 2]
        assert all((e["noise_multiplier"], e["sample_rate"], e["steps"]) == (z, 1.0, 1) for e in gaussian_events)
        events = [
            DPSGDEvent(**{k: e[k] for k in ("noise_multiplier", "sample_rate", "steps")}) for e in ledger["events"]
        ]
        composed = accountant.epsilon(events, ledger["delta"])
        assert last.epsilon[c] == pytest.approx(composed, rel=1e-9) and composed <= config.privacy.target_epsilon
        trained = [e for e, raw in zip(events, ledger["events"], strict=True) if raw in training]
        assert composed > accountant.epsilon(trained, ledger["delta"])  # the evaluations are counted, not free
        one = accountant.epsilon([DPSGDEvent(noise_multiplier=z, sample_rate=1.0, steps=1)], ledger["delta"])
        assert all(r.federated_evaluation.epsilon[c] == pytest.approx(one) for r in result.metrics)  # type: ignore[union-attr]
    # the report's joined rounds are the training rounds only
    assert "| [1, 2] |" in (result.out / "report.md").read_text()


def test_a_site_refuses_an_evaluation_its_budget_cannot_pay(site, model_parts, tmp_path):
    _, model, manifest, _, _, _, start = model_parts
    poor = site(budget=0.05, name="poor")
    assert "budget" in (poor.evaluation_willing(0, "any") or "")
    with pytest.raises(PrivacyBudgetExhaustedError, match="over the lifetime budget"):
        poor.evaluate(model, manifest, start, 0, start=start)
    assert not (tmp_path / "poor-ledger.json").exists() and EvaluationBook(poor.site.root, "job").entry(0) is None
    # control: a budget that can pay admits the same evaluation, and charges it
    rich = site(budget=8.0, name="rich")
    assert rich.evaluation_willing(0, "any") is None
    release = rich.evaluate(model, manifest, start, 0, start=start)
    assert not release.replayed and rich.ledger is not None and rich.ledger.evaluations == [0]
    assert rich.ledger.rounds == []  # an evaluation is no participation in training


def test_a_second_evaluation_of_a_round_replays_the_same_noise_and_never_draws_again(site, model_parts):
    _, model, manifest, _, _, heldout, start = model_parts
    client = site()
    first = client.evaluate(model, manifest, start, 0, start=start)
    again = client.evaluate(model, manifest, start, 0, start=start)  # a server asks again (or re-runs after a crash)
    assert again.replayed and np.array_equal(again.values, first.values) and again.release_key == first.release_key
    assert client.ledger is not None and client.ledger.evaluations == [0]  # charged once
    moved = start + np.float32(0.01)
    with pytest.raises(EvaluationRefusedError, match="already evaluated"):
        client.evaluate(model, manifest, moved, 0, start=start)  # another model for the same round
    assert client.evaluation_willing(0, "another") is not None
    # what averaging the answers buys: nothing here, since both answers carry the same noise
    truth = clipped_sums(unit_losses(model, heldout, batch_size=8), client.evaluation.loss_clip)  # type: ignore[union-attr]
    assert np.array_equal((first.values + again.values) / 2 - truth, first.values - truth)
    # control: a site that drew fresh noise per request would let the server average it away
    settings = client.evaluation
    assert settings is not None
    single = np.array([release_noise(os.urandom(32), settings)[0] for _ in range(3000)])
    averaged = np.array(
        [(release_noise(os.urandom(32), settings)[0] + release_noise(os.urandom(32), settings)[0]) / 2
         for _ in range(3000)]
    )  # fmt: skip
    ratio = averaged.var() / single.var()
    assert 0.4 < ratio < 0.6  # fresh draws: two answers halve the variance


def test_a_site_evaluates_only_models_it_can_place_in_this_job(site, model_parts):
    config, model, manifest, _, _, _, start = model_parts
    clip = config.secure_aggregation.clip_range
    client = site()
    with pytest.raises(EvaluationRefusedError, match="starting adapter"):
        client.evaluate(model, manifest, start + np.float32(1e-3), 0, start=start)  # round 0 is known exactly
    client.evaluate(model, manifest, start, 0, start=start)
    with pytest.raises(EvaluationRefusedError, match="moved"):  # more than one released, clipped mean can move it
        client.evaluate(model, manifest, start + np.float32(2 * clip), 1, start=start)
    with pytest.raises(EvaluationRefusedError, match="not a round of this job"):
        client.evaluate(model, manifest, start, config.federation.rounds + 1, start=start)
    # control: a model within one round's movement is admitted
    one = client.evaluate(model, manifest, start + np.float32(0.5 * clip), 1, start=start)
    assert not one.replayed and client.ledger is not None and client.ledger.evaluations == [0, 1]
    # rounds only move forward: after round 2, round 1 is refused
    other = site(name="other")
    other.evaluate(model, manifest, start, 2, start=start)
    with pytest.raises(EvaluationRefusedError, match="comes before"):
        other.evaluate(model, manifest, start, 1, start=start)


def test_the_heldout_split_is_by_person_under_user_level_dp(tiny_model_dir):
    config = tiny_config(tiny_model_dir, *FEDERATED, "privacy.unit='user'", "privacy.user_field='person_id'")
    job = Job.build(config)
    assert job.site_heldout is not None
    for train, held in zip(job.data.clients, job.site_heldout, strict=True):
        assert held and train
        assert not {r.unit for r in train} & {r.unit for r in held}  # no person on both sides
    # control: a record-level split of the same records puts some person on both sides
    records = load_federation_data(config).clients[0]
    train, held = split_heldout(records, config.evaluation.site_heldout_fraction, by_person=False)
    assert {r.unit for r in train} & {r.unit for r in held}
