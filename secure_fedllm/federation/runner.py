"""The in-process federation: rounds of DP-SGD clients and secure aggregation, checkpointed.

Every client trains on the same peft model object in turn (one copy of the weights in memory, the
Opacus hooks attached once); what separates clients is their data, policy and private state folder
(`secure_fedllm.site.SiteState`: ledger, secrets, noise seeds, session bindings), kept under the
sites folder beside the run folder (`<run>.sites` unless `sites` names another), never inside it.

Per round: the server samples a cohort; each client checks its budget (sitting out if a round would
exceed it); the server announces the `RoundPlan` whose digest binds the base-model, A0,
adapter-config and manifest hashes and every participant's DP settings into the protocol
transcript; clients train and charge their ledgers; a client whose release already went to an
earlier session refuses the new one; each client binds its release to the session right before its
masked input leaves; updates are securely aggregated with the configured dropouts; the server
applies the decoded mean, evaluates on its own held-out records and checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from ..adapters import AdapterManifest, adapter_fingerprints, attach_lora, get_vector, save_adapter, set_vector
from ..config import RunConfig
from ..data import ChatTemplate, TokenizedDataset, load_federation_data
from ..errors import ConfigError
from ..models import load_base_model, model_fingerprint
from ..privacy import PrivacyLedger
from ..site import SiteState, check_setting
from ..training import LocalTrainer, evaluate, generate_samples
from .aggregation import aggregate_updates, draw_dropouts, sample_cohort
from .checkpoint import Checkpoint, RunPaths, atomic_write, site_folder
from .client import ClientUpdate, FederatedClient
from .plan import RoundPlan, client_policy
from .report import write_report

__all__ = ["RunResult", "run"]


@dataclass
class RunResult:
    """What a run produced: its folder, the metrics rows, each client's epsilon and the adapter."""

    out: Path
    metrics: list[dict[str, Any]]
    epsilons: dict[int, float]
    adapter: Path
    report: Path
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def final_perplexity_ratio(self) -> float:
        """Final held-out perplexity over round 0's."""
        return float(self.metrics[-1]["perplexity"] / self.metrics[0]["perplexity"])


