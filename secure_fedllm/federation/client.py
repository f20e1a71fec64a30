"""A federated client: its data, its policy, its ledger and its private seed.

Order of events in a joined round: check the whole plan (its model, A0, adapter and manifest
hashes against the client's own, its DP settings against the client's floors, the weights and the
cohort size); refuse before any step if the round would exceed the budget; train; charge the
ledger (written and fsynced); only then return the update, which is the DP output that leaves the
client.

Sampling, noise, dropout and rounding generators are derived from the client's private seed and
the release id: a digest of the round, the plan and the global adapter the client starts from. A
client that re-runs a round after a crash therefore produces the bitwise-identical update, and is
not charged twice. A server that asks for round r again with another plan or another global
adapter is refused: a second release with the same noise would let it cancel the noise by
subtraction, and one with fresh noise would need a second charge for the same round.

The generators are torch's Mersenne Twister, which is not a cryptographic RNG: the seed is private
to the client (os.urandom unless `privacy.noise_seed` fixes it for experiments). The report says so.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
from peft import PeftModel

from ..adapters import AdapterManifest, get_vector, set_vector
from ..data.tokenized import TokenizedDataset
from ..privacy import PrivacyLedger
from ..training import LocalTrainer, StepSettings
from .plan import Assignment, ClientPolicy, PlanRefusedError, RoundPlan

__all__ = ["ClientUpdate", "FederatedClient"]


@dataclass(frozen=True)
class ClientUpdate:
    """What leaves the client: the change of the aggregated tensors, and the epsilon after charging."""

    client: int
    delta: npt.NDArray[np.float32]
    epsilon: float
    replayed: bool
    release: str


class FederatedClient:
    """One client of the in-process federation."""

    def __init__(
        self,
        client: int,
        data: TokenizedDataset,
        *,
        policy: ClientPolicy,
        ledger: PrivacyLedger | None,
        secret_seed: bytes,
        learning_rate: float,
        optimizer: str,
        fingerprints: dict[str, str] | None = None,
    ) -> None:
        if len(secret_seed) < 32:
            raise ValueError("secret_seed must be at least 32 bytes")
        self.client, self.data, self.policy, self.ledger = client, data, policy, ledger
        self.fingerprints = dict(fingerprints or {})
        self._seed = secret_seed
        self.learning_rate, self.optimizer = learning_rate, optimizer

    @property
    def epsilon(self) -> float:
        """Epsilon spent so far (0 without DP)."""
        return self.ledger.epsilon if self.ledger is not None else 0.0

    @property
    def rounds_joined(self) -> list[int]:
        """Rounds charged to this client."""
        return list(self.ledger.rounds) if self.ledger is not None else []

    def willing(self, round_number: int) -> str | None:
        """None if the client can join `round_number`, else why it sits out."""
        event = self.policy.event()
        if event is None or self.ledger is None or round_number in self.ledger.rounds:
            return None
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
            PlanRefusedError: the plan asks for less privacy than the client's policy.
            PrivacyBudgetExhaustedError: the round would exceed the budget (raised before any step).
        """
        assignment = self._check_plan(plan)
        release = self.release_id(plan, global_vector)
        event = self.policy.event()
        replay = False
        if event is not None and self.ledger is not None:
            event = event.model_copy(
                update={
                    "noise_multiplier": assignment.noise_multiplier,
                    "sample_rate": assignment.sample_rate,
                    "steps": assignment.steps,
                }
            )
            if plan.round in self.ledger.rounds:
                index = self.ledger.rounds.index(plan.round)
                replay = self.ledger.events[index] == event and self.ledger.releases[index] == release
                if not replay:
                    raise PlanRefusedError(
                        f"client {self.client}: round {plan.round} was already released from another plan or "
                        "global adapter; a second release of the same round is refused"
                    )
            else:
                if len(self.ledger.rounds) >= self.policy.max_participations:
                    raise PlanRefusedError(
                        f"client {self.client}: participation cap {self.policy.max_participations} reached"
                    )
                if self.ledger.would_exceed(event):
                    self.ledger.charge(plan.round, event)  # raises PrivacyBudgetExhaustedError, changes nothing
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
        with torch.random.fork_rng(devices=[]):  # LoRA / model dropout masks, replayable per release
            torch.manual_seed(self._seed_int(b"dropout", release))
            trainer.train(
                self.data,
                settings,
                sample_generator=torch.Generator().manual_seed(self._seed_int(b"sample", release)),
                noise_generator=torch.Generator().manual_seed(self._seed_int(b"noise", release)),
            )
        delta = get_vector(model, manifest) - global_vector
        if event is not None and self.ledger is not None and not replay:
            self.ledger.charge(plan.round, event, release=release)
        return ClientUpdate(self.client, delta.astype(np.float32), self.epsilon, replay, release)

    def release_id(self, plan: RoundPlan, global_vector: npt.NDArray[np.float32]) -> str:
        """Digest of what determines this client's update: round, plan and starting adapter."""
        digest = hashlib.sha256(b"secure-fedllm/release/v1|" + plan.round.to_bytes(8, "big") + plan.digest())
        digest.update(np.ascontiguousarray(global_vector, dtype="<f4").tobytes())
        return digest.hexdigest()

    def _check_plan(self, plan: RoundPlan) -> Assignment:
        """Refuse a plan for another model, a weakened one, or one that could single out an update."""
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

    def rounding_seed(self, release: str) -> bytes:
        """Seed of the stochastic rounding of this release's encoded update (private, replayable)."""
        return hashlib.sha256(self._seed + b"|rounding|" + release.encode()).digest()

    def _seed_int(self, purpose: bytes, release: str) -> int:
        seed = hashlib.sha256(self._seed + b"|" + purpose + b"|" + release.encode()).digest()
        return int.from_bytes(seed[:8], "big") >> 1
