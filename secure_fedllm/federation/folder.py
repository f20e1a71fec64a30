"""Opening a run folder without losing data: read and check everything first, write only after.

`open_run_folder` only reads. It accepts a new or empty folder (a new run), or a folder holding a
run of the same configuration (continued from its last checkpoint; a finished one is left as it
is), and refuses anything else naming the folder and the fix: a folder with other files in it, a run
of another configuration, a corrupted checkpoint or metrics file. `RunFolder.begin` writes the
configuration once every check of the job has passed, and `RunFolder.abandon` removes what a
failed start wrote before its first checkpoint, so the corrected rerun is not refused.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from ..config import RunConfig
from ..errors import ConfigError
from ..files import atomic_write
from .checkpoint import Checkpoint, RunFolderError, RunPaths
from .record import RoundRecord

__all__ = ["RunFolder", "open_run_folder"]

SIDECAR = "secure_fedllm_adapter.json"


@dataclass
class RunFolder:
    """A checked run folder: its configuration, last checkpoint and the rows up to it."""

    paths: RunPaths
    config: RunConfig
    checkpoint: Checkpoint | None
    rows: list[RoundRecord]
    new: bool
    """Nothing of an earlier run is there: this run writes config.toml (and `abandon` may remove it)."""
    existed: bool
    """The folder existed (empty) before: `abandon` empties it rather than removing it."""
    _written: list[Path] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        """Every round is checkpointed and the adapter and report are written: nothing left to do."""
        return (
            self.checkpoint is not None
            and self.checkpoint.round >= self.config.federation.rounds
            and (self.paths.adapter / SIDECAR).is_file()
            and self.paths.report.is_file()
            and len(self.rows) == self.config.federation.rounds + 1
        )

    @property
    def start(self) -> int:
        """The first round still to run (rounds + 1 when only the adapter and report are missing)."""
        return self.checkpoint.round + 1 if self.checkpoint is not None else 0

    def begin(self, canaries: list[dict[str, object]]) -> None:
        """Write config.toml (new runs) and the canary manifest; called after every check has passed."""
        if self.new:
            self.paths.root.mkdir(parents=True, exist_ok=True)
            self._written.append(self.paths.config)
            self.config.to_file(self.paths.config)
        manifest = self.paths.root / "data_manifest.json"
        if canaries and not manifest.exists():
            import json

            self._written.append(manifest)
            atomic_write(manifest, json.dumps({"canaries": canaries}, indent=1).encode())

    def abandon(self) -> None:
        """Undo a new run's writes when it failed before its first checkpoint (nothing worth keeping)."""
        if not self.new or Checkpoint.load(self.paths) is not None:
            return
        if not self.existed:
            shutil.rmtree(self.paths.root, ignore_errors=True)
            return
        for path in [*self._written, self.paths.metrics, self.paths.checkpoint]:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            elif path.exists():
                path.unlink()


def open_run_folder(config: RunConfig | None, out: str | Path | None, resume: str | Path | None) -> RunFolder:
    """Check the folder a run would use, writing nothing.

    Raises:
        RunFolderError: not a folder, not empty and not a run, a run of another configuration, a
            corrupted config.toml, checkpoint or metrics file; the message names the file and the fix.
        ConfigError: `resume` names no run, or `config` differs from the resumed run's.
    """
    if resume is not None:
        paths = RunPaths(Path(resume))
        if not paths.config.is_file():
            raise ConfigError(f"--resume {resume}: no config.toml there; is it a run folder?")
        saved = _saved_config(paths)
        if config is not None and config != saved:
            raise ConfigError(f"--resume {resume}: the given config differs from the run's config.toml; drop it")
        return _existing(paths, saved)
    config = config or RunConfig()
    root = Path(out) if out is not None else Path("runs") / time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    paths = RunPaths(root)
    if root.exists() and not root.is_dir():
        raise RunFolderError(f"--out {root}: is a file, not a folder; give a new or empty folder")
    if not root.exists():
        return RunFolder(paths, config, None, [], new=True, existed=False)
    if paths.config.is_file():
        saved = _saved_config(paths)
        if saved != config:
            raise RunFolderError(
                f"--out {root}: holds a run of another configuration (its config.toml); continue it with "
                f"--resume {root}, or give a new or empty folder for this one"
            )
        return _existing(paths, saved)
    if any(root.iterdir()):
        raise RunFolderError(
            f"--out {root}: is not empty and holds no run (no config.toml); give a new or empty folder, "
            "so that nothing in it is overwritten"
        )
    return RunFolder(paths, config, None, [], new=True, existed=True)


def _saved_config(paths: RunPaths) -> RunConfig:
    try:
        return RunConfig.from_file(paths.config)
    except (ValidationError, ValueError, OSError) as exc:
        if isinstance(exc, ConfigError) and str(paths.config) in str(exc):
            raise
        raise RunFolderError(
            f"{paths.config}: not a readable run configuration ({type(exc).__name__}); restore it, or give a new "
            "or empty folder"
        ) from None


def _existing(paths: RunPaths, config: RunConfig) -> RunFolder:
    checkpoint = Checkpoint.load(paths)
    if checkpoint is not None and checkpoint.round > config.federation.rounds:
        raise RunFolderError(
            f"{paths.checkpoint / 'state.json'}: round {checkpoint.round} is past federation.rounds="
            f"{config.federation.rounds}; restore the checkpoint or start a new run in another folder"
        )
    rows = [r for r in paths.read_metrics() if checkpoint is not None and r.round <= checkpoint.round]
    if checkpoint is not None and [r.round for r in rows] != list(range(checkpoint.round + 1)):
        raise RunFolderError(
            f"{paths.metrics}: rows {[r.round for r in rows]} do not reach the checkpoint's round "
            f"{checkpoint.round}; restore the file or start a new run in another folder"
        )
    return RunFolder(paths, config, checkpoint, rows, new=checkpoint is None and not rows, existed=True)
