"""Parameter derivation and the security / correctness rules, and the error hierarchy."""

from __future__ import annotations

import os

import numpy as np
import pytest
from pydantic import ValidationError

from protocols import (
    AbortError,
    DecodeError,
    FixedPointEncoding,
    InsecureParameterError,
    IntegrityError,
    InvalidTransitionError,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    SecAggParams,
    derive_secagg_plus,
    run_round,
)
from protocols.primitives import ed25519_public
from protocols.secagg import ETA, SIGMA


def _identity(n: int) -> tuple[bytes, ...]:
    return tuple(ed25519_public(os.urandom(32)) for _ in range(n))


def _params(n: int, k: int, t: int, *, rate: float, corrupt: float, malicious: bool, **kw: object) -> SecAggParams:
    return SecAggParams(
        num_parties=n,
        dimension=1,
        threshold=t,
        neighbours=k,
        dropout_rate=rate,
        corrupt_fraction=corrupt,
        encoding=FixedPointEncoding(clip_range=1.0, max_parties=n),
        identity_keys=_identity(n) if malicious else None,
        **kw,
    )


CASES = [
    (n, rate, corrupt, malicious)
    for n in (5, 12, 30, 64, 200)
    for rate, corrupt in ((0.0, 0.0), (0.05, 0.05), (0.1, 0.05), (0.2, 0.1))
    for malicious in (False, True)
]


@pytest.mark.parametrize(("n", "rate", "corrupt", "malicious"), CASES)
def test_derived_parameters_validate_and_are_minimal(n: int, rate: float, corrupt: float, malicious: bool) -> None:
    try:
        k, t = derive_secagg_plus(n, dropout_rate=rate, corrupt_fraction=corrupt, malicious=malicious)
    except InsecureParameterError:
        assert malicious or rate >= 0.2, "a mild setting should have parameters"
        return
    assert k == n - 1 or (k % 2 == 0 and 2 <= k < n - 1)
    assert 2 <= t <= k + 1
    params = _params(n, k, t, rate=rate, corrupt=corrupt, malicious=malicious)
    assert not params.insecure
    sec, cor = params.failure_log2
    assert sec <= -SIGMA and cor <= -ETA
    assert params.complete == (k == n - 1)
    # the largest t for this k
    if t + 1 <= k + 1:
        with pytest.raises(InsecureParameterError):
            _params(n, k, t + 1, rate=rate, corrupt=corrupt, malicious=malicious)
    # the smallest k: no threshold works with the next smaller candidate
    candidates = [*range(2, n - 1, 2), n - 1]
    if candidates.index(k) > 0:
        smaller = candidates[candidates.index(k) - 1]
        for t2 in range(2, smaller + 2):
            with pytest.raises(InsecureParameterError):
                _params(n, smaller, t2, rate=rate, corrupt=corrupt, malicious=malicious)
    # the constructor derives the same pair
    kw = {"identity_keys": _identity(n)} if malicious else {}
    built = SecAggParams.secagg_plus(n, dimension=3, clip_range=1.0, dropout_rate=rate, corrupt_fraction=corrupt, **kw)
    assert (built.neighbours, built.threshold) == (k, t)


def test_k8_at_n100_is_insecure_unless_allowed() -> None:
    with pytest.raises(InsecureParameterError):
        SecAggParams.secagg_plus(100, dimension=10, clip_range=1.0, neighbours=8, threshold=6)
    with pytest.raises(InsecureParameterError, match="allow_insecure"):  # the security bound, by itself
        SecAggParams.secagg_plus(
            100, dimension=10, clip_range=1.0, neighbours=8, threshold=6, dropout_rate=0.02, corrupt_fraction=0.1
        )
    params = SecAggParams.secagg_plus(100, dimension=10, clip_range=1.0, neighbours=8, threshold=6, allow_insecure=True)
    assert params.insecure
    assert "neighbours=8" in params.insecurity_reason
    gen = np.random.default_rng(0)
    inputs = [gen.uniform(-1, 1, 10) for _ in range(100)]
    result = run_round(params, inputs).result
    assert result.insecure is True
    assert np.allclose(result.decoded.weighted_sum, sum(inputs), atol=result.decoded.max_abs_error)
    # secure parameters give secure results
    secure = SecAggParams.secagg(5, dimension=2, clip_range=1.0)
    assert not secure.insecure
    assert run_round(secure, [np.zeros(2)] * 5).result.insecure is False


