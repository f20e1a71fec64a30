"""Flower's simulation engine, 10 SuperNodes, dropouts: the ring sum equals our in-process driver's, bit for bit."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flwr")

from protocols import RoundStep, SecAggParams, run_round
from secure_fedllm.flower.simulation import flwr_run, simulation_superlink

HERE = Path(__file__).parent
PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "sim-protocol-app"
version = "1.0.0"
description = "test app"
license = "Apache-2.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "secure-fedllm-tests"

[tool.flwr.app.components]
serverapp = "sim_protocol_app:server_app"
clientapp = "sim_protocol_app:client_app"

[tool.flwr.app.config]
out = ""
"""


@pytest.mark.integration  # a simulation SuperLink and Ray workers
def test_ten_supernodes_with_dropouts_match_our_driver_bit_for_bit(tmp_path) -> None:
    sys.path.insert(0, str(HERE))
    try:
        import sim_protocol_app as app
    finally:
        sys.path.remove(str(HERE))
    folder = tmp_path / "app"
    folder.mkdir()
    (folder / "pyproject.toml").write_text(PYPROJECT)
    shutil.copy(HERE / "sim_protocol_app.py", folder / "sim_protocol_app.py")
    out = tmp_path / "result.json"
    with simulation_superlink(tmp_path / "flower") as env:
        flwr_run(folder, env, run_config={"out": str(out)}, supernodes=app.N, timeout=240)
    got = json.loads(out.read_text())
    order = got["party_partition"]
    # message 2 of a node answers with its masked input, message 3 with its unmask response
    step_of_message = {2: RoundStep.INPUT, 3: RoundStep.UNMASK}
    drop_at = {party: step_of_message[app.DROP_AT[p]] for party, p in enumerate(order) if p in app.DROP_AT}
    params = SecAggParams.secagg_plus(app.N, dimension=app.D, clip_range=0.1, dropout_rate=0.3)
    ref = run_round(params, [app.inputs(p) for p in order], drop_at=drop_at, round_number=1, context=b"sim",
                    session=b"s" * 16, rounding_seeds=[app.rounding_seed(p) for p in order])  # fmt: skip
    # partition 2 fails before its masked input (excluded); partition 5 after it, at unmasking (still summed)
    assert got["included"] == list(ref.result.included) and len(got["included"]) == 9
    assert np.array_equal(np.asarray(got["ring_sum"], dtype=np.uint64), np.asarray(ref.result.ring_sum, np.uint64))
    assert set(got["failures"]) == {"2", "5"}
    assert all("simulated dropout" in why for why in got["failures"].values())


def test_importing_the_app_loads_no_torch() -> None:
    """A SuperNode may start a fresh ClientApp process per message: protocol stages must start fast."""
    code = "import sys, secure_fedllm.flower.app; print(sorted({'torch', 'transformers', 'peft'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
