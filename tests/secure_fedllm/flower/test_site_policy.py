"""Issue 12, finding 3: Flower nodes no longer take their security parameters from the server.

Each attack runs on LocalGrid with the real `secure_aggregation_mod` on every honest node; only the
server deviates (it drives `SecAggServer` and the wire itself). Each has a weakened control, a node
without a site policy (the old behaviour), on which the same server recovers the target's exact
encoded update x_T; the defended nodes, which read their own `SitePolicy` from node config, refuse
the parameters at setup with an `InsecureParameterError` naming the field, before they train.

* 3(a) downgrade: no identity keys for nodes that hold one, t ~ n / 2, split survivor views;
* 3(b) Sybil roster: keys of the server's own at every index but the target's;
* 3(c) weak assumptions: corrupt_fraction=0, dropout_rate=0 at n = 100 (k = 2, t = 3): the server
  and T's two neighbours strip every mask from T's input.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("flwr")

import flwr.compat.common.recorddict_compat as compat
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters

from protocols import (
    AbortError,
    ProtocolError,
    SecAggClient,
    SecAggParams,
    SecAggServer,
    SecurityPolicy,
    decode_message,
    encode_message,
    run_round,
)
from protocols.primitives import (
    LABEL_PAIRWISE_MASK,
    MaskAccumulator,
    derive_key,
    ed25519_public,
    reconstruct,
    ring_dtype,
    x25519_agree,
)
from protocols.secagg import AdvertiseKeys, MaskedInput, UnmaskRequest, UnmaskResponse
from secure_fedllm.flower import (
    INPUT_RECORD,
    PROTOCOL_RECORD,
    LocalGrid,
    SecureFitWorkflow,
    collect_identity_keys,
    secure_aggregate,
    secure_aggregation_mod,
)
from secure_fedllm.flower.grid_round import _Exchange
from secure_fedllm.flower.records import RoundSetup
from secure_fedllm.site import SitePolicy

D = 40
CLIP = 0.1
TARGET = 0


def _inputs(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(12)
    return [rng.uniform(-CLIP, CLIP, D) for _ in range(n)]


def _seed(i: int) -> bytes:
    return hashlib.sha256(b"rounding|%d" % i).digest()


def _app(inputs: list[np.ndarray]) -> ClientApp:
    app = ClientApp(mods=[secure_aggregation_mod])

    @app.train()
    def train(msg: Message, ctx: Context) -> Message:
        i = int(ctx.node_config["partition-id"])
        return Message(
            RecordDict(
                {
                    "arrays": ArrayRecord([inputs[i]]),
                    "metrics": MetricRecord({"num-examples": 1.0}),
                    INPUT_RECORD: ConfigRecord({"rounding_seed": _seed(i)}),
                }
            ),
            reply_to=msg,
        )

    return app


def _sites(
    folder: Path, parties: list[int], secrets: list[bytes] | None, policy: SecurityPolicy | None
) -> list[dict[str, Any]]:
    """Node configs for `parties`: with a site policy file each (defended), a bare key file, or nothing."""
    configs: list[dict[str, Any]] = []
    for p in parties:
        config: dict[str, Any] = {"partition-id": p}
        key_file = folder / f"id{p}.key"
        if secrets is not None:
            key_file.write_text(secrets[p].hex())
        if policy is not None:
            site = SitePolicy(security=policy, identity_key=key_file.name if secrets is not None else None)
            site.to_file(folder / f"site{p}.toml")
            config["site-policy"] = str(folder / f"site{p}.toml")
        elif secrets is not None:
            config["secagg-identity-key"] = str(key_file)
        configs.append(config)
    return configs


class _Server:
    """A server that may deviate: real nodes for some parties, sessions of its own for the others."""

    def __init__(self, grid: LocalGrid, params: SecAggParams, nodes: dict[int, int], own: dict[int, SecAggClient],
                 session: bytes) -> None:  # fmt: skip
        self.grid, self.params, self.nodes, self.own, self.session = grid, params, nodes, own, session
        self.server = SecAggServer(params, session=session, round_number=5, context=b"plan")
        self.seen: dict[type, dict[int, Any]] = {}
        self.failures: dict[int, str] = {}
        self.exchange = _Exchange(grid, "train", "5", 0.001, time.monotonic, lambda _s: None)

    def setup(self) -> None:
        contents = {}
        for p, node in self.nodes.items():
            setup = RoundSetup(self.params, p, self.session, 5, b"plan")
            contents[node] = RecordDict({PROTOCOL_RECORD: ConfigRecord(setup.to_record())})
        replies = self._collect(contents)
        replies.update({p: client.advertise_keys() for p, client in self.own.items()})
        self._deliver(replies)

    def send(self, outgoing: list[tuple[int, Any]]) -> dict[int, Any]:
        """Deliver each (party, message); return party -> reply (real nodes over the grid)."""
        contents = {
            self.nodes[p]: RecordDict({PROTOCOL_RECORD: ConfigRecord({"stage": "step", "payload": encode_message(m)})})
            for p, m in outgoing
            if p in self.nodes
        }
        replies = self._collect(contents)
        replies.update({p: self.own[p].handle(m) for p, m in outgoing if p in self.own})
        return replies

    def run(self, *, until: type | None = None) -> list[tuple[int, Any]]:
        """Relay honestly; stop before sending a stage of type `until` and return it ([] at the end)."""
        while outgoing := self.server.close_stage():
            if until is not None and isinstance(outgoing[0][1], until):
                return outgoing
            self._deliver(self.send(outgoing))
        return []

    def _collect(self, contents: dict[int, RecordDict]) -> dict[int, Any]:
        party_of = {node: p for p, node in self.nodes.items()}
        out = {}
        for node, reply in self.exchange.run(contents, 5.0, self.failures).items():
            if reply.has_error():
                self.failures[node] = reply.error.reason
                continue
            out[party_of[node]] = decode_message(bytes(reply.content.config_records[PROTOCOL_RECORD]["payload"]))
        return out

    def _deliver(self, replies: dict[int, Any]) -> None:
        for p, message in replies.items():
            self.seen.setdefault(type(message), {})[p] = message
            try:
                self.server.receive(message)
            except ProtocolError as exc:
                self.failures[self.nodes.get(p, -p)] = f"{type(exc).__name__}: {exc}"


def _unmask_target(server: _Server, b_shares: dict[int, bytes], s_shares: dict[int, bytes] | None,
                   mask_keys: dict[int, bytes] | None = None) -> np.ndarray:  # fmt: skip
    """Strip the target's self mask and pairwise masks from its masked input (T = party 0 < every peer)."""
    params = server.params
    adverts: dict[int, AdvertiseKeys] = server.seen[AdvertiseKeys]
    neighbours = sorted(server.server.graph.neighbours_of(TARGET))
    seeds = []
    if s_shares is not None:  # the target's mask key, rebuilt from shares
        mask_sk = reconstruct(s_shares, params.threshold)
        for p in neighbours:
            secret = x25519_agree(mask_sk, adverts[p].mask_public_key)
            seeds.append(derive_key(secret, label=LABEL_PAIRWISE_MASK, transcript=server.server.transcript, a=0, b=p))
    else:  # the neighbours' own mask keys, handed over by colluding neighbours
        assert mask_keys is not None
        for p in neighbours:
            secret = x25519_agree(mask_keys[p], adverts[TARGET].mask_public_key)
            seeds.append(derive_key(secret, label=LABEL_PAIRWISE_MASK, transcript=server.server.transcript, a=0, b=p))
    masked: MaskedInput = server.seen[MaskedInput][TARGET]
    vector = np.frombuffer(masked.data, dtype=ring_dtype(params.encoding.ring_bits)).copy()
    MaskAccumulator(params.encoding.ring_bits).apply(vector, minus=[reconstruct(b_shares, params.threshold), *seeds])
    return vector


