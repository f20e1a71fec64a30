"""One conformance suite for every session family behind `protocols.ClientSession` / `ServerSession`.

Run against SecAgg, SecAgg+ (semi-honest and malicious), HE-BFV and HE-CKKS (each in symmetric and
public-key mode) and the plaintext control: the sum equals the plaintext oracle, dropouts at every
step, abort below threshold (typed, nothing revealed), every (stage x message type) pair on both
sides, export/import at every stage, rollback refusal (an older snapshot answering a second survivor
set), codec and state fuzzing.

Nothing here names a family's result path: a family whose aggregate is decrypted by clients only
(`reveals_to_client`) is read through `family.client_result`, any other through the server's
`result()`, so the suite holds whether HE-CKKS keeps its aggregate on the clients or its key holder
releases the rounded integer sum to the server. An exact (integer) release must be bit-identical
across export/import; an approximate client-side one, within the stated error bounds.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from secagg_harness import malicious_plus_params, semi_honest_params

from protocols import (
    AbortError,
    AggregateResult,
    ClientSession,
    DecodedSum,
    DeterministicRandom,
    FixedPointEncoding,
    HEFamily,
    LocalProtocolError,
    PlaintextFamily,
    ProtocolError,
    RoundStep,
    SecAggFamily,
    SecAggParams,
    SecurityPolicy,
    ServerSession,
    SessionFamily,
)
from protocols.driver import goes_silent, run_sessions
from protocols.errors import InsecureParameterError
from protocols.he import HEParams, key_holder
from protocols.he._client import he_transcript
from protocols.session import LEGACY_STEP_NUMBERS, as_round_step

_S = (RoundStep.ADVERTISE, RoundStep.SHARE, RoundStep.INPUT, RoundStep.UNMASK)
"""The steps SecAgg, SecAgg+ (semi-honest) and HE send."""


@dataclass
class Impl:
    family: SessionFamily
    keys: list[bytes] | None
    steps: tuple[RoundStep, ...]
    below: int  # how many parties dropping at INPUT abort the round (0: never aborts)
    tolerated: int  # how many parties dropping at INPUT the round survives (the control of `below`)


def _impls() -> dict[str, Callable[[], Impl]]:
    def secagg() -> Impl:
        params = semi_honest_params(5, threshold=3)
        return Impl(SecAggFamily(params), None, _S, 3, params.max_dropped)

    def secagg_plus() -> Impl:
        encoding = FixedPointEncoding(clip_range=1.0, max_parties=12)
        params = SecAggParams.secagg_plus(12, dimension=8, clip_range=1.0, encoding=encoding)
        assert not params.complete
        return Impl(SecAggFamily(params), None, _S, 12 - params.threshold + 1, params.max_dropped)

    def secagg_plus_malicious() -> Impl:
        params, private = malicious_plus_params(10)
        steps = (*_S, RoundStep.REVEAL, RoundStep.CONFIRM)
        return Impl(SecAggFamily(params), private, steps, 10 - params.threshold + 1, params.max_dropped)

    def he(scheme: str, mode: str) -> Callable[[], Impl]:
        def make() -> Impl:
            build = HEParams.bfv_packed if scheme == "bfv" else HEParams.ckks_nvflare
            params = build(4, dimension=8, clip_range=1.0, mode=mode)
            spare = params.num_parties - params.min_contributions
            return Impl(HEFamily(params), None, _S, spare + 1, spare)

        return make

    def plaintext() -> Impl:
        fam = PlaintextFamily(semi_honest_params(4), policy=SecurityPolicy.model_validate({"protocol": "plaintext"}))
        return Impl(fam, None, (RoundStep.INPUT,), 0, 0)

    return {
        "secagg": secagg,
        "secagg+": secagg_plus,
        "secagg+malicious": secagg_plus_malicious,
        "he-bfv": he("bfv", "symmetric"),
        "he-bfv-pk": he("bfv", "public-key"),
        "he-ckks": he("ckks", "symmetric"),
        "he-ckks-pk": he("ckks", "public-key"),
        "plaintext": plaintext,
    }


IMPLS = _impls()


@pytest.fixture(params=list(IMPLS), scope="module")
def impl(request: pytest.FixtureRequest) -> Impl:
    return IMPLS[request.param]()


def _key(impl: Impl, party: int) -> bytes | None:
    return impl.keys[party] if impl.keys else None


def _session(impl: Impl, avoid: set[int], seed: int = 0) -> bytes:
    """A session id; for HE one whose (public-rule) key holder is not among `avoid`."""
    for i in range(1000):
        session = hashlib.sha256(b"conf/%d/%d" % (seed, i)).digest()[:16]
        if not isinstance(impl.family, HEFamily):
            return session
        transcript = he_transcript(impl.family.params, session=session, round_number=0, context=b"")
        if key_holder(transcript, range(impl.family.num_parties)) not in avoid:
            return session
    raise AssertionError("no session id found")


def _inputs(n: int, seed: int) -> list[np.ndarray]:
    gen = np.random.default_rng(seed)
    return [gen.uniform(-0.5, 0.5, 8) for _ in range(n)]


def _decrypted(fam: SessionFamily, client: ClientSession) -> DecodedSum | None:
    try:
        out: DecodedSum = fam.client_result(client)
    except ProtocolError:
        return None
    return out


def _result(fam: SessionFamily, clients: list[ClientSession], server: ServerSession, sent: set[int]) -> AggregateResult:
    """What the round released: the server's result, or (`reveals_to_client`) what the clients decrypted.

    A client-side aggregate is checked to be the same, within its bound, at every client that decrypted it,
    and the server must hold no result then (nothing released to it).
    """
    if not fam.reveals_to_client:
        return server.result()
    with pytest.raises(ProtocolError):
        server.result()
    sums = [s for s in (_decrypted(fam, c) for c in clients) if s is not None]
    assert sums, "no client decrypted the aggregate"
    for other in sums[1:]:
        bound = sums[0].max_abs_error + other.max_abs_error
        assert np.abs(other.weighted_sum - sums[0].weighted_sum).max() <= bound
        assert other.num_inputs == sums[0].num_inputs
    included = tuple(sorted(sent))
    assert sums[0].num_inputs == len(included)
    dropped = tuple(p for p in range(fam.num_parties) if p not in sent)
    return AggregateResult(decoded=sums[0], ring_sum=None, included=included, dropped=dropped, insecure=False)


@dataclass
class Run:
    result: AggregateResult
    clients: list[ClientSession]
    server: ServerSession
    session: bytes
    server_snapshots: list[bytes] = field(default_factory=list)
    client_messages: dict[type, Any] = field(default_factory=dict)


def _drive(impl: Impl, drop: dict[int, RoundStep], *, restore: bool = False, seed: int = 1) -> Run:
    """A round through the interface only; with `restore`, every session is exported and rebuilt at every stage.

    The server is snapshot before every `close_stage` (and once more at the end), and one decoded client
    message of each type is kept, for the (stage x message) tests.
    """
    fam, n = impl.family, impl.family.num_parties
    session = _session(impl, set(drop), seed)
    xs = _inputs(n, seed)
    rng = [DeterministicRandom(b"conf-%d-%d" % (seed, p)) for p in range(n)]
    clients: list[ClientSession] = [
        fam.client(p, session=session, round_number=0, identity_key=_key(impl, p), rng=rng[p]) for p in range(n)
    ]
    server = fam.server(session=session, round_number=0)
    gone: set[int] = set()
    sent_input: set[int] = set()
    snapshots: list[bytes] = []
    seen: dict[type, Any] = {}

    def send(p: int, message: Any) -> None:
        step = fam.step_of(type(message))
        if p in gone or goes_silent(drop.get(p), step):
            gone.add(p)
            return
        decoded = fam.decode(fam.encode(message))
        seen.setdefault(type(decoded), decoded)
        server.receive(decoded)
        sent_input.update([p] if step is RoundStep.INPUT else [])

    def again(p: int) -> None:
        if restore:
            blob = clients[p].export_state()
            clients[p] = fam.restore_client(blob, identity_key=_key(impl, p), rng=rng[p], min_stage=clients[p].stage)

    for p, c in enumerate(clients):
        c.set_input(xs[p], rounding_seed=bytes([p]) * 32)
        again(p)
        send(p, clients[p].start())
        again(p)
    while True:
        snapshots.append(server.export_state())
        if restore:
            server = fam.restore_server(snapshots[-1])
        out = server.close_stage()
        if not out:
            break
        for p, m in out:
            if p not in gone:
                send(p, clients[p].handle(fam.decode(fam.encode(m))))
                again(p)
    snapshots.extend(_final_snapshot(fam, server))
    return Run(_result(fam, clients, server, sent_input), clients, server, session, snapshots, seen)


def _final_snapshot(fam: SessionFamily, server: ServerSession) -> list[bytes]:
    """The finished round's export (the plaintext control refuses that, typed: it is read with result())."""
    try:
        return [server.export_state()]
    except ProtocolError:
        assert isinstance(fam, PlaintextFamily)
        return []


