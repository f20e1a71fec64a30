"""One interface for every aggregation protocol: client and server sessions, and their families.

A host (the in-process driver, a Flower Mod, a gRPC service) should not care whether it runs SecAgg,
SecAgg+, HE or the plaintext control: it builds sessions from a `SessionFamily`, feeds each client
the server's messages, feeds the server the clients' replies, closes stages on its own deadlines
and, when it keeps no objects between messages, persists `export_state()` and rebuilds the session
with `SessionFamily.restore_client` / `restore_server`. This module holds only the typing Protocols
and the protocol-neutral names of the steps a client sends; the families live in their packages
(`protocols.secagg`, `protocols.he`, `protocols.plaintext`).

Every session follows the h11 model: its `stage` is a member of its own `Stage` enum, the class
attribute `TRANSITIONS` maps (stage, message type) to the next stage, and anything outside the table
is refused with a typed error (`RemoteProtocolError` naming the field "stage", or
`InvalidTransitionError`) that leaves the session unchanged (HE once a key is loaded: aborted, see
`protocols.he`).

Exported state is SECRET: a client blob holds its X25519 and Ed25519 session keys, self-mask seeds,
Shamir shares or the HE secret key. It belongs in the site's own state folder, never with the server.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from .errors import LocalProtocolError

if TYPE_CHECKING:
    from .randomness import SecretSource
    from .secagg import AggregateResult

__all__ = ["LEGACY_STEP_NUMBERS", "ClientSession", "RoundStep", "ServerSession", "SessionFamily", "as_round_step"]


class RoundStep(enum.Enum):
    """The messages a client sends, in protocol order; a dropout goes silent from one of them on.

    Not every family sends every step: HE has no REVEAL nor CONFIRM, plaintext sends only INPUT.
    """

    ADVERTISE = "advertise"
    """Session keys (SecAgg `AdvertiseKeys`, HE `HEHello`)."""
    REVEAL = "reveal"
    """The graph-toss nonce (malicious SecAgg+ only, `GraphReveal`)."""
    SHARE = "share"
    """Key material for peers (SecAgg `EncryptedShares`, HE `HEKeyOffer`)."""
    INPUT = "input"
    """The protected input (`MaskedInput` or its `Complaint`, `HEInput`; plaintext: the input itself)."""
    CONFIRM = "confirm"
    """The survivor-set signature (malicious setting only, `SurvivorSignature`)."""
    UNMASK = "unmask"
    """The unmasking or decryption answer (`UnmaskResponse`, `HEAck`)."""

    @property
    def rank(self) -> int:
        """Position in protocol order."""
        return _ORDER.index(self)


_ORDER: tuple[RoundStep, ...] = tuple(RoundStep)

LEGACY_STEP_NUMBERS: Mapping[int, RoundStep] = {
    0: RoundStep.ADVERTISE,
    5: RoundStep.REVEAL,
    1: RoundStep.SHARE,
    2: RoundStep.INPUT,
    3: RoundStep.CONFIRM,
    4: RoundStep.UNMASK,
}
"""The integer labels older callers pass as `drop_at` values (kept so their configs still mean the same)."""


def as_round_step(value: RoundStep | str | int) -> RoundStep:
    """A `RoundStep` from a member, its name or value ("input", "INPUT"), or a legacy integer label.

    Raises:
        LocalProtocolError: the value names no step.
    """
    if isinstance(value, RoundStep):
        return value
    if isinstance(value, bool):
        raise LocalProtocolError(f"drop stage {value!r} is not a RoundStep; use one of {[s.name for s in RoundStep]}")
    if isinstance(value, int):
        if value in LEGACY_STEP_NUMBERS:
            return LEGACY_STEP_NUMBERS[value]
    elif isinstance(value, str):
        for step in RoundStep:
            if value in (step.name, step.value):
                return step
    raise LocalProtocolError(f"drop stage {value!r} is not a RoundStep; use one of {[s.name for s in RoundStep]}")


@runtime_checkable
class ClientSession(Protocol):
    """One client's state machine for one round (single use)."""

    TRANSITIONS: ClassVar[Mapping[tuple[Any, type[Any]], Any]]
    """(stage, incoming message type) -> the stage it leads to; anything else is refused."""

    @property
    def party_id(self) -> int:
        """This client's id in 0..n-1."""
        ...

    @property
    def stage(self) -> enum.Enum:
        """Where the session is: a member of the family's own client `Stage` enum."""
        ...

    @property
    def finished(self) -> bool:
        """True in a terminal stage (done, aborted, closed): nothing more is accepted."""
        ...

    def set_input(
        self,
        x: npt.NDArray[np.floating] | npt.NDArray[np.integer],
        *,
        weight: float = 1.0,
        rounding_seed: bytes | None = None,
    ) -> None:
        """The update to contribute (before the step that consumes it).

        A float vector is clipped, scaled and rounded into the ring. An integer vector holds ring
        elements the client produced itself (distributed DP: its quantized update plus its share of
        integer noise); the masking families (SecAgg, SecAgg+, plaintext) take it unclipped, mod
        2^b, and HE refuses it (`LocalProtocolError`), since HE encodes its own plaintexts.

        SecAgg and SecAgg+ keep a reference to `x` and encode it only when they mask it (no defensive
        copy of a multi-megabyte update): the caller must not modify `x` until the input step's
        message has been produced.
        """
        ...

    def start(self) -> Any:
        """The first message this client sends."""
        ...

    def handle(self, message: Any) -> Any:
        """Consume one server message and return the reply; a refused one raises a `ProtocolError`."""
        ...

    def export_state(self, *, include_input: bool = True) -> bytes:
        """The whole session as bytes: SECRET (keys, seeds, shares or the HE secret key).

        With `include_input=False` a family may leave a pending input (set, not yet consumed) out of
        the blob, recording only what identifies it, for a host that stores the update itself and
        passes it back as `SessionFamily.restore_client(..., input=x)`. SecAgg and SecAgg+ do so; HE
        and plaintext always keep their input in the blob (the flag is accepted and has no effect).
        """
        ...