def run(
    config: RunConfig | None = None,
    *,
    out: str | Path | None = None,
    resume: str | Path | None = None,
    merge: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
    tap: Callable[[int, int, bytes], None] | None = None,
    sites: str | Path | None = None,
) -> RunResult:
    """Run (or resume) a federation and return its result.

    Args:
        config: the run configuration (default: `RunConfig()`); with `resume`, must match the saved one.
        out: the run folder (default `runs/<UTC time>`); must not already hold a run.
        resume: a run folder to continue from its last checkpoint.
        merge: also save the merged model (`merge_and_unload`) under `merged/`.
        progress: show rich progress bars and a summary per round.
        stop_after: stop after this round, as if the process ended there (resume continues).
        tap: audit hook called with (round, client, bytes) for every message a client sends the server.
        sites: the folder of the clients' private state folders (default `<run>.sites`, beside the run
            folder; give the same one to `resume`). Never inside the run folder, which is public.

    Raises:
        ConfigError: a bad configuration, an existing run folder, or a resume that does not match.
        PrivacyBudgetExhaustedError: a client asked to train past its budget.
    """
    paths, config = _prepare_folder(config, out, resume)
    check_setting(config)  # a malicious setting the cohort cannot run fails here, not after round 0
    sites_root = Path(sites) if sites is not None else paths.sites
    if sites_root.resolve().is_relative_to(paths.root.resolve()):
        raise ConfigError(f"sites={sites_root} is inside the run folder {paths.root}, which the server may publish")
    torch.manual_seed(_public_seed(config.federation.seed, "torch"))
    console = Console(quiet=not progress)
    base, tokenizer = load_base_model(config.model)
    base_sha = model_fingerprint(base)
    model = attach_lora(base, config.lora, a0_seed=_public_seed(config.federation.seed, "a0"))
    manifest = AdapterManifest.of(model, config.lora.aggregation)
    fingerprints = adapter_fingerprints(model)
    data = load_federation_data(config)
    template = ChatTemplate(tokenizer, system_prompt=config.data.system_prompt, max_length=config.data.max_length)
    datasets = [TokenizedDataset.build(records, template) for records in data.clients]
    heldout = TokenizedDataset.build(data.heldout, template)
    if data.canaries and not (paths.root / "data_manifest.json").exists():
        atomic_write(paths.root / "data_manifest.json", json.dumps({"canaries": data.canaries}, indent=1).encode())
    own = {"base_sha256": base_sha, "manifest_sha256": manifest.digest(), **fingerprints}
    clients = [_make_client(config, sites_root, i, ds, own) for i, ds in enumerate(datasets)]
    trainer = LocalTrainer(model, grad_sample_mode=config.training.grad_sample_mode)

    checkpoint = Checkpoint.load(paths)
    rows = [r for r in paths.read_metrics() if checkpoint is not None and r["round"] <= checkpoint.round]
    global_vector = checkpoint.global_vector if checkpoint else get_vector(model, manifest)
    if checkpoint is not None and global_vector.size != manifest.dimension:
        raise ConfigError(f"{paths.checkpoint} does not match this adapter ({manifest.dimension} values)")
    start = checkpoint.round + 1 if checkpoint else 0
    weights = _weights(config, datasets)
    console.print(
        f"[bold]secure-fedllm[/] {config.federation.clients} clients, {config.federation.rounds} rounds, "
        f"{config.secure_aggregation.protocol}, {config.privacy.mechanism} "
        f"(epsilon {config.privacy.target_epsilon} per client), LoRA {config.lora.aggregation} r={config.lora.r}, "
        f"{manifest.dimension:,} aggregated parameters -> {paths.root}"
    )
    with Progress(
        TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(), console=console, disable=not progress, transient=True,
    ) as bars:  # fmt: skip
        rounds_bar = bars.add_task("rounds", total=config.federation.rounds + 1, completed=start)
        for round_number in range(start, config.federation.rounds + 1):
            row: dict[str, Any] = {"round": round_number}
            if round_number > 0:
                common = {
                    "base_sha256": base_sha,
                    "manifest_sha256": manifest.digest(),
                    **fingerprints,
                }
                global_vector = _federated_round(
                    config, round_number, clients, trainer, model, manifest, global_vector, weights, common, row,
                    bars, tap,
                )  # fmt: skip
            set_vector(model, manifest, global_vector)
            evaluate_round(config, model, heldout, template, data.heldout, row)
            row["epsilon"] = {str(c.client): c.epsilon for c in clients}
            rows.append(row)
            paths.write_metrics(rows)
            Checkpoint(round_number, global_vector).save(paths)
            bars.advance(rounds_bar)
            _print_round(console, row)
            if stop_after is not None and round_number >= stop_after and round_number < config.federation.rounds:
                return RunResult(paths.root, rows, {c.client: c.epsilon for c in clients}, paths.adapter, paths.report)
    sidecar = adapter_sidecar(
        config,
        manifest,
        {**fingerprints, "base_sha256": base_sha},
        epsilon_max=max((c.epsilon for c in clients), default=0.0),
        delta_max=max((c.policy.delta for c in clients if c.rounds_joined), default=0.0),
    )
    save_adapter(model, paths.adapter, sidecar=sidecar)
    if merge:
        model.merge_and_unload().save_pretrained(paths.root / "merged")
        tokenizer.save_pretrained(paths.root / "merged")
    ledgers = [c.ledger.to_dict(public=True) if c.ledger else {"client": c.client} for c in clients]
    summary = [
        {"client": i, "records": len(ds.examples), "units": ds.num_units, "dropped": ds.dropped}
        for i, ds in enumerate(datasets)
    ]
    write_report(paths, config, rows, ledgers, [c.policy for c in clients], sidecar, summary)
    console.print(
        f"final held-out perplexity {rows[-1]['perplexity']:.2f} vs {rows[0]['perplexity']:.2f} at round 0 "
        f"(ratio {rows[-1]['perplexity'] / rows[0]['perplexity']:.3f}); report: {paths.report}"
    )
    return RunResult(paths.root, rows, {c.client: c.epsilon for c in clients}, paths.adapter, paths.report)


