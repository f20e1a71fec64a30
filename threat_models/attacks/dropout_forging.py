"""Dropout forging: a malicious server shows two groups two survivor sets and unmasks one client.

After receiving the target's masked input, the server tells one group of clients that the target
dropped (so they reveal their shares of its mask key, from which all its pairwise masks follow)
and another group that it survived (so they reveal their shares of its self-mask seed). With both
secrets it strips every mask from the target's input (Bonawitz et al. 2017, section 6; Pasquini et
al. 2022 discuss the same split-view idea).

Two things stop it in our protocol: the threshold (t = n - d_max by default, so two disjoint
groups of t holders cannot exist among the n - 1 holders) and, in the malicious setting, the
consistency round (a client only unmasks for the survivor set it signed, with a quorum of
max(t, (n + n_C) // 2 + 1) signatures on that same set). The weakened control removes both: a
semi-honest configuration (no signatures, no consistency round) with a threshold of about n / 2
(`allow_insecure`). The attack runs the real client and server sessions; only the server deviates.
"""

from __future__ import annotations

import os
from typing import Annotated, Any

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field

from protocols import ProtocolError, SecAggClient, SecAggParams, SecAggServer
from protocols.primitives import (
    LABEL_PAIRWISE_MASK,
    MaskAccumulator,
    derive_key,
    ed25519_public,
    reconstruct,
    ring_dtype,
    x25519_agree,
)
from protocols.secagg import AdvertiseKeys, Envelope, SurvivorSet, UnmaskRequest, UnmaskResponse

from ..errors import AttackConfigError
from ..results import MatrixRow

__all__ = ["DropoutForging", "DropoutForgingConfig", "DropoutForgingResult"]


class DropoutForgingConfig(BaseModel):
    """The round the server attacks (target = client 0)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    num_clients: Annotated[int, Field(ge=5, le=64)] = 7
    clip_range: Annotated[float, Field(gt=0)] = 0.1


class DropoutForgingResult(BaseModel):
    """Whether the server recovered the target's input, and how exactly."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    defended: bool
    aborted: bool
    recovered: bool
    relative_error: float = Field(description="||recovered - target|| / ||target||; inf when nothing was recovered")
    reason: str = ""

    def rows(self) -> list[MatrixRow]:
        """Matrix rows: 1 if the target's update was recovered (to within quantization), else 0."""
        return [MatrixRow(attack="dropout_forging", metric="target_recovered", value=float(self.recovered), chance=0)]


