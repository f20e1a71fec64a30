"""LoRA targets per architecture: FFA, DP-SGD and a SecAgg+ round on LLaMA, Qwen2, Mistral, Gemma, Phi-3, GPT-2.

Each architecture is a tiny random model (`save_tiny_model`). What must hold on every one: the
portable "attention" spec names the query/value projections that model really has; only B trains
and the adapters are float32 even on a bfloat16 base; GPT-2's transposed `Conv1D` weights are
adapted with the right orientation (merging the adapter changes nothing); Opacus' per-sample
gradients are the textbook per-record gradients; and one federated DP round under SecAgg+ runs,
moves the global adapter and spends privacy.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from transformers.pytorch_utils import Conv1D

from secure_fedllm import ConfigError, RunConfig, run
from secure_fedllm.adapters import AdapterManifest, adapter_fingerprints, attach_lora
from secure_fedllm.config import LoraConfig, ModelConfig
from secure_fedllm.data import ChatTemplate, TextRecord, TokenizedDataset
from secure_fedllm.lora_targets import resolve_target_modules
from secure_fedllm.models import load_base_model
from secure_fedllm.tiny_model import TINY_ARCHITECTURES, save_tiny_model
from secure_fedllm.training import LocalTrainer, per_example_loss

ATTENTION = {
    "llama": ("q_proj", "v_proj"),
    "qwen2": ("q_proj", "v_proj"),
    "mistral": ("q_proj", "v_proj"),
    "gemma": ("q_proj", "v_proj"),
    "phi3": ("qkv_proj",),
    "gpt2": ("c_attn",),
}
LAYERS = 2


@pytest.fixture(scope="module", params=TINY_ARCHITECTURES)
def tiny(request, tmp_path_factory) -> tuple[str, Path]:
    return request.param, save_tiny_model(tmp_path_factory.mktemp(f"tiny-{request.param}"), request.param)


def _lora_layers(model):
    return [(n, m) for n, m in model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A]


def test_tiny_model_config_agrees_with_its_tokenizer(tiny):
    arch, folder = tiny
    base, tokenizer = load_base_model(ModelConfig(name=str(folder)))
    config = base.config
    assert config.model_type == arch
    assert len(tokenizer) <= config.vocab_size == 258  # every token id has an embedding row
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.eos_token_id == tokenizer.pad_token_id == config.eos_token_id == config.pad_token_id == im_end
    positions = config.n_positions if arch == "gpt2" else config.max_position_embeddings
    assert positions >= 512
    tied = base.get_output_embeddings().weight is base.get_input_embeddings().weight
    assert tied == (arch in ("qwen2", "gemma", "gpt2"))  # as saved: loading kept (or did not invent) the tie


def test_attention_targets_attach_trainable_b_only_in_float32(tiny):
    arch, folder = tiny
    base, _ = load_base_model(ModelConfig(name=str(folder)), dtype="bfloat16")
    assert resolve_target_modules(base, "attention") == ATTENTION[arch]
    all_linear = resolve_target_modules(base, "all-linear")
    assert set(ATTENTION[arch]) <= set(all_linear) and "lm_head" not in all_linear
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = attach_lora(base, LoraConfig(r=4), a0_seed=7)
    assert not [w for w in caught if "fan_in_fan_out" in str(w.message)]  # peft had to fix the orientation itself
    layers = _lora_layers(model)
    assert sorted({n.rsplit(".", 1)[-1] for n, _ in layers}) == sorted(ATTENTION[arch])
    assert len(layers) == LAYERS * len(ATTENTION[arch])
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_B." in n for n in trainable) and len(trainable) == len(layers)
    for _, layer in layers:
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        assert a.dtype == b.dtype == torch.float32 and layer.get_base_layer().weight.dtype == torch.bfloat16
        base_layer = layer.get_base_layer()
        fan_in = base_layer.weight.shape[0] if isinstance(base_layer, Conv1D) else base_layer.weight.shape[1]
        assert a.shape == (4, fan_in) and 0 < float(a.abs().max()) <= 1 / math.sqrt(fan_in)  # Kaiming on fan_in
        assert not a.requires_grad and b.requires_grad and not b.any()


def test_merging_the_adapter_matches_the_unmerged_forward(tiny):
    """The adapter's orientation (fan_in_fan_out for GPT-2's Conv1D) is right: W + s*BA in the base's layout."""
    _, folder = tiny
    base, _ = load_base_model(ModelConfig(name=str(folder)))
    model = attach_lora(base, LoraConfig(r=4), a0_seed=7)
    name, layer = _lora_layers(model)[0]
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.5)
        x = torch.randn(3, 5, layer.in_features, generator=torch.Generator().manual_seed(0))
        unmerged, plain = layer(x), layer.get_base_layer()(x)
        layer.merge()
        merged = layer(x)
        layer.unmerge()
    assert not torch.allclose(unmerged, plain, atol=1e-3), name  # the adapter does something
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-4)


def test_opacus_per_sample_gradients_equal_per_record_autograd(tiny):
    _, folder = tiny
    base, tokenizer = load_base_model(ModelConfig(name=str(folder)))
    model = attach_lora(base, LoraConfig(r=4), a0_seed=7)
    template = ChatTemplate(tokenizer, system_prompt="", max_length=96)
    records = [TextRecord(f"Q {i}?", "", f"Answer {i} {'z' * (3 * i)}.", unit=f"u{i}") for i in range(3)]
    data = TokenizedDataset.build(records, template)
    assert data.dropped == 0 and data.num_units == 3
    order = list(AdapterManifest.of(model, "ffa").check(model).values())
    with torch.no_grad():  # non-zero B so that gradients flow through every later layer's adapter too
        for p in order:
            p.normal_(0, 0.05, generator=torch.Generator().manual_seed(p.numel()))
    model.eval()
    expected = []  # before Opacus' hooks are attached (they would capture these forward passes)
    for row in range(3):
        loss = per_example_loss(model, data.batch_of_rows([row]))[0]
        expected.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, order)]))
    got = LocalTrainer(model).per_unit_gradients(data.batch_of_units([0, 1, 2]), order)
    assert got.shape == (3, sum(p.numel() for p in order))
    for row in range(3):
        assert float(expected[row].abs().max()) > 0
        torch.testing.assert_close(got[row], expected[row], atol=1e-6, rtol=1e-4)
    assert not torch.allclose(got[0], got[1])  # per record, not a batch mean


