"""HE aggregation: exact packed-BFV sums, CKKS within its bound, keys, tampering and refusals."""

from __future__ import annotations

import os

import numpy as np
import pytest

from protocols import (
    AbortError,
    DecodeError,
    InsecureParameterError,
    IntegrityError,
    InvalidTransitionError,
    LocalProtocolError,
    RemoteProtocolError,
    run_round,
)
from protocols.he import (
    HEClient,
    HEClientState,
    HEInput,
    HEKeyOffer,
    HEParams,
    HEServer,
    HESum,
    decode_he_message,
    encode_he_message,
)
from protocols.he._ciphers import export_key, make_context, quantize
from protocols.he._client import he_transcript, holder_rank


def _session_with_holder(params: HEParams, *, avoid: set[int] = frozenset(), want: int | None = None) -> bytes:
    """A session id whose public key-holder rule picks a party outside `avoid` (or exactly `want`)."""
    while True:
        session = os.urandom(16)
        transcript = he_transcript(params, session=session, round_number=0, context=b"")
        holder = min(range(params.num_parties), key=lambda p: holder_rank(transcript, p))
        if (want is None and holder not in avoid) or holder == want:
            return session


def _inputs(n: int, d: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(0, 0.03, d) for _ in range(n)]  # some coordinates beyond the 0.05 clip


@pytest.mark.parametrize(
    ("n", "d", "drop_at", "mode"),
    [
        (3, 1, {}, "symmetric"),
        (6, 9000, {1: 2, 4: 0}, "symmetric"),
        (16, 3000, {0: 2, 15: 1}, "symmetric"),
        (5, 5000, {3: 2}, "public-key"),
    ],
)
def test_packed_bfv_sum_is_the_exact_integer_sum_of_the_survivors(n, d, drop_at, mode):
    params = HEParams.bfv_packed(n, dimension=d, clip_range=0.05, mode=mode)
    xs = _inputs(n, d, n * d)
    weights = [1.0 - 0.05 * i for i in range(n)]
    seeds = [os.urandom(32) for _ in range(n)]
    session = _session_with_holder(params, avoid=set(drop_at))  # a dropped key holder aborts (next test)
    report = run_round(
        params, xs, protocol="he", weights=weights, drop_at=drop_at, rounding_seeds=seeds, session=session
    )
    included = report.result.included
    assert included == tuple(p for p in range(n) if p not in drop_at)
    expected = sum(quantize(params, xs[p], weight=weights[p], rounding_seed=seeds[p]) for p in included)
    assert (report.result.ring_sum == expected).all()  # exact, field by field, weight and counter included
    decoded = report.result.decoded
    exact = sum(weights[p] * np.clip(xs[p], -0.05, 0.05) for p in included)
    assert np.abs(decoded.weighted_sum - exact).max() <= decoded.max_abs_error
    assert decoded.num_inputs == len(included)
    # each weight is rounded (stochastically) to 1 / weight_scale: the bound is one step per input
    bound = len(included) / params.quantizer.weight_scale
    assert decoded.total_weight == pytest.approx(sum(weights[p] for p in included), abs=bound)


@pytest.mark.parametrize(("mode", "stage"), [("symmetric", 1), ("symmetric", 2), ("symmetric", 4), ("public-key", 2)])
def test_a_key_holder_that_drops_too_early_aborts_the_round(mode, stage):
    params = HEParams.bfv_packed(4, dimension=100, clip_range=0.05, mode=mode)
    session = _session_with_holder(params, want=2)
    with pytest.raises(AbortError):
        run_round(params, _inputs(4, 100, 0), protocol="he", drop_at={2: stage}, session=session)


