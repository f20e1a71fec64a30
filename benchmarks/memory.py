"""Benchmark: peak memory of the default run, and of a DP-SGD client round against model size.

Usage:
    python benchmarks/memory.py --json benchmarks/results/memory.json      (~15 minutes on a 2-core box)
    python benchmarks/memory.py --quick --json /tmp/memory_quick.json      (1-2 minutes: a short run, 2 widths)

Part 1, `default_run`: `secure-fedllm run --quiet --out <tmp>` (the default configuration: SmolLM2-135M,
4 clients, 3 rounds, SecAgg+, DP-SGD at epsilon 8) as a child process. Its peak RSS comes from the
kernel's accounting of that child (`os.wait4`, the `ru_maxrss` that `/usr/bin/time -v` reports); the
parent also polls the child's RSS every 0.2 s for a timeline (one point per 2 s is kept). From the
run's metrics.jsonl: seconds per round (training and secure aggregation, plus the held-out
evaluation that follows) and the final perplexity ratio. `--quick` runs 1 round of 1 local step on
64 records per client instead (not the default run: `overrides` says so). The noise comes from
os.urandom as in any default run, so the ratio varies from run to run by about +-0.02.

Part 2, `scaling`: one DP-SGD client round (`LocalTrainer`: Opacus hooks, per-example clipping,
ChaCha20 noise, Adam; FFA LoRA r=16 on q_proj/v_proj) of `--steps` steps on a fixed batch of 32
records x 64 tokens (the default run's expected Poisson batch and max_length; loss on the last 48
tokens of each row), for random LLaMA models of increasing width (`--widths`; 4 layers, heads of
64, intermediate 8/3 x hidden, vocabulary 8192, untied head), with the frozen base in float32 and
bfloat16, with and without gradient checkpointing, and (float32 without checkpointing) with one
pass over the whole batch instead of the CPU default of 512 tokens per pass (`tokens_per_pass`).
Each row runs in its own child process, so that no row inherits another's freed memory. The model
is saved once per width (float32 safetensors, the byte-level tokenizer of `secure_fedllm.tiny_model`)
and loaded by `load_base_model`, as a run loads its base. Per row: `imports_mb` (RSS after the
imports), `resident_mb` (RSS after loading the model, attaching LoRA and building the trainer, with
freed memory given back), `load_peak_mb` (peak RSS up to then), `step_peak_mb` (peak RSS during
the steps: VmHWM, reset through /proc/self/clear_refs after the load), `step_extra_mb` (that
peak over `resident_mb`: what the round itself needs), `peak_rss_mb` (the child's peak) and
`seconds_per_step` (median over the steps after the first, which warms up).

The JSON is rewritten after every row, so an interrupted run keeps what it measured (`complete`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

WIDTHS = (64, 256, 512, 1024)
QUICK_WIDTHS = (64, 256)
LAYERS, VOCAB, ROWS, LENGTH, PROMPT = 4, 8192, 32, 64, 16
QUICK_OVERRIDES = (
    "federation.rounds=1",
    "federation.local_steps=1",
    "data.records_per_client=64",
    "evaluation.heldout_records=16",
    "evaluation.generations=0",
)


def _cli() -> list[str]:
    script = Path(sys.executable).parent / "secure-fedllm"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "secure_fedllm_cli"]


def _rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def run_child(command: list[str], *, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run `command`; its exit status, wall seconds, peak RSS (`ru_maxrss` of this child) and RSS timeline."""
    start = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    timeline: list[tuple[float, float]] = []
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            rss = _rss_mb(child.pid)
            if rss is not None:
                timeline.append((round(time.perf_counter() - start, 1), round(rss)))
            done.wait(0.2)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    stdout_chunks: list[str] = []
    stderr_chunks: list[str] = []
    readers = [
        threading.Thread(target=lambda: stdout_chunks.append(child.stdout.read()), daemon=True),  # type: ignore[union-attr]
        threading.Thread(target=lambda: stderr_chunks.append(child.stderr.read()), daemon=True),  # type: ignore[union-attr]
    ]
    for reader in readers:
        reader.start()
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    done.set()
    poller.join()
    for reader in readers:
        reader.join()
    kept, last = [], -2.0
    for t, rss in timeline:
        if t - last >= 2.0:
            kept.append([t, rss])
            last = t
    return {
        "returncode": child.returncode,
        "wall_s": round(time.perf_counter() - start, 1),
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),  # kilobytes on Linux
        "polled_peak_rss_mb": max((rss for _, rss in timeline), default=None),
        "timeline_s_mb": kept,
        "stdout": "".join(stdout_chunks),
        "stderr": "".join(stderr_chunks),
    }


