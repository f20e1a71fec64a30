"""Issue 17, inside Flower: the update is stored once, never re-exported, and a float32 update stays float32.

LocalGrid with the real `SecureAggregationMod`. The session record persisted after each stage holds no
input (its size does not grow with d; the weakened control that exports the input makes it grow by
4 bytes per coordinate); the stored update is the ClientApp's own bytes (the same object, no copy) and
is dropped once the masked input left; a float32 update is summed as its float64 cast is, within the
encoding's rounding bound, and the fit workflow keeps a float32 model float32; a stored update that is
missing, truncated or altered makes the node a dropout with a typed error, never a wrong sum (the
weakened control without the fingerprint check sums the altered values).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

pytest.importorskip("flwr")

import flwr.compat.common.recorddict_compat as compat
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.server.client_manager import SimpleClientManager
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.server_config import ServerConfig
from flwr.server.strategy import FedAvg
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey

from protocols import SecAggParams
from secure_fedllm.flower import (
    INPUT_RECORD,
    STATE_RECORD,
    LocalGrid,
    SecureFitWorkflow,
    client_mod,
    flatten_arrays,
    secure_aggregate,
    secure_aggregation_mod,
    split_vector,
)
from secure_fedllm.flower.records import UPDATE_RECORD, flat_update

N = 6


def _inputs(d: int, dtype: Any = np.float32, n: int = N) -> list[np.ndarray]:
    rng = np.random.default_rng(17)
    return [rng.uniform(-0.1, 0.1, d).astype(dtype) for _ in range(n)]


def _seed(i: int) -> bytes:
    return hashlib.sha256(b"rounding|%d" % i).digest()


def _app(inputs: list[np.ndarray], sent: dict[int, Any] | None = None) -> ClientApp:
    """Message API ClientApp returning one array (its Array object is recorded in `sent`)."""
    app = ClientApp(mods=[secure_aggregation_mod])

    @app.train()
    def train(msg: Message, ctx: Context) -> Message:
        i = int(ctx.node_config["partition-id"])  # type: ignore[arg-type]
        arrays = ArrayRecord([inputs[i]])
        if sent is not None:
            sent[ctx.node_id] = next(iter(arrays.values()))
        content = {
            "arrays": arrays,
            "metrics": MetricRecord({"num-examples": 1.0}),
            INPUT_RECORD: ConfigRecord({"rounding_seed": _seed(i)}),
        }
        return Message(RecordDict(content), reply_to=msg)

    return app


def _params(d: int, n: int = N) -> SecAggParams:
    return SecAggParams.secagg_plus(n, dimension=d, clip_range=0.1, dropout_rate=0.34)


def _round(grid: LocalGrid, d: int):
    return secure_aggregate(grid, {node: RecordDict() for node in grid.get_node_ids()}, _params(d), round_number=1,
                            train_timeout=0.05, stage_timeout=0.05, poll_interval=0.001)  # fmt: skip


def _state_sizes(monkeypatch: pytest.MonkeyPatch, d: int) -> dict[str, int]:
    """Bytes of node 1's persisted session after each stage, by stage name, for a round at dimension d."""
    sizes: dict[str, int] = {}
    original = client_mod._persist

    def recording(context, client, setup, release):  # type: ignore[no-untyped-def]
        original(context, client, setup, release)
        if context.node_id == 1:
            sizes[client.stage.name] = len(context.state.config_records[STATE_RECORD]["session_state"])  # type: ignore[arg-type]

    with monkeypatch.context() as patch:
        patch.setattr(client_mod, "_persist", recording)
        grid = LocalGrid(_app(_inputs(d)), [{"partition-id": i} for i in range(N)])
        assert _round(grid, d).aggregate.included == tuple(range(N))
    return sizes


def _independent_of_d(small: dict[str, int], large: dict[str, int]) -> bool:
    return small.keys() == large.keys() and all(abs(large[k] - small[k]) < 16 for k in small)


def test_the_persisted_session_holds_no_input(monkeypatch) -> None:
    small, large = _state_sizes(monkeypatch, 200), _state_sizes(monkeypatch, 2_000)
    assert {"ADVERTISED", "SHARED", "MASKED"} <= small.keys()
    assert _independent_of_d(small, large), (small, large)


def test_control_exporting_the_input_makes_the_session_grow_with_d(monkeypatch) -> None:
    monkeypatch.setattr(client_mod, "_export", lambda client: client.export_state())  # the input in every stage
    small, large = _state_sizes(monkeypatch, 200), _state_sizes(monkeypatch, 2_000)
    assert not _independent_of_d(small, large)
    assert large["SHARED"] - small["SHARED"] >= 4 * 1_800  # the encoded (or raw) input rides along


