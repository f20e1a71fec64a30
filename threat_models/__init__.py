"""Adversaries, attacks and the attack/defense evaluation, built on `protocols` and `secure_fedllm`.

Each attack is a small class with one entry point that returns a typed result, and every result
reports `MatrixRow`s (attack, defense, metric, value, chance, interval) so that an evaluation can
put attacks and defenses side by side. Imports point one way: this package uses the public APIs of
`protocols` and `secure_fedllm`, and nothing there imports it.
"""

from typing import TYPE_CHECKING, Any

from .adversaries import Adversary, CollusionConfig, HonestButCuriousServer, MaliciousClient, MaliciousServer
from .errors import AttackConfigError, RunDataUnavailableError, RunEvaluationError, ThreatModelError
from .results import MatrixRow

if TYPE_CHECKING:
    from .run_evaluation import RunEvaluation, evaluate_run


def __getattr__(name: str) -> Any:
    # the run evaluation imports torch and transformers: loaded only when it is used
    if name in ("RunEvaluation", "evaluate_run"):
        from . import run_evaluation

        return getattr(run_evaluation, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "Adversary",
    "AttackConfigError",
    "CollusionConfig",
    "HonestButCuriousServer",
    "MaliciousClient",
    "MaliciousServer",
    "MatrixRow",
    "RunDataUnavailableError",
    "RunEvaluation",
    "RunEvaluationError",
    "ThreatModelError",
    "evaluate_run",
]
