"""Dropout forging: the weakened protocol gives the target's update up exactly; ours aborts."""

from __future__ import annotations

import numpy as np
import pytest

from threat_models.attacks.dropout_forging import DropoutForging, DropoutForgingConfig
from threat_models.errors import AttackConfigError


@pytest.mark.parametrize("n", [5, 7])
def test_split_survivor_views_unmask_the_target_only_in_the_weakened_protocol(n):
    inputs = [np.random.default_rng(i).normal(0, 0.02, 1500) for i in range(n)]
    attack = DropoutForging(DropoutForgingConfig(num_clients=n))
    weakened = attack.run(inputs, defended=False)
    assert weakened.recovered and weakened.relative_error < 1e-6 and not weakened.defended
    ours = attack.run(inputs, defended=True)
    assert ours.aborted and not ours.recovered and ours.defended
    assert ours.rows()[0].value == 0.0 and weakened.rows()[0].value == 1.0


def test_the_input_count_must_match():
    with pytest.raises(AttackConfigError, match="num_clients"):
        DropoutForging().run([np.zeros(3)] * 4, defended=False)
