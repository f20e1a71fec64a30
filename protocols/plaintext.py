"""A plaintext aggregator with the secure sessions' interface: the baseline and the control.

It uses the same encoding and the same messages (a `MaskedInput` that carries no mask), so the
driver, the tests and the runner can swap it for SecAgg to measure exactly what secure aggregation
costs, and to check that SecAgg's ring sum is bit-identical to the unprotected one.
It reveals every individual input to the server: never use it where privacy matters. A client is
therefore built only with a `SecurityPolicy` that allows it (`check_plaintext`: the site chose
protocol="plaintext"); a site whose policy names a secure family cannot be talked into sending in
the clear.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from .errors import DecodeError, InvalidTransitionError, LocalProtocolError, RemoteProtocolError
from .policy import SecurityPolicy
from .primitives.prg import ring_dtype
from .randomness import OsRandom, SecretSource
from .secagg import AggregateResult, MaskedInput, Message, SecAggParams, decode_message, encode_message
from .session import RoundStep

__all__ = ["PlaintextClient", "PlaintextClientStage", "PlaintextFamily", "PlaintextServer", "PlaintextServerStage"]

_HEAD = struct.Struct("<BBI16sQ")
_VERSION = 1
_SERVER = 0xFFFFFFFF


class PlaintextClientStage(enum.Enum):
    """Where a plaintext client is; SENT is terminal."""

    NEW = 0
    SENT = 1


class PlaintextServerStage(enum.Enum):
    """Where the plaintext round is; DONE is terminal."""

    COLLECT_INPUTS = 0
    DONE = 1


class PlaintextClient:
    """Sends its encoded input in the clear (a `protocols.ClientSession`; only where the policy allows it).

    Raises:
        InsecureParameterError: `policy` does not choose protocol="plaintext".
    """

    TRANSITIONS: ClassVar[Mapping[tuple[Any, type[Any]], Any]] = {}
    """The plaintext protocol has one message and no reply: no server message is ever accepted."""

    def __init__(
        self,
        params: SecAggParams,
        *,
        party_id: int,
        session: bytes,
        round_number: int,
        policy: SecurityPolicy,
        rng: SecretSource | None = None,
    ) -> None:
        policy.check_plaintext()
        if not 0 <= party_id < params.num_parties:
            raise LocalProtocolError(f"party_id={party_id} is outside 0..{params.num_parties - 1}")
        self.params, self._party, self.session, self.round_number = params, party_id, session, round_number
        self._rng = rng or OsRandom()
        self._input: npt.NDArray[np.unsignedinteger] | None = None
        self.state = PlaintextClientStage.NEW

    @property
    def party_id(self) -> int:
        """This client's id."""
        return self._party

    @property
    def stage(self) -> PlaintextClientStage:
        """The session's stage."""
        return self.state

    @property
    def finished(self) -> bool:
        """True once the input was sent."""
        return self.state is PlaintextClientStage.SENT

    def set_input(
        self,
        x: npt.NDArray[np.floating] | npt.NDArray[np.integer],
        *,
        weight: float = 1.0,
        rounding_seed: bytes | None = None,
    ) -> None:
        """Encode the update exactly as `SecAggClient.set_input` does (integer `x`: ring elements, unclipped)."""
        if self.state is not PlaintextClientStage.NEW:
            raise InvalidTransitionError("set_input() after the input was sent")
        self._input = self.params.encoding.encode_input(x, weight=weight, rounding_seed=rounding_seed, rng=self._rng)

    def start(self) -> Message:
        """The only message: the unmasked encoded input."""
        if self._input is None or self.state is not PlaintextClientStage.NEW:
            raise InvalidTransitionError("set_input() must be called once before start()")
        self.state = PlaintextClientStage.SENT
        return MaskedInput(
            session=self.session,
            round=self.round_number,
            sender=self._party,
            ring_bits=self.params.encoding.ring_bits,
            data=self._input.tobytes(),
        )

    def handle(self, message: Message) -> Message:
        """The plaintext protocol has no second stage."""
        raise RemoteProtocolError(f"{type(message).__name__} is not expected in state {self.state.name}", field="stage")

    def export_state(self, *, include_input: bool = True) -> bytes:
        """The session as bytes: holds the encoded update in the clear (as sensitive as the update).

        `include_input` is accepted for the common `ClientSession` interface and has no effect: the
        encoded update is the whole session, so it is always in the blob.
        """
        head = _HEAD.pack(_VERSION, self.state.value, self._party, self.session, self.round_number)
        return head + (b"" if self._input is None else self._input.tobytes())

    @classmethod
    def from_state(
        cls,
        data: bytes,
        params: SecAggParams,
        *,
        policy: SecurityPolicy,
        rng: SecretSource | None = None,
        min_stage: PlaintextClientStage | None = None,
    ) -> PlaintextClient:
        """Rebuild a session from `export_state()`.

        Raises:
            DecodeError: malformed or truncated blob.
            LocalProtocolError: older than `min_stage`; InsecureParameterError: the policy refuses plaintext.
        """
        _, stage, party, session, round_number = _head(data)
        if stage not in (0, 1) or party >= params.num_parties:
            raise DecodeError("plaintext client state has a bad stage or party", field="state")
        if min_stage is not None and stage < min_stage.value:
            raise LocalProtocolError(f"plaintext state is older than min_stage={min_stage.name}")
        client = cls(params, party_id=party, session=session, round_number=round_number, policy=policy, rng=rng)
        body = data[_HEAD.size :]
        if body:
            client._input = _ring(params, body)
        elif stage == 1:
            raise DecodeError("a SENT plaintext state holds no input", field="state")
        client.state = PlaintextClientStage(stage)
        return client


