"""One-run DP audit of real DP-SGD LoRA training: both controls succeed, the correct noise stays below the accountant.

The fast tests shrink the federation where the property does not depend on it: the clip-only
control has no noise, so the other client may be small (the auditor's replay removes its records'
step); the noise rows run with one client (the released sum is then client 0's own delta, as
with a second client much larger than client 0). The slow test runs the evaluation's four
settings as `training_audit_rows` does.
"""

from __future__ import annotations

import math

import pytest

from secure_fedllm.config import LoraConfig
from secure_fedllm.training import LocalTrainer
from threat_models.attacks import (
    DPAuditConfig,
    TrainingAudit,
    TrainingAuditConfig,
    audit_training,
    standard_settings,
    training_audit_rows,
)
from threat_models.errors import AttackConfigError

# the clip-only control on a small second client: 8 + 11 records, 1,000 canaries, one round
SMALL = {"records": 8, "other_client_size": 0.02, "rounds": 1}


def _clip_only(**changes) -> TrainingAuditConfig:
    return TrainingAuditConfig(audit=DPAuditConfig(num_canaries=1000, delta=1e-6, seed=0), **{**SMALL, **changes})


def test_clip_only_control_reaches_3_and_gives_nothing_when_the_canaries_are_not_inserted(tiny_model_dir, monkeypatch):
    result = TrainingAudit(_clip_only()).run(tiny_model_dir)
    assert result.empirical_epsilon >= 3.0
    assert math.isinf(result.accountant_epsilon) and result.noise_multiplier == 0.0
    assert result.audit.source == "training" and result.num_canaries == 1000
    assert 0.4 < result.num_inserted / 1000 < 0.6
    # client 0's N counts its inserted canaries (q = 1: E = records + inserted)
    assert result.expected_batch_sizes[0] == result.records[0] + result.num_inserted

    # weakened: a trainer that silently drops the canaries leaves the auditor at chance
    step = LocalTrainer.step

    def dropping(self, optimizer, batch, *, extra_unit_gradients=None):
        step(self, optimizer, batch)

    monkeypatch.setattr(LocalTrainer, "step", dropping)
    assert TrainingAudit(_clip_only()).run(tiny_model_dir).empirical_epsilon < 0.5


def test_without_the_auditors_replay_the_records_bury_the_canaries(tiny_model_dir):
    # Each canary's step is lr C / E_0 (E_0 ~ 500); the records' mean gradient is not divided so
    buried = TrainingAudit(_clip_only(subtract_data=False)).run(tiny_model_dir)
    assert buried.empirical_epsilon < 2.0


def test_under_noised_control_exceeds_epsilon_1_and_the_correct_noise_stays_below(tiny_model_dir):
    settings = standard_settings(0, clients=1, records=16)[2:]  # epsilon 1: correct noise, then sigma/4
    correct, control = audit_training(tiny_model_dir, settings)
    assert correct.label == "dp-eps1" and control.label == "dp-eps1 noise at sigma/4 (control)"
    assert correct.accountant_epsilon == pytest.approx(1.0, abs=1e-3)  # declared at the audit's delta
    assert control.accountant_epsilon == correct.accountant_epsilon  # the accountant sees the declared sigma
    assert control.actual_noise_epsilon > 3 * control.accountant_epsilon
    assert control.empirical_epsilon > control.accountant_epsilon  # the audit catches the under-noised run
    assert not control.consistent
    assert correct.empirical_epsilon < correct.accountant_epsilon and correct.consistent


@pytest.mark.slow
def test_the_evaluations_four_settings_on_two_clients(tiny_model_dir):
    results = audit_training(tiny_model_dir, standard_settings(0))
    by_label = {r.label: r for r in results}
    assert list(by_label) == ["none", "dp-eps8", "dp-eps1", "dp-eps1 noise at sigma/4 (control)"]
    assert by_label["none"].empirical_epsilon >= 3.0
    assert by_label["dp-eps1 noise at sigma/4 (control)"].empirical_epsilon > 1.0
    for label in ("dp-eps8", "dp-eps1"):
        assert by_label[label].consistent, label
    first = results[0]
    assert first.clients == 2 and first.num_canaries == 2000 and first.delta == 1e-6
    assert 1.9 < first.records[1] / first.expected_batch_sizes[0] < 2.1  # the other client: twice client 0's N


def test_rows_carry_the_defense_labels_and_the_training_source(tiny_model_dir):
    rows = training_audit_rows(tiny_model_dir, seed=0, **SMALL, audit={"num_canaries": 1000})
    labels = list(dict.fromkeys(r.defense for r in rows))
    assert labels == ["none", "dp-eps8", "dp-eps1", "dp-eps1 noise at sigma/4 (control)"]
    assert {r.attack for r in rows} == {"dp_audit"}
    metrics = {r.metric for r in rows if r.defense == "dp-eps8"}
    assert metrics == {"empirical_epsilon", "accountant_epsilon", "guess_accuracy", "actual_noise_epsilon"}
    eps8 = next(r for r in rows if r.defense == "dp-eps8" and r.metric == "accountant_epsilon")
    assert eps8.value == pytest.approx(8.0, abs=1e-2)


def test_invalid_settings_are_refused_naming_the_field():
    with pytest.raises(AttackConfigError, match=r"audit.delta \* audit.num_canaries"):
        TrainingAuditConfig(audit=DPAuditConfig(num_canaries=1000, delta=1e-3))
    with pytest.raises(AttackConfigError, match=r"lora\.aggregation"):
        TrainingAuditConfig(lora=LoraConfig(aggregation="fedit"))
    with pytest.raises(AttackConfigError, match="noise_scale needs a target_epsilon"):
        TrainingAuditConfig(noise_scale=0.25)
    with pytest.raises(AttackConfigError, match="sample_rate"):
        TrainingAuditConfig(sample_rate=0.0)
    with pytest.raises(AttackConfigError, match="differ only in target_epsilon"):
        audit_training("unused", [TrainingAuditConfig(), TrainingAuditConfig(rounds=3)])
    assert TrainingAuditConfig(target_epsilon=1.0, noise_scale=0.5).label == "dp-eps1 noise at sigma/2 (control)"


def test_more_canaries_than_lora_b_coordinates_are_refused(tiny_model_dir):
    config = TrainingAuditConfig(audit=DPAuditConfig(num_canaries=5000, delta=1e-6), **SMALL)
    with pytest.raises(AttackConfigError, match="exceeds the 3072 lora_B coordinates"):
        TrainingAudit(config).run(tiny_model_dir)