def _oracle(impl: Impl, included: tuple[int, ...], seed: int = 1) -> np.ndarray:
    xs = _inputs(impl.family.num_parties, seed)
    return sum(xs[p] for p in included)


def test_sum_equals_the_plaintext_oracle(impl: Impl) -> None:
    result = _drive(impl, {}).result
    assert result.included == tuple(range(impl.family.num_parties))
    assert result.decoded.num_inputs == impl.family.num_parties
    assert np.abs(result.decoded.weighted_sum - _oracle(impl, result.included)).max() <= result.decoded.max_abs_error
    # control: the oracle of another subset is far off (the check can fail)
    assert np.abs(result.decoded.weighted_sum - _oracle(impl, result.included[1:])).max() > 1e-3


@pytest.mark.parametrize("step", list(RoundStep), ids=lambda s: s.name)
def test_a_dropout_at_every_step(impl: Impl, step: RoundStep) -> None:
    if step not in impl.steps:
        pytest.skip(f"{impl.family.name} sends no {step.name}")
    dropper = impl.family.num_parties - 1
    if step is RoundStep.REVEAL:  # a withheld graph-toss reveal aborts by design (nobody is dropped after committing)
        with pytest.raises(AbortError):
            _drive(impl, {dropper: step})
        return
    result = _drive(impl, {dropper: step}).result
    counted = step.rank > RoundStep.INPUT.rank
    assert (dropper in result.included) == counted
    assert result.decoded.num_inputs == len(result.included)
    assert np.abs(result.decoded.weighted_sum - _oracle(impl, result.included)).max() <= result.decoded.max_abs_error


