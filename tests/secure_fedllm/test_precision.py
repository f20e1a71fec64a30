"""Precision, checkpointing and devices: the DP step stays the textbook float32 step whatever the base runs in.

The oracle is the hand-clipping one of test_training.py, computed on a float32 copy of the very
weights the half-precision model holds (so only the compute precision differs). Stated tolerance:
1% of the step's largest coordinate. bfloat16 keeps 8 bits of mantissa (2^-8 = 0.4% per rounding);
measured on the tiny model: 0.41% under bfloat16, 0.03% under float16. The control, the same step
without clipping, is off by 2,260%.
"""

from __future__ import annotations

import pytest
import torch
from opacus.grad_sample import GradSampleModule

from secure_fedllm.adapters import AdapterManifest, attach_lora
from secure_fedllm.config import LoraConfig, ModelConfig
from secure_fedllm.data import ChatTemplate, TextRecord, TokenizedDataset
from secure_fedllm.errors import ConfigError
from secure_fedllm.models import load_base_model, load_fingerprinted, resolve_device
from secure_fedllm.training import LocalTrainer, StepSettings, per_example_loss
from secure_fedllm.training import dp_sgd as dp_sgd_module
from secure_fedllm.training.precision import enable_gradient_checkpointing

CLIP = 0.05
EXPECTED = 6
TOLERANCE = 0.01  # of the step's largest coordinate; see the module docstring


def _model(tiny_model_dir, dtype: str):
    base, tokenizer = load_base_model(ModelConfig(name=str(tiny_model_dir)), dtype=dtype)
    return attach_lora(base, LoraConfig(r=4), a0_seed=7), tokenizer


def _data(tokenizer) -> TokenizedDataset:
    template = ChatTemplate(tokenizer, system_prompt="", max_length=160)
    records = [TextRecord(f"Question {i}?", "", f"Answer {i} is {'x' * (i % 5)}.", unit=f"u{i}") for i in range(12)]
    return TokenizedDataset.build(records, template)


def _fp32_twin(model):
    """A float32 model holding exactly the half model's (rounded) weights, and the same LoRA state."""
    twin = type(model.base_model.model)(model.base_model.model.config)
    state = {k.replace("base_model.model.", ""): v for k, v in model.state_dict().items()}
    base_state = {k.replace(".base_layer", ""): v.float() for k, v in state.items() if "lora_" not in k}
    twin.load_state_dict(base_state, strict=False)
    twin = attach_lora(twin.float().requires_grad_(False).eval(), LoraConfig(r=4), a0_seed=7)
    for (name, p), (twin_name, q) in zip(model.named_parameters(), twin.named_parameters(), strict=True):
        assert name == twin_name
        torch.testing.assert_close(q.detach(), p.detach().float(), atol=0, rtol=0)
    return twin


def _oracle_update(model, data, units, *, clip: float) -> torch.Tensor:
    """Textbook DP-SGD with sigma = 0 in float32: per-record gradient, clip, sum, divide by E (SGD, lr 1)."""
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    for u in units:
        (row,) = data.units[u]
        loss = per_example_loss(model, data.batch_of_rows([row]))[0]
        grads = torch.autograd.grad(loss, params)
        norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads))
        factor = min(1.0, clip / (float(norm) + 1e-6))
        for t, g in zip(total, grads, strict=True):
            t += factor * g
    return torch.cat([(-t / EXPECTED).flatten() for t in total])


def _trainer_update(model, data, units, *, clip: float) -> torch.Tensor:
    params = [p for p in model.parameters() if p.requires_grad]
    before = torch.cat([p.detach().flatten().clone() for p in params])
    trainer = LocalTrainer(model)
    settings = StepSettings(0.0, clip, 0.5, EXPECTED, 1, 1.0, "sgd")
    trainer.step(trainer.optimizer(settings, noise_key=b"k" * 32), data.batch_of_units(units))
    return torch.cat([p.detach().flatten() for p in params]) - before


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_dp_step_equals_float32_clipping_oracle(tiny_model_dir, dtype):
    model, tokenizer = _model(tiny_model_dir, dtype)
    data = _data(tokenizer)
    assert next(model.parameters()).dtype == getattr(torch, dtype)
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    twin = _fp32_twin(model)
    units = [0, 3, 5, 9]
    oracle = _oracle_update(twin, data, units, clip=CLIP)
    got = _trainer_update(model, data, units, clip=CLIP)
    scale = float(oracle.abs().max())
    assert float((got - oracle).abs().max()) <= TOLERANCE * scale
    # Control: the same step without clipping is not within the tolerance, so the check can fail.
    unclipped = _oracle_update(twin, data, units, clip=1e9)
    assert float((unclipped - oracle).abs().max()) > 10 * TOLERANCE * scale


