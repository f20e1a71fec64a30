"""Benchmark: DP-SGD step time and memory on the available device, per model, adapter and precision.

Usage:
    python benchmarks/device.py --threads 1 --json benchmarks/results/device_cpu.json
        (CPU: SmolLM2 + a 2-layer slice of the 1B shape, 4 x 64 tokens; ~10 minutes on a busy 2-core box)
    python benchmarks/device.py --device cuda --json benchmarks/results/device_h100.json
        (GPU: SmolLM2 + the ~1B model, 8 x 128 tokens, under 8 minutes)
    python benchmarks/device.py --quick --json /tmp/device_quick.json
        (smoke test, seconds: a tiny random model only, 1 repeat; add --models smollm2-135m,random for SmolLM2)

A machine without the embedded GGUF or ../shared/data (a lent GPU box, which takes 64 MiB of files):
`--export-assets DIR` copies SmolLM2's config, tokenizer and the Alpaca file there (~6 MB, no
weights); run there with `--assets DIR --smollm2 random` (SmolLM2's shape with random weights: a
step's time and memory do not depend on the weights' values).

Why: a site picks `training.device` and `training.dtype`; this measures what that choice costs per
DP-SGD step, and what DP-SGD costs over a plain step at that choice.

Models: the embedded SmolLM2-135M-Instruct (`load_base_model`), and a random model of the same
architecture (LLaMA, SmolLM2's vocabulary and tokenizer, tied embeddings) built from a config
directly in the target dtype on the device: `--size 1b` (the default on a GPU) is hidden 2048,
22 layers, intermediate 5632, 32 heads, 8 KV heads (the TinyLlama shape, 1.09B parameters);
`--size small` (the default on the CPU, where the 1B model is too slow) is 2 layers of that shape;
`--size quick` is a toy for `--quick`. The JSON records each model's shape and parameter count.

Variants: for each model, adapter (`ffa`: LoRA r=16 on q_proj/v_proj, only B trains; `lora`: A and
B train), dtype of the frozen base (`fp32`, `bf16`) and kind: `plain` is loss.backward() + Adam
with no Opacus, `dp` is `LocalTrainer` (Opacus hooks, per-example clipping, noise, Adam; noise
from the production ChaCha20 path unless `--noise torch`). Both kinds use the same precision setup
(`secure_fedllm.training.precision`): the base in its dtype under `autocast_for`, the LoRA weights
and the adapter path float32 (`keep_adapters_fp32`), so `dp_over_plain` isolates DP's overhead.
Batches are Alpaca records (`dp_step.py`'s selection: `--rows` records x `--length` tokens, loss
on the response tokens). DP rows also give `noise_seconds`: the ChaCha20 noise of one step alone,
CPU work that a GPU does not speed up.

Timing: per (model, adapter, dtype) the plain and DP variants live side by side on their own
copies of the model, take `--warmup` steps each, then `--repeats` steps interleaved (ABBA order);
we report the median wall-clock seconds per step (CUDA: synchronised before and after the step)
and the median process CPU seconds (`cpu_seconds_per_step`). On a GPU `--budget-s` caps the repeats so that
the whole script ends in time (at least 3 repeats per variant).

Memory (`peak_memory_mb`): what the variant holds at its peak, model and step together, measured
the same way on both devices: `resident_memory_mb` (memory after the variant's build and warm-up
minus memory before its build: weights, LoRA, optimiser state) plus `step_memory_mb` (the largest
rise of the peak over the memory in use when a timed step began). Deltas, so the other copy that
shares the device is not counted.
  CUDA: `torch.cuda.memory_allocated` / `max_memory_allocated` (live tensors, not the allocator's
  cache), peak stats reset before each step.
  CPU (Linux): VmRSS / VmHWM from /proc/self/status; before each reading `gc.collect()` and glibc's
  `malloc_trim(0)` give freed heap back (so RSS follows the live tensors) and writing 5 to
  /proc/self/clear_refs resets VmHWM. RSS also counts the memory-mapped checkpoint pages.

Output: `rows` (device, model, params, adapter, dtype, kind, seconds_per_step, peak_memory_mb,
...), `dp_over_plain` per model/adapter/dtype (DP seconds / plain seconds; target on a GPU <= 1.15)
and `bf16_over_fp32` per model/adapter/kind (the bf16 speed-up: fp32 seconds / bf16 seconds;
expected >= 1.3 for the 1B model on a GPU). The JSON is rewritten after every row, so a run
that times out keeps what it measured (`complete` says whether it finished).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from secure_fedllm.adapters import attach_lora
from secure_fedllm.config import EMBEDDED_MODEL, LoraConfig, ModelConfig
from secure_fedllm.data import ChatTemplate, TextRecord, TokenizedDataset, load_alpaca
from secure_fedllm.models import embedded_base_folder, load_base_model, load_tokenizer, resolve_device
from secure_fedllm.privacy.noise import csprng_gaussian
from secure_fedllm.training import LocalTrainer, StepSettings, dp_step_noise_key, per_example_loss
from secure_fedllm.training.precision import keep_adapters_fp32

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16"}  # `training.dtype` spelling, for load_base_model
ADAPTERS = ("ffa", "lora")
KINDS = ("plain", "dp")
SMOLLM2 = "smollm2-135m"

SHAPES: dict[str, dict[str, int]] = {
    # TinyLlama-1.1B's shape with SmolLM2's vocabulary (49152, tied): 1,092,708,352 parameters.
    "1b": {
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "num_hidden_layers": 22,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
    },
    # The same layer shape, 2 layers (190,851,072 parameters): a step costs about what SmolLM2's does on a CPU.
    "small": {
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "num_hidden_layers": 2,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
    },
    "quick": {
        "hidden_size": 128,
        "intermediate_size": 352,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    },
}

ALPACA = Path(__file__).resolve().parents[2] / "shared" / "data" / "alpaca_5000.json"
ASSET_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
)
"""What `--export-assets` copies from the embedded model's folder: its config and tokenizer, no weights."""

