"""Our federation on a Flower `Grid`: `GridTransport`, the same `Federation` and run folder as in process.

Per round: sample the cohort (public randomness from the run seed), ask its nodes for their offers
(`query.offer`: willing or not, DP settings, record count), announce the `RoundPlan` inside the
`train` instruction, and securely aggregate the charged updates with `secure_aggregate` (the plan's
digest is the protocol context, so a node masks only for the plan it checked). The server applies the
decoded mean, evaluates on its own held-out records, writes metrics and a checkpoint; at the end it
asks every node for its public ledger summary and writes the adapter and report. Dropouts here are
real ones (silent or failing nodes), not `federation.dropout`'s simulated ones.

In the malicious setting (`secure_aggregation.setting`, the default) the server first asks every
node for its public identity key (`collect_identity_keys`); it never supplies keys of its own. Each
round's parameters are what the sites' policy derives for the joining nodes (`round_params`, shared
with the in-process engine: with their keys, n_C counted over all nodes' keys), and each node checks
them against the policy and the roster in its own site policy file before it trains.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from protocols import SignedRoster

from ..config import RunConfig
from ..errors import ConfigError
from ..federation.federation import ClientLedger, Federation, Job, RunResult
from ..federation.plan import Assignment, ClientPolicy, RoundPlan
from ..federation.record import ProtocolFacts, RoundBytes, RoundRecord, RoundSeconds

if TYPE_CHECKING:
    from flwr.app import RecordDict
    from flwr.serverapp import Grid

    from ..federation.checkpoint import RunPaths

__all__ = ["GridTransport", "run_on_grid"]


def run_on_grid(
    grid: Grid,
    config: RunConfig,
    *,
    out: str | Path,
    train_timeout: float = 3600.0,
    stage_timeout: float = 120.0,
    join_timeout: float = 300.0,
    log: Callable[[str], None] = print,
    signed_roster: SignedRoster | None = None,
) -> RunResult:
    """Run (continue, or finish) the federation of `config` over the nodes of `grid`, in the run folder `out`.

    `signed_roster` is the roster a roster authority (not this server) signed for the sites: the
    server only relays it, so sites whose policy trusts that authority accept the members' keys.

    Raises:
        ConfigError: a protocol the Flower engine does not run, too few nodes joined in time, or a
            folder holding something else (see `open_run_folder`).
    """
    transport = GridTransport(
        grid,
        config,
        train_timeout=train_timeout,
        stage_timeout=stage_timeout,
        join_timeout=join_timeout,
        log=log,
        signed_roster=signed_roster,
    )
    return Federation(transport, log=log).run(config, out=out)


class GridTransport:
    """The nodes of a Flower `Grid`: offers and ledgers by query, training and masking by `secure_aggregate`.

    Dropouts are real (silent or failing nodes). In the malicious setting the server asks every node
    for its public identity key and never supplies keys of its own.
    """

    engine = "flower"

    def __init__(
        self,
        grid: Grid,
        config: RunConfig,
        *,
        train_timeout: float = 3600.0,
        stage_timeout: float = 120.0,
        join_timeout: float = 300.0,
        log: Callable[[str], None] = print,
        signed_roster: SignedRoster | None = None,
    ) -> None:
        protocol = config.secure_aggregation.protocol
        if protocol == "none":
            raise ConfigError(
                "secure_aggregation.protocol='none': the Flower engine runs 'secagg', 'secagg+', 'he-bfv' and "
                "'he-ckks' (updates never leave a node in the clear); use the in-process engine for the plaintext "
                "control"
            )
        self.grid, self.config, self.log = grid, config, log
        self.train_timeout, self.stage_timeout, self.join_timeout = train_timeout, stage_timeout, join_timeout
        # queries may start a fresh ClientApp process that imports the accountant: bounded by train_timeout
        self.query_timeout = train_timeout
        self.node_of: dict[int, int] = {}
        self.keys: dict[int, bytes] | None = None
        self.signed_roster = signed_roster

    def start(self, job: Job, paths: RunPaths) -> dict[int, int]:
        """Wait for the nodes, map each partition to a node, collect identity keys (malicious setting)."""
        from .grid_round import collect_identity_keys

        config = self.config
        self.job = job
        nodes = _wait_for_nodes(self.grid, config.federation.clients, self.join_timeout)
        offers, self.node_of = _partitions(self.grid, nodes, config.federation.clients, self.query_timeout)
        if config.secure_aggregation.setting == "malicious":
            members = [self.node_of[p] for p in sorted(self.node_of)]
            self.keys, unidentified = collect_identity_keys(self.grid, members, timeout=self.query_timeout)
            if unidentified:
                raise ConfigError(
                    "secure_aggregation.setting='malicious' but nodes gave no identity key: "
                    + "; ".join(f"node {n}: {why}" for n, why in sorted(unidentified.items()))
                    + ". Give each node a site policy (node_config site-policy) with its identity key, or set "
                    "secure_aggregation.setting='semi-honest'"
                )
            if self.signed_roster is not None:
                listed = set(self.signed_roster.keys)
                strangers = sorted(p for p, n in self.node_of.items() if self.keys[n] not in listed)
                if strangers:
                    raise ConfigError(
                        f"signed-roster: the identity keys of partitions {strangers} are not in the relayed roster "
                        f"{self.signed_roster.label!r}; the sites would refuse every round. Have the roster authority "
                        "sign a roster with every site's key"
                    )
        self.log(f"secure-fedllm on Flower: {len(nodes)} nodes -> {paths.root}")
        return {p: int(offers[n]["units"]) for p, n in self.node_of.items()}

    def offers(self, round_number: int, cohort: list[int]) -> dict[int, Assignment | str]:
        """Ask the cohort's nodes (query.offer); a node that does not answer is left out."""
        answers = _ask(self.grid, [self.node_of[c] for c in cohort], "query.offer", _ask_round(round_number),
                       self.query_timeout)  # fmt: skip
        partition_of = {n: p for p, n in self.node_of.items()}
        out: dict[int, Assignment | str] = {}
        for node, answer in answers.items():
            why = str(answer["willing"])
            out[partition_of[node]] = why or Assignment.model_validate_json(str(answer["offer"]))
        return out

    def train_and_aggregate(self, plan: RoundPlan, global_vector: Any, record: RoundRecord) -> Any:
        """Send the plan and global adapter in the `train` instruction; securely aggregate the replies."""
        from flwr.app import ArrayRecord, ConfigRecord, RecordDict

        from protocols import AbortError

        from ..federation.aggregation import family_facts, protocol_dimension, round_family
        from .grid_round import secure_aggregate

        config, node_of = self.config, self.node_of
        joining = [a.client for a in plan.participants]
        record.participants = joining
        instruction = RecordDict(
            {"plan": ConfigRecord({"plan": plan.model_dump_json().encode()}), "global": ArrayRecord([global_vector])}
        )
        members = sorted(node_of[c] for c in joining)  # party order of secure_aggregate
        keys = self.keys
        family = round_family(  # the in-process engine's builder: one knob, one meaning on both engines
            config,
            len(joining),
            protocol_dimension(config, self.job.manifest.dimension),
            identity_keys=[keys[n] for n in members] if keys is not None else None,
            roster=self._roster(),
        )
        try:
            outcome = secure_aggregate(
                self.grid,
                {node_of[c]: instruction for c in joining},
                family,
                round_number=plan.round,
                context=plan.digest(),
                train_timeout=self.train_timeout,
                stage_timeout=self.stage_timeout,
                signed_roster=self.signed_roster,
            )
        except AbortError as exc:
            record.dropped, record.aborted = joining, str(exc)
            partition_of = {n: p for p, n in node_of.items()}
            failures = getattr(exc, "failures", {})  # GridRoundAbortedError: which nodes failed, and why
            record.failures = {partition_of[n]: why for n, why in failures.items() if n in partition_of}
            return None
        partition_of = {n: p for p, n in node_of.items()}
        included = sorted(partition_of[n] for n in outcome.included_nodes)
        record.included = included
        record.dropped = [c for c in joining if c not in included]
        record.failures = {partition_of[n]: why for n, why in outcome.failures.items()}  # type: ignore[assignment]
        decoded = outcome.aggregate.decoded
        record.quantization_bound = decoded.max_abs_error / max(decoded.total_weight, 1e-300)
        neighbours, threshold, malicious = family_facts(family)
        record.protocol = ProtocolFacts(neighbours=neighbours, threshold=threshold, malicious=malicious)
        stages = outcome.stage_seconds
        record.seconds = RoundSeconds(
            training=stages[0] if stages else 0.0,  # the train stage: training plus the first protocol message
            protocol_client=sum(stages[1:]),  # the later stages' round trips to the nodes
            protocol_server=outcome.server_seconds,
            evaluation=record.seconds.evaluation,
        )
        record.bytes = RoundBytes(
            upload=sum(outcome.upload_bytes.values()), download=sum(outcome.download_bytes.values())
        )
        if config.privacy.mode == "distributed" and config.privacy.mechanism != "none":
            from ..federation.aggregation import signed_sum

            return signed_sum(outcome.aggregate.ring_sum)  # distributed DP: the exact integer sum
        return outcome.mean()

    def _roster(self) -> list[bytes] | None:
        """What the sites count n_C over: the authority's roster when one is relayed, else every node's key."""
        if self.keys is None:
            return None
        if self.signed_roster is not None:
            return list(self.signed_roster.keys)
        return [self.keys[self.node_of[p]] for p in sorted(self.node_of)]

    def ledgers(self) -> list[ClientLedger]:
        """Every node's public ledger summary, policy and data counts (query.ledger)."""
        from flwr.app import RecordDict

        answered = [self.node_of[p] for p in sorted(self.node_of)]
        replies = _ask(self.grid, answered, "query.ledger", RecordDict(), self.query_timeout, group="query.ledger")
        out = []
        for node in answered:
            if node not in replies:
                continue
            reply = replies[node]
            summary = json.loads(str(reply["summary"]))
            out.append(
                ClientLedger(
                    int(summary["client"]),
                    ClientPolicy.model_validate_json(str(reply["policy"])),
                    json.loads(str(reply["ledger"])),
                    int(summary["records"]),
                    int(summary["units"]),
                    int(summary["dropped"]),
                    float(summary["epsilon"]),
                )
            )
        return out

    def evaluate(self, round_number: int, global_vector: Any, record: RoundRecord) -> None:
        """Federated evaluation: ask every node (query.evaluation), then one `evaluate` session of the willing ones.

        The session is its own secure aggregation (dimension 2: each node's noised loss sum and
        count, scaled into the encoding), built by the same `round_family` as training, with the
        context `evaluation_context` of this job, round and model, under message type `evaluate`.
        The server learns the sum over the included nodes only.
        """
        import numpy as np

        from protocols import AbortError

        from ..federation.evaluation import EvaluationSettings, evaluation_context, model_digest, summarize
        from ..federation.federation import job_id

        config = self.config
        settings = EvaluationSettings.of(config)
        digest = model_digest(global_vector)
        partition_of = {n: p for p, n in self.node_of.items()}
        nodes = [self.node_of[p] for p in sorted(self.node_of)]
        answers = _ask(self.grid, nodes, "query.evaluation", _ask_evaluation(round_number, digest), self.query_timeout,
                       group="query.evaluation")  # fmt: skip
        sat_out = {partition_of[n]: "no answer to query.evaluation" for n in nodes if n not in answers}
        willing = []
        for node, answer in answers.items():
            why = str(answer["willing"])
            if why:
                sat_out[partition_of[node]] = why
            else:
                willing.append(partition_of[node])
        if len(willing) < 3:
            record.federated_evaluation = summarize(
                None, sites=[], sat_out=sat_out, epsilon={}, aborted=f"only {len(willing)} sites can evaluate"
            )
            return
        context = evaluation_context(
            job_id(config), round_number, digest, value_bound=settings.value_bound, clip_range=settings.clip_range
        )
        try:
            outcome = self._evaluation_session(round_number, global_vector, sorted(willing), context)
        except AbortError as exc:
            record.federated_evaluation = summarize(None, sites=[], sat_out=sat_out, epsilon={}, aborted=str(exc))
            return
        for node, why in outcome.failures.items():
            sat_out[partition_of[node]] = why
        included = sorted(partition_of[n] for n in outcome.included_nodes)
        epsilon, replayed = {}, []
        for node in outcome.included_nodes:
            reply = outcome.replies.get(node)
            metrics = reply.metric_records.get("metrics") if reply is not None else None
            if metrics is not None:  # each node's own report: its epsilon of this release, and whether it replayed
                epsilon[partition_of[node]] = float(metrics["epsilon"])
                if int(metrics["replayed"]):
                    replayed.append(partition_of[node])
        sums = np.asarray(outcome.aggregate.decoded.weighted_sum, dtype=np.float64) * settings.scale
        record.federated_evaluation = summarize(
            sums, sites=included, sat_out=sat_out, epsilon=epsilon, replayed=sorted(replayed)
        )

    def _evaluation_session(self, round_number: int, global_vector: Any, partitions: list[int], context: bytes) -> Any:
        """One secure aggregation of the partitions' evaluation releases (message type `evaluate`)."""
        from flwr.app import ArrayRecord, ConfigRecord, RecordDict

        from ..federation.aggregation import round_family
        from ..federation.evaluation import EVALUATION_DIMENSION
        from .grid_round import secure_aggregate

        instruction = RecordDict(
            {"evaluate": ConfigRecord({"round": round_number}), "global": ArrayRecord([global_vector])}
        )
        members = sorted(self.node_of[p] for p in partitions)  # party order of secure_aggregate
        keys = self.keys
        family = round_family(
            self.config,
            len(members),
            EVALUATION_DIMENSION,
            identity_keys=[keys[n] for n in members] if keys is not None else None,
            roster=self._roster(),
        )
        return secure_aggregate(
            self.grid,
            {node: instruction for node in members},
            family,
            round_number=round_number,
            context=context,
            message_type="evaluate",
            train_timeout=self.train_timeout,
            stage_timeout=self.stage_timeout,
            signed_roster=self.signed_roster,
        )


