"""Benchmark: one Flower round, Flower's SecAgg+ against ours, both driven by the same Flower machinery.

Usage:
    python benchmarks/flower_round.py --json benchmarks/results/flower_round.json
    python benchmarks/flower_round.py --json /tmp/q.json --n 10 --d 100000 --dropout 0 --repeats 1   (quick)

What runs, for n in {10, 50} clients and d = 1,000,000 float32 parameters (`--dtype float64` for
float64 updates and model): Flower's legacy
`DefaultWorkflow` (parameters from the strategy, one fit round, federated evaluation off) over
`LocalGrid`, with its fit step either Flower's `SecAggPlusWorkflow` (ClientApp mods=[secaggplus_mod]) or our
`SecureFitWorkflow` (mods=[secure_aggregation_mod]). Everything else is shared: one ClientApp stub
whose legacy "fit" returns the node's fixed update (uniform in [-0.1, 0.1]^d, fixed seed, in
`--dtype`) with num_examples = 1 at once, so training is excluded; FedAvg(fraction_fit=1) with the
zero model of the same dtype as initial parameters (ours returns the mean in the model's dtype, as
FedAvg without secure aggregation does; Flower's workflow returns float64); clipping_range = 0.1
and max_weight = 1.0 for both (1.0 because Flower scales by num_examples / max_weight before
quantising; see `_flower_anchor.py`); Flower quantises at its
defaults (2^22 levels, modulus 2^32), ours uses its 32-bit ring. (k, t) are our SecAgg+ defaults for
n (`SecAggParams.secagg_plus(n)`: 10% dropout, 5% corruption, 2^-40 bounds); Flower gets
num_shares = k + 1 and the same reconstruction_threshold t (it requires t < num_shares, which holds).

LocalGrid does per message what Flower's simulation engine does: call the ClientApp with the
destination node's persistent Context, one node after the other. It leaves out the LinkState queues
and Ray's actor transport (which pickles message and Context); instead every message and reply is
serialised to protobuf bytes and parsed back (Flower's `message_to_proto` / `message_from_proto`),
as on the deployment engine's gRPC link. (One more difference: an exception raised in a ClientApp
propagates here, where the engine would turn it into an error reply; neither workflow raises in these
runs.) All parties run sequentially in this one process, so the seconds below are the protocol's
total work, not its latency.

Accounting (per round; "ClientApp call" is the whole `ClientApp(message, context)` call):
    round_s         wall time of the fit step (`DefaultWorkflow.fit_workflow`), everything included.
    fit_s           all nodes' stub fit (building the FitRes reply), the stand-in for training.
    strategy_s      FedAvg.aggregate_fit on the n FitRes that both workflows hand it (not protocol).
    measure_s       this script's byte counting (protobuf ByteSize of each message's content).
    waiting_s       time our server sleeps between polls of the grid (its default `sleep`, timed).
                    On LocalGrid every reply is there at once, so it only sleeps where a node stays
                    silent: one 0.05 s poll interval before the 0.01 s stage timeout gives up on it.
                    Flower's workflow never sleeps here (LocalGrid's send_and_receive returns at once;
                    on a real Grid with timeout=None it would wait for the silent node forever).
    secure_agg_s    round_s - fit_s - strategy_s - measure_s - waiting_s: the whole protocol cost,
                    all clients' protocol work + server work + message serialisation, sequential in
                    one process (the brief's "round minus training", less the idle sleep above).
    transport_s     protobuf serialise + parse of every message and reply (LocalGrid's wire copy).
    client_s        per node: ClientApp call time - its stub fit; median (client_s_max: the largest)
                    over the nodes whose update is in the sum; clients_total_s sums all nodes.
    server_s        secure_agg_s - clients_total_s - transport_s: the server side alone.
    *_cpu_s         the same quantities on the process CPU clock (all threads): time stolen by
                    other processes does not count (cache contention still can); waiting costs no CPU.
    upload_bytes_per_client    per node: sum over all its replies of len(protobuf-serialised
                    reply content), median over the included nodes; download likewise for the
                    messages it receives (the model is in both: 4 or 8 bytes per parameter).
    upload ratio    ours_over_flower_upload in the summary: our upload_bytes_per_client over Flower's
                    at the same (n, d, dropped): the bytes one client sends over the whole round
                    (`UPLOAD_RATIO` below, also written into the JSON's setup and targets).
    max_abs_error   largest |aggregated - exact float mean of the included updates|: the model after
                    FedAvg (which re-averages the n FitRes; in float32 for a float32 model, about
                    2e-8 at n = 50, as FedAvg without secure aggregation would).
    delivered_max_abs_error    the same for what the secure aggregation handed FedAvg (the mean
                    in each FitRes): the protocol's own error (ours: quantisation plus float32
                    rounding of the mean; Flower's: its 2^22-level quantisation, in float64).

Each row is the repeat (of --repeats) with the median secure_agg_s; all repeats' secure_agg_s and
secure_agg_cpu_s are listed with it. The summary gives Flower / ours for seconds (wall and CPU; also
without transport, i.e. clients + server only) and ours / Flower for upload bytes, per (n, dropped).

Our payloads and the node's stored update are single `bytes` values of a ConfigRecord: for 4 MB,
Flower's serialiser costs the same as for a one-Array uint8 ArrayRecord (message protobuf round trip
22-31 ms vs 22-30 ms, Context.state to protobuf 21-40 ms vs 23-30 ms, medians of 15 on the shared
2-core machine; the spread is the machine's), so the wire format stays a ConfigRecord.

Dropout rows: the listed fraction of nodes (every 10th) goes silent after sharing keys (LocalGrid
`silence` from a node's third message of the round on): they never send a masked input, so the server
must rebuild their pairwise masks. Flower's setup/share-keys/masked-vector/unmask stages and our
train+advertise/share/masked-input/unmask stages line up message for message.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from protocols import SecAggParams

CLIP = 0.1
MAX_WEIGHT = 1.0
OUR_STAGE_TIMEOUT = 0.01  # LocalGrid answers at once; only silent nodes make our server wait
TARGETS = {"flower_over_ours_secure_agg_s_at_n50": 5.0, "ours_over_flower_upload": 0.55}
UPLOAD_RATIO = (
    "ours_over_flower_upload = ours.upload_bytes_per_client / flower.upload_bytes_per_client at the same "
    "(n, d, dropped): per node, the sum over every reply it sends in the round (all protocol stages, the "
    "training reply's metrics included) of the protobuf ByteSize of the reply's RecordDict (what "
    "flwr.common.serde.recorddict_to_proto writes on the link), median over the nodes whose update is in the sum"
)


def _now() -> np.ndarray:
    """(wall, process CPU) seconds: every span is timed on both clocks."""
    return np.array([time.perf_counter(), time.process_time()])


class _Ledger:
    """Per-round counters filled by the instrumented ClientApp, transport and strategy.

    Time spans are (wall, CPU) pairs; CPU is process time (all threads: Flower's Shamir helpers run
    in a thread pool), which time stolen by other processes on a shared machine does not inflate.
    """

    def __init__(self) -> None:
        self.call: dict[int, np.ndarray] = {}
        self.fit: dict[int, np.ndarray] = {}
        self.upload: dict[int, int] = {}
        self.download: dict[int, int] = {}
        self.transport = np.zeros(2)
        self.measure = np.zeros(2)
        self.strategy = np.zeros(2)
        self.sleep = np.zeros(2)
        self.captured: dict[str, Any] = {}

    def add(self, table: dict[int, Any], node: int, value: Any) -> None:
        table[node] = table.get(node, 0) + value


class _MeasuredClientApp:
    """What LocalGrid calls for each message: the real ClientApp, timed, its bytes counted outside the timing."""

    def __init__(self, app: Any, ledger: _Ledger) -> None:
        self.app, self.ledger = app, ledger

    def __call__(self, message: Any, context: Any) -> Any:
        from flwr.common.serde import recorddict_to_proto

        node = context.node_id
        t0 = _now()
        reply = self.app(message, context)
        t1 = _now()
        self.ledger.add(self.ledger.call, node, t1 - t0)
        self.ledger.add(self.ledger.download, node, recorddict_to_proto(message.content).ByteSize())
        if reply.has_content():
            self.ledger.add(self.ledger.upload, node, recorddict_to_proto(reply.content).ByteSize())
        self.ledger.measure += _now() - t1
        return reply


def _stub_client_app(inputs: list[np.ndarray], mod: Any, ledger: _Ledger) -> Any:
    """The shared ClientApp: a legacy fit returning the node's fixed update with weight 1, behind `mod`."""
    import flwr.compat.common.recorddict_compat as compat
    from flwr.app import Message
    from flwr.clientapp import ClientApp
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters

    def fit(msg: Any, ctx: Any) -> Any:
        t0 = _now()
        update = inputs[int(ctx.node_config["partition-id"])]
        fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([update]), num_examples=1, metrics={})
        reply = Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)
        ledger.add(ledger.fit, ctx.node_id, _now() - t0)
        return reply

    app = ClientApp(mods=[mod])
    app.train()(fit)
    return app


