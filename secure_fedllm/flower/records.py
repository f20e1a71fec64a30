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
the session's `export_state(include_input=False)` plus the stage reached (a ClientApp process may be
new for each message, so nothing may stay in Python objects). The update itself is stored once, under
`UPDATE_RECORD`, as the raw little-endian bytes of its own dtype (float32 stays float32), until the
protected input has left; the session record names its fingerprint, so a missing, truncated or altered
update fails with a typed error instead of entering the sum.

Arrays travel as raw bytes: the update is read from the ClientApp's `ArrayRecord` through views of
Flower's own `.npy` buffers (no `np.load` copy, no float64 round trip), and protocol payloads are one
`bytes` value each (a `ConfigRecord` bytes value costs Flower's serialiser the same as a one-`Array`
`ArrayRecord` of uint8; see the notes of `benchmarks/flower_round.py`).

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
    from flwr.app import ConfigRecord, RecordDict

__all__ = [
    "FAMILIES",
    "IDENTIFY",
    "INPUT_DTYPES",
    "INPUT_RECORD",
    "PROTOCOL_RECORD",
    "STATE_RECORD",
    "UPDATE_RECORD",
    "ClientUpdate",
    "FlowerIntegrationError",
    "RoundFamily",
    "RoundSetup",
    "config_record",
    "family_name",
    "flat_dtype",
    "flat_update",
    "flatten_arrays",
    "npy_layout",
    "split_vector",
]

PROTOCOL_RECORD = "secure_fedllm.secagg"
"""ConfigRecord in a message's content: the protocol bytes and, in the first message, the setup."""
STATE_RECORD = "secure_fedllm.secagg.state"
"""ConfigRecord in a node's Context.state: the exported client session (SECRET) and its stage."""
UPDATE_RECORD = "secure_fedllm.secagg.update"
"""ConfigRecord in a node's Context.state while its protected input has not left (SECRET): `data` (bytes
holding the flat update, raw little-endian, from byte `offset`: the ClientApp's own `.npy` buffer when
its update is one array of the input dtype, so storing it copies nothing), `offset`, `dtype` ("<f4",
"<f8" or "<i8") and `count`. Written once at setup, never re-exported, dropped once the input left."""
INPUT_RECORD = "secure_fedllm.input"
"""Optional ConfigRecord a ClientApp adds to its reply: `weight` (float), `rounding_seed` (bytes) and
`context` (bytes: the round context the ClientApp trained for; the session refuses any other)."""

SETUP, STEP = "setup", "step"
IDENTIFY = "identify"
"""Stage of a message asking a node for its public identity key (reply: `identity_public_key`, 32 bytes)."""


class FlowerIntegrationError(SecureFedLLMError):
    """A Flower message, reply or configuration does not fit the protocol; the message names the fix."""


def config_record(records: RecordDict, name: str) -> ConfigRecord | None:
    """The `ConfigRecord` called `name` in a `RecordDict` (a message's content, a node's state), or None.

    Read straight from the RecordDict: Flower's `config_records` view rebuilds, type-checks and
    re-assigns every record of the dict on each access (about 0.1 ms for a node's state), which the
    mod would otherwise pay several times per message.
    """
    from flwr.app import ConfigRecord

    record = records.get(name)
    return record if isinstance(record, ConfigRecord) else None


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
    """What a ClientApp's reply contributes: its flat vector, its weight and an optional rounding seed.

    `vector` is a read-only view of `buffer` from byte `offset` (raw little-endian values of
    `vector.dtype`): a host stores `buffer` as it is, without a copy.
    """

    vector: npt.NDArray[np.float32] | npt.NDArray[np.float64] | npt.NDArray[np.int64]
    weight: float
    rounding_seed: bytes | None
    context: bytes | None = None
    buffer: bytes | None = None
    offset: int = 0


INPUT_DTYPES = (np.dtype("<f4"), np.dtype("<f8"), np.dtype("<i8"))
"""The dtypes of a flat update: float32 and float64 (encoded by the protocol) and int64 (ring elements)."""


