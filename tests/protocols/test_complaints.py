"""Finding 5a: one malicious dealer's undecryptable share box no longer aborts the round.

Before, a receiver whose box from dealer j did not open raised `IntegrityError` and rejected its
whole bundle, so the round could not go on through it. Now it answers with a signed `Complaint`
instead of its masked input; the server verifies the signature and drops both the accuser and the
accused (they count against d_max), and the round completes over the others if at least t remain.
Nothing about either party's input is revealed: the accuser never sends its masked input, the
accused's masked input is not summed, and no honest party reveals the self-mask share of either.

The weakened control is the previous client behaviour (a `SecAggClient` whose complaint path
raises `IntegrityError`), run on the same round: it aborts.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from secagg_harness import (
    HandRound,
    expected_ring_sum,
    flip,
    malicious_params,
    party_rng,
    semi_honest_params,
)

from protocols import (
    AbortError,
    ClientState,
    IntegrityError,
    InvalidTransitionError,
    LocalProtocolError,
    RemoteProtocolError,
    SecAggClient,
    SecAggParams,
)
from protocols.primitives import ed25519_sign
from protocols.secagg import (
    Complaint,
    EncryptedShares,
    Envelope,
    MaskedInput,
    Message,
    UnmaskRequest,
    UnmaskResponse,
)
from protocols.secagg._transcript import complaint_statement


def _settings() -> Iterator[tuple[str, SecAggParams, list[bytes] | None]]:
    yield "semi-honest", semi_honest_params(8, dropout_rate=0.25), None  # n=8, d_max=2, t=6
    params, private = malicious_params(8)  # n=8, t=5, quorum=5, d_max=2
    yield "malicious", params, private


SETTINGS = list(_settings())
IDS = [s[0] for s in SETTINGS]


class _OldClient(SecAggClient):
    """The weakened control: the behaviour before complaints, rejecting the whole bundle."""

    def _complain(self, accused: list[int]) -> Any:
        raise IntegrityError(peer_id=accused[0])


def _bad_box(shares: EncryptedShares, victim: int) -> EncryptedShares:
    """The malicious dealer's share message, its box for `victim` replaced by one that cannot open."""
    boxes = tuple(Envelope(peer=e.peer, data=flip(e.data, 200)) if e.peer == victim else e for e in shares.boxes)
    return shares.model_copy(update={"boxes": boxes})


def _round_with_bad_box(
    params: SecAggParams, private: list[bytes] | None, dealer: int, victim: int, seed: int, *, old: bool = False
) -> tuple[HandRound, list[dict[int, Message]]]:
    """Run the round with `dealer` sending `victim` a box that does not open; every client reply is logged."""
    hand = HandRound(params, seed=seed, identity_keys=private)
    if old:
        hand.clients = [
            _OldClient(
                params,
                party_id=p,
                session=hand.session,
                round_number=0,
                identity_key=None if private is None else private[p],
                rng=party_rng(seed, p),
            )
            for p in range(params.num_parties)
        ]
    log: list[dict[int, Message]] = []
    hand.advance(1)
    shares = hand.respond()
    shares[dealer] = _bad_box(shares[dealer], victim)  # type: ignore[arg-type]
    log.append(shares)
    hand.submit(shares)
    while hand.close():
        replies = hand.respond()
        log.append(replies)
        hand.submit(replies)
    return hand, log


