"""Parameters of a SecAgg / SecAgg+ round, with the thresholds derived and checked.

Settings (Bonawitz et al. 2017, section 4; Bell et al. 2020, section 3). Let n parties, at most
n_C corrupted (colluding with the server), at most d_max dropping out, k neighbours per party and
Shamir threshold t among the k + 1 holders of each party's shares (its neighbours and itself).

* Semi-honest server (no identity keys): SecAgg needs n_C < t <= n - d_max. The server follows the
  protocol; nothing authenticates the keys it relays.
* Malicious server (identity keys pinned in the parameters, issued independently of the server):
  keys are signed, every client checks the signatures, and a consistency-check round has each
  client sign the survivor set; SecAgg then needs 2t > n + n_C, so two different survivor sets
  cannot both collect t signatures and no party's two secrets can both be rebuilt.

SecAgg+ (k < n - 1) gives a weaker, probabilistic guarantee: with probability at least 1 - 2^-sigma
over the public graph, the server learns only the sum of the surviving honest inputs (semi-honest),
or only sums of groups of honest inputs joined by a connected surviving neighbourhood (malicious);
it is correct with probability at least 1 - 2^-eta. `derive_secagg_plus` picks the smallest even k
and the largest t that meet sigma = 40 and eta = 30 under these union bounds over the n parties:

* corrupted holders of a party's shares, C ~ Hypergeometric(n - 1, n_C, k): semi-honest needs
  P[C >= t] small; malicious needs P[2t <= k + 1 + C] small;
* dropped neighbours, D ~ Hypergeometric(n - 1, d_max, k): correctness needs P[k - D < t] small
  (and for a surviving party, P[k + 1 - D < t]);
* the honest survivors must stay connected: the Harary ring falls apart only if the removed set
  (corrupted and dropped, r = n_C + d_max) covers two runs of k/2 consecutive positions, probability
  at most n^2/2 * C(r, k) / C(n, k). A malicious server chooses who drops, so there we require
  k > r outright, and every SecAgg+ client refuses a survivor set smaller than n - d_max (otherwise
  a server could declare a ring segment dropped and cut a small group out of the graph).

Parameters outside these bounds raise `InsecureParameterError` unless `allow_insecure=True`, in
which case every result carries `insecure=True`.
"""

from __future__ import annotations

import hashlib
import math
from functools import cached_property
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer

from ..encoding import FixedPointEncoding
from ..errors import InsecureParameterError

__all__ = ["ETA", "SIGMA", "SecAggParams", "derive_secagg_plus"]

SIGMA = 40
"""Statistical security parameter of Bell et al.: failure probability at most 2^-40."""
ETA = 30
"""Correctness parameter of Bell et al.: failure probability at most 2^-30."""


def _log2(x: float) -> float:
    return -math.inf if x <= 0 else math.log2(x)


def _hyper_tail(population: int, marked: int, draws: int, at_least: int) -> float:
    """P[X >= at_least] for X ~ Hypergeometric(population, marked, draws), computed exactly."""
    at_least = max(at_least, 0)
    marked = min(max(marked, 0), population)
    total = math.comb(population, draws)
    hit = sum(
        math.comb(marked, j) * math.comb(population - marked, draws - j)
        for j in range(at_least, min(marked, draws) + 1)
    )
    return hit / total if hit else 0.0


def _bounds(n: int, k: int, t: int, n_c: int, d_max: int, malicious: bool) -> tuple[float, float]:
    """(log2 security failure, log2 correctness failure) of (k, t) under the module's union bounds."""
    k = min(k, n - 1)
    if malicious:
        leak = _hyper_tail(n - 1, n_c, k, 2 * t - k - 1)
    else:
        leak = _hyper_tail(n - 1, n_c, k, t)
    removed = n_c + d_max
    if k >= n - 1:
        disconnect = 0.0
    elif malicious:
        disconnect = 1.0 if removed >= k else 0.0
    else:
        disconnect = min(1.0, (n * n * math.comb(removed, k)) / (2 * math.comb(n, k)))
    security = min(1.0, n * leak + disconnect)
    # A dropped party's secret is held by its k neighbours, of whom up to d_max - 1 also dropped;
    # a surviving party's by itself and its k neighbours, of whom up to d_max dropped.
    fail_dropped = _hyper_tail(n - 1, d_max - 1, k, k - t + 1) if d_max > 0 else 0.0
    fail_alive = _hyper_tail(n - 1, d_max, k, k - t + 2)
    correctness = min(1.0, n * max(fail_dropped, fail_alive))
    return _log2(security), _log2(correctness)


