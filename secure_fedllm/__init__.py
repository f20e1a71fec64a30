"""Federated fine-tuning of LLMs with LoRA, DP-SGD and secure aggregation.

One front door: `run(config)` trains a federation in process (clients run DP-SGD with Opacus on
LoRA adapters, updates are summed by the secure-aggregation protocols of `protocols`) and returns a
`RunResult` with the metrics, each client's epsilon and the saved adapter. `RunConfig` validates
and serialises the configuration; `plan_budget` / `show_budget` answer privacy-budget questions.
"""

from typing import TYPE_CHECKING, Any

from .budget import plan_budget, show_budget
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
from .demo import SMOLLM2_QV_LORA_R16, DemoConfig, run_demo
from .errors import ConfigError, PrivacyBudgetExhaustedError, SecureFedLLMError

if TYPE_CHECKING:
    from .federation import PlanRefusedError, RunResult, run

_LAZY = {"PlanRefusedError", "RunResult", "run"}


def __getattr__(name: str) -> Any:
    # torch, transformers and peft load only when the federation is used (the CLI's budget and
    # config commands, and hosts embedding the config, stay fast).
    if name in _LAZY:
        from . import federation

        return getattr(federation, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "SMOLLM2_QV_LORA_R16",
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
    "RunConfig",
    "RunResult",
    "SecureAggregationConfig",
    "SecureFedLLMError",
    "TrainingConfig",
    "plan_budget",
    "run",
    "run_demo",
    "show_budget",
]
