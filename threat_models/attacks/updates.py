"""What a server observes of a client: one step's gradient, a round's multi-step update, and flat vectors.

The attacks read these views; building them with the project's own training code (`per_example_loss`,
`LocalTrainer`) means the attack sees exactly what a client would send.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt
import torch
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from peft import PeftModel

from secure_fedllm.adapters import AdapterManifest
from secure_fedllm.data import Batch, TokenizedDataset
from secure_fedllm.training import LocalTrainer, StepSettings, per_example_loss

from ..errors import AttackConfigError

__all__ = ["LocalUpdate", "dp_step_update", "flatten_update", "local_update", "loss_gradient", "split_update"]


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


@dataclass(frozen=True)
class LocalUpdate:
    """One client's round as the server would receive it, and which units each step used (the ground truth).

    Attributes:
        update: ``after - before`` for every trainable parameter, by name, computed in float64 from the float32
            parameters (so the difference itself adds no rounding: what is left is the training's own).
        batches: per step, the indices of the units Poisson sampling put in it (empty: a noise-only step).
    """

    update: dict[str, torch.Tensor]
    batches: tuple[tuple[int, ...], ...]


def local_update(
    model: PeftModel,
    data: TokenizedDataset,
    settings: StepSettings,
    *,
    sample_seed: int,
    noise_seed: int = 0,
    trainer: LocalTrainer | None = None,
    keep: bool = False,
) -> LocalUpdate:
    """A client's round: `settings.steps` Poisson-sampled (DP-)SGD steps with the project's own `LocalTrainer`.

    Why not `LocalTrainer.train`: the attack's ground truth is the set of records that entered some step, which
    `train` does not return. The sampler is the one `train` uses (Opacus' `UniformWithReplacementSampler`, rate
    `settings.sample_rate`), so the steps are those of a real client-round; the same `sample_seed` gives the same
    batches whatever the noise, which lets a DP row and its noise-free row be scored on the same records.

    Args:
        model: the adapted model as the server distributed it.
        data: the client's records.
        settings: the round's DP-SGD settings (noise_multiplier 0 for a client without DP; clipping still applies,
            as in a run with `privacy.mechanism = "none"`).
        sample_seed: seed of the Poisson sampling.
        noise_seed: seed of the DP noise (torch's generator: this is an experiment, not a deployment).
        trainer: an existing trainer of `model` to reuse; by default one is made and its hooks removed afterwards.
        keep: leave the model trained (a warm-up round) instead of restoring what the server distributed.

    Returns:
        The update and the sampled units of each step.
    """
    own = trainer is None
    active = LocalTrainer(model) if trainer is None else trainer
    names = {id(p): name for name, p in model.named_parameters()}
    before = {names[id(p)]: p.detach().clone() for p in active.params}
    sampler = UniformWithReplacementSampler(
        num_samples=data.num_units,
        sample_rate=settings.sample_rate,
        generator=torch.Generator().manual_seed(sample_seed),
        steps=settings.steps,
    )
    batches: list[tuple[int, ...]] = []
    try:
        opt = active.optimizer(settings, noise_generator=torch.Generator().manual_seed(noise_seed))
        for units in sampler:
            chosen = tuple(int(u) for u in units)
            batches.append(chosen)
            active.step(opt, data.batch_of_units(list(chosen)) if chosen else None)
        update = {
            names[id(p)]: p.detach().to(torch.float64) - before[names[id(p)]].to(torch.float64) for p in active.params
        }
        return LocalUpdate(update, tuple(batches))
    finally:
        active.reset()
        if not keep:
            with torch.no_grad():
                for p in active.params:
                    p.copy_(before[names[id(p)]])
        if own:
            active.module.to_standard_module()


def flatten_update(manifest: AdapterManifest, update: dict[str, torch.Tensor]) -> npt.NDArray[np.float64]:
    """Named tensors as the flat float64 vector in manifest order that a client encodes (`split_update` inverts it).

    Raises:
        AttackConfigError: a manifest entry is missing or has another shape.
    """
    parts = []
    for name, shape in manifest.entries:
        tensor = update.get(name)
        if tensor is None or tuple(tensor.shape) != tuple(shape):
            got = None if tensor is None else tuple(tensor.shape)
            raise AttackConfigError(f"update of {name}: expected shape {tuple(shape)}, got {got}")
        parts.append(tensor.detach().to(torch.float64).cpu().numpy().ravel())
    return np.concatenate(parts)


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
