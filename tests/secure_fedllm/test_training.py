"""DP-SGD on LoRA: what changes, what must not, and that Opacus' step is the textbook one."""

from __future__ import annotations

import pytest
import torch

from secure_fedllm.adapters import AdapterManifest, attach_lora, get_vector
from secure_fedllm.config import LoraConfig, ModelConfig
from secure_fedllm.data import ChatTemplate, TextRecord, TokenizedDataset
from secure_fedllm.models import load_base_model
from secure_fedllm.training import LocalTrainer, StepSettings, per_example_loss


@pytest.fixture
def setup(tiny_model_dir):
    base, tokenizer = load_base_model(ModelConfig(name=str(tiny_model_dir)))
    model = attach_lora(base, LoraConfig(r=4), a0_seed=7)
    template = ChatTemplate(tokenizer, system_prompt="", max_length=160)
    records = [
        TextRecord(f"Question {i}?", "", f"Answer {i} is {'x' * (i % 5)}.", unit=f"u{i // 2}") for i in range(24)
    ]
    data = TokenizedDataset.build(records, template)
    assert data.dropped == 0 and data.num_units == 12
    return model, data


def _settings(noise: float, *, clip: float = 1.0, optimizer: str = "adam", lr: float = 0.05) -> StepSettings:
    return StepSettings(
        noise_multiplier=noise,
        max_grad_norm=clip,
        sample_rate=0.5,
        expected_batch_size=6,
        steps=3,
        learning_rate=lr,
        optimizer=optimizer,
    )


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_ffa_dp_steps_change_lora_b_only(setup):
    model, data = setup
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = LocalTrainer(model)
    trainer.train(data, _settings(1.0), sample_generator=_gen(1), noise_generator=_gen(2))
    changed_b = 0
    for name, p in model.named_parameters():
        if "lora_B." in name:
            changed_b += int(not torch.equal(p, before[name]))
        else:
            assert torch.equal(p, before[name]), f"{name} changed"
    assert changed_b == sum("lora_B." in n for n in before)


def test_training_twice_keeps_one_set_of_hooks_and_keeps_learning(setup):
    model, data = setup
    trainer = LocalTrainer(model)
    manifest = AdapterManifest.of(model, "ffa")
    lora_layer = next(m for n, m in model.named_modules() if n.endswith("q_proj.lora_B.default"))
    hooks = (len(lora_layer._forward_hooks), len(lora_layer._backward_hooks))
    v0 = get_vector(model, manifest)
    trainer.train(data, _settings(0.5), sample_generator=_gen(1), noise_generator=_gen(2))
    v1 = get_vector(model, manifest)
    trainer.train(data, _settings(0.5), sample_generator=_gen(3), noise_generator=_gen(4))
    v2 = get_vector(model, manifest)
    assert (len(lora_layer._forward_hooks), len(lora_layer._backward_hooks)) == hooks
    assert (v1 != v0).any() and (v2 != v1).any()


def _explicit_step(model, data, rows_by_unit, *, clip: float, expected: int, lr: float) -> dict[str, torch.Tensor]:
    """Textbook DP-SGD with sigma = 0: per-unit gradient, clip, sum, divide, SGD."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    for rows in rows_by_unit:
        losses = torch.stack([per_example_loss(model, data.batch_of_rows([r]))[0] for r in rows])
        grads = torch.autograd.grad(losses.mean(), list(params.values()))
        norm = torch.sqrt(sum((g**2).sum() for g in grads))
        factor = min(1.0, clip / (float(norm) + 1e-6))
        for (name, _), g in zip(params.items(), grads, strict=True):
            total[name] += factor * g
    return {n: p.detach() - lr * total[n] / expected for n, p in params.items()}


@pytest.mark.parametrize("unit_level", [False, True])
def test_noise_free_dp_step_equals_explicit_per_unit_clipping(setup, unit_level):
    model, data = setup
    units = [0, 3, 5, 9]
    expected_size = 6
    clip = 0.05  # small enough that every unit is clipped
    if unit_level:
        batch = data.batch_of_units(units)
        rows_by_unit = [data.units[u] for u in units]
    else:
        rows = [r for u in units for r in data.units[u]]
        batch = data.batch_of_rows(rows)
        rows_by_unit = [[r] for r in rows]
    model.eval()
    reference = _explicit_step(model, data, rows_by_unit, clip=clip, expected=expected_size, lr=1.0)
    trainer = LocalTrainer(model)
    settings = StepSettings(
        noise_multiplier=0.0,
        max_grad_norm=clip,
        sample_rate=0.5,
        expected_batch_size=expected_size,
        steps=1,
        learning_rate=1.0,
        optimizer="sgd",
    )
    trainer.step(trainer.optimizer(settings, noise_generator=_gen(0)), batch)
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.detach(), reference[name], atol=1e-6, rtol=1e-4)


def test_empty_poisson_batch_is_a_noise_only_step(setup):
    model, _ = setup
    manifest = AdapterManifest.of(model, "ffa")
    trainer = LocalTrainer(model)
    v0 = get_vector(model, manifest)
    quiet = StepSettings(0.0, 1.0, 0.5, 6, 1, 1.0, "sgd")
    trainer.step(trainer.optimizer(quiet, noise_generator=_gen(0)), None)
    assert (get_vector(model, manifest) == v0).all()
    noisy = StepSettings(1.0, 1.0, 0.5, 6, 1, 1.0, "sgd")
    trainer.step(trainer.optimizer(noisy, noise_generator=_gen(0)), None)
    step = get_vector(model, manifest) - v0
    # noise std on the averaged gradient is sigma * C / E = 1/6 per coordinate
    assert 0.12 < float(step.std()) < 0.22


def test_poisson_sampling_is_replayable_from_the_seed(setup):
    model, data = setup
    manifest = AdapterManifest.of(model, "ffa")
    start = get_vector(model, manifest)
    trainer = LocalTrainer(model)
    trainer.train(data, _settings(1.0), sample_generator=_gen(5), noise_generator=_gen(6))
    first = get_vector(model, manifest)
    from secure_fedllm.adapters import set_vector

    set_vector(model, manifest, start)
    trainer.train(data, _settings(1.0), sample_generator=_gen(5), noise_generator=_gen(6))
    assert (get_vector(model, manifest) == first).all()
