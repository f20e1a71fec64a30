"""Finding 1 (issue 12): re-running a round without client T must not reveal x_T = S1 - S2.

LocalGrid with the real `SecureAggregationMod`, identity keys and SecAgg+. The server runs
`secure_aggregate` twice for the same round and plan, the second time without T. Every node that
sent its masked input in the first session is bound to it: the second session is refused by all of
them and aborts. The weakened control (the binding store replaced by one that forgets, i.e. the Mod
before issue 12) completes the second session and gives S1 - S2 = encode(x_T) exactly.
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

from protocols import AbortError, FixedPointEncoding, SecAggParams
from protocols.primitives import ed25519_public
from secure_fedllm.flower import (
    INPUT_RECORD,
    LocalGrid,
    client_mod,
    secure_aggregate,
    secure_aggregation_mod,
)
from secure_fedllm.site import BindingBook

N, D, T = 10, 300, 4  # T: the target's node id (party T - 1 in the first session)
ENCODING = FixedPointEncoding(clip_range=0.1, max_parties=N)  # one encoding for both sessions


def _inputs() -> list[np.ndarray]:
    rng = np.random.default_rng(12)
    return [rng.uniform(-0.1, 0.1, D) for _ in range(N)]


def rounding_seed_of(i: int) -> bytes:
    return hashlib.sha256(b"rounding|%d" % i).digest()


def fixed_update_app(inputs: list[np.ndarray]) -> ClientApp:
    """A ClientApp that returns the same update whenever asked (a deterministic re-run of local training)."""
    app = ClientApp(mods=[secure_aggregation_mod])

    @app.train()
    def train(msg: Message, ctx: Context) -> Message:
        i = int(ctx.node_config["partition-id"])  # type: ignore[arg-type]
        content = {
            "arrays": ArrayRecord([inputs[i]]),
            "metrics": MetricRecord({"num-examples": 1.0}),
            INPUT_RECORD: ConfigRecord({"rounding_seed": rounding_seed_of(i)}),
        }
        return Message(RecordDict(content), reply_to=msg)

    return app


class RecordingGrid(LocalGrid):
    """LocalGrid that also keeps the reason of every error reply (secure_aggregate raises before returning them)."""

    errors: list[str]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = list(super().push_messages(messages))
        for mid in ids:
            reply = self._replies.get(mid)
            if reply is not None and reply.has_error():
                self.errors.append(reply.error.reason)
        return ids


def _grid(tmp_path, inputs: list[np.ndarray]) -> tuple[RecordingGrid, dict[int, bytes]]:
    keys = {node: os.urandom(32) for node in range(1, N + 1)}
    configs = []
    for node, key in keys.items():
        (tmp_path / f"id{node}.key").write_text(key.hex())
        configs.append({"partition-id": node - 1, "secagg-identity-key": str(tmp_path / f"id{node}.key")})
    grid = RecordingGrid(fixed_update_app(inputs), configs)
    grid.errors = []
    return grid, keys


def _session(grid: LocalGrid, keys: dict[int, bytes], nodes: list[int], context: bytes = b"plan-1"):
    params = SecAggParams.secagg_plus(
        len(nodes), dimension=D, clip_range=0.1, dropout_rate=0.3, encoding=ENCODING,
        identity_keys=tuple(ed25519_public(keys[n]) for n in nodes),
    )  # fmt: skip
    return secure_aggregate(grid, {n: RecordDict() for n in nodes}, params, round_number=1, context=context,
                            train_timeout=0.05, stage_timeout=0.05, poll_interval=0.001)  # fmt: skip


def _forgetful_book(_context: object, _release: object) -> BindingBook:
    """The weakened control: a binding store that never keeps anything (the Mod before issue 12)."""
    return BindingBook(lambda _tag: None, lambda _tag, _record: None)


def _difference(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    mask = np.uint64((1 << ENCODING.ring_bits) - 1) if ENCODING.ring_bits < 64 else np.uint64(2**64 - 1)
    return (first.astype(np.uint64) - second.astype(np.uint64)) & mask


@pytest.mark.parametrize("second_context", [b"plan-1", b"another context the server chose"])
def test_rerun_without_the_target_is_refused_by_every_bound_node(tmp_path, second_context) -> None:
    inputs = _inputs()
    grid, keys = _grid(tmp_path, inputs)
    everyone = list(range(1, N + 1))
    first = _session(grid, keys, everyone)
    assert first.aggregate.included == tuple(range(N))
    with pytest.raises(AbortError):
        _session(grid, keys, [n for n in everyone if n != T], context=second_context)
    refusals = [why for why in grid.errors if "ReleaseBindingError" in why]
    assert len(refusals) == N - 1, grid.errors
    assert all("one update goes to one session only" in why for why in refusals)


def test_control_without_binding_recovers_the_target_update_exactly(tmp_path, monkeypatch) -> None:
    """The weakened control: bindings that are never kept (the Mod before issue 12)."""
    monkeypatch.setattr(client_mod, "_book", _forgetful_book)
    inputs = _inputs()
    grid, keys = _grid(tmp_path, inputs)
    everyone = list(range(1, N + 1))
    first = _session(grid, keys, everyone)
    second = _session(grid, keys, [n for n in everyone if n != T])
    assert len(second.aggregate.included) == N - 1
    recovered = _difference(first.aggregate.ring_sum, second.aggregate.ring_sum)
    target = ENCODING.encode(inputs[T - 1], weight=1.0, rounding_seed=rounding_seed_of(T - 1)).astype(np.uint64)
    assert np.array_equal(recovered, target)  # S1 - S2 = x_T, bit for bit


def test_a_node_that_sent_only_keys_may_join_a_new_session(tmp_path) -> None:
    """Bindings happen at the masked input: a session that aborts before it leaves no node bound."""
    inputs = _inputs()
    grid, keys = _grid(tmp_path, inputs)
    everyone = list(range(1, N + 1))
    grid.silence = {n: 1 for n in range(1, 9)}  # 8 of 10 go silent after their keys: the session aborts
    with pytest.raises(AbortError):
        _session(grid, keys, everyone)
    grid.silence = {}
    grid._seen.clear()
    again = _session(grid, keys, everyone)  # fresh keys, same updates, one session that completes
    assert again.aggregate.included == tuple(range(N))


def test_the_release_key_never_reaches_the_server(tmp_path) -> None:
    """Our ClientApp hands the Mod its secret release key in INPUT_RECORD; no reply to the server carries it."""
    inputs = _inputs()
    secret = os.urandom(32)
    app = ClientApp(mods=[secure_aggregation_mod])

    @app.train()
    def train(msg: Message, ctx: Context) -> Message:
        i = int(ctx.node_config["partition-id"])  # type: ignore[arg-type]
        extra = {"rounding_seed": rounding_seed_of(i), "release_key": secret + bytes([i]), "release_job": "job",
                 "release_round": 1, "site_state": str(tmp_path / f"site{i}")}  # fmt: skip
        content = {"arrays": ArrayRecord([inputs[i]]), "metrics": MetricRecord({"num-examples": 1.0}),
                   INPUT_RECORD: ConfigRecord(extra)}  # fmt: skip
        return Message(RecordDict(content), reply_to=msg)

    keys = {node: os.urandom(32) for node in range(1, N + 1)}
    configs = []
    for node, key in keys.items():
        (tmp_path / f"id{node}.key").write_text(key.hex())
        configs.append({"partition-id": node - 1, "secagg-identity-key": str(tmp_path / f"id{node}.key")})
    seen: list[bytes] = []

    class Tapped(LocalGrid):
        def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
            replies = list(super().pull_messages(message_ids))
            from flwr.common.serde import message_to_proto

            seen.extend(message_to_proto(r).SerializeToString() for r in replies)
            return replies

    grid = Tapped(app, configs)
    result = _session(grid, keys, list(range(1, N + 1)))
    assert result.aggregate.included == tuple(range(N))
    assert seen and not any(secret in wire for wire in seen)
    assert all(INPUT_RECORD not in content for content in result.replies.values())
    # the bindings went to each site's own state folder, fsynced, mode 0600
    bound = sorted((tmp_path / "site0" / "bindings").glob("*.json"))
    assert len(bound) == 1 and bound[0].stat().st_mode & 0o777 == 0o600


def _site_app(inputs: list[np.ndarray], tmp_path) -> ClientApp:
    """Our ClientApp's way of handing the Mod a release: key, job, round and the site's state folder."""
    app = ClientApp(mods=[secure_aggregation_mod])

    @app.train()
    def train(msg: Message, ctx: Context) -> Message:
        i = int(ctx.node_config["partition-id"])  # type: ignore[arg-type]
        extra = {"rounding_seed": rounding_seed_of(i), "release_key": hashlib.sha256(b"key|%d" % i).digest(),
                 "release_job": "job", "release_round": 1, "site_state": str(tmp_path / f"site{i}")}  # fmt: skip
        content = {"arrays": ArrayRecord([inputs[i]]), "metrics": MetricRecord({"num-examples": 1.0}),
                   INPUT_RECORD: ConfigRecord(extra)}  # fmt: skip
        return Message(RecordDict(content), reply_to=msg)

    return app


@pytest.mark.parametrize("bound", [True, False])
def test_a_restored_snapshot_cannot_answer_a_second_survivor_set(tmp_path, monkeypatch, bound) -> None:
    """Roll a node's session back to before its unmask answer and ask again, naming a neighbour dropped.

    Ours: the survivor set it answered for is in its site folder, so the second answer is refused. Control
    (bindings forgotten): the rolled-back session answers, handing out the dropped neighbour's mask-key
    shares after it already gave that neighbour's self-mask shares: both shares of one peer.
    """
    from protocols import decode_message, encode_message
    from protocols.secagg import UnmaskRequest, UnmaskResponse
    from secure_fedllm.flower.records import PROTOCOL_RECORD, STATE_RECORD, STEP

    if not bound:
        monkeypatch.setattr(client_mod, "_book", _forgetful_book)
    inputs = _inputs()
    grid = LocalGrid(_site_app(inputs, tmp_path), [{"partition-id": i} for i in range(N)])
    snapshots: dict[int, object] = {}
    original = client_mod._persist

    def keep_masked(context, client, setup, release):  # the host's copy of the state after the masked input
        original(context, client, setup, release)
        if client.state.name == "MASKED":
            snapshots[context.node_id] = ConfigRecord(dict(context.state.config_records[STATE_RECORD]))

    monkeypatch.setattr(client_mod, "_persist", keep_masked)
    params = SecAggParams.secagg(N, dimension=D, clip_range=0.1, dropout_rate=0.3, encoding=ENCODING)  # complete graph
    done = secure_aggregate(grid, {n: RecordDict() for n in range(1, N + 1)}, params, round_number=1,
                            context=b"plan-1", train_timeout=0.05, stage_timeout=0.05, poll_interval=0.001)  # fmt: skip
    assert done.aggregate.included == tuple(range(N))
    node = 1
    context = grid.contexts[node]
    saved = snapshots[node]
    context.state[STATE_RECORD] = saved  # the rollback
    survivors = tuple(p for p in range(N) if p != 1)  # now party 1 "dropped"
    request = UnmaskRequest(session=bytes(saved["session"]), round=1, survivors=survivors)  # type: ignore[arg-type]
    message = Message(
        RecordDict({PROTOCOL_RECORD: ConfigRecord({"stage": STEP, "payload": encode_message(request)})}),
        dst_node_id=node, message_type="train", group_id="1",
    )  # fmt: skip
    reply = grid.client_app(message, context)
    if bound:
        assert reply.has_error() and "ReleaseBindingError" in reply.error.reason
        assert "already answered for survivors" in reply.error.reason
    else:
        assert not reply.has_error()
        answer = decode_message(bytes(reply.content.config_records[PROTOCOL_RECORD]["payload"]))
        assert isinstance(answer, UnmaskResponse)
        assert any(env.peer == 1 for env in answer.mask_key_shares)  # the dropped peer's mask key, after its b
