from __future__ import annotations

import re

import pytest

from secure_fedllm import ConfigError
from secure_fedllm.config import RunConfig


def _custom() -> RunConfig:
    return RunConfig().with_overrides(
        [
            "federation.rounds=5",
            'lora.target_modules=["q_proj", "k_proj", "v_proj"]',
            "privacy.delta=1e-5",
            "data.system_prompt=You are careful.",
            "secure_aggregation.protocol=secagg",
        ]
    )


@pytest.mark.parametrize("suffix", [".toml", ".yaml"])
def test_config_round_trips_through_files(tmp_path, suffix):
    config = _custom()
    path = tmp_path / f"config{suffix}"
    config.to_file(path)
    assert RunConfig.from_file(path) == config
    assert config.federation.rounds == 5 and config.lora.target_modules == ("q_proj", "k_proj", "v_proj")
    assert config.data.system_prompt == "You are careful."


def test_defaults_validate_and_carry_kind_and_version(tmp_path):
    path = tmp_path / "c.toml"
    RunConfig().to_file(path)
    text = path.read_text()
    assert 'kind = "secure-fedllm.run"' in text and "schema_version = 1" in text
    assert RunConfig.from_file(path) == RunConfig()


def test_unknown_keys_are_errors_naming_the_key():
    with pytest.raises(ConfigError, match=r"privacy\.max_grad_nrom: unknown key"):
        RunConfig.from_dict({"privacy": {"max_grad_nrom": 1.0}})
    with pytest.raises(ConfigError, match="unknown section"):
        RunConfig().with_overrides(["privcy.delta=1e-5"])


@pytest.mark.parametrize(
    ("assignment", "field"),
    [
        ("federation.rounds=0", "federation.rounds"),
        ("privacy.target_epsilon=-1", "privacy.target_epsilon"),
        ("lora.aggregation=mean", "lora.aggregation"),
        ("federation.clients_per_round=9", "clients_per_round=9 exceeds clients=4"),
        ("privacy.unit=user", "privacy.user_field"),
        ("data.source=alpaca", "data.path"),
        ("secure_aggregation.corrupt_fraction=0.6", "secure_aggregation.corrupt_fraction"),
    ],
)
def test_bad_values_name_the_field(assignment, field):
    with pytest.raises(ConfigError, match=re.escape(field)):
        RunConfig().with_overrides([assignment])


def test_malformed_override_says_how_to_write_it():
    with pytest.raises(ConfigError, match=r"section\.field=value"):
        RunConfig().with_overrides(["rounds"])
