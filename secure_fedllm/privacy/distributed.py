"""Distributed DP-SGD: record-level noise split among the clients, drawn as integers inside secure aggregation.

Why. In local mode every client noises its own update for the whole guarantee, so the released sum
of n updates carries about sqrt(n) times the noise one central DP-SGD run needs. Here (`privacy.mode
= "distributed"`) each DP-SGD step is one secure-aggregation round, and each client adds only a
share of the noise: the shares of the honest survivors add up to the central noise, and secure
aggregation makes sure nobody sees a share alone.

One step at client i (every parameter public and equal at every client, `DistributedDP`):

1. Poisson-sample its units at the common rate q (no batch size, per client or in total, is
   released or enters the sum).
2. For each sampled unit u: clip its gradient to L2 norm C, scale by s (ring units per unit of
   gradient, a power of two), and round with conditional randomized rounding (Kairouz, Liu,
   Steinke, ICML 2021, Sec. 4): each coordinate to floor or ceil with the probability that keeps it
   unbiased, redrawn until ||r_u||_2 <= l2 with
   l2^2 = s^2 C^2 + d/4 + sqrt(2 ln(1/beta)) (s C + sqrt(d)/2). Whatever the draws, one unit moves
   the sum by at most l2 in L2 and by at most l1 = min(l2^2, sqrt(d) l2) in L1 (integer vectors:
   |x|_1 <= |x|_2^2). The rounding randomness needs no secrecy: the bound holds for every draw.
3. z_i = sum_u r_u + Skellam(mu / h) per coordinate, drawn by `protocols.dp_noise.SkellamSampler`
   from a ChaCha20 keystream under the release's secret seed. z_i goes into SecAgg as an integer
   ring input (`protocols.FixedPointEncoding.encode_ring`), reduced mod 2^b and never clipped.

The server reads the exact ring sum: sum_units r_u + Skellam(mu n'/h) for n' included clients (a sum
of Skellams is Skellam, Agarwal, Kairouz, Liu, NeurIPS 2021), and divides by the public constant
s q sum(N_i) (`DistributedDP.gradient`). Wrap-around mod 2^b is post-processing of the sum and
costs no privacy; its probability is an accuracy term (`DistributedDP.wrap_probability`).

Whom the guarantee holds against. Noise shares are calibrated for h = n - n_C - d_max honest
survivors (n_C colluding clients and d_max dropouts, both from the site's own policy): with at
least n - d_max inputs in the sum, at least h honest shares are in it, so the sum carries at least
Skellam(mu), the epsilon every client charges (`IntegerNoiseEvent.mu`). Each site's
`protocols.SecurityPolicy(distributed_noise=True)` enforces n - d_max: full SecAgg only (a SecAgg+
server learns sums over groups of honest survivors, so distributed mode refuses it) with threshold
t >= n - d_max, every client aborting at UNMASK below it. If secure aggregation fails (a client's
masked input is unmasked), its own share Skellam(mu / h) is all that protects its records: the
ledger records that epsilon too (`IntegerNoiseEvent.own_mu`). No amplification is claimed from
the server's choice of clients.
"""

from __future__ import annotations

import math
from typing import Annotated, Any

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field

from protocols import SecretSource, SkellamSampler

from ..errors import ConfigError
from .integer_noise import IntegerNoiseEvent, skellam_mu_for_epsilon

__all__ = ["DistributedDP", "calibrate_distributed", "decode_gradient", "ring_scale"]

DEFAULT_BETA = math.exp(-0.5)
"""Conditional rounding's failure probability bound per draw (the value TFF's distributed DP used)."""

_MAX_ROUNDING_DRAWS = 1000


def ring_scale(clip: float, dimension: int) -> float:
    """s: the smallest power of two with s C >= max(5 sqrt(d), 256).

    Rounding adds about d/4 to a unit's squared norm s^2 C^2; at s C >= 5 sqrt(d) that is at most 1%,
    so the rounded sensitivity l2 stays within about 1% of s C.
    """
    if not (math.isfinite(clip) and clip > 0):
        raise ConfigError(f"privacy.max_grad_norm={clip!r} must be finite and > 0")
    if dimension < 1:
        raise ConfigError(f"dimension={dimension} must be >= 1")
    target = max(5.0 * math.sqrt(dimension), 256.0) / clip
    return float(2.0 ** math.ceil(math.log2(target)))


