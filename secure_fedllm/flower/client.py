"""Our federated LoRA + DP-SGD client as Flower ClientApp handlers.

A node is one client of the run: `partition-id` in its node_config picks its records, its privacy
policy comes from its own copy of the run configuration (node_config `config`, else the run's
`config`), and its ledger, secrets, noise seeds and release bindings live in its own state folder
(`secure_fedllm.site.SiteState` at `<state-dir>/client-XXXX/`; node_config `state-dir`, else
`<out>.sites` beside the run folder, never the run folder itself, which the server publishes). The
server proposes; the node checks the plan against its
policy and its own model fingerprints, trains, charges its ledger and only then lets the update go
to `secure_aggregation_mod`, which masks it. Its release key (secret) goes to the Mod beside the
update in `INPUT_RECORD`, which the Mod takes out of the reply before anything reaches the server;
the Mod binds the release to one session before the masked input leaves. Three messages reach these handlers:

* `query.offer`: is the node willing to join round r, and with which DP settings (its `Assignment`)?
* `train`: the round plan and the global adapter; the reply is the charged update (masked by the Mod).
* `query.ledger`: the node's public ledger summary for the run report.
* `query.evaluation`: would the node evaluate round r's model (named by its digest)? (federated evaluation)
* `evaluate`: the global adapter of a released round; the reply is the node's charged, noised (loss
  sum, count) on its held-out split, which the Mod masks in a session of its own, bound to that
  release like an update (`secure_fedllm.federation.evaluation`).

Protocol stages never load torch; offers and ledger queries load the privacy accountant but build no
model (after a node's first offer); `train` builds the model, and a process that serves several
messages (the simulation engine's workers) keeps it loaded.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import RunConfig
from .records import INPUT_RECORD

if TYPE_CHECKING:
    from flwr.app import Context, Message

    from ..federation.federation import Job

__all__ = [
    "handle_evaluate",
    "handle_evaluation_offer",
    "handle_ledger",
    "handle_offer",
    "handle_train",
    "node_config_path",
    "site_data_spec",
]


@dataclass
class _Shared:
    """What every client of one configuration shares in a process: one model, its hooks, the template."""

    job: Job
    trainer: Any


@dataclass
class _Node:
    config: RunConfig
    partition: int
    job: Job
    trainer: Any
    client: Any
    records: int
    dropped: int


_SHARED: dict[str, _Shared] = {}
_DATA: dict[tuple[str, int, str], Any] = {}
_HELDOUT: dict[tuple[str, int, str], Any] = {}


def node_config_path(context: Context) -> tuple[Path | None, Path]:
    """(configuration file or None for the default, state folder) of this node.

    Both come from the node's own config: its RunConfig copy sets its privacy policy, and its state
    folder holds its ledgers and bindings, so a server that could choose either could lower the
    policy or point the node at a fresh folder (a reset budget, forgotten bindings). Only our
    simulation launcher, on this machine, stands in for the node config (environment `SITES_ENV`).
    """
    import os

    from ..site.policy import SITES_ENV

    simulated = os.environ.get(SITES_ENV)
    config = context.node_config.get("config") or (context.run_config.get("config") if simulated else "") or ""
    state = context.node_config.get("state-dir") or simulated
    if not state:
        from .records import FlowerIntegrationError

        raise FlowerIntegrationError(
            "this node has no state folder: set node_config state-dir (its private ledgers, secrets and seeds "
            "live there; the server's run config may not choose it)"
        )
    return (Path(str(config)) if config else None), Path(str(state))


def site_data_spec(context: Context) -> Any:
    """The node's own data (node_config `data-path`, `data-format`, `data-fields`), or None to use a partition.

    A deployed site reads its own records; only a simulation partitions one shared source.
    """
    if not context.node_config.get("data-path"):
        return None
    from ..data import SiteDataSpec

    return SiteDataSpec.from_node_config(dict(context.node_config))


def _shared(config: RunConfig, digest: str, *, shared_data: bool) -> _Shared:
    # One model per process, as in the in-process runner: clients differ by data, policy, ledger, seed.
    key = f"{digest}|{shared_data}"
    if key in _SHARED:
        return _SHARED[key]
    from ..federation.federation import Job

    _SHARED.clear()
    _DATA.clear()
    _HELDOUT.clear()
    job = Job.build(config, data=shared_data)  # the same setup (seeds, A0, fingerprints) as the server's
    shared = _Shared(job, job.trainer())
    _SHARED[key] = shared
    return shared


def _node(context: Context) -> _Node:
    from ..data import TokenizedDataset
    from ..federation.federation import make_client

    config_file, state = node_config_path(context)
    config = RunConfig.from_file(config_file) if config_file else RunConfig()
    partition = int(context.node_config["partition-id"])  # type: ignore[arg-type]
    digest = hashlib.sha256(config.model_dump_json().encode()).hexdigest()
    spec = site_data_spec(context)
    shared = _shared(config, digest, shared_data=spec is None)
    key = (digest, partition, str(context.node_config.get("data-path") or ""))
    federated = config.evaluation.mode == "federated"
    if key not in _DATA:
        held: list[Any] = []
        if spec is None:  # a simulation partition; Job.build split off its held-out part under federated evaluation
            records = shared.job.data.clients[partition]
            held = shared.job.site_heldout[partition] if shared.job.site_heldout is not None else []
        else:
            from ..data import load_site_records, split_heldout

            by_person = config.privacy.unit == "user"
            records = load_site_records(spec, by_person=by_person)
            if spec.heldout_fraction:  # the site's held-out units never train
                records, held = split_heldout(records, spec.heldout_fraction, by_person=by_person)
            elif federated:
                from ..federation.evaluation import site_split

                records, held = site_split(config, records)
        _DATA[key] = TokenizedDataset.build(records, shared.job.template)
        _HELDOUT[key] = TokenizedDataset.build(held, shared.job.template) if federated and held else None
    data = _DATA[key]
    # The client (and its ledger) is re-read from disk for every message: another worker process may
    # have served this node since, and a stale in-memory ledger would under-count its epsilon.
    client = make_client(
        config,
        state,
        partition,
        data,
        shared.job.fingerprints,
        heldout=_HELDOUT[key],
        dimension=shared.job.manifest.dimension,
    )
    return _Node(config, partition, shared.job, shared.trainer, client, len(data.examples), data.dropped)


def _facts(context: Context) -> tuple[Any, dict[str, int]]:
    """(client without data, its public counts): no model is built once the counts are on disk.

    Offers and ledger queries need the policy, the ledger and the record counts only. On a SuperNode
    each message is a fresh process, so the counts are cached in the node's state folder (they are
    public: N_i is part of every plan) and the model is built only for training.
    """
    from ..federation.checkpoint import atomic_write, site_folder
    from ..federation.federation import make_client
    from ..site.state import population_id

    config_file, state = node_config_path(context)
    config = RunConfig.from_file(config_file) if config_file else RunConfig()
    partition = int(context.node_config["partition-id"])  # type: ignore[arg-type]
    data_path = str(context.node_config.get("data-path") or "")
    digest = hashlib.sha256((config.model_dump_json() + "|" + data_path).encode()).hexdigest()
    path = site_folder(state, partition) / "facts.json"
    facts = json.loads(path.read_text()) if path.exists() else {}
    if facts.get("config") != digest or "population" not in facts or "dimension" not in facts:
        node = _node(context)
        held = node.client.heldout.unit_ids if node.client.heldout is not None else []
        facts = {
            "config": digest,
            "units": node.client.data.num_units,
            "population": population_id([*node.client.data.unit_ids, *held]),  # as make_client names it
            "records": node.records,
            "dropped": node.dropped,
            "dimension": node.job.manifest.dimension,  # public: distributed DP calibrates for it
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps(facts).encode())
    counts = _Counts(int(facts["units"]), str(facts["population"]))
    client = make_client(config, state, partition, counts, {}, dimension=int(facts["dimension"]))
    return client, facts


@dataclass(frozen=True)
class _Counts:
    """Stands in for the tokenized data where only its size and population matter (policy, offer, ledger)."""

    num_units: int
    population: str


def handle_offer(msg: Message, context: Context) -> Message:
    """Reply whether this node joins the asked round, its DP offer and its (public) record count."""
    from flwr.app import ConfigRecord, Message, RecordDict

    client, facts = _facts(context)
    round_number = int(msg.content.config_records["ask"]["round"])  # type: ignore[arg-type]
    why = client.willing(round_number)
    offer = client.assignment(1.0).model_dump_json()
    reply = {"partition": client.client, "units": facts["units"], "willing": why or "", "offer": offer}
    return Message(RecordDict({"offer": ConfigRecord(reply)}), reply_to=msg)


def handle_train(msg: Message, context: Context) -> Message:
    """Check the plan, train under DP, charge the ledger, and hand the update to the Mod."""
    import numpy as np
    from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

    from ..federation.plan import RoundPlan

    node = _node(context)
    plan = RoundPlan.parse(bytes(msg.content.config_records["plan"]["plan"]))  # type: ignore[arg-type]
    global_vector = msg.content.array_records["global"].to_numpy_ndarrays()[0].astype(np.float32)
    weight = next(a.weight for a in plan.participants if a.client == node.partition)
    update = node.client.train(node.trainer, node.job.model, node.job.manifest, global_vector, plan)
    extra = {
        "weight": weight,
        "rounding_seed": update.rounding_seed,
        "context": plan.digest(),
        # SECRET, for the Mod only: it binds this release to one session; INPUT_RECORD never reaches the server
        "release_key": update.release_key,
        "release_job": node.client.job,
        "release_round": update.round,
        "site_state": str(node.client.site.root),
    }
    return Message(
        RecordDict(
            {
                "update": ArrayRecord([update.delta]),
                "metrics": MetricRecord({"epsilon": update.epsilon, "replayed": int(update.replayed)}),
                INPUT_RECORD: ConfigRecord(extra),
            }
        ),
        reply_to=msg,
    )


def handle_ledger(msg: Message, context: Context) -> Message:
    """The node's ledger summary (epsilon spent, rounds joined) and its data counts, for the report."""
    from flwr.app import ConfigRecord, Message, RecordDict

    c, facts = _facts(context)
    ledger = c.ledger.to_dict(public=True) if c.ledger is not None else {"client": c.client}
    summary = {
        "client": c.client,
        "records": facts["records"],
        "units": facts["units"],
        "dropped": facts["dropped"],
        "epsilon": c.epsilon,
    }
    content = {"ledger": json.dumps(ledger), "summary": json.dumps(summary), "policy": c.policy.model_dump_json()}
    return Message(RecordDict({"ledger": ConfigRecord(content)}), reply_to=msg)


