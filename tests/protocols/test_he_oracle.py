"""Finding 4(a): a malicious server uses a client as a decryption oracle for another client's upload.

The attack (as in the review): the server holds every upload E(x_T). It sends a client that holds the
symmetric key a crafted "aggregate": E(x_T) plus a plaintext offset on one field, with the real signed
contribution list attached, and reads whether the client's range check fails ("outside the range") or
passes (it then fails later on the counter, "does not match"). Each reply is one bit, "is x_T[j] <= tau?";
a binary search over tau gives x_T[j] exactly, coordinate after coordinate.

Weakened control: `LeakyClient` restores the old behaviour (a non-releasing client keeps the key,
decrypts the server's aggregate, here carried in `HESum.inputs`, and stays in its state after a failed
check): the attack recovers the target's exact quantized update. Ours: a client decrypts only its own
sum of signed uploads, and the first failed check ends the session (ABORTED, key dropped).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pytest

from protocols import AbortError, ProtocolError, RemoteProtocolError
from protocols.he import HEAck, HEClient, HEClientState, HEParams, HEServer, HESum, decode_he_message, encode_he_message
from protocols.he._ciphers import decode_words, decrypt_words, load_chunk, quantize
from protocols.he._client import he_transcript, key_holder
from protocols.he._export import export_chunk
from protocols.he._wire import layout

N_PARTIES, DIM, ROUND = 4, 6, 3
TARGET, VICTIM = 1, 2  # the server wants x_TARGET and queries VICTIM (neither holds the key)


class LeakyClient(HEClient):
    """The weakened control: the pre-issue-12 client behaviour (test-only).

    It keeps the key after encrypting, decrypts whatever aggregate the server sends (the old
    `HESum.chunks`, carried here in `inputs`), and a failed check leaves it in its state, so the
    server can ask again.
    """

    @property
    def decrypts(self) -> bool:
        return True

    def _abort(self) -> None:  # the old client stayed in state after a failed check
        pass

    def _on_sum(self, total: HESum) -> HEAck:
        for sender, digest, signature in zip(total.contributors, total.digests, total.signatures, strict=True):
            from protocols.primitives import ed25519_verify

            ed25519_verify(self._hellos[sender].sign_public, signature, digest, peer_id=sender)
        vectors = [load_chunk(self.params, self._ctx, c, i, field="chunks") for i, c in enumerate(total.inputs)]
        result = decode_words(self.params, decrypt_words(self.params, vectors))
        if result.num_inputs != len(total.contributors):
            raise RemoteProtocolError("the aggregate's decrypted counter does not match", field="contributors")
        self.state = HEClientState.DONE
        return HEAck(session=self.session, round=self.round_number, sender=self.party_id, count=result.num_inputs)


def _session(params: HEParams) -> bytes:
    while True:  # a session whose key holder is neither the target nor the queried client
        session = os.urandom(16)
        transcript = he_transcript(params, session=session, round_number=ROUND, context=b"")
        if key_holder(transcript, range(N_PARTIES)) not in (TARGET, VICTIM):
            return session


def _run_to_sums(client_cls: type[HEClient]) -> dict[str, Any]:
    """An honest round up to the sums; returns everything the (malicious) server holds."""
    params = HEParams.bfv_packed(N_PARTIES, dimension=DIM, clip_range=0.05)
    session = _session(params)
    rng = np.random.default_rng(5)
    xs = [rng.uniform(-0.05, 0.05, DIM) for _ in range(N_PARTIES)]
    seeds = [os.urandom(32) for _ in range(N_PARTIES)]
    clients = [
        (client_cls if p == VICTIM else HEClient)(params, party_id=p, session=session, round_number=ROUND)
        for p in range(N_PARTIES)
    ]
    for c, x, seed in zip(clients, xs, seeds, strict=True):
        c.set_input(x, rounding_seed=seed)
    server = HEServer(params, session=session, round_number=ROUND)

    def wire(message: Any) -> Any:
        return decode_he_message(encode_he_message(message))

    for c in clients:
        server.receive(wire(c.advertise_keys()))
    for p, roster in server.close_stage():
        server.receive(wire(clients[p].handle(roster)))
    uploads = {}
    for p, keys in server.close_stage():
        upload = clients[p].handle(keys)
        uploads[p] = upload
        server.receive(wire(upload))
    sums = dict(server.close_stage())
    (honest_sum,) = sums.values()  # BFV: the server sends the contributions to the key holder only
    return {
        "params": params,
        "clients": clients,
        "uploads": uploads,
        "sum": honest_sum,
        "expected": quantize(params, xs[TARGET], weight=1.0, rounding_seed=seeds[TARGET]),
    }


def _crafted(state: dict[str, Any], coordinate: int, offset: int) -> HESum:
    """E(x_TARGET) plus `offset` on one word, with the real signed contribution list attached."""
    params: HEParams = state["params"]
    shape = layout(params)
    n, k, w = params.slots, params.fields_per_slot, params.field_bits
    chunk, position = divmod(coordinate, n * k)
    field, slot = divmod(position, n)
    ctx = shape.keyless_context()  # the server's: no key at all
    chunks = list(state["uploads"][TARGET].chunks)
    vector = load_chunk(params, ctx, chunks[chunk], chunk, field="chunks")
    plain = [0] * n
    plain[slot] = offset << (field * w)
    vector.data.add_plain_(plain)
    chunks[chunk] = export_chunk(shape, vector)
    honest: HESum = state["sum"]
    return honest.model_copy(update={"inputs": tuple(chunks)})


def _oracle_attack(state: dict[str, Any], client: HEClient) -> tuple[list[int | None], int, list[str]]:
    """Binary-search every word of x_TARGET through `client`'s replies; returns (words, queries, replies)."""
    params: HEParams = state["params"]
    top = 2 * params.level  # a single upload's words lie in [0, 2L]; with count 1 the check is [0, 2L]
    recovered: list[int | None] = []
    queries, replies = 0, []
    for j in range(DIM):
        lo, hi = 0, top
        while lo < hi:
            mid = (lo + hi) // 2
            queries += 1
            try:
                client.handle(_crafted(state, j, top - mid))  # passes the range check iff word_j <= mid
                reply = "accepted"
            except ProtocolError as exc:
                reply = f"{type(exc).__name__}: {exc}"
            replies.append(reply)
            if "does not match" in reply:
                hi = mid
            elif "outside the range" in reply:
                lo = mid + 1
            else:
                break  # no usable bit: the attack cannot go on
        recovered.append(lo if lo == hi else None)
    return recovered, queries, replies


