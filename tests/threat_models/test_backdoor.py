"""Backdoor by model replacement: the boosted update fits the encoders' clip range and implants through SecAgg+."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

torch.set_num_threads(1)  # tiny model, single-example work: threads cost more than they give

from secure_fedllm.data import ChatTemplate  # noqa: E402
from threat_models.adversaries import MaliciousClient  # noqa: E402
from threat_models.attacks._backdoor_task import BackdoorTask  # noqa: E402
from threat_models.attacks.backdoor import NORM_CLIP, Backdoor, BackdoorConfig  # noqa: E402
from threat_models.errors import AttackConfigError  # noqa: E402


@pytest.fixture(scope="module")
def result(tiny_model_dir):
    return Backdoor(BackdoorConfig.quick()).run(tiny_model_dir)


def test_boosted_update_inside_the_clip_range_implants_the_backdoor_through_secure_aggregation(result):
    none, boosted = result.outcome("no-attack"), result.outcome("boosted")
    assert boosted.defense == "secagg+" and none.defense == "secagg+"
    assert none.asr == 0.0 and none.asr_ci_high < 0.15
    assert boosted.asr >= 0.5 and boosted.asr_ci_low > none.asr_ci_high
    # the encoder's bound leaves it unchanged: every coordinate is inside [-c, c]
    assert boosted.clipped_coordinates == 0 and boosted.malicious_max_abs <= result.clip_range * 1.000001
    assert boosted.malicious_l2 > 1.5 * max(result.honest_l2)
    # and the sum the server sees is no larger than without the attack
    assert boosted.aggregate_l2 < 1.2 * none.aggregate_l2


def test_the_same_update_unboosted_is_averaged_away_and_server_norm_clipping_removes_it(result):
    assert result.outcome("unboosted").asr <= 0.1
    clipped = result.outcome("boosted", NORM_CLIP)
    assert clipped.asr <= 0.1 and clipped.malicious_l2 <= max(result.honest_l2) * 1.000001


def test_rows_name_attack_defense_and_the_no_attack_baseline(result):
    rows = result.rows()
    keys = {(r.attack, r.defense, r.metric) for r in rows}
    for attack, defense in (("backdoor", "secagg+"), ("backdoor_unboosted", "secagg+"), ("backdoor", NORM_CLIP)):
        assert {(attack, defense, m) for m in ("asr", "false_trigger_rate", "clean_loss")} <= keys
    asr = next(r for r in rows if r.attack == "backdoor" and r.defense == "secagg+" and r.metric == "asr")
    assert asr.chance == 0.0 and asr.ci_low is not None and asr.ci_low <= asr.value <= asr.ci_high
    assert "zero-knowledge" in result.server_defense and "individual updates" in result.server_defense


@pytest.mark.parametrize(
    "bad",
    [
        {"adversary": MaliciousClient(trigger=" ")},
        {"adversary": MaliciousClient(target_response="")},
        {"records_per_client": 8, "poison_fraction": 0.01},
        {"num_clients": 2},
        {"clip_range": 0.0},
        {"protocol": "he-bfv"},
        {"unknown": 1},
    ],
)
def test_invalid_configs_are_refused(bad):
    with pytest.raises(ValidationError):
        BackdoorConfig(**bad)


def test_config_is_frozen_and_quick_takes_overrides():
    config = BackdoorConfig.quick(seed=3)
    assert config.seed == 3 and config.attack_steps < BackdoorConfig().attack_steps
    with pytest.raises(ValidationError):
        config.seed = 4  # type: ignore[misc]


def test_records_that_do_not_fit_max_length_are_a_config_error(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    with pytest.raises(AttackConfigError, match="max_length"):
        BackdoorTask(BackdoorConfig.quick(max_length=32), ChatTemplate(tokenizer, system_prompt="", max_length=32))