def _encoded_target(params: SecAggParams, inputs: list[np.ndarray]) -> np.ndarray:
    return params.encoding.encode(inputs[TARGET], weight=1.0, rounding_seed=_seed(TARGET))


# -- 3(a): downgrade to the semi-honest setting, t ~ n / 2, split survivor views -----------------


def _downgrade(tmp_path: Path, *, defended: bool, params: SecAggParams) -> tuple[_Server, np.ndarray | None]:
    n = params.num_parties
    inputs = _inputs(n)
    secrets = [os.urandom(32) for _ in range(n)]
    roster = tuple(ed25519_public(k) for k in secrets)
    configs = _sites(tmp_path, list(range(n)), secrets if defended else None,
                     SecurityPolicy(roster=roster) if defended else None)  # fmt: skip
    grid = LocalGrid(_app(inputs), configs)
    server = _Server(grid, params, {p: p + 1 for p in range(n)}, {}, os.urandom(16))
    server.setup()
    try:
        outgoing = server.run(until=UnmaskRequest)
    except AbortError:
        return server, None
    template: UnmaskRequest = outgoing[0][1]
    everyone, without = tuple(range(n)), tuple(range(1, n))
    half = (n - 1) // 2
    views = {p: without if p <= half else everyone for p in range(1, n)}  # A: "T dropped", B: "T survived"
    responses = server.send([(p, template.model_copy(update={"survivors": v})) for p, v in views.items()])
    b_shares = {p: e.share for p, r in responses.items() if isinstance(r, UnmaskResponse)
                for e in r.self_mask_shares if e.peer == TARGET}  # fmt: skip
    s_shares = {p: e.share for p, r in responses.items() if isinstance(r, UnmaskResponse)
                for e in r.mask_key_shares if e.peer == TARGET}  # fmt: skip
    return server, _unmask_target(server, b_shares, s_shares)


