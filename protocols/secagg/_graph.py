"""The SecAgg+ communication graph: a Harary graph over a public random permutation.

Bell et al. (CCS 2020, section 3) replace SecAgg's complete graph by a sparse one. We use their
random Harary graph H(k, n): parties are placed on a ring in an order derived from a public 32-byte
graph seed (an unbiased Fisher-Yates shuffle driven by AES-CTR under HKDF(seed)) and each party's
neighbours are the k/2 nearest ring positions on either side. A party shares its secrets with, and
masks against, its neighbours only. With k = n - 1 the graph is complete: plain SecAgg.

Where the seed comes from (see `GraphMode`):

* malicious setting, SecAgg+: a commit-reveal coin toss among U1. Each party commits to a fresh
  32-byte nonce inside its signed AdvertiseKeys, reveals it only after the roster (every commitment)
  is fixed, and the seed is SHA-256 of every nonce of U1 (`_transcript.toss_graph_seed`). One
  honest nonce makes it uniform, and nobody, server included, can pick a nonce after seeing an
  honest one. A missing or wrong reveal aborts the round: nobody is dropped after committing,
  since dropping a party after its nonce is known would let the server choose among seeds;
* a public beacon value the host passes in (for example a drand round): seed = SHA-256(domain |
  transcript | beacon), no extra stage; every party signs a binding of the value it used;
* otherwise (semi-honest setting, or the complete graph where the seed is unused): the transcript.

Limitation: the server can still abort a toss (or make a colluding client withhold its reveal) and
try again in a new session, so it may choose among as many graphs as it can run tosses. Every site
caps the tosses it joins per release (`SecurityPolicy.max_graph_tosses`, enforced by the host: the
Flower Mod counts reveals in its binding book), so the 2^-sigma failure bound of `_params` becomes
max_graph_tosses x 2^-sigma instead of a computational bound of about 2^sigma server-side trials.
With a beacon the bias is whatever the beacon's own is; the host must check the value is the
beacon's output for a round fixed in advance (this module cannot). In the semi-honest setting the
server follows the protocol and the transcript-derived graph is unbiased by assumption.
"""

from __future__ import annotations

import enum
from functools import cached_property

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from ..primitives.kdf import LABEL_NEIGHBOUR_GRAPH, derive_key

__all__ = ["GraphMode", "NeighbourGraph", "graph_mode"]


def _public_permutation(n: int, seed: bytes) -> list[int]:
    """Fisher-Yates driven by an AES-CTR stream; unbiased (rejection sampling).

    With seed = transcript this is the permutation of the transcript-derived graph, byte for byte.
    """
    key = derive_key(seed, label=LABEL_NEIGHBOUR_GRAPH, transcript=seed, a=0, b=0)
    stream = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
    order = list(range(n))
    for i in range(n - 1, 0, -1):
        bound = i + 1
        limit = (1 << 32) - ((1 << 32) % bound)
        while True:
            r = int.from_bytes(stream.update(bytes(4)), "little")
            if r < limit:
                break
        j = r % bound
        order[i], order[j] = order[j], order[i]
    return order


class GraphMode(enum.Enum):
    """Where a round's graph seed comes from (see the module docstring)."""

    TRANSCRIPT = "transcript"
    TOSS = "toss"
    BEACON = "beacon"


def graph_mode(*, malicious: bool, complete: bool, beacon: bytes | None) -> GraphMode:
    """A beacon when the host passes one; a toss for malicious SecAgg+; else the transcript."""
    if beacon is not None:
        return GraphMode.BEACON
    if malicious and not complete:
        return GraphMode.TOSS
    return GraphMode.TRANSCRIPT


class NeighbourGraph:
    """Who shares secrets and masks with whom; identical for every party of a round.

    Args:
        num_parties: n.
        neighbours: k.
        seed: the 32-byte public graph seed (the transcript, a toss result or a beacon digest).
    """

    def __init__(self, num_parties: int, neighbours: int, seed: bytes) -> None:
        if len(seed) != 32:
            raise ValueError(f"the graph seed must be 32 bytes, got {len(seed)}")
        self.num_parties = num_parties
        self.neighbours = neighbours
        self.seed = seed

    @property
    def complete(self) -> bool:
        """True for plain SecAgg (every party is every other's neighbour)."""
        return self.neighbours >= self.num_parties - 1

    @cached_property
    def _position(self) -> tuple[list[int], list[int]]:
        order = _public_permutation(self.num_parties, self.seed)
        position = [0] * self.num_parties
        for pos, party in enumerate(order):
            position[party] = pos
        return order, position

    def neighbours_of(self, party: int) -> frozenset[int]:
        """The neighbours of `party` (never itself)."""
        n = self.num_parties
        if self.complete:
            return frozenset(range(n)) - {party}
        order, position = self._position
        half = self.neighbours // 2
        p = position[party]
        return frozenset(order[(p + off) % n] for off in range(-half, half + 1) if off != 0)
