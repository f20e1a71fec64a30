"""The SecAgg+ graph seed: a signed commit-reveal among U1 (malicious setting), or a host's public beacon.

Before, the Harary-graph permutation was a hash of the transcript (session id, round, parameters,
context), all of which the server picks: a server could try session ids offline until the graph
isolated a target among its colluders. The weakened control here is exactly that derivation
(`NeighbourGraph(n, k, transcript)`, also forced onto real sessions by patching `graph_mode`): 200
offline tries find a session that puts every neighbour of T in the colluder set. With the toss the
graph is a hash of every party's nonce, each committed to in its signed keys before any is
revealed: for that same session it is no longer the bad graph, and the server can only abort.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest
from secagg_harness import (
    HandRound,
    bundle_close,
    expected_ring_sum,
    flip,
    malicious_params,
    malicious_plus_params,
    party_rng,
    random_inputs,
    round_graph,
    semi_honest_params,
    unchanged,
    with_entry,
)

from protocols import (
    AbortError,
    ClientState,
    DecodeError,
    InvalidTransitionError,
    LocalProtocolError,
    RemoteProtocolError,
    RoundStep,
    SecAggClient,
    SecAggParams,
    SecAggServer,
    ServerState,
    decode_message,
    encode_message,
    run_round,
)
from protocols.driver import goes_silent
from protocols.primitives import ed25519_public
from protocols.secagg import (
    AdvertiseKeys,
    EncryptedShares,
    Envelope,
    GraphMode,
    GraphReveal,
    GraphSeed,
    KeyRoster,
    NeighbourGraph,
    SecAggFamily,
    ShareBundle,
    SurvivorSet,
    UnmaskRequest,
)
from protocols.secagg import _client as client_module
from protocols.secagg import _server as server_module
from protocols.secagg._transcript import (
    beacon_graph_seed,
    graph_commitment,
    toss_graph_seed,
    transcript_hash,
)

T = 0  # the target
COLLUDERS = frozenset({1, 2, 3, 4, 5})  # 5 of the 9 others work for the server


def _params() -> tuple[SecAggParams, list[bytes]]:
    params, private = malicious_plus_params(10)  # k = 4, t = 4
    assert (params.neighbours, params.threshold) == (4, 4)
    return params, private


def _session(i: int) -> bytes:
    return hashlib.sha256(b"ground/%d" % i).digest()[:16]


def _isolated(graph: NeighbourGraph) -> bool:
    return graph.neighbours_of(T) <= COLLUDERS


def _grind(params: SecAggParams) -> bytes | None:
    """The attack, offline: the first of 200 session ids whose transcript graph isolates T, if any."""
    for i in range(200):
        transcript = transcript_hash(session=_session(i), round_number=0, params_digest=params.digest(), context=b"")
        if _isolated(NeighbourGraph(params.num_parties, params.neighbours, transcript)):
            return _session(i)
    return None


def _tossed_graph(params: SecAggParams, private: list[bytes], session: bytes, seed: int) -> NeighbourGraph:
    """Run the toss with real sessions (every party draws from party_rng(seed, .)); the graph T builds."""
    hand = HandRound(params, seed=seed, identity_keys=private, session=session)
    hand.advance(2)  # keys, reveals: the GraphSeed is pending
    hand.submit(hand.respond())
    assert hand.clients[T].graph.seed == hand.server.graph.seed
    return hand.clients[T].graph


# -- (a) grinding: the server can choose the transcript graph, not the tossed one ---------------------------


def test_control_grinding_the_transcript_graph_isolates_the_target(monkeypatch: pytest.MonkeyPatch) -> None:
    params, private = _params()
    session = _grind(params)
    assert session is not None  # 200 offline tries suffice (each succeeds with C(5,4)/C(9,4) = 4%)
    # today's behaviour on real sessions: the graph is derived from the transcript
    for module in (client_module, server_module):
        monkeypatch.setattr(module, "graph_mode", lambda **_: GraphMode.TRANSCRIPT)
    hand = HandRound(params, seed=1, identity_keys=private, session=session)
    assert _isolated(hand.clients[T].graph) and _isolated(hand.server.graph)
    result = hand.run()  # an honest-looking round: T shares and masks with colluders only
    assert T in result.included


def test_the_tossed_graph_is_a_function_of_the_nonces_not_of_the_chosen_session() -> None:
    params, private = _params()
    session = _grind(params)
    assert session is not None
    transcript = transcript_hash(session=session, round_number=0, params_digest=params.digest(), context=b"")
    graphs = [_tossed_graph(params, private, session, seed) for seed in range(25)]
    # same session, fresh nonces: a different graph every time, each the hash of the revealed nonces
    assert len({g.seed for g in graphs}) == 25
    assert all(g.seed != transcript for g in graphs)
    # the session the server ground for gives it the base rate (about 4%), not a sure win (control: 25 of 25)
    assert sum(_isolated(g) for g in graphs) <= 5


def test_the_seed_is_the_hash_of_every_revealed_nonce() -> None:
    params, private = _params()
    hand = HandRound(params, seed=3, identity_keys=private)
    seed_message = hand.advance(2)[0]
    assert isinstance(seed_message, GraphSeed)
    reveals = {e.peer: e.data for e in seed_message.reveals}
    assert set(reveals) == set(range(10))
    assert hand.server.graph.seed == toss_graph_seed(hand.server.transcript, reveals)
    # each nonce opens the commitment its party signed in AdvertiseKeys
    own = {p: c._s["own"] for p, c in enumerate(hand.clients)}
    assert all(graph_commitment(hand.server.transcript, p, n) == own[p].graph_commitment for p, n in reveals.items())


def test_the_commitment_is_signed() -> None:
    """A server that swaps a commitment (for one whose nonce it knows) breaks the party's signature."""
    params, private = _params()
    hand = HandRound(params, seed=4, identity_keys=private)
    roster = hand.advance(1)[0]
    forged = with_entry(roster, 3, graph_commitment=graph_commitment(hand.server.transcript, 3, bytes(32)))
    client = hand.clients[0]
    with unchanged(client), pytest.raises(RemoteProtocolError) as info:
        client.handle(forged)
    assert info.value.peer_id == 3  # IntegrityError: the signature covers the commitment
    assert isinstance(client.handle(roster), GraphReveal)  # control: the genuine roster is accepted