def test_downgrade_control_recovers_the_target_exactly(tmp_path: Path) -> None:
    params = SecAggParams.secagg(9, dimension=D, clip_range=CLIP, threshold=4)  # t ~ n/2, semi-honest
    assert not params.insecure and not params.malicious  # within the semi-honest bound: an old node accepts it
    _, recovered = _downgrade(tmp_path, defended=False, params=params)
    assert recovered is not None
    assert np.array_equal(recovered, _encoded_target(params, _inputs(9)))


@pytest.mark.parametrize(
    ("malicious", "field"),
    [(False, "identity_keys: the server announced no identity keys"), (True, "allow_insecure")],
)
def test_downgrade_is_refused_by_nodes_with_a_site_policy(tmp_path: Path, malicious: bool, field: str) -> None:
    n = 9
    if malicious:  # keys present, but t ~ n / 2 is below the malicious bound: only with allow_insecure
        keys = tuple(ed25519_public(os.urandom(32)) for _ in range(n))
        params = SecAggParams.secagg(n, dimension=D, clip_range=CLIP, threshold=4, identity_keys=keys,
                                     allow_insecure=True)  # fmt: skip
    else:
        params = SecAggParams.secagg(n, dimension=D, clip_range=CLIP, threshold=4)
    server, recovered = _downgrade(tmp_path, defended=True, params=params)
    assert recovered is None
    assert MaskedInput not in server.seen and AdvertiseKeys not in server.seen  # refused before training
    assert len(server.failures) == n
    assert all(why.startswith(f"InsecureParameterError: {field}") for why in server.failures.values())


# -- 3(b): a Sybil roster: the server's own keys at every index but the target's ------------------


def _sybil(tmp_path: Path, *, defended: bool) -> tuple[_Server, SecAggParams, list[np.ndarray]]:
    n = 6
    inputs = _inputs(n)
    secrets = [os.urandom(32) for _ in range(n)]  # the real parties' keys (only T is online)
    roster = tuple(ed25519_public(k) for k in secrets)
    sybil_keys = {p: os.urandom(32) for p in range(1, n)}
    announced = (roster[TARGET], *(ed25519_public(sybil_keys[p]) for p in range(1, n)))
    params = SecAggParams.secagg(n, dimension=D, clip_range=CLIP, identity_keys=announced)
    configs = _sites(tmp_path, [TARGET], secrets, SecurityPolicy(roster=roster) if defended else None)
    grid = LocalGrid(_app(inputs), configs)
    session = os.urandom(16)
    own = {}
    for p in range(1, n):
        own[p] = SecAggClient(params, party_id=p, session=session, round_number=5, context=b"plan",
                              identity_key=sybil_keys[p])  # fmt: skip
        own[p].set_input(inputs[p], rounding_seed=_seed(p))
    server = _Server(grid, params, {TARGET: 1}, own, session)
    server.setup()
    return server, params, inputs


