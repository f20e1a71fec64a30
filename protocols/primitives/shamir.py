"""Shamir secret sharing of 32-byte secrets over GF(p), p = 2^256 + 297 (hazmat).

p is the smallest prime above 2^256, so every 32-byte secret (read as a big-endian integer) is a
field element and nothing is truncated. Party `i` (0-based id) holds the evaluation at x = i + 1.
Coefficients are drawn uniformly from GF(p) by rejection sampling from the caller's `SecretSource`.
A share value is 33 bytes, big-endian. Lagrange coefficients at 0 depend only on the set of
x-coordinates, so `lagrange_at_zero` caches them and `reconstruct_many` groups the secrets whose
chosen holders coincide: a server that rebuilds many secrets from the same responders (SecAgg's
complete graph) pays for the coefficients once and interpolates all of them with them. The
coefficients themselves cost one modular inversion (Montgomery's batch trick) and, per holder, a
product of small integer differences computed exactly in int64 blocks: O(t^2) small-integer work
instead of O(t^2) operations modulo the 257-bit prime, which matters when t is in the hundreds
(malicious SecAgg+ at n = 1000 has t = 110).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from functools import lru_cache

import numpy as np

from ..randomness import SecretSource

__all__ = ["PRIME", "SHARE_BYTES", "lagrange_at_zero", "reconstruct", "reconstruct_many", "split"]

PRIME = 2**256 + 297
SHARE_BYTES = 33
_MASK_257 = (1 << 257) - 1


def _random_element(rng: SecretSource) -> int:
    while True:
        value = int.from_bytes(rng.token_bytes(SHARE_BYTES), "big") & _MASK_257
        if value < PRIME:
            return value


def split(secret: bytes, holders: Sequence[int], threshold: int, rng: SecretSource) -> dict[int, bytes]:
    """Share `secret` so that any `threshold` of `holders` (party ids) can rebuild it.

    Returns:
        holder id -> 33-byte share.
    """
    if len(secret) != 32:
        raise ValueError(f"secrets are 32 bytes, got {len(secret)}")
    if not 1 <= threshold <= len(holders):
        raise ValueError(f"threshold={threshold} must be in [1, {len(holders)}]")
    coefficients = [int.from_bytes(secret, "big")] + [_random_element(rng) for _ in range(threshold - 1)]
    shares: dict[int, bytes] = {}
    for holder in holders:
        x = holder + 1
        y = 0
        for c in reversed(coefficients):
            y = (y * x + c) % PRIME
        shares[holder] = y.to_bytes(SHARE_BYTES, "big")
    coefficients.clear()
    return shares


_GROUP = 3
"""Differences of x-coordinates in [1, 2^16 + 1] fit in 18 bits, so 3 of them multiply exactly in int64."""


@lru_cache(maxsize=256)
def lagrange_at_zero(holders: tuple[int, ...]) -> tuple[int, ...]:
    """Lagrange basis values at x = 0 for the x-coordinates of `holders` (ids, x = id + 1).

    lambda_j = prod_{m != j} x_m / (x_m - x_j) = N / (x_j * D_j) with N = prod x_m and
    D_j = prod_{m != j} (x_m - x_j); the D_j are exact integer products (small factors grouped in
    int64), and the t inverses come from one `pow(., -1, p)` (Montgomery's batch inversion).
    """
    xs = [h + 1 for h in holders]
    t = len(xs)
    if len(set(xs)) != t:
        raise ValueError("holders must be distinct")
    if any(x < 1 or x > 1 << 16 for x in xs):
        return _lagrange_generic(xs)  # ids outside the party range: no int64 grouping bound
    a = np.asarray(xs, dtype=np.int64)
    diff = a[None, :] - a[:, None]
    np.fill_diagonal(diff, 1)
    blocks = np.concatenate([diff, a[:, None], np.ones((t, (-(t + 1)) % _GROUP), dtype=np.int64)], axis=1)
    rows = blocks.reshape(t, -1, _GROUP).prod(axis=2).tolist()  # each row: x_j * D_j in exact int64 pieces
    denominators = [math.prod(row) % PRIME for row in rows]
    numerator = math.prod(xs) % PRIME
    prefix = [1] * (t + 1)
    for i, den in enumerate(denominators):
        prefix[i + 1] = prefix[i] * den % PRIME
    inverse = pow(prefix[t], -1, PRIME)  # 1 / prod of all denominators
    out = [0] * t
    for i in range(t - 1, -1, -1):
        out[i] = inverse * prefix[i] % PRIME * numerator % PRIME  # numerator / denominators[i]
        inverse = inverse * denominators[i] % PRIME
    return tuple(out)


def _lagrange_generic(xs: list[int]) -> tuple[int, ...]:
    out = []
    for j, xj in enumerate(xs):
        num, den = 1, 1
        for m, xm in enumerate(xs):
            if m != j:
                num = num * xm % PRIME
                den = den * (xm - xj) % PRIME
        out.append(num * pow(den, -1, PRIME) % PRIME)
    return tuple(out)


def _interpolate(shares: Mapping[int, bytes], holders: tuple[int, ...], basis: tuple[int, ...]) -> bytes:
    secret = 0
    for holder, lam in zip(holders, basis, strict=True):
        y = int.from_bytes(shares[holder], "big")
        if len(shares[holder]) != SHARE_BYTES or y >= PRIME:
            raise ValueError(f"share of holder {holder} is not an element of GF(p)")
        secret = (secret + lam * y) % PRIME
    if secret >= 1 << 256:
        raise ValueError("shares are inconsistent: the rebuilt value is not a 32-byte secret")
    return secret.to_bytes(32, "big")


def reconstruct(shares: Mapping[int, bytes], threshold: int) -> bytes:
    """Rebuild a secret from at least `threshold` shares (the `threshold` lowest ids are used).

    Raises:
        ValueError: with fewer than `threshold` shares, or a share that is not a field element, or a
            result that does not fit in 32 bytes (shares from different secrets).
    """
    if len(shares) < threshold:
        raise ValueError(f"need {threshold} shares, got {len(shares)}")
    holders = tuple(sorted(shares)[:threshold])
    return _interpolate(shares, holders, lagrange_at_zero(holders))


def reconstruct_many(shares: Sequence[Mapping[int, bytes]], threshold: int) -> list[bytes]:
    """`reconstruct` for each of many secrets, one Lagrange basis per distinct holder set.

    Each secret uses its `threshold` lowest holder ids, exactly as `reconstruct` does, so the results
    are identical to calling it per secret; secrets whose chosen holders coincide share the basis.

    Raises:
        ValueError: as `reconstruct`, for the first failing secret; the message starts with its index.
    """
    bases: dict[tuple[int, ...], tuple[int, ...]] = {}
    out = []
    for index, one in enumerate(shares):
        if len(one) < threshold:
            raise ValueError(f"secret {index}: need {threshold} shares, got {len(one)}")
        holders = tuple(sorted(one)[:threshold])
        basis = bases.get(holders)
        if basis is None:
            basis = bases[holders] = lagrange_at_zero(holders)
        try:
            out.append(_interpolate(one, holders, basis))
        except ValueError as exc:
            raise ValueError(f"secret {index}: {exc}") from None
    return out
