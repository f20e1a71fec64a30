"""Server session state to bytes and back, for hosts that do not keep the session object alive.

The blob holds the advertised keys, the share boxes in transit (ciphertexts only), the complaints,
the masked inputs still held (at most the server's `hold_bytes`), the running ring sum of the ones
already summed with the set of their senders (so the blob's size does not grow with n), the
survivor signatures and the unmask responses received so far. It
contains no client secret in the clear, but it does contain Shamir shares during the unmask stage:
store it as confidentially as the server's own memory. It carries the stage (`ServerState` value).

Layout: `version (u8) | stage (u8) | session (16) | round (u64) | transcript (32)`, then records
`id (u8) | length (u32) | value`; list records are sequences of `u32 length | encoded message`.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import DecodeError, LocalProtocolError
from ..primitives.prg import ring_dtype
from ._client_state import pack_ids, pack_records, read_records, unpack_ids
from ._codec import decode_message, encode_message
from ._messages import (
    AdvertiseKeys,
    Complaint,
    EncryptedShares,
    Envelope,
    GraphReveal,
    MaskedInput,
    SurvivorSignature,
    UnmaskResponse,
)

if TYPE_CHECKING:
    from ._params import SecAggParams
    from ._server import SecAggServer, ServerState

__all__ = ["dump_server_state", "load_server_state"]

STATE_VERSION = 3
"""3: record 13 holds the ids of the summed senders (the running sum, record 8, exists from the first)."""
_HEAD = struct.Struct("<BB16sQ32s")


def _messages_out(messages: Iterable[Any]) -> bytes:
    out = []
    for message in messages:
        wire = encode_message(message)
        out.append(struct.pack("<I", len(wire)) + wire)
    return b"".join(out)


def _messages_in(raw: bytes) -> list[Any]:
    out, pos = [], 0
    while pos < len(raw):
        if pos + 4 > len(raw):
            raise DecodeError("truncated message list in server state")
        (length,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        if pos + length > len(raw):
            raise DecodeError("truncated message in server state")
        out.append(decode_message(raw[pos : pos + length]))
        pos += length
    return out


def dump_server_state(server: SecAggServer) -> bytes:
    """Serialize a server session (see the module docstring for what it contains)."""
    s = server
    records: list[tuple[int, bytes]] = [
        (1, _messages_out(s._keys[p] for p in sorted(s._keys))),
        (
            2,
            _messages_out(
                EncryptedShares(session=s.session, round=s.round_number, sender=p, boxes=s._boxes[p])
                for p in sorted(s._boxes)
            ),
        ),
        (3, pack_ids(s._u2)),
        (4, pack_ids(s._masked)),
        (5, pack_ids(s._u3)),
        (
            6,
            _messages_out(
                SurvivorSignature(session=s.session, round=s.round_number, sender=p, signature=sig)
                for p, sig in sorted(s._signatures.items())
            ),
        ),
        (7, _messages_out(s._responses[p] for p in sorted(s._responses))),
        (9, _messages_out(s._complaints[p] for p in sorted(s._complaints))),
        (10, _messages_out(s._inputs.values())),  # arrival order: the oldest is folded first
        (13, pack_ids(s._summed)),
        (11, pack_ids(s._misbehaving)),
        (
            12,
            _messages_out(
                GraphReveal(session=s.session, round=s.round_number, sender=p, nonce=nonce)
                for p, nonce in sorted(s._reveals.items())
            ),
        ),
    ]
    if s._acc is not None:
        records.append((8, s._acc.tobytes()))
    head = _HEAD.pack(STATE_VERSION, s.state.value, s.session, s.round_number, s.transcript)
    return head + pack_records(records)


_ALWAYS = frozenset({1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13})
"""The records `dump_server_state` writes at every stage (8, the ring sum, once a masked input was summed)."""


def _typed(raw: bytes, cls: type[Any], server: SecAggServer, what: str) -> dict[int, Any]:
    """Decode a message list, each of type `cls`, of this session, from distinct senders in range."""
    out: dict[int, Any] = {}
    for m in _messages_in(raw):
        if not isinstance(m, cls):
            raise DecodeError(f"server state {what} holds a {type(m).__name__}, not a {cls.__name__}")
        if (m.session, m.round) != (server.session, server.round_number):
            raise DecodeError(f"server state {what} holds a message of another session or round")
        if m.sender >= server.params.num_parties or m.sender in out:
            raise DecodeError(f"server state {what}: sender {m.sender} is out of range or repeated")
        out[m.sender] = m
    return out


def _subset(inner: Any, outer: Any, what: str) -> None:
    if not set(inner) <= set(outer):
        raise DecodeError(f"server state: {what}")


def _check_stage(state: ServerState, params: SecAggParams, *, has_sum: bool, later: bool) -> None:
    """The running sum exists only from the masked-input stage on; no stage holds a later one's records."""
    from ._server import ServerState

    early = {ServerState.COLLECT_KEYS, ServerState.COLLECT_REVEALS, ServerState.COLLECT_SHARES}
    if (state in early and has_sum) or (state in early | {ServerState.COLLECT_MASKED} and later):
        raise DecodeError(f"server state at {state.name} holds records of a later stage")
    if state in {ServerState.COLLECT_SIGNATURES, ServerState.COLLECT_UNMASK} and not (has_sum and later):
        raise DecodeError(f"server state at {state.name} lacks the ring sum or the survivor set")
    if state is ServerState.COLLECT_SIGNATURES and not params.malicious:
        raise DecodeError("server state is in the consistency check, which the semi-honest setting skips")


