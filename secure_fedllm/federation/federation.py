"""One federation, any transport: the job's setup, its round function and its run folder, written once.

`Federation.run` does the server's half of a job on either engine: it checks the run folder
(`open_run_folder`: nothing is written yet), builds the model, fingerprints, LoRA, manifest, chat
template and held-out set (`Job`), lets the transport reach every client (in process: build each
client with its policy and ledger; on Flower: wait for the nodes, read their offers and identity
keys), and only then writes `config.toml` and plays the rounds. Each round: sample the cohort, ask
for offers, announce the `RoundPlan`, let the transport train and securely aggregate, apply the
mean, evaluate on the server's held-out records (or, with `evaluation.mode = "federated"`, let the
transport run a federated evaluation: `federation.evaluation`), write the `RoundRecord` and a
checkpoint. At the end: the adapter (with its sidecar) and the report.

The engines differ only in their `Transport`: `InProcessTransport` (`federation.runner`) trains the
clients in this process and simulates their dropouts; `GridTransport` (`flower.server`) sends the
plan over a Flower `Grid`, where dropouts are real.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np
import numpy.typing as npt

from ..config import RunConfig
from ..errors import ConfigError
from .checkpoint import Checkpoint, RunInterruptedError, RunPaths, site_folder
from .folder import RunFolder, open_run_folder
from .plan import Assignment, ClientPolicy, RoundPlan
from .record import RoundRecord
from .server_optimizer import ServerAdam

if TYPE_CHECKING:
    from ..training import LocalTrainer

__all__ = [
    "ClientLedger",
    "Federation",
    "Job",
    "RunResult",
    "Transport",
    "adapter_sidecar",
    "client_weights",
    "job_id",
    "make_client",
    "open_site",
    "public_seed",
]

Vector = npt.NDArray[np.float32]


@dataclass
class RunResult:
    """What a run produced: its folder, the round records, each client's epsilon and the adapter."""

    out: Path
    metrics: list[RoundRecord]
    epsilons: dict[int, float]
    adapter: Path
    report: Path
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def final_perplexity_ratio(self) -> float:
        """Final held-out perplexity over round 0's."""
        return float(self.metrics[-1].perplexity / self.metrics[0].perplexity)

    @classmethod
    def of_folder(cls, paths: RunPaths, rows: list[RoundRecord]) -> RunResult:
        """The result a finished run folder holds."""
        return cls(paths.root, rows, dict(rows[-1].epsilon) if rows else {}, paths.adapter, paths.report)


@dataclass(frozen=True)
class ClientLedger:
    """A client's public accounting for the report: policy, ledger summary, data counts, epsilon."""

    client: int
    policy: ClientPolicy
    ledger: dict[str, Any]
    records: int
    units: int
    dropped: int
    epsilon: float

    @property
    def summary(self) -> dict[str, int]:
        """The data counts the report lists."""
        return {"client": self.client, "records": self.records, "units": self.units, "dropped": self.dropped}


class Transport(Protocol):
    """How the server reaches the clients: in process or over a Flower Grid."""

    engine: Literal["in-process", "flower"]

    def start(self, job: Job, paths: RunPaths) -> dict[int, int]:
        """Reach every client and check it can take part; return each client's privacy-unit count N_i.

        Writes nothing in the run folder: it runs before `config.toml` is written.
        """
        ...

    def offers(self, round_number: int, cohort: list[int]) -> dict[int, Assignment | str]:
        """Each asked client's DP offer (weight to be set by the plan), or why it sits out."""
        ...

    def train_and_aggregate(self, plan: RoundPlan, global_vector: Vector, record: RoundRecord) -> Any:
        """Train the plan's participants and securely aggregate; fill `record`; return the mean or None."""
        ...

    def ledgers(self) -> list[ClientLedger]:
        """Every client's public accounting (asked after each round and at the end)."""
        ...

    def evaluate(self, round_number: int, global_vector: Vector, record: RoundRecord) -> None:
        """Federated evaluation of `global_vector` (`evaluation.mode = "federated"`) into `record`.

        Every willing site scores the model on its own held-out split and releases its clipped,
        noised (loss sum, count), charged to its ledger; the server learns only their secure sum.
        """
        ...


