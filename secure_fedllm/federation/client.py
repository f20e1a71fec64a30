"""A federated client: its data, its policy, its ledger and its private seed.

Order of events in a joined round: check the plan against the client's own policy; refuse before
any step if the round would exceed the budget; train; charge the ledger (written and fsynced);
only then return the update, which is the DP output that leaves the client. Sampling and noise
generators are derived from the client's private seed and the round number, so a client that
re-runs a round after a crash produces the bitwise-identical update and is not charged twice; a
different release for the same round is charged again (or refused).

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
from ..errors import PrivacyBudgetExhaustedError
from ..privacy import PrivacyLedger
from ..training import LocalTrainer, StepSettings
from .plan import Assignment, ClientPolicy, RoundPlan

__all__ = ["ClientUpdate", "FederatedClient"]


@dataclass(frozen=True)
class ClientUpdate:
    """What leaves the client: the change of the aggregated tensors, and the epsilon after charging."""

    client: int
    delta: npt.NDArray[np.float32]
    epsilon: float
    replayed: bool


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
    ) -> None:
        if len(secret_seed) < 32:
            raise ValueError("secret_seed must be at least 32 bytes")
        self.client, self.data, self.policy, self.ledger = client, data, policy, ledger
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
        mine = [a for a in plan.participants if a.client == self.client]
        if len(mine) != 1:
            raise ValueError(f"client {self.client} is not (exactly once) in the plan of round {plan.round}")
        assignment = mine[0]
        self.policy.check(assignment)
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
                replay = self.ledger.events[self.ledger.rounds.index(plan.round)] == event
                if not replay:
                    raise PrivacyBudgetExhaustedError(
                        f"client {self.client}: round {plan.round} was already released with other settings",
                        spent=self.ledger.epsilon,
                        requested=float("inf"),
                        budget=self.ledger.epsilon_budget,
                    )
            elif self.ledger.would_exceed(event):
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
        trainer.train(
            self.data,
            settings,
            sample_generator=self._generator(b"sample", plan.round),
            noise_generator=self._generator(b"noise", plan.round),
        )
        delta = get_vector(model, manifest) - global_vector
        if event is not None and self.ledger is not None and not replay:
            self.ledger.charge(plan.round, event)
        return ClientUpdate(self.client, delta.astype(np.float32), self.epsilon, replay)

    def rounding_seed(self, round_number: int) -> bytes:
        """Seed of the stochastic rounding of this round's encoded update (private, replayable)."""
        return hashlib.sha256(self._seed + b"|rounding|" + round_number.to_bytes(8, "big")).digest()

    def _generator(self, purpose: bytes, round_number: int) -> torch.Generator:
        seed = hashlib.sha256(self._seed + b"|" + purpose + b"|" + round_number.to_bytes(8, "big")).digest()
        return torch.Generator().manual_seed(int.from_bytes(seed[:8], "big") >> 1)
