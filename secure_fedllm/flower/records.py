"""How our protocol rides on Flower messages: record names, the setup record, and the update a ClientApp returns.

Flower moves `RecordDict`s; our protocols move bytes. One `ConfigRecord` named `PROTOCOL_RECORD`
carries, per message, the protocol bytes (`payload`) and, in the first message of a round, the
protocol family and its public parameters and the round identity (`family`: "secagg", "secagg+",
"he-bfv", "he-ckks" or "plaintext"; `params`: the family's `SecAggParams` or `HEParams` as JSON;
`party`, `session`, `round`, `context`, and `roster`: a roster authority's `SignedRoster`, for sites
that trust one instead of pinning the roster). The node rebuilds the `protocols.SessionFamily` from
them (`RoundSetup.session_family`). Every other record of the first message is the ClientApp's own
instruction (model, config) and passes through.

The client session lives between messages in `Context.state` under `STATE_RECORD`, as the bytes of
the session's `export_state()` plus the stage reached (a ClientApp process may be new for each
message, so nothing may stay in Python objects).

Flower is imported inside functions only: this module is imported by ClientApps whose protocol
stages must start fast.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeAlias

import numpy as np
import numpy.typing as npt
from pydantic import ValidationError

from protocols import (
    HEFamily,
    InsecureParameterError,
    PlaintextFamily,
    SecAggFamily,
    SecAggParams,
    SecurityPolicy,
    SignedRoster,
)
from protocols.he import HEParams

from ..errors import SecureFedLLMError

if TYPE_CHECKING:
    from flwr.app import RecordDict

__all__ = [
    "FAMILIES",
    "IDENTIFY",
    "INPUT_RECORD",
    "PROTOCOL_RECORD",
    "STATE_RECORD",
    "ClientUpdate",
    "FlowerIntegrationError",
    "RoundFamily",
    "RoundSetup",
    "family_name",
    "flatten_arrays",
    "split_vector",
]

PROTOCOL_RECORD = "secure_fedllm.secagg"
"""ConfigRecord in a message's content: the protocol bytes and, in the first message, the setup."""
STATE_RECORD = "secure_fedllm.secagg.state"
"""ConfigRecord in a node's Context.state: the exported client session (SECRET) and its stage."""
INPUT_RECORD = "secure_fedllm.input"
"""Optional ConfigRecord a ClientApp adds to its reply: `weight` (float), `rounding_seed` (bytes) and
`context` (bytes: the round context the ClientApp trained for; the session refuses any other)."""

SETUP, STEP = "setup", "step"
IDENTIFY = "identify"
"""Stage of a message asking a node for its public identity key (reply: `identity_public_key`, 32 bytes)."""


class FlowerIntegrationError(SecureFedLLMError):
    """A Flower message, reply or configuration does not fit the protocol; the message names the fix."""


RoundFamily: TypeAlias = SecAggFamily | HEFamily | PlaintextFamily
"""The session families the Flower engine runs (each a `protocols.SessionFamily` with its `params`)."""

FAMILIES: dict[str, type[SecAggParams] | type[HEParams]] = {
    "secagg": SecAggParams,
    "secagg+": SecAggParams,
    "he-bfv": HEParams,
    "he-ckks": HEParams,
    "plaintext": SecAggParams,
}
"""Family name -> the parameters it takes (the name a `RoundSetup` carries in its `family` field)."""


def family_name(params: SecAggParams | HEParams) -> str:
    """The family a secure protocol's parameters imply: SecAgg or SecAgg+ (by the graph), he-bfv or he-ckks."""
    if isinstance(params, HEParams):
        return f"he-{params.scheme}"
    return "secagg" if params.complete else "secagg+"


