"""Benchmark: one SecAgg+ round at n = 100 ... 1000 (3000) clients, the server in its own process.

Usage:
    python benchmarks/scale.py --json benchmarks/results/scale.json
    python benchmarks/scale.py --json /tmp/s.json --ns 100 --settings semi-honest --no-flower
    python benchmarks/scale.py --json /tmp/s.json --ns 1000 --settings malicious --profile-dir /tmp/prof

One round per (setting, n): d = 1e6 float updates drawn from N(0, 1e-3^2) (per-party seeds), clip
range 7 sigma, 32-bit ring, our derived (k, t) (`SecAggParams.secagg_plus` at 10% dropout and 5%
corruption; the malicious setting pins an Ed25519 identity key per party, so k must exceed
n_C + d_max), and 10% of the clients (ids 0, 10, 20, ...) silent from the masked-input stage on:
their pairwise masks are rebuilt from shares.

The server runs in a child process (`--serve`), fed the clients' wire bytes (`family.encode`) through
a pipe, and answers with its own wire bytes; it streams the sum (it never holds n masked inputs) and
runs its unmask jobs under a process pool's `map` (`--workers`, default the machine's cores).
`server_s` is the wall time the child spends decoding, receiving and closing stages (waiting on the
pipe excluded); `server_peak_rss_mb` is the child's own peak RSS (getrusage, VmHWM), and
`pool_peak_rss_mb` the largest pool worker's. The clients run one after another in this process,
each given its update just before it masks it, so no more than one 4 MB masked input exists here at
a time. `client_s` is the median over surviving clients of all their stages (decode, handle,
encode); `client_to_limit` divides it by the time AES-256-CTR takes for (k + 1)(d + 1) * 4 bytes of
keystream, measured in the same run (`secagg.keystream_seconds`). `upload_bytes_per_client` is the
median over survivors of all bytes a client sends.

Flower's SecAgg+ (its real `secaggplus_mod` and `SecAggPlusWorkflow`, `_flower_anchor.py`) runs at
the same n and k (semi-honest; Flower has no malicious setting) where it fits in 10 minutes and
memory (it holds every float64 update and every masked reply); larger n are recorded under
`skipped` with the reason and a power-law estimate from the points that ran.

`gil` records whether `cryptography`'s AES `update_into` releases the GIL (the longest pause of a
Python thread during one 512 MiB call): it does, so a thread pool would parallelise the mask
regeneration; the signature checks and the big-integer Lagrange arithmetic hold it, which is why
the server is given a process pool.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import IO, Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from secagg import keystream_seconds, machine

from protocols import DeterministicRandom, SecAggParams
from protocols.primitives import ed25519_public
from protocols.secagg import MaskedInput, SecAggClient, SecAggFamily, SecAggServer, ShareBundle

SIGMA = 1e-3
D = 1_000_000
DROPOUT = 0.1
CORRUPT = 0.05
TEN_MINUTES = 600.0

# -- framing over the pipes ------------------------------------------------------------------------


def _write(out: IO[bytes], tag: bytes, payload: bytes = b"") -> None:
    out.write(tag + struct.pack("<Q", len(payload)))
    out.write(payload)


def _read(inp: IO[bytes]) -> tuple[bytes, bytes]:
    head = inp.read(9)
    if len(head) != 9:
        raise EOFError("pipe closed")
    (length,) = struct.unpack("<Q", head[1:])
    if head[:1] not in b"MCRENWJS" or length > 1 << 36:
        raise ValueError(f"framing lost: tag {head[:1]!r}, length {length}")
    payload = inp.read(length)
    if len(payload) != length:
        raise EOFError("pipe closed mid-frame")
    return head[:1], payload


# -- the server process ----------------------------------------------------------------------------


def _vm_hwm_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class _TimedMap:
    """The pool's map, with the wall time of each job kind recorded (the server's breakdown)."""

    def __init__(self, inner: Callable[..., Iterable[Any]]) -> None:
        self.inner = inner
        self.seconds: dict[str, float] = {}

    def __call__(self, fn: Callable[[Any], Any], jobs: Iterable[Any]) -> list[Any]:
        t = time.perf_counter()
        out = list(self.inner(fn, list(jobs)))
        self.seconds[fn.__name__] = self.seconds.get(fn.__name__, 0.0) + time.perf_counter() - t
        return out


def serve(config_path: str) -> int:
    """The server side: read framed client messages from stdin, answer on stdout."""
    config = json.loads(Path(config_path).read_text())
    params = SecAggParams.model_validate_json(config["params"])
    family = SecAggFamily(params)
    workers = int(config["workers"])
    pool = ProcessPoolExecutor(workers) if workers > 1 else None  # forked while this process is small
    timed = _TimedMap(pool.map if pool is not None else map)
    server = SecAggServer(
        params,
        session=bytes.fromhex(config["session"]),
        round_number=0,
        map_jobs=timed,
        jobs=max(1, workers),
    )
    inp, out = sys.stdin.buffer, sys.stdout.buffer
    busy = cpu = 0.0
    stages: dict[str, float] = {}
    while True:
        tag, payload = _read(inp)
        if tag == b"M":
            t, c = time.perf_counter(), time.process_time()
            server.receive(family.decode(payload))
            cpu += time.process_time() - c
            dt = time.perf_counter() - t
            name = "receive " + server.stage.name
            stages[name] = stages.get(name, 0.0) + dt
            busy += dt
        elif tag == b"C":
            name = "close " + server.stage.name
            t, c = time.perf_counter(), time.process_time()
            try:
                outgoing = server.close_stage()
                encoded: dict[int, bytes] = {}  # a broadcast (the roster, the survivor set) is encoded once
                wires = [(p, encoded.get(id(m)) or encoded.setdefault(id(m), family.encode(m))) for p, m in outgoing]
            except Exception as exc:  # the round aborted: tell the parent, then stop
                _write(out, b"E", f"{type(exc).__name__}: {exc}".encode())
                out.flush()
                return 1
            cpu += time.process_time() - c
            dt = time.perf_counter() - t
            stages[name] = stages.get(name, 0.0) + dt
            busy += dt
            _write(out, b"N", struct.pack("<I", len(wires)))
            for p, wire in wires:
                _write(out, b"W", struct.pack("<I", p) + wire)
            out.flush()
        elif tag == b"R":
            result = server.result()
            if pool is not None:
                pool.shutdown()
            children = resource.getrusage(resource.RUSAGE_CHILDREN)
            info = {
                "server_s": busy,
                "server_cpu_s": cpu + children.ru_utime + children.ru_stime,
                "stages_s": stages,
                "jobs_s": timed.seconds,
                "server_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "server_vmhwm_mb": _vm_hwm_mb(),
                "pool_peak_rss_mb": children.ru_maxrss / 1024,
                "included": list(result.included),
                "max_abs_error": result.decoded.max_abs_error,
            }
            _write(out, b"J", json.dumps(info).encode())
            _write(out, b"S", np.asarray(result.decoded.weighted_sum, dtype=np.float64).tobytes())
            out.flush()
            return 0
        else:
            raise ValueError(f"unknown frame {tag!r}")


# -- the client side (this process) ----------------------------------------------------------------


def _update(seed: int, party: int, d: int) -> np.ndarray:
    return np.random.default_rng((seed, party)).normal(0.0, SIGMA, d)


def make_params(n: int, malicious: bool, d: int) -> tuple[SecAggParams, list[bytes] | None]:
    private = None
    kw: dict[str, Any] = {}
    if malicious:
        source = DeterministicRandom(b"scale/identity")
        private = [source.token_bytes(32) for _ in range(n)]
        kw["identity_keys"] = tuple(ed25519_public(k) for k in private)
    params = SecAggParams.secagg_plus(
        n, dimension=d, clip_range=7 * SIGMA, dropout_rate=DROPOUT, corrupt_fraction=CORRUPT, **kw
    )
    return params, private


def _start_server(
    params: SecAggParams, session: bytes, workers: int, tag: str, profile_dir: str | None
) -> tuple[subprocess.Popen[bytes], subprocess.Popen[bytes] | None, Path]:
    """The server child process, and py-spy on it (and its pool) when profiling."""
    config = Path(f"/tmp/scale_server_{os.getpid()}_{tag}.json")
    config.write_text(json.dumps({"params": params.model_dump_json(), "session": session.hex(), "workers": workers}))
    child = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--serve", str(config)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    spy = None
    if profile_dir is not None:
        Path(profile_dir).mkdir(parents=True, exist_ok=True)
        target = str(Path(profile_dir) / f"server_{tag}.speedscope.json")
        spy_bin = str(Path(sys.executable).parent / "py-spy")
        # --nonblocking: never pause the server (a ptrace stop in the middle of a pipe write is not worth the risk)
        command = [
            spy_bin,
            "record",
            "--nonblocking",
            "--subprocesses",
            "--format",
            "speedscope",
            "-r",
            "50",
            "-o",
            target,
        ]
        spy = subprocess.Popen(
            [*command, "--pid", str(child.pid)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
    return child, spy, config


class _Clients:
    """The n clients of one round in this process, timed, answering the server child's messages."""

    def __init__(self, params: SecAggParams, private: list[bytes] | None, session: bytes, seed: int) -> None:
        n = params.num_parties
        self.params, self.seed, self.n = params, seed, n
        self.family = SecAggFamily(params)
        self.drop = set(range(0, n, 10))
        self.clients = [
            SecAggClient(
                params,
                party_id=p,
                session=session,
                round_number=0,
                identity_key=None if private is None else private[p],
                rng=DeterministicRandom(b"scale/party/%d/%d" % (n, p)),
            )
            for p in range(n)
        ]
        self.seconds = dict.fromkeys(range(n), 0.0)
        self.upload = dict.fromkeys(range(n), 0)
        self.gone: set[int] = set()
        self.truth = np.zeros(params.dimension, dtype=np.float64)

    def start(self, p: int) -> bytes:
        t = time.perf_counter()
        wire = self.family.encode(self.clients[p].advertise_keys())
        self.seconds[p] += time.perf_counter() - t
        self.upload[p] += len(wire)
        return wire

    def answer(self, p: int, wire: bytes) -> bytes | None:
        """The client's reply to one server message, or None when it is silent."""
        if p in self.gone:
            return None
        x = None
        t = time.perf_counter()
        message = self.family.decode(wire)
        if isinstance(message, ShareBundle):
            if p in self.drop:  # silent from the masked-input stage on
                self.gone.add(p)
                return None
            self.seconds[p] += time.perf_counter() - t
            x = _update(self.seed, p, self.params.dimension)  # from training: not protocol time
            t = time.perf_counter()
            self.clients[p].set_input(x)
        reply = self.clients[p].handle(message)
        out = self.family.encode(reply)
        self.seconds[p] += time.perf_counter() - t
        if isinstance(reply, MaskedInput):
            clip = self.params.encoding.clip_range
            np.add(self.truth, np.clip(x, -clip, clip), out=self.truth)
        self.upload[p] += len(out)
        return out


