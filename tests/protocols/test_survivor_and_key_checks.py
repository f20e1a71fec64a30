"""Checks added after the security review: SecAgg+ survivor-set floor, share-box coverage, key and signature binding."""

from __future__ import annotations

import pytest
from secagg_harness import (
    HandRound,
    malicious_params,
    semi_honest_params,
    unchanged,
)

from protocols import (
    AbortError,
    ClientState,
    IntegrityError,
    InvalidTransitionError,
    RemoteProtocolError,
    SecAggParams,
)
from protocols.secagg import (
    UnmaskRequest,
)

# -- regressions from the security review ----------------------------------------------------------------------


def _secagg_plus_params(n: int = 20) -> SecAggParams:
    return SecAggParams.secagg_plus(n, dimension=4, clip_range=1.0, dropout_rate=0.1, corrupt_fraction=0.05)


def test_secagg_plus_client_refuses_a_survivor_set_that_implies_too_many_dropouts() -> None:
    """A server that declares a ring segment dropped could cut a small group out of the graph."""
    params = _secagg_plus_params()
    hand = HandRound(params, seed=41)
    hand.advance(3)  # everyone has sent its masked input
    client = hand.clients[0]
    far = [p for p in range(params.num_parties) if p != 0 and p not in client.graph.neighbours_of(0)]
    survivors = tuple(p for p in range(params.num_parties) if p not in far[: params.max_dropped + 1])
    with pytest.raises(AbortError, match="d_max"):
        client.handle(UnmaskRequest(session=hand.session, round=0, survivors=survivors))
    assert client.state is ClientState.ABORTED
    ok = tuple(p for p in range(params.num_parties) if p not in far[: params.max_dropped])
    other = next(p for p in ok if p != 0)
    assert hand.clients[other].handle(UnmaskRequest(session=hand.session, round=0, survivors=ok))


def test_client_refuses_a_survivor_set_below_threshold() -> None:
    params = semi_honest_params(6, dropout_rate=0.5, threshold=3)
    hand = HandRound(params, seed=42)
    hand.advance(3)
    with pytest.raises(AbortError, match="below threshold"):
        hand.clients[0].handle(UnmaskRequest(session=hand.session, round=0, survivors=(0, 1)))


def test_server_rejects_share_boxes_that_leave_out_a_neighbour() -> None:
    """Otherwise the sender could drop and have the server remove a mask its neighbour never added."""
    params = semi_honest_params(6)
    hand = HandRound(params, seed=43)
    hand.advance(1)
    shares = hand.respond()
    short = shares[0].model_copy(update={"boxes": shares[0].boxes[1:]})
    with unchanged(hand.server), pytest.raises(RemoteProtocolError) as info:
        hand.server.receive(short)
    assert info.value.field == "boxes"


def test_server_rejects_repeated_and_low_order_keys() -> None:
    params = semi_honest_params(6)
    hand = HandRound(params, seed=44)
    keys = hand.advertise()
    hand.server.receive(keys[0])
    copied = keys[1].model_copy(update={"mask_public_key": keys[0].mask_public_key})
    with unchanged(hand.server), pytest.raises(RemoteProtocolError, match="repeated"):
        hand.server.receive(copied)
    low_order = keys[1].model_copy(update={"mask_public_key": bytes(32)})
    with unchanged(hand.server), pytest.raises(IntegrityError):
        hand.server.receive(low_order)
    hand.server.receive(keys[1])


def test_a_signature_is_bound_to_its_signer() -> None:
    """A survivor signature replayed under another party's id does not count toward the quorum."""
    from protocols.primitives import ed25519_sign
    from protocols.secagg._transcript import survivors_statement

    params, private = malicious_params()
    hand = HandRound(params, seed=45, identity_keys=private)
    transcript = hand.server.transcript
    survivors = tuple(range(8))
    assert survivors_statement(transcript, 1, survivors) != survivors_statement(transcript, 2, survivors)
    signature = ed25519_sign(private[1], survivors_statement(transcript, 1, survivors))
    from protocols.primitives import ed25519_verify

    with pytest.raises(IntegrityError):
        ed25519_verify(params.identity_keys[2], signature, survivors_statement(transcript, 2, survivors))


def test_erase_ends_the_session() -> None:
    params = semi_honest_params(6)
    hand = HandRound(params, seed=46)
    hand.advance(1)
    client = hand.clients[0]
    client.erase()
    assert client.state is ClientState.CLOSED
    with pytest.raises(InvalidTransitionError):
        client.handle(hand.pending[0])