def flat_dtype(arrays: Iterable[npt.NDArray[Any]]) -> np.dtype[Any]:
    """The dtype the protocol takes these arrays in, without widening what it encodes directly.

    All integers (distributed DP's rounded, noised sums) give int64, the protocol's ring input, which
    must not pass through floats; floats of at most 32 bits give float32 (a float32 update makes no
    float64 round trip); anything else (float64, mixed widths, booleans) gives float64.
    """
    dtypes = [np.asarray(a).dtype for a in arrays]
    if dtypes and all(np.issubdtype(t, np.integer) for t in dtypes):
        return INPUT_DTYPES[2]
    if dtypes and all(np.issubdtype(t, np.floating) and t.itemsize <= 4 for t in dtypes):
        return INPUT_DTYPES[0]
    return INPUT_DTYPES[1]


def flatten_arrays(
    arrays: Iterable[npt.NDArray[Any]],
) -> npt.NDArray[np.float32] | npt.NDArray[np.float64] | npt.NDArray[np.int64]:
    """Concatenate arrays in order into one vector (the protocol's input), in `flat_dtype`.

    One C-contiguous array already in that dtype comes back as a flat view (no copy); otherwise the
    values are copied once, converted on the way.
    """
    arrays = [np.asarray(a) for a in arrays]
    if not arrays:
        return np.zeros(0)
    dtype = flat_dtype(arrays)
    if len(arrays) == 1:
        return arrays[0].reshape(-1).astype(dtype, copy=False)
    return np.concatenate([a.reshape(-1) for a in arrays], dtype=dtype, casting="unsafe")


def split_vector(
    vector: npt.NDArray[Any],
    shapes: Iterable[tuple[int, ...]],
    dtypes: Iterable[npt.DTypeLike] | None = None,
) -> list[npt.NDArray[Any]]:
    """Inverse of `flatten_arrays` for the given shapes, each part in its array's own float dtype.

    With `dtypes` (the model's), a float array gets its own dtype back (a float32 model stays float32,
    as Flower's FedAvg keeps it); other arrays, and all of them without `dtypes`, get float64 (a mean of
    integers is not an integer).
    """
    shapes = list(shapes)
    kinds = [np.dtype(t) for t in dtypes] if dtypes is not None else [np.dtype(np.float64)] * len(shapes)
    if len(kinds) != len(shapes):
        raise FlowerIntegrationError(f"{len(shapes)} shapes but {len(kinds)} dtypes")
    out, offset = [], 0
    for shape, kind in zip(shapes, kinds, strict=True):
        size = int(np.prod(shape, dtype=np.int64))
        target = kind if np.issubdtype(kind, np.floating) else np.dtype(np.float64)
        out.append(np.asarray(vector[offset : offset + size], dtype=target).reshape(shape))
        offset += size
    if offset != len(vector):
        raise FlowerIntegrationError(f"the shapes hold {offset} values but the vector has {len(vector)}")
    return out


_NPY_MAGIC = b"\x93NUMPY"


def npy_layout(data: bytes) -> tuple[tuple[int, ...], np.dtype[Any], bool, int]:
    """(shape, dtype, fortran_order, data offset) of `.npy` bytes (a Flower `Array`'s data), reading the header only.

    Raises:
        FlowerIntegrationError: not `.npy` bytes, or the header disagrees with the data's length.
    """
    import io

    if not isinstance(data, bytes) or not data.startswith(_NPY_MAGIC) or len(data) < 10:
        raise FlowerIntegrationError("an Array's data is not in the .npy format (stype numpy.ndarray)")
    header_len = int.from_bytes(data[8:10], "little") if data[6] == 1 else int.from_bytes(data[8:12], "little")
    start = (10 if data[6] == 1 else 12) + header_len
    try:
        stream = io.BytesIO(data[:start])
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(stream)
    except ValueError as exc:
        raise FlowerIntegrationError(f"an Array's .npy header is malformed: {exc}") from None
    size = int(np.prod(shape, dtype=np.int64))
    if dtype.hasobject or len(data) - start != size * dtype.itemsize:
        raise FlowerIntegrationError(
            f"an Array's .npy header says {shape} {dtype} but {len(data) - start} data bytes follow it"
        )
    return tuple(shape), dtype, bool(fortran), start


