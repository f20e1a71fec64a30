"""What a server observes of a client: one step's gradient or update, and flat vectors split back by name.

The attacks read these views; building them with the project's own training code (`per_example_loss`,
`LocalTrainer`) means the attack sees exactly what a client would send.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import numpy.typing as npt
import torch
from peft import PeftModel

from secure_fedllm.adapters import AdapterManifest
from secure_fedllm.data import Batch
from secure_fedllm.training import LocalTrainer, StepSettings, per_example_loss

from ..errors import AttackConfigError

__all__ = ["dp_step_update", "loss_gradient", "split_update"]


def loss_gradient(model: PeftModel, batch: Batch) -> dict[str, torch.Tensor]:
    """Gradient of the summed per-record loss w.r.t. every trainable parameter (plain autograd, no DP).

    Why: this is the update of one noise-free, unclipped SGD step up to the factor ``-lr``, i.e. the most an
    honest-but-curious server could see from a client that sends raw gradients.
    """
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise AttackConfigError("the model has no trainable parameters; attach LoRA first")
    loss = per_example_loss(model, batch).sum()
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    return {
        name: (g if g is not None else torch.zeros_like(p)).detach()
        for (name, p), g in zip(params.items(), grads, strict=True)
    }


def dp_step_update(
    model: PeftModel,
    batch: Batch,
    *,
    noise_multiplier: float = 0.0,
    max_grad_norm: float = 1.0,
    learning_rate: float = 1.0,
    optimizer: Literal["sgd", "adam"] = "sgd",
    noise_seed: int = 0,
    trainer: LocalTrainer | None = None,
) -> dict[str, torch.Tensor]:
    """The parameter change of one DP-SGD step (the project's own `LocalTrainer`), the model left as it was.

    Every unit of `batch` is in the step (sampling already happened); the expected batch size is the number of
    units, so noise and the 1/B factor are those of a Poisson batch of that size. The model's trainable
    parameters are restored afterwards, so it still holds what the server distributed.

    Args:
        model: the adapted model.
        batch: the client's batch (its units are the DP units).
        noise_multiplier: sigma; the noise on the summed clipped gradients has std ``sigma * max_grad_norm``.
        max_grad_norm: per-unit clipping bound C.
        learning_rate: step size (scales the update; irrelevant to the span check).
        optimizer: inner optimiser; "adam" destroys the row-space structure (see the module docstring).
        noise_seed: seed of the noise generator.
        trainer: an existing trainer of `model` to reuse (its Opacus hooks stay); by default one is made and its
            hooks removed afterwards.

    Returns:
        ``after - before`` for every trainable parameter, by name.
    """
    own = trainer is None
    active = LocalTrainer(model) if trainer is None else trainer
    names = {id(p): name for name, p in model.named_parameters()}
    before = {names[id(p)]: p.detach().clone() for p in active.params}
    settings = StepSettings(
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        sample_rate=1.0,
        expected_batch_size=max(1, batch.num_units),
        steps=1,
        learning_rate=learning_rate,
        optimizer=optimizer,
    )
    try:
        opt = active.optimizer(settings, noise_generator=torch.Generator().manual_seed(noise_seed))
        active.step(opt, batch)
        return {names[id(p)]: (p.detach() - before[names[id(p)]]).clone() for p in active.params}
    finally:
        with torch.no_grad():
            for p in active.params:
                p.copy_(before[names[id(p)]])
        if own:
            active.module.to_standard_module()


def split_update(manifest: AdapterManifest, vector: npt.ArrayLike) -> dict[str, torch.Tensor]:
    """A flat update in manifest order (what the server receives) as named tensors, for `TokenRecovery.run`.

    Raises:
        AttackConfigError: the vector's length is not the manifest's dimension.
    """
    flat = torch.as_tensor(np.asarray(vector, dtype=np.float64))
    if flat.ndim != 1 or flat.numel() != manifest.dimension:
        raise AttackConfigError(f"update has {flat.numel()} values; the manifest needs {manifest.dimension}")
    out: dict[str, torch.Tensor] = {}
    offset = 0
    for name, shape in manifest.entries:
        size = math.prod(shape)
        out[name] = flat[offset : offset + size].view(shape)
        offset += size
    return out


# --------------------------------------------------------------------------------------------------------------
# Internals
# --------------------------------------------------------------------------------------------------------------
