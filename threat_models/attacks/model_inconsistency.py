"""Model inconsistency: a malicious server isolates one client's update inside a secure sum.

Pasquini, Francati and Ateniese (CCS 2022): the server sends the target client the real model and
every other client a model whose update is zero (here: A0 = 0 in FFA-LoRA, so the adapter's output
and every B gradient vanish), then runs secure aggregation honestly. The "sum" is the target's
update, and every attack on individual updates applies.

Our defense is the round plan: its digest (base-model, A0, adapter-config and manifest hashes, and
every participant's DP settings) is the protocol context, which salts every key derivation. Clients
shown different plans derive keys that do not match: share decryption fails and the round aborts,
or the masks do not cancel; either way the server learns nothing about the target. The weakened
configuration, the control, binds nothing (every party uses the same empty context), as a protocol
without transcript binding would.

The round runs on the real `protocols` sessions over the in-process driver; the clients' updates
are those the model each was sent would produce: the target's real update, and (without DP) zeros
for the rest, or their DP noise alone with DP.
"""

from __future__ import annotations

import hashlib
from typing import Annotated

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field

from protocols import ProtocolError, SecAggParams, run_round

from ..errors import AttackConfigError
from ..results import MatrixRow
from ._relay import require_client

__all__ = ["ModelInconsistency", "ModelInconsistencyConfig", "ModelInconsistencyResult"]


class ModelInconsistencyConfig(BaseModel):
    """The round the server manipulates."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    num_clients: Annotated[int, Field(ge=3, le=1000)] = 5
    target: Annotated[int, Field(ge=0)] = 0
    clip_range: Annotated[float, Field(gt=0)] = 0.1
    protocol: str = Field("secagg+", pattern="^(secagg|secagg\\+)$")


class ModelInconsistencyResult(BaseModel):
    """What the server got: the cosine of its 'sum' with the target's update, or an abort."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    bound: bool = Field(description="True: our transcript binding; False: the weakened control")
    aborted: bool
    cosine: float = Field(description="cos(server's result, target update); 0 when aborted")
    relative_error: float = Field(description="||result - target|| / ||target||; inf when aborted")
    reason: str = ""

    def rows(self) -> list[MatrixRow]:
        """Matrix rows: the cosine the server reaches (chance 0)."""
        return [MatrixRow(attack="model_inconsistency", metric="cosine_with_target", value=self.cosine, chance=0.0)]


class ModelInconsistency:
    """Run the isolation attack against the bound protocol or the weakened control."""

    def __init__(self, config: ModelInconsistencyConfig | None = None) -> None:
        self.config = config or ModelInconsistencyConfig()
        require_client("target", self.config.target, self.config.num_clients)

    def run(
        self,
        target_update: npt.NDArray[np.floating],
        *,
        bound: bool,
        other_updates: list[npt.NDArray[np.floating]] | None = None,
    ) -> ModelInconsistencyResult:
        """Aggregate the target's real update with the others' (zero, or noise-only) updates.

        Args:
            target_update: the update the target computes on the real model.
            bound: True runs our protocol (plan digest as context, differing per model sent); False
                runs the weakened control (no binding).
            other_updates: what the others send on the A0 = 0 model (default zeros; with DP, their noise).
        """
        cfg = self.config
        n, d = cfg.num_clients, len(target_update)
        others = other_updates if other_updates is not None else [np.zeros(d) for _ in range(n - 1)]
        if len(others) != n - 1:
            raise AttackConfigError(f"other_updates needs {n - 1} vectors (one per non-target client)")
        inputs = list(others)
        inputs.insert(cfg.target, np.asarray(target_update, dtype=np.float64))
        make = SecAggParams.secagg if cfg.protocol == "secagg" else SecAggParams.secagg_plus
        params = make(n, dimension=d, clip_range=cfg.clip_range, dropout_rate=0.1, corrupt_fraction=0.05)
        real = hashlib.sha256(b"plan with the real A0").digest()
        zeroed = hashlib.sha256(b"plan with A0 = 0").digest()
        contexts = [real if p == cfg.target else zeroed for p in range(n)] if bound else [b""] * n
        try:
            report = run_round(params, inputs, party_contexts=contexts, context=contexts[cfg.target])
        except ProtocolError as exc:
            return ModelInconsistencyResult(
                bound=bound, aborted=True, cosine=0.0, relative_error=float("inf"), reason=type(exc).__name__
            )
        result = np.asarray(report.result.decoded.weighted_sum)
        target = np.clip(np.asarray(target_update, dtype=np.float64), -cfg.clip_range, cfg.clip_range)
        denominator = float(np.linalg.norm(result) * np.linalg.norm(target)) or 1.0
        return ModelInconsistencyResult(
            bound=bound,
            aborted=False,
            cosine=float(result @ target) / denominator,
            relative_error=float(np.linalg.norm(result - target) / (np.linalg.norm(target) or 1.0)),
        )
