"""The client's (and server's) own checks, driven by hand: tampering, replays, equivocation."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import pytest
from secagg_harness import (
    OTHER_SESSION,
    HandRound,
    expected_ring_sum,
    flip,
    malicious_params,
    semi_honest_params,
    unchanged,
    with_box,
    with_entry,
)

from protocols import (
    AbortError,
    ClientState,
    DeterministicRandom,
    IntegrityError,
    InvalidTransitionError,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    RoundStep,
    SecAggClient,
    SecAggParams,
    SecAggServer,
    ServerState,
)
from protocols.primitives import (
    LABEL_SHARE_ENCRYPTION,
    derive_key,
    seal,
    x25519_agree,
    x25519_generate,
)
from protocols.secagg import (
    Complaint,
    EncryptedShares,
    Envelope,
    KeyRoster,
    MaskedInput,
    ShareBundle,
    SurvivorSet,
    SurvivorSignature,
    UnmaskRequest,
    UnmaskResponse,
)
from protocols.secagg._transcript import box_aad

# -- share boxes ------------------------------------------------------------------------------------------


def _copy(hand: HandRound, party: int) -> SecAggClient:
    """A fresh session restored from `party`'s exported state (so each tampering starts clean)."""
    return SecAggClient.from_state(hand.clients[party].export_state(), hand.params, rng=DeterministicRandom(party))


def test_flipped_bit_in_share_box_makes_a_complaint_and_never_a_masked_input() -> None:
    """A box that does not open names its dealer in a Complaint; the client leaves the session for good."""
    params = semi_honest_params(6)
    hand = HandRound(params, seed=1)
    bundle = hand.advance(2)[0]
    assert isinstance(bundle, ShareBundle)
    box_len = len(bundle.boxes[0].data)
    tampered = [
        (with_box(bundle, index, flip(bundle.boxes[index].data, bit)), bundle.boxes[index].peer)
        for index, bit in itertools.product(range(len(bundle.boxes)), (0, 95, 96, 500, 8 * box_len - 1))
    ]
    # truncated boxes, and a box relabelled as coming from another peer
    tampered += [
        (with_box(bundle, 0, bundle.boxes[0].data[:20]), bundle.boxes[0].peer),
        (with_box(bundle, 0, b""), bundle.boxes[0].peer),
        (with_box(bundle, 0, bundle.boxes[1].data), bundle.boxes[0].peer),
    ]
    for bad, dealer in tampered:
        client = _copy(hand, 0)
        reply = client.handle(bad)
        assert isinstance(reply, Complaint) and reply.accused == (dealer,)
        assert client.state is ClientState.COMPLAINED
        assert set(client._s) == {"complaint"}  # input, keys and held shares are gone
        with pytest.raises(InvalidTransitionError):
            client.handle(bundle)  # the correct bundle afterwards: still no masked input
    assert hand.clients[0].state is ClientState.SHARED
    result = hand.run()
    assert result.included == tuple(range(6))
    assert np.array_equal(result.ring_sum, expected_ring_sum(params, hand.inputs, result.included, 1))


def test_complaints_and_integrity_errors_are_opaque() -> None:
    params = semi_honest_params(5)
    hand = HandRound(params, seed=2)
    bundle = hand.advance(2)[0]
    complaints: set[tuple[int, ...]] = set()
    for index, box in enumerate(bundle.boxes):
        for bit in range(0, 8 * len(box.data), 37):
            client = _copy(hand, 0)
            complaint = client.handle(with_box(bundle, index, flip(box.data, bit)))
            assert isinstance(complaint, Complaint)
            complaints.add(complaint.accused)
    # which check failed (tag, length, ids, dealer signature) is not in the complaint: only who
    assert complaints == {(b.peer,) for b in bundle.boxes}
    seen: set[tuple[type, tuple[Any, ...], str, Any]] = set()
    mal, private = malicious_params()
    mhand = HandRound(mal, seed=2, identity_keys=private)
    roster = mhand.advance(1)[0]
    assert isinstance(roster, KeyRoster)
    for index in range(len(roster.entries)):
        for field in ("signature", "share_public_key", "mask_public_key"):
            value = getattr(roster.entries[index], field)
            with pytest.raises(IntegrityError) as info:
                mhand.clients[0].handle(with_entry(roster, index, **{field: flip(value, 7)}))
            seen.add((type(info.value), info.value.args, str(info.value), info.value.field))
    assert len(seen) == 1
    (kind, _args, text, field) = seen.pop()
    assert kind is IntegrityError and field is None
    assert text == "integrity check failed"


