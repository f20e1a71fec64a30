"""Client-side training: DP-SGD on LoRA adapters (Opacus) and the server's evaluation."""

from .dp_sgd import CSPRNGDPOptimizer, LocalTrainer, StepSettings, dp_step_noise_key, per_example_loss
from .evaluation import EvalResult, evaluate, generate_samples

__all__ = [
    "CSPRNGDPOptimizer",
    "EvalResult",
    "LocalTrainer",
    "StepSettings",
    "dp_step_noise_key",
    "evaluate",
    "generate_samples",
    "per_example_loss",
]
