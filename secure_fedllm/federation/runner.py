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

import time
import warnings
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import IO, Any

import numpy as np

from ..config import RunConfig
from ..data.tokenized import DataTruncationWarning, TokenizedDataset, check_has_records, max_length_warning
from ..errors import ConfigError
from ..logs import RunLog, quiet_libraries
from .aggregation import aggregate_updates, draw_dropouts
from .checkpoint import RunPaths
from .client import ClientUpdate, FederatedClient
from .federation import (
    ClientLedger,
    Federation,
    Job,
    RunResult,
    adapter_sidecar,
    client_weights,
    job_id,
    make_client,
    open_site,
)
from .plan import Assignment, RoundPlan
from .record import ProtocolFacts, RoundBytes, RoundRecord, RoundSeconds

__all__ = [
    "InProcessTransport",
    "RunResult",
    "adapter_sidecar",
    "binding_tap",
    "check_data_fits",
    "job_id",
    "make_client",
    "open_site",
    "run",
]


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
    log_json: str | Path | None = None,
    stream: IO[str] | None = None,
) -> RunResult:
    """Run (continue, or finish) a federation in process and return its result.

    Args:
        config: the run configuration (default: `RunConfig()`); with `resume`, must match the saved one.
        out: the run folder (default `runs/<UTC time>`): new, empty, or holding a run of the same config
            (which continues from its last checkpoint; a finished one is left as it is).
        resume: a run folder to continue from its last checkpoint (a finished run: nothing to do).
        merge: also save the merged model (`merge_and_unload`) under `merged/`.
        progress: show a summary line per round (and, on a terminal, a progress bar); False also silences
            the progress bars and info logging of transformers, huggingface_hub and datasets for the run.
        stop_after: stop after this round, as if the process ended there (resume continues).
        tap: audit hook called with (round, client, bytes) for every message a client sends the server.
        sites: the folder of the clients' private state folders (default `<run>.sites`, beside the run
            folder; give the same one to `resume`). Never inside the run folder, which is public.
        log_json: also write one JSON object per event (progress lines, rounds, warnings, the result) to
            this file, or to stdout with "-" (`logs.RunLog`).
        stream: where progress lines go (default stdout): rich on a terminal, plain unwrapped lines otherwise.

    Warns:
        DataTruncationWarning: `data.max_length` truncates or drops more than 10% of the records (of
            all clients, or of one); the message advises a value.

    Raises:
        ConfigError: a bad configuration, a folder holding something else, a resume that does not match,
            or a client (or the held-out set) left with no record that fits `data.max_length`.
        RunInterruptedError: Ctrl-C (the message says how to resume).
        PrivacyBudgetExhaustedError: a client asked to train past its budget.
    """
    with RunLog(progress=progress, stream=stream, json_path=log_json) as log, ExitStack() as stack:
        if not progress or not log.terminal:  # library progress bars only garble a log file
            stack.enter_context(quiet_libraries())
        transport = InProcessTransport(sites=Path(sites) if sites is not None else None, tap=tap, warn=log.warning)
        bars, update = log.rounds_bar()
        with bars:

            def advance(record: RoundRecord) -> None:
                update(record.round + 1, transport.rounds + 1)
                log.round(record)

            federation = Federation(transport, log=log.line, on_round=advance)
            result = federation.run(config, out=out, resume=resume, merge=merge, stop_after=stop_after)
        log.event(
            "result",
            out=str(result.out),
            rounds=len(result.metrics),
            epsilon={str(c): e for c, e in result.epsilons.items()},
            final_perplexity_ratio=result.final_perplexity_ratio if result.metrics else None,
            report=str(result.report),
        )
        return result


