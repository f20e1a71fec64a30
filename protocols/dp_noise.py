"""Integer noise for distributed DP, drawn from the CSPRNG: discrete Gaussian and Skellam samplers.

Distributed DP adds its noise inside secure aggregation, in the integer ring the masks live in, so
each client's share must be an integer and its randomness must be as unpredictable as a mask seed:
the server that sums the shares must not be able to reproduce or bias any of them. These samplers
therefore draw every uniform from the injected `SecretSource` (os.urandom by default), never from
numpy's or torch's generators, and use no floating point after their table is built: a sample is
an integer index found by comparing a 63-bit uniform integer with an integer cumulative table, so
the floating-point precision attacks on textbook Gaussian and Laplace samplers (Mironov 2012; Jin
et al. 2022) have no low-order bits to read.

Exactness. Each sampler draws exactly from its integer table: weights w_k = floor(p_k 2^63) over a
support of 15 standard deviations each side, with the rounding residue given to the mode so that
the weights sum to 2^63. The table deviates from the true distribution by at most
`total_variation_bound` in total variation: the tail mass beyond the support (below 2^-100) plus
the rounding (2^-52 from float64 log-pmfs, plus 2^-63 per entry). Whoever accounts the noise adds
this bound to delta; at the sizes used here it is about 2e-16. Skellam is the difference of two
exact Poisson table draws (twice the bound), never a Bessel-function table.

Speed: one `searchsorted` of n uniforms in a table of about 30 sigma entries; 1e6 coordinates take
well under a second on one core (tests/protocols/test_dp_noise.py checks the rate loosely;
benchmarks measure it).
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from .errors import LocalProtocolError
from .randomness import OsRandom, SecretSource

__all__ = ["DiscreteGaussianSampler", "IntegerNoiseSampler", "PoissonSampler", "SkellamSampler"]

_PRECISION_BITS = 63
_TAIL_SIGMAS = 15.0
"""Support half-width in standard deviations: exp(-15^2 / 2) < 2^-160, so the dropped tail is < 2^-100."""
_MAX_TABLE = 1 << 24
"""Largest table (entries) a sampler builds: sigma up to about 5e5 quantization steps."""


class IntegerNoiseSampler:
    """Samples an integer distribution from its 63-bit cumulative table, with CSPRNG uniforms.

    Built from the unnormalised log-pmf on `offset`, `offset` + 1, ...; subclasses supply it.
    """

    name: str = "integer"

    def __init__(self, offset: int, log_pmf: npt.NDArray[np.float64]) -> None:
        if log_pmf.ndim != 1 or len(log_pmf) == 0 or len(log_pmf) > _MAX_TABLE:
            raise LocalProtocolError(f"log_pmf must be a 1-D table of 1..{_MAX_TABLE} entries")
        probabilities = np.exp(log_pmf - log_pmf.max())
        probabilities /= probabilities.sum()
        weights = np.floor(probabilities * float(1 << _PRECISION_BITS)).astype(np.uint64)
        residue = (1 << _PRECISION_BITS) - int(weights.sum(dtype=np.uint64))
        mode = int(np.argmax(probabilities))
        weights[mode] = np.uint64(int(weights[mode]) + residue)  # now they sum to exactly 2^63 (residue may be < 0)
        self.offset = offset
        self._cumulative = np.cumsum(weights, dtype=np.uint64)
        if int(self._cumulative[-1]) != 1 << _PRECISION_BITS:
            raise LocalProtocolError("the integer table does not sum to 2^63 (internal error)")
        self.total_variation_bound = float(2.0**-100 + 2.0**-52 + (len(weights) + abs(residue)) * 2.0**-_PRECISION_BITS)
        """Total-variation distance from the ideal distribution (tail + rounding): add it to delta."""

    def sample(self, n: int, *, rng: SecretSource | None = None) -> npt.NDArray[np.int64]:
        """Draw n independent values, as int64, from 8n bytes of `rng` (os.urandom by default)."""
        if n < 0:
            raise LocalProtocolError(f"n={n} must be non-negative")
        source = rng if rng is not None else OsRandom()
        words = np.frombuffer(source.token_bytes(8 * n), dtype="<u8") >> np.uint64(64 - _PRECISION_BITS)
        index = np.searchsorted(self._cumulative, words, side="right")
        return index.astype(np.int64) + self.offset

    def pmf(self) -> dict[int, float]:
        """The table's own probabilities (what `sample` draws from exactly), for tests and audits."""
        weights = np.diff(self._cumulative, prepend=np.uint64(0)).astype(np.float64) / float(1 << _PRECISION_BITS)
        return {k + self.offset: float(w) for k, w in enumerate(weights)}


