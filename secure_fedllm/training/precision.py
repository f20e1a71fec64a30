"""Where the arithmetic of DP-SGD happens in float32, whatever the base model's precision.

A site may store and run the frozen base in bfloat16 or float16 (`training.dtype`): that is only
speed and memory. The DP guarantee rests on the clipping bound and the noise, so everything that
touches a trained parameter's gradient stays float32: the LoRA weights themselves, the adapter
path of every LoRA layer (run outside autocast, so Opacus' per-example gradients are float32
products of float32 activations and backprops), the per-example norms, the clipping and the noise.

float16 needs loss scaling to keep small backprops from flushing to zero. The scale here is a
public constant, not the adaptive `GradScaler`: an adaptive scale changes with overflows, which
depend on the data, and skipping a step on overflow would publish that data-dependent event. A
unit whose gradient is not finite contributes zero instead (norm 0 is within any clipping bound,
so the accounted sensitivity still holds), and the step is never skipped.
"""

from __future__ import annotations

import contextlib
import types
from typing import Any

import torch

__all__ = [
    "FP16_LOSS_SCALE",
    "autocast_for",
    "base_dtype",
    "enable_gradient_checkpointing",
    "in_backward",
    "keep_adapters_fp32",
    "model_device",
]

FP16_LOSS_SCALE = 1024.0
"""The fixed, public loss scale of float16 DP-SGD; per-example gradients are divided by it before clipping."""


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter (models here are never split across devices)."""
    return next(model.parameters()).device


def base_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype of the frozen base's weights, which is the compute dtype of the forward pass."""
    for p in model.parameters():
        if not p.requires_grad and p.is_floating_point():
            return p.dtype
    return torch.float32


def autocast_for(model: torch.nn.Module) -> contextlib.AbstractContextManager[Any]:
    """Autocast in the base's dtype when it is a half type; a no-op context for float32."""
    dtype = base_dtype(model)
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=model_device(model).type, dtype=dtype)


def _fp32_linear(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    with torch.autocast(device_type=x.device.type, enabled=False):
        return torch.nn.functional.linear(x.float(), self.weight, self.bias)


def keep_adapters_fp32(model: torch.nn.Module) -> int:
    """Make every LoRA A and B layer compute in float32 outside autocast; returns how many.

    The layers stay `nn.Linear` instances (Opacus' per-example gradient rule for Linear applies);
    only their forward is replaced, on the instance.
    """
    count = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and (".lora_A." in f".{name}." or ".lora_B." in f".{name}."):
            if module.weight.dtype != torch.float32:
                raise ValueError(f"{name}: LoRA weights must be float32, got {module.weight.dtype}")
            module.forward = types.MethodType(_fp32_linear, module)  # type: ignore[method-assign]
            count += 1
    return count


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Recompute the base's decoder blocks in the backward pass (non-reentrant checkpointing).

    Non-reentrant, so that gradients reach the LoRA weights inside the blocks although no input
    of a block requires grad. The recomputation runs the blocks' forward a second time inside
    the backward pass; `in_backward` lets Opacus' activation hook ignore that second pass.
    """
    target: Any = model
    while not hasattr(target, "gradient_checkpointing_enable") and hasattr(target, "model"):
        target = target.model
    kwargs = {"use_reentrant": False}
    if hasattr(target, "activation_checkpointing_enable"):  # transformers 5's name (the old one warns)
        target.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif hasattr(target, "gradient_checkpointing_enable"):
        target.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        raise ValueError(f"{type(model).__name__} does not support gradient checkpointing")


def in_backward() -> bool:
    """Whether the caller runs inside an autograd backward pass (as checkpoint recomputation does)."""
    return bool(torch._C._current_graph_task_id() != -1)
