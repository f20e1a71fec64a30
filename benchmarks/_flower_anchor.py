"""Reference anchor: Flower's real SecAgg+ run in-process on fixed numpy updates.

Why this exists: to compare our protocols against an independent, widely used
implementation, we run Flower's *unmodified* SecAgg+ code -- the client mod
``flwr.client.mod.secaggplus_mod`` and the server workflow
``flwr.server.workflow.SecAggPlusWorkflow`` -- instead of a re-implementation that
could flatter or penalise it.

How: the real workflow object is called with a ``LegacyContext`` for one fit round.
Its only link to the network is ``grid.send_and_receive``; an in-memory grid hands
each message (deep-copied, as the wire would) to the destination node's
``secaggplus_mod`` with that node's persistent ``Context``. The ClientApp behind
the mod is a stub "fit" that returns the node's fixed update with weight 1.

Accounting:
    * client time: per node, wall time inside ``secaggplus_mod`` summed over the
      four stages, minus the stub fit (that stands in for local training, which is
      not SecAgg cost). The reported value is the median over surviving nodes.
    * server time: workflow wall time minus all time inside client calls
      (stub fit included) minus the grid's message copying (transport stand-in).
    * upload: bytes of the serialised masked arrays (``np.save`` blobs) in each
      surviving node's collect-masked-vectors reply, divided by ``d``.
    * Flower's Shamir helpers spin up a ThreadPoolExecutor per call, but the work is
      pure-Python (GIL-bound), so all timings are effectively single-core.

Fixed choices (documented because they change Flower's numbers):
    * ``max_weight = 1.0``: every node reports ``num_examples = 1``. Flower scales
      the update by ``round(w / max_weight * quantization_range)`` before
      quantising, so its default ``max_weight = 1000`` would throw away ~10 bits of
      precision for unit weights. With 1.0 the weight factor equals
      ``quantization_range`` and the update is quantised at full resolution.
    * The strategy's ``aggregate_fit`` is replaced by a capture of the workflow's
      reconstructed vector; FedAvg would only re-average ``n`` identical copies.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import statistics
import time
from collections.abc import Iterable, Iterator
from types import SimpleNamespace
from typing import Any

import numpy as np

_MAX_WEIGHT = 1.0  # see module docstring: unit weights quantised at full resolution
_RUN_ID = 0


def _flwr() -> SimpleNamespace:
    """Import the Flower pieces lazily so this module imports without flwr installed."""
    try:
        import flwr.compat.common.recorddict_compat as compat
        from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
        from flwr.client.mod import secaggplus_mod
        from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
        from flwr.common.constant import SUPERLINK_NODE_ID
        from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
        from flwr.server.client_manager import SimpleClientManager
        from flwr.server.compat.grid_client_proxy import GridClientProxy
        from flwr.server.compat.legacy_context import LegacyContext
        from flwr.server.server_config import ServerConfig
        from flwr.server.strategy import FedAvg
        from flwr.server.workflow import SecAggPlusWorkflow
        from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
        from flwr.server.workflow.constant import Key as WorkflowKey
        from flwr.supercore.task_identity import TaskIdentity
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("The Flower anchor needs flwr; install it with `pip install -e .[flower]`.") from exc
    return SimpleNamespace(
        compat=compat,
        ArrayRecord=ArrayRecord,
        ConfigRecord=ConfigRecord,
        Context=Context,
        Message=Message,
        RecordDict=RecordDict,
        secaggplus_mod=secaggplus_mod,
        Code=Code,
        FitRes=FitRes,
        Status=Status,
        ndarrays_to_parameters=ndarrays_to_parameters,
        parameters_to_ndarrays=parameters_to_ndarrays,
        RECORD_KEY_CONFIGS=RECORD_KEY_CONFIGS,
        Key=Key,
        Stage=Stage,
        SimpleClientManager=SimpleClientManager,
        GridClientProxy=GridClientProxy,
        LegacyContext=LegacyContext,
        ServerConfig=ServerConfig,
        FedAvg=FedAvg,
        SecAggPlusWorkflow=SecAggPlusWorkflow,
        MAIN_CONFIGS_RECORD=MAIN_CONFIGS_RECORD,
        MAIN_PARAMS_RECORD=MAIN_PARAMS_RECORD,
        WorkflowKey=WorkflowKey,
        SUPERLINK_NODE_ID=SUPERLINK_NODE_ID,
        TaskIdentity=TaskIdentity,
    )


def flower_version() -> str:
    """Return the installed Flower version, so results can cite what was measured."""
    import importlib.metadata

    _flwr()  # same clear error as the benchmark if flwr is missing
    return importlib.metadata.version("flwr")


@contextlib.contextmanager
def _as_serverapp(fl: SimpleNamespace) -> Iterator[None]:
    """Act as a ServerApp process for the duration: quiet logs, process identity set.

    ``Message(...)`` reads the sender's run/node/task ids from the process-global
    ``TaskIdentity`` (set by Flower's ServerApp runner); we set them the way
    ``flwr.server.compat.app`` does and restore whatever was there before.
    """
    ident, flwr_logger = fl.TaskIdentity, logging.getLogger("flwr")
    saved = (ident._task_id, ident._run_id, ident._node_id, flwr_logger.disabled)
    ident.task_id, ident.run_id, ident.node_id = 1, _RUN_ID, fl.SUPERLINK_NODE_ID
    flwr_logger.disabled = True
    try:
        yield
    finally:
        ident._task_id, ident._run_id, ident._node_id, flwr_logger.disabled = saved


class _SimNode:
    """One simulated SuperNode: a persistent Context plus the real SecAgg+ mod."""

    def __init__(self, fl: SimpleNamespace, node_id: int, update: np.ndarray) -> None:
        self.fl = fl
        self.update = update
        # The mod keeps its protocol state in ctxt.state between stages, so the
        # context must outlive individual messages, exactly as on a real node.
        self.context = fl.Context(run_id=_RUN_ID, node_id=node_id, node_config={}, state=fl.RecordDict(), run_config={})
        self.call_s = 0.0  # wall time of all calls into the mod (stub fit included)
        self.fit_s = 0.0  # wall time of the stub fit alone
        self.upload_bytes = 0

    def _fit(self, msg: Any, _ctxt: Any) -> Any:
        """Stub ClientApp "fit": reply with the fixed update, weight 1."""
        t0 = time.perf_counter()
        fl = self.fl
        fitres = fl.FitRes(
            status=fl.Status(code=fl.Code.OK, message=""),
            parameters=fl.ndarrays_to_parameters([self.update]),
            num_examples=1,
            metrics={},
        )
        reply = fl.Message(fl.compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)
        self.fit_s += time.perf_counter() - t0
        return reply

    def handle(self, msg: Any) -> Any:
        """Run the real ``secaggplus_mod`` on one incoming message and time it."""
        t0 = time.perf_counter()
        reply = self.fl.secaggplus_mod(msg, self.context, self._fit)
        self.call_s += time.perf_counter() - t0
        masked = reply.content.config_records[self.fl.RECORD_KEY_CONFIGS].get(self.fl.Key.MASKED_PARAMETERS)
        if masked is not None:
            self.upload_bytes = sum(len(blob) for blob in masked)
        return reply

    @property
    def client_s(self) -> float:
        """SecAgg+ client cost: time inside the mod minus the stand-in for training."""
        return self.call_s - self.fit_s


class _InMemoryGrid:
    """Duck-typed ``flwr.serverapp.Grid`` delivering messages by direct calls.

    Single-threaded: ``push_messages`` runs each destination's mod synchronously
    and ``pull_messages`` returns the stored replies. Nodes listed in ``dropped``
    stop replying from the collect-masked-vectors stage on, which is how a
    timed-out node looks to the workflow (no reply, not an error reply).
    """

    def __init__(self, fl: SimpleNamespace, nodes: dict[int, _SimNode], dropped: set[int]) -> None:
        self.fl = fl
        self.nodes = nodes
        self.dropped = dropped
        self.transport_s = 0.0
        self._replies: dict[str, Any] = {}
        self._next_id = 0

    def get_node_ids(self) -> Iterable[int]:
        return list(self.nodes)

    def create_message(
        self, content: Any, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Any:
        return self.fl.Message(content, dst_node_id, message_type, group_id=group_id, ttl=ttl)

    def _silent(self, msg: Any) -> bool:
        stage = msg.content.config_records[self.fl.RECORD_KEY_CONFIGS][self.fl.Key.STAGE]
        late = stage in (self.fl.Stage.COLLECT_MASKED_VECTORS, self.fl.Stage.UNMASK)
        return late and msg.metadata.dst_node_id in self.dropped

    def push_messages(self, messages: Iterable[Any]) -> Iterable[str]:
        ids = []
        for msg in messages:
            # The workflow sends one shared RecordDict to every node in the setup
            # stage and the mod pops keys from it; a copy mimics serialisation.
            t0 = time.perf_counter()
            delivered = copy.deepcopy(msg)
            self.transport_s += time.perf_counter() - t0
            msg_id = str(self._next_id)
            self._next_id += 1
            ids.append(msg_id)
            if not self._silent(delivered):
                self._replies[msg_id] = self.nodes[delivered.metadata.dst_node_id].handle(delivered)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Any]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages: Iterable[Any], *, timeout: float | None = None) -> Iterable[Any]:
        del timeout  # every reply that will ever arrive is already there
        return self.pull_messages(self.push_messages(messages))


def _legacy_context(fl: SimpleNamespace, grid: _InMemoryGrid, n: int) -> tuple[Any, dict[str, Any]]:
    """Build the server LegacyContext for one fit round and a capture slot for the result."""
    manager = fl.SimpleClientManager()
    for nid in grid.nodes:
        manager.register(fl.GridClientProxy(nid, grid, _RUN_ID))
    strategy = fl.FedAvg(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=n, min_available_clients=n)
    captured: dict[str, Any] = {}

    def aggregate_fit(server_round: int, results: list[Any], failures: list[Any]) -> tuple[Any, dict[str, Any]]:
        # Every FitRes carries the same reconstructed vector; keep it as-is.
        captured["parameters"] = results[0][1].parameters if results else None
        captured["num_results"] = len(results)
        return captured["parameters"], {}

    strategy.aggregate_fit = aggregate_fit
    base = fl.Context(run_id=_RUN_ID, node_id=0, node_config={}, state=fl.RecordDict(), run_config={})
    ctx = fl.LegacyContext(base, config=fl.ServerConfig(num_rounds=1), strategy=strategy, client_manager=manager)
    ctx.state.config_records[fl.MAIN_CONFIGS_RECORD] = fl.ConfigRecord({fl.WorkflowKey.CURRENT_ROUND: 1})
    ctx.state.array_records[fl.MAIN_PARAMS_RECORD] = fl.ArrayRecord()
    return ctx, captured


def run_flower_secaggplus(
    inputs: list[np.ndarray],
    *,
    num_shares: int,
    reconstruction_threshold: int,
    clipping_range: float | None,
    quantization_range: int | None = None,
    modulus_range: int | None = None,
    drop_after_share_keys: set[int] = frozenset(),  # type: ignore[assignment]
) -> dict[str, Any]:
    """Run one round of Flower's SecAgg+ (real client mod + real server workflow) and time it.

    Args:
        inputs: ``n`` float64 vectors of equal length ``d``; client ``i`` uploads ``inputs[i]``.
        num_shares: Flower's ``num_shares`` (neighbours including self); ``n`` means full SecAgg.
            Flower bumps an even value below ``n`` to the next odd number.
        reconstruction_threshold: Shamir threshold; Flower requires it to be below ``num_shares``.
        clipping_range: Clip bound ``c`` (values clipped to ``[-c, c]``); ``None`` = Flower's 8.0.
        quantization_range: Quantisation levels; ``None`` = Flower's ``2**22``.
        modulus_range: Mask modulus (power of two); ``None`` = Flower's ``2**32``.
        drop_after_share_keys: Client indices that never reply from the collect-masked-vectors
            stage on, so the server must rebuild their pairwise masks from shares.

    Returns:
        ``client_s`` (median over survivors of per-node SecAgg+ time), ``server_s``,
        ``upload_bytes_per_param`` (serialised masked arrays / ``d``, median over survivors),
        ``aggregate`` (float64 sum of survivors' inputs as Flower reconstructs it: the workflow
        yields the mean over survivors, which is multiplied back by their count) and
        ``survivors`` (sorted client indices).

    Raises:
        ValueError: On malformed inputs.
        RuntimeError: If Flower halts the round (e.g. too few survivors for the threshold).
    """
    fl = _flwr()
    n = len(inputs)
    if n < 2 or len({np.shape(x) for x in inputs}) != 1 or np.ndim(inputs[0]) != 1:
        raise ValueError("need at least two 1-D input vectors of equal length")
    if not set(drop_after_share_keys) <= set(range(n)):
        raise ValueError("drop_after_share_keys holds indices outside range(n)")
    d = int(np.shape(inputs[0])[0])

    # Client index i <-> node id i + 2: Flower reserves node id 1 for the SuperLink (server).
    node_ids = [i + 2 for i in range(n)]
    nodes = {nid: _SimNode(fl, nid, np.asarray(x, dtype=np.float64)) for nid, x in zip(node_ids, inputs, strict=True)}
    grid = _InMemoryGrid(fl, nodes, {node_ids[i] for i in drop_after_share_keys})
    with _as_serverapp(fl):
        context, captured = _legacy_context(fl, grid, n)
        workflow = fl.SecAggPlusWorkflow(
            num_shares=num_shares,
            reconstruction_threshold=reconstruction_threshold,
            max_weight=_MAX_WEIGHT,
            clipping_range=8.0 if clipping_range is None else float(clipping_range),
            quantization_range=2**22 if quantization_range is None else int(quantization_range),
            modulus_range=2**32 if modulus_range is None else int(modulus_range),
        )
        t0 = time.perf_counter()
        workflow(grid, context)
        wall_s = time.perf_counter() - t0

    survivors = sorted(set(range(n)) - set(drop_after_share_keys))
    if captured.get("parameters") is None or captured["num_results"] != len(survivors):
        raise RuntimeError("Flower's SecAgg+ workflow halted before producing an aggregate")
    mean = fl.parameters_to_ndarrays(captured["parameters"])[0]
    live = [nodes[node_ids[i]] for i in survivors]
    return {
        "client_s": statistics.median(node.client_s for node in live),
        "server_s": wall_s - sum(node.call_s for node in nodes.values()) - grid.transport_s,
        "upload_bytes_per_param": statistics.median(node.upload_bytes for node in live) / d,
        "aggregate": np.asarray(mean, dtype=np.float64) * len(survivors),
        "survivors": survivors,
    }
