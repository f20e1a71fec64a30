"""Issue 17: the SecAgg client encodes and masks its input in one pass, without a defensive copy.

`set_input` checks the update and fixes its rounding seed but keeps only a reference; the share
bundle encodes it a cache-sized chunk at a time straight into the message buffer and adds the k + 1
masks while each chunk is in cache (`MaskAccumulator.fill` + `ChunkEncoder`). These tests pin:

* the fused words against the separate oracle: `encode` / `encode_ring` plus (minus) the masks of
  `expand_mask`, for float and ring inputs, weights, and lengths that are not a multiple of the chunk;
* the encoding against today's formula written out here (the oracle), on adversarial values, and
  why the integer "ceil" shortcut proposed for it is not the same format;
* the no-copy contract (the masked input encodes x as it is at the bundle; NaN is refused at
  set_input, and at the bundle if x changed);
* `export_state(include_input=False)` and `from_state(..., input=x)`: the identical masked input as an
  uninterrupted session, and typed errors for a missing, mismatched or tampered input.
"""

from __future__ import annotations

import struct

import numpy as np
import numpy.typing as npt
import pytest
from secagg_harness import HandRound, bundle_close, semi_honest_params

from protocols import (
    DecodeError,
    FixedPointEncoding,
    LocalProtocolError,
    SecAggClient,
    SecAggParams,
)
from protocols.encoding import ChunkEncoder
from protocols.primitives.prg import CHUNK_WORDS, MaskAccumulator, expand_mask, ring_dtype
from protocols.randomness import DeterministicRandom
from protocols.secagg import SecAggFamily, decode_message, encode_message
from protocols.secagg._client import ClientState
from protocols.secagg._client_state import _PENDING
from protocols.secagg._messages import MaskedInput

SEEDS = [DeterministicRandom(b"fused/%d" % i).token_bytes(32) for i in range(5)]


def _oracle_masked(
    enc: FixedPointEncoding,
    x: npt.NDArray[np.generic],
    weight: float,
    seed: bytes,
    plus: list[bytes],
    minus: list[bytes],
) -> npt.NDArray[np.unsignedinteger]:
    out = enc.encode_input(x, weight=weight, rounding_seed=seed)  # type: ignore[arg-type]
    for s in plus:
        out += expand_mask(s, out.shape[0], enc.ring_bits)
    for s in minus:
        out -= expand_mask(s, out.shape[0], enc.ring_bits)
    return out


def _fused(
    enc: FixedPointEncoding,
    x: npt.NDArray[np.generic],
    weight: float,
    seed: bytes,
    plus: list[bytes],
    minus: list[bytes],
    chunk_words: int,
) -> npt.NDArray[np.unsignedinteger]:
    pending = enc.prepare(x, weight=weight, rounding_seed=seed)  # type: ignore[arg-type]
    out = np.full(pending.length, 0xABCD, dtype=ring_dtype(enc.ring_bits))  # garbage: must be overwritten
    encoder = ChunkEncoder(enc, pending, chunk_words=chunk_words)
    MaskAccumulator(enc.ring_bits, chunk_words).fill(out, encoder.fill, plus=plus, minus=minus)
    return out


@pytest.mark.parametrize("ring_bits", [16, 32, 64])
@pytest.mark.parametrize(("chunk_words", "d"), [(7, 20), (64, 1000), (CHUNK_WORDS, CHUNK_WORDS + 5)])
@pytest.mark.parametrize("kind", ["float64", "float32", "int64", "uint8"])
def test_fused_pass_equals_encode_plus_expand_mask(ring_bits: int, chunk_words: int, d: int, kind: str) -> None:
    enc = FixedPointEncoding(clip_range=2.0, max_parties=10, ring_bits=ring_bits, max_weight=3.0)
    gen = np.random.default_rng(d + ring_bits)
    if kind.startswith("float"):
        x: npt.NDArray[np.generic] = gen.uniform(-3, 3, d).astype(kind)
    else:
        x = gen.integers(np.iinfo(kind).min, np.iinfo(kind).max, d, dtype=kind, endpoint=True)
    for weight, plus, minus in ((2.5, SEEDS[:3], SEEDS[3:]), (1.0, SEEDS[:1], []), (0.3, [], SEEDS)):
        expected = _oracle_masked(enc, x, weight, SEEDS[4], plus, minus)
        got = _fused(enc, x, weight, SEEDS[4], plus, minus, chunk_words)
        assert np.array_equal(got, expected), (kind, weight)


