"""Passes of a bounded number of tokens: less memory, the same numbers.

`LocalTrainer` and `evaluate` put a batch through the model in row slices (`row_passes`) so that a
step's activations and full-vocabulary logits are those of one slice. Rows do not interact, so the
per-unit gradients and losses must come out exactly as from one pass over the whole batch, also
when a unit's rows fall into different passes (user-level DP) and under gradient checkpointing.
"""

from __future__ import annotations

import hashlib

import pytest
import torch

from secure_fedllm.adapters import AdapterManifest, attach_lora
from secure_fedllm.config import LoraConfig, ModelConfig
from secure_fedllm.data import ChatTemplate, TextRecord, TokenizedDataset
from secure_fedllm.data.tokenized import Batch
from secure_fedllm.models import load_base_model, model_fingerprint
from secure_fedllm.training import LocalTrainer, StepSettings, evaluate, per_example_loss
from secure_fedllm.training.dp_sgd import CPU_TOKENS_PER_PASS, RowPass, row_passes

CPU = torch.device("cpu")


def _model(tiny_model_dir):
    base, tokenizer = load_base_model(ModelConfig(name=str(tiny_model_dir)))
    model = attach_lora(base, LoraConfig(r=4), a0_seed=3)
    with torch.no_grad():  # B = 0 at init would make every gradient through A vanish; give B values
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.05)
    return model, tokenizer


def _data(tokenizer, *, rows_per_unit: int = 1) -> TokenizedDataset:
    template = ChatTemplate(tokenizer, system_prompt="", max_length=96)
    records = [
        TextRecord(f"Question {i}{'?' * (i % 7)}", "", f"Answer {i}: {'xy' * (i % 6)}.", unit=f"u{i // rows_per_unit}")
        for i in range(12)
    ]
    return TokenizedDataset.build(records, template)


def _batch(rows: int, width: int, prompt: int) -> Batch:
    ids = torch.zeros((rows, width), dtype=torch.long)
    labels = ids.clone()
    labels[:, :prompt] = -100
    return Batch(ids, torch.ones_like(ids), labels, torch.arange(rows), rows)


@pytest.mark.parametrize(("rows", "width", "budget", "sizes"), [
    (39, 55, 512, [8, 8, 8, 8, 7]),  # evenly shared out: no pass of 3 rows at the end
    (32, 64, 512, [8, 8, 8, 8]),
    (3, 300, 512, [1, 1, 1]),  # a row longer than the budget still goes through, alone
    (10, 20, 10_000, [10]),
    (10, 20, None, [10]),
])  # fmt: skip
def test_row_passes_share_rows_evenly_within_the_budget(rows, width, budget, sizes):
    batch = _batch(rows, width, prompt=5)
    passes = row_passes(batch, budget, CPU)
    assert [p.input_ids.shape[0] for p in passes] == sizes
    assert all(p.input_ids.shape[1] == width and p.first == 4 and p.num_units == rows for p in passes)
    assert torch.equal(torch.cat([p.unit_index for p in passes]), batch.unit_index)
    assert torch.equal(torch.cat([p.labels for p in passes]), batch.labels)


def test_auto_is_the_cpu_budget_and_one_pass_on_an_accelerator():
    batch = _batch(32, 64, prompt=5)
    assert len(row_passes(batch, "auto", CPU)) == -(-32 * 64 // CPU_TOKENS_PER_PASS)
    assert len(row_passes(batch, "auto", torch.device("cuda"))) == 1
    with pytest.raises(ValueError, match="tokens_per_pass"):
        row_passes(batch, 0, CPU)


def test_a_pass_keeps_its_batch_first_logit_position():
    """The later rows alone would start their logits later; a pass of them starts where the batch does."""
    batch = _batch(4, 30, prompt=20)
    batch.labels[0, 5:] = 7  # row 0's response starts at 5, the others' at 20
    passes = row_passes(batch, 60, CPU)
    assert [p.first for p in passes] == [4, 4]
    assert isinstance(passes[1], RowPass) and row_passes(passes[1], None, CPU)[0].first == 4


def test_loss_without_gradients_in_passes_is_bit_identical(tiny_model_dir):
    model, tokenizer = _model(tiny_model_dir)
    data = _data(tokenizer)
    batch = data.batch_of_rows(list(range(12)))
    with torch.no_grad():
        whole = per_example_loss(model, batch)
        for budget in (1, 200):
            assert len(row_passes(batch, budget, CPU)) > 1
            assert torch.equal(per_example_loss(model, batch, tokens_per_pass=budget), whole)
    with pytest.raises(ValueError, match="without gradients"):
        per_example_loss(model, batch, tokens_per_pass=100)


def test_evaluate_in_passes_gives_the_same_result(tiny_model_dir):
    model, tokenizer = _model(tiny_model_dir)
    data = _data(tokenizer)
    whole = evaluate(model, data, batch_size=8, tokens_per_pass=None)
    assert evaluate(model, data, batch_size=8, tokens_per_pass=150) == whole
    assert evaluate(model, data, batch_size=8) == whole  # "auto": one pass at this size on the CPU


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("rows_per_unit", [1, 3])
def test_per_unit_gradients_in_passes_equal_one_pass(tiny_model_dir, rows_per_unit, checkpointing):
    """Three rows per unit, passes of two rows: units straddle passes (user-level DP)."""
    model, tokenizer = _model(tiny_model_dir)
    data = _data(tokenizer, rows_per_unit=rows_per_unit)
    trainer = LocalTrainer(model, gradient_checkpointing=checkpointing, tokens_per_pass=None)
    order = list(AdapterManifest.of(model, "ffa").check(model).values())
    batch = data.batch_of_units(list(range(data.num_units)))
    whole = trainer.per_unit_gradients(batch, order)
    trainer.tokens_per_pass = 2 * batch.input_ids.shape[1]
    assert len(row_passes(batch, trainer.tokens_per_pass, CPU)) == 6
    split = trainer.per_unit_gradients(batch, order)
    assert whole.shape[0] == data.num_units and whole.abs().sum() > 0
    assert torch.equal(split, whole)
    assert all(getattr(p, "grad_sample", None) is None and p.grad is None for p in trainer.params)


def test_dp_step_in_passes_equals_one_pass(tiny_model_dir):
    """A whole DP-SGD step (clipping, ChaCha20 noise, Adam) from the same weights lands on the same weights."""
    after = []
    for passes in (1, 3):
        model, tokenizer = _model(tiny_model_dir)
        data = _data(tokenizer)
        batch = data.batch_of_units(list(range(12)))
        budget = None if passes == 1 else 4 * batch.input_ids.shape[1]
        assert len(row_passes(batch, budget, CPU)) == passes
        trainer = LocalTrainer(model, tokens_per_pass=budget)
        settings = StepSettings(0.5, 0.05, 0.5, 12, 1, 1e-2, "adam")
        trainer.step(trainer.optimizer(settings, noise_key=b"k" * 32), batch)
        after.append(torch.cat([p.detach().flatten() for p in trainer.params]))
    assert torch.equal(after[1], after[0])


def test_fingerprint_hashes_the_tensor_bytes_in_place(tiny_model_dir):
    """Hashing the tensors' memory directly gives the digest of their byte copies (bfloat16 included)."""
    model, _ = load_base_model(ModelConfig(name=str(tiny_model_dir)), dtype="bfloat16")
    digest = hashlib.sha256()
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    assert model_fingerprint(model) == digest.hexdigest()
