"""A Flower app for the simulation-engine test: fixed inputs per partition, dropouts by error replies.

Copied into a temporary Flower app folder by test_simulation_protocol.py; not imported by the suite.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from protocols import SecAggParams
from secure_fedllm.flower import INPUT_RECORD, PROTOCOL_RECORD, secure_aggregate, secure_aggregation_mod

N, D = 10, 3000
DROP_AT = {2: 2, 5: 3}  # partition -> index of the first protocol message of the round it fails


def inputs(partition: int) -> np.ndarray:
    return np.random.default_rng(1000 + partition).uniform(-0.1, 0.1, D)


def rounding_seed(partition: int) -> bytes:
    return hashlib.sha256(b"rounding|%d" % partition).digest()


def drop_mod(msg: Message, ctx: Context, call_next):  # a node that fails from its k-th message on
    if PROTOCOL_RECORD in msg.content.config_records:
        seen = int(ctx.state.config_records.get("seen", ConfigRecord({"n": 0}))["n"])  # type: ignore[arg-type]
        ctx.state["seen"] = ConfigRecord({"n": seen + 1})
        if seen >= DROP_AT.get(int(ctx.node_config["partition-id"]), 1 << 30):  # type: ignore[arg-type]
            return Message(Error(code=1, reason="simulated dropout"), reply_to=msg)
    return call_next(msg, ctx)


client_app = ClientApp(mods=[drop_mod, secure_aggregation_mod])
server_app = ServerApp()


@client_app.train()
def train(msg: Message, ctx: Context) -> Message:
    p = int(ctx.node_config["partition-id"])  # type: ignore[arg-type]
    content = {
        "arrays": ArrayRecord([inputs(p)]),
        "metrics": MetricRecord({"num-examples": 1}),
        INPUT_RECORD: ConfigRecord({"rounding_seed": rounding_seed(p)}),
    }
    return Message(RecordDict(content), reply_to=msg)


@client_app.query()
def whoami(msg: Message, ctx: Context) -> Message:
    return Message(RecordDict({"me": ConfigRecord({"partition": ctx.node_config["partition-id"]})}), reply_to=msg)


@server_app.main()
def main(grid: Grid, ctx: Context) -> None:
    nodes = sorted(grid.get_node_ids())
    asks = [Message(RecordDict(), dst_node_id=n, message_type="query") for n in nodes]
    partition = {
        r.metadata.src_node_id: int(r.content.config_records["me"]["partition"]) for r in grid.send_and_receive(asks)
    }
    params = SecAggParams.secagg_plus(N, dimension=D, clip_range=0.1, dropout_rate=0.3)
    out = secure_aggregate(grid, {n: RecordDict() for n in nodes}, params, round_number=1, context=b"sim",
                           session=b"s" * 16, train_timeout=120, stage_timeout=60)  # fmt: skip
    result = {
        "party_partition": [partition[n] for n in out.party_nodes],
        "included": list(out.aggregate.included),
        "ring_sum": np.asarray(out.aggregate.ring_sum).astype(np.uint64).tolist(),
        "failures": {str(partition[n]): why for n, why in out.failures.items()},
    }
    Path(str(ctx.run_config["out"])).write_text(json.dumps(result))
