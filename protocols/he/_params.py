"""Public parameters of HE aggregation, validated before any key exists.

Packed BFV (default). Each update is quantized by the masking protocols' `FixedPointEncoding` to
16-bit signed integers in [-L, L] (L = 2^15 - 1; the weight is folded in: w * x is encoded, and w
goes alongside), offset by L to [0, 2L], and `fields_per_slot` such values are packed into one
BFV slot in fields of `field_bits` = bitlen(n_max * 2L) bits, so the sum of n_max contributions can
never carry into a neighbouring field; the packed slot value stays below 2^(k * field_bits) <= t,
the plain modulus, so the integer sum decrypts exactly (read modulo t).

Two checks refuse a configuration before it is used, because TenSEAL does not raise when a
ciphertext's noise budget runs out (it decrypts garbage):

* field width: k * field_bits <= floor(log2 t);
* noise: the fresh budget of a BFV ciphertext is about log2(q_data) - log2(t) - 6 bits with
  symmetric encryption (9 with public-key encryption; measured 8 and 5-6 bits left after 10 and
  16 sums for N = 4096, q = 56 + 53 bits, t = 2^41 - 65535), and summing n_max ciphertexts costs
  log2(n_max) bits; at least one bit must be left.

A start-up self-test (`self_test`) then encrypts a known vector, adds it n_max times and checks
the exact decryption. Coefficient moduli are checked against the Homomorphic Encryption Standard's
128-bit table (ternary secrets): anything weaker raises `InsecureParameterError`.

CKKS runs with NVFlare's parameter set (N = 8192, [60, 40, 40], scale 2^40) on the same quantized
integers: the offset words in [0, 2L] are encrypted one per slot (no packing), so the decrypted sum is
the exact integer sum plus the CKKS error, and the decrypting client rounds it to that integer sum
after checking that every value lies within `ckks_tolerance` (2^-8) of an integer. Two checks refuse
a CKKS configuration where that rounding could be wrong:

* room: the largest scaled sum, n_max * 2L * 2^scale_bits, stays below q_data / 4 (a decryption is
  read modulo q_data, centred: a larger value would wrap);
* error: `ckks_error_bound`, a worst-case bound on |decryption - integer sum| per slot for n_max fresh
  ciphertexts (the CKKS paper's fresh public-key bound 8 sqrt(2) sigma N + 6 sigma sqrt(N) +
  16 sigma sqrt(h N) with h = N, plus the encoding's rounding 6 sqrt(N / 12), divided by the scale;
  symmetric encryption has less noise), must not exceed `ckks_tolerance`, itself far below the 1/2
  at which rounding would go to the wrong integer. For NVFlare's set at n_max = 16 the bound is
  2^-16.5 (measured: about 2^-28 symmetric, 2^-24.5 public-key, all values at 2L).

The released integers are then a function of the inputs alone, as with BFV (see the package
docstring for why that leaks no key material).

Seeded uploads (`seeded`, symmetric BFV only) change the wire size, not the parameters: the same
moduli, inside the same 128-bit table, and the same noise budget (a seeded ciphertext is an ordinary
fresh symmetric encryption whose c1 is sent as its seed); `max_chunk_bytes` is then one polynomial
plus `SEED_BYTES`.
"""

from __future__ import annotations

import hashlib
import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..encoding import FixedPointEncoding
from ..errors import InsecureParameterError

__all__ = ["HE_STANDARD_128", "HEParams"]

HE_STANDARD_128: dict[int, int] = {1024: 27, 2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881}
"""Largest total coefficient-modulus bits for 128-bit security (HomomorphicEncryption.org standard,
ternary secret, classical attacks), by polynomial modulus degree N."""

VALUE_BITS = 16
"""Bits of one quantized value (signed, symmetric): L = 2^15 - 1 levels each side."""

SEED_BYTES = 64
"""Bytes of the seed that replaces the uniform polynomial of a seeded upload (SEAL's `prng_seed_byte_count`)."""

_NOISE_MARGIN = {"symmetric": 6, "public-key": 9}