def _held_inputs(raw: bytes, server: SecAggServer) -> dict[int, Any]:
    """The held masked inputs, in arrival order, each of the round's size."""
    params = server.params
    words = (params.dimension + 1) * ring_dtype(params.encoding.ring_bits).itemsize
    inputs = _typed(raw, MaskedInput, server, "masked inputs")
    if any(m.ring_bits != params.encoding.ring_bits or len(m.data) != words for m in inputs.values()):
        raise DecodeError("server state holds a masked input of the wrong size")
    return inputs


def _check_summed(
    state: ServerState, summed: set[int], held: set[int], masked: set[int], complaints: dict[int, Any], has_sum: bool
) -> None:
    """Received inputs only, held or summed (not both), none a complaint excluded; the sum exists once one is."""
    from ._server import ServerState

    _subset(summed | held, masked, "a held or summed masked input that was never received")
    if summed & held:
        raise DecodeError("server state both holds and sums one masked input")
    if (summed | held) & {p for c in complaints.values() for p in (c.sender, *c.accused)}:
        raise DecodeError("server state keeps the masked input of a party excluded by a complaint")
    if held and state is not ServerState.COLLECT_MASKED:
        raise DecodeError(f"server state at {state.name} holds masked inputs")
    if state is ServerState.COLLECT_MASKED and has_sum != bool(summed):
        raise DecodeError("server state at COLLECT_MASKED: the running sum and the summed senders disagree")


def _check_reveals(server: SecAggServer, state: ServerState, keys: dict[int, Any], reveals: dict[int, bytes]) -> bool:
    """Reveals only in a toss, only from U1, each opening its commitment, all of U1 once the toss is over.

    Returns whether the toss is complete (the graph is then rebuilt from the reveals).
    """
    from ._graph import GraphMode
    from ._server import ServerState
    from ._transcript import graph_commitment

    toss = server.graph_mode is GraphMode.TOSS
    if any(
        (len(k.graph_commitment) != 32) if toss else (k.graph_commitment != server._beacon_binding)
        for k in keys.values()
    ):
        raise DecodeError("server state holds keys whose graph_commitment does not fit this session's graph mode")
    if not toss:
        if reveals or state is ServerState.COLLECT_REVEALS:
            raise DecodeError("server state holds a graph toss, which this session does not run")
        return False
    _subset(reveals, keys, "a graph reveal from a party without keys")
    if any(graph_commitment(server.transcript, p, n) != keys[p].graph_commitment for p, n in reveals.items()):
        raise DecodeError("server state holds a graph reveal that does not open its commitment")
    if state is ServerState.COLLECT_KEYS and reveals:
        raise DecodeError("server state at COLLECT_KEYS holds graph reveals")
    after = {
        ServerState.COLLECT_SHARES,
        ServerState.COLLECT_MASKED,
        ServerState.COLLECT_SIGNATURES,
        ServerState.COLLECT_UNMASK,
        ServerState.DONE,
    }
    if state in after and set(reveals) != set(keys):
        raise DecodeError(f"server state at {state.name} lacks the graph reveal of some party of U1")
    return state in after


