"""Benchmark: what each DP mode costs in utility, at the same records, steps and epsilon.

Usage:
    python benchmarks/dp_utility.py --json benchmarks/results/dp_utility.json
    python benchmarks/dp_utility.py --json /tmp/u.json --model PATH --quick   (a small model, minutes)

Setup: the default run configuration (embedded SmolLM2-135M-Instruct, LoRA r=16 FFA on q_proj and
v_proj, 4 clients of 256 synthetic private records, expected batch 32, Adam at lr 0.02, full
SecAgg in the malicious setting, replace-one neighbouring), with every client taking the same 9
DP-SGD steps at the same sampling rate q = 32/256:

* `none`: no DP (the anchor: what the model learns without noise), 3 rounds of 3 local steps;
* `local`: today's mode, 3 rounds of 3 local steps, each client adding the full Gaussian noise
  (tight PLD accountant);
* `distributed`: 9 rounds of one DP step, each client adding a Skellam share sized for
  h = n - n_C - d_max = 4 - 1 - 1 = 2 honest survivors, the server taking Adam's step on the
  decoded sum (Skellam RDP accountant);
* `client-level`: client-level distributed DP (Kairouz, Liu, Steinke 2021), 3 rounds of 3
  noise-free local steps, each client's whole update clipped to L2 norm privacy.max_grad_norm = 1,
  rotated by a public randomized Hadamard transform, rounded and given its Skellam share; the unit
  is a client, so epsilon covers a whole site (expected to learn nothing with 4 clients);
* `distributed-trusted`: the same with sites that assume no colluding client and no dropout
  (corrupt_fraction = dropout_rate = 0, so h = n = 4 and t = n: one dropout aborts a round), to
  show how the gain grows with h.

Each row reports the final held-out perplexity (server held-out records) next to round 0's, the
noise multiplier (local: per client; distributed: the central noise over the sensitivity, and one
share's), the noise std in the released sum relative to one record's clipped contribution, the
epsilon every client spent, and the wall time. Client-level distributed DP is not implemented yet
and has no row. The noise seed is fixed (`privacy.noise_seed`, the reproducible mode) so that a
rerun gives the same numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from secure_fedllm import RunConfig, run
from secure_fedllm.adapters import SIDECAR
from secure_fedllm.federation.plan import client_policy

STEPS = 9
"""DP-SGD steps per client in every row."""


def _config(mode: str, epsilon: float, extra: list[str]) -> RunConfig:
    common = [
        'secure_aggregation.protocol="secagg"',
        "privacy.noise_seed=0",
        "evaluation.generations=0",
        f"privacy.target_epsilon={epsilon}",
        *extra,
    ]
    if mode == "none":
        return RunConfig().with_overrides([*common, 'privacy.mechanism="none"', "federation.rounds=3",
                                           f"federation.local_steps={STEPS // 3}"])  # fmt: skip
    if mode == "local":
        return RunConfig().with_overrides([*common, "federation.rounds=3", f"federation.local_steps={STEPS // 3}"])
    if mode == "client-level":  # the whole update clipped (privacy.max_grad_norm), rotated, rounded, noised
        return RunConfig().with_overrides([*common, 'privacy.mode="distributed"', 'privacy.unit="client"',
                                           "federation.rounds=3", f"federation.local_steps={STEPS // 3}"])  # fmt: skip
    distributed = [*common, 'privacy.mode="distributed"', f"federation.rounds={STEPS}"]
    if mode == "distributed-trusted":  # sites that assume no collusion and no dropout: h = n
        distributed += ["secure_aggregation.corrupt_fraction=0.0", "secure_aggregation.dropout_rate=0.0"]
    return RunConfig().with_overrides(distributed)


def _row(mode: str, epsilon: float | None, extra: list[str], work: Path) -> dict[str, Any]:
    config = _config(mode, epsilon or 8.0, extra)
    t = time.perf_counter()
    result = run(config, out=work / f"{mode}-{epsilon}", progress=False)
    wall = time.perf_counter() - t
    perplexities = [r.perplexity for r in result.metrics]
    row: dict[str, Any] = {
        "mode": mode,
        "epsilon": epsilon,
        "perplexity": perplexities[-1],
        "perplexity_round0": perplexities[0],
        "perplexity_ratio": perplexities[-1] / perplexities[0],
        "perplexity_per_round": perplexities,
        "epsilon_spent": max(result.epsilons.values()),
        "rounds": config.federation.rounds,
        "dp_steps_per_client": STEPS,
        "wall_s": wall,
    }
    if mode != "none":
        policy = client_policy(config, 0, _units(result), dimension=_dimension(result))
        n = config.federation.clients
        if policy.distributed is not None:
            d = policy.distributed
            row.update(
                noise_multiplier=d.noise_multiplier,
                share_noise_multiplier=d.share_noise_multiplier,
                honest_shares=d.honest,
                # std of the released sum's noise over one record's clipped contribution (n shares of mu / h)
                sum_noise_over_clip=math.sqrt(2 * d.share_mu * n) / d.l2,
                accountant="skellam-rdp",
            )
        else:
            row.update(
                noise_multiplier=policy.noise_multiplier,
                sum_noise_over_clip=policy.noise_multiplier * math.sqrt(n),  # n clients' Gaussians in the average
                accountant=config.privacy.accountant,
            )
    return row


def _units(result: Any) -> int:
    """Client 0's N_i, as its report states it."""
    found = re.search(r"client 0: \d+ records, (\d+) units", (result.out / "report.md").read_text())
    if found is None:
        raise RuntimeError(f"{result.out / 'report.md'} does not state client 0's units")
    return int(found.group(1))


def _dimension(result: Any) -> int:
    """The aggregated adapter's length, from the manifest in the adapter's sidecar."""
    sidecar = json.loads((result.adapter / SIDECAR).read_text())
    return sum(math.prod(shape) for _name, shape in sidecar["manifest"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", required=True, help="where to write the rows")
    parser.add_argument("--model", default=None, help="another model (path or id) instead of the embedded default")
    parser.add_argument("--quick", action="store_true", help="64 records per client (with --model: a smoke run)")
    parser.add_argument("--epsilons", default="8,1", help="comma-separated target epsilons")
    parser.add_argument("--merge", action="store_true", help="replace these rows in an existing --json file")
    parser.add_argument(
        "--modes", default="none,local,distributed,distributed-trusted,client-level", help="comma-separated modes"
    )
    args = parser.parse_args()
    extra = []
    if args.model:
        extra.append(f'model.name="{args.model}"')
    if args.quick:
        extra += ["data.records_per_client=64", "privacy.expected_batch_size=8", "data.max_length=160", "lora.r=4"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode in args.modes.split(","):
            for epsilon in [None] if mode == "none" else [float(e) for e in args.epsilons.split(",")]:
                row = _row(mode, epsilon, extra, Path(tmp))
                print(json.dumps({k: v for k, v in row.items() if k != "perplexity_per_round"}), flush=True)
                rows.append(row)
    command = "python " + " ".join(sys.argv)
    path = Path(args.json)
    if args.merge and path.exists():
        old = json.loads(path.read_text())
        new_keys = {(r["mode"], r["epsilon"]) for r in rows}
        rows = [r for r in old["rows"] if (r["mode"], r["epsilon"]) not in new_keys] + rows
        commands = [*old.get("commands", [old.get("command")]), command]
    else:
        commands = [command]
    out = {
        "commands": commands,
        "machine": {"python": platform.python_version(), "processor": platform.processor() or platform.machine()},
        "setup": __doc__.split("Setup:")[1].split("Each row")[0].strip(),
        "rows": rows,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
