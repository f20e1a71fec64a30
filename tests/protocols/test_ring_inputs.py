"""Integer ring inputs (distributed DP): taken mod 2^b as they are, never clipped or scaled.

A distributed-DP client quantizes its clipped update and adds its share of Skellam noise itself, so
it hands the masking families integers; the server must read back their exact ring sum. The control
in each test passes the same numbers as floats, which go through clipping and scaling and give a
different sum: that is what a client would silently get if integers were still encoded as floats.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import pytest
from secagg_harness import party_rng

from protocols import (
    DeterministicRandom,
    FixedPointEncoding,
    LocalProtocolError,
    SecAggParams,
    SecurityPolicy,
)
from protocols.driver import run_sessions
from protocols.he import HEClient, HEParams
from protocols.plaintext import PlaintextFamily
from protocols.primitives import ring_dtype
from protocols.primitives.prg import CHUNK_WORDS
from protocols.secagg import SecAggFamily
from protocols.session import RoundStep

N, D = 5, 7
SEED = 1234


def _params() -> SecAggParams:
    return SecAggParams.secagg(N, dimension=D, clip_range=1.0)


def _integer_inputs() -> list[npt.NDArray[np.integer]]:
    """Negative values, values beyond 2^31 and beyond 2^32, extremes of int64, and mixed dtypes."""
    gen = np.random.default_rng(7)
    big: list[npt.NDArray[np.integer]] = [
        np.array([2**40 + 3, -(2**35) - 1, 2**63 - 1, -(2**63), -1, 2**31, 0], dtype=np.int64),
        gen.integers(-(2**62), 2**62, D, dtype=np.int64),
        np.array([2**64 - 1, 2**32, 2**32 + 5, 1, 2**63, 0, 12345], dtype=np.uint64),
        np.array([-128, 127, -1, 0, 5, -7, 100], dtype=np.int8),
        gen.integers(-(2**31), 2**31, D, dtype=np.int64).astype(np.int32),
    ]
    return big


def _mod_sum(inputs: list[npt.NDArray[np.integer]], included: tuple[int, ...], bits: int) -> list[int]:
    """The expected ring sum in Python integers (no numpy casting involved)."""
    return [sum(int(inputs[p][i]) for p in included) % (1 << bits) for i in range(D)]


def _run(
    family: SecAggFamily | PlaintextFamily,
    inputs: Sequence[npt.NDArray[np.integer]] | Sequence[npt.NDArray[np.floating]],
    drop_at: dict[int, RoundStep] | None = None,
) -> tuple[npt.NDArray[np.unsignedinteger], tuple[int, ...]]:
    report = run_sessions(family, inputs, drop_at=drop_at, rng_for=lambda p: party_rng(SEED, p))
    result = report.result
    assert result.ring_sum is not None
    return np.asarray(result.ring_sum), tuple(result.included)


def _weight_count(params: SecAggParams, ring_sum: npt.NDArray[np.unsignedinteger]) -> float:
    signed = ring_sum.view(ring_sum.dtype.str.replace("u", "i"))
    return int(signed[-1]) / params.encoding.weight_scale


# -- SecAgg ----------------------------------------------------------------------------------------------------------


def test_secagg_ring_sum_is_the_exact_sum_of_integer_inputs_mod_2_32() -> None:
    params = _params()
    inputs = _integer_inputs()
    ring_sum, included = _run(SecAggFamily(params), inputs)
    assert included == tuple(range(N))
    assert ring_sum.dtype == ring_dtype(32) and ring_sum.shape == (D + 1,)
    assert [int(v) for v in ring_sum[:-1]] == _mod_sum(inputs, included, 32)
    assert _weight_count(params, ring_sum) == N  # weight 1.0 encodes exactly: the weight word counts inputs
    assert params.encoding.decode(ring_sum, num_inputs=N).total_weight == N


def test_secagg_ring_sum_leaves_out_a_party_that_drops_at_input() -> None:
    params = _params()
    inputs = _integer_inputs()
    ring_sum, included = _run(SecAggFamily(params), inputs, drop_at={2: RoundStep.INPUT})
    assert included == (0, 1, 3, 4)
    assert [int(v) for v in ring_sum[:-1]] == _mod_sum(inputs, included, 32)
    assert [int(v) for v in ring_sum[:-1]] != _mod_sum(inputs, tuple(range(N)), 32)  # party 2's z is absent
    assert _weight_count(params, ring_sum) == N - 1


def test_control_the_same_integers_as_floats_are_clipped_and_scaled() -> None:
    """Integers passed as float64 go through `encode`: clipped to [-c, c] and scaled, so the sum differs."""
    params = _params()
    inputs = _integer_inputs()
    as_float = [z.astype(np.float64) for z in inputs]
    ring_sum, included = _run(SecAggFamily(params), as_float)
    assert [int(v) for v in ring_sum[:-1]] != _mod_sum(inputs, included, 32)
    # what encode makes of them: every input clipped to +-level, so the centred sum stays within N * level
    signed = ring_sum[:-1].view(np.int32).astype(np.int64)
    assert np.abs(signed).max() <= N * params.encoding.level
    expected = np.zeros(D + 1, dtype=ring_dtype(32))
    for p in included:
        expected += params.encoding.encode(as_float[p], rounding_seed=party_rng(SEED, p).token_bytes(32))
    assert np.array_equal(ring_sum, expected)


def test_plaintext_family_sums_integers_the_same_way() -> None:
    params = _params()
    inputs = _integer_inputs()
    family = PlaintextFamily(params, policy=SecurityPolicy.model_validate({"protocol": "plaintext"}))
    plain_sum, included = _run(family, inputs, drop_at={4: RoundStep.INPUT})
    assert included == (0, 1, 2, 3)
    assert [int(v) for v in plain_sum[:-1]] == _mod_sum(inputs, included, 32)
    masked_sum, _ = _run(SecAggFamily(params), inputs, drop_at={4: RoundStep.INPUT})
    assert np.array_equal(plain_sum, masked_sum)


def test_secagg_client_still_checks_the_shape_of_integer_inputs() -> None:
    params = _params()
    client = SecAggFamily(params).client(0, session=bytes(16), round_number=0, rng=party_rng(SEED, 0))
    with pytest.raises(LocalProtocolError, match=r"shape \(7,\)"):
        client.set_input(np.arange(D + 1, dtype=np.int64))


# -- encode_ring -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [16, 32, 64])
def test_encode_ring_reduces_mod_2_b_without_clipping(bits: int) -> None:
    enc = FixedPointEncoding(clip_range=1.0, max_parties=4, ring_bits=bits)
    z = np.array([-1, 2**15, -(2**31) - 7, 2**40 + 1, 2**63 - 1, -(2**63), 0, 3 * enc.level], dtype=np.int64)
    out = enc.encode_ring(z, rounding_seed=bytes(32))
    assert out.dtype == ring_dtype(bits) and out.shape == (len(z) + 1,)
    assert [int(v) for v in out[:-1]] == [int(v) % (1 << bits) for v in z]
    assert int(out[-1]) == enc.level  # weight 1.0 with max_weight 1.0: exactly `level`
    assert int(out[0]) == (1 << bits) - 1  # two's complement
    assert int(out[-2]) == (3 * enc.level) % (1 << bits)  # beyond +-level: not clipped (encode would clip)


@pytest.mark.parametrize("length", [0, 1, 3, 4, 5, 17, CHUNK_WORDS - 1, CHUNK_WORDS, CHUNK_WORDS + 2])
def test_encode_ring_weight_word_is_encodes_bit_for_bit(length: int) -> None:
    """Same seed, same length: the same stochastically rounded weight word as `encode` (fractional weights too)."""
    enc = FixedPointEncoding(clip_range=1.0, max_parties=8, max_weight=2.0)
    for i, weight in enumerate((0.0, 0.3, 1.0, 1.234567, 2.0)):
        seed = DeterministicRandom(b"w/%d/%d" % (length, i)).token_bytes(32)
        ring = enc.encode_ring(np.zeros(length, dtype=np.int32), weight=weight, rounding_seed=seed)
        floats = enc.encode(np.zeros(length), weight=weight, rounding_seed=seed)
        assert ring[-1] == floats[-1], (length, weight)


def test_encode_ring_weight_rounding_is_stochastic_and_unbiased() -> None:
    """The rounding word does vary with the seed (a fixed word would round a fractional weight one way)."""
    enc = FixedPointEncoding(clip_range=1.0, max_parties=4)
    weight = 1000.25 / enc.weight_scale  # a quarter of a unit above the ring point 1000
    words = [
        int(enc.encode_ring(np.zeros(3, dtype=np.int64), weight=weight, rounding_seed=bytes([s]) * 32)[-1])
        for s in range(200)
    ]
    assert set(words) == {1000, 1001}
    assert 20 < words.count(1001) < 80  # about a quarter of 200


def test_encode_ring_draws_the_rounding_seed_like_encode() -> None:
    """One 32-byte draw from the session's source either way, so replays and the test harness stay aligned."""
    enc = FixedPointEncoding(clip_range=1.0, max_parties=4)
    a, b = DeterministicRandom(b"x"), DeterministicRandom(b"x")
    ring = enc.encode_ring(np.zeros(2, dtype=np.int64), weight=0.3, rng=a)
    floats = enc.encode(np.zeros(2), weight=0.3, rng=b)
    assert ring[-1] == floats[-1] and a.token_bytes(8) == b.token_bytes(8)


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros(4, dtype=np.float64),
        np.zeros(4, dtype=np.float32),
        np.zeros(4, dtype=np.bool_),
        np.zeros((2, 2), dtype=np.int64),
        np.array(3, dtype=np.int64),
        np.array(["1", "2"]),
    ],
    ids=["float64", "float32", "bool", "2-D", "0-D", "str"],
)
def test_encode_ring_refuses_anything_but_a_1d_integer_vector(bad: npt.NDArray[np.generic]) -> None:
    enc = FixedPointEncoding(clip_range=1.0, max_parties=4)
    with pytest.raises(LocalProtocolError, match=r"^x must be a 1-D integer vector"):
        enc.encode_ring(bad, rounding_seed=bytes(32))  # type: ignore[arg-type]