NOISE_KEY = bytes(32)
"""A public benchmark key for the ChaCha20 noise (the cost does not depend on the key)."""


def alpaca_batch(tokenizer: Any, path: Path, *, rows: int, length: int) -> Any:
    """`rows` Alpaca records whose chat form reaches `length` tokens (cut there): dp_step.py's selection."""
    template = ChatTemplate(tokenizer, system_prompt="", max_length=length)
    records = []
    for row in load_alpaca(path):
        record = TextRecord(row["instruction"], row.get("input") or "", row["output"], unit=str(len(records)))
        example = template.example(record.instruction, record.input, record.output)
        if example is not None and len(example.input_ids) == length and sum(t != -100 for t in example.labels) >= 16:
            records.append(record)
        if len(records) == rows:
            break
    return TokenizedDataset.build(records, template).batch_of_rows(list(range(rows)))


def random_model(assets: Path, shape: dict[str, int], dtype: torch.dtype, device: torch.device) -> Any:
    """A random LLaMA: SmolLM2's config (vocabulary, rope, norms) with `shape` over it, in `dtype` on `device`.

    Built under a `torch.device` context and a `dtype` default, so a 1B model never exists as a
    float32 CPU copy first. Frozen and in eval mode, as `load_base_model` returns a base.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig.from_pretrained(assets)
    for key, value in shape.items():
        setattr(config, key, value)
    config.head_dim = config.hidden_size // config.num_attention_heads
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.requires_grad_(False)
    model.eval()
    return model


def base_model(args: argparse.Namespace, model: str, dtype: str, device: torch.device) -> Any:
    """SmolLM2 (its weights, or random weights of its shape: same time and memory) or the random model."""
    if model == SMOLLM2 and args.smollm2 == "embedded":
        return load_base_model(ModelConfig(name=EMBEDDED_MODEL), dtype=DTYPE_NAMES[dtype], device=device)[0]
    return random_model(args.assets, {} if model == SMOLLM2 else SHAPES[args.size], DTYPES[dtype], device)


def model_info(model: Any) -> dict[str, Any]:
    cfg = model.config
    return {
        "params": sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n),
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "vocab_size": cfg.vocab_size,
        "tie_word_embeddings": cfg.tie_word_embeddings,
    }


class Plain:
    """The anchor: loss.backward() + Adam on the LoRA weights, no Opacus, DP's precision setup."""

    def __init__(self, model: Any, lr: float) -> None:
        keep_adapters_fp32(model)  # the adapter path outside autocast, as LocalTrainer runs it
        self.model = model
        self.opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)

    def step(self, batch: Any) -> None:
        """One plain step: mean loss, backward, Adam."""
        self.model.train()
        per_example_loss(self.model, batch).mean().backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


