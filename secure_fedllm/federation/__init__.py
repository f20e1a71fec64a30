"""The in-process federation: clients, round plans, secure aggregation, checkpoints and reports."""

from .aggregation import AggregationOutcome, aggregate_updates, draw_dropouts, sample_cohort
from .checkpoint import Checkpoint, RunPaths
from .client import ClientUpdate, FederatedClient
from .plan import Assignment, ClientPolicy, PlanRefusedError, RoundPlan, client_policy
from .runner import RunResult, run

__all__ = [
    "AggregationOutcome",
    "Assignment",
    "Checkpoint",
    "ClientPolicy",
    "ClientUpdate",
    "FederatedClient",
    "PlanRefusedError",
    "RoundPlan",
    "RunPaths",
    "RunResult",
    "aggregate_updates",
    "client_policy",
    "draw_dropouts",
    "run",
    "sample_cohort",
]
