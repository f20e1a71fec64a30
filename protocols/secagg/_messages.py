"""The wire messages of SecAgg / SecAgg+ (Bonawitz et al. 2017, Bell et al. 2020).

Messages are frozen pydantic models, validated on construction, never subclassed. Every message
carries the session id and round number, so a message replayed from another session or round is
recognisable before anything else is looked at; the stage is implied by the message type. The byte
format lives in `_codec.py`. The flow, with U1 >= U2 >= U3 >= U4 the parties still alive:

    client -> server   AdvertiseKeys        two fresh X25519 public keys (+ Ed25519 signature), and in
                                            the malicious SecAgg+ setting a commitment to a graph nonce
    server -> client   KeyRoster            the AdvertiseKeys of U1
    client -> server   GraphReveal          (malicious SecAgg+ only) the nonce behind its commitment
    server -> client   GraphSeed            (malicious SecAgg+ only) the nonces of every party of U1;
                                            the graph seed is their hash (see `_graph`)
    client -> server   EncryptedShares      Shamir shares of b_u and s_sk_u, one AEAD box per neighbour
    server -> client   ShareBundle          the boxes addressed to that client (senders: U2)
    client -> server   MaskedInput          y_u = x_u + PRG(b_u) + sum of signed pairwise masks
                       or Complaint         (instead) a signed accusation of the dealers whose boxes failed
    server -> client   SurvivorSet          U3 (consistency check; malicious-server setting only)
    client -> server   SurvivorSignature    Ed25519 signature of U3 (malicious-server setting only)
    server -> client   UnmaskRequest        U3 (+ the signatures of U4 on it)
    client -> server   UnmaskResponse       b-shares of survivors, s_sk-shares of dropped neighbours,
                                            each with its dealer's signature

Every Shamir share is signed by its dealer (`SignedShare`), so a holder that returns a modified
share is caught by the server instead of silently corrupting the sum; a dealer that sends a box
which does not open (or holds badly signed shares) is named in a signed `Complaint`, and the server
drops both accuser and accused rather than letting one bad box abort the round.

The graph toss (GraphReveal / GraphSeed) takes all of U1 or nobody: a party of U1 that does not
reveal, or reveals a nonce other than the one it committed to, aborts the round. With a beacon
passed in by the host, the toss is skipped and `graph_commitment` carries a binding of the beacon.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, PlainSerializer, PlainValidator, field_validator

from ..primitives.prg import ring_dtype
from ..primitives.shamir import SHARE_BYTES

__all__ = [
    "MAX_PARTIES",
    "AdvertiseKeys",
    "Complaint",
    "EncryptedShares",
    "Envelope",
    "GraphReveal",
    "GraphSeed",
    "KeyRoster",
    "MaskedInput",
    "Message",
    "ShareBundle",
    "SignedShare",
    "SurvivorSet",
    "SurvivorSignature",
    "UnmaskRequest",
    "UnmaskResponse",
]

MAX_PARTIES = 1 << 16
"""Upper bound on party ids and list lengths; the decoder refuses larger counts before allocating."""

PartyId = Annotated[int, Field(ge=0, lt=MAX_PARTIES)]
SessionId = Annotated[bytes, Field(min_length=16, max_length=16)]
RoundNumber = Annotated[int, Field(ge=0, lt=1 << 63)]
PublicKey = Annotated[bytes, Field(min_length=32, max_length=32)]
Signature = Annotated[bytes, Field(max_length=64)]


def _unique(values: tuple[int, ...], what: str) -> tuple[int, ...]:
    if len(set(values)) != len(values):
        raise ValueError(f"{what} must not repeat a party id")
    return values


class _Base(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)
    TAG: ClassVar[int]

    session: SessionId
    round: RoundNumber


class Envelope(BaseModel):
    """A (party id, bytes) pair: a share box, a share, or a signature, labelled with the other party."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    peer: PartyId
    data: Annotated[bytes, Field(max_length=1 << 16)]


def _unique_envelopes(values: tuple[Envelope, ...]) -> tuple[Envelope, ...]:
    _unique(tuple(e.peer for e in values), "envelopes")
    return values


