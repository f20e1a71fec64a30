"""Our protocol over Flower messages: Message API and legacy fit workflow, against our driver and Flower's SecAgg+."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest

flwr = pytest.importorskip("flwr")

import flwr.compat.common.recorddict_compat as compat  # noqa: E402
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.client.mod import secaggplus_mod  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters  # noqa: E402
from flwr.server.client_manager import SimpleClientManager  # noqa: E402
from flwr.server.compat.grid_client_proxy import GridClientProxy  # noqa: E402
from flwr.server.compat.legacy_context import LegacyContext  # noqa: E402
from flwr.server.server_config import ServerConfig  # noqa: E402
from flwr.server.strategy import FedAvg  # noqa: E402
from flwr.server.workflow import SecAggPlusWorkflow  # noqa: E402
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD  # noqa: E402
from flwr.server.workflow.constant import Key as WorkflowKey  # noqa: E402

from protocols import AbortError, InsecureParameterError, RoundStep, SecAggParams, run_round  # noqa: E402
from protocols.primitives import ed25519_public  # noqa: E402
from secure_fedllm.flower import (  # noqa: E402
    INPUT_RECORD,
    PROTOCOL_RECORD,
    STATE_RECORD,
    FlowerIntegrationError,
    LocalGrid,
    SecureAggregationMod,
    SecureFitWorkflow,
    secure_aggregate,
    secure_aggregation_mod,
)

N, D = 10, 600
_ADVERTISE, _SHARE, _INPUT = RoundStep.ADVERTISE, RoundStep.SHARE, RoundStep.INPUT
_CONFIRM, _UNMASK = RoundStep.CONFIRM, RoundStep.UNMASK


def _inputs(n: int = N, d: int = D, scale: float = 0.1) -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    return [rng.uniform(-scale, scale, d) for _ in range(n)]


def _seeds(n: int = N) -> list[bytes]:
    return [hashlib.sha256(b"rounding|%d" % i).digest() for i in range(n)]


def _message_api_app(inputs: list[np.ndarray], mod: object = secure_aggregation_mod, weights=None) -> ClientApp:
    app = ClientApp(mods=[mod])  # type: ignore[list-item]
    seeds = _seeds(len(inputs))

    @app.train()
    def train(msg: Message, ctx: Context) -> Message:
        i = int(ctx.node_config["partition-id"])
        w = 1.0 if weights is None else weights[i]
        return Message(
            RecordDict(
                {
                    "arrays": ArrayRecord([inputs[i][:200], inputs[i][200:].reshape(-1, 20)]),
                    "metrics": MetricRecord({"num-examples": w, "train-loss": 0.5}),
                    INPUT_RECORD: ConfigRecord({"rounding_seed": seeds[i]}),
                }
            ),
            reply_to=msg,
        )

    return app


def _round(grid: LocalGrid, params: SecAggParams, **kw: object):
    return secure_aggregate(grid, {node: RecordDict() for node in grid.get_node_ids()}, params, round_number=3,
                            train_timeout=0.05, stage_timeout=0.05, poll_interval=0.001, **kw)  # fmt: skip


@pytest.mark.parametrize(
    ("silence", "drop_at", "malicious"),
    [
        ({}, {}, False),
        ({2: 1, 5: 2, 9: 3}, {1: _SHARE, 4: _INPUT, 8: _UNMASK}, False),  # dropouts at shares, masked input, unmask
        # malicious SecAgg+: message 1 of a node is the roster (answered with its graph reveal), so the
        # later stages come one message later than in the semi-honest rows
        ({4: 0, 6: 3}, {3: _ADVERTISE, 5: _INPUT}, True),  # signatures and the consistency round
        ({3: 4}, {2: _CONFIRM}, True),  # silent at the consistency round
    ],
)
def test_ring_sum_bit_exact_with_our_driver(tmp_path, silence, drop_at, malicious) -> None:
    inputs = _inputs()
    configs: list[dict[str, object]] = [{"partition-id": i} for i in range(N)]
    keys = None
    if malicious:
        keys = [os.urandom(32) for _ in range(N)]
        for i, key in enumerate(keys):
            (tmp_path / f"id{i}.key").write_text(key.hex())
            configs[i]["secagg-identity-key"] = str(tmp_path / f"id{i}.key")
    pubs = tuple(ed25519_public(k) for k in keys) if keys else None
    params = SecAggParams.secagg_plus(N, dimension=D, clip_range=0.1, dropout_rate=0.3, identity_keys=pubs)
    grid = LocalGrid(_message_api_app(inputs), configs, silence=silence)
    ours = _round(grid, params, context=b"plan")
    ref = run_round(params, inputs, drop_at=drop_at, rounding_seeds=_seeds(), round_number=3, context=b"plan",
                    identity_keys=keys)  # fmt: skip
    assert ours.aggregate.included == ref.result.included
    assert np.array_equal(ours.aggregate.ring_sum, ref.result.ring_sum)
    assert set(ours.failures) == {node for node in silence}
    survivors = [inputs[i] for i in ours.aggregate.included]
    assert np.abs(ours.mean() - np.mean(survivors, axis=0)).max() <= ours.aggregate.decoded.max_abs_error
    # metrics come back, arrays never do
    for content in ours.replies.values():
        assert not content.array_records
        assert content.metric_records["metrics"]["train-loss"] == 0.5
    # the session lived in Context.state as bytes between messages
    state = grid.contexts[1].state.config_records[STATE_RECORD]
    assert isinstance(state["session_state"], bytes)


def test_too_many_silent_nodes_abort_and_reveal_nothing() -> None:
    inputs = _inputs()
    params = SecAggParams.secagg_plus(N, dimension=D, clip_range=0.1, dropout_rate=0.3)
    grid = LocalGrid(_message_api_app(inputs), [{"partition-id": i} for i in range(N)],
                     silence={n: 3 for n in range(1, 8)})  # fmt: skip
    with pytest.raises(AbortError):
        _round(grid, params)


def test_node_refuses_insecure_params_unless_it_opts_in() -> None:
    inputs = _inputs()
    params = SecAggParams.secagg(N, dimension=D, clip_range=0.1, threshold=2, corrupt_fraction=0.2, allow_insecure=True)
    with pytest.raises(InsecureParameterError):
        SecAggParams.secagg(N, dimension=D, clip_range=0.1, threshold=2, corrupt_fraction=0.2)
    grid = LocalGrid(_message_api_app(inputs), [{"partition-id": i} for i in range(N)])
    with pytest.raises(AbortError):
        _round(grid, params)
    assert all("secagg-allow-insecure" in why for why in grid_failures(grid, params).values())
    grid = LocalGrid(_message_api_app(inputs), [{"partition-id": i, "secagg-allow-insecure": True} for i in range(N)])
    assert _round(grid, params).aggregate.insecure


def grid_failures(grid: LocalGrid, params: SecAggParams) -> dict[int, str]:
    """Failures of the setup stage alone (the round itself aborts)."""
    from secure_fedllm.flower.grid_round import _Exchange
    from secure_fedllm.flower.records import RoundSetup

    failures: dict[int, str] = {}
    session = os.urandom(16)
    contents = {
        node: RecordDict({PROTOCOL_RECORD: ConfigRecord(RoundSetup(params, node - 1, session, 9, b"").to_record())})
        for node in grid.get_node_ids()
    }
    replies = _Exchange(grid, "train", "9", 0.001, lambda: 0.0, lambda _s: None).run(contents, 1.0, failures)
    for node, reply in replies.items():
        assert reply.has_error()
        failures[node] = reply.error.reason
    return failures


def test_wrong_dimension_and_missing_mod_are_named_dropouts() -> None:
    inputs = _inputs()
    params = SecAggParams.secagg_plus(N, dimension=D + 1, clip_range=0.1, dropout_rate=0.3)
    grid = LocalGrid(_message_api_app(inputs), [{"partition-id": i} for i in range(N)])
    failures = grid_failures(grid, params)
    assert all("params.dimension is 601" in why for why in failures.values())

    plain = ClientApp()

    @plain.train()
    def train(msg: Message, ctx: Context) -> Message:
        return Message(RecordDict({"arrays": ArrayRecord([np.zeros(D)])}), reply_to=msg)

    params = SecAggParams.secagg_plus(N, dimension=D, clip_range=0.1, dropout_rate=0.3)
    with pytest.raises(AbortError):
        _round(LocalGrid(plain, [{}] * N), params)


def test_a_node_writing_as_another_party_is_dropped() -> None:
    inputs = _inputs()
    honest = SecureAggregationMod()

    def impostor(msg: Message, ctx: Context, call_next):  # node 2 rewrites its party id in the setup
        if ctx.node_id == 2 and PROTOCOL_RECORD in msg.content.config_records:
            record = msg.content.config_records[PROTOCOL_RECORD]
            if record.get("stage") == "setup":
                record["party"] = 0
        return honest(msg, ctx, call_next)

    params = SecAggParams.secagg_plus(N, dimension=D, clip_range=0.1, dropout_rate=0.3)
    grid = LocalGrid(_message_api_app(inputs, mod=impostor), [{"partition-id": i} for i in range(N)])
    out = _round(grid, params)
    assert "node 2 is party 1 but wrote as 0" in out.failures[2]
    assert 1 not in out.aggregate.included


def test_a_replayed_stage_message_cannot_roll_the_session_back() -> None:
    inputs = _inputs(n=3)
    params = SecAggParams.secagg(3, dimension=D, clip_range=0.1)
    app = _message_api_app(inputs)
    grid = LocalGrid(app, [{"partition-id": i} for i in range(3)])
    sent: list[Message] = []
    original = grid.push_messages

    def record(messages):
        messages = list(messages)
        sent.extend(messages)
        return original(messages)

    grid.push_messages = record  # type: ignore[method-assign]
    _round(grid, params)
    # replay node 1's second message (the key roster) after the round: the session refuses it
    second = [m for m in sent if m.metadata.dst_node_id == 1][1]
    reply = app(second, grid.contexts[1])
    assert reply.has_error() and "not expected" in reply.error.reason
    assert STATE_RECORD not in grid.contexts[1].state.config_records  # the session is gone


def test_params_mismatch_is_a_typed_error() -> None:
    params = SecAggParams.secagg(4, dimension=D, clip_range=0.1)
    grid = LocalGrid(_message_api_app(_inputs()), [{"partition-id": i} for i in range(N)])
    with pytest.raises(FlowerIntegrationError, match="num_parties is 4"):
        _round(grid, params)


# -- legacy API: our fit workflow vs Flower's SecAgg+ on the same inputs ---------------------------


def _legacy_app(inputs: list[np.ndarray], mod: object) -> ClientApp:
    def fit(msg: Message, ctx: Context) -> Message:
        i = int(ctx.node_config["partition-id"])
        fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([inputs[i]]), num_examples=1, metrics={"i": i})
        return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)

    app = ClientApp(mods=[mod])  # type: ignore[list-item]
    app.train()(fit)
    return app


def _legacy_round(grid: LocalGrid, workflow: object, n: int, d: int):
    manager = SimpleClientManager()
    for nid in grid.get_node_ids():
        manager.register(GridClientProxy(nid, grid, 1))
    captured: dict[str, object] = {}
    strategy = FedAvg(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=n, min_available_clients=n)
    inner = strategy.aggregate_fit

    def aggregate_fit(rnd, results, failures):
        captured["results"], captured["failures"] = results, failures
        return inner(rnd, results, failures)

    strategy.aggregate_fit = aggregate_fit  # type: ignore[method-assign]
    base = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    ctx = LegacyContext(base, config=ServerConfig(num_rounds=1), strategy=strategy, client_manager=manager)
    ctx.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: 1})
    ctx.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord([np.zeros(d)])
    workflow(grid, ctx)  # type: ignore[operator]
    return ctx.state.array_records[MAIN_PARAMS_RECORD].to_numpy_ndarrays()[0], captured


def test_fit_workflow_drop_in_matches_flower_secaggplus_within_its_quantization() -> None:
    n, d = 10, 500
    inputs = _inputs(n, d, scale=1.0)
    configs = [{"partition-id": i} for i in range(n)]
    ours, captured = _legacy_round(
        LocalGrid(_legacy_app(inputs, secure_aggregation_mod), configs, silence={4: 2}),
        SecureFitWorkflow(
            num_shares=7, reconstruction_threshold=4, max_weight=1.0, clipping_range=8.0, dropout_rate=0.3, timeout=0.05
        ),
        n,
        d,
    )
    survivors = [i for i in range(n) if i != 3]
    exact = np.mean([inputs[i] for i in survivors], axis=0)
    assert len(captured["results"]) == 9 and len(captured["failures"]) == 1  # type: ignore[arg-type]
    assert sorted(r[1].metrics["i"] for r in captured["results"]) == survivors  # type: ignore[union-attr]
    assert np.abs(ours - exact).max() < 9 * 16 / 2**32 * 4  # n * (2c / levels) per coordinate, 32-bit ring
    flower, _ = _legacy_round(
        LocalGrid(_legacy_app(inputs, secaggplus_mod), configs),
        SecAggPlusWorkflow(num_shares=7, reconstruction_threshold=4, max_weight=1.0, clipping_range=8.0),
        n,
        d,
    )
    full = np.mean(inputs, axis=0)
    assert np.abs(flower - full).max() < 2 * 8.0 / 2**22  # Flower's own quantization step
    assert np.abs(ours - exact).max() < np.abs(flower - full).max()  # and ours is finer


def test_fit_workflow_knobs() -> None:
    wf = SecureFitWorkflow(
        num_shares=0.5, reconstruction_threshold=0.6, clipping_range=1.0, dropout_rate=0.05, allow_insecure=True
    )
    params = wf.params_for(list(range(1, 21)), 100)
    assert params.neighbours == 10 and params.threshold == round(0.6 * 11)
    assert SecureFitWorkflow().params_for(list(range(1, 21)), 100).threshold >= 2
    with pytest.raises(ValueError, match="both"):
        SecureFitWorkflow(num_shares=5)
    with pytest.raises(InsecureParameterError):
        SecureFitWorkflow(num_shares=3, reconstruction_threshold=2).params_for(list(range(1, 51)), 10)
