"""Shared plumbing of the malicious-server attacks: real SecAgg sessions, a server that may rewrite.

Every malicious-server attack runs the honest `SecAggClient` and `SecAggServer` code; the server's
deviation is a `rewrite` of what it forwards (or messages it builds itself). Keeping the delivery
loop here means each attack states only its deviation, and a refusal always names the honest party
that raised and the message it refused, so a test can tell "the defense fired" from "the attack
broke".
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Annotated, Any

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field

from protocols import ProtocolError, SecAggClient, SecAggParams, SecAggServer, SecretSource, ServerState
from protocols.primitives import ed25519_public
from protocols.secagg import AdvertiseKeys, Message

from ..errors import AttackConfigError

__all__ = [
    "Outcome",
    "Refused",
    "Rewrite",
    "Seen",
    "clipped",
    "describe",
    "make_params",
    "relative_error",
    "relay",
    "start_round",
]

Seen = dict[type, dict[int, Message]]
"""Every message a client sent the server, by message type and sender: the server's view."""
Rewrite = Callable[[int, Message], Message]
"""What the malicious server forwards to `party` instead of the honest server's message."""


def require_client(name: str, party: int, num_clients: int) -> None:
    """Refuse an attack config whose `name` (target, forger, ...) is not one of the round's clients.

    Raises:
        AttackConfigError: naming the field and the fix.
    """
    if party >= num_clients:
        raise AttackConfigError(f"{name}={party} is not a client of {num_clients}; lower {name}")


class RoundConfig(BaseModel):
    """The round a malicious server attacks: its size, the target client and the public clip range."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    num_clients: Annotated[int, Field(ge=4, le=64)] = 5
    target: Annotated[int, Field(ge=0)] = 0
    clip_range: Annotated[float, Field(gt=0)] = 0.1


class Outcome(BaseModel):
    """What every malicious-server attack reports: recovered, or refused by whom and why."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    defended: bool
    aborted: bool
    recovered: bool
    relative_error: float = Field(float("inf"), description="error of what was recovered; inf when nothing was")
    refused_by: int | None = Field(None, description="the honest party that raised, when the round aborted")
    masked_input_sent: bool = Field(False, description="whether the target's masked input reached the server")
    reason: str = ""
    estimate: Any = Field(
        None, exclude=True, repr=False, description="what the server reconstructed (float64 vector), or None"
    )


class Refused(Exception):  # noqa: N818 - an outcome the attacks branch on, not a failure of the code
    """An honest party raised a `ProtocolError` on a message the server forwarded."""

    def __init__(self, party: int, message: Message, error: ProtocolError) -> None:
        super().__init__(f"party {party} refused {type(message).__name__}: {type(error).__name__}: {error}")
        self.party = party
        self.error = error
        self.reason = describe(error, message)


def describe(error: ProtocolError, message: Message) -> str:
    """'IntegrityError on KeyRoster (party 1)': the error, the message refused, the peer it blames."""
    peer = getattr(error, "peer_id", None)
    return f"{type(error).__name__} on {type(message).__name__}" + ("" if peer is None else f" (party {peer})")


def make_params(n: int, d: int, clip: float, *, signed: bool) -> tuple[SecAggParams, list[bytes] | None]:
    """Plain SecAgg at the default threshold; `signed` adds a PKI of identity keys (malicious setting).

    Returns:
        The parameters and, when signed, each party's Ed25519 private key (issued outside the server).
    """
    if not signed:
        return SecAggParams.secagg(n, dimension=d, clip_range=clip), None
    identities = [os.urandom(32) for _ in range(n)]
    pubs = tuple(ed25519_public(k) for k in identities)
    return SecAggParams.secagg(n, dimension=d, clip_range=clip, identity_keys=pubs), identities


def start_round(
    params: SecAggParams,
    inputs: Sequence[npt.NDArray[np.floating]],
    seen: Seen,
    *,
    session: bytes,
    round_number: int,
    identities: Sequence[bytes] | None,
    rngs: Sequence[SecretSource] | None = None,
) -> tuple[list[SecAggClient], SecAggServer]:
    """Build n client sessions and the server's, and deliver every client's AdvertiseKeys (into `seen`).

    The input is set before the keys are drawn, so a client with a reproducible `rng` draws the
    same rounding seed and keys every time it is started (what the replay control relies on).
    """
    clients = []
    server = SecAggServer(params, session=session, round_number=round_number)
    for p, x in enumerate(inputs):
        client = SecAggClient(
            params,
            party_id=p,
            session=session,
            round_number=round_number,
            identity_key=identities[p] if identities else None,
            rng=rngs[p] if rngs else None,
        )
        client.set_input(np.asarray(x, dtype=np.float64))
        advert = client.advertise_keys()
        seen.setdefault(AdvertiseKeys, {})[p] = advert
        server.receive(advert)
        clients.append(client)
    return clients, server


def relay(
    server: SecAggServer,
    clients: Sequence[SecAggClient],
    seen: Seen,
    *,
    rewrite: Rewrite | None = None,
    until: ServerState = ServerState.DONE,
) -> None:
    """Close stages and deliver them (through `rewrite`) until the server reaches `until` or ends.

    Every client reply is recorded in `seen` as it arrives, so what the server saw before a refusal
    stays there.

    Raises:
        Refused: an honest client raised on what it was sent (the server receives nothing more).
    """
    while server.state is not until and (outgoing := server.close_stage()):
        for party, message in outgoing:
            forwarded = rewrite(party, message) if rewrite else message
            try:
                reply = clients[party].handle(forwarded)
            except ProtocolError as exc:
                raise Refused(party, forwarded, exc) from exc
            seen.setdefault(type(reply), {})[party] = reply
            server.receive(reply)


def clipped(x: npt.NDArray[np.floating], clip: float) -> npt.NDArray[np.float64]:
    """What the encoding commits to: x clipped to [-clip, clip]."""
    return np.clip(np.asarray(x, dtype=np.float64), -clip, clip)


def relative_error(recovered: npt.NDArray[np.floating], truth: npt.NDArray[np.floating]) -> float:
    """||recovered - truth|| / ||truth|| (absolute error when truth is 0)."""
    return float(np.linalg.norm(recovered - truth) / (np.linalg.norm(truth) or 1.0))
