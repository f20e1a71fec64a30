"""The SecAgg+ communication graph: a Harary graph over a public random permutation.

Bell et al. (CCS 2020, section 3) replace SecAgg's complete graph by a sparse one. We use their
random Harary graph H(k, n): parties are placed on a ring in an order derived from public
randomness (HKDF of the round's transcript hash, so the server cannot choose it) and each party's
neighbours are the k/2 nearest ring positions on either side. A party shares its secrets with, and
masks against, its neighbours only. With k = n - 1 the graph is complete: plain SecAgg.

Limitation: the permutation is a function of the transcript (session id, round, parameters and
context). A server that can choose those may try many and keep a graph that is bad for a target;
each try succeeds with probability below 2^-40 (the bound in `_params`), so the statistical bound
becomes a computational one of about 2^40 trials, within reach of a determined attacker. Hosts that
need the statistical bound must put randomness the server cannot bias into the round context (a
public beacon value, or a commit-reveal of client nonces), not a hash of a roster the server picks.
"""

from __future__ import annotations

from functools import cached_property

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from ..primitives.kdf import LABEL_NEIGHBOUR_GRAPH, derive_key

__all__ = ["NeighbourGraph"]


def _public_permutation(n: int, transcript: bytes) -> list[int]:
    """Fisher-Yates driven by an AES-CTR stream; unbiased (rejection sampling)."""
    seed = derive_key(transcript, label=LABEL_NEIGHBOUR_GRAPH, transcript=transcript, a=0, b=0)
    stream = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor()
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


class NeighbourGraph:
    """Who shares secrets and masks with whom; identical for every party of a round."""

    def __init__(self, num_parties: int, neighbours: int, transcript: bytes) -> None:
        self.num_parties = num_parties
        self.neighbours = neighbours
        self._transcript = transcript

    @property
    def complete(self) -> bool:
        """True for plain SecAgg (every party is every other's neighbour)."""
        return self.neighbours >= self.num_parties - 1

    @cached_property
    def _position(self) -> tuple[list[int], list[int]]:
        order = _public_permutation(self.num_parties, self._transcript)
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
