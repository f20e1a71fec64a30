"""Replay: a malicious server replays round A's signed messages into round B to make masks repeat.

Round A runs honestly; the server keeps the KeyRoster and ShareBundles it delivered and every
masked input. In round B it forwards, instead of the fresh roster, round A's roster (each
recipient's own entry kept fresh, the others' entries relabelled with round B's session, round and
transcript; it cannot re-sign them), and instead of the fresh bundles, round A's. If the clients
accept, every pairwise and self mask of round B equals round A's, and y_A - y_B of any client is
x_A - x_B exactly: the server learns how each client's update changed between rounds.

Our protocol has no switch that turns the binding off: the session id and the round number enter
the transcript hash that salts every derived key and prefixes every signed statement, and every
client draws fresh keys for every session from the OS. So the weakened control is modelled here,
and keeps the identity signatures (it shows that signatures alone do not stop a replay):

* no binding: round B gets round A's session id and round number, so both rounds have the same
  transcript, as they would in a protocol that does not bind the round identity;
* reused key material (`reuse_key_material=True`, the default): each client draws its round
  secrets from a per-client long-term seed (`DeterministicRandom`), as in protocols that set keys
  up once per session. With `reuse_key_material=False` the control's clients draw fresh keys like
  ours, and the replay fails even unbound: the replayed roster names the peers' old share keys, so
  the replayed boxes do not open: the target answers the ShareBundle with a signed `Complaint`
  instead of its masked input; nothing leaks.

Against our protocol the replayed roster fails at the first entry: its signature covers round A's
transcript, so the first honest client raises `IntegrityError` on the KeyRoster (unrelabelled
entries would be refused as another round's keys) before sending shares or a masked input.
(Reused key material would be fatal even with the binding: a client declared dropped in round A
gives up its mask key, which would then unmask its round-B input outright. This module measures
the replay only.)
"""

from __future__ import annotations

import os

import numpy as np
import numpy.typing as npt
from pydantic import Field

from protocols import DeterministicRandom, SecretSource, ServerState
from protocols.primitives import ring_dtype
from protocols.secagg import AdvertiseKeys, Complaint, KeyRoster, MaskedInput, Message, ShareBundle

from ..errors import AttackConfigError
from ..results import MatrixRow
from ._relay import (
    Outcome,
    Refused,
    RoundConfig,
    Seen,
    clipped,
    make_params,
    relative_error,
    relay,
    require_client,
    start_round,
)

__all__ = ["Replay", "ReplayConfig", "ReplayResult"]


class ReplayConfig(RoundConfig):
    """The two rounds the server attacks, and the weakened control's key handling."""

    reuse_key_material: bool = Field(
        True, description="weakened control only: clients derive round secrets from a long-term seed"
    )


class ReplayResult(Outcome):
    """Whether the server recovered the target's x_A - x_B (error against the clipped difference), or who refused."""

    key_material_reused: bool

    def rows(self) -> list[MatrixRow]:
        """Matrix rows: 1 if the target's update difference was recovered (within quantization), else 0."""
        value = float(self.recovered)
        return [MatrixRow(attack="replay", metric="target_difference_recovered", value=value, chance=0)]


class Replay:
    """Replay round A into round B against our bound protocol or the unbound control."""

    def __init__(self, config: ReplayConfig | None = None) -> None:
        self.config = config or ReplayConfig()
        require_client("target", self.config.target, self.config.num_clients)

    def run(
        self,
        first: list[npt.NDArray[np.floating]],
        second: list[npt.NDArray[np.floating]],
        *,
        defended: bool,
    ) -> ReplayResult:
        """Run round A on `first`, replay it into round B on `second`, and difference the target.

        Args:
            first: one update per client in round A.
            second: one update per client in round B.
            defended: True: our protocol (round B bound to its own round number, fresh keys);
                False: the unbound control (see module docstring).
        """
        cfg = self.config
        n, clip, target = cfg.num_clients, cfg.clip_range, cfg.target
        if len(first) != n or len(second) != n:
            raise AttackConfigError(f"first and second need {n} updates each (num_clients)")
        reuse = cfg.reuse_key_material and not defended
        params, identities = make_params(n, len(first[0]), clip, signed=True)  # both settings sign
        session, seeds = os.urandom(16), [os.urandom(32) for _ in range(n)]

        def sources() -> list[SecretSource] | None:
            return [DeterministicRandom(s) for s in seeds] if reuse else None

        # Round A, honest; the server keeps what it delivered.
        delivered: dict[tuple[type, int], Message] = {}

        def keep(party: int, message: Message) -> Message:
            delivered[type(message), party] = message
            return message

        seen_a: Seen = {}
        clients, server = start_round(
            params, first, seen_a, session=session, round_number=0, identities=identities, rngs=sources()
        )
        relay(server, clients, seen_a, rewrite=keep)

        # Round B: bound to its own round number (ours), or indistinguishable from round A (control).
        seen_b: Seen = {}
        round_b = 1 if defended else 0
        clients, server = start_round(
            params, second, seen_b, session=session, round_number=round_b, identities=identities, rngs=sources()
        )
        transcript = server.transcript

        def replay(party: int, message: Message) -> Message:
            header = {"session": message.session, "round": message.round}
            if isinstance(message, KeyRoster):
                old = delivered[KeyRoster, party]
                assert isinstance(old, KeyRoster)
                entries = tuple(
                    seen_b[AdvertiseKeys][party]
                    if e.sender == party
                    else e.model_copy(update={**header, "transcript": transcript})
                    for e in old.entries
                )
                return message.model_copy(update={"entries": entries})
            if isinstance(message, ShareBundle):
                return delivered[ShareBundle, party].model_copy(update=header)
            return message

        try:
            relay(server, clients, seen_b, rewrite=replay, until=ServerState.COLLECT_MASKED)
        except Refused as refused:
            sent = target in seen_b.get(MaskedInput, {})
            return ReplayResult(
                defended=defended,
                key_material_reused=reuse,
                aborted=True,
                recovered=False,
                refused_by=refused.party,
                masked_input_sent=sent,
                reason=refused.reason,
            )
        complaint = seen_b.get(Complaint, {}).get(target)
        if isinstance(complaint, Complaint):  # the replayed boxes did not open: no masked input was sent
            return ReplayResult(
                defended=defended,
                key_material_reused=reuse,
                aborted=True,
                recovered=False,
                refused_by=target,
                masked_input_sent=target in seen_b.get(MaskedInput, {}),
                reason=f"Complaint on ShareBundle (accusing {list(complaint.accused)})",
            )
        y_a, y_b = seen_a[MaskedInput][target], seen_b[MaskedInput][target]
        assert isinstance(y_a, MaskedInput) and isinstance(y_b, MaskedInput)
        dtype = ring_dtype(params.encoding.ring_bits)
        difference = np.frombuffer(y_a.data, dtype=dtype) - np.frombuffer(y_b.data, dtype=dtype)  # wraps mod 2^b
        got = np.asarray(params.encoding.decode(difference, num_inputs=2).weighted_sum, dtype=np.float64)
        error = relative_error(got, clipped(first[target], clip) - clipped(second[target], clip))
        return ReplayResult(
            defended=defended,
            key_material_reused=reuse,
            aborted=False,
            recovered=error < 1e-6,
            relative_error=error,
            masked_input_sent=True,
            reason="y_A - y_B with every mask repeated" if error < 1e-6 else "the masks did not repeat",
            estimate=got,
        )
