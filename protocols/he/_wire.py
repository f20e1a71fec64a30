"""Keys and ciphertexts on the wire as bare polynomials: no peer byte ever reaches a TenSEAL/SEAL parser.

Why: TenSEAL's `context_from` parses a protobuf, SEAL headers and SEAL's legacy formats in C++; two or
three changed header bytes in a serialized context (for example an embedded modulus's SEAL header set
to version 1 with a nonzero reserved byte) let a C++ exception escape where it cannot be translated,
`std::terminate` runs and the whole process aborts (SIGABRT: no Python `except` can catch it). So
nothing a peer sends is ever given to TenSEAL or SEAL as it arrived. Every party builds its TenSEAL
context locally from the validated `HEParams`; from a peer it accepts only the coefficients of a key or
a ciphertext in a fixed layout:

    polys x moduli x N coefficients, little-endian, each in ceil(bitlen(q_j) / 8) bytes,

where the moduli are the ones the local context uses at that level (all primes for keys, the data
primes for ciphertexts). Decoding checks the exact length (which fixes the number of polynomials and
their sizes) and that every coefficient is below its modulus, in numpy; only then are the SEAL
objects written, by this module, in SEAL's own uncompressed format with the locally computed
parms_id, and wrapped in a TenSEAL protobuf that this module also writes. So SEAL only ever parses
bytes built here from checked numbers.

The layout is also smaller than TenSEAL's zstd-compressed ciphertexts: 7 bytes per 56-bit
coefficient gives 7.0 bytes per parameter for packed BFV (TenSEAL's format: about 7.6).

Seeded uploads (`HEParams.seeded`): a fresh symmetric ciphertext is c0 in the layout above followed by
the 64-byte seed from which SEAL expands c1 (Blake2xb, SEAL's default generator), 3.5 bytes per
parameter. The receiver checks c0 like any polynomial; the seed is opaque bytes. The key holder writes
SEAL's seeded format itself (c0, then a UniformRandomGeneratorInfo of type blake2xb and the seed) and
SEAL's loader expands c1, so peer bytes still reach SEAL only as checked coefficients and a seed. The
client gets c0 and the seed from SEAL's own save of its ciphertext (`_export.py`), checked to be byte
for byte the frame this module rebuilds (`Layout.seeded_frame`).
"""

from __future__ import annotations

import functools
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from ..errors import DecodeError
from ._params import SEED_BYTES, HEParams

__all__ = ["Layout", "layout"]

SEAL_MAGIC = 0xA15E
_MAX_LAYOUTS = 16
_BLAKE2XB = 1
"""SEAL's `prng_type::blake2xb`: the generator of its default factory, which expands the seed of a fresh
secret-key ciphertext into the uniform polynomial (the only type this layout writes)."""
COMPR_NONE, COMPR_ZSTD = 0, 2
"""SEAL's compr_mode_type values (none, zstd) in a saved object's header."""