def _drive(child: subprocess.Popen[bytes], clients: _Clients) -> tuple[dict[str, Any], np.ndarray]:
    """Play the network between this process's clients and the server child until the round ends."""
    assert child.stdin is not None and child.stdout is not None
    for p in range(clients.n):
        _write(child.stdin, b"M", clients.start(p))
    while True:
        _write(child.stdin, b"C")
        child.stdin.flush()
        tag, payload = _read(child.stdout)
        if tag == b"E":
            raise RuntimeError(f"server aborted: {payload.decode()}")
        (count,) = struct.unpack("<I", payload)
        if count == 0:
            break
        # read the whole stage's output first: answering while the server still writes could deadlock
        frames = [_read(child.stdout)[1] for _ in range(count)]
        for frame in frames:
            (p,) = struct.unpack_from("<I", frame)
            reply = clients.answer(p, frame[4:])
            if reply is not None:
                _write(child.stdin, b"M", reply)
    _write(child.stdin, b"R")
    child.stdin.flush()
    _, info_raw = _read(child.stdout)
    _, sum_raw = _read(child.stdout)
    child.wait()
    return json.loads(info_raw), np.frombuffer(sum_raw, dtype=np.float64)


def run_ours(n: int, setting: str, d: int, workers: int, seed: int, profile_dir: str | None) -> dict[str, Any]:
    """One round; the server in a child process (see module docstring)."""
    t0 = time.perf_counter()
    params, private = make_params(n, setting == "malicious", d)
    derive_s = time.perf_counter() - t0
    session = DeterministicRandom(b"scale/session/%d" % n).token_bytes(16)
    tag = f"{setting}_{n}"
    child, spy, config = _start_server(params, session, workers, tag, profile_dir)
    clients = _Clients(params, private, session, seed)
    info, got = _drive(child, clients)
    if spy is not None:
        spy.wait(timeout=120)
    config.unlink()
    survivors = [p for p in range(n) if p not in clients.drop]
    if info["included"] != survivors:
        raise RuntimeError(f"server summed {len(info['included'])} inputs, expected the {len(survivors)} survivors")
    err = float(np.max(np.abs(got - clients.truth)))
    if err > info["max_abs_error"] + 1e-9:
        raise RuntimeError(f"decoded sum off by {err} > bound {info['max_abs_error']}")
    k = params.neighbours
    limit = keystream_seconds((k + 1) * (d + 1) * 4)
    times = [clients.seconds[p] for p in survivors]
    row = {
        "impl": "ours",
        "setting": setting,
        "n": n,
        "d": d,
        "k": k,
        "t": params.threshold,
        "dropped": len(clients.drop),
        "server_s": info["server_s"],
        "server_cpu_s": info["server_cpu_s"],
        "client_s": statistics.median(times),
        "client_p90_s": float(np.percentile(times, 90)),
        "keystream_limit_s": limit,
        "client_to_limit": statistics.median(times) / limit,
        "server_peak_rss_mb": info["server_peak_rss_mb"],
        "server_vmhwm_mb": info["server_vmhwm_mb"],
        "pool_peak_rss_mb": info["pool_peak_rss_mb"],
        "upload_bytes_per_client": int(statistics.median(clients.upload[p] for p in survivors)),
        "max_abs_error": err,
        "error_bound": info["max_abs_error"],
        "server_stages_s": info["stages_s"],
        "server_jobs_s": info["jobs_s"],
        "params_derive_s": derive_s,
        "workers": workers,
        "load_avg_1m_at_end": os.getloadavg()[0],
    }
    if profile_dir is not None:
        row["profile"] = summarize_speedscope(Path(profile_dir) / f"server_{tag}.speedscope.json")
    return row