def test_malformed_box_plaintext_from_a_malicious_peer_is_a_complaint() -> None:
    params = semi_honest_params(6)
    hand = HandRound(params, seed=3)
    roster = hand.advance(1)[0]
    bundle = hand.advance(2)[0]
    victim, evil = hand.clients[0], hand.clients[1]
    share_sk = evil._s["share_sk"]  # party 1 is malicious: it seals whatever it likes
    secret = x25519_agree(share_sk, roster.entries[0].share_public_key)
    key = derive_key(secret, label=LABEL_SHARE_ENCRYPTION, transcript=victim.transcript, a=1, b=0)
    box = seal(key, b"too short", aad=box_aad(victim.transcript, 1, 0), rng=DeterministicRandom(0))
    index = [e.peer for e in bundle.boxes].index(1)
    reply = victim.handle(with_box(bundle, index, box))
    assert isinstance(reply, Complaint) and reply.accused == (1,)


# -- signatures (malicious setting) -------------------------------------------------------------------


def test_flipped_bit_in_roster_signature_is_rejected_and_correct_roster_works() -> None:
    params, private = malicious_params()
    hand = HandRound(params, seed=4, identity_keys=private)
    roster = hand.advance(1)[0]
    assert isinstance(roster, KeyRoster)
    client = hand.clients[0]
    for index in (0, 3, 7):
        entry = roster.entries[index]
        for bit in (0, 255, 511):
            with unchanged(client), pytest.raises(IntegrityError) as info:
                client.handle(with_entry(roster, index, signature=flip(entry.signature, bit)))
            assert info.value.peer_id == entry.sender
        with unchanged(client), pytest.raises(IntegrityError):
            client.handle(with_entry(roster, index, signature=b""))
    result = hand.run()
    assert result.included == tuple(range(8))
    assert np.array_equal(result.ring_sum, expected_ring_sum(params, hand.inputs, result.included, 4))


def test_server_rejects_bad_advertise_signature_unchanged() -> None:
    params, private = malicious_params()
    hand = HandRound(params, seed=4, identity_keys=private)
    keys = hand.advertise()
    bad = keys[2].model_copy(update={"signature": flip(keys[2].signature, 9)})
    with unchanged(hand.server), pytest.raises(IntegrityError):
        hand.server.receive(bad)
    hand.submit(keys)
    assert len(hand.close()) == 8


def test_unmask_request_needs_a_quorum_of_valid_signatures() -> None:
    params, private = malicious_params()  # quorum 5
    hand = HandRound(params, seed=5, identity_keys=private)
    request = hand.advance(4)[0]
    assert isinstance(request, UnmaskRequest) and len(request.signatures) == 8
    sigs = request.signatures

    def with_signatures(signatures: tuple[Envelope, ...]) -> UnmaskRequest:
        return request.model_copy(update={"signatures": signatures})

    # one bad signature among 8: 7 valid >= 5, the client answers
    bad_one = (Envelope(peer=sigs[0].peer, data=flip(sigs[0].data, 1)), *sigs[1:])
    reply = hand.clients[1].handle(with_signatures(bad_one))
    assert isinstance(reply, UnmaskResponse)
    # exactly the quorum, one of them flipped: refuse
    client = hand.clients[2]
    quorum = (Envelope(peer=sigs[0].peer, data=flip(sigs[0].data, 100)), *sigs[1:5])
    with pytest.raises(AbortError):
        client.handle(with_signatures(quorum))
    assert client.state is ClientState.ABORTED
    # signatures relabelled with other peers' ids are not valid either
    relabelled = tuple(Envelope(peer=s.peer, data=sigs[(i + 1) % 8].data) for i, s in enumerate(sigs))
    with pytest.raises(AbortError):
        hand.clients[3].handle(with_signatures(relabelled))
    # too few signatures at all
    with pytest.raises(AbortError):
        hand.clients[4].handle(with_signatures(sigs[:4]))
    assert hand.clients[5].state is ClientState.CONFIRMED
    assert isinstance(hand.clients[5].handle(request), UnmaskResponse)