class AdvertiseKeys(_Base):
    """Round 0: a party's two fresh public keys; signed with its identity key when one is configured."""

    TAG: ClassVar[int] = 1
    sender: PartyId
    transcript: PublicKey = Field(description="the sender's 32-byte transcript hash, so mismatches surface at once")
    share_public_key: PublicKey = Field(description="X25519 key under which peers encrypt shares to sender")
    mask_public_key: PublicKey = Field(description="X25519 key from which pairwise masks are agreed")
    signature: Signature = Field(b"", description="Ed25519 over the transcript and both keys, or empty")
    signing_public_key: Annotated[bytes, Field(max_length=32)] = Field(
        b"",
        description="semi-honest setting: a fresh Ed25519 key that signs this party's shares and complaints; "
        "empty in the malicious setting, where the identity key signs",
    )
    graph_commitment: Annotated[bytes, Field(max_length=32)] = Field(
        b"",
        description="malicious SecAgg+: SHA-256 commitment to the sender's graph nonce; beacon mode: the "
        "binding of the beacon value it uses; else empty. Covered by the signature",
    )

    @field_validator("signature")
    @classmethod
    def _signature_length(cls, value: bytes) -> bytes:
        if len(value) not in (0, 64):
            raise ValueError("signature must be empty or 64 bytes")
        return value

    @field_validator("signing_public_key")
    @classmethod
    def _signing_key_length(cls, value: bytes) -> bytes:
        if len(value) not in (0, 32):
            raise ValueError("signing_public_key must be empty or 32 bytes")
        return value

    @field_validator("graph_commitment")
    @classmethod
    def _commitment_length(cls, value: bytes) -> bytes:
        if len(value) not in (0, 32):
            raise ValueError("graph_commitment must be empty or 32 bytes")
        return value


class KeyRoster(_Base):
    """Round 0 reply: every AdvertiseKeys the server accepted (the set U1)."""

    TAG: ClassVar[int] = 2
    entries: tuple[AdvertiseKeys, ...]

    @field_validator("entries")
    @classmethod
    def _distinct(cls, value: tuple[AdvertiseKeys, ...]) -> tuple[AdvertiseKeys, ...]:
        _unique(tuple(e.sender for e in value), "entries")
        return value


class GraphReveal(_Base):
    """Round 0 reply (malicious SecAgg+): the graph nonce behind the sender's signed commitment.

    Sent only once the roster, hence every commitment of U1, is fixed, so no nonce can depend on
    another. Self-authenticating: it must hash to the commitment in the sender's AdvertiseKeys.
    """

    TAG: ClassVar[int] = 11
    sender: PartyId
    nonce: Annotated[bytes, Field(min_length=32, max_length=32)]


def _reveals(values: tuple[Envelope, ...]) -> tuple[Envelope, ...]:
    _unique_envelopes(values)
    if any(len(e.data) != 32 for e in values):
        raise ValueError("every revealed graph nonce must be 32 bytes")
    if [e.peer for e in values] != sorted(e.peer for e in values):
        raise ValueError("reveals must be sorted by party id")
    return values


class GraphSeed(_Base):
    """The toss result: every party of U1 with its revealed nonce (peer = party, data = nonce).

    Each client checks each nonce against the commitment it saw in the roster and that U1 is
    complete, then hashes them into the graph seed; the server has no say in the result.
    """

    TAG: ClassVar[int] = 12
    reveals: tuple[Envelope, ...]

    _reveals = field_validator("reveals")(_reveals)


class EncryptedShares(_Base):
    """Round 1: one AES-GCM box per neighbour holding its shares of b_sender and s_sk_sender."""

    TAG: ClassVar[int] = 3
    sender: PartyId
    boxes: tuple[Envelope, ...] = Field(description="peer = recipient")

    _boxes = field_validator("boxes")(_unique_envelopes)


class ShareBundle(_Base):
    """Round 1 reply: the boxes addressed to `recipient` (their senders form U2 in its neighbourhood)."""

    TAG: ClassVar[int] = 4
    recipient: PartyId
    boxes: tuple[Envelope, ...] = Field(description="peer = sender")

    _boxes = field_validator("boxes")(_unique_envelopes)


def _payload(value: Any) -> bytes | memoryview:
    """Bytes as they are; a bytearray or memoryview as a read-only, flat byte view of the same memory.

    A masked input is megabytes: the client builds it in one buffer and the decoder slices it out of
    the wire bytes, and neither copies it again. The view is read-only, so the frozen message stays
    frozen for every holder of the message (the buffer's owner, the session, keeps no other handle).
    """
    if isinstance(value, bytes):
        return value
    if isinstance(value, bytearray | memoryview):
        view = memoryview(value)
        if not view.c_contiguous:
            raise ValueError("data must be a contiguous buffer")
        return view.cast("B").toreadonly() if view.format != "B" or view.ndim != 1 else view.toreadonly()
    raise ValueError(f"data must be bytes, bytearray or memoryview, got {type(value).__name__}")


