"""A federated client: its data, its policy, its ledger and its private state folder.

Order of events in a joined round: check the whole plan (every field finite and in range; its
model, A0, adapter and manifest hashes against the client's own; its DP settings against the
client's floors; the weights and the cohort size); refuse before any step if the round would exceed
the budget; train; keep the DP output and charge the ledger (both written and fsynced); only then
return the update, which is the DP output that leaves the client.

One update, one session. The release key is an HMAC, under a secret only the site holds
(`secure_fedllm.site.SiteState`), of everything the update depends on: the job, the round, the
plan digest, the global adapter, the tokenized data, the hyperparameters and the template. A
re-request with the same release key gets the stored output (no retraining, no second charge); any
other request is a new release, charged and trained with a fresh noise seed drawn from os.urandom
and kept only in the site's state, never derived from the round or the plan. Before its masked
input (or ciphertext) leaves, the client binds the release to that one session (`bind`), fsynced;
afterwards it refuses every other session for that release (`refuses`), so a server that re-runs a
round without some client cannot difference two sums of the same updates.

Federated evaluation (`evaluate`, with `evaluation.mode = "federated"`) is a release of the same
kind: the site checks the model (`federation.evaluation.check_model`), refuses a second evaluation
of a round on anything but the identical model and data, refuses past its budget, stores the noised
values and charges one Gaussian event before they leave; see `secure_fedllm.federation.evaluation`.

Training's Poisson sampling uses torch's Mersenne Twister seeded from that per-release seed; its
DP-SGD noise is ChaCha20-based under a key derived from the same seed (`privacy.noise_generator =
"csprng"`, the default; "torch" keeps Opacus' Mersenne Twister), as is an evaluation's noise.
`privacy.noise_seed` derives the site secret (hence every seed) from a public number for
reproducible experiments only: anyone who knows it can regenerate the noise. The report says so.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
from peft import PeftModel

from ..adapters import AdapterManifest, get_vector, set_vector
from ..data.tokenized import TokenizedDataset
from ..errors import PrivacyBudgetExhaustedError
from ..privacy import DPSGDEvent, PrivacyLedger
from ..privacy.distributed import DistributedDP
from ..privacy.ledger import DP_SGD, SKELLAM
from ..privacy.noise import KeystreamSource
from ..privacy.rotation import rotate, rotation_seed
from ..site import SiteState
from ..training import LocalTrainer, StepSettings
from .evaluation import (
    EvaluationBook,
    EvaluationRefusedError,
    EvaluationRelease,
    EvaluationSettings,
    check_model,
    clipped_sums,
    evaluation_context,
    ledger_tag,
    model_digest,
    release_noise,
    rounding_seed,
    unit_losses,
)
from .plan import Assignment, ClientPolicy, PlanRefusedError, RoundPlan

__all__ = ["ClientUpdate", "FederatedClient", "data_digest"]


@dataclass(frozen=True)
class ClientUpdate:
    """What the client releases, plus the site-private handles the host needs to send it.

    `release_key` and `rounding_seed` are SECRET: they stay with the site (the host passes them to
    the masking session and to `FederatedClient.bind`, never to the server).
    """

    client: int
    round: int
    delta: npt.NDArray[np.float32] | npt.NDArray[np.int64]
    """The update (local mode), or distributed DP's integer vector: rounded unit gradients plus a noise share."""
    epsilon: float
    replayed: bool
    release_key: bytes
    rounding_seed: bytes


def data_digest(data: TokenizedDataset) -> bytes:
    """SHA-256 of the tokenized records and their grouping into privacy units (one corrected record changes it)."""
    digest = hashlib.sha256(b"secure-fedllm/tokenized-data/v1|")
    for example in data.examples:
        digest.update(np.asarray(example.input_ids, dtype="<i8").tobytes() + b"|")
        digest.update(np.asarray(example.labels, dtype="<i8").tobytes() + b"|")
    digest.update(json.dumps(data.units, separators=(",", ":")).encode())
    return digest.digest()


