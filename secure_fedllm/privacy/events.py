"""What a client's DP release is, recorded independently of how it is accounted."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["DPSGDEvent"]


class DPSGDEvent(BaseModel):
    """`steps` DP-SGD steps with Poisson sampling at `sample_rate` and Gaussian noise.

    One event per joined round; the noise may differ between rounds, and the accountants compose
    such heterogeneous histories exactly as given.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    noise_multiplier: Annotated[float, Field(ge=0, allow_inf_nan=False)] = Field(
        description="noise std / clipping norm"
    )
    sample_rate: Annotated[float, Field(gt=0, le=1)] = Field(description="Poisson sampling probability q")
    steps: Annotated[int, Field(ge=1)] = Field(description="number of noisy steps")
