"""Fixed-point encoding of float updates into the ring Z_(2^b), and back.

Secure aggregation sums integers modulo 2^b, so each client clips its update to a public range
[-c, c], scales it, rounds stochastically (unbiased: E[q] = x * scale), and the server decodes the
ring sum with a centred lift. The scale is chosen so that the sum of up to `max_parties` encoded
inputs, each at most `level` in absolute value, cannot wrap: max_parties * level <= 2^(b-1) - 1.
Nothing larger than that can be represented, so a decoded sum is exact up to rounding.

Weighted aggregation encodes w * x and w (the weight in one extra, last coordinate, with its own
scale level / max_weight), so the server learns only sum(w_i x_i) and sum(w_i).

Stochastic-rounding randomness is not secret (it only has to be independent of the data); it comes
from an AES-CTR stream whose seed the caller may pass in, and which is otherwise drawn from the
session's `SecretSource`.

Distributed DP needs a second kind of input: a client that quantizes its own update and adds its share
of integer (Skellam) noise already holds ring elements, and `encode_ring` takes them as they are
(reduced mod 2^b, never clipped or scaled), with the same weight word as `encode`.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from pydantic import BaseModel, ConfigDict, Field

from .errors import InsecureParameterError, LocalProtocolError
from .primitives.prg import CHUNK_WORDS, ring_dtype
from .randomness import OsRandom, SecretSource

__all__ = ["ChunkEncoder", "DecodedSum", "FixedPointEncoding", "PendingInput"]

_MIN_LEVEL = 2**8
_EXACT_SUM = 2**53  # float64 represents every integer up to 2^53 exactly: sums must stay below it
_U32_SCALE = 2.0**-32
_TWO_32 = 2.0**32


class DecodedSum(BaseModel):
    """A decoded aggregate: sum(w_i x_i), sum(w_i), and the bound on the rounding error."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    weighted_sum: Any = Field(description="float64 vector, sum over included clients of w_i * x_i")
    total_weight: float = Field(description="sum over included clients of w_i")
    num_inputs: int = Field(description="number of inputs in the sum")
    max_abs_error: float = Field(
        description="bound on |decoded - exact sum of clipped inputs| per coordinate (rounding only)"
    )

    def mean(self) -> npt.NDArray[np.float64]:
        """The weighted mean sum(w_i x_i) / sum(w_i)."""
        if self.total_weight <= 0:
            raise LocalProtocolError("total_weight is 0: no weighted mean exists")
        return np.asarray(self.weighted_sum, dtype=np.float64) / self.total_weight