def test_sybil_roster_control_recovers_the_target_exactly(tmp_path: Path) -> None:
    server, params, inputs = _sybil(tmp_path, defended=False)
    assert server.run() == [] and not server.failures
    ring = server.server.result().ring_sum.copy()
    for p in range(1, params.num_parties):  # the Sybils' inputs are the server's own
        ring -= params.encoding.encode(inputs[p], weight=1.0, rounding_seed=_seed(p))
    assert np.array_equal(ring, _encoded_target(params, inputs))


def test_sybil_roster_is_refused_by_a_node_pinning_the_roster(tmp_path: Path) -> None:
    server, _, _ = _sybil(tmp_path, defended=True)
    assert list(server.failures) == [1]
    assert server.failures[1].startswith("InsecureParameterError: identity_keys[1, 2, 3, 4, 5]: 5 key(s) are not")
    server.run()  # the Sybils can finish a round among themselves: without the target's input
    assert TARGET not in server.seen.get(MaskedInput, {}) and TARGET not in server.server.result().included


# -- 3(c): weak announced assumptions at n = 100 ---------------------------------------------------


def _weak(tmp_path: Path, *, defended: bool) -> tuple[_Server, SecAggParams, list[np.ndarray], dict[int, bytes]]:
    n = 100
    params = SecAggParams.secagg_plus(n, dimension=D, clip_range=CLIP, dropout_rate=0.0, corrupt_fraction=0.0)
    assert (params.neighbours, params.threshold) == (2, 3) and not params.insecure
    inputs = _inputs(n)
    session = os.urandom(16)
    graph = SecAggServer(params, session=session, round_number=5, context=b"plan").graph
    colluders = sorted(graph.neighbours_of(TARGET))  # T's two neighbours work for the server
    honest = [p for p in range(n) if p not in colluders]
    configs = _sites(tmp_path, honest, None, SecurityPolicy(corrupt_fraction=0.05) if defended else None)
    grid = LocalGrid(_app(inputs), configs)
    own, mask_keys = {}, {}
    for p in colluders:
        own[p] = SecAggClient(params, party_id=p, session=session, round_number=5, context=b"plan")
        own[p].set_input(inputs[p], rounding_seed=_seed(p))
    server = _Server(grid, params, {p: i + 1 for i, p in enumerate(honest)}, own, session)
    server.setup()
    for p in colluders:  # a colluding client hands its round secrets to the server
        mask_keys[p] = own[p]._s["mask_sk"]
    return server, params, inputs, mask_keys


def test_weak_assumptions_control_lets_two_neighbours_recover_the_target(tmp_path: Path) -> None:
    server, params, inputs, mask_keys = _weak(tmp_path, defended=False)
    assert server.run() == [] and not server.failures  # an honest-looking round
    responses: dict[int, UnmaskResponse] = server.seen[UnmaskResponse]
    b_shares = {p: e.share for p, r in responses.items() for e in r.self_mask_shares if e.peer == TARGET}
    recovered = _unmask_target(server, b_shares, None, mask_keys)
    assert np.array_equal(recovered, _encoded_target(params, inputs))


def test_weak_assumptions_are_refused_by_a_site_assuming_five_percent(tmp_path: Path) -> None:
    server, _, _, _ = _weak(tmp_path, defended=True)
    assert len(server.failures) == 98
    assert all(
        why.startswith("InsecureParameterError: neighbours: neighbours=2, threshold=3 at num_parties=100")
        for why in server.failures.values()
    )
    with pytest.raises(AbortError):
        server.run()


# -- the honest path: what the sites derive is what they accept, on both Flower surfaces -----------