class _TimedFit:
    """The fit step handed to DefaultWorkflow: the real workflow, with wall and CPU time around it."""

    def __init__(self, inner: Callable[[Any, Any], None]) -> None:
        self.inner, self.span = inner, np.zeros(2)

    def __call__(self, grid: Any, context: Any) -> None:
        t0 = _now()
        self.inner(grid, context)
        self.span = _now() - t0


@contextlib.contextmanager
def _instrumented(ledger: _Ledger) -> Iterator[None]:
    """Time LocalGrid's protobuf round trip of each message and our server's poll sleeps.

    Both functions are wrapped for the duration (their behaviour is unchanged): LocalGrid's module-level
    `_wire_copy`, and the default `sleep` of `secure_aggregate` (a keyword default bound at definition,
    which `SecureFitWorkflow` does not let a caller pass).
    """
    from secure_fedllm.flower import grid_round, local_grid

    wire_copy, defaults = local_grid._wire_copy, grid_round.secure_aggregate.__kwdefaults__
    sleep = defaults["sleep"]

    def timed_wire_copy(message: Any) -> Any:
        t0 = _now()
        out = wire_copy(message)
        ledger.transport += _now() - t0
        return out

    def timed_sleep(seconds: float) -> None:
        t0 = _now()
        sleep(seconds)
        ledger.sleep += _now() - t0

    local_grid._wire_copy, defaults["sleep"] = timed_wire_copy, timed_sleep
    try:
        yield
    finally:
        local_grid._wire_copy, defaults["sleep"] = wire_copy, sleep