@pytest.mark.parametrize(("name", "params", "private"), SETTINGS, ids=IDS)
@pytest.mark.parametrize(("dealer", "victim"), [(3, 5), (6, 1)], ids=["accused-first", "complaint-first"])
def test_one_undecryptable_box_drops_accuser_and_accused_and_the_round_completes(
    name: str, params: SecAggParams, private: list[bytes] | None, dealer: int, victim: int
) -> None:
    hand, log = _round_with_bad_box(params, private, dealer, victim, seed=61)
    result = hand.server.result()
    others = tuple(p for p in range(8) if p not in (dealer, victim))
    assert result.included == others and result.dropped == tuple(sorted((dealer, victim)))
    assert result.complaints == ((victim, dealer),)
    assert np.array_equal(result.ring_sum, expected_ring_sum(params, hand.inputs, others, 61))
    clip = params.encoding.clip_range
    true = sum(np.clip(hand.inputs[p], -clip, clip) for p in others)
    assert np.max(np.abs(np.asarray(result.decoded.weighted_sum) - true)) <= result.decoded.max_abs_error
    # the Bonawitz invariants for both parties
    sent = {type(m): set() for stage in log for m in stage.values()}
    for stage in log:
        for p, m in stage.items():
            sent[type(m)].add(p)
    assert victim not in sent[MaskedInput] and sent[Complaint] == {victim}
    assert dealer in sent[MaskedInput]  # it did send one: it is simply not in the sum
    responses = [m for stage in log for m in stage.values() if isinstance(m, UnmaskResponse)]
    assert {r.sender for r in responses} == set(others)
    revealed_b = {s.peer for r in responses for s in r.self_mask_shares}
    revealed_s = {s.peer for r in responses for s in r.mask_key_shares}
    assert revealed_b == set(others) and revealed_s == {dealer, victim}
    assert hand.clients[victim].state is ClientState.COMPLAINED


@pytest.mark.parametrize(("name", "params", "private"), SETTINGS, ids=IDS)
def test_control_without_complaints_the_same_box_aborts_the_round(
    name: str, params: SecAggParams, private: list[bytes] | None
) -> None:
    with pytest.raises(IntegrityError) as info:
        _round_with_bad_box(params, private, 3, 5, seed=61, old=True)
    assert info.value.peer_id == 3


def test_the_finding_scenario_seven_receivers_still_ends_in_a_typed_abort_never_a_wrong_sum() -> None:
    """A dealer that spoils every box makes all 7 receivers complain: 8 parties dropped, below t."""
    params = semi_honest_params(8, dropout_rate=0.25)
    hand = HandRound(params, seed=62)
    hand.advance(1)
    shares = hand.respond()
    for victim in range(1, 8):
        shares[0] = _bad_box(shares[0], victim)  # type: ignore[arg-type]
    hand.submit(shares)
    hand.close()
    replies = hand.respond()
    assert all(isinstance(replies[p], Complaint) for p in range(1, 8))
    hand.submit(replies)
    with pytest.raises(AbortError, match="masked input collection"):
        hand.close()


def _at_masked_stage(params: SecAggParams, private: list[bytes] | None, seed: int) -> HandRound:
    hand = HandRound(params, seed=seed, identity_keys=private)
    hand.advance(2)
    return hand


def _complaint(hand: HandRound, accuser: int, accused: tuple[int, ...], key: bytes) -> Complaint:
    statement = complaint_statement(hand.server.transcript, accuser, accused)
    return Complaint(
        session=hand.session, round=0, sender=accuser, accused=accused, signature=ed25519_sign(key, statement)
    )


@pytest.mark.parametrize(("name", "params", "private"), SETTINGS, ids=IDS)
def test_forged_complaints_are_rejected_with_integrity_error_and_nothing_changes(
    name: str, params: SecAggParams, private: list[bytes] | None
) -> None:
    hand = _at_masked_stage(params, private, seed=63)
    server = hand.server
    before = server.export_state()
    stranger = bytes(range(32))
    other_key = private[4] if private is not None else hand.clients[4]._s["sign_sk"]
    forged = [
        _complaint(hand, 2, (3,), stranger),  # signed by nobody in the roster
        _complaint(hand, 2, (3,), other_key),  # signed by party 4 in 2's name
    ]
    signing = private[2] if private is not None else hand.clients[2]._s["sign_sk"]
    genuine = _complaint(hand, 2, (3,), signing)
    forged.append(genuine.model_copy(update={"accused": (4,)}))  # signature over another accusation
    for bad in forged:
        with pytest.raises(IntegrityError) as info:
            server.receive(bad)
        assert info.value.peer_id == 2
        assert server.export_state() == before
    server.receive(genuine)  # the real one is accepted
    with pytest.raises(RemoteProtocolError, match="duplicate"):
        server.receive(genuine)


