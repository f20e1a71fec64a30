"""Exported client state: a host that re-creates sessions between stages gets the same round."""

from __future__ import annotations

import numpy as np
import pytest

from protocols import (
    AbortError,
    DecodeError,
    DeterministicRandom,
    LocalProtocolError,
    SecAggClient,
    SecAggParams,
    SecAggServer,
)
from protocols.secagg import ClientState, MaskedInput, UnmaskRequest

N, D = 6, 40
SESSION = bytes(range(16))


def _params() -> SecAggParams:
    return SecAggParams.secagg(N, dimension=D, clip_range=1.0, dropout_rate=0.2)


def _inputs() -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    return [rng.uniform(-1, 1, D) for _ in range(N)]


def _run(restore_every_step: bool, drop: set[int] = frozenset()) -> np.ndarray:
    params = _params()
    clients = [
        SecAggClient(params, party_id=p, session=SESSION, round_number=2, rng=DeterministicRandom(p)) for p in range(N)
    ]
    server = SecAggServer(params, session=SESSION, round_number=2)
    for client, x in zip(clients, _inputs(), strict=True):
        client.set_input(x)
        server.receive(client.advertise_keys())
    while outgoing := server.close_stage():
        for party, message in outgoing:
            if restore_every_step:
                clients[party] = SecAggClient.from_state(
                    clients[party].export_state(), params, rng=DeterministicRandom(100 + party)
                )
            reply = clients[party].handle(message)
            if not (party in drop and clients[party].state is ClientState.MASKED):
                server.receive(reply)
    return np.asarray(server.result().ring_sum)


def test_restored_sessions_give_the_identical_ring_sum():
    assert np.array_equal(_run(False), _run(True))


def test_restored_sessions_survive_dropouts():
    ring = _run(True, drop={1})
    assert ring.shape == (D + 1,)


def test_restore_rejects_another_context_or_party():
    params = _params()
    client = SecAggClient(params, party_id=1, session=SESSION, round_number=0, context=b"model-A")
    client.advertise_keys()
    blob = client.export_state()
    with pytest.raises(LocalProtocolError, match="another"):
        SecAggClient.from_state(blob, params, context=b"model-B")
    restored = SecAggClient.from_state(blob, params, context=b"model-A")
    assert restored.state is ClientState.ADVERTISED and restored.party_id == 1


@pytest.mark.parametrize("cut", [0, 10, 40, -1])
def test_truncated_or_corrupt_state_raises_decode_error(cut):
    params = _params()
    client = SecAggClient(params, party_id=0, session=SESSION, round_number=0)
    client.set_input(_inputs()[0])
    client.advertise_keys()
    blob = client.export_state()
    bad = blob[:cut] if cut >= 0 else blob[:-1] + b"\x00" * 9
    with pytest.raises((DecodeError, LocalProtocolError)):
        SecAggClient.from_state(bad, params)


def test_restored_done_session_repeats_its_answer_and_refuses_another():
    """The ledger survives export: a restored session never gives a second, different answer."""
    params = _params()
    clients = [SecAggClient(params, party_id=p, session=SESSION, round_number=0) for p in range(N)]
    server = SecAggServer(params, session=SESSION, round_number=0)
    for client, x in zip(clients, _inputs(), strict=True):
        client.set_input(x)
        server.receive(client.advertise_keys())
    request = None
    while outgoing := server.close_stage():
        for party, message in outgoing:
            if isinstance(message, UnmaskRequest):
                request = message
            server.receive(clients[party].handle(message))
    assert request is not None
    first = clients[0].handle(request)
    restored = SecAggClient.from_state(clients[0].export_state(), params)
    assert restored.state is ClientState.DONE
    assert restored.handle(request) == first
    smaller = UnmaskRequest(session=SESSION, round=0, survivors=request.survivors[:-1])
    with pytest.raises(AbortError):
        restored.handle(smaller)
    assert restored.state is ClientState.ABORTED


def test_server_restored_between_every_stage_gives_the_identical_ring_sum():
    params = _params()

    def run(restore: bool) -> np.ndarray:
        clients = [
            SecAggClient(params, party_id=p, session=SESSION, round_number=4, rng=DeterministicRandom(p))
            for p in range(N)
        ]
        server = SecAggServer(params, session=SESSION, round_number=4)
        for client, x in zip(clients, _inputs(), strict=True):
            client.set_input(x)
            server.receive(client.advertise_keys())
            if restore:
                server = SecAggServer.from_state(server.export_state(), params)
        while outgoing := server.close_stage():
            for party, message in outgoing:
                reply = clients[party].handle(message)
                if party != 2 or not isinstance(reply, MaskedInput):  # party 2 drops before masking
                    server.receive(reply)
                if restore:
                    server = SecAggServer.from_state(server.export_state(), params)
        assert server.result().dropped == (2,)
        return np.asarray(server.result().ring_sum)

    assert np.array_equal(run(False), run(True))


def test_server_state_from_another_context_is_refused():
    params = _params()
    server = SecAggServer(params, session=SESSION, round_number=0, context=b"a")
    with pytest.raises(LocalProtocolError, match="another"):
        SecAggServer.from_state(server.export_state(), params, context=b"b")
    with pytest.raises(DecodeError):
        SecAggServer.from_state(server.export_state()[:-3] + b"\x09\x00\x00", params, context=b"a")


def test_stale_state_is_refused_when_the_host_passes_min_stage():
    params = _params()
    client = SecAggClient(params, party_id=0, session=SESSION, round_number=0)
    client.advertise_keys()
    blob = client.export_state()
    with pytest.raises(LocalProtocolError, match="stale"):
        SecAggClient.from_state(blob, params, min_stage=ClientState.SHARED)
    assert SecAggClient.from_state(blob, params, min_stage=ClientState.ADVERTISED).state is ClientState.ADVERTISED
