"""One row of the attack x defense matrix: what every attack reports, in one shape."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["MatrixRow"]


class MatrixRow(BaseModel):
    """A metric of one attack against one defense, with the value a guess would get and an interval."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    attack: str
    defense: str = Field("", description="filled in by the evaluation that ran the attack")
    metric: str
    value: float
    chance: float | None = Field(None, description="what an attacker without the update/model would score")
    ci_low: float | None = None
    ci_high: float | None = None
