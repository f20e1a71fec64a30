"""HE (BFV or CKKS) as a `protocols.SessionFamily`."""

from __future__ import annotations

import enum
from typing import Any

import numpy as np
import numpy.typing as npt

from ..errors import LocalProtocolError
from ..randomness import SecretSource
from ..session import RoundStep
from ._client import HEClient, HEClientState
from ._messages import HEAck, HEHello, HEInput, HEKeyOffer, decode_he_message, encode_he_message
from ._params import HEParams
from ._server import HEServer

__all__ = ["HEFamily"]

_STEPS: dict[type[Any], RoundStep] = {
    HEHello: RoundStep.ADVERTISE,
    HEKeyOffer: RoundStep.SHARE,
    HEInput: RoundStep.INPUT,
    HEAck: RoundStep.UNMASK,
}


class HEFamily:
    """HE sessions with fixed `HEParams` (see `protocols.he` for when HE may be used at all)."""

    def __init__(self, params: HEParams) -> None:
        self.params = params
        self.name = f"he-{params.scheme}"

    @property
    def num_parties(self) -> int:
        """N."""
        return self.params.num_parties

    @property
    def reveals_to_client(self) -> bool:
        """False: the key holder releases the exact integer sum to the server, with BFV and with CKKS.

        A CKKS decryption is rounded to the integer sum of the quantized inputs (after a tolerance check
        that aborts on anything else), so the release is a function of the inputs alone, not of the key.
        """
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
    ) -> HEClient:
        """A fresh `HEClient`."""
        return HEClient(
            self.params,
            party_id=party_id,
            session=session,
            round_number=round_number,
            context=context,
            identity_key=identity_key,
            rng=rng,
        )

    def server(self, *, session: bytes, round_number: int, context: bytes = b"") -> HEServer:
        """A fresh `HEServer`."""
        return HEServer(self.params, session=session, round_number=round_number, context=context)

    def restore_client(
        self,
        blob: bytes,
        *,
        context: bytes = b"",
        identity_key: bytes | None = None,
        rng: SecretSource | None = None,
        min_stage: enum.Enum | None = None,
        input: npt.NDArray[np.floating] | npt.NDArray[np.integer] | None = None,
    ) -> HEClient:
        """`HEClient.from_state`; `input` is ignored (an HE blob always holds its pending input)."""
        if min_stage is not None and not isinstance(min_stage, HEClientState):
            raise LocalProtocolError(f"min_stage={min_stage!r} is not an HEClientState")
        return HEClient.from_state(
            blob, self.params, context=context, identity_key=identity_key, rng=rng, min_stage=min_stage
        )

    def restore_server(self, blob: bytes, *, context: bytes = b"") -> HEServer:
        """`HEServer.from_state`."""
        return HEServer.from_state(blob, self.params, context=context)

    def encode(self, message: Any) -> bytes:
        """The HE wire format."""
        return encode_he_message(message)

    def decode(self, data: bytes) -> Any:
        """The HE wire format; malformed bytes raise `DecodeError`."""
        return decode_he_message(data)

    def step_of(self, message_type: type[Any]) -> RoundStep:
        """The step of a client message type."""
        try:
            return _STEPS[message_type]
        except KeyError:
            raise LocalProtocolError(f"{message_type.__name__} is not an HE client message") from None

    def client_result(self, client: Any) -> Any:
        """What an HE client decrypted (`HEClient.result`: the key holder's copy of what it released)."""
        if not isinstance(client, HEClient):
            raise LocalProtocolError("not an HE client")
        return client.result()
