"""Seeded symmetric BFV uploads: half the bytes, a fresh seed per ciphertext, exact sums, typed refusals.

The security test has a weakened control: an encryptor whose seed source repeats (a SEAL context with a
fixed-seed PRNG factory) gives two uploads with the same uniform half, and the difference of their
plaintexts is then read off c0 - c0' without any key; with the real encryptor the same attack fails.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from protocols import DecodeError, InsecureParameterError, LocalProtocolError, RemoteProtocolError, run_round
from protocols.he import HEParams
from protocols.he._ciphers import (
    ChunkSum,
    SeededEncryptor,
    _encrypt_seeded,
    _pack,
    check_chunks,
    decrypt_words,
    encrypt_update,
    export_key,
    load_key,
    make_context,
    quantize,
)
from protocols.he._export import export_chunk, export_seeded
from protocols.he._params import SEED_BYTES
from protocols.he._wire import layout

D = 3 * 8192 - 2  # three full ciphertexts of the default packing (d + weight + counter words)


def _params(n: int = 4, d: int = D) -> HEParams:
    return HEParams.bfv_seeded(n, dimension=d, clip_range=0.05)


def _update(d: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 0.02, d)


def _seeds(params: HEParams, chunks) -> list[bytes]:
    shape = layout(params)
    return [shape.unpack_chunk(c, field="chunks", peer_id=None)[1] for c in chunks]


def test_a_seeded_round_is_exact_and_uploads_half_the_bytes():
    n = 5
    params = _params(n)
    xs = [_update(D, i) for i in range(n)]
    seeds = [os.urandom(32) for _ in range(n)]
    report = run_round(params, xs, protocol="he", rounding_seeds=seeds)
    expected = sum(quantize(params, x, weight=1.0, rounding_seed=s) for x, s in zip(xs, seeds, strict=True))
    assert (report.result.ring_sum == expected).all()  # exact, as unseeded
    shape = layout(params)
    assert shape.chunk_bytes == params.max_chunk_bytes == 4096 * 7 + SEED_BYTES
    full = HEParams.bfv_packed(n, dimension=D, clip_range=0.05)
    assert params.chunks == full.chunks == 3
    per_param = params.chunks * params.max_chunk_bytes / params.dimension
    assert per_param < 3.52 < 4.5  # 7.0 B/param unseeded
    assert 2 * params.max_chunk_bytes - 2 * SEED_BYTES == full.max_chunk_bytes


def test_seeded_parameters_stay_symmetric_bfv_within_the_128_bit_table():
    with pytest.raises(InsecureParameterError, match="mode='symmetric'"):
        HEParams.bfv_packed(4, dimension=10, clip_range=0.05, mode="public-key", seeded=True)
    with pytest.raises(InsecureParameterError, match="scheme='bfv'"):
        HEParams.ckks_nvflare(4, dimension=10, clip_range=0.05, seeded=True)
    with pytest.raises(InsecureParameterError, match="128-bit"):
        HEParams.bfv_seeded(4, dimension=10, clip_range=0.05, coeff_mod_bit_sizes=(60, 50))  # 110 > 109 bits
    assert not HEParams.bfv_packed(4, dimension=10, clip_range=0.05).seeded  # public-key keeps its format


def test_no_seed_repeats_across_ciphertexts_clients_and_sessions():
    params = _params(d=2 * 8192 - 2)
    seen: list[bytes] = []
    for _session in range(2):  # a fresh key per session, as the key holder makes one
        holder = make_context(params)
        for client in range(3):
            ctx = load_key(params, export_key(params, holder))
            chunks = encrypt_update(params, ctx, _update(params.dimension, client), weight=1.0)
            seen += _seeds(params, chunks)
        seen += _seeds(params, encrypt_update(params, holder, _update(params.dimension, 0), weight=1.0))
    assert len(seen) == 2 * 4 * params.chunks
    assert all(len(s) == SEED_BYTES for s in seen)
    assert len(set(seen)) == len(seen)  # no seed repeats
    assert len({s[:8] for s in seen}) == len(seen)  # nor any 8-byte prefix: they look uniform


def _fixed_seed_encryptor(params: HEParams, ctx) -> SeededEncryptor:
    """The weakened control: SEAL's PRNG factory with a fixed seed, so every encryption reuses one seed."""
    import tenseal.sealapi as sealapi

    parms = sealapi.EncryptionParameters(sealapi.SCHEME_TYPE.BFV)
    parms.set_poly_modulus_degree(params.poly_modulus_degree)
    parms.set_coeff_modulus(sealapi.CoeffModulus.Create(params.poly_modulus_degree, list(params.coeff_mod_bit_sizes)))
    parms.set_plain_modulus(sealapi.Modulus(params.plain_modulus))
    parms.set_random_generator(sealapi.Blake2xbPRNGFactory([1, 2, 3, 4, 5, 6, 7, 8]))
    weak = sealapi.SEALContext(parms, True, sealapi.SEC_LEVEL_TYPE.TC128)
    return SeededEncryptor(params, weak, ctx.data.secret_key())


