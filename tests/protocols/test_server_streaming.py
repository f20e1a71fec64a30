"""The server streams the sum, rebuilds secrets with batched Lagrange, and runs its unmask jobs under any map.

Issue 17 (1,000 clients): the server used to keep every `MaskedInput` until the masked stage
closed (n vectors of d words in memory). Now an accepted input is held only within a byte budget
(`hold_bytes`) and then added into one ring accumulator; a refused message never touches the hold
or the sum; a complaint against an input already summed is refused (the sum never shrinks).
`reconstruct_many` must equal `reconstruct` secret by secret, and the unmask step must give the
identical ring sum whatever map runs its jobs. Each security test carries a weakened control.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
from secagg_harness import SESSION, HandRound, expected_ring_sum, flip, semi_honest_params

from protocols import DeterministicRandom, RemoteProtocolError, SecAggParams, SecAggServer
from protocols.primitives import (
    PRIME,
    MaskAccumulator,
    ed25519_public,
    ed25519_sign,
    lagrange_at_zero,
    reconstruct,
    reconstruct_many,
    split,
)
from protocols.secagg import EncryptedShares, Envelope, MaskedInput, ServerState, _server
from protocols.secagg._transcript import SHARE_KIND_MASK_KEY, SHARE_KIND_SELF_MASK, share_statement
from protocols.secagg._unmask import MaskRange, SecretBatch, SecretJob, mask_ranges, masks_over_range, rebuild_secrets

N = 8


def _params(dimension: int = 8) -> SecAggParams:
    return semi_honest_params(N, dimension=dimension, dropout_rate=0.25)  # t = 6, d_max = 2


def _hand(params: SecAggParams, seed: int, **server_kw: Any) -> HandRound:
    hand = HandRound(params, seed=seed)
    hand.server = SecAggServer(params, session=SESSION, round_number=0, **server_kw)
    return hand


def _at_masked(params: SecAggParams, seed: int, **server_kw: Any) -> tuple[HandRound, dict[int, Any]]:
    hand = _hand(params, seed, **server_kw)
    hand.advance(2)
    assert hand.server.state is ServerState.COLLECT_MASKED
    return hand, hand.respond()


def _sum(server: SecAggServer) -> np.ndarray | None:
    return None if server._acc is None else server._acc.copy()


# -- streaming -------------------------------------------------------------------------------------


def test_the_streaming_server_holds_no_masked_input_and_its_state_does_not_grow_with_n() -> None:
    d = 4096

    def blob_at_masked_close(n: int) -> int:
        params = semi_honest_params(n, dimension=d, dropout_rate=0.25)
        hand = HandRound(params, seed=3)
        hand.server = SecAggServer(params, session=SESSION, round_number=0, hold_bytes=0)
        hand.advance(2)
        for p, m in hand.respond().items():
            hand.server.receive(m)
            assert hand.server._inputs == {}  # summed on arrival, never held
            assert p in hand.server._summed
        return len(hand.server.export_state())

    small, large = blob_at_masked_close(6), blob_at_masked_close(12)
    # 6 more masked inputs would add 6 * 4 * (d + 1) bytes; the keys and ids of 6 parties add far less
    assert large - small < 4 * (d + 1)


def test_the_hold_never_exceeds_its_budget_and_the_sum_is_the_survivors_oracle() -> None:
    params = _params(dimension=64)
    budget = 2 * 4 * 65  # two masked inputs
    hand, replies = _at_masked(params, seed=4, hold_bytes=budget)
    for m in replies.values():
        if m.sender == 5:
            continue  # 5 drops before its masked input
        hand.server.receive(m)
        assert hand.server._held <= budget and len(hand.server._inputs) <= 2
    hand.close()
    result = hand.run()
    included = tuple(p for p in range(N) if p != 5)
    assert result.included == included
    assert np.array_equal(result.ring_sum, expected_ring_sum(params, hand.inputs, included, 4))


def _refused(params: SecAggParams, hand: HandRound, replies: dict[int, Any]) -> list[Any]:
    good = replies[2]
    words = params.dimension + 1
    return [
        good,  # a duplicate of an input already summed
        good.model_copy(update={"sender": 7}),  # 7 was dropped before the masked stage: not in U2
        good.model_copy(update={"ring_bits": 16}),
        good.model_copy(update={"data": good.data[: 4 * (words - 1)]}),
        good.model_copy(update={"round": 1}),
    ]


def test_refused_masked_inputs_never_touch_the_sum() -> None:
    params = _params()
    hand = _hand(params, seed=5, hold_bytes=0)
    hand.advance(1)
    hand.submit(hand.respond(), drop=[7])  # 7 never sends its shares: outside U2
    hand.close()
    replies = hand.respond(drop=[7])
    hand.server.receive(replies[1])
    hand.server.receive(replies[2])
    before, state = _sum(hand.server), hand.server.export_state()
    for bad in _refused(params, hand, replies):
        with pytest.raises(RemoteProtocolError):
            hand.server.receive(bad)
        assert np.array_equal(_sum(hand.server), before)
        assert hand.server.export_state() == state


def test_control_a_server_that_adds_before_validating_changes_the_sum(monkeypatch: pytest.MonkeyPatch) -> None:
    original = _server._RECEIVERS[(ServerState.COLLECT_MASKED, MaskedInput)]

    def eager(server: SecAggServer, m: MaskedInput) -> None:
        if server._acc is not None and len(m.data) == 4 * (server.params.dimension + 1):
            np.add(server._acc, m.vector(), out=server._acc)  # the bug: summed before the checks
        original(server, m)

    monkeypatch.setitem(_server._RECEIVERS, (ServerState.COLLECT_MASKED, MaskedInput), eager)
    params = _params()
    hand, replies = _at_masked(params, seed=5, hold_bytes=0)
    hand.server.receive(replies[1])
    before = _sum(hand.server)
    with pytest.raises(RemoteProtocolError, match="duplicate"):
        hand.server.receive(replies[1])
    assert not np.array_equal(_sum(hand.server), before)


def _bad_box(shares: EncryptedShares, victim: int) -> EncryptedShares:
    boxes = tuple(Envelope(peer=e.peer, data=flip(e.data, 200)) if e.peer == victim else e for e in shares.boxes)
    return shares.model_copy(update={"boxes": boxes})


def _late_complaint_round(hold_bytes: int, seed: int = 6) -> tuple[HandRound, list[Exception]]:
    """Dealer 3 spoils victim 5's box; 3's masked input reaches the server before 5's complaint."""
    params = _params()
    hand = _hand(params, seed, hold_bytes=hold_bytes)
    hand.advance(1)
    shares = hand.respond()
    shares[3] = _bad_box(shares[3], 5)
    hand.submit(shares)
    hand.close()
    refused: list[Exception] = []
    for _, m in sorted(hand.respond().items()):
        try:
            hand.server.receive(m)
        except RemoteProtocolError as exc:
            refused.append(exc)
    hand.close()
    hand.run()
    return hand, refused


