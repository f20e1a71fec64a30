"""Finding 3(b) (Sybil roster) as an evaluation row: the server's keys at every index but the target's.

One real `LocalGrid` node (the target) with the real Mod; every other party is a session the server runs
with a key of its own, as in tests/secure_fedllm/flower/test_site_policy.py. The control (the node holds
its identity key, no site policy: it checks only its own index) joins, and the sum minus the Sybils'
inputs is encode(x_T) bit for bit. Ours (a pinned roster) refuses at setup, naming the foreign indices.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("flwr")

from protocols import FixedPointEncoding
from threat_models.attacks import SybilRoster, SybilRosterConfig
from threat_models.attacks._grid import rounding_seed

CLIP = 0.1


def _updates(n: int, d: int = 64) -> list[np.ndarray]:
    rng = np.random.default_rng(23)
    return [rng.normal(0, 0.03, d) for _ in range(n)]


def _exact(x: np.ndarray, party: int, n: int) -> np.ndarray:
    encoding = FixedPointEncoding(clip_range=CLIP, max_parties=n)
    return encoding.decode(
        encoding.encode(x, weight=1.0, rounding_seed=rounding_seed(party)), num_inputs=1
    ).weighted_sum


@pytest.mark.parametrize(("n", "target"), [(5, 0), (6, 2)])
def test_control_checking_only_its_own_key_gives_up_the_target_exactly(n, target) -> None:
    updates = _updates(n)
    result = SybilRoster(SybilRosterConfig(num_clients=n, target=target)).run(updates, defended=False)
    assert result.target_included and result.masked_input_sent and not result.aborted
    assert result.recovered and result.exact and result.refusals == 0
    assert np.array_equal(result.estimate, _exact(updates[target], target, n))
    assert not np.array_equal(result.estimate, _exact(updates[target - 1], target - 1, n))
    assert {r.metric: r.value for r in result.rows()} == {"target_recovered": 1.0, "refused": 0.0}
    assert {r.attack for r in result.rows()} == {"sybil_roster"}


def test_ours_the_pinned_roster_refuses_the_foreign_keys() -> None:
    n = 5
    result = SybilRoster(SybilRosterConfig(num_clients=n)).run(_updates(n), defended=True)
    assert not result.recovered and result.estimate is None
    assert not result.masked_input_sent and not result.target_included
    assert result.refused_with == "InsecureParameterError" and result.refusals == 1 and result.refused_by == 0
    assert result.reason.startswith("InsecureParameterError: identity_keys[1, 2, 3, 4]: 4 key(s) are not")
    assert {r.metric: r.value for r in result.rows()} == {"target_recovered": 0.0, "refused": 1.0}