def public_seed(seed: int, purpose: str) -> int:
    """A public, reproducible seed for `purpose` (A0, torch) derived from the run seed: equal on every engine."""
    return int.from_bytes(hashlib.sha256(f"{seed}|{purpose}".encode()).digest()[:8], "big") >> 1


def job_id(config: RunConfig) -> str:
    """The job a run's releases belong to: a digest of its configuration (equal on resume and on every engine)."""
    return hashlib.sha256(b"secure-fedllm/job|" + config.model_dump_json().encode()).hexdigest()[:32]


def client_weights(config: RunConfig, units: dict[int, int]) -> dict[int, float]:
    """Aggregation weights: uniform, or N_i over the largest N_i (`federation.weighting`)."""
    if config.federation.weighting == "uniform":
        return dict.fromkeys(units, 1.0)
    largest = max(units.values())
    return {c: n / largest for c, n in units.items()}


def open_site(config: RunConfig, sites: Path, client: int) -> Any:
    """Client `client`'s state folder under `sites` (reproducible only when `privacy.noise_seed` is set)."""
    from ..site import SiteState

    fixed = config.privacy.noise_seed
    seed = f"noise-seed|{fixed}|{client}".encode() if fixed is not None else None
    return SiteState.open(site_folder(sites, client), reproducible_seed=seed)


def make_client(
    config: RunConfig,
    sites: Path,
    client: int,
    data: Any,
    fingerprints: dict[str, str],
    *,
    heldout: Any = None,
    dimension: int | None = None,
) -> Any:
    """Client `client` of `config` with its policy (calibrated to its N_i), ledger and state folder.

    `data` needs only `num_units` for offers and ledger queries; training needs the tokenized records.
    `heldout` is the site's held-out split for federated evaluation: its units join the population
    the ledger is named after (every person at the site, trained on or held out, is in one ledger),
    and with `evaluation.mode = "federated"` the training noise is raised so that training and the
    evaluations fit the budget together (`evaluation.policy_with_evaluation`). `dimension` (the adapter's
    length) is needed under `privacy.mode = "distributed"`, whose calibration depends on it.

    Raises:
        ConfigError: the policy cannot be calibrated, or the ledger accounts another neighbouring relation.
    """
    from ..site.state import population_id
    from .client import FederatedClient
    from .evaluation import EvaluationSettings, policy_with_evaluation
    from .plan import client_policy

    federated = config.evaluation.mode == "federated"
    policy = policy_with_evaluation(client_policy(config, client, data.num_units, dimension=dimension), config)
    site = open_site(config, sites, client)
    ledger = None
    if policy.private:
        # One lifetime ledger per population of data subjects at this site, composed across every job
        # on it (never reset by a corrected record: the population is named by unit ids, not texts).
        unit_ids = getattr(data, "unit_ids", None)
        if unit_ids is not None and heldout is not None:
            unit_ids = [*unit_ids, *heldout.unit_ids]
        population = getattr(data, "population", None) or population_id(unit_ids or ())
        ledger = site.ledger_for(
            population,
            job=job_id(config),
            client=client,
            epsilon_budget=policy.epsilon_budget,
            delta=policy.delta,
            accountant=config.privacy.accountant,
            neighbouring=config.privacy.neighbouring,
            units=unit_ids,
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
        heldout=heldout,
        evaluation=EvaluationSettings.of(config) if federated else None,
        noise_generator=config.privacy.noise_generator,
    )


def adapter_sidecar(
    config: RunConfig, manifest: Any, hashes: dict[str, str], *, epsilon_max: float, delta_max: float
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
        "noise_generator": config.privacy.noise_generator,  # DP-SGD noise: ChaCha20 ("csprng") or torch's MT
    }