class DistributedDP(BaseModel):
    """The public parameters of distributed record-level DP-SGD; every party derives the same ones.

    `mu` is the central Skellam parameter guaranteed in every released sum (h honest shares of
    `share_mu` each); a client's own share alone is `share_mu`.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    clip: Annotated[float, Field(gt=0, allow_inf_nan=False)] = Field(description="C: L2 bound of one unit's gradient")
    scale: Annotated[float, Field(gt=0, allow_inf_nan=False)] = Field(description="s: ring units per gradient unit")
    dimension: Annotated[int, Field(ge=1)] = Field(description="d: length of the aggregated vector")
    sample_rate: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)] = Field(description="common Poisson rate q")
    parties: Annotated[int, Field(ge=1)] = Field(description="n: clients of the round the shares are sized for")
    honest: Annotated[int, Field(ge=1)] = Field(description="h = n - n_C - d_max: honest shares every sum holds")
    mu: Annotated[float, Field(gt=0, allow_inf_nan=False)] = Field(description="central Skellam parameter")
    beta: Annotated[float, Field(gt=0, lt=1)] = Field(DEFAULT_BETA, description="conditional rounding bound")
    ring_bits: int = Field(32, description="b: the secure-aggregation ring Z_(2^b)")

    @property
    def l2(self) -> float:
        """L2 sensitivity of one unit after scaling and conditional rounding, in ring units."""
        sc, d = self.scale * self.clip, float(self.dimension)
        return math.sqrt(sc * sc + d / 4 + math.sqrt(2 * math.log(1 / self.beta)) * (sc + math.sqrt(d) / 2))

    @property
    def l1(self) -> float:
        """L1 sensitivity of one rounded unit: |x|_1 <= min(|x|_2^2, sqrt(d) |x|_2) for an integer vector."""
        return min(self.l2**2, math.sqrt(self.dimension) * self.l2)

    @property
    def share_mu(self) -> float:
        """Each client's own Skellam parameter: mu / h."""
        return self.mu / self.honest

    @property
    def noise_multiplier(self) -> float:
        """Std of the guaranteed central noise over the sensitivity (comparable to DP-SGD's sigma)."""
        return math.sqrt(2 * self.mu) / self.l2

    @property
    def share_noise_multiplier(self) -> float:
        """The same for one client's share alone (sigma / sqrt(h))."""
        return math.sqrt(2 * self.share_mu) / self.l2

    def event(self, steps: int = 1) -> IntegerNoiseEvent:
        """What `steps` released sums cost every client (central mu; own_mu: its share alone)."""
        return IntegerNoiseEvent(
            mu=self.mu,
            l1=self.l1,
            l2=self.l2,
            sample_rate=self.sample_rate,
            steps=steps,
            own_mu=self.share_mu,
            parties=self.parties,
            honest=self.honest,
        )

    def for_round(self, *, parties: int, honest: int, sample_rate: float | None = None) -> DistributedDP:
        """The same central noise for a round of `parties` clients of which `honest` are guaranteed.

        Fewer guaranteed honest shares means a larger share each: mu stays, share_mu = mu / honest.

        Raises:
            ConfigError: no honest share is guaranteed (honest < 1).
        """
        if honest < 1:
            raise ConfigError(
                f"a round of {parties} clients guarantees no honest noise share (n - n_C - d_max = {honest}); "
                "lower secure_aggregation.corrupt_fraction or dropout_rate, or run larger rounds"
            )
        return self.model_copy(
            update={"parties": parties, "honest": honest, "sample_rate": sample_rate or self.sample_rate}
        )

    # -- the client's step ---------------------------------------------------------------------

    def quantize(self, per_unit: npt.NDArray[np.floating], rounding: np.random.Generator) -> npt.NDArray[np.int64]:
        """Clip each row to C, scale by s, round conditionally, and return the integer sum over rows.

        Raises:
            ValueError: a row is not finite, has the wrong length, or cannot be rounded within the
                bound after many draws (which the bound makes vanishingly unlikely).
        """
        g = np.asarray(per_unit, dtype=np.float64)
        if g.ndim != 2 or g.shape[1] != self.dimension:
            raise ValueError(f"per-unit gradients must have shape (units, {self.dimension}), got {g.shape}")
        total = np.zeros(self.dimension, dtype=np.int64)
        if g.shape[0] == 0:
            return total
        if not np.isfinite(g).all():
            raise ValueError("a per-unit gradient holds NaN or infinity; nothing is released")
        norms = np.linalg.norm(g, axis=1)
        factors = self.scale * np.minimum(1.0, self.clip / np.maximum(norms, 1e-300))
        bound2 = self.l2**2
        for row, factor in zip(g, factors, strict=True):
            x = row * factor
            low = np.floor(x)
            frac = x - low
            for _ in range(_MAX_ROUNDING_DRAWS):
                r = low + (rounding.random(self.dimension) < frac)
                if float(np.dot(r, r)) <= bound2:
                    break
            else:
                raise ValueError(f"conditional rounding found no draw within l2={self.l2:.1f} in {_MAX_ROUNDING_DRAWS}")
            total += r.astype(np.int64)
        return total

    def noise_share(self, rng: SecretSource) -> npt.NDArray[np.int64]:
        """This client's Skellam(share_mu) noise, one value per coordinate, from the secret source `rng`."""
        return SkellamSampler(self.share_mu).sample(self.dimension, rng=rng)

    def contribution(
        self, per_unit: npt.NDArray[np.floating], *, rounding: np.random.Generator, noise: SecretSource
    ) -> npt.NDArray[np.int64]:
        """z_i = the rounded units' sum plus this client's noise share: the integer vector it masks."""
        return self.quantize(per_unit, rounding) + self.noise_share(noise)

    # -- the server's decoding -----------------------------------------------------------------

    def gradient(self, signed_sum: npt.NDArray[np.integer], total_units: int) -> npt.NDArray[np.float64]:
        """The noisy gradient estimate: the decoded sum over s q sum(N_i), with public constants only.

        Raises:
            ValueError: a sum of the wrong length, or no units.
        """
        values = np.asarray(signed_sum)
        if values.shape != (self.dimension,):
            raise ValueError(f"the sum must have {self.dimension} values, got shape {values.shape}")
        return decode_gradient(values, scale=self.scale, sample_rate=self.sample_rate, total_units=total_units)

    def wrap_probability(self, total_units: int, parties: int | None = None) -> float:
        """An upper bound on the probability that some coordinate of a released sum wraps mod 2^b.

        Union bound over coordinates of: the sampled count exceeding m + a (Bernstein, m = q sum N_i,
        a = 20 sqrt(m) + 20), or the Skellam noise of `parties` shares exceeding what is left of
        2^(b-1) after (m + a) units of at most s C + 1 each (Bernstein for a difference of Poissons).
        """
        m = self.sample_rate * total_units
        a = 20 * math.sqrt(m) + 20
        count_tail = math.exp(-(a * a) / (2 * (m + a / 3)))
        room = 2.0 ** (self.ring_bits - 1) - (m + a) * (self.scale * self.clip + 1)
        if room <= 0:
            return 1.0
        variance = 2 * self.share_mu * (parties or self.parties)
        noise_tail = 2 * math.exp(-(room * room) / (2 * (variance + room / 3)))
        return min(1.0, self.dimension * (count_tail + noise_tail))

    def describe(self) -> dict[str, Any]:
        """The parameters and their derived figures, for reports."""
        return {
            **self.model_dump(),
            "l2": self.l2,
            "l1": self.l1,
            "share_mu": self.share_mu,
            "noise_multiplier": self.noise_multiplier,
            "share_noise_multiplier": self.share_noise_multiplier,
        }


