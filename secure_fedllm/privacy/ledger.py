"""A client's persistent privacy ledger: charged, written and synced before its update leaves.

The ledger is the client's own record (a server cannot edit it): one event per joined round, the
budget and delta it was opened with, and the accountant and neighbouring relation that read it
(the relation is stored so that the file says which datasets its epsilon separates). `charge()` first computes
the epsilon the history would reach; over budget it raises `PrivacyBudgetExhaustedError` and
changes nothing (in memory or on disk). Writes go to a temporary file that is fsynced and renamed
over the old one, so a crash leaves either the old ledger or the new one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import PrivacyBudgetExhaustedError
from ..files import atomic_write
from .accountants import make_accountant
from .events import DPSGDEvent

__all__ = ["PrivacyLedger"]


class PrivacyLedger:
    """Per-client ledger backed by one JSON file."""

    def __init__(
        self,
        path: str | Path,
        *,
        client: int,
        epsilon_budget: float,
        delta: float,
        accountant: str,
        neighbouring: str = "add_remove",
    ) -> None:
        self.path = Path(path)
        self.client, self.epsilon_budget, self.delta, self.accountant_name = client, epsilon_budget, delta, accountant
        self._accountant = make_accountant(accountant, neighbouring=neighbouring)
        self.neighbouring = self._accountant.neighbouring
        self.rounds: list[int] = []
        self.events: list[DPSGDEvent] = []
        self.releases: list[str | None] = []

    @classmethod
    def open(cls, path: str | Path, **kw: Any) -> PrivacyLedger:
        """Load the ledger at `path` if it exists (its settings win), else start an empty one."""
        path = Path(path)
        if not path.exists():
            return cls(path, **kw)
        data = json.loads(path.read_text())
        ledger = cls(
            path,
            client=data["client"],
            epsilon_budget=data["epsilon_budget"],
            delta=data["delta"],
            accountant=data["accountant"],
            # A ledger written before the relation was recorded was accounted add/remove-one.
            neighbouring=data.get("neighbouring", "add_remove"),
        )
        ledger.rounds = [int(e["round"]) for e in data["events"]]
        ledger.events = [
            DPSGDEvent(**{k: v for k, v in e.items() if k not in ("round", "release")}) for e in data["events"]
        ]
        ledger.releases = [e.get("release") for e in data["events"]]
        return ledger

    @property
    def epsilon(self) -> float:
        """Epsilon spent so far at the ledger's delta."""
        return self._accountant.epsilon(self.events, self.delta)

    def would_exceed(self, event: DPSGDEvent) -> bool:
        """True if charging `event` would go past the budget (a client then sits the round out)."""
        return self._accountant.epsilon([*self.events, event], self.delta) > self.epsilon_budget

    def charge(self, round_number: int, event: DPSGDEvent, *, release: str | None = None) -> float:
        """Record one joined round and persist it; returns the new epsilon.

        `release` identifies what was released (a site-private tag of everything the update
        depends on), so that a re-request of the same release is told apart from a new release. A
        round may be charged more than once, once per distinct release: a second release of a round
        with other data or settings is a new DP output and costs its own epsilon.

        Raises:
            PrivacyBudgetExhaustedError: the event would exceed the budget; nothing changed.
            ValueError: this release (or, without a release tag, this round) is already charged.
        """
        if any(r == round_number and (release is None or x is None or x == release)
               for r, x in zip(self.rounds, self.releases, strict=True)):  # fmt: skip
            raise ValueError(f"round {round_number} (this release) is already charged to client {self.client}")
        prospective = self._accountant.epsilon([*self.events, event], self.delta)
        if prospective > self.epsilon_budget:
            raise PrivacyBudgetExhaustedError(
                f"client {self.client}: round {round_number} would raise epsilon from {self.epsilon:.3f} to "
                f"{prospective:.3f}, over the budget {self.epsilon_budget}; the client must sit this round out",
                spent=self.epsilon,
                requested=prospective,
                budget=self.epsilon_budget,
            )
        self.rounds.append(round_number)
        self.events.append(event)
        self.releases.append(release)
        self._write()
        return prospective

    def charged(self, round_number: int, release: str) -> bool:
        """True if this release of `round_number` is already charged."""
        return any(r == round_number and x == release for r, x in zip(self.rounds, self.releases, strict=True))

    def to_dict(self, *, public: bool = False) -> dict[str, Any]:
        """The JSON form (also what `budget show` prints); `public` leaves out the site-private release tags."""
        return {
            "client": self.client,
            "epsilon_budget": self.epsilon_budget,
            "delta": self.delta,
            "accountant": self.accountant_name,
            "neighbouring": self.neighbouring,
            "events": [
                {"round": r, **e.model_dump(), **({"release": x} if x is not None and not public else {})}
                for r, e, x in zip(self.rounds, self.events, self.releases, strict=True)
            ],
        }

    def _write(self) -> None:
        atomic_write(self.path, json.dumps(self.to_dict(), indent=1).encode(), mode=0o600)