# -- replays and stages ---------------------------------------------------------------------------------


def test_replayed_messages_from_other_rounds_and_sessions_are_rejected() -> None:
    params = semi_honest_params(5)
    hand = HandRound(params, seed=6)
    roster = hand.advance(1)[0]
    other_round = HandRound(params, seed=6, round_number=1).advance(1)[0]
    other_session = HandRound(params, seed=6, session=OTHER_SESSION).advance(1)[0]
    client = hand.clients[0]
    with unchanged(client), pytest.raises(RemoteProtocolError) as info:
        client.handle(other_round)
    assert info.value.field == "round"
    with unchanged(client), pytest.raises(RemoteProtocolError) as info:
        client.handle(other_session)
    assert info.value.field == "session"
    # this round's roster carrying an entry replayed from another round
    replayed = roster.model_copy(update={"entries": (other_round.entries[0], *roster.entries[1:])})
    with unchanged(client), pytest.raises(RemoteProtocolError):
        client.handle(replayed)
    # a message of a later stage (identical runs exchange identical messages)
    future = HandRound(params, seed=6).advance(2)[0]
    assert isinstance(future, ShareBundle)
    with unchanged(client), pytest.raises(RemoteProtocolError) as info:
        client.handle(future)
    assert info.value.field == "stage"
    # a message only clients send
    with unchanged(client), pytest.raises(RemoteProtocolError) as info:
        client.handle(hand.clients[1]._s["own"])
    assert info.value.field == "stage"
    hand.run()


def test_replays_and_strangers_are_rejected_by_the_server() -> None:
    params = semi_honest_params(6)
    hand = HandRound(params, seed=7)
    twin = HandRound(params, seed=7)
    server = hand.server
    keys = hand.advertise()
    # a stage-1 message while collecting keys
    twin.advance(1)
    early_shares = twin.respond()[0]
    with unchanged(server), pytest.raises(RemoteProtocolError) as info:
        server.receive(early_shares)
    assert info.value.field == "stage"
    other = HandRound(params, seed=7, round_number=3).advertise()
    with unchanged(server), pytest.raises(RemoteProtocolError) as info:
        server.receive(other[0])
    assert info.value.field == "round"
    other = HandRound(params, seed=7, session=OTHER_SESSION).advertise()
    with unchanged(server), pytest.raises(RemoteProtocolError) as info:
        server.receive(other[0])
    assert info.value.field == "session"
    hand.submit(keys)
    with unchanged(server), pytest.raises(RemoteProtocolError):
        server.receive(keys[3])  # duplicate key advertisement
    hand.close()
    shares = hand.respond()
    hand.submit(shares, drop=[5])  # party 5 never shares: it is not in U2
    with unchanged(server), pytest.raises(RemoteProtocolError):
        server.receive(shares[2])  # duplicate
    hand.close()
    masked = hand.respond()
    hand.submit(masked)
    assert server.state is ServerState.COLLECT_MASKED
    with unchanged(server), pytest.raises(RemoteProtocolError) as info:
        server.receive(masked[1])  # duplicate masked input
    assert info.value.field == "sender"
    stranger = MaskedInput(session=hand.session, round=0, sender=5, ring_bits=32, data=masked[1].data)
    with unchanged(server), pytest.raises(RemoteProtocolError) as info:
        server.receive(stranger)  # party 5 is not in U2
    assert info.value.field == "sender"
    hand.close()
    result = hand.run()
    assert result.included == (0, 1, 2, 3, 4)
    assert result.dropped == (5,)
    assert np.array_equal(result.ring_sum, expected_ring_sum(params, hand.inputs, result.included, 7))