class PlaintextServer:
    """Sums encoded inputs as they arrive (a `protocols.ServerSession`)."""

    TRANSITIONS: ClassVar[Mapping[tuple[Any, type[Any]], Any]] = {
        (PlaintextServerStage.COLLECT_INPUTS, MaskedInput): PlaintextServerStage.COLLECT_INPUTS
    }

    def __init__(self, params: SecAggParams, *, session: bytes, round_number: int) -> None:
        self.params, self.session, self.round_number = params, session, round_number
        self._acc = np.zeros(params.dimension + 1, dtype=ring_dtype(params.encoding.ring_bits))
        self._seen: set[int] = set()
        self._result: AggregateResult | None = None

    @property
    def stage(self) -> PlaintextServerStage:
        """The round's stage."""
        return PlaintextServerStage.DONE if self._result is not None else PlaintextServerStage.COLLECT_INPUTS

    def receive(self, message: Message) -> None:
        """Add one input; duplicates, strangers and wrong shapes are rejected."""
        if self._result is not None:
            raise InvalidTransitionError("the round is over")
        if not isinstance(message, MaskedInput) or (message.session, message.round) != (
            self.session,
            self.round_number,
        ):
            raise RemoteProtocolError(f"{type(message).__name__} is not an input of this round", field="stage")
        if message.sender in self._seen or message.sender >= self.params.num_parties:
            raise RemoteProtocolError("duplicate or unknown sender", peer_id=message.sender, field="sender")
        vector = message.vector()
        if vector.dtype != self._acc.dtype or vector.shape != self._acc.shape:
            raise RemoteProtocolError("wrong input shape", peer_id=message.sender, field="data")
        np.add(self._acc, vector, out=self._acc)
        self._seen.add(message.sender)

    def close_stage(self) -> list[tuple[int, Message]]:
        """Finish the round."""
        if self._result is not None:
            raise InvalidTransitionError("the round is over")
        if not self._seen:
            raise LocalProtocolError("no inputs arrived")
        included = tuple(sorted(self._seen))
        self._result = AggregateResult(
            decoded=self.params.encoding.decode(self._acc, num_inputs=len(included)),
            ring_sum=self._acc,
            included=included,
            dropped=(),
            insecure=True,
        )
        return []

    def result(self) -> AggregateResult:
        """The sum, once closed."""
        if self._result is None:
            raise InvalidTransitionError("close_stage() first")
        return self._result

    @property
    def finished(self) -> bool:
        """True once the round is over."""
        return self._result is not None

    def export_state(self) -> bytes:
        """The running sum and who contributed (before DONE; a finished round is read with `result()`)."""
        if self._result is not None:
            raise InvalidTransitionError("the round is over; read result() instead of exporting it")
        head = _HEAD.pack(_VERSION, 0, _SERVER, self.session, self.round_number)
        ids = sorted(self._seen)
        return head + struct.pack(f"<I{len(ids)}I", len(ids), *ids) + self._acc.tobytes()

    @classmethod
    def from_state(cls, data: bytes, params: SecAggParams) -> PlaintextServer:
        """Rebuild a session from `export_state()`.

        Raises:
            DecodeError: malformed or truncated blob.
        """
        _, stage, party, session, round_number = _head(data)
        if stage != 0 or party != _SERVER or len(data) < _HEAD.size + 4:
            raise DecodeError("plaintext server state has a bad stage or is a client's", field="state")
        (count,) = struct.unpack_from("<I", data, _HEAD.size)
        start = _HEAD.size + 4 + 4 * count
        if count > params.num_parties or len(data) < start:
            raise DecodeError("plaintext server state id list is truncated", field="state")
        ids = struct.unpack_from(f"<{count}I", data, _HEAD.size + 4)
        if list(ids) != sorted(set(ids)) or (ids and ids[-1] >= params.num_parties):
            raise DecodeError("plaintext server state ids are unsorted, repeated or out of range", field="state")
        server = cls(params, session=session, round_number=round_number)
        server._acc = _ring(params, data[start:], extra=1).copy()
        server._seen = set(ids)
        return server


