"""An in-process driver: one full round over n sessions, with dropouts injected at any step.

It plays the network: every message is encoded to bytes and decoded again on the other side (so the
codec is exercised and bytes are counted), and parties go silent at the step the caller chooses.
Tests, benchmarks and the federation runner use it. It stays sans-IO: the clock is passed in
(`clock=time.perf_counter` to measure) and randomness comes from per-party `SecretSource`s.

It depends only on the session interface (`protocols.session`): a `SessionFamily` builds the
sessions and (de)serializes their messages, so SecAgg, SecAgg+, HE and the plaintext control all run
through the same loop (`run_sessions`). Dropouts are named by `RoundStep` (ADVERTISE, REVEAL, SHARE,
INPUT, CONFIRM, UNMASK, in protocol order): a party with drop_at[p] = step is silent from the first
message whose step comes at or after it (so SHARE still reveals its graph nonce and drops at its
shares; REVEAL drops at the reveal, which aborts the toss). Step names ("input") and the older
integer labels (0 ADVERTISE, 5 REVEAL, 1 SHARE, 2 INPUT, 3 CONFIRM, 4 UNMASK) are accepted too.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from .he import HEFamily, HEParams
from .plaintext import PlaintextFamily
from .policy import SecurityPolicy
from .randomness import OsRandom, SecretSource
from .secagg import AggregateResult, SecAggFamily, SecAggParams
from .session import ClientSession, RoundStep, ServerSession, SessionFamily, as_round_step

__all__ = ["DropAt", "RoundReport", "family_for", "goes_silent", "run_round", "run_sessions"]

DropAt = Mapping[int, RoundStep | str | int]
"""party -> the step from which it goes silent (a `RoundStep`, its name, or a legacy integer label)."""


def goes_silent(drop_step: RoundStep | str | int | None, step: RoundStep) -> bool:
    """Whether a party told to drop at `drop_step` (None: never) withholds a message of `step`."""
    if drop_step is None:
        return False
    return as_round_step(drop_step).rank <= step.rank


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
        family: SessionFamily,
        clients: Sequence[ClientSession],
        server: ServerSession,
        drop_at: Mapping[int, RoundStep],
        clock: Callable[[], float],
        tap: Callable[[int, bytes], None] | None = None,
    ):
        self.family, self.clients, self.server, self.drop_at, self.tick, self.tap = (
            family,
            clients,
            server,
            drop_at,
            clock,
            tap,
        )
        n = len(clients)
        self.client_seconds = {p: 0.0 for p in range(n)}
        self.server_seconds = 0.0
        self.up = {p: 0 for p in range(n)}
        self.down = {p: 0 for p in range(n)}
        self.gone: set[int] = set()
        self.sent: dict[int, set[RoundStep]] = {p: set() for p in range(n)}

    def client_step(self, party: int, step: Callable[[], Any]) -> bytes | None:
        t = self.tick()
        message = step()
        if goes_silent(self.drop_at.get(party), self.family.step_of(type(message))):
            self.gone.add(party)
        wire = None if party in self.gone else self.family.encode(message)
        if wire is not None:
            self.sent[party].add(self.family.step_of(type(message)))
        self.client_seconds[party] += self.tick() - t
        self.up[party] += len(wire or b"")
        if wire is not None and self.tap is not None:
            self.tap(party, wire)
        return wire

    def to_server(self, wires: list[bytes | None]) -> None:
        t = self.tick()
        for wire in wires:
            if wire is not None:
                self.server.receive(self.family.decode(wire))
        self.server_seconds += self.tick() - t

    def close_stage(self) -> list[tuple[int, bytes]]:
        t = self.tick()
        wires = [(p, self.family.encode(m)) for p, m in self.server.close_stage()]
        self.server_seconds += self.tick() - t
        return wires

    def to_client(self, party: int, wire: bytes) -> bytes | None:
        self.down[party] += len(wire)
        client = self.clients[party]
        return self.client_step(party, lambda: client.handle(self.family.decode(wire)))


def family_for(
    params: SecAggParams | HEParams,
    protocol: Literal["secagg", "plaintext", "he"] = "secagg",
    *,
    beacon: bytes | None = None,
    plaintext_policy: SecurityPolicy | None = None,
) -> SessionFamily:
    """The session family of a protocol name and its parameters.

    "plaintext" needs a policy that allows it; without one, the caller's explicit protocol="plaintext"
    is taken as that choice (`SecurityPolicy(protocol="plaintext")`), as for a simulation's control.
    """
    if (protocol == "he") != isinstance(params, HEParams):
        raise ValueError("protocol='he' goes with HEParams, the others with SecAggParams")
    if isinstance(params, HEParams):
        return HEFamily(params)
    if protocol == "secagg":
        return SecAggFamily(params, beacon=beacon)
    return PlaintextFamily(params, policy=plaintext_policy or SecurityPolicy.model_validate({"protocol": "plaintext"}))


def run_round(
    params: SecAggParams | HEParams,
    inputs: Sequence[npt.NDArray[np.floating]],
    *,
    protocol: Literal["secagg", "plaintext", "he"] = "secagg",
    weights: Sequence[float] | None = None,
    drop_at: DropAt | None = None,
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
    plaintext_policy: SecurityPolicy | None = None,
) -> RoundReport:
    """Run one round and return the server's result.

    Args:
        params: public parameters (n = len(inputs)).
        inputs: one float vector per party.
        protocol: "secagg" (SecAgg or SecAgg+, by params.neighbours), "he" (with `HEParams`: the
            exact integer sum the key holder releases, BFV or CKKS) or the "plaintext" control.
        weights: aggregation weights (default 1.0 each).
        drop_at: party -> the step from which it goes silent (see module docstring).
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
        plaintext_policy: the policy that allows the plaintext control (see `family_for`).

    Raises:
        AbortError: the round aborted (too few survivors); nothing was revealed.
    """
    family = family_for(params, protocol, beacon=beacon, plaintext_policy=plaintext_policy)
    return run_sessions(
        family,
        inputs,
        weights=weights,
        drop_at=drop_at,
        session=session,
        round_number=round_number,
        context=context,
        identity_keys=identity_keys,
        rng_for=rng_for,
        clock=clock,
        tap=tap,
        rounding_seeds=rounding_seeds,
        party_contexts=party_contexts,
    )


def run_sessions(
    family: SessionFamily,
    inputs: Sequence[npt.NDArray[np.floating] | npt.NDArray[np.integer]],
    *,
    weights: Sequence[float] | None = None,
    drop_at: DropAt | None = None,
    session: bytes | None = None,
    round_number: int = 0,
    context: bytes = b"",
    identity_keys: Sequence[bytes] | None = None,
    rng_for: Callable[[int], SecretSource] | None = None,
    clock: Callable[[], float] | None = None,
    tap: Callable[[int, bytes], None] | None = None,
    rounding_seeds: Sequence[bytes] | None = None,
    party_contexts: Sequence[bytes] | None = None,
) -> RoundReport:
    """`run_round` for any `SessionFamily` (the same arguments, with the family in place of params/protocol).

    An integer input vector is passed to `set_input` as ring elements (see `ClientSession.set_input`).
    """
    rng_for = rng_for or (lambda _party: OsRandom())
    session = session if session is not None else rng_for(-1).token_bytes(16)
    drops = {p: as_round_step(s) for p, s in (drop_at or {}).items()}
    clients: list[ClientSession] = []
    for p in range(len(inputs)):
        clients.append(
            family.client(
                p,
                session=session,
                round_number=round_number,
                context=party_contexts[p] if party_contexts is not None else context,
                identity_key=identity_keys[p] if identity_keys is not None else None,
                rng=rng_for(p),
            )
        )
    server = family.server(session=session, round_number=round_number, context=context)
    net = _Network(family, clients, server, drops, clock or (lambda: 0.0), tap)
    first = []
    for p, client in enumerate(clients):
        weight = 1.0 if weights is None else weights[p]
        seed = None if rounding_seeds is None else rounding_seeds[p]
        first.append(net.client_step(p, _starter(client, inputs[p], weight, seed)))
    net.to_server(first)
    while wires := net.close_stage():
        net.to_server([net.to_client(p, wire) for p, wire in wires if p not in net.gone])
    if family.reveals_to_client:
        # a family whose aggregate is never released to the server (none of ours since CKKS releases
        # its exact integer sum): report what the first contributing client decrypted
        included = tuple(p for p in range(len(inputs)) if RoundStep.INPUT in net.sent[p])
        reader = next(p for p in included if _decrypted(family, clients[p]))
        result = AggregateResult(
            decoded=family.client_result(clients[reader]),
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


def _decrypted(family: SessionFamily, client: ClientSession) -> bool:
    try:
        family.client_result(client)
    except Exception:
        return False
    return True


def _starter(
    client: ClientSession,
    x: npt.NDArray[np.floating] | npt.NDArray[np.integer],
    weight: float,
    seed: bytes | None,
) -> Callable[[], Any]:
    def start() -> Any:
        client.set_input(x, weight=weight, rounding_seed=seed)
        return client.start()

    return start
