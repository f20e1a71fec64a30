"""The server's side of a round: who joins, dropouts, and secure aggregation of the updates.

Updates travel through the sans-IO protocols of `protocols` over the in-process driver, which
encodes every message to bytes (so bytes are counted and nothing unencoded reaches the server).
The server learns the weighted sum of the survivors' clipped, quantized updates and applies
sum / total weight to the global adapter; the decoded mean is within n * Delta per coordinate
of the survivors' exact weighted mean of clipped updates (Delta the quantization step; stochastic
rounding errs by less than one step per input, and integer weights are encoded exactly).

With `he-ckks` the server never sees a decryption (CKKS decryptions leak key material to whoever
holds the ciphertexts): the mean comes from a client's decryption, as it would for clients that keep
the global model in a deployment; `he-bfv` releases the exact integer sum, as masking does.

`clipped_coordinates` (and the runner's `fedit_product_error`) are simulation diagnostics computed
from the individual updates in process; in a deployment each client keeps its own count.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from protocols import AbortError, SecAggParams, run_round
from protocols.he import HEParams

from ..config import RunConfig

__all__ = ["AggregationOutcome", "aggregate_updates", "draw_dropouts", "sample_cohort", "secagg_params"]


@dataclass
class AggregationOutcome:
    """What the server learned and what it cost (per-client figures are the clients' own counts)."""

    mean: npt.NDArray[np.float64] | None
    included: list[int]
    dropped: list[int]
    aborted: str | None
    max_abs_error: float = 0.0
    clipped_coordinates: int = 0
    client_seconds: float = 0.0
    server_seconds: float = 0.0
    upload_bytes: int = 0
    download_bytes: int = 0
    insecure: bool = False
    neighbours: int = 0
    threshold: int = 0
    extra: dict[str, float] = field(default_factory=dict)


def _rng(seed: int, purpose: str, round_number: int) -> np.random.Generator:
    digest = hashlib.sha256(f"{seed}|{purpose}|{round_number}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "big"))


def sample_cohort(config: RunConfig, round_number: int) -> list[int]:
    """The clients the server asks to join (public randomness from the run seed)."""
    fed = config.federation
    size = fed.clients_per_round or fed.clients
    chosen = _rng(fed.seed, "cohort", round_number).choice(fed.clients, size=size, replace=False)
    return sorted(int(c) for c in chosen)


def draw_dropouts(config: RunConfig, round_number: int, parties: int) -> dict[int, int]:
    """Party position -> first protocol stage at which it goes silent (per-stage probability)."""
    p = config.federation.dropout
    if p <= 0:
        return {}
    draws = _rng(config.federation.seed, "dropout", round_number).random((parties, 5)) < p
    return {i: int(np.argmax(row)) for i, row in enumerate(draws) if row.any()}


def secagg_params(config: RunConfig, n: int, dimension: int) -> SecAggParams:
    """The masking protocol's public parameters for n parties (SecAgg for "secagg", else SecAgg+)."""
    sa = config.secure_aggregation
    make = SecAggParams.secagg if sa.protocol == "secagg" else SecAggParams.secagg_plus
    return make(
        n,
        dimension=dimension,
        clip_range=sa.clip_range,
        threshold=sa.threshold,
        dropout_rate=sa.dropout_rate,
        corrupt_fraction=sa.corrupt_fraction,
    )


def aggregate_updates(
    config: RunConfig,
    updates: Sequence[npt.NDArray[np.float32]],
    weights: Sequence[float],
    *,
    round_number: int,
    context: bytes,
    drop_at: dict[int, int],
    tap: Callable[[int, bytes], None] | None = None,
    rounding_seeds: Sequence[bytes] | None = None,
) -> AggregationOutcome:
    """Securely aggregate `updates` (positions 0..n-1) and return the weighted mean of the survivors."""
    sa = config.secure_aggregation
    n = len(updates)
    clip = sa.clip_range
    clipped = int(sum(int(np.count_nonzero(np.abs(u) > clip)) for u in updates))
    if sa.protocol == "none" and n < 3:
        survivors = [i for i in range(n) if i not in drop_at]
        if not survivors:
            return AggregationOutcome(None, [], sorted(drop_at), "every client dropped", clipped_coordinates=clipped)
        total = sum(weights[i] for i in survivors)
        mean = sum(weights[i] * np.clip(updates[i], -clip, clip).astype(np.float64) for i in survivors) / total
        return AggregationOutcome(mean, survivors, sorted(drop_at), None, clipped_coordinates=clipped)
    params: SecAggParams | HEParams
    if sa.protocol.startswith("he-"):
        make_he = HEParams.bfv_packed if sa.protocol == "he-bfv" else HEParams.ckks_nvflare
        params = make_he(
            n,
            dimension=len(updates[0]),
            clip_range=clip,
            max_parties=max(16, 1 << (config.federation.clients - 1).bit_length()),
            min_contributions=sa.threshold or min(3, n),
            mode=sa.he_mode,
        )
    else:
        params = secagg_params(config, n, len(updates[0]))
    try:
        report = run_round(
            params,
            [u.astype(np.float64) for u in updates],
            protocol="plaintext" if sa.protocol == "none" else "he" if sa.protocol.startswith("he-") else "secagg",
            weights=list(weights),
            drop_at=drop_at,
            round_number=round_number,
            context=context,
            clock=time.perf_counter,
            tap=tap,
            rounding_seeds=rounding_seeds,
        )
    except AbortError as exc:
        return AggregationOutcome(None, [], sorted(drop_at), str(exc), clipped_coordinates=clipped)
    result = report.result
    return AggregationOutcome(
        mean=result.decoded.mean(),
        included=list(result.included),
        dropped=list(result.dropped),
        aborted=None,
        max_abs_error=result.decoded.max_abs_error / max(result.decoded.total_weight, 1e-300),
        clipped_coordinates=clipped,
        client_seconds=sum(report.client_seconds.values()),
        server_seconds=report.server_seconds,
        upload_bytes=sum(report.upload_bytes.values()),
        download_bytes=sum(report.download_bytes.values()),
        insecure=result.insecure,
        neighbours=params.neighbours if isinstance(params, SecAggParams) else 0,
        threshold=params.threshold if isinstance(params, SecAggParams) else params.min_contributions,
    )