def test_a_complaint_against_an_input_already_summed_is_refused_and_the_sum_stays_exact() -> None:
    hand, refused = _late_complaint_round(hold_bytes=0)
    assert len(refused) == 1 and refused[0].field == "accused" and refused[0].peer_id == 5
    result = hand.server.result()
    included = tuple(p for p in range(N) if p != 5)  # the accused stays in; the accuser is a dropout
    assert result.included == included and result.dropped == (5,) and result.complaints == ()
    assert np.array_equal(result.ring_sum, expected_ring_sum(hand.params, hand.inputs, included, 6))


def test_within_the_hold_a_late_complaint_still_excludes_the_accused() -> None:
    hand, refused = _late_complaint_round(hold_bytes=_server.HOLD_BYTES)
    assert refused == []
    result = hand.server.result()
    included = tuple(p for p in range(N) if p not in (3, 5))
    assert result.included == included and result.complaints == ((5, 3),)
    assert np.array_equal(result.ring_sum, expected_ring_sum(hand.params, hand.inputs, included, 6))


def test_control_accepting_the_late_complaint_gives_a_wrong_sum(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(SecAggServer, "_already_summed", lambda self, accused: [])
    hand, refused = _late_complaint_round(hold_bytes=0)
    assert refused == []
    result = hand.server.result()
    included = tuple(p for p in range(N) if p not in (3, 5))
    assert result.included == included  # 3 is declared out, but its masked input is still in the sum
    assert not np.array_equal(result.ring_sum, expected_ring_sum(hand.params, hand.inputs, included, 6))


def test_the_server_restored_after_every_masked_input_gives_the_identical_sum() -> None:
    params = _params()

    def run(restore: bool, hold: int) -> np.ndarray:
        hand, replies = _at_masked(params, seed=7, hold_bytes=hold)
        for p, m in sorted(replies.items()):
            if p == 4:
                continue
            hand.server.receive(m)
            if restore:
                hand.server = SecAggServer.from_state(hand.server.export_state(), params, hold_bytes=hold)
        hand.close()
        return np.asarray(hand.run().ring_sum)

    reference = run(False, 0)
    assert np.array_equal(reference, run(True, 0))
    assert np.array_equal(reference, run(True, 3 * 4 * 9))  # some inputs held, some summed, in the blob


# -- batched Lagrange ------------------------------------------------------------------------------


def _oracle_lagrange(holders: tuple[int, ...]) -> tuple[int, ...]:
    """The textbook O(t^2) formula, one inversion per holder (the previous implementation)."""
    xs = [h + 1 for h in holders]
    out = []
    for j, xj in enumerate(xs):
        num = den = 1
        for m, xm in enumerate(xs):
            if m != j:
                num, den = num * xm % PRIME, den * (xm - xj) % PRIME
        out.append(num * pow(den, -1, PRIME) % PRIME)
    return tuple(out)


def test_lagrange_basis_matches_the_textbook_formula_up_to_the_largest_ids() -> None:
    rng = random.Random(8)
    for t in (1, 2, 3, 7, 40, 111):
        for _ in range(3):
            holders = tuple(sorted(rng.sample(range(1 << 16), t)))
            assert lagrange_at_zero(holders) == _oracle_lagrange(holders)
    extreme = (0, 1, (1 << 16) - 2, (1 << 16) - 1)
    assert lagrange_at_zero(extreme) == _oracle_lagrange(extreme)


def test_reconstruct_many_equals_reconstruct_secret_by_secret() -> None:
    rng = random.Random(9)
    source = DeterministicRandom(b"shamir-batch")
    t = 5
    pool = list(range(30))
    common = sorted(rng.sample(pool, 9))
    batch, secrets = [], []
    for i in range(24):
        secret = source.token_bytes(32)
        holders = common if i % 2 else sorted(rng.sample(pool, rng.randint(t, 12)))
        shares = split(secret, holders, t, source)
        keep = dict(rng.sample(sorted(shares.items()), rng.randint(t, len(shares))))
        batch.append(keep)
        secrets.append(secret)
    assert reconstruct_many(batch, t) == [reconstruct(s, t) for s in batch] == secrets


def test_reconstruct_many_reports_a_bad_share_like_reconstruct() -> None:
    source = DeterministicRandom(b"shamir-bad")
    good = split(source.token_bytes(32), range(6), 4, source)
    bad = dict(good)
    bad[0] = PRIME.to_bytes(33, "big")  # not a field element
    with pytest.raises(ValueError, match="not an element"):
        reconstruct(bad, 4)
    with pytest.raises(ValueError, match=r"^secret 1: .*not an element"):
        reconstruct_many([good, bad], 4)


def _signed_job(kind: int, owner: int, shares: dict[int, bytes], key: bytes, transcript: bytes) -> SecretJob:
    signed = tuple(
        (h, s, ed25519_sign(key, share_statement(transcript, kind, owner, h, s))) for h, s in sorted(shares.items())
    )
    return SecretJob(kind=kind, owner=owner, dealer_key=ed25519_public(key), shares=signed)


def test_a_dealer_with_inconsistent_shares_is_caught_and_a_forged_share_is_discarded() -> None:
    source = DeterministicRandom(b"dealer")
    key, transcript, t = source.token_bytes(32), bytes(32), 4
    secret = source.token_bytes(32)
    shares = split(secret, range(1, 7), t, source)
    inconsistent = dict(shares)
    inconsistent[6] = split(source.token_bytes(32), range(1, 7), t, source)[6]  # another polynomial, still signed
    jobs = (
        _signed_job(SHARE_KIND_SELF_MASK, 0, shares, key, transcript),
        _signed_job(SHARE_KIND_SELF_MASK, 0, inconsistent, key, transcript),
    )
    forged = (*jobs[0].shares[0][:2], bytes(64))
    jobs += (
        SecretJob(
            kind=SHARE_KIND_SELF_MASK, owner=0, dealer_key=jobs[0].dealer_key, shares=(forged, *jobs[0].shares[1:])
        ),
    )
    honest, caught, with_forgery = rebuild_secrets(SecretBatch(transcript=transcript, threshold=t, jobs=jobs))
    assert honest.error == "" and honest.minus == (secret,)
    assert caught.error == "inconsistent"
    assert with_forgery.error == "" and with_forgery.forged == (1,) and with_forgery.minus == (secret,)
    # control: with only t shares there is no second subset, so the inconsistent dealer goes unnoticed
    low = {h: inconsistent[h] for h in sorted(inconsistent)[-t:]}
    (blind,) = rebuild_secrets(
        SecretBatch(
            transcript=transcript, threshold=t, jobs=(_signed_job(SHARE_KIND_SELF_MASK, 0, low, key, transcript),)
        )
    )
    assert blind.error == "" and blind.minus != (secret,)


def test_mask_key_jobs_refuse_a_key_that_does_not_match() -> None:
    source = DeterministicRandom(b"mask-key")
    key, transcript = source.token_bytes(32), bytes(32)
    job = _signed_job(SHARE_KIND_MASK_KEY, 2, split(source.token_bytes(32), range(5), 3, source), key, transcript)
    job = SecretJob(**{**job.__dict__, "mask_public_key": bytes(32)})
    (outcome,) = rebuild_secrets(SecretBatch(transcript=transcript, threshold=3, jobs=(job,)))
    assert outcome.error == "mismatch" and outcome.plus == outcome.minus == ()


# -- the unmask jobs under any map -----------------------------------------------------------------


@pytest.mark.parametrize("ring_bits", [16, 32, 64])
def test_masks_over_ranges_equal_the_streaming_accumulator(ring_bits: int) -> None:
    length = 3 * 32768 + 1001
    plus, minus = [os.urandom(32) for _ in range(3)], [os.urandom(32) for _ in range(2)]
    dtype = np.dtype(f"<u{ring_bits // 8}")
    oracle = np.zeros(length, dtype=dtype)
    MaskAccumulator(ring_bits).apply(oracle, plus=plus, minus=minus)
    for parts in (1, 2, 3, 7):
        ranges = mask_ranges(length, parts, ring_bits)
        assert ranges[0][0] == 0 and ranges[-1][1] == length and len(ranges) <= parts
        got = np.concatenate(
            [masks_over_range(MaskRange(a, b, ring_bits, tuple(plus), tuple(minus))) for a, b in ranges]
        )
        assert np.array_equal(got, oracle)
    with pytest.raises(ValueError, match="16-byte"):
        masks_over_range(MaskRange(3, 10, ring_bits, tuple(plus), ()))


def _reversed_map(fn: Callable[[Any], Any], jobs: Iterable[Any]) -> list[Any]:
    """Runs the jobs last-first (results still in order): the sum must not depend on execution order."""
    items = list(jobs)
    done = {i: fn(items[i]) for i in reversed(range(len(items)))}
    return [done[i] for i in range(len(items))]


def test_the_parallel_unmask_gives_the_identical_ring_sum_to_serial() -> None:
    params = semi_honest_params(N, dimension=70_000, dropout_rate=0.25)

    def run(**kw: Any) -> np.ndarray:
        hand = _hand(params, seed=10, **kw)
        return np.asarray(hand.run(drop_at={1: "input", 6: "input"}).ring_sum)

    serial = run()
    with ThreadPoolExecutor(2) as pool:
        threaded = run(map_jobs=pool.map, jobs=3)
    assert np.array_equal(serial, threaded)
    assert np.array_equal(serial, run(map_jobs=_reversed_map, jobs=3))
    assert np.array_equal(serial, expected_ring_sum(params, HandRound(params, seed=10).inputs, (0, 2, 3, 4, 5, 7), 10))


def test_signatures_checked_in_the_jobs_catch_the_same_forgery_as_the_serial_server() -> None:
    params = _params()
    outcomes = []
    for kw in ({}, {"map_jobs": _reversed_map, "jobs": 2}):
        hand = _hand(params, seed=11, **kw)
        hand.advance(3)
        replies = hand.respond()
        resp = replies[0]
        forged = tuple(
            s.model_copy(update={"share": flip(s.share, 5)}) if s.peer == 1 else s for s in resp.self_mask_shares
        )
        replies[0] = resp.model_copy(update={"self_mask_shares": forged})
        hand.submit(replies)
        hand.close()
        outcomes.append((hand.server.result().misbehaving, np.asarray(hand.server.result().ring_sum)))
    assert outcomes[0][0] == outcomes[1][0] == (0,)
    assert np.array_equal(outcomes[0][1], outcomes[1][1])
