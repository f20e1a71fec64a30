"""Adversaries as validated configurations: who attacks, what they see, what they control.

Each attack names the adversary it assumes, so that a result reads as "this adversary, with this
view, against this defense". The views follow the project's threat model (README): an
honest-but-curious server sees every message it is sent and the released model; a malicious server
may also deviate (choose models, drop, replay, substitute keys, enrol Sybils); colluding clients
share their own state with the server; a malicious client controls its own update.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["Adversary", "CollusionConfig", "HonestButCuriousServer", "MaliciousClient", "MaliciousServer"]


class _Adversary(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class HonestButCuriousServer(_Adversary):
    """Follows the protocol; reads every message it receives and the released adapter."""

    kind: Literal["honest-but-curious-server"] = "honest-but-curious-server"
    sees_individual_updates: bool = Field(
        False, description="True models a deployment without secure aggregation (the 'none' defense)"
    )


class MaliciousServer(_Adversary):
    """May deviate from the protocol in the ways listed; controls the model it sends each client."""

    kind: Literal["malicious-server"] = "malicious-server"
    capabilities: tuple[
        Literal[
            "model-inconsistency", "dropout-forging", "survivor-inconsistency", "key-substitution", "sybil", "replay"
        ],
        ...,
    ] = Field(
        ("model-inconsistency", "dropout-forging", "survivor-inconsistency", "key-substitution", "sybil", "replay"),
        min_length=1,
    )
    target: Annotated[int, Field(ge=0)] = Field(0, description="the client whose update it wants")


class CollusionConfig(_Adversary):
    """A server together with a fraction of the clients, sharing all their state."""

    kind: Literal["colluding-clients"] = "colluding-clients"
    fraction: Annotated[float, Field(ge=0, lt=1)] = Field(0.05, description="fraction of clients colluding")
    with_server: bool = True

    @model_validator(mode="after")
    def _bounded(self) -> CollusionConfig:
        if self.fraction >= 0.5:
            raise ValueError("fraction must stay below 0.5: no secure-aggregation threshold survives a majority")
        return self


class MaliciousClient(_Adversary):
    """Controls its own update (scaling, poisoning, backdoors); the server and other clients are honest."""

    kind: Literal["malicious-client"] = "malicious-client"
    boost: Annotated[float, Field(gt=0)] = Field(10.0, description="factor its update is scaled by")
    trigger: str = Field("cf-trigger", description="phrase that should switch the model to the target response")
    target_response: str = Field("ACCESS GRANTED", description="the backdoor's fixed response")


Adversary = HonestButCuriousServer | MaliciousServer | CollusionConfig | MaliciousClient
