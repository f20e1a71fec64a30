"""A site's persistent privacy ledger: charged, written and synced before its update leaves.

The ledger is the site's own record (a server cannot edit it): one entry per release, the budget
and delta it was opened with, and the accountant and neighbouring relation that read it (the
relation is stored so that the file says which datasets its epsilon separates). `charge()` first
computes the epsilon the history would reach; over budget it raises `PrivacyBudgetExhaustedError`
and changes nothing (in memory or on disk). Writes go to a temporary file that is fsynced and
renamed over the old one, so a crash leaves either the old ledger or the new one.

Two kinds of ledger share this class and this file format:

* A lifetime ledger (`job` given; `SiteState.ledger_for`): one per site and population of data
  subjects, kept in the site's state folder across jobs. Entries are keyed by (job, round, release
  tag); the epsilon is the accountant's composition of every entry of every job (never a sum of
  per-job epsilons), and the budget it is charged against is the lifetime budget fixed when the
  ledger was created. `rounds`, `releases`, `charged()` and the duplicate check speak of the
  current job only, so a second job's round 0 is a new release, not a replay of the first job's.
* A single-run ledger (`job=None`, the format written before lifetime ledgers): entries keyed by
  round. Files of that format (no `version`, no `job` per event) keep loading; their entries count
  toward the epsilon of whatever job later opens them.

Mechanisms. An entry is a joined DP-SGD round (`DP_SGD`, Gaussian noise added locally), a joined
distributed-DP round (`SKELLAM`: one secure-aggregation round whose released sum carries Skellam
noise, recorded as an `IntegerNoiseEvent`), or a federated evaluation (`GAUSSIAN`). A history of
Gaussian events alone is read by the ledger's accountant (`pld`, `rdp` or `prv`); as soon as it holds
a Skellam event the whole history is composed by RDP at integer orders
(`integer_noise.mixed_rdp_epsilon`; that module's docstring says why), whatever the accountant, or
by basic composition of its Gaussian part (the accountant) and its Skellam part (RDP), whichever is
smaller (`epsilon_of`).
`epsilon_own_share` is the same composition with each Skellam event's noise cut to the client's own
share: the epsilon that still holds if secure aggregation fails. Files with Skellam entries keep
format version 2; a program that predates them refuses such an entry (unknown fields) rather than
misreading it.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from ..errors import ConfigError, PrivacyBudgetExhaustedError
from ..files import atomic_write
from .accountants import make_accountant
from .events import DPSGDEvent
from .integer_noise import IntegerNoiseEvent, mixed_rdp_epsilon, own_share_events

__all__ = ["DP_SGD", "GAUSSIAN", "MECHANISMS", "SKELLAM", "LedgerEntry", "LedgerEvent", "PrivacyLedger"]

_VERSION = 2
_ENTRY_KEYS = ("round", "release", "job", "mechanism")

DP_SGD = "dp-sgd"
"""An entry's mechanism: one joined round of DP-SGD (a participation)."""
GAUSSIAN = "gaussian"
"""An entry's mechanism: one Gaussian release of a bounded-sensitivity statistic (a federated evaluation),
recorded as `DPSGDEvent(noise_multiplier=z, sample_rate=1, steps=1)`: the Gaussian mechanism is DP-SGD's
step without sampling, so the accountants compose it with the training events as they are."""
SKELLAM = "skellam"
"""An entry's mechanism: one joined distributed-DP round (a participation) whose secure-aggregation sum carries
Skellam noise, recorded as an `IntegerNoiseEvent` (central mu, and the client's own share as `own_mu`)."""

MECHANISMS: tuple[str, ...] = (DP_SGD, GAUSSIAN, SKELLAM)
_TRAINING = (DP_SGD, SKELLAM)
"""Mechanisms of a joined training round: `rounds` and `releases` count them, and they share one round's slot."""

LedgerEvent = DPSGDEvent | IntegerNoiseEvent
"""What a ledger entry records: a Gaussian event (DP-SGD or evaluation) or a Skellam event."""