def test_semi_honest_secagg_threshold_rule() -> None:
    # n=10, n_C = ceil(0.3 * 10) = 3, d_max = ceil(0.2 * 10) = 2: need 3 < t <= 8
    kw = {"dimension": 1, "clip_range": 1.0, "dropout_rate": 0.2, "corrupt_fraction": 0.3}
    assert SecAggParams.secagg(10, **kw).threshold == 8  # the default is n - d_max
    for t in (4, 8):
        params = SecAggParams.secagg(10, threshold=t, **kw)
        assert (params.max_corrupt, params.max_dropped) == (3, 2)
        assert not params.insecure
    with pytest.raises(InsecureParameterError):
        SecAggParams.secagg(10, threshold=3, **kw)  # t = n_C: the colluders rebuild secrets
    with pytest.raises(InsecureParameterError):
        SecAggParams.secagg(10, threshold=9, **kw)  # t = n - d_max + 1: dropouts stall the round
    assert SecAggParams.secagg(10, threshold=3, allow_insecure=True, **kw).insecure


def test_malicious_secagg_threshold_rule() -> None:
    # n=10, n_C=2, d_max=2: 2t > n + n_C = 12, so t >= 7; quorum max(12 // 2 + 1, t) <= n - d_max
    kw = {"dimension": 1, "clip_range": 1.0, "dropout_rate": 0.2, "corrupt_fraction": 0.2}
    keys = _identity(10)
    params = SecAggParams.secagg(10, threshold=7, identity_keys=keys, **kw)
    assert params.malicious and params.consistency_quorum == 7
    assert 2 * params.threshold > params.num_parties + params.max_corrupt
    with pytest.raises(InsecureParameterError):
        SecAggParams.secagg(10, threshold=6, identity_keys=keys, **kw)
    assert not SecAggParams.secagg(10, threshold=6, **kw).insecure  # fine without a malicious server
    # the consistency quorum must be reachable by the survivors
    with pytest.raises(InsecureParameterError):
        SecAggParams.secagg(10, threshold=6, identity_keys=keys, allow_insecure=True, **{**kw, "dropout_rate": 0.5})


def test_structural_checks() -> None:
    enc = FixedPointEncoding(clip_range=1.0, max_parties=10)
    base = {"num_parties": 10, "dimension": 4, "encoding": enc, "allow_insecure": True}
    with pytest.raises(InsecureParameterError):
        SecAggParams(**base, neighbours=10, threshold=3)  # more than n - 1
    with pytest.raises(InsecureParameterError):
        SecAggParams(**base, neighbours=5, threshold=3)  # odd and below n - 1
    with pytest.raises(InsecureParameterError):
        SecAggParams(**base, neighbours=4, threshold=6)  # t > k + 1
    with pytest.raises(InsecureParameterError):
        SecAggParams(
            **{**base, "encoding": FixedPointEncoding(clip_range=1.0, max_parties=9)}, neighbours=9, threshold=8
        )
    with pytest.raises(InsecureParameterError):
        SecAggParams(**base, neighbours=9, threshold=8, identity_keys=_identity(9))
    with pytest.raises(ValidationError):
        SecAggParams(**base, neighbours=9, threshold=8, unknown=1)
    with pytest.raises(ValidationError):
        SecAggParams(**base, neighbours=9, threshold=1)
    with pytest.raises(ValidationError):
        SecAggParams(**{**base, "num_parties": 2}, neighbours=1, threshold=2)
    params = SecAggParams(**base, neighbours=9, threshold=8)
    with pytest.raises(ValidationError):
        params.threshold = 3  # type: ignore[misc]


def test_digest_binds_every_parameter() -> None:
    a = SecAggParams.secagg(6, dimension=4, clip_range=1.0)
    assert a.digest() == SecAggParams.secagg(6, dimension=4, clip_range=1.0).digest()
    assert len(a.digest()) == 32
    others = [
        SecAggParams.secagg(7, dimension=4, clip_range=1.0),
        SecAggParams.secagg(6, dimension=5, clip_range=1.0),
        SecAggParams.secagg(6, dimension=4, clip_range=2.0),
        SecAggParams.secagg(6, dimension=4, clip_range=1.0, threshold=4),
        SecAggParams.secagg(6, dimension=4, clip_range=1.0, dropout_rate=0.05),
    ]
    assert len({a.digest(), *(p.digest() for p in others)}) == 1 + len(others)


def test_digest_of_params_with_identity_keys() -> None:
    keys = _identity(5)
    params = SecAggParams.secagg(5, dimension=1, clip_range=1.0, threshold=4, identity_keys=keys)
    assert len(params.digest()) == 32
    other = SecAggParams.secagg(5, dimension=1, clip_range=1.0, threshold=4, identity_keys=_identity(5))
    assert params.digest() != other.digest()


