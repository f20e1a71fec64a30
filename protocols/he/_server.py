"""The server's session of HE aggregation (sans-IO): it never holds a secret key.

Stages: collect hellos -> roster; collect key offers -> per-client keys (the public context is
loaded and refused if it holds a secret key); collect signed encrypted inputs, summing them chunk
by chunk as they arrive -> the sum with its contributions; collect acknowledgements (one of them,
for BFV, carries the decrypted integer sums) -> result. Dropouts need no recovery: the server sums
what arrived, and the encrypted weight and counter fields travel with the values.
"""

from __future__ import annotations

import enum
from typing import Any

import numpy as np

from ..errors import AbortError, InvalidTransitionError, RemoteProtocolError
from ..primitives import ed25519_verify
from ..secagg._server import AggregateResult
from ._ciphers import ChunkSum, decode_words, load_public_context
from ._client import he_transcript, holder_rank, input_digest, parse_roster
from ._messages import HEAck, HEHello, HEInput, HEKeyOffer, HEKeys, HEMessage, HERoster, HESum, encode_he_message
from ._params import HEParams

__all__ = ["HEServer", "HEServerState"]


class HEServerState(enum.Enum):
    """Where the server is in the round."""

    COLLECT_HELLOS = "collect_hellos"
    COLLECT_OFFERS = "collect_offers"
    COLLECT_INPUTS = "collect_inputs"
    COLLECT_ACKS = "collect_acks"
    DONE = "done"


