"""Secure-aggregation protocols for federated learning, sans-IO.

Like h11 for HTTP, this package contains no networking, threads or clocks: each protocol is a pair
of state machines (client and server) that consume typed messages and return the messages to send,
which encode to bytes and back. Any host (Flower, NVFlare, a gRPC server of your own) moves the
bytes. Secrets come from a `SecretSource` (the OS CSPRNG unless a test injects one).

Dependencies: numpy, cryptography and pydantic only.
"""

from .dp_noise import DiscreteGaussianSampler, IntegerNoiseSampler, PoissonSampler, SkellamSampler
from .driver import RoundReport, family_for, run_round, run_sessions
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
from .he import HEFamily
from .plaintext import PlaintextClient, PlaintextFamily, PlaintextServer
from .policy import PROTOCOL_FAMILIES, SecurityPolicy, SignedRoster
from .randomness import DeterministicRandom, OsRandom, SecretSource
from .secagg import (
    AggregateResult,
    ClientState,
    Complaint,
    SecAggClient,
    SecAggFamily,
    SecAggParams,
    SecAggServer,
    ServerState,
    SignedShare,
    decode_message,
    derive_secagg_plus,
    encode_message,
)
from .session import ClientSession, RoundStep, ServerSession, SessionFamily

__all__ = [
    "PROTOCOL_FAMILIES",
    "AbortError",
    "AggregateResult",
    "ClientSession",
    "ClientState",
    "Complaint",
    "DecodeError",
    "DecodedSum",
    "DeterministicRandom",
    "DiscreteGaussianSampler",
    "FixedPointEncoding",
    "HEFamily",
    "InsecureParameterError",
    "IntegerNoiseSampler",
    "IntegrityError",
    "InvalidTransitionError",
    "LocalProtocolError",
    "OsRandom",
    "PlaintextClient",
    "PlaintextFamily",
    "PlaintextServer",
    "PoissonSampler",
    "ProtocolError",
    "RemoteProtocolError",
    "RoundReport",
    "RoundStep",
    "SecAggClient",
    "SecAggFamily",
    "SecAggParams",
    "SecAggServer",
    "SecretSource",
    "SecurityPolicy",
    "ServerSession",
    "ServerState",
    "SessionFamily",
    "SignedRoster",
    "SignedShare",
    "SkellamSampler",
    "decode_message",
    "derive_secagg_plus",
    "encode_message",
    "family_for",
    "run_round",
    "run_sessions",
]
