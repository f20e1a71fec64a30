"""Benchmark: packed BFV against CKKS at NVFlare's defaults and against our SecAgg+ masking.

Usage:
    python benchmarks/he.py --json benchmarks/results/he.json
    python benchmarks/he.py --json /tmp/he.json --dims 100000 --n 4       (quick)
    python benchmarks/he.py --dims 1000000 --impls bfv-seeded ckks-nvflare --modes symmetric   (subset)

Setup: n = 10 clients (n_max = 16), d in {1e5, 1e6}, updates N(0, 0.01^2) clipped to the public
range 0.05, weight 1, one process per (implementation, mode, d) so that peak RSS is that
configuration's own. Implementations:

* `bfv-packed`: our default, BFV N=4096, q = 56+53 bits, t = 2^41 - 65535, two 16-bit values per
  slot in 20-bit fields (`protocols.he`).
* `bfv-seeded`: the same parameters in symmetric mode with seeded uploads (`HEParams.bfv_seeded`):
  each fresh ciphertext travels as c0 and the 64-byte seed of its uniform half (about 3.5 B/param).
* `ckks-nvflare`: CKKS N=8192, [60, 40, 40], scale 2^40, one value per slot: NVFlare's `HEBuilder`
  defaults, encrypting the flattened update as NVFlare's `model_encryptor` does.
* `ckks-tenseal`: NVFlare's own client path at the same defaults, outside our protocol: the flat update
  as one `ts.ckks_vector` (TenSEAL chunks it), then `serialize()` (zstd), as NVFlare's model_encryptor
  does; the server deserializes and adds, the key holder decrypts floats (nothing is rounded or
  checked, so `exact` is false). This is the CKKS anchor without our bare-polynomial export.
* `secagg+`: our pairwise masking (k derived for n = 10 at 10% dropout), the whole client protocol.

Modes: `symmetric` is NVFlare's (every client holds the secret key); `public-key` is reported beside
it. Per row: `client_us_per_param` (quantize + encrypt + serialize one update, median over the n
clients; for secagg+ the client's whole protocol), `server_s` (check and add the n uploads: the
server's format check plus the key holder's own homomorphic sum; uploads are streamed into the sum
one at a time, so memory does not grow with n), `decrypt_s` (decrypt and decode the sum),
`upload_bytes_per_param` (one client's ciphertexts, or its whole secagg+ upload, over d),
`peak_rss_mb` and `exact` (the released integers equal the sum of the quantized inputs: BFV and
masking by construction, CKKS after the key holder's checked rounding).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CLIP = 0.05


def _inputs(n: int, d: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [np.clip(rng.normal(0, 0.01, d), -CLIP, CLIP) for _ in range(n)]


def _he(impl: str, mode: str, d: int, n: int) -> dict[str, Any]:
    from protocols.he import HEParams
    from protocols.he._ciphers import (
        ChunkSum,
        check_chunks,
        decode_words,
        decrypt_ckks_values,
        decrypt_words,
        encrypt_update,
        export_key,
        load_key,
        make_context,
        quantize,
        round_ckks,
    )

    if impl == "bfv-seeded":
        params = HEParams.bfv_seeded(n, dimension=d, clip_range=CLIP, max_parties=16)
    else:
        make = HEParams.bfv_packed if impl == "bfv-packed" else HEParams.ckks_nvflare
        params = make(n, dimension=d, clip_range=CLIP, max_parties=16, mode=mode)
    ctx = make_context(params)
    client_ctx = ctx
    if mode == "public-key":
        client_ctx = load_key(params, export_key(params, ctx))  # clients hold the public key only
    xs = _inputs(n, d)
    seeds = [os.urandom(32) for _ in range(n)]
    total = ChunkSum(params, ctx)  # the key holder's own sum of the checked uploads (the server only checks)
    client_s, server_s, upload = [], 0.0, 0
    for x, seed in zip(xs, seeds, strict=True):
        t = time.perf_counter()
        chunks = encrypt_update(params, client_ctx, x, weight=1.0, rounding_seed=seed)
        client_s.append(time.perf_counter() - t)
        upload = sum(len(c) for c in chunks)
        t = time.perf_counter()
        check_chunks(params, chunks, field="chunks")
        total.add(chunks, sender=0)
        server_s += time.perf_counter() - t
        del chunks
    summed = total.vectors()
    t = time.perf_counter()
    if impl.startswith("bfv"):
        words = decrypt_words(params, summed)
        decoded = decode_words(params, words)
        decrypt_s = time.perf_counter() - t
        expected = sum(quantize(params, x, weight=1.0, rounding_seed=s) for x, s in zip(xs, seeds, strict=True))
        exact = bool((words == expected).all())
    else:
        words = round_ckks(params, decrypt_ckks_values(params, summed), tolerance=params.ckks_tolerance)
        decoded = decode_words(params, words)
        decrypt_s = time.perf_counter() - t
        expected = sum(quantize(params, x, weight=1.0, rounding_seed=s) for x, s in zip(xs, seeds, strict=True))
        exact = bool((words == expected).all())
    error = float(np.abs(decoded.weighted_sum - sum(xs)).max())
    return {
        "client_us_per_param": statistics.median(client_s) / d * 1e6,
        "server_s": server_s,
        "decrypt_s": decrypt_s,
        "upload_bytes_per_param": upload / d,
        "exact": exact,
        "max_abs_error": error,
        "ciphertexts_per_update": params.chunks,
    }


def _secagg(d: int, n: int) -> dict[str, Any]:
    from protocols import SecAggParams, run_round

    params = SecAggParams.secagg_plus(n, dimension=d, clip_range=CLIP)
    xs = _inputs(n, d)
    report = run_round(params, xs, clock=time.perf_counter)
    error = float(np.abs(report.result.decoded.weighted_sum - sum(xs)).max())
    return {
        "client_us_per_param": statistics.median(report.client_seconds.values()) / d * 1e6,
        "server_s": report.server_seconds,
        "decrypt_s": 0.0,
        "upload_bytes_per_param": statistics.median(report.upload_bytes.values()) / d,
        "exact": True,
        "max_abs_error": error,
        "neighbours": params.neighbours,
    }


def _ckks_tenseal(mode: str, d: int, n: int) -> dict[str, Any]:
    import tenseal as ts

    kind = ts.ENCRYPTION_TYPE.SYMMETRIC if mode == "symmetric" else ts.ENCRYPTION_TYPE.ASYMMETRIC
    ctx = ts.context(
        ts.SCHEME_TYPE.CKKS, poly_modulus_degree=8192, coeff_mod_bit_sizes=[60, 40, 40], encryption_type=kind
    )
    ctx.generate_relin_keys()
    ctx.global_scale = 2.0**40
    client = ctx
    if mode == "public-key":
        client = ts.context_from(ctx.serialize(save_secret_key=False))
    server = ts.context_from(ctx.serialize(save_public_key=False, save_secret_key=False, save_relin_keys=False))
    xs = _inputs(n, d)
    client_s, server_s, upload, total = [], 0.0, 0, None
    for x in xs:
        t = time.perf_counter()
        blob = ts.ckks_vector(client, x).serialize()
        client_s.append(time.perf_counter() - t)
        upload = len(blob)
        t = time.perf_counter()
        vector = ts.ckks_vector_from(server, blob)
        total = vector if total is None else total + vector
        server_s += time.perf_counter() - t
    assert total is not None
    total.link_context(ctx)
    t = time.perf_counter()
    summed = np.asarray(total.decrypt())
    decrypt_s = time.perf_counter() - t
    return {
        "client_us_per_param": statistics.median(client_s) / d * 1e6,
        "server_s": server_s,
        "decrypt_s": decrypt_s,
        "upload_bytes_per_param": upload / d,
        "exact": False,
        "max_abs_error": float(np.abs(summed - sum(xs)).max()),
    }


def _single(spec: str) -> None:
    impl, mode, d, n = spec.split(":")
    row = {"impl": impl, "mode": mode, "d": int(d), "n": int(n)}
    if impl == "secagg+":
        row.update(_secagg(int(d), int(n)))
    elif impl == "ckks-tenseal":
        row.update(_ckks_tenseal(mode, int(d), int(n)))
    else:
        row.update(_he(impl, mode, int(d), int(n)))
    row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(row))


def _summary(rows: list[dict[str, Any]], dims: list[int]) -> dict[str, dict[str, float]]:
    """Speed-ups and byte ratios of the BFV rows against both CKKS anchors, per d and mode."""

    def find(impl: str, mode: str, d: int) -> dict[str, Any] | None:
        return next((r for r in rows if r["impl"] == impl and r["mode"] == mode and r["d"] == d), None)

    summary: dict[str, dict[str, float]] = {}
    for d in dims:
        for mode in ("symmetric", "public-key"):
            ckks = find("ckks-nvflare", mode, d)
            if ckks is None:
                continue
            entry = summary.setdefault(f"{d}/{mode}", {})
            native = find("ckks-tenseal", mode, d)
            for impl, tag in (("bfv-packed", ""), ("bfv-seeded", "seeded_")):
                bfv = find(impl, mode, d)
                if bfv is None:
                    continue
                entry[f"{tag}client_speedup_vs_ckks"] = ckks["client_us_per_param"] / bfv["client_us_per_param"]
                if native is not None:
                    ratio = native["client_us_per_param"] / bfv["client_us_per_param"]
                    entry[f"{tag}client_speedup_vs_ckks_tenseal"] = ratio
                entry[f"{tag}bytes_ratio_ckks_over_bfv"] = (
                    ckks["upload_bytes_per_param"] / bfv["upload_bytes_per_param"]
                )
                entry[f"{tag}bfv_bytes_per_param"] = bfv["upload_bytes_per_param"]
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--dims", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--n", type=int, default=10)
    parser.add_argument("--impls", nargs="+", default=None, help="subset of implementations (default: all)")
    parser.add_argument("--modes", nargs="+", default=None, help="subset of modes (default: all)")
    parser.add_argument("--single", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.single:
        _single(args.single)
        return
    rows = []
    for d in args.dims:
        for impl, mode in (
            ("bfv-packed", "symmetric"),
            ("bfv-seeded", "symmetric"),
            ("ckks-nvflare", "symmetric"),
            ("ckks-tenseal", "symmetric"),
            ("bfv-packed", "public-key"),
            ("ckks-nvflare", "public-key"),
            ("ckks-tenseal", "public-key"),
            ("secagg+", "-"),
        ):
            if (args.impls and impl not in args.impls) or (args.modes and mode != "-" and mode not in args.modes):
                continue
            spec = f"{impl}:{mode}:{d}:{args.n}"
            out = subprocess.run(
                [sys.executable, __file__, "--single", spec], capture_output=True, text=True, check=True
            )
            row = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(
                f"{impl:12s} {mode:10s} d={d:>9,} client {row['client_us_per_param']:.3f} us/param  "
                f"server {row['server_s']:.3f} s  decrypt {row['decrypt_s']:.3f} s  "
                f"{row['upload_bytes_per_param']:.2f} B/param  rss {row['peak_rss_mb']:.0f} MB  exact {row['exact']}"
            )

    summary = _summary(rows, args.dims)
    result = {
        "benchmark": "he",
        "n": args.n,
        "n_max": 16,
        "rows": rows,
        "summary": summary,
        "machine": platform.processor() or platform.machine(),
        "python": platform.python_version(),
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