def test_parameters_a_site_derives_are_accepted_and_the_sum_is_exact(tmp_path: Path) -> None:
    n = 8
    inputs = _inputs(n)
    secrets = [os.urandom(32) for _ in range(n)]
    roster = tuple(ed25519_public(k) for k in secrets)
    policy = SecurityPolicy(roster=roster, dropout_rate=0.1)
    grid = LocalGrid(_app(inputs), _sites(tmp_path, list(range(n)), secrets, policy))
    keys, failures = collect_identity_keys(grid, grid.get_node_ids(), timeout=1.0)
    assert not failures and [keys[node] for node in sorted(keys)] == list(roster)
    params = policy.derive(n, dimension=D, clip_range=CLIP, identity_keys=[keys[node] for node in sorted(keys)])
    out = secure_aggregate(grid, {node: RecordDict() for node in grid.get_node_ids()}, params, round_number=3,
                           context=b"plan", train_timeout=1.0, stage_timeout=1.0, poll_interval=0.001)  # fmt: skip
    ref = run_round(params, inputs, rounding_seeds=[_seed(i) for i in range(n)], round_number=3, context=b"plan",
                    identity_keys=secrets)  # fmt: skip
    assert list(out.aggregate.included) == list(range(n)) and not out.failures
    assert np.array_equal(out.aggregate.ring_sum, ref.result.ring_sum)


def test_a_node_without_an_identity_key_does_not_identify(tmp_path: Path) -> None:
    grid = LocalGrid(_app(_inputs(3)), _sites(tmp_path, [0, 1, 2], None, None))
    keys, failures = collect_identity_keys(grid, grid.get_node_ids(), timeout=1.0)
    assert keys == {} and all("holds none" in why for why in failures.values())


def _legacy_app(inputs: list[np.ndarray]) -> ClientApp:
    def fit(msg: Message, ctx: Context) -> Message:
        i = int(ctx.node_config["partition-id"])
        fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([inputs[i]]), num_examples=1, metrics={})
        return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)

    app = ClientApp(mods=[secure_aggregation_mod])
    app.train()(fit)
    return app


def _legacy_round(grid: LocalGrid, workflow: SecureFitWorkflow, n: int, d: int) -> tuple[np.ndarray, dict[str, Any]]:
    from flwr.server.client_manager import SimpleClientManager
    from flwr.server.compat.grid_client_proxy import GridClientProxy
    from flwr.server.compat.legacy_context import LegacyContext
    from flwr.server.server_config import ServerConfig
    from flwr.server.strategy import FedAvg
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
    from flwr.server.workflow.constant import Key as WorkflowKey

    manager = SimpleClientManager()
    for nid in grid.get_node_ids():
        manager.register(GridClientProxy(nid, grid, 1))
    captured: dict[str, Any] = {}
    strategy = FedAvg(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=n, min_available_clients=n)
    inner = strategy.aggregate_fit

    def aggregate_fit(rnd: int, results: Any, failures: Any) -> Any:
        captured["results"], captured["failures"] = results, failures
        return inner(rnd, results, failures)

    strategy.aggregate_fit = aggregate_fit  # type: ignore[method-assign]
    base = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    ctx = LegacyContext(base, config=ServerConfig(num_rounds=1), strategy=strategy, client_manager=manager)
    ctx.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: 1})
    ctx.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord([np.zeros(d)])
    workflow(grid, ctx)
    return ctx.state.array_records[MAIN_PARAMS_RECORD].to_numpy_ndarrays()[0], captured


def test_legacy_workflow_takes_the_keys_from_the_nodes_and_they_check_their_rosters(tmp_path: Path) -> None:
    n = 7
    inputs = _inputs(n)
    secrets = [os.urandom(32) for _ in range(n)]
    roster = tuple(ed25519_public(k) for k in secrets)
    policy = SecurityPolicy(roster=roster)
    grid = LocalGrid(_legacy_app(inputs), _sites(tmp_path, list(range(n)), secrets, policy))
    workflow = SecureFitWorkflow(malicious=True, policy=policy, clipping_range=CLIP, max_weight=1.0, timeout=1.0)
    mean, captured = _legacy_round(grid, workflow, n, D)
    assert len(captured["results"]) == n and not captured["failures"]  # type: ignore[arg-type]
    assert np.abs(mean - np.mean(inputs, axis=0)).max() < n * 2 * CLIP / 2**32 * 4
    # a node whose roster lacks one member's key refuses the round the server builds from reported keys
    stranger = tuple(ed25519_public(os.urandom(32)) for _ in range(1)) + roster[1:]
    configs = _sites(tmp_path, list(range(n)), secrets, policy)
    configs[3]["site-policy"] = str(tmp_path / "strict.toml")
    SitePolicy(security=SecurityPolicy(roster=stranger[:3] + roster[3:]), identity_key="id3.key").to_file(
        tmp_path / "strict.toml"
    )
    grid = LocalGrid(_legacy_app(inputs), configs)
    _, captured = _legacy_round(grid, SecureFitWorkflow(malicious=True, clipping_range=CLIP, max_weight=1.0,
                                                        timeout=1.0), n, D)  # fmt: skip
    failures = [str(f) for f in captured["failures"]]  # type: ignore[union-attr]
    assert any("node 4: error reply: InsecureParameterError: identity_keys[0]" in f for f in failures), failures