def default_run(overrides: tuple[str, ...]) -> dict[str, Any]:
    """Part 1: the run as a child process, its peak RSS, seconds per round and perplexity ratio."""
    with tempfile.TemporaryDirectory(prefix="memory-bench-") as tmp:
        out = Path(tmp) / "run"
        command = [*_cli(), "run", "--quiet", "--out", str(out)]
        for item in overrides:
            command += ["--set", item]
        result = run_child(command)
        row: dict[str, Any] = {
            "command": " ".join(["secure-fedllm", *command[len(_cli()) :]]).replace(str(out), "<tmp>"),
            "overrides": list(overrides),
            "is_default_run": not overrides,
            **{k: v for k, v in result.items() if k not in ("stdout", "stderr")},
        }
        if result["returncode"] != 0:
            row["error"] = result["stderr"][-2000:]
            return row
        rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    played = [r for r in rounds if r["round"] > 0]
    row["perplexity"] = [r["perplexity"] for r in rounds]
    row["final_perplexity_ratio"] = rounds[-1]["perplexity"] / rounds[0]["perplexity"]
    row["seconds_per_round"] = statistics.mean(r["seconds"]["round"] + r["seconds"]["evaluation"] for r in played)
    row["training_and_aggregation_s_per_round"] = statistics.mean(r["seconds"]["round"] for r in played)
    row["evaluation_s_per_round"] = statistics.mean(r["seconds"]["evaluation"] for r in rounds)
    row["epsilon"] = rounds[-1]["epsilon"]
    return row


