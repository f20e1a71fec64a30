"""Benchmark: a DP-SGD step against a plain step on LoRA adapters of SmolLM2-135M.

Usage:
    python benchmarks/dp_step.py --json benchmarks/results/dp_step.json
    python benchmarks/dp_step.py --json /tmp/q.json --tiny --repeats 2     (tiny random LLaMA, seconds)

Setup: the embedded SmolLM2-135M-Instruct (float32), LoRA r=16 on q_proj and v_proj, batches of
8 records x 128 tokens of Alpaca text (../shared/data/alpaca_5000.json, records whose rendered
chat form reaches 128 tokens, truncated there; loss on the response tokens, per record). Two
adapter settings: `ffa` (only B trains, the default under secure aggregation) and `lora` (A and B
train). For each, the anchor is a plain step (loss.backward() + Adam, no Opacus) on its own copy
of the model; the DP steps use Opacus (per-sample gradients, clipping, noise, Adam) in each
grad-sample mode that works (hooks, functorch, ew), also on their own copies. All variants run
interleaved in one process, `--repeats` times after one warm-up each; we report median wall-clock
and CPU seconds per step, and `ratio` = best DP mode / plain for `ffa` (target <= 1.10).
"""

from __future__ import annotations

import argparse
import json
import platform
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
from secure_fedllm.models import load_base_model
from secure_fedllm.training import LocalTrainer, StepSettings, per_example_loss

ALPACA = Path(__file__).resolve().parents[2] / "shared" / "data" / "alpaca_5000.json"
MODES = ("hooks", "functorch", "ew")


def _batch(tokenizer: Any, *, rows: int, length: int) -> Any:
    template = ChatTemplate(tokenizer, system_prompt="", max_length=length)
    records = []
    for row in load_alpaca(ALPACA):
        record = TextRecord(row["instruction"], row.get("input") or "", row["output"], unit=str(len(records)))
        example = template.example(record.instruction, record.input, record.output)
        if example is not None and len(example.input_ids) == length and sum(t != -100 for t in example.labels) >= 16:
            records.append(record)
        if len(records) == rows:
            break
    data = TokenizedDataset.build(records, template)
    return data.batch_of_rows(list(range(rows)))


class _Plain:
    def __init__(self, model: Any, lr: float) -> None:
        self.model = model
        self.opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)

    def step(self, batch: Any) -> None:
        self.model.train()
        per_example_loss(self.model, batch).mean().backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


class _DP:
    def __init__(self, model: Any, mode: str, lr: float) -> None:
        self.trainer = LocalTrainer(model, grad_sample_mode=mode)
        settings = StepSettings(1.0, 1.0, 8 / 256, 8, 1, lr, "adam")
        self.opt = self.trainer.optimizer(settings, noise_generator=torch.Generator().manual_seed(0))

    def step(self, batch: Any) -> None:
        self.trainer.step(self.opt, batch)


def main() -> None:  # noqa: C901 - a flat script
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", required=True, type=Path)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--model", default=EMBEDDED_MODEL, help="model id or path (default: embedded SmolLM2)")
    parser.add_argument("--tiny", action="store_true", help="use a tiny random LLaMA (smoke test)")
    args = parser.parse_args()
    if args.tiny:
        import tempfile

        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "secure_fedllm"))
        from tiny_model import save_tiny_llama

        args.model = str(save_tiny_llama(Path(tempfile.mkdtemp())))
    variants: dict[str, Any] = {}
    errors: dict[str, str] = {}
    batch = None
    for setting in ("ffa", "lora"):
        for mode in ("plain", *MODES):
            base, tokenizer = load_base_model(ModelConfig(name=args.model))
            model = attach_lora(base, LoraConfig(r=16, aggregation="ffa" if setting == "ffa" else "fedit"), a0_seed=0)
            if batch is None:
                batch = _batch(tokenizer, rows=args.rows, length=args.length)
            try:
                variant = _Plain(model, 1e-3) if mode == "plain" else _DP(model, mode, 1e-3)
                variant.step(batch)  # warm-up (and a check that the mode works)
                variants[f"{setting}/{mode}"] = variant
            except Exception as exc:  # a mode Opacus cannot run on this model is reported, not fatal
                errors[f"{setting}/{mode}"] = f"{type(exc).__name__}: {exc}"[:300]
    wall: dict[str, list[float]] = {k: [] for k in variants}
    cpu: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.repeats):
        for name, variant in variants.items():
            t, c = time.perf_counter(), time.process_time()
            variant.step(batch)
            wall[name].append(time.perf_counter() - t)
            cpu[name].append(time.process_time() - c)
    rows = []
    for name in variants:
        setting, mode = name.split("/")
        rows.append(
            {
                "adapter": setting,
                "mode": mode,
                "wall_s": statistics.median(wall[name]),
                "cpu_s": statistics.median(cpu[name]),
                "wall_all": wall[name],
            }
        )
    result: dict[str, Any] = {
        "benchmark": "dp_step",
        "model": args.model,
        "batch": [args.rows, args.length],
        "repeats": args.repeats,
        "torch_threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "rows": rows,
        "errors": errors,
    }
    for setting in ("ffa", "lora"):
        plain = next((r for r in rows if r["adapter"] == setting and r["mode"] == "plain"), None)
        dp = [r for r in rows if r["adapter"] == setting and r["mode"] != "plain"]
        if plain and dp:
            best = min(dp, key=lambda r: r["wall_s"])
            key = "ratio" if setting == "ffa" else "ratio_lora"
            result[key] = best["wall_s"] / plain["wall_s"]
            result[f"best_mode_{setting}"] = best["mode"]
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
    for r in rows:
        print(f"{r['adapter']:5s} {r['mode']:10s} wall {r['wall_s']:.3f} s  cpu {r['cpu_s']:.3f} s")
    for name, err in errors.items():
        print(f"{name}: failed ({err})")
    print(f"ratio (best DP / plain, ffa): {result.get('ratio', float('nan')):.3f}")


if __name__ == "__main__":
    main()
