"""Gaussian noise from a cryptographic keystream (ChaCha20), for DP-SGD and the federated evaluation.

Why not torch's or numpy's generator: both are Mersenne Twisters, whose whole state follows from
624 consecutive outputs, so noise drawn from them is predictable to whoever sees enough of it (or
guesses the seed). Here every draw is a function of a 32-byte key (os.urandom per release, or the
HMAC seed of the reproducible `privacy.noise_seed` mode) through the ChaCha20 keystream: without the
key, no draw predicts another, and `torch.manual_seed` and numpy's global state play no part.

What this does NOT give: the samples are still floating point. Uniforms have 53 bits and the
normal is computed with Box-Muller in float64, so the set of reachable values is not that of a real
Gaussian, and attacks on the low-order bits of floating-point noise (Mironov 2012 for Laplace;
Jin et al. 2022 for Gaussians) are not ruled out. Noise that must be exact (inside secure
aggregation) comes from the integer samplers in `protocols.dp_noise`.
"""

from __future__ import annotations

import hashlib
import hmac
import math
from collections.abc import Sequence
from typing import overload

import numpy as np
import numpy.typing as npt
import torch

__all__ = ["KEY_BYTES", "NOISE_GENERATORS", "KeystreamSource", "csprng_gaussian", "derive_key"]

KEY_BYTES = 32
"""ChaCha20 keys are 256 bits; a shorter key would cap the unpredictability below that."""

NOISE_GENERATORS = ("csprng", "torch")
"""`privacy.noise_generator`: the ChaCha20 Gaussian here, or torch's Mersenne Twister (Opacus' own)."""


def derive_key(key: bytes, label: bytes) -> bytes:
    """A 32-byte sub-key of `key` for one purpose (HMAC-SHA256), so that no two uses share a keystream."""
    if len(key) < KEY_BYTES:
        raise ValueError(f"the noise key must be at least {KEY_BYTES} bytes, got {len(key)}")
    return hmac.new(key, label, hashlib.sha256).digest()


def _standard_normal(key: bytes, count: int) -> npt.NDArray[np.float64]:
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

    if len(key) != KEY_BYTES:
        raise ValueError(f"the noise key must be exactly {KEY_BYTES} bytes (a ChaCha20 key), got {len(key)}")
    if count < 0:
        raise ValueError(f"cannot draw {count} values")
    pairs = (count + 1) // 2
    # Nonce (counter and nonce) all zero: each key is used for one keystream only (fresh or HMAC-derived).
    stream = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor().update(bytes(16 * pairs))
    words = np.frombuffer(stream, dtype="<u8")
    uniform = ((words >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53  # in (0, 1): log is finite
    radius = np.sqrt(-2.0 * np.log(uniform[0::2]))
    angle = 2.0 * math.pi * uniform[1::2]
    out = np.empty(2 * pairs)
    out[0::2], out[1::2] = radius * np.cos(angle), radius * np.sin(angle)
    return out[:count]


@overload
def csprng_gaussian(
    key: bytes, shape: int | Sequence[int], *, dtype: torch.dtype, std: float = 1.0
) -> torch.Tensor: ...
@overload
def csprng_gaussian(
    key: bytes, shape: int | Sequence[int], *, dtype: type[np.floating] | np.dtype, std: float = 1.0
) -> npt.NDArray[np.floating]: ...
def csprng_gaussian(
    key: bytes, shape: int | Sequence[int], *, dtype: torch.dtype | type[np.floating] | np.dtype, std: float = 1.0
) -> torch.Tensor | npt.NDArray[np.floating]:
    """Normal(0, std^2) draws of `shape` from the ChaCha20 keystream of a 32-byte `key`.

    53-bit uniforms (the top bits of each 64-bit keystream word, centred in their cell so that log
    stays finite), Box-Muller in float64, scaled by `std` in float64 and only then cast to `dtype`:
    a torch dtype gives a CPU tensor (move it to the device afterwards), a numpy dtype an array.
    Row-major order; draw i is the same whatever the shape, so a test can recompute it flat.
    Cryptographically unpredictable without the key, but floating point: see the module docstring.
    """
    dims = (shape,) if isinstance(shape, int) else tuple(int(d) for d in shape)
    if not math.isfinite(std) or std < 0:
        raise ValueError(f"std={std!r} must be finite and >= 0")
    values = _standard_normal(key, math.prod(dims)) * std
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ValueError(f"Gaussian noise needs a floating dtype, got {dtype}")
        return torch.from_numpy(values).reshape(dims).to(dtype)
    return values.reshape(dims).astype(np.dtype(dtype), copy=False)


class KeystreamSource:
    """A `protocols.SecretSource` reading one ChaCha20 keystream under a 32-byte key, for integer noise.

    Why not `os.urandom` directly: a release must be redrawn identically after a crash (the stored
    output is the release), and the reproducible `privacy.noise_seed` mode must regenerate it; the
    key is the release's secret seed (os.urandom per release otherwise), so the stream is as
    unpredictable as that seed. Consecutive calls continue the stream: no byte is read twice.
    """

    def __init__(self, key: bytes) -> None:
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

        if len(key) != KEY_BYTES:
            raise ValueError(f"the noise key must be exactly {KEY_BYTES} bytes (a ChaCha20 key), got {len(key)}")
        self._stream = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()

    def token_bytes(self, n: int) -> bytes:
        """The next `n` bytes of the keystream."""
        if n < 0:
            raise ValueError(f"cannot read {n} bytes")
        return self._stream.update(bytes(n))