@dataclass
class Job:
    """The server's half of the setup, done once per run: model, adapter, fingerprints, template, held-out set.

    `data` is the federation's data as this process loads it (the in-process transport partitions
    its client records; on Flower only the held-out records are used). With `evaluation.mode =
    "federated"`, `data.clients` are the training parts and `site_heldout` each client's held-out
    part (`evaluation.site_split`); `start` is the starting adapter, kept for the sites' model check.
    """

    config: RunConfig
    model: Any
    tokenizer: Any
    manifest: Any
    fingerprints: dict[str, str]
    """base_sha256, manifest_sha256 and the adapter fingerprints (A0, adapter config): the plan's common part."""
    template: Any
    data: Any
    heldout: Any
    start: Vector | None = None
    site_heldout: list[Any] | None = None

    @classmethod
    def build(cls, config: RunConfig, *, data: bool = True) -> Job:
        """Load the base model, attach LoRA with the public A0 seed and tokenize the held-out records.

        `data=False` (a Flower node that reads its own records) loads no shared data source.

        Raises:
            ConfigError: the model or data cannot be loaded, or the template cannot hold a record.
        """
        import torch

        from ..adapters import AdapterManifest, adapter_fingerprints, attach_lora
        from ..data import ChatTemplate, TokenizedDataset, load_federation_data
        from ..models import load_fingerprinted, resolve_device

        if config.training.threads is not None:
            torch.set_num_threads(config.training.threads)
        torch.manual_seed(public_seed(config.federation.seed, "torch"))
        device = resolve_device(config.training.device)
        base, tokenizer, base_sha = load_fingerprinted(config.model, dtype=config.training.dtype, device=device)
        model = attach_lora(base, config.lora, a0_seed=public_seed(config.federation.seed, "a0"))
        manifest = AdapterManifest.of(model, config.lora.aggregation)
        fingerprints = {"base_sha256": base_sha, "manifest_sha256": manifest.digest(), **adapter_fingerprints(model)}
        template = ChatTemplate(tokenizer, system_prompt=config.data.system_prompt, max_length=config.data.max_length)
        loaded = load_federation_data(config) if data else None
        heldout = TokenizedDataset.build(loaded.heldout, template) if loaded is not None else None
        site_heldout = None
        if loaded is not None and config.evaluation.mode == "federated":
            from .evaluation import site_split

            parts = [site_split(config, records) for records in loaded.clients]
            loaded.clients = [train for train, _ in parts]
            site_heldout = [held for _, held in parts]
        job = cls(config, model, tokenizer, manifest, fingerprints, template, loaded, heldout)
        job.start, job.site_heldout = job.initial_vector(), site_heldout
        return job

    def trainer(self) -> LocalTrainer:
        """The one DP-SGD trainer of this process's model (Opacus hooks attach once, here)."""
        from ..training import LocalTrainer

        training = self.config.training
        return LocalTrainer(
            self.model,
            grad_sample_mode=training.grad_sample_mode,
            gradient_checkpointing=training.gradient_checkpointing,
        )

    def initial_vector(self) -> Vector:
        """The adapter's starting aggregated vector (B = 0, A = A0)."""
        from ..adapters import get_vector

        return get_vector(self.model, self.manifest)

    def evaluate(self, global_vector: Vector, record: RoundRecord, *, loss: bool = True) -> None:
        """Load `global_vector` into the model; its held-out loss, perplexity (and samples) into `record`.

        `loss=False` (federated evaluation, where the sites score the model) only generates the
        samples, from the server's own held-out prompts.
        """
        from ..adapters import set_vector
        from ..training import evaluate, generate_samples

        set_vector(self.model, self.manifest, global_vector)
        config = self.config
        if loss:
            t = time.perf_counter()
            result = evaluate(self.model, self.heldout, batch_size=config.evaluation.batch_size)
            record.seconds.evaluation = time.perf_counter() - t
            record.eval_loss, record.perplexity = result.loss, result.perplexity
        if config.evaluation.generations and self.data is not None:
            samples = generate_samples(
                self.model,
                self.template,
                self.data.heldout[: config.evaluation.generations],
                max_new_tokens=config.evaluation.max_new_tokens,
            )
            record.samples = samples  # type: ignore[assignment]  # validated into Samples