def test_the_update_is_stored_once_as_the_clientapps_own_bytes_and_dropped_after_masking() -> None:
    d = 300
    sent: dict[int, Any] = {}
    seen: dict[int, Any] = {}
    app = _app(_inputs(d), sent)

    def watching(message: Message, context: Context) -> Message:
        reply = app(message, context)
        record = context.state.config_records.get(UPDATE_RECORD)
        if record is not None and context.node_id not in seen:
            seen[context.node_id] = record
        return reply

    grid = LocalGrid(watching, [{"partition-id": i} for i in range(N)])  # type: ignore[arg-type]
    outcome = _round(grid, d)
    assert outcome.aggregate.included == tuple(range(N))
    for node, record in seen.items():
        assert record["data"] is sent[node].data  # the ClientApp's buffer itself: nothing copied
        assert record["dtype"] == "<f4" and record["count"] == d  # float32 stays float32
        assert UPDATE_RECORD not in grid.contexts[node].state.config_records  # dropped once the input left
        assert "update_fingerprint" not in grid.contexts[node].state.config_records[STATE_RECORD]
    assert len(seen) == N


def test_a_float32_update_sums_as_its_float64_cast() -> None:
    d = 500
    singles = _inputs(d, np.float32)
    doubles = [x.astype(np.float64) for x in singles]
    ours32 = _round(LocalGrid(_app(singles), [{"partition-id": i} for i in range(N)]), d)
    ours64 = _round(LocalGrid(_app(doubles), [{"partition-id": i} for i in range(N)]), d)
    bound = ours64.aggregate.decoded.max_abs_error / N  # the mean's rounding bound
    exact = np.mean(doubles, axis=0)
    assert np.abs(ours64.mean() - exact).max() <= bound
    assert np.abs(ours32.mean() - exact).max() <= bound
    assert np.abs(ours32.mean() - ours64.mean()).max() <= 2 * bound
    # and in fact bit for bit: a float32 value is exact in float64 and the encoding computes in float64
    assert np.array_equal(ours32.aggregate.ring_sum, ours64.aggregate.ring_sum)


def _fit_round(inputs: list[np.ndarray], model_dtype: Any) -> np.ndarray:
    """One legacy DefaultWorkflow-style fit round (our SecureFitWorkflow + FedAvg) from a zero model."""
    n, d = len(inputs), inputs[0].size

    def fit(msg: Message, ctx: Context) -> Message:
        i = int(ctx.node_config["partition-id"])  # type: ignore[arg-type]
        fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([inputs[i]]), num_examples=1, metrics={})
        return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)

    app = ClientApp(mods=[secure_aggregation_mod])
    app.train()(fit)
    grid = LocalGrid(app, [{"partition-id": i} for i in range(n)])
    manager = SimpleClientManager()
    for node in grid.get_node_ids():
        manager.register(GridClientProxy(node, grid, 1))
    strategy = FedAvg(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=n, min_available_clients=n)
    base = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    ctx = LegacyContext(base, config=ServerConfig(num_rounds=1), strategy=strategy, client_manager=manager)
    ctx.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: 1})
    ctx.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord([np.zeros(d, dtype=model_dtype)])
    SecureFitWorkflow(max_weight=1.0, clipping_range=0.1, dropout_rate=0.34, timeout=0.05)(grid, ctx)
    return ctx.state.array_records[MAIN_PARAMS_RECORD].to_numpy_ndarrays()[0]


def test_the_fit_workflow_keeps_a_float32_model_float32() -> None:
    singles = _inputs(400, np.float32)
    model32 = _fit_round(singles, np.float32)
    model64 = _fit_round([x.astype(np.float64) for x in singles], np.float64)
    assert model32.dtype == np.float32 and model64.dtype == np.float64  # as FedAvg without secure aggregation
    exact = np.mean([x.astype(np.float64) for x in singles], axis=0)
    step = 2 * 0.1 * N / 2**32  # n * (2c / 2^b): the 32-bit ring's bound on the mean, as in the Flower test
    assert np.abs(model64 - exact).max() <= step
    assert np.abs(model32 - exact).max() <= step + np.spacing(np.float32(0.1))  # plus float32's rounding


def _tampering_app(app: ClientApp, node: int, tamper: Callable[[Context], None]) -> Callable[..., Message]:
    """The ClientApp, with `tamper` applied to `node`'s state right before its second message (after setup)."""
    count: dict[int, int] = {}

    def call(message: Message, context: Context) -> Message:
        count[context.node_id] = count.get(context.node_id, 0) + 1
        if context.node_id == node and count[node] == 2:
            tamper(context)
        return app(message, context)

    return call


def _flip_first_sign(context: Context) -> None:
    record = context.state.config_records[UPDATE_RECORD]
    data = bytearray(record["data"])  # type: ignore[arg-type]
    data[int(record["offset"]) + 3] ^= 0x80  # type: ignore[arg-type]  # coordinate 0: x -> -x (float32, little-endian)
    record["data"] = bytes(data)


def _truncate(context: Context) -> None:
    record = context.state.config_records[UPDATE_RECORD]
    record["data"] = bytes(record["data"])[:-4]  # type: ignore[arg-type]


def _remove(context: Context) -> None:
    del context.state[UPDATE_RECORD]


