"""DP-SGD noise from the ChaCha20 Gaussian: the optimiser really uses it, it is N(0, 1), and keys govern it."""

from __future__ import annotations

import hashlib
import hmac
import json
import math

import numpy as np
import pytest
import torch
from scipy import stats

from secure_fedllm import RunConfig, run
from secure_fedllm.adapters import SIDECAR, attach_lora
from secure_fedllm.config import LoraConfig, ModelConfig
from secure_fedllm.data import ChatTemplate, TextRecord, TokenizedDataset
from secure_fedllm.federation.evaluation import gaussian
from secure_fedllm.models import load_base_model
from secure_fedllm.privacy.noise import csprng_gaussian
from secure_fedllm.training import LocalTrainer, StepSettings, dp_step_noise_key, per_example_loss

KEY = bytes(range(32))


@pytest.fixture
def setup(tiny_model_dir):
    base, tokenizer = load_base_model(ModelConfig(name=str(tiny_model_dir)))
    model = attach_lora(base, LoraConfig(r=4), a0_seed=7)
    template = ChatTemplate(tokenizer, system_prompt="", max_length=160)
    records = [TextRecord(f"Question {i}?", "", f"Answer {i} is {'x' * (i % 5)}.", unit=f"u{i}") for i in range(8)]
    return model, TokenizedDataset.build(records, template)


