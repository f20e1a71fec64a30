"""Finding 4(a) (HE decryption oracle): a malicious server reads the target's upload through a client's replies.

Every run is a real BFV round (identity keys) up to the sum; the victim is our `HEClient` or the
weakened control `LeakyHEClient` (decrypts the server's aggregate and stays in its state after a
failed check). Also: the evaluation rows of this attack and of the forged share.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from protocols.he import HEParams
from threat_models import AttackConfigError
from threat_models.attacks import HEOracle, HEOracleConfig
from threat_models.evaluation import _forged_share_and_he_oracle

N, DIM = 4, 8


@pytest.fixture(scope="module")
def updates() -> list[np.ndarray]:
    rng = np.random.default_rng(4)
    return [rng.uniform(-0.1, 0.1, DIM) for _ in range(N)]


@pytest.mark.parametrize("query_holder", [False, True], ids=["non-holder", "key holder"])
def test_control_leaks_the_targets_exact_quantized_update(updates, query_holder):
    result = HEOracle(HEOracleConfig(num_clients=N, coordinates=DIM, query_holder=query_holder)).run(
        updates, defended=False
    )
    assert result.victim_is_holder is query_holder and result.victim != 0
    assert result.recovered == DIM and result.words == result.truth  # every word, exactly
    assert result.queries == DIM * math.ceil(math.log2(2 * 32767 + 1))  # 16 one-bit replies per coordinate
    assert not result.victim_aborted and result.victim_holds_key and result.victim_decryptions == result.queries
    # the words are x_T quantized: decoding them gives x_T to within one quantization step
    params = HEParams.bfv_packed(N, dimension=DIM, clip_range=0.1)
    x_hat = (np.array(result.words) - params.level) / params.quantizer.scale
    assert np.abs(x_hat - updates[0]).max() <= 1 / params.quantizer.scale
    assert {r.metric: r.value for r in result.rows()} == {
        "target_coordinates_recovered": 1.0,
        "queries": float(result.queries),
    }


def test_ours_refuses_the_first_crafted_aggregate_and_ends_the_session(updates):
    result = HEOracle(HEOracleConfig(num_clients=N, coordinates=DIM)).run(updates, defended=True)
    assert result.recovered == 0 and result.words == (None,) * DIM
    assert result.refused_with.startswith("RemoteProtocolError: this client decrypts nothing")
    assert result.queries == 2  # the refusal, then AbortError: the session is over, nothing more to ask
    assert result.victim_aborted and not result.victim_holds_key and result.victim_decryptions == 0
    assert {r.metric: r.value for r in result.rows()} == {"target_coordinates_recovered": 0.0, "queries": 2.0}


def test_ours_key_holder_refuses_a_crafted_upload_and_ends_the_session(updates):
    result = HEOracle(HEOracleConfig(num_clients=N, coordinates=2, query_holder=True)).run(updates, defended=True)
    assert result.victim_is_holder and result.recovered == 0 and result.queries == 2
    assert result.refused_with == "RemoteProtocolError: contributor 0's chunks do not match its signature"
    assert result.victim_aborted and not result.victim_holds_key and result.victim_decryptions == 0


def test_a_query_budget_stops_the_search(updates):
    result = HEOracle(HEOracleConfig(num_clients=N, coordinates=2, max_queries=20)).run(updates, defended=False)
    assert result.queries == 20 and result.recovered == 1 and result.words[1] is None


def test_config_errors_name_the_field(updates):
    with pytest.raises(AttackConfigError, match="target=4"):
        HEOracle(HEOracleConfig(num_clients=N, target=4))
    with pytest.raises(AttackConfigError, match="coordinates=9"):
        HEOracle(HEOracleConfig(num_clients=N, coordinates=9)).run(updates, defended=True)
    with pytest.raises(AttackConfigError, match="num_clients"):
        HEOracle(HEOracleConfig(num_clients=N)).run(updates[:3], defended=True)


def test_evaluation_rows_ours_against_the_weakened_controls():
    rows = {(r.attack, r.metric, r.defense): r.value for r in _forged_share_and_he_oracle(seed=0)}
    forged = {k: v for k, v in rows.items() if k[0] == "forged_share" and k[1] == "wrong_sum_undetected"}
    assert forged == {
        ("forged_share", "wrong_sum_undetected", "shares unverified (control)"): 1.0,
        ("forged_share", "wrong_sum_undetected", "secagg malicious setting"): 0.0,
        ("forged_share", "wrong_sum_undetected", "shares unverified (control), t+1 responders"): 0.0,
        ("forged_share", "wrong_sum_undetected", "secagg malicious setting, t+1 responders"): 0.0,
    }
    assert rows["forged_share", "sum_released", "secagg malicious setting"] == 0.0
    assert rows["forged_share", "sum_released", "secagg malicious setting, t+1 responders"] == 1.0
    assert rows["forged_share", "relative_error", "shares unverified (control)"] > 0.5
    assert rows["forged_share", "relative_error", "secagg malicious setting, t+1 responders"] < 1e-6
    assert rows["he_oracle", "target_coordinates_recovered", "he, decrypts server total (control)"] == 1.0
    assert rows["he_oracle", "target_coordinates_recovered", "he-bfv"] == 0.0
    assert rows["he_oracle", "queries", "he, decrypts server total (control)"] == 64.0
    assert rows["he_oracle", "queries", "he-bfv"] == 2.0