# -- (b) missing or wrong reveals abort; a bad toss result is refused ---------------------------------------


def test_a_missing_reveal_aborts_the_round_and_nobody_is_dropped() -> None:
    params, private = _params()
    hand = HandRound(params, seed=5, identity_keys=private)
    hand.advance(1)
    reveals = hand.respond()
    hand.submit(reveals, drop=[7])  # 9 of 10 revealed: far above t = 4, still no round
    with pytest.raises(AbortError, match=r"graph toss aborted: parties \[7\] did not reveal"):
        hand.server.close_stage()
    assert hand.server.state is ServerState.ABORTED
    with pytest.raises(InvalidTransitionError):
        hand.server.receive(reveals[7])  # too late: the toss is over


def test_control_all_reveals_give_every_party_the_seed() -> None:
    params, private = _params()
    hand = HandRound(params, seed=5, identity_keys=private)
    out = hand.advance(2)
    assert set(out) == set(range(10)) and all(isinstance(m, GraphSeed) for m in out.values())


def test_a_wrong_reveal_aborts_naming_the_party() -> None:
    params, private = _params()
    hand = HandRound(params, seed=6, identity_keys=private)
    hand.advance(1)
    reveals = hand.respond()
    bad = reveals[2].model_copy(update={"nonce": flip(reveals[2].nonce, 0)})
    with pytest.raises(AbortError, match="party 2 revealed a nonce that does not open its signed commitment"):
        hand.server.receive(bad)
    assert hand.server.state is ServerState.ABORTED


def _revealed(seed: int = 8) -> tuple[HandRound, GraphSeed]:
    params, private = _params()
    hand = HandRound(params, seed=seed, identity_keys=private)
    message = hand.advance(2)[0]
    assert isinstance(message, GraphSeed) and hand.clients[0].state is ClientState.REVEALED
    return hand, message


def test_a_toss_result_missing_a_member_is_refused() -> None:
    hand, message = _revealed()
    client = hand.clients[0]
    short = message.model_copy(update={"reveals": message.reveals[:5] + message.reveals[6:]})
    with unchanged(client), pytest.raises(RemoteProtocolError, match=r"missing \[5\]") as info:
        client.handle(short)
    assert info.value.field == "reveals"
    assert isinstance(client.handle(message), EncryptedShares)  # control: the complete result


@pytest.mark.parametrize("party", [0, 4], ids=["own", "peer"])
def test_a_toss_result_with_a_changed_nonce_is_refused(party: int) -> None:
    hand, message = _revealed()
    client = hand.clients[0]
    reveals = list(message.reveals)
    reveals[party] = Envelope(peer=party, data=flip(reveals[party].data, 9))
    with unchanged(client), pytest.raises(RemoteProtocolError) as info:
        client.handle(message.model_copy(update={"reveals": tuple(reveals)}))
    assert info.value.field == "reveals"
    assert ("own nonce" in str(info.value)) if party == 0 else info.value.peer_id == party


