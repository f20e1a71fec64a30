"""Finding 6 (issue 12): every plan field finite and in range before any accountant or trainer sees it.

NaN noise passed `ClientPolicy.check` (NaN compares false with every floor) and hung the RDP
accountant; a negative clip norm wedged the shared trainer. Now the plan is refused when it is
parsed (pydantic constraints) and again by `ClientPolicy.check` (for plans built without
validation), with a `PlanRefusedError` naming the field; the trainer is left clean after any error.
The weakened control is the pre-issue check (floors only), which lets every one of these through.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_runner import tiny_config

from secure_fedllm.federation import Assignment, ClientPolicy, PlanRefusedError, RoundPlan
from secure_fedllm.training import StepSettings

NAN, INF = math.nan, math.inf

POLICY = ClientPolicy(client=0, private=True, num_units=64, noise_multiplier=0.8, max_grad_norm=1.0, sample_rate=0.125,
                      steps=3, max_participations=2, epsilon_budget=8.0, delta=1e-3)  # fmt: skip
GOOD = Assignment(client=0, noise_multiplier=0.8, max_grad_norm=1.0, sample_rate=0.125, steps=3, weight=1.0)
BAD = [
    ("noise_multiplier", NAN),
    ("noise_multiplier", -1.0),
    ("noise_multiplier", INF),
    ("max_grad_norm", NAN),
    ("max_grad_norm", -1.0),
    ("max_grad_norm", 0.0),
    ("max_grad_norm", INF),
    ("sample_rate", NAN),
    ("sample_rate", 0.0),
    ("sample_rate", -0.1),
    ("sample_rate", 1.5),
    ("sample_rate", INF),
    ("steps", 0),
    ("steps", -3),
    ("weight", NAN),
    ("weight", 0.0),
    ("weight", -1.0),
    ("weight", INF),
]


def _old_check(policy: ClientPolicy, a: Assignment) -> None:
    """The check before issue 12: floors only, written so that NaN and out-of-range values pass."""
    rules = (
        ("noise_multiplier", a.noise_multiplier < policy.noise_multiplier),
        ("max_grad_norm", a.max_grad_norm > policy.max_grad_norm),
        ("sample_rate", a.sample_rate > policy.sample_rate),
        ("steps", a.steps > policy.steps),
    )
    for name, broken in rules:
        if broken:
            raise PlanRefusedError(name)


def _plan(**change: object) -> RoundPlan:
    fields = {"round": 1, "base_sha256": "b", "a0_sha256": "a", "adapter_config_sha256": "c", "manifest_sha256": "m",
              "aggregation": "ffa", "protocol": "secagg+", "clip_range": 0.1,
              "participants": tuple(GOOD.model_copy(update={"client": i}) for i in range(3))}  # fmt: skip
    return RoundPlan(**{**fields, **change})  # type: ignore[arg-type]


@pytest.mark.parametrize(("field", "value"), BAD)
def test_policy_check_refuses_non_finite_and_out_of_range_values(field: str, value: float) -> None:
    bad = GOOD.model_copy(update={field: value})  # model_copy skips validation, as a hand-built plan would
    with pytest.raises(PlanRefusedError, match=field):
        POLICY.check(bad)


CAUGHT_BY_THE_OLD_FLOORS = [("noise_multiplier", -1.0), ("noise_multiplier", INF), ("max_grad_norm", INF),
                            ("sample_rate", 1.5), ("sample_rate", INF)]  # fmt: skip
PASSED_THE_OLD_CHECK = [b for b in BAD if b not in CAUGHT_BY_THE_OLD_FLOORS]


@pytest.mark.parametrize(("field", "value"), PASSED_THE_OLD_CHECK)
def test_control_the_old_check_lets_nan_and_out_of_range_values_through(field: str, value: float) -> None:
    _old_check(POLICY, GOOD.model_copy(update={field: value}))  # passes: straight to the accountant and trainer
    with pytest.raises(PlanRefusedError, match=field):
        POLICY.check(GOOD.model_copy(update={field: value}))


@pytest.mark.parametrize(("field", "value"), BAD)
def test_parsing_a_plan_refuses_the_field_by_name(field: str, value: float) -> None:
    raw = _plan().model_dump(mode="python")
    raw["participants"][1][field] = value
    with pytest.raises(PlanRefusedError, match=rf"participants\.1\.{field}"):
        RoundPlan.parse(_dump(raw))
    with pytest.raises(PlanRefusedError, match=field):  # and a plan built without validation
        _plan().model_copy(update={"participants": (GOOD, GOOD.model_copy(update={field: value}))}).validated()


@pytest.mark.parametrize("value", [NAN, -0.1, 0.0, INF])
def test_a_plan_with_a_bad_clip_range_is_refused(value: float) -> None:
    raw = _plan().model_dump(mode="python")
    raw["clip_range"] = value
    with pytest.raises(PlanRefusedError, match="clip_range"):
        RoundPlan.parse(_dump(raw))
    with pytest.raises(PlanRefusedError, match="clip_range"):
        _plan().model_copy(update={"clip_range": value}).validated()


def test_a_plan_without_participants_or_a_negative_round_is_refused() -> None:
    for change in ({"participants": []}, {"round": -1}):
        raw = {**_plan().model_dump(mode="python"), **change}
        with pytest.raises(PlanRefusedError):
            RoundPlan.parse(_dump(raw))


def test_policies_themselves_are_validated() -> None:
    from pydantic import ValidationError

    for field, value in (("noise_multiplier", NAN), ("max_grad_norm", -1.0), ("sample_rate", 0.0), ("steps", 0)):
        with pytest.raises(ValidationError, match=field):
            ClientPolicy(**{**POLICY.model_dump(), field: value})


@pytest.mark.parametrize(("field", "value"), [("noise_multiplier", NAN), ("max_grad_norm", -1.0),
                                              ("sample_rate", 0.0), ("steps", 0), ("learning_rate", INF)])  # fmt: skip
def test_step_settings_refuse_what_no_trainer_should_see(field: str, value: float) -> None:
    settings = {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "sample_rate": 0.5, "expected_batch_size": 4.0,
                "steps": 1, "learning_rate": 0.1, "optimizer": "sgd", field: value}  # fmt: skip
    with pytest.raises(ValueError, match=field):
        StepSettings(**settings)  # type: ignore[arg-type]


def _dump(raw: dict[str, object]) -> str:
    import json

    return json.dumps(raw, allow_nan=True)  # what a malicious server may send: NaN and Infinity literals


# -- the shared trainer after an exception -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def trainer_setting(tiny_model_dir):
    from secure_fedllm.adapters import AdapterManifest, attach_lora, get_vector
    from secure_fedllm.data import ChatTemplate, TokenizedDataset, load_federation_data
    from secure_fedllm.models import load_base_model
    from secure_fedllm.training import LocalTrainer

    config = tiny_config(tiny_model_dir)
    base, tokenizer = load_base_model(config.model)
    model = attach_lora(base, config.lora, a0_seed=1)
    manifest = AdapterManifest.of(model, "ffa")
    template = ChatTemplate(tokenizer, system_prompt="", max_length=config.data.max_length)
    data = TokenizedDataset.build(load_federation_data(config).clients[0][:12], template)
    return model, manifest, data, LocalTrainer(model), get_vector(model, manifest)


def _train_once(setting) -> np.ndarray:
    from secure_fedllm.adapters import get_vector, set_vector

    model, manifest, data, trainer, start = setting
    set_vector(model, manifest, start)
    settings = StepSettings(1.0, 1.0, 0.5, 6.0, 2, 0.1, "sgd")
    trainer.train(data, settings, sample_generator=torch.Generator().manual_seed(1),
                  noise_generator=torch.Generator().manual_seed(2))  # fmt: skip
    return get_vector(model, manifest) - start


def _fail_one_step(setting, monkeypatch) -> None:
    """One run whose optimizer step raises after the backward pass filled the per-sample gradients."""
    from opacus.optimizers import DPOptimizer

    with monkeypatch.context() as patch:
        patch.setattr(DPOptimizer, "step", lambda self, *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
        with pytest.raises(RuntimeError, match="boom"):
            _train_once(setting)


def test_the_trainer_is_clean_after_a_failed_step(trainer_setting, monkeypatch) -> None:
    reference = _train_once(trainer_setting)
    _fail_one_step(trainer_setting, monkeypatch)
    _, _, _, trainer, _ = trainer_setting
    assert all(p.grad is None and getattr(p, "grad_sample", None) is None for p in trainer.params)
    assert not trainer.module.training
    assert np.array_equal(_train_once(trainer_setting), reference)  # the next client's run is unaffected


def test_control_without_the_cleanup_the_next_run_is_corrupted(trainer_setting, monkeypatch) -> None:
    """Weakened control: the trainer as it was (no try/finally, no reset)."""
    from secure_fedllm.training import LocalTrainer

    reference = _train_once(trainer_setting)
    monkeypatch.setattr(LocalTrainer, "step", LocalTrainer._step)
    monkeypatch.setattr(LocalTrainer, "reset", lambda self: None)
    _fail_one_step(trainer_setting, monkeypatch)
    try:
        corrupted = _train_once(trainer_setting)
    except Exception:
        corrupted = None
    assert corrupted is None or not np.array_equal(corrupted, reference)
    monkeypatch.undo()
    _, _, _, trainer, _ = trainer_setting
    trainer.reset()  # leave the module-scoped trainer clean for the other tests
