"""HE decryption oracle: a malicious server reads the target's upload through another client's replies.

Finding 4(a) of issue 12. The server holds every upload E(x_T) of a BFV round (real `HEClient`s
and `HEServer`, identity keys). It sends a client that holds the secret key a crafted "aggregate":
E(x_T) plus a plaintext offset on one word, homomorphically (no key needed), with the real signed
contribution list attached. A client that decrypts what the server sends and reports its checks
answers one bit per query: the range check fails ("outside the range") when word_j + offset > 2L,
and passes otherwise (it then fails on the counter, "does not match"). Binary search over the
offset gives each of x_T's quantized words exactly, in about log2(2L + 1) = 16 queries per
coordinate, because the client stays in its state after a failed check and can be asked again.
BFV is not IND-CCA1: enough such queries leak the key itself, not just x_T.

What stops it in our protocol: a client decrypts only the homomorphic sum it computes itself from
the individually signed uploads (never a ciphertext the server chose), at most once per key; BFV
clients other than the key holder drop the key right after encrypting; and any failed check after
the key is loaded ends the session (ABORTED, key dropped). The first crafted query is refused with
a typed error (`RemoteProtocolError`), every later one with `AbortError`: no bit comes back.

The weakened control is `LeakyHEClient`, the client before issue 12: it keeps the key after
encrypting, decrypts the aggregate the server sends (carried in `HESum.inputs`, one update's worth
of chunks, as the old message's aggregate field did) and stays in its state after a failed check.
The control changes only the victim's sum step; every other party, and the victim up to its
upload, run the real sessions.

Public names used beyond the session API: `protocols.he.layout`, `load_chunk`, `decrypt_words` and
`decode_words` (the ciphertext-level hazmat the server needs to craft a query and the control needs
to decrypt one). The control reads the victim's loaded context from `HEClient._ctx`: the session
API gives no access to a loaded key (by design), and the old behaviour is exactly a client that
decrypts with it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Annotated, Any

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field

from protocols import AbortError, ProtocolError, RemoteProtocolError
from protocols.he import (
    HEAck,
    HEClient,
    HEClientState,
    HEHello,
    HEInput,
    HEMessage,
    HEParams,
    HERoster,
    HEServer,
    HESum,
    decode_he_message,
    decode_words,
    decrypt_words,
    encode_he_message,
    export_chunk,
    key_holder,
    layout,
    load_chunk,
)
from protocols.primitives import ed25519_public, ed25519_verify

from ..errors import AttackConfigError
from ..results import MatrixRow
from ._relay import RoundConfig, require_client

__all__ = ["HEOracle", "HEOracleConfig", "HEOracleResult", "LeakyHEClient"]

_RANGE_FAILED = "outside the range"
"""The control's reply when word + offset left [0, 2L]: the bit is 'word_j > mid'."""
_RANGE_PASSED = "decrypted counter does not match"
"""The control's reply when the range check passed and the counter (1, not n) did not: 'word_j <= mid'."""


class HEOracleConfig(RoundConfig):
    """The BFV round the server attacks, which of the target's coordinates it searches, and whom it queries."""

    num_clients: Annotated[int, Field(ge=4, le=16)] = 4
    coordinates: Annotated[int, Field(ge=1, le=256)] = Field(
        4, description="how many of the target's coordinates (the first ones) the server searches"
    )
    query_holder: bool = Field(
        False, description="query the key holder instead of a client that does not release the sum (the review's case)"
    )
    max_queries: Annotated[int, Field(ge=1)] = Field(10_000, description="the server gives up after this many")


class HEOracleResult(BaseModel):
    """How many of the target's quantized words the server recovered, with how many queries, and how it ended."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    defended: bool
    victim: int
    victim_is_holder: bool
    coordinates: int = Field(description="coordinates searched")
    recovered: int = Field(description="coordinates whose quantized word came out exactly")
    queries: int = Field(description="crafted aggregates sent to the victim")
    victim_aborted: bool = Field(description="the victim ended its session (state ABORTED, key dropped)")
    victim_decryptions: int = Field(description="aggregates the victim decrypted")
    victim_holds_key: bool = Field(description="the victim still holds the session's key after the attack")
    refused_with: str = Field("", description="the first reply that carried no bit: 'ErrorType: message'")
    words: tuple[int | None, ...] = Field((), description="what the server recovered per coordinate (None: nothing)")
    truth: tuple[int, ...] = Field((), exclude=True, repr=False, description="the target's quantized words")

    @property
    def fraction(self) -> float:
        """Fraction of the searched coordinates recovered exactly."""
        return self.recovered / self.coordinates

    def rows(self) -> list[MatrixRow]:
        """Matrix rows: the fraction of the target's coordinates recovered exactly, and the queries spent."""
        return [
            MatrixRow(attack="he_oracle", metric="target_coordinates_recovered", value=self.fraction, chance=0),
            MatrixRow(attack="he_oracle", metric="queries", value=float(self.queries)),
        ]