def load_server_state(server: SecAggServer, data: bytes) -> None:
    """Restore `server` (freshly built with the same params and context) from `dump_server_state`.

    Every record is checked before anything is assigned: message types, session and round, party
    ids in range, each stage's sets nested as the protocol makes them (U3 within U2 within the
    roster, responses only from the parties asked), and the ring sum present exactly when the
    stage has one, of the right length.

    Raises:
        DecodeError: the blob is malformed, of another version, or inconsistent with its stage.
        LocalProtocolError: the blob belongs to another session, round, parameter set or context.
    """
    from ._server import ServerState

    if len(data) < _HEAD.size:
        raise DecodeError("server state blob is truncated")
    version, stage, session, round_number, transcript = _HEAD.unpack_from(data)
    if version != STATE_VERSION:
        raise DecodeError(f"server state version {version} is not {STATE_VERSION}")
    if (session, round_number, transcript) != (server.session, server.round_number, server.transcript):
        raise LocalProtocolError("state belongs to another session, round, parameter set or context")
    try:
        state = ServerState(stage)
    except ValueError:
        raise DecodeError(f"unknown server stage {stage}") from None
    rec = read_records(data, _HEAD.size, set(range(1, 14)))
    if missing := sorted(_ALWAYS - set(rec)):
        raise DecodeError(f"server state lacks records {missing}: truncated or tampered")
    params, n = server.params, server.params.num_parties
    keys = _typed(rec[1], AdvertiseKeys, server, "keys")
    if any(m.transcript != server.transcript for m in keys.values()):
        raise DecodeError("server state holds keys advertised under another transcript")
    boxes = _typed(rec[2], EncryptedShares, server, "share boxes")
    signatures = _typed(rec[6], SurvivorSignature, server, "signatures")
    responses = _typed(rec[7], UnmaskResponse, server, "unmask responses")
    complaints = _typed(rec[9], Complaint, server, "complaints")
    inputs = _held_inputs(rec[10], server)
    u2, masked, u3, summed = (set(unpack_ids(rec[i], n)) for i in (3, 4, 5, 13))
    misbehaving = set(unpack_ids(rec[11], n))
    _subset(boxes, keys, "share boxes from a party without keys")
    if boxes and state is ServerState.COLLECT_REVEALS:
        raise DecodeError("server state at COLLECT_REVEALS holds share boxes")
    _subset(u2, keys, "U2 names a party without keys")
    _subset(masked, u2, "a masked input from outside U2")
    _subset(complaints, u2, "a complaint from outside U2")
    _check_summed(state, summed, set(inputs), masked, complaints, 8 in rec)
    _subset(u3, u2, "U3 names a party outside U2")
    _subset(signatures, u3, "a survivor signature from outside U3")
    _subset(responses, signatures if params.malicious else u3, "an unmask response from a party not asked")
    words = (params.dimension + 1) * ring_dtype(params.encoding.ring_bits).itemsize
    later = bool(u3 or signatures or responses)
    _check_stage(state, params, has_sum=8 in rec, later=later)
    if later and summed != u3:
        raise DecodeError("server state: the summed senders are not the survivor set U3")
    reveals = {p: m.nonce for p, m in _typed(rec[12], GraphReveal, server, "graph reveals").items()}
    toss_done = _check_reveals(server, state, keys, reveals)
    acc = None
    if 8 in rec:
        if len(rec[8]) != words:
            raise DecodeError("server state accumulator has the wrong length")
        acc = np.frombuffer(rec[8], dtype=ring_dtype(params.encoding.ring_bits)).copy()
    server.state = state
    server._keys = keys
    server._boxes = {p: tuple(Envelope(peer=e.peer, data=e.data) for e in m.boxes) for p, m in boxes.items()}
    server._u2 = u2
    server._masked = masked
    server._u3 = tuple(sorted(u3))
    server._signatures = {p: m.signature for p, m in signatures.items()}
    server._responses = responses
    server._complaints = complaints
    server._summed = summed
    server._inputs = inputs
    server._held = sum(len(m.data) for m in inputs.values())
    server._misbehaving = misbehaving
    server._acc = acc
    server._reveals = reveals
    if toss_done:
        server._set_toss_seed()
