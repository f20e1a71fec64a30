"""`RoundRecord`: one round's public facts, the same type in memory, in `metrics.jsonl` and in the report.

Both engines fill the same fields with the same meaning (`seconds` has the same keys on both), so a
report, a benchmark or a comparison never branches on the engine. Everything here is public: it is
what the server learns and publishes in the run folder.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["FederatedEvaluation", "ProtocolFacts", "RoundBytes", "RoundRecord", "RoundSeconds", "Sample"]


class _Row(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    def __getitem__(self, name: str) -> Any:
        """`row["perplexity"]` for callers written against the old dict rows (threat_models, benchmarks)."""
        try:
            return getattr(self, name)
        except AttributeError:
            raise KeyError(name) from None

    def get(self, name: str, default: Any = None) -> Any:
        """Like `dict.get`, for the same callers."""
        return getattr(self, name, default)


class RoundSeconds(_Row):
    """Wall-clock seconds of a round's phases; the same keys on both engines.

    `round` is training plus secure aggregation as the server saw it; `training` is the clients'
    training (in process: measured around it; on Flower: the train stage's round trip, which also
    carries the first protocol message); `protocol_client` is the clients' protocol time (in process:
    their compute; on Flower: the later stages' round trips less the server's own time).
    """

    training: float = 0.0
    protocol_client: float = 0.0
    protocol_server: float = 0.0
    evaluation: float = 0.0
    round: float = 0.0


class RoundBytes(_Row):
    """Protocol bytes over all clients in one round."""

    upload: int = 0
    download: int = 0


class ProtocolFacts(_Row):
    """The secure-aggregation parameters a round ran with."""

    neighbours: int = 0
    threshold: int = 0
    insecure: bool = False
    malicious: bool = False


class Sample(_Row):
    """A greedy completion of a held-out prompt (its reference is the held-out answer)."""

    prompt: str
    reference: str
    generated: str


class FederatedEvaluation(_Row):
    """One federated evaluation (`evaluation.mode = "federated"`): the noised sums the server learned.

    `loss_sum` and `count` are the securely aggregated sums over `sites` of each site's clipped
    per-unit loss sum and unit count, each with its own Gaussian noise; `loss` = loss_sum / count and
    `perplexity` = exp(loss) are computed from them alone (NaN when the noised count is not
    positive). `epsilon` is each included site's epsilon of this one release (its ledger composes it
    with everything else: the round's `epsilon`). All of it is public; nothing here is per site
    except what the sites themselves report (their epsilon, or why they sat out).
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, ser_json_inf_nan="constants")

    loss_sum: float | None = None
    count: float | None = None
    loss: float | None = None
    perplexity: float | None = None
    sites: list[int] = Field(default_factory=list)
    sat_out: dict[int, str] = Field(default_factory=dict)
    """Site -> why it did not evaluate (no federated evaluation, budget, a refused model or round)."""
    epsilon: dict[int, float] = Field(default_factory=dict)
    replayed: list[int] = Field(default_factory=list)
    """Sites that answered with their stored release of this round (no second charge, no fresh noise)."""
    aborted: str | None = None


class RoundRecord(_Row):
    """One round of a run: the cohort and who was included, quality, privacy spent and cost."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, ser_json_inf_nan="constants")

    round: int = Field(ge=0)
    engine: Literal["in-process", "flower"] = "in-process"
    eval_loss: float = float("nan")
    perplexity: float = float("nan")
    epsilon: dict[int, float] = Field(default_factory=dict)
    """Each client's epsilon spent after this round (0 without DP)."""
    cohort: list[int] = Field(default_factory=list)
    sat_out: dict[int, str] = Field(default_factory=dict)
    """Client -> why it did not join (cap reached, budget, no reply to the offer)."""
    participants: list[int] = Field(default_factory=list)
    included: list[int] = Field(default_factory=list)
    dropped: list[int] = Field(default_factory=list)
    refused: dict[int, str] = Field(default_factory=dict)
    """Client -> why it refused this session (its release is bound to an earlier one)."""
    failures: dict[int, str] = Field(default_factory=dict)
    """Client -> why the server got nothing from it (Flower: error reply, no reply)."""
    aborted: str | None = None
    clipped_coordinates: int = 0
    quantization_bound: float = 0.0
    fedit_product_error: float | None = None
    protocol: ProtocolFacts | None = None
    seconds: RoundSeconds = Field(default_factory=RoundSeconds)
    bytes: RoundBytes = Field(default_factory=RoundBytes)
    samples: list[Sample] = Field(default_factory=list)
    federated_evaluation: FederatedEvaluation | None = None
    """With `evaluation.mode = "federated"`: this round's federated evaluation (eval_loss and perplexity are
    then its noised figures; the server scored nothing itself)."""
    distributed: dict[str, float] | None = None
    """With `privacy.mode = "distributed"`: the released sum's public facts (included clients, the honest
    shares and central Skellam mu the sites guarantee, the units it is divided by, the wrap-around bound)."""

    def to_line(self) -> str:
        """The JSON line of `metrics.jsonl`."""
        return self.model_dump_json() + "\n"
