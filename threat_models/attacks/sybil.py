"""Sybil: a malicious server fills the roster with clients it runs itself, around one honest target.

The server enrols n - 1 Sybils (clients it creates, with inputs it chooses) next to one honest
target and runs the protocol honestly. Secure aggregation then does exactly what it promises and
releases the sum, which is the target's update plus inputs the server knows: subtracting them gives
the target's update, exactly. (The Sybils also hold every share of the target's secrets; the sum is
simply the shortest way.) A server facing several honest clients gets here too: it enrols only the
target and Sybils, and the others look like clients that did not show up this round.

What stops it in our protocol is the roster of identity keys fixed in the parameters (a PKI issued
independently of the server): every AdvertiseKeys must be signed by the identity key pinned for its
party id and each client re-verifies every roster entry, so a Sybil that signs with a key of its
own makes the target raise `IntegrityError` on the roster, before it has sent shares or its input.
The weakened control is the semi-honest setting (no identity keys, same threshold): any key pair
the server makes up is a valid party.

The honest point, measured by `server_controls_pki=True`: if the server issues the identity keys
(or can enrol identities at will), Sybils hold genuine keys, every check passes, and the target's
update leaks even in the malicious setting. Signed enrolment helps only when the PKI is run by
someone other than the aggregator; that is an assumption of the protocol (see `SecAggParams`), and
the corruption bound n_C counts real parties, which Sybils are not.
"""

from __future__ import annotations

import os

import numpy as np
import numpy.typing as npt
from pydantic import Field

from protocols import OsRandom, ProtocolError, SecAggClient
from protocols.primitives import ed25519_sign, x25519_generate
from protocols.secagg import AdvertiseKeys, KeyRoster, MaskedInput, SecAggParams, advertise_statement

from ..results import MatrixRow
from ._relay import (
    Outcome,
    Refused,
    RoundConfig,
    Seen,
    clipped,
    describe,
    make_params,
    relative_error,
    relay,
    require_client,
    start_round,
)

__all__ = ["Sybil", "SybilConfig", "SybilResult"]


class SybilConfig(RoundConfig):
    """The round the server fills with Sybils."""

    server_controls_pki: bool = Field(
        False, description="True: the server issued the identity keys, so its Sybils hold real ones"
    )
    seed: int = Field(0, description="seed of the Sybils' inputs (chosen, hence known, by the server)")


class SybilResult(Outcome):
    """Whether the server recovered the target's input (relative error against the clipped input), or who refused."""

    server_controls_pki: bool

    def rows(self) -> list[MatrixRow]:
        """Matrix rows: 1 if the target's update was recovered (to within quantization), else 0."""
        return [MatrixRow(attack="sybil", metric="target_recovered", value=float(self.recovered), chance=0)]


class Sybil:
    """Run the Sybil roster against our malicious setting or the semi-honest control."""

    def __init__(self, config: SybilConfig | None = None) -> None:
        self.config = config or SybilConfig()
        require_client("target", self.config.target, self.config.num_clients)

    def run(self, target_update: npt.NDArray[np.floating], *, defended: bool) -> SybilResult:
        """Enrol n - 1 Sybils around the target and try to read its update off the released sum.

        Args:
            target_update: the honest target's update.
            defended: True: our malicious setting (identity keys pinned in the parameters); False:
                semi-honest, same threshold.
        """
        cfg = self.config
        n, clip, target = cfg.num_clients, cfg.clip_range, cfg.target
        d = len(target_update)
        rng = np.random.default_rng(cfg.seed)
        inputs = [rng.uniform(-clip / 2, clip / 2, d) for _ in range(n)]
        inputs[target] = np.asarray(target_update, dtype=np.float64)
        params, identities = make_params(n, d, clip, signed=defended)
        pki = cfg.server_controls_pki
        if defended and not pki:
            assert identities is not None
            refusal = self._forged_roster(params, target_update, identities[target])
            if refusal is None:  # the defense is gone (the rest of the attack is the weakened run's)
                return SybilResult(
                    defended=True,
                    server_controls_pki=False,
                    aborted=False,
                    recovered=False,
                    reason="the target accepted the Sybil roster",
                )
            return SybilResult(
                defended=True,
                server_controls_pki=False,
                aborted=True,
                recovered=False,
                refused_by=target,
                reason=refusal,
            )
        # No PKI, or the server's own: the Sybils are ordinary sessions the server runs itself.
        seen: Seen = {}
        session = os.urandom(16)
        clients, server = start_round(params, inputs, seen, session=session, round_number=0, identities=identities)
        try:
            relay(server, clients, seen)
        except Refused as refused:  # not expected: every party follows the protocol
            sent = target in seen.get(MaskedInput, {})
            return SybilResult(
                defended=defended,
                server_controls_pki=pki,
                aborted=True,
                recovered=False,
                refused_by=refused.party,
                masked_input_sent=sent,
                reason=refused.reason,
            )
        total = np.asarray(server.result().decoded.weighted_sum, dtype=np.float64)
        got = total - sum(clipped(inputs[p], clip) for p in range(n) if p != target)
        error = relative_error(got, clipped(inputs[target], clip))
        return SybilResult(
            defended=defended,
            server_controls_pki=pki,
            aborted=False,
            recovered=error < 1e-6,
            relative_error=error,
            masked_input_sent=True,
            reason="the released sum minus the Sybils' inputs",
            estimate=got,
        )

    def _forged_roster(
        self, params: SecAggParams, target_update: npt.NDArray[np.floating], target_identity: bytes
    ) -> str | None:
        """Show the honest target a roster of Sybils signed with keys outside the PKI; why it refused, if it did."""
        target, session = self.config.target, os.urandom(16)
        client = SecAggClient(params, party_id=target, session=session, round_number=0, identity_key=target_identity)
        client.set_input(np.asarray(target_update, dtype=np.float64))
        entries = []
        for p in range(params.num_parties):
            if p == target:
                entries.append(client.advertise_keys())
                continue
            (_, share_pk), (_, mask_pk) = x25519_generate(OsRandom()), x25519_generate(OsRandom())
            statement = advertise_statement(client.transcript, p, share_pk, mask_pk)
            sybil_identity = os.urandom(32)  # a key of the Sybil's own: the PKI never issued it
            entries.append(
                AdvertiseKeys(
                    session=session,
                    round=0,
                    sender=p,
                    transcript=client.transcript,
                    share_public_key=share_pk,
                    mask_public_key=mask_pk,
                    signature=ed25519_sign(sybil_identity, statement),
                )
            )
        roster = KeyRoster(session=session, round=0, entries=tuple(entries))
        try:
            client.handle(roster)
        except ProtocolError as exc:
            return describe(exc, roster)
        return None
