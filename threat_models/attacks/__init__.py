"""Attacks, each a small class with one entry point that returns typed results with `rows()`."""

from .backdoor import Backdoor, BackdoorConfig, BackdoorOutcome, BackdoorResult
from .canary_exposure import CanaryExposure, CanaryExposureConfig, canary_probes
from .downgrade import Downgrade, DowngradeConfig, DowngradeResult
from .dp_audit import DPAuditConfig, OneRunAudit
from .dp_audit_distributed import DistributedAudit, DistributedAuditConfig, DistributedAuditResult
from .dp_audit_training import (
    TrainingAudit,
    TrainingAuditConfig,
    TrainingAuditResult,
    audit_training,
    standard_settings,
    training_audit_rows,
)
from .dropout_forging import DropoutForging, DropoutForgingConfig
from .forged_share import ForgedShare, ForgedShareConfig, ForgedShareResult, unverified_unmask
from .he_oracle import HEOracle, HEOracleConfig, HEOracleResult, LeakyHEClient
from .key_substitution import KeySubstitution, KeySubstitutionConfig, KeySubstitutionResult
from .membership import MembershipConfig, MembershipInference
from .model_inconsistency import ModelInconsistency, ModelInconsistencyConfig
from .replay import Replay, ReplayConfig, ReplayResult
from .rerun import Rerun, RerunConfig, RerunResult
from .sybil import Sybil, SybilConfig, SybilResult
from .sybil_roster import SybilRoster, SybilRosterConfig, SybilRosterResult
from .token_recovery import TokenRecovery, TokenRecoveryConfig

__all__ = [
    "Backdoor",
    "BackdoorConfig",
    "BackdoorOutcome",
    "BackdoorResult",
    "CanaryExposure",
    "CanaryExposureConfig",
    "DPAuditConfig",
    "DistributedAudit",
    "DistributedAuditConfig",
    "DistributedAuditResult",
    "Downgrade",
    "DowngradeConfig",
    "DowngradeResult",
    "DropoutForging",
    "DropoutForgingConfig",
    "ForgedShare",
    "ForgedShareConfig",
    "ForgedShareResult",
    "HEOracle",
    "HEOracleConfig",
    "HEOracleResult",
    "KeySubstitution",
    "KeySubstitutionConfig",
    "KeySubstitutionResult",
    "LeakyHEClient",
    "MembershipConfig",
    "MembershipInference",
    "ModelInconsistency",
    "ModelInconsistencyConfig",
    "OneRunAudit",
    "Replay",
    "ReplayConfig",
    "ReplayResult",
    "Rerun",
    "RerunConfig",
    "RerunResult",
    "Sybil",
    "SybilConfig",
    "SybilResult",
    "SybilRoster",
    "SybilRosterConfig",
    "SybilRosterResult",
    "TokenRecovery",
    "TokenRecoveryConfig",
    "TrainingAudit",
    "TrainingAuditConfig",
    "TrainingAuditResult",
    "audit_training",
    "canary_probes",
    "standard_settings",
    "training_audit_rows",
    "unverified_unmask",
]
