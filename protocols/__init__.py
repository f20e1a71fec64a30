"""Secure-aggregation protocols for federated learning, sans-IO.

Like h11 for HTTP, this package contains no networking, threads or clocks: each protocol is a pair
of state machines (client and server) that consume typed messages and return the messages to send,
which encode to bytes and back. Any host (Flower, NVFlare, a gRPC server of your own) moves the
bytes. Secrets come from a `SecretSource` (the OS CSPRNG unless a test injects one).

Dependencies: numpy, cryptography and pydantic only.
"""

from .driver import STAGE_OF, RoundReport, run_round
from .encoding import DecodedSum, FixedPointEncoding
from .errors import (
    AbortError,
    DecodeError,
    InsecureParameterError,
    IntegrityError,
    InvalidTransitionError,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
)
from .plaintext import PlaintextClient, PlaintextServer
from .policy import PROTOCOL_FAMILIES, SecurityPolicy, SignedRoster
from .randomness import DeterministicRandom, OsRandom, SecretSource
from .secagg import (
    AggregateResult,
    ClientState,
    Complaint,
    SecAggClient,
    SecAggParams,
    SecAggServer,
    ServerState,
    SignedShare,
    decode_message,
    derive_secagg_plus,
    encode_message,
)

__all__ = [
    "PROTOCOL_FAMILIES",
    "STAGE_OF",
    "AbortError",
    "AggregateResult",
    "ClientState",
    "Complaint",
    "DecodeError",
    "DecodedSum",
    "DeterministicRandom",
    "FixedPointEncoding",
    "InsecureParameterError",
    "IntegrityError",
    "InvalidTransitionError",
    "LocalProtocolError",
    "OsRandom",
    "PlaintextClient",
    "PlaintextServer",
    "ProtocolError",
    "RemoteProtocolError",
    "RoundReport",
    "SecAggClient",
    "SecAggParams",
    "SecAggServer",
    "SecretSource",
    "SecurityPolicy",
    "ServerState",
    "SignedRoster",
    "SignedShare",
    "decode_message",
    "derive_secagg_plus",
    "encode_message",
    "run_round",
]
