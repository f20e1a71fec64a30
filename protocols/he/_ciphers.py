"""The TenSEAL layer: contexts, packing, chunked encryption, summation and decryption.

Everything that touches TenSEAL lives here, behind functions on bytes and numpy arrays, so that the
session state machines stay small and TenSEAL is imported only when HE is used. Updates are
processed one ciphertext at a time: the client encrypts and serializes chunk by chunk, and the
server deserializes one chunk of one upload, adds it into its running sum and drops it, so peak
memory does not grow with the number of clients.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from ..encoding import DecodedSum
from ..errors import IntegrityError, LocalProtocolError, RemoteProtocolError
from ..randomness import OsRandom, SecretSource
from ._params import HEParams

__all__ = [
    "ChunkSum",
    "decode_words",
    "decrypt_ckks",
    "decrypt_words",
    "encrypt_update",
    "load_public_context",
    "load_secret_context",
    "make_context",
    "public_context_bytes",
    "quantize",
    "secret_context_bytes",
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


def secret_context_bytes(ctx: Any) -> bytes:
    """The context with its secret key (for the other clients only, sent encrypted)."""
    data: bytes = ctx.serialize(
        save_public_key=True, save_secret_key=True, save_galois_keys=False, save_relin_keys=False
    )
    return data


def public_context_bytes(ctx: Any, params: HEParams) -> bytes:
    """The context for the server: no secret key (and a public key only in public-key mode)."""
    data: bytes = ctx.serialize(
        save_public_key=params.mode == "public-key",
        save_secret_key=False,
        save_galois_keys=False,
        save_relin_keys=False,
    )
    return data


def load_public_context(data: bytes) -> Any:
    """Load the server's context, refusing one that carries a secret key."""
    try:
        ctx = _ts().context_from(data)
    except Exception as exc:
        raise RemoteProtocolError("public HE context does not parse", field="public_context") from exc
    if ctx.is_private():
        raise RemoteProtocolError("the server was sent a context holding the secret key", field="public_context")
    return ctx


def load_secret_context(data: bytes, params: HEParams) -> Any:
    """Load the delivered secret context and run the self-test on it."""
    try:
        ctx = _ts().context_from(data)
    except Exception as exc:
        raise RemoteProtocolError("delivered HE context does not parse", field="secret_context") from exc
    if not ctx.is_private():
        raise RemoteProtocolError("delivered HE context holds no secret key", field="secret_context")
    self_test(ctx, params)
    return ctx


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


def encrypt_update(
    params: HEParams, ctx: Any, x: npt.NDArray[np.floating], *, weight: float, rounding_seed: bytes | None = None,
    rng: SecretSource | None = None,
) -> list[bytes]:  # fmt: skip
    """Quantize (bfv) or weight (ckks) one update and encrypt it, one serialized ciphertext per chunk."""
    ts = _ts()
    out = []
    if params.scheme == "bfv":
        words = quantize(params, x, weight=weight, rounding_seed=rounding_seed, rng=rng)
        for c in range(params.chunks):
            out.append(ts.bfv_vector(ctx, _pack(params, words, c)).serialize())
        return out
    if not np.isfinite(x).all():
        raise LocalProtocolError("x contains NaN or infinity; fix the update before encrypting")
    values = np.empty(params.words, dtype=np.float64)
    values[:-2] = np.clip(x, -params.clip_range, params.clip_range) * weight
    values[-2], values[-1] = weight, 1.0
    step = params.values_per_chunk
    for c in range(params.chunks):
        out.append(ts.ckks_vector(ctx, values[c * step : (c + 1) * step].tolist()).serialize())
    return out


class ChunkSum:
    """The server's running sum of ciphertext chunks (one chunk in memory per upload at a time)."""

    def __init__(self, params: HEParams, public_ctx: Any) -> None:
        self.params, self.ctx = params, public_ctx
        self._acc: list[Any] = [None] * params.chunks
        self._broken = False
        self.count = 0

    def add(self, chunks: Sequence[bytes], *, sender: int) -> None:
        """Add one upload; a chunk that does not parse raises IntegrityError and nothing is added."""
        ts = _ts()
        load = ts.bfv_vector_from if self.params.scheme == "bfv" else ts.ckks_vector_from
        if self._broken:
            raise LocalProtocolError("the running sum was corrupted by a failed addition; abort the round")
        if len(chunks) != self.params.chunks:
            raise RemoteProtocolError(f"{len(chunks)} chunks; expected {self.params.chunks}", field="chunks")
        parsed = []
        for i, chunk in enumerate(chunks):  # parse and size-check all first: a bad upload changes nothing
            try:
                vector = load(self.ctx, chunk)
            except Exception as exc:
                raise IntegrityError(peer_id=sender) from exc
            if vector.size() != self._size(i):
                raise RemoteProtocolError(f"chunk {i} holds {vector.size()} values", field="chunks", peer_id=sender)
            parsed.append(vector)
        try:
            for i, vector in enumerate(parsed):
                if self._acc[i] is None:
                    self._acc[i] = vector
                else:
                    self._acc[i].add_(vector)
        except Exception as exc:
            self._broken = True
            raise IntegrityError(peer_id=sender) from exc
        self.count += 1

    def _size(self, chunk: int) -> int:
        if self.params.scheme == "bfv":
            return self.params.slots  # packed chunks are padded to full slots
        return min(self.params.slots, self.params.words - chunk * self.params.slots)

    def serialize(self) -> list[bytes]:
        """The summed chunks."""
        if self.count == 0 or self._broken:
            raise LocalProtocolError("no valid sum: no contribution, or a failed addition")
        return [v.serialize() for v in self._acc]


def decrypt_words(params: HEParams, ctx: Any, chunks: Sequence[bytes]) -> npt.NDArray[np.int64]:
    """Decrypt a summed BFV update to its field sums (d values, weight, counter), read modulo t.

    Raises:
        RemoteProtocolError: the chunks do not parse, or a slot exceeds its fields.
    """
    ts = _ts()
    if len(chunks) != params.chunks:
        raise RemoteProtocolError(f"aggregate has {len(chunks)} chunks; expected {params.chunks}", field="chunks")
    try:
        slots = [np.asarray(ts.bfv_vector_from(ctx, c).decrypt(), dtype=np.int64) for c in chunks]
    except Exception as exc:
        raise RemoteProtocolError("aggregate ciphertext does not parse or decrypt", field="chunks") from exc
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


def decrypt_ckks(params: HEParams, ctx: Any, chunks: Sequence[bytes]) -> DecodedSum:
    """Decrypt a CKKS sum (approximate; for key holders only, never for the server)."""
    ts = _ts()
    if len(chunks) != params.chunks:
        raise RemoteProtocolError(f"aggregate has {len(chunks)} chunks; expected {params.chunks}", field="chunks")
    try:
        flat = np.concatenate([np.asarray(ts.ckks_vector_from(ctx, c).decrypt()) for c in chunks])[: params.words]
    except Exception as exc:
        raise RemoteProtocolError("aggregate ciphertext does not parse or decrypt", field="chunks") from exc
    count = round(float(flat[-1]))
    return DecodedSum(
        weighted_sum=flat[:-2].astype(np.float64),
        total_weight=float(flat[-2]),
        num_inputs=count,
        max_abs_error=params.max_abs_error,
    )


def self_test(ctx: Any, params: HEParams) -> None:
    """Encrypt the largest field values, add them max_parties times and check the exact sum.

    Raises:
        LocalProtocolError: the sum does not decrypt exactly (noise budget or field overflow).
    """
    ts = _ts()
    if params.scheme != "bfv":
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
