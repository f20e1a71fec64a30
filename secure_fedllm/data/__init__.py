"""Client data: the synthetic private-records generator (the default run's data)."""

from .synthetic import CANARY_FORMATS, Canary, Record, SyntheticFederation, synthesize_federation

__all__ = ["CANARY_FORMATS", "Canary", "Record", "SyntheticFederation", "synthesize_federation"]
