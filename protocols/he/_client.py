"""The client's session of HE aggregation (sans-IO).

Stages: `advertise_keys()` -> HEHello; HERoster -> HEKeyOffer; HEKeys -> HEInput; HESum -> HEAck
(HESum goes only to the key holder, the one client that decrypts, with either scheme).

The key holder is the roster member with the smallest SHA-256(transcript || id) (`key_holder`), a
public rule. It generates a fresh TenSEAL context for this session only, runs the self-test, and
seals its secret key (bare polynomials, `_wire.py`) to every other client under an AES-256-GCM key
derived from their pairwise X25519 secret (HKDF, label `he-key-delivery`, salted with the
transcript); in public-key mode the others get only the public key. A client builds its context
locally from `HEParams` and loads only the checked polynomials, never a peer's TenSEAL context. With
identity keys the hellos are signed, so a server cannot substitute its own X25519 key and intercept
the secret key; without them only a semi-honest server is covered.

Each upload is signed with the client's session Ed25519 key over the transcript, its id and the
digest of its ciphertext chunks. A client decrypts at most once, and only the homomorphic sum it
computes itself from uploads whose signatures it checked against their chunks: at least
`min_contributions`, its own among them with the digest it signed; the decrypted counter must
equal their number. It never decrypts a ciphertext the server chose (that made every non-releasing
client a decryption oracle: finding 4(a)). Once a key is loaded, any failed check ends the session:
the state becomes ABORTED and the key is dropped, so a rejected message cannot be retried with a
variation. With BFV only the key holder decrypts, releases the integer sum signed, once, and drops
the key; the others drop it right after encrypting. If the key holder drops before releasing, the
round aborts (a fallback releaser chosen after the fact would let the server collect two sums over
different subsets). CKKS works the same way: the holder rounds its decryption to the exact integer
sums, after checking that every value is within `HEParams.ckks_tolerance` of an integer (otherwise it
aborts: a crafted upload is refused, never rounded), and releases those integers as BFV's holder does.

The holder rule depends only on the session id and the roster, which the server chooses: it can
grind session ids until a colluding client holds the key (finding 4(b)). This is a stated residual:
HE is only claimed when no client colludes with the server (the site policy refuses HE when it
assumes any corrupt client), and in symmetric mode every client holds the key anyway.
"""

from __future__ import annotations

import enum
import hashlib
import struct
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from ..encoding import DecodedSum
from ..errors import AbortError, InvalidTransitionError, LocalProtocolError, RemoteProtocolError
from ..primitives import (
    LABEL_HE_KEY_DELIVERY,
    derive_key,
    ed25519_public,
    ed25519_sign,
    ed25519_verify,
    open_sealed,
    seal,
    x25519_agree,
    x25519_check_public,
    x25519_generate,
)
from ..randomness import OsRandom, SecretSource
from ._ciphers import (
    ChunkSum,
    decode_words,
    decrypt_ckks_values,
    decrypt_words,
    encrypt_update,
    export_key,
    load_key,
    make_context,
    round_ckks,
    self_test,
)
from ._messages import HEAck, HEHello, HEInput, HEKeyOffer, HEKeys, HEMessage, HERoster, HESum, decode_he_message
from ._params import HEParams
from ._state import dump_he_client, load_he_client, peek_he_identity

__all__ = ["HEClient", "HEClientState", "he_transcript", "holder_rank", "input_digest", "key_holder"]


def he_transcript(params: HEParams, *, session: bytes, round_number: int, context: bytes) -> bytes:
    """The round's transcript hash: protocol, session, round, parameters and the caller's context."""
    return hashlib.sha256(
        b"protocols/he/v1|"
        + session
        + struct.pack("<Q", round_number)
        + params.digest()
        + hashlib.sha256(context).digest()
    ).digest()


def holder_rank(transcript: bytes, party: int) -> bytes:
    """Sort key of the public key-holder rule (smallest first)."""
    return hashlib.sha256(b"he/holder|" + transcript + struct.pack("<I", party)).digest()


def input_digest(transcript: bytes, sender: int, chunks: tuple[bytes, ...]) -> bytes:
    """What a contribution's signature covers."""
    inner = b"".join(hashlib.sha256(c).digest() for c in chunks)
    return hashlib.sha256(b"he/input|" + transcript + struct.pack("<I", sender) + inner).digest()


def hello_payload(transcript: bytes, sender: int, dh_public: bytes, sign_public: bytes) -> bytes:
    """What an identity signature on a hello covers."""
    return b"he/hello|" + transcript + struct.pack("<I", sender) + dh_public + sign_public


