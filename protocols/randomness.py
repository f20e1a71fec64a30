"""Where secrets come from.

Keys, seeds and Shamir coefficients must come from the operating system's CSPRNG. Tests need
reproducible runs, so the source is an interface that a test may replace; nothing else in
`protocols` draws randomness on its own. `DeterministicRandom` exists for tests and known-answer
vectors only: a protocol session built with it is not secure.
"""

from __future__ import annotations

import hashlib
import os
from typing import Protocol, runtime_checkable

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

__all__ = ["DeterministicRandom", "OsRandom", "SecretSource"]


@runtime_checkable
class SecretSource(Protocol):
    """A cryptographically secure source of random bytes."""

    def token_bytes(self, n: int) -> bytes:
        """Return `n` uniformly random bytes."""
        ...


class OsRandom:
    """The default source: `os.urandom`, the kernel CSPRNG."""

    def token_bytes(self, n: int) -> bytes:
        """Return `n` bytes from `os.urandom`."""
        return os.urandom(n)


class DeterministicRandom:
    """A reproducible AES-256-CTR stream keyed by SHA-256(seed). For tests only: never for real keys."""

    def __init__(self, seed: bytes | int) -> None:
        raw = seed if isinstance(seed, bytes) else seed.to_bytes(16, "little", signed=True)
        key = hashlib.sha256(b"secure-fedllm/v1/deterministic-random" + raw).digest()
        self._stream = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()

    def token_bytes(self, n: int) -> bytes:
        """Return the next `n` bytes of the stream."""
        return self._stream.update(bytes(n))
