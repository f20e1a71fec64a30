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


# -- signed shares and complaints (wire v2) -------------------------------------------------------------------


def test_share_statements_and_dealer_signatures_match_the_spec():
    from protocols.primitives import ed25519_public, ed25519_sign, ed25519_verify
    from protocols.secagg._transcript import share_statement

    case = VECTORS["signed_shares"]
    transcript, private = bytes.fromhex(case["transcript"]), bytes.fromhex(case["dealer_private"])
    assert ed25519_public(private).hex() == case["dealer_public"]
    for share in case["shares"]:
        statement = share_statement(
            transcript, share["kind"], share["dealer"], share["holder"], bytes.fromhex(share["share"])
        )
        assert statement.hex() == share["statement"]
        assert ed25519_sign(private, statement).hex() == share["signature"]
        ed25519_verify(bytes.fromhex(case["dealer_public"]), bytes.fromhex(share["signature"]), statement)
    assert case["shares"][0]["statement"] != case["shares"][1]["statement"]  # the kind byte separates them


def test_complaint_statement_box_layout_and_unmask_response_wire_match_the_spec():
    from protocols.secagg import SignedShare, UnmaskResponse, decode_message, encode_message
    from protocols.secagg._client import BOX_PLAINTEXT
    from protocols.secagg._transcript import complaint_statement

    case = VECTORS["signed_shares"]
    transcript = bytes.fromhex(case["transcript"])
    complaint = case["complaint"]
    assert complaint_statement(transcript, complaint["accuser"], complaint["accused"]).hex() == complaint["statement"]
    b, s = case["shares"]
    box = bytes.fromhex(case["box_plaintext"])
    assert (
        BOX_PLAINTEXT.pack(
            b["dealer"],
            b["holder"],
            bytes.fromhex(b["share"]),
            bytes.fromhex(s["share"]),
            bytes.fromhex(b["signature"]),
            bytes.fromhex(s["signature"]),
        )
        == box
    )
    wire = case["unmask_response"]
    message = UnmaskResponse(
        session=bytes.fromhex(wire["session"]),
        round=wire["round"],
        sender=wire["sender"],
        self_mask_shares=(
            SignedShare(peer=b["dealer"], share=bytes.fromhex(b["share"]), signature=bytes.fromhex(b["signature"])),
        ),
        mask_key_shares=(),
    )
    assert encode_message(message).hex() == wire["wire"]
    assert decode_message(bytes.fromhex(wire["wire"])) == message
