"""The client's session of HE aggregation (sans-IO).

Stages: `advertise_keys()` -> HEHello; HERoster -> HEKeyOffer; HEKeys -> HEInput; HESum -> HEAck.

The key holder is the roster member with the smallest SHA-256(transcript || id), a public rule.
It generates the session's TenSEAL context, runs the self-test, and
seals the secret context to every other client under an AES-256-GCM key derived from their
pairwise X25519 secret (HKDF, label `he-key-delivery`, salted with the transcript); in public-key
mode the others get only the public context. With identity keys the hellos are signed, so a
server cannot substitute its own X25519 key and intercept the secret context; without them only a
semi-honest server is covered.

Each upload is signed with the client's session Ed25519 key over the transcript, its id and the
digest of its ciphertext chunks. A client decrypts an aggregate only if it lists at least
`min_contributions` contributions with valid signatures, including its own, and the decrypted
contribution counter equals that number. Only the key holder releases a decrypted BFV sum to the
server, once per session, signed: and it does not decrypt the server's sum but its own
homomorphic sum of the individually signed uploads, which the server sends it. A malicious server
that returns k * E(x_i), or a sum over a subset chosen per client, gets nothing released; if the
key holder drops before releasing, the round aborts (a fallback releaser chosen after the fact
would let the server collect two sums over different subsets). CKKS aggregates are never released
(see the package docstring).

The key holder is the roster member with the smallest hash; the server influences the roster (it
can leave hellos out), so it influences who holds the key, but in symmetric mode every client
holds the key anyway.
"""

from __future__ import annotations

import hashlib
import struct
from typing import Any

import numpy as np
import numpy.typing as npt

from ..encoding import DecodedSum
from ..errors import InvalidTransitionError, LocalProtocolError, RemoteProtocolError
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
    decrypt_ckks,
    decrypt_words,
    encrypt_update,
    load_secret_context,
    make_context,
    public_context_bytes,
    secret_context_bytes,
    self_test,
)
from ._messages import HEAck, HEHello, HEInput, HEKeyOffer, HEKeys, HEMessage, HERoster, HESum, decode_he_message
from ._params import HEParams

__all__ = ["HEClient", "he_transcript", "holder_rank", "input_digest"]


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


def key_payload(transcript: bytes, holder: int, recipient: int, public_context: bytes, box: bytes) -> bytes:
    """What the key holder signs for each recipient."""
    return (
        b"he/keys|"
        + transcript
        + struct.pack("<II", holder, recipient)
        + hashlib.sha256(public_context).digest()
        + hashlib.sha256(box).digest()
    )


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


