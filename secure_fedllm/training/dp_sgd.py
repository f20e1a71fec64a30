"""DP-SGD on LoRA adapters with Opacus: per-unit clipping, Gaussian noise, Poisson sampling.

Opacus attaches its per-sample-gradient hooks once, when the trainer is built, to the very
parameter objects that are trained and aggregated; nothing re-creates or moves them afterwards.
(Re-wrapping a module or replacing its parameters after Opacus attached is how LoRA adapters end up
silently never changing: opacus#820, peft#3409.) Each client-round gets a fresh `DPOptimizer`
with that client's noise multiplier and sampling rate; the hooks stay.

Why not `PrivacyEngine.make_private`: it would wrap the module again every time it is called and
bring its own accountant and data loader, while here the ledger does the accounting and sampling
must be replayable from the client's own seed. The pieces `make_private` assembles are used
directly: `GradSampleModule` (via `wrap_model`), `DPOptimizer` and Opacus' Poisson sampler.

Loss: each record's loss is the mean over its response tokens (not the batch-wide token mean that
`labels=` computes in Hugging Face models, which would couple examples and break per-example
clipping). A unit's loss is the mean over its records; the step sums unit losses, so per-sample
gradients are exactly the units' gradients; `DPOptimizer` divides the clipped, noised sum by the
expected batch size. An empty Poisson batch is a noise-only step, never skipped: skipping it would
make the released update depend on the sampling outcome outside the accounted mechanism.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from opacus.grad_sample import wrap_model
from opacus.optimizers import DPOptimizer
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from peft import PeftModel

from ..data.chat import IGNORE_INDEX
from ..data.tokenized import Batch, TokenizedDataset

__all__ = ["LocalTrainer", "StepSettings", "per_example_loss"]


@dataclass(frozen=True)
class StepSettings:
    """The DP-SGD settings of one client-round (all public except the generator seeds)."""

    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    expected_batch_size: float
    steps: int
    learning_rate: float
    optimizer: str = "adam"

    def __post_init__(self) -> None:
        """Refuse settings no trainer should see: NaN noise or a non-positive clip would corrupt the shared model."""
        checks = (
            ("noise_multiplier", 0 <= self.noise_multiplier < math.inf, "finite and >= 0"),
            ("max_grad_norm", 0 < self.max_grad_norm < math.inf, "finite and > 0"),
            ("sample_rate", 0 < self.sample_rate <= 1, "in (0, 1]"),
            ("expected_batch_size", 0 < self.expected_batch_size < math.inf, "finite and > 0"),
            ("steps", isinstance(self.steps, int) and self.steps >= 1, "an integer >= 1"),
            ("learning_rate", 0 < self.learning_rate < math.inf, "finite and > 0"),
            ("optimizer", self.optimizer in ("adam", "sgd"), "adam or sgd"),
        )
        for name, ok, what in checks:
            if not ok:
                raise ValueError(f"StepSettings.{name}={getattr(self, name)!r} must be {what}")


def per_example_loss(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Mean token cross-entropy over each row's response tokens; shape (rows,).

    Logits are computed only at positions that predict some row's response token (the vocabulary
    projection dominates the cost of a small model, and prompts carry no loss).
    """
    labels = batch.labels
    has_label = (labels[:, 1:] != IGNORE_INDEX).any(dim=0)
    if not bool(has_label.any()):
        raise ValueError("batch has no response token to learn from")
    first = int(has_label.nonzero()[0])
    positions = torch.arange(first, labels.shape[1] - 1)
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, logits_to_keep=positions)
    targets = labels[:, first + 1 :]
    token_loss = torch.nn.functional.cross_entropy(
        out.logits.float().transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none"
    )
    counts = (targets != IGNORE_INDEX).sum(dim=1).clamp(min=1)
    return token_loss.sum(dim=1) / counts


class LocalTrainer:
    """One peft model with Opacus hooks attached once; runs DP-SGD client-rounds on it."""

    def __init__(self, model: PeftModel, *, grad_sample_mode: str = "hooks") -> None:
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trainable parameters")
        self.module = wrap_model(model, grad_sample_mode, batch_first=True, loss_reduction="sum")

    def optimizer(self, settings: StepSettings, *, noise_generator: torch.Generator) -> DPOptimizer:
        """A fresh DP optimiser over the trainable parameters."""
        inner: torch.optim.Optimizer
        if settings.optimizer == "adam":
            inner = torch.optim.Adam(self.params, lr=settings.learning_rate)
        else:
            inner = torch.optim.SGD(self.params, lr=settings.learning_rate)
        return DPOptimizer(
            inner,
            noise_multiplier=settings.noise_multiplier,
            max_grad_norm=settings.max_grad_norm,
            expected_batch_size=max(1, round(settings.expected_batch_size)),
            loss_reduction="mean",
            generator=noise_generator,
        )

    def step(self, optimizer: DPOptimizer, batch: Batch | None) -> None:
        """One DP-SGD step on the units in `batch` (None or no units: noise only); on any error the trainer is reset."""
        try:
            self._step(optimizer, batch)
        except BaseException:
            optimizer.zero_grad(set_to_none=True)
            self.reset()
            raise

    def _step(self, optimizer: DPOptimizer, batch: Batch | None) -> None:
        self.module.train()
        if batch is None or batch.num_units == 0:
            for p in self.params:
                p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype)
        else:
            losses = per_example_loss(self.module, batch)
            rows_per_unit = torch.bincount(batch.unit_index, minlength=batch.num_units).to(losses.dtype)
            (losses / rows_per_unit[batch.unit_index]).sum().backward()
            if batch.num_units != len(batch.unit_index):
                for p in self.params:
                    per_row = p.grad_sample
                    per_unit = torch.zeros((batch.num_units, *p.shape), dtype=per_row.dtype)
                    p.grad_sample = per_unit.index_add_(0, batch.unit_index, per_row)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self.module.eval()

    def train(
        self,
        data: TokenizedDataset,
        settings: StepSettings,
        *,
        sample_generator: torch.Generator,
        noise_generator: torch.Generator,
    ) -> int:
        """Run `settings.steps` Poisson-sampled DP-SGD steps; returns how many units were used in all.

        Whatever happens, the trainer is left clean (no per-sample gradients, no gradients, eval
        mode): it is shared by every client of the process, and a half-finished step would otherwise
        leak into (or break) the next client's run.
        """
        optimizer = self.optimizer(settings, noise_generator=noise_generator)
        used = 0
        try:
            for units in self._poisson(data.num_units, settings, sample_generator):
                batch = data.batch_of_units(units) if units else None
                used += len(units)
                self.step(optimizer, batch)
        finally:
            self.reset()
        return used

    def reset(self) -> None:
        """Drop every gradient and per-sample gradient and return to eval mode."""
        for p in self.params:
            p.grad = None
            for name in ("grad_sample", "summed_grad", "_current_grad_sample"):
                if hasattr(p, name):
                    setattr(p, name, None)
        for layer in self.module.modules():  # activations Opacus saved for a backward that never ran
            if getattr(layer, "activations", None):
                layer.activations.clear()
            if hasattr(layer, "max_batch_len"):
                del layer.max_batch_len
        self.module.eval()

    @staticmethod
    def _poisson(num_units: int, settings: StepSettings, generator: torch.Generator) -> Iterator[list[int]]:
        sampler = UniformWithReplacementSampler(
            num_samples=num_units, sample_rate=settings.sample_rate, generator=generator, steps=settings.steps
        )
        for units in sampler:
            yield [int(u) for u in units]