def test_fused_control_a_chunk_the_encoder_skips_is_caught() -> None:
    """Weakened control: an encoder that leaves one chunk unwritten does not match the oracle."""
    enc = FixedPointEncoding(clip_range=2.0, max_parties=10)
    x = np.random.default_rng(1).uniform(-2, 2, 50)
    pending = enc.prepare(x, rounding_seed=SEEDS[0])
    out = np.zeros(pending.length, dtype=np.uint32)
    encoder = ChunkEncoder(enc, pending, chunk_words=16)

    def lossy(chunk: npt.NDArray[np.unsignedinteger], start: int) -> None:
        encoder.fill(chunk, start)
        if start == 16:
            chunk[:] = 0

    MaskAccumulator(32, 16).fill(out, lossy, plus=SEEDS[1:2])
    assert not np.array_equal(out, _oracle_masked(enc, x, 1.0, SEEDS[0], SEEDS[1:2], []))


# -- the rounding formula: today's, written out as the oracle ----------------------------------------------------


def _oracle_words(y: npt.NDArray[np.float64], u_words: npt.NDArray[np.uint32]) -> npt.NDArray[np.int64]:
    """Today's format: q = floor(y) + [U * 2^-32 < y - floor(y)], every step in float64."""
    f = np.floor(y)
    frac = y - f
    return (f + (u_words.astype(np.float64) * 2.0**-32 < frac)).astype(np.int64)


def _ceil_shortcut(y: npt.NDArray[np.float64], u_words: npt.NDArray[np.uint32]) -> npt.NDArray[np.int64]:
    """The proposed integer form: (ceil(y * 2^32) + 2^32 - 1 - U) >> 32 (exact real rounding)."""
    s = np.ceil(y * 2.0**32).astype(np.int64) + (np.int64(2**32 - 1) - u_words.astype(np.int64))
    return s >> 32


def _old_encode(
    enc: FixedPointEncoding, x: npt.NDArray[np.floating], weight: float, seed: bytes
) -> npt.NDArray[np.uint32]:
    """`encode` as it was before issue 17 (one pass over the whole vector), kept as this test's oracle.

    One change, for float32 / float16 inputs only: the product x * factor is taken in float64. Before,
    numpy took it in the input's precision (a float32 update lost up to a few ring units before the
    stochastic rounding; float16 overflowed to inf and encoded garbage words).
    """
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    d = x.shape[0]
    stream = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor().update(bytes(4 * d + 4))
    words = np.frombuffer(stream, dtype="<u4")
    factor = weight * enc.scale
    bound = min(float(enc.level), enc.clip_range * factor)
    with np.errstate(over="ignore"):
        y = x.astype(np.float64) * factor
    np.clip(y, -bound, bound, out=y)
    out = np.empty(d + 1, dtype=np.uint32)
    out.view(np.int32)[:d] = _oracle_words(y, words[:d])
    out.view(np.int32)[d] = enc._weight_word(weight, int(words[d]))
    return out


def _adversarial(enc: FixedPointEncoding, factor: float) -> npt.NDArray[np.float64]:
    """Values whose scaled images sit on, or one ulp around, integers, half-integers, 0 and the bound."""
    ys = [0.0, -0.0, 1.0, -1.0, 0.5, -0.5, 2.5, -2.5, 123456.0, -7.0, float(enc.level), -float(enc.level)]
    ys += [
        np.nextafter(v, t) for v in (0.0, 1.0, -1.0, 0.5, -0.5, 123456.0, float(enc.level)) for t in (-np.inf, np.inf)
    ]
    ys += [-(2.0**-32 - 2.0**-60), -(2.0**-32), -(2.0**-33), -0.3, -0.25, -1e-300, 1e-300, 5e-324, -5e-324]
    xs = np.array(ys) / factor
    return np.concatenate([xs, xs * 1e6, [enc.clip_range, -enc.clip_range, 2 * enc.clip_range, -1e300, 1e300]])