class DP:
    """One DP-SGD step of the trainer the federation uses (hooks, no checkpointing)."""

    def __init__(self, model: Any, lr: float, rows: int, noise: str, device: torch.device) -> None:
        self.model = model
        self.trainer = LocalTrainer(model, grad_sample_mode="hooks", gradient_checkpointing=False)
        settings = StepSettings(1.0, 1.0, rows / 256, rows, 1, lr, "adam")
        if noise == "csprng":
            self.opt = self.trainer.optimizer(settings, noise_key=NOISE_KEY)
        else:
            self.opt = self.trainer.optimizer(settings, noise_generator=torch.Generator(device=device).manual_seed(0))

    def step(self, batch: Any) -> None:
        """One DP-SGD step (per-example gradients, clipping, noise, Adam)."""
        self.trainer.step(self.opt, batch)


def build_variant(
    args: argparse.Namespace, model: str, adapter: str, dtype: str, kind: str, device: torch.device
) -> Any:
    base = base_model(args, model, dtype, device)
    peft = attach_lora(base, LoraConfig(r=16, aggregation="ffa" if adapter == "ffa" else "fedit"), a0_seed=0)
    return Plain(peft, 1e-3) if kind == "plain" else DP(peft, 1e-3, args.rows, args.noise, device)


def noise_seconds(params: list[torch.Tensor], device: torch.device, repeats: int = 3) -> float:
    """The ChaCha20 noise of one DP step alone (drawn on the CPU, one draw per trained tensor, moved to the device).

    Part of every DP step in `--noise csprng`; reported apart because on a GPU it is CPU work that
    does not shrink with the GPU's speed.
    """
    times = []
    for step in range(repeats):
        sync(device)
        t = time.perf_counter()
        for index, p in enumerate(params):
            csprng_gaussian(dp_step_noise_key(NOISE_KEY, step, index), p.shape, dtype=torch.float32).to(device)
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


class HostMemory:
    """Peak resident memory of this process on Linux: VmHWM, reset through /proc/self/clear_refs.

    Freed heap pages stay resident until glibc gives them back, so `settle` (gc + malloc_trim)
    runs before each reading: then RSS follows the live tensors, and the rise of VmHWM over VmRSS
    during a step is that step's transient memory. None where /proc or glibc is missing.
    """

    def __init__(self) -> None:
        self.status = Path("/proc/self/status")
        try:
            self.libc: Any = ctypes.CDLL("libc.so.6")
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self.libc = None

    def _read(self, field: str) -> float:
        for line in self.status.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
        raise OSError(f"{field} not in {self.status}")

    def settle(self) -> float | None:
        """Release freed memory, reset the peak, and return the resident MB now."""
        if self.libc is None:
            return None
        gc.collect()
        self.libc.malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
        return self._read("VmRSS")

    def peak(self) -> float | None:
        """The peak resident MB since the last `settle`."""
        return None if self.libc is None else self._read("VmHWM")


