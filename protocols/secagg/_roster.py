"""Checks on advertised keys, shared by the server (per message) and every client (per roster entry).

A client cannot rely on the server having made them: in the malicious setting the roster is the
server's word, so each client re-checks every entry it will use.
"""

from __future__ import annotations

from ..errors import RemoteProtocolError
from ..primitives.keys import ed25519_verify
from ._graph import GraphMode
from ._messages import AdvertiseKeys
from ._params import SecAggParams
from ._transcript import advertise_statement

__all__ = ["check_advertisement", "signer_key"]


def check_advertisement(
    entry: AdvertiseKeys,
    *,
    params: SecAggParams,
    transcript: bytes,
    session: bytes,
    round_number: int,
    taken: set[bytes],
    graph: GraphMode = GraphMode.TRANSCRIPT,
    beacon_binding: bytes = b"",
) -> None:
    """Validate one AdvertiseKeys against the round; `taken` holds the keys accepted so far.

    `graph` says what `graph_commitment` must hold: nothing (transcript-derived graph), a 32-byte
    commitment to a nonce (toss), or exactly `beacon_binding` (beacon mode).

    Raises:
        RemoteProtocolError: other session, round, transcript, unknown party, a repeated key, or a
            graph_commitment missing, present where none is used, or bound to another beacon.
        IntegrityError: the identity signature does not verify (malicious setting).
    """
    if entry.session != session or entry.round != round_number:
        raise RemoteProtocolError("keys from another session or round", peer_id=entry.sender, field="round")
    if entry.sender >= params.num_parties:
        raise RemoteProtocolError(f"unknown party {entry.sender}", peer_id=entry.sender, field="sender")
    if entry.transcript != transcript:
        raise RemoteProtocolError(
            f"the transcript of party {entry.sender} differs: other parameters, context, session or round",
            peer_id=entry.sender,
            field="transcript",
        )
    _check_commitment(entry, graph, beacon_binding)
    fresh = {entry.share_public_key, entry.mask_public_key}
    if len(fresh) != 2 or fresh & taken:
        raise RemoteProtocolError("repeated public key", peer_id=entry.sender, field="mask_public_key")
    if params.identity_keys is not None:
        if entry.signing_public_key:
            raise RemoteProtocolError(
                "signing_public_key must be empty in the malicious setting: the identity key signs shares",
                peer_id=entry.sender,
                field="signing_public_key",
            )
        statement = advertise_statement(
            transcript,
            entry.sender,
            entry.share_public_key,
            entry.mask_public_key,
            graph_commitment=entry.graph_commitment,
        )
        ed25519_verify(params.identity_keys[entry.sender], entry.signature, statement, peer_id=entry.sender)
    elif len(entry.signing_public_key) != 32:
        raise RemoteProtocolError(
            "the semi-honest setting needs a 32-byte signing_public_key to sign shares and complaints",
            peer_id=entry.sender,
            field="signing_public_key",
        )


def _check_commitment(entry: AdvertiseKeys, graph: GraphMode, beacon_binding: bytes) -> None:
    commitment, sender = entry.graph_commitment, entry.sender
    if graph is GraphMode.TOSS and len(commitment) != 32:
        raise RemoteProtocolError(
            f"party {sender} advertised no graph_commitment: the malicious SecAgg+ setting tosses the graph "
            "seed by commit-reveal and every party of U1 must commit to a nonce in its signed keys",
            peer_id=sender,
            field="graph_commitment",
        )
    if graph is GraphMode.BEACON and commitment != beacon_binding:
        raise RemoteProtocolError(
            f"party {sender} bound {'another beacon value' if commitment else 'no beacon value'} in its "
            "graph_commitment: every party and the server must be given the same public beacon",
            peer_id=sender,
            field="graph_commitment",
        )
    if graph is GraphMode.TRANSCRIPT and commitment:
        raise RemoteProtocolError(
            f"party {sender} advertised a graph_commitment, but this session derives its graph from the "
            "transcript (no toss, no beacon): the parties disagree on the graph randomness",
            peer_id=sender,
            field="graph_commitment",
        )


def signer_key(params: SecAggParams, entry: AdvertiseKeys) -> bytes:
    """The Ed25519 key that verifies `entry.sender`'s shares and complaints.

    Malicious setting: its pinned identity key. Semi-honest setting: the session key it advertised;
    this is sound there because the server relays every AdvertiseKeys unchanged, so only the party
    that advertised a key holds its private half, and a holder returning a share (or a server
    reading it) cannot sign for the dealer.
    """
    if params.identity_keys is not None:
        return params.identity_keys[entry.sender]
    return entry.signing_public_key
