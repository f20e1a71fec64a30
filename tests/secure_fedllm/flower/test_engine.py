"""Our LoRA + DP-SGD job on Flower: LocalGrid and Flower's simulation engine give the in-process run's numbers."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest

pytest.importorskip("flwr")

from test_runner import tiny_config

from secure_fedllm import run
from secure_fedllm.errors import ConfigError
from secure_fedllm.flower import LocalGrid
from secure_fedllm.flower.app import client_app
from secure_fedllm.flower.server import run_on_grid
from secure_fedllm.flower.simulation import APP_PYPROJECT, run_simulation


@pytest.fixture(scope="module")
def reference(tiny_model_dir, tmp_path_factory):
    config = tiny_config(tiny_model_dir, 'secure_aggregation.protocol="secagg+"', "secure_aggregation.dropout_rate=0.3")
    return config, run(config, out=tmp_path_factory.mktemp("ref") / "run", progress=False)


def _nodes(config, tmp_path: Path, state: Path) -> list[dict[str, object]]:
    config.to_file(tmp_path / "config.toml")
    return [{"partition-id": i, "config": str(tmp_path / "config.toml"), "state-dir": str(state)} for i in range(3)]


def test_grid_run_equals_the_in_process_run(reference, tmp_path) -> None:
    config, ref = reference
    out = tmp_path / "run"
    result = run_on_grid(LocalGrid(client_app, _nodes(config, tmp_path, out)), config, out=out, log=lambda _m: None)
    assert [r["perplexity"] for r in result.metrics] == [r["perplexity"] for r in ref.metrics]
    assert result.epsilons == ref.epsilons
    for name in ("metrics.jsonl", "report.md", "adapter/adapter_model.safetensors", "ledger/client-0000.json"):
        assert (out / name).exists(), name
    assert json.loads((out / "ledger/client-0001.json").read_text())["events"][-1]["round"] == 2
    rows = result.metrics
    assert rows[1]["included"] == [0, 1, 2] and rows[1]["bytes"]["upload"] > 0


def test_grid_run_survives_a_silent_node_and_never_reveals_one_update(reference, tmp_path) -> None:
    config, _ = reference
    config = config.with_overrides(["federation.clients=4", "secure_aggregation.clip_range=0.1"])
    out = tmp_path / "run"
    extra = {"partition-id": 3, "config": str(tmp_path / "config.toml"), "state-dir": str(out)}
    nodes = [*_nodes(config, tmp_path, out), extra]
    # node 4 (client 3) trains in round 1, then goes silent from its masked input on (the protocol stages of a
    # round share one group id; its offers share another, so it also misses the later offers)
    grid = LocalGrid(client_app, nodes, silence={4: 2})
    result = run_on_grid(grid, config, out=out, stage_timeout=0.5, log=lambda _m: None)
    first = result.metrics[1]
    assert first["included"] == [0, 1, 2] and first["dropped"] == [3]
    assert "no reply" in first["failures"]["3"]
    # the silent client trained and was charged: its ledger says so, consistently
    ledger = json.loads((out / "ledger/client-0003.json").read_text())
    assert [e["round"] for e in ledger["events"]] == [1]


def test_engine_refuses_protocols_it_does_not_run(reference, tmp_path) -> None:
    config, _ = reference
    config = config.with_overrides(['secure_aggregation.protocol="he-bfv"'])
    with pytest.raises(ConfigError, match=r"secure_aggregation\.protocol"):
        run_on_grid(LocalGrid(client_app, _nodes(config, tmp_path, tmp_path)), config, out=tmp_path / "run")


def test_example_app_is_the_packaged_app() -> None:
    example = tomllib.loads((Path(__file__).parents[3] / "examples/flower_app/pyproject.toml").read_text())
    packaged = tomllib.loads(APP_PYPROJECT)
    assert example["tool"]["flwr"] == packaged["tool"]["flwr"]


def test_simulation_engine_equals_the_in_process_run(reference, tmp_path) -> None:
    """Flower's simulation engine (flwr run against a simulation SuperLink, Ray workers) end to end."""
    config, ref = reference
    result = run_simulation(config, out=tmp_path / "run")
    assert [r["perplexity"] for r in result.metrics] == [r["perplexity"] for r in ref.metrics]
    assert result.epsilons == ref.epsilons
    assert (tmp_path / "run" / "report.md").exists()
