"""The server side of SecAgg / SecAgg+ as a sans-IO state machine.

The host delivers client messages with `receive()` and decides, from its own clock, when a stage is
over; `close_stage()` then returns the messages to send, addressed by party id.

Streaming: a masked input is accepted only after every check passed; it is then held, and once the
held inputs exceed `hold_bytes` (64 MiB by default, 16 inputs at d = 1e6) the oldest are added into
one ring accumulator and dropped, so the server's memory is one vector of d + 1 words plus that
budget however many clients there are; only the set of summed senders is kept. The hold exists for
`Complaint`s: a complaint arriving after its accused's input still excludes it while that input is
held (the sum then does not depend on arrival order). The summed set never shrinks: a complaint
accusing a party whose input is already in the sum is refused (the server could not take the input
out again without holding it), so the accuser counts as a plain dropout and the accused stays in the
sum. A malicious server may drop any complaint anyway, so the rule gives it nothing; the accuser
never sent its input, so rebuilding its mask key reveals nothing of it. `hold_bytes=0` sums every
input on arrival.

Unmasking is split into independent jobs (`_unmask`): per-owner share checks and reconstructions,
and per-coordinate-range mask regeneration. They run under the `map_jobs` callable the host passes
(the builtin `map` by default): a host with several cores passes a pool's `map` and this module
stays free of threads and processes.

Safety rules enforced here: a message from the wrong session, round or stage, a duplicate, or a
masked input from a party already declared dropped is rejected with the state unchanged; every
stage needs at least t parties (and the consistency check its quorum) or the round aborts with
nothing revealed; a rebuilt mask key must match the public key it claims to be.

Malicious clients: every returned Shamir share must carry its dealer's signature (`SignedShare`);
a share that does not verify is discarded and its holder listed in `AggregateResult.misbehaving`,
and each secret is rebuilt from any t valid shares, or the round aborts: never a silently wrong
sum. A client whose share box from dealer j would not open sends a signed `Complaint` instead of
its masked input; the server drops the accuser and the accused (both count against d_max) and
goes on if at least t parties remain. The accused is then a dropped party: its mask key may be
rebuilt, its self-mask never, and its masked input (if it came) is not in the sum.

Graph toss (malicious SecAgg+): after the roster, every party of U1 reveals the nonce it committed
to in its signed keys. The server waits for all of them: a party that does not reveal by the close
of the stage, or reveals a nonce that does not open its commitment, aborts the round (a server that
could drop a party after seeing the other nonces could choose among graphs). The toss result goes
to every party, which checks it and derives the graph itself.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field

from ..encoding import DecodedSum
from ..errors import (
    AbortError,
    DecodeError,
    IntegrityError,
    InvalidTransitionError,
    LocalProtocolError,
    RemoteProtocolError,
)
from ..primitives.keys import ed25519_verify, x25519_check_public
from ..primitives.prg import ring_dtype
from ._graph import GraphMode, NeighbourGraph, graph_mode
from ._messages import (
    AdvertiseKeys,
    Complaint,
    EncryptedShares,
    Envelope,
    GraphReveal,
    GraphSeed,
    KeyRoster,
    MaskedInput,
    Message,
    ShareBundle,
    SignedShare,
    SurvivorSet,
    SurvivorSignature,
    UnmaskRequest,
    UnmaskResponse,
)
from ._params import SecAggParams
from ._roster import check_advertisement, signer_key
from ._server_state import dump_server_state, load_server_state
from ._transcript import (
    MIN_BEACON_BYTES,
    SHARE_KIND_MASK_KEY,
    SHARE_KIND_SELF_MASK,
    beacon_binding,
    beacon_graph_seed,
    check_round_identity,
    complaint_statement,
    graph_commitment,
    share_statement,
    survivors_statement,
    toss_graph_seed,
    transcript_hash,
)
from ._unmask import (
    JobMap,
    MaskRange,
    SecretBatch,
    SecretJob,
    SecretOutcome,
    mask_ranges,
    masks_over_range,
    rebuild_secrets,
)

__all__ = ["HOLD_BYTES", "AggregateResult", "SecAggServer", "ServerState"]

HOLD_BYTES = 1 << 26
"""Default bound on the masked inputs held unsummed (a late complaint can still exclude them)."""

Outgoing = list[tuple[int, Message]]


class ServerState(enum.Enum):
    """The stage whose messages the server is collecting."""

    COLLECT_KEYS = 0
    COLLECT_SHARES = 1
    COLLECT_MASKED = 2
    COLLECT_SIGNATURES = 3
    COLLECT_UNMASK = 4
    DONE = 5
    ABORTED = 6
    COLLECT_REVEALS = 7
    """Malicious SecAgg+ only, between COLLECT_KEYS and COLLECT_SHARES: the graph toss."""


class AggregateResult(BaseModel):
    """What the server learns: the sum over `included`, and who dropped. Nothing per client."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    decoded: DecodedSum
    ring_sum: Any = Field(description="the exact sum in Z_(2^b), weight in the last word")
    included: tuple[int, ...] = Field(description="parties whose inputs are in the sum (U3)")
    dropped: tuple[int, ...] = Field(description="parties that advertised keys but are not in the sum")
    insecure: bool = Field(description="True when the parameters missed the security bound")
    complaints: tuple[tuple[int, int], ...] = Field(
        default=(), description="(accuser, accused) pairs of verified complaints; both parties are in `dropped`"
    )
    misbehaving: tuple[int, ...] = Field(
        default=(), description="holders that returned a share its dealer had not signed (discarded, never used)"
    )