def test_abort_below_threshold_reveals_nothing(impl: Impl) -> None:
    if impl.below == 0:
        pytest.skip("the plaintext control has no threshold")
    n = impl.family.num_parties
    drop = {p: RoundStep.INPUT for p in range(n - impl.below, n)}
    with pytest.raises(AbortError):
        _drive(impl, drop)
    # control: as many dropouts as the parameters tolerate still give the oracle's sum
    survivors = range(n - impl.tolerated)
    result = _drive(impl, {p: RoundStep.INPUT for p in range(n - impl.tolerated, n)}).result
    assert result.included == tuple(survivors)
    assert np.abs(result.decoded.weighted_sum - _oracle(impl, result.included)).max() <= result.decoded.max_abs_error


def test_export_import_at_every_stage_gives_the_same_sum(impl: Impl) -> None:
    straight = _drive(impl, {}).result
    run = _drive(impl, {}, restore=True)
    restored = run.result
    assert straight.included == restored.included and run.server.finished
    if straight.ring_sum is not None:  # an exact (integer) release is bit-identical
        assert np.array_equal(straight.ring_sum, restored.ring_sum)
        assert np.array_equal(straight.decoded.weighted_sum, restored.decoded.weighted_sum)
    else:  # an approximate (CKKS) client-side decryption: fresh encryption noise, within the stated bounds
        bound = straight.decoded.max_abs_error + restored.decoded.max_abs_error
        assert np.abs(straight.decoded.weighted_sum - restored.decoded.weighted_sum).max() <= bound


