"""The randomized Hadamard rotation of client-level distributed DP (Kairouz, Liu, Steinke, ICML 2021).

Why rotate. Client-level distributed DP clips a client's whole update in L2 and rounds it into the
ring coordinate by coordinate. An update whose mass sits in a few coordinates would need a ring wide
enough for its largest coordinate; after a random rotation every coordinate holds about
||x|| / sqrt(D), so a narrow ring suffices and rounding errors spread evenly. The rotation is public
(its signs come from a seed every party derives from the job and the round), an isometry (the L2
norm, hence the sensitivity, is unchanged), and the server inverts it after summing: the sum of
rotated vectors is the rotation of the sum.

x (length d) is zero-padded to D = 2^ceil(log2 d), multiplied by random signs and transformed by
the normalised Walsh-Hadamard matrix H / sqrt(D), which is its own inverse.
"""

from __future__ import annotations

import hashlib

import numpy as np
import numpy.typing as npt

__all__ = ["padded_dimension", "rotate", "rotation_seed", "unrotate"]


def padded_dimension(dimension: int) -> int:
    """D: the smallest power of two >= d."""
    if dimension < 1:
        raise ValueError(f"dimension={dimension} must be >= 1")
    return 1 << (dimension - 1).bit_length()


def rotation_seed(job: str, round_number: int) -> bytes:
    """The public seed of one round's rotation: every party derives it from the job and the round."""
    return hashlib.sha256(f"secure-fedllm/hadamard-rotation/v1|{job}|{round_number}".encode()).digest()


def _signs(seed: bytes, size: int) -> npt.NDArray[np.float64]:
    rng = np.random.default_rng(int.from_bytes(seed, "big"))
    return rng.integers(0, 2, size=size).astype(np.float64) * 2 - 1


def _hadamard(x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """H x / sqrt(D) by the fast Walsh-Hadamard transform (log2 D passes, in float64)."""
    y = x.copy()
    size, h = y.shape[0], 1
    while h < size:
        view = y.reshape(-1, 2, h)
        a, b = view[:, 0, :].copy(), view[:, 1, :]
        view[:, 0, :] += b
        view[:, 1, :] = a - b
        h *= 2
    return y / np.sqrt(size)


def rotate(x: npt.NDArray[np.floating], seed: bytes) -> npt.NDArray[np.float64]:
    """H D_signs pad(x) / sqrt(D): length D, same L2 norm as x."""
    values = np.asarray(x, dtype=np.float64)
    if values.ndim != 1:
        raise ValueError(f"x must be a vector, got shape {values.shape}")
    size = padded_dimension(values.shape[0])
    padded = np.zeros(size)
    padded[: values.shape[0]] = values
    return _hadamard(padded * _signs(seed, size))


def unrotate(y: npt.NDArray[np.floating], seed: bytes, dimension: int) -> npt.NDArray[np.float64]:
    """The inverse of `rotate`, truncated to the original `dimension`."""
    values = np.asarray(y, dtype=np.float64)
    size = padded_dimension(dimension)
    if values.shape != (size,):
        raise ValueError(f"y must have {size} values for dimension {dimension}, got shape {values.shape}")
    return (_hadamard(values) * _signs(seed, size))[:dimension]
