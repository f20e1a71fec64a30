"""Every (client state, message type) pair: accepted per the table, or rejected with the state unchanged."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from secagg_harness import (
    MESSAGE_TYPES,
    HandRound,
    flip,
    malicious_params,
    semi_honest_params,
    with_box,
)

from protocols import (
    AbortError,
    ClientState,
    InvalidTransitionError,
    ProtocolError,
    RemoteProtocolError,
    SecAggClient,
)
from protocols.secagg import (
    AdvertiseKeys,
    Complaint,
    KeyRoster,
    ShareBundle,
    SurvivorSet,
    SurvivorSignature,
    UnmaskRequest,
)

# -- the whole transition table -----------------------------------------------------------------------------


ACCEPTED = {
    False: {
        (ClientState.ADVERTISED, KeyRoster),
        (ClientState.SHARED, ShareBundle),
        (ClientState.MASKED, UnmaskRequest),
        (ClientState.DONE, UnmaskRequest),
    },
    True: {
        (ClientState.ADVERTISED, KeyRoster),
        (ClientState.SHARED, ShareBundle),
        (ClientState.MASKED, SurvivorSet),
        (ClientState.CONFIRMED, UnmaskRequest),
        (ClientState.DONE, UnmaskRequest),
    },
}


def _reference_messages(malicious: bool) -> dict[type, Any]:
    """One message of every type, all from one complete round of client 0's point of view."""
    params, private = malicious_params(8) if malicious else (semi_honest_params(5), None)
    hand = HandRound(params, seed=30, identity_keys=private)
    sample: dict[type, Any] = {}
    hand.submit(hand.advertise())
    sample[AdvertiseKeys] = hand.clients[0]._s["own"]
    while True:
        pending = hand.close()
        if not pending:
            break
        sample[type(pending[0])] = pending[0]
        replies = hand.respond()
        sample[type(replies[0])] = replies[0]
        hand.submit(replies)
    sample[Complaint] = _client_in(ClientState.COMPLAINED, malicious)._s["complaint"]
    return sample


def _client_in(state: ClientState, malicious: bool) -> SecAggClient:
    params, private = malicious_params(8) if malicious else (semi_honest_params(5), None)
    hand = HandRound(params, seed=30, identity_keys=private)
    client = hand.clients[0]
    if state is ClientState.IDLE:
        return client
    if state is ClientState.ABORTED:
        hand.advance(1)
        roster = hand.pending[0]
        with pytest.raises(AbortError):
            client.handle(roster.model_copy(update={"entries": roster.entries[1:]}))
        return client
    if state is ClientState.CLOSED:
        client.erase()
        return client
    if state is ClientState.COMPLAINED:
        bundle = hand.advance(2)[0]
        assert isinstance(client.handle(with_box(bundle, 0, flip(bundle.boxes[0].data, 99))), Complaint)
        return client
    steps = {
        ClientState.ADVERTISED: 0,
        ClientState.SHARED: 1,
        ClientState.MASKED: 2,
        ClientState.CONFIRMED: 3,
        ClientState.DONE: 4 if malicious else 3,
    }[state]
    hand.advance(1)
    for _ in range(steps):
        hand.submit(hand.respond())
        hand.close()
    assert client.state is state
    return client


@pytest.mark.parametrize("malicious", [False, True], ids=["semi-honest", "malicious"])
def test_every_state_and_message_type(malicious: bool) -> None:
    sample = _reference_messages(malicious)
    assert set(sample) == set(MESSAGE_TYPES) - ({SurvivorSet, SurvivorSignature} if not malicious else set())
    # REVEALED exists only in a SecAgg+ graph toss (these rounds use the complete graph): test_graph_toss.py
    states = [s for s in ClientState if (malicious or s is not ClientState.CONFIRMED) and s is not ClientState.REVEALED]
    for state, kind in itertools.product(states, MESSAGE_TYPES):
        if kind not in sample:
            continue
        client = _client_in(state, malicious)
        before = (client.state, client.export_state())
        try:
            reply = client.handle(sample[kind])
        except AbortError:  # pragma: no cover - a correct message never aborts a session
            pytest.fail(f"{state.name} x {kind.__name__} aborted")
        except ProtocolError as exc:
            assert (state, kind) not in ACCEPTED[malicious], f"{state.name} x {kind.__name__}: {exc!r}"
            assert (client.state, client.export_state()) == before, f"{state.name} x {kind.__name__}"
            if state in (ClientState.ABORTED, ClientState.CLOSED, ClientState.COMPLAINED):
                assert isinstance(exc, InvalidTransitionError)
            else:
                assert isinstance(exc, RemoteProtocolError) and exc.field == "stage"
        else:
            assert (state, kind) in ACCEPTED[malicious], f"{state.name} x {kind.__name__} was accepted"
            assert reply is not None
