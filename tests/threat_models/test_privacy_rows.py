"""The privacy rows: DP rows that train exactly like the control, and what the report gets from them.

Whether the control memorises is a property of the model and the budget: it is measured on SmolLM2
by `secure-fedllm evaluate` (benchmarks/results/evaluate_smollm2), and `_memorised` turns the
issue's criteria into the flag the report prints. Here a tiny random LLaMA checks the plumbing.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from secure_fedllm import RunConfig
from threat_models.privacy_rows import DEFENSES, PrivacyPlan, _memorised, bound_lines, privacy_rows


@pytest.fixture(scope="module")
def rows(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    plan = PrivacyPlan(
        records_per_client=60, rounds=1, local_steps=2, max_length=192, members=100, heldout_records=16,
    )  # fmt: skip
    chosen = [d for d in DEFENSES if d.label in ("none", "dp-eps1")]
    return plan, privacy_rows(str(tiny_model_dir), plan, tmp_path_factory.mktemp("privacy-rows"), defenses=chosen)


def _value(result, attack: str, metric: str, defense: str) -> float:  # type: ignore[no-untyped-def]
    found = [r.value for r in result.rows if (r.attack, r.metric, r.defense) == (attack, metric, defense)]
    assert len(found) == 1, (attack, metric, defense)
    return found[0]


def test_the_control_counts_as_memorised_by_either_criterion() -> None:
    """x16 exposure of 10 bits against 10,000 references, or loss AUC 0.70: either suffices, neither alone fails."""

    def result(x16_bits: float, auc: float):  # type: ignore[no-untyped-def]
        canary = SimpleNamespace(repeats=16, exposure=x16_bits)
        low = SimpleNamespace(repeats=1, exposure=13.3)  # a x1 canary's exposure does not count
        mia = SimpleNamespace(reports={"loss": SimpleNamespace(auc=SimpleNamespace(value=auc))})
        return mia, SimpleNamespace(canaries=[low, canary])

    assert _memorised(*result(10.0, 0.5))
    assert _memorised(*result(2.0, 0.70))
    assert not _memorised(*result(9.9, 0.69))


def test_every_row_reports_utility_exposure_and_the_dp_rows_their_accounting(rows) -> None:  # type: ignore[no-untyped-def]
    plan, result = rows
    for label in ("none", "dp-eps1"):
        assert _value(result, "utility", "heldout_perplexity", label) == result.utility[label]
        assert {r.metric for r in result.rows if r.attack == "canary_exposure" and r.defense == label} == {
            "exposure_bits_x1",
            "exposure_bits_x4",
            "exposure_bits_x16",
        }
    assert set(result.events) == {"dp-eps1"}  # the control has no DP history to draw a bound from
    events = result.events["dp-eps1"]
    assert sum(e.steps for e in events) == plan.rounds * plan.local_steps
    epsilon, delta = result.epsilon["dp-eps1"]
    assert 0 < epsilon <= 1.0 + 1e-9
    assert delta == pytest.approx(0.1 / plan.records_per_client)
    assert len(result.samples[0]) == len(result.samples[1]) == plan.members
    assert "16" in bound_lines(result)[0]  # a record-level row says the x16 canary is covered only at 16 eps


def test_every_defense_differs_from_the_control_only_in_privacy_settings() -> None:
    """The comparison is not confounded: rank, targets, adapter mode, steps and learning rate are shared."""
    plan = PrivacyPlan()
    control = RunConfig().with_overrides([*plan.overrides("embedded"), *DEFENSES[0].settings])
    for defense in DEFENSES[1:]:
        config = RunConfig().with_overrides([*plan.overrides("embedded"), *defense.settings])
        assert config.lora == control.lora
        assert config.training == control.training
        assert config.federation == control.federation
        assert config.data == control.data
        assert all(s.startswith("privacy.") for s in defense.settings)