def test_a_toss_result_naming_a_party_outside_the_roster_is_refused() -> None:
    params, private = _params()
    hand = HandRound(params, seed=9, identity_keys=private)
    hand.submit(hand.advertise(), drop=[9])  # 9 is not in U1
    hand.close()
    hand.submit(hand.respond())
    message = hand.close()[0]
    extra = Envelope(peer=9, data=bytes(32))
    with pytest.raises(RemoteProtocolError, match=r"not in the roster \[9\]"):
        hand.clients[0].handle(message.model_copy(update={"reveals": (*message.reveals, extra)}))


def test_a_roster_without_commitments_is_refused_by_client_and_server() -> None:
    params, private = _params()
    hand = HandRound(params, seed=10, identity_keys=private)
    adverts = hand.advertise()
    with unchanged(hand.server), pytest.raises(RemoteProtocolError, match="graph_commitment") as info:
        hand.server.receive(adverts[1].model_copy(update={"graph_commitment": b""}))
    assert info.value.field == "graph_commitment"
    hand.submit(adverts)
    roster = hand.close()[0]
    client = hand.clients[0]
    with unchanged(client), pytest.raises(RemoteProtocolError, match="advertised no graph_commitment") as info:
        client.handle(with_entry(roster, 2, graph_commitment=b""))
    assert info.value.field == "graph_commitment" and info.value.peer_id == 2


def test_survivor_signatures_bind_the_graph_seed() -> None:
    """Parties shown different rosters (hence seeds) never accept each other's consistency signatures."""
    params, private = _params()
    hand = HandRound(params, seed=11, identity_keys=private)
    survivor_set = hand.advance(bundle_close(params) + 1)[0]
    assert isinstance(survivor_set, SurvivorSet)
    signatures = hand.respond()
    hand.submit(signatures)
    request = hand.close()[0]
    assert isinstance(request, UnmaskRequest)
    client = hand.clients[0]
    client._s["graph_seed"] = bytes(32)  # as if its toss had another result than its peers'
    with pytest.raises(AbortError, match="valid survivor signatures"):
        client.handle(request)


# -- (c) a full malicious SecAgg+ round with dropouts after the toss ------------------------------------------


_A, _S, _I, _C, _U = RoundStep.ADVERTISE, RoundStep.SHARE, RoundStep.INPUT, RoundStep.CONFIRM, RoundStep.UNMASK


@pytest.mark.parametrize(
    "drop_at",
    [{2: _S, 5: _I, 8: _U}, {3: _A, 6: _S}, {1: _C, 4: _U}],
    ids=["share-input-unmask", "advertise-share", "confirm-unmask"],
)
def test_full_round_with_dropouts_after_the_toss_is_exact(drop_at: dict[int, RoundStep]) -> None:
    n = 20
    private = [hashlib.sha256(b"toss-id/%d" % p).digest() for p in range(n)]
    params = SecAggParams.secagg_plus(
        n, dimension=30, clip_range=1.0, dropout_rate=0.2, identity_keys=tuple(ed25519_public(k) for k in private)
    )
    assert params.malicious and not params.complete
    inputs = random_inputs(n, 30, 1.0, seed=12)
    session = _session(12)
    seen: list[int] = []
    report = run_round(
        params,
        inputs,
        drop_at=drop_at,
        session=session,
        identity_keys=private,
        rng_for=lambda p: party_rng(12, p),
        tap=lambda _p, wire: seen.append(wire[1]),
    )
    result = report.result
    gone_before_mask = {p for p, s in drop_at.items() if s.rank <= RoundStep.INPUT.rank}
    assert set(result.included) == set(range(n)) - gone_before_mask
    assert np.array_equal(result.ring_sum, expected_ring_sum(params, inputs, result.included, 12))
    assert seen.count(GraphReveal.TAG) == n - sum(1 for s in drop_at.values() if s is _A)  # all of U1 revealed
    graph = round_graph(params, session=session, seed=12, inputs=inputs, identity_keys=private, drop_at=drop_at)
    transcript = transcript_hash(session=session, round_number=0, params_digest=params.digest(), context=b"")
    assert graph.seed != transcript


