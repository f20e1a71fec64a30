"""Finding 1 (rerun) as an evaluation row: the server runs the same round twice, the second time without T.

Real `LocalGrid` nodes with the real Mod and identity keys, as in tests/secure_fedllm/flower/test_rerun.py;
the server is the public `secure_aggregate`, asked twice. The control (no release key, bindings only in
the node's Context.state, node restarted in between) gives S1 - S2 = encode(x_T) bit for bit; ours (the
ClientApp names its site state folder, as our ClientApp does) is refused by every other node.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("flwr")

from protocols import FixedPointEncoding
from threat_models import AttackConfigError
from threat_models.attacks import Rerun, RerunConfig
from threat_models.attacks._grid import rounding_seed

N, D, CLIP = 5, 64, 0.1


@pytest.fixture(scope="module")
def updates() -> list[np.ndarray]:
    rng = np.random.default_rng(21)
    return [rng.normal(0, 0.03, D) for _ in range(N)]


def _exact(x: np.ndarray, party: int) -> np.ndarray:
    """x_T as the server can know it at best: its encoding (clip, stochastic rounding), decoded."""
    encoding = FixedPointEncoding(clip_range=CLIP, max_parties=N)
    return encoding.decode(
        encoding.encode(x, weight=1.0, rounding_seed=rounding_seed(party)), num_inputs=1
    ).weighted_sum


@pytest.mark.parametrize("target", [0, 3])
def test_control_without_durable_binding_recovers_the_target_exactly(updates, target) -> None:
    result = Rerun(RerunConfig(num_clients=N, target=target)).run(updates, defended=False)
    assert result.second_session_completed and not result.aborted
    assert result.recovered and result.exact and result.refusals == 0
    assert np.array_equal(result.estimate, _exact(updates[target], target))
    assert not np.array_equal(result.estimate, _exact(updates[(target + 1) % N], (target + 1) % N))
    scale = FixedPointEncoding(clip_range=CLIP, max_parties=N).scale
    assert np.max(np.abs(result.estimate - np.clip(updates[target], -CLIP, CLIP))) <= 1 / scale
    assert {r.metric: r.value for r in result.rows()} == {"target_recovered": 1.0, "refused": 0.0}
    assert {r.attack for r in result.rows()} == {"rerun"}


def test_ours_every_other_node_refuses_the_second_session(updates) -> None:
    result = Rerun(RerunConfig(num_clients=N)).run(updates, defended=True)
    assert result.aborted and not result.recovered and result.estimate is None
    assert result.refused_with == "ReleaseBindingError" and result.refusals == N - 1
    assert result.reason.startswith("AbortError: ")
    assert {r.metric: r.value for r in result.rows()} == {"target_recovered": 0.0, "refused": 1.0}


def test_ours_holds_without_a_restart_too(updates) -> None:
    result = Rerun(RerunConfig(num_clients=N, restart_nodes=False)).run(updates, defended=True)
    assert result.aborted and not result.recovered and result.refusals == N - 1


def test_the_control_is_weak_only_because_its_binding_was_lost(updates) -> None:
    """Without a restart the control's Context.state binding holds: the Mod refuses here too."""
    result = Rerun(RerunConfig(num_clients=N, restart_nodes=False)).run(updates, defended=False)
    assert result.aborted and not result.recovered and result.refused_with == "ReleaseBindingError"


def test_config_errors_name_the_field(updates) -> None:
    with pytest.raises(AttackConfigError, match="target=5"):
        Rerun(RerunConfig(num_clients=N, target=5))
    with pytest.raises(AttackConfigError, match="inputs has 4"):
        Rerun(RerunConfig(num_clients=N)).run(updates[:4], defended=False)