class _ErrorGrid(LocalGrid):
    """LocalGrid that keeps the reason of every error reply."""

    def push_messages(self, messages):  # type: ignore[no-untyped-def]
        ids = list(super().push_messages(messages))
        self.errors = getattr(self, "errors", []) + [
            self._replies[mid].error.reason for mid in ids if mid in self._replies and self._replies[mid].has_error()
        ]
        return ids


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        (_flip_first_sign, "not the update this session was set up with"),
        (_truncate, "is corrupt"),
        (_remove, "is missing"),
    ],
)
def test_a_corrupt_stored_update_is_a_typed_error_not_a_wrong_sum(tamper, reason) -> None:
    d = 300
    inputs = _inputs(d)
    grid = _ErrorGrid(_tampering_app(_app(inputs), 1, tamper), [{"partition-id": i} for i in range(N)])  # type: ignore[arg-type]
    outcome = _round(grid, d)
    assert outcome.aggregate.included == tuple(range(1, N))  # node 1 (party 0) dropped out
    assert any("FlowerIntegrationError" in why and reason in why for why in grid.errors), grid.errors
    assert UPDATE_RECORD not in grid.contexts[1].state.config_records  # erased with the session
    exact = np.mean([inputs[i].astype(np.float64) for i in range(1, N)], axis=0)
    assert np.abs(outcome.mean() - exact).max() <= outcome.aggregate.decoded.max_abs_error / (N - 1)


def test_control_without_the_fingerprint_check_sums_the_altered_update(monkeypatch) -> None:
    monkeypatch.setattr(client_mod, "_check_stored", lambda _stored, _fingerprint: None)
    d = 300
    inputs = _inputs(d)
    grid = LocalGrid(_tampering_app(_app(inputs), 1, _flip_first_sign), [{"partition-id": i} for i in range(N)])  # type: ignore[arg-type]
    outcome = _round(grid, d)
    assert outcome.aggregate.included == tuple(range(N))  # the altered node is in the sum
    exact = np.mean([x.astype(np.float64) for x in inputs], axis=0)
    error = np.abs(outcome.mean() - exact)
    assert error[0] > 100 * outcome.aggregate.decoded.max_abs_error / N  # a wrong sum, silently
    assert error[0] == pytest.approx(2 * abs(float(inputs[0][0])) / N, rel=1e-3)


# -- the flat update: dtypes and views ------------------------------------------------------------


def test_flatten_keeps_float32_and_integers_and_views_one_array() -> None:
    x32 = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert flatten_arrays([x32]).dtype == np.float32
    assert np.shares_memory(flatten_arrays([x32]), x32)  # one array in its dtype: a view, not a copy
    assert flatten_arrays([x32, np.ones(2, np.float16)]).dtype == np.float32
    assert flatten_arrays([x32, np.ones(2)]).dtype == np.float64  # mixed widths: float64
    assert flatten_arrays([np.arange(3, dtype=np.int32), np.arange(2, dtype=np.int64)]).dtype == np.int64
    assert flatten_arrays([np.arange(3), np.ones(2, np.float32)]).dtype == np.float64


def test_flat_update_reads_flowers_buffers_without_np_load() -> None:
    one = ArrayRecord([np.linspace(-1, 1, 7, dtype=np.float32)])
    vector, buffer, offset = flat_update(one)
    array = next(iter(one.values()))
    assert buffer is array.data and not vector.flags.writeable
    assert np.array_equal(vector, array.numpy())
    two = ArrayRecord([np.ones((2, 2), np.float32), np.full(3, 2.5, np.float32)])
    vector, buffer, offset = flat_update(two)
    assert offset == 0 and len(buffer) == 7 * 4 and vector.dtype == np.float32
    assert np.array_equal(vector, [1, 1, 1, 1, 2.5, 2.5, 2.5])


def test_split_vector_returns_the_models_float_dtypes() -> None:
    vector = np.arange(7, dtype=np.float64) / 3
    parts = split_vector(vector, [(2, 2), (3,)], [np.float32, np.int64])
    assert parts[0].dtype == np.float32 and parts[1].dtype == np.float64  # a mean of integers stays float
    assert np.array_equal(parts[0], (vector[:4] / 1).astype(np.float32).reshape(2, 2))
    assert [p.dtype for p in split_vector(vector, [(7,)])] == [np.float64]  # no dtypes: float64, as before


def test_the_fingerprint_sees_flips_swaps_and_tails() -> None:
    fingerprint = client_mod._fingerprint
    x = np.random.default_rng(3).uniform(-0.1, 0.1, 3 * 1024 + 5).astype(np.float32)  # a partial row, an odd word
    reference = fingerprint(x)
    assert fingerprint(x.copy()) == reference
    changes = {
        "sign of the first value": lambda y: y.__setitem__(0, -y[0]),
        "sign of the last value (the padded word)": lambda y: y.__setitem__(-1, -y[-1]),
        "swap of neighbours": lambda y: y.__setitem__([2, 3], y[[3, 2]]),
        "swap within a column": lambda y: y.__setitem__([14, 1024 + 14], y[[1024 + 14, 14]]),
        "swap into the tail": lambda y: y.__setitem__([6, 3 * 1024 + 2], y[[3 * 1024 + 2, 6]]),
    }
    for name, change in changes.items():
        y = x.copy()
        change(y)
        assert fingerprint(y) != reference, name
