"""The one error hierarchy of `secure_fedllm`."""

from __future__ import annotations

__all__ = ["ConfigError", "SecureFedLLMError"]


class SecureFedLLMError(Exception):
    """Root of every error raised by `secure_fedllm`."""


class ConfigError(SecureFedLLMError, ValueError):
    """A configuration value is invalid; the message names the field and the fix."""
