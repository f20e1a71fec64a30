"""The federation end to end on a tiny random LLaMA: artefacts, privacy, resume, and what the server sees."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from protocols import InsecureParameterError, decode_message
from protocols.he import HEParams
from secure_fedllm import ConfigError, PlanRefusedError, PrivacyBudgetExhaustedError, RunConfig, run
from secure_fedllm.adapters import SIDECAR
from secure_fedllm.config import ModelConfig
from secure_fedllm.federation import aggregate_updates
from secure_fedllm.federation.aggregation import round_params
from secure_fedllm.models import load_base_model, model_fingerprint


def _ledger_file(site: Path) -> Path:
    """A site's one lifetime ledger (`ledgers/<population>.json`; these tests run one population per site)."""
    (path,) = sorted((site / "ledgers").glob("*.json"))
    return path


def tiny_config(model_dir, *extra: str) -> RunConfig:
    return RunConfig().with_overrides(
        [
            f'model.name="{model_dir}"',
            "federation.clients=3",
            "federation.rounds=2",
            "data.records_per_client=64",
            "data.max_length=160",
            "evaluation.heldout_records=16",
            "evaluation.generations=1",
            "evaluation.max_new_tokens=4",
            "privacy.expected_batch_size=8",
            "lora.r=4",
            "privacy.noise_seed=11",
            # the malicious default with 3 clients (n_C = 1) needs t = 3 = n: it tolerates no dropout
            "secure_aggregation.dropout_rate=0.0",
            *extra,
        ]
    )