@pytest.mark.parametrize("mode", ["symmetric", "public-key"])
def test_ckks_releases_the_exact_integer_sum_of_the_quantized_survivors(mode):
    """CKKS encrypts BFV's quantized words; the key holder releases their exact sum (issue 13), not the decryption."""
    params = HEParams.ckks_nvflare(4, dimension=5000, clip_range=0.05, mode=mode)
    xs = _inputs(4, 5000, 1)
    seeds = [os.urandom(32) for _ in range(4)]
    session = _session_with_holder(params, avoid={2})
    report = run_round(params, xs, protocol="he", drop_at={2: 2}, rounding_seeds=seeds, session=session)
    assert report.result.included == (0, 1, 3)
    expected = sum(quantize(params, xs[p], weight=1.0, rounding_seed=seeds[p]) for p in (0, 1, 3))
    assert report.result.ring_sum.dtype == np.int64 and (report.result.ring_sum == expected).all()
    exact = sum(np.clip(xs[p], -0.05, 0.05) for p in (0, 1, 3))
    assert np.abs(report.result.decoded.weighted_sum - exact).max() <= report.result.decoded.max_abs_error
    # the very words BFV would release for the same inputs and rounding seeds
    bfv = HEParams.bfv_packed(4, dimension=5000, clip_range=0.05)
    assert all((quantize(bfv, xs[p], weight=1.0, rounding_seed=seeds[p]) == quantize(params, xs[p], weight=1.0,
               rounding_seed=seeds[p])).all() for p in (0, 1, 3))  # fmt: skip


class Round:
    """A hand-driven HE round, so tests can tamper with any message."""

    def __init__(self, n: int = 4, d: int = 700, **kw) -> None:
        self.params = HEParams.bfv_packed(n, dimension=d, clip_range=0.05, **kw)
        self.session = os.urandom(16)
        self.clients = [HEClient(self.params, party_id=p, session=self.session, round_number=1) for p in range(n)]
        self.server = HEServer(self.params, session=self.session, round_number=1)
        self.xs = _inputs(n, d, 7)
        for c, x in zip(self.clients, self.xs, strict=True):
            c.set_input(x)

    def wire(self, message):
        return decode_he_message(encode_he_message(message))

    def to_inputs(self) -> list[HEInput]:
        for c in self.clients:
            self.server.receive(self.wire(c.advertise_keys()))
        for p, roster in self.server.close_stage():
            self.server.receive(self.wire(self.clients[p].handle(roster)))
        return [self.clients[p].handle(keys) for p, keys in self.server.close_stage()]


def test_key_material_in_the_clear_is_refused_by_the_server():
    # Updated for issue 12 (4c): there is no TenSEAL context on the wire any more. In symmetric mode the
    # offer's public_key must be empty (the secret key travels only in sealed boxes); in public-key mode
    # it must be exactly one public key (a secret key has the wrong number of polynomials).
    r = Round()
    for c in r.clients:
        r.server.receive(r.wire(c.advertise_keys()))
    offers = {p: r.clients[p].handle(roster) for p, roster in r.server.close_stage()}
    holder = r.server.holder
    leaked = offers[holder].model_copy(update={"public_key": export_key(r.params, r.clients[holder]._ctx)})
    for p, offer in offers.items():
        r.server.receive(leaked if p == holder else offer)
    with pytest.raises(AbortError, match="in the clear"):
        r.server.close_stage()

    r = Round(mode="public-key")
    for c in r.clients:
        r.server.receive(r.wire(c.advertise_keys()))
    offers = {p: r.clients[p].handle(roster) for p, roster in r.server.close_stage()}
    holder = r.server.holder
    params_sym = r.params.model_copy(update={"mode": "symmetric"})
    secret = export_key(params_sym, r.clients[holder]._ctx)  # the holder's secret key polynomials
    leaked = offers[holder].model_copy(update={"public_key": secret})
    for p, offer in offers.items():
        r.server.receive(leaked if p == holder else offer)
    with pytest.raises(DecodeError, match="public_key") as info:
        r.server.close_stage()
    assert info.value.field == "public_key"


