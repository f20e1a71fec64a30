"""Benchmark: our SecAgg / SecAgg+ against Flower's SecAgg+ and the AES-CTR keystream limit.

Usage:
    python benchmarks/secagg.py --json benchmarks/results/secagg.json
    python benchmarks/secagg.py --json /tmp/q.json --quick
    python benchmarks/secagg.py --json out.json --configs 1000000:100:auto,1000000:100:99

Single-threaded, one process, fixed data: updates drawn from N(0, 1e-3^2) with a fixed seed, clip
range 7 sigma, n_max = n, 32-bit ring; 10% of clients drop after key sharing (they never send a
masked input, so their pairwise masks must be rebuilt). k = "auto" is our secure SecAgg+ default
for n at 10% dropout and 5% corruption; k = n - 1 is full SecAgg. Flower's SecAgg+ (its real
`secaggplus_mod` and `SecAggPlusWorkflow`, driven in-process by `_flower_anchor.py`) runs on the
same inputs, the same k and the same threshold when `flwr` is installed, once at its default
clipping/quantization and once at our clip range.

Reported per row (medians over surviving clients; for ours also over --repeats rounds, default 5):
client_s, server_s (server stages, client time excluded), upload_bytes_per_param (all of a client's
uploads over d), rel_l2_error (against the exact float sum of the survivors' inputs),
keystream_limit_s: the time AES-256-CTR takes to produce the client's mask bytes ((k + 1) vectors of
d + 1 words) with `update_into` a preallocated buffer, the physical floor, and client_to_limit =
client_s / keystream_limit_s.

client_s is everything a client does in the round, as the in-process driver times it: `set_input`
(checking the update; ours encodes it later, inside the masking pass) and every stage, each counted
from decoding the server's message off the wire to encoding the reply onto it: key generation and
agreement, Shamir sharing, signing and sealing the share boxes, opening and verifying the boxes it
receives, encoding and masking the input, and the unmask answer. Training is excluded.

For ours the limit is measured right before each round (best of 3), and client_to_limit is the
median over rounds of that round's median client time over its own limit: on a shared machine the
keystream rate drifts by up to 2x within a minute, and a ratio against a limit measured at another
time would measure the drift. keystream_limit_s is the median of those limits.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from protocols import RoundStep, SecAggParams, run_round

SIGMA = 1e-3
DEFAULT_CONFIGS = [f"{d}:{n}:{k}" for d in (100_000, 1_000_000, 4_000_000) for n in (10, 100) for k in ("auto", "full")]
QUICK_CONFIGS = ["100000:10:auto", "100000:10:full", "100000:30:auto"]


def keystream_seconds(nbytes: int) -> float:
    """Time for AES-256-CTR to write `nbytes` of keystream, the fast way (update_into, 64 KiB buffer)."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    chunk = 1 << 16
    zeros, buf = bytes(chunk), bytearray(chunk + 15)
    best = float("inf")
    for _ in range(3):
        enc = Cipher(algorithms.AES(os.urandom(32)), modes.CTR(bytes(16))).encryptor()
        t = time.perf_counter()
        for _ in range(nbytes // chunk):
            enc.update_into(zeros, buf)
        enc.update_into(zeros[: nbytes % chunk], buf)
        best = min(best, time.perf_counter() - t)
    return best


def machine() -> dict[str, Any]:
    import cryptography

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "cryptography": cryptography.__version__,
        "cpu_count": os.cpu_count(),
        "threads_used": 1,
    }
    try:
        import subprocess

        root = Path(__file__).resolve().parents[1]
        info["commit"] = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip()
    except OSError:
        info["commit"] = None
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu_model"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        from _flower_anchor import flower_version

        info["flwr"] = flower_version()
    except ImportError:
        info["flwr"] = None
    return info


def parse_config(text: str) -> tuple[int, int, int]:
    d, n, k = text.split(":")
    n_int = int(n)
    if k == "full":
        return int(d), n_int, n_int - 1
    if k == "auto":
        return int(d), n_int, SecAggParams.secagg_plus(n_int, dimension=1, clip_range=1.0).neighbours
    return int(d), n_int, int(k)


def make_params(d: int, n: int, k: int) -> SecAggParams:
    if k >= n - 1:
        return SecAggParams.secagg(n, dimension=d, clip_range=7 * SIGMA)
    auto = SecAggParams.secagg_plus(n, dimension=d, clip_range=7 * SIGMA)
    if auto.neighbours == k:
        return auto
    return SecAggParams.secagg_plus(n, dimension=d, clip_range=7 * SIGMA, neighbours=k, allow_insecure=True)