class FixedPointEncoding(BaseModel):
    """Public encoding parameters; every party must use the same ones (they enter the transcript).

    Raises:
        InsecureParameterError: if the ring cannot hold `max_parties` inputs at a useful precision.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    clip_range: Annotated[float, Field(gt=0, allow_inf_nan=False)] = Field(
        description="public clipping bound c: each coordinate is clipped to [-c, c] before encoding"
    )
    max_parties: Annotated[int, Field(ge=1, le=1 << 16)] = Field(
        description="n_max: most inputs ever summed; the ring is sized so their sum cannot wrap"
    )
    ring_bits: Literal[16, 32, 64] = Field(32, description="b: inputs and sums live in Z_(2^b)")
    max_weight: Annotated[float, Field(gt=0, allow_inf_nan=False)] = Field(
        1.0, description="largest aggregation weight a client may declare"
    )

    def __init__(self, **data: Any) -> None:
        super().__init__(**data)
        if self.level < _MIN_LEVEL:
            raise InsecureParameterError(
                f"ring_bits={self.ring_bits} leaves only {self.level} quantization levels per input for "
                f"max_parties={self.max_parties}; raise ring_bits or lower max_parties"
            )

    @property
    def level(self) -> int:
        """Largest absolute encoded value of one input: max_parties * level < 2^(b-1)."""
        bits: int = self.ring_bits
        return min((1 << (bits - 1)) - 1, _EXACT_SUM) // self.max_parties

    @property
    def scale(self) -> float:
        """Ring units per unit of w * x."""
        return self.level / (self.clip_range * self.max_weight)

    @property
    def weight_scale(self) -> float:
        """Ring units per unit of weight."""
        return self.level / self.max_weight

    def encoder(
        self,
        x: npt.NDArray[np.floating] | npt.NDArray[np.integer],
        *,
        weight: float = 1.0,
        rounding_seed: bytes | None = None,
        rng: SecretSource | None = None,
    ) -> ChunkEncoder:
        """Validate the parameters and return a streaming encoder for `x` (`encode` or `encode_ring` by dtype).

        The encoder reads `x` as it goes, a chunk at a time (finiteness is checked again per chunk), so
        `x` must not change until encoding has finished.
        """
        return ChunkEncoder(self, self.prepare(x, weight=weight, rounding_seed=rounding_seed, rng=rng))

    def prepare(
        self,
        x: npt.NDArray[np.floating] | npt.NDArray[np.integer],
        *,
        weight: float = 1.0,
        rounding_seed: bytes | None = None,
        rng: SecretSource | None = None,
        dimension: int | None = None,
    ) -> PendingInput:
        """Check `x` and fix how it will be encoded (weight, rounding seed) without encoding it yet.

        The result holds a reference to `x`, not a copy, so that a masking client can encode it later
        straight into its message buffer (`ChunkEncoder`); the rounding seed is drawn here (one
        32-byte draw from `rng`, as `encode` makes), so the encoding is fixed at this call.

        Raises:
            LocalProtocolError: `x` is not a 1-D float or integer vector (of length `dimension` when
                given), a float `x` holds NaN or infinity, or `weight` / `rounding_seed` is invalid.
        """
        arr: npt.NDArray[Any] = np.asarray(x)
        if np.issubdtype(arr.dtype, np.integer):
            if arr.ndim != 1:
                raise LocalProtocolError(
                    f"x must be a 1-D integer vector of ring elements, got shape {arr.shape} dtype {arr.dtype}"
                )
        elif arr.ndim != 1 or not np.issubdtype(arr.dtype, np.floating):
            raise LocalProtocolError(f"x must be a 1-D float vector, got shape {arr.shape} dtype {arr.dtype}")
        if dimension is not None and arr.shape != (dimension,):
            raise LocalProtocolError(f"x must have shape ({dimension},), got {arr.shape}")
        if np.issubdtype(arr.dtype, np.floating) and not _all_finite(arr):
            raise LocalProtocolError("x contains NaN or infinity; fix the update before encoding")
        return PendingInput(arr, weight, self._seed(weight, rounding_seed, rng))

    def _seed(self, weight: float, rounding_seed: bytes | None, rng: SecretSource | None) -> bytes:
        """Check the weight, then the rounding seed (drawn from `rng` when omitted: one 32-byte draw)."""
        if not (math.isfinite(weight) and 0 <= weight <= self.max_weight):
            raise LocalProtocolError(f"weight={weight} must be finite and in [0, max_weight={self.max_weight}]")
        seed = rounding_seed if rounding_seed is not None else (rng or OsRandom()).token_bytes(32)
        if len(seed) != 32:
            raise LocalProtocolError(f"rounding_seed must be 32 bytes, got {len(seed)}")
        return seed

    def _weight_word(self, weight: float, uniform_word: int) -> int:
        """The weight word as a signed integer: weight * weight_scale, rounded up iff u < its fraction.

        `uniform_word` is the 32-bit rounding word (the one after the data words of the rounding
        stream), so `encode` and `encode_ring` agree bit for bit; with the default max_weight = 1.0 a
        weight of 1.0 lands on `level` exactly (no rounding).
        """
        u_w = uniform_word * _U32_SCALE
        y_w = min(weight * self.weight_scale, float(self.level))
        return math.floor(y_w) + (u_w < y_w - math.floor(y_w))

    def encode(
        self,
        x: npt.NDArray[np.floating],
        *,
        weight: float = 1.0,
        rounding_seed: bytes | None = None,
        rng: SecretSource | None = None,
    ) -> npt.NDArray[np.unsignedinteger]:
        """Clip, weight, stochastically round and wrap `x` into a ring vector of length len(x) + 1.

        Args:
            x: the 1-D float update.
            weight: aggregation weight in [0, max_weight].
            rounding_seed: 32-byte seed of the rounding stream; drawn from `rng` when omitted.
            rng: source for the rounding seed; `os.urandom` when omitted.

        Raises:
            LocalProtocolError: if `x` is not a finite 1-D float vector or `weight` is out of range.
        """
        x = np.asarray(x)
        if x.ndim != 1 or not np.issubdtype(x.dtype, np.floating):
            raise LocalProtocolError(f"x must be a 1-D float vector, got shape {x.shape} dtype {x.dtype}")
        stream = self.encoder(x, weight=weight, rounding_seed=rounding_seed, rng=rng)
        out = np.empty(stream.length, dtype=ring_dtype(self.ring_bits))
        for start in range(0, stream.length, CHUNK_WORDS):
            stream.fill(out[start : start + CHUNK_WORDS], start)
        return out

    def encode_ring(
        self,
        z: npt.NDArray[np.integer],
        *,
        weight: float = 1.0,
        rounding_seed: bytes | None = None,
        rng: SecretSource | None = None,
    ) -> npt.NDArray[np.unsignedinteger]:
        """Take integer ring elements `z` as they are, plus the weight word: a vector of length len(z) + 1.

        For distributed DP: the client has quantized its clipped update itself and added its share
        of integer noise, so each value is already a ring element. It is reduced mod 2^b (two's
        complement: -1 becomes 2^b - 1) and never clipped nor scaled: clipping one client's noisy
        share would change the distribution of the summed noise the privacy guarantee rests on, and
        a sum that wraps is post-processing of that sum, for the caller to read with its own lift.
        The last word is the weight word exactly as `encode` writes it for an input of this length
        and this rounding seed (the same draw from `rng`, the same rounding word), so weight 1.0
        (with the default max_weight) encodes exactly and the server decodes the weight sum, the
        number of inputs, as it does for float inputs.

        Args:
            z: 1-D vector of any signed or unsigned integer dtype.
            weight: aggregation weight in [0, max_weight].
            rounding_seed: 32-byte seed of the rounding stream (only the weight word uses it).
            rng: source for the rounding seed; `os.urandom` when omitted.

        Raises:
            LocalProtocolError: if `z` is not a 1-D integer vector (float and bool are refused, so a
                float update cannot skip its clipping) or `weight` is out of range.
        """
        z = np.asarray(z)
        if z.ndim != 1 or not np.issubdtype(z.dtype, np.integer):
            raise LocalProtocolError(
                f"x must be a 1-D integer vector of ring elements, got shape {z.shape} dtype {z.dtype}"
            )
        seed = self._seed(weight, rounding_seed, rng)
        d = z.shape[0]
        out = np.empty(d + 1, dtype=ring_dtype(self.ring_bits))
        out[:d] = z.astype(out.dtype, casting="unsafe")  # integer casts wrap mod 2^b (two's complement)
        signed = out.view(out.dtype.str.replace("u", "i"))
        signed[d] = self._weight_word(weight, _rounding_word_at(seed, d))
        return out

    def encode_input(
        self,
        x: npt.NDArray[np.floating] | npt.NDArray[np.integer],
        *,
        weight: float = 1.0,
        rounding_seed: bytes | None = None,
        rng: SecretSource | None = None,
    ) -> npt.NDArray[np.unsignedinteger]:
        """`encode_ring` for an integer-dtype `x`, `encode` otherwise: the one rule every masking client uses.

        The dtype decides, not the values: an integer vector holds ring elements the client made
        itself (distributed DP), a float vector is an update to clip. Anything else (bool, object,
        complex) reaches `encode` and is refused there.
        """
        arr: npt.NDArray[Any] = np.asarray(x)
        if np.issubdtype(arr.dtype, np.integer):
            return self.encode_ring(arr, weight=weight, rounding_seed=rounding_seed, rng=rng)
        return self.encode(arr, weight=weight, rounding_seed=rounding_seed, rng=rng)

    def decode(self, ring_sum: npt.NDArray[np.unsignedinteger], *, num_inputs: int) -> DecodedSum:
        """Decode the ring sum of `num_inputs` encoded inputs (weight in the last coordinate).

        Raises:
            LocalProtocolError: if `num_inputs` exceeds `max_parties` (the sum may have wrapped) or
                the vector has the wrong dtype.
        """
        if not 0 <= num_inputs <= self.max_parties:
            raise LocalProtocolError(
                f"num_inputs={num_inputs} exceeds max_parties={self.max_parties}: the sum may have wrapped"
            )
        if ring_sum.dtype != ring_dtype(self.ring_bits) or ring_sum.ndim != 1 or ring_sum.shape[0] < 1:
            raise LocalProtocolError(f"ring_sum must be a non-empty 1-D {ring_dtype(self.ring_bits)} vector")
        signed = ring_sum.view(ring_sum.dtype.str.replace("u", "i"))
        values = signed[:-1].astype(np.float64) / self.scale
        total_weight = float(signed[-1]) / self.weight_scale
        return DecodedSum(
            weighted_sum=values,
            total_weight=total_weight,
            num_inputs=num_inputs,
            max_abs_error=num_inputs / self.scale,
        )


def _all_finite(x: npt.NDArray[np.floating]) -> bool:
    """Whether every value is finite, in one summing pass where it is.

    Any NaN or infinity makes the sum NaN or infinite; only a sum that is not finite (it may just have
    overflowed) needs the exact, slower check.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        total = float(np.add.reduce(x, dtype=np.float64))
    return math.isfinite(total) or bool(np.isfinite(x).all())


