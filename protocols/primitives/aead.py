"""AES-256-GCM for the Shamir shares that travel through the server (hazmat).

Nonces are 96 random bits drawn per message; a key is used for one (round, sender, receiver) and
encrypts one message, so nonce reuse cannot occur even with a weak source. Every failure (wrong key,
tampered byte, truncation, wrong associated data) becomes the same opaque `IntegrityError`.
"""

from __future__ import annotations

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ..errors import IntegrityError
from ..randomness import SecretSource

__all__ = ["NONCE_BYTES", "TAG_BYTES", "open_sealed", "seal"]

NONCE_BYTES = 12
TAG_BYTES = 16


def seal(key: bytes, plaintext: bytes, *, aad: bytes, rng: SecretSource) -> bytes:
    """Encrypt and authenticate; returns nonce || ciphertext || tag."""
    nonce = rng.token_bytes(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def open_sealed(key: bytes, blob: bytes, *, aad: bytes, peer_id: int | None = None) -> bytes:
    """Verify and decrypt the output of `seal`.

    Raises:
        IntegrityError: for any failure, with no detail beyond the peer id.
    """
    if len(blob) < NONCE_BYTES + TAG_BYTES:
        raise IntegrityError(peer_id=peer_id)
    try:
        return AESGCM(key).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], aad)
    except InvalidTag:
        raise IntegrityError(peer_id=peer_id) from None