class SecAggServer:
    """The aggregator's session for one round (see module docstring; a `protocols.ServerSession`).

    `map_jobs` is a `map`-like callable the unmask step runs its independent jobs under (default: the
    builtin `map`; a thread or process pool's `map` uses several cores), and `jobs` how many jobs
    each kind of unmask work is split into (about the pool's size). `hold_bytes` bounds the masked
    inputs held unsummed (module docstring).
    """

    TRANSITIONS: ClassVar[Mapping[tuple[Any, type[Any]], Any]]

    def __init__(
        self,
        params: SecAggParams,
        *,
        session: bytes,
        round_number: int,
        context: bytes = b"",
        beacon: bytes | None = None,
        map_jobs: JobMap | None = None,
        jobs: int = 1,
        hold_bytes: int = HOLD_BYTES,
    ) -> None:
        if jobs < 1:
            raise LocalProtocolError(f"jobs={jobs} must be at least 1")
        if hold_bytes < 0:
            raise LocalProtocolError(f"hold_bytes={hold_bytes} must be >= 0")
        self._hold_bytes = hold_bytes
        self._map: JobMap = map_jobs if map_jobs is not None else map
        self._jobs = jobs
        check_round_identity(session, round_number)
        if beacon is not None and (not isinstance(beacon, bytes) or len(beacon) < MIN_BEACON_BYTES):
            raise LocalProtocolError(f"beacon must be at least {MIN_BEACON_BYTES} bytes of public randomness")
        self.params = params
        self.session = session
        self.round_number = round_number
        self.transcript = transcript_hash(
            session=session, round_number=round_number, params_digest=params.digest(), context=context
        )
        self.graph_mode = graph_mode(malicious=params.malicious, complete=params.complete, beacon=beacon)
        self._beacon_binding = b"" if beacon is None else beacon_binding(self.transcript, beacon)
        self._graph: NeighbourGraph | None = None
        self._graph_seed = b""  # set by a toss only: signed in the consistency check
        if self.graph_mode is GraphMode.TRANSCRIPT:
            self._graph = NeighbourGraph(params.num_parties, params.neighbours, self.transcript)
        elif self.graph_mode is GraphMode.BEACON:
            assert beacon is not None
            seed = beacon_graph_seed(self.transcript, beacon)
            self._graph = NeighbourGraph(params.num_parties, params.neighbours, seed)
        self._reveals: dict[int, bytes] = {}
        self.state = ServerState.COLLECT_KEYS
        self._keys: dict[int, AdvertiseKeys] = {}
        self._boxes: dict[int, tuple[Envelope, ...]] = {}
        self._masked: set[int] = set()
        self._inputs: dict[int, MaskedInput] = {}  # held, not yet summed, in arrival order
        self._held = 0  # bytes of self._inputs
        self._summed: set[int] = set()  # senders whose masked input is in self._acc
        self._complaints: dict[int, Complaint] = {}
        self._misbehaving: set[int] = set()
        self._signatures: dict[int, bytes] = {}
        self._responses: dict[int, UnmaskResponse] = {}
        self._acc: npt.NDArray[np.unsignedinteger] | None = None
        self._result: AggregateResult | None = None
        self._u2: set[int] = set()
        self._u3: tuple[int, ...] = ()

    # -- host-facing API -------------------------------------------------------------------------

    @property
    def graph(self) -> NeighbourGraph:
        """The round's neighbour graph; after a graph toss, only once every party of U1 revealed.

        Raises:
            InvalidTransitionError: the toss has not completed.
        """
        if self._graph is None:
            raise InvalidTransitionError(f"the SecAgg+ graph is not known before the graph toss ({self.state.name})")
        return self._graph

    def receive(self, message: Message) -> None:
        """Accept one client message for the current stage.

        Raises:
            RemoteProtocolError: wrong session, round or stage, unknown or dropped sender, duplicate,
                or malformed content; nothing changed.
            IntegrityError: a signature failed to verify; nothing changed.
            InvalidTransitionError: the round is over.
        """
        if self.state in (ServerState.DONE, ServerState.ABORTED):
            raise InvalidTransitionError(f"the round is over ({self.state.name})")
        if message.session != self.session or message.round != self.round_number:
            raise RemoteProtocolError(
                "message from another session or round",
                field="round" if message.session == self.session else "session",
            )
        handler = _RECEIVERS.get((self.state, type(message)))
        if handler is None:
            raise RemoteProtocolError(
                f"{type(message).__name__} is not expected in state {self.state.name}", field="stage"
            )
        handler(self, message)

    def close_stage(self) -> Outgoing:
        """End the current stage (the host's deadline passed or everyone answered).

        Returns:
            (recipient, message) pairs to deliver.

        Raises:
            AbortError: fewer than t parties (or the quorum) answered; the round is over, nothing
                is revealed.
        """
        closer = _CLOSERS.get(self.state)
        if closer is None:
            raise InvalidTransitionError(f"no stage to close in state {self.state.name}")
        return closer(self)

    @property
    def stage(self) -> ServerState:
        """The round's stage (`ServerSession` interface; the same as `state`)."""
        return self.state

    @property
    def finished(self) -> bool:
        """True once the round is over (done or aborted)."""
        return self.state in (ServerState.DONE, ServerState.ABORTED)

    def export_state(self) -> bytes:
        """The session as bytes, for hosts that do not keep this object between stages.

        Holds the running sum and, during unmasking, Shamir shares: keep it confidential.
        """
        return dump_server_state(self)

    @classmethod
    def from_state(
        cls,
        data: bytes,
        params: SecAggParams,
        *,
        context: bytes = b"",
        beacon: bytes | None = None,
        map_jobs: JobMap | None = None,
        jobs: int = 1,
        hold_bytes: int = HOLD_BYTES,
    ) -> SecAggServer:
        """Rebuild a session from `export_state()`; params and context must be the original ones.

        Raises:
            DecodeError: malformed, truncated or tampered blob, or one inconsistent with its stage
                (see `_server_state.load_server_state` for the checks).
            LocalProtocolError: the blob belongs to another session, round, params or context.
        """
        if len(data) < 26:
            raise DecodeError("server state blob is truncated")
        session, round_number = struct.unpack_from("<16sQ", data, 2)
        server = cls(
            params,
            session=session,
            round_number=round_number,
            context=context,
            beacon=beacon,
            map_jobs=map_jobs,
            jobs=jobs,
            hold_bytes=hold_bytes,
        )
        load_server_state(server, data)
        return server

    def result(self) -> AggregateResult:
        """The aggregate, once the round is DONE."""
        if self._result is None:
            raise InvalidTransitionError(f"no result in state {self.state.name}")
        return self._result

    # -- helpers -----------------------------------------------------------------------------------

    def _abort(self, reason: str) -> AbortError:
        self.state = ServerState.ABORTED
        self._acc = None
        self._boxes.clear()
        self._inputs.clear()
        self._held = 0
        self._responses.clear()
        return AbortError(reason)

    def _require(self, count: int, needed: int, stage: str) -> None:
        if count < needed:
            raise self._abort(f"{stage}: {count} parties answered, {needed} needed; round aborted")

    def _new_sender(self, sender: int, allowed: set[int] | dict[int, Any], seen: Any) -> None:
        if sender not in allowed:
            raise RemoteProtocolError(f"party {sender} is not in this stage's set", peer_id=sender, field="sender")
        if sender in seen:
            raise RemoteProtocolError(f"duplicate message from party {sender}", peer_id=sender, field="sender")

    # -- stage 0: keys -----------------------------------------------------------------------------

    def _on_keys(self, m: AdvertiseKeys) -> None:
        self._new_sender(m.sender, set(range(self.params.num_parties)), self._keys)
        check_advertisement(
            m,
            params=self.params,
            transcript=self.transcript,
            session=self.session,
            round_number=self.round_number,
            taken={k for e in self._keys.values() for k in (e.share_public_key, e.mask_public_key)},
            graph=self.graph_mode,
            beacon_binding=self._beacon_binding,
        )
        x25519_check_public(m.share_public_key, peer_id=m.sender)
        x25519_check_public(m.mask_public_key, peer_id=m.sender)
        self._keys[m.sender] = m

    def _close_keys(self) -> Outgoing:
        self._require(len(self._keys), self.params.threshold, "key advertisement")
        roster = KeyRoster(
            session=self.session,
            round=self.round_number,
            entries=tuple(self._keys[p] for p in sorted(self._keys)),
        )
        toss = self.graph_mode is GraphMode.TOSS
        self.state = ServerState.COLLECT_REVEALS if toss else ServerState.COLLECT_SHARES
        return [(p, roster) for p in sorted(self._keys)]

    # -- stage 0b: graph toss (malicious SecAgg+) --------------------------------------------------

    def _on_reveal(self, m: GraphReveal) -> None:
        self._new_sender(m.sender, self._keys, self._reveals)
        if graph_commitment(self.transcript, m.sender, m.nonce) != self._keys[m.sender].graph_commitment:
            raise self._abort(
                f"graph toss aborted: party {m.sender} revealed a nonce that does not open its signed commitment"
            )
        self._reveals[m.sender] = m.nonce

    def _close_reveals(self) -> Outgoing:
        if missing := sorted(set(self._keys) - set(self._reveals)):
            raise self._abort(
                f"graph toss aborted: parties {missing} did not reveal their graph nonce; nobody is dropped "
                "after committing (the graph would then be the server's choice), so the round ends here"
            )
        self._set_toss_seed()
        reveals = tuple(Envelope(peer=p, data=self._reveals[p]) for p in sorted(self._reveals))
        message = GraphSeed(session=self.session, round=self.round_number, reveals=reveals)
        self.state = ServerState.COLLECT_SHARES
        return [(p, message) for p in sorted(self._keys)]

    def _set_toss_seed(self) -> None:
        self._graph_seed = toss_graph_seed(self.transcript, self._reveals)
        self._graph = NeighbourGraph(self.params.num_parties, self.params.neighbours, self._graph_seed)

    # -- stage 1: shares ---------------------------------------------------------------------------

    def _on_shares(self, m: EncryptedShares) -> None:
        self._new_sender(m.sender, self._keys, self._boxes)
        allowed = self.graph.neighbours_of(m.sender) & set(self._keys)
        if {env.peer for env in m.boxes} != allowed:
            # A box left out would let its sender drop later and have the server remove a mask
            # that the left-out neighbour never added: a silently wrong sum.
            raise RemoteProtocolError(
                "share boxes must go to exactly the sender's neighbours in the roster", peer_id=m.sender, field="boxes"
            )
        self._boxes[m.sender] = m.boxes

    def _close_shares(self) -> Outgoing:
        self._require(len(self._boxes), self.params.threshold, "share exchange")
        inbox: dict[int, list[Envelope]] = {p: [] for p in self._boxes}
        for sender in sorted(self._boxes):
            for env in self._boxes[sender]:
                if env.peer in inbox:
                    inbox[env.peer].append(Envelope(peer=sender, data=env.data))
        self._boxes.clear()
        self._u2 = set(inbox)
        self.state = ServerState.COLLECT_MASKED
        return [
            (p, ShareBundle(session=self.session, round=self.round_number, recipient=p, boxes=tuple(inbox[p])))
            for p in sorted(inbox)
        ]

    # -- stage 2: masked inputs --------------------------------------------------------------------

    def _excluded(self) -> set[int]:
        """Accusers and accused of the verified complaints so far."""
        return {p for c in self._complaints.values() for p in (c.sender, *c.accused)}

    def _on_masked(self, m: MaskedInput) -> None:
        self._new_sender(m.sender, self._u2, self._masked | set(self._complaints))
        if m.ring_bits != self.params.encoding.ring_bits:
            raise RemoteProtocolError(f"ring_bits={m.ring_bits}", peer_id=m.sender, field="ring_bits")
        words = len(m.data) // ring_dtype(m.ring_bits).itemsize
        if len(m.data) % ring_dtype(m.ring_bits).itemsize or words != self.params.dimension + 1:
            raise RemoteProtocolError(
                f"masked input has {words} words, expected {self.params.dimension + 1}",
                peer_id=m.sender,
                field="data",
            )
        # every check passed: a refused message never reaches the hold or the sum
        self._masked.add(m.sender)
        if m.sender in self._excluded():
            return  # an accused party's input is never summed
        self._inputs[m.sender] = m
        self._held += len(m.data)
        while self._held > self._hold_bytes:
            self._fold(next(iter(self._inputs)))

    def _fold(self, sender: int) -> None:
        """Add a held masked input into the running sum and drop it."""
        m = self._inputs.pop(sender)
        self._held -= len(m.data)
        if self._acc is None:
            self._acc = np.zeros(self.params.dimension + 1, dtype=ring_dtype(self.params.encoding.ring_bits))
        np.add(self._acc, m.vector(), out=self._acc)
        self._summed.add(sender)

    def _already_summed(self, accused: tuple[int, ...]) -> list[int]:
        """The accused whose masked inputs are already in the running sum (it cannot give them back)."""
        return sorted(set(accused) & self._summed)

    def _on_complaint(self, m: Complaint) -> None:
        self._new_sender(m.sender, self._u2, self._masked | set(self._complaints))
        dealers = self.graph.neighbours_of(m.sender) & self._u2
        if not set(m.accused) <= dealers:
            raise RemoteProtocolError(
                "a complaint may accuse only dealers whose boxes the accuser was sent",
                peer_id=m.sender,
                field="accused",
            )
        statement = complaint_statement(self.transcript, m.sender, m.accused)
        ed25519_verify(signer_key(self.params, self._keys[m.sender]), m.signature, statement, peer_id=m.sender)
        if summed := self._already_summed(m.accused):
            # The sum never shrinks (module docstring): the accuser stays out as a plain dropout.
            raise RemoteProtocolError(
                f"complaint accuses parties {summed} whose masked inputs are already in the sum; "
                "the accuser counts as dropped and the accused stay in",
                peer_id=m.sender,
                field="accused",
            )
        self._complaints[m.sender] = m
        for accused in m.accused:
            if (held := self._inputs.pop(accused, None)) is not None:
                self._held -= len(held.data)

    def _close_masked(self) -> Outgoing:
        for sender in list(self._inputs):
            self._fold(sender)
        survivors = sorted(self._summed - self._excluded())  # the refusal in _on_complaint keeps these equal
        self._require(len(survivors), self.params.threshold, "masked input collection")
        params = self.params
        if not params.complete and len(survivors) < params.num_parties - params.max_dropped:
            # The clients refuse such a survivor set (SecAgg+ graph connectivity); complaints count.
            raise self._abort(
                f"{len(survivors)} survivors (after {len(self._complaints)} complaints) imply more than "
                f"d_max={params.max_dropped} dropouts; round aborted"
            )
        self._u3 = tuple(survivors)
        if params.malicious:
            self.state = ServerState.COLLECT_SIGNATURES
            request: Message = SurvivorSet(session=self.session, round=self.round_number, survivors=self._u3)
        else:
            self.state = ServerState.COLLECT_UNMASK
            request = UnmaskRequest(session=self.session, round=self.round_number, survivors=self._u3)
        return [(p, request) for p in self._u3]

    # -- consistency check (malicious setting) -----------------------------------------------------

    def _on_signature(self, m: SurvivorSignature) -> None:
        self._new_sender(m.sender, set(self._u3), self._signatures)
        assert self.params.identity_keys is not None
        statement = survivors_statement(self.transcript, m.sender, self._u3, graph_seed=self._graph_seed)
        ed25519_verify(self.params.identity_keys[m.sender], m.signature, statement, peer_id=m.sender)
        self._signatures[m.sender] = m.signature

    def _close_signatures(self) -> Outgoing:
        self._require(len(self._signatures), self.params.consistency_quorum, "consistency check")
        signatures = tuple(Envelope(peer=p, data=s) for p, s in sorted(self._signatures.items()))
        request = UnmaskRequest(
            session=self.session, round=self.round_number, survivors=self._u3, signatures=signatures
        )
        self.state = ServerState.COLLECT_UNMASK
        return [(p, request) for p in sorted(self._signatures)]

    # -- stage 3: unmasking ------------------------------------------------------------------------

    def _on_unmask(self, m: UnmaskResponse) -> None:
        allowed = set(self._signatures) if self.params.malicious else set(self._u3)
        self._new_sender(m.sender, allowed, self._responses)
        alive = set(self._u3)
        holds = self.graph.neighbours_of(m.sender) | {m.sender}
        for env in m.self_mask_shares:
            if env.peer not in alive or env.peer not in holds:
                raise RemoteProtocolError("bad self-mask share", peer_id=m.sender, field="self_mask_shares")
        for env in m.mask_key_shares:
            if env.peer in alive or env.peer not in self._u2 or env.peer not in holds:
                raise RemoteProtocolError("bad mask-key share", peer_id=m.sender, field="mask_key_shares")
        self._responses[m.sender] = m

    def _share_is_valid(self, kind: int, holder: int, signed: SignedShare) -> bool:
        """Whether `signed` is the share its dealer dealt to `holder` (the dealer's signature verifies)."""
        statement = share_statement(self.transcript, kind, signed.peer, holder, signed.share)
        try:
            ed25519_verify(signer_key(self.params, self._keys[signed.peer]), signed.signature, statement)
        except IntegrityError:
            return False
        return True

    @property
    def _verify_in_jobs(self) -> bool:
        """Signatures are checked inside the jobs when the host gave a pool; serially here otherwise."""
        return self._map is not map

    def _secret_jobs(self) -> list[SecretJob]:
        """One job per secret to rebuild, in abort-message order: survivors' self masks, then dropped mask keys."""
        alive = set(self._u3)
        in_jobs = self._verify_in_jobs
        jobs = []
        for kind, owners in (("self_mask_shares", self._u3), ("mask_key_shares", sorted(self._u2 - alive))):
            code = SHARE_KIND_SELF_MASK if kind == "self_mask_shares" else SHARE_KIND_MASK_KEY
            returned: dict[int, list[tuple[int, bytes, bytes]]] = {owner: [] for owner in owners}
            forged: dict[int, list[int]] = {owner: [] for owner in owners}
            for holder in sorted(self._responses):
                for signed in getattr(self._responses[holder], kind):
                    if signed.peer not in returned:
                        continue
                    if in_jobs or self._share_is_valid(code, holder, signed):
                        returned[signed.peer].append((holder, signed.share, signed.signature))
                    else:
                        forged[signed.peer].append(holder)
            for owner in owners:
                neighbours: tuple[tuple[int, bytes], ...] = ()
                if code == SHARE_KIND_MASK_KEY:
                    live = sorted(self.graph.neighbours_of(owner) & alive)
                    neighbours = tuple((u, self._keys[u].mask_public_key) for u in live)
                jobs.append(
                    SecretJob(
                        kind=code,
                        owner=owner,
                        dealer_key=signer_key(self.params, self._keys[owner]),
                        shares=tuple(returned[owner]),
                        mask_public_key=self._keys[owner].mask_public_key,
                        neighbours=neighbours,
                        forged=tuple(forged[owner]),
                    )
                )
        return jobs

    def _rebuild(self) -> tuple[list[bytes], list[bytes]]:
        """Every secret, checked; the seeds to add and subtract, or an abort naming the first failing owner."""
        jobs = self._secret_jobs()
        per = -(-len(jobs) // (4 * self._jobs)) if self._jobs > 1 else max(1, len(jobs))
        batches = [
            SecretBatch(
                transcript=self.transcript,
                threshold=self.params.threshold,
                jobs=tuple(jobs[i : i + per]),
                verify=self._verify_in_jobs,
            )
            for i in range(0, len(jobs), per)
        ]
        outcomes: list[SecretOutcome] = [o for part in self._map(rebuild_secrets, batches) for o in part]
        plus: list[bytes] = []
        minus: list[bytes] = []
        t = self.params.threshold
        for outcome in outcomes:
            self._misbehaving.update(outcome.forged)  # forgeries: discarded, never reconstructed from
            owner = outcome.owner
            if outcome.error == "few":
                raise self._abort(
                    f"unmasking party {owner}: {outcome.valid} valid shares, {t} needed "
                    f"(forged shares from {sorted(self._misbehaving) or 'nobody'} were discarded); round aborted"
                )
            if outcome.error == "inconsistent":
                raise self._abort(f"party {owner} dealt inconsistent shares (all signed by it)")
            if outcome.error == "mismatch":
                raise self._abort(f"rebuilt mask key of party {owner} does not match its public key")
            if outcome.error.startswith("low-order:"):
                raise self._abort(f"party {outcome.error.split(':', 1)[1]} advertised a low-order key")
            plus.extend(outcome.plus)
            minus.extend(outcome.minus)
        return plus, minus

    def _close_unmask(self) -> Outgoing:
        assert self._acc is not None
        plus, minus = self._rebuild()
        acc = self._acc
        bits = self.params.encoding.ring_bits
        ranges = mask_ranges(acc.shape[0], self._jobs, bits)
        work = [MaskRange(start=a, stop=b, ring_bits=bits, plus=tuple(plus), minus=tuple(minus)) for a, b in ranges]
        for (a, b), delta in zip(ranges, self._map(masks_over_range, work), strict=True):
            np.add(acc[a:b], delta, out=acc[a:b])
        alive = set(self._u3)
        decoded = self.params.encoding.decode(acc, num_inputs=len(self._u3))
        self._result = AggregateResult(
            decoded=decoded,
            ring_sum=acc,
            included=self._u3,
            dropped=tuple(sorted(set(self._keys) - alive)),
            insecure=self.params.insecure,
            complaints=tuple(sorted((a, d) for a, c in self._complaints.items() for d in c.accused)),
            misbehaving=tuple(sorted(self._misbehaving)),
        )
        self._responses.clear()
        self.state = ServerState.DONE
        return []


_RECEIVERS: dict[tuple[ServerState, type[Any]], Callable[[SecAggServer, Any], None]] = {
    (ServerState.COLLECT_KEYS, AdvertiseKeys): SecAggServer._on_keys,
    (ServerState.COLLECT_REVEALS, GraphReveal): SecAggServer._on_reveal,
    (ServerState.COLLECT_SHARES, EncryptedShares): SecAggServer._on_shares,
    (ServerState.COLLECT_MASKED, MaskedInput): SecAggServer._on_masked,
    (ServerState.COLLECT_MASKED, Complaint): SecAggServer._on_complaint,
    (ServerState.COLLECT_SIGNATURES, SurvivorSignature): SecAggServer._on_signature,
    (ServerState.COLLECT_UNMASK, UnmaskResponse): SecAggServer._on_unmask,
}
_CLOSERS: dict[ServerState, Callable[[SecAggServer], Outgoing]] = {
    ServerState.COLLECT_KEYS: SecAggServer._close_keys,
    ServerState.COLLECT_REVEALS: SecAggServer._close_reveals,
    ServerState.COLLECT_SHARES: SecAggServer._close_shares,
    ServerState.COLLECT_MASKED: SecAggServer._close_masked,
    ServerState.COLLECT_SIGNATURES: SecAggServer._close_signatures,
    ServerState.COLLECT_UNMASK: SecAggServer._close_unmask,
}
"""The server's transition tables: what each stage accepts, and how it ends."""

SERVER_TRANSITIONS: dict[tuple[ServerState, type[Any]], ServerState] = {key: key[0] for key in _RECEIVERS}
"""(stage, accepted message type) -> the stage the server stays in (`ServerSession.TRANSITIONS`)."""
SecAggServer.TRANSITIONS = SERVER_TRANSITIONS
