"""Issue 13: the Flower Mod runs HE through `protocols.SessionFamily` and keeps every guarantee it gives masking.

LocalGrid with the real `SecureAggregationMod` on every node and `secure_aggregate` driving the HE
server session. Each security test has a weakened control:

* site policy: a site that assumes any corrupt client (n_C > 0) refuses HE before it trains
  (control: corrupt_fraction = 0 accepts, and the round releases the exact integer sum);
* identity keys: a node holding one refuses HE parameters without identity keys, i.e. unsigned hellos
  (control: a node without an identity key accepts them, the semi-honest setting);
* contribution floor: min_contributions below the site's min_honest_survivors is refused (control: 2);
* re-run: a server that re-runs the round without T gets nothing, since every node bound its HE input
  to the first session (control, bindings forgotten: S1 - S2 = T's quantized words exactly);
* rollback: a key holder rolled back to before its decryption refuses a second contributor set
  (control, bindings forgotten: it decrypts the sum without T, and the two releases give x_T).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable

import numpy as np
import pytest

pytest.importorskip("flwr")

from flwr.app import ConfigRecord, Message, RecordDict
from test_rerun import fixed_update_app, rounding_seed_of

from protocols import AbortError, SecurityPolicy
from protocols.he import HEAck, HEParams, HESum, decode_he_message, encode_he_message
from protocols.he._ciphers import quantize
from protocols.primitives import ed25519_public
from secure_fedllm.flower import LocalGrid, client_mod, secure_aggregate
from secure_fedllm.flower.records import PROTOCOL_RECORD, STATE_RECORD, STEP
from secure_fedllm.site import BindingBook, SitePolicy

N, D, T = 5, 300, 3  # T: the target's node id (party T - 1 in the first session)
CLIP = 0.1


def _inputs() -> list[np.ndarray]:
    rng = np.random.default_rng(13)
    return [rng.uniform(-CLIP, CLIP, D) for _ in range(N)]


class _Grid(LocalGrid):
    """LocalGrid that keeps every error reply's reason and every HESum it delivers."""

    errors: list[str]
    sums: dict[int, HESum]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        for message in messages:
            record = message.content.config_records.get(PROTOCOL_RECORD)
            if record is not None and record.get("stage") == STEP:
                decoded = decode_he_message(bytes(record["payload"]))  # type: ignore[arg-type]
                if isinstance(decoded, HESum):
                    self.sums[message.metadata.dst_node_id] = decoded
        ids = list(super().push_messages(messages))
        self.errors.extend(r.error.reason for mid in ids if (r := self._replies.get(mid)) is not None and r.has_error())
        return ids


def _keys() -> dict[int, bytes]:
    return {node: hashlib.sha256(b"identity|%d" % node).digest() for node in range(1, N + 1)}


def _grid(tmp_path, *, policy: SecurityPolicy | None = None, keyed: bool = True) -> _Grid:
    """N nodes; with `policy`, each reads a site policy file naming its key (else a bare key file, or none)."""
    configs = []
    for node, key in _keys().items():
        config: dict[str, object] = {"partition-id": node - 1}
        if keyed:
            (tmp_path / f"id{node}.key").write_text(key.hex())
        if policy is not None:
            SitePolicy(security=policy, identity_key=f"id{node}.key" if keyed else None).to_file(
                tmp_path / f"s{node}.toml"
            )
            config["site-policy"] = str(tmp_path / f"s{node}.toml")
        elif keyed:
            config["secagg-identity-key"] = str(tmp_path / f"id{node}.key")
        configs.append(config)
    grid = _Grid(fixed_update_app(_inputs()), configs)
    grid.errors, grid.sums = [], {}
    return grid


def _params(nodes: list[int], *, signed: bool = True, **kw: object) -> HEParams:
    keys = _keys()
    identity = tuple(ed25519_public(keys[n]) for n in nodes) if signed else None
    return HEParams.bfv_packed(len(nodes), dimension=D, clip_range=CLIP, identity_keys=identity, **kw)  # type: ignore[arg-type]


