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
from collections.abc import Iterable

from ..errors import LocalProtocolError

__all__ = ["advertise_statement", "box_aad", "check_round_identity", "survivors_statement", "transcript_hash"]

PROTOCOL_ID = b"secure-fedllm/secagg/v1"


def transcript_hash(*, session: bytes, round_number: int, params_digest: bytes, context: bytes) -> bytes:
    """SHA-256(protocol id | session | u64 round | params digest | u64 len(context) | context)."""
    h = hashlib.sha256(PROTOCOL_ID)
    h.update(session)
    h.update(struct.pack("<Q", round_number))
    h.update(params_digest)
    h.update(struct.pack("<Q", len(context)))
    h.update(context)
    return h.digest()


def advertise_statement(transcript: bytes, sender: int, share_pk: bytes, mask_pk: bytes) -> bytes:
    """What a party signs with its identity key when it advertises its round keys."""
    return transcript + b"advertise" + struct.pack("<I", sender) + share_pk + mask_pk


def survivors_statement(transcript: bytes, signer: int, survivors: Iterable[int]) -> bytes:
    """What party `signer` signs in the consistency check: the sorted survivor set U3."""
    ids = sorted(survivors)
    return transcript + b"survivors" + struct.pack(f"<II{len(ids)}I", signer, len(ids), *ids)


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
