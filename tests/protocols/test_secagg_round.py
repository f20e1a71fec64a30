"""Whole SecAgg / SecAgg+ rounds: exact sums, dropouts at every stage, aborts below threshold."""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from secagg_harness import (
    HandRound,
    expected_ring_sum,
    malicious_params,
    party_rng,
    random_inputs,
    round_graph,
    semi_honest_params,
)

from protocols import (
    AbortError,
    DeterministicRandom,
    FixedPointEncoding,
    InsecureParameterError,
    InvalidTransitionError,
    RoundStep,
    SecAggParams,
    SecAggServer,
    ServerState,
    run_round,
)
from protocols.primitives import ed25519_public, ring_dtype
from protocols.secagg import MaskedInput, NeighbourGraph

ADVERTISE, SHARE, INPUT, CONFIRM, UNMASK = (RoundStep.ADVERTISE, RoundStep.SHARE, RoundStep.INPUT, RoundStep.CONFIRM,
                                            RoundStep.UNMASK)  # fmt: skip
STEPS = (ADVERTISE, SHARE, INPUT, CONFIRM, UNMASK)
"""The steps a dropout is drawn from (REVEAL has its own tests: a withheld reveal aborts the toss)."""

# -- a model of who survives ------------------------------------------------------------------------


def predict(
    params: SecAggParams, graph: NeighbourGraph, drop_at: Mapping[int, RoundStep]
) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """(included, dropped) of a round with these dropouts, or None if some party must abort.

    drop_at follows run_round: a party sends nothing from step drop_at[p] on.
    """
    n, t = params.num_parties, params.threshold

    def alive_after(step: RoundStep) -> set[int]:
        return {p for p in range(n) if p not in drop_at or drop_at[p].rank > step.rank}

    nb = {p: graph.neighbours_of(p) for p in range(n)}
    u1, u2, u3 = alive_after(ADVERTISE), alive_after(SHARE), alive_after(INPUT)
    # server: enough keys; every client of U1: enough holders of its shares among U1
    if len(u1) < t or any(len((nb[p] & u1) | {p}) < t for p in u1):
        return None
    # server: enough share senders; every client of U2: enough share boxes received
    if len(u2) < t or any(len((nb[p] & u2) | {p}) < t for p in u2):
        return None
    if len(u3) < t:
        return None
    # SecAgg+ clients refuse a survivor set implying more than d_max dropouts (graph connectivity)
    if not params.complete and len(u3) < n - params.max_dropped:
        return None
    if params.malicious and len(alive_after(CONFIRM)) < params.consistency_quorum:
        return None
    responders = alive_after(UNMASK)
    if any(len(responders & (nb[u] | {u})) < t for u in u3):
        return None
    if any(len(responders & nb[v]) < t for v in u2 - u3):
        return None
    return tuple(sorted(u3)), tuple(sorted(u1 - u3))


def session_for(seed: int) -> bytes:
    return DeterministicRandom(b"session/%d" % seed).token_bytes(16)


def check_decoded(params: SecAggParams, result, inputs, included, weights=None) -> None:
    enc = params.encoding
    w = np.ones(len(inputs)) if weights is None else np.asarray(weights)
    true = sum(
        (w[p] * np.clip(inputs[p], -enc.clip_range, enc.clip_range) for p in included),
        np.zeros(params.dimension),
    )
    decoded = result.decoded
    assert decoded.num_inputs == len(included)
    assert np.max(np.abs(np.asarray(decoded.weighted_sum) - true)) <= decoded.max_abs_error * (1 + 1e-9)
    assert abs(decoded.total_weight - float(np.sum(w[list(included)]))) <= len(included) / enc.weight_scale


# -- the property test --------------------------------------------------------------------------------


