"""Adversaries, attacks and the attack/defense evaluation, built on `protocols` and `secure_fedllm`.

Empty in this release: the package exists so that the import direction
`protocols` <- `secure_fedllm` <- `threat_models` is fixed from the start.
"""

__all__: list[str] = []
