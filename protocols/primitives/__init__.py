"""Hazmat primitives of the secure-aggregation protocols.

These are correct building blocks, not safe protocols: use the sessions in `protocols.secagg`.
Each module fixes one wire-visible format (KDF labels, PRG byte order, Shamir field) so that other
implementations can interoperate; the known-answer vectors live in `tests/protocols/vectors/`.
"""

from .aead import NONCE_BYTES, TAG_BYTES, open_sealed, seal
from .kdf import (
    LABEL_HE_KEY_DELIVERY,
    LABEL_NEIGHBOUR_GRAPH,
    LABEL_PAIRWISE_MASK,
    LABEL_ROUNDING,
    LABEL_SHARE_ENCRYPTION,
    derive_key,
)
from .keys import (
    ed25519_public,
    ed25519_sign,
    ed25519_verify,
    x25519_agree,
    x25519_agree_all,
    x25519_check_public,
    x25519_generate,
    x25519_public,
)
from .prg import CHUNK_WORDS, MaskAccumulator, expand_mask, ring_dtype
from .shamir import PRIME, SHARE_BYTES, lagrange_at_zero, reconstruct, reconstruct_many, split

__all__ = [
    "CHUNK_WORDS",
    "LABEL_HE_KEY_DELIVERY",
    "LABEL_NEIGHBOUR_GRAPH",
    "LABEL_PAIRWISE_MASK",
    "LABEL_ROUNDING",
    "LABEL_SHARE_ENCRYPTION",
    "NONCE_BYTES",
    "PRIME",
    "SHARE_BYTES",
    "TAG_BYTES",
    "MaskAccumulator",
    "derive_key",
    "ed25519_public",
    "ed25519_sign",
    "ed25519_verify",
    "expand_mask",
    "lagrange_at_zero",
    "open_sealed",
    "reconstruct",
    "reconstruct_many",
    "ring_dtype",
    "seal",
    "split",
    "x25519_agree",
    "x25519_agree_all",
    "x25519_check_public",
    "x25519_generate",
    "x25519_public",
]
