"""Known-answer vectors for the wire-visible primitives (tests/protocols/vectors/secagg_v1.json)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from protocols.primitives import (
    LABEL_NEIGHBOUR_GRAPH,
    LABEL_PAIRWISE_MASK,
    LABEL_ROUNDING,
    LABEL_SHARE_ENCRYPTION,
    PRIME,
    MaskAccumulator,
    derive_key,
    expand_mask,
    reconstruct,
    ring_dtype,
    split,
)

VECTORS = json.loads((Path(__file__).parent / "vectors" / "secagg_v1.json").read_text())
LABELS = {
    "share-encryption": LABEL_SHARE_ENCRYPTION,
    "pairwise-mask": LABEL_PAIRWISE_MASK,
    "stochastic-rounding": LABEL_ROUNDING,
    "neighbour-graph": LABEL_NEIGHBOUR_GRAPH,
}


class _FixedBytes:
    """A SecretSource that replays given bytes, to reproduce Shamir coefficients."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def token_bytes(self, n: int) -> bytes:
        out, self.data = self.data[:n], self.data[n:]
        assert len(out) == n, "vector ran out of bytes"
        return out


def test_vectors_have_a_source():
    assert VECTORS["source"]


@pytest.mark.parametrize("case", VECTORS["prg"], ids=lambda c: f"b{c['ring_bits']}")
def test_prg_known_answers(case):
    seed = bytes.fromhex(case["seed"])
    words = expand_mask(seed, len(case["words"]), case["ring_bits"])
    assert words.tolist() == case["words"]
    acc = __import__("numpy").zeros(len(case["words"]), dtype=ring_dtype(case["ring_bits"]))
    MaskAccumulator(case["ring_bits"], chunk_words=3).apply(acc, plus=[seed])
    assert acc.tolist() == case["words"]


@pytest.mark.parametrize("case", VECTORS["kdf"], ids=lambda c: f"{c['label']}-{c['a']}-{c['b']}")
def test_kdf_known_answers(case):
    okm = derive_key(
        bytes.fromhex(case["ikm"]),
        label=LABELS[case["label"]],
        transcript=bytes.fromhex(case["transcript"]),
        a=case["a"],
        b=case["b"],
    )
    assert okm.hex() == case["okm"]


def test_kdf_labels_are_distinct():
    okms = {c["okm"] for c in VECTORS["kdf"]}
    assert len(okms) == len(VECTORS["kdf"])


def test_shamir_known_answers():
    case = VECTORS["shamir"]
    assert int(case["prime"]) == PRIME
    secret = bytes.fromhex(case["secret"])
    rng = _FixedBytes(b"".join(bytes.fromhex(c) for c in case["coefficients"]))
    shares = split(secret, case["holders"], case["threshold"], rng)
    assert {str(h): s.hex() for h, s in shares.items()} == case["shares"]
    subset = {int(h): bytes.fromhex(s) for h, s in list(case["shares"].items())[-3:]}
    assert reconstruct(subset, case["threshold"]) == secret