def test_server_rejects_masked_input_of_wrong_shape() -> None:
    params = semi_honest_params(5)
    hand = HandRound(params, seed=8)
    hand.advance(2)
    masked = hand.respond()
    for data, bits in ((masked[0].data[:-4], 32), (bytes(masked[0].data) + bytes(4), 32), (masked[0].data, 64)):
        bad = MaskedInput(session=hand.session, round=0, sender=0, ring_bits=bits, data=data)
        with unchanged(hand.server), pytest.raises(RemoteProtocolError):
            hand.server.receive(bad)
    hand.submit(masked)
    hand.close()
    assert hand.run().included == tuple(range(5))


# -- unmasking: never both shares of one peer ----------------------------------------------------------------


def test_second_unmask_request_with_fewer_survivors_aborts() -> None:
    params = semi_honest_params(6)
    hand = HandRound(params, seed=9)
    request = hand.advance(3)[0]
    assert isinstance(request, UnmaskRequest) and request.survivors == tuple(range(6))
    client = hand.clients[0]
    reply = client.handle(request)
    assert isinstance(reply, UnmaskResponse)
    assert {e.peer for e in reply.self_mask_shares} == set(range(6))
    assert reply.mask_key_shares == ()
    assert client.handle(request) == reply  # an identical repeat: the identical answer
    blob = client.export_state()
    smaller = request.model_copy(update={"survivors": (0, 2, 3, 4, 5)})
    with pytest.raises(AbortError):
        client.handle(smaller)
    assert client.state is ClientState.ABORTED
    with pytest.raises(InvalidTransitionError):
        client.handle(request)
    # the ledger survives a restore from the exported state
    restored = SecAggClient.from_state(blob, params)
    assert restored.state is ClientState.DONE
    assert restored.handle(request) == reply
    with pytest.raises(AbortError):
        restored.handle(smaller)


def test_unmask_response_never_reveals_both_shares_of_a_peer() -> None:
    params = semi_honest_params(6)
    hand = HandRound(params, seed=10)
    hand.advance(2)
    hand.submit(hand.respond(), drop=[3])
    request = hand.close()[0]
    assert isinstance(request, UnmaskRequest) and 3 not in request.survivors
    reply = hand.clients[0].handle(request)
    b_peers = {e.peer for e in reply.self_mask_shares}
    s_peers = {e.peer for e in reply.mask_key_shares}
    assert b_peers == set(request.survivors)
    assert s_peers == {3}
    assert not b_peers & s_peers
    # the server now asks again, as if 3 had survived: refused
    with pytest.raises(AbortError):
        hand.clients[0].handle(request.model_copy(update={"survivors": tuple(range(6))}))


def test_survivor_set_naming_a_neighbour_without_shares_aborts() -> None:
    params = semi_honest_params(6)
    hand = HandRound(params, seed=11)
    hand.advance(1)
    hand.submit(hand.respond(), drop=[4])  # 4 never shares
    hand.close()
    hand.submit(hand.respond())
    request = hand.close()[0]
    assert 4 not in request.survivors
    forged = request.model_copy(update={"survivors": (*request.survivors, 4)})
    with pytest.raises(AbortError):
        hand.clients[0].handle(forged)
    assert hand.clients[0].state is ClientState.ABORTED


