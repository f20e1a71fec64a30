"""SecAgg and SecAgg+ as a `protocols.SessionFamily`: what a host needs, behind the common interface."""

from __future__ import annotations

import enum
from typing import Any

import numpy as np
import numpy.typing as npt

from ..errors import LocalProtocolError
from ..randomness import SecretSource
from ..session import RoundStep
from ._client import ClientState, SecAggClient
from ._codec import decode_message, encode_message
from ._messages import (
    AdvertiseKeys,
    Complaint,
    EncryptedShares,
    GraphReveal,
    MaskedInput,
    SurvivorSignature,
    UnmaskResponse,
)
from ._params import SecAggParams
from ._server import SecAggServer

__all__ = ["SecAggFamily"]

_STEPS: dict[type[Any], RoundStep] = {
    AdvertiseKeys: RoundStep.ADVERTISE,
    GraphReveal: RoundStep.REVEAL,
    EncryptedShares: RoundStep.SHARE,
    MaskedInput: RoundStep.INPUT,
    Complaint: RoundStep.INPUT,
    SurvivorSignature: RoundStep.CONFIRM,
    UnmaskResponse: RoundStep.UNMASK,
}


class SecAggFamily:
    """SecAgg (complete graph) or SecAgg+ (params.neighbours < n - 1), semi-honest or malicious by params.

    Args:
        params: the round's public parameters.
        beacon: optional public randomness every party and the server derive the SecAgg+ graph from.
    """

    def __init__(self, params: SecAggParams, *, beacon: bytes | None = None) -> None:
        self.params, self.beacon = params, beacon
        self.name = "secagg" if params.complete else "secagg+"

    @property
    def num_parties(self) -> int:
        """N."""
        return self.params.num_parties

    @property
    def reveals_to_client(self) -> bool:
        """The server learns the sum."""
        return False

    def client(
        self,
        party_id: int,
        *,
        session: bytes,
        round_number: int,
        context: bytes = b"",
        identity_key: bytes | None = None,
        rng: SecretSource | None = None,
    ) -> SecAggClient:
        """A fresh `SecAggClient`."""
        return SecAggClient(
            self.params,
            party_id=party_id,
            session=session,
            round_number=round_number,
            context=context,
            identity_key=identity_key,
            rng=rng,
            beacon=self.beacon,
        )

    def server(self, *, session: bytes, round_number: int, context: bytes = b"") -> SecAggServer:
        """A fresh `SecAggServer`."""
        return SecAggServer(
            self.params, session=session, round_number=round_number, context=context, beacon=self.beacon
        )

    def restore_client(
        self,
        blob: bytes,
        *,
        context: bytes = b"",
        identity_key: bytes | None = None,
        rng: SecretSource | None = None,
        min_stage: enum.Enum | None = None,
        input: npt.NDArray[np.floating] | npt.NDArray[np.integer] | None = None,
    ) -> SecAggClient:
        """`SecAggClient.from_state` (see there for what a rollback guard covers and what `input` gives back)."""
        if min_stage is not None and not isinstance(min_stage, ClientState):
            raise LocalProtocolError(f"min_stage={min_stage!r} is not a SecAgg ClientState")
        return SecAggClient.from_state(
            blob,
            self.params,
            context=context,
            identity_key=identity_key,
            rng=rng,
            min_stage=min_stage,
            beacon=self.beacon,
            input=input,
        )

    def restore_server(self, blob: bytes, *, context: bytes = b"") -> SecAggServer:
        """`SecAggServer.from_state`."""
        return SecAggServer.from_state(blob, self.params, context=context, beacon=self.beacon)

    def encode(self, message: Any) -> bytes:
        """The SecAgg wire format."""
        return encode_message(message)

    def decode(self, data: bytes) -> Any:
        """The SecAgg wire format; malformed bytes raise `DecodeError`."""
        return decode_message(data)

    def step_of(self, message_type: type[Any]) -> RoundStep:
        """The step of a client message type."""
        try:
            return _STEPS[message_type]
        except KeyError:
            raise LocalProtocolError(f"{message_type.__name__} is not a SecAgg client message") from None

    def client_result(self, client: Any) -> Any:
        """SecAgg clients learn nothing: the server holds the sum."""
        raise LocalProtocolError("SecAgg clients learn no aggregate; read AggregateResult from the server")