def test_tampered_truncated_or_unsigned_uploads_are_refused_and_change_nothing():
    r = Round()
    inputs = r.to_inputs()
    good = inputs[0]
    flipped_chunk = bytearray(good.chunks[0])
    flipped_chunk[:7] = b"\xff" * 7  # the first 56-bit coefficient is now 2^56 - 1 >= q: refused before parsing
    tampered = good.model_copy(update={"chunks": (bytes(flipped_chunk), *good.chunks[1:])})
    unsigned = good.model_copy(update={"signature": bytes(64)})
    truncated = good.model_copy(update={"chunks": good.chunks[:-1]})
    for bad, error in ((tampered, DecodeError), (unsigned, IntegrityError), (truncated, RemoteProtocolError)):
        with pytest.raises(error):
            r.server.receive(bad)
        assert r.server.contributors == ()
    wire = encode_he_message(good)
    with pytest.raises(DecodeError):
        decode_he_message(wire[:-10])
    for message in inputs:
        r.server.receive(r.wire(message))
    acks = [r.clients[p].handle(total) for p, total in r.server.close_stage()]
    assert len(acks) == 1  # BFV: only the key holder decrypts (and releases); the others decrypt nothing
    for ack in acks:
        r.server.receive(r.wire(ack))
    assert r.server.close_stage() == []
    exact = sum(np.clip(x, -0.05, 0.05) for x in r.xs)
    result = r.server.result()
    assert result.included == (0, 1, 2, 3)
    assert np.abs(result.decoded.weighted_sum - exact).max() <= result.decoded.max_abs_error


def test_a_server_that_passes_off_one_ciphertext_as_the_sum_gets_nothing():
    # Updated for issue 12 (4a): HESum has no server-computed sum any more. The old test sent a
    # non-holder "E(x_1) as the sum" and expected a counter error (and the client stayed in state, an
    # oracle); now a non-holder refuses any HESum and aborts, and the holder recomputes from the
    # signed uploads (tests below and test_he_oracle.py).
    r = Round()
    inputs = r.to_inputs()
    for message in inputs:
        r.server.receive(r.wire(message))
    sums = dict(r.server.close_stage())
    holder = r.server.holder
    assert set(sums) == {holder}
    party = next(p for p in range(4) if p != holder)
    total = sums[holder]
    with pytest.raises(RemoteProtocolError, match="decrypts nothing"):
        r.clients[party].handle(total)
    assert r.clients[party].state is HEClientState.ABORTED
    with pytest.raises(RemoteProtocolError, match="below min_contributions"):
        r.clients[holder].handle(
            HESum(
                session=total.session,
                round=1,
                sender=total.sender,
                contributors=(holder,),
                digests=total.digests[holder : holder + 1],
                signatures=total.signatures[holder : holder + 1],
                inputs=inputs[holder].chunks,
            )
        )
    assert r.clients[holder].state is HEClientState.ABORTED and not r.clients[holder].holds_key


def test_insecure_or_overflowing_parameters_are_refused():
    with pytest.raises(InsecureParameterError, match="128-bit"):
        HEParams.bfv_packed(4, dimension=10, clip_range=0.1, coeff_mod_bit_sizes=(60, 60))
    with pytest.raises(InsecureParameterError, match="128-bit"):
        HEParams.ckks_nvflare(4, dimension=10, clip_range=0.1, coeff_mod_bit_sizes=(60, 60, 60, 60))
    with pytest.raises(InsecureParameterError, match="fields"):
        HEParams.bfv_packed(4, dimension=10, clip_range=0.1, max_parties=1024)
    with pytest.raises(InsecureParameterError, match="noise budget"):
        HEParams.bfv_packed(4, dimension=10, clip_range=0.1, max_parties=4096, fields_per_slot=1)
    with pytest.raises(InsecureParameterError, match="noise budget"):
        HEParams.bfv_packed(4, dimension=10, clip_range=0.1, max_parties=512, fields_per_slot=1, mode="public-key")
    assert HEParams.bfv_packed(4, dimension=10, clip_range=0.1).field_bits == 20


