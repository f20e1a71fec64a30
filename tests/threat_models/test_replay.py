"""Replay: unbound rounds with reused keys leak x_A - x_B exactly; bound, signed transcripts refuse."""

from __future__ import annotations

import numpy as np
import pytest

from protocols import FixedPointEncoding
from threat_models.attacks.replay import Replay, ReplayConfig
from threat_models.errors import AttackConfigError

CLIP = 0.1


def _rounds(n: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    first = [np.random.default_rng(20 + i).normal(0, 0.05, 1000) for i in range(n)]
    second = [np.random.default_rng(40 + i).normal(0, 0.05, 1000) for i in range(n)]
    return first, second


@pytest.mark.parametrize(("n", "target"), [(5, 0), (4, 3)])
def test_unbound_replay_leaks_the_update_difference_and_binding_refuses(n, target):
    first, second = _rounds(n)
    attack = Replay(ReplayConfig(num_clients=n, target=target, clip_range=CLIP))

    weakened = attack.run(first, second, defended=False)
    truth = np.clip(first[target], -CLIP, CLIP) - np.clip(second[target], -CLIP, CLIP)
    quantum = 1 / FixedPointEncoding(clip_range=CLIP, max_parties=n).scale
    assert weakened.key_material_reused and not weakened.aborted
    assert weakened.recovered and weakened.relative_error < 1e-6
    assert np.abs(weakened.estimate - truth).max() <= 2 * quantum  # two inputs' rounding, nothing else
    assert np.abs(weakened.estimate - (first[target] - second[target])).max() > 0.01  # clipped, exactly
    assert weakened.rows()[0].value == 1.0 and weakened.rows()[0].metric == "target_difference_recovered"

    ours = attack.run(first, second, defended=True)
    assert ours.aborted and not ours.recovered and ours.estimate is None and not ours.masked_input_sent
    assert not ours.key_material_reused and ours.refused_by is not None
    assert ours.reason.startswith("IntegrityError on KeyRoster")  # the old signatures, not the fresh keys
    assert ours.rows()[0].value == 0.0


def test_fresh_keys_alone_make_the_unbound_replay_fail_at_the_share_boxes():
    first, second = _rounds(5)
    result = Replay(ReplayConfig(reuse_key_material=False)).run(first, second, defended=False)
    assert not result.key_material_reused and result.aborted and not result.recovered
    assert result.reason.startswith("Complaint on ShareBundle") and not result.masked_input_sent


def test_config_errors_name_the_field():
    first, second = _rounds(5)
    with pytest.raises(AttackConfigError, match="target"):
        Replay(ReplayConfig(num_clients=4, target=9))
    with pytest.raises(AttackConfigError, match="num_clients"):
        Replay().run(first, second[:4], defended=False)
