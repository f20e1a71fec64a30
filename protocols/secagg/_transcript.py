"""What every party binds into keys and signatures: the round transcript and the signed statements.

The transcript hash commits to the protocol version, the session id, the round number, the digest
of the public parameters and the caller's round context (for example hashes of the base model, the
adapter and the training configuration). It is the HKDF salt of every derived key, the AES-GCM
associated data of every share box and the prefix of every signed statement, so parties shown
different contexts or parameters derive unrelated keys and cannot complete a round together.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable, Mapping

from ..errors import LocalProtocolError

__all__ = [
    "SHARE_KIND_MASK_KEY",
    "SHARE_KIND_SELF_MASK",
    "advertise_statement",
    "beacon_binding",
    "beacon_graph_seed",
    "box_aad",
    "check_round_identity",
    "complaint_statement",
    "graph_commitment",
    "share_statement",
    "survivors_statement",
    "toss_graph_seed",
    "transcript_hash",
]

SHARE_KIND_SELF_MASK = 0
"""`kind` byte of a share of the self-mask seed b."""
SHARE_KIND_MASK_KEY = 1
"""`kind` byte of a share of the mask private key s_sk (a holder must not pass one off as the other)."""

PROTOCOL_ID = b"secure-fedllm/secagg/v2"

GRAPH_COMMIT_DOMAIN = b"secure-fedllm/secagg/graph-commit/v1"
"""Domain of a party's commitment to its graph nonce (SecAgg+ commit-reveal coin toss)."""
GRAPH_SEED_DOMAIN = b"secure-fedllm/secagg/graph-seed/v1"
"""Domain of the graph seed computed from every revealed nonce of U1."""
GRAPH_BEACON_DOMAIN = b"secure-fedllm/secagg/graph-beacon/v1"
"""Domain of the graph seed computed from a public beacon value."""
GRAPH_BEACON_BINDING_DOMAIN = b"secure-fedllm/secagg/graph-beacon-binding/v1"
"""Domain of what a party advertises (and signs) to say which beacon value it uses."""
MIN_BEACON_BYTES = 32
"""A beacon value shorter than this cannot carry 128 bits of unpredictability with room to spare."""


def transcript_hash(*, session: bytes, round_number: int, params_digest: bytes, context: bytes) -> bytes:
    """SHA-256(protocol id | session | u64 round | params digest | u64 len(context) | context)."""
    h = hashlib.sha256(PROTOCOL_ID)
    h.update(session)
    h.update(struct.pack("<Q", round_number))
    h.update(params_digest)
    h.update(struct.pack("<Q", len(context)))
    h.update(context)
    return h.digest()


def advertise_statement(
    transcript: bytes,
    sender: int,
    share_pk: bytes,
    mask_pk: bytes,
    signing_pk: bytes = b"",
    graph_commitment: bytes = b"",
) -> bytes:
    """What a party signs with its identity key when it advertises its round keys.

    `signing_pk` (the semi-honest session signing key) is empty in the malicious setting, where the
    identity key itself signs shares; the statement is then the same as before that key existed.
    `graph_commitment` (the commitment to its graph nonce, or its beacon binding) is signed too, so
    the server cannot swap a party's commitment for one whose nonce it knows; when empty the
    statement is byte for byte the one without it.
    """
    statement = transcript + b"advertise" + struct.pack("<I", sender) + share_pk + mask_pk + signing_pk
    if graph_commitment:
        statement += b"graph" + graph_commitment
    return statement


def graph_commitment(transcript: bytes, sender: int, nonce: bytes) -> bytes:
    """SHA-256(domain | transcript | u32 sender | nonce): binds `sender` to its 32-byte graph nonce.

    The sender id is inside, so a colluding party cannot copy an honest party's commitment and
    later reveal the same nonce (cancelling it out of the seed would need two equal nonces anyway,
    but a copied commitment would also let it abort "for" the honest party).
    """
    return hashlib.sha256(GRAPH_COMMIT_DOMAIN + transcript + struct.pack("<I", sender) + nonce).digest()


def toss_graph_seed(transcript: bytes, reveals: Mapping[int, bytes]) -> bytes:
    """SHA-256(domain | transcript | u32 count | per party in id order: u32 party | nonce).

    The seed of the SecAgg+ graph after a commit-reveal toss among U1: uniformly random as long as
    one nonce in it is, and fixed once the commitments are (see `_graph`).
    """
    h = hashlib.sha256(GRAPH_SEED_DOMAIN + transcript + struct.pack("<I", len(reveals)))
    for party in sorted(reveals):
        h.update(struct.pack("<I", party))
        h.update(reveals[party])
    return h.digest()


def beacon_binding(transcript: bytes, beacon: bytes) -> bytes:
    """What a party advertises in beacon mode: SHA-256(domain | transcript | beacon).

    Signed in the malicious setting; a party (or server) holding another beacon value sees a
    different binding and refuses the keys, instead of silently building another graph.
    """
    return hashlib.sha256(GRAPH_BEACON_BINDING_DOMAIN + transcript + beacon).digest()


def beacon_graph_seed(transcript: bytes, beacon: bytes) -> bytes:
    """SHA-256(domain | transcript | beacon): the graph seed when the host passes a public beacon."""
    return hashlib.sha256(GRAPH_BEACON_DOMAIN + transcript + beacon).digest()


def share_statement(transcript: bytes, kind: int, dealer: int, holder: int, share: bytes) -> bytes:
    """What a dealer signs for each share it deals: SHA-256(transcript | "share" | kind | dealer | holder | share).

    The kind byte keeps a holder from returning its share of s_sk where the server asked for b (both
    come from the same dealer to the same holder); the holder id keeps it from returning another
    holder's share (a different x-coordinate).
    """
    h = hashlib.sha256(transcript)
    h.update(b"share")
    h.update(struct.pack("<BII", kind, dealer, holder))
    h.update(share)
    return h.digest()


def complaint_statement(transcript: bytes, accuser: int, accused: Iterable[int]) -> bytes:
    """What an accuser signs: the sorted ids of the dealers whose share boxes it could not use."""
    ids = sorted(accused)
    return transcript + b"complaint" + struct.pack(f"<II{len(ids)}I", accuser, len(ids), *ids)


def survivors_statement(transcript: bytes, signer: int, survivors: Iterable[int], graph_seed: bytes = b"") -> bytes:
    """What party `signer` signs in the consistency check: the sorted survivor set U3.

    After a graph toss the seed is signed too (`graph_seed`, empty otherwise: the statement is then
    unchanged), so parties that were shown different rosters, hence built different graphs, never
    collect each other's signatures and nobody unmasks.
    """
    ids = sorted(survivors)
    statement = transcript + b"survivors" + struct.pack(f"<II{len(ids)}I", signer, len(ids), *ids)
    if graph_seed:
        statement += b"graph" + graph_seed
    return statement


def box_aad(transcript: bytes, sender: int, recipient: int) -> bytes:
    """Associated data of the share box from `sender` to `recipient`."""
    return transcript + b"share-box" + struct.pack("<II", sender, recipient)


def check_round_identity(session: bytes, round_number: int) -> None:
    """Validate the host-chosen session id and round number before they enter the transcript.

    Raises:
        LocalProtocolError: naming the bad value and the fix.
    """
    if not isinstance(session, bytes) or len(session) != 16:
        raise LocalProtocolError("session must be 16 bytes (draw it with os.urandom(16))")
    if not 0 <= round_number < 1 << 63:
        raise LocalProtocolError(f"round_number={round_number} must be in [0, 2^63)")
