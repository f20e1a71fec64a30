from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from pydantic import ValidationError

from secure_fedllm.adapters import attach_lora
from secure_fedllm.config import LoraConfig, ModelConfig
from secure_fedllm.data import ChatTemplate, TextRecord, TokenizedDataset, synthesize_federation
from secure_fedllm.models import load_base_model
from secure_fedllm.training import per_example_loss
from threat_models.attacks.canary_exposure import (
    MIN_REFERENCES,
    CanaryExposure,
    CanaryExposureConfig,
    CanaryProbe,
    ExposureResult,
    _log_perplexities,
    canary_privacy_bound,
    canary_probes,
    expected_random_exposure,
    exposure_from_rank,
    rank_among_references,
)
from threat_models.errors import AttackConfigError

# ------------------------------------------------------------------------------------------------ the formula


def test_exposure_from_hand_built_ranks() -> None:
    assert exposure_from_rank(1, 10_001) == pytest.approx(math.log2(10_001))  # most likely: maximal exposure
    assert exposure_from_rank(10_001, 10_001) == 0.0  # least likely
    assert exposure_from_rank(16, 1024) == pytest.approx(6.0)
    assert exposure_from_rank(1, 10**6) == pytest.approx(6 * math.log2(10))  # the paper's 19.93-bit maximum
    with pytest.raises(AttackConfigError):
        exposure_from_rank(0, 10)


def test_rank_counts_references_at_least_as_likely_ties_against_the_canary() -> None:
    references = [5.0, 7.0, 9.0, 9.0, 12.0]
    assert rank_among_references(1.0, references) == 1
    assert rank_among_references(8.0, references) == 3
    assert rank_among_references(9.0, references) == 5  # both ties rank ahead of it
    assert rank_among_references(20.0, references) == 6


def test_expected_random_exposure_is_the_mean_over_uniform_ranks() -> None:
    n = 1000
    brute = sum(exposure_from_rank(k, n) for k in range(1, n + 1)) / n
    assert expected_random_exposure(n) == pytest.approx(brute, rel=1e-12)
    assert expected_random_exposure(1) == 0.0
    stirling = (1 - math.log(2 * math.pi * 10_001) / 20_002) / math.log(2)  # 1.4419
    assert expected_random_exposure(10_001) == pytest.approx(stirling, abs=1e-6)
    assert expected_random_exposure(10**9) == pytest.approx(1 / math.log(2), abs=1e-7)  # Stirling: 1.4427 bits


def test_group_privacy_bound_for_repeated_canaries() -> None:
    assert canary_privacy_bound(1.0, 1e-6, 1) == (1.0, 1e-6)
    eps, delta = canary_privacy_bound(1.0, 1e-6, 4)
    assert eps == 4.0 and delta == pytest.approx(4 * math.exp(3) * 1e-6)
    assert canary_privacy_bound(1.0, 1e-6, 16, unit="user") == (1.0, 1e-6)  # one person holds every repeat
    assert canary_privacy_bound(8.0, 1e-5, 16)[1] == 1.0  # delta saturates: no guarantee left
    with pytest.raises(AttackConfigError):
        canary_privacy_bound(1.0, 1e-6, 0)


# ------------------------------------------------------------------------------------------ probes and config


def test_probes_come_from_the_synthetic_manifest_and_records() -> None:
    federation = synthesize_federation(2, 40, seed=5, canary_repeats=(1, 4))
    records = [r for client in federation.clients for r in client]
    probes = canary_probes(federation.canaries, records)
    assert [p.canary_id for p in probes] == [c.canary_id for c in federation.canaries]
    for probe in probes:
        assert probe.instruction.startswith("What did ") and probe.instruction.endswith(" write in the note?")
    # manifest dicts (what a run writes) work the same way
    assert canary_probes(federation.manifest(), records) == probes
    with pytest.raises(AttackConfigError, match="no record"):
        canary_probes(federation.canaries, records[:0])


def test_config_refuses_too_few_references() -> None:
    with pytest.raises(ValidationError, match=str(MIN_REFERENCES)):
        CanaryExposureConfig(references_per_format=999)
    assert CanaryExposureConfig(references_per_format=999, allow_small=True).references_per_format == 999


def test_probe_must_fit_its_format(tiny_model_dir: Path) -> None:
    _, tokenizer = load_base_model(ModelConfig(name=str(tiny_model_dir)))
    template = ChatTemplate(tokenizer, system_prompt="", max_length=128)
    bad = CanaryProbe(
        canary_id="x",
        format_name="card-pin",
        prefix="The PIN of my card is ",
        secret="12345",
        repeats=1,
        instruction="?",
    )
    with pytest.raises(AttackConfigError, match="4 digits"):
        CanaryExposure().run(torch.nn.Identity(), template, [bad])
    canary = synthesize_federation(1, 40, seed=5, canary_repeats=(1,)).canaries[0]
    with pytest.raises(AttackConfigError, match="canary_probes"):
        CanaryExposure().run(torch.nn.Identity(), template, [canary])  # type: ignore[list-item]


# --------------------------------------------------------------------------------------------------- the attack