def _run(grid: _Grid, params: HEParams, nodes: list[int], context: bytes = b"plan-1"):
    return secure_aggregate(grid, {n: RecordDict() for n in nodes}, params, round_number=1, context=context,
                            train_timeout=0.05, stage_timeout=0.05, poll_interval=0.001)  # fmt: skip


def _quantized(params: HEParams, nodes: list[int]) -> np.ndarray:
    inputs = _inputs()
    return sum(quantize(params, inputs[n - 1], weight=1.0, rounding_seed=rounding_seed_of(n - 1)) for n in nodes)


def _forgetful_book(_context: object, _release: object) -> BindingBook:
    """The weakened control: a binding store that never keeps anything (the Mod before issue 12)."""
    return BindingBook(lambda _tag: None, lambda _tag, _record: None)


EVERYONE = list(range(1, N + 1))


@pytest.mark.parametrize("corrupt_fraction", [0.05, 0.0])
def test_a_site_that_assumes_a_corrupt_client_refuses_he_before_training(tmp_path, corrupt_fraction) -> None:
    roster = tuple(ed25519_public(k) for k in _keys().values())
    policy = SecurityPolicy(protocol="he", roster=roster, corrupt_fraction=corrupt_fraction)
    grid = _grid(tmp_path, policy=policy)
    params = _params(EVERYONE, seeded=True)  # what a run announces in symmetric mode: seeded uploads
    if corrupt_fraction > 0:
        with pytest.raises(AbortError):
            _run(grid, params, EVERYONE)
        assert len(grid.errors) == N and all("corrupt_fraction=0.05" in why for why in grid.errors), grid.errors
        assert all("InsecureParameterError" in why for why in grid.errors)
        return
    # the control: n_C = 0 is the one assumption under which a site runs HE; the sum is exact
    result = _run(grid, params, EVERYONE)
    assert grid.errors == [] and result.aggregate.included == tuple(range(N))
    assert np.array_equal(result.aggregate.ring_sum, _quantized(params, EVERYONE))
    state = grid.contexts[1].state.config_records[STATE_RECORD]
    assert state["family"] == "he-bfv" and isinstance(state["session_state"], bytes)


def test_a_masking_site_refuses_he_and_an_he_site_refuses_a_roster_stranger(tmp_path) -> None:
    roster = tuple(ed25519_public(k) for k in _keys().values())
    grid = _grid(tmp_path, policy=SecurityPolicy(protocol="secagg+", roster=roster))
    with pytest.raises(AbortError):
        _run(grid, _params(EVERYONE), EVERYONE)
    assert all("protocol" in why and "secagg+" in why for why in grid.errors) and len(grid.errors) == N
    pinned = (*roster[:-1], ed25519_public(os.urandom(32)))  # node N's key is not in the others' roster
    grid = _grid(tmp_path, policy=SecurityPolicy(protocol="he", roster=pinned, corrupt_fraction=0.0))
    grid.contexts[N].node_config["site-policy"] = ""  # node N itself has no policy file (its key: a bare key file)
    grid.contexts[N].node_config["secagg-identity-key"] = str(tmp_path / f"id{N}.key")
    with pytest.raises(AbortError):
        _run(grid, _params(EVERYONE), EVERYONE)
    assert sum("Sybil roster refused" in why for why in grid.errors) == N - 1, grid.errors


@pytest.mark.parametrize("keyed", [True, False])
def test_a_node_holding_an_identity_key_refuses_unsigned_he(tmp_path, keyed) -> None:
    grid = _grid(tmp_path, keyed=keyed)
    params = _params(EVERYONE, signed=False)  # no identity keys: unsigned hellos, a key could be substituted
    if keyed:
        with pytest.raises(AbortError):
            _run(grid, params, EVERYONE)
        assert len(grid.errors) == N and all("identity_keys" in why and "downgrade" in why for why in grid.errors)
        return
    result = _run(grid, params, EVERYONE)  # the control: a node without a key runs the semi-honest setting
    assert grid.errors == [] and np.array_equal(result.aggregate.ring_sum, _quantized(params, EVERYONE))


