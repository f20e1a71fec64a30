"""The client side of SecAgg / SecAgg+ as a sans-IO state machine.

A `SecAggClient` never touches a socket or a clock: the host feeds it the server's messages with
`handle()` and sends whatever it returns. Every check is made by the client itself, because a
malicious server will not abort on its behalf (Bonawitz et al. 2017, section 4, Figure 4):

* it accepts only rosters that contain its own keys unchanged, no repeated key, and (malicious
  setting) a valid identity signature on every entry;
* it signs every Shamir share it deals, and checks the dealer's signature on every share it holds;
* a share box that does not open (or holds a badly signed share) makes it answer with a signed
  `Complaint` naming the dealer *instead of* its masked input: it never sends that input in this
  session, and the server drops both parties rather than the whole round;
* it masks against exactly the neighbours whose share boxes it received and opened;
* it unmasks only for a survivor set that (malicious setting) it signed itself and that carries a
  quorum of valid signatures, and it never reveals, for one peer, both the self-mask share and the
  mask-key share: the ledger of what it revealed is written before the reply is built.

A message it cannot accept raises and leaves the state as it was; a server caught misbehaving
moves it to ABORTED for good.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from ..encoding import ChunkEncoder, PendingInput
from ..errors import (
    AbortError,
    DecodeError,
    IntegrityError,
    InvalidTransitionError,
    LocalProtocolError,
    RemoteProtocolError,
)
from ..primitives.aead import open_sealed, seal
from ..primitives.kdf import LABEL_PAIRWISE_MASK, LABEL_SHARE_ENCRYPTION, derive_key
from ..primitives.keys import (
    ed25519_public,
    ed25519_sign,
    ed25519_sign_many,
    ed25519_verify,
    ed25519_verify_many,
    x25519_agree_all,
    x25519_generate,
)
from ..primitives.prg import CHUNK_WORDS, MaskAccumulator, ring_dtype
from ..primitives.shamir import PRIME, SHARE_BYTES, split
from ..randomness import OsRandom, SecretSource
from ._client_state import dump_client_state, load_client_state, peek_identity
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
from ._transcript import (
    MIN_BEACON_BYTES,
    SHARE_KIND_MASK_KEY,
    SHARE_KIND_SELF_MASK,
    advertise_statement,
    beacon_binding,
    beacon_graph_seed,
    box_aad,
    check_round_identity,
    complaint_statement,
    graph_commitment,
    share_statement,
    survivors_statement,
    toss_graph_seed,
    transcript_hash,
)

__all__ = ["BOX_PLAINTEXT", "ClientState", "SecAggClient"]

BOX_PLAINTEXT = struct.Struct(f"<II{SHARE_BYTES}s{SHARE_BYTES}s64s64s")
"""A share box opened: dealer, holder, b-share, s_sk-share, the dealer's signature on each share."""

Held = dict[int, tuple[bytes, bytes, bytes, bytes]]
"""dealer -> (b-share, s_sk-share, signature of the b-share, signature of the s_sk-share)."""


class ClientState(enum.Enum):
    """Where a client is in the round; the value is the stage counter carried by exported state."""

    IDLE = 0
    ADVERTISED = 1
    SHARED = 2
    MASKED = 3
    CONFIRMED = 4
    DONE = 5
    ABORTED = 6
    CLOSED = 7
    COMPLAINED = 8
    """Terminal: it answered a share bundle with a Complaint and will never send its masked input."""
    REVEALED = 9
    """Malicious SecAgg+ only: it revealed its graph nonce and waits for the toss result (GraphSeed).

    Between ADVERTISED and SHARED in protocol order (the value is only a label; `_client_state`
    orders stages by protocol order when it refuses a rollback)."""


