"""The run folder: what the server may publish about a run, and the per-round checkpoint.

Layout (`RunPaths`): `config.toml`, `metrics.jsonl` (with each client's public epsilon per round),
`report.md` and its PNGs, `adapter/`, `checkpoint/` (global adapter and the last completed round)
and `data_manifest.json` (planted canaries, for the attack evaluation). Nothing secret: anyone given
the folder learns only what the server learns.

Each client's secrets (HMAC secret, identity key, noise seeds, stored outputs, session bindings)
and its ledger live in its own state folder (`secure_fedllm.site.SiteState`), in process under
`RunPaths.sites` (default: the sibling folder `<run>.sites/client-XXXX/`, mode 0700), on Flower in
each node's `state-dir`.

A checkpoint is written after the round's metrics, file by file through a temporary name that is
fsynced and renamed, so a crash leaves the previous round's checkpoint intact. Metrics rows beyond
the checkpoint (a crash between the two writes) are dropped on resume.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from pydantic import ValidationError

from ..errors import ConfigError, SecureFedLLMError
from ..files import atomic_write
from .record import RoundRecord

__all__ = ["Checkpoint", "RunFolderError", "RunInterruptedError", "RunPaths", "atomic_write", "site_folder"]


class RunFolderError(ConfigError):
    """A run folder cannot be used as asked (not empty, another run, corrupted file); names the file and the fix."""


class RunInterruptedError(SecureFedLLMError):
    """The run was interrupted (Ctrl-C); the message says how to resume from the last checkpoint."""


@dataclass(frozen=True)
class RunPaths:
    """Paths inside one run folder."""

    root: Path

    @property
    def config(self) -> Path:  # noqa: D102
        return self.root / "config.toml"

    @property
    def metrics(self) -> Path:  # noqa: D102
        return self.root / "metrics.jsonl"

    @property
    def report(self) -> Path:  # noqa: D102
        return self.root / "report.md"

    @property
    def adapter(self) -> Path:  # noqa: D102
        return self.root / "adapter"

    @property
    def checkpoint(self) -> Path:  # noqa: D102
        return self.root / "checkpoint"

    @property
    def sites(self) -> Path:
        """The default folder of the clients' state folders: `<run>.sites`, beside (never inside) the run."""
        return self.root.with_name(self.root.name + ".sites")

    def read_metrics(self) -> list[RoundRecord]:
        """All metrics rows, in order.

        Raises:
            RunFolderError: a line is not a round record (the file and line are named).
        """
        if not self.metrics.exists():
            return []
        rows = []
        for number, line in enumerate(self.metrics.read_text(errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(RoundRecord.model_validate_json(line))
            except ValidationError as exc:
                raise RunFolderError(
                    f"{self.metrics}:{number}: not a round record ({exc.errors()[0]['msg']}); "
                    "restore the file or start a new run in another folder"
                ) from None
        return rows

    def write_metrics(self, rows: list[RoundRecord]) -> None:
        """Replace metrics.jsonl with `rows`."""
        atomic_write(self.metrics, "".join(r.to_line() for r in rows).encode())


def site_folder(sites: Path, client: int) -> Path:
    """The state folder of `client` under a sites folder (or a node's `state-dir`)."""
    return sites / f"client-{client:04d}"


@dataclass(frozen=True)
class Checkpoint:
    """The last completed round, the global aggregated vector after it, and the server optimiser's state.

    `optimizer` (distributed DP's server-side Adam: first and second moments and its step count)
    is public: it is a function of the released sums only.
    """

    round: int
    global_vector: npt.NDArray[np.float32]
    optimizer: tuple[npt.NDArray[np.float32], npt.NDArray[np.float32], int] | None = None

    def save(self, paths: RunPaths) -> None:
        """Write the vectors, then the state that points at them."""
        vector = np.ascontiguousarray(self.global_vector, dtype="<f4")
        atomic_write(paths.checkpoint / f"global-{self.round:04d}.f32", vector.tobytes())
        state: dict[str, object] = {
            "round": self.round,
            "global": f"global-{self.round:04d}.f32",
            "dimension": int(vector.size),
        }
        keep = {str(state["global"])}
        if self.optimizer is not None:
            first, second, steps = self.optimizer
            for name, moment in (("m", first), ("v", second)):
                file = f"adam-{name}-{self.round:04d}.f32"
                atomic_write(paths.checkpoint / file, np.ascontiguousarray(moment, dtype="<f4").tobytes())
                keep.add(file)
            state["optimizer"] = {
                "m": f"adam-m-{self.round:04d}.f32",
                "v": f"adam-v-{self.round:04d}.f32",
                "steps": steps,
            }
        atomic_write(paths.checkpoint / "state.json", json.dumps(state).encode())
        for pattern in ("global-*.f32", "adam-*.f32"):
            for old in paths.checkpoint.glob(pattern):
                if old.name not in keep:
                    old.unlink()

    @classmethod
    def load(cls, paths: RunPaths) -> Checkpoint | None:
        """The last checkpoint, or None if there is none."""
        state_file = paths.checkpoint / "state.json"
        if not state_file.exists():
            return None
        fix = "restore the checkpoint folder or start a new run in another folder"
        try:
            state = json.loads(state_file.read_text())
            name, round_number, dimension = str(state["global"]), int(state["round"]), int(state["dimension"])
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
            raise RunFolderError(f"{state_file}: not a checkpoint state ({type(exc).__name__}: {exc}); {fix}") from None
        vector_file = paths.checkpoint / Path(name).name
        if not vector_file.is_file():
            raise RunFolderError(f"{state_file}: names {vector_file.name}, which is missing; {fix}")
        data = vector_file.read_bytes()
        if len(data) % 4 or len(data) // 4 != dimension:
            raise RunFolderError(f"{vector_file}: {len(data)} bytes, expected {dimension} float32 values; {fix}")
        vector = np.frombuffer(data, dtype="<f4").copy()
        if not np.isfinite(vector).all():
            raise RunFolderError(f"{vector_file}: holds NaN or infinite values; {fix}")
        optimizer = None
        if "optimizer" in state:
            moments = []
            for name in ("m", "v"):
                file = paths.checkpoint / Path(str(state["optimizer"][name])).name
                raw = file.read_bytes() if file.is_file() else b""
                if len(raw) != 4 * dimension:
                    raise RunFolderError(f"{file}: missing or not {dimension} float32 values; {fix}")
                moments.append(np.frombuffer(raw, dtype="<f4").copy())
            optimizer = (moments[0], moments[1], int(state["optimizer"]["steps"]))
        return cls(round=round_number, global_vector=vector, optimizer=optimizer)
