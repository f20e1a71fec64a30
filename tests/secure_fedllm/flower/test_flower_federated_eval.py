"""Federated evaluation on Flower (issue 13): the LocalGrid run gives the in-process run's figures, one session each."""

from __future__ import annotations

import pytest

pytest.importorskip("flwr")

from test_runner import tiny_config

from secure_fedllm import run
from secure_fedllm.federation.checkpoint import Checkpoint, RunPaths
from secure_fedllm.federation.evaluation import EvaluationSettings
from secure_fedllm.federation.federation import Job
from secure_fedllm.federation.record import RoundRecord
from secure_fedllm.flower import LocalGrid
from secure_fedllm.flower.app import client_app
from secure_fedllm.flower.server import GridTransport, run_on_grid
from secure_fedllm.flower.simulation import provision_sites

FEDERATED = ('evaluation.mode="federated"', "evaluation.loss_clip=8.0")


@pytest.fixture(scope="module")
def both(tiny_model_dir, tmp_path_factory):
    """The same federated-evaluation job in process and on a LocalGrid (malicious default, reproducible noise)."""
    config = tiny_config(tiny_model_dir, *FEDERATED)
    reference = run(config, out=tmp_path_factory.mktemp("ref") / "run", progress=False)
    folder = tmp_path_factory.mktemp("grid")
    config.to_file(folder / "config.toml")
    sites = folder / "sites"
    nodes = [{"partition-id": i, "config": str(folder / "config.toml"), "state-dir": str(sites)} for i in range(3)]
    provision_sites(config, sites)  # each node's identity key and policy.toml, in its own state folder
    grid = LocalGrid(client_app, nodes)
    result = run_on_grid(grid, config, out=folder / "run", log=lambda _m: None)
    return config, reference, result, grid, sites


def test_grid_federated_evaluation_equals_the_in_process_one(both):
    _, reference, result, _, sites = both
    for ours, theirs in zip(result.metrics, reference.metrics, strict=True):
        assert ours.federated_evaluation is not None and theirs.federated_evaluation is not None
        assert ours.federated_evaluation.sites == [0, 1, 2]
        mine, ref = ours.federated_evaluation, theirs.federated_evaluation
        # Reproducible mode: the same noise draw on both engines. The pre-noise loss sums are float32
        # forward passes whose batching can differ between engines (seen: 3.5e-6 relative), so compare
        # to 1e-4 relative: five orders of magnitude below the noise std, which a different draw would show.
        assert mine.count == ref.count and mine.loss_sum == pytest.approx(ref.loss_sum, rel=1e-4)
        assert abs(mine.loss_sum - ref.loss_sum) < 1e-3 * EvaluationSettings.of(both[0]).sigma
        assert mine.perplexity == pytest.approx(ref.perplexity, rel=1e-4, nan_ok=True)
        assert mine.epsilon == ref.epsilon and ours.epsilon == theirs.epsilon
    # each node bound each release to its one session: 2 training rounds and 3 evaluations
    assert all(len(list((sites / f"client-{c:04d}/bindings").glob("*.json"))) == 5 for c in range(3))
    assert "### Federated evaluation" in (result.out / "report.md").read_text()


def test_a_server_asking_again_for_an_evaluated_round_gets_nothing_new(both, tmp_path):
    """A second session for round 2's model: each node's release is bound to its first session, so it refuses."""
    config, _, result, grid, sites = both
    ledgers = {p: p.read_text() for p in sites.glob("client-*/ledgers/*.json")}
    transport = GridTransport(grid, config, log=lambda _m: None)
    transport.start(Job.build(config), RunPaths(tmp_path / "again"))
    checkpoint = Checkpoint.load(RunPaths(result.out))
    assert checkpoint is not None and checkpoint.round == 2
    record = RoundRecord(round=2, engine="flower")
    transport.evaluate(2, checkpoint.global_vector, record)
    fe = record.federated_evaluation
    assert fe is not None and fe.loss_sum is None and "aborted" in (fe.aborted or "")  # no second sum: bound releases
    assert {p: p.read_text() for p in sites.glob("client-*/ledgers/*.json")} == ledgers  # nothing charged again
    # a model that is not this job's round-2 model is refused at the query already
    moved = checkpoint.global_vector + 0.01
    record = RoundRecord(round=2, engine="flower")
    transport.evaluate(2, moved, record)
    assert record.federated_evaluation is not None and record.federated_evaluation.aborted
    assert all("already evaluated" in why for why in record.federated_evaluation.sat_out.values())
