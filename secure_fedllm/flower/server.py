"""Our federation's server loop on a Flower `Grid`: the same job and run folder as the in-process runner.

Per round: sample the cohort (public randomness from the run seed), ask its nodes for their offers
(`query.offer`: willing or not, DP settings, record count), announce the `RoundPlan` inside the
`train` instruction, and securely aggregate the charged updates with `secure_aggregate` (the plan's
digest is the protocol context, so a node masks only for the plan it checked). The server applies the
decoded mean, evaluates on its own held-out records, writes metrics and a checkpoint; at the end it
asks every node for its public ledger summary and writes the adapter and report. Dropouts here are
real ones (silent or failing nodes), not `federation.dropout`'s simulated ones.

In the malicious setting (`secure_aggregation.setting`, the default) the server first asks every
node for its public identity key (`collect_identity_keys`); it never supplies keys of its own. Each
round's parameters are what the sites' policy derives for the joining nodes (`secagg_params` with
their keys, n_C counted over all nodes' keys), and each node checks them against the policy and the
roster in its own site policy file before it trains.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..config import RunConfig
from ..errors import ConfigError

if TYPE_CHECKING:
    from flwr.app import Message, RecordDict
    from flwr.serverapp import Grid

    from ..federation import RunResult

__all__ = ["run_on_grid"]


def run_on_grid(
    grid: Grid,
    config: RunConfig,
    *,
    out: str | Path,
    train_timeout: float = 3600.0,
    stage_timeout: float = 120.0,
    join_timeout: float = 300.0,
    log: Callable[[str], None] = print,
) -> RunResult:
    """Run the federation of `config` over the nodes of `grid`; results land in `out` as in-process.

    Raises:
        ConfigError: a protocol the Flower engine does not run, or too few nodes joined in time.
    """
    from flwr.app import ArrayRecord, ConfigRecord, RecordDict

    from protocols import AbortError

    from ..adapters import AdapterManifest, adapter_fingerprints, attach_lora, get_vector, save_adapter, set_vector
    from ..data import ChatTemplate, TokenizedDataset, load_federation_data
    from ..federation import RunResult
    from ..federation.aggregation import sample_cohort, secagg_params
    from ..federation.checkpoint import Checkpoint, atomic_write
    from ..federation.plan import Assignment, ClientPolicy, RoundPlan
    from ..federation.report import write_report
    from ..federation.runner import _prepare_folder, _public_seed, adapter_sidecar, evaluate_round
    from ..models import load_base_model, model_fingerprint
    from ..site import check_setting
    from .grid_round import collect_identity_keys, secure_aggregate

    protocol = config.secure_aggregation.protocol
    if protocol not in ("secagg", "secagg+"):
        raise ConfigError(
            f"secure_aggregation.protocol={protocol!r}: the Flower engine runs 'secagg' and 'secagg+'; "
            "use the in-process engine for the others"
        )
    paths, config = _prepare_folder(config, out, None)
    check_setting(config)
    import torch

    torch.manual_seed(_public_seed(config.federation.seed, "torch"))
    base, tokenizer = load_base_model(config.model)
    base_sha = model_fingerprint(base)
    model = attach_lora(base, config.lora, a0_seed=_public_seed(config.federation.seed, "a0"))
    manifest = AdapterManifest.of(model, config.lora.aggregation)
    fingerprints = adapter_fingerprints(model)
    data = load_federation_data(config)  # the server uses the held-out records only
    template = ChatTemplate(tokenizer, system_prompt=config.data.system_prompt, max_length=config.data.max_length)
    heldout = TokenizedDataset.build(data.heldout, template)
    if data.canaries:
        atomic_write(paths.root / "data_manifest.json", json.dumps({"canaries": data.canaries}, indent=1).encode())
    common = {"base_sha256": base_sha, "manifest_sha256": manifest.digest(), **fingerprints}

    nodes = _wait_for_nodes(grid, config.federation.clients, join_timeout)
    # queries may start a fresh ClientApp process that imports the accountant: bounded by train_timeout
    query_timeout = train_timeout
    offers, node_of = _partitions(grid, nodes, config.federation.clients, query_timeout)
    keys: dict[int, bytes] | None = None
    if config.secure_aggregation.setting == "malicious":
        keys, unidentified = collect_identity_keys(grid, [node_of[p] for p in sorted(node_of)], timeout=query_timeout)
        if unidentified:
            raise ConfigError(
                "secure_aggregation.setting='malicious' but nodes gave no identity key: "
                + "; ".join(f"node {n}: {why}" for n, why in sorted(unidentified.items()))
                + ". Give each node a site policy (node_config site-policy) with its identity key, or set "
                "secure_aggregation.setting='semi-honest'"
            )
    roster = [keys[node_of[p]] for p in sorted(node_of)] if keys is not None else None
    units = {p: int(offers[n]["units"]) for p, n in node_of.items()}  # type: ignore[arg-type]
    largest = max(units.values())
    weights = {p: 1.0 if config.federation.weighting == "uniform" else units[p] / largest for p in units}

    global_vector = get_vector(model, manifest)
    rows: list[dict[str, Any]] = []
    log(f"secure-fedllm on Flower: {len(nodes)} nodes, {config.federation.rounds} rounds, {protocol} -> {paths.root}")
    for round_number in range(config.federation.rounds + 1):
        row: dict[str, Any] = {"round": round_number, "engine": "flower"}
        if round_number > 0:
            cohort = sample_cohort(config, round_number)
            answers = _ask(grid, [node_of[c] for c in cohort], "query.offer", _ask_round(round_number), query_timeout)
            partition_of = {n: p for p, n in node_of.items()}
            joining = sorted(partition_of[n] for n, a in answers.items() if not a["willing"])
            row.update(
                cohort=cohort, sat_out={str(partition_of[n]): a["willing"] for n, a in answers.items() if a["willing"]}
            )
            if len(joining) < 3:
                row.update(
                    participants=joining, included=[], dropped=[], aborted=f"only {len(joining)} clients can join"
                )
            else:
                participants = []
                for c in joining:
                    offer = Assignment.model_validate_json(str(answers[node_of[c]]["offer"]))
                    participants.append(offer.model_copy(update={"weight": weights[c]}))
                plan = RoundPlan(
                    round=round_number,
                    aggregation=config.lora.aggregation,
                    protocol=protocol,
                    clip_range=config.secure_aggregation.clip_range,
                    participants=tuple(participants),
                    **common,
                )
                instruction = RecordDict(
                    {
                        "plan": ConfigRecord({"plan": plan.model_dump_json().encode()}),
                        "global": ArrayRecord([global_vector]),
                    }
                )
                members = sorted(node_of[c] for c in joining)  # party order of secure_aggregate
                params = secagg_params(
                    config,
                    len(joining),
                    manifest.dimension,
                    identity_keys=[keys[n] for n in members] if keys is not None else None,
                    roster=roster,
                )
                t = time.perf_counter()
                try:
                    outcome = secure_aggregate(
                        grid,
                        {node_of[c]: instruction for c in joining},
                        params,
                        round_number=round_number,
                        context=plan.digest(),
                        train_timeout=train_timeout,
                        stage_timeout=stage_timeout,
                    )
                except AbortError as exc:
                    row.update(participants=joining, included=[], dropped=joining, aborted=str(exc))
                else:
                    included = sorted(partition_of[n] for n in outcome.included_nodes)
                    global_vector = (global_vector.astype(np.float64) + outcome.mean()).astype(np.float32)
                    row.update(
                        participants=joining,
                        included=included,
                        dropped=[c for c in joining if c not in included],
                        failures={str(partition_of[n]): why for n, why in outcome.failures.items()},
                        aborted=None,
                        quantization_bound=outcome.aggregate.decoded.max_abs_error
                        / max(outcome.aggregate.decoded.total_weight, 1e-300),
                        protocol={
                            "neighbours": params.neighbours,
                            "threshold": params.threshold,
                            "malicious": params.malicious,
                        },
                        seconds={
                            "round": time.perf_counter() - t,
                            "stages": outcome.stage_seconds,
                            "protocol_server": outcome.server_seconds,
                        },
                        bytes={
                            "upload": sum(outcome.upload_bytes.values()),
                            "download": sum(outcome.download_bytes.values()),
                        },
                    )
        set_vector(model, manifest, global_vector)
        evaluate_round(config, model, heldout, template, data.heldout, row)
        rows.append(row)
        paths.write_metrics(rows)
        Checkpoint(round_number, global_vector).save(paths)
        log(f"round {round_number}: perplexity {row['perplexity']:.3f} included {row.get('included', [])}")

    answered = [node_of[p] for p in sorted(node_of)]
    reports = _ask(grid, answered, "query.ledger", RecordDict(), query_timeout)
    reports = {n: reports[n] for n in answered if n in reports}
    ledgers = [json.loads(str(r["ledger"])) for r in reports.values()]
    summary = [json.loads(str(r["summary"])) for r in reports.values()]
    policies = [ClientPolicy.model_validate_json(str(r["policy"])) for r in reports.values()]
    epsilons = {int(s["client"]): float(s["epsilon"]) for s in summary}
    for row in rows:
        row["epsilon"] = {str(c): e for c, e in epsilons.items()}
    paths.write_metrics(rows)
    sidecar = adapter_sidecar(
        config,
        manifest,
        {**fingerprints, "base_sha256": base_sha},
        epsilon_max=max(epsilons.values(), default=0.0),
        delta_max=max((p.delta for p, led in zip(policies, ledgers, strict=True) if led.get("events")), default=0.0),
    )
    sidecar["engine"] = "flower"
    save_adapter(model, paths.adapter, sidecar=sidecar)
    write_report(paths, config, rows, ledgers, policies, sidecar, summary)
    return RunResult(paths.root, rows, epsilons, paths.adapter, paths.report)


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


def _wait_for_nodes(grid: Grid, count: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= count:
            return nodes
        if time.monotonic() > deadline:
            raise ConfigError(f"federation.clients={count} but only {len(nodes)} nodes connected within {timeout} s")
        time.sleep(1.0)


def _ask(grid: Grid, nodes: list[int], message_type: str, content: RecordDict, timeout: float) -> dict[int, Any]:
    """Send one query to each node; return node -> the single ConfigRecord of its reply (errors skipped)."""
    from flwr.app import Message

    messages = [Message(content, dst_node_id=n, message_type=message_type) for n in nodes]
    replies: list[Message] = list(grid.send_and_receive(messages, timeout=timeout))
    out = {}
    for reply in replies:
        if not reply.has_error():
            out[reply.metadata.src_node_id] = next(iter(reply.content.config_records.values()))
    return out
