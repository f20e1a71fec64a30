"""Finding 5b: shares that cannot be forged.

Before, with exactly t share responders, one holder returning a modified Shamir share went
undetected (the README claimed a single faulty share was caught): the server rebuilt a wrong
self-mask seed and returned a silently wrong sum. Now every share carries its dealer's signature
(identity key in the malicious setting, the advertised session key in the semi-honest one); the
server discards forgeries, names the forger, and rebuilds from any t valid shares or aborts.

Each test runs the real sessions; the weakened control is the same server with share verification
switched off (`SecAggServer._share_is_valid` patched to accept everything), which returns a wrong
sum without any error.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from secagg_harness import HandRound, expected_ring_sum, malicious_params, semi_honest_params

from protocols import AbortError, IntegrityError, RemoteProtocolError, SecAggParams, SecAggServer
from protocols.primitives import PRIME, ed25519_public, ed25519_sign, ed25519_verify
from protocols.secagg import AdvertiseKeys, SignedShare, UnmaskResponse
from protocols.secagg._transcript import SHARE_KIND_MASK_KEY, SHARE_KIND_SELF_MASK, share_statement


def _settings() -> Iterator[tuple[str, SecAggParams, list[bytes] | None]]:
    yield "semi-honest", semi_honest_params(8, dropout_rate=0.25), None  # n=8, d_max=2, t=6
    params, private = malicious_params(8)  # n=8, t=5, quorum=5
    yield "malicious", params, private


SETTINGS = list(_settings())


def _shift(share: bytes, delta: int = 1) -> bytes:
    """A different, well-formed share: the forger moves the point by `delta`."""
    return ((int.from_bytes(share, "big") + delta) % PRIME).to_bytes(33, "big")


def _to_unmask(params: SecAggParams, private: list[bytes] | None, seed: int) -> tuple[HandRound, int]:
    """A round advanced to the unmask requests; returns it and the number of closes made."""
    hand = HandRound(params, seed=seed, identity_keys=private)
    closes = 4 if params.malicious else 3
    hand.advance(closes)
    return hand, closes


def _forge_self_mask_share(reply: UnmaskResponse, owner: int) -> UnmaskResponse:
    shares = tuple(
        s.model_copy(update={"share": _shift(s.share)}) if s.peer == owner else s for s in reply.self_mask_shares
    )
    return reply.model_copy(update={"self_mask_shares": shares})


def _unverified(monkeypatch: pytest.MonkeyPatch) -> None:
    """The weakened control: a server that takes every returned share at its word."""
    monkeypatch.setattr(SecAggServer, "_share_is_valid", lambda self, kind, holder, signed: True)


@pytest.mark.parametrize(("name", "params", "private"), SETTINGS, ids=[s[0] for s in SETTINGS])
def test_forged_share_with_exactly_t_responders_aborts_and_the_unverified_control_sums_wrong(
    name: str, params: SecAggParams, private: list[bytes] | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    t, forger, owner = params.threshold, 0, 1
    for defended in (True, False):
        hand, _ = _to_unmask(params, private, seed=51)
        replies = hand.respond()
        responders = sorted(replies)[:t]  # exactly t answer
        sent = {p: replies[p] for p in responders}
        sent[forger] = _forge_self_mask_share(sent[forger], owner)
        hand.submit(sent)
        if defended:
            with pytest.raises(AbortError, match=f"unmasking party {owner}: {t - 1} valid shares"):
                hand.close()
            continue
        with monkeypatch.context() as patch:
            _unverified(patch)
            hand.close()  # no error at all
        result = hand.server.result()
        assert result.included == tuple(range(params.num_parties)) and result.misbehaving == ()
        truth = expected_ring_sum(params, hand.inputs, result.included, 51)
        assert not np.array_equal(result.ring_sum, truth)  # the control: a silently wrong sum
        wrong = np.asarray(result.decoded.weighted_sum)
        clip = params.encoding.clip_range
        true_sum = sum(np.clip(x, -clip, clip) for x in hand.inputs)
        assert np.max(np.abs(wrong - true_sum)) > 1.0  # not rounding noise: garbage


@pytest.mark.parametrize(("name", "params", "private"), SETTINGS, ids=[s[0] for s in SETTINGS])
def test_forged_share_with_t_plus_one_responders_gives_the_exact_sum_and_names_the_forger(
    name: str, params: SecAggParams, private: list[bytes] | None
) -> None:
    t, forger = params.threshold, 2
    hand, _ = _to_unmask(params, private, seed=52)
    replies = hand.respond()
    sent = {p: replies[p] for p in sorted(replies)[: t + 1]}
    for owner in range(params.num_parties):  # every self-mask share it returns is forged
        sent[forger] = _forge_self_mask_share(sent[forger], owner)
    hand.submit(sent)
    hand.close()
    result = hand.server.result()
    assert result.misbehaving == (forger,)
    assert np.array_equal(result.ring_sum, expected_ring_sum(params, hand.inputs, result.included, 52))


@pytest.mark.parametrize(("name", "params", "private"), SETTINGS, ids=[s[0] for s in SETTINGS])
def test_forged_mask_key_shares_of_a_dropped_party_are_discarded(
    name: str, params: SecAggParams, private: list[bytes] | None
) -> None:
    hand = HandRound(params, seed=53, identity_keys=private)
    hand.advance(2)
    hand.submit(hand.respond(), drop=[7])  # 7 drops after sharing: its mask key is rebuilt
    hand.close()
    if params.malicious:
        hand.submit(hand.respond())
        hand.close()
    replies = hand.respond()
    forged = replies[0]
    bad = tuple(s.model_copy(update={"share": _shift(s.share, 5)}) for s in forged.mask_key_shares)
    assert [s.peer for s in bad] == [7]
    replies[0] = forged.model_copy(update={"mask_key_shares": bad})
    hand.submit(replies)
    hand.close()
    result = hand.server.result()
    assert result.dropped == (7,) and result.misbehaving == (0,)
    assert np.array_equal(result.ring_sum, expected_ring_sum(params, hand.inputs, result.included, 53))


def test_a_share_of_the_other_kind_or_of_another_holder_does_not_verify() -> None:
    """The kind byte and the holder id are signed: neither swap passes for a valid share."""
    params = semi_honest_params(8, dropout_rate=0.25)  # t = 6, 8 responders
    hand = HandRound(params, seed=54)
    hand.advance(2)
    hand.submit(hand.respond(), drop=[7])
    hand.close()
    replies = hand.respond()
    # holder 1 returns, as its self-mask share of 2, the (validly signed) share of 2 that holder 3 holds
    stolen = next(s for s in replies[3].self_mask_shares if s.peer == 2)
    replies[1] = replies[1].model_copy(
        update={"self_mask_shares": tuple(stolen if s.peer == 2 else s for s in replies[1].self_mask_shares)}
    )
    # holder 0 returns a mask-key share (of 7, with 7's signature) in place of its self-mask share of 4
    s7 = replies[0].mask_key_shares[0]
    replies[0] = replies[0].model_copy(
        update={
            "self_mask_shares": tuple(
                SignedShare(peer=4, share=s7.share, signature=s7.signature) if s.peer == 4 else s
                for s in replies[0].self_mask_shares
            )
        }
    )
    hand.submit(replies)
    hand.close()
    result = hand.server.result()
    assert result.misbehaving == (0, 1)
    assert np.array_equal(result.ring_sum, expected_ring_sum(params, hand.inputs, result.included, 54))


def test_the_server_refuses_a_share_for_a_party_the_responder_cannot_hold() -> None:
    params = semi_honest_params(6)
    hand = HandRound(params, seed=55)
    hand.advance(3)
    reply = hand.respond()[0]
    extra = reply.self_mask_shares[0].model_copy(update={"peer": 9})
    with pytest.raises(RemoteProtocolError):
        hand.server.receive(reply.model_copy(update={"self_mask_shares": (*reply.self_mask_shares, extra)}))


def test_signing_keys_are_advertised_exactly_in_the_semi_honest_setting() -> None:
    """Semi-honest: a 32-byte session key is required; malicious: it must be empty (the identity key signs)."""
    semi = semi_honest_params(5)
    hand = HandRound(semi, seed=56)
    advert = hand.advertise([0])[0]
    assert isinstance(advert, AdvertiseKeys) and len(advert.signing_public_key) == 32
    with pytest.raises(RemoteProtocolError, match="signing_public_key"):
        hand.server.receive(advert.model_copy(update={"signing_public_key": b""}))
    params, private = malicious_params(8)
    mhand = HandRound(params, seed=56, identity_keys=private)
    madvert = mhand.advertise([0])[0]
    assert isinstance(madvert, AdvertiseKeys) and madvert.signing_public_key == b""
    with pytest.raises(RemoteProtocolError, match="signing_public_key"):
        mhand.server.receive(madvert.model_copy(update={"signing_public_key": bytes(32)}))


def test_a_dealer_signature_that_does_not_verify_is_caught_by_the_holder_not_blamed_on_it() -> None:
    """A holder checks its dealer's signatures when it opens the box and complains at once."""
    params = semi_honest_params(6)
    hand = HandRound(params, seed=57)
    hand.advance(1)
    evil = hand.clients[1]
    real_sign = evil._signing_key

    def wrong_key() -> bytes:  # party 1 signs its shares with a key nobody knows
        real_sign()
        return bytes(32)

    evil._signing_key = wrong_key  # type: ignore[method-assign]
    hand.submit(hand.respond())
    hand.close()
    evil._signing_key = real_sign  # type: ignore[method-assign]
    replies = hand.respond()
    assert {p for p, m in replies.items() if type(m).__name__ == "Complaint"} == {0, 2, 3, 4, 5}
    assert all(m.accused == (1,) for p, m in replies.items() if p != 1)  # type: ignore[union-attr]
    hand.submit(replies)
    with pytest.raises(AbortError):  # 5 accusers and the accused: 0 parties left for t = 5
        hand.close()


def test_an_ed25519_signature_on_the_wrong_statement_is_an_integrity_error() -> None:
    key = bytes(range(32))
    share = bytes(33)
    sig = ed25519_sign(key, share_statement(bytes(32), SHARE_KIND_SELF_MASK, 1, 2, share))
    ed25519_verify(ed25519_public(key), sig, share_statement(bytes(32), SHARE_KIND_SELF_MASK, 1, 2, share))
    for statement in (
        share_statement(bytes(32), SHARE_KIND_MASK_KEY, 1, 2, share),
        share_statement(bytes(32), SHARE_KIND_SELF_MASK, 2, 1, share),
        share_statement(bytes(32), SHARE_KIND_SELF_MASK, 1, 3, share),
        share_statement(bytes(31) + b"\x01", SHARE_KIND_SELF_MASK, 1, 2, share),
    ):
        with pytest.raises(IntegrityError):
            ed25519_verify(ed25519_public(key), sig, statement)
