"""The `secure-fedllm` console script: every command, assembled here and nowhere else.

`secure_fedllm` must not import `threat_models` (imports point one way), so the one app that holds
both packages' commands lives above both. Each command is listed explicitly below; neither package
registers anything on the other's app. Errors take `secure_fedllm.cli.run_cli`'s one path: a user
error (of either package, a usage error, an OSError naming a path) is one line,
`error: <where>: <problem>; <fix>`, and exit status 2; a bug keeps its traceback.
"""

from __future__ import annotations

from collections.abc import Sequence

import typer

from secure_fedllm import cli as core
from secure_fedllm.errors import SecureFedLLMError
from threat_models import cli as threats
from threat_models.errors import ThreatModelError

__all__ = ["USER_ERRORS", "app", "build_app", "main"]

USER_ERRORS: tuple[type[BaseException], ...] = (SecureFedLLMError, ThreatModelError)
"""Errors whose message is for the user (`<where>: <problem>; <fix>`), printed as one line."""


def build_app() -> typer.Typer:
    """The full `secure-fedllm` app."""
    app = core.new_app()
    app.command("run")(core.run)
    app.command("init-config")(core.init_config)
    app.add_typer(core.budget_commands(), name="budget")
    app.command("demo")(core.demo)
    app.command("tiny-model")(core.tiny_model)
    app.command("evaluate")(threats.evaluate)
    return app


app = build_app()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `secure-fedllm` console script; returns the exit status."""
    return core.run_cli(app, argv, user_errors=USER_ERRORS)