class SecAggClient:
    """One party's session for one round (a `protocols.ClientSession`).

    `TRANSITIONS` is the public transition table: (stage, message type) -> the stages it can lead to.

    Args:
        params: the round's public parameters.
        party_id: this party's id in 0..n-1.
        session: 16-byte session id (chosen by the host; unique per session).
        round_number: the round; keys are fresh per round and never reused.
        context: the caller's round context, bound into every key and signature.
        identity_key: this party's raw Ed25519 private key (required iff params has identity keys).
        rng: the CSPRNG for keys, seeds and Shamir coefficients; `os.urandom` by default.
        beacon: a public randomness value (>= 32 bytes, e.g. a drand round's output) the host fetched
            and checked itself; the graph seed is then derived from it and no toss is run. Every
            party and the server must be given the same value (a mismatch is refused at the roster).
    """

    def __init__(
        self,
        params: SecAggParams,
        *,
        party_id: int,
        session: bytes,
        round_number: int,
        context: bytes = b"",
        identity_key: bytes | None = None,
        rng: SecretSource | None = None,
        beacon: bytes | None = None,
    ) -> None:
        if not 0 <= party_id < params.num_parties:
            raise LocalProtocolError(f"party_id={party_id} is outside 0..{params.num_parties - 1}")
        check_round_identity(session, round_number)
        if params.malicious:
            assert params.identity_keys is not None
            if identity_key is None or ed25519_public(identity_key) != params.identity_keys[party_id]:
                raise LocalProtocolError("identity_key must be the private key of params.identity_keys[party_id]")
        self.params = params
        self.party_id = party_id
        self.session = session
        self.round_number = round_number
        self.transcript = transcript_hash(
            session=session, round_number=round_number, params_digest=params.digest(), context=context
        )
        if beacon is not None and (not isinstance(beacon, bytes) or len(beacon) < MIN_BEACON_BYTES):
            raise LocalProtocolError(f"beacon must be at least {MIN_BEACON_BYTES} bytes of public randomness")
        self.graph_mode = graph_mode(malicious=params.malicious, complete=params.complete, beacon=beacon)
        self._beacon_binding = b"" if beacon is None else beacon_binding(self.transcript, beacon)
        self._graph: NeighbourGraph | None = None
        if self.graph_mode is GraphMode.TRANSCRIPT:
            self._graph = NeighbourGraph(params.num_parties, params.neighbours, self.transcript)
        elif self.graph_mode is GraphMode.BEACON:
            assert beacon is not None
            seed = beacon_graph_seed(self.transcript, beacon)
            self._graph = NeighbourGraph(params.num_parties, params.neighbours, seed)
        self._identity_key = identity_key
        self._rng = rng or OsRandom()
        self.state = ClientState.IDLE
        self._s: dict[str, Any] = {}  # round secrets and bookkeeping; see export_state()

    TRANSITIONS: ClassVar[Mapping[tuple[Any, type[Any]], Any]]

    # -- host-facing API -------------------------------------------------------------------------

    @property
    def stage(self) -> ClientState:
        """The session's stage (`ClientSession` interface; the same as `state`)."""
        return self.state

    @property
    def finished(self) -> bool:
        """True in a terminal stage: nothing more is accepted."""
        return self.state in (ClientState.DONE, ClientState.ABORTED, ClientState.CLOSED, ClientState.COMPLAINED)

    def start(self) -> AdvertiseKeys:
        """The first message (`ClientSession` interface): `advertise_keys()`."""
        return self.advertise_keys()

    @property
    def graph(self) -> NeighbourGraph:
        """The round's neighbour graph; after a graph toss, only once its result has arrived.

        Raises:
            InvalidTransitionError: the toss has not completed in this session.
        """
        if self._graph is None:
            raise InvalidTransitionError(f"the SecAgg+ graph is not known before the graph toss ({self.state.name})")
        return self._graph

    @property
    def revealed_graph_nonce(self) -> bool:
        """True once this session has revealed its graph nonce (the host counts reveals per release).

        A host enforcing `SecurityPolicy.max_graph_tosses` records the reveal durably before the
        GraphReveal leaves; this says whether the session is past that point.
        """
        return self.graph_mode is GraphMode.TOSS and self.state in _AFTER_REVEAL

    def set_input(
        self,
        x: npt.NDArray[np.floating] | npt.NDArray[np.integer],
        *,
        weight: float = 1.0,
        rounding_seed: bytes | None = None,
    ) -> None:
        """Take this party's update; allowed any time before the share bundle arrives.

        A float `x` is clipped, scaled and rounded (`FixedPointEncoding.encode`); an integer `x` is
        taken as ring elements, unclipped (`FixedPointEncoding.encode_ring`): a distributed-DP client
        that quantized its update and added its share of integer noise itself.

        `x` is checked now (shape, dtype, finite) and its weight and rounding seed are fixed now (the
        seed drawn from the session's source when not given), but it is neither encoded nor copied:
        the session keeps a reference and encodes it when the share bundle arrives, a cache-sized
        chunk at a time straight into the masked message, because a defensive copy of a
        multi-megabyte update costs about as much as masking it. **Do not modify `x` until `handle()`
        has returned the `MaskedInput`** (or the session has ended): the masked input encodes `x` as
        it is then. A session exported with `export_state(include_input=False)` does not hold `x`
        at all; pass the same array back to `from_state(..., input=x)`.

        Raises:
            LocalProtocolError: `x` is not a finite 1-D float vector or integer vector of shape
                (dimension,), or the weight or rounding seed is invalid.
            InvalidTransitionError: the share bundle was already handled.
        """
        if self.state not in (ClientState.IDLE, ClientState.ADVERTISED, ClientState.SHARED):
            raise InvalidTransitionError(f"set_input is not allowed in state {self.state.name}")
        if np.asarray(x).shape != (self.params.dimension,):
            raise LocalProtocolError(f"x must have shape ({self.params.dimension},), got {np.asarray(x).shape}")
        self._s["input"] = self.params.encoding.prepare(
            x, weight=weight, rounding_seed=rounding_seed, rng=self._rng, dimension=self.params.dimension
        )

    def advertise_keys(self) -> AdvertiseKeys:
        """Round 0: draw two fresh X25519 pairs and advertise their public halves."""
        if self.state is not ClientState.IDLE:
            raise InvalidTransitionError(f"advertise_keys is not allowed in state {self.state.name}")
        share_sk, share_pk = x25519_generate(self._rng)
        mask_sk, mask_pk = x25519_generate(self._rng)
        signature, signing_pk = b"", b""
        if not self.params.malicious:
            # Semi-honest setting: a fresh session key signs this party's shares and complaints.
            sign_sk = self._rng.token_bytes(32)
            signing_pk = ed25519_public(sign_sk)
        nonce = b""
        commitment = self._beacon_binding
        if self.graph_mode is GraphMode.TOSS:
            nonce = self._rng.token_bytes(32)
            commitment = graph_commitment(self.transcript, self.party_id, nonce)
        if self.params.malicious:
            assert self._identity_key is not None
            statement = advertise_statement(
                self.transcript, self.party_id, share_pk, mask_pk, graph_commitment=commitment
            )
            signature = ed25519_sign(self._identity_key, statement)
        message = AdvertiseKeys(
            session=self.session,
            round=self.round_number,
            sender=self.party_id,
            transcript=self.transcript,
            share_public_key=share_pk,
            mask_public_key=mask_pk,
            signature=signature,
            signing_public_key=signing_pk,
            graph_commitment=commitment,
        )
        self._s.update(share_sk=share_sk, mask_sk=mask_sk, own=message)
        if nonce:
            self._s["graph_nonce"] = nonce
        if not self.params.malicious:
            self._s["sign_sk"] = sign_sk
        self.state = ClientState.ADVERTISED
        return message

    def handle(self, message: Message) -> Message:
        """Consume one server message and return the reply to send.

        Raises:
            RemoteProtocolError: the message is invalid (wrong session, round, stage, or content);
                nothing changed.
            IntegrityError: a roster or survivor signature failed to verify; nothing changed. (A share
                box that fails is not an error: the reply is a `Complaint` and the session ends.)
            AbortError: the server misbehaved or too few parties remain; the session is over.
            InvalidTransitionError: the session is already over, or the input is missing.
            LocalProtocolError: the input was changed to hold NaN or infinity after `set_input`
                (see there); nothing changed.
        """
        if self.state in (ClientState.ABORTED, ClientState.CLOSED, ClientState.COMPLAINED):
            raise InvalidTransitionError(f"the session is over ({self.state.name})")
        if message.session != self.session or message.round != self.round_number:
            raise RemoteProtocolError(
                f"message for session {message.session.hex()} round {message.round} does not belong to "
                f"session {self.session.hex()} round {self.round_number}",
                field="round" if message.session == self.session else "session",
            )
        handler = _TRANSITIONS.get((self.state, type(message)))
        if handler is None:
            raise RemoteProtocolError(
                f"{type(message).__name__} is not expected in state {self.state.name}", field="stage"
            )
        return handler(self, message)

    def export_state(self, *, include_input: bool = True) -> bytes:
        """The session as bytes (SECRET), for hosts that persist it; see `from_state` and `_client_state`.

        Args:
            include_input: with False, an input set but not yet masked is left out of the blob (only its
                dtype, length, weight and rounding seed are kept), for a host that stores the update
                itself and hands it back to `from_state(..., input=x)`; with True (the default) the
                blob holds its raw bytes, so the restored session produces the identical masked input.
        """
        return dump_client_state(self, include_input=include_input)

    @classmethod
    def from_state(
        cls,
        data: bytes,
        params: SecAggParams,
        *,
        context: bytes = b"",
        identity_key: bytes | None = None,
        rng: SecretSource | None = None,
        min_stage: ClientState | None = None,
        beacon: bytes | None = None,
        input: npt.NDArray[np.floating] | npt.NDArray[np.integer] | None = None,
    ) -> SecAggClient:
        """Rebuild a session from `export_state()`; params and context must be the original ones.

        Persist the blob exported after `handle()` *before* sending its reply, and pass the stage
        last persisted as `min_stage`: a session rolled back to an earlier stage could sign a
        second survivor set or answer a second unmask request.

        `input` gives back the pending update of a blob exported with `include_input=False`: the same
        array, unmodified (its dtype and length are checked against the blob; its values cannot be).
        For a blob that holds its input it may be given only if identical; once the input is masked
        (MASKED and later stages) it is not needed and is ignored.

        Raises:
            DecodeError: malformed, truncated or tampered blob: a record its stage needs is missing,
                one it never holds is present, or one has the wrong type, size or a party id out of
                range (checked here, so nothing fails later with an untyped error).
            LocalProtocolError: the blob belongs to another party, session, round, params or context,
                or is older than `min_stage`; or `input` is missing where the blob left it out, of
                another dtype or length than the one exported, not finite, or given for a blob that
                has no pending input or holds a different one.
        """
        party, session, round_number = peek_identity(data)
        if party >= params.num_parties:
            raise DecodeError(f"state names party {party}, outside 0..{params.num_parties - 1}")
        client = cls(
            params,
            party_id=party,
            session=session,
            round_number=round_number,
            context=context,
            identity_key=identity_key,
            rng=rng,
            beacon=beacon,
        )
        load_client_state(client, data, min_stage=None if min_stage is None else min_stage.value, input=input)
        return client

    def erase(self) -> None:
        """End the session and drop every secret it holds (best effort: Python cannot zero bytes)."""
        self._s.clear()
        if self.state is not ClientState.ABORTED:
            self.state = ClientState.CLOSED

    # -- transitions -------------------------------------------------------------------------------

    def _abort(self, reason: str) -> AbortError:
        self.state = ClientState.ABORTED
        self.erase()
        return AbortError(reason)

    def _holders(self, alive: set[int]) -> list[int]:
        return sorted((self.graph.neighbours_of(self.party_id) & alive) | {self.party_id})

    def _signing_key(self) -> bytes:
        key = self._identity_key if self.params.malicious else self._s["sign_sk"]
        assert isinstance(key, bytes)
        return key

    def _on_roster(self, roster: KeyRoster) -> EncryptedShares | GraphReveal:
        me, params = self.party_id, self.params
        keys: dict[int, AdvertiseKeys] = {}
        seen: set[bytes] = set()
        for entry in roster.entries:
            check_advertisement(
                entry,
                params=params,
                transcript=self.transcript,
                session=self.session,
                round_number=self.round_number,
                taken=seen,
                graph=self.graph_mode,
                beacon_binding=self._beacon_binding,
            )
            seen.update((entry.share_public_key, entry.mask_public_key))
            keys[entry.sender] = entry
        if keys.get(me) != self._s["own"]:
            raise self._abort("the roster does not carry this party's own keys unchanged")
        table = {p: (k.share_public_key, k.mask_public_key, signer_key(params, k)) for p, k in keys.items()}
        if self.graph_mode is not GraphMode.TOSS:
            return self._share(table)
        if len(keys) < params.threshold:
            raise self._abort(f"only {len(keys)} parties in the roster for threshold {params.threshold}")
        # Every commitment of U1 is fixed now (this party checked each signature): reveal.
        self._s.update(roster=table, commitments={p: k.graph_commitment for p, k in keys.items()})
        self.state = ClientState.REVEALED
        return GraphReveal(session=self.session, round=self.round_number, sender=me, nonce=self._s["graph_nonce"])

    def _on_graph_seed(self, message: GraphSeed) -> EncryptedShares:
        """The toss result: one nonce per party of this party's roster, each matching its commitment."""
        commitments: dict[int, bytes] = self._s["commitments"]
        reveals = {env.peer: env.data for env in message.reveals}
        if set(reveals) != set(commitments):
            missing = sorted(set(commitments) - set(reveals))
            extra = sorted(set(reveals) - set(commitments))
            raise RemoteProtocolError(
                f"the graph toss result must hold one nonce for every party of U1: missing {missing}, "
                f"not in the roster {extra}",
                field="reveals",
            )
        if reveals[self.party_id] != self._s["graph_nonce"]:
            raise RemoteProtocolError("the graph toss result changes this party's own nonce", field="reveals")
        for party in sorted(reveals):
            if graph_commitment(self.transcript, party, reveals[party]) != commitments[party]:
                raise RemoteProtocolError(
                    f"party {party}'s nonce in the graph toss result does not match its signed commitment",
                    peer_id=party,
                    field="reveals",
                )
        seed = toss_graph_seed(self.transcript, reveals)
        self._graph = NeighbourGraph(self.params.num_parties, self.params.neighbours, seed)
        try:
            reply = self._share(self._s["roster"])
        except Exception:
            if self.state is ClientState.REVEALED:  # rejected, not aborted: leave the state as it was
                self._graph = None
            raise
        for name in ("commitments", "graph_nonce"):
            del self._s[name]
        self._s["graph_seed"] = seed
        return reply

    def _share(self, roster: dict[int, tuple[bytes, bytes, bytes]]) -> EncryptedShares:
        """Deal b_u and s_sk_u to this party's neighbours in the roster (the graph is known here)."""
        me, params = self.party_id, self.params
        holders = self._holders(set(roster))
        if len(holders) < params.threshold:
            raise self._abort(f"only {len(holders)} holders for threshold {params.threshold}")
        self_mask_seed = self._rng.token_bytes(32)
        b_shares = split(self_mask_seed, holders, params.threshold, self._rng)
        s_shares = split(self._s["mask_sk"], holders, params.threshold, self._rng)
        statements = []
        for h in holders:
            statements.append(share_statement(self.transcript, SHARE_KIND_SELF_MASK, me, h, b_shares[h]))
            statements.append(share_statement(self.transcript, SHARE_KIND_MASK_KEY, me, h, s_shares[h]))
        sigs = ed25519_sign_many(self._signing_key(), statements)  # the key parsed once, not 2|holders| times
        signed: Held = {h: (b_shares[h], s_shares[h], sigs[2 * i], sigs[2 * i + 1]) for i, h in enumerate(holders)}
        peers = [p for p in holders if p != me]
        secrets = x25519_agree_all(self._s["share_sk"], {p: roster[p][0] for p in peers})
        boxes = []
        for peer in peers:
            secret = secrets[peer]
            key = derive_key(secret, label=LABEL_SHARE_ENCRYPTION, transcript=self.transcript, a=me, b=peer)
            plaintext = BOX_PLAINTEXT.pack(me, peer, *signed[peer])
            box = seal(key, plaintext, aad=box_aad(self.transcript, me, peer), rng=self._rng)
            boxes.append(Envelope(peer=peer, data=box))
        self._s.update(roster=roster, self_mask_seed=self_mask_seed, own_shares=signed[me])
        self.state = ClientState.SHARED
        return EncryptedShares(session=self.session, round=self.round_number, sender=me, boxes=tuple(boxes))

    def _survivors_statement(self, signer: int, survivors: frozenset[int]) -> bytes:
        """The consistency-check statement; after a toss it signs the graph seed too."""
        return survivors_statement(self.transcript, signer, survivors, graph_seed=self._s.get("graph_seed", b""))

    def _open_box(self, env: Envelope, secret: bytes) -> tuple[bytes, bytes, bytes, bytes] | None:
        """The dealer's two shares and signatures from its box, or None if anything about it is wrong."""
        me = self.party_id
        key = derive_key(secret, label=LABEL_SHARE_ENCRYPTION, transcript=self.transcript, a=env.peer, b=me)
        try:
            plaintext = open_sealed(key, env.data, aad=box_aad(self.transcript, env.peer, me), peer_id=env.peer)
        except IntegrityError:
            return None
        if len(plaintext) != BOX_PLAINTEXT.size:
            return None
        sender, recipient, b_share, s_share, b_sig, s_sig = BOX_PLAINTEXT.unpack(plaintext)
        if (sender, recipient) != (env.peer, me):
            return None
        if int.from_bytes(b_share, "big") >= PRIME or int.from_bytes(s_share, "big") >= PRIME:
            return None  # a "share" outside GF(p): no reconstruction could use it
        dealer_key = self._s["roster"][env.peer][2]
        try:
            # Checked now, so that this party never returns a share the server would take for its forgery.
            ed25519_verify_many(
                dealer_key,
                (
                    (b_sig, share_statement(self.transcript, SHARE_KIND_SELF_MASK, env.peer, me, b_share)),
                    (s_sig, share_statement(self.transcript, SHARE_KIND_MASK_KEY, env.peer, me, s_share)),
                ),
            )
        except IntegrityError:
            return None
        return b_share, s_share, b_sig, s_sig

    def _on_bundle(self, bundle: ShareBundle) -> MaskedInput | Complaint:
        me, params = self.party_id, self.params
        if bundle.recipient != me:
            raise RemoteProtocolError(f"bundle addressed to {bundle.recipient}", field="recipient")
        if "input" not in self._s:
            raise InvalidTransitionError("set_input() must be called before the share bundle is handled")
        roster = self._s["roster"]
        expected = set(self._holders(set(roster))) - {me}
        held: Held = {me: self._s["own_shares"]}
        for env in bundle.boxes:
            if env.peer not in expected:
                raise RemoteProtocolError(f"share box from non-neighbour {env.peer}", peer_id=env.peer)
        box_secrets = x25519_agree_all(self._s["share_sk"], {e.peer: roster[e.peer][0] for e in bundle.boxes})
        bad: list[int] = []
        for env in bundle.boxes:
            opened = self._open_box(env, box_secrets[env.peer])
            if opened is None:
                bad.append(env.peer)
            else:
                held[env.peer] = opened
        if bad:
            return self._complain(sorted(bad))
        if len(held) < params.threshold:
            raise self._abort(f"only {len(held)} share holders remain for threshold {params.threshold}")
        plus: list[bytes] = [self._s["self_mask_seed"]]
        minus: list[bytes] = []
        mask_secrets = x25519_agree_all(self._s["mask_sk"], {p: roster[p][1] for p in sorted(held) if p != me})
        for peer, secret in mask_secrets.items():
            lo, hi = min(me, peer), max(me, peer)
            seed = derive_key(secret, label=LABEL_PAIRWISE_MASK, transcript=self.transcript, a=lo, b=hi)
            (plus if me < peer else minus).append(seed)
        # Encode x straight into the message buffer, a chunk at a time, then add the masks into it in
        # place (see MaskAccumulator.fill for why two passes); the buffer becomes the payload as it is.
        pending: PendingInput = self._s["input"]
        bits = params.encoding.ring_bits
        masked = np.empty(pending.length, dtype=ring_dtype(bits))
        encoder = ChunkEncoder(params.encoding, pending, chunk_words=CHUNK_WORDS)
        MaskAccumulator(bits, CHUNK_WORDS).fill(masked, encoder.fill, plus=plus, minus=minus)
        for name in ("share_sk", "mask_sk", "self_mask_seed", "own_shares", "input", "sign_sk"):
            self._s.pop(name, None)
        self._s["held"] = held
        self.state = ClientState.MASKED
        return MaskedInput(
            session=self.session,
            round=self.round_number,
            sender=me,
            ring_bits=bits,
            data=masked.data.cast("B").toreadonly(),
        )

    def _complain(self, accused: list[int]) -> MaskedInput | Complaint:
        """Answer a bundle with unusable boxes: a signed complaint, and this party leaves the session.

        Its input, keys and the shares it holds are erased before the reply exists, so no later
        message (a second bundle, a restored snapshot at this stage) can make it send a masked input
        for a set of neighbours that the server could then unmask against.
        """
        signature = ed25519_sign(self._signing_key(), complaint_statement(self.transcript, self.party_id, accused))
        complaint = Complaint(
            session=self.session,
            round=self.round_number,
            sender=self.party_id,
            accused=tuple(accused),
            signature=signature,
        )
        self._s = {"complaint": complaint}
        self.state = ClientState.COMPLAINED
        return complaint

    def _check_survivors(self, survivors: tuple[int, ...]) -> frozenset[int]:
        alive = frozenset(survivors)
        if self.party_id not in alive:
            raise RemoteProtocolError("survivor set omits this party", field="survivors")
        if any(p >= self.params.num_parties for p in alive):
            raise RemoteProtocolError("survivor set names an unknown party", field="survivors")
        params = self.params
        if len(alive) < params.threshold:
            raise self._abort(f"survivor set of {len(alive)} is below threshold {params.threshold}")
        if not params.complete and len(alive) < params.num_parties - params.max_dropped:
            # SecAgg+'s graph stays connected only while fewer than k parties are removed (the
            # bound in _params assumes at most n_C + d_max); a server that declares more parties
            # dropped could cut out a small group and unmask its sum.
            raise self._abort(f"survivor set of {len(alive)} implies more than d_max={params.max_dropped} dropouts")
        neighbours = self.graph.neighbours_of(self.party_id)
        if not (alive & neighbours) <= set(self._s["held"]):
            raise self._abort("survivor set names a neighbour whose shares never arrived")
        return alive

    def _on_survivor_set(self, request: SurvivorSet) -> SurvivorSignature:
        if self._identity_key is None:
            raise RemoteProtocolError("no consistency check in the semi-honest setting", field="stage")
        alive = self._check_survivors(request.survivors)
        signature = ed25519_sign(self._identity_key, self._survivors_statement(self.party_id, alive))
        self._s["signed"] = alive
        self.state = ClientState.CONFIRMED
        return SurvivorSignature(
            session=self.session, round=self.round_number, sender=self.party_id, signature=signature
        )

    def _on_unmask(self, request: UnmaskRequest) -> UnmaskResponse:
        if self.params.malicious and self.state is not ClientState.CONFIRMED:
            raise RemoteProtocolError("unmask before the consistency check", field="stage")
        alive = self._check_survivors(request.survivors)
        if self.params.identity_keys is not None:
            if alive != self._s["signed"]:
                raise self._abort("unmask request names a survivor set other than the one this party signed")
            valid = 0
            for env in request.signatures:
                if env.peer in alive:
                    statement = self._survivors_statement(env.peer, alive)
                    try:
                        ed25519_verify(self.params.identity_keys[env.peer], env.data, statement)
                        valid += 1
                    except IntegrityError:
                        continue
            if valid < self.params.consistency_quorum:
                raise self._abort(f"{valid} valid survivor signatures; {self.params.consistency_quorum} needed")
        held: Held = self._s["held"]
        # Write the ledger before building the reply: one answer per round, whatever happens next.
        self._s["revealed"] = {peer: peer in alive for peer in held}
        self._s["answered"] = alive
        reply = UnmaskResponse(
            session=self.session,
            round=self.round_number,
            sender=self.party_id,
            self_mask_shares=tuple(
                SignedShare(peer=p, share=held[p][0], signature=held[p][2]) for p in sorted(held) if p in alive
            ),
            mask_key_shares=tuple(
                SignedShare(peer=p, share=held[p][1], signature=held[p][3]) for p in sorted(held) if p not in alive
            ),
        )
        self._s = {"answered": alive, "reply": reply}
        self.state = ClientState.DONE
        return reply

    def _on_repeat_unmask(self, request: UnmaskRequest) -> UnmaskResponse:
        if frozenset(request.survivors) != self._s["answered"]:
            raise self._abort("a second unmask request with a different survivor set")
        reply: UnmaskResponse = self._s["reply"]
        return reply