class DiscreteGaussianSampler(IntegerNoiseSampler):
    """N_Z(0, sigma^2): P(k) proportional to exp(-k^2 / (2 sigma^2)) (Canonne, Kamath, Steinke 2020).

    Its variance is slightly below sigma^2 and a sum of independent discrete Gaussians is not a
    discrete Gaussian: the accountant uses the sum's own bound (Kairouz, Liu, Steinke 2021).
    """

    name = "discrete_gaussian"

    def __init__(self, sigma: float) -> None:
        if not (math.isfinite(sigma) and sigma > 0):
            raise LocalProtocolError(f"sigma={sigma} must be a positive finite number of quantization steps")
        self.sigma = float(sigma)
        half = _half_width(sigma)
        k = np.arange(-half, half + 1, dtype=np.float64)
        super().__init__(-half, -(k * k) / (2.0 * sigma * sigma))


class PoissonSampler(IntegerNoiseSampler):
    """Poisson(mu) on [mu - 15 sqrt(mu), mu + 15 sqrt(mu)] (log-pmf from lgamma, no series)."""

    name = "poisson"

    def __init__(self, mu: float) -> None:
        if not (math.isfinite(mu) and mu > 0):
            raise LocalProtocolError(f"mu={mu} must be positive and finite")
        self.mu = float(mu)
        spread = _TAIL_SIGMAS * math.sqrt(mu) + 10.0
        low, high = max(0, math.floor(mu - spread)), math.ceil(mu + spread)
        if high - low + 1 > _MAX_TABLE:
            raise LocalProtocolError(f"mu={mu:.4g} needs a table of {high - low + 1} entries (max {_MAX_TABLE})")
        j = np.arange(low, high + 1, dtype=np.float64)
        # log j! = lgamma(low + 1) + running sum of log j: the span is short, so the sum stays accurate
        log_factorial = math.lgamma(low + 1) + np.concatenate([[0.0], np.cumsum(np.log(j[1:]))])
        super().__init__(low, j * math.log(mu) - mu - log_factorial)


class SkellamSampler:
    """Skellam(mu, mu) = Poisson(mu) - Poisson(mu): variance 2 mu, closed under sums (Agarwal, Kairouz, Liu 2021).

    The sum of the clients' Skellam(mu_i) shares is exactly Skellam(sum mu_i), so the noise in the
    released sum is known exactly, whoever dropped. Two Poisson draws per coordinate (16 bytes).
    """

    name = "skellam"

    def __init__(self, mu: float) -> None:
        self.mu = float(mu)
        self._poisson = PoissonSampler(mu)
        self.total_variation_bound = 2 * self._poisson.total_variation_bound

    def sample(self, n: int, *, rng: SecretSource | None = None) -> npt.NDArray[np.int64]:
        """Draw n independent values, as int64, from 16n bytes of `rng` (os.urandom by default)."""
        source = rng if rng is not None else OsRandom()
        return self._poisson.sample(n, rng=source) - self._poisson.sample(n, rng=source)


def _half_width(sigma: float) -> int:
    width = math.ceil(_TAIL_SIGMAS * sigma) + 1
    if 2 * width + 1 > _MAX_TABLE:
        raise LocalProtocolError(
            f"sigma={sigma:.4g} quantization steps needs a table of {2 * width + 1} entries (max {_MAX_TABLE}); "
            "use a coarser quantization step for the noise"
        )
    return width