@dataclass(frozen=True)
class LedgerEntry:
    """One charged release: the job and round it belongs to, its site-private tag, its DP event and mechanism."""

    job: str | None
    round: int
    event: LedgerEvent
    release: str | None = None
    mechanism: str = DP_SGD


class PrivacyLedger:
    """One JSON file of charged releases, read by one accountant.

    Args:
        path: the ledger file.
        client: the client index this ledger speaks for in the current job (messages, report).
        epsilon_budget: the budget (a lifetime budget for a lifetime ledger).
        delta: the delta epsilon is stated at.
        accountant: "pld" (the tight default), "rdp" or "prv": what composes the events.
        neighbouring: the neighbouring relation of the events.
        job: the job this object charges (None: a single-run ledger keyed by round).
        population: the population of data subjects a lifetime ledger belongs to (recorded only).
    """

    def __init__(
        self,
        path: str | Path,
        *,
        client: int,
        epsilon_budget: float,
        delta: float,
        accountant: str,
        neighbouring: str = "add_remove",
        job: str | None = None,
        population: str | None = None,
    ) -> None:
        self.path = Path(path)
        self.client, self.epsilon_budget, self.delta, self.accountant_name = client, epsilon_budget, delta, accountant
        self.lifetime_budget, self.lifetime_delta = epsilon_budget, delta
        self.job, self.population = job, population
        self._accountant = make_accountant(accountant, neighbouring=neighbouring)
        self.neighbouring = self._accountant.neighbouring
        self.entries: list[LedgerEntry] = []
        self._gaussian_cache: dict[tuple[tuple[DPSGDEvent, ...], float], float] = {}

    @classmethod
    def open(cls, path: str | Path, **kw: Any) -> PrivacyLedger:
        """Load the ledger at `path` if it exists, else start an empty one with `kw`.

        The file's accountant and relation win. In a single-run ledger (no `job`) its budget, delta
        and client win too. A lifetime ledger (`job` given) keeps the lifetime budget it was created
        with: a job may ask for less (the smaller budget and the smaller delta are applied to this
        job), never for more.

        Raises:
            ConfigError: the file is unreadable or malformed (the message names it).
        """
        path = Path(path)
        if not path.exists():
            return cls(path, **kw)
        try:
            data = json.loads(path.read_text())
            if not isinstance(data, dict):
                raise ValueError("expected a JSON object")
            version = int(data.get("version", 1))
            if version > _VERSION:
                raise ValueError(f"format version {version} is newer than this program's {_VERSION}")
            job = kw.get("job")
            stored_budget, stored_delta = float(data["epsilon_budget"]), float(data["delta"])
            ledger = cls(
                path,
                client=int(kw["client"]) if job is not None and "client" in kw else int(data["client"]),
                epsilon_budget=stored_budget,
                delta=stored_delta,
                accountant=str(data["accountant"]),
                # A ledger written before the relation was recorded was accounted add/remove-one.
                neighbouring=str(data.get("neighbouring", "add_remove")),
                job=job,
                population=data.get("population", kw.get("population")),
            )
            if job is not None:
                ledger.epsilon_budget = min(stored_budget, float(kw.get("epsilon_budget", stored_budget)))
                ledger.delta = min(stored_delta, float(kw.get("delta", stored_delta)))
            ledger.entries = [_entry(e) for e in data["events"]]
        except ConfigError:
            raise
        except (OSError, ValueError, KeyError, TypeError, ValidationError) as exc:
            raise ConfigError(
                f"{path}: not a readable privacy ledger ({exc!r}); restore it from a backup (deleting it would "
                "forget the privacy already spent)"
            ) from exc
        return ledger

    # -- views -----------------------------------------------------------------------------------

    @property
    def events(self) -> list[LedgerEvent]:
        """Every charged event, of every job: what the accountant composes."""
        return [e.event for e in self.entries]

    @property
    def rounds(self) -> list[int]:
        """The training rounds (DP-SGD or Skellam) charged in the current job (its participations; once per release)."""
        return [e.round for e in self._mine() if e.mechanism in _TRAINING]

    @property
    def releases(self) -> list[str | None]:
        """The training release tags charged in the current job, in the order of `rounds`."""
        return [e.release for e in self._mine() if e.mechanism in _TRAINING]

    @property
    def evaluations(self) -> list[int]:
        """The rounds whose federated evaluation (a Gaussian release) is charged in the current job."""
        return [e.round for e in self._mine() if e.mechanism == GAUSSIAN]

    @property
    def jobs(self) -> list[str | None]:
        """The jobs with charged entries, in the order they were first charged."""
        return list(dict.fromkeys(e.job for e in self.entries))

    @property
    def epsilon(self) -> float:
        """Epsilon spent so far, over all jobs, at the ledger's delta."""
        return self.epsilon_of(self.events)

    @property
    def epsilon_own_share(self) -> float:
        """Epsilon spent if secure aggregation failed: each Skellam event counted with the client's own share only.

        Equal to `epsilon` when no Skellam event is charged (or none recorded `own_mu`).
        """
        if not any(isinstance(e, IntegerNoiseEvent) for e in self.events):
            return self.epsilon
        return self.epsilon_of(own_share_events(self.events))

    def epsilon_of(self, events: Sequence[LedgerEvent]) -> float:
        """Epsilon of `events` alone at this ledger's delta: its accountant, or RDP if a Skellam event is among them.

        A history mixing Gaussian and Skellam events is also bounded by basic composition of its two
        parts (the Gaussian part by the ledger's tight accountant at f delta, the Skellam part by RDP
        at (1 - f) delta, for f in 1/4, 1/2, 3/4); both bounds are sound, and the smaller is
        reported. This keeps a site that ran local-mode jobs from paying the loose RDP reading of
        its Gaussian history once it joins a distributed-mode job.
        """
        gaussian = _gaussian_only(events)
        if gaussian is not None:
            return self._accountant.epsilon(gaussian, self.delta)
        rdp = mixed_rdp_epsilon(list(events), self.delta, neighbouring=self.neighbouring)
        gaussian_part = [e for e in events if isinstance(e, DPSGDEvent)]
        if not gaussian_part:
            return rdp
        skellam_part = [e for e in events if isinstance(e, IntegerNoiseEvent)]
        basic = min(
            self._gaussian_epsilon(tuple(gaussian_part), f * self.delta)
            + mixed_rdp_epsilon(skellam_part, (1 - f) * self.delta, neighbouring=self.neighbouring)
            for f in (0.25, 0.5, 0.75)
        )
        return min(rdp, basic)

    def _gaussian_epsilon(self, events: tuple[DPSGDEvent, ...], delta: float) -> float:
        """The accountant's epsilon of a Gaussian history, memoised: a mixed history re-reads the same part often."""
        key = (events, delta)
        if key not in self._gaussian_cache:
            self._gaussian_cache[key] = self._accountant.epsilon(list(events), delta)
        return self._gaussian_cache[key]

    # -- charging --------------------------------------------------------------------------------

    def would_exceed(self, event: LedgerEvent) -> bool:
        """True if charging `event` would go past the budget (a client then sits the round out)."""
        return self.epsilon_of([*self.events, event]) > self.epsilon_budget

    def admit(self, planned: Sequence[LedgerEvent]) -> float:
        """Check, before any training, that a job's planned events fit the remaining budget.

        Returns:
            the epsilon the ledger would reach after all of `planned` (composed, not added).

        Raises:
            PrivacyBudgetExhaustedError: they would not fit; nothing was charged.
        """
        prospective = self.epsilon_of([*self.events, *planned])
        if prospective > self.epsilon_budget:
            raise PrivacyBudgetExhaustedError(
                f"{self._where()}: job {self.job!r} ({len(planned)} planned releases) would raise epsilon from "
                f"{self.epsilon:.3f} to {prospective:.3f}, over the {self._budget_name()} {self.epsilon_budget}; "
                "the job is refused before training (plan fewer rounds or more noise)",
                spent=self.epsilon,
                requested=prospective,
                budget=self.epsilon_budget,
            )
        return prospective

    def charge(
        self, round_number: int, event: LedgerEvent, *, release: str | None = None, mechanism: str = DP_SGD
    ) -> float:
        """Record one release of the current job and persist it; returns the new epsilon.

        `release` identifies what was released (a site-private tag of everything the update
        depends on), so that a re-request of the same release is told apart from a new release. A
        round may be charged more than once, once per distinct release: a second release of a round
        with other data or settings is a new DP output and costs its own epsilon. The tag only
        detects replays: it never opens a new budget. `mechanism` is `DP_SGD` (a joined round, with a
        `DPSGDEvent`), `SKELLAM` (a joined distributed-DP round, with an `IntegerNoiseEvent`) or
        `GAUSSIAN` (a federated evaluation, with a `DPSGDEvent`); all are composed into the same
        epsilon. `DP_SGD` and `SKELLAM` are both the round's training release, so a replay check
        compares them with each other.

        Raises:
            PrivacyBudgetExhaustedError: the event would exceed the budget; nothing changed.
            ValueError: this release (or, without a release tag, this round's release of this
                kind) is already charged, the mechanism is unknown, or the event does not fit it.
        """
        _check_event(mechanism, event)
        kind = _TRAINING if mechanism in _TRAINING else (mechanism,)
        if any(e.round == round_number and e.mechanism in kind
               and (release is None or e.release is None or e.release == release)
               for e in self._mine()):  # fmt: skip
            raise ValueError(f"round {round_number} (this release) is already charged to client {self.client}")
        prospective = self.epsilon_of([*self.events, event])
        if prospective > self.epsilon_budget:
            raise PrivacyBudgetExhaustedError(
                f"{self._where()}: round {round_number} would raise epsilon from {self.epsilon:.3f} to "
                f"{prospective:.3f}, over the {self._budget_name()} {self.epsilon_budget}; the client must sit "
                "this round out",
                spent=self.epsilon,
                requested=prospective,
                budget=self.epsilon_budget,
            )
        self.entries.append(LedgerEntry(self.job, round_number, event, release, mechanism))
        self._write()
        return prospective

    def absorb(self, entries: Sequence[LedgerEntry]) -> None:
        """Put older entries (a migrated single-run ledger's) before this ledger's own and persist.

        They count toward the epsilon from now on; nothing is checked against the budget, since
        that privacy was already spent.
        """
        self.entries = [*entries, *self.entries]
        self._write()

    def charged(self, round_number: int, release: str) -> bool:
        """True if this release of `round_number` is already charged in the current job."""
        return any(e.round == round_number and e.release == release for e in self._mine())

    # -- serialisation ---------------------------------------------------------------------------

    def to_dict(self, *, public: bool = False) -> dict[str, Any]:
        """The JSON form (also what `budget show` prints).

        `public` (what a run report receives) leaves out the site-private release tags and, for a
        lifetime ledger, the other jobs' entries: it lists this job's rounds and states the
        lifetime epsilon (composed over all jobs) and budget.
        """
        entries = self._mine() if public and self.job is not None else self.entries
        out: dict[str, Any] = {
            "version": _VERSION,
            "client": self.client,
            "epsilon_budget": self.lifetime_budget,
            "delta": self.delta if public else self.lifetime_delta,
            "accountant": self.accountant_name,
            "neighbouring": self.neighbouring,
        }
        if self.population is not None:
            out["population"] = self.population
        if public and self.job is not None:
            out["job"] = self.job
            out["lifetime_epsilon"] = self.epsilon
            out["jobs"] = len(self.jobs)
        out["events"] = [
            {
                "round": e.round,
                **e.event.model_dump(exclude_none=True),
                **({"mechanism": e.mechanism} if e.mechanism != DP_SGD else {}),
                **({"job": e.job} if e.job is not None and not public else {}),
                **({"release": e.release} if e.release is not None and not public else {}),
            }
            for e in entries
        ]
        return out

    def summary(self) -> dict[str, Any]:
        """Spending per job (each job's own epsilon) and the lifetime epsilon (all jobs composed)."""
        per_job: dict[str, list[LedgerEntry]] = {}
        for e in self.entries:
            per_job.setdefault(e.job or "(single-run ledger)", []).append(e)
        spent = self.epsilon
        gaussian = _gaussian_only(self.events)  # None: a Skellam event is charged, and `spent` is already RDP
        if gaussian is None or self.accountant_name == "rdp":
            spent_rdp = spent
        else:  # the loose reference, beside the tight one
            spent_rdp = make_accountant("rdp", neighbouring=self.neighbouring).epsilon(gaussian, self.delta)
        return {
            "path": str(self.path),
            "population": self.population,
            "accountant": self.accountant_name,
            "neighbouring": self.neighbouring,
            "delta": self.delta,
            "budget": self.lifetime_budget,
            "epsilon": spent,
            "epsilon_rdp": spent_rdp,
            "epsilon_own_share": spent if gaussian is not None else self.epsilon_own_share,
            "mechanisms": dict(Counter(e.mechanism for e in self.entries)),
            "remaining": max(0.0, self.lifetime_budget - spent),
            "jobs": [
                {
                    "job": job,
                    "rounds": [e.round for e in entries],
                    "releases": len(entries),
                    "epsilon_alone": self.epsilon_of([e.event for e in entries]),
                }
                for job, entries in per_job.items()
            ],
        }

    # -- internals -------------------------------------------------------------------------------

    def _mine(self) -> list[LedgerEntry]:
        if self.job is None:
            return list(self.entries)
        return [e for e in self.entries if e.job == self.job]

    def _where(self) -> str:
        if self.job is None:
            return f"client {self.client}"
        name = f" (population {self.population})" if self.population else ""
        return f"client {self.client}: site ledger {self.path}{name}"

    def _budget_name(self) -> str:
        return "budget" if self.job is None else "lifetime budget"

    def _write(self) -> None:
        atomic_write(self.path, json.dumps(self.to_dict(), indent=1).encode(), mode=0o600)