@pytest.mark.parametrize("weight", [1.0, 0.37, 1e-3])
@pytest.mark.parametrize("dtype", ["float64", "float32", "float16"])
def test_encode_is_bit_identical_to_the_formula_before_issue_17(weight: float, dtype: str) -> None:
    enc = FixedPointEncoding(clip_range=7e-3, max_parties=100)
    x = _adversarial(enc, weight * enc.scale)
    with np.errstate(over="ignore"):
        x = np.concatenate([x, np.random.default_rng(3).normal(0, 3e-3, 5000)]).astype(dtype)
    x = x[np.isfinite(x)]
    for i in range(4):
        seed = DeterministicRandom(b"adv/%d" % i).token_bytes(32)
        expected = _old_encode(enc, x, weight, seed)
        assert np.array_equal(enc.encode(x, weight=weight, rounding_seed=seed), expected)
        assert np.array_equal(_fused(enc, x, weight, seed, [], [], 64), expected)


def test_float32_and_float16_inputs_are_encoded_as_their_float64_values() -> None:
    """The bug the oracle's one change fixes: a float16 update encoded garbage, a float32 one lost precision."""
    enc = FixedPointEncoding(clip_range=7e-3, max_parties=100)
    x = np.random.default_rng(4).normal(0, 2e-3, 3000)
    for dtype in (np.float32, np.float16):
        low = x.astype(dtype)
        words = enc.encode(low, rounding_seed=SEEDS[0])
        assert np.array_equal(words, enc.encode(low.astype(np.float64), rounding_seed=SEEDS[0]))
        decoded = enc.decode(words, num_inputs=1).weighted_sum
        assert np.abs(decoded - np.clip(low.astype(np.float64), -7e-3, 7e-3)).max() <= 1 / enc.scale
    # control: the product in float32, as numpy takes it by default, is off by ring units
    low = x.astype(np.float32)
    in_float32 = np.empty(low.shape)
    np.multiply(low, enc.scale, out=in_float32)
    assert np.abs(in_float32 - low.astype(np.float64) * enc.scale).max() > 0.5


def test_the_ceil_shortcut_is_not_the_format_for_small_negative_values() -> None:
    """Why encode keeps the float compare: for -1/2 < y < 0, today's y - floor(y) = y + 1 rounds to
    the 2^-53 grid, and the exact integer form disagrees with it when U sits on the rounded boundary.
    Everywhere else (checked on a grid of adversarial values and every boundary word) the two agree."""
    y = np.array([-(2.0**-32 - 2.0**-60)])
    u = np.array([2**32 - 1], dtype=np.uint32)
    assert _oracle_words(y, u)[0] == -1  # y + 1 rounds to 1 - 2^-32 = u: not below it
    assert _ceil_shortcut(y, u)[0] == 0  # exactly, u < y + 1
    enc = FixedPointEncoding(clip_range=7e-3, max_parties=100)
    ys = _adversarial(enc, 1.0)
    ys = ys[(np.abs(ys) <= enc.level) & ~((ys > -0.5) & (ys < 0))]
    words = np.array([0, 1, 2**31 - 1, 2**31, 2**32 - 2, 2**32 - 1], dtype=np.uint32)
    for w in words:
        u_all = np.full(ys.shape, w, dtype=np.uint32)
        assert np.array_equal(_oracle_words(ys, u_all), _ceil_shortcut(ys, u_all)), int(w)


def _fractions_on_the_edge() -> npt.NDArray[np.float64]:
    """Fractions y - floor(y) at and one ulp around every k * 2^-32 a boundary word can hit, subnormals,
    0 and 1, and the rounded fractions of -1/2 < y < 0 (y + 1 on the 2^-53 grid)."""
    ks = np.array([0, 1, 2, 3, 2**16, 2**31 - 1, 2**31, 2**31 + 1, 2**32 - 2, 2**32 - 1, 2**32], dtype=np.float64)
    grid = ks * 2.0**-32
    edges = [grid, np.nextafter(grid, -np.inf), np.nextafter(grid, np.inf)]
    tiny = np.array([5e-324, 1e-320, 2.0**-1022, 1e-300, 2.0**-33, 2.0**-32 - 2.0**-60, 1 - 2.0**-53, 0.5, 0.3])
    ys = np.array([-(2.0**-32 - 2.0**-60), -(2.0**-32), -(2.0**-33), -1e-300, -5e-324, -0.3, -(2.0**-54), -0.25])
    f = np.concatenate([*edges, tiny, ys - np.floor(ys), np.random.default_rng(8).random(2000)])
    return f[(f >= 0) & (f <= 1)]


