"""HE aggregation messages and their bounded binary codec.

Wire format: b"HEAG", version 1, a type byte, then the fields in declaration order: u32 integers,
fixed-length byte strings, u32-length-prefixed byte strings and u32-counted lists of them. Every
length and count is checked against a bound before anything is allocated or parsed (a TenSEAL
ciphertext with a flipped bit usually parses and decrypts silently to a wrong value, so uploads are
also signed; see `_client.py`). Nothing is pickled.
"""

from __future__ import annotations

import struct
from typing import Annotated, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from ..errors import DecodeError

__all__ = [
    "MAX_BLOB",
    "HEAck",
    "HEHello",
    "HEInput",
    "HEKeyOffer",
    "HEKeys",
    "HEMessage",
    "HERoster",
    "HESum",
    "decode_he_message",
    "encode_he_message",
]

MAGIC = b"HEAG"
VERSION = 1
MAX_BLOB = 1 << 26
"""Largest single byte string (64 MiB): a key is < 300 kB, a ciphertext chunk < 300 kB (exact sizes are
checked against the parameters before any parsing)."""
MAX_ITEMS = 1 << 16

Session = Annotated[bytes, Field(min_length=16, max_length=16)]
Key32 = Annotated[bytes, Field(min_length=32, max_length=32)]
Signature = Annotated[bytes, Field(min_length=64, max_length=64)]


class HEMessage(BaseModel):
    """Common header: session, round, sender (the server is 0xFFFFFFFF)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    TYPE: ClassVar[int]
    FIELDS: ClassVar[tuple[tuple[str, str], ...]]

    session: Session
    round: Annotated[int, Field(ge=0, lt=1 << 32)]
    sender: Annotated[int, Field(ge=0, lt=1 << 32)]


class HEHello(HEMessage):
    """Stage 0: a client's X25519 key (for key delivery), its session signing key, and an identity signature."""

    TYPE = 1
    FIELDS = (("dh_public", "k32"), ("sign_public", "k32"), ("identity_signature", "blob"))
    dh_public: Key32
    sign_public: Key32
    identity_signature: bytes = b""


class HERoster(HEMessage):
    """Server -> clients: every hello it accepted (encoded), so all agree on keys and the key holder."""

    TYPE = 2
    FIELDS = (("hellos", "blobs"),)
    hellos: tuple[bytes, ...]


class HEKeyOffer(HEMessage):
    """Stage 1: the key holder's per-recipient sealed secret keys (symmetric) or public key (others: empty).

    Keys travel as bare polynomials (`_wire.py`), never as a TenSEAL context.
    """

    TYPE = 3
    FIELDS = (("public_key", "blob"), ("recipients", "ints"), ("boxes", "blobs"), ("signatures", "blobs"))
    public_key: bytes = b""
    recipients: tuple[int, ...] = ()
    boxes: tuple[bytes, ...] = ()
    signatures: tuple[bytes, ...] = ()


class HEKeys(HEMessage):
    """Server -> one client: the public key (public-key mode), that client's sealed box and the holder's signature."""

    TYPE = 4
    FIELDS = (("holder", "u32"), ("public_key", "blob"), ("box", "blob"), ("signature", "blob"))
    holder: int
    public_key: bytes
    box: bytes
    signature: bytes


class HEInput(HEMessage):
    """Stage 2: a client's encrypted update, chunk by chunk, signed with its session key."""

    TYPE = 5
    FIELDS = (("chunks", "blobs"), ("signature", "sig"))
    chunks: tuple[bytes, ...]
    signature: Signature


class HESum(HEMessage):
    """Server -> each client that will decrypt: every signed contribution, with its chunks.

    There is no "sum" field: a client decrypts only the homomorphic sum it computes itself from the
    contributions whose signatures it checked (a server-chosen ciphertext is a decryption oracle).
    """

    TYPE = 6
    FIELDS = (("contributors", "ints"), ("digests", "blobs"), ("signatures", "blobs"), ("inputs", "blobs"))
    contributors: tuple[int, ...]
    digests: tuple[bytes, ...]
    signatures: tuple[bytes, ...]
    inputs: tuple[bytes, ...]
    """Every contributor's chunks, in contributor order."""