@pytest.fixture(scope="module")
def finished(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "run"
    config = tiny_config(tiny_model_dir)
    return config, run(config, out=out, progress=False)


def test_end_to_end_run_writes_every_artefact(finished, tiny_model_dir):
    config, result = finished
    rows = [json.loads(line) for line in (result.out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    for row in rows:
        assert {"round", "eval_loss", "perplexity", "epsilon"} <= row.keys()
        assert math.isclose(row["perplexity"], math.exp(row["eval_loss"]))
        assert set(row["epsilon"]) == {"0", "1", "2"}
    assert all(e == 0 for e in rows[0]["epsilon"].values())
    assert all(0 < e <= 8.0 for e in rows[1]["epsilon"].values())
    assert all(7.5 < e <= 8.0 for e in rows[2]["epsilon"].values())  # calibrated for K = 2 joins
    assert rows[1]["included"] == [0, 1, 2] and rows[1]["protocol"]["insecure"] is False
    assert RunConfig.from_file(result.out / "config.toml") == config
    for name in ("report.md", "quality.png", "epsilon.png", "costs.png"):
        assert (result.out / name).stat().st_size > 0
    report = (result.out / "report.md").read_text()
    assert "holds even if secure aggregation fails" in report and "not a cryptographic RNG" in report
    sites = result.out.with_name(result.out.name + ".sites")
    assert len(list(sites.glob("client-*/ledgers/*.json"))) == 3
    assert not (result.out / "ledger").exists() and not (result.out / "clients").exists()


def test_saved_adapter_loads_with_peft_and_carries_a0_and_base_hash(finished, tiny_model_dir):
    _, result = finished
    sidecar = json.loads((result.adapter / SIDECAR).read_text())
    base, _ = load_base_model(ModelConfig(name=str(tiny_model_dir)))
    assert sidecar["base_sha256"] == model_fingerprint(base)
    loaded = PeftModel.from_pretrained(base, result.adapter)
    saved = load_file(str(result.adapter / "adapter_model.safetensors"))
    a_tensors = [k for k in saved if "lora_A" in k]
    assert a_tensors and all(saved[k].abs().sum() > 0 for k in a_tensors)  # A0 ships, non-zero
    b_tensors = [k for k in saved if "lora_B" in k]
    assert any(saved[k].abs().sum() > 0 for k in b_tensors)  # B trained
    named = dict(loaded.named_parameters())
    for key in a_tensors:
        match = [v for n, v in named.items() if n.replace(".default", "").endswith(key.split("base_model.")[-1])]
        assert match and torch.equal(match[0].detach(), saved[key])


def test_resume_after_a_stop_and_a_crash_matches_an_uninterrupted_run(finished, tiny_model_dir, tmp_path):
    config, reference = finished
    out = tmp_path / "resumed"
    first = run(config, out=out, progress=False, stop_after=1)
    assert [r.round for r in first.metrics] == [0, 1]

    def crash(round_number, client, wire):
        if round_number == 2:  # every client trained and charged round 2, then the process dies
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        run(resume=out, progress=False, tap=crash)
    sites, reference_sites = out.with_name("resumed.sites"), reference.out.with_name(reference.out.name + ".sites")
    ledger = json.loads(_ledger_file(sites / "client-0000").read_text())
    assert [e["round"] for e in ledger["events"]] == [1, 2]  # charged before its update left
    resumed = run(resume=out, progress=False)  # re-sends round 2's stored outputs (only keys had left); no charge
    for client in range(3):
        ours_file = _ledger_file(sites / f"client-{client:04d}")
        theirs_file = _ledger_file(reference_sites / f"client-{client:04d}")
        assert ours_file.name == theirs_file.name and ours_file.read_text() == theirs_file.read_text()
    ours = load_file(str(resumed.adapter / "adapter_model.safetensors"))
    theirs = load_file(str(reference.adapter / "adapter_model.safetensors"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert [r.perplexity for r in resumed.metrics] == [r.perplexity for r in reference.metrics]


def test_resume_refuses_a_different_config(finished, tiny_model_dir):
    config, result = finished
    with pytest.raises(ConfigError, match="differs"):
        run(config.with_overrides(["federation.rounds=5"]), resume=result.out, progress=False)
    with pytest.raises(ConfigError, match="another configuration"):
        run(config.with_overrides(["federation.rounds=5"]), out=result.out, progress=False)


def test_clients_sit_out_once_their_participation_cap_is_reached(tiny_model_dir, tmp_path):
    config = tiny_config(
        tiny_model_dir, "federation.rounds=3", "privacy.max_participations=1", "evaluation.generations=0"
    )
    result = run(config, out=tmp_path / "capped", progress=False)
    assert result.metrics[1].included == [0, 1, 2]
    for row in result.metrics[2:]:
        assert row.aborted == "only 0 clients can join"
        assert all("cap" in why for why in row.sat_out.values())
    assert result.metrics[1].epsilon == result.metrics[3].epsilon
    assert all(7.5 < e <= 8.0 for e in result.epsilons.values())  # calibrated for one join


@pytest.fixture
def lone_client(finished, tmp_path):
    """Client 0 of the finished run's config, with a fresh ledger, a trainer and a plan maker."""
    from secure_fedllm.adapters import AdapterManifest, adapter_fingerprints, attach_lora
    from secure_fedllm.data import ChatTemplate, TokenizedDataset, load_federation_data
    from secure_fedllm.federation import FederatedClient, RoundPlan, client_policy
    from secure_fedllm.privacy import PrivacyLedger
    from secure_fedllm.site import SiteState
    from secure_fedllm.training import LocalTrainer

    config, _ = finished
    base, tokenizer = load_base_model(config.model)
    base_sha = model_fingerprint(base)
    model = attach_lora(base, config.lora, a0_seed=1)
    manifest = AdapterManifest.of(model, "ffa")
    own = {"base_sha256": base_sha, "manifest_sha256": manifest.digest(), **adapter_fingerprints(model)}
    template = ChatTemplate(tokenizer, system_prompt="", max_length=config.data.max_length)
    data = TokenizedDataset.build(load_federation_data(config).clients[0], template)
    policy = client_policy(config, 0, data.num_units)
    ledger = PrivacyLedger.open(
        tmp_path / "ledger.json",
        client=0,
        epsilon_budget=8.0,
        delta=policy.delta,
        accountant=config.privacy.accountant,
        neighbouring=config.privacy.neighbouring,
    )
    client = FederatedClient(
        0, data, policy=policy, ledger=ledger, site=SiteState.open(tmp_path / "site"), learning_rate=0.1,
        optimizer="adam", fingerprints=own, job="lone",
    )  # fmt: skip

    def plan(round_number, *, weights=(1.0, 1.0, 1.0), **change):
        others = [client.assignment(w).model_copy(update={"client": i}) for i, w in enumerate(weights)]
        fields = {"round": round_number, "aggregation": "ffa", "protocol": "secagg+", "clip_range": 0.1,
                  "participants": tuple(others), **own, **change}  # fmt: skip
        return RoundPlan(**fields)

    return client, LocalTrainer(model), model, manifest, plan


def test_a_client_asked_past_its_budget_refuses_before_any_step(lone_client, tmp_path):
    from secure_fedllm.adapters import get_vector

    client, trainer, model, manifest, plan = lone_client
    start = get_vector(model, manifest)
    for r in (1, 2):
        client.train(trainer, model, manifest, start, plan(r))
    assert "cap" in client.willing(3)
    before = get_vector(model, manifest)
    with pytest.raises(PlanRefusedError, match="participation cap 2"):
        client.train(trainer, model, manifest, before, plan(3))
    client.policy = client.policy.model_copy(update={"max_participations": 10})  # now the budget binds
    assert "budget" in client.willing(3)
    ledger_before = (tmp_path / "ledger.json").read_text()
    with pytest.raises(PrivacyBudgetExhaustedError, match="over the budget"):
        client.train(trainer, model, manifest, before, plan(3))
    assert (get_vector(model, manifest) == before).all()
    assert (tmp_path / "ledger.json").read_text() == ledger_before


def test_a_release_is_replayed_uncharged_and_any_change_is_a_new_charged_release(lone_client, tmp_path):
    """The same release key gets the stored output; another plan or adapter is a new release with fresh noise.

    (Before issue 12 a changed request for the same round was refused, and a same-plan request re-trained
    from a seed derived from the round: see tests/secure_fedllm/test_release_binding.py for the attacks.)
    """
    from secure_fedllm.adapters import get_vector

    client, trainer, model, manifest, plan = lone_client
    start = get_vector(model, manifest)
    first = client.train(trainer, model, manifest, start, plan(1))
    again = client.train(trainer, model, manifest, start, plan(1))  # a re-run after a crash
    assert again.replayed and (again.delta == first.delta).all() and again.epsilon == first.epsilon
    assert again.release_key == first.release_key and again.rounding_seed == first.rounding_seed
    assert len(json.loads((tmp_path / "ledger.json").read_text())["events"]) == 1
    moved = start + np.float32(1e-3)
    other = client.train(trainer, model, manifest, moved, plan(1))  # another global adapter: a new release
    assert not other.replayed and other.release_key != first.release_key and other.epsilon > first.epsilon
    assert other.rounding_seed != first.rounding_seed and not np.array_equal(other.delta, first.delta)
    assert client.release_key(plan(1, clip_range=0.2), start) not in (first.release_key, other.release_key)
    events = json.loads((tmp_path / "ledger.json").read_text())["events"]
    assert [e["round"] for e in events] == [1, 1]  # two releases of round 1, each charged
    assert "release" not in json.dumps(client.ledger.to_dict(public=True))  # the tags stay with the site


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"a0_sha256": "0" * 64}, "a0_sha256"),
        ({"base_sha256": "1" * 64}, "base_sha256"),
        ({"weights": (1.0, 0.05, 0.05)}, "single out"),  # a zero weight is refused as malformed: test_plan_validation
        ({"weights": (1.0, 1.0)}, "secure aggregation over 2 clients"),
    ],
)
def test_a_client_refuses_a_plan_for_another_model_or_one_that_singles_it_out(lone_client, change, message):
    from secure_fedllm.adapters import get_vector

    client, trainer, model, manifest, plan = lone_client
    start = get_vector(model, manifest)
    with pytest.raises(PlanRefusedError, match=message):
        client.train(trainer, model, manifest, start, plan(1, **change))
    assert client.rounds_joined == []


@pytest.mark.parametrize(
    ("protocol", "weights"),
    [
        ("secagg+", [1.0] * 8),
        ("secagg", [1.0] * 8),
        ("secagg+", [1.0, 0.5, 0.25, 1.0, 0.75, 1.0, 0.3, 0.9]),
    ],
)
def test_decoded_mean_is_within_the_quantization_bound_of_the_survivors_mean(protocol, weights):
    from protocols import FixedPointEncoding

    config = RunConfig().with_overrides(
        [
            f'secure_aggregation.protocol="{protocol}"',
            "secure_aggregation.clip_range=0.05",
            "secure_aggregation.dropout_rate=0.3",
            "federation.clients=8",
        ]
    )
    rng = np.random.default_rng(3)
    n, d = 8, 4000
    updates = [rng.normal(0, 0.02, d).astype(np.float32) for _ in range(n)]
    outcome = aggregate_updates(config, updates, weights, round_number=1, context=b"ctx", drop_at={2: 2, 5: 2})
    included = outcome.included
    assert included == [0, 1, 3, 4, 6, 7]
    clipped = [np.clip(updates[i].astype(np.float64), -0.05, 0.05) for i in included]
    total = sum(weights[i] for i in included)
    exact = sum(weights[i] * c for i, c in zip(included, clipped, strict=True)) / total
    encoding = FixedPointEncoding(clip_range=0.05, max_parties=8)
    step, weight_step = 1 / encoding.scale, 1 / encoding.weight_scale
    # stochastic rounding: each of the m survivors is off by less than one step, in w*x and in w
    m = len(included)
    bound = (m * step + np.abs(exact) * m * weight_step) / total
    assert outcome.mean is not None
    assert (np.abs(outcome.mean - exact) <= bound).all()
    if len(set(weights)) == 1:  # integer weights are encoded exactly: the bound is m * Delta / W
        assert np.abs(outcome.mean - exact).max() <= m * step / total
    assert outcome.clipped_coordinates == sum(int(np.count_nonzero(np.abs(u) > 0.05)) for u in updates) > 0


@pytest.mark.parametrize(("protocol", "visible"), [("secagg+", False), ("none", True)])
def test_no_message_to_the_server_carries_an_unmasked_update(protocol, visible):
    config = RunConfig().with_overrides([f'secure_aggregation.protocol="{protocol}"', "federation.clients=5"])
    rng = np.random.default_rng(0)
    updates = [rng.uniform(-0.04, 0.04, 3000).astype(np.float32) for _ in range(5)]
    seen: list[tuple[int, bytes]] = []
    outcome = aggregate_updates(
        config, updates, [1.0] * 5, round_number=1, context=b"c", drop_at={}, tap=lambda p, w: seen.append((p, w))
    )
    assert outcome.mean is not None
    from protocols import FixedPointEncoding

    scale = FixedPointEncoding(clip_range=config.secure_aggregation.clip_range, max_parties=5).scale
    matches = []
    for party, wire in seen:
        message = decode_message(wire)
        data = getattr(message, "data", None)
        if data is None:
            continue
        words = np.frombuffer(data, dtype="<u4")[:3000].astype(np.int64)
        plain = np.floor(updates[party].astype(np.float64) * scale).astype(np.int64) % (1 << 32)
        distance = np.minimum((words - plain) % (1 << 32), (plain - words) % (1 << 32))
        matches.append(float(np.mean(distance <= 1)))
    assert len(matches) == 5
    assert all(m > 0.99 for m in matches) if visible else all(m < 0.01 for m in matches)


def test_fedit_reports_its_product_error_and_user_level_dp_counts_people(tiny_model_dir, tmp_path):
    config = tiny_config(
        tiny_model_dir,
        "federation.rounds=1",
        "lora.aggregation='fedit'",
        "privacy.unit='user'",
        "privacy.user_field='person_id'",
        "privacy.expected_batch_size=4",
        "evaluation.generations=0",
    )
    result = run(config, out=tmp_path / "fedit", progress=False, merge=True)
    row = result.metrics[1]
    assert (
        row.fedit_product_error is not None and 0 < row.fedit_product_error < 1
    )  # mean(B) mean(A) != mean(B_i A_i), but close
    ledger = json.loads(_ledger_file(result.out.with_name("fedit.sites") / "client-0000").read_text())
    people = 64 // 4 + 4  # four records per person, and a few canaries owned by existing people
    assert ledger["delta"] >= 0.1 / people  # N_i counts people, not records
    assert ledger["events"][0]["sample_rate"] > 4 / 64
    saved = load_file(str(result.adapter / "adapter_model.safetensors"))
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(result.out / "merged")
    assert sum(p.numel() for p in merged.parameters()) > 0 and any("lora_A" in k for k in saved)


@pytest.mark.parametrize("protocol", ["he-bfv", "he-ckks"])
def test_the_run_works_with_homomorphic_aggregation(tiny_model_dir, tmp_path, protocol):
    config = tiny_config(
        tiny_model_dir,
        "federation.rounds=1",
        f"secure_aggregation.protocol='{protocol}'",
        "secure_aggregation.corrupt_fraction=0",  # one key holder: HE only where no client colludes
        "evaluation.generations=0",
    )
    result = run(config, out=tmp_path / protocol, progress=False)
    row = result.metrics[1]
    assert row.included == [0, 1, 2] and row.aborted is None
    assert row.bytes.upload > 0 and row.protocol is not None and row.protocol.threshold == 3
    assert result.metrics[1].eval_loss != result.metrics[0].eval_loss  # the update was applied


def test_he_is_refused_before_anything_is_written_while_sites_assume_a_corrupt_client(tiny_model_dir, tmp_path):
    """Same rule as a Flower node's Mod: HE with one key holder only where no client can collude."""
    config = tiny_config(tiny_model_dir, "federation.rounds=1", "secure_aggregation.protocol='he-bfv'")
    with pytest.raises(ConfigError, match="corrupt_fraction"):
        run(config, out=tmp_path / "refused", progress=False)
    assert not (tmp_path / "refused").exists() or not any((tmp_path / "refused").iterdir())
    rng = np.random.default_rng(1)
    updates = [rng.normal(0, 0.03, 500).astype(np.float32) for _ in range(3)]
    with pytest.raises(InsecureParameterError, match="corrupt_fraction"):  # and each simulated site refuses it
        aggregate_updates(config, updates, [1.0] * 3, round_number=1, context=b"c", drop_at={})
    trusting = config.with_overrides(["secure_aggregation.corrupt_fraction=0"])  # control: n_C = 0 runs
    assert aggregate_updates(trusting, updates, [1.0] * 3, round_number=1, context=b"c", drop_at={}).mean is not None


def test_he_bfv_mean_is_within_the_quantization_bound():
    config = RunConfig().with_overrides(
        ["secure_aggregation.protocol='he-bfv'", "secure_aggregation.corrupt_fraction=0", "federation.clients=5"]
    )
    rng = np.random.default_rng(5)
    updates = [rng.normal(0, 0.03, 2000).astype(np.float32) for _ in range(5)]
    outcome = aggregate_updates(config, updates, [1.0] * 5, round_number=1, context=b"c", drop_at={})
    assert outcome.mean is not None and outcome.included == [0, 1, 2, 3, 4]
    exact = sum(np.clip(u.astype(np.float64), -0.1, 0.1) for u in updates) / 5
    assert np.abs(outcome.mean - exact).max() <= outcome.max_abs_error
    # the round above ran seeded uploads (c0 and a seed per chunk: tests/protocols/test_he_seeded.py)
    params = round_params(config, 5, 2000)
    assert isinstance(params, HEParams) and params.seeded
    public = round_params(config.with_overrides(["secure_aggregation.he_mode='public-key'"]), 5, 2000)
    assert isinstance(public, HEParams) and not public.seeded  # public-key ciphertexts have no seedable half
