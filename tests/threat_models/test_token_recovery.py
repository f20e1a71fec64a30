"""DAGER-style token-set recovery from LoRA updates: known answers where the span check is exact, chance under DP.

All on the tiny random LLaMA (2 layers, hidden 64, byte-level vocabulary of 258, ChatML template). With an empty
system prompt the template alone shows 12 distinct tokens to layer 0 ("system", "user", "assistant", newline,
<|im_start|>; <|im_end|> is also the padding token and its embedding is zero, so it never leaks), which leaves room
for a couple of content tokens below r = 16.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from secure_fedllm.adapters import AdapterManifest, attach_lora
from secure_fedllm.config import LoraConfig, ModelConfig
from secure_fedllm.data import ChatTemplate, TextRecord, TokenizedDataset
from secure_fedllm.models import load_base_model
from secure_fedllm.training import per_example_loss
from threat_models.attacks.token_recovery import (
    TokenRecovery,
    TokenRecoveryConfig,
    dp_step_update,
    loss_gradient,
    split_update,
    visible_tokens,
)
from threat_models.errors import AttackConfigError

R = 16
SHORT = ("Hi", "", "hi")  # 12 template tokens + H, h: n_vis = 14 < r
LONG = ("Describe the quick brown fox jumping over lazy dogs", "", "A fox; it JUMPS over 3 dogs!")  # n_vis = 39 > r


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    # Two OpenMP threads on a loaded 2-core machine make each tiny forward/backward ~100x slower (spinning).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model(tiny_model_dir, *, aggregation: str = "ffa", targets: tuple[str, ...] = ("q_proj", "v_proj")):
    base, tokenizer = load_base_model(ModelConfig(name=str(tiny_model_dir)))
    model = attach_lora(base, LoraConfig(r=R, aggregation=aggregation, target_modules=targets), a0_seed=3)
    return model, ChatTemplate(tokenizer, system_prompt="", max_length=200)


@pytest.fixture(scope="module")
def ffa(tiny_model_dir):
    return _model(tiny_model_dir)


def _batch(template, *records):
    data = TokenizedDataset.build([TextRecord(*rec, unit=f"u{i}") for i, rec in enumerate(records)], template)
    return data.batch_of_rows(list(range(len(records))))


def _lora(model, module: str, tensor: str) -> str:
    return next(n for n, _ in model.named_parameters() if f"layers.0.self_attn.{module}.{tensor}." in n)


def _layer_inputs(model) -> torch.Tensor:
    inner = model.base_model.model.model
    with torch.no_grad():
        return inner.layers[0].input_layernorm(inner.embed_tokens.weight).double()


# ----------------------------------------------------------------------------------------------------------------
# Exact recovery: n_vis < r, no noise
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("module", ["q_proj", "v_proj"])
@pytest.mark.parametrize("source", ["autograd", "dp_sgd_step"])
def test_short_record_is_recovered_exactly_from_a_noise_free_step(ffa, module, source):
    model, template = ffa
    batch = _batch(template, SHORT)
    truth = visible_tokens(model, batch, module)
    if source == "autograd":
        update = loss_gradient(model, batch)
    else:  # the project's own DP-SGD step with sigma = 0 (clipping only rescales: the row space is unchanged)
        update = dp_step_update(model, batch, noise_multiplier=0.0, max_grad_norm=1.0, learning_rate=0.1)
    result = TokenRecovery(TokenRecoveryConfig(module=module)).run(model, update, true_tokens=truth)
    why = f"{module}/{source}: n_vis={result.n_vis} r={result.r} rank={result.rank}"
    assert result.n_vis < R, why
    assert result.precision >= 0.9 and result.recall >= 0.9, why
    # What is actually observed: the complete bag of words, nothing else, and the attacker can tell.
    assert result.recovered == truth and result.false_positives == 0, why
    assert result.rank == result.n_vis and result.self_consistent, why
    assert result.precision_at_t == 1.0, why


@pytest.mark.parametrize("n_tokens", [1, 8, 15])
def test_hand_built_update_recovers_exactly_the_chosen_tokens(ffa, n_tokens):
    model, _ = ffa
    x = _layer_inputs(model)
    a0 = dict(model.named_parameters())[_lora(model, "q_proj", "lora_A")].detach().double()
    gen = torch.Generator().manual_seed(n_tokens)
    live = torch.nonzero(x.abs().sum(dim=1) > 0).flatten()
    chosen = live[torch.randperm(live.numel(), generator=gen)[:n_tokens]]
    g = torch.randn(64, n_tokens, generator=gen, dtype=torch.float64)
    update_b = g @ (x[chosen] @ a0.T)  # B = G (A0 X^T)^T: rows in span{A0 x_t}
    truth = {int(t) for t in chosen}
    result = TokenRecovery().run(model, update_b.float(), true_tokens=truth)
    assert result.rank == n_tokens
    assert result.recovered == truth, f"n={n_tokens} r={R}: missed {truth - result.recovered}"
    assert result.false_positives == 0 and result.precision == 1.0 and result.recall == 1.0
    assert set(result.ranking[:n_tokens].tolist()) == truth
    assert result.distances[sorted(truth)].max() < 1e-5


def test_hand_built_lora_a_update_alone_and_together_with_b(ffa):
    model, _ = ffa
    x = _layer_inputs(model)
    a0 = dict(model.named_parameters())[_lora(model, "v_proj", "lora_A")].detach().double()
    gen = torch.Generator().manual_seed(11)
    chosen = torch.tensor([40, 41, 70, 80, 100, 120, 200, 255])
    truth = {int(t) for t in chosen}
    update_a = torch.randn(R, len(chosen), generator=gen, dtype=torch.float64) @ x[chosen]  # rows in span{x_t}
    update_b = torch.randn(32, len(chosen), generator=gen, dtype=torch.float64) @ (x[chosen] @ a0.T)
    attack = TokenRecovery(TokenRecoveryConfig(module="v_proj"))
    alone = attack.run(model, {_lora(model, "v_proj", "lora_A"): update_a}, true_tokens=truth)
    both = attack.run(
        model,
        {_lora(model, "v_proj", "lora_A"): update_a, _lora(model, "v_proj", "lora_B"): update_b},
        true_tokens=truth,
    )
    assert [c.tensor for c in alone.checks] == ["lora_A"] and alone.recovered == truth
    assert [c.tensor for c in both.checks] == ["lora_B", "lora_A"] and all(c.informative for c in both.checks)
    assert both.recovered == truth and both.false_positives == 0


def test_fedit_uses_the_lora_a_update_once_b_is_non_zero(tiny_model_dir):
    model, template = _model(tiny_model_dir, aggregation="fedit", targets=("q_proj",))
    batch = _batch(template, SHORT)
    truth = visible_tokens(model, batch, "q_proj")
    attack = TokenRecovery()
    first = attack.run(model, loss_gradient(model, batch), true_tokens=truth)
    assert [c.tensor for c in first.checks] == ["lora_B"], "at peft's init B = 0, so dL/dA = 0 carries nothing"
    assert first.recovered == truth
    with torch.no_grad():  # as after some training: B != 0, so A's gradient B^T G^T X is non-zero
        dict(model.named_parameters())[_lora(model, "q_proj", "lora_B")].normal_(0, 0.05, generator=None)
    grads = loss_gradient(model, batch)
    a_only = attack.run(model, {_lora(model, "q_proj", "lora_A"): grads[_lora(model, "q_proj", "lora_A")]})
    both = attack.run(model, grads, true_tokens=truth)
    assert a_only.checks[0].tensor == "lora_A" and a_only.recovered == truth
    assert len(both.checks) == 2 and both.recovered == truth


def test_flat_manifest_vector_round_trips_through_split_update(ffa):
    model, template = ffa
    batch = _batch(template, SHORT, ("Ha", "", "ha"))  # two records, one step: the row space of the union
    truth = visible_tokens(model, batch, "q_proj")
    update = dp_step_update(model, batch, noise_multiplier=0.0, learning_rate=0.5)
    manifest = AdapterManifest.of(model, "ffa")
    flat = np.concatenate([update[name].numpy().ravel() for name, _ in manifest.entries])
    result = TokenRecovery().run(model, split_update(manifest, flat), true_tokens=truth)
    assert result.n_vis < R and result.recovered == truth, f"n_vis={result.n_vis} r={R}"
    with pytest.raises(AttackConfigError, match="manifest needs"):
        split_update(manifest, flat[:-1])


# ----------------------------------------------------------------------------------------------------------------
# Where it stops working: n_vis >= r, DP noise, Adam
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("module", ["q_proj", "v_proj"])
def test_more_distinct_tokens_than_r_recovers_nothing_exactly(ffa, module):
    model, template = ffa
    batch = _batch(template, LONG)
    truth = visible_tokens(model, batch, module)
    grad = loss_gradient(model, batch)
    result = TokenRecovery(TokenRecoveryConfig(module=module)).run(model, grad, true_tokens=truth)
    why = f"{module}: n_vis={result.n_vis} r={result.r} rank={result.rank}"
    assert result.n_vis > R and result.rank == R and not result.informative, why
    assert result.recovered == frozenset() and result.recall == 0.0, why
    # Without the guard the row space is all of R^r and the "exact" test passes the whole vocabulary.
    unguarded = TokenRecovery(TokenRecoveryConfig(module=module, rank_margin=0)).run(model, grad, true_tokens=truth)
    assert len(unguarded.recovered) >= 0.95 * unguarded.vocab_size, why
    assert unguarded.precision == pytest.approx(unguarded.chance_precision, abs=0.01), why
    # What still leaks: a soft ranking above chance. Measured precision@T 0.38 (q) / 0.44 (v) here, 0.28-0.44 over
    # six A0 seeds, against chance 0.15 (+2 SE = 0.27, +3 SE = 0.32): the claim tested is the seed-robust one.
    p = result.chance_precision
    assert result.precision_at_t > p + 2 * math.sqrt(p * (1 - p) / result.top_t), why


def test_dp_noise_at_an_accountant_sigma_leaves_only_chance(ffa):
    # sigma = 1, C = 1, one record: the noise on layer 0's q lora_B block has Frobenius norm ~ sqrt(64 * 16) = 32
    # against a clipped signal of norm <= 1, so the row space is a random full-rank one. T = n_vis makes the
    # chance level of precision@T equal to T/|V|; pooling seeds tightens the binomial SE.
    model, template = ffa
    batch = _batch(template, SHORT)
    truth = visible_tokens(model, batch, "q_proj")
    attack = TokenRecovery()
    name = _lora(model, "q_proj", "lora_B")
    signal = float(dp_step_update(model, batch, noise_multiplier=0.0)[name].norm())
    hits = draws = 0
    for seed in range(20):
        update = dp_step_update(model, batch, noise_multiplier=1.0, max_grad_norm=1.0, noise_seed=seed)
        result = attack.run(model, update, true_tokens=truth)
        assert result.rank == R and result.recovered == frozenset(), f"seed {seed}: rank {result.rank}"
        assert result.top_t == result.n_vis
        hits += result.top_hits
        draws += result.top_t
        noise = float(update[name].norm())
    p = result.n_vis / result.vocab_size
    bound = p + 3 * math.sqrt(p * (1 - p) / draws)
    assert hits / draws <= bound, (
        f"pooled precision@T {hits / draws:.3f} > chance {p:.3f} + 3 SE = {bound:.3f} "
        f"(n_vis={result.n_vis}, r={R}, |V|={result.vocab_size}, signal/noise norm {signal / noise:.3f})"
    )


@pytest.mark.parametrize("module", ["q_proj", "v_proj"])
def test_adam_first_step_destroys_the_row_space(ffa, module):
    # Adam's first step is lr * g / (|g| + eps) ~ lr * sign(g): elementwise, so not in span{A0 x_t}. For v_proj the
    # sign matrix is often not even full rank (rank 5-10 over six A0 seeds), yet no token lies in its row space,
    # and the attacker sees that (recovered != rank). The soft ranking keeps some signal for q_proj (precision@T
    # 0.21-0.36 against chance 0.05 over six seeds), not asserted here.
    model, template = ffa
    batch = _batch(template, SHORT)
    truth = visible_tokens(model, batch, module)
    update = dp_step_update(model, batch, noise_multiplier=0.0, optimizer="adam", learning_rate=0.01)
    name = _lora(model, module, "lora_B")
    nonzero = update[name][update[name] != 0].abs()
    assert torch.allclose(nonzero, torch.full_like(nonzero, 0.01), rtol=0.05)  # it really is ~ lr * sign(g)
    result = TokenRecovery(TokenRecoveryConfig(module=module)).run(model, update, true_tokens=truth)
    why = f"{module}: n_vis={result.n_vis} r={R} rank={result.rank}"
    assert result.n_vis < R and result.recovered == frozenset() and not result.self_consistent, why


# ----------------------------------------------------------------------------------------------------------------
# Ground truth, results, errors
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("module", "silent"), [("q_proj", {0, -1}), ("v_proj", {-1})])
def test_visible_tokens_match_the_positions_that_receive_gradient(ffa, module, silent):
    model, template = ffa
    batch = _batch(template, SHORT)
    layer = next(m for n, m in model.named_modules() if n.endswith(f"layers.0.self_attn.{module}"))
    captured: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        loss = per_example_loss(model, batch).sum()
    finally:
        handle.remove()
    (g,) = torch.autograd.grad(loss, captured)
    length = int(batch.attention_mask.sum())
    norms = g[0, :length].norm(dim=1)
    zero = {j for j in range(length) if norms[j] <= 1e-6 * norms.max()}  # position 0 of q_proj: ~1e-7 relative
    assert zero == {j % length for j in silent}
    ids = batch.input_ids[0].tolist()
    x = _layer_inputs(model)
    expected = {ids[j] for j in range(length) if j not in zero and bool(x[ids[j]].abs().sum() > 0)}
    assert visible_tokens(model, batch, module) == expected


def test_rows_report_precision_recall_and_precision_at_t_with_chance(ffa):
    model, template = ffa
    batch = _batch(template, SHORT)
    truth = visible_tokens(model, batch, "q_proj")
    result = TokenRecovery(TokenRecoveryConfig(top_t=5)).run(model, loss_gradient(model, batch), true_tokens=truth)
    rows = {row.metric: row for row in result.rows()}
    assert set(rows) == {"precision", "recall", "precision_at_T"}
    assert all(row.attack == "token_recovery" and row.ci_low <= row.value <= row.ci_high for row in rows.values())
    assert rows["precision"].chance == rows["precision_at_T"].chance == pytest.approx(len(truth) / result.vocab_size)
    assert rows["recall"].chance == pytest.approx(len(result.recovered) / result.vocab_size)
    assert result.top_t == 5 and rows["precision_at_T"].value == 1.0
    blind = TokenRecovery().run(model, loss_gradient(model, batch))
    assert blind.precision is None and blind.top_t == blind.rank and blind.recovered == result.recovered
    with pytest.raises(AttackConfigError, match="ground truth"):
        blind.rows()


def test_configuration_errors_name_the_problem(tiny_model_dir, ffa):
    with pytest.raises(AttackConfigError, match="module"):
        TokenRecoveryConfig(module="o_proj")
    with pytest.raises(AttackConfigError, match="layer"):
        TokenRecoveryConfig(layer=1)
    with pytest.raises(AttackConfigError, match="distance_threshold"):
        TokenRecoveryConfig(distance_threshold=0)
    model, _ = ffa
    with pytest.raises(AttackConfigError, match="expected shape"):
        TokenRecovery().run(model, torch.zeros(64, R + 1))
    with pytest.raises(AttackConfigError, match="no lora_B or lora_A update"):
        TokenRecovery().run(model, {"unrelated": torch.zeros(3)})
    with pytest.raises(AttackConfigError, match="non-empty"):
        TokenRecovery().run(model, torch.zeros(64, R), true_tokens=set())
    q_only, _ = _model(tiny_model_dir, targets=("q_proj",))
    with pytest.raises(AttackConfigError, match="no \\(single\\) LoRA adapter"):
        TokenRecovery(TokenRecoveryConfig(module="v_proj")).run(q_only, torch.zeros(32, R))