def handle_evaluation_offer(msg: Message, context: Context) -> Message:
    """Reply whether this node would evaluate round r's model (named by its digest), or why not; builds no model."""
    from flwr.app import ConfigRecord, Message, RecordDict

    client, _ = _facts(context)
    ask = msg.content.config_records["ask"]
    why = client.evaluation_willing(int(ask["round"]), str(ask["model"]))  # type: ignore[arg-type]
    reply = {"partition": client.client, "willing": why or ""}
    return Message(RecordDict({"evaluation": ConfigRecord(reply)}), reply_to=msg)


def handle_evaluate(msg: Message, context: Context) -> Message:
    """Check the model, score the held-out split, noise and charge, and hand the 2-vector to the Mod.

    The reply carries the noised (loss sum, count) scaled into the encoding, which the Mod masks and
    binds to this one session; the raw values never reach the server.
    """
    import numpy as np
    from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

    node = _node(context)
    round_number = int(msg.content.config_records["evaluate"]["round"])  # type: ignore[arg-type]
    global_vector = msg.content.array_records["global"].to_numpy_ndarrays()[0].astype(np.float32)
    if node.job.start is None:
        from .records import FlowerIntegrationError

        raise FlowerIntegrationError("this node's job has no starting adapter to check models against")
    release = node.client.evaluate(node.job.model, node.job.manifest, global_vector, round_number, start=node.job.start)
    extra = {
        "weight": 1.0,
        "rounding_seed": release.rounding_seed,
        "context": release.context,
        # SECRET, for the Mod only: it binds this release to one session; INPUT_RECORD never reaches the server
        "release_key": release.release_key,
        "release_job": node.client.job,
        "release_round": release.round,
        "site_state": str(node.client.site.root),
    }
    return Message(
        RecordDict(
            {
                "evaluation": ArrayRecord([release.scaled]),
                "metrics": MetricRecord({"epsilon": release.epsilon, "replayed": int(release.replayed)}),
                INPUT_RECORD: ConfigRecord(extra),
            }
        ),
        reply_to=msg,
    )