class HEClient:
    """One client of one HE aggregation round."""

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
        self._stage = "new"
        self._hellos: dict[int, HEHello] = {}
        self._ctx: Any = None
        self._result: DecodedSum | None = None
        self.holder: int | None = None

    def set_input(
        self, x: npt.NDArray[np.floating], *, weight: float = 1.0, rounding_seed: bytes | None = None
    ) -> None:
        """The update to contribute (weights are folded into the encoding)."""
        if self._stage not in ("new", "hello_sent"):
            raise InvalidTransitionError("set_input() after keys were delivered")
        if not 0 < weight <= self.params.max_weight:
            raise LocalProtocolError(f"weight={weight} must be in (0, max_weight={self.params.max_weight}]")
        self._input = (np.asarray(x, dtype=np.float64), weight, rounding_seed)

    def advertise_keys(self) -> HEHello:
        """Stage 0: fresh X25519 and Ed25519 session keys."""
        if self._stage != "new":
            raise InvalidTransitionError("advertise_keys() was already called")
        self._dh_private, dh_public = x25519_generate(self._rng)
        self._sign_private = self._rng.token_bytes(32)
        sign_public = ed25519_public(self._sign_private)
        signature = b""
        if self._identity is not None:
            signature = ed25519_sign(
                self._identity, hello_payload(self.transcript, self.party_id, dh_public, sign_public)
            )
        self._stage = "hello_sent"
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
        """Consume one message from the server and return the reply."""
        if message.session != self.session or message.round != self.round_number:
            raise RemoteProtocolError("message is for another session or round", field="session")
        if isinstance(message, HERoster) and self._stage == "hello_sent":
            return self._on_roster(message)
        if isinstance(message, HEKeys) and self._stage == "offered":
            return self._on_keys(message)
        if isinstance(message, HESum) and self._stage == "input_sent":
            return self._on_sum(message)
        raise InvalidTransitionError(f"{type(message).__name__} is not expected in stage {self._stage!r}")

    def result(self) -> DecodedSum:
        """The decrypted aggregate (every client can read it in symmetric mode)."""
        if self._result is None:
            raise InvalidTransitionError("no aggregate has been decrypted yet")
        return self._result

    def _on_roster(self, roster: HERoster) -> HEKeyOffer:
        hellos = parse_roster(self.params, self.transcript, roster)
        if hellos.get(self.party_id) != self._hello:
            raise RemoteProtocolError("the roster drops or alters this client's own keys", field="hellos")
        if len(hellos) < self.params.min_contributions:
            raise RemoteProtocolError(f"roster has {len(hellos)} parties, below min_contributions", field="hellos")
        self._hellos = hellos
        self.holder = min(hellos, key=lambda p: holder_rank(self.transcript, p))
        self._stage = "offered"
        base: dict[str, Any] = {"session": self.session, "round": self.round_number, "sender": self.party_id}
        if self.holder != self.party_id:
            return HEKeyOffer(**base)
        self._ctx = make_context(self.params)
        self_test(self._ctx, self.params)
        public = public_context_bytes(self._ctx, self.params)
        secret = secret_context_bytes(self._ctx) if self.params.mode == "symmetric" else b""
        recipients, boxes, signatures = [], [], []
        for peer in sorted(hellos):
            if peer == self.party_id:
                continue
            box = b""
            if secret:
                key = derive_key(
                    x25519_agree(self._dh_private, hellos[peer].dh_public, peer_id=peer),
                    label=LABEL_HE_KEY_DELIVERY,
                    transcript=self.transcript,
                    a=self.party_id,
                    b=peer,
                )
                box = seal(key, secret, aad=self.transcript + struct.pack("<II", self.party_id, peer), rng=self._rng)
            recipients.append(peer)
            boxes.append(box)
            signatures.append(
                ed25519_sign(self._sign_private, key_payload(self.transcript, self.party_id, peer, public, box))
            )
        return HEKeyOffer(
            **base,
            public_context=public,
            recipients=tuple(recipients),
            boxes=tuple(boxes),
            signatures=tuple(signatures),
        )

    def _on_keys(self, keys: HEKeys) -> HEInput:
        if keys.holder != self.holder:
            raise RemoteProtocolError(f"keys come from party {keys.holder}, not the key holder", field="holder")
        if self.holder != self.party_id:
            holder = self._hellos[keys.holder]
            payload = key_payload(self.transcript, keys.holder, self.party_id, keys.public_context, keys.box)
            ed25519_verify(holder.sign_public, keys.signature, payload, peer_id=keys.holder)
            if self.params.mode == "symmetric":
                key = derive_key(
                    x25519_agree(self._dh_private, holder.dh_public, peer_id=keys.holder),
                    label=LABEL_HE_KEY_DELIVERY,
                    transcript=self.transcript,
                    a=keys.holder,
                    b=self.party_id,
                )
                aad = self.transcript + struct.pack("<II", keys.holder, self.party_id)
                secret = open_sealed(key, keys.box, aad=aad, peer_id=keys.holder)
                self._ctx = load_secret_context(secret, self.params)
            else:
                from ._ciphers import _ts

                self._ctx = _ts().context_from(keys.public_context)
        if self._input is None:
            raise InvalidTransitionError("set_input() must be called before keys arrive")
        x, weight, seed = self._input
        chunks = tuple(encrypt_update(self.params, self._ctx, x, weight=weight, rounding_seed=seed, rng=self._rng))
        self._input = None  # the plaintext update is not kept once encrypted
        self._stage = "input_sent"
        signature = ed25519_sign(self._sign_private, input_digest(self.transcript, self.party_id, chunks))
        return HEInput(
            session=self.session, round=self.round_number, sender=self.party_id, chunks=chunks, signature=signature
        )

    def _on_sum(self, total: HESum) -> HEAck:
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
        base: dict[str, Any] = {"session": self.session, "round": self.round_number, "sender": self.party_id}
        if self._ctx is None or not self._ctx.is_private():
            self._stage = "done"  # public-key mode: only the key holder can decrypt
            return HEAck(**base, count=0)
        releaser = self.party_id == self.holder and self.params.scheme == "bfv"
        chunks = self._own_sum(total) if releaser else total.chunks
        if self.params.scheme == "bfv":
            words = decrypt_words(self.params, self._ctx, chunks)
            self._result = decode_words(self.params, words)
        else:
            self._result = decrypt_ckks(self.params, self._ctx, chunks)
        if self._result.num_inputs != len(contributors):
            self._result = None
            raise RemoteProtocolError(
                "the aggregate's decrypted counter does not match its listed contributions", field="contributors"
            )
        self._stage = "done"
        if not releaser:
            return HEAck(**base, count=len(contributors))
        plaintext = words.astype("<i8").tobytes()
        signature = ed25519_sign(self._sign_private, release_payload(self.transcript, contributors, plaintext))
        return HEAck(**base, count=len(contributors), plaintext=plaintext, signature=signature)

    def _own_sum(self, total: HESum) -> list[bytes]:
        """The releaser's own homomorphic sum of the signed uploads (the server's sum is not trusted).

        Without this a malicious server could send k * E(x_i) with k valid signatures listed and
        receive x_i back; here every signature is checked against the ciphertexts it covers.
        """
        per = self.params.chunks
        if len(total.inputs) != per * len(total.contributors):
            raise RemoteProtocolError("the releaser needs every contributor's chunks", field="inputs")
        own = ChunkSum(self.params, self._ctx)
        for i, (sender, digest) in enumerate(zip(total.contributors, total.digests, strict=True)):
            chunks = tuple(total.inputs[i * per : (i + 1) * per])
            if input_digest(self.transcript, sender, chunks) != digest:
                raise RemoteProtocolError(f"contributor {sender}'s chunks do not match its signature", field="inputs")
            own.add(chunks, sender=sender)
        return own.serialize()
