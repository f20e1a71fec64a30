"""The wire codec: round trips, and nothing but DecodeError for hostile bytes."""

from __future__ import annotations

import struct
import time
import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from secagg_harness import MESSAGE_TYPES, HandRound, flip, malicious_params, semi_honest_params, with_box

from protocols import DecodeError, decode_message, encode_message
from protocols.secagg import (
    MAX_PARTIES,
    WIRE_VERSION,
    AdvertiseKeys,
    Complaint,
    EncryptedShares,
    Envelope,
    KeyRoster,
    MaskedInput,
    ShareBundle,
    SignedShare,
    SurvivorSet,
    SurvivorSignature,
    UnmaskRequest,
    UnmaskResponse,
)

ALL_TYPES = MESSAGE_TYPES

# -- strategies ------------------------------------------------------------------------------------------------

sessions = st.binary(min_size=16, max_size=16)
rounds = st.integers(0, 2**63 - 1)
party = st.integers(0, MAX_PARTIES - 1)
keys = st.binary(min_size=32, max_size=32)
party_lists = st.lists(party, max_size=20, unique=True).map(tuple)


def envelopes(max_data: int = 80) -> st.SearchStrategy[tuple[Envelope, ...]]:
    return st.lists(
        st.builds(Envelope, peer=party, data=st.binary(max_size=max_data)),
        max_size=8,
        unique_by=lambda e: e.peer,
    ).map(tuple)


def signed_shares() -> st.SearchStrategy[tuple[SignedShare, ...]]:
    return st.lists(
        st.builds(
            SignedShare,
            peer=party,
            share=st.binary(min_size=33, max_size=33),
            signature=st.binary(min_size=64, max_size=64),
        ),
        max_size=8,
        unique_by=lambda e: e.peer,
    ).map(tuple)


advertise = st.builds(
    AdvertiseKeys,
    session=sessions,
    round=rounds,
    sender=party,
    share_public_key=keys,
    mask_public_key=keys,
    signature=st.one_of(st.just(b""), st.binary(min_size=64, max_size=64)),
    signing_public_key=st.one_of(st.just(b""), keys),
)


@st.composite
def rosters(draw):
    session, round_number = draw(sessions), draw(rounds)
    entries = draw(st.lists(advertise, max_size=6, unique_by=lambda e: e.sender))
    return KeyRoster(session=session, round=round_number, entries=tuple(entries))


messages = st.one_of(
    advertise,
    rosters(),
    st.builds(EncryptedShares, session=sessions, round=rounds, sender=party, boxes=envelopes()),
    st.builds(ShareBundle, session=sessions, round=rounds, recipient=party, boxes=envelopes()),
    st.builds(
        MaskedInput,
        session=sessions,
        round=rounds,
        sender=party,
        ring_bits=st.sampled_from([16, 32, 64]),
        data=st.binary(max_size=64),
    ),
    st.builds(
        Complaint,
        session=sessions,
        round=rounds,
        sender=party,
        accused=st.lists(party, min_size=1, max_size=20, unique=True).map(lambda v: tuple(sorted(v))),
        signature=st.binary(min_size=64, max_size=64),
    ),
    st.builds(SurvivorSet, session=sessions, round=rounds, survivors=party_lists),
    st.builds(
        SurvivorSignature, session=sessions, round=rounds, sender=party, signature=st.binary(min_size=64, max_size=64)
    ),
    st.builds(UnmaskRequest, session=sessions, round=rounds, survivors=party_lists, signatures=envelopes()),
    st.builds(
        UnmaskResponse,
        session=sessions,
        round=rounds,
        sender=party,
        self_mask_shares=signed_shares(),
        mask_key_shares=signed_shares(),
    ),
)


@settings(max_examples=300, deadline=None)
@given(messages)
def test_round_trip_of_random_messages(message) -> None:
    wire = encode_message(message)
    assert wire[0] == WIRE_VERSION and wire[1] == message.TAG
    decoded = decode_message(wire)
    assert type(decoded) is type(message)
    assert decoded == message
    assert encode_message(decoded) == wire
    assert decode_message(bytearray(wire)) == message
    assert decode_message(memoryview(wire)) == message


