"""Client session state to bytes and back, for hosts that keep no objects between stages.

A Flower ClientApp, for instance, is re-created for every message; it persists this blob in its
Context. The blob is SECRET: it holds X25519 private keys, the self-mask seed and the Shamir shares
of every neighbour. Store it like a private key, and always store the blob of the latest step: it
carries a stage counter (the `ClientState` value) so a host can refuse to go back, and the ledger of
revealed shares, which keeps a restored session from giving a second, different unmask answer.

Layout: `version (u8) | stage (u8) | party (u32) | session (16) | round (u64) | transcript (32)`,
then records `name id (u8) | length (u32) | value`. Every length is checked before it is read.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import DecodeError, LocalProtocolError
from ..primitives.prg import ring_dtype
from ..primitives.shamir import SHARE_BYTES
from ._codec import decode_message, encode_message

if TYPE_CHECKING:
    from ._client import SecAggClient

__all__ = [
    "dump_client_state",
    "load_client_state",
    "pack_ids",
    "pack_records",
    "peek_identity",
    "read_records",
    "unpack_ids",
]

STATE_VERSION = 1
_HEAD = struct.Struct("<BBI16sQ32s")
_PAIR = struct.Struct(f"<I{SHARE_BYTES}s{SHARE_BYTES}s")
_ROSTER = struct.Struct("<I32s32s")


def pack_ids(values: Iterable[int]) -> bytes:
    """A sorted id set as consecutive u32 (used by both state formats)."""
    ids = sorted(values)
    return struct.pack(f"<{len(ids)}I", *ids)


def unpack_ids(raw: bytes) -> tuple[int, ...]:
    """The inverse of `pack_ids`."""
    if len(raw) % 4:
        raise DecodeError("bad id list in state")
    return struct.unpack(f"<{len(raw) // 4}I", raw)


def _read_ids(raw: bytes) -> frozenset[int]:
    return frozenset(unpack_ids(raw))


def _held_out(held: dict[int, tuple[bytes, bytes]]) -> bytes:
    return b"".join(_PAIR.pack(p, *held[p]) for p in sorted(held))


def _held_in(raw: bytes) -> dict[int, tuple[bytes, bytes]]:
    if len(raw) % _PAIR.size:
        raise DecodeError("bad share table in state")
    return {p: (b, s) for p, b, s in _PAIR.iter_unpack(raw)}


def _roster_out(roster: dict[int, tuple[bytes, bytes]]) -> bytes:
    return b"".join(_ROSTER.pack(p, *roster[p]) for p in sorted(roster))


def _roster_in(raw: bytes) -> dict[int, tuple[bytes, bytes]]:
    if len(raw) % _ROSTER.size:
        raise DecodeError("bad roster in state")
    return {p: (a, b) for p, a, b in _ROSTER.iter_unpack(raw)}


_FIELDS: dict[str, tuple[int, Any, Any]] = {
    "share_sk": (1, bytes, bytes),
    "mask_sk": (2, bytes, bytes),
    "self_mask_seed": (3, bytes, bytes),
    "own": (4, encode_message, decode_message),
    "own_shares": (5, lambda v: v[0] + v[1], lambda r: (r[:SHARE_BYTES], r[SHARE_BYTES:])),
    "roster": (6, _roster_out, _roster_in),
    "held": (7, _held_out, _held_in),
    "signed": (8, pack_ids, _read_ids),
    "answered": (9, pack_ids, _read_ids),
    "reply": (10, encode_message, decode_message),
    "input": (11, lambda v: v.tobytes(), None),  # decoded with the ring dtype, see load
}
_BY_ID = {fid: name for name, (fid, _, _) in _FIELDS.items()}


def dump_client_state(client: SecAggClient) -> bytes:
    """Serialize a client session (see module docstring: the result is secret)."""
    out = [
        _HEAD.pack(
            STATE_VERSION,
            client.state.value,
            client.party_id,
            client.session,
            client.round_number,
            client.transcript,
        )
    ]
    out.append(pack_records([(_FIELDS[name][0], _FIELDS[name][1](value)) for name, value in client._s.items()]))
    return b"".join(out)


def pack_records(records: list[tuple[int, bytes]]) -> bytes:
    """Records as `id (u8) | length (u32) | value` (used by both state formats)."""
    return b"".join(struct.pack("<BI", fid, len(raw)) + raw for fid, raw in records)


def read_records(data: bytes, start: int, known: set[int]) -> dict[int, bytes]:
    """The inverse of `pack_records`, from offset `start`; unknown or repeated ids are refused."""
    out: dict[int, bytes] = {}
    pos = start
    while pos < len(data):
        if pos + 5 > len(data):
            raise DecodeError("state record header is truncated")
        fid, length = struct.unpack_from("<BI", data, pos)
        pos += 5
        if fid not in known or fid in out or pos + length > len(data):
            raise DecodeError("bad state record")
        out[fid] = data[pos : pos + length]
        pos += length
    return out


def peek_identity(data: bytes) -> tuple[int, bytes, int]:
    """(party, session, round) of a blob, to build the session it restores into."""
    if len(data) < _HEAD.size:
        raise DecodeError("state blob is truncated")
    _, _, party, session, round_number, _ = _HEAD.unpack_from(data)
    return party, session, round_number


def load_client_state(client: SecAggClient, data: bytes, *, min_stage: int | None = None) -> None:
    """Restore `client` (freshly built with the same params and context) from `dump_client_state`.

    Raises:
        DecodeError: the blob is malformed or of another version.
        LocalProtocolError: the blob belongs to another party, session, round, params or context.
    """
    from ._client import ClientState

    if len(data) < _HEAD.size:
        raise DecodeError("state blob is truncated")
    version, stage, party, session, round_number, transcript = _HEAD.unpack_from(data)
    if version != STATE_VERSION:
        raise DecodeError(f"state version {version} is not {STATE_VERSION}")
    if (party, session, round_number, transcript) != (
        client.party_id,
        client.session,
        client.round_number,
        client.transcript,
    ):
        raise LocalProtocolError("state belongs to another party, session, round, parameter set or context")
    try:
        state = ClientState(stage)
    except ValueError:
        raise DecodeError(f"unknown stage {stage}") from None
    if min_stage is not None and stage < min_stage:
        raise LocalProtocolError(f"stale state: stage {state.name} is older than the host's last persisted stage")
    values: dict[str, Any] = {}
    for fid, raw in read_records(data, _HEAD.size, set(_BY_ID)).items():
        name = _BY_ID[fid]
        if name == "input":
            dtype = ring_dtype(client.params.encoding.ring_bits)
            if len(raw) != (client.params.dimension + 1) * dtype.itemsize:
                raise DecodeError("bad input record in state")
            values[name] = np.frombuffer(raw, dtype=dtype).copy()
        else:
            values[name] = _FIELDS[name][2](raw)
    client.state = state
    client._s = values
