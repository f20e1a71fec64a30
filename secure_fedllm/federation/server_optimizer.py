"""The server's optimiser for distributed DP-SGD: Adam on the released noisy gradients.

In distributed mode the clients release noisy gradient sums and the server takes the step, so the
optimiser lives here. It reads only released sums, so it is post-processing and costs no privacy.
Adam with torch's defaults (betas 0.9, 0.999, eps 1e-8) and `training.learning_rate`, the same
optimiser and step size a local-mode client runs, so that the two modes differ in where the noise
is added and not in how the steps are taken. Its state travels with the checkpoint, so a resumed
run continues the same trajectory.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = ["ServerAdam"]


class ServerAdam:
    """Adam over the flat global vector (float64 arithmetic, float32 state)."""

    def __init__(
        self,
        dimension: int,
        *,
        learning_rate: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        state: tuple[npt.NDArray[np.float32], npt.NDArray[np.float32], int] | None = None,
    ) -> None:
        self.learning_rate, self.betas, self.eps = learning_rate, betas, eps
        if state is None:
            state = (np.zeros(dimension, np.float32), np.zeros(dimension, np.float32), 0)
        first, second, steps = state
        if first.shape != (dimension,) or second.shape != (dimension,):
            raise ValueError(f"the optimiser state must hold two vectors of {dimension} values")
        self.first, self.second, self.steps = first.astype(np.float32), second.astype(np.float32), int(steps)

    def step(self, vector: npt.NDArray[np.float32], gradient: npt.NDArray[np.float64]) -> npt.NDArray[np.float32]:
        """The vector after one Adam step along `gradient` (descent)."""
        b1, b2 = self.betas
        g = np.asarray(gradient, dtype=np.float64)
        m = b1 * self.first.astype(np.float64) + (1 - b1) * g
        v = b2 * self.second.astype(np.float64) + (1 - b2) * g * g
        self.steps += 1
        m_hat = m / (1 - b1**self.steps)
        v_hat = v / (1 - b2**self.steps)
        self.first, self.second = m.astype(np.float32), v.astype(np.float32)
        update = self.learning_rate * m_hat / (np.sqrt(v_hat) + self.eps)
        return (vector.astype(np.float64) - update).astype(np.float32)

    def state(self) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32], int]:
        """(first moment, second moment, steps): what the checkpoint keeps."""
        return self.first, self.second, self.steps
