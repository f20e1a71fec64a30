"""Privacy accountants as small interchangeable classes behind one interface and a registry.

Both use Opacus' analysis through public functions: `rdp` is Rényi DP with Opacus' default orders
(Mironov 2017; Mironov, Talwar, Zhang 2019), `prv` the privacy-random-variable accountant (Gopi,
Lee, Wutschitz 2021, fed through its `step()` API), which is tighter. A zero noise multiplier has
no finite epsilon and is reported as infinity.

RDP composes additively, so `rdp` caches the one-step RDP curve of each (noise, sample rate) pair
and multiplies by the step count: this is exactly what Opacus' `RDPAccountant.get_epsilon` sums,
without recomputing the slow fractional orders for every ledger query and calibration step.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
from opacus.accountants import PRVAccountant as _OpacusPRV
from opacus.accountants import RDPAccountant as _OpacusRDP
from opacus.accountants.analysis import rdp as _rdp_analysis

from ..errors import ConfigError
from .events import DPSGDEvent

__all__ = ["ACCOUNTANTS", "Accountant", "PRVAccountant", "RDPAccountant", "make_accountant", "register_accountant"]


class Accountant(ABC):
    """Epsilon of a history of DP-SGD events at a given delta."""

    name: str

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and vars(self) == vars(other)

    def __hash__(self) -> int:
        return hash((type(self), tuple(sorted(vars(self).items()))))

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
        if any(e.noise_multiplier == 0 for e in events):
            return math.inf
        total = sum(e.steps * _one_step_rdp(e.noise_multiplier, e.sample_rate) for e in events)
        eps, _ = _rdp_analysis.get_privacy_spent(orders=_OpacusRDP.DEFAULT_ALPHAS, rdp=total, delta=delta)
        return float(eps)


@lru_cache(maxsize=4096)
def _one_step_rdp(noise_multiplier: float, sample_rate: float) -> np.ndarray:
    curve = _rdp_analysis.compute_rdp(
        q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=_OpacusRDP.DEFAULT_ALPHAS
    )
    curve.setflags(write=False)
    return curve


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