def _shape(hidden: int) -> dict[str, int]:
    heads = max(1, hidden // 64)
    return {
        "hidden_size": hidden,
        "intermediate_size": (hidden * 8 // 3 + 63) // 64 * 64,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "vocab_size": VOCAB,
    }


def save_model(folder: Path, hidden: int) -> int:
    """A random LLaMA of width `hidden` with the byte-level tokenizer, saved in float32; its parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging

    from secure_fedllm.tiny_model import save_tiny_llama

    logging.disable_progress_bar()

    save_tiny_llama(folder)  # the tokenizer (and a 64-wide model, replaced below)
    special = json.loads((folder / "config.json").read_text())
    torch.manual_seed(0)
    config = LlamaConfig(
        **_shape(hidden),
        max_position_embeddings=512,
        eos_token_id=special["eos_token_id"],
        pad_token_id=special["pad_token_id"],
        bos_token_id=special["bos_token_id"],
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise OSError(f"{field} missing from /proc/self/status")


def single(spec: dict[str, Any]) -> dict[str, Any]:
    """Part 2, one row, in this (child) process."""
    import torch

    from secure_fedllm.adapters import attach_lora
    from secure_fedllm.config import LoraConfig, ModelConfig
    from secure_fedllm.data.chat import IGNORE_INDEX
    from secure_fedllm.data.tokenized import Batch
    from secure_fedllm.memory import release_memory
    from secure_fedllm.models import load_base_model
    from secure_fedllm.training import LocalTrainer, StepSettings

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    imports = _status_mb("VmRSS")
    base, _ = load_base_model(ModelConfig(name=spec["folder"]), dtype=spec["dtype"])
    model = attach_lora(base, LoraConfig(r=16, aggregation="ffa"), a0_seed=0)
    trainer = LocalTrainer(
        model,
        gradient_checkpointing=spec["checkpointing"],
        tokens_per_pass=spec["tokens_per_pass"],
    )
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (ROWS, LENGTH), generator=generator)
    labels = ids.clone()
    labels[:, :PROMPT] = IGNORE_INDEX
    batch = Batch(ids, torch.ones_like(ids), labels, torch.arange(ROWS), ROWS)
    settings = StepSettings(1.0, 1.0, ROWS / 256, ROWS, spec["steps"], 1e-3, "adam")
    optimizer = trainer.optimizer(settings, noise_key=bytes(32))
    release_memory()
    resident = _status_mb("VmRSS")
    load_peak = _status_mb("VmHWM")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS: the peak from here on is the round's
    seconds = []
    for _ in range(spec["steps"]):
        t = time.perf_counter()
        trainer.step(optimizer, batch)
        seconds.append(time.perf_counter() - t)
    step_peak = _status_mb("VmHWM")
    return {
        "imports_mb": round(imports, 1),
        "resident_mb": round(resident, 1),
        "load_peak_mb": round(load_peak, 1),
        "step_peak_mb": round(step_peak, 1),
        "step_extra_mb": round(step_peak - resident, 1),
        "seconds_per_step": round(statistics.median(seconds[1:] or seconds), 3),  # the first step warms up
        "seconds_all": [round(s, 3) for s in seconds],
        "torch_threads": torch.get_num_threads(),
    }


def scaling(args: argparse.Namespace, result: dict[str, Any], write: Any) -> None:
    """Part 2: one child process per (width, dtype, checkpointing, tokens per pass)."""
    variants = [(dtype, ckpt, "auto") for dtype in ("float32", "bfloat16") for ckpt in (False, True)]
    variants.append(("float32", False, None))  # one pass over the whole batch: what the passes save
    with tempfile.TemporaryDirectory(prefix="memory-bench-models-") as tmp:
        for hidden in args.widths:
            folder = Path(tmp) / f"llama-{hidden}"
            params = save_model(folder, hidden)
            for dtype, ckpt, tokens in variants:
                spec = {
                    "folder": str(folder),
                    "dtype": dtype,
                    "checkpointing": ckpt,
                    "tokens_per_pass": tokens,
                    "steps": args.steps,
                    "threads": args.threads,
                }
                row: dict[str, Any] = {
                    "hidden": hidden,
                    "params": params,
                    "params_mb_fp32": round(params * 4 / 2**20, 1),
                    "dtype": dtype,
                    "gradient_checkpointing": ckpt,
                    "tokens_per_pass": "auto (512 on the CPU)" if tokens == "auto" else "whole batch",
                }
                child = run_child([sys.executable, __file__, "--single", json.dumps(spec)])
                if child["returncode"] == 0:
                    row.update(json.loads(child["stdout"].strip().splitlines()[-1]))
                    row["peak_rss_mb"] = child["peak_rss_mb"]
                else:
                    row["error"] = child["stderr"][-2000:]
                result["scaling"].append(row)
                write()
                print(
                    f"hidden {hidden:5d} {dtype:8s} ckpt={ckpt!s:5s} pass={row['tokens_per_pass']!s:11s} "
                    f"peak {row.get('peak_rss_mb', '-')} MB, step +{row.get('step_extra_mb', '-')} MB, "
                    f"{row.get('seconds_per_step', '-')} s/step",
                    flush=True,
                )


def environment() -> dict[str, Any]:
    import opacus
    import peft
    import torch
    import transformers

    env: dict[str, Any] = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "opacus": opacus.__version__,
        "python": platform.python_version(),
        "libc": " ".join(platform.libc_ver()),
        "machine": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "malloc_arena_max": os.environ.get("MALLOC_ARENA_MAX"),
        "load_average_at_start": os.getloadavg(),
    }
    try:
        env["commit"] = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain"], capture_output=True, text=True)
        env["uncommitted_changes"] = bool(dirty.stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        pass
    return env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="where the results go (rewritten after every row)")
    parser.add_argument("--quick", action="store_true", help="a 1-round run and widths 64, 256 (1-2 minutes)")
    parser.add_argument("--widths", type=int, nargs="+", help=f"model widths (default {WIDTHS}; quick {QUICK_WIDTHS})")
    parser.add_argument("--steps", type=int, help="DP-SGD steps per scaling row (default 3; quick 2)")
    parser.add_argument("--threads", type=int, help="torch threads in the scaling rows (default: torch's)")
    parser.add_argument("--skip-run", action="store_true", help="skip part 1 (the default run)")
    parser.add_argument("--skip-scaling", action="store_true", help="skip part 2 (model size)")
    parser.add_argument("--single", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.single:
        print(json.dumps(single(json.loads(args.single))))
        return
    if args.json is None:
        parser.error("--json is required")
    args.widths = args.widths or (QUICK_WIDTHS if args.quick else WIDTHS)
    args.steps = args.steps or (2 if args.quick else 3)
    start = time.perf_counter()
    result: dict[str, Any] = {
        "benchmark": "memory",
        "quick": args.quick,
        "environment": environment(),
        "default_run": None,
        "scaling_setup": {
            "model": f"random LLaMA, {LAYERS} layers, heads of 64, intermediate 8/3 x hidden, vocabulary {VOCAB}",
            "batch": [ROWS, LENGTH],
            "loss_tokens_per_row": LENGTH - PROMPT,
            "lora": "FFA r=16 on q_proj, v_proj",
            "steps": args.steps,
        },
        "scaling": [],
        "complete": False,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)

    def write() -> None:
        result["elapsed_s"] = round(time.perf_counter() - start, 1)
        args.json.write_text(json.dumps(result, indent=1) + "\n")

    write()
    if not args.skip_run:
        result["default_run"] = default_run(QUICK_OVERRIDES if args.quick else ())
        write()
        run = result["default_run"]
        print(
            f"default run{' (quick)' if args.quick else ''}: peak RSS {run['peak_rss_mb']:.0f} MB, "
            f"{run.get('seconds_per_round', float('nan')):.1f} s per round, "
            f"perplexity ratio {run.get('final_perplexity_ratio', float('nan')):.3f}, wall {run['wall_s']:.0f} s",
            flush=True,
        )
    if not args.skip_scaling:
        scaling(args, result, write)
    result["complete"] = True
    write()


if __name__ == "__main__":
    main()