def _clipped_sum(model, data, units, clip):
    """Hand-clipped per-unit gradient sum (the oracle), independent of Opacus."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    for u in units:
        loss = per_example_loss(model, data.batch_of_units([u]))[0]
        grads = torch.autograd.grad(loss, list(params.values()))
        norm = torch.sqrt(sum((g**2).sum() for g in grads))
        factor = min(1.0, clip / (float(norm) + 1e-6))
        for name, g in zip(params, grads, strict=True):
            total[name] += factor * g
    return params, total


def _one_step(trainer, data, units, *, noise: float, clip: float, expected: int, **noise_source):
    settings = StepSettings(noise, clip, 0.5, expected, 1, 1.0, "sgd")
    trainer.step(trainer.optimizer(settings, **noise_source), data.batch_of_units(units))


def test_dp_step_adds_exactly_the_csprng_noise(setup):
    model, data = setup
    units, clip, noise, expected = [0, 2, 5], 0.05, 0.7, 4
    model.eval()
    params, total = _clipped_sum(model, data, units, clip)
    before = {n: p.detach().clone() for n, p in params.items()}
    predicted = {}
    for index, (name, p) in enumerate(params.items()):
        key = hmac.new(KEY, f"secure-fedllm/dp-sgd-noise/v1|step=0|param={index}".encode(), hashlib.sha256).digest()
        z = torch.from_numpy(csprng_gaussian(key, p.numel(), dtype=np.float64)).reshape(p.shape)
        predicted[name] = before[name] - (total[name] + (z * (noise * clip)).to(p.dtype)) / expected
        assert dp_step_noise_key(KEY, 0, index) == key
    trainer = LocalTrainer(model)
    _one_step(trainer, data, units, noise=noise, clip=clip, expected=expected, noise_key=KEY)
    for name, p in params.items():
        torch.testing.assert_close(p.detach(), predicted[name], atol=1e-6, rtol=1e-5)
    # control: the torch generator's step is not that prediction
    for name, p in params.items():
        p.data.copy_(before[name])
    _one_step(trainer, data, units, noise=noise, clip=clip, expected=expected, noise_generator=torch.Generator())
    gaps = [float((p.detach() - predicted[n]).abs().max()) for n, p in params.items()]
    assert max(gaps) > 1e-2


def test_each_step_gets_a_fresh_draw(setup):
    model, _ = setup
    trainer = LocalTrainer(model)
    opt = trainer.optimizer(StepSettings(1.0, 1.0, 0.5, 1, 2, 1.0, "sgd"), noise_key=KEY)
    deltas = []
    for _ in range(2):
        before = [p.detach().clone() for p in trainer.params]
        trainer.step(opt, None)
        deltas.append(torch.cat([(p.detach() - b).flatten() for p, b in zip(trainer.params, before, strict=True)]))
    assert not torch.equal(deltas[0], deltas[1])
    assert 0.9 < float(deltas[0].std()) < 1.1  # std sigma * C / E = 1


def _looks_standard_normal(x: np.ndarray) -> bool:
    n = len(x)
    se = 1 / math.sqrt(n)
    return abs(x.mean()) < 5 * se and abs(x.std() - 1) < 5 * se / math.sqrt(2) and stats.kstest(x, "norm").pvalue > 1e-4


def test_csprng_gaussian_is_standard_normal_and_the_check_catches_a_wrong_std():
    x = csprng_gaussian(KEY, 400_000, dtype=np.float64)
    assert _looks_standard_normal(x)
    assert not _looks_standard_normal(1.05 * x)  # negative control: std 1.05
    assert not _looks_standard_normal(x + 0.02)  # and a mean shift


def test_torch_dtype_shape_and_float32_cast():
    t = csprng_gaussian(KEY, (3, 5), dtype=torch.float32, std=2.0)
    assert t.shape == (3, 5) and t.dtype == torch.float32 and t.device.type == "cpu"
    flat = csprng_gaussian(KEY, 15, dtype=np.float64) * 2.0
    assert torch.equal(t.flatten(), torch.from_numpy(flat).float())


def test_keys_govern_the_noise_and_torch_seed_does_not():
    a = csprng_gaussian(KEY, 64, dtype=torch.float64)
    torch.manual_seed(0)
    b = csprng_gaussian(KEY, 64, dtype=torch.float64)
    torch.manual_seed(1)
    c = csprng_gaussian(KEY, 64, dtype=torch.float64)
    assert torch.equal(a, b) and torch.equal(b, c)
    assert not torch.equal(a, csprng_gaussian(bytes(32), 64, dtype=torch.float64))
    # control: torch's own generator does follow torch.manual_seed
    torch.manual_seed(0)
    t0 = torch.randn(64)
    torch.manual_seed(1)
    assert not torch.equal(t0, torch.randn(64))
    with pytest.raises(ValueError, match="32 bytes"):
        csprng_gaussian(KEY[:16], 4, dtype=np.float64)


def test_dp_noise_ignores_torch_seed_but_torch_generator_does_not(setup):
    model, _ = setup
    trainer = LocalTrainer(model)
    settings = StepSettings(1.0, 1.0, 0.5, 1, 1, 1.0, "sgd")

    def noise_only(seed: int, **source) -> torch.Tensor:
        start = [p.detach().clone() for p in trainer.params]
        torch.manual_seed(seed)
        trainer.step(trainer.optimizer(settings, **source), None)
        out = torch.cat([(p.detach() - s).flatten() for p, s in zip(trainer.params, start, strict=True)])
        for p, s in zip(trainer.params, start, strict=True):
            p.data.copy_(s)
        return out

    assert torch.equal(noise_only(0, noise_key=KEY), noise_only(1, noise_key=KEY))
    assert not torch.equal(noise_only(0, noise_key=KEY), noise_only(0, noise_key=bytes(32)))
    # control: noise from torch's global generator does follow torch.manual_seed
    glob = torch.default_generator
    assert not torch.equal(noise_only(0, noise_generator=glob), noise_only(1, noise_generator=glob))


def test_evaluation_gaussian_is_the_shared_generator_bit_for_bit():
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

    seed = bytes(range(100, 132))
    key = hmac.new(seed, b"secure-fedllm/evaluation-noise/v1", hashlib.sha256).digest()
    stream = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor().update(bytes(16 * 3))
    words = np.frombuffer(stream, dtype="<u8")
    u = ((words >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53
    r, a = np.sqrt(-2.0 * np.log(u[0::2])), 2.0 * math.pi * u[1::2]
    legacy = np.empty(6)
    legacy[0::2], legacy[1::2] = r * np.cos(a), r * np.sin(a)
    assert np.array_equal(gaussian(seed, 5), legacy[:5])


@pytest.mark.slow  # a whole (1-round) run: ~30 s on 2 cores
def test_default_run_trains_with_csprng_noise_and_reports_it(tiny_model_dir, tmp_path):
    config = RunConfig().with_overrides(
        [
            f'model.name="{tiny_model_dir}"',
            "federation.clients=3",
            "federation.rounds=1",
            "data.records_per_client=64",
            "data.max_length=160",
            "evaluation.heldout_records=16",
            "evaluation.generations=1",
            "evaluation.max_new_tokens=2",
            "privacy.expected_batch_size=8",
            "lora.r=4",
            "privacy.noise_seed=11",
            "secure_aggregation.dropout_rate=0.0",
        ]
    )
    assert config.privacy.noise_generator == "csprng"
    result = run(config, out=tmp_path / "run", progress=False)
    assert "DP-SGD noise generator: `csprng`" in (result.out / "report.md").read_text()
    sidecar = json.loads((result.adapter / SIDECAR).read_text())
    assert sidecar["noise_generator"] == "csprng"