def real_messages() -> list:
    """Every message of a complete malicious round and of a semi-honest round (with a dropout)."""
    out: list = []
    mal, private = malicious_params()
    for hand, drop in (
        (HandRound(semi_honest_params(5), seed=40), {4: 2}),
        (HandRound(mal, seed=41, identity_keys=private), {7: 2}),
    ):
        keys_ = hand.advertise()
        out += keys_.values()
        hand.submit(keys_)
        while hand.close():
            out += hand.pending.values()
            replies = hand.respond()
            out += replies.values()
            hand.submit({p: m for p, m in replies.items() if not (drop.get(p, 99) <= 2 and isinstance(m, MaskedInput))})
    # a complaint: the box from party 1 to party 0 does not open
    hand = HandRound(semi_honest_params(5), seed=42)
    bundle = hand.advance(2)[0]
    out.append(hand.clients[0].handle(with_box(bundle, 0, flip(bundle.boxes[0].data, 99))))
    return out


def _real_corpus() -> list[bytes]:
    return [encode_message(m) for m in real_messages()]


def test_round_trip_of_every_real_message() -> None:
    wires = _real_corpus()
    kinds = set()
    for wire in wires:
        message = decode_message(wire)
        kinds.add(type(message))
        assert encode_message(message) == wire
    assert kinds == set(ALL_TYPES)


# -- fuzzing -----------------------------------------------------------------------------------------------------


def _decode_only_decode_errors(data: bytes) -> None:
    try:
        message = decode_message(data)
    except DecodeError:
        return
    except Exception as exc:  # the property under test: nothing else escapes
        pytest.fail(f"{type(exc).__name__}: {exc} for input {data[:64].hex()}...")
    # whatever parses is canonical: it encodes back to the same bytes
    assert encode_message(message) == bytes(data)


def test_ten_thousand_hostile_inputs_raise_only_decode_error() -> None:
    gen = np.random.default_rng(1234)
    wires = _real_corpus()
    count = 0
    # random bytes, with a valid header half of the time
    for _ in range(2500):
        data = bytearray(gen.integers(0, 256, int(gen.integers(0, 300)), dtype=np.uint8).tobytes())
        if len(data) >= 2 and gen.random() < 0.5:
            data[0], data[1] = WIRE_VERSION, int(gen.integers(1, 11))
        _decode_only_decode_errors(bytes(data))
        count += 1
    for wire in wires:
        # every truncation of short messages, a sample of long ones
        cuts = range(len(wire)) if len(wire) < 400 else gen.integers(0, len(wire), 60)
        for cut in cuts:
            _decode_only_decode_errors(wire[: int(cut)])
            count += 1
        # single-byte mutations, biased towards the headers and length fields at the front
        for _ in range(60):
            pos = int(gen.integers(0, min(len(wire), 120) if gen.random() < 0.7 else len(wire)))
            mutated = bytearray(wire)
            mutated[pos] = int(gen.integers(0, 256)) if gen.random() < 0.8 else (mutated[pos] ^ 0x80)
            _decode_only_decode_errors(bytes(mutated))
            count += 1
        # extension and splicing
        _decode_only_decode_errors(wire + b"\x00")
        _decode_only_decode_errors(wire + wire)
        count += 2
    assert count >= 10_000


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_raise_only_decode_error(data: bytes) -> None:
    _decode_only_decode_errors(data)


@settings(max_examples=300, deadline=None)
@given(messages, st.data())
def test_mutated_encodings_raise_only_decode_error(message, data) -> None:
    wire = bytearray(encode_message(message))
    pos = data.draw(st.integers(0, len(wire) - 1))
    wire[pos] = data.draw(st.integers(0, 255))
    _decode_only_decode_errors(bytes(wire))
    cut = data.draw(st.integers(0, len(wire)))
    _decode_only_decode_errors(bytes(wire[:cut]))


# -- structure ---------------------------------------------------------------------------------------------------

HEADER = bytes(16) + struct.pack("<Q", 0)