def test_survivor_set_without_the_client_or_with_strangers_is_rejected() -> None:
    params = semi_honest_params(6)
    hand = HandRound(params, seed=12)
    request = hand.advance(3)[1]
    client = hand.clients[1]
    for survivors in ((0, 2, 3, 4, 5), (0, 1, 2, 3, 4, 5, 6)):
        with unchanged(client), pytest.raises(RemoteProtocolError):
            client.handle(request.model_copy(update={"survivors": survivors}))
    assert isinstance(client.handle(request), UnmaskResponse)


def test_split_view_of_survivors_cannot_reach_quorum() -> None:
    params, private = malicious_params()  # n=8, quorum 5
    hand = HandRound(params, seed=13, identity_keys=private)
    survivor_set = hand.advance(3)[0]
    assert isinstance(survivor_set, SurvivorSet)
    view_a = survivor_set  # all 8
    view_b = survivor_set.model_copy(update={"survivors": tuple(range(7))})  # 7 "dropped"
    group_a, group_b = (4, 5, 6, 7), (0, 1, 2, 3)
    sigs_a = {p: hand.clients[p].handle(view_a) for p in group_a}
    sigs_b = {p: hand.clients[p].handle(view_b) for p in group_b}
    for view, sigs in ((view_a, sigs_a), (view_b, sigs_b)):
        envelopes = tuple(Envelope(peer=p, data=s.signature) for p, s in sorted(sigs.items()))
        request = UnmaskRequest(session=hand.session, round=0, survivors=view.survivors, signatures=envelopes)
        for p in sigs:
            with pytest.raises(AbortError):
                hand.clients[p].handle(request)
            assert hand.clients[p].state is ClientState.ABORTED


def test_unmask_request_for_a_set_the_client_did_not_sign_aborts() -> None:
    params, private = malicious_params()
    hand = HandRound(params, seed=14, identity_keys=private)
    view_a = hand.advance(3)[0]
    view_b = view_a.model_copy(update={"survivors": tuple(range(7))})
    sigs = {p: hand.clients[p].handle(view_a) for p in range(6)}
    hand.clients[6].handle(view_b)
    envelopes = tuple(Envelope(peer=p, data=s.signature) for p, s in sorted(sigs.items()))
    request = UnmaskRequest(session=hand.session, round=0, survivors=view_a.survivors, signatures=envelopes)
    assert isinstance(hand.clients[0].handle(request), UnmaskResponse)  # 6 valid >= quorum 5
    with pytest.raises(AbortError):
        hand.clients[6].handle(request)  # quorum reached, but not on the set 6 signed
    assert hand.clients[6].state is ClientState.ABORTED


def test_malicious_client_signs_only_one_survivor_set() -> None:
    params, private = malicious_params()
    hand = HandRound(params, seed=15, identity_keys=private)
    view = hand.advance(3)[0]
    client = hand.clients[0]
    assert isinstance(client.handle(view), SurvivorSignature)
    other = view.model_copy(update={"survivors": tuple(range(7))})
    with unchanged(client), pytest.raises(RemoteProtocolError):
        client.handle(other)
    early = UnmaskRequest(session=hand.session, round=0, survivors=view.survivors)
    with unchanged(hand.clients[1]), pytest.raises(RemoteProtocolError):
        hand.clients[1].handle(early)  # unmask before the consistency check


def test_semi_honest_client_refuses_a_consistency_check() -> None:
    params = semi_honest_params(5)
    hand = HandRound(params, seed=16)
    request = hand.advance(3)[0]
    client = hand.clients[0]
    with unchanged(client), pytest.raises(RemoteProtocolError):
        client.handle(SurvivorSet(session=hand.session, round=0, survivors=request.survivors))


# -- rosters --------------------------------------------------------------------------------------------


