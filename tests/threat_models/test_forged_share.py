"""Finding 5 (forged share): a malicious share holder against our signed shares and the unverified control.

Every run is a real malicious-setting SecAgg round (identity keys); only the unmask step differs:
ours is the real `SecAggServer`, the control is the pre-issue-12 server modelled by
`unverified_unmask`, which is checked here against the real server on honest shares.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from protocols import ServerState
from protocols.secagg import MaskedInput, UnmaskResponse
from threat_models import AttackConfigError
from threat_models.attacks import ForgedShare, ForgedShareConfig, unverified_unmask
from threat_models.attacks._relay import Seen, make_params, relay, start_round

N = 5


@pytest.fixture(scope="module")
def updates() -> list[np.ndarray]:
    rng = np.random.default_rng(12)
    return [rng.normal(0, 0.02, 512) for _ in range(N)]


def _rows(result) -> dict[str, float]:
    return {r.metric: r.value for r in result.rows()}


def test_control_with_exactly_t_responders_releases_a_silently_wrong_sum(updates):
    result = ForgedShare(ForgedShareConfig(num_clients=N)).run(updates, defended=False)
    assert result.responders == result.threshold == 4
    assert result.sum_released and not result.aborted
    assert result.wrong_sum and result.misbehaving == ()  # garbage, and nobody is blamed
    assert result.relative_error > 0.5  # not rounding noise: a different self mask was removed
    assert _rows(result) == {
        "wrong_sum_undetected": 1.0,
        "sum_released": 1.0,
        "relative_error": result.relative_error,
    }


def test_ours_with_exactly_t_responders_aborts_and_discards_the_forgery(updates):
    result = ForgedShare(ForgedShareConfig(num_clients=N)).run(updates, defended=True)
    assert result.aborted and not result.sum_released and result.ring_sum is None
    assert result.reason.startswith("AbortError: unmasking party 0: 3 valid shares, 4 needed")
    assert "forged shares from [1] were discarded" in result.reason
    assert _rows(result) == {"wrong_sum_undetected": 0.0, "sum_released": 0.0}


def test_with_a_spare_responder_ours_gives_the_exact_sum_and_names_the_forger(updates):
    attack = ForgedShare(ForgedShareConfig(num_clients=N, spare_responders=1, forger=2, target=3))
    ours = attack.run(updates, defended=True)
    assert ours.responders == 5 and ours.sum_released and not ours.wrong_sum
    assert ours.misbehaving == (2,) and ours.relative_error < 1e-6
    assert _rows(ours)["wrong_sum_undetected"] == 0.0
    control = attack.run(updates, defended=False)  # the old cross-check of a second t-subset: detected, unnamed
    assert control.aborted and control.reason == "AbortError: shares of party 3 are inconsistent; round aborted"


def test_without_a_forgery_both_release_the_exact_sum(updates):
    """The control is not wrong by construction: honest shares give it the exact sum."""
    attack = ForgedShare(ForgedShareConfig(num_clients=N, forge=False))
    for defended in (False, True):
        result = attack.run(updates, defended=defended)
        assert result.sum_released and not result.wrong_sum and result.relative_error < 1e-6
        assert _rows(result)["wrong_sum_undetected"] == 0.0


def test_the_unverified_model_matches_the_real_server_bit_for_bit_on_honest_shares(updates):
    params, identities = make_params(N, len(updates[0]), 0.1, signed=True)
    seen: Seen = {}
    clients, server = start_round(params, updates, seen, session=os.urandom(16), round_number=3, identities=identities)
    relay(server, clients, seen, until=ServerState.COLLECT_SIGNATURES)
    requests = server.close_stage()
    replies = {p: clients[p].handle(m) for p, m in requests}
    responders = sorted(replies)[1 : 1 + params.threshold]  # exactly t, not the lowest ids
    sent = {p: replies[p] for p in responders}
    assert all(isinstance(r, UnmaskResponse) for r in sent.values())
    for reply in sent.values():
        server.receive(reply)
    server.close_stage()
    real = server.result()
    masked = {p: m for p, m in seen[MaskedInput].items() if isinstance(m, MaskedInput)}
    modelled = unverified_unmask(params, real.included, masked, sent)  # type: ignore[arg-type]
    assert modelled.dtype == real.ring_sum.dtype and np.array_equal(modelled, real.ring_sum)
    first = sent[responders[0]]
    assert isinstance(first, UnmaskResponse)
    dropped = {0: first.model_copy(update={"mask_key_shares": first.self_mask_shares[:1]})}
    with pytest.raises(AttackConfigError, match="without dropouts"):  # the model refuses what it does not cover
        unverified_unmask(params, real.included, masked, dropped)


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"forger": 5}, "forger=5"),
        ({"target": 7}, "target=7"),
    ],
)
def test_config_errors_name_the_field(fields, match):
    with pytest.raises(AttackConfigError, match=match):
        ForgedShare(ForgedShareConfig(num_clients=N, **fields))


def test_run_errors_name_the_field(updates):
    with pytest.raises(AttackConfigError, match="spare_responders"):
        ForgedShare(ForgedShareConfig(num_clients=N, spare_responders=2)).run(updates, defended=True)
    with pytest.raises(AttackConfigError, match="num_clients"):
        ForgedShare(ForgedShareConfig(num_clients=N)).run(updates[:4], defended=True)
