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
from typing import Any

import numpy as np
import numpy.typing as npt

from ..files import atomic_write

__all__ = ["Checkpoint", "RunPaths", "atomic_write", "site_folder"]


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

    def read_metrics(self) -> list[dict[str, Any]]:
        """All metrics rows, in order."""
        if not self.metrics.exists():
            return []
        return [json.loads(line) for line in self.metrics.read_text().splitlines() if line.strip()]

    def write_metrics(self, rows: list[dict[str, Any]]) -> None:
        """Replace metrics.jsonl with `rows`."""
        atomic_write(self.metrics, "".join(json.dumps(r) + "\n" for r in rows).encode())


def site_folder(sites: Path, client: int) -> Path:
    """The state folder of `client` under a sites folder (or a node's `state-dir`)."""
    return sites / f"client-{client:04d}"


@dataclass(frozen=True)
class Checkpoint:
    """The last completed round and the global aggregated vector after it."""

    round: int
    global_vector: npt.NDArray[np.float32]

    def save(self, paths: RunPaths) -> None:
        """Write the vector, then the state that points at it."""
        vector = np.ascontiguousarray(self.global_vector, dtype="<f4")
        atomic_write(paths.checkpoint / f"global-{self.round:04d}.f32", vector.tobytes())
        state = {"round": self.round, "global": f"global-{self.round:04d}.f32", "dimension": int(vector.size)}
        atomic_write(paths.checkpoint / "state.json", json.dumps(state).encode())
        for old in paths.checkpoint.glob("global-*.f32"):
            if old.name != state["global"]:
                old.unlink()

    @classmethod
    def load(cls, paths: RunPaths) -> Checkpoint | None:
        """The last checkpoint, or None if there is none."""
        state_file = paths.checkpoint / "state.json"
        if not state_file.exists():
            return None
        state = json.loads(state_file.read_text())
        vector = np.frombuffer((paths.checkpoint / state["global"]).read_bytes(), dtype="<f4").copy()
        if vector.size != state["dimension"]:
            raise ValueError(
                f"{paths.checkpoint}: global vector has {vector.size} values, expected {state['dimension']}"
            )
        return cls(round=int(state["round"]), global_vector=vector)
