"""Gradient canaries (`LocalTrainer.step(extra_unit_gradients=...)`) go through the very step a record does.

The oracle is the hand computation of DP-SGD, independent of Opacus: clip each record's gradient,
add the canary rows (clipped the same way), add the noise the optimiser's generator draws, divide
by the expected batch size, take an SGD step.
"""

from __future__ import annotations

import pytest
import torch

from secure_fedllm.adapters import attach_lora
from secure_fedllm.config import LoraConfig, ModelConfig
from secure_fedllm.data import ChatTemplate, TextRecord, TokenizedDataset
from secure_fedllm.models import load_base_model
from secure_fedllm.privacy.noise import csprng_gaussian
from secure_fedllm.training import LocalTrainer, StepSettings, dp_step_noise_key, per_example_loss

KEY = bytes(range(32))


@pytest.fixture
def setup(tiny_model_dir):
    base, tokenizer = load_base_model(ModelConfig(name=str(tiny_model_dir)))
    model = attach_lora(base, LoraConfig(r=4), a0_seed=7)
    template = ChatTemplate(tokenizer, system_prompt="", max_length=160)
    records = [TextRecord(f"Question {i}?", "", f"Answer {i} is {'x' * i}.", unit=f"u{i}") for i in range(4)]
    return model, TokenizedDataset.build(records, template)


def _trained(model) -> list[torch.nn.Parameter]:
    """The trained parameters in the trainer's order (`LocalTrainer.params`)."""
    return [p for p in model.parameters() if p.requires_grad]


def _flat(params: list[torch.nn.Parameter]) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in params])


def _clipped_record(model, data: TokenizedDataset, unit: int, clip: float) -> torch.Tensor:
    """The record's gradient (flattened in the trainer's parameter order), clipped by hand to `clip`."""
    loss = per_example_loss(model, data.batch_of_units([unit]))[0]
    grad = torch.cat([g.flatten() for g in torch.autograd.grad(loss, _trained(model))])
    return grad * min(1.0, clip / (float(grad.norm()) + 1e-6))


def _noise(params: list[torch.nn.Parameter], source: str, std: float) -> tuple[torch.Tensor, dict[str, object]]:
    """The noise one step draws from a fixed generator, per parameter in the optimiser's order, flattened."""
    if source == "csprng":
        parts = [
            csprng_gaussian(dp_step_noise_key(KEY, 0, i), p.shape, dtype=torch.float32, std=std).flatten()
            for i, p in enumerate(params)
        ]
        return torch.cat(parts), {"noise_key": KEY}
    generator = torch.Generator().manual_seed(11)
    parts = [torch.normal(0.0, std, size=p.shape, generator=generator).flatten() for p in params]
    return torch.cat(parts), {"noise_generator": torch.Generator().manual_seed(11)}


def _dirac(params: list[torch.nn.Parameter], coordinate: int, norm: float) -> torch.Tensor:
    d = sum(p.numel() for p in params)
    row = torch.zeros((1, d))
    row[0, coordinate] = norm
    return row


@pytest.mark.parametrize("source", ["csprng", "torch"])
def test_record_plus_dirac_canary_equals_the_hand_computation(setup, source):
    model, data = setup
    model.eval()
    params = _trained(model)
    clip, sigma, expected = 0.05, 0.7, 2  # clip small enough that the record is clipped
    j = params[0].numel() + 5  # in the second parameter: rows follow the trainer's parameter order
    before = _flat(params)
    record = _clipped_record(model, data, 1, clip)
    assert float(record.norm()) == pytest.approx(clip, rel=1e-4)  # the record really was clipped
    noise, source_kwargs = _noise(params, source, sigma * clip)
    canary = torch.zeros_like(before)
    canary[j] = clip
    predicted = before - (record + canary + noise) / expected

    trainer = LocalTrainer(model)
    assert [id(p) for p in trainer.params] == [id(p) for p in params]
    settings = StepSettings(sigma, clip, 0.5, expected, 1, 1.0, "sgd")
    optimizer = trainer.optimizer(settings, **source_kwargs)
    trainer.step(optimizer, data.batch_of_units([1]), extra_unit_gradients=_dirac(params, j, clip))
    after = _flat(params)
    torch.testing.assert_close(after, predicted, atol=1e-6, rtol=1e-5)
    # control: the same prediction without the canary is off by C / E on coordinate j, and only there
    without = before - (record + noise) / expected
    gap = (after - without).abs()
    assert float(gap[j]) == pytest.approx(clip / expected, rel=1e-4)
    assert float(gap[torch.arange(gap.numel()) != j].max()) < 1e-6


def test_oversized_canary_is_clipped_to_the_clip_norm_even_without_a_record(setup):
    model, _ = setup
    trainer = LocalTrainer(model)
    params = trainer.params
    clip, expected, j = 0.5, 4, 3
    before = _flat(params)
    settings = StepSettings(0.0, clip, 0.5, expected, 1, 1.0, "sgd")
    rows = torch.cat([_dirac(params, j, 5 * clip), _dirac(params, j + 1, clip)])
    trainer.step(trainer.optimizer(settings, noise_key=KEY), None, extra_unit_gradients=rows)
    step = before - _flat(params)
    assert float(step[j]) == pytest.approx(clip / expected, rel=1e-5)  # 5C clipped to C, not 5C / E
    assert float(step[j + 1]) == pytest.approx(clip / expected, rel=1e-5)
    step[j : j + 2] = 0
    assert float(step.abs().max()) == 0.0
    assert all(p.grad is None and getattr(p, "grad_sample", None) is None for p in trainer.params)


def test_extra_unit_gradients_of_the_wrong_width_are_refused(setup):
    model, _ = setup
    trainer = LocalTrainer(model)
    d = sum(p.numel() for p in trainer.params)
    optimizer = trainer.optimizer(StepSettings(0.0, 1.0, 0.5, 1, 1, 1.0, "sgd"), noise_key=KEY)
    with pytest.raises(ValueError, match=f"need \\(k, {d}\\)"):
        trainer.step(optimizer, None, extra_unit_gradients=torch.zeros((2, d - 1)))
    with pytest.raises(ValueError, match="finite"):
        trainer.step(optimizer, None, extra_unit_gradients=torch.full((1, d), float("nan")))
