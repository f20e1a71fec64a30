"""Token recovery from a multi-step SGD LoRA round (`threat_models.token_recovery_rows`), on the tiny random LLaMA.

The tiny model's layer input is 64-dimensional with a 258-token byte vocabulary, so the joint sparse recovery works
only for small token sets (greedy recovery fails near n_vis ~ 0.5 d_in, well before the uniqueness bound): the
records here are two-letter words, which with the 12 template tokens give n_vis ~ 18-21 > r = 16. That is already
past the per-token span check (exact only for n_vis < r), which is the point. SmolLM2 numbers are in the module's
report, not here.
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
from secure_fedllm.training import StepSettings
from threat_models.attacks.token_recovery import (
    SparseRecoveryConfig,
    SparseTokenRecovery,
    TokenRecovery,
    TokenRecoveryConfig,
)
from threat_models.attacks.updates import flatten_update, local_update, split_update
from threat_models.errors import AttackConfigError
from threat_models.token_recovery_rows import (
    TokenRecoveryPlan,
    measure_token_recovery,
    realistic_token_recovery,
)

R = 16
WORDS = [
    ("Hi", "", "hi"), ("Ok?", "", "ok"), ("Yo", "", "yo"), ("Go", "", "go"), ("No", "", "no"),
    ("Up", "", "up"), ("Be", "", "be"), ("Me", "", "me"), ("We", "", "we"), ("So", "", "so"),
    ("Do", "", "do"), ("To", "", "to"), ("At", "", "at"), ("Is", "", "is"), ("It", "", "it"),
    ("As", "", "as"), ("Am", "", "am"), ("An", "", "an"), ("By", "", "by"), ("If", "", "if"),
]  # fmt: skip
PLAN = TokenRecoveryPlan(records_per_client=4, expected_batch_size=2, local_steps=2, max_length=64)
DEFENSES = ("none", "secagg+ (sum of 4)", "dp-eps8")


def _records(clients: int = 5, per_client: int = 4) -> list[list[TextRecord]]:
    return [
        [TextRecord(*WORDS[(c * per_client + i) % len(WORDS)], unit=f"c{c}r{i}") for i in range(per_client)]
        for c in range(clients)
    ]


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cases(tiny_model_dir):
    found = measure_token_recovery(str(tiny_model_dir), seed=0, plan=PLAN, records=_records())
    return {(c.mode, c.defense): c for c in found}


def _fedit(tiny_model_dir):
    base, tokenizer = load_base_model(ModelConfig(name=str(tiny_model_dir)))
    model = attach_lora(base, LoraConfig(r=R, aggregation="fedit"), a0_seed=3)
    return model, ChatTemplate(tokenizer, system_prompt="", max_length=64)


def _layer_inputs(model) -> torch.Tensor:
    inner = model.base_model.model.model
    with torch.no_grad():
        return inner.layers[0].input_layernorm(inner.embed_tokens.weight).double()


def _name(model, module: str, tensor: str) -> str:
    return next(n for n, _ in model.named_parameters() if f"layers.0.self_attn.{module}.{tensor}." in n)


# ----------------------------------------------------------------------------------------------------------------
# The rows: no defense, SecAgg+ sum, DP at epsilon 8, in both adapter modes
# ----------------------------------------------------------------------------------------------------------------


def test_fedit_round_without_defense_gives_the_exact_token_set(cases):
    none = cases[("fedit", "none")]
    assert none.n_vis > R, "the point: more distinct tokens than the rank, where the per-token check is vacuous"
    assert none.records >= 2
    assert none.certified and none.recovered == none.n_vis == none.hits
    assert none.value("precision") == 1.0 and none.value("recall") == 1.0 and none.value("precision_at_T") == 1.0


def test_ffa_default_defeats_the_exact_attack_on_the_same_records(cases):
    # The control is the fedit row above (same records, same steps): exact recovery there, nothing here.
    ffa, fedit = cases[("ffa", "none")], cases[("fedit", "none")]
    assert ffa.n_vis > R and fedit.certified
    assert ffa.recovered == 0 and not ffa.certified
    assert ffa.value("precision") == 0.0 and ffa.value("recall") == 0.0
    # What still leaks in FFA: the soft ranking, above chance (measured 0.38-0.44 over seeds 0-3, chance 0.07-0.08).
    p = ffa.n_vis / 258
    assert ffa.value("precision_at_T") > p + 2 * math.sqrt(p * (1 - p) / ffa.n_vis)


def test_secagg_sum_scores_below_the_clients_own_update(cases):
    none, summed = cases[("fedit", "none")], cases[("fedit", "secagg+ (sum of 4)")]
    assert summed.observed_tokens > summed.n_vis, "the other three clients add tokens the target never saw"
    # The server recovers (at best) the union; against the target's tokens its precision falls to about
    # n_vis / union (measured 0.56-0.66 when certified, 0.35 when not), while the target's own update scores 1.
    assert summed.value("precision") <= summed.n_vis / summed.observed_tokens + 1e-9
    assert summed.value("precision") < none.value("precision") - 0.2
    assert summed.hits <= summed.n_vis


def test_dp_at_the_accountants_sigma_for_epsilon_8_leaves_chance(cases):
    none, dp = cases[("fedit", "none")], cases[("fedit", "dp-eps8")]
    assert dp.noise_multiplier > 0.5, "sigma from client_policy for the plan's q and steps"
    assert dp.n_vis == none.n_vis and dp.records == none.records, "same sampled records as the control"
    assert none.certified and not dp.certified
    p = dp.n_vis / 258
    for metric, trials in (("precision", dp.recovered), ("precision_at_T", dp.n_vis)):
        bound = p + 3 * math.sqrt(p * (1 - p) / trials)
        assert dp.value(metric) <= bound, f"{metric} {dp.value(metric):.3f} > chance {p:.3f} + 3 SE"
    assert dp.value("recall") < 0.5 < none.value("recall")


def test_rows_carry_the_labels_the_matrix_expects(tiny_model_dir):
    # The synthetic private records (the default), in bytes: a longer max_length for the byte-level tokenizer.
    plan = PLAN.model_copy(update={"modes": ("ffa",), "max_length": 160})
    rows = realistic_token_recovery(str(tiny_model_dir), seed=1, plan=plan)
    assert {r.defense for r in rows} == set(DEFENSES)
    assert {r.attack for r in rows} == {"token_recovery"}
    assert {r.metric for r in rows} == {"precision", "recall", "precision_at_T", "certified"}
    assert all(r.chance is not None and r.ci_low <= r.value <= r.ci_high for r in rows if r.metric != "certified")


def test_fedit_rows_are_prefixed(cases):
    metrics = {r.metric for c in cases.values() if c.mode == "fedit" for r in c.rows}
    assert metrics == {"fedit_precision", "fedit_recall", "fedit_precision_at_T", "fedit_certified"}


# ----------------------------------------------------------------------------------------------------------------
# The joint sparse recovery on hand-built updates
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [20, 28])
def test_joint_recovery_finds_more_tokens_than_the_rank(tiny_model_dir, k):
    model, _ = _fedit(tiny_model_dir)
    x = _layer_inputs(model)
    live = torch.nonzero(x.abs().sum(dim=1) > 0).flatten()
    gen = torch.Generator().manual_seed(k)
    chosen = live[torch.randperm(live.numel(), generator=gen)[:k]]
    truth = {int(t) for t in chosen}
    update = {
        _name(model, m, "lora_A"): torch.randn(R, k, generator=gen, dtype=torch.float64) @ x[chosen] * 1e-3
        for m in ("q_proj", "v_proj")
    }
    result = SparseTokenRecovery().run(model, update, roundings=4, true_tokens=truth)
    assert result.certified and result.recovered == truth, f"k={k}: missed {truth - result.recovered}"
    assert (
        len(result.selected) >= k
        and result.residuals[-1] * float(torch.cat(list(update.values())).norm()) <= 4 * result.floor
    )
    assert set(result.ranking[:k].tolist()) == truth
    # The per-token span check on the same lora_A update: rank r = max, not informative, nothing recovered.
    per_token = TokenRecovery(TokenRecoveryConfig(module="v_proj")).run(
        model, {_name(model, "v_proj", "lora_A"): update[_name(model, "v_proj", "lora_A")]}, true_tokens=truth
    )
    assert not per_token.informative and per_token.recovered == frozenset()


def test_noise_above_the_rounding_floor_is_never_certified(tiny_model_dir):
    model, _ = _fedit(tiny_model_dir)
    x = _layer_inputs(model)
    chosen = torch.arange(40, 60)
    gen = torch.Generator().manual_seed(5)
    name = _name(model, "v_proj", "lora_A")
    clean = torch.randn(R, 20, generator=gen, dtype=torch.float64) @ x[chosen] * 1e-3
    noisy = clean + 1e-3 * clean.norm() / math.sqrt(clean.numel()) * torch.randn(clean.shape, generator=gen)
    attack = SparseTokenRecovery(SparseRecoveryConfig(modules=("v_proj",)))
    assert attack.run(model, {name: clean}, roundings=1).certified  # the control: same tokens, no noise
    result = attack.run(model, {name: noisy}, roundings=1, true_tokens={int(t) for t in chosen})
    assert not result.certified and len(result.recovered) == (64 + R) // 2  # the greedy budget, a guess
    assert result.floor < 1e-3 * float(clean.norm())


def test_pruning_drops_wrong_early_choices_once_the_residual_is_at_the_floor(tiny_model_dir):
    # On SmolLM2 the greedy search picks ~20 wrong tokens on its way to the ~120 true ones; pruning removes them.
    model, _ = _fedit(tiny_model_dir)
    x = _layer_inputs(model)
    xn = x / x.norm(dim=1, keepdim=True).clamp_min(1e-300)
    gen = torch.Generator().manual_seed(2)
    true = list(range(40, 60))
    wrong = [100, 71, 200, 150, 33, 250]
    y = (torch.randn(2 * R, len(true), generator=gen, dtype=torch.float64) @ x[true]).T  # d_in x m
    selected = [*true[:5], wrong[0], *true[5:12], *wrong[1:4], *true[12:], *wrong[4:]]
    target = 1e-9 * float(y.norm())
    assert SparseTokenRecovery._prune(xn, y, selected, target) == true
    # Control: with a tolerance above the whole update every token can go, so the answer depends on the floor.
    assert SparseTokenRecovery._prune(xn, y, selected, 1.01 * float(y.norm())) == []


def test_sparse_recovery_errors_name_the_problem(tiny_model_dir):
    model, _ = _fedit(tiny_model_dir)
    name = _name(model, "q_proj", "lora_A")
    with pytest.raises(AttackConfigError, match="lora_A update is zero"):
        SparseTokenRecovery().run(model, {name: torch.zeros(R, 64)}, roundings=1)
    with pytest.raises(AttackConfigError, match="no lora_A update"):
        SparseTokenRecovery().run(model, {_name(model, "q_proj", "lora_B"): torch.ones(64, R)}, roundings=1)
    with pytest.raises(AttackConfigError, match="expected shape"):
        SparseTokenRecovery().run(model, {name: torch.ones(R, 63)}, roundings=1)
    with pytest.raises(AttackConfigError, match="roundings"):
        SparseTokenRecovery().run(model, {name: torch.ones(R, 64)}, roundings=-1)
    with pytest.raises(AttackConfigError, match="floor_factor"):
        SparseRecoveryConfig(floor_factor=1.0)
    with pytest.raises(AttackConfigError, match=r"plan\.clients"):
        measure_token_recovery(str(tiny_model_dir), seed=0, plan=PLAN, records=_records(clients=4))


# ----------------------------------------------------------------------------------------------------------------
# The client-round helper
# ----------------------------------------------------------------------------------------------------------------


def test_local_update_is_a_real_round_and_restores_the_model(tiny_model_dir):
    model, template = _fedit(tiny_model_dir)
    data = TokenizedDataset.build(_records(clients=1, per_client=8)[0], template)
    settings = StepSettings(
        noise_multiplier=0.0, max_grad_norm=1.0, sample_rate=0.5, expected_batch_size=4, steps=3,
        learning_rate=0.5, optimizer="sgd",
    )  # fmt: skip
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    clean = local_update(model, data, settings, sample_seed=9)
    noisy = local_update(model, data, StepSettings(**{**settings.__dict__, "noise_multiplier": 1.0}), sample_seed=9)
    assert clean.batches == noisy.batches and len(clean.batches) == 3 and any(clean.batches)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)
    b = _name(model, "q_proj", "lora_B")
    assert float(clean.update[b].norm()) > 0 and not torch.allclose(clean.update[b], noisy.update[b])
    kept = local_update(model, data, settings, sample_seed=9, keep=True)
    after = dict(model.named_parameters())[b].detach().double()
    assert torch.allclose(after - before[b].double(), kept.update[b]) and torch.equal(kept.update[b], clean.update[b])
    manifest = AdapterManifest.of(model, "fedit")
    flat = flatten_update(manifest, clean.update)
    assert flat.shape == (manifest.dimension,) and flat.dtype == np.float64
    back = split_update(manifest, flat)
    assert all(torch.equal(back[name], clean.update[name]) for name, _ in manifest.entries)
    with pytest.raises(AttackConfigError, match="expected shape"):
        flatten_update(manifest, {**clean.update, b: clean.update[b][:1]})
