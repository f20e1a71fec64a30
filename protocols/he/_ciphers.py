"""The TenSEAL layer: contexts, packing, chunked encryption, summation and decryption.

Everything that touches TenSEAL lives here and in `_wire.py`, behind functions on bytes and numpy
arrays, so that the session state machines stay small and TenSEAL is imported only when HE is used.
Contexts are only ever built locally (`make_context`, `load_key`); keys and ciphertexts from peers
are checked polynomials (`_wire.py`). Updates are processed one ciphertext at a time: the client
encrypts and exports chunk by chunk, the server checks each chunk's format, and the key holder
loads one chunk of one upload, adds it into its running sum and drops it, so peak memory does not
grow with the number of clients.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from ..encoding import DecodedSum
from ..errors import LocalProtocolError, RemoteProtocolError
from ..randomness import OsRandom, SecretSource
from . import _export
from ._params import SEED_BYTES, HEParams
from ._wire import layout

__all__ = [
    "ChunkSum",
    "SeededEncryptor",
    "check_chunks",
    "check_public_key",
    "decode_words",
    "decrypt_ckks",
    "decrypt_ckks_values",
    "decrypt_words",
    "encrypt_update",
    "export_key",
    "load_chunk",
    "load_key",
    "make_context",
    "quantize",
    "round_ckks",
    "self_test",
]


def _ts() -> Any:
    import tenseal  # type: ignore[import-untyped]  # heavy, and only needed when HE is used

    return tenseal


def make_context(params: HEParams) -> Any:
    """A fresh TenSEAL context holding a new secret key (the key holder's, once per session)."""
    ts = _ts()
    mode = ts.ENCRYPTION_TYPE.SYMMETRIC if params.mode == "symmetric" else ts.ENCRYPTION_TYPE.ASYMMETRIC
    if params.scheme == "bfv":
        ctx = ts.context(
            ts.SCHEME_TYPE.BFV,
            poly_modulus_degree=params.poly_modulus_degree,
            plain_modulus=params.plain_modulus,
            coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes),
            encryption_type=mode,
        )
    else:
        ctx = ts.context(
            ts.SCHEME_TYPE.CKKS,
            poly_modulus_degree=params.poly_modulus_degree,
            coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes),
            encryption_type=mode,
        )
        ctx.global_scale = 2.0**params.scale_bits
    return ctx


def export_key(params: HEParams, ctx: Any) -> bytes:
    """The key the holder delivers, as bare polynomials: the secret key (symmetric) or the public key."""
    return _export.export_key(layout(params), ctx)


def load_key(params: HEParams, data: bytes, *, peer_id: int | None = None) -> Any:
    """A context built locally from `params` holding the delivered key (checked first; never parsed by TenSEAL).

    A secret key is self-tested before use.

    Raises:
        DecodeError: the key has the wrong length or a coefficient not below its modulus.
        RemoteProtocolError: the delivered secret key fails the self-test.
    """
    shape = layout(params)
    polys = 1 if params.mode == "symmetric" else 2
    flat = shape.unpack(data, polys, shape.key_moduli, field="key", peer_id=peer_id)
    try:
        ctx = shape.keyed_context(flat)
    except Exception as exc:  # our own canonical bytes; a failure here is not the peer's format
        raise RemoteProtocolError("the delivered key is not a valid key", field="key", peer_id=peer_id) from exc
    if params.mode == "symmetric":
        try:
            self_test(ctx, params)
        except LocalProtocolError as exc:
            raise RemoteProtocolError("the delivered secret key fails the self-test", field="key") from exc
    return ctx


def check_public_key(params: HEParams, data: bytes, *, peer_id: int | None = None) -> None:
    """Parse-only check of a delivered public key (the server's: it builds no SEAL object from it)."""
    shape = layout(params)
    shape.unpack(data, 2, shape.key_moduli, field="public_key", peer_id=peer_id)