def _rounding_word_at(seed: bytes, index: int) -> int:
    """Word `index` of the rounding stream of `seed`, the counter started at its block (no run-through)."""
    block, offset = divmod(4 * index, 16)
    stream = Cipher(algorithms.AES(seed), modes.CTR(block.to_bytes(16, "big"))).encryptor()
    return int.from_bytes(stream.update(bytes(offset + 4))[offset:], "little")


class PendingInput:
    """A checked update waiting to be encoded: a reference to `x` (not a copy), its weight and rounding seed.

    Float `x` is encoded as `FixedPointEncoding.encode` does, integer `x` as `encode_ring`; the words
    are the same whenever they are produced, provided `x` has not changed in between.
    """

    __slots__ = ("seed", "weight", "x")

    def __init__(self, x: npt.NDArray[Any], weight: float, seed: bytes) -> None:
        self.x, self.weight, self.seed = x, weight, seed

    @property
    def ring(self) -> bool:
        """True for ring elements (integer dtype), taken unclipped."""
        return bool(np.issubdtype(self.x.dtype, np.integer))

    @property
    def length(self) -> int:
        """Words of the encoding: one per coordinate, plus the weight word."""
        return int(self.x.shape[0]) + 1


class ChunkEncoder:
    """Encodes one pending input chunk by chunk; chunks must be requested in order (the rounding stream).

    Float chunks take the arithmetic of `encode` step for step (bit-identical for every chunking); integer
    chunks are cast mod 2^b as `encode_ring` does, and only the weight word reads the rounding stream.
    """

    def __init__(self, encoding: FixedPointEncoding, pending: PendingInput, *, chunk_words: int = CHUNK_WORDS):
        self.encoding, self.pending = encoding, pending
        self.x, self.weight, self.seed = pending.x, pending.weight, pending.seed
        self.length = pending.length
        self.chunk_words = chunk_words
        self._next = 0
        self._ring = pending.ring
        if self._ring:
            return
        self._stream = Cipher(algorithms.AES(self.seed), modes.CTR(bytes(16))).encryptor()
        self._ubuf = bytearray(chunk_words * 4 + 15)
        self._uwords = np.frombuffer(self._ubuf, dtype="<u4", count=chunk_words)
        self._work = np.empty(chunk_words, dtype=np.float64)
        self._floor = np.empty(chunk_words, dtype=np.float64)
        self._bits = np.empty(chunk_words, dtype=np.bool_)
        self._zeros = bytes(chunk_words * 4)

    def fill(self, out: npt.NDArray[np.unsignedinteger], start: int) -> None:
        """Write the words [start, start + len(out)) into `out` (at most `chunk_words` at a time).

        Raises:
            LocalProtocolError: a chunk out of order or too long, or a float `x` that holds NaN or
                infinity in this chunk (it changed after it was checked).
        """
        if start != self._next or len(out) > self.chunk_words:
            raise LocalProtocolError("chunks must be encoded in order, at most CHUNK_WORDS at a time")
        d = self.x.shape[0]
        signed = out.view(out.dtype.str.replace("u", "i"))
        stop = min(start + len(out), d)
        w = max(stop - start, 0)
        if w and self._ring:
            np.copyto(out[:w], self.x[start:stop], casting="unsafe")  # integer casts wrap mod 2^b
        elif w:
            self._fill_floats(signed[:w], start, stop)
        if start + len(out) > d:  # the weight word
            if self._ring:
                word = _rounding_word_at(self.seed, d)
            else:
                word = int.from_bytes(self._stream.update(bytes(4)), "little")
            signed[d - start] = self.encoding._weight_word(self.weight, word)
        self._next = start + len(out)

    def _fill_floats(self, signed: npt.NDArray[np.signedinteger], start: int, stop: int) -> None:
        enc, w = self.encoding, stop - start
        y = self._work[:w]
        # Scale, then clip to the scaled range; capping at `level` guards against the product
        # c * factor landing one ulp above it.
        factor = self.weight * enc.scale
        bound = min(float(enc.level), enc.clip_range * factor)
        chunk = self.x[start:stop]
        # The product in float64 whatever the input's precision: numpy would otherwise multiply a
        # float32 (float16) chunk by the Python float in float32 (float16), rounding y to 24 (11)
        # bits before the stochastic rounding (float16 overflows to inf).
        # NaN or infinity in x (or 0 * inf) makes the sum of y non-finite; a finite sum proves the
        # chunk finite, and only a sum that overflowed needs the exact check. (A product that
        # overflows is clipped below like any other.)
        with np.errstate(over="ignore", invalid="ignore"):
            np.multiply(chunk, factor, out=y, dtype=np.float64)
            total = float(np.add.reduce(y))
        if not math.isfinite(total) and not np.isfinite(chunk).all():
            raise LocalProtocolError("x contains NaN or infinity; fix the update before encoding")
        np.clip(y, -bound, bound, out=y)
        self._stream.update_into(self._zeros[: w * 4], self._ubuf)
        # q = floor(y) + [u < y - floor(y)] with u = U * 2^-32 for the 32-bit rounding word U:
        # unbiased, and never beyond +-level (y - floor(y) is exact in float64 for y >= 0 and
        # y <= -1/2, unlike y + u, which could round up past an integer). For -1/2 < y < 0 it rounds
        # (to the 2^-53 grid); that rounding is part of the format, so any faster formula must
        # reproduce it (tests/protocols/test_fused_masking.py).
        # The compare is taken as U < (y - floor(y)) * 2^32, the same predicate: both scalings by
        # powers of two are exact on [0, 1] (no overflow; a subnormal scaled up loses no bits) and
        # monotone, and numpy converts the uint32 U to float64 exactly. It saves the pass that
        # converted U to float64 into a separate vector.
        f, bits = self._floor[:w], self._bits[:w]
        np.floor(y, out=f)
        y -= f
        y *= _TWO_32
        np.less(self._uwords[:w], y, out=bits)
        # |f| <= level, so the cast is exact, and f + 1 <= level where the bit is set (y = level
        # has no fraction); adding the bit as an integer is cheaper than in float64. The view wraps
        # mod 2^b.
        np.copyto(signed, f, casting="unsafe")
        signed += bits.view(np.int8)