@pytest.mark.parametrize("floor", [1, 2])
def test_he_min_contributions_below_the_site_floor_is_refused(tmp_path, floor) -> None:
    grid = _grid(tmp_path)
    params = _params(EVERYONE, min_contributions=floor)
    if floor < 2:
        with pytest.raises(AbortError):
            _run(grid, params, EVERYONE)
        assert len(grid.errors) == N and all("min_contributions=1" in why for why in grid.errors)
        return
    assert _run(grid, params, EVERYONE).aggregate.included == tuple(range(N))


@pytest.mark.parametrize("second_context", [b"plan-1", b"another context the server chose"])
def test_rerun_without_the_target_is_refused_by_every_bound_he_node(tmp_path, second_context) -> None:
    grid = _grid(tmp_path)
    first = _run(grid, _params(EVERYONE), EVERYONE)
    assert first.aggregate.included == tuple(range(N))
    rest = [n for n in EVERYONE if n != T]
    with pytest.raises(AbortError):
        _run(grid, _params(rest), rest, context=second_context)
    refusals = [why for why in grid.errors if "ReleaseBindingError" in why]
    assert len(refusals) == N - 1 and all("one update goes to one session only" in why for why in refusals)


def test_control_without_binding_a_he_rerun_recovers_the_target_update_exactly(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(client_mod, "_book", _forgetful_book)
    grid = _grid(tmp_path)
    params = _params(EVERYONE)
    first = _run(grid, params, EVERYONE)
    rest = [n for n in EVERYONE if n != T]
    second = _run(grid, _params(rest), rest)
    assert len(second.aggregate.included) == N - 1
    recovered = first.aggregate.ring_sum - second.aggregate.ring_sum
    assert np.array_equal(recovered, _quantized(params, [T]))  # S1 - S2 = T's words, bit for bit


@pytest.mark.parametrize("bound", [True, False])
def test_a_rolled_back_key_holder_cannot_decrypt_a_second_contributor_set(tmp_path, monkeypatch, bound) -> None:
    """Roll the key holder back to its state after its input, then hand it the signed uploads without T's."""
    if not bound:
        monkeypatch.setattr(client_mod, "_book", _forgetful_book)
    snapshots: dict[int, ConfigRecord] = {}
    original = client_mod._persist

    def keep_input_sent(context, client, setup, release):  # the host's copy of the state after the HE input
        original(context, client, setup, release)
        if client.stage.name == "INPUT_SENT":
            snapshots[context.node_id] = ConfigRecord(dict(context.state.config_records[STATE_RECORD]))

    monkeypatch.setattr(client_mod, "_persist", keep_input_sent)
    grid = _grid(tmp_path)
    params = _params(EVERYONE)
    done = _run(grid, params, EVERYONE)
    assert done.aggregate.included == tuple(range(N))
    ((holder, total),) = grid.sums.items()  # only the key holder is asked to decrypt
    target = next(p for p in total.contributors if p != holder - 1)  # any contributor but the holder itself
    keep = [i for i, p in enumerate(total.contributors) if p != target]
    per = params.chunks
    fewer = HESum(session=total.session, round=total.round, sender=total.sender,
                  contributors=tuple(total.contributors[i] for i in keep),
                  digests=tuple(total.digests[i] for i in keep), signatures=tuple(total.signatures[i] for i in keep),
                  inputs=tuple(c for i in keep for c in total.inputs[i * per:(i + 1) * per]))  # fmt: skip
    context = grid.contexts[holder]
    context.state[STATE_RECORD] = snapshots[holder]  # the rollback
    message = Message(
        RecordDict({PROTOCOL_RECORD: ConfigRecord({"stage": STEP, "payload": encode_he_message(fewer)})}),
        dst_node_id=holder, message_type="train", group_id="1",
    )  # fmt: skip
    reply = grid.client_app(message, context)
    if bound:
        assert reply.has_error() and "ReleaseBindingError" in reply.error.reason
        assert "already answered for survivors" in reply.error.reason
        return
    assert not reply.has_error()
    ack = decode_he_message(bytes(reply.content.config_records[PROTOCOL_RECORD]["payload"]))  # type: ignore[arg-type]
    assert isinstance(ack, HEAck) and ack.plaintext
    second = np.frombuffer(ack.plaintext, dtype="<u4").astype(np.int64)
    assert np.array_equal(done.aggregate.ring_sum - second, _quantized(params, [target + 1]))  # x_target exactly
