"""The server's session of HE aggregation (sans-IO): it never holds a secret key, nor parses TenSEAL bytes.

Stages: collect hellos -> roster; collect key offers -> per-client keys (in public-key mode the
public key's polynomials are checked; in symmetric mode the offer must carry no key in the clear);
collect signed encrypted inputs, each checked on arrival (exact length, every coefficient below its
modulus, then the signature) -> every signed contribution, with its chunks, to the clients that
decrypt (the key holder only, with either scheme; it adds them up itself); collect acknowledgements
(the key holder's carries the decrypted integer sums, signed: exact for BFV, rounded to the exact
integers after a tolerance check for CKKS) -> result. Dropouts need no recovery: the
key holder sums what arrived, and the encrypted weight and counter fields travel with the values.
The server sends no ciphertext of its own choosing to anyone (`AggregateResult.ring_sum` holds the
released field sums).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from ..errors import AbortError, InvalidTransitionError, RemoteProtocolError
from ..primitives import ed25519_verify, x25519_check_public
from ..secagg._server import AggregateResult
from ._ciphers import check_chunks, check_public_key, decode_words
from ._client import he_transcript, hello_payload, input_digest, key_holder, parse_roster, release_payload
from ._messages import HEAck, HEHello, HEInput, HEKeyOffer, HEKeys, HEMessage, HERoster, HESum, encode_he_message
from ._params import HEParams
from ._state import dump_he_server, load_he_server

__all__ = ["HEServer", "HEServerState"]


class HEServerState(enum.Enum):
    """Where the server is in the round."""

    COLLECT_HELLOS = "collect_hellos"
    COLLECT_OFFERS = "collect_offers"
    COLLECT_INPUTS = "collect_inputs"
    COLLECT_ACKS = "collect_acks"
    DONE = "done"
    ABORTED = "aborted"
    """Terminal: a stage closed with too few parties or without the key holder; nothing was revealed."""


class HEServer:
    """The aggregator of one HE round (a `protocols.ServerSession`; `TRANSITIONS` is its table)."""

    TRANSITIONS: ClassVar[Mapping[tuple[Any, type[Any]], Any]]

    def __init__(self, params: HEParams, *, session: bytes, round_number: int, context: bytes = b"") -> None:
        self.params, self.session, self.round_number = params, session, round_number
        self.transcript = he_transcript(params, session=session, round_number=round_number, context=context)
        self.state = HEServerState.COLLECT_HELLOS
        self._hellos: dict[int, HEHello] = {}
        self._offers: dict[int, HEKeyOffer] = {}
        self._contributions: dict[int, tuple[bytes, bytes]] = {}
        self._uploads: dict[int, tuple[bytes, ...]] = {}  # serialized, for the releaser's own check
        self._acks: dict[int, HEAck] = {}
        self._result: AggregateResult | None = None
        self.holder: int | None = None
        self._log: tuple[list[HEMessage], ...] = ([], [], [], [])  # accepted messages per stage, for export_state

    @property
    def stage(self) -> HEServerState:
        """The round's stage (`ServerSession` interface; the same as `state`)."""
        return self.state

    @property
    def finished(self) -> bool:
        """True once DONE or ABORTED."""
        return self.state in (HEServerState.DONE, HEServerState.ABORTED)

    def export_state(self) -> bytes:
        """The session as bytes: the messages it accepted (hellos, offers, signed ciphertexts, acks); no secret."""
        return dump_he_server(self, _SERVER_ORDER)

    @classmethod
    def from_state(cls, data: bytes, params: HEParams, *, context: bytes = b"") -> HEServer:
        """Rebuild a session from `export_state()` by replaying its messages through every check.

        Raises:
            DecodeError: malformed blob, or one whose messages do not replay to its recorded stage.
            LocalProtocolError: another session, round, params or context.
        """
        from ._state import peek_he_identity

        _, _, session, round_number = peek_he_identity(data)
        server = cls(params, session=session, round_number=round_number, context=context)
        load_he_server(server, data, _SERVER_ORDER)
        return server

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
            self._check_hello(message)
            self._take(self._hellos, message)
        elif isinstance(message, HEKeyOffer):
            if not (len(message.recipients) == len(message.boxes) == len(message.signatures)):
                raise RemoteProtocolError(
                    "key offer lists differ in length", field="recipients", peer_id=message.sender
                )
            if message.sender in self._hellos:
                self._take(self._offers, message)
        elif isinstance(message, HEInput):
            self._on_input(message)
        elif isinstance(message, HEAck):
            if message.sender in self._contributions:
                self._take(self._acks, message)
        self._log[_SERVER_ORDER.index(self.state)].append(message)

    def close_stage(self) -> list[tuple[int, HEMessage]]:
        """End the current stage (the host's deadline passed) and return what to send to whom.

        Raises:
            AbortError: too few parties, or the key holder is gone; nothing was revealed (state ABORTED).
        """
        if self.state is HEServerState.ABORTED:
            raise InvalidTransitionError("the round was aborted")
        try:
            return self._close()
        except AbortError:
            self.state = HEServerState.ABORTED
            self._uploads.clear()
            self._log = ([], [], [], [])
            raise

    def _close(self) -> list[tuple[int, HEMessage]]:
        base: dict[str, Any] = {"session": self.session, "round": self.round_number, "sender": 0xFFFFFFFF}
        if self.state is HEServerState.COLLECT_HELLOS:
            if len(self._hellos) < self.params.min_contributions:
                raise AbortError(f"only {len(self._hellos)} hellos; min_contributions={self.params.min_contributions}")
            roster = HERoster(**base, hellos=tuple(encode_he_message(self._hellos[p]) for p in sorted(self._hellos)))
            parse_roster(self.params, self.transcript, roster)
            self.holder = key_holder(self.transcript, self._hellos)
            self.state = HEServerState.COLLECT_OFFERS
            return [(p, roster) for p in sorted(self._hellos)]
        if self.state is HEServerState.COLLECT_OFFERS:
            out = self._deliver_keys(base)
            self.state = HEServerState.COLLECT_INPUTS
            return out
        if self.state is HEServerState.COLLECT_INPUTS:
            if len(self._contributions) < self.params.min_contributions:
                raise AbortError(
                    f"only {len(self._contributions)} inputs; min_contributions={self.params.min_contributions}"
                )
            assert self.holder is not None
            if self.holder not in self._contributions:
                raise AbortError(f"the key holder {self.holder} sent no input; only it may decrypt the sum")
            senders = tuple(sorted(self._contributions))
            total = HESum(
                **base,
                contributors=senders,
                digests=tuple(self._contributions[p][0] for p in senders),
                signatures=tuple(self._contributions[p][1] for p in senders),
                inputs=tuple(c for p in senders for c in self._uploads[p]),
            )
            self._uploads.clear()
            self.state = HEServerState.COLLECT_ACKS
            return [(self.holder, total)]
        if self.state is HEServerState.COLLECT_ACKS:
            self._finish()
            self.state = HEServerState.DONE
            return []
        raise InvalidTransitionError("the round is over")

    def _deliver_keys(self, base: dict[str, Any]) -> list[tuple[int, HEMessage]]:
        """The key holder's offer, checked, split into one HEKeys per client it addressed."""
        assert self.holder is not None
        offer = self._offers.get(self.holder)
        if offer is None:
            raise AbortError(f"the key holder {self.holder} sent no keys")
        if self.params.mode == "public-key":
            check_public_key(self.params, offer.public_key, peer_id=self.holder)
        elif offer.public_key:
            raise AbortError(f"the key holder {self.holder} sent key material in the clear in symmetric mode")
        boxes = {r: (b, s) for r, b, s in zip(offer.recipients, offer.boxes, offer.signatures, strict=True)}
        out: list[tuple[int, HEMessage]] = []
        for party in sorted(self._offers):
            box, signature = boxes.get(party, (b"", b""))
            if party != self.holder and not signature:
                continue
            out.append(
                (party, HEKeys(**base, holder=self.holder, public_key=offer.public_key, box=box, signature=signature))
            )
        return out

    def result(self) -> AggregateResult:
        """The decoded sum (exact integers, either scheme) over the listed contributors.

        Raises:
            InvalidTransitionError: before the round ended.
        """
        if self._result is None:
            raise InvalidTransitionError("no decrypted aggregate: the round has not ended")
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
        check_chunks(self.params, message.chunks, field="chunks", peer_id=sender)  # exact sizes, coefficients < q
        digest = input_digest(self.transcript, sender, message.chunks)
        ed25519_verify(self._hellos[sender].sign_public, message.signature, digest, peer_id=sender)
        self._contributions[sender] = (digest, message.signature)
        self._uploads[sender] = message.chunks

    def _check_hello(self, hello: HEHello) -> None:
        x25519_check_public(hello.dh_public, peer_id=hello.sender)
        if self.params.identity_keys is not None:
            payload = hello_payload(self.transcript, hello.sender, hello.dh_public, hello.sign_public)
            ed25519_verify(
                self.params.identity_keys[hello.sender], hello.identity_signature, payload, peer_id=hello.sender
            )

    def _finish(self) -> None:
        contributors = self.contributors
        ack = self._acks.get(self.holder) if self.holder is not None else None
        if ack is None or not ack.plaintext:
            raise AbortError("the key holder did not release the decrypted sum")
        payload = release_payload(self.transcript, contributors, ack.plaintext)
        ed25519_verify(self._hellos[ack.sender].sign_public, ack.signature, payload, peer_id=ack.sender)
        if len(ack.plaintext) != 4 * self.params.words:
            raise RemoteProtocolError(
                f"the released sum has {len(ack.plaintext)} bytes; expected {4 * self.params.words}",
                field="plaintext",
                peer_id=ack.sender,
            )
        words = np.frombuffer(ack.plaintext, dtype="<u4").astype(np.int64)
        decoded = decode_words(self.params, words)
        if decoded.num_inputs != len(contributors):
            raise RemoteProtocolError(
                "the released sum counts a different number of inputs", field="plaintext", peer_id=ack.sender
            )
        dropped = tuple(p for p in sorted(self._hellos) if p not in self._contributions)
        self._result = AggregateResult(
            decoded=decoded,
            ring_sum=words,
            included=contributors,
            dropped=dropped,
            insecure=False,
            complaints=(),
            misbehaving=(),
        )


_SERVER_ORDER: tuple[HEServerState, ...] = tuple(HEServerState)

HEServer.TRANSITIONS = {
    (HEServerState.COLLECT_HELLOS, HEHello): HEServerState.COLLECT_HELLOS,
    (HEServerState.COLLECT_OFFERS, HEKeyOffer): HEServerState.COLLECT_OFFERS,
    (HEServerState.COLLECT_INPUTS, HEInput): HEServerState.COLLECT_INPUTS,
    (HEServerState.COLLECT_ACKS, HEAck): HEServerState.COLLECT_ACKS,
}