def test_a_node_finds_its_policy_through_this_machines_environment(tmp_path: Path, monkeypatch) -> None:
    from secure_fedllm.site import SITES_ENV, site_policy_path

    n = 9
    secrets = [os.urandom(32) for _ in range(n)]
    roster = tuple(ed25519_public(k) for k in secrets)
    for p in range(n):
        folder = site_policy_path(tmp_path, p).parent
        folder.mkdir(parents=True)
        (folder / "identity.key").write_text(secrets[p].hex())
        SitePolicy(security=SecurityPolicy(roster=roster), identity_key="identity.key").to_file(folder / "policy.toml")
    monkeypatch.setenv(SITES_ENV, str(tmp_path))
    configs = [{"partition-id": p} for p in range(n)]  # nothing in node config: the environment names the sites
    grid = LocalGrid(_app(_inputs(n)), configs)
    params = SecAggParams.secagg(n, dimension=D, clip_range=CLIP, threshold=4)
    server = _Server(grid, params, {p: p + 1 for p in range(n)}, {}, os.urandom(16))
    server.setup()
    assert all(why.startswith("InsecureParameterError: identity_keys") for why in server.failures.values())
    assert len(server.failures) == n


def test_sites_trusting_a_roster_authority_take_only_its_roster_from_the_server(tmp_path: Path) -> None:
    from protocols import SignedRoster

    n = 7
    inputs = _inputs(n)
    authority = os.urandom(32)
    secrets = [os.urandom(32) for _ in range(n)]
    roster = tuple(ed25519_public(k) for k in secrets)
    policy = SecurityPolicy(roster_authority=ed25519_public(authority), roster_label="job-7")
    grid = LocalGrid(_app(inputs), _sites(tmp_path, list(range(n)), secrets, policy))
    signed = SignedRoster.sign(authority, "job-7", roster)
    params = policy.derive(n, dimension=D, clip_range=CLIP, identity_keys=roster, signed_roster=signed)
    kw = {"round_number": 3, "train_timeout": 1.0, "stage_timeout": 1.0, "poll_interval": 0.001}
    nodes = {node: RecordDict() for node in grid.get_node_ids()}
    out = secure_aggregate(grid, nodes, params, signed_roster=signed, **kw)  # type: ignore[arg-type]
    assert list(out.aggregate.included) == list(range(n))
    # a roster of the server's own making, with its keys at every index but node 1's, is refused by node 1
    sybil_keys = [os.urandom(32) for _ in range(n)]
    forged_keys = (roster[0], *(ed25519_public(k) for k in sybil_keys[1:]))
    forged = SignedRoster.sign(os.urandom(32), "job-7", forged_keys)
    forged_params = SecAggParams.secagg(n, dimension=D, clip_range=CLIP, identity_keys=forged_keys)
    server = _Server(LocalGrid(_app(inputs), _sites(tmp_path, [TARGET], secrets, policy)), forged_params,
                     {TARGET: 1}, {}, os.urandom(16))  # fmt: skip
    contents = {1: RecordDict({PROTOCOL_RECORD: ConfigRecord(
        RoundSetup(forged_params, TARGET, server.session, 5, b"plan", forged).to_record())})}  # fmt: skip
    replies = server.exchange.run(contents, 5.0, server.failures)
    assert replies[1].has_error()
    assert "InsecureParameterError: roster: the relayed roster is not signed" in replies[1].error.reason
