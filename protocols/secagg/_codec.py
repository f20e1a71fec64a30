"""Versioned binary codec for the SecAgg messages: bytes in, typed message out, nothing pickled.

Layout: `version (u8) | tag (u8) | fields`, fields in declaration order, all integers little-endian:

    u32 / u64      fixed-width unsigned integers (party ids, ring bits / session round)
    b16, b32       fixed-length byte strings (session id, public keys)
    bytes          u32 length, then the bytes
    payload        as bytes; decoded as a read-only view into the message (MaskedInput.data, no copy)
    ids            u32 count, then count u32 party ids
    envelopes      u32 count, then per item: u32 peer, u32 length, bytes
    shares         u32 count, then per item: u32 dealer, 33-byte share, 64-byte dealer signature
    entries        u32 count, then per item: u32 length, an AdvertiseKeys body (no version/tag)

Every length and count is checked against the bytes that remain (and against MAX_PARTIES) before
anything is allocated, so a hostile length field cannot make the decoder reserve memory. Any
failure, including a value the message model rejects, is a `DecodeError` and nothing else.
"""

from __future__ import annotations

import struct
from typing import Any

from pydantic import ValidationError

from ..errors import DecodeError
from ..primitives.shamir import SHARE_BYTES
from ._messages import (
    MAX_PARTIES,
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

__all__ = ["WIRE_VERSION", "decode_message", "encode_message"]

WIRE_VERSION = 2
DEFAULT_MAX_MESSAGE_BYTES = 1 << 30

_HEADER = (("session", "b16"), ("round", "u64"))
_LAYOUT: dict[type[Any], tuple[tuple[str, str], ...]] = {
    AdvertiseKeys: (
        *_HEADER,
        ("sender", "u32"),
        ("transcript", "b32"),
        ("share_public_key", "b32"),
        ("mask_public_key", "b32"),
        ("signature", "bytes"),
        ("signing_public_key", "bytes"),
        ("graph_commitment", "bytes"),
    ),
    KeyRoster: (*_HEADER, ("entries", "entries")),
    GraphReveal: (*_HEADER, ("sender", "u32"), ("nonce", "b32")),
    GraphSeed: (*_HEADER, ("reveals", "envelopes")),
    EncryptedShares: (*_HEADER, ("sender", "u32"), ("boxes", "envelopes")),
    ShareBundle: (*_HEADER, ("recipient", "u32"), ("boxes", "envelopes")),
    MaskedInput: (*_HEADER, ("sender", "u32"), ("ring_bits", "u32"), ("data", "payload")),
    Complaint: (*_HEADER, ("sender", "u32"), ("accused", "ids"), ("signature", "bytes")),
    SurvivorSet: (*_HEADER, ("survivors", "ids")),
    SurvivorSignature: (*_HEADER, ("sender", "u32"), ("signature", "bytes")),
    UnmaskRequest: (*_HEADER, ("survivors", "ids"), ("signatures", "envelopes")),
    UnmaskResponse: (
        *_HEADER,
        ("sender", "u32"),
        ("self_mask_shares", "shares"),
        ("mask_key_shares", "shares"),
    ),
}
_BY_TAG: dict[int, type[Any]] = {cls.TAG: cls for cls in _LAYOUT}
_SIGNED_SHARE = struct.Struct(f"<I{SHARE_BYTES}s64s")


def _encode_fields(message: Any, out: list[bytes]) -> None:
    for name, kind in _LAYOUT[type(message)]:
        value = getattr(message, name)
        if kind in ("b16", "b32"):
            out.append(value)
        elif kind == "u32":
            out.append(struct.pack("<I", value))
        elif kind == "u64":
            out.append(struct.pack("<Q", value))
        elif kind in ("bytes", "payload"):
            out.append(struct.pack("<I", len(value)))
            out.append(value)  # a buffer as it is: the join below is its only copy
        elif kind == "ids":
            out.append(struct.pack(f"<I{len(value)}I", len(value), *value))
        elif kind == "envelopes":
            out.append(struct.pack("<I", len(value)))
            for env in value:
                out.append(struct.pack("<II", env.peer, len(env.data)))
                out.append(env.data)
        elif kind == "shares":
            out.append(struct.pack("<I", len(value)))
            for item in value:
                out.append(_SIGNED_SHARE.pack(item.peer, item.share, item.signature))
        else:  # entries
            out.append(struct.pack("<I", len(value)))
            for entry in value:
                body: list[bytes] = []
                _encode_fields(entry, body)
                blob = b"".join(body)
                out.append(struct.pack("<I", len(blob)))
                out.append(blob)


def encode_message(message: Message) -> bytes:
    """Serialize a message to bytes."""
    if type(message) not in _LAYOUT:
        raise TypeError(f"not a SecAgg message: {type(message).__name__}")
    out = [bytes((WIRE_VERSION, message.TAG))]
    _encode_fields(message, out)
    return b"".join(out)


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = memoryview(data)
        self.pos = 0

    def view(self, n: int, field: str) -> memoryview:
        """The next `n` bytes as a view into the message (read-only when the message is bytes)."""
        if n < 0 or self.pos + n > len(self.data):
            raise DecodeError(f"truncated message: field {field!r} needs {n} bytes", field=field)
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def take(self, n: int, field: str) -> bytes:
        return bytes(self.view(n, field))

    def u32(self, field: str) -> int:
        value: int = struct.unpack("<I", self.take(4, field))[0]
        return value

    def count(self, field: str, min_item_bytes: int) -> int:
        n = self.u32(field)
        if n > MAX_PARTIES or n * min_item_bytes > len(self.data) - self.pos:
            raise DecodeError(f"field {field!r} declares {n} items, more than the message holds", field=field)
        return n


def _decode_list(kind: str, name: str, reader: _Reader) -> tuple[Any, ...]:
    """The variable-length kinds: ids, envelopes, signed shares and roster entries."""
    if kind == "ids":
        n = reader.count(name, 4)
        ids: tuple[int, ...] = struct.unpack(f"<{n}I", reader.take(4 * n, name))
        return ids
    if kind == "envelopes":
        n = reader.count(name, 8)
        items = []
        for _ in range(n):
            peer = reader.u32(name)
            items.append(Envelope(peer=peer, data=reader.take(reader.u32(name), name)))
        return tuple(items)
    if kind == "shares":
        n = reader.count(name, _SIGNED_SHARE.size)
        return tuple(
            SignedShare(peer=peer, share=share, signature=signature)
            for peer, share, signature in _SIGNED_SHARE.iter_unpack(reader.take(n * _SIGNED_SHARE.size, name))
        )
    n = reader.count(name, 4)  # entries
    entries = []
    for _ in range(n):
        sub = _Reader(reader.take(reader.u32(name), name))
        entries.append(_decode_fields(AdvertiseKeys, sub))
        if sub.pos != len(sub.data):
            raise DecodeError(f"trailing bytes in an item of {name!r}", field=name)
    return tuple(entries)


def _decode_fields(cls: type[Any], reader: _Reader) -> Any:
    values: dict[str, Any] = {}
    for name, kind in _LAYOUT[cls]:
        if kind == "b16":
            values[name] = reader.take(16, name)
        elif kind == "b32":
            values[name] = reader.take(32, name)
        elif kind == "u32":
            values[name] = reader.u32(name)
        elif kind == "u64":
            values[name] = struct.unpack("<Q", reader.take(8, name))[0]
        elif kind == "bytes":
            values[name] = reader.take(reader.u32(name), name)
        elif kind == "payload":
            values[name] = reader.view(reader.u32(name), name)
        else:
            values[name] = _decode_list(kind, name, reader)
    return cls(**values)


def decode_message(data: bytes, *, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> Message:
    """Parse bytes produced by `encode_message`.

    Args:
        data: the encoded message.
        max_bytes: refuse anything longer (the host's bound on one message).

    Raises:
        DecodeError: for any malformed, truncated, oversized or invalid input.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise DecodeError(f"expected bytes, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise DecodeError(f"message of {len(data)} bytes exceeds max_bytes={max_bytes}")
    if len(data) < 2:
        raise DecodeError("message shorter than its 2-byte header")
    if data[0] != WIRE_VERSION:
        raise DecodeError(f"unsupported wire version {data[0]} (this implementation speaks {WIRE_VERSION})")
    cls = _BY_TAG.get(data[1])
    if cls is None:
        raise DecodeError(f"unknown message tag {data[1]}")
    reader = _Reader(bytes(data))  # bytes stay as they are (views into them are read-only); others are copied
    reader.pos = 2
    try:
        message = _decode_fields(cls, reader)
    except ValidationError as exc:
        raise DecodeError(f"invalid {cls.__name__}: {exc.errors()[0]['msg']}") from None
    except DecodeError:
        raise
    except (ValueError, TypeError, struct.error) as exc:  # defensive: nothing else may escape
        raise DecodeError(f"invalid {cls.__name__}: {exc}") from None
    if reader.pos != len(reader.data):
        raise DecodeError(f"{len(reader.data) - reader.pos} trailing bytes after {cls.__name__}")
    result: Message = message
    return result
