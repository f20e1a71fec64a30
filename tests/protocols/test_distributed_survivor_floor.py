"""SecurityPolicy.distributed_noise: full SecAgg and t >= n - d_max, so no sum of fewer inputs is released.

Each distributed-DP client adds a noise share calibrated for h = n - n_C - d_max honest survivors; a
sum of fewer inputs carries less noise than the guarantee assumes. The policy derives and accepts
only parameters under which every client refuses to unmask for fewer than n - d_max survivors. The
controls show the same parameters (and the same attack) going through without the floor.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest
from secagg_harness import HandRound, identity_private_keys, party_rng, public_keys

from protocols import (
    AbortError,
    ClientState,
    InsecureParameterError,
    SecAggParams,
    SecurityPolicy,
)
from protocols.driver import run_sessions
from protocols.secagg import SecAggFamily, SurvivorSet, UnmaskRequest
from protocols.session import RoundStep

DIM = 4


def _policy(**kw: object) -> SecurityPolicy:
    return SecurityPolicy.model_validate({"dropout_rate": 0.2, "distributed_noise": True, **kw})


def _ring_inputs(n: int) -> list[npt.NDArray[np.int64]]:
    gen = np.random.default_rng(n)
    return [gen.integers(-(2**40), 2**40, DIM, dtype=np.int64) for _ in range(n)]


def _mod_sum(inputs: list[npt.NDArray[np.int64]], included: tuple[int, ...]) -> list[int]:
    return [sum(int(inputs[p][i]) for p in included) % 2**32 for i in range(DIM)]


# -- derive ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["secagg+", "secagg"])
@pytest.mark.parametrize("n", [4, 10])
def test_derive_gives_full_secagg_with_t_at_least_n_minus_d_max(n: int, protocol: str) -> None:
    policy = _policy(protocol=protocol)
    d_max = policy.max_dropped(n)
    params = policy.derive(n, dimension=DIM, clip_range=1.0)
    assert params.neighbours == n - 1 and params.complete
    assert params.threshold >= n - d_max
    assert policy.thresholds(n, malicious=False) == (params.neighbours, params.threshold)
    for party in range(n):
        policy.check_secagg(params, party_id=party, identity_public_key=None)  # it accepts what it derives


def test_derive_in_the_malicious_setting_keeps_the_consistency_bounds() -> None:
    private = identity_private_keys(10, seed=3)
    keys = public_keys(private)
    policy = _policy(roster=keys)
    params = policy.derive(10, dimension=DIM, clip_range=1.0, identity_keys=keys)
    n_c, d_max = policy.max_corrupt(10), policy.max_dropped(10)
    assert (params.neighbours, params.threshold) == (9, 10 - d_max)
    assert 2 * params.threshold > 10 + n_c and params.consistency_quorum <= 10 - d_max
    policy.check_secagg(params, party_id=3, identity_public_key=keys[3])


def test_control_without_distributed_noise_derive_picks_a_sparse_graph_at_n_10() -> None:
    """The field changes the derivation: without it, SecAgg+ at n = 10 has k = 4 and t below n - d_max."""
    plain = _policy(distributed_noise=False)
    params = plain.derive(10, dimension=DIM, clip_range=1.0)
    assert params.neighbours < 9 and params.threshold < 10 - plain.max_dropped(10)


# -- check_secagg ------------------------------------------------------------------------------------------------------


def test_a_threshold_below_n_minus_d_max_is_refused() -> None:
    policy = _policy()
    n = 10
    d_max = policy.max_dropped(n)  # 2
    low = SecAggParams.secagg(n, dimension=DIM, clip_range=1.0, dropout_rate=0.2, threshold=n - d_max - 1)
    with pytest.raises(InsecureParameterError, match=r"^threshold=7 .*announce threshold >= n - d_max = 8"):
        policy.check_secagg(low, party_id=0, identity_public_key=None)
    # control: a site without distributed noise accepts the very same parameters
    _policy(distributed_noise=False).check_secagg(low, party_id=0, identity_public_key=None)
    # and at the floor itself the distributed site accepts
    at_floor = SecAggParams.secagg(n, dimension=DIM, clip_range=1.0, dropout_rate=0.2, threshold=n - d_max)
    policy.check_secagg(at_floor, party_id=0, identity_public_key=None)


@pytest.mark.parametrize("high_threshold", [False, True], ids=["derived", "t=n-d_max"])
def test_a_secagg_plus_graph_is_refused_even_with_a_high_threshold(high_threshold: bool) -> None:
    # k = 8, t = n - d_max = 8 misses the correctness bound (allow_insecure), but passes the survivor count
    kw = {"neighbours": 8, "threshold": 8, "allow_insecure": True} if high_threshold else {}
    sparse = SecAggParams.secagg_plus(10, dimension=DIM, clip_range=1.0, dropout_rate=0.2, **kw)
    assert not sparse.complete
    with pytest.raises(InsecureParameterError, match=r"^neighbours=\d+: .*announce neighbours=9"):
        _policy(allow_insecure=high_threshold).check_secagg(sparse, party_id=0, identity_public_key=None)
    # control: the default (secagg+) site without distributed noise accepts them
    _policy(distributed_noise=False, allow_insecure=high_threshold).check_secagg(
        sparse, party_id=0, identity_public_key=None
    )


def test_allow_insecure_does_not_lift_the_survivor_floor() -> None:
    policy = _policy(allow_insecure=True)
    low = SecAggParams.secagg(10, dimension=DIM, clip_range=1.0, dropout_rate=0.2, threshold=7, allow_insecure=True)
    with pytest.raises(InsecureParameterError, match=r"^threshold=7"):
        policy.check_secagg(low, party_id=0, identity_public_key=None)


def test_policy_round_trips_and_describes_the_field() -> None:
    policy = _policy(protocol="secagg", min_parties=4)
    assert SecurityPolicy.model_validate(policy.model_dump()) == policy
    assert SecurityPolicy.model_validate_json(policy.model_dump_json()) == policy
    assert SecurityPolicy.model_validate(policy.model_dump()).distributed_noise is True
    assert policy.describe()["distributed_noise"] is True
    default = SecurityPolicy.model_validate({})
    assert default.distributed_noise is False and default.describe()["distributed_noise"] is False


# -- the attack: two parties "drop" after the input stage --------------------------------------------------------------

N = 5  # dropout_rate 0.2: d_max = 1, so n - d_max = 4


def _low_threshold_params() -> SecAggParams:
    """What a server announces to release 3-input sums: t = 3 (secure for masking alone)."""
    return SecAggParams.secagg(N, dimension=DIM, clip_range=1.0, dropout_rate=0.2, threshold=3)


def test_honest_server_with_distributed_params_releases_nothing_when_two_drop() -> None:
    params = _policy().derive(N, dimension=DIM, clip_range=1.0)
    assert params.threshold == 4
    inputs = _ring_inputs(N)
    drop = {3: RoundStep.INPUT, 4: RoundStep.INPUT}
    with pytest.raises(AbortError):
        run_sessions(SecAggFamily(params), inputs, drop_at=drop, rng_for=lambda p: party_rng(1, p))
    # control: t = 3 is accepted by a site without distributed noise, and the same dropouts release a 3-input sum
    low = _low_threshold_params()
    _policy(distributed_noise=False).check_secagg(low, party_id=0, identity_public_key=None)
    with pytest.raises(InsecureParameterError, match=r"^threshold=3"):
        _policy().check_secagg(low, party_id=0, identity_public_key=None)
    result = run_sessions(SecAggFamily(low), inputs, drop_at=drop, rng_for=lambda p: party_rng(1, p)).result
    assert result.included == (0, 1, 2) and result.ring_sum is not None
    assert [int(v) for v in result.ring_sum[:-1]] == _mod_sum(inputs, (0, 1, 2))


def _masked_from_three(params: SecAggParams) -> HandRound:
    """A round where the server has taken the masked inputs of parties 0, 1, 2 only (it discards 3 and 4)."""
    hand = HandRound(params, seed=5, inputs=_ring_inputs(N))  # type: ignore[arg-type]
    hand.advance(2)  # share bundles delivered
    hand.submit(hand.respond(), drop=(3, 4))
    return hand


def test_clients_abort_at_unmask_when_a_malicious_server_names_three_survivors() -> None:
    """The server's own check is bypassed: it asks 0, 1, 2 to unmask for {0, 1, 2}; each client refuses."""
    params = _policy().derive(N, dimension=DIM, clip_range=1.0)
    hand = _masked_from_three(params)
    request = UnmaskRequest(session=hand.session, round=0, survivors=(0, 1, 2))
    for p in (0, 1, 2):
        with pytest.raises(AbortError, match="survivor set of 3 is below threshold 4"):
            hand.clients[p].handle(request)
        assert hand.clients[p].state is ClientState.ABORTED  # no share was revealed
    with pytest.raises(AbortError):  # the honest server code refuses too
        hand.close()
    # control: with t = 3 the same request is answered and the server releases the sum of 3 inputs
    control = _masked_from_three(_low_threshold_params())
    outgoing = control.close()
    assert sorted(outgoing) == [0, 1, 2]
    assert all(isinstance(m, UnmaskRequest) and m.survivors == (0, 1, 2) for m in outgoing.values())
    control.submit(control.respond())
    control.close()
    result = control.server.result()
    assert result.included == (0, 1, 2) and result.ring_sum is not None
    assert [int(v) for v in result.ring_sum[:-1]] == _mod_sum(_ring_inputs(N), (0, 1, 2))
    assert int(result.ring_sum[-1]) == 3 * params.encoding.weight_scale  # three inputs of weight 1


def test_malicious_setting_clients_refuse_to_sign_a_survivor_set_below_n_minus_d_max() -> None:
    private = identity_private_keys(N, seed=9)
    keys = public_keys(private)
    params = _policy(roster=keys).derive(N, dimension=DIM, clip_range=1.0, identity_keys=keys)
    assert params.threshold == 4
    hand = HandRound(params, seed=6, identity_keys=private, inputs=_ring_inputs(N))  # type: ignore[arg-type]
    hand.advance(3)  # every masked input is in
    for p in (0, 1, 2):
        with pytest.raises(AbortError, match="below threshold 4"):
            hand.clients[p].handle(SurvivorSet(session=hand.session, round=0, survivors=(0, 1, 2)))
        assert hand.clients[p].state is ClientState.ABORTED
    # control: a survivor set of n - d_max = 4 is signed
    assert hand.clients[3].handle(SurvivorSet(session=hand.session, round=0, survivors=(0, 1, 3, 4)))
    assert hand.clients[3].state is ClientState.CONFIRMED
