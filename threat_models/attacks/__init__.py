"""Attacks, each a small class with one entry point that returns typed results with `rows()`."""

from .canary_exposure import CanaryExposure, CanaryExposureConfig, canary_probes
from .dp_audit import DPAuditConfig, OneRunAudit
from .dropout_forging import DropoutForging, DropoutForgingConfig
from .membership import MembershipConfig, MembershipInference
from .model_inconsistency import ModelInconsistency, ModelInconsistencyConfig
from .token_recovery import TokenRecovery, TokenRecoveryConfig

__all__ = [
    "CanaryExposure",
    "CanaryExposureConfig",
    "DPAuditConfig",
    "DropoutForging",
    "DropoutForgingConfig",
    "MembershipConfig",
    "MembershipInference",
    "ModelInconsistency",
    "ModelInconsistencyConfig",
    "OneRunAudit",
    "TokenRecovery",
    "TokenRecoveryConfig",
    "canary_probes",
]