def _ts() -> Any:
    import tenseal  # type: ignore[import-untyped]  # heavy, and only needed when HE is used

    return tenseal


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _pb_bytes(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _pb_fields(data: bytes) -> dict[int, bytes]:
    """Length-delimited fields of a protobuf message this process serialized itself (never a peer's)."""
    fields: dict[int, bytes] = {}
    pos = 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        number, kind = key >> 3, key & 7
        if kind == 0:
            start = pos
            _, pos = _read_varint(data, pos)
            fields[number] = data[start:pos]
        elif kind == 1:
            fields[number] = data[pos : pos + 8]
            pos += 8
        elif kind == 2:
            length, pos = _read_varint(data, pos)
            fields[number] = data[pos : pos + length]
            pos += length
        elif kind == 5:
            fields[number] = data[pos : pos + 4]
            pos += 4
        else:
            raise AssertionError(f"unexpected protobuf wire type {kind} in TenSEAL's own output")
    return fields


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


@dataclass(frozen=True)
class Layout:
    """What the local context fixes about keys and ciphertexts of one `HEParams`."""

    params: HEParams
    degree: int
    data_moduli: tuple[int, ...]
    key_moduli: tuple[int, ...]
    first_parms_id: tuple[int, ...]
    key_parms_id: tuple[int, ...]
    version: bytes
    encryption_parameters: bytes
    public_fields: bytes
    encryption_type: bytes

    @staticmethod
    def _widths(moduli: tuple[int, ...]) -> tuple[int, ...]:
        return tuple((q.bit_length() + 7) // 8 for q in moduli)

    def size(self, polys: int, moduli: tuple[int, ...]) -> int:
        """Bytes of `polys` polynomials over `moduli` in the wire layout."""
        return polys * self.degree * sum(self._widths(moduli))

    @property
    def chunk_bytes(self) -> int:
        """Bytes of one uploaded chunk: 2 polynomials over the data primes, or (seeded) 1 and a 64-byte seed."""
        if self.params.seeded:
            return self.size(1, self.data_moduli) + SEED_BYTES
        return self.size(2, self.data_moduli)

    @property
    def key_bytes(self) -> int:
        """Bytes of the delivered key: the secret key (symmetric) or the public key (public-key mode)."""
        polys = 1 if self.params.mode == "symmetric" else 2
        return self.size(polys, self.key_moduli)

    # -- the wire layout -------------------------------------------------------------------------

    def pack(self, flat: npt.NDArray[np.uint64], polys: int, moduli: tuple[int, ...]) -> bytes:
        """Coefficients in SEAL's order (poly, modulus, coefficient) to the wire layout."""
        n = self.degree
        grid = flat.reshape(polys, len(moduli), n)
        parts = []
        for p in range(polys):
            for j, width in enumerate(self._widths(moduli)):
                parts.append(grid[p, j].astype("<u8").view(np.uint8).reshape(n, 8)[:, :width].tobytes())
        return b"".join(parts)

    def unpack(
        self, data: bytes, polys: int, moduli: tuple[int, ...], *, field: str, peer_id: int | None
    ) -> npt.NDArray[np.uint64]:
        """The wire layout back to coefficients, refusing a wrong length or a coefficient >= its modulus.

        Raises:
            DecodeError: the length is not exactly `polys` polynomials, or a coefficient is out of range.
        """
        expected = self.size(polys, moduli)
        if len(data) != expected:
            raise DecodeError(
                f"{field} has {len(data)} bytes; {polys} polynomial(s) of degree {self.degree} over "
                f"{len(moduli)} moduli take exactly {expected}",
                field=field,
                peer_id=peer_id,
            )
        n = self.degree
        raw = np.frombuffer(data, dtype=np.uint8)
        out = np.empty((polys, len(moduli), n), dtype=np.uint64)
        pos = 0
        for p in range(polys):
            for j, (q, width) in enumerate(zip(moduli, self._widths(moduli), strict=True)):
                wide = np.zeros((n, 8), dtype=np.uint8)
                wide[:, :width] = raw[pos : pos + n * width].reshape(n, width)
                values = wide.view("<u8").reshape(n)
                if (values >= np.uint64(q)).any():
                    raise DecodeError(
                        f"{field}: a coefficient of polynomial {p} is not below its modulus (prime {j})",
                        field=field,
                        peer_id=peer_id,
                    )
                out[p, j] = values
                pos += n * width
        return out.reshape(-1)

    def unpack_chunk(self, data: bytes, *, field: str, peer_id: int | None) -> tuple[npt.NDArray[np.uint64], bytes]:
        """An uploaded chunk: its polynomials and, when seeded, the seed of its uniform half (else b"").

        A seeded chunk is c0 (checked as any polynomial) followed by SEAL's 64-byte seed, which any bytes
        are: SEAL expands it with Blake2xb, so there is nothing more to check.

        Raises:
            DecodeError: the length is wrong, or a coefficient is not below its modulus.
        """
        if not self.params.seeded:
            return self.unpack(data, 2, self.data_moduli, field=field, peer_id=peer_id), b""
        poly = self.size(1, self.data_moduli)
        if len(data) != poly + SEED_BYTES:
            raise DecodeError(
                f"{field} has {len(data)} bytes; a seeded chunk takes exactly {poly + SEED_BYTES} (one polynomial "
                f"of degree {self.degree} over {len(self.data_moduli)} moduli, then a {SEED_BYTES}-byte seed)",
                field=field,
                peer_id=peer_id,
            )
        return self.unpack(data[:poly], 1, self.data_moduli, field=field, peer_id=peer_id), data[poly:]

    # -- SEAL and TenSEAL objects, written here from checked coefficients -----------------------

    def _header(self, body: bytes) -> bytes:
        return struct.pack("<HB", SEAL_MAGIC, 16) + self.version + struct.pack("<BHQ", 0, 0, 16 + len(body)) + body

    def _dynarray(self, flat: npt.NDArray[np.uint64]) -> bytes:
        return self._header(struct.pack("<Q", flat.size) + flat.astype("<u8").tobytes())

    def _ciphertext(
        self,
        parms_id: tuple[int, ...],
        moduli: tuple[int, ...],
        flat: npt.NDArray[np.uint64],
        *,
        ntt: bool,
        scale: float,
        seed: bytes = b"",
    ) -> bytes:
        return self._header(self._members(parms_id, moduli, flat, ntt=ntt, scale=scale, seed=seed))

    def _members(
        self,
        parms_id: tuple[int, ...],
        moduli: tuple[int, ...],
        flat: npt.NDArray[np.uint64],
        *,
        ntt: bool,
        scale: float,
        seed: bytes = b"",
    ) -> bytes:
        """SEAL's Ciphertext::save_members: with a seed, c0 alone and a UniformRandomGeneratorInfo (SEAL expands c1)."""
        body = (
            struct.pack("<4Q", *parms_id)
            + bytes([1 if ntt else 0])
            + struct.pack("<QQQdQ", 2, self.degree, len(moduli), scale, 1)
            + self._dynarray(flat)
        )
        if seed:
            body += self._header(bytes([_BLAKE2XB]) + seed)
        return body

    def vector(self, ctx: Any, flat: npt.NDArray[np.uint64], size: int, seed: bytes = b"") -> Any:
        """A TenSEAL vector of one checked ciphertext (BFVVectorProto / CKKSVectorProto written here).

        With a seed (a seeded upload), SEAL's loader expands the uniform half c1 from it.
        """
        ts = _ts()
        ckks = self.params.scheme == "ckks"
        scale = 2.0**self.params.scale_bits if ckks else 1.0
        proto = _pb_bytes(1, _varint(size)) + _pb_bytes(
            2, self._ciphertext(self.first_parms_id, self.data_moduli, flat, ntt=ckks, scale=scale, seed=seed)
        )
        if self.params.scheme == "bfv":
            return ts.bfv_vector_from(ctx, proto)
        proto += _varint(3 << 3 | 1) + struct.pack("<d", scale)
        return ts.ckks_vector_from(ctx, proto)

    def keyed_context(self, flat: npt.NDArray[np.uint64]) -> Any:
        """A TenSEAL context of the local parameters holding the delivered (checked) key."""
        ts = _ts()
        if self.params.mode == "symmetric":
            body = struct.pack("<4QQd", *self.key_parms_id, self.degree * len(self.key_moduli), 1.0)
            secret = self._header(body + self._dynarray(flat))
            public = self.public_fields
            private = _pb_bytes(3, _pb_bytes(1, secret))
        else:
            public = (
                _pb_bytes(1, self._ciphertext(self.key_parms_id, self.key_moduli, flat, ntt=True, scale=1.0))
                + self.public_fields
            )
            private = b""
        proto = _pb_bytes(1, self.encryption_parameters) + _pb_bytes(2, public) + private + self.encryption_type
        return ts.context_from(proto)

    def restored_context(self, secret: npt.NDArray[np.uint64], public: npt.NDArray[np.uint64] | None) -> Any:
        """A context holding a key from this site's own exported state (plus the public key in public-key mode)."""
        ts = _ts()
        body = struct.pack("<4QQd", *self.key_parms_id, self.degree * len(self.key_moduli), 1.0)
        private = _pb_bytes(3, _pb_bytes(1, self._header(body + self._dynarray(secret))))
        shown = self.public_fields
        if public is not None:
            shown = (
                _pb_bytes(1, self._ciphertext(self.key_parms_id, self.key_moduli, public, ntt=True, scale=1.0)) + shown
            )
        proto = _pb_bytes(1, self.encryption_parameters) + _pb_bytes(2, shown) + private + self.encryption_type
        return ts.context_from(proto)

    def keyless_context(self) -> Any:
        """The local context without any key (the server adds nothing; this is for parsing only)."""
        proto = _pb_bytes(1, self.encryption_parameters) + _pb_bytes(2, self.public_fields) + self.encryption_type
        return _ts().context_from(proto)

    @functools.cached_property
    def fresh_head(self) -> bytes:
        """SEAL's members of a fresh full ciphertext before its coefficients (as `_members` writes them)."""
        count = 2 * self.degree * len(self.data_moduli)
        ckks = self.params.scheme == "ckks"
        scale = 2.0**self.params.scale_bits if ckks else 1.0
        zeros = np.zeros(count, dtype=np.uint64)
        return self._members(self.first_parms_id, self.data_moduli, zeros, ntt=ckks, scale=scale)[: -8 * count]

    @functools.cached_property
    def seeded_frame(self) -> tuple[bytes, bytes]:
        """What surrounds c0 and the seed in SEAL's members of a fresh seeded ciphertext (as `_members` writes it)."""
        poly = self.degree * len(self.data_moduli)
        members = self._members(
            self.first_parms_id, self.data_moduli, np.zeros(poly, dtype=np.uint64), ntt=False, scale=1.0,
            seed=bytes(SEED_BYTES),
        )  # fmt: skip
        head = len(members) - 8 * poly - 17 - SEED_BYTES
        return members[:head], members[head + 8 * poly : -SEED_BYTES]


_CACHE: dict[bytes, Layout] = {}


def layout(params: HEParams) -> Layout:
    """The layout of `params`, computed once per process from a locally built context."""
    key = params.digest()
    found = _CACHE.get(key)
    if found is not None:
        return found
    import tenseal.sealapi as sealapi  # type: ignore[import-untyped]

    from ._ciphers import make_context

    ctx = make_context(params)
    seal = ctx.seal_context().data
    moduli = tuple(
        int(m.value())
        for m in sealapi.CoeffModulus.Create(params.poly_modulus_degree, list(params.coeff_mod_bit_sizes))
    )
    own = ctx.serialize(save_public_key=False, save_secret_key=False, save_galois_keys=False, save_relin_keys=False)
    fields = _pb_fields(own)
    encryption_parameters = fields[1]
    public = _pb_fields(fields[2]) if 2 in fields else {}
    public_fields = b""
    if 2 in public:
        public_fields += _varint(2 << 3 | 0) + public[2]
    if 3 in public:
        public_fields += _varint(3 << 3 | 1) + public[3]
    encryption_type = (_varint(4 << 3 | 0) + fields[4]) if 4 in fields else b""
    found = Layout(
        params=params,
        degree=params.poly_modulus_degree,
        data_moduli=moduli[:-1],
        key_moduli=moduli,
        first_parms_id=tuple(int(v) for v in seal.first_parms_id()),
        key_parms_id=tuple(int(v) for v in seal.key_parms_id()),
        version=encryption_parameters[3:5],
        encryption_parameters=encryption_parameters,
        public_fields=public_fields,
        encryption_type=encryption_type,
    )
    if len(_CACHE) >= _MAX_LAYOUTS:
        _CACHE.clear()
    _CACHE[key] = found
    return found
