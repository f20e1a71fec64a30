"""Adversaries, attacks and the attack/defense evaluation, built on `protocols` and `secure_fedllm`.

Each attack is a small class with one entry point that returns a typed result, and every result
reports `MatrixRow`s (attack, defense, metric, value, chance, interval) so that an evaluation can
put attacks and defenses side by side. Imports point one way: this package uses the public APIs of
`protocols` and `secure_fedllm`, and nothing there imports it.
"""

from .adversaries import Adversary, CollusionConfig, HonestButCuriousServer, MaliciousClient, MaliciousServer
from .errors import AttackConfigError, ThreatModelError
from .results import MatrixRow

__all__ = [
    "Adversary",
    "AttackConfigError",
    "CollusionConfig",
    "HonestButCuriousServer",
    "MaliciousClient",
    "MaliciousServer",
    "MatrixRow",
    "ThreatModelError",
]