def test_the_integer_compare_is_the_float_compare_of_the_format() -> None:
    """The encoder tests U < frac * 2^32 instead of U * 2^-32 < frac: the same predicate for every
    32-bit word U and every fraction in [0, 1] (both scalings are exact and monotone), checked here on
    the words and fractions where a rounding would show."""
    frac = _fractions_on_the_edge()
    words = np.array([0, 1, 2, 3, 2**16, 2**31 - 1, 2**31, 2**31 + 1, 2**32 - 3, 2**32 - 2, 2**32 - 1], dtype=np.uint32)
    words = np.concatenate([words, np.random.default_rng(9).integers(0, 2**32, 500, dtype=np.uint32)])
    u, f = np.meshgrid(words, frac, indexing="ij")
    scaled = f * 2.0**32
    assert np.array_equal(u * 2.0**-32 < f, np.less(u, scaled))
    assert (u * 2.0**-32 < f).any() and not (u * 2.0**-32 < f).all()
    # weakened control: a scale that is not a power of two (or a compare in float32) is another predicate
    assert not np.array_equal(u * 2.0**-32 < f, u / (2.0**32 - 1) < f)
    assert not np.array_equal(u * 2.0**-32 < f, np.less(u.astype(np.float32), scaled.astype(np.float32)))