class FederatedClient:
    """One client of the in-process federation (and of a Flower node).

    Args:
        client: the client id.
        data: its tokenized records.
        policy: its own floors and budget.
        ledger: its privacy ledger (None without DP).
        site: its private state folder (secret, noise seeds, stored outputs, session bindings).
        learning_rate: the local step size (part of the release key).
        optimizer: the inner optimiser (part of the release key).
        fingerprints: the model, A0, adapter and manifest hashes the client checks plans against.
        job: the job the releases belong to (e.g. a digest of the run configuration).
        template: a description of the chat template (part of the release key).
        heldout: its held-out split for federated evaluation (never trained on), or None.
        evaluation: its own federated-evaluation settings, or None if it takes no part in one.
    """

    def __init__(
        self,
        client: int,
        data: TokenizedDataset,
        *,
        policy: ClientPolicy,
        ledger: PrivacyLedger | None,
        site: SiteState,
        learning_rate: float,
        optimizer: str,
        fingerprints: dict[str, str] | None = None,
        job: str = "",
        template: str = "",
        heldout: TokenizedDataset | None = None,
        evaluation: EvaluationSettings | None = None,
        noise_generator: str = "csprng",
    ) -> None:
        self.client, self.data, self.policy, self.ledger, self.site = client, data, policy, ledger, site
        self.fingerprints = dict(fingerprints or {})
        self.learning_rate, self.optimizer = learning_rate, optimizer
        self.job, self.template = job, template
        self.heldout, self.evaluation = heldout, evaluation
        if noise_generator not in ("csprng", "torch"):
            raise ValueError(
                f"noise_generator={noise_generator!r} must be 'csprng' or 'torch' (privacy.noise_generator)"
            )
        self.noise_generator = noise_generator
        self._data_digest: bytes | None = None
        self._heldout_digest: bytes | None = None

    @property
    def epsilon(self) -> float:
        """Epsilon spent so far (0 without DP)."""
        return self.ledger.epsilon if self.ledger is not None else 0.0

    @property
    def rounds_joined(self) -> list[int]:
        """Rounds charged to this client (a round appears once per distinct release)."""
        return list(self.ledger.rounds) if self.ledger is not None else []

    def willing(self, round_number: int) -> str | None:
        """None if the client can join `round_number`, else why it sits out."""
        event = self.policy.event()
        if event is None or self.ledger is None or round_number in self.ledger.rounds:
            return None  # a re-request of a charged release costs nothing; anything else is checked in train()
        if len(self.ledger.rounds) >= self.policy.max_participations:
            return f"participation cap {self.policy.max_participations} reached"
        if self.ledger.would_exceed(event):
            return f"budget: epsilon {self.ledger.epsilon:.3f} + one round would exceed {self.policy.epsilon_budget}"
        return None

    def assignment(self, weight: float) -> Assignment:
        """The settings the client offers to run (the server may only ask for more privacy)."""
        p = self.policy
        return Assignment(
            client=self.client,
            noise_multiplier=p.noise_multiplier,
            max_grad_norm=p.max_grad_norm,
            sample_rate=p.sample_rate,
            steps=p.steps,
            weight=weight,
        )

    def train(
        self,
        trainer: LocalTrainer,
        model: PeftModel,
        manifest: AdapterManifest,
        global_vector: npt.NDArray[np.float32],
        plan: RoundPlan,
    ) -> ClientUpdate:
        """Run the client's part of `plan` and return its (charged) update.

        Raises:
            PlanRefusedError: the plan is malformed or asks for less privacy than the client's policy.
            PrivacyBudgetExhaustedError: the round would exceed the budget (raised before any step).
        """
        assignment = self._check_plan(plan)
        key = self.release_key(plan, global_vector, assignment)
        tag = hashlib.sha256(b"secure-fedllm/ledger-tag|" + key).hexdigest()[:32]
        event = self.policy.event()
        round_dp = (
            self.policy.round_dp(assignment, len(plan.participants)) if self.policy.distributed is not None else None
        )
        mechanism = SKELLAM if round_dp is not None else DP_SGD
        charged = False
        if event is not None and self.ledger is not None:
            if round_dp is not None:
                event = round_dp.event()
            else:
                event = event.model_copy(
                    update={
                        "noise_multiplier": assignment.noise_multiplier,
                        "sample_rate": assignment.sample_rate,
                        "steps": assignment.steps,
                    }
                )
            charged = self.ledger.charged(plan.round, tag)
            if not charged:
                if len(self.ledger.rounds) >= self.policy.max_participations:
                    raise PlanRefusedError(
                        f"client {self.client}: participation cap {self.policy.max_participations} reached"
                    )
                if self.ledger.would_exceed(event):
                    # raises PrivacyBudgetExhaustedError
                    self.ledger.charge(plan.round, event, release=tag, mechanism=mechanism)
        seed = self.site.noise_seed(self.job, plan.round, key)
        delta = self.site.load_output(self.job, plan.round, key)
        if delta is None:
            if charged:
                raise PlanRefusedError(
                    f"client {self.client}: round {plan.round} was charged but its output is missing from "
                    f"{self.site.root}; refusing to release it again"
                )
            if round_dp is not None and self.policy.local_steps is not None:  # client-level distributed DP
                delta = self._client_level_update(trainer, model, manifest, global_vector, round_dp, seed, plan.round)
            elif round_dp is not None:
                delta = self._distributed_step(trainer, model, manifest, global_vector, round_dp, seed)
            else:
                delta = self._train(trainer, model, manifest, global_vector, assignment, seed)
            self.site.save_output(self.job, plan.round, key, delta)
        if event is not None and self.ledger is not None and not charged:
            self.ledger.charge(plan.round, event, release=tag, mechanism=mechanism)
        rounding = hashlib.sha256(b"secure-fedllm/rounding|" + seed).digest()
        return ClientUpdate(self.client, plan.round, delta, self.epsilon, charged, key, rounding)

    def release_key(
        self, plan: RoundPlan, global_vector: npt.NDArray[np.float32], assignment: Assignment | None = None
    ) -> bytes:
        """The site-private HMAC of everything this client's update for `plan` depends on."""
        if self._data_digest is None:
            self._data_digest = data_digest(self.data)
        own = assignment or next(a for a in plan.participants if a.client == self.client)
        hyper = {"learning_rate": self.learning_rate, "optimizer": self.optimizer, **own.model_dump()}
        return self.site.release_key(
            job=self.job,
            round=plan.round,
            plan=plan.digest(),
            global_adapter=np.ascontiguousarray(global_vector, dtype="<f4"),
            data=self._data_digest,
            hyperparameters=hyper,
            template=self.template,
        )

    def evaluation_willing(self, round_number: int, digest: str) -> str | None:
        """None if the site would evaluate model `digest` at `round_number` (a replay included), else why not.

        Needs no model or data: the settings, the evaluation record and the ledger (what a Flower
        node answers a query with before the server sizes the session).
        """
        settings = self.evaluation
        if settings is None:
            return f"client {self.client} takes part in no federated evaluation (its own evaluation.mode)"
        if not 0 <= round_number <= settings.rounds:
            return f"round {round_number} is not a round of this job (0..{settings.rounds})"
        book = EvaluationBook(self.site.root, self.job)
        stored = book.entry(round_number)
        if stored is not None:
            return None if stored["model"] == digest else f"round {round_number} was already evaluated on another model"
        last = book.last_round()
        if last is not None and round_number <= last:
            return f"round {round_number} comes before round {last}, the last one this site evaluated"
        if self.ledger is not None and self.ledger.would_exceed(settings.event()):
            return (
                f"budget: epsilon {self.ledger.epsilon:.3f} + one evaluation would exceed {self.ledger.epsilon_budget}"
            )
        return None

    def evaluate(
        self,
        model: PeftModel,
        manifest: AdapterManifest,
        global_vector: npt.NDArray[np.float32],
        round_number: int,
        *,
        start: npt.NDArray[np.float32],
    ) -> EvaluationRelease:
        """Score `global_vector` on the held-out split and return the charged, noised release.

        `start` is this job's starting adapter as the site itself built it (public seeds). Order:
        settings and round; a stored release of this round (replayed only for the identical model
        and data); the model checks; the budget; the clipped sums plus noise from a fresh seed;
        the values stored (fsynced); the ledger charged; only then the release is returned.

        Raises:
            EvaluationRefusedError: no evaluation at this site, another model for a round already
                evaluated, a round out of order, or a model that cannot be this job's.
            PrivacyBudgetExhaustedError: one more evaluation would exceed the budget (nothing charged).
        """
        settings = self.evaluation
        if settings is None or self.heldout is None or not self.heldout.examples:
            raise EvaluationRefusedError(
                f"client {self.client} takes part in no federated evaluation (its evaluation.mode is not "
                "'federated', or it has no held-out units)"
            )
        if not 0 <= round_number <= settings.rounds:
            raise EvaluationRefusedError(f"round {round_number} is not a round of this job (0..{settings.rounds})")
        vector = np.ascontiguousarray(global_vector, dtype=np.float32)
        digest = model_digest(vector)
        if self._heldout_digest is None:
            self._heldout_digest = data_digest(self.heldout)
        data = self._heldout_digest.hex()
        key = self.site.release_key(
            job=self.job,
            round=round_number,
            purpose="federated-evaluation",
            model=digest,
            data=self._heldout_digest,
            settings=settings.public(),
            template=self.template,
        )
        tag = ledger_tag(key)
        event = settings.event()
        book = EvaluationBook(self.site.root, self.job)
        stored = book.entry(round_number)
        if stored is not None:
            if stored["model"] != digest or stored["data"] != data or stored["tag"] != tag:
                raise EvaluationRefusedError(
                    f"client {self.client}: round {round_number} was already evaluated (on model "
                    f"{stored['model'][:16]}...); one evaluation per round, and only the identical request is "
                    "answered again"
                )
            values = np.asarray(stored["values"], dtype=np.float64)
            replayed = True
        else:
            last = book.last_round()
            if last is not None and round_number <= last:
                raise EvaluationRefusedError(
                    f"client {self.client}: round {round_number} comes before round {last}, the last one it evaluated"
                )
            check_model(
                vector, start=start, anchor=book.anchor(), round_number=round_number, clip_range=settings.clip_range
            )
            if self.ledger is not None and self.ledger.would_exceed(event):
                self.ledger.charge(round_number, event, release=tag, mechanism="gaussian")  # raises, charges nothing
            seed = self.site.noise_seed(self.job, round_number, key)
            set_vector(model, manifest, vector)
            losses = unit_losses(model, self.heldout, batch_size=settings.batch_size)
            values = clipped_sums(losses, settings.loss_clip) + release_noise(seed, settings)
            entry = {"model": digest, "data": data, "tag": tag, "values": [float(v) for v in values]}
            book.store(round_number, entry, vector)
            replayed = False
        if self.ledger is not None and not self.ledger.charged(round_number, tag):
            try:  # a stored release whose charge was cut short by a crash is charged before it leaves
                self.ledger.charge(round_number, event, release=tag, mechanism="gaussian")
            except PrivacyBudgetExhaustedError as exc:
                raise EvaluationRefusedError(f"client {self.client}: {exc}") from exc
        seed = self.site.noise_seed(self.job, round_number, key)
        return EvaluationRelease(
            client=self.client,
            round=round_number,
            values=values,
            scaled=settings.encode(values),
            epsilon=self._epsilon_of(event),
            replayed=replayed,
            release_key=key,
            rounding_seed=rounding_seed(seed),
            context=evaluation_context(
                self.job, round_number, digest, value_bound=settings.value_bound, clip_range=settings.clip_range
            ),
        )

    def _epsilon_of(self, event: DPSGDEvent) -> float:
        """Epsilon of one release alone at this site's delta (0 without DP)."""
        return self.ledger.epsilon_of([event]) if self.ledger is not None else 0.0

    def refuses(self, update: ClientUpdate | EvaluationRelease) -> str | None:
        """Why this release may not join a new session (its masked input already went to one), or None."""
        binding = self.site.binding(self.job, update.round, update.release_key)
        if binding is None:
            return None
        return (
            f"client {self.client}: round {update.round} was already sent to session {binding.session.hex()[:16]}...; "
            "one update goes to one session only"
        )

    def bind(self, update: ClientUpdate | EvaluationRelease, session: bytes, transcript: bytes) -> None:
        """Bind the release to the session its masked input is about to go to (fsynced first).

        Raises:
            ReleaseBindingError: the release is already bound to another session.
        """
        self.site.bind(self.job, update.round, update.release_key, session, transcript)

    def check_session(self, update: ClientUpdate, session: bytes, survivors: tuple[int, ...] | None = None) -> None:
        """Refuse a request for a bound release that names another session or survivor set.

        Raises:
            ReleaseBindingError: naming the session or survivor set the release is bound to.
        """
        self.site.check_binding(self.job, update.round, update.release_key, session=session, survivors=survivors)

    def _train(
        self,
        trainer: LocalTrainer,
        model: PeftModel,
        manifest: AdapterManifest,
        global_vector: npt.NDArray[np.float32],
        assignment: Assignment,
        seed: bytes,
    ) -> npt.NDArray[np.float32]:
        set_vector(model, manifest, global_vector)
        settings = StepSettings(
            noise_multiplier=assignment.noise_multiplier,
            max_grad_norm=assignment.max_grad_norm,
            sample_rate=assignment.sample_rate,
            expected_batch_size=assignment.sample_rate * self.data.num_units,
            steps=assignment.steps,
            learning_rate=self.learning_rate,
            optimizer=self.optimizer,
        )
        try:
            with torch.random.fork_rng(devices=[]):  # LoRA / model dropout masks, from the release's seed
                torch.manual_seed(_seed_int(seed, b"dropout"))
                trainer.train(
                    self.data,
                    settings,
                    sample_generator=torch.Generator().manual_seed(_seed_int(seed, b"sample")),
                    **(
                        {"noise_key": hmac.new(seed, b"secure-fedllm/dp-sgd-noise-key/v1", hashlib.sha256).digest()}
                        if self.noise_generator == "csprng"
                        else {"noise_generator": torch.Generator().manual_seed(_seed_int(seed, b"noise"))}
                    ),
                )
            delta = get_vector(model, manifest) - global_vector
        finally:
            set_vector(model, manifest, global_vector)  # the shared model never keeps one client's update
        return delta.astype(np.float32)

    def _distributed_step(
        self,
        trainer: LocalTrainer,
        model: PeftModel,
        manifest: AdapterManifest,
        global_vector: npt.NDArray[np.float32],
        round_dp: DistributedDP,
        seed: bytes,
    ) -> npt.NDArray[np.int64]:
        """One distributed DP-SGD step: Poisson-sample, per-unit gradients, conditional rounding, Skellam share.

        Sampling, rounding and model dropout follow public-quality generators seeded from the
        release's secret seed; the Skellam share comes from a ChaCha20 keystream under a key derived
        from it (`secure_fedllm.privacy.distributed`).
        """
        set_vector(model, manifest, global_vector)
        sampler = torch.Generator().manual_seed(_seed_int(seed, b"sample"))
        chosen = torch.rand(self.data.num_units, generator=sampler) < round_dp.sample_rate
        units = [int(u) for u in chosen.nonzero().flatten()]
        batch = self.data.batch_of_units(units) if units else None
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(_seed_int(seed, b"dropout"))
                grads = trainer.per_unit_gradients(batch, list(manifest.check(model).values()))
        finally:
            set_vector(model, manifest, global_vector)
        return _contribution(round_dp, grads.numpy(), seed)

    def _client_level_update(
        self,
        trainer: LocalTrainer,
        model: PeftModel,
        manifest: AdapterManifest,
        global_vector: npt.NDArray[np.float32],
        round_dp: DistributedDP,
        seed: bytes,
        round_number: int,
    ) -> npt.NDArray[np.int64]:
        """Client-level distributed DP: noise-free local steps, then the whole update rotated, clipped, rounded, noised.

        The local steps take no per-record noise or clipping (the unit is the client); the update is
        rotated by the round's public randomized Hadamard transform, clipped to C, conditionally
        rounded and given this client's Skellam share (Kairouz, Liu, Steinke 2021).
        """
        assert self.policy.local_sample_rate is not None and self.policy.local_steps is not None
        local = Assignment(
            client=self.client,
            noise_multiplier=0.0,
            max_grad_norm=1e6,  # no per-record clipping: the whole update is clipped below
            sample_rate=self.policy.local_sample_rate,
            steps=self.policy.local_steps,
            weight=1.0,
        )
        update = self._train(trainer, model, manifest, global_vector, local, seed)
        return _contribution(round_dp, rotate(update, rotation_seed(self.job, round_number))[None, :], seed)

    def _check_plan(self, plan: RoundPlan) -> Assignment:
        """Refuse a malformed plan, one for another model, a weakened one, or one that could single out an update."""
        plan = plan.validated()
        for name, mine in self.fingerprints.items():
            if getattr(plan, name, mine) != mine:
                raise PlanRefusedError(
                    f"client {self.client} refuses round {plan.round}: plan {name}={getattr(plan, name)[:16]}... "
                    f"but its own is {mine[:16]}..."
                )
        own = [a for a in plan.participants if a.client == self.client]
        if len(own) != 1:
            raise PlanRefusedError(f"client {self.client} is not (exactly once) in the plan of round {plan.round}")
        if len({a.client for a in plan.participants}) != len(plan.participants):
            raise PlanRefusedError(f"round {plan.round}: the plan lists a client twice")
        if plan.protocol != "none":
            if len(plan.participants) < 3:
                raise PlanRefusedError(f"round {plan.round}: secure aggregation over {len(plan.participants)} clients")
            low = min(a.weight for a in plan.participants)
            if low < self.policy.min_weight * max(a.weight for a in plan.participants):
                raise PlanRefusedError(
                    f"round {plan.round}: a weight of {low} would let the sum single out other updates; "
                    f"weights must stay within a factor {1 / self.policy.min_weight:g} of each other"
                )
        self.policy.check(own[0])
        return own[0]


def _contribution(round_dp: DistributedDP, rows: npt.NDArray[np.floating], seed: bytes) -> npt.NDArray[np.int64]:
    """What a distributed-DP release sends: `rows` rounded from the release's seed, plus its Skellam share.

    Rounding draws come from a public-quality generator seeded from the release's secret seed; the
    share from a ChaCha20 keystream under a key derived from it, so a re-request redraws both identically.
    """
    noise_key = hmac.new(seed, b"secure-fedllm/skellam-noise-key/v1", hashlib.sha256).digest()
    return round_dp.contribution(
        rows, rounding=np.random.default_rng(_seed_int(seed, b"rounding")), noise=KeystreamSource(noise_key)
    )


def _seed_int(seed: bytes, purpose: bytes) -> int:
    return int.from_bytes(hashlib.sha256(seed + b"|" + purpose).digest()[:8], "big") >> 1