def test_roster_substituting_own_keys_aborts() -> None:
    params = semi_honest_params(6)
    hand = HandRound(params, seed=17)
    roster = hand.advance(1)[0]
    _, fresh = x25519_generate(DeterministicRandom(b"attacker"))
    for field in ("share_public_key", "mask_public_key"):
        twin = HandRound(params, seed=17)
        twin.advance(1)
        with pytest.raises(AbortError):
            twin.clients[0].handle(with_entry(roster, 0, **{field: fresh}))
        assert twin.clients[0].state is ClientState.ABORTED
    without_me = roster.model_copy(update={"entries": roster.entries[1:]})
    with pytest.raises(AbortError):
        hand.clients[0].handle(without_me)
    assert hand.clients[0].state is ClientState.ABORTED


def test_roster_repeating_a_public_key_is_rejected() -> None:
    params = semi_honest_params(6)
    hand = HandRound(params, seed=18)
    roster = hand.advance(1)[0]
    client = hand.clients[0]
    entries = roster.entries
    cases = [
        with_entry(roster, 2, share_public_key=entries[3].share_public_key),
        with_entry(roster, 2, mask_public_key=entries[4].share_public_key),
        with_entry(roster, 5, share_public_key=entries[0].share_public_key),  # reflects the client's own key
    ]
    for bad in cases:
        with unchanged(client), pytest.raises(RemoteProtocolError):
            client.handle(bad)
    stranger = with_entry(roster, 5, sender=6)
    with unchanged(client), pytest.raises(RemoteProtocolError):
        client.handle(stranger)
    assert isinstance(client.handle(roster), EncryptedShares)


def test_roster_with_too_few_holders_aborts() -> None:
    params = semi_honest_params(6)  # t = 5
    hand = HandRound(params, seed=19)
    roster = hand.advance(1)[0]
    small = roster.model_copy(update={"entries": roster.entries[:4]})
    with pytest.raises(AbortError):
        hand.clients[0].handle(small)


def test_low_order_share_key_of_a_peer_is_an_integrity_error() -> None:
    params = semi_honest_params(5)
    hand = HandRound(params, seed=20)
    roster = hand.advance(1)[0]
    bad = with_entry(roster, 3, share_public_key=bytes(32))
    with unchanged(hand.clients[0]), pytest.raises(IntegrityError) as info:
        hand.clients[0].handle(bad)
    assert info.value.peer_id == 3


# -- context binding ----------------------------------------------------------------------------------------


def _play_tolerating_rejections(hand: HandRound) -> tuple[Any, list[ProtocolError]]:
    """Run the round; a client that rejects a message goes silent (the host treats it as dropped)."""
    errors: list[ProtocolError] = []
    silent: set[int] = set()
    try:
        for p, message in sorted(hand.advertise().items()):
            try:
                hand.server.receive(message)
            except RemoteProtocolError as exc:
                errors.append(exc)
                silent.add(p)
        hand.close()
        while hand.pending:
            replies = {}
            for p, m in sorted(hand.pending.items()):
                if p in silent:
                    continue
                try:
                    replies[p] = hand.clients[p].handle(m)
                except RemoteProtocolError as exc:
                    errors.append(exc)
                    silent.add(p)
            for p in sorted(replies):
                try:
                    hand.server.receive(replies[p])
                except RemoteProtocolError as exc:
                    errors.append(exc)
            hand.close()
    except AbortError as exc:
        return None, [*errors, exc]
    return hand.server.result(), errors


@pytest.mark.parametrize("n", [5, 7])
def test_one_client_with_another_context_cannot_join_a_sum(n: int) -> None:
    params = semi_honest_params(n)
    hand = HandRound(params, seed=21, contexts={0: b"model-B"}, server_context=b"model-A")
    result, errors = _play_tolerating_rejections(hand)
    assert any(isinstance(e, RemoteProtocolError) and e.field == "transcript" for e in errors)
    if result is not None:  # whatever completes must exclude party 0 and be exact
        assert 0 not in result.included
        assert np.array_equal(result.ring_sum, expected_ring_sum(params, hand.inputs, result.included, 21))


