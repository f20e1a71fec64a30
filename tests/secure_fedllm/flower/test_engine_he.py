"""Issue 13: HE-BFV and HE-CKKS on the Flower engine give the in-process engine's numbers.

Both engines build the round from `round_family`; the Mod runs the HE client session through the
family, persisting it in `Context.state` between messages. The sites run the malicious setting
(identity keys, so HE hellos are signed) with corrupt_fraction=0, the only assumption under which
a site's policy lets it use HE at all (one key holder). CKKS releases the exact integer sum of the
quantized updates, so its run is bit-identical to the in-process one too.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("flwr")

from test_rerun import RecordingGrid
from test_runner import tiny_config

from secure_fedllm import ConfigError, run
from secure_fedllm.flower import LocalGrid
from secure_fedllm.flower.app import client_app
from secure_fedllm.flower.server import run_on_grid
from secure_fedllm.flower.simulation import provision_sites


def _config(model_dir, protocol: str):
    return tiny_config(
        model_dir,
        f'secure_aggregation.protocol="{protocol}"',
        "secure_aggregation.corrupt_fraction=0.0",
        "federation.rounds=1",
        "evaluation.generations=0",
    )


def _nodes(config, tmp_path: Path, state: Path) -> list[dict[str, object]]:
    config.to_file(tmp_path / "config.toml")
    return [{"partition-id": i, "config": str(tmp_path / "config.toml"), "state-dir": str(state)} for i in range(3)]


@pytest.mark.parametrize("protocol", ["he-bfv", "he-ckks"])
def test_grid_run_with_he_equals_the_in_process_run(tiny_model_dir, tmp_path, protocol) -> None:
    config = _config(tiny_model_dir, protocol)
    assert config.secure_aggregation.setting == "malicious"
    ref = run(config, out=tmp_path / "ref", progress=False)
    out, sites = tmp_path / "run", tmp_path / "sites"
    nodes = _nodes(config, tmp_path, sites)
    provision_sites(config, sites)  # each node's key and a policy choosing protocol "he" with n_C = 0
    result = run_on_grid(LocalGrid(client_app, nodes), config, out=out, log=lambda _m: None)
    assert [r.perplexity for r in result.metrics] == [r.perplexity for r in ref.metrics]
    assert result.epsilons == ref.epsilons
    first, ref_first = result.metrics[1], ref.metrics[1]
    assert first.engine == "flower" and first.included == ref_first.included == [0, 1, 2]
    assert first.protocol is not None and ref_first.protocol is not None
    assert first.protocol.threshold == ref_first.protocol.threshold == 3  # min_contributions, same knob
    assert first.protocol.malicious and ref_first.protocol.malicious  # signed hellos on both engines
    assert first.quantization_bound == ref_first.quantization_bound
    # each node bound its release to the one HE session its ciphertext went to
    assert all(len(list((sites / f"client-{c:04d}/bindings").glob("*.json"))) == 1 for c in range(3))
    # the same protocol messages on both engines: the same upload, byte for byte
    assert first.bytes.upload == ref_first.bytes.upload > 0


def test_he_on_flower_is_refused_by_sites_that_assume_a_corrupt_client(tiny_model_dir, tmp_path) -> None:
    """Sites keep the default corrupt_fraction (0.05); a server that claims n_C = 0 and announces HE is refused.

    Our own server refuses this config up front (`check_setting`); a deviating server skips that, so
    the server here runs a config with corrupt_fraction=0 while every site's policy file keeps 0.05.
    """
    site_config = tiny_config(tiny_model_dir, 'secure_aggregation.protocol="he-bfv"', "federation.rounds=1",
                              "evaluation.generations=0")  # fmt: skip
    with pytest.raises(ConfigError, match="corrupt_fraction"):  # an honest server refuses before any node works
        run_on_grid(RecordingGrid(client_app, {}), site_config, out=tmp_path / "honest", log=lambda _m: None)
    config = site_config.with_overrides(["secure_aggregation.corrupt_fraction=0"])
    out, sites = tmp_path / "run", tmp_path / "sites"
    nodes = _nodes(site_config, tmp_path, sites)
    provision_sites(site_config, sites)
    grid = RecordingGrid(client_app, nodes)
    grid.errors = []
    result = run_on_grid(grid, config, out=out, log=lambda _m: None)
    first = result.metrics[1]
    assert first.aborted and first.included == []
    assert sorted(first.failures) == [0, 1, 2] and all("corrupt_fraction" in w for w in first.failures.values())
    assert len(grid.errors) == 3 and all("corrupt_fraction=0.05" in why for why in grid.errors), grid.errors
    for c in range(3):  # refused before training: no privacy budget spent
        assert all(not json.loads(f.read_text())["events"] for f in (sites / f"client-{c:04d}").glob("ledgers/*.json"))
    assert not any(any((sites / f"client-{c:04d}").glob("bindings/*.json")) for c in range(3))
