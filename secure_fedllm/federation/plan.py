"""What every party of a round agrees on, and each client's own privacy policy.

The server announces a `RoundPlan`: the base-model, A0, adapter-config and manifest hashes, the
encoding, and for each participant the DP-SGD settings it will run. Its digest is the protocol
context, so it enters the transcript hash behind every key derivation and signature: a client that
was shown a different plan (another base model, another A0, a lower noise for some client) derives
different keys and the round aborts rather than mixing incompatible or weakened updates.

`ClientPolicy` is what a client enforces whatever the server asks: a noise floor, a clipping
ceiling, a sampling-rate ceiling, a step ceiling, a participation cap and its budget. The noise is
calibrated per client for K = min(rounds, max_participations) joins at that client's own sampling
rate q_i = expected_batch / N_i, under `privacy.neighbouring` (replace-one by default, because N_i is
public). Client sampling by the server is not counted as amplification: the
server chooses, so a client cannot rely on being sampled at random.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..config import RunConfig
from ..errors import ConfigError, SecureFedLLMError
from ..privacy import DPSGDEvent, IntegerNoiseEvent, make_accountant, noise_for_epsilon
from ..privacy.distributed import DistributedDP, calibrate_distributed
from ..privacy.rotation import padded_dimension

__all__ = ["Assignment", "ClientPolicy", "PlanRefusedError", "RoundPlan", "client_policy", "common_sample_rate"]


class PlanRefusedError(SecureFedLLMError):
    """A client refused the server's plan: it asked for less privacy than the client's own floors."""


class Assignment(BaseModel):
    """One participant's DP-SGD settings and aggregation weight, as announced by the server.

    Every field is finite and in range when the plan is parsed: a NaN noise multiplier hangs the
    RDP accountant and a negative clip norm wedges the shared trainer, so such a plan must never
    reach either. `ClientPolicy.check` repeats the checks for plans built without validation.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    client: Annotated[int, Field(ge=0)]
    noise_multiplier: Annotated[float, Field(ge=0, allow_inf_nan=False)]
    max_grad_norm: Annotated[float, Field(gt=0, allow_inf_nan=False)]
    sample_rate: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]
    steps: Annotated[int, Field(ge=1)]
    weight: Annotated[float, Field(gt=0, allow_inf_nan=False)]


class RoundPlan(BaseModel):
    """The public description of one round; its digest is the secure-aggregation context."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    round: Annotated[int, Field(ge=0)]
    base_sha256: str
    a0_sha256: str
    adapter_config_sha256: str
    manifest_sha256: str
    aggregation: str
    protocol: str
    clip_range: Annotated[float, Field(gt=0, allow_inf_nan=False)]
    participants: Annotated[tuple[Assignment, ...], Field(min_length=1)]

    def digest(self) -> bytes:
        """SHA-256 over the canonical JSON form."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(b"secure-fedllm/round-plan/v1|" + canonical.encode()).digest()

    @classmethod
    def parse(cls, data: str | bytes) -> RoundPlan:
        """Parse a plan received from the server, refusing any field out of range.

        Raises:
            PlanRefusedError: naming the first offending field and what it must be.
        """
        try:
            return cls.model_validate_json(data)
        except ValidationError as exc:
            raise PlanRefusedError(f"the round plan is refused: {_first_error(exc)}") from exc

    def validated(self) -> RoundPlan:
        """Re-validate every field (for plans built with `model_construct` or `model_copy`).

        Raises:
            PlanRefusedError: naming the first offending field.
        """
        try:
            return type(self).model_validate(self.model_dump())
        except ValidationError as exc:
            raise PlanRefusedError(f"the round plan of round {self.round} is refused: {_first_error(exc)}") from exc


def _first_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    where = ".".join(str(part) for part in error["loc"])
    return f"{where}={error.get('input')!r}: {error['msg']}"


