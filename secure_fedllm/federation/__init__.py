"""The in-process federation: clients, round plans, secure aggregation, checkpoints and reports."""

from .aggregation import AggregationOutcome, aggregate_updates, draw_dropouts, sample_cohort
from .checkpoint import Checkpoint, RunFolderError, RunInterruptedError, RunPaths, site_folder
from .client import ClientUpdate, FederatedClient, data_digest
from .federation import ClientLedger, Federation, Job, RunResult, Transport, job_id, make_client, open_site, public_seed
from .plan import Assignment, ClientPolicy, PlanRefusedError, RoundPlan, client_policy
from .record import RoundRecord
from .runner import InProcessTransport, run

__all__ = [
    "AggregationOutcome",
    "Assignment",
    "Checkpoint",
    "ClientLedger",
    "ClientPolicy",
    "ClientUpdate",
    "FederatedClient",
    "Federation",
    "InProcessTransport",
    "Job",
    "PlanRefusedError",
    "RoundPlan",
    "RoundRecord",
    "RunFolderError",
    "RunInterruptedError",
    "RunPaths",
    "RunResult",
    "Transport",
    "aggregate_updates",
    "client_policy",
    "data_digest",
    "draw_dropouts",
    "job_id",
    "make_client",
    "open_site",
    "public_seed",
    "run",
    "sample_cohort",
    "site_folder",
]
