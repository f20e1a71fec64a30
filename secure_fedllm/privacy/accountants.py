"""Privacy accountants as small interchangeable classes behind one interface and a registry.

Both wrap Opacus' analysis through its public `step()` API (never by assigning its history):
`rdp` is Rényi DP with Opacus' default orders (Mironov 2017; Mironov, Talwar, Zhang 2019), `prv`
the privacy-random-variable accountant (Gopi, Lee, Wutschitz 2021), which is tighter. A zero noise
multiplier has no finite epsilon and is reported as infinity.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence

from opacus.accountants import PRVAccountant as _OpacusPRV
from opacus.accountants import RDPAccountant as _OpacusRDP

from ..errors import ConfigError
from .events import DPSGDEvent

__all__ = ["ACCOUNTANTS", "Accountant", "PRVAccountant", "RDPAccountant", "make_accountant", "register_accountant"]


class Accountant(ABC):
    """Epsilon of a history of DP-SGD events at a given delta."""

    name: str

    @abstractmethod
    def epsilon(self, events: Sequence[DPSGDEvent], delta: float) -> float:
        """The (epsilon, delta)-DP epsilon of composing `events`; 0 for an empty history."""


def _feed(target: _OpacusRDP | _OpacusPRV, events: Sequence[DPSGDEvent]) -> bool:
    """Replay events through Opacus' public API; False if any has zero noise."""
    for event in events:
        if event.noise_multiplier == 0:
            return False
        for _ in range(event.steps):
            target.step(noise_multiplier=event.noise_multiplier, sample_rate=event.sample_rate)
    return True


class RDPAccountant(Accountant):
    """Rényi DP over Opacus' default orders."""

    name = "rdp"

    def epsilon(self, events: Sequence[DPSGDEvent], delta: float) -> float:
        """See `Accountant.epsilon`."""
        if not events:
            return 0.0
        accountant = _OpacusRDP()
        if not _feed(accountant, events):
            return math.inf
        return float(accountant.get_epsilon(delta))


class PRVAccountant(Accountant):
    """Privacy random variables (numerical composition; epsilon error 0.01 by default)."""

    name = "prv"

    def __init__(self, eps_error: float = 0.01) -> None:
        self.eps_error = eps_error

    def epsilon(self, events: Sequence[DPSGDEvent], delta: float) -> float:
        """See `Accountant.epsilon`."""
        if not events:
            return 0.0
        accountant = _OpacusPRV()
        if not _feed(accountant, events):
            return math.inf
        return float(accountant.get_epsilon(delta, eps_error=self.eps_error))


ACCOUNTANTS: dict[str, type[Accountant]] = {}


def register_accountant(name: str, cls: type[Accountant], *, force: bool = False) -> None:
    """Make an accountant available by name; refuses to replace one unless `force`."""
    if not name.isidentifier() or not name.islower():
        raise ValueError(f"accountant name {name!r} must be a lower-case identifier")
    if name in ACCOUNTANTS and not force:
        raise ValueError(f"accountant {name!r} is already registered; pass force=True to replace it")
    ACCOUNTANTS[name] = cls


def make_accountant(name: str) -> Accountant:
    """A fresh accountant by registered name.

    Raises:
        ConfigError: for an unknown name (naming the known ones).
    """
    if name not in ACCOUNTANTS:
        raise ConfigError(f"privacy.accountant={name!r} is unknown; choose one of {sorted(ACCOUNTANTS)}")
    return ACCOUNTANTS[name]()


register_accountant("rdp", RDPAccountant)
register_accountant("prv", PRVAccountant)