def release_payload(transcript: bytes, contributors: tuple[int, ...], plaintext: bytes) -> bytes:
    """What the releaser signs: the decrypted sum and whose inputs it covers."""
    ids = struct.pack(f"<{len(contributors)}I", *contributors)
    return b"he/release|" + transcript + hashlib.sha256(ids).digest() + hashlib.sha256(plaintext).digest()


def key_payload(transcript: bytes, holder: int, recipient: int, public_key: bytes, box: bytes) -> bytes:
    """What the key holder signs for each recipient."""
    return (
        b"he/keys|"
        + transcript
        + struct.pack("<II", holder, recipient)
        + hashlib.sha256(public_key).digest()
        + hashlib.sha256(box).digest()
    )


def key_holder(transcript: bytes, roster: Iterable[int]) -> int:
    """The public key-holder rule: the roster member with the smallest `holder_rank`.

    It depends on the session id (chosen by the server) and the roster (chosen by the server among
    the hellos it received) only, so a server can grind session ids until a colluding client is the
    holder (see the module docstring for why that is a stated residual and not a fix).
    """
    return min(roster, key=lambda p: holder_rank(transcript, p))


def parse_roster(params: HEParams, transcript: bytes, roster: HERoster) -> dict[int, HEHello]:
    """Decode and check the hellos of a roster (ids, uniqueness, keys, identity signatures)."""
    hellos: dict[int, HEHello] = {}
    for blob in roster.hellos:
        hello = decode_he_message(blob)
        if not isinstance(hello, HEHello) or hello.session != roster.session or hello.round != roster.round:
            raise RemoteProtocolError("roster entry is not a hello of this round", field="hellos")
        if hello.sender >= params.num_parties or hello.sender in hellos:
            raise RemoteProtocolError(f"roster lists party {hello.sender} twice or out of range", field="hellos")
        x25519_check_public(hello.dh_public, peer_id=hello.sender)
        if params.identity_keys is not None:
            payload = hello_payload(transcript, hello.sender, hello.dh_public, hello.sign_public)
            ed25519_verify(params.identity_keys[hello.sender], hello.identity_signature, payload, peer_id=hello.sender)
        hellos[hello.sender] = hello
    return hellos


class HEClientState(enum.Enum):
    """Where a client is in its round; ABORTED and DONE are terminal."""

    NEW = "new"
    HELLO_SENT = "hello_sent"
    OFFERED = "offered"
    INPUT_SENT = "input_sent"
    DONE = "done"
    ABORTED = "aborted"