def _head(data: bytes) -> tuple[int, int, int, bytes, int]:
    if len(data) < _HEAD.size:
        raise DecodeError("plaintext state blob is truncated", field="state")
    version, stage, party, session, round_number = _HEAD.unpack_from(data)
    if version != _VERSION:
        raise DecodeError(f"plaintext state version {version} is not {_VERSION}", field="state")
    return version, stage, party, session, round_number


def _ring(params: SecAggParams, raw: bytes, extra: int = 1) -> npt.NDArray[np.unsignedinteger]:
    dtype = ring_dtype(params.encoding.ring_bits)
    if len(raw) != (params.dimension + extra) * np.dtype(dtype).itemsize:
        raise DecodeError("plaintext state vector has the wrong length", field="state")
    out: npt.NDArray[np.unsignedinteger] = np.frombuffer(raw, dtype=dtype).copy()
    limit = 1 << params.encoding.ring_bits
    if params.encoding.ring_bits < 8 * np.dtype(dtype).itemsize and (out >= limit).any():
        raise DecodeError("plaintext state vector has a value outside the ring", field="state")
    return out


_STEPS: dict[type[Any], RoundStep] = {MaskedInput: RoundStep.INPUT}


class PlaintextFamily:
    """The plaintext control as a `protocols.SessionFamily`; every client checks `policy.check_plaintext()`."""

    def __init__(self, params: SecAggParams, *, policy: SecurityPolicy) -> None:
        policy.check_plaintext()
        self.params, self.policy = params, policy
        self.name = "plaintext"

    @property
    def num_parties(self) -> int:
        """N."""
        return self.params.num_parties

    @property
    def reveals_to_client(self) -> bool:
        """The server learns every input."""
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
    ) -> PlaintextClient:
        """A fresh client (context and identity key are not used: nothing is bound or signed)."""
        return PlaintextClient(
            self.params, party_id=party_id, session=session, round_number=round_number, policy=self.policy, rng=rng
        )

    def server(self, *, session: bytes, round_number: int, context: bytes = b"") -> PlaintextServer:
        """A fresh server."""
        return PlaintextServer(self.params, session=session, round_number=round_number)

    def restore_client(
        self,
        blob: bytes,
        *,
        context: bytes = b"",
        identity_key: bytes | None = None,
        rng: SecretSource | None = None,
        min_stage: enum.Enum | None = None,
        input: npt.NDArray[np.floating] | npt.NDArray[np.integer] | None = None,
    ) -> PlaintextClient:
        """`PlaintextClient.from_state`; `input` is ignored (the blob always holds the encoded input)."""
        if min_stage is not None and not isinstance(min_stage, PlaintextClientStage):
            raise LocalProtocolError(f"min_stage={min_stage!r} is not a PlaintextClientStage")
        return PlaintextClient.from_state(blob, self.params, policy=self.policy, rng=rng, min_stage=min_stage)

    def restore_server(self, blob: bytes, *, context: bytes = b"") -> PlaintextServer:
        """`PlaintextServer.from_state`."""
        return PlaintextServer.from_state(blob, self.params)

    def encode(self, message: Any) -> bytes:
        """The SecAgg wire format (a MaskedInput)."""
        return encode_message(message)

    def decode(self, data: bytes) -> Any:
        """The SecAgg wire format."""
        return decode_message(data)

    def step_of(self, message_type: type[Any]) -> RoundStep:
        """Only the input."""
        try:
            return _STEPS[message_type]
        except KeyError:
            raise LocalProtocolError(f"{message_type.__name__} is not a plaintext client message") from None

    def client_result(self, client: Any) -> Any:
        """Plaintext clients learn nothing."""
        raise LocalProtocolError("plaintext clients learn no aggregate; read the server's result")