class HEServer:
    """The aggregator of one HE round."""

    def __init__(self, params: HEParams, *, session: bytes, round_number: int, context: bytes = b"") -> None:
        self.params, self.session, self.round_number = params, session, round_number
        self.transcript = he_transcript(params, session=session, round_number=round_number, context=context)
        self.state = HEServerState.COLLECT_HELLOS
        self._hellos: dict[int, HEHello] = {}
        self._offers: dict[int, HEKeyOffer] = {}
        self._sum: ChunkSum | None = None
        self._contributions: dict[int, tuple[bytes, bytes]] = {}
        self._acks: dict[int, HEAck] = {}
        self._result: AggregateResult | None = None
        self.holder: int | None = None

    def receive(self, message: HEMessage) -> None:
        """Take one message from a client; a bad one raises and changes nothing."""
        if message.session != self.session or message.round != self.round_number:
            raise RemoteProtocolError(
                "message is for another session or round", field="session", peer_id=message.sender
            )
        expected: dict[HEServerState, type[HEMessage]] = {
            HEServerState.COLLECT_HELLOS: HEHello,
            HEServerState.COLLECT_OFFERS: HEKeyOffer,
            HEServerState.COLLECT_INPUTS: HEInput,
            HEServerState.COLLECT_ACKS: HEAck,
        }
        if self.state not in expected or not isinstance(message, expected[self.state]):
            raise InvalidTransitionError(f"{type(message).__name__} is not expected in {self.state.value}")
        if message.sender >= self.params.num_parties:
            raise RemoteProtocolError(
                f"sender {message.sender} is not enrolled", field="sender", peer_id=message.sender
            )
        if isinstance(message, HEHello):
            self._take(self._hellos, message)
        elif isinstance(message, HEKeyOffer):
            if message.sender in self._hellos:
                self._take(self._offers, message)
        elif isinstance(message, HEInput):
            self._on_input(message)
        elif isinstance(message, HEAck):
            if message.sender in self._contributions:
                self._take(self._acks, message)

    def close_stage(self) -> list[tuple[int, HEMessage]]:
        """End the current stage (the host's deadline passed) and return what to send to whom.

        Raises:
            AbortError: too few parties, or the key holder is gone; nothing was revealed.
        """
        base: dict[str, Any] = {"session": self.session, "round": self.round_number, "sender": 0xFFFFFFFF}
        if self.state is HEServerState.COLLECT_HELLOS:
            if len(self._hellos) < self.params.min_contributions:
                raise AbortError(f"only {len(self._hellos)} hellos; min_contributions={self.params.min_contributions}")
            roster = HERoster(**base, hellos=tuple(encode_he_message(self._hellos[p]) for p in sorted(self._hellos)))
            parse_roster(self.params, self.transcript, roster)
            self.holder = min(self._hellos, key=lambda p: holder_rank(self.transcript, p))
            self.state = HEServerState.COLLECT_OFFERS
            return [(p, roster) for p in sorted(self._hellos)]
        if self.state is HEServerState.COLLECT_OFFERS:
            assert self.holder is not None
            offer = self._offers.get(self.holder)
            if offer is None:
                raise AbortError(f"the key holder {self.holder} sent no keys")
            public = load_public_context(offer.public_context)
            self._sum = ChunkSum(self.params, public)
            boxes = {r: (b, s) for r, b, s in zip(offer.recipients, offer.boxes, offer.signatures, strict=True)}
            out: list[tuple[int, HEMessage]] = []
            for party in sorted(self._offers):
                box, signature = boxes.get(party, (b"", b""))
                if party != self.holder and not signature:
                    continue
                keys = HEKeys(
                    **base, holder=self.holder, public_context=offer.public_context, box=box, signature=signature
                )
                out.append((party, keys))
            self.state = HEServerState.COLLECT_INPUTS
            return out
        if self.state is HEServerState.COLLECT_INPUTS:
            if len(self._contributions) < self.params.min_contributions:
                raise AbortError(
                    f"only {len(self._contributions)} inputs; min_contributions={self.params.min_contributions}"
                )
            assert self._sum is not None
            senders = tuple(sorted(self._contributions))
            total = HESum(
                **base,
                chunks=tuple(self._sum.serialize()),
                contributors=senders,
                digests=tuple(self._contributions[p][0] for p in senders),
                signatures=tuple(self._contributions[p][1] for p in senders),
            )
            self.state = HEServerState.COLLECT_ACKS
            return [(p, total) for p in senders]
        if self.state is HEServerState.COLLECT_ACKS:
            self._finish()
            self.state = HEServerState.DONE
            return []
        raise InvalidTransitionError("the round is over")

    def result(self) -> AggregateResult:
        """The decoded BFV sum (exact integers) over the listed contributors.

        Raises:
            InvalidTransitionError: before the round ended, or for CKKS (never decrypted for the server).
        """
        if self._result is None:
            raise InvalidTransitionError("no decrypted aggregate: the round has not ended, or it is CKKS")
        return self._result

    @property
    def contributors(self) -> tuple[int, ...]:
        """Parties whose inputs are in the sum."""
        return tuple(sorted(self._contributions))

    def _take(self, store: dict[int, Any], message: HEMessage) -> None:
        if message.sender in store:
            raise RemoteProtocolError("duplicate message", field="sender", peer_id=message.sender)
        store[message.sender] = message

    def _on_input(self, message: HEInput) -> None:
        sender = message.sender
        if sender not in self._hellos or sender in self._contributions:
            raise RemoteProtocolError("input from a party outside the roster, or twice", field="sender", peer_id=sender)
        if len(message.chunks) != self.params.chunks:
            raise RemoteProtocolError(
                f"input has {len(message.chunks)} chunks; expected {self.params.chunks}", field="chunks", peer_id=sender
            )
        if any(len(c) > self.params.max_chunk_bytes for c in message.chunks):
            raise RemoteProtocolError("a ciphertext chunk exceeds its size bound", field="chunks", peer_id=sender)
        digest = input_digest(self.transcript, sender, message.chunks)
        ed25519_verify(self._hellos[sender].sign_public, message.signature, digest, peer_id=sender)
        assert self._sum is not None
        self._sum.add(message.chunks, sender=sender)
        self._contributions[sender] = (digest, message.signature)

    def _finish(self) -> None:
        if self.params.scheme != "bfv":
            return
        contributors = self.contributors
        released = [a for a in self._acks.values() if a.plaintext]
        if not released:
            raise AbortError("no contributor released the decrypted sum")
        words = np.frombuffer(released[0].plaintext, dtype="<i8").astype(np.int64)
        decoded = decode_words(self.params, words)
        if decoded.num_inputs != len(contributors):
            raise RemoteProtocolError(
                "the released sum counts a different number of inputs", field="plaintext", peer_id=released[0].sender
            )
        dropped = tuple(p for p in sorted(self._hellos) if p not in self._contributions)
        self._result = AggregateResult(
            decoded=decoded, ring_sum=words, included=contributors, dropped=dropped, insecure=False
        )
