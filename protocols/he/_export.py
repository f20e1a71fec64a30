"""Our own SEAL objects (keys, fresh ciphertexts) read back into the wire layout of `_wire.py`.

Why a module of its own: `_wire.py` is about bytes from peers (checked coefficients written into
SEAL objects); this one only ever reads what SEAL produced in this process. TenSEAL exposes a
ciphertext's coefficients one Python call at a time, and a seeded ciphertext (`HEParams.seeded`) not
at all except through SEAL's `save` to a file, zstd-compressed. So fresh uploads are saved by SEAL
into the client's private scratch folder, decompressed with the zstd of TenSEAL's own SEAL build,
and checked to be byte for byte the layout `Layout` rebuilds around c0 (and the seed), before the
coefficients are packed. Nothing here parses a peer's bytes.
"""

from __future__ import annotations

import functools
import struct
from typing import Any

import numpy as np
import numpy.typing as npt

from ..errors import LocalProtocolError
from ._params import SEED_BYTES
from ._wire import COMPR_NONE, COMPR_ZSTD, SEAL_MAGIC, Layout

__all__ = ["coefficients", "export_chunk", "export_key", "export_public", "export_secret", "export_seeded"]


def zstd_available() -> bool:
    """Whether `_zstd_decompress` works here (else full ciphertexts are exported coefficient by coefficient)."""
    try:
        _zstd_decompress()
    except LocalProtocolError:
        return False
    return True


@functools.cache
def _zstd_decompress() -> Any:
    """ZSTD_decompress of the zstd that TenSEAL's own SEAL build links (it wrote the bytes; nothing else reads them).

    `tenseal.sealapi` saves a ciphertext (and a seeded one at all) only to a file path, zstd-compressed, so
    the client reads its own files back through this one function; no peer byte is ever decompressed.
    """
    import ctypes

    try:
        import _sealapi_cpp  # type: ignore[import-not-found, unused-ignore]

        lib = ctypes.CDLL(_sealapi_cpp.__file__)
        fn, is_error = lib.ZSTD_decompress, lib.ZSTD_isError
    except (ImportError, OSError, AttributeError) as exc:
        raise LocalProtocolError(
            "seeded uploads need the zstd that TenSEAL's SEAL build exports (ZSTD_decompress in _sealapi_cpp), "
            "which this TenSEAL lacks; set HEParams.seeded=False"
        ) from exc
    fn.restype, fn.argtypes = ctypes.c_size_t, [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_size_t]
    is_error.restype, is_error.argtypes = ctypes.c_uint, [ctypes.c_size_t]

    def decompress(data: bytes, capacity: int) -> bytes:
        out = ctypes.create_string_buffer(capacity)
        got = fn(out, capacity, data, len(data))
        if is_error(got):
            raise LocalProtocolError("SEAL's seeded ciphertext does not decompress (zstd error)")
        return out.raw[:got]

    return decompress


def coefficients(obj: Any, count: int) -> npt.NDArray[np.uint64]:
    """The flat coefficient array of a local SEAL ciphertext or plaintext (our own, never a peer's)."""
    return np.fromiter(map(obj.__getitem__, range(count)), dtype=np.uint64, count=count)


def export_secret(shape: Layout, ctx: Any) -> bytes:
    """The secret key of a local context in the wire layout (for the site's own state folder only)."""
    n, big = shape.degree, len(shape.key_moduli)
    return shape.pack(coefficients(ctx.data.secret_key().data(), n * big), 1, shape.key_moduli)


def export_public(shape: Layout, ctx: Any) -> bytes:
    """The public key of a local context in the wire layout."""
    n, big = shape.degree, len(shape.key_moduli)
    return shape.pack(coefficients(ctx.data.public_key().data(), 2 * n * big), 2, shape.key_moduli)


def export_key(shape: Layout, ctx: Any) -> bytes:
    """The key the holder delivers: its secret key (symmetric) or public key, in the wire layout."""
    return export_secret(shape, ctx) if shape.params.mode == "symmetric" else export_public(shape, ctx)


def _saved_members(saved: bytes, size: int) -> bytes:
    """The members of a ciphertext SEAL saved for this process (zstd or uncompressed), exactly `size` bytes."""
    if len(saved) < 16 or struct.unpack_from("<H", saved)[0] != SEAL_MAGIC:
        raise LocalProtocolError("SEAL's saved ciphertext has no SEAL header")
    compr = saved[5]
    members: bytes
    if compr == COMPR_ZSTD:
        members = _zstd_decompress()(saved[16:], size + 1)
    elif compr == COMPR_NONE:
        members = saved[16:]
    else:
        raise LocalProtocolError(f"SEAL saved a ciphertext with compression mode {compr}")
    if len(members) != size:
        raise LocalProtocolError(f"SEAL's saved ciphertext has {len(members)} bytes of members; {size} expected")
    return members


def export_seeded(shape: Layout, saved: bytes) -> tuple[bytes, bytes]:
    """A fresh seeded ciphertext as SEAL saved it (our own file) to the wire layout; also returns its seed.

    Everything around c0 and the seed must equal what `Layout` writes, so the key holder's
    reconstruction (`Layout.vector` with the seed) is byte for byte what SEAL wrote.

    Raises:
        LocalProtocolError: SEAL's output is not a fresh seeded ciphertext of these parameters.
    """
    poly = shape.degree * len(shape.data_moduli)
    head, middle = shape.seeded_frame
    members = _saved_members(saved, len(head) + 8 * poly + len(middle) + SEED_BYTES)
    tail = len(head) + 8 * poly
    if members[: len(head)] != head or members[tail : tail + len(middle)] != middle:
        raise LocalProtocolError("SEAL's seeded ciphertext is not in the layout this module rebuilds")
    flat = np.frombuffer(members, dtype="<u8", count=poly, offset=len(head))
    seed = members[-SEED_BYTES:]
    return shape.pack(flat, 1, shape.data_moduli) + seed, seed


def export_chunk(shape: Layout, vector: Any, scratch: str | None = None) -> bytes:
    """One local ciphertext vector in the wire layout.

    With a `scratch` file path (`encrypt_update`), SEAL saves the ciphertext there and its members are
    read back: one C++ save and one zstd pass instead of a Python call per coefficient (without
    TenSEAL's zstd, or with another compression, it falls back to the coefficients).

    Raises:
        LocalProtocolError: (with `scratch`) SEAL's output is not a fresh ciphertext of these parameters.
    """
    (cipher,) = vector.ciphertext()
    count = 2 * shape.degree * len(shape.data_moduli)
    if scratch is None or not zstd_available():
        return shape.pack(coefficients(cipher, count), 2, shape.data_moduli)
    cipher.save(scratch)
    with open(scratch, "rb") as file:
        saved = file.read()
    if saved[5:6] not in (bytes([COMPR_ZSTD]), bytes([COMPR_NONE])):  # a SEAL built with zlib only
        return shape.pack(coefficients(cipher, count), 2, shape.data_moduli)
    head = shape.fresh_head
    members = _saved_members(saved, len(head) + 8 * count)
    if members[: len(head)] != head:
        raise LocalProtocolError("SEAL's ciphertext is not in the layout this module rebuilds")
    return shape.pack(np.frombuffer(members, dtype="<u8", count=count, offset=len(head)), 2, shape.data_moduli)
