"""Finding 6 (state half): tampered or truncated exported state is refused at import, with a typed error.

Before, `from_state` imported whatever parsed and a later message failed with `KeyError` or a
pydantic `ValidationError`. Now both loaders check that each stage's records are present, of the
right type and size, with party ids in range, and raise `DecodeError` (or `LocalProtocolError` for
a blob of another party, session or context). This test takes the exported state of every client
and of the server at every stage of real rounds (semi-honest and malicious, plus a complaint and an
abort), mutates each blob in a bounded, deterministic loop (truncations, byte changes, dropped,
duplicated and relabelled records, other stage bytes) and asserts that only those two errors
escape `from_state`; a mutated blob that does import must then take its next message (or close its
stage) raising nothing but a `ProtocolError`.

The weakened controls are the loaders with their checks switched off (client: `_STAGE_RECORDS`
emptied of requirements and `_check_values` a no-op; server: `_subset` and `_check_stage` no-ops):
the same loop then lets a `KeyError` (or an internal assertion) escape at the next message or
stage close, the failure this test exists to prevent.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from secagg_harness import (
    HandRound,
    bundle_close,
    flip,
    malicious_params,
    malicious_plus_params,
    semi_honest_params,
    with_box,
)

from protocols import (
    DecodeError,
    LocalProtocolError,
    ProtocolError,
    SecAggClient,
    SecAggParams,
    SecAggServer,
)
from protocols.secagg import _client_state, _server_state
from protocols.secagg._client_state import pack_records, read_records

CLIENT_HEAD = struct.calcsize("<BBI16sQ32s")
SERVER_HEAD = struct.calcsize("<BB16sQ32s")

Case = tuple[str, bytes, Callable[[bytes], Any], Callable[[Any], Any]]
"""(label, blob, load, next step on the loaded session)."""


def _client_cases(name: str, params: SecAggParams, private: list[bytes] | None) -> Iterator[Case]:
    hand = HandRound(params, seed=71, identity_keys=private)
    n = params.num_parties
    watched = (0, n - 1)

    def loader(party: int) -> Callable[[bytes], Any]:
        key = None if private is None else private[party]
        return lambda blob: SecAggClient.from_state(blob, params, identity_key=key)

    def stepper(message: Any) -> Callable[[Any], Any]:
        return lambda client: (client.handle(message), client.export_state())

    hand.submit(hand.advertise())
    while pending := hand.close():
        for p in watched:
            if p in pending:
                client = hand.clients[p]
                yield (f"{name}/client{p}/{client.state.name}", client.export_state(), loader(p), stepper(pending[p]))
        hand.submit(hand.respond())
    for p in watched:
        client = hand.clients[p]
        yield (f"{name}/client{p}/{client.state.name}", client.export_state(), loader(p), lambda c: c.export_state())
    # a COMPLAINED client and an IDLE one with its input set
    other = HandRound(params, seed=72, identity_keys=private)
    bundle = other.advance(bundle_close(params))[0]
    other.clients[0].handle(with_box(bundle, 0, flip(bundle.boxes[0].data, 99)))
    yield (f"{name}/client0/COMPLAINED", other.clients[0].export_state(), loader(0), lambda c: c.export_state())
    idle = HandRound(params, seed=73, identity_keys=private)
    idle.clients[1].set_input(idle.inputs[1])
    yield (f"{name}/client1/IDLE", idle.clients[1].export_state(), loader(1), lambda c: c.advertise_keys())


def _server_cases(name: str, params: SecAggParams, private: list[bytes] | None) -> Iterator[Case]:
    hand = HandRound(params, seed=74, identity_keys=private)

    def load(blob: bytes) -> SecAggServer:
        return SecAggServer.from_state(blob, params)

    def close(server: SecAggServer) -> Any:
        server.close_stage()
        return server.export_state()

    hand.submit(hand.advertise())
    while True:
        yield (f"{name}/server/{hand.server.state.name}", hand.server.export_state(), load, close)
        if not hand.close():
            break
        replies = hand.respond()
        hand.submit(replies)
    yield (f"{name}/server/{hand.server.state.name}", hand.server.export_state(), load, lambda s: s.export_state())
    # mid-stage, with some masked inputs and a complaint held
    other = HandRound(params, seed=75, identity_keys=private)
    bundle = other.advance(bundle_close(params))[0]
    complaint = other.clients[0].handle(with_box(bundle, 0, flip(bundle.boxes[0].data, 99)))
    other.server.receive(complaint)
    replies = other.respond(drop=[0])
    other.server.receive(replies[params.num_parties - 1])
    late = replies[params.num_parties - 2]
    yield (
        f"{name}/server/COLLECT_MASKED+complaint",
        other.server.export_state(),
        load,
        lambda s: (s.receive(late), s.export_state()),
    )


def _all_cases() -> list[Case]:
    settings = [
        ("semi-honest", semi_honest_params(5), None),
        ("malicious", *malicious_params(8)),
        ("malicious-secagg+", *malicious_plus_params(10)),  # graph toss: REVEALED, COLLECT_REVEALS
    ]
    cases: list[Case] = []
    for name, params, private in settings:
        cases += list(_client_cases(name, params, private))
        cases += list(_server_cases(name, params, private))
    return cases


def _records(blob: bytes, head: int) -> list[tuple[int, bytes]]:
    return list(read_records(blob, head, set(range(256))).items())


def mutations(blob: bytes, head: int, gen: np.random.Generator) -> Iterator[bytes]:
    """A bounded, deterministic family of mutated blobs."""
    records = _records(blob, head)
    header = blob[:head]
    # truncations: every record boundary, and random cuts
    pos, bounds = head, [0, 1, head - 1, head]
    for _, raw in records:
        pos += 5 + len(raw)
        bounds += [pos - 1, pos - len(raw) - 1, pos]
    for cut in sorted(set(bounds) | {int(c) for c in gen.integers(0, len(blob), 20)}):
        if cut < len(blob):
            yield blob[:cut]
    # other stage bytes
    for stage in range(12):
        yield blob[:1] + bytes([stage]) + blob[2:]
    # byte changes: each record header, and random positions (front-weighted)
    positions = {head + i for i in range(5)} | {int(p) for p in gen.integers(0, min(len(blob), 400), 150)}
    positions |= {int(p) for p in gen.integers(0, len(blob), 80)}
    for p in sorted(positions):
        if p < len(blob):
            yield blob[:p] + bytes([blob[p] ^ int(gen.integers(1, 256))]) + blob[p + 1 :]
    # record-level: drop one, relabel one as every other id, empty one, cut one short, append one twice
    ids = sorted({fid for fid, _ in records} | set(range(1, 17)))
    for i, (fid, raw) in enumerate(records):
        rest = records[:i] + records[i + 1 :]
        yield header + pack_records(rest)
        for other in ids:
            if other != fid and other not in {f for f, _ in rest}:
                yield header + pack_records([*rest, (other, raw)])
        yield header + pack_records([*rest, (fid, b"")])
        if raw:
            yield header + pack_records([*rest, (fid, raw[: len(raw) // 2])])
            yield header + pack_records([*rest, (fid, raw[:-1])])
    for fid, raw in records[:1]:
        yield header + pack_records([*records, (fid, raw)])


CASES = _all_cases()


def _fuzz(cases: list[Case]) -> tuple[int, int, list[str]]:
    """(mutations tried, mutations imported, escaped errors as 'label: ExcType: message')."""
    gen = np.random.default_rng(2026)
    tried = imported = 0
    escaped: list[str] = []
    for label, blob, load, step in cases:
        head = SERVER_HEAD if "/server/" in label else CLIENT_HEAD
        for mutated in mutations(blob, head, gen):
            tried += 1
            try:
                session = load(mutated)
            except (DecodeError, LocalProtocolError):
                continue
            except Exception as exc:  # the property under test: nothing else escapes the import
                escaped.append(f"{label} import: {type(exc).__name__}: {exc}")
                continue
            imported += 1
            try:
                step(session)
            except ProtocolError:
                continue
            except Exception as exc:  # nor anything untyped at the next step
                escaped.append(f"{label} next step: {type(exc).__name__}: {exc}")
    return tried, imported, escaped


def test_every_stage_is_covered() -> None:
    labels = {c[0] for c in CASES}
    for name in ("semi-honest", "malicious"):
        for stage in ("ADVERTISED", "SHARED", "MASKED", "DONE", "COMPLAINED", "IDLE"):
            assert f"{name}/client0/{stage}" in labels or f"{name}/client1/{stage}" in labels
        for stage in ("COLLECT_KEYS", "COLLECT_SHARES", "COLLECT_MASKED", "COLLECT_UNMASK", "DONE"):
            assert f"{name}/server/{stage}" in labels
    assert "malicious/client0/CONFIRMED" in labels and "malicious/server/COLLECT_SIGNATURES" in labels
    assert "malicious-secagg+/client0/REVEALED" in labels and "malicious-secagg+/server/COLLECT_REVEALS" in labels


def test_unmutated_states_import_and_take_their_next_step() -> None:
    for _label, blob, load, step in CASES:
        step(load(blob))  # raises if the honest blob does not round-trip


def test_mutated_states_raise_only_typed_errors() -> None:
    tried, imported, escaped = _fuzz(CASES)
    assert not escaped, "\n".join(escaped[:20])
    assert tried >= 10_000 and imported > 0  # bounded but broad; some mutations (key bytes) stay valid


def test_control_without_the_stage_checks_lets_untyped_errors_escape(monkeypatch: pytest.MonkeyPatch) -> None:
    relaxed = {stage: (frozenset(), frozenset(_client_state._FIELDS)) for stage in _client_state._STAGE_RECORDS}
    monkeypatch.setattr(_client_state, "_STAGE_RECORDS", relaxed)
    monkeypatch.setattr(_client_state, "_check_values", lambda client, values: None)
    client_cases = [c for c in CASES if "/client" in c[0]]
    _, _, escaped = _fuzz(client_cases)
    assert any("KeyError" in e for e in escaped), escaped[:5]


def test_control_without_the_server_checks_lets_untyped_errors_escape(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_server_state, "_subset", lambda inner, outer, what: None)
    monkeypatch.setattr(_server_state, "_check_stage", lambda state, params, *, has_sum, later: None)
    _, _, escaped = _fuzz([c for c in CASES if "/server/" in c[0]])
    assert any("KeyError" in e or "AssertionError" in e for e in escaped), escaped[:5]