def test_malicious_server_with_another_context_is_detected() -> None:
    params, private = malicious_params()
    hand = HandRound(
        params, seed=22, identity_keys=private, contexts=dict.fromkeys(range(8), b""), server_context=b"server-only"
    )
    with pytest.raises(RemoteProtocolError, match="transcript"):
        hand.submit(hand.advertise())


def test_server_with_another_context_does_not_return_a_wrong_sum() -> None:
    params = semi_honest_params(6)
    hand = HandRound(params, seed=23, contexts=dict.fromkeys(range(6), b""), server_context=b"other")
    try:
        result = hand.run({2: RoundStep.INPUT})  # party 2 drops after sharing: the server must rebuild its masks
    except ProtocolError:
        return
    assert np.array_equal(result.ring_sum, expected_ring_sum(params, hand.inputs, result.included, 23))


def test_set_input_keeps_a_reference_the_masked_input_encodes_x_as_it_is_at_the_bundle() -> None:
    """No defensive copy (issue 17): set_input checks x and fixes its rounding seed, and the share bundle
    encodes x as it is then. The docstring tells the host not to modify x until the masked input exists;
    this pins what happens if it does, so the contract is not mistaken for a snapshot."""
    params = semi_honest_params(5)
    hand = HandRound(params, seed=24)
    original = [x.copy() for x in hand.inputs]
    hand.advance(1)  # set_input has been called for everyone
    hand.inputs[0][:] = 0.75  # the host reuses its buffer before the bundle
    result = hand.run()
    assert np.array_equal(result.ring_sum, expected_ring_sum(params, hand.inputs, result.included, 24))
    assert not np.array_equal(result.ring_sum, expected_ring_sum(params, original, result.included, 24))


# -- the server's checks on shares and unmask responses -------------------------------------------------------


def test_server_rejects_shares_from_strangers_and_boxes_for_non_neighbours() -> None:
    n = 12
    params = SecAggParams.secagg_plus(n, dimension=4, clip_range=1.0, neighbours=4, threshold=3, allow_insecure=True)
    hand = HandRound(params, seed=25)
    keys = hand.advertise()
    hand.submit(keys, drop=[11])  # 11 never advertises: it is not in U1
    hand.close()
    shares = hand.respond()
    server = hand.server
    non_neighbour = next(p for p in range(n) if p != 0 and p not in server.graph.neighbours_of(0))
    box = shares[0].boxes[0]
    bad = shares[0].model_copy(update={"boxes": (*shares[0].boxes[1:], Envelope(peer=non_neighbour, data=box.data))})
    with unchanged(server), pytest.raises(RemoteProtocolError) as info:
        server.receive(bad)
    assert info.value.field == "boxes"
    stranger = EncryptedShares(session=hand.session, round=0, sender=11, boxes=())
    with unchanged(server), pytest.raises(RemoteProtocolError):
        server.receive(stranger)
    hand.submit(shares)
    hand.close()
    result = hand.run()
    assert result.included == tuple(range(11))
    assert np.array_equal(result.ring_sum, expected_ring_sum(params, hand.inputs, result.included, 25))


def test_server_rejects_unmask_responses_revealing_the_wrong_share() -> None:
    params = semi_honest_params(6)
    hand = HandRound(params, seed=26)
    hand.advance(2)
    hand.submit(hand.respond(), drop=[3])  # 3 drops after sharing
    hand.close()
    replies = hand.respond()
    server = hand.server
    good = replies[0]
    share_of_3 = good.mask_key_shares[0]
    assert share_of_3.peer == 3
    b_share_of_1 = next(e for e in good.self_mask_shares if e.peer == 1)
    bad_responses = [
        # a self-mask share of a dropped party (with its mask-key share: both secrets of 3)
        good.model_copy(update={"self_mask_shares": (*good.self_mask_shares, share_of_3)}),
        # a mask-key share of a survivor
        good.model_copy(update={"mask_key_shares": (*good.mask_key_shares, b_share_of_1)}),
        # a share of a party outside the round
        good.model_copy(update={"mask_key_shares": (share_of_3.model_copy(update={"peer": 9}),)}),
    ]
    for bad in bad_responses:
        with unchanged(server), pytest.raises(RemoteProtocolError):
            server.receive(bad)
    hand.submit(replies)
    hand.close()
    result = server.result()
    assert result.dropped == (3,)
    assert np.array_equal(result.ring_sum, expected_ring_sum(params, hand.inputs, result.included, 26))


