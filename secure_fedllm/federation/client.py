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

The sampling and noise generators are torch's Mersenne Twister seeded from that per-release seed,
which is not a cryptographic RNG. `privacy.noise_seed` derives the site secret (hence every seed)
from a public number for reproducible experiments only: anyone who knows it can regenerate the
noise. The report says so.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
from peft import PeftModel

from ..adapters import AdapterManifest, get_vector, set_vector
from ..data.tokenized import TokenizedDataset
from ..privacy import PrivacyLedger
from ..site import SiteState
from ..training import LocalTrainer, StepSettings
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
    delta: npt.NDArray[np.float32]
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
    ) -> None:
        self.client, self.data, self.policy, self.ledger, self.site = client, data, policy, ledger, site
        self.fingerprints = dict(fingerprints or {})
        self.learning_rate, self.optimizer = learning_rate, optimizer
        self.job, self.template = job, template
        self._data_digest: bytes | None = None

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
        charged = False
        if event is not None and self.ledger is not None:
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
                    self.ledger.charge(plan.round, event, release=tag)  # raises PrivacyBudgetExhaustedError
        seed = self.site.noise_seed(self.job, plan.round, key)
        delta = self.site.load_output(self.job, plan.round, key)
        if delta is None:
            if charged:
                raise PlanRefusedError(
                    f"client {self.client}: round {plan.round} was charged but its output is missing from "
                    f"{self.site.root}; refusing to release it again"
                )
            delta = self._train(trainer, model, manifest, global_vector, assignment, seed)
            self.site.save_output(self.job, plan.round, key, delta)
        if event is not None and self.ledger is not None and not charged:
            self.ledger.charge(plan.round, event, release=tag)
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

    def refuses(self, update: ClientUpdate) -> str | None:
        """Why this release may not join a new session (its masked input already went to one), or None."""
        binding = self.site.binding(self.job, update.round, update.release_key)
        if binding is None:
            return None
        return (
            f"client {self.client}: round {update.round} was already sent to session {binding.session.hex()[:16]}...; "
            "one update goes to one session only"
        )

    def bind(self, update: ClientUpdate, session: bytes, transcript: bytes) -> None:
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
                    noise_generator=torch.Generator().manual_seed(_seed_int(seed, b"noise")),
                )
            delta = get_vector(model, manifest) - global_vector
        finally:
            set_vector(model, manifest, global_vector)  # the shared model never keeps one client's update
        return delta.astype(np.float32)

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


def _seed_int(seed: bytes, purpose: bytes) -> int:
    return int.from_bytes(hashlib.sha256(seed + b"|" + purpose).digest()[:8], "big") >> 1
