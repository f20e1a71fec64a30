"""Issue 13: a CKKS aggregate is released to the server as the exact integer sum, never as a raw decryption.

CKKS encrypts the quantized integers (as BFV does); the key holder rounds its decryption to the
integer sum only when every value is within `ckks_tolerance` (2^-8) of an integer, else it aborts.

The attack this stops (the weakened control): a crafted upload puts a coordinate at k + 1/2. The raw
decryption is then k + 1/2 + e, with e the CKKS error, a linear function of the secret key; a holder
that simply rounds releases k + [e > 0], one bit of the key per coordinate (Li-Micciancio style
leakage through the release). With the check, the holder aborts and releases nothing.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

from protocols import AbortError, InsecureParameterError, RemoteProtocolError
from protocols.he import (
    HEClient,
    HEClientState,
    HEParams,
    HEServer,
    _ciphers,
    _client,
    decode_he_message,
    encode_he_message,
)
from protocols.he._ciphers import quantize, round_ckks

N, D = 4, 600
CRAFTED = 1  # the party whose upload is crafted (never the key holder)


def _wire(message):
    return decode_he_message(encode_he_message(message))


def _inputs(seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.uniform(-0.05, 0.05, D) for _ in range(N)]


def _round(params: HEParams, xs, seeds, *, crafted: dict[int, float] | None = None, monkeypatch=None):
    """A hand-driven round; `crafted` adds offsets to CRAFTED's quantized words (a malicious client's upload).

    Returns (server, clients, the server-side release or the AbortError).
    """
    session = os.urandom(16)
    while _client.key_holder(_client.he_transcript(params, session=session, round_number=1, context=b""), range(N)) \
            == CRAFTED:  # fmt: skip
        session = os.urandom(16)
    clients = [HEClient(params, party_id=p, session=session, round_number=1) for p in range(N)]
    server = HEServer(params, session=session, round_number=1)
    for c, x, seed in zip(clients, xs, seeds, strict=True):
        c.set_input(x, rounding_seed=seed)
        server.receive(_wire(c.advertise_keys()))
    for p, roster in server.close_stage():
        server.receive(_wire(clients[p].handle(roster)))
    for p, keys in server.close_stage():
        if p == CRAFTED and crafted:

            def skewed(*args, honest=_ciphers.quantize, **kw):
                words = honest(*args, **kw).astype(np.float64)
                for index, offset in crafted.items():
                    words[index] += offset
                return words

            with monkeypatch.context() as m:
                m.setattr(_ciphers, "quantize", skewed)
                server.receive(_wire(clients[p].handle(keys)))
        else:
            server.receive(_wire(clients[p].handle(keys)))
    outgoing = server.close_stage()
    assert [p for p, _ in outgoing] == [server.holder]  # only the key holder decrypts, with CKKS as with BFV
    for p, total in outgoing:
        try:
            server.receive(_wire(clients[p].handle(_wire(total))))
        except RemoteProtocolError:
            pass  # the holder refused: it sends nothing
    try:
        server.close_stage()
    except AbortError as exc:
        return server, clients, exc
    return server, clients, server.result()


def _exact(params: HEParams, xs, seeds) -> np.ndarray:
    return sum(quantize(params, x, weight=1.0, rounding_seed=s) for x, s in zip(xs, seeds, strict=True))


@pytest.mark.parametrize("mode", ["symmetric", "public-key"])
def test_the_released_ckks_sum_is_the_exact_integer_sum_whatever_the_key(mode) -> None:
    """Two rounds over the same inputs with different keys: different raw decryptions, the same release."""
    params = HEParams.ckks_nvflare(N, dimension=D, clip_range=0.05, mode=mode)
    xs, seeds = _inputs(1), [os.urandom(32) for _ in range(N)]
    releases = []
    for _ in range(2):
        _, _, result = _round(params, xs, seeds)
        assert not isinstance(result, Exception)
        assert result.ring_sum.dtype == np.int64 and np.array_equal(result.ring_sum, _exact(params, xs, seeds))
        assert result.included == tuple(range(N)) and result.decoded.num_inputs == N
        releases.append(result.ring_sum)
    assert np.array_equal(releases[0], releases[1])  # a function of the inputs alone, not of the session's key


def test_a_crafted_off_integer_upload_makes_the_holder_abort_and_release_nothing(monkeypatch) -> None:
    params = HEParams.ckks_nvflare(N, dimension=D, clip_range=0.05)
    xs, seeds = _inputs(2), [os.urandom(32) for _ in range(N)]
    server, clients, result = _round(params, xs, seeds, crafted=dict.fromkeys(range(D), 0.5), monkeypatch=monkeypatch)
    assert isinstance(result, AbortError) and "did not release" in str(result)
    holder = clients[server.holder]
    assert holder.state is HEClientState.ABORTED and not holder.holds_key and holder.decryptions == 1
    # the check is exactly the tolerance: a value 2^-8 off passes, 2^-7 off is refused
    assert (round_ckks(params, np.array([3.0 + 2.0**-8, 7.0]), tolerance=params.ckks_tolerance) == [3, 7]).all()
    with pytest.raises(RemoteProtocolError, match="away from an integer"):
        round_ckks(params, np.array([3.0 + 2.0**-7, 7.0]), tolerance=params.ckks_tolerance)


def test_control_without_the_check_the_release_leaks_the_sign_of_the_decryption_error(monkeypatch) -> None:
    """Weakened control: the holder rounds whatever it decrypted (tolerance 1/2, i.e. no check)."""
    params = HEParams.ckks_nvflare(N, dimension=D, clip_range=0.05)
    xs, seeds = _inputs(3), [os.urandom(32) for _ in range(N)]
    raw: list[np.ndarray] = []
    decrypt, rounding = _client.decrypt_ckks_values, _client.round_ckks
    monkeypatch.setattr(_client, "decrypt_ckks_values", lambda p, v: raw.append(decrypt(p, v)) or raw[-1])
    monkeypatch.setattr(_client, "round_ckks", lambda p, values, tolerance: rounding(p, values, tolerance=0.5))
    _, _, result = _round(params, xs, seeds, crafted=dict.fromkeys(range(D), 0.5), monkeypatch=monkeypatch)
    assert not isinstance(result, Exception)  # the crafted round completed and was released
    exact = _exact(params, xs, seeds)
    (decrypted,) = raw
    error = decrypted[:D] - (exact[:D] + 0.5)  # the CKKS error the raw decryption carries (key-dependent)
    assert np.abs(decrypted[:D] - np.rint(decrypted[:D])).min() > 0.49  # what was rounded was not an integer sum
    leaked = result.ring_sum[:D] - exact[:D]
    assert set(np.unique(leaked)) == {0, 1}  # the release is not the integer sum of any inputs...
    signed = error != 0  # (an error below the float resolution of ~1e5 reads as 0 and rounds half to even)
    assert signed.mean() > 0.8
    assert np.array_equal(leaked[signed], (error[signed] > 0).astype(np.int64))  # ...it is the error's sign, bit by bit


def test_parameters_are_refused_unless_rounding_is_exact_with_margin() -> None:
    params = HEParams.ckks_nvflare(16, dimension=10, clip_range=0.1)  # NVFlare's set, n_max = 16
    assert (params.poly_modulus_degree, params.coeff_mod_bit_sizes, params.scale_bits) == (8192, (60, 40, 40), 40)
    assert params.ckks_error_bound <= params.ckks_tolerance == 2.0**-8
    assert math.log2(params.ckks_error_bound) < -16  # about 2^-16.5: 2^15 below the 1/2 of a wrong rounding
    with pytest.raises(InsecureParameterError, match="rounding tolerance"):
        HEParams.ckks_nvflare(4, dimension=10, clip_range=0.1, scale_bits=25)  # error bound 2^-3.5
    with pytest.raises(InsecureParameterError, match="leave"):
        HEParams.ckks_nvflare(4, dimension=10, clip_range=0.1, scale_bits=60, coeff_mod_bit_sizes=(60, 20, 60))
    with pytest.raises(InsecureParameterError, match="rounding tolerance"):  # more parties: more error
        HEParams.ckks_nvflare(4, dimension=10, clip_range=0.1, scale_bits=30, max_parties=1 << 12)


def test_measured_ckks_error_is_far_below_its_bound() -> None:
    """The largest values (2L) from n_max = 16 parties: the measured error against the bound and the 1/2 margin."""
    from protocols.he._ciphers import ChunkSum, decrypt_ckks_values, encrypt_update, make_context

    params = HEParams.ckks_nvflare(16, dimension=D, clip_range=0.05)
    ctx = make_context(params)
    total = ChunkSum(params, ctx)
    top = np.full(D, 1.0)  # clipped to +c: every word at 2L
    for p in range(16):
        total.add(encrypt_update(params, ctx, top, weight=1.0), sender=p)
    raw = decrypt_ckks_values(params, total.vectors())
    exact = 16 * quantize(params, top, weight=1.0)
    assert (exact[:D] == 16 * 2 * params.level).all()
    error = float(np.abs(raw - exact).max())
    assert error < params.ckks_error_bound < params.ckks_tolerance < 0.5
    assert (round_ckks(params, raw, tolerance=params.ckks_tolerance) == exact).all()