Payload = Annotated[
    bytes | memoryview,
    PlainValidator(_payload),
    PlainSerializer(bytes, return_type=bytes),
]
"""Bytes, or a read-only byte view of one buffer (see `_payload`); `len()` counts bytes either way."""


class MaskedInput(_Base):
    """Round 2: the masked, encoded input, little-endian words of Z_(2^ring_bits).

    `data` is bytes or a read-only byte view (the client's message buffer, or a slice of the wire
    bytes it was decoded from), compared by content; `vector()` reads it without a copy.
    """

    TAG: ClassVar[int] = 5
    sender: PartyId
    ring_bits: Annotated[int, Field(ge=16, le=64)]
    data: Payload

    @field_validator("ring_bits")
    @classmethod
    def _bits(cls, value: int) -> int:
        ring_dtype(value)
        return value

    def vector(self) -> npt.NDArray[np.unsignedinteger]:
        """A read-only view of the words (no copy)."""
        dtype = ring_dtype(self.ring_bits)
        if len(self.data) % dtype.itemsize:
            raise ValueError("data length is not a whole number of words")
        return np.frombuffer(self.data, dtype=dtype)


class Complaint(_Base):
    """Round 2, instead of MaskedInput: `sender` could not open the share boxes of `accused`.

    Signed by the sender (identity key, or its advertised session signing key in the semi-honest
    setting) over the transcript and the accused ids, so the server cannot invent one. The server
    drops the sender and every accused party; the sender never sends its masked input this session.
    """

    TAG: ClassVar[int] = 10
    sender: PartyId
    accused: tuple[PartyId, ...]
    signature: Annotated[bytes, Field(min_length=64, max_length=64)]

    @field_validator("accused")
    @classmethod
    def _accused(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if not value:
            raise ValueError("a complaint must accuse at least one party")
        if list(value) != sorted(value):
            raise ValueError("accused ids must be sorted")
        return _unique(value, "accused")


class SurvivorSet(_Base):
    """Consistency check (malicious setting): the server's claim of U3, for every client to sign."""

    TAG: ClassVar[int] = 6
    survivors: tuple[PartyId, ...]

    _survivors = field_validator("survivors")(lambda v: _unique(v, "survivors"))


class SurvivorSignature(_Base):
    """Consistency check reply: sender's Ed25519 signature over the transcript and U3."""

    TAG: ClassVar[int] = 7
    sender: PartyId
    signature: Annotated[bytes, Field(min_length=64, max_length=64)]


class UnmaskRequest(_Base):
    """Round 3: U3, and in the malicious setting the U4 signatures that every client checks on it."""

    TAG: ClassVar[int] = 8
    survivors: tuple[PartyId, ...]
    signatures: tuple[Envelope, ...] = ()

    _survivors = field_validator("survivors")(lambda v: _unique(v, "survivors"))
    _signatures = field_validator("signatures")(_unique_envelopes)


class SignedShare(BaseModel):
    """One Shamir share returned to the server, with the signature its dealer (`peer`) put on it.

    The dealer signed SHA-256(transcript, kind, dealer, holder, share) (see `_transcript`), so a
    holder cannot return anything but the share it was dealt: the server checks each one.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    peer: PartyId = Field(description="the dealer: whose secret this is a share of")
    share: Annotated[bytes, Field(min_length=SHARE_BYTES, max_length=SHARE_BYTES)]
    signature: Annotated[bytes, Field(min_length=64, max_length=64)]


def _unique_shares(values: tuple[SignedShare, ...]) -> tuple[SignedShare, ...]:
    _unique(tuple(e.peer for e in values), "shares")
    return values


class UnmaskResponse(_Base):
    """Round 3 reply: shares of b for surviving neighbours, of s_sk for dropped ones; never both."""

    TAG: ClassVar[int] = 9
    sender: PartyId
    self_mask_shares: tuple[SignedShare, ...]
    mask_key_shares: tuple[SignedShare, ...]

    _a = field_validator("self_mask_shares")(_unique_shares)
    _b = field_validator("mask_key_shares")(_unique_shares)


Message = (
    AdvertiseKeys
    | KeyRoster
    | GraphReveal
    | GraphSeed
    | EncryptedShares
    | ShareBundle
    | MaskedInput
    | Complaint
    | SurvivorSet
    | SurvivorSignature
    | UnmaskRequest
    | UnmaskResponse
)
"""Any message of the protocol."""
