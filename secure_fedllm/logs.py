"""Where a run's progress goes: a terminal, a pipe or file, and JSON lines; and quiet libraries.

A terminal gets rich output (a progress bar, lines wrapped by the terminal itself, never broken by
rich). Anything else (a pipe, a file, a CI log) gets plain lines, one per event, unwrapped and free
of control codes, so `grep` and `tail -f` work and a long path stays on one line. `--log-json`
adds one JSON object per event (every progress line, each round's public record, each warning,
the result) to a file or to stdout, for programs rather than people.

`quiet_libraries` is `--quiet` for the libraries underneath: the progress bars and info logging of
transformers, huggingface_hub, datasets and tqdm, which otherwise leak through a quiet run. It
restores what it changed when the run ends, so a program that runs several federations in one
process gets its own settings back.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from pathlib import Path
from typing import IO, Any

__all__ = ["LIBRARY_LOGGERS", "RunLog", "json_safe", "quiet_libraries"]

LIBRARY_LOGGERS = ("transformers", "peft", "opacus", "accelerate", "huggingface_hub", "datasets", "flwr")
"""Loggers `quiet_libraries` raises to ERROR (restored afterwards)."""


class RunLog:
    """A run's human output (rich on a terminal, plain lines otherwise) and its optional JSON-lines log.

    Args:
        progress: show progress lines (and, on a terminal, a progress bar); False keeps only the JSON log.
        stream: where human output goes (default: `sys.stdout` at construction).
        json_path: the JSON-lines log: a file path (created or truncated), "-" for stdout, or None.
        terminal: force terminal (True) or plain (False) output; None asks `stream.isatty()`.
    """

    def __init__(
        self,
        *,
        progress: bool = True,
        stream: IO[str] | None = None,
        json_path: str | Path | None = None,
        terminal: bool | None = None,
    ) -> None:
        self.progress = progress
        self.stream: IO[str] = stream if stream is not None else sys.stdout
        self.terminal = bool(self.stream.isatty()) if terminal is None else terminal
        self._json: IO[str] | None = None
        self._owns_json = False
        if json_path is not None and str(json_path) == "-":
            self._json = sys.stdout
        elif json_path is not None:
            self._json = Path(json_path).open("w", encoding="utf-8")  # closed by close()
            self._owns_json = True
        self.console: Any = None
        if progress and self.terminal:
            from rich.console import Console

            self.console = Console(file=self.stream, soft_wrap=True, highlight=False)

    # -- events ----------------------------------------------------------------------------------

    def line(self, text: str) -> None:
        """One progress line: on the terminal, or as a plain line, and as a JSON `log` event."""
        self.event("log", message=text)
        if not self.progress:
            return
        if self.console is not None:
            self.console.print(text, markup=False, highlight=False, soft_wrap=True)
        else:
            self.stream.write(text + "\n")
            self.stream.flush()

    def round(self, record: Any) -> None:
        """A round's public record (what `metrics.jsonl` holds, without the sample generations) as a JSON event."""
        if self._json is not None:
            self.event("round", **record.model_dump(mode="json", exclude={"samples"}))

    def warning(self, message: str, category: type[Warning] = UserWarning, *, stacklevel: int = 2) -> None:
        """A Python warning of `category` (shown as warnings are) and a JSON `warning` event."""
        self.event("warning", category=category.__name__, message=message)
        warnings.warn(message, category, stacklevel=stacklevel + 1)

    def event(self, kind: str, **fields: Any) -> None:
        """One JSON object on its own line: {"event": kind, "time": unix seconds, **fields}; flushed at once.

        Strict JSON: a NaN or infinite number (a perplexity from a noised count, an unbounded budget) is null.
        """
        if self._json is None:
            return
        record = json_safe({"event": kind, "time": round(time.time(), 3), **fields})
        self._json.write(json.dumps(record, default=str, allow_nan=False) + "\n")
        self._json.flush()

    # -- progress bar ----------------------------------------------------------------------------

    def rounds_bar(self) -> tuple[AbstractContextManager[Any], Callable[[int, int], None]]:
        """A progress bar for rounds (terminal only) and its `update(completed, total)`; a no-op elsewhere.

        The bar appears at the first update (after round 0), not before: what the run prints while it
        sets up (warnings on stderr, library messages) would otherwise be drawn over by the live bar.
        """
        if self.console is None:
            return nullcontext(), lambda completed, total: None
        bar = _LazyBar(self.console)
        return bar, bar.update

    def close(self) -> None:
        """Close the JSON log file (stdout is left open)."""
        if self._json is not None and self._owns_json:
            self._json.close()
        self._json = None

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _LazyBar:
    """A rich progress bar over rounds, started at its first update and stopped when the block ends."""

    def __init__(self, console: Any) -> None:
        self.console = console
        self.bars: Any = None
        self.task: Any = None

    def update(self, completed: int, total: int) -> None:
        if self.bars is None:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            self.bars = Progress(
                TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                TimeElapsedColumn(), console=self.console, transient=True,
            )  # fmt: skip
            self.task = self.bars.add_task("rounds", total=total)
            self.bars.start()
        self.bars.update(self.task, total=total, completed=completed)

    def __enter__(self) -> _LazyBar:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bars is not None:
            self.bars.stop()


def json_safe(value: Any) -> Any:
    """`value` with NaN and infinities made null: JSON has no such numbers, and strict parsers refuse them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


@contextmanager
def quiet_libraries() -> Iterator[None]:
    """Silence the progress bars and info logging of transformers, huggingface_hub, datasets and tqdm.

    Set for the duration of the block and restored after it. `TQDM_DISABLE=1` is exported too:
    tqdm reads it when a process imports it, so it quiets child processes (Flower's simulation
    engine) rather than this one, whose libraries are switched off directly.
    """
    with ExitStack() as stack:
        previous_env = os.environ.get("TQDM_DISABLE")
        os.environ["TQDM_DISABLE"] = "1"
        stack.callback(_restore_env, "TQDM_DISABLE", previous_env)
        for name in LIBRARY_LOGGERS:
            logger = logging.getLogger(name)
            stack.callback(logger.setLevel, logger.level)
            logger.setLevel(logging.ERROR)
        _quiet_transformers(stack)
        _quiet_hub(stack)
        _quiet_datasets(stack)
        yield


def _restore_env(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def _quiet_transformers(stack: ExitStack) -> None:
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - transformers is a dependency
        return
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    stack.callback(hf_logging.set_verbosity, verbosity)
    if bars:
        stack.callback(hf_logging.enable_progress_bar)


def _quiet_hub(stack: ExitStack) -> None:
    try:
        from huggingface_hub.utils import (  # type: ignore[attr-defined,unused-ignore]
            are_progress_bars_disabled,
            disable_progress_bars,
            enable_progress_bars,
        )
    except ImportError:  # pragma: no cover - installed with transformers
        return
    if not are_progress_bars_disabled():
        disable_progress_bars()
        stack.callback(enable_progress_bars)


def _quiet_datasets(stack: ExitStack) -> None:
    if "datasets" not in sys.modules:  # never import it just to silence it (slow; optional)
        return
    try:
        from datasets.utils import logging as ds_logging  # type: ignore[import-not-found,unused-ignore]
    except ImportError:  # pragma: no cover
        return
    if ds_logging.is_progress_bar_enabled():
        ds_logging.disable_progress_bar()
        stack.callback(ds_logging.enable_progress_bar)