def _array_view(array: Any) -> tuple[npt.NDArray[Any], bytes | None, int]:
    """A read-only ndarray over a Flower `Array`'s own bytes (no copy), its buffer and data offset.

    Arrays not in the `.npy` format (another stype) are decoded by Flower (`Array.numpy()`, a copy).
    """
    from flwr.common.constant import SType

    if array.stype != SType.NUMPY:
        try:
            return np.asarray(array.numpy()), None, 0
        except TypeError as exc:
            raise FlowerIntegrationError(f"the ClientApp's update holds an Array Flower cannot decode: {exc}") from None
    shape, dtype, fortran, start = npy_layout(array.data)
    size = int(np.prod(shape, dtype=np.int64))
    flat = np.frombuffer(array.data, dtype=dtype, count=size, offset=start)
    view = flat.reshape(shape, order="F" if fortran else "C")
    return view, array.data if not fortran else None, start


def flat_update(record: Any) -> tuple[npt.NDArray[Any], bytes, int]:
    """The flat update of a reply's `ArrayRecord`: (read-only vector, the bytes it views, its byte offset).

    One array already in the input dtype (`flat_dtype`), in C order and little-endian, is the
    ClientApp's own buffer: nothing is copied. Several arrays are joined once into a new buffer,
    converted on the way where their dtype is not the input dtype.
    """
    views = [_array_view(a) for a in record.values()]
    dtype = flat_dtype([v for v, _, _ in views])
    if len(views) == 1:
        view, data, start = views[0]
        if data is not None and view.dtype == dtype and view.flags.c_contiguous:
            return view.reshape(-1), data, start
    parts = [np.ascontiguousarray(v.reshape(-1), dtype=dtype) for v, _, _ in views]
    data = b"".join(part.data for part in parts)  # one copy, into the bytes the node stores
    return np.frombuffer(data, dtype=dtype), data, 0


def extract_update(content: RecordDict) -> tuple[ClientUpdate, RecordDict]:
    """Take the update out of a ClientApp's train reply; return it and the reply without it.

    Understands both Flower surfaces: the Message API (one `ArrayRecord`, weight from the
    `MetricRecord` key `num-examples`) and the legacy `FitRes` layout (`fitres.parameters`,
    `fitres.num_examples`). `INPUT_RECORD`, when present, overrides the weight and supplies the
    rounding seed. The returned content keeps metrics and status, never arrays. The update is read
    through views of the arrays' own bytes (`flat_update`): a float32 update stays float32.
    """
    from flwr.app import ArrayRecord, MetricRecord, RecordDict

    array_records = {k: v for k, v in content.items() if isinstance(v, ArrayRecord)}
    if "fitres.parameters" in array_records:
        arrays = array_records["fitres.parameters"]
    elif len(array_records) == 1:
        arrays = next(iter(array_records.values()))
    else:
        raise FlowerIntegrationError(
            f"the ClientApp's train reply has {len(array_records)} ArrayRecords; secure aggregation "
            "needs exactly one (the update to sum)"
        )
    vector, buffer, offset = flat_update(arrays)
    weight = 1.0
    for metrics in (v for v in content.values() if isinstance(v, MetricRecord)):
        for key in ("num-examples", "num_examples"):
            if key in metrics:
                weight = float(metrics[key])  # type: ignore[arg-type]
    seed = context = None
    extra = config_record(content, INPUT_RECORD)
    if extra is not None:
        weight = float(extra.get("weight", weight))  # type: ignore[arg-type]
        raw = extra.get("rounding_seed")
        seed = bytes(raw) if raw is not None else None  # type: ignore[arg-type]
        raw = extra.get("context")
        context = bytes(raw) if raw is not None else None  # type: ignore[arg-type]
    rest = RecordDict()
    for name, record in content.items():
        if name not in array_records and name != INPUT_RECORD:
            rest[name] = record
    return ClientUpdate(vector, weight, seed, context, buffer, offset), rest
