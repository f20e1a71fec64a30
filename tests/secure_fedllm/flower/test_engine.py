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
from secure_fedllm.flower.simulation import APP_PYPROJECT, provision_sites, run_simulation
from secure_fedllm.site import SitePolicy, site_policy_path


@pytest.fixture(scope="module")
def reference(tiny_model_dir, tmp_path_factory):
    # 3-4 nodes tolerating a silent node: the semi-honest setting (malicious needs 2t > n + n_C; see `malicious`)
    config = tiny_config(
        tiny_model_dir,
        'secure_aggregation.protocol="secagg+"',
        "secure_aggregation.dropout_rate=0.3",
        'secure_aggregation.setting="semi-honest"',
    )
    return config, run(config, out=tmp_path_factory.mktemp("ref") / "run", progress=False)


@pytest.fixture(scope="module")
def malicious(tiny_model_dir, tmp_path_factory):
    """The default setting: every client holds an identity key and pins the roster of all clients' keys."""
    config = tiny_config(tiny_model_dir, 'secure_aggregation.protocol="secagg+"')
    assert config.secure_aggregation.setting == "malicious"
    return config, run(config, out=tmp_path_factory.mktemp("ref") / "run", progress=False)


def _nodes(config, tmp_path: Path, state: Path) -> list[dict[str, object]]:
    config.to_file(tmp_path / "config.toml")
    return [{"partition-id": i, "config": str(tmp_path / "config.toml"), "state-dir": str(state)} for i in range(3)]


def test_grid_run_equals_the_in_process_run(reference, tmp_path) -> None:
    config, ref = reference
    out, sites = tmp_path / "run", tmp_path / "sites"
    result = run_on_grid(LocalGrid(client_app, _nodes(config, tmp_path, sites)), config, out=out, log=lambda _m: None)
    assert [r.perplexity for r in result.metrics] == [r.perplexity for r in ref.metrics]
    assert result.epsilons == ref.epsilons
    assert [r.epsilon for r in result.metrics] == [r.epsilon for r in ref.metrics]  # per round, both engines
    assert result.metrics[1].seconds.model_fields_set >= {"training", "protocol_client", "protocol_server"}
    for name in ("metrics.jsonl", "report.md", "adapter/adapter_model.safetensors"):
        assert (out / name).exists(), name
    assert not (out / "ledger").exists() and not (out / "clients").exists()  # each node's state is its own
    assert json.loads(next((sites / "client-0001/ledgers").glob("*.json")).read_text())["events"][-1]["round"] == 2
    # each node bound each round's release to its one session, in its own state folder (issue 12)
    assert all(len(list((sites / f"client-{c:04d}/bindings").glob("*.json"))) == 2 for c in range(3))
    secrets = [(sites / f"client-{c:04d}/secret.key").read_bytes() for c in range(3)]
    published = b"".join(p.read_bytes() for p in out.rglob("*") if p.is_file())
    assert not any(s in published or s.hex().encode() in published for s in secrets)
    rows = result.metrics
    assert rows[1].included == [0, 1, 2] and rows[1].bytes.upload > 0 and rows[1].engine == "flower"


def test_grid_run_in_the_malicious_default_equals_the_in_process_run(malicious, tmp_path) -> None:
    config, ref = malicious
    out, sites = tmp_path / "run", tmp_path / "sites"
    nodes = _nodes(config, tmp_path, sites)
    roster = provision_sites(config, sites)  # each node's key and policy.toml, in its own state folder
    result = run_on_grid(LocalGrid(client_app, nodes), config, out=out, log=lambda _m: None)
    assert [r.perplexity for r in result.metrics] == [r.perplexity for r in ref.metrics]
    first, ref_first = result.metrics[1], ref.metrics[1]
    assert first.included == [0, 1, 2] and first.protocol is not None and first.protocol.threshold == 3
    assert first.protocol.malicious and ref_first.protocol is not None and ref_first.protocol.malicious
    policy = SitePolicy.from_file(site_policy_path(sites, 0))
    assert policy.security.roster == tuple(roster) and policy.load_identity_key() is not None
    # without the nodes' keys the malicious engine refuses to start, naming the fix
    with pytest.raises(ConfigError, match="setting='semi-honest'"):
        run_on_grid(LocalGrid(client_app, _nodes(config, tmp_path, tmp_path / "bare")), config,
                    out=tmp_path / "bare-run", log=lambda _m: None)  # fmt: skip


def test_grid_run_survives_a_silent_node_and_never_reveals_one_update(reference, tmp_path) -> None:
    config, _ = reference
    config = config.with_overrides(["federation.clients=4", "secure_aggregation.clip_range=0.1"])
    out, sites = tmp_path / "run", tmp_path / "sites"
    extra = {"partition-id": 3, "config": str(tmp_path / "config.toml"), "state-dir": str(sites)}
    nodes = [*_nodes(config, tmp_path, sites), extra]
    # node 4 (client 3) trains in round 1, then goes silent from its masked input on (the protocol stages of a
    # round share one group id; its offers share another, so it also misses the later offers)
    grid = LocalGrid(client_app, nodes, silence={4: 2})
    result = run_on_grid(grid, config, out=out, stage_timeout=0.5, log=lambda _m: None)
    first = result.metrics[1]
    assert first.included == [0, 1, 2] and first.dropped == [3]
    assert "no reply" in first.failures[3]
    # the silent client trained and was charged: its ledger says so, consistently
    ledger = json.loads(next((sites / "client-0003/ledgers").glob("*.json")).read_text())
    assert [e["round"] for e in ledger["events"]] == [1]


def test_engine_refuses_protocols_it_does_not_run(reference, tmp_path) -> None:
    """HE runs on Flower since issue 13 (test_engine_he.py); the plaintext control does not."""
    config, _ = reference
    config = config.with_overrides(['secure_aggregation.protocol="none"'])
    with pytest.raises(ConfigError, match=r"secure_aggregation\.protocol='none'"):
        run_on_grid(LocalGrid(client_app, _nodes(config, tmp_path, tmp_path)), config, out=tmp_path / "run")


def test_example_app_is_the_packaged_app() -> None:
    example = tomllib.loads((Path(__file__).parents[3] / "examples/flower_app/pyproject.toml").read_text())
    packaged = tomllib.loads(APP_PYPROJECT)
    assert example["tool"]["flwr"] == packaged["tool"]["flwr"]


@pytest.mark.integration
def test_simulation_engine_equals_the_in_process_run(malicious, tmp_path) -> None:
    """Flower's simulation engine (flwr run against a simulation SuperLink, Ray workers) end to end.

    In the malicious default: the launcher provisions each node's key and site policy, the nodes
    find them through this machine's environment, and the server lists the keys the nodes report.
    """
    config, ref = malicious
    result = run_simulation(config, out=tmp_path / "run")
    assert [r.perplexity for r in result.metrics] == [r.perplexity for r in ref.metrics]
    assert result.epsilons == ref.epsilons
    assert (tmp_path / "run" / "report.md").exists()
    assert all(r.protocol is not None and r.protocol.malicious for r in result.metrics[1:])
    roster = SitePolicy.from_file(site_policy_path(tmp_path / "run.sites", 0)).security.roster
    assert roster is not None and len(roster) == config.federation.clients
