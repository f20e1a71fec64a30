"""Server session state to bytes and back, for hosts that do not keep the session object alive.

The blob holds the advertised keys, the share boxes in transit (ciphertexts only), the running
ring sum of masked inputs, the survivor signatures and the unmask responses received so far. It
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
from ._messages import EncryptedShares, Envelope, SurvivorSignature, UnmaskResponse

if TYPE_CHECKING:
    from ._server import SecAggServer

__all__ = ["dump_server_state", "load_server_state"]

STATE_VERSION = 1
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
    ]
    if s._acc is not None:
        records.append((8, s._acc.tobytes()))
    head = _HEAD.pack(STATE_VERSION, s.state.value, s.session, s.round_number, s.transcript)
    return head + pack_records(records)


def load_server_state(server: SecAggServer, data: bytes) -> None:
    """Restore `server` (freshly built with the same params and context) from `dump_server_state`.

    Raises:
        DecodeError: the blob is malformed or of another version.
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
    rec = read_records(data, _HEAD.size, set(range(1, 9)))
    keys = _messages_in(rec.get(1, b""))
    boxes = _messages_in(rec.get(2, b""))
    signatures = _messages_in(rec.get(6, b""))
    responses = _messages_in(rec.get(7, b""))
    if not all(isinstance(m, UnmaskResponse) for m in responses) or not all(
        isinstance(m, SurvivorSignature) for m in signatures
    ):
        raise DecodeError("server state holds a message of the wrong type")
    server.state = state
    server._keys = {m.sender: m for m in keys}
    server._boxes = {m.sender: tuple(Envelope(peer=e.peer, data=e.data) for e in m.boxes) for m in boxes}
    server._u2 = set(unpack_ids(rec.get(3, b"")))
    server._masked = set(unpack_ids(rec.get(4, b"")))
    server._u3 = tuple(unpack_ids(rec.get(5, b"")))
    server._signatures = {m.sender: m.signature for m in signatures}
    server._responses = {m.sender: m for m in responses}
    if 8 in rec:
        dtype = ring_dtype(server.params.encoding.ring_bits)
        acc = np.frombuffer(rec[8], dtype=dtype).copy()
        if acc.shape != (server.params.dimension + 1,):
            raise DecodeError("server state accumulator has the wrong length")
        server._acc = acc