def _difference_from_c0(params: HEParams, chunk_a: bytes, chunk_b: bytes) -> list[int]:
    """The attack, without any key: round(t/q * (c0 - c0')) mod t, the coefficient form of m - m' if c1 = c1'."""
    shape = layout(params)
    (q,) = shape.data_moduli
    t = params.plain_modulus
    a = shape.unpack_chunk(chunk_a, field="a", peer_id=None)[0]
    b = shape.unpack_chunk(chunk_b, field="b", peer_id=None)[0]
    return [((int(x) - int(y)) % q * t + q // 2) // q % t for x, y in zip(a, b, strict=True)]


def _encoded(params: HEParams, ctx, slots: list[int]) -> list[int]:
    import tenseal.sealapi as sealapi

    plain = sealapi.Plaintext()
    sealapi.BatchEncoder(ctx.seal_context().data).encode(slots, plain)
    return [plain[i] for i in range(plain.coeff_count())] + [0] * (params.poly_modulus_degree - plain.coeff_count())


def test_a_reused_seed_leaks_the_plaintext_difference_and_fresh_seeds_do_not():
    params = _params(d=8190)
    ctx = make_context(params)
    words_a = quantize(params, _update(8190, 1), weight=1.0)
    words_b = quantize(params, _update(8190, 2), weight=1.0)
    slots_a, slots_b = _pack(params, words_a, 0), _pack(params, words_b, 0)
    t = params.plain_modulus
    truth = [(x - y) % t for x, y in zip(_encoded(params, ctx, slots_a), _encoded(params, ctx, slots_b), strict=True)]
    path = os.path.join(str(os.environ.get("TMPDIR", "/tmp")), f"he-seeded-test-{os.getpid()}")
    try:
        weak = _fixed_seed_encryptor(params, ctx)  # control: the seed repeats
        (up_a, seed_a), (up_b, seed_b) = weak.encrypt(slots_a, path), weak.encrypt(slots_b, path)
        assert seed_a == seed_b
        assert _difference_from_c0(params, up_a, up_b) == truth  # m - m' leaks from two uploads
        real = SeededEncryptor(params, ctx.seal_context().data, ctx.data.secret_key())
        (up_a, seed_a), (up_b, seed_b) = real.encrypt(slots_a, path), real.encrypt(slots_b, path)
        assert seed_a != seed_b
        guess = _difference_from_c0(params, up_a, up_b)
        assert sum(g == v for g, v in zip(guess, truth, strict=True)) < 8  # chance agreement only
    finally:
        if os.path.exists(path):
            os.unlink(path)


def test_a_repeated_seed_is_refused_by_the_client_the_server_and_the_key_holder():
    params = _params(d=2 * 8192 - 2)
    ctx = make_context(params)
    words = quantize(params, _update(params.dimension, 3), weight=1.0, rounding_seed=b"r" * 32)
    with pytest.raises(LocalProtocolError, match="same ciphertext seed twice"):
        _encrypt_seeded(params, _fixed_seed_encryptor(params, ctx), words)  # control encryptor: nothing is sent
    chunks = encrypt_update(params, ctx, _update(params.dimension, 3), weight=1.0, rounding_seed=b"r" * 32)
    check_chunks(params, chunks, field="chunks")
    with pytest.raises(RemoteProtocolError, match="repeats another chunk's seed") as caught:
        check_chunks(params, [chunks[0], chunks[0]], field="chunks", peer_id=2)
    assert caught.value.field == "chunks[1]" and caught.value.peer_id == 2
    total = ChunkSum(params, ctx)
    total.add(chunks, sender=0)
    replay = [chunks[0], encrypt_update(params, ctx, _update(params.dimension, 4), weight=1.0)[1]]
    with pytest.raises(RemoteProtocolError, match="repeats another chunk's seed"):
        total.add(replay, sender=1)  # a seed seen in an earlier upload
    assert total.count == 1
    assert (decrypt_words(params, total.vectors()) == words).all()  # nothing of the refused upload was added


def test_malformed_seeded_payloads_raise_decode_errors_naming_the_field():
    params = _params(d=8190)
    ctx = make_context(params)
    (chunk,) = encrypt_update(params, ctx, _update(8190, 5), weight=1.0)
    poly = len(chunk) - SEED_BYTES
    q = layout(params).data_moduli[0]
    too_big = q.to_bytes(7, "little")  # coefficient 0 set to q (56 bits): not below its modulus
    cases = {
        "empty": b"",
        "short seed": chunk[:-1],
        "long": chunk + b"\0",
        "no seed": chunk[:poly],
        "unseeded size": chunk[:poly] * 2,
        "coefficient = q": too_big + chunk[7:],
    }
    for name, bad in cases.items():
        with pytest.raises(DecodeError) as caught:
            check_chunks(params, [bad], field="chunks", peer_id=3)
        assert caught.value.field == "chunks[0]" and caught.value.peer_id == 3, name
        with pytest.raises(DecodeError):
            ChunkSum(params, ctx).add([bad], sender=3)


def test_only_fresh_uploads_are_seeded_the_sum_is_full_size():
    params = _params(d=8190)
    ctx = make_context(params)
    total = ChunkSum(params, ctx)
    xs = [_update(8190, i) for i in range(3)]
    for i, x in enumerate(xs):
        total.add(encrypt_update(params, ctx, x, weight=1.0, rounding_seed=bytes([i]) * 32), sender=i)
    (summed,) = total.vectors()
    full = layout(HEParams.bfv_packed(4, dimension=8190, clip_range=0.05))
    assert len(export_chunk(full, summed)) == 2 * 4096 * 7  # a sum has no seed: both polynomials travel
    expected = sum(quantize(params, x, weight=1.0, rounding_seed=bytes([i]) * 32) for i, x in enumerate(xs))
    assert (decrypt_words(params, [summed]) == expected).all()


def test_the_client_refuses_its_own_seal_output_unless_it_is_a_fresh_seeded_ciphertext(tmp_path):
    import tenseal.sealapi as sealapi

    params = _params(d=8190)
    ctx = make_context(params)
    shape = layout(params)
    real = SeededEncryptor(params, ctx.seal_context().data, ctx.data.secret_key())
    good, _ = real.encrypt(list(range(4096)), str(tmp_path / "ct"))
    assert len(good) == shape.chunk_bytes
    full = sealapi.Ciphertext(ctx.seal_context().data)  # an unseeded encryption, saved the same way
    plain = sealapi.Plaintext()
    sealapi.BatchEncoder(ctx.seal_context().data).encode(list(range(4096)), plain)
    sealapi.Encryptor(ctx.seal_context().data, ctx.data.secret_key()).encrypt_symmetric(plain, full)
    full.save(str(tmp_path / "full"))
    saved = (tmp_path / "full").read_bytes()
    with pytest.raises(LocalProtocolError, match="does not decompress"):  # c1 in full: larger than a seeded one
        export_seeded(shape, saved)
    seeded_file = str(tmp_path / "seeded")
    real._encryptor.encrypt_symmetric(plain).save(seeded_file)
    body = bytearray(open(seeded_file, "rb").read())
    with pytest.raises(LocalProtocolError, match="does not decompress"):
        export_seeded(shape, bytes(body[:-8]))  # a truncated zstd frame
    from protocols.he._export import _zstd_decompress

    members = _zstd_decompress()(bytes(body[16:]), 1 << 16)
    plain_saved = bytes(body[:5]) + b"\0" + bytes(body[6:16]) + members  # the same, uncompressed
    assert export_seeded(shape, plain_saved)[0][-SEED_BYTES:] == members[-SEED_BYTES:]
    flipped = bytearray(plain_saved)
    flipped[16 + 32] = 1  # the is_ntt_form byte: not a fresh BFV ciphertext
    with pytest.raises(LocalProtocolError, match="not in the layout"):
        export_seeded(shape, bytes(flipped))
    with pytest.raises(LocalProtocolError, match="no SEAL header"):
        export_seeded(shape, b"\0" * 64)
    with pytest.raises(LocalProtocolError, match="compression mode"):
        export_seeded(shape, saved[:5] + bytes([7]) + saved[6:])


@pytest.mark.parametrize("make", [HEParams.bfv_packed, HEParams.ckks_nvflare])
def test_the_saved_file_export_of_a_full_ciphertext_equals_the_coefficient_export(make, tmp_path):
    import tenseal as ts

    params = make(4, dimension=100, clip_range=0.05)
    ctx = make_context(params)
    shape = layout(params)
    values = list(range(1, 40))
    vector = ts.bfv_vector(ctx, values) if params.scheme == "bfv" else ts.ckks_vector(ctx, [float(v) for v in values])
    fast = export_chunk(shape, vector, str(tmp_path / "ct"))
    assert fast == export_chunk(shape, vector)  # one SEAL save + zstd == a Python call per coefficient
    summed = vector + vector  # not fresh: still a full ciphertext of the same level, exported the same way
    assert export_chunk(shape, summed, str(tmp_path / "ct")) == export_chunk(shape, summed)


def test_without_tenseals_zstd_full_uploads_still_work_and_seeded_ones_refuse_with_the_fix(monkeypatch):
    from protocols.he import _export

    def missing() -> None:
        raise LocalProtocolError("seeded uploads need the zstd ...; set HEParams.seeded=False")

    monkeypatch.setattr(_export, "_zstd_decompress", missing)
    full = HEParams.bfv_packed(4, dimension=8190, clip_range=0.05)
    ctx = make_context(full)
    (chunk,) = encrypt_update(full, ctx, _update(8190, 6), weight=1.0, rounding_seed=b"w" * 32)
    total = ChunkSum(full, ctx)
    total.add([chunk], sender=0)  # the coefficient export: the same bytes, just slower
    assert (
        decrypt_words(full, total.vectors()) == quantize(full, _update(8190, 6), weight=1.0, rounding_seed=b"w" * 32)
    ).all()
    seeded = _params(d=8190)
    with pytest.raises(LocalProtocolError, match="seeded=False"):
        encrypt_update(seeded, make_context(seeded), _update(8190, 6), weight=1.0)