def evaluate_round(
    config: RunConfig,
    model: Any,
    heldout: TokenizedDataset,
    template: ChatTemplate,
    records: list[Any],
    row: dict[str, Any],
) -> None:
    """Held-out loss and perplexity of the current global adapter (and sample generations) into `row`."""
    t = time.perf_counter()
    result = evaluate(model, heldout, batch_size=config.evaluation.batch_size)
    row["seconds"] = {**row.get("seconds", {}), "evaluation": time.perf_counter() - t}
    row.update(eval_loss=result.loss, perplexity=result.perplexity)
    if config.evaluation.generations:
        row["samples"] = generate_samples(
            model,
            template,
            records[: config.evaluation.generations],
            max_new_tokens=config.evaluation.max_new_tokens,
        )


def adapter_sidecar(
    config: RunConfig, manifest: AdapterManifest, hashes: dict[str, str], *, epsilon_max: float, delta_max: float
) -> dict[str, Any]:
    """What the saved adapter carries beside its weights: model and adapter hashes, manifest, the worst DP spend."""
    return {
        **hashes,
        "base_model": config.model.name,
        "manifest": [[n, list(s)] for n, s in manifest.entries],
        "manifest_sha256": manifest.digest(),
        "rounds": config.federation.rounds,
        "epsilon_max_over_contributors": epsilon_max,
        "delta_max_over_contributors": delta_max,
        # An epsilon is only meaningful with the datasets it separates: one privacy unit replaced
        # ("replace") or added/removed ("add_remove"); see `neighbouring_statement`.
        "privacy_unit": config.privacy.unit,
        "neighbouring": config.privacy.neighbouring,
    }


def _federated_round(
    config: RunConfig,
    round_number: int,
    clients: list[FederatedClient],
    trainer: LocalTrainer,
    model: Any,
    manifest: AdapterManifest,
    global_vector: np.ndarray,
    weights: dict[int, float],
    common: dict[str, str],
    row: dict[str, Any],
    bars: Progress,
    tap: Callable[[int, int, bytes], None] | None,
) -> np.ndarray:
    cohort = sample_cohort(config, round_number)
    sat_out = {c: why for c in cohort if (why := clients[c].willing(round_number)) is not None}
    joining = [c for c in cohort if c not in sat_out]
    row.update(cohort=cohort, sat_out={str(c): why for c, why in sat_out.items()})
    minimum = 3 if config.secure_aggregation.protocol != "none" else 1
    if len(joining) < minimum:
        row.update(participants=joining, included=[], dropped=[], aborted=f"only {len(joining)} clients can join")
        return global_vector
    plan = RoundPlan(
        round=round_number,
        aggregation=config.lora.aggregation,
        protocol=config.secure_aggregation.protocol,
        clip_range=config.secure_aggregation.clip_range,
        participants=tuple(clients[c].assignment(weights[c]) for c in joining),
        **common,
    )
    task = bars.add_task(f"round {round_number}: clients training", total=len(joining))
    t = time.perf_counter()
    trained = []
    for c in joining:
        trained.append(clients[c].train(trainer, model, manifest, global_vector, plan))
        bars.advance(task)
    bars.remove_task(task)
    training_seconds = time.perf_counter() - t
    # A release whose masked input already went to an earlier session (a crash after masking) stays there:
    # its client refuses this session rather than let two sums of the same updates be differenced.
    refused = {u.client: why for u in trained if (why := clients[u.client].refuses(u)) is not None}
    if refused:
        row["refused"] = {str(c): why for c, why in refused.items()}
        plan_clients = [c for c in joining if c not in refused]
        if len(plan_clients) < minimum:
            aborted = f"only {len(plan_clients)} clients can join"
            row.update(participants=joining, included=[], dropped=[], aborted=aborted)
            return global_vector
    updates = [u for u in trained if u.client not in refused]
    parties = [u.client for u in updates]
    drop_at = draw_dropouts(config, round_number, len(parties))
    outcome = aggregate_updates(
        config,
        [u.delta for u in updates],
        [weights[c] for c in parties],
        round_number=round_number,
        context=plan.digest(),
        drop_at=drop_at,
        tap=_binding_tap(config, round_number, [clients[c] for c in parties], updates, tap),
        rounding_seeds=[u.rounding_seed for u in updates],
        # malicious setting: each client's own identity key (from its site state) and the roster all sites pin
        identity_keys=[clients[c].site.identity_key for c in parties],
        roster=[client.site.identity_public_key for client in clients],
    )
    if config.lora.aggregation == "fedit" and outcome.mean is not None:
        row["fedit_product_error"] = _fedit_error(manifest, global_vector, [u.delta for u in updates], outcome)
    row.update(
        participants=joining,
        included=[parties[i] for i in outcome.included],
        dropped=[c for c in joining if c not in {parties[i] for i in outcome.included}],
        aborted=outcome.aborted,
        clipped_coordinates=outcome.clipped_coordinates,
        quantization_bound=outcome.max_abs_error,
        protocol={
            "neighbours": outcome.neighbours,
            "threshold": outcome.threshold,
            "insecure": outcome.insecure,
            "malicious": outcome.malicious,
        },
        seconds={
            "training": training_seconds,
            "protocol_client": outcome.client_seconds,
            "protocol_server": outcome.server_seconds,
        },
        bytes={"upload": outcome.upload_bytes, "download": outcome.download_bytes},
    )
    if outcome.mean is None:
        return global_vector
    return (global_vector.astype(np.float64) + outcome.mean).astype(np.float32)


