"""Embedding the sans-IO sessions in your own host: the loop a transport has to run.

Every byte that would cross the network is produced by `encode_message` and consumed by
`decode_message`; the host decides when a stage is over (here: when every live client has
answered, in a real host: at a deadline) and calls `close_stage()`. Identity keys put the round in
the malicious-server setting: clients sign their keys and the survivor set, and check each other's
signatures. Client 4 crashes after sharing its keys; the sum still comes out, without it.

Run: python examples/host_loop.py
"""

from __future__ import annotations

import os

import numpy as np

from protocols import SecAggClient, SecAggParams, SecAggServer, decode_message, encode_message
from protocols.primitives import ed25519_public

N, D = 8, 1000
CRASHES_AFTER_SHARING = 4


def main() -> None:
    """Run one round over N clients with a crash after key sharing."""
    identity = [os.urandom(32) for _ in range(N)]  # issued by your PKI, never by the aggregator
    params = SecAggParams.secagg(
        N,
        dimension=D,
        clip_range=0.01,
        dropout_rate=0.25,
        corrupt_fraction=0.1,
        identity_keys=tuple(ed25519_public(k) for k in identity),
    )
    session, context = os.urandom(16), b"sha256 of the base model, the adapter and the config"
    clients = [
        SecAggClient(params, party_id=p, session=session, round_number=0, context=context, identity_key=identity[p])
        for p in range(N)
    ]
    server = SecAggServer(params, session=session, round_number=0, context=context)
    updates = [np.random.default_rng(p).normal(0, 1e-3, D) for p in range(N)]

    inbox = []  # bytes "received" by the server
    for client, update in zip(clients, updates, strict=True):
        client.set_input(update)
        inbox.append(encode_message(client.advertise_keys()))
    stage = 0
    while True:
        for wire in inbox:
            server.receive(decode_message(wire))
        outgoing = [(party, encode_message(message)) for party, message in server.close_stage()]
        if not outgoing:
            break
        stage += 1
        inbox = []
        for party, wire in outgoing:
            if party == CRASHES_AFTER_SHARING and stage >= 2:
                continue  # crashed: never answers again
            inbox.append(encode_message(clients[party].handle(decode_message(wire))))

    result = server.result()
    truth = np.sum([updates[p] for p in result.included], axis=0)
    error = np.abs(result.decoded.weighted_sum - truth).max()
    print(f"stages: {stage}, included: {list(result.included)}, dropped: {list(result.dropped)}")
    print(f"max abs error of the revealed sum: {error:.2e} (bound {result.decoded.max_abs_error:.2e})")
    assert error <= result.decoded.max_abs_error


if __name__ == "__main__":
    main()
