"""Mask expansion: a 32-byte seed to a vector over Z_(2^b) (hazmat).

Format (fixed, so other implementations can interoperate): the keystream of AES-256-CTR keyed by the
full 32-byte seed, with an initial counter block of 16 zero bytes incremented as one 128-bit
big-endian integer (the standard CTR of NIST SP 800-38A), is read as consecutive little-endian
unsigned b-bit words, b in {16, 32, 64}. Word i of the mask is bytes [i*b/8, (i+1)*b/8) of the
stream. Since 2^b divides 2^(8*bytes), every word is uniform on Z_(2^b).

`MaskAccumulator` adds and subtracts many masks into one vector a cache-sized chunk at a time,
with `update_into` writing into one preallocated buffer: the keystream is the only real cost, and
the combine step stays in L2 cache. `MaskAccumulator.fill` lets a producer (the client's encoder)
write the vector into the buffer the masks are then added to, so the masked input is built in the
buffer that becomes its message, with no copy.

A `ChaCha20` variant is not offered: one PRG keeps the format unambiguous, and AES-NI makes AES-CTR
the faster of the two on the machines we target.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms, modes

__all__ = ["CHUNK_WORDS", "MaskAccumulator", "expand_mask", "ring_dtype"]

CHUNK_WORDS = 32768
"""Words per streaming chunk: 128 KiB of 32-bit words, which keeps the working set in L2 (measured best)."""

_ZERO_IV = bytes(16)


def ring_dtype(ring_bits: int) -> np.dtype[np.unsignedinteger]:
    """The little-endian numpy dtype that holds Z_(2^ring_bits) with native wrap-around."""
    if ring_bits not in (16, 32, 64):
        raise ValueError(f"ring_bits must be 16, 32 or 64, got {ring_bits}")
    return np.dtype(f"<u{ring_bits // 8}")


def _keystream(seed: bytes) -> CipherContext:
    if len(seed) != 32:
        raise ValueError(f"mask seeds are 32 bytes, got {len(seed)}")
    return Cipher(algorithms.AES(seed), modes.CTR(_ZERO_IV)).encryptor()


def expand_mask(seed: bytes, length: int, ring_bits: int) -> npt.NDArray[np.unsignedinteger]:
    """The first `length` words of the mask of `seed` (one allocation; for tests and small vectors)."""
    dtype = ring_dtype(ring_bits)
    stream = _keystream(seed).update(bytes(length * dtype.itemsize))
    return np.frombuffer(stream, dtype=dtype).copy()


class MaskAccumulator:
    """Streams `acc += sum(PRG(plus)) - sum(PRG(minus))` over Z_(2^b), chunk by chunk.

    Memory stays at one chunk buffer however many seeds there are; each seed's keystream context is
    created on demand and advanced chunk by chunk.
    """

    def __init__(self, ring_bits: int, chunk_words: int = CHUNK_WORDS) -> None:
        self._dtype = ring_dtype(ring_bits)
        self._chunk_words = chunk_words
        nbytes = chunk_words * self._dtype.itemsize
        self._zeros = bytes(nbytes)
        self._buffer = bytearray(nbytes + 15)  # update_into needs block_size - 1 spare bytes
        self._view = np.frombuffer(self._buffer, dtype=self._dtype, count=chunk_words)

    def apply(
        self,
        acc: npt.NDArray[np.unsignedinteger],
        *,
        plus: Iterable[bytes] = (),
        minus: Iterable[bytes] = (),
    ) -> None:
        """Add the masks of `plus` and subtract those of `minus` from `acc`, in place."""
        self._run(acc, plus, minus)

    def fill(
        self,
        out: npt.NDArray[np.unsignedinteger],
        source: Callable[[npt.NDArray[np.unsignedinteger], int], None],
        *,
        plus: Iterable[bytes] = (),
        minus: Iterable[bytes] = (),
    ) -> None:
        """Write `out` = words of `source` + sum(PRG(plus)) - sum(PRG(minus)), in place.

        `source(chunk, start)` writes words [start, start + len(chunk)) into `chunk`, a view of `out`
        of at most `chunk_words` words, called once per chunk in order. All chunks are produced
        first and the masks added in a second pass: interleaving the two per chunk (encode a chunk,
        then add its k + 1 masks while it is in cache) measured 10-15% slower on AVX-512/VAES
        Xeons at d = 1e6, k = 16 (the encoder's float temporaries and the keystream buffer evict
        each other; see benchmarks/secagg.py), and the second pass reads `out` from L3 at full speed.
        """
        if out.dtype != self._dtype or out.ndim != 1:
            raise ValueError(f"out must be a 1-D {self._dtype} vector")
        for start in range(0, out.shape[0], self._chunk_words):
            source(out[start : start + self._chunk_words], start)
        self._run(out, plus, minus)

    def _run(
        self,
        acc: npt.NDArray[np.unsignedinteger],
        plus: Iterable[bytes],
        minus: Iterable[bytes],
    ) -> None:
        if acc.dtype != self._dtype or acc.ndim != 1:
            raise ValueError(f"acc must be a 1-D {self._dtype} vector")
        streams = [(_keystream(s), True) for s in plus] + [(_keystream(s), False) for s in minus]
        d = acc.shape[0]
        add, subtract = np.add, np.subtract
        for start in range(0, d, self._chunk_words):
            stop = min(start + self._chunk_words, d)
            width = stop - start
            nbytes = width * self._dtype.itemsize
            zeros = self._zeros if width == self._chunk_words else self._zeros[:nbytes]
            mask = self._view[:width]
            target = acc[start:stop]
            for stream, positive in streams:
                stream.update_into(zeros, self._buffer)
                if positive:
                    add(target, mask, out=target)
                else:
                    subtract(target, mask, out=target)
