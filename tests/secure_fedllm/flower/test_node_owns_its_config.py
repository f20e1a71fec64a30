"""A node's RunConfig copy (its privacy policy) and state folder (its ledgers, bindings) are its own.

A server that could choose them through the run config it writes could lower the node's DP floors,
or point it at an empty folder: a reset budget and forgotten release bindings (a free re-run).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("flwr")

from secure_fedllm.flower.client import node_config_path
from secure_fedllm.flower.records import FlowerIntegrationError
from secure_fedllm.site import SITES_ENV


def _context(node: dict[str, object], run: dict[str, object]) -> SimpleNamespace:
    return SimpleNamespace(node_config=node, run_config=run)


def test_the_server_cannot_choose_a_deployed_nodes_config_or_state_folder(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv(SITES_ENV, raising=False)
    server_says = {"config": str(tmp_path / "weak.toml"), "out": str(tmp_path / "fresh-run")}
    with pytest.raises(FlowerIntegrationError, match="state-dir"):
        node_config_path(_context({"partition-id": 0}, server_says))
    config, state = node_config_path(_context({"partition-id": 0, "state-dir": str(tmp_path / "mine")}, server_says))
    assert config is None  # the defaults, not the server's file
    assert state == tmp_path / "mine"


def test_the_nodes_own_settings_win(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(SITES_ENV, str(tmp_path / "launcher"))
    node = {"partition-id": 0, "config": str(tmp_path / "own.toml"), "state-dir": str(tmp_path / "mine")}
    assert node_config_path(_context(node, {"config": "weak.toml", "out": "x"})) == (
        tmp_path / "own.toml",
        tmp_path / "mine",
    )


def test_control_our_simulation_launcher_stands_in_for_the_node_config(tmp_path: Path, monkeypatch) -> None:
    """On the launcher's machine (simulation) the run config and the launcher's sites folder are used."""
    monkeypatch.setenv(SITES_ENV, str(tmp_path / "launcher"))
    config, state = node_config_path(_context({"partition-id": 0}, {"config": str(tmp_path / "run.toml"), "out": "x"}))
    assert (config, state) == (tmp_path / "run.toml", tmp_path / "launcher")