def test_one_federated_dp_round_with_secagg_plus(tiny, tmp_path):
    arch, folder = tiny
    config = RunConfig().with_overrides(
        [
            f'model.name="{folder}"',
            "federation.clients=3",
            "federation.rounds=1",
            "federation.local_steps=1",
            "data.records_per_client=36",  # the planted canaries need > 32 at one of 3 clients
            "data.max_length=144",  # no truncation warning for the synthetic records
            "evaluation.heldout_records=2",
            "evaluation.generations=0",
            "privacy.expected_batch_size=4",
            "lora.r=2",
            "privacy.noise_seed=11",
            'privacy.accountant="rdp"',  # PLD accounting is most of a tiny run's time, and no architecture's concern
            'secure_aggregation.protocol="secagg+"',
            "secure_aggregation.dropout_rate=0.0",
        ]
    )
    result = run(config, out=tmp_path / "run", progress=False)
    assert [r.round for r in result.metrics] == [0, 1]
    final = result.metrics[1]
    assert final.included == [0, 1, 2] and final.aborted is None
    assert final.protocol is not None and not final.protocol.insecure and final.protocol.threshold >= 2
    assert set(result.epsilons) == {0, 1, 2} and all(0 < e <= 8.0 for e in result.epsilons.values())
    assert math.isfinite(final.eval_loss)
    saved = load_file(str(result.adapter / "adapter_model.safetensors"))
    b = [v for k, v in saved.items() if "lora_B" in k]
    assert len(b) == LAYERS * len(ATTENTION[arch]) and any(v.abs().sum() > 0 for v in b)  # moved from B = 0
    adapter_config = json.loads((result.adapter / "adapter_config.json").read_text())
    assert sorted(adapter_config["target_modules"]) == sorted(ATTENTION[arch])
    assert adapter_config["fan_in_fan_out"] is (arch == "gpt2")


# -- resolution ------------------------------------------------------------------------------------


def test_attention_on_llama_is_q_and_v_and_keeps_the_adapter_hashes(tiny_model_dir):
    base, _ = load_base_model(ModelConfig(name=str(tiny_model_dir)))
    assert LoraConfig().target_modules == "attention"
    assert resolve_target_modules(base, "attention") == ("q_proj", "v_proj")
    default = adapter_fingerprints(attach_lora(base, LoraConfig(r=4), a0_seed=3))
    base, _ = load_base_model(ModelConfig(name=str(tiny_model_dir)))
    explicit = adapter_fingerprints(attach_lora(base, LoraConfig(r=4, target_modules=("q_proj", "v_proj")), a0_seed=3))
    assert default == explicit


def test_unknown_explicit_name_is_a_config_error_naming_the_field(tiny_model_dir):
    base, _ = load_base_model(ModelConfig(name=str(tiny_model_dir)))
    with pytest.raises(ConfigError, match=r"lora\.target_modules.*'query_projection'.*'q_proj'"):
        resolve_target_modules(base, ("q_proj", "query_projection"))
    with pytest.raises(ConfigError, match=r"lora\.target_modules.*'c_attn'"):
        attach_lora(base, LoraConfig(target_modules="c_attn"), a0_seed=0)
    with pytest.raises(ConfigError, match=r"lora\.target_modules.*empty"):
        resolve_target_modules(base, ())
    # explicit names are matched like peft does: a dotted suffix, or one string for one name
    assert resolve_target_modules(base, "self_attn.o_proj") == ("self_attn.o_proj",)
    assert resolve_target_modules(base, ("v_proj", "lm_head", "v_proj")) == ("v_proj", "lm_head")


class _Block(torch.nn.Module):
    def __init__(self, names: tuple[str, ...]) -> None:
        super().__init__()
        for name in names:
            self.add_module(name, torch.nn.Linear(8, 8))


class _Toy(torch.nn.Module):
    def __init__(self, model_type: str, names: tuple[str, ...]) -> None:
        super().__init__()
        self.config = SimpleNamespace(model_type=model_type)
        self.layers = torch.nn.ModuleList([_Block(names), _Block(names)])
        self.lm_head = torch.nn.Linear(8, 8)

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.lm_head


def test_attention_on_an_unknown_architecture_falls_back_to_known_names_or_says_what_to_set():
    assert resolve_target_modules(_Toy("bert-like", ("query", "key", "value", "dense")), "attention") == (
        "query",
        "value",
    )
    assert resolve_target_modules(_Toy("newlm", ("q_proj", "k_proj", "v_proj")), "attention") == ("q_proj", "v_proj")
    with pytest.raises(ConfigError, match=r"lora\.target_modules.*'newlm'.*explicit.*'wq', 'wk'"):
        resolve_target_modules(_Toy("newlm", ("wq", "wk", "wv")), "attention")
    with pytest.raises(ConfigError, match=r"lora\.target_modules.*'llama'.*'wq'"):  # a known type without the names
        resolve_target_modules(_Toy("llama", ("wq", "wv")), "attention")
    assert resolve_target_modules(_Toy("newlm", ("wq", "wv")), "all-linear") == ("wq", "wv")  # lm_head left out
