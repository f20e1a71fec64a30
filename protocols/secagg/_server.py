"""The server side of SecAgg / SecAgg+ as a sans-IO state machine.

The host delivers client messages with `receive()` and decides, from its own clock, when a stage is
over; `close_stage()` then returns the messages to send, addressed by party id. The masked inputs of
one stage are held until it closes (a `Complaint` arriving late may still exclude a party whose
input came first, and the sum must not depend on arrival order); they are then added into one ring
accumulator and dropped, so from the unmask stage on the server's memory is O(d); the unmask step
rebuilds the masks with the same streaming PRG.

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
from ..primitives.kdf import LABEL_PAIRWISE_MASK, derive_key
from ..primitives.keys import ed25519_verify, x25519_agree_all, x25519_check_public, x25519_public
from ..primitives.prg import MaskAccumulator, ring_dtype
from ..primitives.shamir import reconstruct
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

__all__ = ["AggregateResult", "SecAggServer", "ServerState"]

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
    """The aggregator's session for one round (see module docstring; a `protocols.ServerSession`)."""

    TRANSITIONS: ClassVar[Mapping[tuple[Any, type[Any]], Any]]

    def __init__(
        self,
        params: SecAggParams,
        *,
        session: bytes,
        round_number: int,
        context: bytes = b"",
        beacon: bytes | None = None,
    ) -> None:
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
        self._inputs: dict[int, MaskedInput] = {}
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
        cls, data: bytes, params: SecAggParams, *, context: bytes = b"", beacon: bytes | None = None
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
        server = cls(params, session=session, round_number=round_number, context=context, beacon=beacon)
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
        self._masked.add(m.sender)
        if m.sender not in self._excluded():  # an accused party's input is never summed
            self._inputs[m.sender] = m

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
        self._complaints[m.sender] = m
        for accused in m.accused:
            self._inputs.pop(accused, None)

    def _close_masked(self) -> Outgoing:
        excluded = self._excluded()
        survivors = sorted(p for p in self._inputs if p not in excluded)
        self._require(len(survivors), self.params.threshold, "masked input collection")
        params = self.params
        if not params.complete and len(survivors) < params.num_parties - params.max_dropped:
            # The clients refuse such a survivor set (SecAgg+ graph connectivity); complaints count.
            raise self._abort(
                f"{len(survivors)} survivors (after {len(self._complaints)} complaints) imply more than "
                f"d_max={params.max_dropped} dropouts; round aborted"
            )
        acc = np.zeros(params.dimension + 1, dtype=ring_dtype(params.encoding.ring_bits))
        for p in survivors:
            np.add(acc, self._inputs[p].vector(), out=acc)
        self._inputs.clear()
        self._acc = acc
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

    def _collect(self, owner: int, kind: str) -> bytes:
        code = SHARE_KIND_SELF_MASK if kind == "self_mask_shares" else SHARE_KIND_MASK_KEY
        shares: dict[int, bytes] = {}
        for holder, resp in self._responses.items():
            for signed in getattr(resp, kind):
                if signed.peer != owner:
                    continue
                if self._share_is_valid(code, holder, signed):
                    shares[holder] = signed.share
                else:
                    self._misbehaving.add(holder)  # a forgery: discarded, never reconstructed from
        t = self.params.threshold
        if len(shares) < t:
            raise self._abort(
                f"unmasking party {owner}: {len(shares)} valid shares, {t} needed "
                f"(forged shares from {sorted(self._misbehaving) or 'nobody'} were discarded); round aborted"
            )
        try:
            secret = reconstruct(shares, t)
            if len(shares) > t:
                # Every share here is one the dealer signed, so a second t-subset disagreeing means
                # the dealer itself dealt shares of different polynomials (a malicious client).
                top = sorted(shares)[-t:]
                if reconstruct({h: shares[h] for h in top}, t) != secret:
                    raise ValueError("inconsistent")
        except ValueError:
            raise self._abort(f"party {owner} dealt inconsistent shares (all signed by it)") from None
        return secret

    def _close_unmask(self) -> Outgoing:
        assert self._acc is not None
        alive = set(self._u3)
        dropped = sorted(self._u2 - alive)
        plus: list[bytes] = []
        minus = [self._collect(u, "self_mask_shares") for u in self._u3]
        for v in dropped:
            mask_sk = self._collect(v, "mask_key_shares")
            if x25519_public(mask_sk) != self._keys[v].mask_public_key:
                raise self._abort(f"rebuilt mask key of party {v} does not match its public key")
            neighbours = sorted(self.graph.neighbours_of(v) & alive)
            try:
                secrets = x25519_agree_all(mask_sk, {u: self._keys[u].mask_public_key for u in neighbours})
            except IntegrityError as exc:
                raise self._abort(f"party {exc.peer_id} advertised a low-order key") from None
            for u, secret in secrets.items():
                seed = derive_key(
                    secret, label=LABEL_PAIRWISE_MASK, transcript=self.transcript, a=min(u, v), b=max(u, v)
                )
                # u added +mask when u < v and -mask when u > v; undo it.
                (minus if u < v else plus).append(seed)
        MaskAccumulator(self.params.encoding.ring_bits).apply(self._acc, plus=plus, minus=minus)
        decoded = self.params.encoding.decode(self._acc, num_inputs=len(self._u3))
        self._result = AggregateResult(
            decoded=decoded,
            ring_sum=self._acc,
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