def _fedit_error(manifest: AdapterManifest, start: np.ndarray, deltas: list[np.ndarray], outcome: Any) -> float:
    """Relative error of mean(B) mean(A) against mean(B_i A_i) over the included clients (simulation only)."""
    included = outcome.included
    offsets, pairs = {}, []
    offset = 0
    for name, shape in manifest.entries:
        offsets[name] = (offset, shape)
        offset += int(np.prod(shape))
    for name in offsets:
        if "lora_A." in name:
            pairs.append((name, name.replace("lora_A.", "lora_B.")))
    num, den = 0.0, 0.0
    for a_name, b_name in pairs:
        (ao, ashape), (bo, bshape) = offsets[a_name], offsets[b_name]
        a_i = [(start + deltas[i])[ao : ao + int(np.prod(ashape))].reshape(ashape) for i in included]
        b_i = [(start + deltas[i])[bo : bo + int(np.prod(bshape))].reshape(bshape) for i in included]
        exact = sum(b @ a for a, b in zip(a_i, b_i, strict=True)) / len(included)
        approx = (sum(b_i) / len(included)) @ (sum(a_i) / len(included))
        num += float(np.sum((exact - approx) ** 2))
        den += float(np.sum(exact**2))
    return (num / den) ** 0.5 if den > 0 else 0.0


def _weights(config: RunConfig, datasets: list[TokenizedDataset]) -> dict[int, float]:
    if config.federation.weighting == "uniform":
        return {i: 1.0 for i in range(len(datasets))}
    largest = max(d.num_units for d in datasets)
    return {i: d.num_units / largest for i, d in enumerate(datasets)}


def _public_seed(seed: int, purpose: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}|{purpose}".encode()).digest()[:8], "big") >> 1


def _binding_tap(
    config: RunConfig,
    round_number: int,
    clients: list[FederatedClient],
    updates: list[ClientUpdate],
    audit: Callable[[int, int, bytes], None] | None,
) -> Callable[[int, bytes], None]:
    """The hook that runs as each message leaves a client: bind its release before its masked input goes.

    The binding (session id and transcript, fsynced in the client's state folder) is written before
    the masked input (or HE ciphertext) is handed to the server, so no crash can let it reach a
    second session.
    """
    from protocols import decode_message
    from protocols.he import decode_he_message

    he = config.secure_aggregation.protocol.startswith("he-")
    transcripts: dict[int, bytes] = {}

    def hook(party: int, wire: bytes) -> None:
        message: Any = decode_he_message(wire) if he else decode_message(wire)
        kind = type(message).__name__
        if kind == "AdvertiseKeys":
            transcripts[party] = message.transcript
        elif kind in ("MaskedInput", "HEInput"):
            clients[party].bind(updates[party], message.session, transcripts.get(party, b""))
        if audit is not None:
            audit(round_number, clients[party].client, wire)

    return hook


