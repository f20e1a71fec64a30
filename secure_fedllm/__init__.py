"""Federated fine-tuning of LLMs with LoRA, DP-SGD and secure aggregation.

One front door: `run(config)` trains a federation in process (clients run DP-SGD with Opacus on
LoRA adapters, updates are summed by the secure-aggregation protocols of `protocols`) and returns a
`RunResult` with the metrics, each client's epsilon and the saved adapter. `RunConfig` validates
and serialises the configuration; `plan_budget` / `show_budget` answer privacy-budget questions.
"""

from typing import TYPE_CHECKING, Any

from .config import (
    DataConfig,
    EvaluationConfig,
    FederationConfig,
    LoraConfig,
    ModelConfig,
    PrivacyConfig,
    RunConfig,
    SecureAggregationConfig,
    TrainingConfig,
)
from .errors import ConfigError, PrivacyBudgetExhaustedError, ReleaseBindingError, SecureFedLLMError

if TYPE_CHECKING:
    from .budget import plan_budget, show_budget
    from .demo import SMOLLM2_QV_LORA_R16, DemoConfig, run_demo
    from .federation import PlanRefusedError, RunResult, run
    from .lora_targets import resolve_target_modules
    from .model_card import BaseModelMismatchError, load_adapter
    from .tiny_model import TINY_ARCHITECTURES, save_tiny_model

_LAZY = {
    "PlanRefusedError": "federation",
    "RunResult": "federation",
    "run": "federation",
    "plan_budget": "budget",
    "show_budget": "budget",
    "SMOLLM2_QV_LORA_R16": "demo",
    "DemoConfig": "demo",
    "run_demo": "demo",
    "BaseModelMismatchError": "model_card",
    "load_adapter": "model_card",
    "resolve_target_modules": "lora_targets",
    "TINY_ARCHITECTURES": "tiny_model",
    "save_tiny_model": "tiny_model",
}


def __getattr__(name: str) -> Any:
    # torch, transformers, peft and opacus load only when they are used: hosts that embed the
    # config, and Flower ClientApps (a fresh process per message) handling protocol stages, stay fast.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "SMOLLM2_QV_LORA_R16",
    "TINY_ARCHITECTURES",
    "BaseModelMismatchError",
    "ConfigError",
    "DataConfig",
    "DemoConfig",
    "EvaluationConfig",
    "FederationConfig",
    "LoraConfig",
    "ModelConfig",
    "PlanRefusedError",
    "PrivacyBudgetExhaustedError",
    "PrivacyConfig",
    "ReleaseBindingError",
    "RunConfig",
    "RunResult",
    "SecureAggregationConfig",
    "SecureFedLLMError",
    "TrainingConfig",
    "load_adapter",
    "plan_budget",
    "resolve_target_modules",
    "run",
    "run_demo",
    "save_tiny_model",
    "show_budget",
]
