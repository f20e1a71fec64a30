"""Attacks, each a small class with one entry point that returns typed results with `rows()`."""

from .backdoor import Backdoor, BackdoorConfig, BackdoorOutcome, BackdoorResult
from .canary_exposure import CanaryExposure, CanaryExposureConfig, canary_probes
from .dp_audit import DPAuditConfig, OneRunAudit
from .dropout_forging import DropoutForging, DropoutForgingConfig
from .key_substitution import KeySubstitution, KeySubstitutionConfig, KeySubstitutionResult
from .membership import MembershipConfig, MembershipInference
from .model_inconsistency import ModelInconsistency, ModelInconsistencyConfig
from .replay import Replay, ReplayConfig, ReplayResult
from .sybil import Sybil, SybilConfig, SybilResult
from .token_recovery import TokenRecovery, TokenRecoveryConfig

__all__ = [
    "Backdoor",
    "BackdoorConfig",
    "BackdoorOutcome",
    "BackdoorResult",
    "CanaryExposure",
    "CanaryExposureConfig",
    "DPAuditConfig",
    "DropoutForging",
    "DropoutForgingConfig",
    "KeySubstitution",
    "KeySubstitutionConfig",
    "KeySubstitutionResult",
    "MembershipConfig",
    "MembershipInference",
    "ModelInconsistency",
    "ModelInconsistencyConfig",
    "OneRunAudit",
    "Replay",
    "ReplayConfig",
    "ReplayResult",
    "Sybil",
    "SybilConfig",
    "SybilResult",
    "TokenRecovery",
    "TokenRecoveryConfig",
    "canary_probes",
]