class InProcessTransport:
    """Every client in this process: one peft model trained in turn, clients separated by data, policy and state.

    Dropouts are simulated (`federation.dropout`); `tap` sees every message a client sends; `warn`
    receives the warnings of the start (default: `warnings.warn`).
    """

    engine = "in-process"

    def __init__(
        self,
        *,
        sites: Path | None = None,
        tap: Callable[[int, int, bytes], None] | None = None,
        warn: Callable[[str, type[Warning]], None] | None = None,
    ) -> None:
        self.sites, self.tap = sites, tap
        self.warn = warn if warn is not None else _warn
        self.clients: list[FederatedClient] = []
        self.rounds = 0

    def start(self, job: Job, paths: RunPaths) -> dict[int, int]:
        """Tokenize each client's partition and build the client (policy calibrated, ledger opened).

        Warns (`DataTruncationWarning`) when data.max_length truncates or drops more than 10% of the
        records, and refuses (`ConfigError`) a client or held-out set left with no record that fits.
        """
        sites = self.sites if self.sites is not None else paths.sites
        if sites.resolve().is_relative_to(paths.root.resolve()):
            raise ConfigError(f"sites={sites} is inside the run folder {paths.root}, which the server may publish")
        config = job.config
        self.job, self.rounds = job, config.federation.rounds
        datasets = [TokenizedDataset.build(records, job.template) for records in job.data.clients]
        heldout = [TokenizedDataset.build(records, job.template) for records in job.site_heldout or ()]
        check_data_fits(config, datasets, job.heldout, warn=self.warn)
        self.clients = [
            make_client(
                config,
                sites,
                i,
                ds,
                job.fingerprints,
                heldout=heldout[i] if heldout else None,
                dimension=job.manifest.dimension,
            )
            for i, ds in enumerate(datasets)
        ]
        self.trainer = job.trainer()
        self.weights = client_weights(config, {c.client: c.data.num_units for c in self.clients})
        return {c.client: c.data.num_units for c in self.clients}

    def offers(self, round_number: int, cohort: list[int]) -> dict[int, Assignment | str]:
        """Each client's own answer: its offer, or why it sits out (cap, budget)."""
        return {c: self.clients[c].willing(round_number) or self.clients[c].assignment(1.0) for c in cohort}

    def ledgers(self) -> list[ClientLedger]:
        """Each client's public ledger summary, policy and data counts."""
        return [
            ClientLedger(
                c.client,
                c.policy,
                c.ledger.to_dict(public=True) if c.ledger else {"client": c.client},
                len(c.data.examples),
                c.data.num_units,
                c.data.dropped,
                c.epsilon,
            )
            for c in self.clients
        ]

    def evaluate(self, round_number: int, global_vector: Any, record: RoundRecord) -> None:
        """Federated evaluation by every willing client, securely aggregated (`evaluation.evaluate_in_process`)."""
        from .evaluation import evaluate_in_process

        evaluate_in_process(self, round_number, global_vector, record)

    def train_and_aggregate(self, plan: RoundPlan, global_vector: Any, record: RoundRecord) -> Any:
        """Train each participant in turn, then aggregate with the configured protocol and simulated dropouts."""
        config, job, clients = self.job.config, self.job, self.clients
        joining = [a.client for a in plan.participants]
        weights = {a.client: a.weight for a in plan.participants}
        minimum = 3 if config.secure_aggregation.protocol != "none" else 1
        t = time.perf_counter()
        trained = [clients[c].train(self.trainer, job.model, job.manifest, global_vector, plan) for c in joining]
        training_seconds = time.perf_counter() - t
        # A release whose masked input already went to an earlier session (a crash after masking) stays there:
        # its client refuses this session rather than let two sums of the same updates be differenced.
        refused = {u.client: why for u in trained if (why := clients[u.client].refuses(u)) is not None}
        record.participants, record.refused = joining, refused  # type: ignore[assignment]
        updates = [u for u in trained if u.client not in refused]
        if refused and len(updates) < minimum:
            record.aborted = f"only {len(updates)} clients can join"
            return None
        parties = [u.client for u in updates]
        outcome = aggregate_updates(
            config,
            [u.delta for u in updates],
            [weights[c] for c in parties],
            round_number=plan.round,
            context=plan.digest(),
            drop_at=draw_dropouts(config, plan.round, len(parties)),
            tap=binding_tap(config, plan.round, [clients[c] for c in parties], updates, self.tap),
            rounding_seeds=[u.rounding_seed for u in updates],
            # malicious setting: each client's own identity key (from its site state) and the roster all sites pin
            identity_keys=[clients[c].site.identity_key for c in parties],
            roster=[client.site.identity_public_key for client in clients],
        )
        if config.lora.aggregation == "fedit" and outcome.mean is not None:
            record.fedit_product_error = _fedit_error(job.manifest, global_vector, [u.delta for u in updates], outcome)
        included = [parties[i] for i in outcome.included]
        record.included = included
        record.dropped = [c for c in joining if c not in set(included)]
        record.aborted = outcome.aborted
        record.clipped_coordinates = outcome.clipped_coordinates
        record.quantization_bound = outcome.max_abs_error
        record.protocol = ProtocolFacts(
            neighbours=outcome.neighbours,
            threshold=outcome.threshold,
            insecure=outcome.insecure,
            malicious=outcome.malicious,
        )
        record.seconds = RoundSeconds(
            training=training_seconds,
            protocol_client=outcome.client_seconds,
            protocol_server=outcome.server_seconds,
            evaluation=record.seconds.evaluation,
        )
        record.bytes = RoundBytes(upload=outcome.upload_bytes, download=outcome.download_bytes)
        return outcome.ring_sum if outcome.ring_sum is not None else outcome.mean  # distributed DP: the integer sum


def _warn(message: str, category: type[Warning]) -> None:
    warnings.warn(message, category, stacklevel=4)


def check_data_fits(
    config: RunConfig,
    datasets: list[TokenizedDataset],
    heldout: TokenizedDataset | None,
    *,
    warn: Callable[[str, type[Warning]], None] = _warn,
) -> None:
    """Warn when data.max_length cuts or drops over 10% of the clients' records; refuse when nothing fits.

    Raises:
        ConfigError: a client has no record left (or none at all), or the server's held-out set, which
            it evaluates every round, has none (naming data.max_length and the value to set).
    """
    stats = [d.stats for d in datasets if d.stats is not None]
    for client, data in enumerate(datasets):
        if data.stats is not None:
            check_has_records(data.stats, f"client {client}")
    if heldout is not None and heldout.stats is not None and config.evaluation.mode == "server":
        check_has_records(heldout.stats, "the server's held-out set (evaluation.heldout_records)")
    if stats and (message := max_length_warning(stats)) is not None:
        warn(message, DataTruncationWarning)


def _fedit_error(manifest: Any, start: np.ndarray, deltas: list[np.ndarray], outcome: Any) -> float:
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


def binding_tap(
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