def _targets(fam: SessionFamily, run: Run) -> list[int]:
    """Party 0, and the first party that decrypts (an HE key holder walks another path through its stages)."""
    targets = [0]
    for p, c in enumerate(run.clients):
        if _decrypted(fam, c) is not None:
            targets.append(p)
            break
    return sorted(set(targets))


def test_every_client_stage_times_every_message_type(impl: Impl) -> None:
    """Each client stage met with every server message type: accepted per TRANSITIONS, or a typed refusal."""
    fam, n = impl.family, impl.family.num_parties
    session = _session(impl, set(), 1)
    rng = lambda p: DeterministicRandom(b"t-%d" % p)  # noqa: E731
    clients = [fam.client(p, session=session, round_number=0, identity_key=_key(impl, p), rng=rng(p)) for p in range(n)]
    server = fam.server(session=session, round_number=0)
    xs = _inputs(n, 1)
    for p, c in enumerate(clients):
        c.set_input(xs[p])
        server.receive(c.start())
    seen: dict[type, Any] = {}
    snapshots: dict[int, list[bytes]] = {p: [c.export_state()] for p, c in enumerate(clients)}
    while out := server.close_stage():
        for p, m in out:
            seen.setdefault(type(m), m)
            server.receive(clients[p].handle(m))
            snapshots[p].append(clients[p].export_state())
    run = Run(_result(fam, clients, server, set(range(n))), clients, server, session)
    table = type(clients[0]).TRANSITIONS
    refused = 0
    for target in _targets(fam, run):
        for blob in snapshots[target]:
            for mtype, message in seen.items():
                c = fam.restore_client(blob, identity_key=_key(impl, target), rng=rng(target))
                before = c.stage
                if (before, mtype) in table:
                    continue  # accepted per the table (exercised by the round above)
                with pytest.raises(ProtocolError) as info:
                    c.handle(message)
                assert mtype.__name__ in str(info.value) or "over" in str(info.value) or "session" in str(info.value)
                assert c.stage in (before, type(before)["ABORTED"])
                refused += 1
    assert refused > 0 or (impl.steps == (RoundStep.INPUT,) and not seen)


def test_every_server_stage_times_every_message_type(impl: Impl) -> None:
    """Each server stage met with every client message type: a pair outside TRANSITIONS, or a replayed
    message of an accepted type, is refused with a typed error and changes nothing (same exported state)."""
    fam = impl.family
    run = _drive(impl, {})
    table = type(run.server).TRANSITIONS
    refused = replayed = 0
    for blob in run.server_snapshots:
        for mtype, message in run.client_messages.items():
            server = fam.restore_server(blob)
            before, state = server.stage, server.export_state()
            with pytest.raises(ProtocolError):
                server.receive(message)
            assert server.stage is before
            assert server.export_state() == state
            if (before, mtype) in table:
                replayed += 1  # the snapshot already holds this very message: a replay
            else:
                refused += 1
    for message in run.client_messages.values():  # the finished round (live: plaintext exports none) takes nothing
        with pytest.raises(ProtocolError):
            run.server.receive(message)
        assert run.server.finished
        refused += 1
    assert refused > 0 and replayed > 0
    # control: a fresh server of the same session accepts the first-stage messages it refused as replays
    fresh = fam.server(session=run.session, round_number=0)
    accepted = [m for t, m in run.client_messages.items() if (fresh.stage, t) in table]
    assert accepted
    for m in accepted:
        fresh.receive(m)


def _until_inputs(fam: SessionFamily, clients: list[ClientSession], server: ServerSession) -> list[tuple[int, Any]]:
    """Run the round up to the clients' INPUT replies, which are returned undelivered."""
    while True:
        out = server.close_stage()
        assert out, "the round ended before any input was sent"
        replies = [(p, clients[p].handle(m)) for p, m in out]
        if any(fam.step_of(type(r)) is RoundStep.INPUT for _, r in replies):
            return replies
        for _, r in replies:
            server.receive(r)