class CudaMemory:
    """Allocated CUDA memory (live tensors, not the allocator's cache) and its peak since `settle`."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def settle(self) -> float | None:
        """Synchronise, reset the peak, and return the allocated MB now."""
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        return torch.cuda.memory_allocated(self.device) / 2**20

    def peak(self) -> float | None:
        """The peak allocated MB since the last `settle`."""
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device) / 2**20


class NoMemory:
    """Devices whose allocator we cannot read (mps): memory is reported as None."""

    def settle(self) -> float | None:
        """Nothing to read."""
        return None

    def peak(self) -> float | None:
        """Nothing to read."""
        return None


def meter_for(device: torch.device) -> HostMemory | CudaMemory | NoMemory:
    if device.type == "cuda":
        return CudaMemory(device)
    return HostMemory() if device.type == "cpu" else NoMemory()


def time_group(
    variants: dict[str, Any], batch: Any, device: torch.device, meter: Any, repeats: int
) -> dict[str, dict[str, Any]]:
    """Interleaved (ABBA) timed steps, and each variant's largest memory rise during a step."""
    wall: dict[str, list[float]] = {k: [] for k in variants}
    cpu: dict[str, list[float]] = {k: [] for k in variants}
    rise: dict[str, float | None] = dict.fromkeys(variants)
    names = list(variants)
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            before = meter.settle()  # outside the timed region (gc, malloc_trim, synchronise)
            t, c = time.perf_counter(), time.process_time()
            variants[name].step(batch)
            sync(device)
            wall[name].append(time.perf_counter() - t)
            cpu[name].append(time.process_time() - c)
            peak = meter.peak()
            if before is not None and peak is not None:
                rise[name] = max(rise[name] or 0.0, peak - before)
    return {k: {"wall": wall[k], "cpu": cpu[k], "step_memory_mb": rise[k]} for k in variants}


def environment(device: torch.device) -> dict[str, Any]:
    import opacus
    import peft
    import transformers

    env: dict[str, Any] = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "opacus": opacus.__version__,
        "python": platform.python_version(),
        "machine": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            gpu=props.name,
            gpu_memory_gb=round(props.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
            tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
        )
    return env


def summarise(result: dict[str, Any]) -> None:
    """Fill the ratio tables (and, on a GPU, the target checks) from the rows measured so far."""
    rows = {(r["model"], r["adapter"], r["dtype"], r["kind"]): r for r in result["rows"]}
    dp_over_plain: dict[str, float] = {}
    dp_over_plain_cpu: dict[str, float] = {}
    bf16: dict[str, float] = {}
    for model in result["models"]:
        for adapter in ADAPTERS:
            for dtype in DTYPES:
                plain, dp = rows.get((model, adapter, dtype, "plain")), rows.get((model, adapter, dtype, "dp"))
                if plain and dp:
                    dp_over_plain[f"{model}/{adapter}/{dtype}"] = dp["seconds_per_step"] / plain["seconds_per_step"]
                    if plain.get("cpu_seconds_per_step"):
                        dp_over_plain_cpu[f"{model}/{adapter}/{dtype}"] = (
                            dp["cpu_seconds_per_step"] / plain["cpu_seconds_per_step"]
                        )
            for kind in KINDS:
                fp32, half = rows.get((model, adapter, "fp32", kind)), rows.get((model, adapter, "bf16", kind))
                if fp32 and half:
                    bf16[f"{model}/{adapter}/{kind}"] = fp32["seconds_per_step"] / half["seconds_per_step"]
    result["dp_over_plain"] = dp_over_plain
    if dp_over_plain_cpu:
        result["dp_over_plain_cpu_time"] = dp_over_plain_cpu
    result["bf16_over_fp32"] = bf16
    if result["device"].startswith("cuda"):
        large = [m for m in result["models"] if m != SMOLLM2 and result["models"][m]["params"] > 5e8]
        result["checks"] = {
            "dp_over_plain_max_1.15": {k: v <= 1.15 for k, v in dp_over_plain.items()},
            "bf16_over_fp32_min_1.3_1b": {k: v >= 1.3 for k, v in bf16.items() if k.split("/")[0] in large},
        }


MEMORY_METHODS = {
    "cuda": "resident (torch.cuda.memory_allocated after build + warm-up minus before build) + the largest rise of "
    "max_memory_allocated over memory_allocated during a timed step",
    "cpu": "resident (VmRSS after build + warm-up minus before build) + the largest rise of VmHWM over VmRSS during "
    "a timed step; gc + malloc_trim(0) and a VmHWM reset (/proc/self/clear_refs) before each reading",
}