def test_the_encoder_matches_the_format_formula_chunk_by_chunk_on_edge_values() -> None:
    """Adversarial y (fractions on the word grid, small negatives) through ChunkEncoder, in several
    chunkings, against the formula with the same rounding words."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    enc = FixedPointEncoding(clip_range=7e-3, max_parties=100)
    ys = np.concatenate([_fractions_on_the_edge() + k for k in (-3.0, -1.0, 0.0, 5.0)])
    ys = np.concatenate([ys, -_fractions_on_the_edge(), _adversarial(enc, 1.0)])
    ys = np.clip(ys, -enc.level, enc.level)
    x = ys / enc.scale
    seed = SEEDS[3]
    words = np.frombuffer(
        Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor().update(bytes(4 * x.shape[0] + 4)), dtype="<u4"
    )
    y = np.clip(x * enc.scale, -enc.level, enc.level)
    expected = _oracle_words(y, words[:-1]).astype(np.int32)
    for chunk in (7, 1000, CHUNK_WORDS):
        encoder = ChunkEncoder(enc, enc.prepare(x, rounding_seed=seed), chunk_words=chunk)
        out = np.empty(x.shape[0] + 1, dtype=np.uint32)
        for start in range(0, out.shape[0], chunk):
            encoder.fill(out[start : start + chunk], start)
        assert np.array_equal(out.view(np.int32)[:-1], expected), chunk


# -- the client: no copy, checked at set_input ------------------------------------------------------------------


def _toss_free_params(d: int = 40, **kw: object) -> SecAggParams:
    return semi_honest_params(5, dimension=d, **kw)


def _at_bundle(params: SecAggParams, seed: int, inputs: list[npt.NDArray[np.generic]] | None = None) -> HandRound:
    hand = HandRound(params, seed=seed, inputs=inputs)  # type: ignore[arg-type]
    hand.advance(bundle_close(params))
    return hand


def test_nan_is_refused_at_set_input_naming_x() -> None:
    client = SecAggFamily(_toss_free_params()).client(0, session=bytes(16), round_number=0)
    for bad in (np.nan, np.inf, -np.inf):
        x = np.zeros(40)
        x[17] = bad
        with pytest.raises(LocalProtocolError, match=r"^x contains NaN or infinity"):
            client.set_input(x)
    huge = np.full(40, 1e308)  # finite, though its sum overflows: accepted
    client.set_input(huge)


def test_x_made_nan_after_set_input_is_refused_at_the_bundle_and_nothing_changes() -> None:
    params = _toss_free_params()
    hand = _at_bundle(params, seed=5)
    hand.inputs[0][3] = np.nan  # the host broke the contract
    before = hand.clients[0].export_state()
    with pytest.raises(LocalProtocolError, match="NaN"):
        hand.clients[0].handle(hand.pending[0])
    assert hand.clients[0].state is ClientState.SHARED and hand.clients[0].export_state() == before
    hand.inputs[0][3] = 0.0  # fixed: the same bundle is accepted now
    assert isinstance(hand.clients[0].handle(hand.pending[0]), MaskedInput)


def test_masked_input_is_a_read_only_view_and_decodes_without_a_copy() -> None:
    params = _toss_free_params()
    hand = _at_bundle(params, seed=6)
    masked = hand.clients[0].handle(hand.pending[0])
    assert isinstance(masked, MaskedInput) and isinstance(masked.data, memoryview)
    assert masked.data.readonly and not masked.vector().flags.writeable
    wire = encode_message(masked)
    decoded = decode_message(wire)
    assert isinstance(decoded, MaskedInput) and decoded == masked
    assert isinstance(decoded.data, memoryview) and decoded.data.obj is wire  # a view into the wire bytes
    assert not decoded.vector().flags.writeable
    from_bytearray = decode_message(bytearray(wire))  # a mutable buffer is copied once, never aliased
    assert isinstance(from_bytearray, MaskedInput) and from_bytearray.data.obj is not wire  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="bytes, bytearray or memoryview"):
        MaskedInput(session=bytes(16), round=0, sender=0, ring_bits=32, data="abcd")  # type: ignore[arg-type]


# -- export_state(include_input=False) / from_state(..., input=x) -------------------------------------------------


def _restore(params: SecAggParams, blob: bytes, **kw: object) -> SecAggClient:
    return SecAggFamily(params).restore_client(blob, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["float64", "float32", "int32"])
def test_state_without_input_restored_with_it_gives_the_identical_masked_input(kind: str) -> None:
    params = _toss_free_params(d=CHUNK_WORDS + 3)
    gen = np.random.default_rng(9)
    if kind == "int32":
        inputs: list[npt.NDArray[np.generic]] = [
            gen.integers(-1000, 1000, params.dimension, dtype=np.int32) for _ in range(5)
        ]
    else:
        inputs = [gen.uniform(-1, 1, params.dimension).astype(kind) for _ in range(5)]
    hand = _at_bundle(params, seed=11, inputs=inputs)
    client, bundle = hand.clients[0], hand.pending[0]
    slim = client.export_state(include_input=False)
    full = client.export_state()
    assert len(full) - len(slim) == params.dimension * inputs[0].dtype.itemsize  # only the values are left out
    uninterrupted = client.handle(bundle)
    restored = _restore(params, slim, input=inputs[0], min_stage=ClientState.SHARED).handle(bundle)
    from_full = _restore(params, full).handle(bundle)
    assert isinstance(uninterrupted, MaskedInput)
    assert restored == uninterrupted and from_full == uninterrupted


def test_state_without_input_refuses_a_missing_or_mismatched_input() -> None:
    params = _toss_free_params()
    hand = _at_bundle(params, seed=12)
    x = hand.inputs[0]
    slim = hand.clients[0].export_state(include_input=False)
    full = hand.clients[0].export_state()
    with pytest.raises(LocalProtocolError, match=r"^input: .*include_input=False"):
        _restore(params, slim)
    with pytest.raises(LocalProtocolError, match=r"^input has shape .* dtype float32"):
        _restore(params, slim, input=x.astype(np.float32))
    with pytest.raises(LocalProtocolError, match=r"^input has shape \(39,\)"):
        _restore(params, slim, input=x[:-1])
    with pytest.raises(LocalProtocolError, match=r"^input has shape .* dtype int64"):
        _restore(params, slim, input=x.astype(np.int64))
    bad = x.copy()
    bad[0] = np.nan
    with pytest.raises(LocalProtocolError, match=r"^input: x contains NaN"):
        _restore(params, slim, input=bad)
    with pytest.raises(LocalProtocolError, match="differs from the update this state holds"):
        _restore(params, full, input=x + 1)
    assert _restore(params, full, input=x.copy()).stage is ClientState.SHARED  # the same values: accepted
    # MASKED and later hold no input: one passed along is not needed and is ignored
    hand.clients[0].handle(hand.pending[0])
    assert _restore(params, hand.clients[0].export_state(), input=x).stage is ClientState.MASKED


def test_control_the_dtype_check_guards_a_silent_change_of_the_masked_input() -> None:
    """Weakened control: the same values in float32 encode to other words, so a restore that accepted
    another dtype would send a different input than the one the host set."""
    enc = _toss_free_params().encoding
    x = np.random.default_rng(2).uniform(-1, 1, 40)
    assert not np.array_equal(
        enc.encode(x, rounding_seed=SEEDS[0]), enc.encode(x.astype(np.float32), rounding_seed=SEEDS[0])
    )


def test_input_given_for_a_blob_with_no_pending_input_is_refused() -> None:
    params = _toss_free_params()
    client = SecAggFamily(params).client(0, session=bytes(16), round_number=0)
    client.advertise_keys()  # no set_input yet
    with pytest.raises(LocalProtocolError, match=r"^input was given"):
        _restore(params, client.export_state(include_input=False), input=np.zeros(40))
    assert _restore(params, client.export_state(include_input=False)).stage is ClientState.ADVERTISED


def _records(blob: bytes) -> list[tuple[int, int, int]]:
    """(record id, offset of its value, length) of a client state blob."""
    pos, out = struct.calcsize("<BBI16sQ32s"), []
    while pos < len(blob):
        fid, length = struct.unpack_from("<BI", blob, pos)
        out.append((fid, pos + 5, length))
        pos += 5 + length
    return out


def test_tampered_or_rolled_back_input_record_is_refused() -> None:
    params = _toss_free_params()
    hand = _at_bundle(params, seed=13)
    x = hand.inputs[0]
    slim = hand.clients[0].export_state(include_input=False)
    full = hand.clients[0].export_state()
    _, at, _length = next(r for r in _records(slim) if r[0] == 11)
    for offset, raw in ((0, b"|O\0\0\0\0\0\0"), (0, b">f8\0\0\0\0\0"), (8, struct.pack("<Q", 41)), (24, b"\x02")):
        with pytest.raises(DecodeError):
            _restore(params, slim[: at + offset] + raw + slim[at + offset + len(raw) :], input=x)
    # another (valid) dtype in the record: the host's array no longer matches it, and that is caught
    with pytest.raises(LocalProtocolError, match=r"dtype float64; the state was exported with .* dtype float32"):
        _restore(params, slim[:at] + b"<f4\0\0\0\0\0" + slim[at + 8 :], input=x)
    # the flag says "data follows" but none does, or data but the flag says none: sizes disagree
    flag_at = at + 24
    with pytest.raises(DecodeError):
        _restore(params, slim[:flag_at] + b"\x01" + slim[flag_at + 1 :], input=x)
    _, full_at, _ = next(r for r in _records(full) if r[0] == 11)
    with pytest.raises(DecodeError):
        _restore(params, full[: full_at + 24] + b"\x00" + full[full_at + 25 :])
    nan_at = full_at + _PENDING.size  # the first value, made NaN in the blob: a tampered record
    with pytest.raises(DecodeError, match="NaN"):
        _restore(params, full[:nan_at] + struct.pack("<d", np.nan) + full[nan_at + 8 :])
    with pytest.raises(DecodeError, match="weight"):
        weight_at = full_at + 16
        _restore(params, full[:weight_at] + struct.pack("<d", 7.5) + full[weight_at + 8 :])
    # rollback: the pre-bundle blob once the host has persisted MASKED
    hand.clients[0].handle(hand.pending[0])
    with pytest.raises(LocalProtocolError, match="stale state"):
        _restore(params, slim, input=x, min_stage=ClientState.MASKED)
