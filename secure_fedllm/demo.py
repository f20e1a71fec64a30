"""The secure-aggregation demo: one round over n simulated clients, with dropouts.

Until federated fine-tuning lands this is the project's main job. The update size defaults to that
of a rank-16 LoRA adapter on the q and v projections of the embedded SmolLM2-135M (30 layers,
hidden size 576, key/value size 192), so the numbers are those a real round would see. Updates are
drawn from N(0, sigma^2) and clipped at 7 sigma; the demo checks the revealed sum against the exact
float sum of the survivors' clipped updates.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from protocols import SecAggParams, run_round

from .errors import ConfigError

__all__ = ["SMOLLM2_QV_LORA_R16", "DemoConfig", "run_demo"]

SMOLLM2_QV_LORA_R16 = 30 * ((576 * 16 + 16 * 576) + (576 * 16 + 16 * 192))
"""Parameters of a rank-16 q_proj + v_proj LoRA adapter on SmolLM2-135M (921,600)."""


@dataclass(frozen=True)
class DemoConfig:
    """What the demo runs."""

    clients: int = 20
    dimension: int = SMOLLM2_QV_LORA_R16
    protocol: str = "secagg+"
    dropout: float = 0.1
    sigma: float = 1e-3
    seed: int = 0

    def validate(self) -> None:
        """Raise ConfigError naming the bad field."""
        if self.clients < 3:
            raise ConfigError(
                f"demo --clients={self.clients}: secure aggregation needs at least 3 clients; pass --clients 3 or more"
            )
        if self.dimension < 1:
            raise ConfigError(f"dimension={self.dimension}: must be positive")
        if self.protocol not in ("secagg", "secagg+"):
            raise ConfigError(f"protocol={self.protocol!r}: choose 'secagg' or 'secagg+'")
        if not 0 <= self.dropout < 0.5:
            raise ConfigError(f"dropout={self.dropout}: must be in [0, 0.5)")


def run_demo(config: DemoConfig, *, out: list[str] | None = None) -> dict[str, float]:
    """Run the demo; return its figures (and append printable lines to `out`)."""
    config.validate()
    lines = out if out is not None else []
    n, d = config.clients, config.dimension
    factory = SecAggParams.secagg if config.protocol == "secagg" else SecAggParams.secagg_plus
    params = factory(n, dimension=d, clip_range=7 * config.sigma, dropout_rate=config.dropout)
    rng = np.random.default_rng(config.seed)
    inputs = [rng.normal(0.0, config.sigma, d) for _ in range(n)]
    dropped = math.floor(config.dropout * n)
    drop_at = {int(p): 2 for p in rng.choice(n, size=dropped, replace=False)}  # silent after sharing keys
    lines.append(
        f"{config.protocol}: n={n} clients, d={d:,} parameters, k={params.neighbours} neighbours, "
        f"t={params.threshold}, security failure probability "
        + ("0 (bounds hold outright)" if params.failure_log2[0] == -math.inf else f"<= 2^{params.failure_log2[0]:.0f}")
        + ("  [INSECURE]" if params.insecure else "")
    )
    lines.append(f"dropping {dropped} clients after key sharing: {sorted(drop_at)}")
    secure = run_round(params, inputs, drop_at=drop_at, clock=time.perf_counter)
    survivors = secure.result.included
    truth = np.sum(
        [np.clip(inputs[p], -params.encoding.clip_range, params.encoding.clip_range) for p in survivors], axis=0
    )
    decoded = secure.result.decoded
    max_err = float(np.abs(decoded.weighted_sum - truth).max())
    rel = float(np.linalg.norm(decoded.weighted_sum - truth) / np.linalg.norm(truth))
    client_s = float(np.median([secure.client_seconds[p] for p in survivors]))
    up = float(np.median([secure.upload_bytes[p] for p in survivors])) / d
    lines.append(
        f"sum revealed over {len(survivors)} survivors (total weight {decoded.total_weight:.1f}); "
        f"dropped: {list(secure.result.dropped)}"
    )
    lines.append(f"  first coordinates: {np.round(decoded.weighted_sum[:4], 6).tolist()}")
    lines.append(f"  max abs error {max_err:.1e} <= bound {decoded.max_abs_error:.1e}; relative L2 error {rel:.1e}")
    lines.append(f"client: {client_s * 1e3:.1f} ms median per round, upload {up:.3f} bytes/parameter")
    lines.append(f"server: {secure.server_seconds * 1e3:.1f} ms for the round")
    return {"client_s": client_s, "server_s": secure.server_seconds, "rel_l2_error": rel, "upload_bytes_per_param": up}
