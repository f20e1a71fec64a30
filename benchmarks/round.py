"""Benchmark: seconds and bytes per phase of one default round, with the plaintext round as anchor.

Usage:
    python benchmarks/round.py --json benchmarks/results/round.json
    python benchmarks/round.py --json /tmp/r.json --set model.name=/path/to/tiny --set data.max_length=160

Part 1 runs `secure_fedllm.run` on the default configuration (embedded SmolLM2-135M, 4 clients,
SecAgg+, DP-SGD, FFA-LoRA r=16 on q,v, 3 local steps of expected batch 32) for one round and reads
its metrics: training (all clients, sequentially on this machine), the protocol's client side (all
clients, encoding included) and server side, and evaluation (held-out loss and sample generations).
Part 2 times the aggregation of that round's shape (n = 4, d = the adapter's 368,640 B values)
on fixed random updates, in one process: the encoding pass alone, and a whole round with SecAgg+,
SecAgg and the plaintext control (the same driver, updates sent unmasked), reporting the secure
protocol's seconds and bytes as ratios over the plaintext anchor; then the default run's own
aggregation path in the malicious setting (the default) and the semi-honest one, as a ratio.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from protocols import FixedPointEncoding, SecAggParams, run_round
from secure_fedllm import RunConfig, run
from secure_fedllm.federation import aggregate_updates

D_SMOLLM2_FFA = 30 * 16 * (576 + 192)
"""B values of FFA-LoRA r=16 on q_proj (576 out) and v_proj (192 out) over SmolLM2's 30 layers."""


def _aggregation(n: int, d: int, clip: float, repeats: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(0)
    inputs = [rng.normal(0, clip / 7, d) for _ in range(n)]
    rows = []
    encoding = FixedPointEncoding(clip_range=clip, max_parties=n)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        encoding.encode(inputs[0], weight=1.0)
        times.append(time.perf_counter() - t)
    rows.append({"phase": "encoding (one client)", "seconds": statistics.median(times)})
    for protocol, make in (
        ("secagg+", SecAggParams.secagg_plus),
        ("secagg", SecAggParams.secagg),
        ("plaintext", SecAggParams.secagg),
    ):
        params = make(n, dimension=d, clip_range=clip)
        client, server, up, down = [], [], [], []
        for _ in range(repeats):
            report = run_round(
                params, inputs, protocol="secagg" if protocol != "plaintext" else "plaintext", clock=time.perf_counter
            )
            client.append(sum(report.client_seconds.values()))
            server.append(report.server_seconds)
            up.append(sum(report.upload_bytes.values()))
            down.append(sum(report.download_bytes.values()))
        rows.append(
            {
                "protocol": protocol,
                "neighbours": params.neighbours,
                "client_s_all": statistics.median(client),
                "server_s": statistics.median(server),
                "upload_bytes_all": int(statistics.median(up)),
                "download_bytes_all": int(statistics.median(down)),
            }
        )
    plain = rows[-1]
    rows.extend(_settings(n, d, clip, inputs, repeats))
    for row in rows[1:]:
        if row is plain:
            continue
        row["seconds_vs_plaintext"] = (row["client_s_all"] + row["server_s"]) / (
            plain["client_s_all"] + plain["server_s"]
        )
        row["upload_vs_plaintext"] = row["upload_bytes_all"] / plain["upload_bytes_all"]
    return rows


def _settings(n: int, d: int, clip: float, inputs: list[np.ndarray[Any, Any]], repeats: int) -> list[dict[str, Any]]:
    """The default run's aggregation path (`aggregate_updates`) in the malicious and semi-honest settings.

    The malicious setting is the default: identity keys, parameters every site derives from its
    policy (n_C over the roster of all clients), signed keys, a consistency round. Same inputs,
    same driver, so the ratio is the cost of that setting alone.
    """
    rows = []
    updates = [x.astype(np.float32) for x in inputs]
    for protocol in ("secagg+", "secagg"):
        for setting in ("semi-honest", "malicious"):
            config = RunConfig().with_overrides(
                [f"secure_aggregation.protocol={protocol}", f"secure_aggregation.setting={setting}"]
            )
            client, server, up, down = [], [], [], []
            outcome = None
            for _ in range(repeats):
                outcome = aggregate_updates(config, updates, [1.0] * n, round_number=1, context=b"bench", drop_at={})
                client.append(outcome.client_seconds)
                server.append(outcome.server_seconds)
                up.append(outcome.upload_bytes)
                down.append(outcome.download_bytes)
            assert outcome is not None and outcome.aborted is None, outcome
            rows.append(
                {
                    "protocol": f"{protocol} ({setting}, aggregate_updates)",
                    "setting": setting,
                    "neighbours": outcome.neighbours,
                    "threshold": outcome.threshold,
                    "client_s_all": statistics.median(client),
                    "server_s": statistics.median(server),
                    "upload_bytes_all": int(statistics.median(up)),
                    "download_bytes_all": int(statistics.median(down)),
                }
            )
    for semi, mal in zip(rows[0::2], rows[1::2], strict=True):
        mal["seconds_vs_semi_honest"] = (mal["client_s_all"] + mal["server_s"]) / (
            semi["client_s_all"] + semi["server_s"]
        )
        mal["bytes_vs_semi_honest"] = (mal["upload_bytes_all"] + mal["download_bytes_all"]) / (
            semi["upload_bytes_all"] + semi["download_bytes_all"]
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", required=True, type=Path)
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    config = RunConfig().with_overrides(["federation.rounds=1", *args.overrides])
    out = Path(tempfile.mkdtemp()) / "run"
    t = time.perf_counter()
    result = run(config, out=out, progress=False)
    total = time.perf_counter() - t
    row = result.metrics[1]
    phases = {
        "training (all clients)": row["seconds"]["training"],
        "protocol client (all clients, encoding included)": row["seconds"]["protocol_client"],
        "protocol server": row["seconds"]["protocol_server"],
        "evaluation": row["seconds"]["evaluation"],
    }
    dimension = len(json.loads((result.adapter / "secure_fedllm_adapter.json").read_text())["manifest"])
    aggregation = _aggregation(
        config.federation.clients,
        D_SMOLLM2_FFA if "model.name" not in " ".join(args.overrides) else 50_000,
        config.secure_aggregation.clip_range,
        args.repeats,
    )
    output = {
        "benchmark": "round",
        "config": config.model_dump(mode="json"),
        "run_total_s": total,
        "phases_s": phases,
        "bytes": row["bytes"],
        "upload_bytes_per_client": row["bytes"]["upload"] / len(row["participants"]),
        "adapter_tensors": dimension,
        "perplexity": [r["perplexity"] for r in result.metrics],
        "aggregation": aggregation,
        "machine": platform.processor() or platform.machine(),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(output, indent=1))
    for name, seconds in phases.items():
        print(f"{name:52s} {seconds:8.2f} s")
    print(f"{'upload bytes per client':52s} {output['upload_bytes_per_client']:,.0f}")
    for r in aggregation:
        print(r)


if __name__ == "__main__":
    main()
