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

Noise (`privacy.noise_generator`): with a `noise_key` (the default "csprng") the optimiser is a
`CSPRNGDPOptimizer`, which overrides only `add_noise`: each step and each parameter gets a fresh
draw of std noise_multiplier * max_grad_norm from the ChaCha20 Gaussian of
`secure_fedllm.privacy.noise`, under a sub-key HMAC(noise_key, step | parameter index), generated in
float64 on the CPU and cast to the parameter's dtype and device. Without one ("torch"), Opacus'
own `DPOptimizer` draws from the torch generator it is given (a Mersenne Twister).

Loss: each record's loss is the mean over its response tokens (not the batch-wide token mean that
`labels=` computes in Hugging Face models, which would couple examples and break per-example
clipping). A unit's loss is the mean over its records; the step sums unit losses, so per-sample
gradients are exactly the units' gradients; `DPOptimizer` divides the clipped, noised sum by the
expected batch size. An empty Poisson batch is a noise-only step, never skipped: skipping it would
make the released update depend on the sampling outcome outside the accounted mechanism.

Memory: a batch goes through the model in passes of at most `tokens_per_pass` tokens (rows of the
batch, padded to the batch's own width; on the CPU 512 tokens by default, whole batches on a GPU),
each pass's backward run before the next forward, and the per-row gradients concatenated. Rows do
not interact in a causal LM (each row attends to itself only), so a row's per-example gradient and
loss do not depend on the pass it is in: bit for bit in the tests and in the default run, whose
passes hold several rows each (a product of one or two rows can round differently in the last
bit). A pass's activations and full-vocabulary logits are freed before the next pass, so a step's
peak follows the pass, not the Poisson batch: the default run peaked at 2.3 GB instead of 5.2 GB.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from opacus.grad_sample import GradSampleModule
from opacus.optimizers import DPOptimizer
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from peft import PeftModel

from ..data.chat import IGNORE_INDEX
from ..data.tokenized import Batch, TokenizedDataset
from ..memory import release_memory
from ..privacy.noise import csprng_gaussian, derive_key
from .precision import (
    FP16_LOSS_SCALE,
    autocast_for,
    base_dtype,
    enable_gradient_checkpointing,
    in_backward,
    keep_adapters_fp32,
    model_device,
)

__all__ = [
    "CPU_TOKENS_PER_PASS",
    "CSPRNGDPOptimizer",
    "LocalTrainer",
    "RowPass",
    "StepSettings",
    "dp_step_noise_key",
    "per_example_loss",
    "row_passes",
]

CPU_TOKENS_PER_PASS = 512
"""Tokens per forward (and backward) pass on the CPU. A DP step on SmolLM2-135M (float32) holds about
1.7 MB per token of a pass (activations kept for the backward, logits and their log-softmax): one
pass over a 36-row batch of 53 tokens took 3.4 GB over the model, four passes of 9 rows 1.15 GB.
On an idle machine the step takes as long (the default run's rounds: 92 s of training, as before);
on an oversubscribed one every extra pass adds thread synchronisation, so the budget is not smaller."""


def dp_step_noise_key(noise_key: bytes, step: int, index: int) -> bytes:
    """The ChaCha20 key of one (step, parameter) draw: never two draws from one keystream."""
    return derive_key(noise_key, f"secure-fedllm/dp-sgd-noise/v1|step={step}|param={index}".encode())


class CSPRNGDPOptimizer(DPOptimizer):
    """Opacus' `DPOptimizer` with its Gaussian drawn from a ChaCha20 keystream instead of torch's generator.

    Only `add_noise` differs; clipping, accumulation and scaling are Opacus' own. Used through
    `LocalTrainer.optimizer` only (Opacus itself is not patched).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, noise_key: bytes, **kwargs: object) -> None:
        super().__init__(optimizer, **kwargs)
        derive_key(noise_key, b"")  # refuse a short key now, not at the first step
        self.noise_key = noise_key
        self.noise_step = 0

    def add_noise(self) -> None:
        """p.grad = p.summed_grad + N(0, (noise_multiplier * max_grad_norm)^2), one fresh draw per parameter."""
        from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

        std = self.noise_multiplier * self.max_grad_norm
        for index, p in enumerate(self.params):
            _check_processed_flag(p.summed_grad)
            reference = p.summed_grad
            if std == 0:
                noise = torch.zeros_like(reference)
            else:
                key = dp_step_noise_key(self.noise_key, self.noise_step, index)
                noise = csprng_gaussian(key, reference.shape, dtype=reference.dtype, std=std)
                noise = noise.to(reference.device, non_blocking=False)
            p.grad = (reference + noise).view_as(p)
            _mark_as_processed(p.summed_grad)
        self.noise_step += 1


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


def per_example_loss(
    model: torch.nn.Module, batch: Batch, *, tokens_per_pass: int | Literal["auto"] | None = None
) -> torch.Tensor:
    """Mean token cross-entropy over each row's response tokens; shape (rows,).

    Logits are computed only at positions that predict some row's response token (the vocabulary
    projection dominates the cost of a small model, and prompts carry no loss). Without gradients,
    `tokens_per_pass` (an int, "auto" for the device's default, None for one pass) splits the rows
    into passes (`row_passes`); each row's loss is the same either way. With gradients it must be
    None: the graph of every pass would be kept until the backward, which is what `LocalTrainer` avoids.
    """
    if tokens_per_pass is not None and torch.is_grad_enabled():
        raise ValueError("tokens_per_pass splits only a loss without gradients; LocalTrainer splits training steps")
    passes = row_passes(batch, tokens_per_pass, model_device(model))
    if len(passes) == 1:
        return _row_losses(model, passes[0])
    return torch.cat([_row_losses(model, part) for part in passes])


@dataclass(frozen=True)
class RowPass(Batch):
    """Consecutive rows of a batch, and the first position at which the whole batch needs logits.

    A pass computes logits from the batch's first position, not from its own rows' first: then the
    per-token losses are summed over the same positions, and a row's loss is bit for bit the same in
    any pass (summing a different number of leading zeros can round differently).
    """

    first: int = 0


def row_passes(batch: Batch, tokens_per_pass: int | Literal["auto"] | None, device: torch.device) -> list[RowPass]:
    """`batch` as consecutive row slices of at most `tokens_per_pass` tokens each (at least one row).

    "auto" is `CPU_TOKENS_PER_PASS` on the CPU and one pass on an accelerator (whose memory the
    batch size already governs, and which a split would only slow down); None is one pass. Slices
    keep the batch's width, and `unit_index` keeps pointing into the whole batch's units. The rows
    are shared out evenly (39 rows of 55 tokens: 8, 8, 8, 8, 7): a pass of two or three rows would
    gain nothing, and matrix products that small can round differently from large ones.

    Raises:
        ValueError: the batch has no response token, or `tokens_per_pass` is below 1.
    """
    if tokens_per_pass == "auto":
        tokens_per_pass = CPU_TOKENS_PER_PASS if device.type == "cpu" else None
    if tokens_per_pass is not None and tokens_per_pass < 1:
        raise ValueError(f"tokens_per_pass={tokens_per_pass} must be at least 1 (or None for one pass)")
    first = batch.first if isinstance(batch, RowPass) else _first_prediction(batch)
    rows, width = batch.input_ids.shape
    step = rows
    if tokens_per_pass is not None:
        most = max(1, tokens_per_pass // max(width, 1))
        step = -(-rows // -(-rows // most))  # passes of equal size: no small remainder pass
    return [
        RowPass(
            batch.input_ids[start : start + step],
            batch.attention_mask[start : start + step],
            batch.labels[start : start + step],
            batch.unit_index[start : start + step],
            batch.num_units,
            first=first,
        )
        for start in range(0, rows, step)
    ]


def _first_prediction(batch: Batch) -> int:
    """The first position whose next token is some row's response token (logits before it are not needed)."""
    has_label = (batch.labels[:, 1:] != IGNORE_INDEX).any(dim=0)
    if not bool(has_label.any()):
        raise ValueError("batch has no response token to learn from")
    return int(has_label.nonzero()[0])


def _row_losses(model: torch.nn.Module, batch: RowPass) -> torch.Tensor:
    """`per_example_loss` of one pass, with logits from its batch's first position on."""
    device = model_device(model)
    labels = batch.labels.to(device)
    first = batch.first
    positions = torch.arange(first, labels.shape[1] - 1, device=device)
    with autocast_for(model):
        out = model(
            input_ids=batch.input_ids.to(device),
            attention_mask=batch.attention_mask.to(device),
            logits_to_keep=positions,
        )
    targets = labels[:, first + 1 :]
    token_loss = torch.nn.functional.cross_entropy(
        out.logits.float().transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none"
    )
    counts = (targets != IGNORE_INDEX).sum(dim=1).clamp(min=1)
    return token_loss.sum(dim=1) / counts


class _GradSampleModule(GradSampleModule):
    """Opacus' hooks, made safe under gradient checkpointing.

    Checkpointing runs each block's forward again inside the backward pass. Opacus would store the
    activations a second time and count a second forward, and then never publish the per-example
    gradients (its forward counter stays at one). The recomputed activations are the same tensors'
    values, so that second capture is simply skipped.
    """

    def capture_activations_hook(self, module: torch.nn.Module, forward_input: Any, _forward_output: Any) -> None:
        if in_backward():
            return
        super().capture_activations_hook(module, forward_input, _forward_output)


class LocalTrainer:
    """One peft model with Opacus hooks attached once; runs DP-SGD client-rounds on it.

    The model may sit on any device and its frozen base in any precision (`training.precision`
    explains what stays float32); `gradient_checkpointing` recomputes the base's blocks in the
    backward pass; `tokens_per_pass` bounds the tokens of one forward and backward pass (`row_passes`:
    "auto" is `CPU_TOKENS_PER_PASS` on the CPU and whole batches elsewhere, None whole batches).
    """

    def __init__(
        self,
        model: PeftModel,
        *,
        grad_sample_mode: str = "hooks",
        gradient_checkpointing: bool = False,
        tokens_per_pass: int | Literal["auto"] | None = "auto",
    ) -> None:
        if grad_sample_mode not in ("hooks", "functorch"):
            raise ValueError(f"grad_sample_mode={grad_sample_mode!r}: choose hooks or functorch")
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trainable parameters")
        if any(p.dtype != torch.float32 for p in self.params):
            raise ValueError("trained (LoRA) parameters must be float32; load the adapters in float32")
        if tokens_per_pass is not None and tokens_per_pass != "auto" and tokens_per_pass < 1:
            raise ValueError(f"tokens_per_pass={tokens_per_pass} must be at least 1, 'auto' or None")
        self.tokens_per_pass = tokens_per_pass
        self.loss_scale = FP16_LOSS_SCALE if base_dtype(model) == torch.float16 else 1.0
        keep_adapters_fp32(model)
        if gradient_checkpointing:
            enable_gradient_checkpointing(model)
        self.module = _GradSampleModule(
            model, batch_first=True, loss_reduction="sum", force_functorch=grad_sample_mode == "functorch"
        )

    def optimizer(
        self,
        settings: StepSettings,
        *,
        noise_generator: torch.Generator | None = None,
        noise_key: bytes | None = None,
    ) -> DPOptimizer:
        """A fresh DP optimiser: ChaCha20 noise under `noise_key` if given, else torch's `noise_generator`."""
        if (noise_key is None) == (noise_generator is None):
            raise ValueError("give exactly one of noise_key (csprng noise) and noise_generator (torch noise)")
        inner: torch.optim.Optimizer
        if settings.optimizer == "adam":
            inner = torch.optim.Adam(self.params, lr=settings.learning_rate)
        else:
            inner = torch.optim.SGD(self.params, lr=settings.learning_rate)
        common = {
            "noise_multiplier": settings.noise_multiplier,
            "max_grad_norm": settings.max_grad_norm,
            "expected_batch_size": max(1, round(settings.expected_batch_size)),
            "loss_reduction": "mean",
        }
        if noise_key is not None:
            return CSPRNGDPOptimizer(inner, noise_key=noise_key, **common)
        return DPOptimizer(inner, generator=noise_generator, **common)

    def step(
        self, optimizer: DPOptimizer, batch: Batch | None, *, extra_unit_gradients: torch.Tensor | None = None
    ) -> None:
        """One DP-SGD step on the units in `batch` (None or no units: noise only); on any error the trainer is reset.

        `extra_unit_gradients` (shape (k, d), each row one unit's gradient flattened over `self.params`
        in that order, d their total size) are units that are not records: the gradient canaries of a
        white-box DP audit (`threat_models.attacks.dp_audit_training`). Appended to the batch's
        per-unit gradients, they are clipped, summed, noised and scaled by Opacus exactly as a
        record's gradient is, so the audit measures this step and not a copy of it. The caller counts
        them in the expected batch size if they are to be treated as records.
        """
        extra = None if extra_unit_gradients is None else self._split_extra(extra_unit_gradients)
        try:
            self._step(optimizer, batch, extra)
        except BaseException:
            optimizer.zero_grad(set_to_none=True)
            self.reset()
            raise

    def _split_extra(self, rows: torch.Tensor) -> list[torch.Tensor]:
        """(k, d) rows as per-parameter (k, *shape) float32 tensors on each parameter's device."""
        d = sum(p.numel() for p in self.params)
        if rows.dim() != 2 or rows.shape[1] != d:
            raise ValueError(f"extra_unit_gradients has shape {tuple(rows.shape)}; need (k, {d}) in parameter order")
        if not bool(rows.isfinite().all()):
            raise ValueError("extra_unit_gradients must be finite")
        parts = rows.float().split([p.numel() for p in self.params], dim=1)
        return [part.reshape(-1, *p.shape).to(p.device) for part, p in zip(parts, self.params, strict=True)]

    def _step(self, optimizer: DPOptimizer, batch: Batch | None, extra: list[torch.Tensor] | None = None) -> None:
        self.module.train()
        if batch is None or batch.num_units == 0:
            per_units = [torch.zeros((0, *p.shape), dtype=torch.float32, device=p.device) for p in self.params]
        else:
            per_units = self._unit_grad_samples(batch)
        if extra is not None:
            per_units = [torch.cat([g, e]) for g, e in zip(per_units, extra, strict=True)]
        for p, per_unit in zip(self.params, per_units, strict=True):
            p.grad_sample = per_unit
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self._clear_activations()
        self.module.eval()

    def _unit_grad_samples(self, batch: Batch) -> list[torch.Tensor]:
        """Each trained parameter's per-unit gradients (float32, loss scale removed), in `self.params` order.

        A unit whose gradient is not finite (a float16 overflow) contributes zero: what it would
        have been is data, so no step, batch or count may depend on it, and zero is within the bound.

        The rows go through in passes (`row_passes`), each pass's backward before the next forward:
        a row's gradient does not depend on the other rows, so the per-row gradients of the passes,
        concatenated, are those of one pass over the whole batch.
        """
        device = model_device(self.module)
        unit_index = batch.unit_index.to(device)
        rows_per_unit = torch.bincount(unit_index, minlength=batch.num_units)
        parts: list[list[torch.Tensor]] = [[] for _ in self.params]
        for part in row_passes(batch, self.tokens_per_pass, device):
            losses = per_example_loss(self.module, part)
            owners = part.unit_index.to(losses.device)
            ((losses / rows_per_unit.to(losses.dtype)[owners]).sum() * self.loss_scale).backward()
            for collected, p in zip(parts, self.params, strict=True):
                collected.append(p.grad_sample)
                p.grad_sample = None  # the next pass starts a fresh one instead of stacking onto it
                p.grad = None  # the summed gradient is unused (Opacus clips grad_sample) and would only grow
        out = []
        for p, collected in zip(self.params, parts, strict=True):
            per_row = (collected[0] if len(collected) == 1 else torch.cat(collected)).float()
            if batch.num_units != len(unit_index):
                per_row = torch.zeros(
                    (batch.num_units, *p.shape), dtype=torch.float32, device=per_row.device
                ).index_add_(0, unit_index, per_row)
            out.append(per_row / self.loss_scale if self.loss_scale != 1.0 else per_row)
        finite = torch.stack([g.reshape(batch.num_units, -1).isfinite().all(dim=1) for g in out]).all(dim=0)
        # Always applied, never branched on: whether some unit overflowed is itself data. In place: `out`
        # holds the only references to these tensors, and a copy would add a batch's per-unit gradients.
        return [g.masked_fill_(~finite.view(-1, *([1] * (g.dim() - 1))), 0.0) for g in out]

    def _clear_activations(self) -> None:
        for layer in self.module.modules():
            if getattr(layer, "activations", None):
                layer.activations.clear()

    def per_unit_gradients(self, batch: Batch | None, order: Sequence[torch.nn.Parameter]) -> torch.Tensor:
        """Each unit's gradient (unclipped, float32), flattened in the order of `order`: shape (units, d).

        Distributed DP-SGD (`secure_fedllm.privacy.distributed`) clips, rounds and noises these
        itself, outside Opacus' optimiser; the gradients are the same per-unit gradients DP-SGD
        clips here (`_step`). `order` lists the trained parameters (the adapter manifest's order).
        The trainer is left clean whatever happens.
        """
        ids = {id(p) for p in self.params}
        if len(order) != len(self.params) or {id(p) for p in order} != ids:
            raise ValueError("order must list exactly the trained parameters")
        d = sum(p.numel() for p in order)
        if batch is None or batch.num_units == 0:
            return torch.zeros((0, d), dtype=torch.float32)
        try:
            self.module.train()
            by_param = dict(zip(map(id, self.params), self._unit_grad_samples(batch), strict=True))
            parts = [by_param[id(p)].reshape(batch.num_units, -1) for p in order]
            return torch.cat(parts, dim=1).cpu()
        finally:
            self.reset()

    def train(
        self,
        data: TokenizedDataset,
        settings: StepSettings,
        *,
        sample_generator: torch.Generator,
        noise_generator: torch.Generator | None = None,
        noise_key: bytes | None = None,
    ) -> int:
        """Run `settings.steps` Poisson-sampled DP-SGD steps; returns how many units were used in all.

        Whatever happens, the trainer is left clean (no per-sample gradients, no gradients, eval
        mode): it is shared by every client of the process, and a half-finished step would otherwise
        leak into (or break) the next client's run.
        """
        optimizer = self.optimizer(settings, noise_generator=noise_generator, noise_key=noise_key)
        used = 0
        try:
            for units in self._poisson(data.num_units, settings, sample_generator):
                batch = data.batch_of_units(units) if units else None
                used += len(units)
                self.step(optimizer, batch)
        finally:
            self.reset()
            release_memory()
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