def job_id(config: RunConfig) -> str:
    """The job a run's releases belong to: a digest of its configuration (equal on resume and on every engine)."""
    return hashlib.sha256(b"secure-fedllm/job|" + config.model_dump_json().encode()).hexdigest()[:32]


def open_site(config: RunConfig, sites: Path, client: int) -> SiteState:
    """Client `client`'s state folder under `sites` (reproducible only when `privacy.noise_seed` is set)."""
    fixed = config.privacy.noise_seed
    seed = f"noise-seed|{fixed}|{client}".encode() if fixed is not None else None
    return SiteState.open(site_folder(sites, client), reproducible_seed=seed)


def _make_client(
    config: RunConfig, sites: Path, client: int, data: TokenizedDataset, fingerprints: dict[str, str]
) -> FederatedClient:
    policy = client_policy(config, client, data.num_units)
    site = open_site(config, sites, client)
    ledger = None
    if policy.private:
        ledger = PrivacyLedger.open(
            site.ledger_path,
            client=client,
            epsilon_budget=policy.epsilon_budget,
            delta=policy.delta,
            accountant=config.privacy.accountant,
            neighbouring=config.privacy.neighbouring,
        )
        if ledger.neighbouring != config.privacy.neighbouring:
            # The report, sidecar and metrics state the config's relation: a ledger accounted under
            # another one would make that statement false.
            raise ConfigError(
                f"client {client}: its ledger {site.ledger_path} accounts privacy.neighbouring="
                f"{ledger.neighbouring!r} but the config says {config.privacy.neighbouring!r}; set "
                "privacy.neighbouring to the ledger's relation or start a new run"
            )
    return FederatedClient(
        client,
        data,
        policy=policy,
        ledger=ledger,
        site=site,
        learning_rate=config.training.learning_rate,
        optimizer=config.training.optimizer,
        fingerprints=fingerprints,
        job=job_id(config),
        template=json.dumps({"system_prompt": config.data.system_prompt, "max_length": config.data.max_length}),
    )


def _prepare_folder(
    config: RunConfig | None, out: str | Path | None, resume: str | Path | None
) -> tuple[RunPaths, RunConfig]:
    if resume is not None:
        paths = RunPaths(Path(resume))
        if not paths.config.exists():
            raise ConfigError(f"--resume {resume}: no config.toml there; is it a run folder?")
        saved = RunConfig.from_file(paths.config)
        if config is not None and config != saved:
            raise ConfigError(f"--resume {resume}: the given config differs from the run's config.toml; drop it")
        return paths, saved
    config = config or RunConfig()
    root = Path(out) if out is not None else Path("runs") / time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    paths = RunPaths(root)
    if paths.config.exists():
        raise ConfigError(f"--out {root} already holds a run; use --resume {root} or another folder")
    root.mkdir(parents=True, exist_ok=True)
    config.to_file(paths.config)
    return paths, config


def _print_round(console: Console, row: dict[str, Any]) -> None:
    eps = ", ".join(f"{v:.2f}" for v in row["epsilon"].values())
    extra = ""
    if row["round"] > 0:
        extra = f"  joined {row.get('participants')} included {row.get('included')}"
        if row.get("aborted"):
            extra += f"  aborted: {row['aborted']}"
    console.print(
        f"round {row['round']}: held-out loss {row['eval_loss']:.4f}, perplexity {row['perplexity']:.2f}, "
        f"epsilon per client [{eps}]{extra}"
    )
    for sample in row.get("samples", [])[:1]:
        console.print(f"  [dim]{sample['prompt']}[/] -> {sample['generated']!r}", highlight=False)
