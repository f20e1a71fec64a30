"""Finding 3(a) (downgrade) as an evaluation row: no identity keys, t ~ n/2, split survivor views.

Real `LocalGrid` nodes with the real Mod, as in tests/secure_fedllm/flower/test_site_policy.py; only the
server deviates. The control (nodes with no site policy and no identity key) hands the server both
secrets of T: it strips every mask and gets encode(x_T) bit for bit. Ours (a site policy pinning the
roster, an identity key) refuses at setup with InsecureParameterError naming `identity_keys`.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("flwr")

from protocols import FixedPointEncoding
from threat_models import AttackConfigError
from threat_models.attacks import Downgrade, DowngradeConfig
from threat_models.attacks._grid import rounding_seed

CLIP = 0.1


def _updates(n: int, d: int = 64) -> list[np.ndarray]:
    rng = np.random.default_rng(22)
    return [rng.normal(0, 0.03, d) for _ in range(n)]


def _exact(x: np.ndarray, party: int, n: int) -> np.ndarray:
    encoding = FixedPointEncoding(clip_range=CLIP, max_parties=n)
    return encoding.decode(
        encoding.encode(x, weight=1.0, rounding_seed=rounding_seed(party)), num_inputs=1
    ).weighted_sum


@pytest.mark.parametrize(("n", "target"), [(5, 0), (7, 4)])
def test_control_without_site_policy_recovers_the_target_exactly(n, target) -> None:
    updates = _updates(n)
    result = Downgrade(DowngradeConfig(num_clients=n, target=target)).run(updates, defended=False)
    assert result.threshold == (n - 1) // 2
    assert result.recovered and result.exact and not result.aborted and result.refusals == 0
    assert np.array_equal(result.estimate, _exact(updates[target], target, n))
    assert not np.array_equal(result.estimate, _exact(updates[target - 1], target - 1, n))
    assert {r.metric: r.value for r in result.rows()} == {"target_recovered": 1.0, "refused": 0.0}
    assert {r.attack for r in result.rows()} == {"downgrade"}


def test_ours_every_node_refuses_at_setup_naming_identity_keys() -> None:
    n = 5
    result = Downgrade(DowngradeConfig(num_clients=n)).run(_updates(n), defended=True)
    assert result.aborted and not result.recovered and result.estimate is None
    assert not result.masked_input_sent  # refused before training: nothing reached the server
    assert result.refused_with == "InsecureParameterError" and result.refusals == n
    assert "InsecureParameterError: identity_keys: the server announced no identity keys" in result.reason
    assert {r.metric: r.value for r in result.rows()} == {"target_recovered": 0.0, "refused": 1.0}


def test_a_threshold_the_split_cannot_reach_is_a_config_error() -> None:
    with pytest.raises(AttackConfigError, match="threshold=3 exceeds"):
        Downgrade(DowngradeConfig(num_clients=5, threshold=3))
