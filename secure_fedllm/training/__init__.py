"""Client-side training: DP-SGD on LoRA adapters (Opacus) and the server's evaluation."""

from .dp_sgd import LocalTrainer, StepSettings, per_example_loss
from .evaluation import EvalResult, evaluate, generate_samples

__all__ = ["EvalResult", "LocalTrainer", "StepSettings", "evaluate", "generate_samples", "per_example_loss"]
