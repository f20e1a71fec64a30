"""A plaintext aggregator with the secure sessions' interface: the baseline and the control.

It uses the same encoding and the same messages (a `MaskedInput` that carries no mask), so the
driver, the tests and the runner can swap it for SecAgg to measure exactly what secure aggregation
costs, and to check that SecAgg's ring sum is bit-identical to the unprotected one.
It reveals every individual input to the server: never use it where privacy matters.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from .errors import InvalidTransitionError, LocalProtocolError, RemoteProtocolError
from .primitives.prg import ring_dtype
from .randomness import OsRandom, SecretSource
from .secagg._messages import MaskedInput, Message
from .secagg._params import SecAggParams
from .secagg._server import AggregateResult, Outgoing

__all__ = ["PlaintextClient", "PlaintextServer"]


class PlaintextClient:
    """Sends its encoded input in the clear."""

    def __init__(
        self,
        params: SecAggParams,
        *,
        party_id: int,
        session: bytes,
        round_number: int,
        rng: SecretSource | None = None,
    ) -> None:
        self.params, self.party_id, self.session, self.round_number = params, party_id, session, round_number
        self._rng = rng or OsRandom()
        self._input: npt.NDArray[np.unsignedinteger] | None = None

    def set_input(
        self, x: npt.NDArray[np.floating], *, weight: float = 1.0, rounding_seed: bytes | None = None
    ) -> None:
        """Encode the update exactly as `SecAggClient.set_input` does."""
        self._input = self.params.encoding.encode(x, weight=weight, rounding_seed=rounding_seed, rng=self._rng)

    def start(self) -> Message:
        """The only message: the unmasked encoded input."""
        if self._input is None:
            raise InvalidTransitionError("set_input() must be called before start()")
        return MaskedInput(
            session=self.session,
            round=self.round_number,
            sender=self.party_id,
            ring_bits=self.params.encoding.ring_bits,
            data=self._input.tobytes(),
        )

    def handle(self, message: Message) -> Message:
        """The plaintext protocol has no second stage."""
        raise RemoteProtocolError(f"{type(message).__name__} is not expected", field="stage")


class PlaintextServer:
    """Sums encoded inputs as they arrive."""

    def __init__(self, params: SecAggParams, *, session: bytes, round_number: int) -> None:
        self.params, self.session, self.round_number = params, session, round_number
        self._acc = np.zeros(params.dimension + 1, dtype=ring_dtype(params.encoding.ring_bits))
        self._seen: set[int] = set()
        self._result: AggregateResult | None = None

    def receive(self, message: Message) -> None:
        """Add one input; duplicates, strangers and wrong shapes are rejected."""
        if self._result is not None:
            raise InvalidTransitionError("the round is over")
        if not isinstance(message, MaskedInput) or (message.session, message.round) != (
            self.session,
            self.round_number,
        ):
            raise RemoteProtocolError("not an input of this round", field="stage")
        if message.sender in self._seen or message.sender >= self.params.num_parties:
            raise RemoteProtocolError("duplicate or unknown sender", peer_id=message.sender, field="sender")
        vector = message.vector()
        if vector.dtype != self._acc.dtype or vector.shape != self._acc.shape:
            raise RemoteProtocolError("wrong input shape", peer_id=message.sender, field="data")
        np.add(self._acc, vector, out=self._acc)
        self._seen.add(message.sender)

    def close_stage(self) -> Outgoing:
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