class HEAck(HEMessage):
    """Stage 3: a client checked and decrypted the aggregate.

    The releasing client (BFV) includes the decrypted field sums (little-endian uint32: each is at most
    max_parties * 2L < 2^32): the exact integer sum, which the server is meant to learn.
    """

    TYPE = 7
    FIELDS = (("count", "u32"), ("plaintext", "blob"), ("signature", "blob"))
    count: int
    plaintext: bytes = b""
    signature: bytes = b""


_TYPES: dict[int, type[HEMessage]] = {
    cls.TYPE: cls for cls in (HEHello, HERoster, HEKeyOffer, HEKeys, HEInput, HESum, HEAck)
}


def _blob(out: list[bytes], value: bytes) -> None:
    out.append(struct.pack("<I", len(value)))
    out.append(value)


def encode_he_message(message: HEMessage) -> bytes:
    """Serialize to versioned bytes."""
    out = [MAGIC, bytes([VERSION, message.TYPE]), message.session, struct.pack("<II", message.round, message.sender)]
    for name, kind in message.FIELDS:
        value = getattr(message, name)
        if kind in ("k32", "sig"):
            out.append(value)
        elif kind == "u32":
            out.append(struct.pack("<I", value))
        elif kind == "blob":
            _blob(out, value)
        elif kind == "blobs":
            out.append(struct.pack("<I", len(value)))
            for item in value:
                _blob(out, item)
        else:  # ints
            out.append(struct.pack(f"<I{len(value)}I", len(value), *value))
    return b"".join(out)


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = memoryview(data), 0

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise DecodeError(f"HE message truncated in {what}")
        chunk = bytes(self.data[self.pos : self.pos + n])
        self.pos += n
        return chunk

    def u32(self, what: str) -> int:
        value: int = struct.unpack("<I", self.take(4, what))[0]
        return value

    def blob(self, what: str, limit: int) -> bytes:
        n = self.u32(what)
        if n > limit:
            raise DecodeError(f"HE message field {what} has {n} bytes, over the bound {limit}")
        return self.take(n, what)

    def count(self, what: str) -> int:
        n = self.u32(what)
        if n > MAX_ITEMS:
            raise DecodeError(f"HE message field {what} has {n} items, over the bound {MAX_ITEMS}")
        return n


def decode_he_message(data: bytes, *, max_blob: int = MAX_BLOB) -> HEMessage:
    """Parse bytes from `encode_he_message`; anything malformed raises `DecodeError` only."""
    if len(data) < 18 or data[:4] != MAGIC:
        raise DecodeError("not an HE aggregation message")
    if data[4] != VERSION:
        raise DecodeError(f"HE message version {data[4]} is not supported (expected {VERSION})")
    cls = _TYPES.get(data[5])
    if cls is None:
        raise DecodeError(f"unknown HE message type {data[5]}")
    reader = _Reader(data)
    reader.pos = 6
    fields: dict[str, Any] = {"session": reader.take(16, "session")}
    fields["round"], fields["sender"] = reader.u32("round"), reader.u32("sender")
    for name, kind in cls.FIELDS:
        if kind == "k32":
            fields[name] = reader.take(32, name)
        elif kind == "sig":
            fields[name] = reader.take(64, name)
        elif kind == "u32":
            fields[name] = reader.u32(name)
        elif kind == "blob":
            fields[name] = reader.blob(name, max_blob)
        elif kind == "blobs":
            fields[name] = tuple(reader.blob(name, max_blob) for _ in range(reader.count(name)))
        else:
            fields[name] = tuple(reader.u32(name) for _ in range(reader.count(name)))
    if reader.pos != len(data):
        raise DecodeError(f"HE message has {len(data) - reader.pos} trailing bytes")
    try:
        return cls(**fields)
    except ValueError as exc:
        raise DecodeError(f"HE message fields are invalid: {exc}") from None
