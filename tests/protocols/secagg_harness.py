"""Shared helpers for the protocol tests: deterministic SecAgg rounds driven by hand.

`HandRound` plays the host and the network for n `SecAggClient`s and one `SecAggServer`, without
encoding to bytes (the codec has its own tests), so a test can stop at any stage, tamper with a
message, or deliver it twice. Every party draws from its own `DeterministicRandom`, so two
`HandRound`s built with the same arguments exchange identical messages.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import numpy.typing as npt

from protocols import (
    AggregateResult,
    DeterministicRandom,
    FixedPointEncoding,
    SecAggClient,
    SecAggParams,
    SecAggServer,
)
from protocols.driver import DropAt, goes_silent
from protocols.primitives import ed25519_public, ring_dtype
from protocols.secagg import (
    AdvertiseKeys,
    Complaint,
    EncryptedShares,
    Envelope,
    KeyRoster,
    MaskedInput,
    Message,
    NeighbourGraph,
    SecAggFamily,
    ShareBundle,
    SurvivorSet,
    SurvivorSignature,
    UnmaskRequest,
    UnmaskResponse,
)
from protocols.session import RoundStep, as_round_step

SESSION = bytes(range(16))
OTHER_SESSION = bytes(range(1, 17))


def identity_private_keys(n: int, seed: int = 0) -> list[bytes]:
    """Deterministic Ed25519 private keys (tests only)."""
    source = DeterministicRandom(b"identity/%d" % seed)
    return [source.token_bytes(32) for _ in range(n)]


def public_keys(private: Sequence[bytes]) -> tuple[bytes, ...]:
    return tuple(ed25519_public(k) for k in private)


def party_rng(seed: int, party: int) -> DeterministicRandom:
    """The SecretSource of `party` in a round seeded with `seed` (run_round's rng_for)."""
    return DeterministicRandom(b"party/%d/%d" % (seed, party))


def rounding_seed(seed: int, party: int) -> bytes:
    """The rounding seed `party` draws: set_input is the first draw from its SecretSource."""
    return party_rng(seed, party).token_bytes(32)


def semi_honest_params(n: int = 6, *, dimension: int = 8, ring_bits: int = 32, **kw: object) -> SecAggParams:
    encoding = FixedPointEncoding(clip_range=1.0, max_parties=n, ring_bits=ring_bits)
    return SecAggParams.secagg(n, dimension=dimension, clip_range=1.0, encoding=encoding, **kw)


def malicious_params(
    n: int = 8, *, dimension: int = 8, threshold: int = 5, dropout_rate: float = 0.25, seed: int = 0
) -> tuple[SecAggParams, list[bytes]]:
    """SecAgg with identity keys: n=8, n_C=1, d_max=2, t=5, quorum=max(9 // 2 + 1, 5)=5 by default."""
    private = identity_private_keys(n, seed)
    params = SecAggParams.secagg(
        n,
        dimension=dimension,
        clip_range=1.0,
        threshold=threshold,
        dropout_rate=dropout_rate,
        identity_keys=public_keys(private),
    )
    return params, private


def malicious_plus_params(n: int = 10, *, dimension: int = 8, seed: int = 0) -> tuple[SecAggParams, list[bytes]]:
    """SecAgg+ with identity keys (a graph toss): n=10, k=4, t=4, d_max=1 by default."""
    private = identity_private_keys(n, seed)
    params = SecAggParams.secagg_plus(
        n, dimension=dimension, clip_range=1.0, dropout_rate=0.1, identity_keys=public_keys(private)
    )
    assert not params.complete and params.malicious
    return params, private


def bundle_close(params: SecAggParams) -> int:
    """How many stage closes until the share bundles go out (one more after a graph toss)."""
    return 3 if params.malicious and not params.complete else 2


def random_inputs(n: int, d: int, clip: float, seed: int) -> list[npt.NDArray[np.float64]]:
    gen = np.random.default_rng(seed)
    return [gen.uniform(-clip, clip, d) for _ in range(n)]


def expected_ring_sum(
    params: SecAggParams,
    inputs: Sequence[npt.NDArray[np.float64]],
    included: tuple[int, ...],
    seed: int,
    weights: Sequence[float] | None = None,
) -> npt.NDArray[np.unsignedinteger]:
    """Sum of the encodings with the rounding seeds the clients draw (the first 32 bytes of their rng)."""
    acc = np.zeros(params.dimension + 1, dtype=ring_dtype(params.encoding.ring_bits))
    for p in included:
        w = 1.0 if weights is None else weights[p]
        np.add(acc, params.encoding.encode(inputs[p], weight=w, rounding_seed=rounding_seed(seed, p)), out=acc)
    return acc


class HandRound:
    """n clients and a server of one round, driven message by message."""

    def __init__(
        self,
        params: SecAggParams,
        *,
        seed: int = 0,
        identity_keys: Sequence[bytes] | None = None,
        contexts: Mapping[int, bytes] | None = None,
        server_context: bytes = b"",
        session: bytes = SESSION,
        round_number: int = 0,
        inputs: Sequence[npt.NDArray[np.float64]] | None = None,
        beacon: bytes | None = None,
        beacons: Mapping[int, bytes | None] | None = None,
    ) -> None:
        n = params.num_parties
        beacons = dict(beacons or {})
        self.params = params
        self.seed = seed
        self.session = session
        self.round_number = round_number
        clip = params.encoding.clip_range
        self.inputs = list(inputs) if inputs is not None else random_inputs(n, params.dimension, clip, seed)
        contexts = dict(contexts or {})
        self.clients = [
            SecAggClient(
                params,
                party_id=p,
                session=session,
                round_number=round_number,
                context=contexts.get(p, server_context),
                identity_key=None if identity_keys is None else identity_keys[p],
                rng=party_rng(seed, p),
                beacon=beacons.get(p, beacon),
            )
            for p in range(n)
        ]
        self.server = SecAggServer(
            params, session=session, round_number=round_number, context=server_context, beacon=beacon
        )
        self.pending: dict[int, Message] = {}
        self.closes = 0

    # -- single steps ----------------------------------------------------------------------------

    def advertise(self, parties: Iterable[int] | None = None) -> dict[int, Message]:
        """set_input + advertise_keys for `parties` (all by default)."""
        out: dict[int, Message] = {}
        for p in parties if parties is not None else range(self.params.num_parties):
            self.clients[p].set_input(self.inputs[p])
            out[p] = self.clients[p].advertise_keys()
        return out

    def submit(self, messages: Mapping[int, Message], drop: Iterable[int] = ()) -> None:
        skip = set(drop)
        for p in sorted(messages):
            if p not in skip:
                self.server.receive(messages[p])

    def close(self) -> dict[int, Message]:
        self.pending = dict(self.server.close_stage())
        self.closes += 1
        return self.pending

    def respond(self, drop: Iterable[int] = ()) -> dict[int, Message]:
        skip = set(drop)
        return {p: self.clients[p].handle(m) for p, m in sorted(self.pending.items()) if p not in skip}

    # -- whole stretches -------------------------------------------------------------------------

    def advance(self, closes: int) -> dict[int, Message]:
        """Everybody honest and alive until the server has closed `closes` stages; returns its output."""
        if self.closes == 0:
            self.submit(self.advertise())
            self.close()
        while self.closes < closes:
            self.submit(self.respond())
            self.close()
        return self.pending

    def run(self, drop_at: DropAt | None = None) -> AggregateResult:
        """The rest of the round, parties going silent as `run_round`'s drop_at says (`RoundStep` members)."""
        drop_at = dict(drop_at or {})
        gone = {p for p, s in drop_at.items() if as_round_step(s) is RoundStep.ADVERTISE}
        if self.closes == 0:
            self.submit(self.advertise(), drop=gone)
            self.close()
        while self.pending:
            replies: dict[int, Message] = {}
            for p, m in sorted(self.pending.items()):
                if p in gone:
                    continue
                reply = self.clients[p].handle(m)
                if goes_silent(drop_at.get(p), SecAggFamily(self.params).step_of(type(reply))):
                    gone.add(p)
                    continue
                replies[p] = reply
            self.submit(replies)
            self.close()
        return self.server.result()

    def state_blob(self, party: int) -> bytes:
        """Everything the client holds (its exported state), to check that a rejection changed nothing."""
        return self.clients[party].export_state()


def round_graph(
    params: SecAggParams,
    *,
    session: bytes,
    seed: int,
    inputs: Sequence[npt.NDArray[np.float64]],
    identity_keys: Sequence[bytes] | None = None,
    drop_at: DropAt | None = None,
) -> NeighbourGraph:
    """The graph a `run_round(..., rng_for=party_rng(seed, .))` round with these dropouts will use.

    Without a graph toss it is the transcript's; with one (malicious SecAgg+) it depends on the
    nonces of U1 (the parties that advertise), so the toss is replayed with the same sources.
    """
    hand = HandRound(params, seed=seed, identity_keys=identity_keys, session=session, inputs=inputs)
    if params.identity_keys is None or params.complete:
        return hand.server.graph
    gone = {p for p, s in (drop_at or {}).items() if as_round_step(s) is RoundStep.ADVERTISE}
    hand.submit(hand.advertise(), drop=gone)
    hand.close()
    hand.submit(hand.respond())
    hand.close()
    return hand.server.graph


@contextmanager
def unchanged(session: Any) -> Iterator[None]:
    """The session's state and everything it holds are the same after the block."""
    before = (session.state, session.export_state())
    yield
    assert (session.state, session.export_state()) == before


MESSAGE_TYPES = (  # every message class, in protocol order
    AdvertiseKeys,
    KeyRoster,
    EncryptedShares,
    ShareBundle,
    MaskedInput,
    Complaint,
    SurvivorSet,
    SurvivorSignature,
    UnmaskRequest,
    UnmaskResponse,
)


def flip(data: bytes, bit: int) -> bytes:
    out = bytearray(data)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


def with_box(bundle: ShareBundle, index: int, data: bytes) -> ShareBundle:
    boxes = list(bundle.boxes)
    boxes[index] = Envelope(peer=boxes[index].peer, data=data)
    return bundle.model_copy(update={"boxes": tuple(boxes)})


def with_entry(roster: KeyRoster, index: int, **changes: Any) -> KeyRoster:
    entries = list(roster.entries)
    entries[index] = entries[index].model_copy(update=changes)
    return roster.model_copy(update={"entries": tuple(entries)})