@runtime_checkable
class ServerSession(Protocol):
    """The aggregator's state machine for one round (single use)."""

    TRANSITIONS: ClassVar[Mapping[tuple[Any, type[Any]], Any]]
    """(stage, accepted message type) -> the stage it stays in (messages are collected until `close_stage`)."""

    @property
    def stage(self) -> enum.Enum:
        """Where the round is: a member of the family's own server `Stage` enum."""
        ...

    @property
    def finished(self) -> bool:
        """True once the round is over (done or aborted)."""
        ...

    def receive(self, message: Any) -> None:
        """Take one client message of the current stage; a refused one raises and changes nothing."""
        ...

    def close_stage(self) -> Sequence[tuple[int, Any]]:
        """End the current stage (deadline or everyone answered): (recipient, message) pairs to deliver.

        Raises:
            AbortError: too few parties remain; nothing is revealed.
        """
        ...

    def result(self) -> AggregateResult:
        """What the server learns, once the round is over."""
        ...

    def export_state(self) -> bytes:
        """The session as bytes (confidential like the server's memory; no client secret in the clear)."""
        ...


class SessionFamily(Protocol):
    """Builds, restores and (de)serializes the sessions of one protocol with fixed public parameters."""

    name: str
    """Short protocol name ("secagg", "secagg+", "he-bfv", "plaintext", ...)."""

    @property
    def num_parties(self) -> int:
        """N."""
        ...

    @property
    def reveals_to_client(self) -> bool:
        """Whether the aggregate is decrypted by clients only and never released to the server.

        None of this package's families: HE-CKKS releases its exact integer sum since issue 13.
        """
        ...

    def client(
        self,
        party_id: int,
        *,
        session: bytes,
        round_number: int,
        context: bytes = b"",
        identity_key: bytes | None = None,
        rng: SecretSource | None = None,
    ) -> ClientSession:
        """A fresh client session."""
        ...

    def server(self, *, session: bytes, round_number: int, context: bytes = b"") -> ServerSession:
        """A fresh server session."""
        ...

    def restore_client(
        self,
        blob: bytes,
        *,
        context: bytes = b"",
        identity_key: bytes | None = None,
        rng: SecretSource | None = None,
        min_stage: enum.Enum | None = None,
        input: npt.NDArray[np.floating] | npt.NDArray[np.integer] | None = None,
    ) -> ClientSession:
        """A client rebuilt from `export_state()`; refuses a blob older than `min_stage`.

        `input` is the pending update of a blob exported with `include_input=False` (the same array
        that was set); families whose blobs always hold their input ignore it.

        Raises:
            DecodeError: the blob is malformed, truncated or inconsistent with its stage.
            LocalProtocolError: it belongs to other parameters, another context or key, or is older than
                min_stage; or `input` is missing where the blob left it out, or does not match it.
        """
        ...

    def restore_server(self, blob: bytes, *, context: bytes = b"") -> ServerSession:
        """A server rebuilt from `export_state()` (same errors as `restore_client`)."""
        ...

    def encode(self, message: Any) -> bytes:
        """A message to bytes."""
        ...

    def decode(self, data: bytes) -> Any:
        """Bytes to a message; anything malformed raises `DecodeError`."""
        ...

    def step_of(self, message_type: type[Any]) -> RoundStep:
        """Which step a client message belongs to (for dropouts and accounting)."""
        ...

    def client_result(self, client: ClientSession) -> Any:
        """What a client decrypted (the HE key holder's copy of its release); the result where `reveals_to_client`."""
        ...