def _counts(n: int, dropout_rate: float, corrupt_fraction: float) -> tuple[int, int]:
    return math.ceil(corrupt_fraction * n - 1e-9), math.ceil(dropout_rate * n - 1e-9)


def derive_secagg_plus(
    num_parties: int,
    *,
    dropout_rate: float,
    corrupt_fraction: float,
    malicious: bool = False,
    sigma: int = SIGMA,
    eta: int = ETA,
    corrupt_parties: int | None = None,
    dropped_parties: int | None = None,
) -> tuple[int, int]:
    """The smallest even k (or n - 1) and, for it, the largest t meeting both failure bounds.

    Security fails with probability at most 2^-sigma and correctness with at most 2^-eta.
    `corrupt_parties` / `dropped_parties` replace the counts derived from the fractions at n: a site
    counts n_C over its whole pinned roster, because the server picks who is in the session and may
    fill it with colluders, so n_C must not shrink with the announced n.

    Raises:
        InsecureParameterError: if even the complete graph cannot meet both (too many dropouts for
            the corruption bound); lower dropout_rate or corrupt_fraction.
    """
    n = num_parties
    if not 0 <= dropout_rate < 1:
        raise InsecureParameterError(f"dropout_rate={dropout_rate} must be in [0, 1)")
    if not 0 <= corrupt_fraction < 0.5:
        raise InsecureParameterError(f"corrupt_fraction={corrupt_fraction} must be in [0, 0.5)")
    n_c, d_max = _counts(n, dropout_rate, corrupt_fraction)
    n_c = n_c if corrupt_parties is None else corrupt_parties
    d_max = d_max if dropped_parties is None else dropped_parties
    if n_c < 0 or d_max < 0:
        raise InsecureParameterError("corrupt_parties and dropped_parties must be >= 0")
    if n_c + d_max >= n:
        raise InsecureParameterError(
            f"{n_c} corrupted plus {d_max} dropped parties leave no honest survivor among num_parties={n}; "
            "lower dropout_rate or corrupt_fraction"
        )
    candidates = [k for k in range(2, n - 1, 2)] + [n - 1]
    for k in candidates:
        best = None
        for t in range(k + 1, 0, -1):
            sec, cor = _bounds(n, k, t, n_c, d_max, malicious)
            if cor <= -eta and sec <= -sigma:
                best = t
                break
            if sec > -sigma and cor <= -eta:
                break  # lower t only weakens security further
        if best is not None:
            return k, best
    raise InsecureParameterError(
        f"no (neighbours, threshold) reaches 2^-{sigma} security and 2^-{eta} correctness for "
        f"num_parties={n}, dropout_rate={dropout_rate}, corrupt_fraction={corrupt_fraction}"
        f"{' (malicious server)' if malicious else ''}; lower dropout_rate or corrupt_fraction"
    )