class ClientPolicy(BaseModel):
    """A client's own floors and budget; checked against every plan before it trains."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    client: Annotated[int, Field(ge=0)]
    private: bool
    num_units: Annotated[int, Field(ge=1)]
    noise_multiplier: Annotated[float, Field(ge=0, allow_inf_nan=False)]
    max_grad_norm: Annotated[float, Field(gt=0, allow_inf_nan=False)]
    sample_rate: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]
    steps: Annotated[int, Field(ge=1)]
    max_participations: Annotated[int, Field(ge=1)]
    epsilon_budget: Annotated[float, Field(gt=0)]
    delta: Annotated[float, Field(gt=0, lt=1, allow_inf_nan=False)]
    min_weight: float = Field(
        0.1, description="smallest weight relative to the largest that the client accepts in a plan"
    )
    distributed: DistributedDP | None = Field(
        None, description="privacy.mode='distributed': the site's own distributed-DP parameters (else local DP-SGD)"
    )
    corrupt_fraction: Annotated[float, Field(ge=0, lt=0.5)] = Field(
        0.0,
        description="distributed mode: colluding clients this site assumes (n_C = ceil of it over roster_size or n)",
    )
    roster_size: Annotated[int, Field(ge=1)] | None = Field(
        None, description="distributed mode: clients n_C is counted over (the pinned roster; None: the round's n)"
    )
    dropout_rate: Annotated[float, Field(ge=0, lt=1)] = Field(
        0.0, description="distributed mode: dropouts this site assumes (d_max = ceil(dropout_rate n))"
    )
    local_sample_rate: Annotated[float, Field(gt=0, le=1)] | None = Field(
        None, description="client-level DP: the q_i of the client's own (unclipped, noise-free) local steps"
    )
    local_steps: Annotated[int, Field(ge=1)] | None = Field(
        None, description="client-level DP: local steps per round before the whole update is clipped"
    )

    def event(self) -> DPSGDEvent | IntegerNoiseEvent | None:
        """What one joined round costs (None without DP); distributed: the round sized for the full cohort."""
        if not self.private:
            return None
        if self.distributed is not None:
            return self.distributed.event()
        return DPSGDEvent(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate, steps=self.steps)

    def round_dp(self, assignment: Assignment, parties: int) -> DistributedDP:
        """Distributed mode: this round's parameters, from the site's own assumptions, never the server's.

        The central mu is the calibrated one (or more, if the plan asks for more noise); the share
        is mu / h with h = n - n_C - d_max for this round's n, so a smaller round gets larger shares.

        Raises:
            PlanRefusedError: the round guarantees no honest share (h < 1), or the mode is local.
        """
        base = self.distributed
        if base is None:
            raise PlanRefusedError(f"client {self.client} runs local DP-SGD, not distributed DP")
        corrupt = math.ceil(self.corrupt_fraction * (self.roster_size or parties) - 1e-9)
        dropouts = math.ceil(self.dropout_rate * parties - 1e-9)
        honest = parties - corrupt - dropouts
        if honest < 1:
            raise PlanRefusedError(
                f"client {self.client} refuses a distributed-DP round of {parties} clients: with n_C={corrupt} and "
                f"d_max={dropouts} no honest noise share is guaranteed; the server must run larger rounds"
            )
        mu = max(base.mu, (assignment.noise_multiplier * base.l2) ** 2 / 2)
        return base.model_copy(
            update={"parties": parties, "honest": honest, "mu": mu, "sample_rate": assignment.sample_rate}
        )

    def check(self, assignment: Assignment) -> None:
        """Refuse a plan that asks for less noise, a larger clip, a larger q or more steps than allowed.

        Each value must first be finite and in range (0 < q <= 1, clip > 0, noise >= 0, steps >= 1,
        weight > 0): NaN compares false with every floor, so the range checks come before the floors
        and are written so that NaN fails them.

        Raises:
            PlanRefusedError: naming the setting, the requested value and the client's limit.
        """
        ranges = (
            ("noise_multiplier", assignment.noise_multiplier, lambda v: 0 <= v < math.inf, "finite and >= 0"),
            ("max_grad_norm", assignment.max_grad_norm, lambda v: 0 < v < math.inf, "finite and > 0"),
            ("sample_rate", assignment.sample_rate, lambda v: 0 < v <= 1, "in (0, 1]"),
            ("weight", assignment.weight, lambda v: 0 < v < math.inf, "finite and > 0"),
            ("steps", assignment.steps, lambda v: isinstance(v, int) and v >= 1, "an integer >= 1"),
        )
        for name, value, ok, what in ranges:
            if not isinstance(value, int | float) or not ok(value):
                raise PlanRefusedError(
                    f"client {self.client} refuses round plan: {name}={value!r} must be {what}; the server "
                    "must announce valid DP settings"
                )
        rules = (
            ("noise_multiplier", not assignment.noise_multiplier >= self.noise_multiplier, self.noise_multiplier, ">="),
            ("max_grad_norm", not assignment.max_grad_norm <= self.max_grad_norm, self.max_grad_norm, "<="),
            ("sample_rate", not assignment.sample_rate <= self.sample_rate, self.sample_rate, "<="),
            ("steps", not assignment.steps <= self.steps, self.steps, "<="),
        )
        for name, broken, limit, sign in rules:
            if broken:
                raise PlanRefusedError(
                    f"client {self.client} refuses round plan: {name}={getattr(assignment, name)} but its policy "
                    f"requires {sign} {limit}"
                )


def client_policy(config: RunConfig, client: int, num_units: int, *, dimension: int | None = None) -> ClientPolicy:
    """Derive client `client`'s policy from the run config and its own N_i.

    With `privacy.mode = "distributed"` (`dimension`, the adapter's length, is then required) the
    policy holds the site's `DistributedDP` parameters: the common q, one DP step per round, the
    central Skellam noise calibrated for h = n - n_C - d_max honest shares at the full cohort, and
    delta = 0.1 / (clients N_i) (0.1 / sum N_i when the sites are of equal size; a smaller site
    should set privacy.delta to 0.1 / sum N_i itself). With `privacy.unit = "client"` (client-level
    DP) the unit is a client's whole update: q = 1 (every client every round), the dimension is the
    rotation's power of two, delta = 0.1 / clients, and the local steps are noise-free.

    Raises:
        ConfigError: delta above 0.1 / N_i, or an epsilon out of reach.
    """
    privacy, fed = config.privacy, config.federation
    if num_units < 1:
        raise ConfigError(
            f"client {client}: no privacy unit left to train on (every record's prompt fills "
            f"data.max_length={config.data.max_length}, or its data is empty); raise data.max_length or give it records"
        )
    if privacy.mode == "distributed" and privacy.mechanism != "none":
        return _distributed_policy(config, client, num_units, dimension)
    q = min(1.0, privacy.expected_batch_size / num_units)
    joins = min(fed.rounds, privacy.max_participations or fed.rounds)
    steps = fed.local_steps if fed.local_epochs is None else max(1, round(fed.local_epochs / q))
    delta_cap = 0.1 / num_units
    delta = privacy.delta if privacy.delta is not None else delta_cap
    if delta > delta_cap * (1 + 1e-12):
        raise ConfigError(
            f"privacy.delta={delta:g} exceeds 0.1/N_i = {delta_cap:.3g} for client {client} (N_i={num_units} "
            "units): a mechanism that leaks one unit in full with probability delta would then be allowed; "
            "lower privacy.delta or leave it unset"
        )
    if delta > num_units**-1.1:
        warnings.warn(f"client {client}: delta={delta:g} is above N_i^-1.1 = {num_units**-1.1:.3g}", stacklevel=2)
    min_weight = 1.0 if config.federation.weighting == "uniform" else config.secure_aggregation.min_weight
    if privacy.mechanism == "none":
        sigma = 0.0
    else:
        sigma = noise_for_epsilon(
            privacy.target_epsilon,
            delta=delta,
            sample_rate=q,
            steps=joins * steps,
            accountant=make_accountant(privacy.accountant, neighbouring=privacy.neighbouring),
        )
    return ClientPolicy(
        client=client,
        private=privacy.mechanism != "none",
        num_units=num_units,
        noise_multiplier=sigma,
        max_grad_norm=privacy.max_grad_norm,
        sample_rate=q,
        steps=steps,
        max_participations=joins,
        epsilon_budget=privacy.target_epsilon if privacy.mechanism != "none" else math.inf,
        delta=delta,
        min_weight=min_weight,
    )


def common_sample_rate(config: RunConfig) -> float:
    """Distributed mode's public Poisson rate q: privacy.sample_rate, or expected_batch_size / records_per_client."""
    privacy = config.privacy
    if privacy.sample_rate is not None:
        return privacy.sample_rate
    return min(1.0, privacy.expected_batch_size / config.data.records_per_client)


def _distributed_policy(config: RunConfig, client: int, num_units: int, dimension: int | None) -> ClientPolicy:
    privacy, fed, sa = config.privacy, config.federation, config.secure_aggregation
    if dimension is None:
        raise ConfigError("privacy.mode='distributed' calibrates for the adapter's dimension; pass dimension=")
    client_level = privacy.unit == "client"
    q = 1.0 if client_level else common_sample_rate(config)  # client-level: every client in every round
    joins = min(fed.rounds, privacy.max_participations or fed.rounds)
    delta_cap = 0.1 / fed.clients if client_level else 0.1 / (fed.clients * num_units)
    delta = privacy.delta if privacy.delta is not None else delta_cap
    if delta > (delta_cap if client_level else 0.1 / num_units) * (1 + 1e-12):
        raise ConfigError(
            f"privacy.delta={delta:g} exceeds 0.1/N_i = {0.1 / num_units:.3g} for client {client}; lower it "
            "(distributed mode: 0.1 / sum N_i) or leave it unset"
        )
    n = fed.clients_per_round or fed.clients
    roster = fed.clients if sa.setting == "malicious" else None
    corrupt = math.ceil(sa.corrupt_fraction * (roster or n) - 1e-9)
    dropouts = math.ceil(sa.dropout_rate * n - 1e-9)
    dist = calibrate_distributed(
        target_epsilon=privacy.target_epsilon,
        delta=delta,
        sample_rate=q,
        steps=joins,
        clip=privacy.max_grad_norm,
        dimension=padded_dimension(dimension) if client_level else dimension,
        parties=n,
        corrupt=corrupt,
        dropouts=dropouts,
        neighbouring=privacy.neighbouring,
    )
    return ClientPolicy(
        client=client,
        private=True,
        num_units=num_units,
        noise_multiplier=dist.noise_multiplier,
        max_grad_norm=privacy.max_grad_norm,
        sample_rate=q,
        steps=1,
        max_participations=joins,
        epsilon_budget=privacy.target_epsilon,
        delta=delta,
        min_weight=1.0,
        distributed=dist,
        corrupt_fraction=sa.corrupt_fraction,
        roster_size=roster,
        dropout_rate=sa.dropout_rate,
        local_sample_rate=min(1.0, privacy.expected_batch_size / num_units) if client_level else None,
        local_steps=fed.local_steps if client_level else None,
    )
