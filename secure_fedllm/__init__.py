"""Federated fine-tuning of LLMs with DP-SGD and secure aggregation: configuration, clients, runner.

Builds on `protocols` for secure aggregation. This release ships the secure-aggregation demo
(`secure-fedllm demo`) and the validated run configuration (`RunConfig`); LoRA + DP-SGD clients and
the federation runner come next.
"""

from .config import (
    DataConfig,
    FederationConfig,
    LoraConfig,
    ModelConfig,
    PrivacyConfig,
    RunConfig,
    SecureAggregationConfig,
)
from .demo import SMOLLM2_QV_LORA_R16, DemoConfig, run_demo
from .errors import ConfigError, SecureFedLLMError

__all__ = [
    "SMOLLM2_QV_LORA_R16",
    "ConfigError",
    "DataConfig",
    "DemoConfig",
    "FederationConfig",
    "LoraConfig",
    "ModelConfig",
    "PrivacyConfig",
    "RunConfig",
    "SecureAggregationConfig",
    "SecureFedLLMError",
    "run_demo",
]