class SecAggParams(BaseModel):
    """Public parameters of one SecAgg / SecAgg+ session; all parties must hold identical copies.

    Use `SecAggParams.secagg(...)` (complete graph) or `SecAggParams.secagg_plus(...)` (derived k, t)
    rather than filling thresholds by hand. The parameters' digest enters the round transcript.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", ser_json_bytes="hex", val_json_bytes="hex")

    num_parties: Annotated[int, Field(ge=3, le=1 << 16)] = Field(description="n: enrolled parties, ids 0..n-1")
    dimension: Annotated[int, Field(ge=1, le=1 << 28)] = Field(description="d: length of each input vector")
    threshold: Annotated[int, Field(ge=2)] = Field(description="t: shares needed to rebuild a secret")
    neighbours: Annotated[int, Field(ge=2)] = Field(description="k: neighbours per party; n - 1 is SecAgg")
    dropout_rate: Annotated[float, Field(ge=0, lt=1)] = Field(0.1, description="assumed dropout fraction")
    corrupt_fraction: Annotated[float, Field(ge=0, lt=0.5)] = Field(
        0.05, description="assumed fraction of parties colluding with the server"
    )
    encoding: FixedPointEncoding
    identity_keys: tuple[Annotated[bytes, Field(min_length=32, max_length=32)], ...] | None = Field(
        None, description="Ed25519 public key of each party: enables the malicious-server setting"
    )
    allow_insecure: bool = Field(False, description="accept parameters outside the security bounds")
    corrupt_parties: Annotated[int, Field(ge=0)] | None = Field(
        None,
        description="n_C as a count (overrides corrupt_fraction * n): a site's n_C over its whole pinned roster",
    )
    dropped_parties: Annotated[int, Field(ge=0)] | None = Field(
        None, description="d_max as a count (overrides dropout_rate * n)"
    )

    @model_serializer(mode="wrap")
    def _compatible_dump(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """Leave the explicit counts out while unset, so older parameters keep their JSON and digest."""
        data: dict[str, Any] = handler(self)
        for name in ("corrupt_parties", "dropped_parties"):
            if data.get(name) is None:
                data.pop(name, None)
        return data

    def __init__(self, **data: Any) -> None:
        super().__init__(**data)
        n = self.num_parties
        if self.neighbours > n - 1:
            raise InsecureParameterError(f"neighbours={self.neighbours} exceeds num_parties - 1 = {n - 1}")
        if self.neighbours < n - 1 and self.neighbours % 2:
            raise InsecureParameterError(f"neighbours={self.neighbours} must be even (or num_parties - 1)")
        if self.threshold > self.neighbours + 1:
            raise InsecureParameterError(
                f"threshold={self.threshold} exceeds the {self.neighbours + 1} holders of each secret; "
                "lower threshold or raise neighbours"
            )
        if self.encoding.max_parties < n:
            raise InsecureParameterError(
                f"encoding.max_parties={self.encoding.max_parties} is below num_parties={n}: sums could wrap"
            )
        explicit = self.corrupt_parties is not None or self.dropped_parties is not None
        if explicit and self.max_corrupt + self.max_dropped >= n:
            raise InsecureParameterError(
                f"corrupt_parties={self.max_corrupt} plus {self.max_dropped} dropped parties leave no honest survivor "
                f"among num_parties={n}; announce more parties"
            )
        if self.identity_keys is not None and len(self.identity_keys) != n:
            raise InsecureParameterError(f"identity_keys has {len(self.identity_keys)} keys; need num_parties={n}")
        if self.identity_keys is not None and len(set(self.identity_keys)) != n:
            raise InsecureParameterError("identity_keys repeats a key: every party needs its own identity key")
        _, correctness = self.failure_log2
        if correctness > -ETA and not self.allow_insecure:
            raise InsecureParameterError(
                f"threshold={self.threshold} is out of reach with {self.max_dropped} dropouts "
                f"(correctness fails with probability 2^{correctness:.1f} > 2^-{ETA}); lower threshold or dropout_rate"
            )
        if self.malicious and self.consistency_quorum > n - self.max_dropped:
            raise InsecureParameterError(
                f"the consistency check needs {self.consistency_quorum} signatures but only "
                f"{n - self.max_dropped} parties survive at dropout_rate={self.dropout_rate}; lower dropout_rate"
            )
        if self.insecure and not self.allow_insecure:
            raise InsecureParameterError(self.insecurity_reason + "; or pass allow_insecure=True to run anyway")

    @classmethod
    def secagg(
        cls, num_parties: int, *, dimension: int, clip_range: float, threshold: int | None = None, **kw: Any
    ) -> SecAggParams:
        """Plain SecAgg (complete graph); t defaults to n - d_max, the most robust secure choice."""
        n = num_parties
        _, d_max = _counts(n, kw.get("dropout_rate", 0.1), kw.get("corrupt_fraction", 0.05))
        d_max = d_max if kw.get("dropped_parties") is None else kw["dropped_parties"]
        encoding = kw.pop("encoding", None) or FixedPointEncoding(clip_range=clip_range, max_parties=n)
        t = threshold if threshold is not None else n - d_max
        return cls(num_parties=n, dimension=dimension, threshold=t, neighbours=n - 1, encoding=encoding, **kw)

    @classmethod
    def secagg_plus(
        cls,
        num_parties: int,
        *,
        dimension: int,
        clip_range: float,
        neighbours: int | None = None,
        threshold: int | None = None,
        **kw: Any,
    ) -> SecAggParams:
        """SecAgg+ with (k, t) derived from n, dropout_rate and corrupt_fraction unless given."""
        n = num_parties
        if neighbours is not None:
            k = neighbours
            t = threshold if threshold is not None else max(2, (k + 1) * 2 // 3 + 1)
        else:
            k, t = derive_secagg_plus(
                n,
                dropout_rate=kw.get("dropout_rate", 0.1),
                corrupt_fraction=kw.get("corrupt_fraction", 0.05),
                malicious=kw.get("identity_keys") is not None,
                corrupt_parties=kw.get("corrupt_parties"),
                dropped_parties=kw.get("dropped_parties"),
            )
            t = threshold if threshold is not None else t
        encoding = kw.pop("encoding", None) or FixedPointEncoding(clip_range=clip_range, max_parties=n)
        return cls(num_parties=n, dimension=dimension, threshold=t, neighbours=k, encoding=encoding, **kw)

    @property
    def malicious(self) -> bool:
        """True when identity keys are configured: signatures and the consistency check are on."""
        return self.identity_keys is not None

    @property
    def complete(self) -> bool:
        """True for plain SecAgg: every party is every other's neighbour."""
        return self.neighbours >= self.num_parties - 1

    @property
    def consistency_quorum(self) -> int:
        """Signatures on one survivor set a client needs before unmasking (malicious setting).

        A strict majority of honest-plus-corrupted parties, (n + n_C) // 2 + 1, so two different
        survivor sets can never both reach it; and never fewer than t, as in Bonawitz et al.
        """
        majority = (self.num_parties + self.max_corrupt) // 2 + 1
        return max(majority, self.threshold)

    @property
    def max_corrupt(self) -> int:
        """n_C: `corrupt_parties` when given, else ceil(corrupt_fraction * n)."""
        if self.corrupt_parties is not None:
            return self.corrupt_parties
        return _counts(self.num_parties, self.dropout_rate, self.corrupt_fraction)[0]

    @property
    def max_dropped(self) -> int:
        """d_max: `dropped_parties` when given, else ceil(dropout_rate * n)."""
        if self.dropped_parties is not None:
            return self.dropped_parties
        return _counts(self.num_parties, self.dropout_rate, self.corrupt_fraction)[1]

    @cached_property
    def failure_log2(self) -> tuple[float, float]:
        """(log2 P[security fails], log2 P[correctness fails]) under the module's bounds."""
        return _bounds(
            self.num_parties, self.neighbours, self.threshold, self.max_corrupt, self.max_dropped, self.malicious
        )

    @property
    def insecurity_reason(self) -> str:
        """Why the parameters miss the security bound, or '' if they meet it."""
        sec, _ = self.failure_log2
        if sec <= -SIGMA:
            return ""
        fix = (
            "raise neighbours or threshold (SecAggParams.secagg_plus derives them)"
            if self.neighbours < self.num_parties - 1
            else "raise threshold"
        )
        return (
            f"neighbours={self.neighbours}, threshold={self.threshold} at num_parties={self.num_parties} with "
            f"{self.max_corrupt} corrupted and {self.max_dropped} dropped parties fail with probability "
            f"2^{sec:.1f} > 2^-{SIGMA}; {fix}"
        )

    @property
    def insecure(self) -> bool:
        """True when the parameters miss the 2^-sigma security bound (only with allow_insecure)."""
        return bool(self.insecurity_reason)

    def digest(self) -> bytes:
        """SHA-256 of the canonical JSON form; bound into every transcript."""
        return hashlib.sha256(self.model_dump_json().encode()).digest()
