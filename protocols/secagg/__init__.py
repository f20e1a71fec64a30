"""SecAgg (Bonawitz et al., CCS 2017) and SecAgg+ (Bell et al., CCS 2020) as sans-IO sessions.

Threat model. The server sees every message; in the semi-honest setting it follows the protocol,
in the malicious setting (identity keys configured) it may drop, reorder, replay, substitute keys
or show different parties different survivor sets. Up to n_C clients collude with it. What it
learns is the sum of the inputs of the survivor set U3 (|U3| >= t), nothing per client; with
SecAgg+ this holds with probability 1 - 2^-40 over the public neighbour graph, and in the malicious
setting only as sums over connected groups of honest survivors (see `_params`). Out of scope:
input validation (a malicious client may send any value in range), availability (the server can
always abort), and what the sum itself reveals (use DP for that).

The two settings and their thresholds are documented in `SecAggParams`.
"""

from ._client import ClientState, SecAggClient
from ._codec import WIRE_VERSION, decode_message, encode_message
from ._graph import NeighbourGraph
from ._messages import (
    MAX_PARTIES,
    AdvertiseKeys,
    EncryptedShares,
    Envelope,
    KeyRoster,
    MaskedInput,
    Message,
    ShareBundle,
    SurvivorSet,
    SurvivorSignature,
    UnmaskRequest,
    UnmaskResponse,
)
from ._params import ETA, SIGMA, SecAggParams, derive_secagg_plus
from ._server import AggregateResult, SecAggServer, ServerState

__all__ = [
    "ETA",
    "MAX_PARTIES",
    "SIGMA",
    "WIRE_VERSION",
    "AdvertiseKeys",
    "AggregateResult",
    "ClientState",
    "EncryptedShares",
    "Envelope",
    "KeyRoster",
    "MaskedInput",
    "Message",
    "NeighbourGraph",
    "SecAggClient",
    "SecAggParams",
    "SecAggServer",
    "ServerState",
    "ShareBundle",
    "SurvivorSet",
    "SurvivorSignature",
    "UnmaskRequest",
    "UnmaskResponse",
    "decode_message",
    "derive_secagg_plus",
    "encode_message",
]
