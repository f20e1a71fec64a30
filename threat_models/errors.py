"""The one error hierarchy of `threat_models`."""

from __future__ import annotations

__all__ = ["AttackConfigError", "RunDataUnavailableError", "RunEvaluationError", "ThreatModelError"]


class ThreatModelError(Exception):
    """Root of every error raised by `threat_models`."""


class AttackConfigError(ThreatModelError, ValueError):
    """An attack or adversary configuration is invalid; the message names the field and the fix."""


class RunEvaluationError(ThreatModelError, ValueError):
    """A run folder cannot be evaluated as asked (no released adapter, unreadable files); names the file and the fix."""


class RunDataUnavailableError(RunEvaluationError):
    """A run's training or held-out records cannot be recovered exactly as the run used them.

    Membership inference on a run is only meaningful on the run's own split: a moved or edited data
    file, or another generator, would test records the adapter never saw as "members".
    """