def _answered_once(
    fam: SessionFamily,
    client: ClientSession,
    restore: Callable[[bytes, Any], ClientSession],
    older: bytes,
    answered: tuple[Any, Any],
    request_b: Any,
) -> None:
    """`client` has answered `answered` = (request A, its reply): B is refused, and so is the pre-answer snapshot."""
    post, newer = client.stage, client.export_state()
    request_a, reply_a = answered
    # core level: the state that answered A refuses B
    with pytest.raises(ProtocolError):
        restore(newer, post).handle(request_b)
    if (post, type(request_a)) in type(client).TRANSITIONS:  # a family that repeats its answer to A
        assert fam.encode(restore(newer, post).handle(request_a)) == fam.encode(reply_a)
    # rollback: the snapshot from before the answer is refused once the host passes the last persisted stage
    with pytest.raises(LocalProtocolError):
        restore(older, post)


def test_an_older_snapshot_cannot_answer_a_second_survivor_set(impl: Impl) -> None:
    """A client that answered one survivor set (signed, unmasked or decrypted) never answers another.

    The server forks the round at the INPUT stage: fork A closes with every input, fork B without
    party n-1's. Fork B's clients are the A clients' snapshots from before they answered, restored
    without the `min_stage` guard (the rollback attack). At every step after INPUT the target's
    post-answer state refuses B's request at the core level and its pre-answer snapshot is refused
    by `min_stage`; control: B's rolled-back copy does answer B (a second answer over another subset).
    """
    if impl.steps == (RoundStep.INPUT,):
        pytest.skip(f"{impl.family.name} sends nothing after its input")
    fam, n = impl.family, impl.family.num_parties
    other = n - 1
    session = _session(impl, {other}, 3)
    xs = _inputs(n, 3)
    rng = lambda p: DeterministicRandom(b"fork-%d" % p)  # noqa: E731

    def restore(p: int, blob: bytes, min_stage: Any = None) -> ClientSession:
        return fam.restore_client(blob, identity_key=_key(impl, p), rng=rng(p), min_stage=min_stage)

    clients = [fam.client(p, session=session, round_number=0, identity_key=_key(impl, p), rng=rng(p)) for p in range(n)]
    server = fam.server(session=session, round_number=0)
    for p, c in enumerate(clients):
        c.set_input(xs[p])
        server.receive(c.start())
    replies = _until_inputs(fam, clients, server)
    fork = fam.restore_server(server.export_state())
    for p, r in replies:
        server.receive(r)
        if p != other:
            fork.receive(r)
    to_a, to_b = dict(server.close_stage()), dict(fork.close_stage())
    forked = {p: restore(p, clients[p].export_state()) for p in to_b}  # rolled back, no guard
    steps = 0
    while both := sorted(p for p in to_a if p in to_b and p != other):
        assert all(fam.encode(to_a[p]) != fam.encode(to_b[p]) for p in both), "the fork did not change the set"
        older = {p: clients[p].export_state() for p in both}
        answers_a = {p: clients[p].handle(m) for p, m in to_a.items()}
        answers_b = {p: forked[p].handle(m) for p, m in to_b.items()}  # control: the rolled-back copies answer B
        for p in both:
            _answered_once(fam, clients[p], lambda blob, stage, p=p: restore(p, blob, stage), older[p],
                           (to_a[p], answers_a[p]), to_b[p])  # fmt: skip
        # the control's answers to B differ from A's (a share, signature or sum over another subset)
        assert any(fam.encode(answers_b[p]) != fam.encode(answers_a[p]) for p in both)
        for r in answers_a.values():
            server.receive(r)
        for r in answers_b.values():
            fork.receive(r)
        to_a, to_b = dict(server.close_stage()), dict(fork.close_stage())
        steps += 1
    assert steps == (2 if RoundStep.CONFIRM in impl.steps else 1)
    assert server.finished and fork.finished


def test_restored_older_snapshot_is_refused(impl: Impl) -> None:
    """A snapshot older than the last persisted stage cannot be revived to answer another survivor set."""
    fam = impl.family
    c = _drive(impl, {}).clients[0]
    fresh = fam.client(0, session=b"\x01" * 16, round_number=0, identity_key=_key(impl, 0))
    fresh.set_input(_inputs(fam.num_parties, 1)[0])
    old = fresh.export_state()
    with pytest.raises(LocalProtocolError):
        fam.restore_client(old, identity_key=_key(impl, 0), min_stage=c.stage)
    # control: without the guard the old snapshot restores (the host must pass min_stage)
    assert fam.restore_client(old, identity_key=_key(impl, 0)).stage is fresh.stage