def test_encode_ring_checks_weight_and_seed() -> None:
    enc = FixedPointEncoding(clip_range=1.0, max_parties=4)
    z = np.zeros(3, dtype=np.int64)
    with pytest.raises(LocalProtocolError, match="weight"):
        enc.encode_ring(z, weight=1.5, rounding_seed=bytes(32))
    with pytest.raises(LocalProtocolError, match="weight"):
        enc.encode_ring(z, weight=float("nan"), rounding_seed=bytes(32))
    with pytest.raises(LocalProtocolError, match="rounding_seed"):
        enc.encode_ring(z, rounding_seed=bytes(31))


def test_bool_input_is_not_taken_as_ring_elements() -> None:
    """Bool is not an integer dtype here: set_input sends it to `encode`, which refuses it."""
    client = SecAggFamily(_params()).client(0, session=bytes(16), round_number=0, rng=party_rng(SEED, 0))
    with pytest.raises(LocalProtocolError, match="float vector"):
        client.set_input(np.ones(D, dtype=np.bool_))  # type: ignore[arg-type]


# -- HE ----------------------------------------------------------------------------------------------------------------


def test_he_client_refuses_integer_inputs_and_accepts_floats() -> None:
    params = HEParams.bfv_packed(4, dimension=D, clip_range=0.05)
    client = HEClient(params, party_id=0, session=bytes(16), round_number=0)
    for dtype in (np.int64, np.int32, np.uint8):
        with pytest.raises(LocalProtocolError, match="integer ring inputs are for masking families"):
            client.set_input(np.zeros(D, dtype=dtype))  # type: ignore[arg-type]
    client.set_input(np.zeros(D))  # control: the float update is accepted