@dataclass(frozen=True)
class RoundSetup:
    """The public identity of one party's session, sent to it in the round's first message."""

    params: SecAggParams | HEParams
    party: int
    session: bytes
    round_number: int
    context: bytes
    signed_roster: SignedRoster | None = None
    """The roster a roster authority signed, relayed for sites that trust the authority, not a pinned list."""
    family: str = field(default="")
    """The protocol family ("secagg", "secagg+", "he-bfv", "he-ckks", "plaintext"); default: what `params` imply."""

    def __post_init__(self) -> None:
        if not self.family:
            object.__setattr__(self, "family", family_name(self.params))
        _check_family(self.family, self.params)

    def to_record(self) -> dict[str, Any]:
        """The ConfigRecord values (JSON params, so any host and any version can read them)."""
        record: dict[str, Any] = {
            "stage": SETUP,
            "family": self.family,
            "params": self.params.model_dump_json().encode(),
            "party": self.party,
            "session": self.session,
            "round": self.round_number,
            "context": self.context,
        }
        if self.signed_roster is not None:
            record["roster"] = self.signed_roster.model_dump_json().encode()
        return record

    @classmethod
    def from_record(cls, record: Any) -> RoundSetup:
        """Parse and validate (the params re-check every security bound on the client's side).

        A record without `family` comes from a server that ran SecAgg only: its params are `SecAggParams`.

        Raises:
            FlowerIntegrationError: a field is missing or malformed (the message names it).
            InsecureParameterError: the params are below a security bound (the message names the field).
        """
        try:
            name = str(record.get("family") or "")
            kind = FAMILIES.get(name or "secagg")
            if kind is None:
                raise FlowerIntegrationError(
                    f"{PROTOCOL_RECORD}.family={name!r} is not a protocol family this node runs; expected one of "
                    f"{sorted(FAMILIES)}"
                )
            try:
                params = kind.model_validate_json(bytes(record["params"]))
            except ValidationError as exc:
                first = exc.errors()[0]
                cause = first.get("ctx", {}).get("error")
                if isinstance(cause, InsecureParameterError):  # a security bound: keep its type and its field
                    raise InsecureParameterError(f"{PROTOCOL_RECORD}.params: {cause}") from None
                where = ".".join(str(part) for part in first["loc"])
                raise FlowerIntegrationError(
                    f"{PROTOCOL_RECORD}.params{'.' + where if where else ''}: {first['msg']} (as {kind.__name__} for "
                    f"family {name or 'secagg'!r})"
                ) from None
            raw = record.get("roster")
            try:
                signed = SignedRoster.model_validate_json(bytes(raw)) if raw is not None else None
            except ValidationError as exc:
                raise FlowerIntegrationError(f"{PROTOCOL_RECORD}.roster: {exc.errors()[0]['msg']}") from None
            return cls(
                signed_roster=signed,
                params=params,
                party=int(record["party"]),
                session=bytes(record["session"]),
                round_number=int(record["round"]),
                context=bytes(record["context"]),
                family=name,
            )
        except KeyError as exc:
            raise FlowerIntegrationError(f"{PROTOCOL_RECORD} setup lacks the field {exc}; is the server ours?") from exc

    def session_family(self, *, policy: SecurityPolicy | None = None) -> RoundFamily:
        """The `protocols.SessionFamily` of this setup (a node rebuilds it from the public record).

        Args:
            policy: the site's policy; the plaintext family needs one that chose protocol="plaintext".

        Raises:
            InsecureParameterError: plaintext without a policy that allows it (field `protocol`).
        """
        if isinstance(self.params, HEParams):
            return HEFamily(self.params)
        if self.family == "plaintext":
            if policy is None:
                raise InsecureParameterError(
                    "protocol: the server asks for updates in the clear (plaintext) but this node has no site policy "
                    "that chooses protocol='plaintext'; refused"
                )
            return PlaintextFamily(self.params, policy=policy)
        return SecAggFamily(self.params)


