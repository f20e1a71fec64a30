"""Target epsilon to noise multiplier, with a documented tolerance (one function, no side effects)."""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

from scipy.optimize import brentq

from ..errors import ConfigError
from .accountants import Accountant
from .events import DPSGDEvent

__all__ = ["noise_for_epsilon"]

_MAX_NOISE = 1000.0


def noise_for_epsilon(
    target_epsilon: float,
    *,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: Accountant,
) -> float:
    """The smallest noise multiplier, to within 1e-6, whose epsilon is at most the target.

    Guarantee: epsilon(returned sigma) <= target_epsilon under `accountant` and its neighbouring
    relation (bisection keeps the upper end feasible), and sigma - 1e-6 would exceed it. The relation
    is part of the accountant (and of the cache key): a ``replace`` accountant calibrates for
    replace-one, which needs more noise than add/remove-one at the same target.

    Raises:
        ConfigError: if even sigma = 1000 cannot reach the target (the message gives that epsilon).
    """
    if target_epsilon <= 0:
        raise ConfigError(f"privacy.target_epsilon={target_epsilon} must be positive")
    return _calibrate(target_epsilon, delta, sample_rate, steps, accountant)


@lru_cache(maxsize=256)
def _calibrate(target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: Accountant) -> float:
    def eps(sigma: float) -> float:
        return accountant.epsilon([DPSGDEvent(noise_multiplier=sigma, sample_rate=sample_rate, steps=steps)], delta)

    def out_of_reach(best: float) -> ConfigError:
        return ConfigError(
            f"privacy.target_epsilon={target_epsilon} is out of reach: even noise {_MAX_NOISE} gives epsilon "
            f"{best:.3g} ({accountant.neighbouring}) at q={sample_rate}, {steps} steps, delta={delta}; raise the "
            "target or lower q or steps"
        )

    low, high = _bracket(eps, target_epsilon, out_of_reach)
    if low > 0.0:  # Brent's method finds the crossing in a handful of evaluations instead of ~30 bisections
        try:
            root = brentq(lambda s: eps(s) - target_epsilon, low, high, xtol=1e-7)
        except ValueError:  # no sign change seen numerically: fall back to bisection on the bracket
            root = high
        for candidate, below in ((root + 1e-6, root), (root + 2e-7, root - 8e-7)):
            if low <= below and candidate < high and eps(candidate) <= target_epsilon and eps(below) > target_epsilon:
                low, high = below, candidate
                break
    while high - low > 1e-6:  # bisection keeps the guarantee wherever Brent's bracket was not confirmed
        mid = (low + high) / 2
        if eps(mid) > target_epsilon:
            low = mid
        else:
            high = mid
    return high


def _bracket(
    eps: Callable[[float], float], target: float, out_of_reach: Callable[[float], ConfigError]
) -> tuple[float, float]:
    """(low, high) with eps(low) > target >= eps(high), by doubling or halving from sigma = 1 (low may be 0).

    Most calibrations land between 0.3 and 10, so this takes a few evaluations, not the ~11 of halving from 1000.
    """
    if eps(1.0) <= target:
        high = 1.0
        while high > 1e-3 and eps(high / 2) <= target:
            high /= 2
        return (high / 2 if high > 1e-3 else 0.0), high
    low = 1.0
    while low * 2 <= _MAX_NOISE:
        if eps(low * 2) <= target:
            return low, low * 2
        low *= 2
    best = eps(_MAX_NOISE)
    if best > target:
        raise out_of_reach(best)
    return low, _MAX_NOISE