def test_state_and_codec_fuzzing_raise_typed_errors_only(impl: Impl) -> None:
    fam = impl.family
    server = fam.server(session=b"\x02" * 16, round_number=0)
    c = fam.client(0, session=b"\x02" * 16, round_number=0, identity_key=_key(impl, 0))
    c.set_input(_inputs(fam.num_parties, 1)[0])
    wire = fam.encode(c.start())
    gen = random.Random(7)
    blobs = [wire, c.export_state(), server.export_state()]
    outcomes: dict[str, int] = {}
    for i in range(300):
        data = bytearray(blobs[i % 3])
        kind = gen.randrange(3)
        if kind == 0 and data:
            data[gen.randrange(len(data))] ^= 1 << gen.randrange(8)
        elif kind == 1:
            data = data[: gen.randrange(len(data) + 1)]
        else:
            data += bytes(gen.randrange(256) for _ in range(gen.randrange(1, 9)))
        try:
            if i % 3 == 0:
                fam.decode(bytes(data))
            elif i % 3 == 1:
                fam.restore_client(bytes(data), identity_key=_key(impl, 0))
            else:
                fam.restore_server(bytes(data))
            outcomes["ok"] = outcomes.get("ok", 0) + 1
        except ProtocolError as exc:
            outcomes[type(exc).__name__] = outcomes.get(type(exc).__name__, 0) + 1
    assert sum(outcomes.values()) == 300 and outcomes.get("DecodeError", 0) > 0


def test_plaintext_client_needs_a_policy_that_allows_it() -> None:
    params = semi_honest_params(4)
    with pytest.raises(InsecureParameterError):
        PlaintextFamily(params, policy=SecurityPolicy.model_validate({"protocol": "secagg+"}))
    fam = PlaintextFamily(params, policy=SecurityPolicy.model_validate({"protocol": "plaintext"}))
    assert fam.client(0, session=b"\x00" * 16, round_number=0).stage.name == "NEW"


def test_driver_runs_every_family_by_step_names(impl: Impl) -> None:
    n = impl.family.num_parties
    session = _session(impl, {n - 1})
    report = run_sessions(
        impl.family, _inputs(n, 1), drop_at={n - 1: "input"}, session=session, identity_keys=impl.keys
    )
    assert n - 1 not in report.result.included
    assert isinstance(impl.family.client(0, session=session, round_number=0, identity_key=_key(impl, 0)), ClientSession)


def test_legacy_integer_labels_still_map_to_the_named_steps() -> None:
    """Older configs' integer drop stages mean what they meant; callers in this repository pass `RoundStep`s."""
    assert dict(LEGACY_STEP_NUMBERS) == {
        0: RoundStep.ADVERTISE,
        5: RoundStep.REVEAL,
        1: RoundStep.SHARE,
        2: RoundStep.INPUT,
        3: RoundStep.CONFIRM,
        4: RoundStep.UNMASK,
    }
    assert all(as_round_step(label) is step for label, step in LEGACY_STEP_NUMBERS.items())
    impl = IMPLS["secagg"]()
    n, session = impl.family.num_parties, _session(impl, set())

    def run(drop_at: dict[int, Any]) -> AggregateResult:
        rng = lambda p: DeterministicRandom(b"legacy-%d" % p)  # noqa: E731
        return run_sessions(impl.family, _inputs(n, 1), drop_at=drop_at, session=session, rng_for=rng).result

    named, legacy = run({1: RoundStep.SHARE, 3: RoundStep.UNMASK}), run({1: 1, 3: 4})
    assert legacy.included == named.included == (0, 2, 3, 4)
    assert np.array_equal(legacy.ring_sum, named.ring_sum)
    # control: a label outside the table is refused, typed, and names the steps to use instead
    for bad in (6, -1, True, "inputs"):
        with pytest.raises(LocalProtocolError, match="RoundStep"):
            as_round_step(bad)
