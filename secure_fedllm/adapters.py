"""LoRA adapters as the unit of federation: deterministic A0, a manifest, flat vectors and hashes.

Under secure aggregation the server only sees a sum, so every party must agree on exactly what is
summed. The `AdapterManifest` fixes the order, names and shapes of the aggregated tensors; parties
compare its digest, and the digests of the base model, of A0 and of the adapter configuration enter
every round's transcript (`binding`).

FFA-LoRA (Sun et al., ICLR 2024) keeps A at its random, non-zero initialisation A0 and trains only
the zero-initialised B, so the mean of the B_i is exactly the B of the mean update B_i A0: secure
aggregation of B loses nothing. A0 comes from a public seed with LoRA's own distribution
(Kaiming-uniform, bound 1/sqrt(fan_in)) so that every party can rebuild it bit for bit; it also
ships in the saved adapter. `fedit` averages A and B separately (mean(B)mean(A) != mean(BA)).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from .config import LoraConfig
from .errors import SecureFedLLMError
from .lora_targets import resolve_target_modules

__all__ = [
    "SIDECAR",
    "AdapterManifest",
    "AdapterMismatchError",
    "adapter_fingerprints",
    "attach_lora",
    "get_vector",
    "save_adapter",
    "set_vector",
]

SIDECAR = "secure_fedllm_adapter.json"
"""File saved beside peft's adapter files: base-model hash, A0 hash, manifest and provenance."""


class AdapterMismatchError(SecureFedLLMError):
    """A party's adapter layout or A0 differs from the one the federation agreed on."""


@dataclass(frozen=True)
class AdapterManifest:
    """Names and shapes of the aggregated tensors, in the order they are flattened."""

    entries: tuple[tuple[str, tuple[int, ...]], ...]

    @property
    def dimension(self) -> int:
        """Length of the flat vector."""
        return sum(math.prod(shape) for _, shape in self.entries)

    def digest(self) -> str:
        """SHA-256 of the canonical JSON form."""
        return _sha256_json([[name, list(shape)] for name, shape in self.entries])

    @classmethod
    def of(cls, model: PeftModel, aggregation: str) -> AdapterManifest:
        """The manifest of `model`: lora_B tensors for `ffa`; lora_A and lora_B for `fedit`."""
        wanted = ("lora_B.",) if aggregation == "ffa" else ("lora_A.", "lora_B.")
        entries = tuple(
            (name, tuple(p.shape)) for name, p in sorted(model.named_parameters()) if any(w in name for w in wanted)
        )
        if not entries:
            raise AdapterMismatchError("the model has no LoRA tensors; were target_modules matched?")
        return cls(entries)

    def check(self, model: PeftModel) -> dict[str, torch.nn.Parameter]:
        """The model's tensors in manifest order.

        Raises:
            AdapterMismatchError: a name is missing or a shape differs.
        """
        params = dict(model.named_parameters())
        out = {}
        for name, shape in self.entries:
            if name not in params or tuple(params[name].shape) != shape:
                got = tuple(params[name].shape) if name in params else "missing"
                raise AdapterMismatchError(f"adapter tensor {name}: expected shape {shape}, got {got}")
            out[name] = params[name]
        return out


def attach_lora(model: PreTrainedModel, config: LoraConfig, *, a0_seed: int) -> PeftModel:
    """Wrap `model` with LoRA adapters whose A0 is a deterministic function of `a0_seed`.

    `config.target_modules` is resolved against `model` first (`resolve_target_modules`), so peft
    gets explicit names. In `ffa` the A tensors are frozen (requires_grad False); B is zero, so the
    adapted model starts out equal to the base model. The adapter tensors are float32 whatever the
    base model's dtype: DP-SGD clips, noises and aggregates them, and bfloat16's 8-bit mantissa
    would swallow small noised steps.

    Raises:
        ConfigError: `config.target_modules` matches nothing in `model`.
        AdapterMismatchError: peft refused the resolved targets.
    """
    targets = resolve_target_modules(model, config.target_modules)
    matched = [m for name, m in model.named_modules() if any(name == t or name.endswith("." + t) for t in targets)]
    peft_config = PeftLoraConfig(
        r=config.r,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=list(targets),
        # transformers' Conv1D (GPT-2) stores its weight as (in, out); peft needs to be told (it
        # would otherwise warn and flip the flag itself). lora_A stays (r, in_features) either way.
        fan_in_fan_out=bool(matched) and all(isinstance(m, Conv1D) for m in matched),
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        peft_model = get_peft_model(model, peft_config, autocast_adapter_dtype=True)
    except ValueError as exc:
        raise AdapterMismatchError(f"lora.target_modules={list(targets)}: {exc}") from exc
    generator = torch.Generator().manual_seed(a0_seed)
    with torch.no_grad():
        for name, p in sorted(peft_model.named_parameters()):
            if "lora_" in name and p.dtype != torch.float32:  # peft's autocast covers only fp16/bf16
                p.data = p.data.float()
            if "lora_A." in name:
                bound = 1.0 / math.sqrt(p.shape[1])  # Kaiming-uniform(a=sqrt(5)): fan_in = in_features
                p.copy_(torch.rand(p.shape, generator=generator, dtype=torch.float64).mul(2 * bound).sub(bound))
                p.requires_grad_(config.aggregation == "fedit")
            elif "lora_B." in name:
                p.zero_()
                p.requires_grad_(True)
            else:
                p.requires_grad_(False)
    return peft_model


def get_vector(model: PeftModel, manifest: AdapterManifest) -> npt.NDArray[np.float32]:
    """The aggregated tensors flattened in manifest order (float32)."""
    tensors = manifest.check(model)
    return np.concatenate([t.detach().float().cpu().numpy().ravel() for t in tensors.values()]).astype(np.float32)


def set_vector(model: PeftModel, manifest: AdapterManifest, vector: npt.ArrayLike) -> None:
    """Overwrite the aggregated tensors from a flat vector in manifest order."""
    flat = torch.as_tensor(np.asarray(vector, dtype=np.float32))
    if flat.numel() != manifest.dimension:
        raise AdapterMismatchError(f"vector has {flat.numel()} values; the manifest needs {manifest.dimension}")
    offset = 0
    with torch.no_grad():
        for p in manifest.check(model).values():
            size = p.numel()
            p.copy_(flat[offset : offset + size].view_as(p).to(p.dtype))
            offset += size


def adapter_fingerprints(model: PeftModel) -> dict[str, str]:
    """Hashes of A0 (every lora_A tensor, in name order) and of the adapter configuration."""
    digest = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        if "lora_A." in name:
            digest.update(name.encode() + b"|")
            digest.update(p.detach().float().cpu().numpy().tobytes())
    config = model.peft_config["default"].to_dict()
    keep = ("r", "lora_alpha", "lora_dropout", "target_modules", "bias", "use_rslora", "use_dora")
    return {
        "a0_sha256": digest.hexdigest(),
        "adapter_config_sha256": _sha256_json({k: _jsonable(config.get(k)) for k in keep}),
    }


def save_adapter(model: PeftModel, folder: str | Path, *, sidecar: dict[str, Any]) -> Path:
    """Peft `save_pretrained` (A0 and B, loadable with `PeftModel.from_pretrained`) plus the sidecar."""
    folder = Path(folder)
    model.save_pretrained(folder)
    (folder / SIDECAR).write_text(json.dumps(sidecar, indent=1, sort_keys=True))
    return folder


def _jsonable(value: Any) -> Any:
    if isinstance(value, set | frozenset | tuple | list):
        return sorted(str(v) for v in value)
    return value


def _sha256_json(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