def test_out_of_range_inputs_are_refused_before_encryption():
    params = HEParams.bfv_packed(3, dimension=4, clip_range=0.05)
    client = HEClient(params, party_id=0, session=os.urandom(16), round_number=0)
    with pytest.raises(LocalProtocolError, match="weight"):
        client.set_input(np.zeros(4), weight=1.5)
    with pytest.raises(LocalProtocolError):
        quantize(params, np.array([0.0, np.nan, 0.0, 0.0]), weight=1.0)
    with pytest.raises(LocalProtocolError, match="shape"):
        quantize(params, np.zeros(5), weight=1.0)
    words = quantize(params, np.array([1e9, -1e9, 0.0, 0.01]), weight=1.0)  # clipped to the public range
    assert words.min() >= 0 and words.max() <= 2 * params.level


def test_wrong_stage_and_foreign_messages_raise_typed_errors():
    r = Round(n=3)
    with pytest.raises(InvalidTransitionError):
        r.clients[0].handle(HEKeyOffer(session=r.session, round=1, sender=9))
    other = HEKeyOffer(session=os.urandom(16), round=1, sender=0)
    with pytest.raises(RemoteProtocolError, match="another session"):
        r.server.receive(other)
    rng = np.random.default_rng(0)
    for _ in range(2000):
        blob = bytes(rng.integers(0, 256, rng.integers(0, 80), dtype=np.uint8))
        if rng.random() < 0.5:
            blob = b"HEAG\x01" + bytes([int(rng.integers(1, 8))]) + blob
        try:
            decode_he_message(blob)
        except DecodeError:
            pass


def test_self_test_catches_a_context_whose_sums_overflow():
    from protocols.he import self_test

    params = HEParams.bfv_packed(3, dimension=4, clip_range=0.05)
    ctx = make_context(params)
    self_test(ctx, params)
    broken = params.model_copy(update={"fields_per_slot": 3})  # skips validation: 3 x 20 bits > 41-bit t
    with pytest.raises(LocalProtocolError, match="self-test"):
        self_test(ctx, broken)


def test_with_identity_keys_a_server_cannot_substitute_a_key_to_intercept_the_secret_context():
    from protocols.he import HERoster
    from protocols.primitives import ed25519_public, x25519_generate

    n = 4
    identities = [os.urandom(32) for _ in range(n)]
    params = HEParams.bfv_packed(
        n, dimension=300, clip_range=0.05, identity_keys=tuple(ed25519_public(k) for k in identities)
    )
    report = run_round(params, _inputs(n, 300, 3), protocol="he", identity_keys=identities)
    assert report.result.included == (0, 1, 2, 3)

    session = os.urandom(16)
    clients = [
        HEClient(params, party_id=p, session=session, round_number=0, identity_key=identities[p]) for p in range(n)
    ]
    server = HEServer(params, session=session, round_number=0)
    hellos = [c.advertise_keys() for c in clients]
    for c, x in zip(clients, _inputs(n, 300, 3), strict=True):
        c.set_input(x)
    _, attacker_public = x25519_generate(__import__("protocols").OsRandom())
    forged = hellos[1].model_copy(update={"dh_public": attacker_public})  # the server's own key for party 1
    roster = HERoster(
        session=session,
        round=0,
        sender=0xFFFFFFFF,
        hellos=tuple(encode_he_message(h) for h in (hellos[0], forged, hellos[2], hellos[3])),
    )
    with pytest.raises(IntegrityError):
        clients[0].handle(roster)
    del server


def _to_sums(r: Round):
    inputs = r.to_inputs()
    for message in inputs:
        r.server.receive(r.wire(message))
    return inputs, dict(r.server.close_stage())


