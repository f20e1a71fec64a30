"""SecAgg (Bonawitz et al., CCS 2017) and SecAgg+ (Bell et al., CCS 2020) as sans-IO sessions.

Threat model. The server sees every message; in the semi-honest setting it follows the protocol,
in the malicious setting (identity keys configured) it may drop, reorder, replay, substitute keys
or show different parties different survivor sets. Up to n_C clients collude with it. What it
learns is the sum of the inputs of the survivor set U3 (|U3| >= t), nothing per client; with
SecAgg+ this holds with probability 1 - 2^-40 over the public neighbour graph, and in the malicious
setting only as sums over connected groups of honest survivors (see `_params`). Out of scope:
input validation (a malicious client may send any value in range), availability (the server can
always abort), and what the sum itself reveals (use DP for that).

Malicious clients cannot corrupt the sum silently: every Shamir share is signed by its dealer
(identity key, or a session key advertised in AdvertiseKeys in the semi-honest setting), the server
discards any returned share that does not verify and rebuilds each secret from any t valid shares,
or aborts. A share box that does not open is answered with a signed `Complaint` instead of a masked
input; the server drops accuser and accused (counted against d_max) and goes on with the rest. A
malicious dealer can still corrupt its own contribution (inconsistent shares of its own secrets are
like a bad input), and a dealer that spoils many boxes drops many accusers: availability, not privacy.

In the malicious setting, SecAgg+'s neighbour graph is seeded by a commit-reveal coin toss among U1
(or by a public beacon value the host passes in), not by anything the server chooses; a server can
only abort a toss, and each site caps the tosses it joins per release (see `_graph`).

The two settings and their thresholds are documented in `SecAggParams`.
"""

from ._client import ClientState, SecAggClient
from ._codec import WIRE_VERSION, decode_message, encode_message
from ._family import SecAggFamily
from ._graph import GraphMode, NeighbourGraph
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
from ._params import ETA, SIGMA, SecAggParams, derive_secagg_plus
from ._server import HOLD_BYTES, AggregateResult, SecAggServer, ServerState
from ._transcript import advertise_statement  # hazmat: what an AdvertiseKeys signature covers (threat models)
from ._unmask import JobMap

__all__ = [
    "ETA",
    "HOLD_BYTES",
    "MAX_PARTIES",
    "SIGMA",
    "WIRE_VERSION",
    "AdvertiseKeys",
    "AggregateResult",
    "ClientState",
    "Complaint",
    "EncryptedShares",
    "Envelope",
    "GraphMode",
    "GraphReveal",
    "GraphSeed",
    "JobMap",
    "KeyRoster",
    "MaskedInput",
    "Message",
    "NeighbourGraph",
    "SecAggClient",
    "SecAggFamily",
    "SecAggParams",
    "SecAggServer",
    "ServerState",
    "ShareBundle",
    "SignedShare",
    "SurvivorSet",
    "SurvivorSignature",
    "UnmaskRequest",
    "UnmaskResponse",
    "advertise_statement",
    "decode_message",
    "derive_secagg_plus",
    "encode_message",
]
