"""Findings 4(c) and 4(d): malformed keys and ciphertexts give typed errors, never a process abort.

A child process feeds mutated keys and ciphertexts (bit flips, truncations, changed header bytes,
length changes, empty) through the public entry points: the server's `receive` of a signed upload,
and a client's `handle` of the key holder's signed and sealed key delivery (a malicious holder), in
both key modes, plus the key holder's own summation of uploads. It must exit normally with only
`ProtocolError`s; the parent asserts the exit code (a SIGABRT or SIGSEGV shows as a negative code).

Weakened control: the old way of loading keys, `tenseal.context_from` on bytes from a peer, with a
handful of changed header bytes, kills the child with SIGABRT (uncatchable in Python).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

CHILD = textwrap.dedent(
    """
    import copy, json, os, random, struct, sys
    import numpy as np
    from protocols import OsRandom, ProtocolError
    from protocols.he import HEClient, HEInput, HEKeys, HEParams, HEServer, decode_he_message, encode_he_message
    from protocols.he._ciphers import ChunkSum, export_key
    from protocols.he._client import input_digest, key_payload
    from protocols.he._wire import layout
    from protocols.primitives import LABEL_HE_KEY_DELIVERY, derive_key, ed25519_sign, seal, x25519_agree

    count, seed = int(sys.argv[1]), int(sys.argv[2])
    rng = random.Random(seed)

    def mutate(data):
        b = bytearray(data)
        kind = rng.randrange(6)
        if kind == 0 and b:  # bit flips
            for _ in range(rng.randint(1, 4)):
                b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        elif kind == 1:  # truncation (possibly to empty)
            b = b[: rng.randrange(len(b) + 1)]
        elif kind == 2 and b:  # changed "header" bytes: the first 16 bytes or the top byte of a coefficient
            for _ in range(3):
                b[rng.randrange(min(16, len(b)))] = rng.randrange(256)
        elif kind == 3:  # longer
            b += bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
        elif kind == 4 and b:  # shorter in the middle
            p = rng.randrange(len(b))
            del b[p : p + rng.randint(1, 64)]
        else:  # a coefficient at or above its modulus
            p = 7 * rng.randrange(max(1, len(b) // 7))
            b[p : p + 7] = b"\\xff" * 7
        return bytes(b)

    stats = {"mutations": 0, "accepted": 0, "errors": {}}

    def attempt(fn):
        stats["mutations"] += 1
        try:
            fn()
            stats["accepted"] += 1
        except ProtocolError as exc:
            stats["errors"][type(exc).__name__] = stats["errors"].get(type(exc).__name__, 0) + 1

    def setup(mode):
        params = HEParams.bfv_packed(3, dimension=50, clip_range=0.05, mode=mode)
        session = os.urandom(16)
        clients = [HEClient(params, party_id=p, session=session, round_number=0) for p in range(3)]
        server = HEServer(params, session=session, round_number=0)
        for c in clients:
            c.set_input(np.zeros(50))
            server.receive(c.advertise_keys())
        offers = {p: clients[p].handle(r) for p, r in server.close_stage()}
        return params, clients, server, server.holder, offers

    def key_delivery(params, clients, holder, other, key):
        h = clients[holder]
        box, public = b"", b""
        if params.mode == "symmetric":
            shared = derive_key(x25519_agree(h._dh_private, clients[other]._hello.dh_public),
                                label=LABEL_HE_KEY_DELIVERY, transcript=h.transcript, a=holder, b=other)
            box = seal(shared, key, aad=h.transcript + struct.pack("<II", holder, other), rng=OsRandom())
        else:
            public = key
        sig = ed25519_sign(h._sign_private, key_payload(h.transcript, holder, other, public, box))
        return HEKeys(session=h.session, round=0, sender=0xFFFFFFFF, holder=holder, public_key=public, box=box,
                      signature=sig)

    per_mode = count // 2
    for mode in ("symmetric", "public-key"):
        params, clients, server0, holder, offers = setup(mode)
        for o in offers.values():
            server0.receive(o)
        keys = dict(server0.close_stage())
        others = [p for p in range(3) if p != holder]
        other = others[0]
        pristine = copy.deepcopy(clients[other])
        good_key = export_key(params, clients[holder]._ctx)
        upload = clients[holder].handle(keys[holder])
        good_chunks = upload.chunks
        for i in range(per_mode):
            what = rng.randrange(3)
            if what == 0:  # a malicious key holder delivers a mutated key, signed and sealed
                target = copy.deepcopy(pristine)
                message = key_delivery(params, clients, holder, other, mutate(good_key))
                attempt(lambda: target.handle(decode_he_message(encode_he_message(message))))
            elif what == 1:  # a mutated upload reaches the server (parsed before its signature is checked)
                chunks = list(good_chunks)
                j = rng.randrange(len(chunks))
                chunks[j] = mutate(chunks[j])
                bad = upload.model_copy(update={"chunks": tuple(chunks)})
                attempt(lambda: server0.receive(decode_he_message(encode_he_message(bad))))
            else:  # the key holder adds up a mutated upload (its own sum, before any signature matters)
                chunks = [mutate(c) for c in good_chunks]
                ctx = clients[holder]._ctx
                attempt(lambda: ChunkSum(params, ctx).add(chunks, sender=other))
            if i % 97 == 0:  # whole-message mutations of the wire bytes too
                wire = mutate(encode_he_message(upload))
                attempt(lambda: server0.receive(decode_he_message(wire)))
        if mode == "public-key":  # the server's own check of a delivered public key
            for _ in range(50):
                offer = offers[holder].model_copy(update={"public_key": mutate(offers[holder].public_key)})
                fresh = HEServer(params, session=clients[0].session, round_number=0)
                for c in clients:
                    fresh.receive(c._hello)
                fresh.close_stage()
                for p, o in offers.items():
                    fresh.receive(offer if p == holder else o)
                attempt(fresh.close_stage)
    print(json.dumps(stats))
    """
)

CONTROL = textwrap.dedent(
    """
    import sys
    import tenseal as ts
    ctx = ts.context(ts.SCHEME_TYPE.BFV, poly_modulus_degree=4096, plain_modulus=2199023190017,
                     coeff_mod_bit_sizes=[56, 53])
    data = bytearray(ctx.serialize(save_public_key=False, save_secret_key=False, save_galois_keys=False,
                                   save_relin_keys=False))  # what the old key holder sent the server
    inner = data.index(b"\\x5e\\xa1", 4)  # the SEAL header of the first coefficient modulus
    for spec in sys.argv[1].split(","):
        offset, value = spec.split("=")
        data[inner + int(offset)] = int(value, 16)
    try:
        ts.context_from(bytes(data))  # the old load_public_context / load_secret_context
    except Exception as exc:
        print("raised", type(exc).__name__)
    """
)


def _child(source: str, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-c", source, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def _fuzz(count: int, seed: int) -> None:
    done = _child(CHILD, str(count), str(seed), timeout=1200)
    assert done.returncode == 0, f"child exited {done.returncode} (signal if negative): {done.stderr[-2000:]}"
    stats = json.loads(done.stdout.strip().splitlines()[-1])
    assert stats["mutations"] >= count
    assert set(stats["errors"]) <= {"DecodeError", "IntegrityError", "RemoteProtocolError", "InvalidTransitionError"}
    assert stats["errors"].get("DecodeError", 0) > count // 10  # most malformed inputs stop at the parse


def test_mutated_keys_and_ciphertexts_give_typed_errors_in_a_child_process():
    _fuzz(600, seed=1)


@pytest.mark.slow
def test_ten_thousand_mutated_keys_and_ciphertexts_give_typed_errors_in_a_child_process():
    _fuzz(10_200, seed=2)


@pytest.mark.parametrize("mutation", ["3=01,6=0f", "3=01,6=01", "3=01,7=01", "3=02,6=0f", "3=01,5=01"])
def test_control_the_old_way_of_loading_a_peers_context_aborts_the_process(mutation):
    done = _child(CONTROL, mutation, timeout=120)
    assert done.returncode == -signal.SIGABRT, (done.returncode, done.stdout, done.stderr[-500:])
    assert "terminate called" in done.stderr
