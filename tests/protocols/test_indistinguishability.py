"""What the server sees of one client, a MaskedInput, is indistinguishable from uniform noise.

Chi-square goodness of fit over 256 buckets (a byte of every ring word). Every party draws from a
fixed `DeterministicRandom`, so the statistics are fixed numbers: the test cannot flake. The same
statistic on the unmasked encoding is astronomically large, so the test can fail.
"""

from __future__ import annotations

import numpy as np
import pytest
from secagg_harness import HandRound, rounding_seed

from protocols import FixedPointEncoding, SecAggParams
from protocols.secagg import MaskedInput

try:
    from scipy.stats import chi2
except ImportError:  # pragma: no cover - scipy is optional
    chi2 = None

BUCKETS = 256
# chi-square critical values, 255 degrees of freedom: P[X > 330.5] = 1e-3, P[X > 310.5] = 1e-2
CRITICAL_1E3 = 330.5


def chi_square(values: np.ndarray) -> float:
    counts = np.bincount(values.astype(np.int64), minlength=BUCKETS)
    assert counts.shape == (BUCKETS,)
    expected = values.size / BUCKETS
    return float(((counts - expected) ** 2 / expected).sum())


def top_byte(words: np.ndarray) -> np.ndarray:
    return (words >> (8 * words.dtype.itemsize - 8)).astype(np.int64)


def low_byte(words: np.ndarray) -> np.ndarray:
    return (words & 0xFF).astype(np.int64)


def test_critical_value() -> None:
    if chi2 is None:
        pytest.skip("scipy not installed")
    assert chi2.sf(CRITICAL_1E3, BUCKETS - 1) == pytest.approx(1e-3, rel=0.05)


def _masked_and_plain(params: SecAggParams, seed: int, inputs=None) -> tuple[list[np.ndarray], list[np.ndarray]]:
    hand = HandRound(params, seed=seed, inputs=inputs)
    hand.advance(2)
    replies = hand.respond()
    masked = [m.vector() for m in replies.values() if isinstance(m, MaskedInput)]
    plain = [
        params.encoding.encode(hand.inputs[p], rounding_seed=rounding_seed(seed, p)) for p in range(params.num_parties)
    ]
    return masked, plain


def _params(n: int, d: int, ring_bits: int, plus: bool) -> SecAggParams:
    encoding = FixedPointEncoding(clip_range=1.0, max_parties=n, ring_bits=ring_bits)
    if plus:
        return SecAggParams.secagg_plus(n, dimension=d, clip_range=1.0, neighbours=2, threshold=2, encoding=encoding,
                                        allow_insecure=True)  # fmt: skip
    return SecAggParams.secagg(n, dimension=d, clip_range=1.0, encoding=encoding)


@pytest.mark.parametrize(("ring_bits", "plus"), [(16, False), (16, True), (32, False)])
def test_masked_input_is_uniform(ring_bits: int, plus: bool) -> None:
    n, d = 6, 2000
    params = _params(n, d, ring_bits, plus)
    masked, plain = _masked_and_plain(params, seed=ring_bits + plus)
    assert len(masked) == n
    pooled = np.concatenate(masked)
    for extract in (top_byte, low_byte):
        stat = chi_square(extract(pooled))
        assert stat < CRITICAL_1E3, (extract.__name__, stat)
        for vector in masked:  # each client on its own, too (about 7.8 per bucket)
            assert chi_square(extract(vector)) < CRITICAL_1E3 + 60
    # the unmasked encoding of the same inputs is wildly non-uniform in its high bits
    assert chi_square(top_byte(np.concatenate(plain))) > 20 * CRITICAL_1E3
    if chi2 is not None:
        assert chi2.sf(chi_square(top_byte(pooled)), BUCKETS - 1) > 1e-3
        assert chi2.sf(chi_square(top_byte(np.concatenate(plain))), BUCKETS - 1) < 1e-100


def test_masked_input_of_constant_input_is_uniform_and_unrelated() -> None:
    """Inputs of all zeros, or all at the clip bound: the masked words still look uniform."""
    n, d = 5, 2000
    params = _params(n, d, 16, False)
    zeros = [np.zeros(d) for _ in range(n)]
    ones = [np.ones(d) for _ in range(n)]
    masked_zero, plain_zero = _masked_and_plain(params, seed=7, inputs=zeros)
    masked_one, _ = _masked_and_plain(params, seed=7, inputs=ones)
    assert len(np.unique(plain_zero[0][:-1])) <= 2  # the plain encoding is (almost) constant
    for masked in (masked_zero, masked_one):
        assert chi_square(top_byte(np.concatenate(masked))) < CRITICAL_1E3
    # same keys and masks (same seed), different inputs: the difference is exactly the encoding difference
    diff = (masked_one[0] - masked_zero[0])[:-1]
    assert len(np.unique(diff)) <= 2
    # and across independent seeds, one party's masked words are uncorrelated
    other, _ = _masked_and_plain(params, seed=8, inputs=zeros)
    a = masked_zero[0].astype(np.float64)
    b = other[0].astype(np.float64)
    assert abs(np.corrcoef(a, b)[0, 1]) < 0.1