def run_ours(params: SecAggParams, inputs: list[np.ndarray], drop: set[int], repeats: int) -> dict[str, Any]:
    """Median over `repeats` rounds of the per-round medians (our rounds are cheap to repeat).

    The keystream limit is measured before each round, and each round's client median is set
    against its own limit (see the module docstring).
    """
    silent = dict.fromkeys(drop, RoundStep.INPUT)  # they never send a masked input
    nbytes = (params.neighbours + 1) * (params.dimension + 1) * 4
    limits, reports = [], []
    for _ in range(repeats):
        limits.append(keystream_seconds(nbytes))
        reports.append(run_round(params, inputs, drop_at=silent, clock=time.perf_counter))
    survivors = reports[0].result.included
    per_round = [float(np.median([r.client_seconds[p] for p in survivors])) for r in reports]
    client = float(np.median(per_round))
    server = float(np.median([r.server_seconds for r in reports]))
    report = reports[-1]
    truth = np.sum([inputs[p] for p in survivors], axis=0)
    err = np.linalg.norm(report.result.decoded.weighted_sum - truth) / np.linalg.norm(truth)
    d = params.dimension
    return {
        "client_s": client,
        "server_s": server,
        "keystream_limit_s": float(np.median(limits)),
        "client_to_limit": float(np.median([c / lim for c, lim in zip(per_round, limits, strict=True)])),
        "client_to_limit_per_round": [c / lim for c, lim in zip(per_round, limits, strict=True)],
        "repeats": repeats,
        "upload_bytes_per_param": float(np.median([report.upload_bytes[p] for p in survivors])) / d,
        "rel_l2_error": float(err),
        "threshold": params.threshold,
        "insecure": params.insecure,
    }


def run_flower(params: SecAggParams, inputs: list[np.ndarray], drop: set[int], clip: float | None) -> dict[str, Any]:
    from _flower_anchor import run_flower_secaggplus

    out = run_flower_secaggplus(
        inputs,
        num_shares=params.neighbours + 1,
        reconstruction_threshold=params.threshold,
        clipping_range=clip,
        drop_after_share_keys=set(drop),
    )
    truth = np.sum([inputs[p] for p in out["survivors"]], axis=0)
    err = np.linalg.norm(out["aggregate"] - truth) / np.linalg.norm(truth)
    return {
        "client_s": out["client_s"],
        "server_s": out["server_s"],
        "upload_bytes_per_param": out["upload_bytes_per_param"],
        "rel_l2_error": float(err),
        "threshold": params.threshold,
        "variant": "flower-defaults" if clip is None else "clip-7-sigma",
    }


def flower_available() -> bool:
    try:
        import flwr  # noqa: F401
    except ImportError:
        return False
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", required=True, help="where to write the results")
    parser.add_argument("--configs", help="comma-separated d:n:k, k an integer, 'auto' or 'full'")
    parser.add_argument("--quick", action="store_true", help="small configs, for a smoke test")
    parser.add_argument("--repeats", type=int, default=5, help="rounds of ours per config (median); Flower runs once")
    parser.add_argument("--no-flower", action="store_true", help="skip the Flower anchor")
    parser.add_argument(
        "--flower-skip",
        default="4000000:100:full",
        help="configs where Flower is not run (its full SecAgg at n=100, d=4e6 takes over 10 minutes)",
    )
    args = parser.parse_args()
    configs = args.configs.split(",") if args.configs else (QUICK_CONFIGS if args.quick else DEFAULT_CONFIGS)
    with_flower = flower_available() and not args.no_flower
    results: list[dict[str, Any]] = []
    skipped: list[str] = []
    for text in configs:
        d, n, k = parse_config(text)
        params = make_params(d, n, k)
        rng = np.random.default_rng(12345)
        inputs = [rng.normal(0.0, SIGMA, d) for _ in range(n)]
        drop = set(range(0, n, 10)) if n >= 10 else {0}
        base = {"d": d, "n": n, "k": params.neighbours, "dropped": len(drop)}
        row = {"impl": "ours", **base, **run_ours(params, inputs, drop, args.repeats)}
        results.append(row)
        print(json.dumps(row), flush=True)
        if with_flower and text not in args.flower_skip.split(","):
            # Flower's cost is dominated by pure-Python Shamir over n * (k + 1) shares: run its
            # second variant (our clip range) only where that stays cheap.
            for clip in (None, 7 * SIGMA) if n * (k + 1) <= 2000 else (None,):
                limit = keystream_seconds((params.neighbours + 1) * (d + 1) * 4)
                flower = run_flower(params, inputs, drop, clip)
                row = {
                    "impl": "flower",
                    **base,
                    **flower,
                    "keystream_limit_s": limit,
                    "client_to_limit": flower["client_s"] / limit,
                }
                results.append(row)
                print(json.dumps(row), flush=True)
        elif with_flower:
            skipped.append(text)
        del inputs
    out = {"machine": machine(), "sigma": SIGMA, "results": results, "flower_skipped": skipped}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