class LeakyHEClient(HEClient):
    """The weakened control: the HE client before issue 12 (decrypts the server's aggregate, never aborts).

    It keeps the key after encrypting (`decrypts` is True for every client, as in symmetric mode
    before), checks the contributors' signatures, then decrypts the aggregate the server sent in
    `HESum.inputs` instead of its own sum of the signed uploads, and a failed range or counter check
    leaves it in its state, so the server may ask again.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._signers: dict[int, bytes] = {}

    @property
    def decrypts(self) -> bool:
        """Every client keeps the key and decrypts (the old symmetric-mode behaviour)."""
        return True

    def handle(self, message: HEMessage) -> HEMessage:
        """The old sum step for HESum; every other message goes to the real session."""
        if isinstance(message, HESum) and self.state is HEClientState.INPUT_SENT:
            return self._decrypt_server_total(message)
        reply = super().handle(message)
        if isinstance(message, HERoster):  # the session checked the roster: keep the signing keys it holds
            for blob in message.hellos:
                hello = decode_he_message(blob)
                assert isinstance(hello, HEHello)
                self._signers[hello.sender] = hello.sign_public
        return reply

    def _decrypt_server_total(self, total: HESum) -> HEAck:
        for sender, digest, signature in zip(total.contributors, total.digests, total.signatures, strict=True):
            ed25519_verify(self._signers[sender], signature, digest, peer_id=sender)
        context = self._ctx  # the session's loaded key (see the module docstring)
        vectors = [load_chunk(self.params, context, c, i, field="inputs") for i, c in enumerate(total.inputs)]
        self.decryptions += 1
        result = decode_words(self.params, decrypt_words(self.params, vectors))  # raises "outside the range"
        if result.num_inputs != len(total.contributors):
            raise RemoteProtocolError(
                "the aggregate's decrypted counter does not match its listed contributions", field="contributors"
            )
        self.state = HEClientState.DONE
        return HEAck(session=self.session, round=self.round_number, sender=self.party_id, count=result.num_inputs)


def _wire(message: HEMessage) -> HEMessage:
    return decode_he_message(encode_he_message(message))


class HEOracle:
    """Binary-search the target's quantized words through a victim's replies to crafted aggregates."""

    def __init__(self, config: HEOracleConfig | None = None) -> None:
        self.config = config or HEOracleConfig()
        require_client("target", self.config.target, self.config.num_clients)

    def run(self, inputs: Sequence[npt.NDArray[np.floating]], *, defended: bool) -> HEOracleResult:
        """Run one honest BFV round of `inputs` up to the sum, then query the victim.

        Args:
            inputs: one update per client; `config.target` is the one the server reads.
            defended: True: the victim is our `HEClient`; False: it is `LeakyHEClient` (the control).

        Raises:
            AttackConfigError: wrong number of inputs, or more coordinates than the update has.
        """
        cfg = self.config
        n, target = cfg.num_clients, cfg.target
        if len(inputs) != n:
            raise AttackConfigError(f"inputs has {len(inputs)} updates; num_clients is {n}")
        dimension = len(inputs[0])
        if cfg.coordinates > dimension:
            raise AttackConfigError(f"coordinates={cfg.coordinates} exceeds the update's {dimension}; lower it")
        identities = [os.urandom(32) for _ in range(n)]
        pinned = tuple(ed25519_public(k) for k in identities)  # issued outside the server
        params = HEParams.bfv_packed(n, dimension=dimension, clip_range=cfg.clip_range, identity_keys=pinned)
        while True:  # the server picks the session id: one whose key holder is not the target
            session = os.urandom(16)
            server = HEServer(params, session=session, round_number=0)
            holder = key_holder(server.transcript, range(n))
            if holder != target:
                break
        victim = holder if cfg.query_holder else min(p for p in range(n) if p not in (target, holder))
        seeds = [os.urandom(32) for _ in range(n)]
        clients: list[HEClient] = []
        for p in range(n):
            cls = LeakyHEClient if (p == victim and not defended) else HEClient
            client = cls(params, party_id=p, session=session, round_number=0, identity_key=identities[p])
            client.set_input(np.asarray(inputs[p], dtype=np.float64), rounding_seed=seeds[p])
            clients.append(client)
        for client in clients:
            server.receive(_wire(client.advertise_keys()))
        for p, message in server.close_stage():  # the roster; the replies are key offers
            server.receive(_wire(clients[p].handle(message)))
        uploads: dict[int, HEInput] = {}
        for p, message in server.close_stage():  # the keys; the replies are the uploads, which the server keeps
            upload = clients[p].handle(message)
            assert isinstance(upload, HEInput)
            uploads[p] = upload
            server.receive(_wire(upload))
        (honest,) = [m for _, m in server.close_stage()]  # BFV: the signed contributions go to the holder only
        assert isinstance(honest, HESum)
        truth = self._truth(params, inputs[target], seeds[target])
        words, queries, refused = self._search(params, honest, uploads[target], clients[victim], defended)
        recovered = sum(w == t for w, t in zip(words, truth, strict=True))
        return HEOracleResult(
            defended=defended,
            victim=victim,
            victim_is_holder=victim == holder,
            coordinates=cfg.coordinates,
            recovered=recovered,
            queries=queries,
            victim_aborted=clients[victim].state is HEClientState.ABORTED,
            victim_decryptions=clients[victim].decryptions,
            victim_holds_key=clients[victim].holds_key,
            refused_with=refused,
            words=tuple(words),
            truth=tuple(truth),
        )

    def _truth(self, params: HEParams, x: npt.NDArray[np.floating], seed: bytes) -> list[int]:
        """The target's quantized words (value + L), from the same encoding and rounding seed."""
        encoded = params.quantizer.encode(np.asarray(x, dtype=np.float64), weight=1.0, rounding_seed=seed)
        words = encoded.view("<i4").astype(np.int64) + params.level
        return [int(w) for w in words[: self.config.coordinates]]

    def _crafted(self, params: HEParams, keyless: Any, honest: HESum, upload: HEInput, coordinate: int, offset: int,
                 *, whole_list: bool) -> HESum:  # fmt: skip
        """E(x_target) plus `offset` on one word, made with no key, with the real signed contributions attached.

        `whole_list`: for our protocol, the crafted chunks replace the target's in the full list of
        uploads (the best a server can do: it cannot re-sign); for the control, they are the aggregate.
        """
        shape = layout(params)
        n, k, w = params.slots, params.fields_per_slot, params.field_bits
        chunk, position = divmod(coordinate, n * k)
        field, slot = divmod(position, n)
        vector = load_chunk(params, keyless, upload.chunks[chunk], chunk, field="chunks")
        plain = [0] * n
        plain[slot] = offset << (field * w)
        chunks = list(upload.chunks)
        chunks[chunk] = export_chunk(shape, vector + plain)  # plaintext addition: no key needed
        if not whole_list:
            return honest.model_copy(update={"inputs": tuple(chunks)})
        per = params.chunks
        i = honest.contributors.index(self.config.target)
        inputs = list(honest.inputs)
        inputs[i * per : (i + 1) * per] = chunks
        return honest.model_copy(update={"inputs": tuple(inputs)})

    def _search(
        self, params: HEParams, honest: HESum, upload: HEInput, victim: HEClient, defended: bool
    ) -> tuple[list[int | None], int, str]:
        """Binary search per coordinate; stops when the victim has ended its session or at max_queries."""
        top = 2 * params.level  # one upload's words lie in [0, 2L]; with counter 1 the range check is [0, 2L]
        keyless = layout(params).keyless_context()  # the server's: parameters only, no key
        words: list[int | None] = []
        queries, refused, ended = 0, "", False
        for j in range(self.config.coordinates):
            lo, hi = 0, top
            while lo < hi and not ended and queries < self.config.max_queries:
                mid = (lo + hi) // 2
                query = self._crafted(params, keyless, honest, upload, j, top - mid, whole_list=defended)
                queries += 1
                try:
                    victim.handle(_wire(query))  # passes the range check iff word_j <= mid
                    reply = "accepted"
                except ProtocolError as exc:
                    reply = f"{type(exc).__name__}: {exc}"
                    ended = isinstance(exc, AbortError)  # the session is over: nothing more to ask
                if _RANGE_PASSED in reply:
                    hi = mid
                elif _RANGE_FAILED in reply:
                    lo = mid + 1
                elif not refused:
                    refused = reply  # no bit in this reply
            words.append(lo if lo == hi else None)
        return words, queries, refused