def test_forged_share_is_discarded_and_the_sum_rebuilt_from_the_valid_ones() -> None:
    params = semi_honest_params(6)  # t = 5, six responders
    hand = HandRound(params, seed=27)
    hand.advance(3)
    replies = hand.respond()
    forged = replies[0]
    shares = tuple(e.model_copy(update={"share": PRIME_MINUS_ONE}) for e in forged.self_mask_shares)
    replies[0] = forged.model_copy(update={"self_mask_shares": shares})
    hand.submit(replies)
    hand.close()
    result = hand.server.result()
    assert result.misbehaving == (0,) and result.included == tuple(range(6))
    assert np.array_equal(result.ring_sum, expected_ring_sum(params, hand.inputs, result.included, 27))


PRIME_MINUS_ONE = (2**256 + 296).to_bytes(33, "big")


# -- host misuse ---------------------------------------------------------------------------------------------


def test_host_misuse_is_a_local_protocol_error() -> None:
    params = semi_honest_params(5)
    with pytest.raises(LocalProtocolError):
        SecAggClient(params, party_id=5, session=bytes(16), round_number=0)
    with pytest.raises(LocalProtocolError):
        SecAggClient(params, party_id=0, session=bytes(15), round_number=0)
    client = SecAggClient(params, party_id=0, session=bytes(16), round_number=0)
    with pytest.raises(LocalProtocolError):
        client.set_input(np.zeros(3))
    with pytest.raises(LocalProtocolError, match="NaN"):
        client.set_input(np.full(8, np.nan))
    client.advertise_keys()
    with pytest.raises(InvalidTransitionError):
        client.advertise_keys()
    mal, private = malicious_params()
    with pytest.raises(LocalProtocolError):
        SecAggClient(mal, party_id=0, session=bytes(16), round_number=0, identity_key=private[1])
    with pytest.raises(LocalProtocolError):
        SecAggClient(mal, party_id=0, session=bytes(16), round_number=0)


def test_missing_input_at_the_bundle_is_refused_unchanged() -> None:
    params = semi_honest_params(5)
    hand = HandRound(params, seed=28)
    client = hand.clients[0]
    keys = {p: hand.clients[p].advertise_keys() for p in range(5)}  # nobody calls set_input
    hand.submit(keys)
    hand.close()
    hand.submit(hand.respond())
    bundle = hand.close()[0]
    with unchanged(client), pytest.raises(InvalidTransitionError):
        client.handle(bundle)
    client.set_input(hand.inputs[0])  # still allowed in SHARED
    assert isinstance(client.handle(bundle), MaskedInput)
    with pytest.raises(InvalidTransitionError):
        client.set_input(hand.inputs[0])  # too late now


@pytest.mark.parametrize(
    "case", ["client-negative-round", "client-huge-round", "server-negative-round", "server-session"]
)
def test_bad_session_or_round_is_a_local_protocol_error(case: str) -> None:
    params = semi_honest_params(5)
    with pytest.raises(LocalProtocolError):
        if case == "client-negative-round":
            SecAggClient(params, party_id=0, session=bytes(16), round_number=-1)
        elif case == "client-huge-round":
            SecAggClient(params, party_id=0, session=bytes(16), round_number=2**63).advertise_keys()
        elif case == "server-negative-round":
            SecAggServer(params, session=bytes(16), round_number=-1)
        else:
            SecAggServer(params, session=b"short", round_number=0)
