"""An in-process driver: one full round over n sessions, with dropouts injected at any stage.

It plays the network: every message is encoded to bytes and decoded again on the other side (so the
codec is exercised and bytes are counted), and parties go silent at the stage the caller chooses.
Tests, benchmarks and the federation runner use it. It stays sans-IO: the clock is passed in
(`clock=time.perf_counter` to measure) and randomness comes from per-party `SecretSource`s.

Stage numbers (what a party stops sending): 0 AdvertiseKeys, 5 GraphReveal (malicious SecAgg+ only;
sent between stages 0 and 1), 1 EncryptedShares, 2 MaskedInput (or its Complaint), 3 SurvivorSignature
(malicious setting only), 4 UnmaskResponse; for HE: 0 HEHello, 1 HEKeyOffer, 2 HEInput, 4 HEAck. The
numbers are labels kept stable for callers; `STAGE_ORDER` is the order they happen in, and a party
with drop_at[p] = s is silent from the first message whose stage comes at or after s in that order
(so drop_at = 1 still reveals its graph nonce and drops at its shares; 5 drops at the reveal, which
aborts the toss).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from .he import HEAck, HEClient, HEHello, HEInput, HEKeyOffer, HEParams, HEServer, decode_he_message, encode_he_message
from .plaintext import PlaintextClient, PlaintextServer
from .randomness import OsRandom, SecretSource
from .secagg._client import SecAggClient
from .secagg._codec import decode_message, encode_message
from .secagg._messages import (
    AdvertiseKeys,
    Complaint,
    EncryptedShares,
    GraphReveal,
    MaskedInput,
    Message,
    SurvivorSignature,
    UnmaskResponse,
)
from .secagg._params import SecAggParams
from .secagg._server import AggregateResult, SecAggServer

__all__ = ["STAGE_OF", "STAGE_ORDER", "RoundReport", "goes_silent", "run_round"]

STAGE_OF: dict[type[Any], int] = {
    AdvertiseKeys: 0,
    GraphReveal: 5,
    EncryptedShares: 1,
    MaskedInput: 2,
    Complaint: 2,
    SurvivorSignature: 3,
    UnmaskResponse: 4,
    HEHello: 0,
    HEKeyOffer: 1,
    HEInput: 2,
    HEAck: 4,
}


STAGE_ORDER: tuple[int, ...] = (0, 5, 1, 2, 3, 4)
"""The stage numbers in the order their messages are sent."""


def goes_silent(drop_stage: int | None, message: type[Any]) -> bool:
    """Whether a party told to drop at `drop_stage` (None: never) withholds a message of this type."""
    if drop_stage is None:
        return False
    rank = STAGE_ORDER.index
    return rank(drop_stage) <= rank(STAGE_OF[message])


@dataclass
class RoundReport:
    """The result and what it cost; times are in the units of the clock passed in (0 without one)."""

    result: AggregateResult
    client_seconds: dict[int, float] = field(default_factory=dict)
    server_seconds: float = 0.0
    upload_bytes: dict[int, int] = field(default_factory=dict)
    download_bytes: dict[int, int] = field(default_factory=dict)


class _Network:
    """Routes encoded messages between the sessions, timing each side and counting bytes."""

    def __init__(
        self,
        clients: list[Any],
        server: Any,
        drop_at: Mapping[int, int],
        clock: Callable[[], float],
        tap: Callable[[int, bytes], None] | None = None,
        he: bool = False,
    ):
        self.clients, self.server, self.drop_at, self.tick, self.tap = clients, server, drop_at, clock, tap
        self.encode: Callable[[Any], bytes] = encode_he_message if he else encode_message
        self.decode: Callable[[bytes], Any] = decode_he_message if he else decode_message
        n = len(clients)
        self.client_seconds = {p: 0.0 for p in range(n)}
        self.server_seconds = 0.0
        self.up = {p: 0 for p in range(n)}
        self.down = {p: 0 for p in range(n)}
        self.gone: set[int] = set()

    def client_step(self, party: int, step: Callable[[], Message]) -> bytes | None:
        t = self.tick()
        message = step()
        if goes_silent(self.drop_at.get(party), type(message)):
            self.gone.add(party)
        wire = None if party in self.gone else self.encode(message)
        self.client_seconds[party] += self.tick() - t
        self.up[party] += len(wire or b"")
        if wire is not None and self.tap is not None:
            self.tap(party, wire)
        return wire

    def to_server(self, wires: list[bytes | None]) -> None:
        t = self.tick()
        for wire in wires:
            if wire is not None:
                self.server.receive(self.decode(wire))
        self.server_seconds += self.tick() - t

    def close_stage(self) -> list[tuple[int, bytes]]:
        t = self.tick()
        wires = [(p, self.encode(m)) for p, m in self.server.close_stage()]
        self.server_seconds += self.tick() - t
        return wires

    def to_client(self, party: int, wire: bytes) -> bytes | None:
        self.down[party] += len(wire)
        client = self.clients[party]
        return self.client_step(party, lambda: client.handle(self.decode(wire)))


def run_round(
    params: SecAggParams | HEParams,
    inputs: Sequence[npt.NDArray[np.floating]],
    *,
    protocol: Literal["secagg", "plaintext", "he"] = "secagg",
    weights: Sequence[float] | None = None,
    drop_at: Mapping[int, int] | None = None,
    session: bytes | None = None,
    round_number: int = 0,
    context: bytes = b"",
    identity_keys: Sequence[bytes] | None = None,
    rng_for: Callable[[int], SecretSource] | None = None,
    clock: Callable[[], float] | None = None,
    tap: Callable[[int, bytes], None] | None = None,
    rounding_seeds: Sequence[bytes] | None = None,
    party_contexts: Sequence[bytes] | None = None,
    beacon: bytes | None = None,
) -> RoundReport:
    """Run one round and return the server's result.

    Args:
        params: public parameters (n = len(inputs)).
        inputs: one float vector per party.
        protocol: "secagg" (SecAgg or SecAgg+, by params.neighbours), "he" (with `HEParams`: the
            result is what the server learns; for CKKS, read it from a client instead) or the
            "plaintext" control.
        weights: aggregation weights (default 1.0 each).
        drop_at: party -> first stage at which it goes silent (see module docstring).
        session: 16-byte session id; random when omitted.
        round_number: the round number.
        context: the round context every party binds.
        identity_keys: per-party Ed25519 private keys (malicious setting).
        rng_for: party id -> its `SecretSource` (-1 is the session id's source); os.urandom by default.
        clock: a monotonic clock for timings.
        tap: called with (party, bytes) for every message a client sends the server (an audit hook).
        rounding_seeds: per-party 32-byte seeds of the stochastic rounding (default: from each party's
            SecretSource); a client that must replay a bit-identical input after a crash passes its own.
        party_contexts: per-party contexts, for adversarial simulations only: a malicious server that
            shows parties different models (the server keeps `context`).
        beacon: a public randomness value every SecAgg party and the server derive the graph from
            (no graph toss); see `SecAggClient`.

    Raises:
        AbortError: the round aborted (too few survivors); nothing was revealed.
    """
    rng_for = rng_for or (lambda _party: OsRandom())
    session = session if session is not None else rng_for(-1).token_bytes(16)
    clients: list[Any] = []
    he = protocol == "he"
    if he != isinstance(params, HEParams):
        raise ValueError("protocol='he' goes with HEParams, the others with SecAggParams")
    for p in range(len(inputs)):
        own_context = party_contexts[p] if party_contexts is not None else context
        if protocol in ("he", "secagg"):
            session_cls: Any = HEClient if isinstance(params, HEParams) else SecAggClient
            key = identity_keys[p] if identity_keys is not None else None
            extra = {"beacon": beacon} if beacon is not None else {}
            clients.append(
                session_cls(
                    params,
                    party_id=p,
                    session=session,
                    round_number=round_number,
                    context=own_context,
                    identity_key=key,
                    rng=rng_for(p),
                    **extra,
                )
            )
        else:
            assert isinstance(params, SecAggParams)
            clients.append(
                PlaintextClient(params, party_id=p, session=session, round_number=round_number, rng=rng_for(p))
            )
    server: Any
    if isinstance(params, HEParams):
        server = HEServer(params, session=session, round_number=round_number, context=context)
    elif protocol == "secagg":
        server = SecAggServer(params, session=session, round_number=round_number, context=context, beacon=beacon)
    else:
        server = PlaintextServer(params, session=session, round_number=round_number)
    net = _Network(clients, server, drop_at or {}, clock or (lambda: 0.0), tap, he=he)
    first = []
    for p, client in enumerate(clients):
        weight = 1.0 if weights is None else weights[p]
        seed = None if rounding_seeds is None else rounding_seeds[p]
        first.append(net.client_step(p, partial(_start, client, inputs[p], weight, seed)))
    net.to_server(first)
    while wires := net.close_stage():
        net.to_server([net.to_client(p, wire) for p, wire in wires if p not in net.gone])
    if isinstance(params, HEParams) and params.scheme == "ckks":
        # never released to the server: report what the first contributing client decrypted
        included = server.contributors
        result = AggregateResult(
            decoded=clients[included[0]].result(),
            ring_sum=None,
            included=included,
            dropped=tuple(p for p in range(len(inputs)) if p not in included),
            insecure=False,
        )
    else:
        result = server.result()
    return RoundReport(
        result=result,
        client_seconds=net.client_seconds,
        server_seconds=net.server_seconds,
        upload_bytes=net.up,
        download_bytes=net.down,
    )


def _start(client: Any, x: npt.NDArray[np.floating], weight: float, rounding_seed: bytes | None) -> Any:
    client.set_input(x, weight=weight, rounding_seed=rounding_seed)
    if isinstance(client, SecAggClient | HEClient):
        return client.advertise_keys()
    message: Message = client.start()
    return message