def _partitions(grid: Grid, nodes: list[int], clients: int, timeout: float) -> tuple[dict[int, Any], dict[int, int]]:
    """Ask every node for its offer; map each partition to one node (a restarted node's old id may linger)."""
    offers = _ask(grid, nodes, "query.offer", _ask_round(0), timeout)
    node_of: dict[int, int] = {}
    for n in sorted(offers):
        node_of.setdefault(int(offers[n]["partition"]), n)
    missing = sorted(set(range(clients)) - set(node_of))
    if missing:
        raise ConfigError(
            f"federation.clients={clients}: {len(offers)} of {len(nodes)} nodes answered query.offer within "
            f"{timeout} s and no node holds partitions {missing}"
        )
    return offers, node_of


def _ask_round(round_number: int) -> RecordDict:
    from flwr.app import ConfigRecord, RecordDict

    return RecordDict({"ask": ConfigRecord({"round": round_number})})


def _ask_evaluation(round_number: int, digest: str) -> RecordDict:
    from flwr.app import ConfigRecord, RecordDict

    return RecordDict({"ask": ConfigRecord({"round": round_number, "model": digest})})


def _wait_for_nodes(grid: Grid, count: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= count:
            return nodes
        if time.monotonic() > deadline:
            raise ConfigError(f"federation.clients={count} but only {len(nodes)} nodes connected within {timeout} s")
        time.sleep(1.0)


def _ask(
    grid: Grid, nodes: list[int], message_type: str, content: RecordDict, timeout: float, *, group: str = ""
) -> dict[int, Any]:
    """Send one query to each node; return node -> the single ConfigRecord of its reply (errors skipped).

    Ledger queries (asked after every round) carry their own group id, apart from the offers.
    """
    from flwr.app import Message

    messages = [Message(content, dst_node_id=n, message_type=message_type, group_id=group) for n in nodes]
    replies: list[Message] = list(grid.send_and_receive(messages, timeout=timeout))
    out = {}
    for reply in replies:
        if not reply.has_error():
            out[reply.metadata.src_node_id] = next(iter(reply.content.config_records.values()))
    return out