_AFTER_REVEAL = frozenset(
    {
        ClientState.REVEALED,
        ClientState.SHARED,
        ClientState.MASKED,
        ClientState.CONFIRMED,
        ClientState.DONE,
        ClientState.COMPLAINED,
    }
)
"""States a session of a graph toss reaches only after it revealed its nonce."""

_Handler = Callable[[SecAggClient, Any], Message]

_A, _D = ClientState.ABORTED, ClientState.DONE
CLIENT_TRANSITIONS: dict[tuple[ClientState, type[Any]], tuple[ClientState, ...]] = {
    (ClientState.ADVERTISED, KeyRoster): (ClientState.SHARED, ClientState.REVEALED, _A),
    (ClientState.REVEALED, GraphSeed): (ClientState.SHARED, _A),
    (ClientState.SHARED, ShareBundle): (ClientState.MASKED, ClientState.COMPLAINED, _A),
    (ClientState.MASKED, SurvivorSet): (ClientState.CONFIRMED, _A),
    (ClientState.MASKED, UnmaskRequest): (_D, _A),
    (ClientState.CONFIRMED, UnmaskRequest): (_D, _A),
    (ClientState.DONE, UnmaskRequest): (_D,),
}
"""(stage, message type) -> the stages it can lead to (the normal one first); what `handle` dispatches on."""
# The transition table: (state, message type) -> handler. Anything else is rejected.
_TRANSITIONS: dict[tuple[ClientState, type[Any]], _Handler] = {
    (ClientState.ADVERTISED, KeyRoster): SecAggClient._on_roster,
    (ClientState.REVEALED, GraphSeed): SecAggClient._on_graph_seed,
    (ClientState.SHARED, ShareBundle): SecAggClient._on_bundle,
    (ClientState.MASKED, SurvivorSet): SecAggClient._on_survivor_set,
    (ClientState.MASKED, UnmaskRequest): SecAggClient._on_unmask,
    (ClientState.CONFIRMED, UnmaskRequest): SecAggClient._on_unmask,
    (ClientState.DONE, UnmaskRequest): SecAggClient._on_repeat_unmask,
}
SecAggClient.TRANSITIONS = CLIENT_TRANSITIONS