def test_drop_at_orders_the_reveal_between_keys_and_shares() -> None:
    step = SecAggFamily(semi_honest_params(5)).step_of
    assert step(GraphReveal) is RoundStep.REVEAL
    assert goes_silent("advertise", step(GraphReveal)) and goes_silent(RoundStep.REVEAL, step(GraphReveal))
    assert goes_silent(RoundStep.REVEAL, step(EncryptedShares)) and goes_silent(5, step(GraphReveal))  # legacy label
    assert not goes_silent(RoundStep.SHARE, step(GraphReveal)) and not goes_silent("reveal", step(AdvertiseKeys))
    assert not goes_silent(None, step(GraphReveal))


def test_a_party_silent_at_the_reveal_aborts_run_round() -> None:
    params, private = _params()
    with pytest.raises(AbortError, match=r"parties \[6\] did not reveal"):
        run_round(
            params,
            random_inputs(10, 8, 1.0, 13),
            drop_at={6: RoundStep.REVEAL},
            identity_keys=private,
            session=_session(13),
        )


# -- (d) beacon mode ----------------------------------------------------------------------------------------


BEACON = hashlib.sha256(b"drand round 4242").digest()


def test_same_beacon_on_both_sides_has_no_extra_stage() -> None:
    params, private = _params()
    inputs = random_inputs(10, 8, 1.0, 14)
    tags: list[int] = []
    result = run_round(
        params,
        inputs,
        session=_session(14),
        identity_keys=private,
        beacon=BEACON,
        rng_for=lambda p: party_rng(14, p),
        tap=lambda _p, wire: tags.append(wire[1]),
    ).result
    assert result.included == tuple(range(10))
    assert np.array_equal(result.ring_sum, expected_ring_sum(params, inputs, result.included, 14))
    assert GraphReveal.TAG not in tags
    hand = HandRound(params, seed=14, identity_keys=private, session=_session(14), beacon=BEACON)
    expected = beacon_graph_seed(hand.server.transcript, BEACON)
    assert hand.server.graph.seed == hand.clients[0].graph.seed == expected
    assert isinstance(hand.advance(2)[0], ShareBundle)  # keys, shares: no toss


@pytest.mark.parametrize("setting", ["malicious", "semi-honest"])
def test_different_beacons_fail_with_a_typed_error(setting: str) -> None:
    if setting == "malicious":
        params, private = _params()
    else:
        params, private = semi_honest_params(6), None
    other = hashlib.sha256(b"drand round 4243").digest()
    hand = HandRound(params, seed=15, identity_keys=private, beacon=BEACON, beacons={3: other})
    adverts = hand.advertise()
    with unchanged(hand.server), pytest.raises(RemoteProtocolError, match="another beacon value") as info:
        hand.server.receive(adverts[3])
    assert info.value.field == "graph_commitment"
    # the client side: keys bound to another beacon in the roster are refused too
    hand.submit(adverts, drop=[3])
    roster = hand.close()[0]
    assert isinstance(roster, KeyRoster)
    odd = hand.clients[3]
    with unchanged(odd), pytest.raises(RemoteProtocolError, match="beacon") as info:
        odd.handle(roster.model_copy(update={"entries": (*roster.entries, adverts[3])}))
    assert info.value.field == "graph_commitment"


def test_beacon_on_one_side_only_is_refused() -> None:
    params, private = _params()
    server_only = HandRound(params, seed=16, identity_keys=private, beacon=BEACON, beacons=dict.fromkeys(range(10)))
    with pytest.raises(RemoteProtocolError, match="graph_commitment"):
        server_only.server.receive(server_only.advertise()[0])  # a toss commitment, not the beacon binding
    # a client with a beacon among tossing peers: its binding looks like a commitment to the server,
    # but the roster it gets holds commitments, not its binding: refused there, by the client
    client_only = HandRound(params, seed=16, identity_keys=private, beacons={0: BEACON})
    roster = client_only.advance(1)[0]
    with unchanged(client_only.clients[0]), pytest.raises(RemoteProtocolError, match="another beacon") as info:
        client_only.clients[0].handle(roster)
    assert info.value.field == "graph_commitment"


def test_a_short_beacon_is_refused() -> None:
    params, private = _params()
    with pytest.raises(LocalProtocolError, match="beacon"):
        SecAggClient(params, party_id=0, session=bytes(16), round_number=0, identity_key=private[0], beacon=bytes(31))
    with pytest.raises(LocalProtocolError, match="beacon"):
        SecAggServer(params, session=bytes(16), round_number=0, beacon=b"x" * 16)


