"""X25519 key agreement and Ed25519 signatures from caller-supplied randomness (hazmat).

Private keys are created from 32 bytes of the session's `SecretSource` so that tests can inject a
deterministic source; in production that source is `os.urandom`. The raw 32-byte private key is what
gets Shamir-shared, so the server can rebuild a dropped party's mask key and nothing else.
"""

from __future__ import annotations

from collections.abc import Iterable

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from ..errors import IntegrityError
from ..randomness import SecretSource

__all__ = [
    "ed25519_public",
    "ed25519_sign",
    "ed25519_sign_many",
    "ed25519_verify",
    "ed25519_verify_many",
    "x25519_agree",
    "x25519_agree_all",
    "x25519_check_public",
    "x25519_generate",
    "x25519_public",
]


def x25519_generate(rng: SecretSource) -> tuple[bytes, bytes]:
    """Return (private, public) raw 32-byte X25519 keys."""
    private = rng.token_bytes(32)
    return private, x25519_public(private)


def x25519_public(private: bytes) -> bytes:
    """The raw public key of a raw private key."""
    key = X25519PrivateKey.from_private_bytes(private)
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def x25519_agree(private: bytes, peer_public: bytes, *, peer_id: int | None = None) -> bytes:
    """The raw shared secret; a low-order peer key (all-zero secret) is an `IntegrityError`."""
    try:
        return X25519PrivateKey.from_private_bytes(private).exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError:
        raise IntegrityError(peer_id=peer_id) from None


def x25519_agree_all(private: bytes, peer_publics: dict[int, bytes]) -> dict[int, bytes]:
    """Shared secrets with many peers (the private key is parsed once); low-order keys raise.

    Raises:
        IntegrityError: naming the first peer whose key is invalid or of low order.
    """
    key = X25519PrivateKey.from_private_bytes(private)
    out = {}
    for peer, public in peer_publics.items():
        try:
            out[peer] = key.exchange(X25519PublicKey.from_public_bytes(public))
        except ValueError:
            raise IntegrityError(peer_id=peer) from None
    return out


_PROBE = bytes(range(1, 33))


def x25519_check_public(public: bytes, *, peer_id: int | None = None) -> None:
    """Refuse a low-order public key (any agreement with it is all-zero) before anyone uses it.

    Raises:
        IntegrityError: if the key is invalid or of low order.
    """
    x25519_agree(_PROBE, public, peer_id=peer_id)


def ed25519_public(private: bytes) -> bytes:
    """The raw public key of a raw 32-byte Ed25519 private key."""
    key = Ed25519PrivateKey.from_private_bytes(private)
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def ed25519_sign(private: bytes, message: bytes) -> bytes:
    """A 64-byte Ed25519 signature."""
    return Ed25519PrivateKey.from_private_bytes(private).sign(message)


def ed25519_sign_many(private: bytes, messages: Iterable[bytes]) -> list[bytes]:
    """`ed25519_sign` of each message, the private key parsed once.

    Parsing the raw key (a scalar multiplication to derive its public half) costs about as much as a
    signature, and a client signs two shares per neighbour under one key. Ed25519 is deterministic,
    so the signatures are byte for byte those of `ed25519_sign`.
    """
    key = Ed25519PrivateKey.from_private_bytes(private)
    return [key.sign(message) for message in messages]


def ed25519_verify(public: bytes, signature: bytes, message: bytes, *, peer_id: int | None = None) -> None:
    """Verify a signature.

    Raises:
        IntegrityError: if the signature or the key is invalid.
    """
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, message)
    except (InvalidSignature, ValueError):
        raise IntegrityError(peer_id=peer_id) from None


def ed25519_verify_many(public: bytes, signed: Iterable[tuple[bytes, bytes]], *, peer_id: int | None = None) -> None:
    """`ed25519_verify` of each (signature, message) pair under one public key, parsed once.

    Every pair is checked (no batch verification: each signature stands or falls on its own).

    Raises:
        IntegrityError: at the first invalid signature, or if the key is invalid.
    """
    try:
        key = Ed25519PublicKey.from_public_bytes(public)
        for signature, message in signed:
            key.verify(signature, message)
    except (InvalidSignature, ValueError):
        raise IntegrityError(peer_id=peer_id) from None
