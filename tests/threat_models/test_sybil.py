"""Sybil roster: without a PKI the sum is the target's update plus known inputs; a pinned PKI refuses."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from protocols import FixedPointEncoding
from threat_models.attacks.sybil import Sybil, SybilConfig
from threat_models.errors import AttackConfigError

CLIP = 0.1


@pytest.mark.parametrize(("n", "target"), [(5, 0), (6, 4)])
def test_sybils_isolate_the_target_without_signed_enrolment_and_are_refused_with_it(n, target):
    update = np.random.default_rng(7).normal(0, 0.05, 1500)
    attack = Sybil(SybilConfig(num_clients=n, target=target, clip_range=CLIP))

    weakened = attack.run(update, defended=False)
    truth = np.clip(update, -CLIP, CLIP)
    quantum = 1 / FixedPointEncoding(clip_range=CLIP, max_parties=n).scale
    assert not weakened.aborted and weakened.recovered and weakened.relative_error < 1e-6
    assert np.abs(weakened.estimate - truth).max() <= n * quantum  # the rounding of n inputs
    assert np.abs(weakened.estimate - update).max() > 0.01  # the clipped update, exactly
    assert weakened.rows()[0].value == 1.0 and weakened.rows()[0].attack == "sybil"

    ours = attack.run(update, defended=True)
    assert ours.aborted and not ours.recovered and ours.estimate is None and not ours.masked_input_sent
    assert ours.refused_by == target and ours.reason.startswith("IntegrityError on KeyRoster (party ")
    assert ours.rows()[0].value == 0.0


def test_a_pki_run_by_the_server_does_not_stop_sybils():
    # The protocol's assumption, measured: identity keys only help if the server did not issue them.
    update = np.random.default_rng(8).normal(0, 0.02, 800)
    result = Sybil(SybilConfig(server_controls_pki=True)).run(update, defended=True)
    assert result.defended and result.server_controls_pki and not result.aborted
    assert result.recovered and result.relative_error < 1e-6


def test_config_errors_name_the_field():
    with pytest.raises(AttackConfigError, match="target"):
        Sybil(SybilConfig(num_clients=5, target=5))
    with pytest.raises(ValidationError):
        SybilConfig(clip_range=0)