def _strategy(n: int, d: int, ledger: _Ledger, dtype: Any) -> Any:
    from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.server.strategy import FedAvg

    strategy = FedAvg(
        fraction_fit=1.0,
        fraction_evaluate=0.0,
        min_fit_clients=n,
        min_available_clients=n,
        initial_parameters=ndarrays_to_parameters([np.zeros(d, dtype=dtype)]),
        fit_metrics_aggregation_fn=lambda _metrics: {},
    )
    inner = strategy.aggregate_fit

    def aggregate_fit(rnd: int, results: list[Any], failures: list[Any]) -> Any:
        t0 = _now()
        out = inner(rnd, results, failures)
        t1 = _now()
        ledger.strategy += t1 - t0
        ledger.captured["results"] = len(results)
        ledger.captured["failures"] = len(failures)
        if results:  # what the secure aggregation handed FedAvg (every FitRes holds the same mean)
            ledger.captured["delivered"] = parameters_to_ndarrays(results[0][1].parameters)[0]
        ledger.measure += _now() - t1
        return out

    strategy.aggregate_fit = aggregate_fit  # type: ignore[method-assign]
    return strategy


def ours_params(n: int, d: int) -> SecAggParams:
    """Our SecAgg+ defaults for n, the (k, t) both implementations run with."""
    return SecAggParams.secagg_plus(n, dimension=d, clip_range=CLIP)