def test_adapter_path_runs_in_float32_under_autocast(tiny_model_dir):
    model, tokenizer = _model(tiny_model_dir, "bfloat16")
    LocalTrainer(model)
    seen: dict[str, torch.dtype] = {}
    layer = next(m for n, m in model.named_modules() if n.endswith("q_proj.lora_B.default"))
    base_layer = next(m for n, m in model.named_modules() if n.endswith("q_proj.base_layer"))
    layer.register_forward_hook(lambda m, i, o: seen.__setitem__("lora", o.dtype))
    base_layer.register_forward_hook(lambda m, i, o: seen.__setitem__("base", o.dtype))
    per_example_loss(model, _data(tokenizer).batch_of_rows([0, 1]))
    assert seen == {"lora": torch.float32, "base": torch.bfloat16}


def test_float16_overflowing_unit_contributes_zero_and_the_step_still_happens(tiny_model_dir, monkeypatch):
    model, tokenizer = _model(tiny_model_dir, "float16")
    data = _data(tokenizer)
    twin = _fp32_twin(model)
    real = dp_sgd_module.per_example_loss

    def poisoned(module, batch):
        losses = real(module, batch)
        return torch.cat([losses[:1] * float("inf"), losses[1:]])  # the batch's first unit overflows

    monkeypatch.setattr(dp_sgd_module, "per_example_loss", poisoned)
    got = _trainer_update(model, data, [0, 3, 5, 9], clip=CLIP)
    assert bool(got.isfinite().all())
    oracle = _oracle_update(twin, data, [3, 5, 9], clip=CLIP)  # unit 0 counted as zero
    assert float((got - oracle).abs().max()) <= TOLERANCE * float(oracle.abs().max())


def test_gradient_checkpointing_gives_opacus_the_same_per_unit_gradients(tiny_model_dir):
    grads = []
    for checkpointing in (False, True):
        model, tokenizer = _model(tiny_model_dir, "float32")
        data = _data(tokenizer)
        trainer = LocalTrainer(model, gradient_checkpointing=checkpointing)
        order = list(AdapterManifest.of(model, "ffa").check(model).values())
        grads.append(trainer.per_unit_gradients(data.batch_of_units([0, 2, 4, 7]), order))
        if checkpointing:
            assert model.base_model.model.model.gradient_checkpointing
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-5)


def test_control_opacus_alone_loses_per_unit_gradients_under_checkpointing(tiny_model_dir):
    """Without the recompute guard, Opacus counts two forwards and never publishes grad_sample."""
    model, tokenizer = _model(tiny_model_dir, "float32")
    enable_gradient_checkpointing(model)
    module = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    module.train()
    per_example_loss(module, _data(tokenizer).batch_of_units([0, 2])).sum().backward()
    lora_b = [p for n, p in model.named_parameters() if "lora_B." in n]
    assert all(getattr(p, "grad_sample", None) is None for p in lora_b)


def test_fingerprint_is_of_the_checkpoint_not_the_compute_dtype(tiny_model_dir):
    config = ModelConfig(name=str(tiny_model_dir))
    fp32 = load_fingerprinted(config, dtype="float32")
    bf16 = load_fingerprinted(config, dtype="bfloat16")
    assert fp32[2] == bf16[2]
    assert next(bf16[0].parameters()).dtype == torch.bfloat16


def test_devices_resolve_or_fail_with_the_fix():
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else ("mps" if torch.backends.mps.is_available() else "cpu")
    assert resolve_device("auto").type == expected
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"training.device='cuda:3'.*auto or cpu"):
            resolve_device("cuda:3")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_dp_step_on_cuda_matches_cpu(tiny_model_dir):  # pragma: no cover - runs on GPU machines
    cpu_model, tokenizer = _model(tiny_model_dir, "float32")
    data = _data(tokenizer)
    gpu_model, _ = _model(tiny_model_dir, "float32")
    gpu_model.to("cuda")
    a = _trainer_update(cpu_model, data, [0, 3, 5], clip=CLIP)
    b = _trainer_update(gpu_model, data, [0, 3, 5], clip=CLIP).cpu()
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-3)
