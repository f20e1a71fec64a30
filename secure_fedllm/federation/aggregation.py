"""The server's side of a round: who joins, dropouts, and secure aggregation of the updates.

Updates travel through the sans-IO protocols of `protocols` over the in-process driver, which
encodes every message to bytes (so bytes are counted and nothing unencoded reaches the server).
The server learns the weighted sum of the survivors' clipped, quantized updates and applies
sum / total weight to the global adapter; the decoded mean is within n * Delta per coordinate
of the survivors' exact weighted mean of clipped updates (Delta the quantization step; stochastic
rounding errs by less than one step per input, and integer weights are encoded exactly).

Both engines build the round's protocol from the same function, `round_family` (parameters from
`round_params`), so one RunConfig knob means the same on both. `he-bfv` and `he-ckks` encrypt the
same quantized integers and the key holder releases their exact integer sum to the server, as
masking does (CKKS after rounding its decryption, refused unless every value is within 2^-8 of an
integer: the raw decryption, which leaks key material, is never released; see `protocols.he`).
In the malicious setting HE hellos are signed with the clients' identity keys, as masking's are.

`clipped_coordinates` (and the runner's `fedit_product_error`) are simulation diagnostics computed
from the individual updates in process; in a deployment each client keeps its own count.

Masking runs in the malicious-server setting by default (`secure_aggregation.setting`): every
simulated client holds its own Ed25519 identity key (the runner passes each client's key from its
site state; callers without one get fresh keys from `simulated_identity_keys`), the roster is every
client's public key, and each client checks the round's parameters against its own
`SecurityPolicy` (derived from the RunConfig by `site_security_policy`, n_C counted over the whole
roster) before its session starts. The server builds the parameters with `policy.derive`, so an
honest server's parameters are exactly what every site accepts.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from protocols import (
    AbortError,
    HEFamily,
    PlaintextFamily,
    SecAggFamily,
    SecAggParams,
    SecurityPolicy,
    run_sessions,
)
from protocols.he import HEParams
from protocols.primitives import ed25519_public

from ..config import RunConfig
from ..site.policy import site_security_policy

__all__ = [
    "AggregationOutcome",
    "aggregate_updates",
    "draw_dropouts",
    "family_facts",
    "protocol_dimension",
    "round_family",
    "round_params",
    "sample_cohort",
    "secagg_params",
    "signed_sum",
    "simulated_identity_keys",
]


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
    malicious: bool = False
    neighbours: int = 0
    threshold: int = 0
    extra: dict[str, float] = field(default_factory=dict)
    ring_sum: npt.NDArray[np.int64] | None = None
    """Integer inputs (distributed DP): the exact signed sum of the included vectors mod 2^b (no weight word)."""


def signed_sum(ring_sum: npt.NDArray[np.unsignedinteger]) -> npt.NDArray[np.int64]:
    """The centred lift of a ring sum without its weight word: what distributed DP decodes."""
    values = np.asarray(ring_sum)
    return values[:-1].view(values.dtype.str.replace("u", "i")).astype(np.int64)


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


def simulated_identity_keys(n: int) -> list[bytes]:
    """Fresh Ed25519 private keys (CSPRNG) for n simulated clients that bring no site state of their own.

    The runner and the Flower nodes use each client's `SiteState.identity_key` instead; this is for
    direct callers of `aggregate_updates` (tests, benchmarks) in the malicious setting.
    """
    return [os.urandom(32) for _ in range(n)]


def secagg_params(
    config: RunConfig,
    n: int,
    dimension: int,
    *,
    identity_keys: Sequence[bytes] | None = None,
    roster: Sequence[bytes] | None = None,
) -> SecAggParams:
    """The masking protocol's public parameters for n parties (SecAgg for "secagg", else SecAgg+).

    Args:
        config: the run configuration.
        n: the parties of this session.
        dimension: length of each update.
        identity_keys: the members' Ed25519 public keys in party order: the malicious setting, with
            the parameters every site derives from its policy (n_C over `roster`).
        roster: every client's public key (what each site pins); default: `identity_keys`.

    Raises:
        InsecureParameterError: the sites' policy admits no parameters at this n (or refuses the
            configured threshold); the message names the field.
    """
    sa = config.secure_aggregation
    if identity_keys is not None:
        policy = site_security_policy(config, roster=roster if roster is not None else identity_keys)
        params = policy.derive(n, dimension=dimension, clip_range=sa.clip_range, identity_keys=identity_keys)
        if sa.threshold is not None and sa.threshold != params.threshold:
            params = SecAggParams(**{**params.model_dump(), "threshold": sa.threshold})
            policy.check_secagg(params, party_id=0, identity_public_key=identity_keys[0])
        return params
    if config.privacy.mode == "distributed" and config.privacy.mechanism != "none":
        # each client adds only a noise share: the sites' full-SecAgg parameters with t >= n - d_max
        params = site_security_policy(config, roster=None).derive(n, dimension=dimension, clip_range=sa.clip_range)
        if sa.threshold is not None and sa.threshold != params.threshold:  # announced as configured; sites check it
            params = SecAggParams(**{**params.model_dump(), "threshold": sa.threshold})
        return params
    make = SecAggParams.secagg if sa.protocol == "secagg" else SecAggParams.secagg_plus
    return make(
        n,
        dimension=dimension,
        clip_range=sa.clip_range,
        threshold=sa.threshold,
        dropout_rate=sa.dropout_rate,
        corrupt_fraction=sa.corrupt_fraction,
    )


def protocol_dimension(config: RunConfig, dimension: int) -> int:
    """The length of the vectors a round sums: the adapter's, or (client-level DP) its rotation's power of two."""
    if config.privacy.mode == "distributed" and config.privacy.unit == "client" and config.privacy.mechanism != "none":
        from ..privacy.rotation import padded_dimension

        return padded_dimension(dimension)
    return dimension


def round_params(
    config: RunConfig,
    n: int,
    dimension: int,
    *,
    identity_keys: Sequence[bytes] | None = None,
    roster: Sequence[bytes] | None = None,
) -> SecAggParams | HEParams:
    """The public parameters of one round of the configured protocol, for n parties (both engines).

    Masking ("secagg", "secagg+") and the plaintext control ("none", semi-honest only: nothing is signed)
    take `secagg_params`. HE ("he-bfv", "he-ckks") takes `HEParams` with n_max = max(16, the next power
    of two >= federation.clients), min_contributions = secure_aggregation.threshold or min(3, n),
    mode = secure_aggregation.he_mode, and the members' identity keys (signed hellos) when given.
    Symmetric BFV uploads are seeded (`HEParams.bfv_seeded`: c0 and a 64-byte seed, half the bytes):
    the same moduli and noise, only the wire format changes, so it is not a security parameter a
    site checks; every HE session is refused by a site whose n_C > 0 (`SecurityPolicy.check_he`).

    Args:
        config: the run configuration.
        n: the parties of this session.
        dimension: length of each update.
        identity_keys: the members' Ed25519 public keys in party order (the malicious setting).
        roster: every client's public key, which each site pins (masking counts n_C over it).

    Raises:
        InsecureParameterError: no secure parameters at this n (the message names the field).
    """
    sa = config.secure_aggregation
    if sa.protocol.startswith("he-"):
        make_he = HEParams.ckks_nvflare if sa.protocol == "he-ckks" else HEParams.bfv_packed
        return make_he(
            n,
            dimension=dimension,
            clip_range=sa.clip_range,
            max_parties=max(16, 1 << (config.federation.clients - 1).bit_length()),
            min_contributions=sa.threshold or min(3, n),
            mode=sa.he_mode,
            seeded=sa.protocol == "he-bfv" and sa.he_mode == "symmetric",
            identity_keys=tuple(identity_keys) if identity_keys is not None else None,
        )
    if sa.protocol == "none":
        return secagg_params(config, n, dimension)
    return secagg_params(config, n, dimension, identity_keys=identity_keys, roster=roster)


def round_family(
    config: RunConfig,
    n: int,
    dimension: int,
    *,
    identity_keys: Sequence[bytes] | None = None,
    roster: Sequence[bytes] | None = None,
) -> SecAggFamily | HEFamily | PlaintextFamily:
    """The `protocols.SessionFamily` of one round (`round_params`' parameters); the one builder of both engines.

    "none" gives the plaintext control, allowed by the simulated sites' choice of protocol="plaintext".
    """
    params = round_params(config, n, dimension, identity_keys=identity_keys, roster=roster)
    if isinstance(params, HEParams):
        return HEFamily(params)
    if config.secure_aggregation.protocol == "none":
        return PlaintextFamily(params, policy=SecurityPolicy.model_validate({"protocol": "plaintext"}))
    return SecAggFamily(params)


def family_facts(family: SecAggFamily | HEFamily | PlaintextFamily) -> tuple[int, int, bool]:
    """(neighbours, threshold, malicious) of a round's family, for its record (HE: 0, min_contributions, signed)."""
    params = family.params
    if isinstance(params, HEParams):
        return 0, params.min_contributions, params.identity_keys is not None
    return params.neighbours, params.threshold, params.malicious


def _site_check(
    policy: SecurityPolicy, family: SecAggFamily | HEFamily | PlaintextFamily, party: int, public: bytes | None
) -> None:
    """What a Flower node's Mod checks before it trains, done here for each simulated site (same refusals)."""
    if isinstance(family, SecAggFamily):
        policy.check_secagg(family.params, party_id=party, identity_public_key=public)
    elif isinstance(family, HEFamily):
        policy.check_he(num_parties=family.num_parties)
        policy.check_he_members(family.params, party_id=party, identity_public_key=public)


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
    identity_keys: Sequence[bytes] | None = None,
    roster: Sequence[bytes] | None = None,
) -> AggregationOutcome:
    """Securely aggregate `updates` (positions 0..n-1) and return the weighted mean of the survivors.

    Args:
        config: the run configuration (protocol, setting, assumptions).
        updates: one update per position.
        weights: each position's aggregation weight.
        round_number: bound into every key and signature.
        context: bytes every party binds (the plan digest).
        drop_at: position -> first stage at which it goes silent (simulated dropouts).
        tap: audit hook called with (position, bytes) for every message a client sends.
        rounding_seeds: each position's stochastic-rounding seed.
        identity_keys: each position's own Ed25519 private key (malicious setting; each stays with its
            client's session); default: fresh keys from `simulated_identity_keys`.
        roster: every client's public identity key, which each site pins (n_C is counted over it);
            default: the public halves of `identity_keys`.

    Raises:
        InsecureParameterError: a site's policy refuses the parameters (malicious setting).
    """
    sa = config.secure_aggregation
    n = len(updates)
    clip = sa.clip_range
    integer = bool(updates) and all(np.issubdtype(u.dtype, np.integer) for u in updates)
    clipped = 0 if integer else int(sum(int(np.count_nonzero(np.abs(u) > clip)) for u in updates))
    if sa.protocol == "none" and n < 3:
        survivors = [i for i in range(n) if i not in drop_at]
        if not survivors:
            return AggregationOutcome(None, [], sorted(drop_at), "every client dropped", clipped_coordinates=clipped)
        total = sum(weights[i] for i in survivors)
        mean = sum(weights[i] * np.clip(updates[i], -clip, clip).astype(np.float64) for i in survivors) / total
        return AggregationOutcome(mean, survivors, sorted(drop_at), None, clipped_coordinates=clipped)
    dimension = len(updates[0])
    if sa.setting == "malicious" and sa.protocol != "none":
        identity_keys = list(identity_keys) if identity_keys is not None else simulated_identity_keys(n)
        publics = [ed25519_public(k) for k in identity_keys]
        family = round_family(config, n, dimension, identity_keys=publics, roster=roster)
        policy = site_security_policy(config, roster=roster if roster is not None else publics)
        for party, public in enumerate(publics):  # each simulated site checks what it is asked to run
            _site_check(policy, family, party, public)
    else:
        identity_keys = None
        family = round_family(config, n, dimension)
        distributed = config.privacy.mode == "distributed" and config.privacy.mechanism != "none"
        if isinstance(family, HEFamily) or distributed:  # HE's collusion rule and distributed DP's survivor floor
            policy = site_security_policy(config, roster=None)  # hold in the semi-honest setting too
            for party in range(n):
                _site_check(policy, family, party, None)
    neighbours, threshold, malicious = family_facts(family)
    try:
        report = run_sessions(
            family,
            [u.astype(np.int64) if integer else u.astype(np.float64) for u in updates],
            weights=list(weights),
            drop_at=drop_at,
            round_number=round_number,
            context=context,
            clock=time.perf_counter,
            tap=tap,
            rounding_seeds=rounding_seeds,
            identity_keys=identity_keys,
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
        malicious=malicious,
        neighbours=neighbours,
        threshold=threshold,
        ring_sum=signed_sum(result.ring_sum) if integer and result.ring_sum is not None else None,
    )