def test_the_releaser_adds_the_signed_uploads_itself():
    # Updated for issue 12 (4a): the forged "chunks" field this test used to send no longer exists.
    r = Round()
    _, sums = _to_sums(r)
    holder = r.server.holder
    ack = r.clients[holder].handle(sums[holder])
    assert ack.plaintext and r.clients[holder].decryptions == 1 and not r.clients[holder].holds_key
    exact = sum(np.clip(x, -0.05, 0.05) for x in r.xs)
    assert np.abs(r.clients[holder].result().weighted_sum - exact).max() <= r.clients[holder].result().max_abs_error
    with pytest.raises(InvalidTransitionError):  # a second HESum: no second decryption, and the session ends
        r.clients[holder].handle(sums[holder])
    assert r.clients[holder].state is HEClientState.ABORTED and r.clients[holder].decryptions == 1


def test_the_releaser_refuses_uploads_that_do_not_match_their_signatures():
    r = Round()
    inputs, sums = _to_sums(r)
    holder = r.server.holder
    victim = next(p for p in range(4) if p != holder)
    per = r.params.chunks
    swapped = tuple(c for _ in range(4) for c in inputs[victim].chunks)  # k * E(x_victim) with k signatures
    assert len(swapped) == 4 * per
    with pytest.raises(RemoteProtocolError, match="do not match its signature"):
        r.clients[holder].handle(sums[holder].model_copy(update={"inputs": swapped}))
    assert r.clients[holder].state is HEClientState.ABORTED and r.clients[holder].decryptions == 0


def test_the_server_accepts_the_released_sum_only_from_the_key_holder_signed():
    r = Round()
    _, sums = _to_sums(r)
    acks = {p: r.clients[p].handle(total) for p, total in sums.items()}
    holder = r.server.holder
    assert [p for p, a in acks.items() if a.plaintext] == [holder] == list(acks)
    plaintext = bytearray(acks[holder].plaintext)
    plaintext[0] ^= 1
    for p, ack in acks.items():
        r.server.receive(ack.model_copy(update={"plaintext": bytes(plaintext)}) if p == holder else ack)
    with pytest.raises(IntegrityError):
        r.server.close_stage()


def test_a_chunk_of_the_wrong_size_is_refused_before_anything_is_added():
    r = Round(d=9000)  # two chunks
    inputs = r.to_inputs()
    good = inputs[0]
    for bad in (good.chunks[0][:-7], good.chunks[0] + bytes(7), b""):
        message = good.model_copy(update={"chunks": (good.chunks[0], bad)})
        with pytest.raises(DecodeError, match=r"chunks\[1\]") as info:
            r.server.receive(message)
        assert info.value.field == "chunks[1]" and info.value.peer_id == 0
    assert r.server.contributors == ()


def test_plain_modulus_must_be_a_batching_prime():
    with pytest.raises(InsecureParameterError, match="batching"):
        HEParams.bfv_packed(4, dimension=10, clip_range=0.1, plain_modulus=2199023190019)


def test_empty_or_short_chunks_and_keys_raise_decode_errors_naming_the_field():
    # Finding 4(d): an empty chunk used to raise a bare ValueError. Every entry point now names the field.
    from protocols.he._ciphers import check_chunks, load_key

    r = Round()
    _, sums = _to_sums(r)
    holder = r.server.holder
    total = sums[holder]
    for bad in (b"", total.inputs[0][:1], total.inputs[0][:-1]):
        with pytest.raises(DecodeError) as info:
            check_chunks(r.params, (bad,), field="chunks")
        assert info.value.field == "chunks[0]" and not isinstance(info.value, ValueError)
        with pytest.raises(DecodeError, match="bytes") as info:
            load_key(r.params, bad, peer_id=3)
        assert (info.value.field, info.value.peer_id) == ("key", 3)
    with pytest.raises(RemoteProtocolError) as info:  # at the key holder: its digest check comes first; session ends
        r.clients[holder].handle(total.model_copy(update={"inputs": (b"", *total.inputs[1:])}))
    assert info.value.field == "inputs"
    assert r.clients[holder].state is HEClientState.ABORTED
    with pytest.raises(DecodeError):
        decode_he_message(b"")