def check_chunks(params: HEParams, chunks: Sequence[bytes], *, field: str, peer_id: int | None = None) -> None:
    """Parse-only check of an upload: the number of chunks, each one's length and every coefficient.

    Seeded uploads: no two chunks may carry the same seed (a repeated seed leaks the difference of
    their plaintexts to whoever holds both; an honest client never sends one).

    Raises:
        RemoteProtocolError: the number of chunks is wrong, or a seed repeats.
        DecodeError: a chunk is empty, short, long, or holds a coefficient not below its modulus.
    """
    if len(chunks) != params.chunks:
        raise RemoteProtocolError(f"{len(chunks)} chunks; expected {params.chunks}", field=field, peer_id=peer_id)
    shape = layout(params)
    seeds: set[bytes] = set()
    for i, chunk in enumerate(chunks):
        _, seed = shape.unpack_chunk(chunk, field=f"{field}[{i}]", peer_id=peer_id)
        _check_seed(seeds, seed, field=f"{field}[{i}]", peer_id=peer_id)


def _check_seed(seen: set[bytes], seed: bytes, *, field: str, peer_id: int | None) -> None:
    if not seed:
        return
    if seed in seen:
        raise RemoteProtocolError(
            "a seeded chunk repeats another chunk's seed: the sender's random source is broken (a repeated seed "
            "leaks the difference of the two plaintexts); the upload is refused",
            field=field,
            peer_id=peer_id,
        )
    seen.add(seed)


def load_chunk(params: HEParams, ctx: Any, data: bytes, index: int, *, field: str, peer_id: int | None = None) -> Any:
    """One checked ciphertext chunk as a TenSEAL vector of the local context (a seeded one expanded by SEAL)."""
    shape = layout(params)
    flat, seed = shape.unpack_chunk(data, field=f"{field}[{index}]", peer_id=peer_id)
    size = params.slots if params.scheme == "bfv" else min(params.slots, params.words - index * params.slots)
    try:
        return shape.vector(ctx, flat, size, seed)
    except Exception as exc:  # our own canonical bytes from checked coefficients
        raise RemoteProtocolError("ciphertext chunk does not load", field=f"{field}[{index}]", peer_id=peer_id) from exc


def quantize(
    params: HEParams,
    x: npt.NDArray[np.floating],
    *,
    weight: float,
    rounding_seed: bytes | None = None,
    rng: SecretSource | None = None,
) -> npt.NDArray[np.int64]:
    """Words of one contribution: d values, the weight and a counter (1), each offset by L to [0, 2L]."""
    if x.shape != (params.dimension,):
        raise LocalProtocolError(f"x has shape {x.shape}; params.dimension is {params.dimension}")
    encoded = params.quantizer.encode(x, weight=weight, rounding_seed=rounding_seed, rng=rng or OsRandom())
    signed = encoded.view("<i4").astype(np.int64)
    words = np.empty(params.words, dtype=np.int64)
    words[:-1] = signed
    words[-1] = 1
    words += params.level
    if words.min() < 0 or words.max() > 2 * params.level:
        raise LocalProtocolError("a quantized value left [-L, L]; refusing to encrypt it")
    return words


def _pack(params: HEParams, words: npt.NDArray[np.int64], chunk: int) -> list[int]:
    n, k, w = params.slots, params.fields_per_slot, params.field_bits
    block = np.zeros(n * k, dtype=np.int64)
    part = words[chunk * n * k : (chunk + 1) * n * k]
    block[: len(part)] = part
    fields = block.reshape(k, n)
    packed = np.zeros(n, dtype=np.int64)
    for f in range(k):
        packed |= fields[f] << (f * w)
    return list(packed.tolist())