@st.composite
def round_cases(draw):
    plus = draw(st.booleans())
    n = draw(st.integers(4 if plus else 3, 40))
    d = draw(st.integers(1, 300))
    ring_bits = draw(st.sampled_from([16, 32, 64]))
    clip = draw(st.sampled_from([0.5, 1.0, 3.0]))
    rate = draw(st.sampled_from([0.1, 0.2, 0.3]))
    encoding = FixedPointEncoding(clip_range=clip, max_parties=n, ring_bits=ring_bits)
    if plus:
        k = draw(st.sampled_from(list(range(2, n - 1, 2))))
        t = draw(st.integers(2, k + 1))
        params = SecAggParams.secagg_plus(
            n,
            dimension=d,
            clip_range=clip,
            neighbours=k,
            threshold=t,
            dropout_rate=rate,
            encoding=encoding,
            allow_insecure=True,
        )
    else:
        params = SecAggParams.secagg(n, dimension=d, clip_range=clip, dropout_rate=rate, encoding=encoding)
    drop_at = draw(st.dictionaries(st.integers(0, n - 1), st.sampled_from(STEPS), max_size=n // 2 + 1))
    seed = draw(st.integers(0, 2**20))
    return params, drop_at, seed


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(round_cases())
def test_ring_sum_is_bit_exact_with_dropouts(case) -> None:
    params, drop_at, seed = case
    n, d, clip = params.num_parties, params.dimension, params.encoding.clip_range
    inputs = random_inputs(n, d, clip, seed)
    if n > 3:
        inputs[0][: min(d, 2)] = clip  # the extremes of the clip range
        inputs[1][: min(d, 2)] = -clip
    session = session_for(seed)
    graph = SecAggServer(params, session=session, round_number=0).graph
    expected = predict(params, graph, drop_at)

    def rng_for(p: int) -> DeterministicRandom:
        return party_rng(seed, p)

    event("secagg+" if not params.complete else "secagg")
    if expected is None:
        event("aborted")
        with pytest.raises(AbortError):
            run_round(params, inputs, drop_at=drop_at, session=session, rng_for=rng_for)
        return
    event("completed")
    included, dropped = expected
    result = run_round(params, inputs, drop_at=drop_at, session=session, rng_for=rng_for).result
    assert result.included == included
    assert result.dropped == dropped
    assert result.insecure == params.insecure
    assert result.ring_sum.dtype == ring_dtype(params.encoding.ring_bits)
    assert np.array_equal(result.ring_sum, expected_ring_sum(params, inputs, included, seed))
    # the plaintext control, same parties, same rounding randomness: bit-identical
    plain_drops = {p: ADVERTISE for p in range(n) if p not in included}
    plain = run_round(
        params, inputs, protocol="plaintext", drop_at=plain_drops, session=session, rng_for=rng_for
    ).result
    assert plain.included == included
    assert np.array_equal(plain.ring_sum, result.ring_sum)
    check_decoded(params, result, inputs, included)


@st.composite
def malicious_cases(draw):
    plus = draw(st.booleans())
    n = draw(st.integers(12 if plus else 5, 24))
    rate = draw(st.sampled_from([0.1, 0.2, 0.3]))
    private = [DeterministicRandom(b"id/%d" % p).token_bytes(32) for p in range(n)]
    public = tuple(ed25519_public(k) for k in private)
    try:
        if plus:
            params = SecAggParams.secagg_plus(n, dimension=20, clip_range=1.0, dropout_rate=rate, identity_keys=public)
        else:
            params = SecAggParams.secagg(n, dimension=20, clip_range=1.0, dropout_rate=rate, identity_keys=public)
    except InsecureParameterError:
        assume(False)
    drop_at = draw(st.dictionaries(st.integers(0, n - 1), st.sampled_from(STEPS), max_size=n // 3 + 1))
    return params, private, drop_at, draw(st.integers(0, 2**20))


@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.filter_too_much],
)
@given(case=malicious_cases())
def test_malicious_ring_sum_is_bit_exact_with_dropouts(case) -> None:
    params, private, drop_at, seed = case
    n = params.num_parties
    inputs = random_inputs(n, params.dimension, 1.0, seed)
    session = session_for(seed)
    graph = round_graph(params, session=session, seed=seed, inputs=inputs, identity_keys=private, drop_at=drop_at)
    expected = predict(params, graph, drop_at)

    def go():
        return run_round(
            params,
            inputs,
            drop_at=drop_at,
            session=session,
            identity_keys=private,
            rng_for=lambda p: party_rng(seed, p),
        )

    if expected is None:
        event("aborted")
        with pytest.raises(AbortError):
            go()
        return
    event("completed")
    result = go().result
    assert (result.included, result.dropped) == expected
    assert np.array_equal(result.ring_sum, expected_ring_sum(params, inputs, expected[0], seed))
    check_decoded(params, result, inputs, expected[0])


def test_no_dropouts_sum_is_exact_and_nobody_dropped() -> None:
    params = semi_honest_params(7, dimension=50)
    inputs = random_inputs(7, 50, 1.0, seed=3)
    result = run_round(params, inputs, session=session_for(3), rng_for=lambda p: party_rng(3, p)).result
    assert result.included == tuple(range(7))
    assert result.dropped == ()
    assert np.array_equal(result.ring_sum, expected_ring_sum(params, inputs, tuple(range(7)), 3))
    check_decoded(params, result, inputs, tuple(range(7)))


def test_run_round_is_reproducible_with_deterministic_sources() -> None:
    params = semi_honest_params(5, dimension=6)
    inputs = random_inputs(5, 6, 1.0, seed=4)
    a = run_round(params, inputs, drop_at={1: INPUT}, rng_for=lambda p: DeterministicRandom(p))
    b = run_round(params, inputs, drop_at={1: INPUT}, rng_for=lambda p: DeterministicRandom(p))
    assert np.array_equal(a.result.ring_sum, b.result.ring_sum)
    assert a.upload_bytes == b.upload_bytes and a.download_bytes == b.download_bytes
    assert a.upload_bytes[1] < a.upload_bytes[0]  # party 1 went silent after sharing
    c = run_round(params, inputs, drop_at={1: INPUT}, rng_for=lambda p: DeterministicRandom(p + 100))
    assert not np.array_equal(a.result.ring_sum, c.result.ring_sum)  # other masks' rounding seeds
    assert a.result.included == c.result.included == (0, 2, 3, 4)


def test_secagg_plus_sparse_graph_round() -> None:
    n = 30
    params = SecAggParams.secagg_plus(n, dimension=40, clip_range=1.0, dropout_rate=0.1)
    assert not params.complete and not params.insecure
    inputs = random_inputs(n, 40, 1.0, seed=5)
    drop_at = {0: ADVERTISE, 7: SHARE, 13: INPUT, 21: UNMASK}
    session = session_for(5)
    expected = predict(params, SecAggServer(params, session=session, round_number=0).graph, drop_at)
    assert expected is not None
    result = run_round(params, inputs, drop_at=drop_at, session=session, rng_for=lambda p: party_rng(5, p)).result
    assert (result.included, result.dropped) == expected
    assert np.array_equal(result.ring_sum, expected_ring_sum(params, inputs, expected[0], 5))
    check_decoded(params, result, inputs, expected[0])


# -- malicious setting ----------------------------------------------------------------------------------


def _identity(n: int) -> tuple[list[bytes], tuple[bytes, ...]]:
    private = [os.urandom(32) for _ in range(n)]
    return private, tuple(ed25519_public(k) for k in private)


@pytest.mark.parametrize("step", STEPS, ids=lambda s: s.name)
@pytest.mark.parametrize("plus", [False, True], ids=["secagg", "secagg+"])
def test_malicious_round_completes_with_dropouts(step: RoundStep, plus: bool) -> None:
    seed = STEPS.index(step)
    n = 20 if plus else 10
    private, public = _identity(n)
    if plus:
        params = SecAggParams.secagg_plus(n, dimension=20, clip_range=1.0, dropout_rate=0.2, identity_keys=public)
        assert not params.complete
    else:
        params = SecAggParams.secagg(
            n, dimension=20, clip_range=1.0, threshold=6, dropout_rate=0.2, identity_keys=public
        )
    assert params.malicious
    inputs = random_inputs(n, 20, 1.0, seed=seed)
    drop_at = {2: step, 5: step}
    session = session_for(seed)
    graph = round_graph(params, session=session, seed=seed, inputs=inputs, identity_keys=private, drop_at=drop_at)
    expected = predict(params, graph, drop_at)
    assert expected is not None
    report = run_round(
        params,
        inputs,
        drop_at=drop_at,
        session=session,
        identity_keys=private,
        rng_for=lambda p: party_rng(seed, p),
    )
    result = report.result
    assert (result.included, result.dropped) == expected
    assert (2 in result.included) == (step.rank > INPUT.rank)
    assert np.array_equal(result.ring_sum, expected_ring_sum(params, inputs, expected[0], seed))
    check_decoded(params, result, inputs, expected[0])


def test_malicious_round_with_a_dropout_at_every_stage() -> None:
    # n=14, n_C=1, d_max=6: 2t=16 > 15, t=8 <= n - d_max, quorum = max(15 // 2 + 1, 8) = 8
    n = 14
    private, public = _identity(n)
    params = SecAggParams.secagg(n, dimension=30, clip_range=1.0, threshold=8, dropout_rate=0.4, identity_keys=public)
    assert params.consistency_quorum == 8
    inputs = random_inputs(n, 30, 1.0, seed=11)
    drop_at = {0: ADVERTISE, 1: SHARE, 2: INPUT, 3: CONFIRM, 4: UNMASK}
    result = run_round(
        params, inputs, drop_at=drop_at, session=session_for(11), identity_keys=private,
        rng_for=lambda p: party_rng(11, p),
    ).result  # fmt: skip
    assert result.included == (3, 4, *range(5, n))
    assert result.dropped == (1, 2)
    assert np.array_equal(result.ring_sum, expected_ring_sum(params, inputs, result.included, 11))


def test_malicious_round_rejects_wrong_identity_key() -> None:
    private, public = _identity(5)
    params = SecAggParams.secagg(5, dimension=3, clip_range=1.0, threshold=4, dropout_rate=0.1, identity_keys=public)
    wrong = list(private)
    wrong[3] = os.urandom(32)
    with pytest.raises(Exception, match="identity_key"):
        run_round(params, random_inputs(5, 3, 1.0, 0), identity_keys=wrong, session=bytes(16))


# -- weights ----------------------------------------------------------------------------------------------


def test_weighted_aggregation_gives_weighted_sum_and_total_weight() -> None:
    n, d = 7, 25
    encoding = FixedPointEncoding(clip_range=2.0, max_parties=n, max_weight=4.0)
    params = SecAggParams.secagg(n, dimension=d, clip_range=2.0, encoding=encoding)
    inputs = random_inputs(n, d, 2.0, seed=21)
    weights = [0.0, 0.5, 1.0, 1.5, 2.25, 3.0, 4.0]
    drop_at = {4: INPUT}
    report = run_round(
        params, inputs, weights=weights, drop_at=drop_at, session=session_for(21), rng_for=lambda p: party_rng(21, p)
    )
    result = report.result
    included = (0, 1, 2, 3, 5, 6)
    assert result.included == included
    assert np.array_equal(result.ring_sum, expected_ring_sum(params, inputs, included, 21, weights))
    check_decoded(params, result, inputs, included, weights)
    total = sum(weights[p] for p in included)
    assert result.decoded.total_weight == pytest.approx(total, abs=n / encoding.weight_scale)
    mean = sum(weights[p] * inputs[p] for p in included) / total
    assert np.allclose(result.decoded.mean(), mean, atol=1e-6)


def test_weight_zero_party_contributes_nothing() -> None:
    n, d = 5, 10
    params = semi_honest_params(n, dimension=d)
    inputs = random_inputs(n, d, 1.0, seed=2)
    weights = [1.0, 1.0, 0.0, 1.0, 1.0]
    result = run_round(params, inputs, weights=weights, session=session_for(2), rng_for=lambda p: party_rng(2, p))
    expected = sum((inputs[p] for p in (0, 1, 3, 4)), np.zeros(d))
    decoded = result.result.decoded
    assert np.max(np.abs(np.asarray(decoded.weighted_sum) - expected)) <= decoded.max_abs_error
    assert decoded.total_weight == pytest.approx(4.0, abs=n / params.encoding.weight_scale)


# -- below threshold ----------------------------------------------------------------------------------


def _assert_server_aborted(server: SecAggServer) -> None:
    assert server.state is ServerState.ABORTED
    with pytest.raises(InvalidTransitionError):
        server.result()
    with pytest.raises(InvalidTransitionError):
        server.close_stage()


@pytest.mark.parametrize("step", [ADVERTISE, SHARE, INPUT, UNMASK], ids=lambda s: s.name)
def test_below_threshold_aborts_semi_honest(step: RoundStep) -> None:
    params = semi_honest_params(6)  # t = n - d_max = 5
    assert params.threshold == 5
    drop_at = {1: step, 4: step}
    hand = HandRound(params, seed=STEPS.index(step))
    with pytest.raises(AbortError):
        hand.run(drop_at)
    _assert_server_aborted(hand.server)
    # further messages are refused too
    late = MaskedInput(session=hand.session, round=0, sender=0, ring_bits=32, data=bytes(4 * 9))
    with pytest.raises(InvalidTransitionError):
        hand.server.receive(late)
    with pytest.raises(AbortError):
        run_round(params, hand.inputs, drop_at=drop_at, session=bytes(16))


@pytest.mark.parametrize("step", STEPS, ids=lambda s: s.name)
def test_below_threshold_aborts_malicious(step: RoundStep) -> None:
    params, private = malicious_params()  # n=8, t=5, quorum=5
    assert (params.threshold, params.consistency_quorum) == (5, 5)
    drop_at = {0: step, 3: step, 6: step, 7: step}
    hand = HandRound(params, seed=STEPS.index(step), identity_keys=private)
    with pytest.raises(AbortError):
        hand.run(drop_at)
    _assert_server_aborted(hand.server)
    with pytest.raises(AbortError):
        run_round(params, hand.inputs, drop_at=drop_at, identity_keys=private, session=bytes(16))


def test_exactly_threshold_survivors_complete() -> None:
    params = semi_honest_params(6)  # t = 5
    hand = HandRound(params, seed=9)
    result = hand.run({2: INPUT})
    assert result.included == (0, 1, 3, 4, 5)
    assert result.dropped == (2,)
    assert np.array_equal(result.ring_sum, expected_ring_sum(params, hand.inputs, result.included, 9))
