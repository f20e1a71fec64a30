"""The one error hierarchy of `threat_models`."""

from __future__ import annotations

__all__ = ["AttackConfigError", "ThreatModelError"]


class ThreatModelError(Exception):
    """Root of every error raised by `threat_models`."""


class AttackConfigError(ThreatModelError, ValueError):
    """An attack or adversary configuration is invalid; the message names the field and the fix."""
