from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel

from secure_fedllm.adapters import attach_lora
from secure_fedllm.config import LoraConfig, ModelConfig
from secure_fedllm.data import ChatTemplate, TextRecord, TokenizedDataset
from secure_fedllm.models import load_base_model
from secure_fedllm.training import per_example_loss
from threat_models.attacks.membership import (
    SCORE_NAMES,
    MembershipConfig,
    MembershipInference,
    MembershipResult,
    _min_k,
)
from threat_models.errors import AttackConfigError

SMALL = MembershipConfig(allow_small=True, batch_size=64)


@dataclass
class Setting:
    model: PeftModel
    template: ChatTemplate
    members: list[TextRecord]
    nonmembers: list[TextRecord]
    untrained: MembershipResult
    trained: MembershipResult


def _records(count: int, seed: int) -> list[TextRecord]:
    """Short records with random answers: memorising them is the only way to lower their loss."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    return [
        TextRecord(f"Code {i}?", "", "".join(rng.choice(letters) for _ in range(12)), f"r{i}") for i in range(count)
    ]


def _overfit(model: PeftModel, template: ChatTemplate, records: list[TextRecord], steps: int) -> None:
    """Full-batch Adam on the adapter: no DP, no clipping, many epochs: the worst case a defense must handle."""
    dataset = TokenizedDataset.build(records, template)
    batch = dataset.batch_of_rows(range(len(dataset.examples)))
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    model.train()
    for _ in range(steps):
        loss = per_example_loss(model, batch).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


@pytest.fixture(scope="module")
def setting(tiny_model_dir: Path) -> Setting:
    base, tokenizer = load_base_model(ModelConfig(name=str(tiny_model_dir)))
    # lm_head is adapted too: the random tiny model's frozen head cannot move its logits far from uniform.
    lora = LoraConfig(r=16, alpha=32, target_modules=("q_proj", "v_proj", "lm_head"), aggregation="fedit")
    model = attach_lora(base, lora, a0_seed=0)
    template = ChatTemplate(tokenizer, system_prompt="", max_length=64)
    records = _records(128, seed=0)
    members, nonmembers = records[:64], records[64:]
    attack = MembershipInference(SMALL)
    untrained = attack.run(model, template, members, nonmembers)
    _overfit(model, template, members, steps=80)
    trained = attack.run(model, template, members, nonmembers)
    return Setting(model, template, members, nonmembers, untrained, trained)


def test_untrained_adapter_is_at_chance(setting: Setting) -> None:
    loss = setting.untrained.reports["loss"].auc
    assert abs(loss.value - 0.5) < 0.15
    assert loss.ci_low < 0.5 < loss.ci_high
    # B = 0: the adapted model *is* the base, so the reference score is 0 for every record
    assert set(setting.untrained.reports["reference"].member_scores) == {0.0}
    assert setting.untrained.reports["reference"].auc.value == 0.5


def test_overfit_adapter_is_detected(setting: Setting) -> None:
    reports = setting.trained.reports
    assert set(reports) == set(SCORE_NAMES)
    assert reports["loss"].auc.value > 0.8
    assert reports["loss"].auc.ci_low > 0.5
    assert reports["reference"].auc.value > 0.8
    assert reports["loss"].tpr_at_fpr.tpr > reports["loss"].tpr_at_fpr.target_fpr
    for report in reports.values():
        assert report.tpr_at_low_fpr is None  # 64 non-members cannot resolve 0.1% FPR
        assert len(report.member_scores) == 64 and len(report.nonmember_scores) == 64
        assert report.roc_fpr[0] == 0.0 and report.roc_tpr[-1] == 1.0


def test_loss_score_is_minus_the_training_loss(setting: Setting) -> None:
    dataset = TokenizedDataset.build(setting.members[:8], setting.template)
    with torch.no_grad():
        expected = -per_example_loss(setting.model, dataset.batch_of_rows(range(8)))
    got = torch.tensor(setting.trained.reports["loss"].member_scores[:8], dtype=torch.float32)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_rows_name_attack_metric_and_chance(setting: Setting) -> None:
    rows = setting.trained.rows()
    assert {(r.attack, r.metric) for r in rows} == {
        (f"membership_{name}", metric) for name in SCORE_NAMES for metric in ("auc", "tpr@1%fpr")
    }
    by_key = {(r.attack, r.metric): r for r in rows}
    auc_row = by_key[("membership_loss", "auc")]
    assert auc_row.chance == 0.5 and auc_row.ci_low is not None and auc_row.ci_low <= auc_row.value
    assert by_key[("membership_loss", "tpr@1%fpr")].chance == 0.01


def test_explicit_reference_model_equals_the_disabled_adapter(setting: Setting, tiny_model_dir: Path) -> None:
    reference, _ = load_base_model(ModelConfig(name=str(tiny_model_dir)))
    config = MembershipConfig(scores=("reference",), allow_small=True)
    members, nonmembers = setting.members[:16], setting.nonmembers[:16]
    explicit = MembershipInference(config).run(
        setting.model, setting.template, members, nonmembers, reference_model=reference
    )
    implicit = MembershipInference(config).run(setting.model, setting.template, members, nonmembers)
    assert explicit.reports["reference"].member_scores == pytest.approx(implicit.reports["reference"].member_scores)


def test_reference_stats_computed_once_equal_the_per_run_reference(setting: Setting) -> None:
    """An evaluation of several adapters of one base scores the base once; the scores must not change."""
    config = MembershipConfig(scores=("reference", "loss"), allow_small=True)
    members, nonmembers = setting.members[:16], setting.nonmembers[:16]
    attack = MembershipInference(config)
    with setting.model.disable_adapter():
        stats = attack.record_stats(setting.model, setting.template, [*members, *nonmembers])
    cached = attack.run(setting.model, setting.template, members, nonmembers, reference_stats=stats)
    fresh = attack.run(setting.model, setting.template, members, nonmembers)
    assert cached.reports["reference"].member_scores == pytest.approx(fresh.reports["reference"].member_scores)
    assert max(map(abs, cached.reports["reference"].member_scores)) > 0  # the adapter moved: not a vacuous match
    # the control: statistics of the adapted model itself in place of the base make every reference score 0
    own = attack.record_stats(setting.model, setting.template, [*members, *nonmembers])
    wrong = attack.run(setting.model, setting.template, members, nonmembers, reference_stats=own)
    assert set(wrong.reports["reference"].member_scores) == {0.0}
    with pytest.raises(AttackConfigError, match="reference_stats cover 32 records, not the 30"):
        attack.run(setting.model, setting.template, members[:15], nonmembers[:15], reference_stats=stats)


def test_refusals(setting: Setting, tiny_model_dir: Path) -> None:
    attack = MembershipInference()
    with pytest.raises(AttackConfigError, match="at least 1000"):
        attack.run(setting.model, setting.template, setting.members, setting.nonmembers)
    plain, _ = load_base_model(ModelConfig(name=str(tiny_model_dir)))
    with pytest.raises(AttackConfigError, match="reference_model"):
        MembershipInference(SMALL).run(plain, setting.template, setting.members, setting.nonmembers)
    too_long = [TextRecord("x" * 200, "", "answer", "u")]
    with pytest.raises(AttackConfigError, match="max_length"):
        MembershipInference(SMALL).run(setting.model, setting.template, too_long, setting.nonmembers)


def test_low_fpr_point_is_reported_with_enough_nonmembers() -> None:
    rng = np.random.default_rng(0)
    report = MembershipInference(MembershipConfig())._report("loss", rng.normal(2, 1, 1000), rng.normal(0, 1, 5000))
    assert report.tpr_at_low_fpr is not None and report.tpr_at_low_fpr.false_positives <= 5
    result = MembershipResult(members=1000, nonmembers=5000, reports={"loss": report})
    metrics = {r.metric: r for r in result.rows()}
    assert set(metrics) == {"auc", "tpr@1%fpr", "tpr@0.1%fpr"}
    assert metrics["tpr@0.1%fpr"].chance == 0.001
    assert metrics["tpr@0.1%fpr"].value <= metrics["tpr@1%fpr"].value
    assert MembershipResult.model_validate_json(result.model_dump_json()) == result


def test_min_k_takes_the_least_likely_tokens() -> None:
    logp = torch.tensor([[-1.0, -5.0, -2.0, -9.0, 0.0], [-3.0, -1.0, -4.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True, True, False], [True, True, True, False, False]])
    assert _min_k(logp, mask, 0.5).tolist() == pytest.approx([-7.0, -4.0])  # 2 of 4 tokens; max(1, 1) of 3
    assert _min_k(logp, mask, 1.0).tolist() == pytest.approx([-17 / 4, -8 / 3])
