"""Each site caps the SecAgg+ graph tosses it joins per release (`SecurityPolicy.max_graph_tosses`).

LocalGrid with the real `SecureAggregationMod`, identity keys and SecAgg+ (malicious setting: the
graph seed is a commit-reveal toss). The server aborts every toss by having a colluding node withhold
its reveal, then re-runs the round for the same updates, hoping for a graph it likes. After
max_graph_tosses reveals for a release, every honest node refuses to reveal again (a
`ReleaseBindingError` naming max_graph_tosses), so the server chooses among at most that many
graphs. The weakened control (the cap raised, as if there were none) keeps revealing in every re-run.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable

import numpy as np
import pytest

pytest.importorskip("flwr")

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from protocols import AbortError, FixedPointEncoding, SecAggParams, SecurityPolicy, decode_message
from protocols.primitives import ed25519_public
from protocols.secagg import GraphReveal
from secure_fedllm.errors import ReleaseBindingError
from secure_fedllm.flower import INPUT_RECORD, LocalGrid, secure_aggregate
from secure_fedllm.flower.client_mod import SecureAggregationMod
from secure_fedllm.flower.records import PROTOCOL_RECORD
from secure_fedllm.site import BindingBook

N, D = 10, 50
COLLUDER = N  # node id of the server's accomplice: it never reveals, so every toss aborts
ENCODING = FixedPointEncoding(clip_range=0.1, max_parties=N)
TRIES = 5


def _app(mod: SecureAggregationMod) -> ClientApp:
    rng = np.random.default_rng(3)
    inputs = [rng.uniform(-0.1, 0.1, D) for _ in range(N)]
    app = ClientApp(mods=[mod])

    @app.train()
    def train(msg: Message, ctx: Context) -> Message:
        i = int(ctx.node_config["partition-id"])  # type: ignore[arg-type]
        seed = hashlib.sha256(b"rounding|%d" % i).digest()  # the same update whenever asked
        content = {"arrays": ArrayRecord([inputs[i]]), "metrics": MetricRecord({"num-examples": 1.0}),
                   INPUT_RECORD: ConfigRecord({"rounding_seed": seed})}  # fmt: skip
        return Message(RecordDict(content), reply_to=msg)

    return app


class _TossGrid(LocalGrid):
    """LocalGrid that records, per session, which nodes revealed a graph nonce and which refused."""

    reveals: list[set[int]]
    refusals: list[dict[int, str]]

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = list(super().pull_messages(message_ids))
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                self.refusals[-1][node] = reply.error.reason
            elif PROTOCOL_RECORD in reply.content.config_records:
                payload = reply.content.config_records[PROTOCOL_RECORD].get("payload")
                if payload is not None and isinstance(decode_message(bytes(payload)), GraphReveal):  # type: ignore[arg-type]
                    self.reveals[-1].add(node)
        return replies


def _rerun_until_refused(tmp_path, mod: SecureAggregationMod) -> _TossGrid:
    keys = {node: os.urandom(32) for node in range(1, N + 1)}
    configs = []
    for node, key in keys.items():
        (tmp_path / f"id{node}.key").write_text(key.hex())
        configs.append({"partition-id": node - 1, "secagg-identity-key": str(tmp_path / f"id{node}.key")})
    grid = _TossGrid(_app(mod), configs)
    grid.reveals, grid.refusals = [], []
    params = SecAggParams.secagg_plus(
        N, dimension=D, clip_range=0.1, dropout_rate=0.3, encoding=ENCODING,
        identity_keys=tuple(ed25519_public(keys[n]) for n in range(1, N + 1)),
    )  # fmt: skip
    assert params.malicious and not params.complete  # the graph is tossed
    for _ in range(TRIES):  # the server re-runs the round for the same updates, aborting each toss
        grid.reveals.append(set())
        grid.refusals.append({})
        grid._seen.clear()
        grid.silence = {COLLUDER: 1}  # answers the setup (commits), never the roster (no reveal)
        with pytest.raises(AbortError, match="graph toss aborted"):
            secure_aggregate(grid, {n: RecordDict() for n in range(1, N + 1)}, params, round_number=1,
                             context=b"plan-1", train_timeout=0.05, stage_timeout=0.05,
                             poll_interval=0.001)  # fmt: skip
    return grid


def test_a_node_refuses_to_reveal_beyond_max_graph_tosses(tmp_path) -> None:
    cap = SecurityPolicy().max_graph_tosses
    assert cap == 3
    grid = _rerun_until_refused(tmp_path, SecureAggregationMod())
    honest = set(range(1, N))
    assert grid.reveals[:cap] == [honest] * cap  # every honest node joined the first `cap` tosses
    assert all(not r for r in grid.refusals[:cap])
    for later in range(cap, TRIES):
        assert grid.reveals[later] == set()  # ... and none after
        assert set(grid.refusals[later]) == honest
        assert all(
            why.startswith("ReleaseBindingError:") and "max_graph_tosses=3" in why
            for why in grid.refusals[later].values()
        )


def test_control_with_the_cap_raised_a_node_keeps_revealing(tmp_path) -> None:
    grid = _rerun_until_refused(tmp_path, SecureAggregationMod(max_graph_tosses=1000))
    assert grid.reveals == [set(range(1, N))] * TRIES  # the server gets a fresh graph every time
    assert all(not r for r in grid.refusals)


def test_the_toss_count_comes_from_the_site_policy_and_is_per_session(tmp_path) -> None:
    from secure_fedllm.site.policy import SitePolicy

    mod = SecureAggregationMod(site_policy=SitePolicy(security=SecurityPolicy(max_graph_tosses=2)))
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    assert mod._max_graph_tosses(context) == 2
    store: dict[str, dict] = {}
    book = BindingBook(store.get, store.__setitem__)
    release = ("job", 1, b"k" * 32)
    first, second, third = os.urandom(16), os.urandom(16), os.urandom(16)
    assert book.record_graph_toss(*release, first, max_graph_tosses=2) == 1
    assert book.record_graph_toss(*release, first, max_graph_tosses=2) == 1  # a resent reveal counts once
    assert book.record_graph_toss(*release, second, max_graph_tosses=2) == 2
    with pytest.raises(ReleaseBindingError, match="max_graph_tosses=2"):
        book.record_graph_toss(*release, third, max_graph_tosses=2)
    assert book.graph_tosses(*release) == (first, second)
    assert book.binding(*release) is None  # toss counts do not bind the release to a session
    assert book.record_graph_toss("job", 2, b"k" * 32, third, max_graph_tosses=2) == 1  # another release