@pytest.mark.parametrize("setting", ["semi-honest secagg+", "malicious secagg"])
def test_semi_honest_and_complete_graph_keep_todays_flow(setting: str) -> None:
    if setting == "malicious secagg":
        params, private = malicious_params(8)  # identity keys, complete graph
        assert params.complete
    else:
        params, private = SecAggParams.secagg_plus(20, dimension=4, clip_range=1.0, dropout_rate=0.1), None
        assert not params.complete and not params.malicious
    hand = HandRound(params, seed=17, identity_keys=private)
    assert hand.server.graph_mode is GraphMode.TRANSCRIPT and hand.server.graph.seed == hand.server.transcript
    assert hand.clients[0].graph.seed == hand.server.transcript  # today's graph, byte for byte
    assert isinstance(hand.advance(2)[0], ShareBundle)  # keys, shares: no toss
    assert all(m.graph_commitment == b"" for m in hand.server._keys.values())


# -- (f) transitions ------------------------------------------------------------------------------------------


def test_graph_messages_at_the_wrong_client_state_raise_the_stage_error() -> None:
    hand, seed_message = _revealed(18)
    client = hand.clients[0]
    roster = KeyRoster(session=hand.session, round=0, entries=())
    for wrong in (roster, ShareBundle(session=hand.session, round=0, recipient=0, boxes=())):
        with unchanged(client), pytest.raises(RemoteProtocolError) as info:
            client.handle(wrong)  # REVEALED takes only the toss result
        assert info.value.field == "stage"
    other = HandRound(hand.params, seed=18, identity_keys=[c._identity_key for c in hand.clients])
    other.advance(1)
    early = other.clients[0]
    with unchanged(early), pytest.raises(RemoteProtocolError) as info:
        early.handle(seed_message.model_copy(update={"session": other.session}))  # ADVERTISED: roster first
    assert info.value.field == "stage"
    client.handle(seed_message)  # SHARED now
    with unchanged(client), pytest.raises(RemoteProtocolError) as info:
        client.handle(seed_message)  # a second toss result
    assert info.value.field == "stage"
    client.erase()
    with pytest.raises(InvalidTransitionError):
        client.handle(seed_message)
    semi = HandRound(semi_honest_params(6), seed=18)
    semi.advance(1)
    with unchanged(semi.clients[0]), pytest.raises(RemoteProtocolError) as info:
        semi.clients[0].handle(GraphSeed(session=semi.session, round=0, reveals=()))
    assert info.value.field == "stage"


def test_graph_reveal_at_the_wrong_server_stage_raises_the_stage_error() -> None:
    params, private = _params()
    hand = HandRound(params, seed=19, identity_keys=private)
    reveal = GraphReveal(session=hand.session, round=0, sender=0, nonce=bytes(32))
    with unchanged(hand.server), pytest.raises(RemoteProtocolError) as info:
        hand.server.receive(reveal)  # COLLECT_KEYS
    assert info.value.field == "stage"
    hand.advance(1)
    shares = EncryptedShares(session=hand.session, round=0, sender=0, boxes=())
    with unchanged(hand.server), pytest.raises(RemoteProtocolError) as info:
        hand.server.receive(shares)  # COLLECT_REVEALS: shares before the graph exists
    assert info.value.field == "stage"
    hand.advance(2)
    with unchanged(hand.server), pytest.raises(RemoteProtocolError) as info:
        hand.server.receive(reveal)  # COLLECT_SHARES
    assert info.value.field == "stage"
    semi = HandRound(semi_honest_params(6), seed=19)
    semi.advance(1)
    with unchanged(semi.server), pytest.raises(RemoteProtocolError) as info:
        semi.server.receive(reveal.model_copy(update={"session": semi.session}))
    assert info.value.field == "stage"


def test_the_graph_is_unknown_before_the_toss() -> None:
    params, private = _params()
    hand = HandRound(params, seed=20, identity_keys=private)
    with pytest.raises(InvalidTransitionError, match="graph toss"):
        _ = hand.server.graph
    hand.advance(1)
    with pytest.raises(InvalidTransitionError, match="graph toss"):
        _ = hand.clients[0].graph
    assert not hand.clients[0].revealed_graph_nonce
    hand.submit(hand.respond())
    assert hand.clients[0].revealed_graph_nonce and hand.clients[0].state is ClientState.REVEALED


# -- state export and the codec ---------------------------------------------------------------------------------


