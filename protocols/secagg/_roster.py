"""Checks on advertised keys, shared by the server (per message) and every client (per roster entry).

A client cannot rely on the server having made them: in the malicious setting the roster is the
server's word, so each client re-checks every entry it will use.
"""

from __future__ import annotations

from ..errors import RemoteProtocolError
from ..primitives.keys import ed25519_verify
from ._messages import AdvertiseKeys
from ._params import SecAggParams
from ._transcript import advertise_statement

__all__ = ["check_advertisement"]


def check_advertisement(
    entry: AdvertiseKeys,
    *,
    params: SecAggParams,
    transcript: bytes,
    session: bytes,
    round_number: int,
    taken: set[bytes],
) -> None:
    """Validate one AdvertiseKeys against the round; `taken` holds the keys accepted so far.

    Raises:
        RemoteProtocolError: other session, round, transcript, unknown party or a repeated key.
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
    fresh = {entry.share_public_key, entry.mask_public_key}
    if len(fresh) != 2 or fresh & taken:
        raise RemoteProtocolError("repeated public key", peer_id=entry.sender, field="mask_public_key")
    if params.identity_keys is not None:
        statement = advertise_statement(transcript, entry.sender, entry.share_public_key, entry.mask_public_key)
        ed25519_verify(params.identity_keys[entry.sender], entry.signature, statement, peer_id=entry.sender)
