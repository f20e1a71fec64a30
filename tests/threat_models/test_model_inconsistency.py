"""Model inconsistency: the weakened protocol leaks the target update exactly, ours aborts."""

from __future__ import annotations

import numpy as np
import pytest

from threat_models.attacks.model_inconsistency import ModelInconsistency, ModelInconsistencyConfig
from threat_models.errors import AttackConfigError


@pytest.mark.parametrize("protocol", ["secagg", "secagg+"])
def test_weakened_protocol_leaks_the_target_exactly_and_ours_aborts(protocol):
    update = np.random.default_rng(1).normal(0, 0.02, 3000)
    attack = ModelInconsistency(ModelInconsistencyConfig(num_clients=6, target=2, protocol=protocol))
    weakened = attack.run(update, bound=False)
    assert not weakened.aborted and weakened.cosine > 0.999999 and weakened.relative_error < 1e-6
    ours = attack.run(update, bound=True)
    assert ours.aborted and ours.cosine == 0.0
    assert ours.rows()[0].value == 0.0 and weakened.rows()[0].value > 0.999


def test_a_target_outside_the_cohort_is_a_config_error():
    with pytest.raises(AttackConfigError, match="target"):
        ModelInconsistency(ModelInconsistencyConfig(num_clients=3, target=3))