def summarize_speedscope(path: Path, top: int = 15) -> dict[str, Any]:
    """Self and inclusive sample shares per function, over every profiled process (py-spy speedscope)."""
    if not path.exists():
        return {"error": f"no profile at {path}"}
    data = json.loads(path.read_text())
    frames = data["shared"]["frames"]
    self_w: dict[str, float] = {}
    incl_w: dict[str, float] = {}
    total = 0.0
    for prof in data["profiles"]:
        for stack, weight in zip(prof["samples"], prof["weights"], strict=True):
            total += weight
            if not stack:
                continue
            names = [f"{frames[i]['name']} ({Path(frames[i].get('file', '?')).name})" for i in stack]
            self_w[names[-1]] = self_w.get(names[-1], 0.0) + weight
            for name in set(names):
                incl_w[name] = incl_w.get(name, 0.0) + weight

    def share(table: dict[str, float]) -> list[tuple[str, float]]:
        return [(k, round(v / total, 4)) for k, v in sorted(table.items(), key=lambda kv: -kv[1])[:top]]

    return {"file": str(path), "samples": total, "self": share(self_w), "inclusive": share(incl_w)}


# -- Flower ----------------------------------------------------------------------------------------


def run_flower(n: int, d: int, seed: int) -> dict[str, Any]:
    from _flower_anchor import run_flower_secaggplus

    params, _ = make_params(n, False, d)
    drop = set(range(0, n, 10))
    inputs = [_update(seed, p, d) for p in range(n)]
    t = time.perf_counter()
    out = run_flower_secaggplus(
        inputs,
        num_shares=params.neighbours + 1,
        reconstruction_threshold=params.threshold,
        clipping_range=None,
        drop_after_share_keys=drop,
    )
    wall = time.perf_counter() - t
    k = params.neighbours
    limit = keystream_seconds((k + 1) * (d + 1) * 4)
    return {
        "impl": "flower",
        "setting": "semi-honest",
        "n": n,
        "d": d,
        "k": k,
        "t": params.threshold,
        "dropped": len(drop),
        "server_s": out["server_s"],
        "client_s": out["client_s"],
        "keystream_limit_s": limit,
        "client_to_limit": out["client_s"] / limit,
        "server_peak_rss_mb": None,
        "upload_bytes_per_client": int(out["upload_bytes_per_param"] * d),
        "round_wall_s": wall,
        "note": "in-process (the anchor runs Flower's server and clients in one process): no separate server RSS",
    }