def run_once(impl: str, inputs: list[np.ndarray], params: SecAggParams, silent: set[int]) -> dict[str, Any]:
    """One DefaultWorkflow round with `impl`'s fit step over a fresh LocalGrid; timings, bytes and error."""
    from flwr.app import Context, RecordDict
    from flwr.client.mod import secaggplus_mod
    from flwr.server.client_manager import SimpleClientManager
    from flwr.server.compat.legacy_context import LegacyContext
    from flwr.server.server_config import ServerConfig
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
    from flwr.server.workflow.constant import MAIN_PARAMS_RECORD

    from secure_fedllm.flower import LocalGrid, SecureFitWorkflow, secure_aggregation_mod

    n, d, k, t = len(inputs), params.dimension, params.neighbours, params.threshold
    ledger = _Ledger()
    if impl == "flower":
        mod: Any = secaggplus_mod
        inner: Any = SecAggPlusWorkflow(
            num_shares=k + 1, reconstruction_threshold=t, max_weight=MAX_WEIGHT, clipping_range=CLIP
        )
    else:
        mod = secure_aggregation_mod
        inner = SecureFitWorkflow(max_weight=MAX_WEIGHT, clipping_range=CLIP, timeout=OUR_STAGE_TIMEOUT)
        derived = inner.params_for(list(range(1, n + 1)), d)
        if (derived.neighbours, derived.threshold) != (k, t):
            raise RuntimeError(f"SecureFitWorkflow derived k={derived.neighbours}, t={derived.threshold}, not {k}, {t}")
    app = _MeasuredClientApp(_stub_client_app(inputs, mod, ledger), ledger)
    # Node i + 1 holds inputs[i]; silent nodes stop at their third message of the round (after sharing keys).
    grid = LocalGrid(app, [{"partition-id": i} for i in range(n)], silence={i + 1: 2 for i in silent})  # type: ignore[arg-type]
    manager = SimpleClientManager()  # DefaultWorkflow's node-update thread registers the grid's nodes
    base = Context(run_id=grid.run_id, node_id=0, node_config={}, state=RecordDict(), run_config={})
    context = LegacyContext(
        base,
        config=ServerConfig(num_rounds=1),
        strategy=_strategy(n, d, ledger, inputs[0].dtype),
        client_manager=manager,
    )
    timed = _TimedFit(inner)
    with _instrumented(ledger):
        DefaultWorkflow(fit_workflow=timed)(grid, context)

    included = sorted(set(range(n)) - silent)
    if ledger.captured.get("results") != len(included):
        raise RuntimeError(f"{impl}: aggregate_fit got {ledger.captured.get('results')} results, not {len(included)}")
    aggregated = context.state.array_records[MAIN_PARAMS_RECORD].to_numpy_ndarrays()[0]
    exact = np.zeros(d)
    for i in included:
        exact += inputs[i].astype(np.float64)
    exact /= len(included)
    nodes = [i + 1 for i in included]
    zero = np.zeros(2)
    client = {node: ledger.call[node] - ledger.fit.get(node, zero) for node in ledger.call}
    fit = sum(ledger.fit.values(), zero)
    secure_agg = timed.span - fit - ledger.strategy - ledger.measure - ledger.sleep
    clients_total = sum(client.values(), zero)
    server = secure_agg - clients_total - ledger.transport
    upload = statistics.median(ledger.upload[node] for node in nodes)
    row: dict[str, Any] = {
        "impl": impl,
        "n": n,
        "d": d,
        "k": k,
        "t": t,
        **({"num_shares": k + 1} if impl == "flower" else {}),
        "dropped": len(silent),
        "included": len(included),
        "upload_bytes_per_client": upload,
        "upload_bytes_per_client_max": max(ledger.upload[node] for node in nodes),
        "upload_bytes_per_param": upload / d,
        "download_bytes_per_client": statistics.median(ledger.download[node] for node in nodes),
        "max_abs_error": float(np.abs(aggregated - exact).max()),
        "delivered_max_abs_error": float(np.abs(ledger.captured["delivered"] - exact).max()),
        "delivered_dtype": str(ledger.captured["delivered"].dtype),
        "model_dtype_after": str(aggregated.dtype),
    }
    for clock, suffix in ((0, "_s"), (1, "_cpu_s")):  # wall seconds, then CPU seconds
        row.update(
            {
                f"round{suffix}": float(timed.span[clock]),
                f"secure_agg{suffix}": float(secure_agg[clock]),
                f"server{suffix}": float(server[clock]),
                f"client{suffix}": statistics.median(float(client[node][clock]) for node in nodes),
                f"client_max{suffix}": max(float(client[node][clock]) for node in nodes),
                f"clients_total{suffix}": float(clients_total[clock]),
                f"transport{suffix}": float(ledger.transport[clock]),
                f"fit{suffix}": float(fit[clock]),
                f"strategy{suffix}": float(ledger.strategy[clock]),
                f"measure{suffix}": float(ledger.measure[clock]),
            }
        )
    row["waiting_s"] = float(ledger.sleep[0])
    return row


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Flower over ours (seconds) and ours over Flower (bytes) at each (n, dropped)."""
    out = []
    for ours in (r for r in rows if r["impl"] == "ours"):
        key = (ours["n"], ours["d"], ours["dropped"])
        flower = next((r for r in rows if r["impl"] == "flower" and (r["n"], r["d"], r["dropped"]) == key), None)
        if flower is None:
            continue
        entry: dict[str, Any] = {
            "n": ours["n"],
            "d": ours["d"],
            "k": ours["k"],
            "t": ours["t"],
            "dropped": ours["dropped"],
            "flower_over_ours_secure_agg_s_with_waiting": (flower["secure_agg_s"] + flower["waiting_s"])
            / (ours["secure_agg_s"] + ours["waiting_s"]),
        }
        for suffix in ("_s", "_cpu_s"):
            entry[f"flower_over_ours_secure_agg{suffix}"] = flower[f"secure_agg{suffix}"] / ours[f"secure_agg{suffix}"]
            entry[f"flower_over_ours_without_transport{suffix}"] = (
                flower[f"clients_total{suffix}"] + flower[f"server{suffix}"]
            ) / (ours[f"clients_total{suffix}"] + ours[f"server{suffix}"])
            entry[f"flower_over_ours_server{suffix}"] = flower[f"server{suffix}"] / ours[f"server{suffix}"]
            entry[f"flower_over_ours_client{suffix}"] = flower[f"client{suffix}"] / ours[f"client{suffix}"]
            entry[f"flower_over_ours_transport{suffix}"] = flower[f"transport{suffix}"] / ours[f"transport{suffix}"]
        entry.update(
            {
                "ours_over_flower_upload": ours["upload_bytes_per_client"] / flower["upload_bytes_per_client"],
                "ours_over_flower_max_abs_error": ours["max_abs_error"] / flower["max_abs_error"],
                "ours_over_flower_delivered_max_abs_error": ours["delivered_max_abs_error"]
                / flower["delivered_max_abs_error"],
            }
        )
        entry["upload_target_met"] = entry["ours_over_flower_upload"] <= TARGETS["ours_over_flower_upload"]
        if ours["n"] == 50:
            entry["secure_agg_target_met"] = (
                entry["flower_over_ours_secure_agg_s"] >= TARGETS["flower_over_ours_secure_agg_s_at_n50"]
            )
        out.append(entry)
    return out


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        f"{'impl':6s} {'n':>3s} {'drop':>4s} {'k':>3s} {'t':>3s} {'round_s':>8s} {'secagg_s':>8s} {'(cpu)':>7s} "
        f"{'server_s':>8s} {'(cpu)':>7s} {'client_s':>8s} {'wire_s':>7s} {'wait_s':>6s} {'up_MB':>7s} "
        f"{'B/param':>7s} {'max_err':>8s}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['impl']:6s} {r['n']:3d} {r['dropped']:4d} {r['k']:3d} {r['t']:3d} {r['round_s']:8.3f} "
            f"{r['secure_agg_s']:8.3f} {r['secure_agg_cpu_s']:7.3f} {r['server_s']:8.3f} {r['server_cpu_s']:7.3f} "
            f"{r['client_s']:8.4f} {r['transport_s']:7.3f} "
            f"{r['waiting_s']:6.3f} {r['upload_bytes_per_client'] / 1e6:7.3f} {r['upload_bytes_per_param']:7.3f} "
            f"{r['max_abs_error']:8.1e}"
        )
    return "\n".join(lines)


def machine_info() -> dict[str, Any]:
    import importlib.metadata

    from secagg import machine

    info = machine()
    for package in ("flwr", "protobuf"):
        info[package] = importlib.metadata.version(package)
    return info


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", required=True, help="where to write the results")
    parser.add_argument("--n", default="10,50", help="comma-separated client counts")
    parser.add_argument("--d", type=int, default=1_000_000, help="float parameters per update")
    parser.add_argument(
        "--dropout", default="0,0.1", help="comma-separated fractions of nodes silent after key sharing"
    )
    parser.add_argument("--impls", default="flower,ours", help="which fit workflows to run")
    parser.add_argument(
        "--repeats", type=int, default=3, help="rounds per row; the one with median secure_agg_s is kept"
    )
    parser.add_argument("--seed", type=int, default=2024)
    parser.add_argument(
        "--dtype", default="float32", choices=("float32", "float64"), help="the updates' and the model's dtype"
    )
    args = parser.parse_args()
    import flwr.supercore.logger  # noqa: F401  (sets up the "flwr" logger at DEBUG; quiet it afterwards)

    logging.getLogger("flwr").setLevel(logging.WARNING)  # Flower logs every stage at INFO

    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    dtype = np.dtype(args.dtype)
    load_start = os.getloadavg()
    warm = [np.full(1000, 0.01 * i, dtype=dtype) for i in range(5)]  # imports and first-call costs, not measured
    for impl in args.impls.split(","):
        run_once(impl, warm, ours_params(5, 1000), set())
    for n in (int(x) for x in args.n.split(",")):
        params = ours_params(n, args.d)
        print(
            f"n={n}: our SecAggParams.secagg_plus defaults k={params.neighbours}, t={params.threshold} "
            f"(dropout_rate={params.dropout_rate}, corrupt_fraction={params.corrupt_fraction}); "
            f"Flower num_shares={params.neighbours + 1}, reconstruction_threshold={params.threshold}",
            flush=True,
        )
        rng = np.random.default_rng(args.seed)
        inputs = [rng.uniform(-CLIP, CLIP, args.d).astype(dtype) for _ in range(n)]
        for fraction in (float(x) for x in args.dropout.split(",")):
            silent = set(range(0, n, round(1 / fraction))) if fraction > 0 else set()
            for impl in args.impls.split(","):
                runs = [run_once(impl, inputs, params, silent) for _ in range(args.repeats)]
                row = sorted(runs, key=lambda r: r["secure_agg_s"])[len(runs) // 2]
                row["repeats"] = args.repeats
                row["secure_agg_s_repeats"] = [r["secure_agg_s"] for r in runs]
                row["secure_agg_cpu_s_repeats"] = [r["secure_agg_cpu_s"] for r in runs]
                rows.append(row)
                print(json.dumps(row), flush=True)
        del inputs
    summary = summarise(rows)
    out = {
        "benchmark": "flower_round",
        "command": "python " + " ".join(sys.argv),
        "machine": {**machine_info(), "load_avg_1_5_15_start": load_start, "load_avg_1_5_15_end": os.getloadavg()},
        "setup": {
            "clip_range": CLIP,
            "max_weight": MAX_WEIGHT,
            "inputs": f"uniform(-{CLIP}, {CLIP}), numpy default_rng({args.seed}), cast to {args.dtype}",
            "dtype": args.dtype,
            "upload_ratio": UPLOAD_RATIO,
            "flower_quantization_range": 2**22,
            "flower_modulus_range": 2**32,
            "ours_ring_bits": 32,
            "ours_stage_timeout_s": OUR_STAGE_TIMEOUT,
            "grid": "secure_fedllm.flower.LocalGrid (in process, every message protobuf-serialised and parsed)",
            "workflow": "flwr.server.workflow.DefaultWorkflow, num_rounds=1, FedAvg(fraction_fit=1)",
        },
        "targets": {**TARGETS, "ours_over_flower_upload_definition": UPLOAD_RATIO},
        "results": rows,
        "summary": summary,
        "wall_s": time.perf_counter() - started,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    print()
    print(table(rows))
    print()
    for entry in summary:
        print(
            f"n={entry['n']} dropped={entry['dropped']}: Flower/ours secure_agg_s "
            f"{entry['flower_over_ours_secure_agg_s']:.2f}x (CPU {entry['flower_over_ours_secure_agg_cpu_s']:.2f}x; "
            f"without transport {entry['flower_over_ours_without_transport_s']:.2f}x; "
            f"server {entry['flower_over_ours_server_s']:.1f}x, "
            f"client {entry['flower_over_ours_client_s']:.1f}x), ours/Flower upload "
            f"{entry['ours_over_flower_upload']:.3f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