CKKS_TOLERANCE = 2.0**-8
"""Largest distance from an integer a decrypted CKKS sum may have; anything farther aborts (never rounded)."""

_CKKS_SIGMA = 3.2
"""Standard deviation of SEAL's error distribution (3.19), rounded up."""


def _is_prime(n: int) -> bool:
    """Deterministic Miller-Rabin for n < 3.3e24 (bases up to 41)."""
    if n < 2:
        return False
    bases = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41)
    if n in bases:
        return True
    if any(n % b == 0 for b in bases):
        return False
    d, r = n - 1, 0
    while d % 2 == 0:
        d, r = d // 2, r + 1
    for a in bases:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(r - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


class HEParams(BaseModel):
    """What every party of an HE aggregation agrees on; its digest enters the transcript."""

    model_config = ConfigDict(frozen=True, extra="forbid", ser_json_bytes="hex", val_json_bytes="hex")

    scheme: Literal["bfv", "ckks"] = Field("bfv", description="bfv: exact packed integers; ckks: NVFlare-style")
    mode: Literal["symmetric", "public-key"] = Field(
        "symmetric", description="symmetric (NVFlare's choice; every client holds the secret key) or public-key"
    )
    num_parties: Annotated[int, Field(ge=2, le=1 << 16)] = Field(description="n: enrolled parties, ids 0..n-1")
    max_parties: Annotated[int, Field(ge=2, le=1 << 16)] = Field(16, description="n_max: most inputs ever summed")
    dimension: Annotated[int, Field(ge=1, le=1 << 28)] = Field(description="d: length of each input vector")
    clip_range: Annotated[float, Field(gt=0, allow_inf_nan=False)] = Field(description="public per-coordinate bound")
    max_weight: Annotated[float, Field(gt=0, allow_inf_nan=False)] = Field(1.0, description="largest weight")
    min_contributions: Annotated[int, Field(ge=1)] = Field(
        3, description="t_min: clients decrypt an aggregate only with at least this many signed contributions"
    )
    poly_modulus_degree: Literal[2048, 4096, 8192, 16384, 32768] = Field(4096, description="N")
    coeff_mod_bit_sizes: tuple[int, ...] = Field((56, 53), description="coefficient moduli bits (last: special)")
    plain_modulus: int = Field(2199023190017, description="t (bfv): a batching prime, 2^41 - 65535")
    fields_per_slot: Annotated[int, Field(ge=1, le=4)] = Field(2, description="k (bfv): values per slot")
    scale_bits: Annotated[int, Field(ge=20, le=60)] = Field(40, description="CKKS scale 2^bits")
    seeded: bool = Field(
        False,
        description="symmetric BFV only: a fresh upload carries a 64-byte seed in place of its uniform polynomial",
    )
    identity_keys: tuple[Annotated[bytes, Field(min_length=32, max_length=32)], ...] | None = Field(
        None, description="Ed25519 public key of each party: authenticates keys (malicious-server setting)"
    )

    def __init__(self, **data: Any) -> None:
        super().__init__(**data)
        total = sum(self.coeff_mod_bit_sizes)
        limit = HE_STANDARD_128[self.poly_modulus_degree]
        if len(self.coeff_mod_bit_sizes) < 2:
            raise InsecureParameterError("coeff_mod_bit_sizes needs at least two primes (TenSEAL keeps a special one)")
        if total > limit:
            raise InsecureParameterError(
                f"coeff_mod_bit_sizes={list(self.coeff_mod_bit_sizes)} total {total} bits exceeds {limit}, the "
                f"128-bit bound for poly_modulus_degree={self.poly_modulus_degree}; lower the moduli or raise N"
            )
        if self.num_parties > self.max_parties:
            raise InsecureParameterError(f"num_parties={self.num_parties} exceeds max_parties={self.max_parties}")
        if self.identity_keys is not None and len(self.identity_keys) != self.num_parties:
            raise InsecureParameterError(f"identity_keys has {len(self.identity_keys)} keys; need {self.num_parties}")
        if any(not 2 <= bits <= 60 for bits in self.coeff_mod_bit_sizes):
            raise InsecureParameterError("every coefficient modulus prime must have 2..60 bits (SEAL's limit)")
        self._check_seeded()
        if self.scheme == "bfv":
            if not _is_prime(self.plain_modulus) or self.plain_modulus % (2 * self.poly_modulus_degree) != 1:
                raise InsecureParameterError(
                    f"plain_modulus={self.plain_modulus} must be a prime = 1 mod 2N (batching); e.g. 2199023190017"
                )
            width = self.field_bits * self.fields_per_slot
            if width > self.plain_modulus.bit_length() - 1:
                raise InsecureParameterError(
                    f"{self.fields_per_slot} fields of {self.field_bits} bits (sums of max_parties={self.max_parties}) "
                    f"need {width} bits but plain_modulus has {self.plain_modulus.bit_length() - 1}; lower "
                    "fields_per_slot or max_parties"
                )
            if self.noise_budget_bits < 1:
                raise InsecureParameterError(
                    f"the BFV noise budget would run out: about {self.noise_budget_bits:.1f} bits left after summing "
                    f"max_parties={self.max_parties} {self.mode} ciphertexts; lower max_parties or plain_modulus, "
                    "or raise the coefficient moduli"
                )
        else:
            room = sum(self.coeff_mod_bit_sizes[:-1]) - 2
            needed = (self.max_parties * 2 * self.level).bit_length() + self.scale_bits
            if needed > room:
                raise InsecureParameterError(
                    f"scale_bits={self.scale_bits}: a CKKS sum of max_parties={self.max_parties} quantized values "
                    f"needs {needed} bits but the data moduli {list(self.coeff_mod_bit_sizes[:-1])} leave {room}; "
                    "lower scale_bits or max_parties, or raise the coefficient moduli"
                )
            if self.ckks_error_bound > self.ckks_tolerance:
                raise InsecureParameterError(
                    f"scale_bits={self.scale_bits}: the CKKS error of a sum of max_parties={self.max_parties} "
                    f"ciphertexts may reach {self.ckks_error_bound:.2e}, above the rounding tolerance "
                    f"{self.ckks_tolerance:.2e} (2^-8, far below 1/2); raise scale_bits or lower max_parties"
                )

    def _check_seeded(self) -> None:
        if self.seeded and (self.scheme != "bfv" or self.mode != "symmetric"):
            raise InsecureParameterError(
                f"seeded=True needs scheme='bfv' and mode='symmetric' (got {self.scheme!r}, {self.mode!r}): only a "
                "fresh secret-key BFV encryption has a uniform half that a seed can replace; set seeded=False"
            )

    @classmethod
    def bfv_packed(cls, num_parties: int, *, dimension: int, clip_range: float, **kw: Any) -> HEParams:
        """The default: BFV N=4096, q = 56 + 53 bits, t = 2^41 - 65535, two 20-bit fields per slot."""
        return cls(scheme="bfv", num_parties=num_parties, dimension=dimension, clip_range=clip_range, **kw)

    @classmethod
    def bfv_seeded(cls, num_parties: int, *, dimension: int, clip_range: float, **kw: Any) -> HEParams:
        """`bfv_packed` with seeded uploads (symmetric mode, n_C = 0 sites): about 3.5 bytes per parameter."""
        return cls(
            scheme="bfv", mode="symmetric", seeded=True, num_parties=num_parties, dimension=dimension,
            clip_range=clip_range, **kw,
        )  # fmt: skip

    @classmethod
    def ckks_nvflare(cls, num_parties: int, *, dimension: int, clip_range: float, **kw: Any) -> HEParams:
        """NVFlare's defaults: CKKS N=8192, [60, 40, 40], scale 2^40, on the quantized integers (exact release)."""
        fields: dict[str, Any] = {"poly_modulus_degree": 8192, "coeff_mod_bit_sizes": (60, 40, 40), "scale_bits": 40}
        fields.update(kw)
        return cls(scheme="ckks", num_parties=num_parties, dimension=dimension, clip_range=clip_range, **fields)

    @property
    def quantizer(self) -> FixedPointEncoding:
        """The masking protocols' encoding at 16-bit levels (L = 2^15 - 1), weights folded in."""
        # level = (2^31 - 1) // max_parties: with 2^16 "parties" it is 2^15 - 1, i.e. 16-bit values
        return FixedPointEncoding(
            clip_range=self.clip_range, max_parties=1 << (32 - VALUE_BITS), ring_bits=32, max_weight=self.max_weight
        )

    @property
    def level(self) -> int:
        """L: largest absolute quantized value."""
        return (1 << (VALUE_BITS - 1)) - 1

    @property
    def field_bits(self) -> int:
        """Width of one packed field: holds the sum of max_parties offset values in [0, 2L]."""
        return (self.max_parties * 2 * self.level).bit_length()

    @property
    def slots(self) -> int:
        """Values per ciphertext: N for BFV (batching), N/2 for CKKS."""
        return self.poly_modulus_degree if self.scheme == "bfv" else self.poly_modulus_degree // 2

    @property
    def words(self) -> int:
        """Integers per update: d values, the weight and a contribution counter."""
        return self.dimension + 2

    @property
    def values_per_chunk(self) -> int:
        """Integers (bfv) or floats (ckks) carried by one ciphertext."""
        return self.slots * (self.fields_per_slot if self.scheme == "bfv" else 1)

    @property
    def chunks(self) -> int:
        """Ciphertexts per update."""
        return math.ceil(self.words / self.values_per_chunk)

    @property
    def max_chunk_bytes(self) -> int:
        """Exact bytes of one uploaded ciphertext chunk on the wire (`_wire.py`), checked before parsing.

        Two polynomials of N coefficients per data prime, each coefficient in ceil(bits / 8) bytes (SEAL's
        primes have exactly the requested bits); seeded uploads carry one polynomial and a 64-byte seed.
        """
        poly = self.poly_modulus_degree * sum((bits + 7) // 8 for bits in self.coeff_mod_bit_sizes[:-1])
        return poly + SEED_BYTES if self.seeded else 2 * poly

    @property
    def noise_budget_bits(self) -> float:
        """Estimated BFV noise budget left after summing max_parties fresh ciphertexts."""
        data_bits = sum(self.coeff_mod_bit_sizes[:-1])
        fresh = data_bits - math.log2(self.plain_modulus) - _NOISE_MARGIN[self.mode]
        return fresh - math.log2(self.max_parties)

    @property
    def max_abs_error(self) -> float:
        """Bound on |decoded sum - exact sum of clipped inputs| per coordinate, for max_parties inputs.

        Both schemes release the exact integer sum of the quantized inputs: only the quantization errs.
        """
        return self.max_parties / self.quantizer.scale

    @property
    def ckks_tolerance(self) -> float:
        """How far from an integer a decrypted CKKS value may be before the decrypting client aborts (2^-8)."""
        return CKKS_TOLERANCE

    @property
    def ckks_error_bound(self) -> float:
        """Worst-case |decryption - integer sum| per slot for a CKKS sum of max_parties fresh ciphertexts.

        The fresh public-key encryption bound of Cheon-Kim-Kim-Song (8 sqrt(2) sigma N + 6 sigma sqrt(N) +
        16 sigma sqrt(h N), h <= N) plus the encoder's rounding (6 sqrt(N / 12)), per ciphertext, in
        units of the scale; symmetric encryption adds less noise, so one bound serves both modes.
        """
        n = self.poly_modulus_degree
        fresh = 8 * math.sqrt(2) * _CKKS_SIGMA * n + 6 * _CKKS_SIGMA * math.sqrt(n) + 16 * _CKKS_SIGMA * n
        rounding = 6 * math.sqrt(n / 12)
        return self.max_parties * (fresh + rounding) / 2.0**self.scale_bits

    def digest(self) -> bytes:
        """SHA-256 of the canonical JSON form (bound into the transcript)."""
        return hashlib.sha256(b"protocols/he/params/v1|" + self.model_dump_json().encode()).digest()
