"""The client side of SecAgg / SecAgg+ as a sans-IO state machine.

A `SecAggClient` never touches a socket or a clock: the host feeds it the server's messages with
`handle()` and sends whatever it returns. Every check is made by the client itself, because a
malicious server will not abort on its behalf (Bonawitz et al. 2017, section 4, Figure 4):

* it accepts only rosters that contain its own keys unchanged, no repeated key, and (malicious
  setting) a valid identity signature on every entry;
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
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

from ..errors import AbortError, IntegrityError, InvalidTransitionError, LocalProtocolError, RemoteProtocolError
from ..primitives.aead import open_sealed, seal
from ..primitives.kdf import LABEL_PAIRWISE_MASK, LABEL_SHARE_ENCRYPTION, derive_key
from ..primitives.keys import ed25519_public, ed25519_sign, ed25519_verify, x25519_agree_all, x25519_generate
from ..primitives.prg import MaskAccumulator
from ..primitives.shamir import SHARE_BYTES, split
from ..randomness import OsRandom, SecretSource
from ._client_state import dump_client_state, load_client_state, peek_identity
from ._graph import NeighbourGraph
from ._messages import (
    AdvertiseKeys,
    EncryptedShares,
    Envelope,
    KeyRoster,
    MaskedInput,
    Message,
    ShareBundle,
    SurvivorSet,
    SurvivorSignature,
    UnmaskRequest,
    UnmaskResponse,
)
from ._params import SecAggParams
from ._roster import check_advertisement
from ._transcript import advertise_statement, box_aad, check_round_identity, survivors_statement, transcript_hash

__all__ = ["ClientState", "SecAggClient"]

_BOX_PLAINTEXT = struct.Struct(f"<II{SHARE_BYTES}s{SHARE_BYTES}s")


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


class SecAggClient:
    """One party's session for one round.

    Args:
        params: the round's public parameters.
        party_id: this party's id in 0..n-1.
        session: 16-byte session id (chosen by the host; unique per session).
        round_number: the round; keys are fresh per round and never reused.
        context: the caller's round context, bound into every key and signature.
        identity_key: this party's raw Ed25519 private key (required iff params has identity keys).
        rng: the CSPRNG for keys, seeds and Shamir coefficients; `os.urandom` by default.
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
        self.graph = NeighbourGraph(params.num_parties, params.neighbours, self.transcript)
        self._identity_key = identity_key
        self._rng = rng or OsRandom()
        self.state = ClientState.IDLE
        self._s: dict[str, Any] = {}  # round secrets and bookkeeping; see export_state()

    # -- host-facing API -------------------------------------------------------------------------

    def set_input(
        self, x: npt.NDArray[np.floating], *, weight: float = 1.0, rounding_seed: bytes | None = None
    ) -> None:
        """Encode this party's update; allowed any time before the share bundle arrives."""
        if self.state not in (ClientState.IDLE, ClientState.ADVERTISED, ClientState.SHARED):
            raise InvalidTransitionError(f"set_input is not allowed in state {self.state.name}")
        if np.asarray(x).shape != (self.params.dimension,):
            raise LocalProtocolError(f"x must have shape ({self.params.dimension},), got {np.asarray(x).shape}")
        # Encoded now, so the session holds a snapshot of the update (4 bytes per coordinate).
        self._s["input"] = self.params.encoding.encode(x, weight=weight, rounding_seed=rounding_seed, rng=self._rng)

    def advertise_keys(self) -> AdvertiseKeys:
        """Round 0: draw two fresh X25519 pairs and advertise their public halves."""
        if self.state is not ClientState.IDLE:
            raise InvalidTransitionError(f"advertise_keys is not allowed in state {self.state.name}")
        share_sk, share_pk = x25519_generate(self._rng)
        mask_sk, mask_pk = x25519_generate(self._rng)
        signature = b""
        if self._identity_key is not None:
            statement = advertise_statement(self.transcript, self.party_id, share_pk, mask_pk)
            signature = ed25519_sign(self._identity_key, statement)
        message = AdvertiseKeys(
            session=self.session,
            round=self.round_number,
            sender=self.party_id,
            transcript=self.transcript,
            share_public_key=share_pk,
            mask_public_key=mask_pk,
            signature=signature,
        )
        self._s.update(share_sk=share_sk, mask_sk=mask_sk, own=message)
        self.state = ClientState.ADVERTISED
        return message

    def handle(self, message: Message) -> Message:
        """Consume one server message and return the reply to send.

        Raises:
            RemoteProtocolError: the message is invalid (wrong session, round, stage, or content);
                nothing changed.
            IntegrityError: a signature or share box failed to verify; nothing changed.
            AbortError: the server misbehaved or too few parties remain; the session is over.
            InvalidTransitionError: the session is already over, or the input is missing.
        """
        if self.state in (ClientState.ABORTED, ClientState.CLOSED):
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

    def export_state(self) -> bytes:
        """The session as bytes (SECRET), for hosts that persist it; see `from_state` and `_client_state`."""
        return dump_client_state(self)

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
    ) -> SecAggClient:
        """Rebuild a session from `export_state()`; params and context must be the original ones.

        Persist the blob exported after `handle()` *before* sending its reply, and pass the stage
        last persisted as `min_stage`: a session rolled back to an earlier stage could sign a
        second survivor set or answer a second unmask request.

        Raises:
            DecodeError: malformed blob.
            LocalProtocolError: the blob belongs to another party, session, round, params or context,
                or is older than `min_stage`.
        """
        party, session, round_number = peek_identity(data)
        client = cls(
            params,
            party_id=party,
            session=session,
            round_number=round_number,
            context=context,
            identity_key=identity_key,
            rng=rng,
        )
        load_client_state(client, data, min_stage=None if min_stage is None else min_stage.value)
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

    def _on_roster(self, roster: KeyRoster) -> EncryptedShares:
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
            )
            seen.update((entry.share_public_key, entry.mask_public_key))
            keys[entry.sender] = entry
        if keys.get(me) != self._s["own"]:
            raise self._abort("the roster does not carry this party's own keys unchanged")
        holders = self._holders(set(keys))
        if len(holders) < params.threshold:
            raise self._abort(f"only {len(holders)} holders for threshold {params.threshold}")
        self_mask_seed = self._rng.token_bytes(32)
        b_shares = split(self_mask_seed, holders, params.threshold, self._rng)
        s_shares = split(self._s["mask_sk"], holders, params.threshold, self._rng)
        peers = [p for p in holders if p != me]
        secrets = x25519_agree_all(self._s["share_sk"], {p: keys[p].share_public_key for p in peers})
        boxes = []
        for peer in peers:
            secret = secrets[peer]
            key = derive_key(secret, label=LABEL_SHARE_ENCRYPTION, transcript=self.transcript, a=me, b=peer)
            plaintext = _BOX_PLAINTEXT.pack(me, peer, b_shares[peer], s_shares[peer])
            box = seal(key, plaintext, aad=box_aad(self.transcript, me, peer), rng=self._rng)
            boxes.append(Envelope(peer=peer, data=box))
        self._s.update(
            roster={p: (k.share_public_key, k.mask_public_key) for p, k in keys.items()},
            self_mask_seed=self_mask_seed,
            own_shares=(b_shares[me], s_shares[me]),
        )
        self.state = ClientState.SHARED
        return EncryptedShares(session=self.session, round=self.round_number, sender=me, boxes=tuple(boxes))

    def _on_bundle(self, bundle: ShareBundle) -> MaskedInput:
        me, params = self.party_id, self.params
        if bundle.recipient != me:
            raise RemoteProtocolError(f"bundle addressed to {bundle.recipient}", field="recipient")
        if "input" not in self._s:
            raise InvalidTransitionError("set_input() must be called before the share bundle is handled")
        roster = self._s["roster"]
        expected = set(self._holders(set(roster))) - {me}
        held: dict[int, tuple[bytes, bytes]] = {me: self._s["own_shares"]}
        for env in bundle.boxes:
            if env.peer not in expected:
                raise RemoteProtocolError(f"share box from non-neighbour {env.peer}", peer_id=env.peer)
        box_secrets = x25519_agree_all(self._s["share_sk"], {e.peer: roster[e.peer][0] for e in bundle.boxes})
        for env in bundle.boxes:
            key = derive_key(
                box_secrets[env.peer], label=LABEL_SHARE_ENCRYPTION, transcript=self.transcript, a=env.peer, b=me
            )
            plaintext = open_sealed(key, env.data, aad=box_aad(self.transcript, env.peer, me), peer_id=env.peer)
            if len(plaintext) != _BOX_PLAINTEXT.size:
                raise IntegrityError(peer_id=env.peer)
            sender, recipient, b_share, s_share = _BOX_PLAINTEXT.unpack(plaintext)
            if (sender, recipient) != (env.peer, me):
                raise IntegrityError(peer_id=env.peer)
            held[env.peer] = (b_share, s_share)
        if len(held) < params.threshold:
            raise self._abort(f"only {len(held)} share holders remain for threshold {params.threshold}")
        plus: list[bytes] = [self._s["self_mask_seed"]]
        minus: list[bytes] = []
        mask_secrets = x25519_agree_all(self._s["mask_sk"], {p: roster[p][1] for p in sorted(held) if p != me})
        for peer, secret in mask_secrets.items():
            lo, hi = min(me, peer), max(me, peer)
            seed = derive_key(secret, label=LABEL_PAIRWISE_MASK, transcript=self.transcript, a=lo, b=hi)
            (plus if me < peer else minus).append(seed)
        masked = self._s["input"]  # masked in place, a cache-sized chunk at a time
        MaskAccumulator(params.encoding.ring_bits).apply(masked, plus=plus, minus=minus)
        for name in ("share_sk", "mask_sk", "self_mask_seed", "own_shares", "input"):
            del self._s[name]
        self._s["held"] = held
        self.state = ClientState.MASKED
        return MaskedInput(
            session=self.session,
            round=self.round_number,
            sender=me,
            ring_bits=params.encoding.ring_bits,
            data=masked.tobytes(),
        )

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
        signature = ed25519_sign(self._identity_key, survivors_statement(self.transcript, self.party_id, alive))
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
                    statement = survivors_statement(self.transcript, env.peer, alive)
                    try:
                        ed25519_verify(self.params.identity_keys[env.peer], env.data, statement)
                        valid += 1
                    except IntegrityError:
                        continue
            if valid < self.params.consistency_quorum:
                raise self._abort(f"{valid} valid survivor signatures; {self.params.consistency_quorum} needed")
        held: dict[int, tuple[bytes, bytes]] = self._s["held"]
        # Write the ledger before building the reply: one answer per round, whatever happens next.
        self._s["revealed"] = {peer: peer in alive for peer in held}
        self._s["answered"] = alive
        reply = UnmaskResponse(
            session=self.session,
            round=self.round_number,
            sender=self.party_id,
            self_mask_shares=tuple(Envelope(peer=p, data=held[p][0]) for p in sorted(held) if p in alive),
            mask_key_shares=tuple(Envelope(peer=p, data=held[p][1]) for p in sorted(held) if p not in alive),
        )
        self._s = {"answered": alive, "reply": reply}
        self.state = ClientState.DONE
        return reply

    def _on_repeat_unmask(self, request: UnmaskRequest) -> UnmaskResponse:
        if frozenset(request.survivors) != self._s["answered"]:
            raise self._abort("a second unmask request with a different survivor set")
        reply: UnmaskResponse = self._s["reply"]
        return reply


_Handler = Callable[[SecAggClient, Any], Message]
# The transition table: (state, message type) -> handler. Anything else is rejected.
_TRANSITIONS: dict[tuple[ClientState, type[Any]], _Handler] = {
    (ClientState.ADVERTISED, KeyRoster): SecAggClient._on_roster,
    (ClientState.SHARED, ShareBundle): SecAggClient._on_bundle,
    (ClientState.MASKED, SurvivorSet): SecAggClient._on_survivor_set,
    (ClientState.MASKED, UnmaskRequest): SecAggClient._on_unmask,
    (ClientState.CONFIRMED, UnmaskRequest): SecAggClient._on_unmask,
    (ClientState.DONE, UnmaskRequest): SecAggClient._on_repeat_unmask,
}
