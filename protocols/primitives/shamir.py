"""Shamir secret sharing of 32-byte secrets over GF(p), p = 2^256 + 297 (hazmat).

p is the smallest prime above 2^256, so every 32-byte secret (read as a big-endian integer) is a
field element and nothing is truncated. Party `i` (0-based id) holds the evaluation at x = i + 1.
Coefficients are drawn uniformly from GF(p) by rejection sampling from the caller's `SecretSource`.
A share value is 33 bytes, big-endian. Lagrange coefficients at 0 depend only on the set of
x-coordinates, so `lagrange_at_zero` caches them: a server that rebuilds many secrets from the same
responders pays for the coefficients once.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

from ..randomness import SecretSource

__all__ = ["PRIME", "SHARE_BYTES", "lagrange_at_zero", "reconstruct", "split"]

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


@lru_cache(maxsize=256)
def lagrange_at_zero(holders: tuple[int, ...]) -> tuple[int, ...]:
    """Lagrange basis values at x = 0 for the x-coordinates of `holders` (ids, x = id + 1)."""
    xs = [h + 1 for h in holders]
    if len(set(xs)) != len(xs):
        raise ValueError("holders must be distinct")
    out = []
    for j, xj in enumerate(xs):
        num, den = 1, 1
        for m, xm in enumerate(xs):
            if m != j:
                num = num * xm % PRIME
                den = den * (xm - xj) % PRIME
        out.append(num * pow(den, -1, PRIME) % PRIME)
    return tuple(out)


def reconstruct(shares: dict[int, bytes], threshold: int) -> bytes:
    """Rebuild a secret from at least `threshold` shares (the `threshold` lowest ids are used).

    Raises:
        ValueError: with fewer than `threshold` shares, or a share that is not a field element, or a
            result that does not fit in 32 bytes (shares from different secrets).
    """
    if len(shares) < threshold:
        raise ValueError(f"need {threshold} shares, got {len(shares)}")
    holders = tuple(sorted(shares)[:threshold])
    basis = lagrange_at_zero(holders)
    secret = 0
    for holder, lam in zip(holders, basis, strict=True):
        y = int.from_bytes(shares[holder], "big")
        if len(shares[holder]) != SHARE_BYTES or y >= PRIME:
            raise ValueError(f"share of holder {holder} is not an element of GF(p)")
        secret = (secret + lam * y) % PRIME
    if secret >= 1 << 256:
        raise ValueError("shares are inconsistent: the rebuilt value is not a 32-byte secret")
    return secret.to_bytes(32, "big")