@dataclass
class Setting:
    model: PeftModel
    template: ChatTemplate
    seen: CanaryProbe
    unseen: list[CanaryProbe]
    result: ExposureResult


@pytest.fixture(scope="module")
def setting(tiny_model_dir: Path) -> Setting:
    base, tokenizer = load_base_model(ModelConfig(name=str(tiny_model_dir)))
    lora = LoraConfig(r=16, alpha=32, target_modules=("q_proj", "v_proj", "lm_head"), aggregation="fedit")
    model = attach_lora(base, lora, a0_seed=0)
    template = ChatTemplate(tokenizer, system_prompt="", max_length=128)
    # client 0 holds an access-code canary, client 1 a card-pin canary, each planted 8 times
    federation = synthesize_federation(2, 16, seed=7, canary_repeats=(8,))
    probes = {p.format_name: p for p in canary_probes(federation.canaries, [r for c in federation.clients for r in c])}
    seen = probes["access-code"]
    # controls never trained on: the other client's canary, and a fresh secret in the memorised format
    unseen = [
        probes["card-pin"].model_copy(update={"repeats": 0}),
        seen.model_copy(
            update={"canary_id": "control", "secret": "530746", "repeats": 0, "instruction": "What did Vera write?"}
        ),
    ]
    rng = random.Random(0)
    filler = [
        TextRecord(f"Code {i}?", "", "".join(rng.choice("abcdefghij") for _ in range(8)), f"f{i}") for i in range(8)
    ]
    planted = [TextRecord(seen.instruction, "", seen.prefix + seen.secret, "owner")] * seen.repeats
    dataset = TokenizedDataset.build(planted + filler, template)
    batch = dataset.batch_of_rows(range(len(dataset.examples)))
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    model.train()
    for _ in range(60):
        loss = per_example_loss(model, batch).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    result = CanaryExposure(CanaryExposureConfig(batch_size=512)).run(model, template, [seen, *unseen])
    return Setting(model, template, seen, unseen, result)


def test_memorised_canary_is_exposed_and_unseen_one_is_not(setting: Setting) -> None:
    seen, pin, control = setting.result.canaries
    assert seen.canary_id == setting.seen.canary_id
    assert seen.candidates == MIN_REFERENCES + 1 and not seen.exhaustive
    assert seen.rank <= 4 and seen.exposure > 11.0  # of a 13.29-bit maximum
    assert seen.extrapolated_exposure is not None and seen.extrapolated_exposure > 10.0
    # the 4-digit space is smaller than 10,000 references: it is enumerated and the exposure is exact
    assert pin.exhaustive and pin.candidates == 10**4
    assert pin.exposure < 5.0
    assert control.exposure < 5.0 and control.rank > 100
    assert setting.result.references == {"access-code": MIN_REFERENCES, "card-pin": 10**4 - 1}


def _full_forward_bits(setting: Setting, instruction: str, prefix: str, secret: str) -> float:
    """-log2 Pr(secret | prompt + prefix) from one uncached forward pass of the whole sequence."""
    tokenize = setting.template.tokenizer
    prompt = setting.template.prompt_ids(instruction)
    context = prompt + tokenize(prefix, add_special_tokens=False)["input_ids"]
    digits = tokenize(secret, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = setting.model(input_ids=torch.tensor([context + digits])).logits[0].float()
    logp = torch.log_softmax(logits, dim=-1)
    nats = -sum(logp[len(context) - 1 + j, token].item() for j, token in enumerate(digits))
    return nats / math.log(2)


def test_cached_batched_scoring_matches_a_full_forward_pass(setting: Setting) -> None:
    probe = setting.seen
    expected = _full_forward_bits(setting, probe.instruction, probe.prefix, probe.secret)
    assert setting.result.canaries[0].log_perplexity_bits == pytest.approx(expected, abs=1e-3)
    # every row of a batch, and a short last batch, not just the canary in row 0
    secrets = ["000000", "999999", "123456", "654321", probe.secret]
    encoded = [setting.template.tokenizer(probe.prefix + s, add_special_tokens=False)["input_ids"] for s in secrets]
    with torch.inference_mode():
        bits = _log_perplexities(setting.model, setting.template.prompt_ids(probe.instruction), encoded, 2)
    for secret, got in zip(secrets, bits, strict=True):
        assert got == pytest.approx(_full_forward_bits(setting, probe.instruction, probe.prefix, secret), abs=1e-3)


def test_rows_per_repeat_count_with_chance(setting: Setting) -> None:
    rows = {r.metric: r for r in setting.result.rows()}
    assert set(rows) == {"exposure_bits_x0", "exposure_bits_x8"}
    assert all(r.attack == "canary_exposure" for r in rows.values())
    seen, pin, control = setting.result.canaries
    assert rows["exposure_bits_x8"].value == seen.exposure
    assert rows["exposure_bits_x0"].value == pytest.approx((pin.exposure + control.exposure) / 2)
    assert rows["exposure_bits_x8"].chance == pytest.approx(expected_random_exposure(10_001))
    for row in rows.values():
        assert row.chance == pytest.approx(1.442, abs=1e-3) and row.ci_low is None