def _check_family(name: str, params: SecAggParams | HEParams) -> None:
    """The family name and the params must agree (a server cannot name one protocol and send another's params)."""
    if name not in FAMILIES:
        raise FlowerIntegrationError(
            f"{PROTOCOL_RECORD}.family={name!r} is not a protocol family this node runs; expected one of "
            f"{sorted(FAMILIES)}"
        )
    implied = "plaintext" if name == "plaintext" and isinstance(params, SecAggParams) else family_name(params)
    if implied != name:
        raise FlowerIntegrationError(
            f"{PROTOCOL_RECORD}.family={name!r} does not match its params, which describe {implied!r}"
        )


@dataclass(frozen=True)
class ClientUpdate:
    """What a ClientApp's reply contributes: its flat vector, its weight and an optional rounding seed."""

    vector: npt.NDArray[np.float64] | npt.NDArray[np.int64]
    weight: float
    rounding_seed: bytes | None
    context: bytes | None = None


def flatten_arrays(arrays: Iterable[npt.NDArray[Any]]) -> npt.NDArray[np.float64] | npt.NDArray[np.int64]:
    """Concatenate arrays in order into one vector (the protocol's input).

    Float arrays give float64 (encoded by the protocol); all-integer arrays (distributed DP's
    rounded, noised sums) stay int64, the protocol's ring input, which must not pass through floats.
    """
    arrays = [np.asarray(a) for a in arrays]
    if arrays and all(np.issubdtype(a.dtype, np.integer) for a in arrays):
        return np.concatenate([a.astype(np.int64).ravel() for a in arrays])
    parts = [np.asarray(a, dtype=np.float64).ravel() for a in arrays]
    return np.concatenate(parts) if parts else np.zeros(0)


def split_vector(vector: npt.NDArray[np.floating], shapes: Iterable[tuple[int, ...]]) -> list[npt.NDArray[np.float64]]:
    """Inverse of `flatten_arrays` for the given shapes."""
    out, offset = [], 0
    for shape in shapes:
        size = int(np.prod(shape, dtype=np.int64))
        out.append(np.asarray(vector[offset : offset + size], dtype=np.float64).reshape(shape))
        offset += size
    if offset != len(vector):
        raise FlowerIntegrationError(f"the shapes hold {offset} values but the vector has {len(vector)}")
    return out


def extract_update(content: RecordDict) -> tuple[ClientUpdate, RecordDict]:
    """Take the update out of a ClientApp's train reply; return it and the reply without it.

    Understands both Flower surfaces: the Message API (one `ArrayRecord`, weight from the
    `MetricRecord` key `num-examples`) and the legacy `FitRes` layout (`fitres.parameters`,
    `fitres.num_examples`). `INPUT_RECORD`, when present, overrides the weight and supplies the
    rounding seed. The returned content keeps metrics and status, never arrays.
    """
    from flwr.app import RecordDict

    legacy = "fitres.parameters" in content.array_records
    if legacy:
        arrays = content.array_records["fitres.parameters"]
    elif len(content.array_records) == 1:
        arrays = next(iter(content.array_records.values()))
    else:
        raise FlowerIntegrationError(
            f"the ClientApp's train reply has {len(content.array_records)} ArrayRecords; secure aggregation "
            "needs exactly one (the update to sum)"
        )
    vector = flatten_arrays(arrays.to_numpy_ndarrays())
    weight = 1.0
    for metrics in content.metric_records.values():
        for key in ("num-examples", "num_examples"):
            if key in metrics:
                weight = float(metrics[key])  # type: ignore[arg-type]
    seed = context = None
    if INPUT_RECORD in content.config_records:
        extra = content.config_records[INPUT_RECORD]
        weight = float(extra.get("weight", weight))  # type: ignore[arg-type]
        raw = extra.get("rounding_seed")
        seed = bytes(raw) if raw is not None else None  # type: ignore[arg-type]
        raw = extra.get("context")
        context = bytes(raw) if raw is not None else None  # type: ignore[arg-type]
    rest = RecordDict()
    for name, record in content.items():
        if name not in content.array_records and name != INPUT_RECORD:
            rest[name] = record
    return ClientUpdate(vector, weight, seed, context), rest
