"""The one error hierarchy of `secure_fedllm`."""

from __future__ import annotations

__all__ = ["ConfigError", "PrivacyBudgetExhaustedError", "ReleaseBindingError", "SecureFedLLMError"]


class SecureFedLLMError(Exception):
    """Root of every error raised by `secure_fedllm`."""


class ConfigError(SecureFedLLMError, ValueError):
    """A configuration value is invalid; the message names the field and the fix."""


class PrivacyBudgetExhaustedError(SecureFedLLMError):
    """A DP release would take a client past its epsilon budget; nothing was charged.

    Attributes:
        spent: epsilon already spent.
        requested: epsilon the release would have reached.
        budget: the client's budget.
    """

    def __init__(self, message: str, *, spent: float, requested: float, budget: float) -> None:
        super().__init__(message)
        self.spent, self.requested, self.budget = spent, requested, budget


class ReleaseBindingError(SecureFedLLMError):
    """A site refused to send (or answer for) a release outside the one session it is bound to.

    A masked input or ciphertext that went to one session must never enter a second one: the server
    could difference the two sums and recover the update exactly.
    """