def main() -> None:  # noqa: C901 - a flat script
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="where the results go (rewritten after every row)")
    parser.add_argument("--device", default="auto", help="auto (cuda, else mps, else cpu), cpu, cuda, cuda:1, ...")
    parser.add_argument("--size", choices=sorted(SHAPES), help="random model shape (default: 1b on cuda, else small)")
    parser.add_argument("--rows", type=int, help="records per batch (default 8; 4 on the CPU)")
    parser.add_argument("--length", type=int, help="tokens per record (default 128; 64 on the CPU)")
    parser.add_argument("--warmup", type=int, help="warm-up steps per variant (default 2; 1 on the CPU)")
    parser.add_argument("--repeats", type=int, help="timed steps per variant (default 20 on cuda; 3 on the CPU)")
    parser.add_argument(
        "--budget-s", type=float, help="cap repeats to end within this many seconds (default 420 on cuda)"
    )
    parser.add_argument("--models", help=f"comma-separated: {SMOLLM2}, random (default both; random only with --quick)")
    parser.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32, bf16")
    parser.add_argument("--noise", choices=("csprng", "torch"), default="csprng", help="DP noise generator")
    parser.add_argument("--note", default="", help="free text stored in the JSON")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--quick", action="store_true", help="smoke test: tiny random model, tiny batch, 1 repeat")
    parser.add_argument(
        "--smollm2",
        choices=("embedded", "random"),
        default="embedded",
        help="SmolLM2's own weights, or random weights of its shape (same time and memory; no GGUF needed)",
    )
    parser.add_argument(
        "--assets",
        type=Path,
        help="folder with SmolLM2's config and tokenizer (and alpaca_5000.json), as --export-assets writes it; "
        "default: the embedded model's folder and ../shared/data",
    )
    parser.add_argument("--export-assets", type=Path, help="copy those few files (~6 MB, no weights) here and exit")
    args = parser.parse_args()
    if args.export_assets:
        args.export_assets.mkdir(parents=True, exist_ok=True)
        for name in ASSET_FILES:
            shutil.copyfile(embedded_base_folder() / name, args.export_assets / name)
        shutil.copyfile(ALPACA, args.export_assets / ALPACA.name)
        print(f"wrote {', '.join(ASSET_FILES)}, {ALPACA.name} to {args.export_assets}")
        return
    if args.json is None:
        parser.error("--json is required")
    if args.threads:
        torch.set_num_threads(args.threads)
    alpaca = args.assets / ALPACA.name if args.assets else ALPACA
    args.assets = args.assets or embedded_base_folder()
    device = resolve_device(args.device)
    gpu = device.type == "cuda"
    if args.quick:
        defaults: dict[str, Any] = {
            "size": "quick",
            "rows": 2,
            "length": 64,
            "warmup": 1,
            "repeats": 1,
            "models": "random",
        }
    elif gpu:
        defaults = {"size": "1b", "rows": 8, "length": 128, "warmup": 2, "repeats": 20, "budget_s": 420.0}
    else:
        defaults = {"size": "small", "rows": 4, "length": 64, "warmup": 1, "repeats": 3}
    defaults.setdefault("models", f"{SMOLLM2},random")
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    start = time.perf_counter()
    meter = meter_for(device)
    models = [m if m == SMOLLM2 else f"random-{args.size}" for m in args.models.split(",")]
    dtypes = args.dtypes.split(",")
    tokenizer = load_tokenizer(ModelConfig(name=str(args.assets)))
    batch = alpaca_batch(tokenizer, alpaca, rows=args.rows, length=args.length)
    result: dict[str, Any] = {
        "benchmark": "device",
        "device": str(device),
        "batch": [args.rows, args.length],
        "warmup": args.warmup,
        "repeats": args.repeats,
        "budget_s": args.budget_s,
        "noise": args.noise,
        "smollm2_weights": args.smollm2,
        "lora": {"r": 16, "target_modules": "attention (q_proj, v_proj)"},
        "memory_method": MEMORY_METHODS.get(device.type, "not measured on this device"),
        "environment": environment(device),
        "note": args.note,
        "models": {},
        "rows": [],
        "errors": {},
        "complete": False,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)

    def write() -> None:
        result["elapsed_s"] = round(time.perf_counter() - start, 1)
        summarise(result)
        args.json.write_text(json.dumps(result, indent=1) + "\n")

    groups = [(m, a, d) for m in models for d in dtypes for a in ADAPTERS]
    for index, (model, adapter, dtype) in enumerate(groups):
        name = model if model == SMOLLM2 else "random"
        try:
            variants: dict[str, Any] = {}
            resident: dict[str, float | None] = {}
            warm: dict[str, float] = {}
            for kind in KINDS:
                before = meter.settle()
                variants[kind] = build_variant(args, name, adapter, dtype, kind, device)
                if model not in result["models"]:
                    result["models"][model] = model_info(variants[kind].model)
                for _ in range(args.warmup):
                    sync(device)
                    t = time.perf_counter()
                    variants[kind].step(batch)
                    sync(device)
                    warm[kind] = time.perf_counter() - t
                after = meter.settle()
                resident[kind] = after - before if before is not None and after is not None else None
            repeats = args.repeats
            if args.budget_s:
                share = (args.budget_s - (time.perf_counter() - start)) / (len(groups) - index)
                repeats = max(3, min(args.repeats, int(share / sum(warm.values()))))
            timings = time_group(variants, batch, device, meter, repeats)
            trainable = {
                k: sum(p.numel() for p in v.model.parameters() if p.requires_grad) for k, v in variants.items()
            }
            noise = None
            if args.noise == "csprng":
                noise = noise_seconds([p for p in variants["dp"].model.parameters() if p.requires_grad], device)
            del variants
            if gpu:
                torch.cuda.empty_cache()
            for kind in KINDS:
                t = timings[kind]
                row: dict[str, Any] = {
                    "device": str(device),
                    "model": model,
                    "params": result["models"][model]["params"],
                    "trainable": trainable[kind],
                    "adapter": adapter,
                    "dtype": dtype,
                    "kind": kind,
                    "seconds_per_step": statistics.median(t["wall"]),
                    "peak_memory_mb": None,
                    "resident_memory_mb": resident[kind],
                    "step_memory_mb": t["step_memory_mb"],
                    "cpu_seconds_per_step": statistics.median(t["cpu"]),
                    "repeats": repeats,
                    "seconds_all": t["wall"],
                }
                if kind == "dp" and noise is not None:
                    row["noise_seconds"] = noise
                if resident[kind] is not None and t["step_memory_mb"] is not None:
                    row["peak_memory_mb"] = resident[kind] + t["step_memory_mb"]
                result["rows"].append(row)
                mem_text = f"{row['peak_memory_mb']:.0f} MB" if row["peak_memory_mb"] is not None else "n/a"
                print(
                    f"{model:14s} {adapter:4s} {dtype:4s} {kind:5s} {row['seconds_per_step']:.3f} s/step "
                    f"(x{repeats}) peak {mem_text}",
                    flush=True,
                )
                write()
        except Exception as exc:  # a variant this device cannot run is reported, not fatal
            result["errors"][f"{model}/{adapter}/{dtype}"] = f"{type(exc).__name__}: {exc}"[:300]
            print(f"{model}/{adapter}/{dtype}: failed ({result['errors'][f'{model}/{adapter}/{dtype}']})", flush=True)
            if gpu:
                torch.cuda.empty_cache()
            write()
    result["complete"] = True
    write()
    for key, value in result["dp_over_plain"].items():
        print(f"dp/plain  {key:32s} {value:.3f}")
    for key, value in result["bf16_over_fp32"].items():
        print(f"bf16 speed-up {key:28s} {value:.3f}")
    print(f"total {result['elapsed_s']:.0f} s")


if __name__ == "__main__":
    main()