def test_threshold_n_is_allowed_without_dropouts() -> None:
    params = SecAggParams.secagg(5, dimension=1, clip_range=1.0, threshold=5, dropout_rate=0.0)
    assert params.threshold == 5


def test_extreme_dropout_rate_gives_insecure_parameter_error() -> None:
    with pytest.raises(InsecureParameterError, match="dropout"):
        derive_secagg_plus(5, dropout_rate=0.9, corrupt_fraction=0.05)


def test_explicit_secagg_plus_parameters_skip_the_derivation() -> None:
    params = SecAggParams.secagg_plus(
        10, dimension=1, clip_range=1.0, neighbours=4, threshold=2, dropout_rate=0.9, allow_insecure=True
    )
    assert params.insecure


def test_error_hierarchy() -> None:
    with pytest.raises(TypeError):
        ProtocolError("x")
    for cls in (LocalProtocolError, RemoteProtocolError, AbortError, InvalidTransitionError, DecodeError):
        assert isinstance(cls("x"), ProtocolError)
    assert issubclass(InvalidTransitionError, LocalProtocolError)
    assert issubclass(InsecureParameterError, LocalProtocolError) and issubclass(InsecureParameterError, ValueError)
    assert issubclass(DecodeError, RemoteProtocolError) and issubclass(IntegrityError, RemoteProtocolError)
    assert not issubclass(AbortError, (LocalProtocolError, RemoteProtocolError))
    err = RemoteProtocolError("bad", peer_id=3, field="round")
    assert (err.peer_id, err.field, str(err)) == (3, "round", "bad")
    integrity = IntegrityError(peer_id=5)
    assert (integrity.peer_id, integrity.field, str(integrity)) == (5, None, "integrity check failed")


def test_bounds_do_not_overflow_for_large_federations() -> None:
    params = SecAggParams.secagg_plus(
        20000, dimension=1, clip_range=1.0, neighbours=400, threshold=300, allow_insecure=True
    )
    assert params.failure_log2[0] <= 0


def test_duplicate_identity_keys_are_refused() -> None:
    key = b"\x01" * 32
    with pytest.raises(InsecureParameterError, match="identity_keys"):
        SecAggParams.secagg(5, dimension=1, clip_range=1.0, threshold=4, identity_keys=(key,) * 5)


def test_consistency_quorum_is_never_below_threshold() -> None:
    for n in (20, 50, 100):
        params = SecAggParams.secagg_plus(n, dimension=1, clip_range=1.0)
        assert params.consistency_quorum >= params.threshold
        assert params.consistency_quorum >= (n + params.max_corrupt) // 2 + 1


def test_explicit_counts_replace_the_fractions_and_leave_old_parameters_unchanged() -> None:
    n = 30
    by_fraction = derive_secagg_plus(n, dropout_rate=0.1, corrupt_fraction=0.05, malicious=True)
    counts = {"corrupt_parties": 2, "dropped_parties": 3}  # ceil(0.05 x 30), ceil(0.1 x 30)
    assert derive_secagg_plus(n, dropout_rate=0.1, corrupt_fraction=0.05, malicious=True, **counts) == by_fraction
    # n_C over a roster of 200 (ceil(0.05 x 200) = 10) asks for a larger threshold at the same n
    k, t = derive_secagg_plus(n, dropout_rate=0.1, corrupt_fraction=0.05, malicious=True, corrupt_parties=10)
    assert t > by_fraction[1]
    params = SecAggParams.secagg_plus(n, dimension=2, clip_range=1.0, identity_keys=_identity(n), corrupt_parties=10)
    assert (params.neighbours, params.threshold, params.max_corrupt, params.max_dropped) == (k, t, 10, 3)
    assert SecAggParams.model_validate_json(params.model_dump_json()) == params
    plain = SecAggParams.secagg_plus(n, dimension=2, clip_range=1.0)
    assert "corrupt_parties" not in plain.model_dump_json() and "dropped_parties" not in plain.model_dump_json()
    with pytest.raises(InsecureParameterError, match="no honest survivor"):
        SecAggParams.secagg(n, dimension=2, clip_range=1.0, threshold=2, corrupt_parties=27, allow_insecure=True)
    with pytest.raises(InsecureParameterError, match="must be >= 0"):
        derive_secagg_plus(n, dropout_rate=0.1, corrupt_fraction=0.05, corrupt_parties=-1)