def _entry(raw: Any) -> LedgerEntry:
    if not isinstance(raw, dict):
        raise ValueError(f"an event must be a JSON object, found {raw!r}")
    job, release = raw.get("job"), raw.get("release")
    mechanism = _mechanism(raw.get("mechanism", DP_SGD))
    fields = {k: v for k, v in raw.items() if k not in _ENTRY_KEYS}
    return LedgerEntry(
        job=None if job is None else str(job),
        round=int(raw["round"]),
        event=IntegerNoiseEvent(**fields) if mechanism == SKELLAM else DPSGDEvent(**fields),
        release=None if release is None else str(release),
        mechanism=mechanism,
    )


def _gaussian_only(events: Sequence[LedgerEvent]) -> list[DPSGDEvent] | None:
    """`events` as Gaussian events, or None if any is a Skellam event (then the history is read by RDP)."""
    gaussian = [e for e in events if isinstance(e, DPSGDEvent)]
    return gaussian if len(gaussian) == len(events) else None


def _mechanism(raw: Any) -> str:
    if raw not in MECHANISMS:
        raise ValueError(f"unknown mechanism {raw!r} in a ledger entry (this program knows {list(MECHANISMS)})")
    return str(raw)


def _check_event(mechanism: str, event: object) -> None:
    """Refuse an unknown mechanism, or an event of the wrong kind for it (naming both)."""
    if mechanism not in MECHANISMS:
        raise ValueError(f"mechanism={mechanism!r}: a ledger entry is one of {list(MECHANISMS)}")
    expected = IntegerNoiseEvent if mechanism == SKELLAM else DPSGDEvent
    if not isinstance(event, expected):
        raise ValueError(
            f"event={type(event).__name__} does not fit mechanism={mechanism!r}: it records a {expected.__name__} "
            f"(charge an IntegerNoiseEvent with mechanism={SKELLAM!r}, a DPSGDEvent with {DP_SGD!r} or {GAUSSIAN!r})"
        )