class Federation:
    """One job over one transport; `run` is the loop both engines use.

    Args:
        transport: how the clients are reached.
        log: where progress lines go (rich console in process, print on a ServerApp).
        on_round: called with each round's record once it is checkpointed (progress bars).
    """

    def __init__(
        self,
        transport: Transport,
        *,
        log: Callable[[str], None] = print,
        on_round: Callable[[RoundRecord], None] | None = None,
    ) -> None:
        self.transport, self.log, self.on_round = transport, log, on_round

    def run(
        self,
        config: RunConfig | None,
        *,
        out: str | Path | None = None,
        resume: str | Path | None = None,
        merge: bool = False,
        stop_after: int | None = None,
    ) -> RunResult:
        """Run (continue, or finish) the job in its run folder and return its result.

        Raises:
            RunFolderError: the folder cannot be used as asked (see `open_run_folder`).
            RunInterruptedError: Ctrl-C; the message says how to resume.
        """
        folder = open_run_folder(config, out, resume)
        if folder.finished:
            self.log(f"{folder.paths.root} already holds this finished run (round {folder.config.federation.rounds}); "
                     "nothing to do")  # fmt: skip
            return RunResult.of_folder(folder.paths, folder.rows)
        config = folder.config
        from ..site import check_setting

        check_setting(config)  # a malicious setting the cohort cannot run fails here, before anything is written
        job = Job.build(config)
        units = self.transport.start(job, folder.paths)
        self.job, self.folder, self.weights, self.units = job, folder, client_weights(config, units), units
        self.server_optimizer: ServerAdam | None = None
        self.distributed = config.privacy.mode == "distributed" and config.privacy.mechanism != "none"
        if self.distributed and config.privacy.unit != "client":  # record-level: the server takes the DP-SGD step
            saved = folder.checkpoint.optimizer if folder.checkpoint is not None else None
            self.server_optimizer = ServerAdam(
                job.manifest.dimension, learning_rate=config.training.learning_rate, state=saved
            )
        if folder.checkpoint is not None and folder.checkpoint.global_vector.size != job.manifest.dimension:
            raise ConfigError(
                f"{folder.paths.checkpoint}: does not match this adapter ({job.manifest.dimension} values); "
                "resume with the run's own config.toml"
            )
        folder.begin(job.data.canaries)
        self.log(
            f"secure-fedllm ({self.transport.engine}) {config.federation.clients} clients, "
            f"{config.federation.rounds} rounds, {config.secure_aggregation.protocol}, {config.privacy.mechanism} "
            f"(epsilon {config.privacy.target_epsilon} per client), LoRA {config.lora.aggregation} r={config.lora.r}, "
            f"{job.manifest.dimension:,} aggregated parameters -> {folder.paths.root}"
        )
        try:
            return self._rounds(folder, job, merge=merge, stop_after=stop_after)
        except KeyboardInterrupt:
            folder.abandon()
            saved = Checkpoint.load(folder.paths) if folder.paths.root.exists() else None
            if saved is None:
                raise RunInterruptedError(
                    f"{folder.paths.root}: interrupted before the first checkpoint; nothing was kept, run the same "
                    "command again"
                ) from None
            raise RunInterruptedError(
                f"{folder.paths.root}: interrupted after round {saved.round}'s checkpoint; continue with "
                f"`secure-fedllm run --resume {folder.paths.root}`"
            ) from None
        except BaseException:
            folder.abandon()
            raise

    def _rounds(self, folder: RunFolder, job: Job, *, merge: bool, stop_after: int | None) -> RunResult:
        config, paths = job.config, folder.paths
        rows = list(folder.rows)
        vector = folder.checkpoint.global_vector if folder.checkpoint is not None else job.initial_vector()
        for round_number in range(folder.start, config.federation.rounds + 1):
            record, vector = self.play_round(round_number, vector)
            rows.append(record)
            paths.write_metrics(rows)
            optimizer = self.server_optimizer.state() if self.server_optimizer is not None else None
            Checkpoint(round_number, vector, optimizer=optimizer).save(paths)
            self._print(record)
            if self.on_round is not None:
                self.on_round(record)
            if stop_after is not None and stop_after <= round_number < config.federation.rounds:
                return RunResult.of_folder(paths, rows)
        return self.finish(rows, vector, merge=merge)

    def play_round(self, round_number: int, global_vector: Vector) -> tuple[RoundRecord, Vector]:
        """One round (round 0 only evaluates the starting adapter); the record and the new global vector."""
        record = RoundRecord(round=round_number, engine=self.transport.engine)
        before = global_vector
        if round_number > 0:
            global_vector = self._federated_round(round_number, global_vector, record)
        if self.job.config.evaluation.mode == "federated":
            # _federated_round returns its argument itself when no aggregate was released
            self._federated_evaluation(round_number, global_vector, record, released=global_vector is not before)
        else:
            self.job.evaluate(global_vector, record)
        record.epsilon = {c.client: c.epsilon for c in self.transport.ledgers()}
        return record, global_vector

    def _federated_evaluation(self, round_number: int, global_vector: Vector, record: RoundRecord, *,
                              released: bool) -> None:  # fmt: skip
        """The sites score the model (only one derived from a released aggregate, or round 0's); samples here."""
        from .record import FederatedEvaluation

        t = time.perf_counter()
        if round_number > 0 and not released:
            record.federated_evaluation = FederatedEvaluation(
                aborted=f"round {round_number} released no aggregate: the model is round {round_number - 1}'s, "
                "already evaluated"
            )
        else:
            self.transport.evaluate(round_number, global_vector, record)
        record.seconds.evaluation = time.perf_counter() - t
        result = record.federated_evaluation
        if result is not None and result.loss is not None and result.perplexity is not None:
            record.eval_loss, record.perplexity = result.loss, result.perplexity
        self.job.evaluate(global_vector, record, loss=False)

    def _federated_round(self, round_number: int, global_vector: Vector, record: RoundRecord) -> Vector:
        from .aggregation import sample_cohort

        config = self.job.config
        cohort = sample_cohort(config, round_number)
        offers = self.transport.offers(round_number, cohort)
        sat_out = {c: offers.get(c, "no answer to the offer") for c in cohort}
        sat_out = {c: why for c, why in sat_out.items() if isinstance(why, str)}
        joining = [c for c in cohort if c not in sat_out]
        record.cohort, record.sat_out = cohort, sat_out  # type: ignore[assignment]
        minimum = 3 if config.secure_aggregation.protocol != "none" else 1
        if len(joining) < minimum:
            record.participants, record.aborted = joining, f"only {len(joining)} clients can join"
            return global_vector
        participants = []
        for c in joining:
            offer = offers[c]
            assert isinstance(offer, Assignment)
            participants.append(offer.model_copy(update={"weight": self.weights[c]}))
        plan = RoundPlan(
            round=round_number,
            aggregation=config.lora.aggregation,
            protocol=config.secure_aggregation.protocol,
            clip_range=config.secure_aggregation.clip_range,
            participants=tuple(participants),
            **self.job.fingerprints,
        )
        t = time.perf_counter()
        mean = self.transport.train_and_aggregate(plan, global_vector, record)
        record.seconds.round = time.perf_counter() - t
        if mean is None:
            return global_vector
        if self.distributed:  # distributed DP: `mean` is the signed integer sum of the round
            return self._distributed_step(plan, global_vector, mean, record)
        return (global_vector.astype(np.float64) + mean).astype(np.float32)

    def _client_level_step(self, plan: RoundPlan, global_vector: Vector, signed: Any, record: RoundRecord) -> Vector:
        """Client-level DP: un-scale and un-rotate the sum of the clipped updates, and apply their mean."""
        from ..privacy.distributed import ring_scale
        from ..privacy.rotation import padded_dimension, rotation_seed, unrotate

        config, dimension = self.job.config, self.job.manifest.dimension
        scale = ring_scale(config.privacy.max_grad_norm, padded_dimension(dimension))
        total = unrotate(np.asarray(signed, dtype=np.float64) / scale, rotation_seed(job_id(config), plan.round),
                         dimension)  # fmt: skip
        included = len(record.included)
        record.distributed = {"included": float(included), "sample_rate": 1.0, "units": float(included),
                              "scale": scale}  # fmt: skip
        return (global_vector.astype(np.float64) + total / included).astype(np.float32)

    def _distributed_step(self, plan: RoundPlan, global_vector: Vector, signed: Any, record: RoundRecord) -> Vector:
        """Decode the released sum with public constants (s, q, the included clients' N_i) and take Adam's step."""
        from ..privacy.distributed import decode_gradient, ring_scale
        from .plan import common_sample_rate

        config, dimension = self.job.config, self.job.manifest.dimension
        if config.privacy.unit == "client":
            return self._client_level_step(plan, global_vector, signed, record)
        assert self.server_optimizer is not None
        units = sum(self.units[c] for c in record.included)
        q = min(a.sample_rate for a in plan.participants)
        scale = ring_scale(config.privacy.max_grad_norm, dimension)
        gradient = decode_gradient(signed, scale=scale, sample_rate=q, total_units=units)
        record.distributed = {
            "included": float(len(record.included)),
            "sample_rate": q,
            "common_sample_rate": common_sample_rate(config),
            "units": float(units),
            "scale": scale,
        }
        return self.server_optimizer.step(global_vector, gradient)

    def finish(self, rows: list[RoundRecord], global_vector: Vector, *, merge: bool = False) -> RunResult:
        """The adapter (from the last global vector, with its sidecar) and the report."""
        from ..adapters import save_adapter, set_vector
        from ..model_card import model_card, write_base_files
        from .report import write_report

        job, paths = self.job, self.folder.paths
        set_vector(job.model, job.manifest, global_vector)  # a resume after the last checkpoint starts here
        ledgers = self.transport.ledgers()
        hashes = {k: v for k, v in job.fingerprints.items() if k != "manifest_sha256"}
        sidecar = adapter_sidecar(
            job.config,
            job.manifest,
            hashes,
            epsilon_max=max((c.epsilon for c in ledgers), default=0.0),
            delta_max=max((c.policy.delta for c in ledgers if c.ledger.get("events")), default=0.0),
        )
        sidecar["engine"] = self.transport.engine
        save_adapter(job.model, paths.adapter, sidecar=sidecar)
        write_base_files(paths.adapter, job.model, job.tokenizer)
        base_path = json.loads((paths.adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
        clients = [{**c.summary, "epsilon": c.epsilon, "delta": c.policy.delta} for c in ledgers]
        targets = sorted(job.model.peft_config["default"].target_modules)
        card = model_card(job.config, sidecar, clients, base_path=base_path, targets=targets)
        (paths.adapter / "README.md").write_text(card)
        if merge:
            job.model.merge_and_unload().save_pretrained(paths.root / "merged")
            job.tokenizer.save_pretrained(paths.root / "merged")
        write_report(
            paths, job.config, rows, [c.ledger for c in ledgers], [c.policy for c in ledgers], sidecar,
            [c.summary for c in ledgers],
        )  # fmt: skip
        first, last = rows[0], rows[-1]
        self.log(
            f"final held-out perplexity {last.perplexity:.2f} vs {first.perplexity:.2f} at round 0 "
            f"(ratio {last.perplexity / first.perplexity:.3f}); report: {paths.report}"
        )
        return RunResult(paths.root, rows, {c.client: c.epsilon for c in ledgers}, paths.adapter, paths.report)

    def _print(self, record: RoundRecord) -> None:
        eps = ", ".join(f"{v:.2f}" for v in record.epsilon.values())
        extra = ""
        if record.round > 0:
            extra = f"  joined {record.participants} included {record.included}"
            if record.aborted:
                extra += f"  aborted: {record.aborted}"
        where = "held-out"
        if record.federated_evaluation is not None:
            fe = record.federated_evaluation
            where = f"federated (noised, sites {fe.sites})" if fe.aborted is None else "federated (none)"
            if fe.aborted:
                extra += f"  evaluation: {fe.aborted}"
        self.log(
            f"round {record.round}: {where} loss {record.eval_loss:.4f}, perplexity {record.perplexity:.2f}, "
            f"epsilon per client [{eps}]{extra}"
        )
