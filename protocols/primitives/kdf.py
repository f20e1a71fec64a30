"""HKDF-SHA256 key derivation with one label per purpose (hazmat).

Every symmetric key or seed in the protocols is derived here, so domain separation is visible in one
place. The salt is the round's 32-byte transcript hash (it binds protocol version, session, round,
parameters and the caller's context) and `info` is the purpose label followed by the two party ids
as little-endian u32. A key derived for one purpose, round or pair is unrelated to any other.
"""

from __future__ import annotations

import struct

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = [
    "LABEL_HE_KEY_DELIVERY",
    "LABEL_NEIGHBOUR_GRAPH",
    "LABEL_PAIRWISE_MASK",
    "LABEL_ROUNDING",
    "LABEL_SHARE_ENCRYPTION",
    "derive_key",
]

LABEL_SHARE_ENCRYPTION = b"secure-fedllm/v1/share-encryption-key"
"""AES-256-GCM key for Shamir shares sent from party `a` to party `b` (ordered pair)."""
LABEL_PAIRWISE_MASK = b"secure-fedllm/v1/pairwise-mask-seed"
"""PRG seed of the mask shared by `a < b` (canonical order, both parties derive the same seed)."""
LABEL_ROUNDING = b"secure-fedllm/v1/stochastic-rounding"
"""Seed of the non-secret stochastic-rounding stream of party `a` (`b` = 0)."""
LABEL_HE_KEY_DELIVERY = b"secure-fedllm/v1/he-key-delivery"
"""AES-256-GCM key under which HE key holder `a` sends the secret HE context to party `b`."""
LABEL_NEIGHBOUR_GRAPH = b"secure-fedllm/v1/neighbour-graph"
"""Seed of the public permutation that places parties on the SecAgg+ Harary graph (`a` = `b` = 0)."""


def derive_key(ikm: bytes, *, label: bytes, transcript: bytes, a: int, b: int) -> bytes:
    """Derive 32 bytes: HKDF-SHA256(ikm, salt=transcript, info=label || u32le(a) || u32le(b)).

    Args:
        ikm: input keying material (an X25519 shared secret, or a seed).
        label: one of the `LABEL_*` constants.
        transcript: the 32-byte transcript hash of the round.
        a: first party id (sender, or the smaller id for symmetric purposes).
        b: second party id.

    Returns:
        32 bytes of key material.
    """
    if len(transcript) != 32:
        raise ValueError(f"transcript must be 32 bytes, got {len(transcript)}")
    info = label + struct.pack("<II", a, b)
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=transcript, info=info).derive(ikm)
