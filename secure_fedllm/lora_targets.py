"""Which modules get LoRA adapters: `lora.target_modules` resolved against the actual model.

Module names differ by architecture (LLaMA's `q_proj`/`v_proj`, Phi-3's fused `qkv_proj`, GPT-2's
fused `c_attn`, a transformers `Conv1D`), so a name list that fits one model silently fits no layer
of another; peft then refuses with an error that names neither the setting nor the fix. Here the
portable specs ("attention", "all-linear") become explicit names for the model at hand, and explicit
names are checked against it, before peft sees anything. The resolved names (not the spec) are what
the adapter configuration, and so its hash in every round's transcript, records.

Matching follows peft: a name matches a module whose dotted path equals it or ends in "." + name.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import torch
from transformers.pytorch_utils import Conv1D

from .errors import ConfigError

__all__ = ["ALL_LINEAR", "ATTENTION", "ATTENTION_TARGETS", "adaptable_layers", "resolve_target_modules"]

ATTENTION = "attention"
"""The default spec: the query and value projections (Hu et al.'s LoRA setting), per architecture."""

ALL_LINEAR = "all-linear"
"""Every Linear / Conv1D layer inside the decoder blocks; the output head (lm_head) is left out."""

ATTENTION_TARGETS: dict[str, tuple[str, ...]] = {
    "llama": ("q_proj", "v_proj"),
    "mistral": ("q_proj", "v_proj"),
    "mixtral": ("q_proj", "v_proj"),
    "qwen2": ("q_proj", "v_proj"),
    "qwen3": ("q_proj", "v_proj"),
    "gemma": ("q_proj", "v_proj"),
    "gemma2": ("q_proj", "v_proj"),
    "gemma3_text": ("q_proj", "v_proj"),
    "phi3": ("qkv_proj",),  # q, k and v in one fused projection: adapting it also adapts k
    "gpt2": ("c_attn",),  # fused q, k, v as a transformers Conv1D (weight stored in x out)
}
"""`model.config.model_type` -> the names "attention" resolves to."""

_KNOWN_ATTENTION: tuple[tuple[str, ...], ...] = (
    ("q_proj", "v_proj"),
    ("qkv_proj",),
    ("c_attn",),
    ("query_key_value",),
    ("Wqkv",),
    ("query", "value"),
)
"""Name sets tried, in order, for a model type not in `ATTENTION_TARGETS`."""

_LAYER_TYPES = (torch.nn.Linear, Conv1D)


def adaptable_layers(model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Module]]:
    """The Linear and Conv1D layers inside the model's blocks (under an `nn.ModuleList`), output head excluded."""
    lists = [name for name, module in model.named_modules() if isinstance(module, torch.nn.ModuleList) and name]
    head = _output_head(model)
    for name, module in model.named_modules():
        if (
            isinstance(module, _LAYER_TYPES)
            and module is not head
            and any(name.startswith(prefix + ".") for prefix in lists)
        ):
            yield name, module


def resolve_target_modules(model: torch.nn.Module, spec: str | Sequence[str]) -> tuple[str, ...]:
    """Explicit module names for `spec` on `model` (the base model, before LoRA is attached).

    `spec` is "attention", "all-linear", one module name, or a sequence of names. A one-element
    sequence is always taken as a name, so `("attention",)` targets modules called "attention".

    Raises:
        ConfigError: `spec` matches nothing in `model` (the message names `lora.target_modules`,
            the missing name and candidate layer names).
    """
    if spec == ATTENTION:
        return _attention(model)
    if spec == ALL_LINEAR:
        names = _all_linear(model)
        if not names:
            raise ConfigError(
                "lora.target_modules='all-linear' found no Linear or Conv1D layer inside the model's blocks; "
                f"give explicit module names instead (candidates: {_candidates(model)})"
            )
        return names
    names = (spec,) if isinstance(spec, str) else tuple(spec)
    if not names or any(not name for name in names):
        raise ConfigError(
            f"lora.target_modules={names!r} is empty or has an empty name; use 'attention', 'all-linear' or "
            f"module names such as {_candidates(model)}"
        )
    module_names = [name for name, _ in model.named_modules()]
    for target in names:
        if not any(_matches(name, target) for name in module_names):
            raise ConfigError(
                f"lora.target_modules: no module named {target!r} in this "
                f"{getattr(getattr(model, 'config', None), 'model_type', 'model')} model; use 'attention', "
                f"'all-linear' or names of its layers, e.g. {_candidates(model)}"
            )
    return _unique(names)


def _attention(model: torch.nn.Module) -> tuple[str, ...]:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    layer_names = [name for name, _ in adaptable_layers(model)]

    def present(names: tuple[str, ...]) -> bool:
        return all(any(_matches(layer, target) for layer in layer_names) for target in names)

    if model_type in ATTENTION_TARGETS:
        names = ATTENTION_TARGETS[model_type]
        if present(names):
            return names
        raise ConfigError(
            f"lora.target_modules='attention' means {list(names)} for model_type {model_type!r}, but this model has "
            f"no such layers; give explicit module names (candidates: {_candidates(model)})"
        )
    for names in _KNOWN_ATTENTION:
        if present(names):
            return names
    raise ConfigError(
        f"lora.target_modules='attention' does not know model_type {model_type!r} and found none of the usual "
        f"query/value projection names; set lora.target_modules to explicit module names, e.g. the query and "
        f"value projections among {_candidates(model)}"
    )


def _all_linear(model: torch.nn.Module) -> tuple[str, ...]:
    # Leaf names, as peft's own "all-linear" would use, unless a leaf name would also catch a module
    # outside the blocks (or a non-layer module): then those layers are named by their full paths.
    wanted = [name for name, _ in adaptable_layers(model)]
    chosen = set(wanted)
    others = [name for name, _ in model.named_modules() if name and name not in chosen]
    names = []
    for name in wanted:
        leaf = _leaf(name)
        names.append(name if any(_matches(other, leaf) for other in others) else leaf)
    return _unique(names)


def _output_head(model: torch.nn.Module) -> torch.nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return head if isinstance(head, torch.nn.Module) else None


def _candidates(model: torch.nn.Module, limit: int = 12) -> str:
    names = _unique(_leaf(name) for name, module in model.named_modules() if isinstance(module, _LAYER_TYPES))
    shown = ", ".join(repr(name) for name in names[:limit])
    return (shown + ", ...") if len(names) > limit else (shown or "none found")


def _matches(module_name: str, target: str) -> bool:
    return module_name == target or module_name.endswith("." + target)


def _leaf(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _unique(names: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(names))