class DropoutForging:
    """Run the split-view unmasking attack against our protocol or the weakened control."""

    def __init__(self, config: DropoutForgingConfig | None = None) -> None:
        self.config = config or DropoutForgingConfig()

    def run(self, inputs: list[npt.NDArray[np.floating]], *, defended: bool) -> DropoutForgingResult:
        """Play the malicious server over one round of `inputs` (client 0 is the target).

        Args:
            inputs: one update per client.
            defended: True: our malicious setting (identity keys, consistency round, default
                threshold); False: semi-honest with a threshold of about n / 2.
        """
        n, clip = self.config.num_clients, self.config.clip_range
        if len(inputs) != n:
            raise AttackConfigError(f"inputs has {len(inputs)} updates; num_clients is {n}")
        d = len(inputs[0])
        identities = [os.urandom(32) for _ in range(n)] if defended else None
        if defended:
            assert identities is not None
            pubs = tuple(ed25519_public(k) for k in identities)
            params = SecAggParams.secagg(n, dimension=d, clip_range=clip, dropout_rate=0.2, identity_keys=pubs)
        else:
            params = SecAggParams.secagg(
                n, dimension=d, clip_range=clip, dropout_rate=0.2, threshold=(n - 1) // 2, allow_insecure=True
            )
        session = os.urandom(16)
        clients = [
            SecAggClient(params, party_id=p, session=session, round_number=0,
                         identity_key=identities[p] if identities else None)
            for p in range(n)
        ]  # fmt: skip
        server = SecAggServer(params, session=session, round_number=0)
        adverts: dict[int, AdvertiseKeys] = {}  # the server sees every message it relays
        for party, (client, x) in enumerate(zip(clients, inputs, strict=True)):
            client.set_input(np.asarray(x, dtype=np.float64))
            adverts[party] = client.advertise_keys()
            server.receive(adverts[party])
        masked_target: bytes | None = None
        try:
            while True:
                outgoing = server.close_stage()
                if not outgoing:
                    return self._failed(defended, aborted=False, reason="the round ended without a split")
                kind = outgoing[0][1]
                if isinstance(kind, SurvivorSet | UnmaskRequest):
                    got = self._split(params, server.transcript, adverts, clients, outgoing, masked_target)
                    if isinstance(got, DropoutForgingResult):
                        return got.model_copy(update={"defended": defended})
                    target = np.clip(np.asarray(inputs[0], dtype=np.float64), -clip, clip)
                    error = float(np.linalg.norm(got - target) / (np.linalg.norm(target) or 1.0))
                    return DropoutForgingResult(
                        defended=defended,
                        aborted=False,
                        recovered=error < 1e-3,
                        relative_error=error,
                        reason="unmasked",
                    )
                for party, message in outgoing:
                    reply = clients[party].handle(message)
                    if party == 0 and type(reply).__name__ == "MaskedInput":
                        masked_target = reply.data
                    server.receive(reply)
        except ProtocolError as exc:
            return self._failed(defended, aborted=True, reason=type(exc).__name__)

    def _split(
        self,
        params: SecAggParams,
        transcript: bytes,
        adverts: dict[int, AdvertiseKeys],
        clients: list[SecAggClient],
        outgoing: list[tuple[int, Any]],
        masked_target: bytes | None,
    ) -> DropoutForgingResult | npt.NDArray[np.float64]:
        n = len(clients)
        everyone = tuple(range(n))
        without = tuple(range(1, n))
        half = (n - 1) // 2
        group_a, group_b = list(range(1, 1 + half)), list(range(1 + half, n))  # A: "0 dropped"; B: "0 survived"
        template = outgoing[0][1]
        try:
            if isinstance(template, SurvivorSet):  # the malicious setting: get each group to sign its own view
                signatures: dict[tuple[int, ...], list[Any]] = {without: [], everyone: []}
                for group, view in ((group_a, without), (group_b, everyone)):
                    for p in group:
                        signed = clients[p].handle(template.model_copy(update={"survivors": view}))
                        signatures[view].append(signed)
                requests = {
                    view: UnmaskRequest(
                        session=template.session,
                        round=template.round,
                        survivors=view,
                        signatures=tuple(Envelope(peer=s.sender, data=s.signature) for s in sigs),
                    )
                    for view, sigs in signatures.items()
                }
            else:
                requests = {view: template.model_copy(update={"survivors": view}) for view in (without, everyone)}
            responses: list[UnmaskResponse] = []
            for group, view in ((group_a, without), (group_b, everyone)):
                for p in group:
                    response = clients[p].handle(requests[view])
                    assert isinstance(response, UnmaskResponse)
                    responses.append(response)
        except ProtocolError as exc:
            return self._failed(True, aborted=True, reason=type(exc).__name__)
        b_shares = {r.sender: e.share for r in responses for e in r.self_mask_shares if e.peer == 0}
        s_shares = {r.sender: e.share for r in responses for e in r.mask_key_shares if e.peer == 0}
        if masked_target is None or len(b_shares) < params.threshold or len(s_shares) < params.threshold:
            return self._failed(True, aborted=False, reason="too few shares of the target's secrets")
        self_seed = reconstruct(b_shares, params.threshold)
        mask_sk = reconstruct(s_shares, params.threshold)
        seeds = [
            derive_key(x25519_agree(mask_sk, adverts[p].mask_public_key), label=LABEL_PAIRWISE_MASK,
                       transcript=transcript, a=0, b=p)
            for p in range(1, n)
        ]  # fmt: skip
        vector = np.frombuffer(masked_target, dtype=ring_dtype(params.encoding.ring_bits)).copy()
        MaskAccumulator(params.encoding.ring_bits).apply(vector, minus=[self_seed, *seeds])
        decoded = params.encoding.decode(vector, num_inputs=1)
        return np.asarray(decoded.weighted_sum, dtype=np.float64)

    @staticmethod
    def _failed(defended: bool, *, aborted: bool, reason: str) -> DropoutForgingResult:
        return DropoutForgingResult(
            defended=defended, aborted=aborted, recovered=False, relative_error=float("inf"), reason=reason
        )
