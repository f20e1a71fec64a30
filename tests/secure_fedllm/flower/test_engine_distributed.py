"""Issue 14: distributed DP-SGD runs on the Flower engine and gives the in-process engine's numbers.

Each DP step is one full-SecAgg round; the ClientApp returns its integer vector (rounded unit
gradients plus its Skellam share), the Mod masks it as a ring input, the server decodes the exact
integer sum and takes the Adam step. Client-level DP (`privacy.unit = "client"`) sums rotated,
clipped whole updates of the rotation's power-of-two length, which the server un-rotates. With
the reproducible noise seed the two engines release the same sums, so perplexities, epsilons and
the protocol facts agree exactly.
"""

from __future__ import annotations

import pytest

pytest.importorskip("flwr")

from test_runner import tiny_config

from secure_fedllm import run
from secure_fedllm.flower import LocalGrid
from secure_fedllm.flower.app import client_app
from secure_fedllm.flower.server import run_on_grid
from secure_fedllm.flower.simulation import provision_sites


def _config(model_dir, unit: str):
    return tiny_config(
        model_dir,
        'privacy.mode="distributed"',
        f'privacy.unit="{unit}"',
        "federation.local_steps=2",
        'secure_aggregation.protocol="secagg"',
        "federation.clients=4",
        "federation.rounds=1",
        "secure_aggregation.dropout_rate=0.1",
        "evaluation.generations=0",
    )


# the client-level case runs in the integration tier, whose second worker has room beside the TLS deployments
@pytest.mark.parametrize("unit", ["record", pytest.param("client", marks=pytest.mark.integration)])
def test_grid_run_in_distributed_mode_equals_the_in_process_run(tiny_model_dir, tmp_path, unit) -> None:
    config = _config(tiny_model_dir, unit)
    ref = run(config, out=tmp_path / "ref", progress=False)
    out, sites = tmp_path / "run", tmp_path / "sites"
    config.to_file(tmp_path / "config.toml")
    nodes = [{"partition-id": i, "config": str(tmp_path / "config.toml"), "state-dir": str(sites)} for i in range(4)]
    provision_sites(config, sites)  # each node's key and a policy with distributed_noise (full SecAgg, t >= n - d_max)
    result = run_on_grid(LocalGrid(client_app, nodes), config, out=out, log=lambda _m: None)
    assert [r.perplexity for r in result.metrics] == [r.perplexity for r in ref.metrics]
    if unit == "record":
        assert result.metrics[-1].perplexity < result.metrics[0].perplexity  # it learns
    assert result.epsilons == ref.epsilons
    first, ref_first = result.metrics[1], ref.metrics[1]
    assert first.engine == "flower" and first.included == ref_first.included == [0, 1, 2, 3]
    assert first.distributed == ref_first.distributed
    assert first.protocol is not None and ref_first.protocol is not None
    # full SecAgg with t >= n - d_max on both engines (n = 4, d_max = ceil(0.4) = 1)
    assert first.protocol.neighbours == ref_first.protocol.neighbours == 3
    assert first.protocol.threshold == ref_first.protocol.threshold == 3
