"""Client session state to bytes and back, for hosts that keep no objects between stages.

A Flower ClientApp, for instance, is re-created for every message; it persists this blob in its
Context. The blob is SECRET: it holds X25519 private keys, the self-mask seed and the Shamir shares
of every neighbour. Store it like a private key, and always store the blob of the latest step: it
carries a stage counter (the `ClientState` value) so a host can refuse to go back, and the ledger of
revealed shares, which keeps a restored session from giving a second, different unmask answer.
Stages are compared in protocol order, not by value: REVEALED (9, the SecAgg+ graph toss) comes
between ADVERTISED and SHARED. A toss session also holds its graph nonce and the roster's
commitments until the toss result arrives, then the graph seed it rebuilds the graph from.

Layout: `version (u8) | stage (u8) | party (u32) | session (16) | round (u64) | transcript (32)`,
then records `name id (u8) | length (u32) | value`. Every length is checked before it is read.

The pending input (set, not yet masked) is the update itself, not its encoding (the session encodes
it only when it masks it): `dtype (8, numpy's little-endian str) | length (u64) | weight (f64) |
has data (u8) | rounding seed (32)`, then, when `has data` is 1, the raw little-endian values.
`export_state(include_input=False)` writes `has data` 0: the host keeps the update and passes it back
to `from_state(..., input=x)`, which checks it against the recorded dtype and length.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from ..encoding import PendingInput
from ..errors import DecodeError, LocalProtocolError
from ..primitives.shamir import SHARE_BYTES
from ._codec import decode_message, encode_message
from ._graph import GraphMode, NeighbourGraph
from ._transcript import graph_commitment

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

STATE_VERSION = 3
"""3: the pending input is the update (any float or integer dtype) with its weight and rounding seed."""
_HEAD = struct.Struct("<BBI16sQ32s")
_SIGNED_PAIR = struct.Struct(f"<{SHARE_BYTES}s{SHARE_BYTES}s64s64s")
_PAIR = struct.Struct(f"<I{SHARE_BYTES}s{SHARE_BYTES}s64s64s")
_ROSTER = struct.Struct("<I32s32s32s")
_COMMITMENT = struct.Struct("<I32s")
_PENDING = struct.Struct("<8sQdB32s")
_MAX_ITEMSIZE = 16


def pack_ids(values: Iterable[int]) -> bytes:
    """A sorted id set as consecutive u32 (used by both state formats)."""
    ids = sorted(values)
    return struct.pack(f"<{len(ids)}I", *ids)


def unpack_ids(raw: bytes, num_parties: int | None = None) -> tuple[int, ...]:
    """The inverse of `pack_ids`; refuses repeated, unsorted or (given n) out-of-range ids."""
    if len(raw) % 4:
        raise DecodeError("bad id list in state")
    ids: tuple[int, ...] = struct.unpack(f"<{len(raw) // 4}I", raw)
    if list(ids) != sorted(set(ids)):
        raise DecodeError("id list in state is not sorted or repeats an id")
    if num_parties is not None and ids and ids[-1] >= num_parties:
        raise DecodeError(f"id {ids[-1]} in state is outside 0..{num_parties - 1}")
    return ids


def _held_out(held: dict[int, tuple[bytes, bytes, bytes, bytes]]) -> bytes:
    return b"".join(_PAIR.pack(p, *held[p]) for p in sorted(held))


def _held_in(raw: bytes) -> dict[int, tuple[bytes, bytes, bytes, bytes]]:
    if len(raw) % _PAIR.size:
        raise DecodeError("bad share table in state")
    out = {p: (b, s, bs, ss) for p, b, s, bs, ss in _PAIR.iter_unpack(raw)}
    if len(out) * _PAIR.size != len(raw):
        raise DecodeError("the share table in state repeats a party")
    return out


def _own_shares_in(raw: bytes) -> tuple[bytes, bytes, bytes, bytes]:
    if len(raw) != _SIGNED_PAIR.size:
        raise DecodeError("bad own-share record in state")
    b, s, bs, ss = _SIGNED_PAIR.unpack(raw)
    return b, s, bs, ss


def _roster_out(roster: dict[int, tuple[bytes, bytes, bytes]]) -> bytes:
    return b"".join(_ROSTER.pack(p, *roster[p]) for p in sorted(roster))


def _roster_in(raw: bytes) -> dict[int, tuple[bytes, bytes, bytes]]:
    if len(raw) % _ROSTER.size:
        raise DecodeError("bad roster in state")
    out = {p: (a, b, c) for p, a, b, c in _ROSTER.iter_unpack(raw)}
    if len(out) * _ROSTER.size != len(raw):
        raise DecodeError("the roster in state repeats a party")
    return out


def _commitments_out(commitments: dict[int, bytes]) -> bytes:
    return b"".join(_COMMITMENT.pack(p, commitments[p]) for p in sorted(commitments))


def _commitments_in(raw: bytes) -> dict[int, bytes]:
    if len(raw) % _COMMITMENT.size:
        raise DecodeError("bad graph commitment table in state")
    out = {p: c for p, c in _COMMITMENT.iter_unpack(raw)}
    if len(out) * _COMMITMENT.size != len(raw):
        raise DecodeError("the graph commitment table in state repeats a party")
    return out


def _dtype_str(dtype: np.dtype[Any]) -> str:
    return dtype.newbyteorder("<").str


def _pending_out(pending: PendingInput, *, include_input: bool) -> bytes:
    x = pending.x
    dtype = _dtype_str(x.dtype)
    head = _PENDING.pack(dtype.encode(), x.shape[0], pending.weight, int(include_input), pending.seed)
    if not include_input:
        return head
    return head + np.ascontiguousarray(x, dtype=np.dtype(dtype)).tobytes()


def _pending_head(raw: bytes, dimension: int) -> tuple[np.dtype[Any], float, bool, bytes]:
    """(dtype, weight, has data, seed) of a pending-input record; the sizes are checked here."""
    if len(raw) < _PENDING.size:
        raise DecodeError("bad input record in state")
    name, length, weight, has_data, seed = _PENDING.unpack_from(raw)
    try:
        dtype = np.dtype(name.rstrip(b"\0").decode("ascii"))
    except (TypeError, ValueError, UnicodeDecodeError):
        raise DecodeError("the input record in state names no numpy dtype") from None
    if dtype.kind not in "fiu" or dtype.itemsize > _MAX_ITEMSIZE or _dtype_str(dtype).encode() != name.rstrip(b"\0"):
        raise DecodeError(f"the input record in state holds dtype {dtype}, not a little-endian float or integer")
    if length != dimension or has_data not in (0, 1) or not math.isfinite(weight):
        raise DecodeError("bad input record in state: another length, flag or weight")
    expected = _PENDING.size + (length * dtype.itemsize if has_data else 0)
    if len(raw) != expected:
        raise DecodeError(f"the input record in state has {len(raw)} bytes, expected {expected}")
    return dtype, weight, bool(has_data), seed


def _pending_in(client: SecAggClient, raw: bytes, given: npt.NDArray[Any] | None) -> PendingInput:
    """The pending input of a record, its values from the blob or from `given` (the host's copy)."""
    encoding = client.params.encoding
    dtype, weight, has_data, seed = _pending_head(raw, client.params.dimension)
    stored = np.frombuffer(raw, dtype=dtype, offset=_PENDING.size) if has_data else None
    if given is None:
        if stored is None:
            raise LocalProtocolError(
                "input: this state was exported with include_input=False and its stage still needs the "
                "update; pass the same array as from_state(..., input=x)"
            )
        x = stored
    else:
        x = np.asarray(given)
        if x.shape != (client.params.dimension,) or _dtype_str(x.dtype) != _dtype_str(dtype):
            raise LocalProtocolError(
                f"input has shape {x.shape} dtype {x.dtype}; the state was exported with shape "
                f"({client.params.dimension},) dtype {dtype}: pass the update that was set"
            )
        if stored is not None and not np.array_equal(stored, x):
            raise LocalProtocolError("input differs from the update this state holds; pass input=None")
    try:
        return encoding.prepare(x, weight=weight, rounding_seed=seed, dimension=client.params.dimension)
    except LocalProtocolError as exc:
        if given is None:  # values from the blob: a tampered record
            raise DecodeError(f"the input record in state is invalid: {exc}") from None
        raise LocalProtocolError(f"input: {exc}") from None


def _key32(raw: bytes) -> bytes:
    if len(raw) != 32:
        raise DecodeError(f"a key record in state has {len(raw)} bytes, not 32")
    return raw


_FIELDS: dict[str, tuple[int, Any, Any]] = {
    "share_sk": (1, bytes, _key32),
    "mask_sk": (2, bytes, _key32),
    "self_mask_seed": (3, bytes, _key32),
    "own": (4, encode_message, decode_message),
    "own_shares": (5, lambda v: _SIGNED_PAIR.pack(*v), _own_shares_in),
    "roster": (6, _roster_out, _roster_in),
    "held": (7, _held_out, _held_in),
    "signed": (8, pack_ids, lambda r: frozenset(unpack_ids(r))),
    "answered": (9, pack_ids, lambda r: frozenset(unpack_ids(r))),
    "reply": (10, encode_message, decode_message),
    "input": (11, None, None),  # the pending input: see _pending_out / _pending_in
    "sign_sk": (12, bytes, _key32),
    "complaint": (13, encode_message, decode_message),
    "graph_nonce": (14, bytes, _key32),
    "commitments": (15, _commitments_out, _commitments_in),
    "graph_seed": (16, bytes, _key32),
}
_BY_ID = {fid: name for name, (fid, _, _) in _FIELDS.items()}

# What each stage holds (ClientState value -> required records, optional records). A blob with a
# record missing, or one its stage never holds, is refused at import rather than failing later.
_SECRETS = frozenset({"share_sk", "mask_sk", "own"})
_STAGE_RECORDS: dict[int, tuple[frozenset[str], frozenset[str]]] = {
    0: (frozenset(), frozenset({"input"})),  # IDLE
    1: (_SECRETS, frozenset({"input"})),  # ADVERTISED
    2: (_SECRETS | {"roster", "self_mask_seed", "own_shares"}, frozenset({"input"})),  # SHARED
    3: (frozenset({"own", "roster", "held"}), frozenset()),  # MASKED
    4: (frozenset({"own", "roster", "held", "signed"}), frozenset()),  # CONFIRMED
    5: (frozenset({"answered", "reply"}), frozenset()),  # DONE
    6: (frozenset(), frozenset()),  # ABORTED
    7: (frozenset(), frozenset()),  # CLOSED
    8: (frozenset({"complaint"}), frozenset()),  # COMPLAINED
    9: (_SECRETS | {"roster", "commitments", "graph_nonce"}, frozenset({"input"})),  # REVEALED (toss only)
}
# A graph toss adds the nonce until it is revealed, then the seed the graph is rebuilt from.
_TOSS_RECORDS: dict[int, frozenset[str]] = {
    1: frozenset({"graph_nonce"}),
    2: frozenset({"graph_seed"}),
    3: frozenset({"graph_seed"}),
    4: frozenset({"graph_seed"}),
}
_REVEALED = 9
_ORDER = {0: 0.0, 1: 1.0, 9: 1.5, 2: 2.0, 3: 3.0, 4: 4.0, 5: 5.0, 6: 6.0, 7: 7.0, 8: 8.0}
"""Protocol order of the stage values (REVEALED sits between ADVERTISED and SHARED)."""


def dump_client_state(client: SecAggClient, *, include_input: bool = True) -> bytes:
    """Serialize a client session (see module docstring: the result is secret).

    With `include_input=False` a pending input is recorded by dtype, length, weight and rounding seed
    only (the host passes the values back to `load_client_state`).
    """
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
    records = [
        (
            _FIELDS[name][0],
            _pending_out(value, include_input=include_input) if name == "input" else _FIELDS[name][1](value),
        )
        for name, value in client._s.items()
    ]
    out.append(pack_records(records))
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


def _check_message(value: Any, cls: type[Any], client: SecAggClient, name: str) -> None:
    if not isinstance(value, cls):
        raise DecodeError(f"state record {name!r} holds a {type(value).__name__}, not a {cls.__name__}")
    if (value.session, value.round, value.sender) != (client.session, client.round_number, client.party_id):
        raise DecodeError(f"state record {name!r} belongs to another party, session or round")


def _check_values(client: SecAggClient, values: dict[str, Any]) -> None:
    """Types, sizes and id ranges of every record (see `_STAGE_RECORDS` for which are present)."""
    from ._messages import AdvertiseKeys, Complaint, UnmaskResponse

    n = client.params.num_parties
    if "own" in values:
        _check_message(values["own"], AdvertiseKeys, client, "own")
        if values["own"].transcript != client.transcript:
            raise DecodeError("state record 'own' carries another transcript")
        _check_graph_records(client, values)
    if "reply" in values:
        _check_message(values["reply"], UnmaskResponse, client, "reply")
    if "complaint" in values:
        _check_message(values["complaint"], Complaint, client, "complaint")
    for name in ("roster", "held"):
        if name in values:
            ids = sorted(values[name])
            if not ids or ids[-1] >= n or client.party_id not in values[name]:
                raise DecodeError(f"state record {name!r} names a party outside 0..{n - 1} or omits this party")
    for name in ("signed", "answered"):
        if name in values and (not values[name] or max(values[name]) >= n):
            raise DecodeError(f"state record {name!r} names a party outside 0..{n - 1}")
    if "held" in values and "roster" in values and not set(values["held"]) <= set(values["roster"]):
        raise DecodeError("state holds shares of a party that is not in its roster")
    pinned = client.params.identity_keys
    if pinned is not None and any(entry[2] != pinned[p] for p, entry in values.get("roster", {}).items()):
        # the key that checks each dealer's share signatures must be its pinned identity key
        raise DecodeError("state record 'roster' names a signing key other than the pinned identity key")


def _check_graph_records(client: SecAggClient, values: dict[str, Any]) -> None:
    """The own keys' graph_commitment fits the session's graph mode, its nonce and the commitment table."""
    own = values["own"].graph_commitment
    if client.graph_mode is GraphMode.TOSS:
        if len(own) != 32:
            raise DecodeError("state record 'own' lacks the graph commitment a graph toss needs")
    elif own != client._beacon_binding:
        raise DecodeError("state record 'own' carries a graph commitment of another graph mode or beacon")
    nonce = values.get("graph_nonce")
    if nonce is not None and graph_commitment(client.transcript, client.party_id, nonce) != own:
        raise DecodeError("state record 'graph_nonce' does not open this party's own graph commitment")
    commitments = values.get("commitments")
    if commitments is not None:
        if set(commitments) != set(values.get("roster", {})) or commitments.get(client.party_id) != own:
            raise DecodeError("state record 'commitments' does not match the roster or this party's own commitment")


def _records_of(client: SecAggClient, stage: int) -> tuple[frozenset[str], frozenset[str]]:
    """(required, optional) records at `stage` for this session's setting and graph mode."""
    required, optional = _STAGE_RECORDS[stage]
    if not client.params.malicious and stage in (1, 2):
        required = required | {"sign_sk"}
    toss = client.graph_mode is GraphMode.TOSS
    if stage == _REVEALED and not toss:
        raise DecodeError("state at stage REVEALED belongs to a graph toss, which this session does not run")
    if toss:
        required = required | _TOSS_RECORDS.get(stage, frozenset())
    return required, optional


def load_client_state(
    client: SecAggClient,
    data: bytes,
    *,
    min_stage: int | None = None,
    input: npt.NDArray[Any] | None = None,
) -> None:
    """Restore `client` (freshly built with the same params and context) from `dump_client_state`.

    `input` is the host's copy of a pending input the blob was exported without (see
    `SecAggClient.from_state`); it is ignored at stages that no longer hold an input.

    Every record the stage needs must be there, each of the right type and size with its party ids
    in range, and no other: a tampered or truncated blob is refused here, with a `DecodeError`,
    instead of failing with a KeyError at the next message.

    Raises:
        DecodeError: the blob is malformed, of another version, or not what its stage holds.
        LocalProtocolError: the blob belongs to another party, session, round, params or context;
            `input` is missing, mismatched, or given where the blob has no pending input.
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
    if min_stage is not None and _ORDER[stage] < _ORDER.get(min_stage, min_stage):
        raise LocalProtocolError(f"stale state: stage {state.name} is older than the host's last persisted stage")
    values: dict[str, Any] = {}
    pending_raw: bytes | None = None
    for fid, raw in read_records(data, _HEAD.size, set(_BY_ID)).items():
        name = _BY_ID[fid]
        if name == "input":
            _pending_head(raw, client.params.dimension)  # sizes first; values once the stage is known
            pending_raw = raw
            values[name] = None
        else:
            values[name] = _FIELDS[name][2](raw)
    required, optional = _records_of(client, stage)
    missing, extra = required - set(values), set(values) - required - optional
    if missing or extra:
        raise DecodeError(
            f"state at stage {state.name} lacks {sorted(missing)} or holds {sorted(extra)}: tampered or truncated"
        )
    _check_values(client, values)
    if pending_raw is not None:
        values["input"] = _pending_in(client, pending_raw, input)
    elif input is not None and "input" in optional:
        raise LocalProtocolError(
            f"input was given, but the state at stage {state.name} holds no pending input (set_input was not "
            "called before it was exported): restore without input, then call set_input"
        )
    client.state = state
    client._s = values
    if "graph_seed" in values:
        client._graph = NeighbourGraph(client.params.num_parties, client.params.neighbours, values["graph_seed"])