# -- fits, GIL probe, main -------------------------------------------------------------------------


def fitted_exponent(rows: list[dict[str, Any]], key: str = "server_s") -> float | None:
    """Least-squares slope of log(key) against log(n)."""
    pts = [(math.log(r["n"]), math.log(r[key])) for r in rows if r.get(key)]
    if len(pts) < 2:
        return None
    mx = statistics.fmean(x for x, _ in pts)
    my = statistics.fmean(y for _, y in pts)
    return sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)


def gil_probe() -> dict[str, Any]:
    """Longest pause of a Python thread while another thread runs one 512 MiB AES-CTR update_into."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    size = 512 << 20
    zeros, buf = bytes(size), bytearray(size + 15)
    enc = Cipher(algorithms.AES(os.urandom(32)), modes.CTR(bytes(16))).encryptor()
    gaps: list[float] = []
    stop = threading.Event()

    def tick() -> None:
        last = time.perf_counter()
        while not stop.is_set():
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    th = threading.Thread(target=tick)
    th.start()
    time.sleep(0.02)
    t = time.perf_counter()
    enc.update_into(zeros, buf)
    call = time.perf_counter() - t
    stop.set()
    th.join()
    return {
        "aes_update_into_512mib_s": call,
        "longest_python_thread_pause_s": max(gaps),
        "releases_gil": max(gaps) < call / 4,
    }


def flower_points(
    ns: list[int], flower_ns: list[int], d: int, seed: int, results: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Run Flower at `flower_ns`, appending rows to `results`; the other n are estimated and returned as skipped."""
    skipped: list[dict[str, Any]] = []
    flower_rows: list[dict[str, Any]] = []
    for n in ns:
        if n in flower_ns:
            row = run_flower(n, d, seed)
            flower_rows.append(row)
            results.append(row)
            print(json.dumps(row), flush=True)
    for n in ns:
        if n in flower_ns:
            continue
        est: dict[str, Any] = {}
        for key in ("server_s", "client_s"):
            slope = fitted_exponent(flower_rows, key)
            if slope is not None:
                ref = flower_rows[-1]
                est[f"estimated_{key}"] = ref[key] * (n / ref["n"]) ** slope
                est[f"{key}_exponent"] = slope
        skipped.append(
            {
                "impl": "flower",
                "setting": "semi-honest",
                "n": n,
                "reason": "not run: Flower's in-process round keeps every float64 update and masked reply "
                f"({n} x {d * 8 / 1e6:.0f} MB and more) and its pure-Python Shamir grows with n k; "
                "the power-law fit from the points that ran (estimated_*) puts it past 10 minutes or memory",
                **est,
            }
        )
    return skipped


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="where to write the results")
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--ns", default="100,300,1000", help="comma-separated n (3000 fits semi-honest only)")
    parser.add_argument("--settings", default="semi-honest,malicious")
    parser.add_argument("--d", type=int, default=D)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="server pool size (1: serial)")
    parser.add_argument("--flower-ns", default="100,300", help="n at which Flower runs (the rest are estimated)")
    parser.add_argument("--no-flower", action="store_true")
    parser.add_argument("--profile-dir", help="py-spy the server (and its pool) of the malicious rows into this dir")
    parser.add_argument("--seed", type=int, default=2026)
    args = parser.parse_args()
    if args.serve:
        return serve(args.serve)
    if not args.json:
        parser.error("--json is required")
    ns = [int(x) for x in args.ns.split(",")]
    results: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    for setting in [s for s in args.settings.split(",") if s]:
        for n in ns:
            profile = args.profile_dir if setting == "malicious" else None
            row = run_ours(n, setting, args.d, args.workers, args.seed, profile)
            results.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "profile"}), flush=True)
    if not args.no_flower:
        skipped = flower_points(ns, [int(x) for x in args.flower_ns.split(",") if x], args.d, args.seed, results)
    fits = {}
    for setting in [s for s in args.settings.split(",") if s]:
        rows = [r for r in results if r["impl"] == "ours" and r["setting"] == setting]
        fits[setting] = {
            "server_s_exponent": fitted_exponent(rows),
            "server_cpu_s_exponent": fitted_exponent(rows, "server_cpu_s"),
            "n": [r["n"] for r in rows],
            "n_log_n_exponent_over_range": (
                None
                if len(rows) < 2
                else math.log((rows[-1]["n"] * math.log(rows[-1]["n"])) / (rows[0]["n"] * math.log(rows[0]["n"])))
                / math.log(rows[-1]["n"] / rows[0]["n"])
            ),
        }
    out = {
        "machine": {**machine(), "threads_used": args.workers},
        "gil": gil_probe(),
        "d": args.d,
        "dropout": DROPOUT,
        "corrupt_fraction": CORRUPT,
        "results": results,
        "fits": fits,
        "skipped": skipped,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
