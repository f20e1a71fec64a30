"""Tiny random causal LMs with a byte-level tokenizer and a ChatML template, saved to a folder.

They stand in for a Hugging Face model path in tests and in `secure-fedllm evaluate --quick`: the
whole pipeline (loading, LoRA, DP-SGD, secure aggregation, evaluation, saving) runs on one in
seconds, with no download. The weights are random: only the mechanics are real. One per
architecture whose module layout matters to LoRA targeting and to Opacus' per-sample gradients
(`TINY_ARCHITECTURES`): separate q/v projections (LLaMA, Qwen2, Mistral, Gemma), a fused qkv
projection (Phi-3), and transformers' `Conv1D` with transposed weights (GPT-2). Qwen2, Gemma and
GPT-2 tie the output head to the embeddings, as their small released checkpoints do.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    GemmaConfig,
    GemmaForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

TINY_ARCHITECTURES = ("llama", "qwen2", "mistral", "gemma", "phi3", "gpt2")
"""The architectures `save_tiny_model` builds (each its transformers `model_type`)."""

_HIDDEN, _INTERMEDIATE, _LAYERS, _HEADS, _KV_HEADS, _POSITIONS = 64, 128, 2, 4, 2, 512

__all__ = ["CHATML", "TINY_ARCHITECTURES", "save_tiny_llama", "save_tiny_model"]


def save_tiny_model(folder: str | Path, architecture: str = "llama", *, seed: int = 0) -> Path:
    """Write a 2-layer, hidden-64 random model of `architecture` and the byte-level ChatML tokenizer to `folder`.

    Every architecture shares the tokenizer (258 ids: 256 bytes, <|im_start|> as bos, <|im_end|> as
    eos and pad) and takes at least 512 positions.

    Raises:
        ValueError: `architecture` is not one of `TINY_ARCHITECTURES`.
    """
    if architecture not in TINY_ARCHITECTURES:
        raise ValueError(f"architecture={architecture!r}: choose one of {', '.join(TINY_ARCHITECTURES)}")
    folder = Path(folder)
    tokenizer, vocab = _byte_tokenizer(architecture)
    torch.manual_seed(seed)
    model = _model(architecture, vocab)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def save_tiny_llama(folder: Path, *, seed: int = 0) -> Path:
    """Write a 2-layer, hidden-64 LLaMA and its tokenizer to `folder` (`save_tiny_model(folder, "llama")`)."""
    return save_tiny_model(folder, "llama", seed=seed)


def _byte_tokenizer(architecture: str) -> tuple[PreTrainedTokenizerFast, dict[str, int]]:
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    for special in ("<|im_start|>", "<|im_end|>"):
        vocab[special] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    # AutoTokenizer loads a qwen2 folder with Qwen2Tokenizer, whose unk_token defaults to an
    # "<|endoftext|>" it would add at id 258, past the model's vocabulary: name an existing one.
    extra: dict[str, str] = {"unk_token": "<|im_end|>"} if architecture == "qwen2" else {}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|im_end|>", **extra)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    tokenizer.chat_template = CHATML
    return tokenizer, vocab


def _model(architecture: str, vocab: dict[str, int]) -> PreTrainedModel:
    # The LLaMA branch must stay exactly as it was (config and construction under the same seed):
    # tests and `threat_models` pin results computed on save_tiny_llama's weights.
    ids: dict[str, Any] = {
        "vocab_size": len(vocab),
        "eos_token_id": vocab["<|im_end|>"],
        "pad_token_id": vocab["<|im_end|>"],
        "bos_token_id": vocab["<|im_start|>"],
    }
    config: PretrainedConfig
    if architecture == "gpt2":
        config = GPT2Config(
            n_embd=_HIDDEN,
            n_inner=_INTERMEDIATE,
            n_layer=_LAYERS,
            n_head=_HEADS,
            n_positions=_POSITIONS,  # GPT-2's learned position table: no token past it has an embedding
            # GPT-2 defaults to dropout 0.1, live whenever DP-SGD puts the model in train mode; the
            # LLaMA-family models here have none, and tests compare train-mode gradients with eval-mode ones
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            tie_word_embeddings=True,
            **ids,
        )
        return GPT2LMHeadModel(config)
    common: dict[str, Any] = {
        "hidden_size": _HIDDEN,
        "intermediate_size": _INTERMEDIATE,
        "num_hidden_layers": _LAYERS,
        "num_attention_heads": _HEADS,
        "max_position_embeddings": _POSITIONS,
        **ids,
    }
    if architecture == "llama":
        return LlamaForCausalLM(LlamaConfig(num_key_value_heads=_KV_HEADS, **common))
    if architecture == "qwen2":
        config = Qwen2Config(num_key_value_heads=_KV_HEADS, tie_word_embeddings=True, **common)
        return Qwen2ForCausalLM(config)
    if architecture == "mistral":
        # head_dim defaults to 128 in MistralConfig; the sliding window would never bind at 512 positions
        config = MistralConfig(num_key_value_heads=_KV_HEADS, head_dim=_HIDDEN // _HEADS, sliding_window=None, **common)
        return MistralForCausalLM(config)
    if architecture == "gemma":
        # head_dim defaults to 256 in GemmaConfig; Gemma ties its head to the embeddings
        config = GemmaConfig(
            num_key_value_heads=_KV_HEADS, head_dim=_HIDDEN // _HEADS, tie_word_embeddings=True, **common
        )
        return GemmaForCausalLM(config)
    # phi3: fused qkv_proj (q, then k, then v rows) and gate_up_proj
    config = Phi3Config(num_key_value_heads=_KV_HEADS, original_max_position_embeddings=_POSITIONS, **common)
    return Phi3ForCausalLM(config)
