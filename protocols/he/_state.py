"""HE session state to bytes and back, so a host that keeps no objects between messages (Flower) can run HE.

The client blob is SECRET: it holds the client's X25519 and Ed25519 session keys, its plaintext
update until it is encrypted and, for the client that decrypts (the key holder, with either scheme),
the HE secret key until its one decryption. Keep it only in the site's
own state folder. The server blob holds what the server already saw (hellos, key offers, signed
ciphertexts, acknowledgements) and no secret; a restored server replays them through its own checks.

Layout: `version (u8) | stage (u8) | party (u32) | session (16) | round (u64) | transcript (32)`, then
records `id (u8) | length (u32) | value`, each checked before use. Any malformed, truncated or
inconsistent blob raises `DecodeError`; one of another party, session, round, params or context
raises `LocalProtocolError`. Keys are stored as bare polynomials whose every coefficient is checked
below its modulus before this package writes the SEAL objects itself (no TenSEAL parser sees them).
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Any

import numpy as np

from ..encoding import DecodedSum
from ..errors import DecodeError, LocalProtocolError, ProtocolError
from ..primitives import ed25519_public, x25519_public
from ._ciphers import self_test
from ._export import export_public, export_secret
from ._messages import HEHello, HERoster, decode_he_message, encode_he_message
from ._wire import layout

if TYPE_CHECKING:
    from ._client import HEClient
    from ._server import HEServer

__all__ = ["dump_he_client", "dump_he_server", "load_he_client", "load_he_server", "peek_he_identity"]

VERSION = 1
_HEAD = struct.Struct("<BBI16sQ32s")
_DH, _SIGN, _HELLO, _ROSTER, _HOLDER, _SECRET, _PUBLIC, _DIGEST, _INPUT, _RESULT, _DECRYPTIONS = range(1, 12)
_SERVER_PARTY = 0xFFFFFFFF


def _records(records: list[tuple[int, bytes]]) -> bytes:
    return b"".join(struct.pack("<BI", fid, len(raw)) + raw for fid, raw in records)


def _read(data: bytes) -> tuple[tuple[Any, ...], dict[int, bytes]]:
    if len(data) < _HEAD.size:
        raise DecodeError("HE state blob is truncated", field="state")
    head = _HEAD.unpack_from(data)
    if head[0] != VERSION:
        raise DecodeError(f"HE state version {head[0]} is not {VERSION}", field="state")
    out: dict[int, bytes] = {}
    pos = _HEAD.size
    while pos < len(data):
        if pos + 5 > len(data):
            raise DecodeError("HE state record header is truncated", field="state")
        fid, length = struct.unpack_from("<BI", data, pos)
        pos += 5
        if not 1 <= fid <= _DECRYPTIONS or fid in out or pos + length > len(data):
            raise DecodeError("bad HE state record (unknown, repeated or truncated)", field="state")
        out[fid] = data[pos : pos + length]
        pos += length
    return head, out


def _blobs(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def _unblobs(raw: bytes) -> list[bytes]:
    out, pos = [], 0
    while pos < len(raw):
        if pos + 4 > len(raw):
            raise DecodeError("HE state list is truncated", field="state")
        (length,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        if pos + length > len(raw):
            raise DecodeError("HE state list entry is truncated", field="state")
        out.append(raw[pos : pos + length])
        pos += length
    return out


def peek_he_identity(data: bytes) -> tuple[int, int, bytes, int]:
    """(stage index, party, session, round) of a blob, to build the session it restores into."""
    if len(data) < _HEAD.size:
        raise DecodeError("HE state blob is truncated", field="state")
    _, stage, party, session, round_number, _ = _HEAD.unpack_from(data)
    return stage, party, session, round_number


# -- client ----------------------------------------------------------------------------------------------


def dump_he_client(client: HEClient, order: tuple[Any, ...]) -> bytes:
    """Serialize a client session (SECRET; see the module docstring)."""
    head = _HEAD.pack(
        VERSION, order.index(client.state), client.party_id, client.session, client.round_number, client.transcript
    )
    rec: list[tuple[int, bytes]] = []
    if client.state.name in ("HELLO_SENT", "OFFERED", "INPUT_SENT"):
        rec += [(_DH, client._dh_private), (_SIGN, client._sign_private), (_HELLO, encode_he_message(client._hello))]
    if client._hellos and client.state.name != "ABORTED":
        rec.append((_ROSTER, _blobs([encode_he_message(client._hellos[p]) for p in sorted(client._hellos)])))
        assert client.holder is not None
        rec.append((_HOLDER, struct.pack("<I", client.holder)))
    if client._ctx is not None:
        shape = layout(client.params)
        rec.append((_SECRET, export_secret(shape, client._ctx)))
        if client.params.mode == "public-key":
            rec.append((_PUBLIC, export_public(shape, client._ctx)))
    if client._own_digest is not None and client.state.name == "INPUT_SENT":
        rec.append((_DIGEST, client._own_digest))
    if client._input is not None:
        x, weight, seed = client._input
        rec.append((_INPUT, struct.pack("<d?", weight, seed is not None) + (seed or b"") + x.astype("<f8").tobytes()))
    if client._result is not None:
        r = client._result
        vec = np.asarray(r.weighted_sum, dtype="<f8").tobytes()
        rec.append((_RESULT, struct.pack("<dQd", r.total_weight, r.num_inputs, r.max_abs_error) + vec))
    if client.state.name == "DONE":
        rec.append((_DECRYPTIONS, struct.pack("<B", client.decryptions)))
    return head + _records(rec)


_CLIENT_NEEDS: dict[str, tuple[frozenset[int], frozenset[int]]] = {
    # stage -> (required records, optional records); keys are checked separately
    "NEW": (frozenset(), frozenset({_INPUT})),
    "HELLO_SENT": (frozenset({_DH, _SIGN, _HELLO}), frozenset({_INPUT})),
    "OFFERED": (frozenset({_DH, _SIGN, _HELLO, _ROSTER, _HOLDER}), frozenset({_INPUT, _SECRET, _PUBLIC})),
    "INPUT_SENT": (frozenset({_DH, _SIGN, _HELLO, _ROSTER, _HOLDER, _DIGEST}), frozenset({_SECRET, _PUBLIC})),
    "DONE": (frozenset({_ROSTER, _HOLDER, _DECRYPTIONS}), frozenset({_RESULT})),
    "ABORTED": (frozenset(), frozenset()),
}


def load_he_client(client: HEClient, data: bytes, order: tuple[Any, ...]) -> None:
    """Fill a freshly built client from a blob (see the module docstring for what is checked)."""
    (_, stage_index, party, session, round_number, transcript), rec = _read(data)
    if stage_index >= len(order):
        raise DecodeError(f"HE state stage {stage_index} is unknown", field="state")
    if (party, session, round_number) != (client.party_id, client.session, client.round_number):
        raise LocalProtocolError("the HE state blob belongs to another party, session or round")
    if transcript != client.transcript:
        raise LocalProtocolError("the HE state blob was made with other params or another context")
    stage = order[stage_index]
    needed, optional = _CLIENT_NEEDS[stage.name]
    if not needed <= set(rec) or not set(rec) <= needed | optional:
        raise DecodeError(f"HE state records do not match stage {stage.name}", field="state")
    params = client.params
    try:
        _load_keys_and_roster(client, rec, (party, session, round_number, transcript))
        _load_key(client, stage.name, rec)
        if _DIGEST in rec:
            client._own_digest = _key32(rec[_DIGEST])
        if _INPUT in rec:
            client._input = _input(params, rec[_INPUT])
        _load_outcome(client, stage.name, rec)
    except DecodeError:
        raise
    except (ProtocolError, ValueError, struct.error) as exc:
        raise DecodeError(f"HE state does not verify: {exc}", field="state") from exc
    client.state = stage


def _load_keys_and_roster(client: HEClient, rec: dict[int, bytes], ident: tuple[int, bytes, int, bytes]) -> None:
    party, session, round_number, transcript = ident
    params = client.params
    if _DH in rec:
        client._dh_private, client._sign_private = _key32(rec[_DH]), _key32(rec[_SIGN])
        hello = decode_he_message(rec[_HELLO])
        if not isinstance(hello, HEHello) or (hello.session, hello.round, hello.sender) != (
            session,
            round_number,
            party,
        ):
            raise DecodeError("HE state hello is not this client's", field="state")
        if hello.dh_public != x25519_public(client._dh_private) or hello.sign_public != ed25519_public(
            client._sign_private
        ):
            raise DecodeError("HE state hello does not match its keys", field="state")
        client._hello = hello
    if _ROSTER in rec:
        from ._client import key_holder, parse_roster

        roster = HERoster(
            session=session, round=round_number, sender=_SERVER_PARTY, hellos=tuple(_unblobs(rec[_ROSTER]))
        )
        client._hellos = parse_roster(params, transcript, roster)
        if party not in client._hellos or (_HELLO in rec and client._hellos[party] != client._hello):
            raise DecodeError("HE state roster omits or alters this client's hello", field="state")
        if len(rec[_HOLDER]) != 4 or struct.unpack("<I", rec[_HOLDER])[0] != key_holder(transcript, client._hellos):
            raise DecodeError("HE state names another key holder than the public rule", field="state")
        client.holder = key_holder(transcript, client._hellos)


def _load_outcome(client: HEClient, stage: str, rec: dict[int, bytes]) -> None:
    params = client.params
    if _RESULT in rec:
        if not client.decrypts:
            raise DecodeError("HE state holds an aggregate for a client that decrypts nothing", field="state")
        client._result = _result(params, rec[_RESULT])
    elif stage == "DONE" and client.decrypts:
        raise DecodeError("HE state of a decrypting client is DONE without its aggregate", field="state")
    if _DECRYPTIONS in rec:
        if rec[_DECRYPTIONS] not in (b"\x00", b"\x01"):
            raise DecodeError("HE state decryption counter is not 0 or 1", field="state")
        client.decryptions = rec[_DECRYPTIONS][0]


def _load_key(client: HEClient, stage: str, rec: dict[int, bytes]) -> None:
    params = client.params
    public_mode = params.mode == "public-key"
    keyed = (stage == "OFFERED" and client.holder == client.party_id) or (stage == "INPUT_SENT" and client.decrypts)
    has_secret, has_public = _SECRET in rec, _PUBLIC in rec
    if has_secret != keyed or has_public != (keyed and public_mode):
        raise DecodeError(f"HE state key records do not match stage {stage} of this client", field="state")
    if not keyed:
        return
    shape = layout(params)
    secret = shape.unpack(rec[_SECRET], 1, shape.key_moduli, field="state", peer_id=None)
    public = shape.unpack(rec[_PUBLIC], 2, shape.key_moduli, field="state", peer_id=None) if public_mode else None
    try:
        ctx = shape.restored_context(secret, public)
    except Exception as exc:  # our own canonical bytes, written from checked coefficients
        raise DecodeError("HE state key is not a valid key", field="state") from exc
    self_test(ctx, params)
    client._ctx = ctx


def _key32(raw: bytes) -> bytes:
    if len(raw) != 32:
        raise DecodeError(f"HE state key record has {len(raw)} bytes, not 32", field="state")
    return raw


def _input(params: Any, raw: bytes) -> tuple[Any, float, bytes | None]:
    if len(raw) < 9:
        raise DecodeError("HE state input is truncated", field="state")
    weight, has_seed = struct.unpack_from("<d?", raw)
    pos = 9
    seed = None
    if has_seed:
        seed, pos = raw[9:41], 41
        if len(seed) != 32:
            raise DecodeError("HE state rounding seed is truncated", field="state")
    if not 0 < weight <= params.max_weight or len(raw) - pos != 8 * params.dimension:
        raise DecodeError("HE state input has a bad weight or length", field="state")
    x = np.frombuffer(raw[pos:], dtype="<f8").astype(np.float64)
    if not np.isfinite(x).all():
        raise DecodeError("HE state input is not finite", field="state")
    return x, float(weight), seed


def _result(params: Any, raw: bytes) -> DecodedSum:
    if len(raw) != 24 + 8 * params.dimension:
        raise DecodeError("HE state aggregate has the wrong length", field="state")
    total, count, error = struct.unpack_from("<dQd", raw)
    vec = np.frombuffer(raw[24:], dtype="<f8").astype(np.float64)
    if not (np.isfinite(vec).all() and np.isfinite([total, error]).all()) or count > params.num_parties:
        raise DecodeError("HE state aggregate is out of range", field="state")
    return DecodedSum(weighted_sum=vec, total_weight=total, num_inputs=count, max_abs_error=error)


# -- server: what it saw, replayed through its own checks ----------------------------------------------


def dump_he_server(server: HEServer, order: tuple[Any, ...]) -> bytes:
    """Serialize a server session: every accepted message, per stage (no secret)."""
    head = _HEAD.pack(
        VERSION, order.index(server.state), _SERVER_PARTY, server.session, server.round_number, server.transcript
    )
    rec = [(i + 1, _blobs([encode_he_message(m) for m in log])) for i, log in enumerate(server._log) if log]
    return head + _records(rec)


def load_he_server(server: HEServer, data: bytes, order: tuple[Any, ...]) -> None:
    """Replay a blob's messages through a fresh server's checks; it must end in the recorded stage."""
    (_, stage_index, party, session, round_number, transcript), rec = _read(data)
    if stage_index >= len(order) or party != _SERVER_PARTY:
        raise DecodeError("HE server state has an unknown stage or is a client's", field="state")
    if (session, round_number) != (server.session, server.round_number):
        raise LocalProtocolError("the HE state blob belongs to another session or round")
    if transcript != server.transcript:
        raise LocalProtocolError("the HE state blob was made with other params or another context")
    target = order[stage_index]
    if set(rec) - {1, 2, 3, 4}:
        raise DecodeError("HE server state has a record beyond the four collecting stages", field="state")
    if target.name == "ABORTED":
        if rec:
            raise DecodeError("an aborted HE server state holds messages", field="state")
        server.state = target
        return
    index = _replay(server, rec, target)
    if server.state is not target or any(i > index for i in rec):
        raise DecodeError(f"HE server state does not replay to stage {target.name}", field="state")


def _replay(server: HEServer, rec: dict[int, bytes], target: Any) -> int:
    """Feed each stage's messages and close it until the recorded stage; returns the last stage index fed."""
    index = 1
    try:
        for index in range(1, 5):
            for blob in _unblobs(rec.get(index, b"")):
                server.receive(decode_he_message(blob))
            if server.state is target:
                break
            server.close_stage()
    except DecodeError:
        raise
    except (ProtocolError, ValueError) as exc:
        raise DecodeError(f"HE server state does not replay: {exc}", field="state") from exc
    return index
