"""Finding 4(b): the key holder is a public function of (session id, roster), so a server can grind it.

This is a stated residual, not a fix (see `protocols.he` threat model): with one key holder, HE is
claimed only when no client colludes with the server, which the site policy enforces by refusing HE
whenever it assumes n_C > 0 (`tests/protocols/test_policy.py::test_he_is_refused_while_any_client_may_collude`).
These tests pin the documented rule, show the residual is what the docstring says (a few session ids
make a chosen client the holder), and check that nobody but the rule's holder can deliver keys.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from protocols import RemoteProtocolError
from protocols.he import HEClient, HEKeys, HEParams, HEServer, decode_he_message, encode_he_message, key_holder
from protocols.he._ciphers import export_key
from protocols.he._client import he_transcript, holder_rank


def _round(params: HEParams, session: bytes) -> tuple[list[HEClient], HEServer, dict[int, object]]:
    clients = [HEClient(params, party_id=p, session=session, round_number=0) for p in range(params.num_parties)]
    server = HEServer(params, session=session, round_number=0)
    for c in clients:
        c.set_input(np.zeros(params.dimension))
        server.receive(decode_he_message(encode_he_message(c.advertise_keys())))
    offers = {p: clients[p].handle(roster) for p, roster in server.close_stage()}
    return clients, server, offers


def test_every_party_computes_the_documented_holder_rule():
    params = HEParams.bfv_packed(6, dimension=20, clip_range=0.05)
    session = os.urandom(16)
    clients, server, _ = _round(params, session)
    transcript = he_transcript(params, session=session, round_number=0, context=b"")
    expected = min(range(6), key=lambda p: holder_rank(transcript, p))
    assert key_holder(transcript, range(6)) == expected == server.holder
    assert {c.holder for c in clients} == {expected}
    assert [c.holds_key for c in clients] == [p == expected for p in range(6)]  # only the holder made a key


def test_residual_a_server_grinding_session_ids_makes_a_chosen_client_the_holder():
    # The documented residual: about n session ids suffice. It matters only if that client colludes,
    # which the site policy excludes for HE (n_C = 0); in symmetric mode every client holds the key anyway.
    params = HEParams.bfv_packed(8, dimension=20, clip_range=0.05)
    colluder, tries = 5, 0
    while True:
        tries += 1
        session = os.urandom(16)
        if key_holder(he_transcript(params, session=session, round_number=0, context=b""), range(8)) == colluder:
            break
    assert tries < 400  # geometric with p = 1/8: fails with probability (7/8)^400 < 1e-23
    _, server, _ = _round(params, session)
    assert server.holder == colluder


def test_keys_from_anyone_but_the_rule_holder_are_refused():
    params = HEParams.bfv_packed(4, dimension=20, clip_range=0.05)
    clients, server, offers = _round(params, os.urandom(16))
    holder = server.holder
    for offer in offers.values():
        server.receive(offer)
    keys = dict(server.close_stage())
    victim = next(p for p in range(4) if p != holder)
    impostor = next(p for p in range(4) if p not in (holder, victim))
    with pytest.raises(RemoteProtocolError, match="not the key holder") as info:
        clients[victim].handle(keys[victim].model_copy(update={"holder": impostor}))
    assert info.value.field == "holder" and not clients[victim].holds_key
    assert isinstance(keys[victim], HEKeys)
    clients[victim].handle(keys[victim])  # the state was unchanged (no key was loaded): the real keys work


def test_each_session_gets_a_fresh_key():
    params = HEParams.bfv_packed(3, dimension=20, clip_range=0.05)
    keys = []
    for _ in range(2):
        clients, server, _ = _round(params, os.urandom(16))
        keys.append(export_key(params, clients[server.holder]._ctx))
    assert keys[0] != keys[1]
