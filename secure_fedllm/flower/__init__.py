"""Our secure aggregation inside Flower, and our federated LoRA + DP-SGD job on Flower's engine.

Two surfaces, because Flower has two:

* Message API: a ServerApp calls `secure_aggregate(grid, instructions, params, ...)`; its ClientApp
  lists `secure_aggregation_mod` in its `mods`.
* Legacy API: `DefaultWorkflow(fit_workflow=SecureFitWorkflow(...))` with the same Mod, a drop-in
  for `SecAggPlusWorkflow` + `secaggplus_mod` (see `fit_workflow` for the knobs and the differences).

`LocalGrid` runs ClientApps in process for tests and notebooks. Flower (`pip install
secure-fedllm[flower]`) is imported only when these names are used, and the protocol stages never
import torch: a SuperNode may start a fresh ClientApp process for every message.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .records import (
    INPUT_RECORD,
    PROTOCOL_RECORD,
    SETUP,
    STATE_RECORD,
    STEP,
    FlowerIntegrationError,
    RoundSetup,
    flatten_arrays,
    split_vector,
)

if TYPE_CHECKING:
    from .client_mod import ERROR_CODE, SecureAggregationMod, secure_aggregation_mod
    from .fit_workflow import SecureFitWorkflow
    from .grid_round import GridRoundAbortedError, GridRoundResult, collect_identity_keys, secure_aggregate
    from .local_grid import LocalGrid

_LAZY = {
    "ERROR_CODE": "client_mod",
    "SecureAggregationMod": "client_mod",
    "secure_aggregation_mod": "client_mod",
    "SecureFitWorkflow": "fit_workflow",
    "GridRoundAbortedError": "grid_round",
    "GridRoundResult": "grid_round",
    "secure_aggregate": "grid_round",
    "collect_identity_keys": "grid_round",
    "LocalGrid": "local_grid",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ERROR_CODE",
    "INPUT_RECORD",
    "PROTOCOL_RECORD",
    "SETUP",
    "STATE_RECORD",
    "STEP",
    "FlowerIntegrationError",
    "GridRoundAbortedError",
    "GridRoundResult",
    "LocalGrid",
    "RoundSetup",
    "SecureAggregationMod",
    "SecureFitWorkflow",
    "collect_identity_keys",
    "flatten_arrays",
    "secure_aggregate",
    "secure_aggregation_mod",
    "split_vector",
]