def test_complaints_about_strangers_or_from_parties_that_sent_their_input_are_refused() -> None:
    params = semi_honest_params(8, dropout_rate=0.25)
    hand = _at_masked_stage(params, None, seed=64)
    keys = {p: hand.clients[p]._s["sign_sk"] for p in range(8)}
    replies = hand.respond()
    with pytest.raises(RemoteProtocolError, match="accuse"):
        hand.server.receive(_complaint(hand, 2, (9,), keys[2]))
    hand.server.receive(replies[2])  # 2 sent its masked input
    with pytest.raises(RemoteProtocolError, match="duplicate"):
        hand.server.receive(_complaint(hand, 2, (3,), keys[2]))


def test_the_accuser_never_sends_its_masked_input_even_from_a_restored_snapshot() -> None:
    params = semi_honest_params(8, dropout_rate=0.25)
    hand = _at_masked_stage(params, None, seed=65)
    bundle = hand.pending[5]
    snapshot = hand.clients[5].export_state()
    bad = bundle.model_copy(  # type: ignore[union-attr]
        update={"boxes": tuple(Envelope(peer=e.peer, data=e.data[:-1]) for e in bundle.boxes)}  # type: ignore[union-attr]
    )
    complaint = hand.clients[5].handle(bad)
    assert isinstance(complaint, Complaint) and complaint.accused == tuple(e.peer for e in bundle.boxes)  # type: ignore[union-attr]
    assert set(hand.clients[5]._s) == {"complaint"}
    with pytest.raises(InvalidTransitionError):
        hand.clients[5].handle(bundle)
    # a host that persisted the COMPLAINED stage refuses the older snapshot that could still mask
    with pytest.raises(LocalProtocolError, match="stale"):
        SecAggClient.from_state(snapshot, params, min_stage=ClientState.COMPLAINED)
    restored = SecAggClient.from_state(hand.clients[5].export_state(), params)
    assert restored.state is ClientState.COMPLAINED
    with pytest.raises(InvalidTransitionError):
        restored.handle(bundle)


def test_complaints_count_against_d_max_in_secagg_plus() -> None:
    params = SecAggParams.secagg_plus(20, dimension=4, clip_range=1.0, dropout_rate=0.1, corrupt_fraction=0.05)
    assert not params.complete and params.max_dropped == 2
    graph_of = HandRound(params, seed=66).clients[0].graph

    def pair(exclude: set[int]) -> tuple[int, int]:
        accuser = next(p for p in range(20) if p not in exclude)
        dealer = min(graph_of.neighbours_of(accuser) - exclude)
        return dealer, accuser

    # one complaint: 2 parties out, exactly d_max: the round completes over the other 18
    hand = HandRound(params, seed=66)
    hand.advance(1)
    shares = hand.respond()
    d1, a1 = pair(set())
    shares[d1] = _bad_box(shares[d1], a1)  # type: ignore[arg-type]
    hand.submit(shares)
    hand.close()
    result = hand.run()
    assert len(result.included) == 18 and set(result.dropped) == {d1, a1}
    assert np.array_equal(result.ring_sum, expected_ring_sum(params, hand.inputs, result.included, 66))
    # two complaints: 4 parties out > d_max: the server aborts (every client would refuse the set too)
    hand = HandRound(params, seed=66)
    hand.advance(1)
    shares = hand.respond()
    d2, a2 = pair({d1, a1})
    shares[d1] = _bad_box(shares[d1], a1)  # type: ignore[arg-type]
    shares[d2] = _bad_box(shares[d2], a2)  # type: ignore[arg-type]
    hand.submit(shares)
    hand.close()
    hand.submit(hand.respond())
    with pytest.raises(AbortError, match="d_max"):
        hand.close()
    survivors = tuple(p for p in range(20) if p not in {d1, a1, d2, a2})
    client = hand.clients[survivors[0]]
    assert client.state is ClientState.MASKED
    with pytest.raises(AbortError, match="d_max"):
        client.handle(UnmaskRequest(session=hand.session, round=0, survivors=survivors))