def test_client_state_round_trips_through_the_toss_and_refuses_rollback() -> None:
    hand, message = _revealed(21)
    params, key = hand.params, hand.clients[0]._identity_key
    blob = hand.clients[0].export_state()
    restored = SecAggClient.from_state(blob, params, identity_key=key, min_stage=ClientState.REVEALED)
    assert restored.state is ClientState.REVEALED and restored.revealed_graph_nonce
    reply = restored.handle(message)
    assert isinstance(reply, EncryptedShares)
    shared = restored.export_state()
    again = SecAggClient.from_state(shared, params, identity_key=key, min_stage=ClientState.SHARED)
    assert (
        again.graph.seed
        == restored.graph.seed
        == toss_graph_seed(restored.transcript, {e.peer: e.data for e in message.reveals})
    )
    with pytest.raises(LocalProtocolError, match="stale"):
        SecAggClient.from_state(blob, params, identity_key=key, min_stage=ClientState.SHARED)
    advertised = HandRound(params, seed=21, identity_keys=[c._identity_key for c in hand.clients])
    advertised.advertise()
    with pytest.raises(LocalProtocolError, match="stale"):
        SecAggClient.from_state(advertised.clients[0].export_state(), params, identity_key=key,
                                min_stage=ClientState.REVEALED)  # fmt: skip


def test_client_state_without_its_toss_records_is_refused() -> None:
    from protocols.secagg._client_state import _HEAD, pack_records, read_records

    hand, _ = _revealed(22)
    blob = hand.clients[0].export_state()
    head = _HEAD.size
    records = read_records(blob, head, set(range(256)))
    for fid in (14, 15):  # graph_nonce, commitments
        stripped = blob[:head] + pack_records([(f, r) for f, r in records.items() if f != fid])
        with pytest.raises(DecodeError):
            SecAggClient.from_state(stripped, hand.params, identity_key=hand.clients[0]._identity_key)
    # a REVEALED blob loaded as a session that runs no toss (a beacon is given)
    with pytest.raises((DecodeError, LocalProtocolError)):
        SecAggClient.from_state(blob, hand.params, identity_key=hand.clients[0]._identity_key, beacon=BEACON)


def test_server_state_mid_toss_round_trips() -> None:
    params, private = _params()
    hand = HandRound(params, seed=23, identity_keys=private)
    hand.advance(1)
    reveals = hand.respond()
    for p in range(5):
        hand.server.receive(reveals[p])
    blob = hand.server.export_state()
    restored = SecAggServer.from_state(blob, params)
    assert restored.state is ServerState.COLLECT_REVEALS
    for p in range(5, 10):
        restored.receive(reveals[p])
    out = restored.close_stage()
    later = SecAggServer.from_state(restored.export_state(), params)
    assert later.graph.seed == restored.graph.seed
    assert isinstance(out[0][1], GraphSeed)
    with pytest.raises(DecodeError):
        SecAggServer.from_state(blob, params, beacon=BEACON)  # a toss in a session that runs none


def test_codec_round_trips_and_refuses_malformed_graph_messages() -> None:
    reveal = GraphReveal(session=bytes(16), round=3, sender=7, nonce=os.urandom(32))
    seed = GraphSeed(
        session=bytes(16), round=3, reveals=(Envelope(peer=1, data=bytes(32)), Envelope(peer=4, data=b"\1" * 32))
    )
    for message in (reveal, seed):
        assert decode_message(encode_message(message)) == message
    wire = encode_message(seed)
    with pytest.raises(DecodeError):
        decode_message(wire[:-1])
    bad_nonce = GraphSeed.model_construct(session=bytes(16), round=3, reveals=(Envelope(peer=1, data=bytes(31)),))
    with pytest.raises(DecodeError, match="32 bytes"):
        decode_message(encode_message(bad_nonce))
    unsorted = GraphSeed.model_construct(
        session=bytes(16), round=3, reveals=(Envelope(peer=4, data=bytes(32)), Envelope(peer=1, data=bytes(32)))
    )
    with pytest.raises(DecodeError, match="sorted"):
        decode_message(encode_message(unsorted))
    with pytest.raises(DecodeError):
        decode_message(encode_message(reveal)[:-3])
    advert = AdvertiseKeys.model_construct(
        session=bytes(16), round=0, sender=0, transcript=bytes(32), share_public_key=bytes(32),
        mask_public_key=b"\1" * 32, signature=b"", signing_public_key=b"", graph_commitment=bytes(31),
    )  # fmt: skip
    with pytest.raises(DecodeError, match="graph_commitment"):
        decode_message(encode_message(advert))