class HEClient:
    """One client of one HE aggregation round (single use: one session, one key, at most one decryption).

    A `protocols.ClientSession`; `TRANSITIONS` is its transition table.
    """

    TRANSITIONS: ClassVar[Mapping[tuple[Any, type[Any]], Any]]

    def __init__(
        self,
        params: HEParams,
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
        if (identity_key is None) != (params.identity_keys is None):
            raise LocalProtocolError("identity_key and params.identity_keys go together")
        if identity_key is not None and params.identity_keys is not None:
            if ed25519_public(identity_key) != params.identity_keys[party_id]:
                raise LocalProtocolError("identity_key does not match params.identity_keys[party_id]")
        self.params, self.party_id, self.session, self.round_number = params, party_id, session, round_number
        self.transcript = he_transcript(params, session=session, round_number=round_number, context=context)
        self._identity = identity_key
        self._rng = rng or OsRandom()
        self._input: tuple[npt.NDArray[np.floating], float, bytes | None] | None = None
        self.state = HEClientState.NEW
        self._hellos: dict[int, HEHello] = {}
        self._ctx: Any = None
        self._own_digest: bytes | None = None
        self._result: DecodedSum | None = None
        self.decryptions = 0
        """How many aggregates this client decrypted: at most one (BFV is not IND-CCA1)."""
        self.holder: int | None = None
        self._dh_private = self._sign_private = b""

    @property
    def stage(self) -> HEClientState:
        """The session's stage (`ClientSession` interface; the same as `state`)."""
        return self.state

    @property
    def finished(self) -> bool:
        """True once DONE or ABORTED."""
        return self.state in (HEClientState.DONE, HEClientState.ABORTED)

    def start(self) -> HEHello:
        """The first message (`ClientSession` interface): `advertise_keys()`."""
        return self.advertise_keys()

    def export_state(self, *, include_input: bool = True) -> bytes:
        """The session as bytes: SECRET; keep it in the site's own state folder (see `_state`).

        It holds the session keys, the plaintext update until it is encrypted, and the HE secret key
        until the one decryption. `include_input` is accepted for the common `ClientSession`
        interface and has no effect: the update is always in the blob (so `input` is never needed
        to restore it).
        """
        return dump_he_client(self, _CLIENT_ORDER)

    @classmethod
    def from_state(
        cls,
        data: bytes,
        params: HEParams,
        *,
        context: bytes = b"",
        identity_key: bytes | None = None,
        rng: SecretSource | None = None,
        min_stage: HEClientState | None = None,
    ) -> HEClient:
        """Rebuild a session from `export_state()`; params, context and identity key must be the original ones.

        Persist the blob exported after `handle()` before sending its reply and pass the stage last
        persisted as `min_stage`: a rolled-back INPUT_SENT snapshot would otherwise decrypt a second
        aggregate (over another contributor set) with the same key.

        Raises:
            DecodeError: malformed, truncated or inconsistent blob (records, keys, roster, holder).
            LocalProtocolError: another party, session, round, params or context; older than `min_stage`.
        """
        stage, party, session, round_number = peek_he_identity(data)
        if min_stage is not None and stage < len(_CLIENT_ORDER) and stage < _CLIENT_ORDER.index(min_stage):
            raise LocalProtocolError(
                f"HE state is at stage {_CLIENT_ORDER[stage].name}, older than min_stage={min_stage.name}: a rollback "
                "is refused (it could decrypt a second aggregate)"
            )
        client = cls(
            params,
            party_id=party,
            session=session,
            round_number=round_number,
            context=context,
            identity_key=identity_key,
            rng=rng,
        )
        load_he_client(client, data, _CLIENT_ORDER)
        return client

    @property
    def holds_key(self) -> bool:
        """Whether a secret or public key is loaded right now (False once ABORTED or DONE)."""
        return self._ctx is not None

    def set_input(
        self,
        x: npt.NDArray[np.floating] | npt.NDArray[np.integer],
        *,
        weight: float = 1.0,
        rounding_seed: bytes | None = None,
    ) -> None:
        """The update to contribute (weights are folded into the encoding).

        Integer vectors are refused: they are ring elements for the masking families (distributed
        DP), whereas HE encodes its own plaintexts from a float update, so integer noise shares
        would silently be rescaled as if they were floats.
        """
        if self.state not in (HEClientState.NEW, HEClientState.HELLO_SENT):
            raise InvalidTransitionError("set_input() after keys were delivered")
        if np.issubdtype(np.asarray(x).dtype, np.integer):
            raise LocalProtocolError(
                "x: integer ring inputs are for masking families; HE encodes its own plaintexts (pass a float update)"
            )
        if not 0 < weight <= self.params.max_weight:
            raise LocalProtocolError(f"weight={weight} must be in (0, max_weight={self.params.max_weight}]")
        self._input = (np.asarray(x, dtype=np.float64), weight, rounding_seed)

    def advertise_keys(self) -> HEHello:
        """Stage 0: fresh X25519 and Ed25519 session keys."""
        if self.state is not HEClientState.NEW:
            raise InvalidTransitionError("advertise_keys() was already called")
        self._dh_private, dh_public = x25519_generate(self._rng)
        self._sign_private = self._rng.token_bytes(32)
        sign_public = ed25519_public(self._sign_private)
        signature = b""
        if self._identity is not None:
            signature = ed25519_sign(
                self._identity, hello_payload(self.transcript, self.party_id, dh_public, sign_public)
            )
        self.state = HEClientState.HELLO_SENT
        self._hello = HEHello(
            session=self.session,
            round=self.round_number,
            sender=self.party_id,
            dh_public=dh_public,
            sign_public=sign_public,
            identity_signature=signature,
        )
        return self._hello

    def handle(self, message: HEMessage) -> HEMessage:
        """Consume one message from the server and return the reply.

        Once a key is loaded (the holder's at the roster, the others' at the keys), any failed check
        ends the session: the state becomes ABORTED and the key is dropped, so a server cannot probe
        the key with crafted messages, one rejected message after another (finding 4(a)).

        Raises:
            AbortError: the session was aborted earlier; nothing is processed.
            RemoteProtocolError: the message is invalid (and, with a key loaded, the session aborted).
            InvalidTransitionError: the message is not expected now (with a key loaded: aborted too).
        """
        if self.state is HEClientState.ABORTED:
            raise AbortError("this HE session was aborted after a failed check; start a new session")
        keyed = self._ctx is not None or self.state in (HEClientState.INPUT_SENT, HEClientState.DONE)
        try:
            return self._dispatch(message)
        except Exception:
            if keyed or self._ctx is not None:
                self._abort()
            raise

    def _abort(self) -> None:
        """Terminal: drop the key (and any plaintext input) so nothing more can be decrypted."""
        self._ctx = None
        self._input = None
        self._result = None
        self.state = HEClientState.ABORTED

    def _dispatch(self, message: HEMessage) -> HEMessage:
        if message.session != self.session or message.round != self.round_number:
            raise RemoteProtocolError("message is for another session or round", field="session")
        if isinstance(message, HERoster) and self.state is HEClientState.HELLO_SENT:
            return self._on_roster(message)
        if isinstance(message, HEKeys) and self.state is HEClientState.OFFERED:
            return self._on_keys(message)
        if isinstance(message, HESum) and self.state is HEClientState.INPUT_SENT:
            return self._on_sum(message)
        raise InvalidTransitionError(f"{type(message).__name__} is not expected in state {self.state.name}")

    def result(self) -> DecodedSum:
        """The aggregate this client decrypted (the key holder only)."""
        if self._result is None:
            raise InvalidTransitionError("no aggregate has been decrypted by this client")
        return self._result

    @property
    def decrypts(self) -> bool:
        """Whether this client decrypts the aggregate: the key holder only (it releases the exact integer sum).

        With either scheme the other clients drop the key right after encrypting, so no client but the
        holder can be asked to decrypt anything (and the holder decrypts at most once).
        """
        return self.party_id == self.holder

    def _on_roster(self, roster: HERoster) -> HEKeyOffer:
        hellos = parse_roster(self.params, self.transcript, roster)
        if hellos.get(self.party_id) != self._hello:
            raise RemoteProtocolError("the roster drops or alters this client's own keys", field="hellos")
        if len(hellos) < self.params.min_contributions:
            raise RemoteProtocolError(f"roster has {len(hellos)} parties, below min_contributions", field="hellos")
        self._hellos = hellos
        self.holder = key_holder(self.transcript, hellos)
        self.state = HEClientState.OFFERED
        base: dict[str, Any] = {"session": self.session, "round": self.round_number, "sender": self.party_id}
        if self.holder != self.party_id:
            return HEKeyOffer(**base)
        self._ctx = make_context(self.params)  # a fresh key for this session only
        self_test(self._ctx, self.params)
        key = export_key(self.params, self._ctx)
        public = key if self.params.mode == "public-key" else b""
        recipients, boxes, signatures = [], [], []
        for peer in sorted(hellos):
            if peer == self.party_id:
                continue
            box = b""
            if self.params.mode == "symmetric":
                shared = derive_key(
                    x25519_agree(self._dh_private, hellos[peer].dh_public, peer_id=peer),
                    label=LABEL_HE_KEY_DELIVERY,
                    transcript=self.transcript,
                    a=self.party_id,
                    b=peer,
                )
                box = seal(shared, key, aad=self.transcript + struct.pack("<II", self.party_id, peer), rng=self._rng)
            recipients.append(peer)
            boxes.append(box)
            signatures.append(
                ed25519_sign(self._sign_private, key_payload(self.transcript, self.party_id, peer, public, box))
            )
        return HEKeyOffer(
            **base, public_key=public, recipients=tuple(recipients), boxes=tuple(boxes), signatures=tuple(signatures)
        )

    def _on_keys(self, keys: HEKeys) -> HEInput:
        if keys.holder != self.holder:
            raise RemoteProtocolError(f"keys come from party {keys.holder}, not the key holder", field="holder")
        if self._input is None:
            raise InvalidTransitionError("set_input() must be called before keys arrive")
        if self.holder != self.party_id:
            holder = self._hellos[keys.holder]
            payload = key_payload(self.transcript, keys.holder, self.party_id, keys.public_key, keys.box)
            ed25519_verify(holder.sign_public, keys.signature, payload, peer_id=keys.holder)
            if self.params.mode == "symmetric":
                if keys.public_key:
                    raise RemoteProtocolError("symmetric mode carries no public key", field="public_key")
                shared = derive_key(
                    x25519_agree(self._dh_private, holder.dh_public, peer_id=keys.holder),
                    label=LABEL_HE_KEY_DELIVERY,
                    transcript=self.transcript,
                    a=keys.holder,
                    b=self.party_id,
                )
                aad = self.transcript + struct.pack("<II", keys.holder, self.party_id)
                secret = open_sealed(shared, keys.box, aad=aad, peer_id=keys.holder)
                self._ctx = load_key(self.params, secret, peer_id=keys.holder)
            else:
                self._ctx = load_key(self.params, keys.public_key, peer_id=keys.holder)
        x, weight, seed = self._input
        chunks = tuple(encrypt_update(self.params, self._ctx, x, weight=weight, rounding_seed=seed, rng=self._rng))
        self._input = None  # the plaintext update is not kept once encrypted
        self._own_digest = input_digest(self.transcript, self.party_id, chunks)
        if not self.decrypts:
            self._ctx = None  # it will never decrypt anything: drop the key now
        self.state = HEClientState.INPUT_SENT
        signature = ed25519_sign(self._sign_private, self._own_digest)
        return HEInput(
            session=self.session, round=self.round_number, sender=self.party_id, chunks=chunks, signature=signature
        )

    def _on_sum(self, total: HESum) -> HEAck:
        if not self.decrypts or self._ctx is None:
            raise RemoteProtocolError(
                "this client decrypts nothing: only the key holder's signed release gives the sum",
                field="contributors",
            )
        contributors = total.contributors
        if not (len(contributors) == len(total.digests) == len(total.signatures)):
            raise RemoteProtocolError("contributors, digests and signatures differ in length", field="contributors")
        if len(set(contributors)) != len(contributors) or self.party_id not in contributors:
            raise RemoteProtocolError("the aggregate omits this client or repeats a contributor", field="contributors")
        if len(contributors) < self.params.min_contributions:
            raise RemoteProtocolError(
                f"aggregate has {len(contributors)} contributions, below min_contributions", field="contributors"
            )
        for sender, digest, signature in zip(contributors, total.digests, total.signatures, strict=True):
            if sender not in self._hellos:
                raise RemoteProtocolError(f"contributor {sender} is not in the roster", field="contributors")
            ed25519_verify(self._hellos[sender].sign_public, signature, digest, peer_id=sender)
        if total.digests[contributors.index(self.party_id)] != self._own_digest:
            raise RemoteProtocolError("the aggregate lists another upload as this client's", field="digests")
        vectors = self._own_sum(total)
        ctx, self._ctx = self._ctx, None  # one decryption per key: the key goes with it
        self.decryptions += 1
        base: dict[str, Any] = {"session": self.session, "round": self.round_number, "sender": self.party_id}
        del ctx
        if self.params.scheme == "bfv":
            words = decrypt_words(self.params, vectors)
        else:  # exact integer sums, or an abort: the CKKS error (a function of the key) is never released
            raw = decrypt_ckks_values(self.params, vectors)
            words = round_ckks(self.params, raw, tolerance=self.params.ckks_tolerance)
        result = decode_words(self.params, words)
        if result.num_inputs != len(contributors):
            raise RemoteProtocolError(
                "the aggregate's decrypted counter does not match its listed contributions", field="contributors"
            )
        self._result = result
        self.state = HEClientState.DONE
        plaintext = words.astype("<u4").tobytes()
        signature = ed25519_sign(self._sign_private, release_payload(self.transcript, contributors, plaintext))
        return HEAck(**base, count=len(contributors), plaintext=plaintext, signature=signature)

    def _own_sum(self, total: HESum) -> list[Any]:
        """This client's own homomorphic sum of the signed uploads (a server-chosen ciphertext is never decrypted).

        Without this a malicious server could send k * E(x_i), or E(x_i) plus a chosen offset, and read
        x_i (or the key) from the reply; here every signature is checked against the ciphertexts it covers.
        """
        per = self.params.chunks
        if len(total.inputs) != per * len(total.contributors):
            raise RemoteProtocolError(
                f"{len(total.inputs)} input chunks; {len(total.contributors)} contributors need {per} each",
                field="inputs",
            )
        own = ChunkSum(self.params, self._ctx)
        for i, (sender, digest) in enumerate(zip(total.contributors, total.digests, strict=True)):
            chunks = tuple(total.inputs[i * per : (i + 1) * per])
            if input_digest(self.transcript, sender, chunks) != digest:
                raise RemoteProtocolError(f"contributor {sender}'s chunks do not match its signature", field="inputs")
            own.add(chunks, sender=sender)
        return own.vectors()


_CLIENT_ORDER: tuple[HEClientState, ...] = tuple(HEClientState)
"""Protocol order of the stages (ABORTED last); the stage index carried by exported state."""

HEClient.TRANSITIONS = {
    (HEClientState.HELLO_SENT, HERoster): (HEClientState.OFFERED, HEClientState.ABORTED),
    (HEClientState.OFFERED, HEKeys): (HEClientState.INPUT_SENT, HEClientState.ABORTED),
    (HEClientState.INPUT_SENT, HESum): (HEClientState.DONE, HEClientState.ABORTED),
}
