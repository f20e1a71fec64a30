"""Re-export for tests: the tiny random LLaMA lives in `secure_fedllm.tiny_model`."""

from secure_fedllm.tiny_model import CHATML, save_tiny_llama

__all__ = ["CHATML", "save_tiny_llama"]
