"""Key substitution: unsigned keys let the server unmask the target exactly; signed keys make it refuse."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from protocols import FixedPointEncoding
from threat_models.attacks.key_substitution import KeySubstitution, KeySubstitutionConfig
from threat_models.errors import AttackConfigError

CLIP = 0.1


def _inputs(n: int) -> list[np.ndarray]:
    # sd 0.05 against a clip of 0.1: some coordinates are clipped, so "exact" means exact on the clipped input
    return [np.random.default_rng(10 + i).normal(0, 0.05, 1200) for i in range(n)]


@pytest.mark.parametrize(("n", "target"), [(5, 0), (5, 3), (4, 1)])
def test_the_semi_honest_control_gives_the_target_up_and_signed_keys_refuse(n, target):
    inputs = _inputs(n)
    attack = KeySubstitution(KeySubstitutionConfig(num_clients=n, target=target, clip_range=CLIP))

    weakened = attack.run(inputs, defended=False)
    truth = np.clip(inputs[target], -CLIP, CLIP)
    quantum = 1 / FixedPointEncoding(clip_range=CLIP, max_parties=n).scale
    assert not weakened.aborted and weakened.recovered and weakened.relative_error < 1e-6
    assert np.abs(weakened.estimate - truth).max() <= quantum  # one input's rounding, nothing else
    assert np.abs(weakened.estimate - inputs[target]).max() > 0.01  # it is the clipped update, not a guess
    assert np.abs(weakened.estimate - np.clip(inputs[(target + 1) % n], -CLIP, CLIP)).max() > 0.01
    assert weakened.rows()[0].value == 1.0 and weakened.rows()[0].attack == "key_substitution"

    ours = attack.run(inputs, defended=True)
    assert ours.aborted and not ours.recovered and ours.estimate is None
    assert ours.refused_by == target and ours.reason.startswith("IntegrityError on KeyRoster")
    assert not ours.masked_input_sent  # refused before any share or masked input left the target
    assert ours.rows()[0].value == 0.0 and ours.rows()[0].chance == 0


def test_config_errors_name_the_field():
    with pytest.raises(AttackConfigError, match="target"):
        KeySubstitution(KeySubstitutionConfig(num_clients=4, target=4))
    with pytest.raises(AttackConfigError, match="num_clients"):
        KeySubstitution().run([np.zeros(8)] * 4, defended=False)
    with pytest.raises(ValidationError):
        KeySubstitutionConfig(num_clients=3)  # too few for the malicious setting's bounds