def _quick_and_small(data: bytes) -> None:
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(DecodeError):
            decode_message(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - start < 0.5
    assert peak < 1 << 20, peak


@pytest.mark.parametrize(
    "body",
    [
        bytes([WIRE_VERSION, KeyRoster.TAG]) + HEADER + struct.pack("<I", 0xFFFFFFFF),
        bytes([WIRE_VERSION, KeyRoster.TAG]) + HEADER + struct.pack("<II", 1, 0xFFFFFFFF) + bytes(8),
        bytes([WIRE_VERSION, SurvivorSet.TAG]) + HEADER + struct.pack("<I", 0xFFFFFFFF),
        bytes([WIRE_VERSION, SurvivorSet.TAG]) + HEADER + struct.pack("<I", MAX_PARTIES),
        bytes([WIRE_VERSION, SurvivorSet.TAG]) + HEADER + struct.pack("<I", MAX_PARTIES + 1) + bytes(4 * 70000),
        bytes([WIRE_VERSION, ShareBundle.TAG]) + HEADER + struct.pack("<II", 0, 0xFFFFFFFF),
        bytes([WIRE_VERSION, ShareBundle.TAG]) + HEADER + struct.pack("<IIII", 0, 1, 3, 0xFFFFFFFF),
        bytes([WIRE_VERSION, MaskedInput.TAG]) + HEADER + struct.pack("<III", 0, 32, 0xFFFFFFFF),
        bytes([WIRE_VERSION, UnmaskRequest.TAG]) + HEADER + struct.pack("<II", 0, 0x7FFFFFFF),
        bytes([WIRE_VERSION, AdvertiseKeys.TAG]) + HEADER + struct.pack("<I", 0) + bytes(64) + b"\xff\xff\xff\xff",
    ],
)
def test_huge_declared_counts_fail_fast_without_allocating(body: bytes) -> None:
    _quick_and_small(body)


def test_counts_beyond_max_parties_are_refused_even_when_the_bytes_exist() -> None:
    ids = list(range(MAX_PARTIES + 1))
    data = bytes([WIRE_VERSION, SurvivorSet.TAG]) + HEADER + struct.pack(f"<I{len(ids)}I", len(ids), *ids)
    with pytest.raises(DecodeError):
        decode_message(data)


def test_version_tag_length_and_type_errors() -> None:
    wire = encode_message(SurvivorSet(session=bytes(16), round=1, survivors=(0, 1, 2)))
    assert decode_message(wire).survivors == (0, 1, 2)
    for version in (0, WIRE_VERSION + 1, 255):
        with pytest.raises(DecodeError, match="version"):
            decode_message(bytes([version]) + wire[1:])
    for tag in (0, 13, 200, 255):  # 11, 12: GraphReveal, GraphSeed
        with pytest.raises(DecodeError, match="tag"):
            decode_message(wire[:1] + bytes([tag]) + wire[2:])
    for short in (b"", b"\x01"):
        with pytest.raises(DecodeError):
            decode_message(short)
    with pytest.raises(DecodeError, match="trailing"):
        decode_message(wire + b"\x00")
    with pytest.raises(DecodeError):
        decode_message(wire, max_bytes=len(wire) - 1)
    assert decode_message(wire, max_bytes=len(wire)) is not None
    with pytest.raises(DecodeError):
        decode_message("not bytes")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        encode_message(Envelope(peer=0, data=b""))  # type: ignore[arg-type]


def test_model_validation_failures_become_decode_errors() -> None:
    base = bytes([WIRE_VERSION, SurvivorSet.TAG]) + HEADER
    with pytest.raises(DecodeError):
        decode_message(base + struct.pack("<III", 2, 5, 5))  # repeated survivor
    with pytest.raises(DecodeError):
        decode_message(base + struct.pack("<II", 1, MAX_PARTIES))  # party id out of range
    masked = bytes([WIRE_VERSION, MaskedInput.TAG]) + HEADER + struct.pack("<II", 0, 24) + struct.pack("<I", 0)
    with pytest.raises(DecodeError):
        decode_message(masked)  # ring_bits 24
    signature = bytes([WIRE_VERSION, SurvivorSignature.TAG]) + HEADER + struct.pack("<II", 0, 3) + b"abc"
    with pytest.raises(DecodeError):
        decode_message(signature)  # 3-byte signature
    huge_round = bytes([WIRE_VERSION, SurvivorSet.TAG]) + bytes(16) + struct.pack("<QI", 2**64 - 1, 0)
    with pytest.raises(DecodeError):
        decode_message(huge_round)
