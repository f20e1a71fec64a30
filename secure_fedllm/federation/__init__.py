"""The in-process federation: clients, round plans, secure aggregation, checkpoints and reports."""

from .aggregation import AggregationOutcome, aggregate_updates, draw_dropouts, sample_cohort
from .checkpoint import Checkpoint, RunPaths, site_folder
from .client import ClientUpdate, FederatedClient, data_digest
from .plan import Assignment, ClientPolicy, PlanRefusedError, RoundPlan, client_policy
from .runner import RunResult, job_id, open_site, run

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
    "data_digest",
    "draw_dropouts",
    "job_id",
    "open_site",
    "run",
    "sample_cohort",
    "site_folder",
]