def _pack_all(params: HEParams, words: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """`_pack` of every chunk at once: row c holds chunk c's slot values."""
    n, k, w = params.slots, params.fields_per_slot, params.field_bits
    block = np.zeros(params.chunks * n * k, dtype=np.int64)
    block[: len(words)] = words
    fields = block.reshape(params.chunks, k, n)
    packed = fields[:, 0].copy()
    for f in range(1, k):
        packed |= fields[:, f] << (f * w)
    return packed


def encrypt_update(
    params: HEParams, ctx: Any, x: npt.NDArray[np.floating], *, weight: float, rounding_seed: bytes | None = None,
    rng: SecretSource | None = None,
) -> list[bytes]:  # fmt: skip
    """Quantize one update (both schemes: the same words) and encrypt it, one serialized ciphertext per chunk.

    BFV packs `fields_per_slot` words per slot; CKKS carries one word per slot, as a float. Seeded
    parameters send c0 and the seed of c1 (`SeededEncryptor`). Each ciphertext is read back from SEAL's
    own save of it, in a private temporary directory (memory-backed /dev/shm where it exists): one C++
    call and one zstd pass per chunk instead of a Python call per coefficient. The files hold this
    client's ciphertexts only, which it uploads anyway.
    """
    ts = _ts()
    shape = layout(params)
    words = quantize(params, x, weight=weight, rounding_seed=rounding_seed, rng=rng)
    if params.seeded:
        return _encrypt_seeded(params, SeededEncryptor(params, ctx.seal_context().data, ctx.data.secret_key()), words)
    out = []
    with tempfile.TemporaryDirectory(prefix="he-upload-", dir=_scratch_dir()) as scratch:
        path = os.path.join(scratch, "ciphertext")  # this client's own ciphertexts, read back by `export_chunk`
        if params.scheme == "bfv":
            packed = _pack_all(params, words)
            for c in range(params.chunks):
                out.append(_export.export_chunk(shape, ts.bfv_vector(ctx, packed[c].tolist()), path))
            return out
        step = params.values_per_chunk
        for c in range(params.chunks):
            values = words[c * step : (c + 1) * step].astype(float).tolist()
            out.append(_export.export_chunk(shape, ts.ckks_vector(ctx, values), path))
    return out


def _scratch_dir() -> str | None:
    """Where a client's own ciphertext files go: memory-backed /dev/shm when it exists and is writable."""
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


class SeededEncryptor:
    """Fresh secret-key BFV encryptions saved with the seed of their uniform half (`HEParams.seeded`).

    SEAL's `Encryptor::encrypt_symmetric(plain)` returns a `Serializable<Ciphertext>` whose c1 = a is
    still the seed it was sampled from; `save` writes c0 and that seed only, and SEAL's loader expands
    a again. The seed is SEAL's: each encryption creates a new bootstrap PRNG from the OS CSPRNG
    (`std::random_device`), draws the 64-byte public seed from it, then the noise. The injected
    `SecretSource` cannot reach inside SEAL's sampler (nor could it for the noise of any encryption here);
    instead every seed is checked to be new (`encrypt_update`, `ChunkSum`), because a repeated seed leaks
    m - m' = round(t/q * (c0 - c0')) to whoever holds both ciphertexts.

    TenSEAL's binding saves a `Serializable` only to a file path, zstd-compressed: the file is this
    client's own ciphertext (public once uploaded), in a private temporary directory, read back at once.
    """

    def __init__(self, params: HEParams, seal_context: Any, secret_key: Any) -> None:
        import tenseal.sealapi as sealapi  # type: ignore[import-untyped]

        self.shape = layout(params)
        self._encryptor = sealapi.Encryptor(seal_context, secret_key)
        self._encoder = sealapi.BatchEncoder(seal_context)
        self._plain = sealapi.Plaintext()

    def encrypt(self, slots: list[int], path: str) -> tuple[bytes, bytes]:
        """One chunk's slot values -> (its wire bytes: c0 then the seed, the seed)."""
        self._encoder.encode(slots, self._plain)
        self._encryptor.encrypt_symmetric(self._plain).save(path)
        with open(path, "rb") as file:
            saved = file.read()
        return _export.export_seeded(self.shape, saved)


def _encrypt_seeded(params: HEParams, encryptor: SeededEncryptor, words: npt.NDArray[np.int64]) -> list[bytes]:
    out, seeds = [], set()
    with tempfile.TemporaryDirectory(prefix="he-seeded-", dir=_scratch_dir()) as scratch:
        path = os.path.join(scratch, "ciphertext")
        packed = _pack_all(params, words)
        for c in range(params.chunks):
            chunk, seed = encryptor.encrypt(packed[c].tolist(), path)
            if seed in seeds:
                raise LocalProtocolError(
                    "SEAL drew the same ciphertext seed twice: its random source is broken; nothing is sent"
                )
            seeds.add(seed)
            out.append(chunk)
    return out


class ChunkSum:
    """A running homomorphic sum of checked uploads (the key holder's own sum; one upload parsed at a time)."""

    def __init__(self, params: HEParams, ctx: Any) -> None:
        self.params, self.ctx = params, ctx
        self._acc: list[Any] = [None] * params.chunks
        self._seeds: set[bytes] = set()
        self.count = 0

    def add(self, chunks: Sequence[bytes], *, sender: int) -> None:
        """Add one upload; a malformed one raises a typed error and nothing is added."""
        if len(chunks) != self.params.chunks:
            raise RemoteProtocolError(
                f"{len(chunks)} chunks; expected {self.params.chunks}", field="chunks", peer_id=sender
            )
        parsed = [load_chunk(self.params, self.ctx, c, i, field="chunks", peer_id=sender) for i, c in enumerate(chunks)]
        if self.params.seeded:  # no seed may repeat within or across the uploads summed (see `SeededEncryptor`)
            shape, seen = layout(self.params), set(self._seeds)
            for i, chunk in enumerate(chunks):
                _check_seed(seen, chunk[shape.chunk_bytes - SEED_BYTES :], field=f"chunks[{i}]", peer_id=sender)
            self._seeds = seen
        for i, vector in enumerate(parsed):
            if self._acc[i] is None:
                self._acc[i] = vector
            else:
                self._acc[i].add_(vector)
        self.count += 1

    def vectors(self) -> list[Any]:
        """The summed chunks as TenSEAL vectors of the local context."""
        if self.count == 0:
            raise LocalProtocolError("no valid sum: no contribution was added")
        return list(self._acc)


def decrypt_words(params: HEParams, vectors: Sequence[Any]) -> npt.NDArray[np.int64]:
    """Decrypt a summed BFV update (vectors of a keyed local context) to its field sums, read modulo t.

    Raises:
        RemoteProtocolError: a slot exceeds its fields.
    """
    if len(vectors) != params.chunks:
        raise LocalProtocolError(f"aggregate has {len(vectors)} chunks; expected {params.chunks}")
    slots = [np.asarray(v.decrypt(), dtype=np.int64) for v in vectors]
    k, w, t = params.fields_per_slot, params.field_bits, params.plain_modulus
    mask = (1 << w) - 1
    words = []
    for packed in slots:
        packed = np.mod(packed, t)  # TenSEAL returns centred residues
        if packed.max() >= 1 << (k * w):
            raise RemoteProtocolError(
                "a decrypted slot exceeds its fields: the aggregate is not a valid sum", field="chunks"
            )
        words.append(np.stack([(packed >> (f * w)) & mask for f in range(k)]).reshape(-1))
    return np.concatenate(words)[: params.words]


def decode_words(params: HEParams, words: npt.NDArray[np.int64]) -> DecodedSum:
    """Decode BFV field sums; checks the counter and every field against a sum of valid contributions.

    Raises:
        RemoteProtocolError: an inconsistent counter or a field out of range.
    """
    if words.shape != (params.words,):
        raise RemoteProtocolError(f"aggregate has {words.shape} words; expected {params.words}", field="chunks")
    level = params.level
    count, remainder = divmod(int(words[-1]), level + 1)
    if remainder or count < 1 or count > params.max_parties:
        raise RemoteProtocolError("the decrypted contribution counter is inconsistent", field="chunks")
    signed = words[:-1] - count * level
    if np.abs(signed).max() > count * level:
        raise RemoteProtocolError(
            "a decrypted field is outside the range of a sum of valid contributions", field="chunks"
        )
    quantizer = params.quantizer
    return DecodedSum(
        weighted_sum=signed[:-1].astype(np.float64) / quantizer.scale,
        total_weight=float(signed[-1]) / quantizer.weight_scale,
        num_inputs=count,
        max_abs_error=count / quantizer.scale,
    )


def decrypt_ckks_values(params: HEParams, vectors: Sequence[Any]) -> npt.NDArray[np.float64]:
    """The raw CKKS decryption of a summed update: integer sums plus the scheme's error (SECRET-dependent).

    Never release these values: the error is a function of the secret key (Li-Micciancio). Release only
    `round_ckks` of them.
    """
    if len(vectors) != params.chunks:
        raise LocalProtocolError(f"aggregate has {len(vectors)} chunks; expected {params.chunks}")
    raw = np.concatenate([np.asarray(v.decrypt(), dtype=np.float64) for v in vectors])
    if raw.shape != (params.words,):
        raise RemoteProtocolError(
            f"aggregate decrypts to {raw.shape[0]} values; expected {params.words}", field="chunks"
        )
    return raw


def round_ckks(params: HEParams, raw: npt.NDArray[np.float64], *, tolerance: float) -> npt.NDArray[np.int64]:
    """The exact integer sums of a CKKS decryption, or an error: every value must be within `tolerance` of one.

    An honest sum of at most max_parties uploads errs by at most `params.ckks_error_bound` <= tolerance
    (checked when the parameters were built), far below 1/2, so the nearest integer is the exact sum and
    the released words depend on the inputs only. A value farther from an integer, or outside [0, 2^32),
    comes from a crafted upload (large noise, a value between integers): rounding it would release a
    function of the decryption error, i.e. of the key, so it is refused instead.

    Raises:
        RemoteProtocolError: a value is off-integer by more than `tolerance`, not finite, or out of range.
    """
    if not np.isfinite(raw).all():
        raise RemoteProtocolError("the CKKS aggregate decrypts to a value that is not finite", field="chunks")
    nearest = np.rint(raw)
    off = float(np.abs(raw - nearest).max()) if raw.size else 0.0
    if off > tolerance:
        raise RemoteProtocolError(
            f"the CKKS aggregate is {off:.3g} away from an integer sum (tolerance {tolerance:.3g}): an upload was "
            "not a valid encryption of quantized integers; nothing is rounded or released",
            field="chunks",
        )
    if nearest.min() < 0 or nearest.max() >= 1 << 32:
        raise RemoteProtocolError(
            "a decrypted CKKS value is outside the range of a sum of valid contributions", field="chunks"
        )
    return nearest.astype(np.int64)


def decrypt_ckks(params: HEParams, vectors: Sequence[Any]) -> DecodedSum:
    """Decrypt a CKKS sum to the exact integer sums (`round_ckks` at `params.ckks_tolerance`) and decode them."""
    raw = decrypt_ckks_values(params, vectors)
    return decode_words(params, round_ckks(params, raw, tolerance=params.ckks_tolerance))


def self_test(ctx: Any, params: HEParams) -> None:
    """Encrypt the largest field values, add them max_parties times and check the exact sum.

    For CKKS: the sum must round to the exact integer within `params.ckks_tolerance` (the same check
    as a real aggregate's).

    Raises:
        LocalProtocolError: the sum does not decrypt exactly (noise budget, field overflow, CKKS error).
    """
    ts = _ts()
    if params.scheme == "ckks":
        top = 2 * params.level
        vector = ts.ckks_vector(ctx, [float(top)] * 64)
        summed = vector.copy()
        for _ in range(params.max_parties - 1):
            summed.add_(vector)
        raw = np.asarray(summed.decrypt(), dtype=np.float64)
        try:
            exact = round_ckks(params, raw, tolerance=params.ckks_tolerance)
        except RemoteProtocolError as exc:
            raise LocalProtocolError(f"HE self-test failed: {exc}") from None
        if (exact != params.max_parties * top).any():
            raise LocalProtocolError("HE self-test failed: a CKKS sum of max_parties ciphertexts is not exact")
        return
    k, w = params.fields_per_slot, params.field_bits
    top = 2 * params.level
    packed = sum(top << (f * w) for f in range(k))
    values = [packed] * 64
    one = ts.bfv_vector(ctx, values)
    total = one.copy()
    for _ in range(params.max_parties - 1):
        total.add_(one)
    expected = sum((params.max_parties * top) << (f * w) for f in range(k))
    got = [v % params.plain_modulus for v in total.decrypt()]
    if got != [expected] * 64:
        raise LocalProtocolError("HE self-test failed: a sum of max_parties ciphertexts does not decrypt exactly")