def decode_gradient(
    signed_sum: npt.NDArray[np.integer], *, scale: float, sample_rate: float, total_units: int
) -> npt.NDArray[np.float64]:
    """Sum / (s q sum(N_i)): the server's noisy gradient estimate from public constants only.

    Raises:
        ValueError: no units to divide by.
    """
    if total_units < 1:
        raise ValueError(f"total_units={total_units} must be >= 1")
    return np.asarray(signed_sum).astype(np.float64) / (scale * sample_rate * total_units)


def calibrate_distributed(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    clip: float,
    dimension: int,
    parties: int,
    corrupt: int,
    dropouts: int,
    neighbouring: str = "replace",
    ring_bits: int = 32,
) -> DistributedDP:
    """The parameters whose `steps` released sums stay within `target_epsilon` with h honest shares.

    mu is the smallest (to within 1%) central Skellam parameter whose Poisson-subsampled RDP,
    composed over `steps` and converted at `delta`, meets the target (`skellam_mu_for_epsilon`).

    Raises:
        ConfigError: no honest share is guaranteed, or a parameter is out of range (named).
    """
    honest = parties - corrupt - dropouts
    if honest < 1:
        raise ConfigError(
            f"{parties} clients with n_C={corrupt} colluding and d_max={dropouts} dropouts leave no honest noise "
            "share; lower secure_aggregation.corrupt_fraction or dropout_rate, or add clients"
        )
    base = DistributedDP(
        clip=clip,
        scale=ring_scale(clip, dimension),
        dimension=dimension,
        sample_rate=sample_rate,
        parties=parties,
        honest=honest,
        mu=1.0,
        ring_bits=ring_bits,
    )
    mu = skellam_mu_for_epsilon(
        target_epsilon,
        delta=delta,
        sample_rate=sample_rate,
        steps=steps,
        l1=base.l1,
        l2=base.l2,
        neighbouring=neighbouring,
    )
    return base.model_copy(update={"mu": mu})