def test_control_a_client_that_decrypts_the_servers_aggregate_leaks_the_target_update_exactly():
    state = _run_to_sums(LeakyClient)
    recovered, queries, _ = _oracle_attack(state, state["clients"][VICTIM])
    expected = state["expected"][:DIM]
    assert recovered == [int(v) for v in expected]  # x_TARGET's exact quantized words, weight folded in
    assert queries <= 17 * DIM
    params = state["params"]
    x_hat = (np.array(recovered) - params.level) / params.quantizer.scale
    assert np.abs(x_hat - (expected - params.level) / params.quantizer.scale).max() == 0


def test_our_client_ends_the_session_at_the_first_crafted_aggregate_and_leaks_nothing():
    state = _run_to_sums(HEClient)
    victim = state["clients"][VICTIM]
    assert not victim.holds_key  # a BFV non-holder drops the key as soon as its upload is encrypted
    recovered, _, replies = _oracle_attack(state, victim)
    assert recovered == [None] * DIM
    assert "decrypts nothing" in replies[0] and all(r.startswith("AbortError") for r in replies[1:])
    assert victim.state is HEClientState.ABORTED and victim.decryptions == 0 and not victim.holds_key
    with pytest.raises(AbortError):
        victim.handle(state["sum"])


@pytest.mark.parametrize("what", ["inputs", "digests"])
def test_the_key_holder_refuses_a_crafted_upload_and_ends_the_session(what):
    state = _run_to_sums(HEClient)
    holder_id = next(p for p, c in enumerate(state["clients"]) if c.holder == p)
    holder = state["clients"][holder_id]
    crafted = _crafted(state, 0, 1)  # E(x_TARGET) + 1 listed as TARGET's upload
    honest: HESum = state["sum"]
    per = state["params"].chunks
    inputs = list(honest.inputs)
    i = honest.contributors.index(TARGET)
    inputs[i * per : (i + 1) * per] = crafted.inputs
    forged = honest.model_copy(update={"inputs": tuple(inputs)})
    if what == "digests":  # the server also swaps in the digest of its forgery: the signature fails
        from protocols.he._client import input_digest

        digests = list(honest.digests)
        digests[i] = input_digest(holder.transcript, TARGET, tuple(crafted.inputs))
        forged = forged.model_copy(update={"digests": tuple(digests)})
    with pytest.raises(RemoteProtocolError):
        holder.handle(forged)
    assert holder.state is HEClientState.ABORTED and holder.decryptions == 0 and not holder.holds_key
    with pytest.raises(AbortError):
        holder.handle(honest)  # the honest sum afterwards gets nothing either: one key, one chance
