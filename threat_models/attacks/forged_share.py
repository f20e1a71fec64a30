"""Forged share: a malicious share holder returns a modified Shamir share in the unmask step.

Finding 5 of issue 12. The round runs honestly (real `SecAggClient`s and `SecAggServer`, malicious
setting with identity keys) up to the unmask requests. Exactly t of the survivors answer (the
fewest the server can rebuild a secret from); one of them, the forger, moves its share of the
target's self-mask seed b by one field element. With exactly t shares a Lagrange interpolation
cannot tell a wrong point from a right one: the rebuilt b is another 32-byte value, PRG(b) is
another mask, and the server releases a sum that is garbage, with no error and nobody blamed.
Whoever relies on the aggregate (the next global model) is poisoned without a trace.

What stops it in our protocol: every share carries its dealer's signature over the transcript,
the kind, the dealer, the holder and the share; the server checks each returned share, discards a
forgery and names its holder (`AggregateResult.misbehaving`), and rebuilds from any t valid
shares. With exactly t responders one valid share is missing, so the round aborts (`AbortError`):
never a silently wrong sum. With one spare responder the round completes with the exact sum and
the forger is named.

The weakened control is the server before issue 12, which took every returned share at its word.
There is no switch in `SecAggServer` for that (it would be a switch to turn a defense off), so the
control's unmask step is modelled here from the public primitives (`unverified_unmask`): the same
ring sum of the masked inputs, every self-mask seed rebuilt from the t lowest responders'
unverified shares and, with more than t, the old consistency check of a second t-subset (which
caught a single faulty share only when a spare share was there). The rounds the control runs have
no dropped party, so no pairwise mask is left to remove. On honest shares it reproduces the real
server's ring sum bit for bit (tests/threat_models/test_forged_share.py checks that), so a wrong
control sum is the forgery's doing, not the model's.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Annotated, Any

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field

from protocols import AbortError, SecAggParams, ServerState
from protocols.primitives import PRIME, SHARE_BYTES, MaskAccumulator, reconstruct, ring_dtype
from protocols.secagg import MaskedInput, UnmaskRequest, UnmaskResponse, decode_message, encode_message

from ..errors import AttackConfigError
from ..results import MatrixRow
from ._relay import RoundConfig, Seen, clipped, make_params, relative_error, relay, require_client, start_round

__all__ = ["ForgedShare", "ForgedShareConfig", "ForgedShareResult", "unverified_unmask"]


class ForgedShareConfig(RoundConfig):
    """The round, the forger, how many survivors answer the unmask request, and whether anyone forges.

    `target` is the survivor whose self-mask share the forger modifies.
    """

    forger: Annotated[int, Field(ge=0)] = 1
    spare_responders: Annotated[int, Field(ge=0)] = Field(
        0, description="responders beyond the threshold t: 0 is the attack (exactly t answer)"
    )
    forge: bool = Field(True, description="False: every responder is honest (checks the control's unmask model)")


class ForgedShareResult(BaseModel):
    """Whether a sum came out, how wrong it is against the clipped inputs, and whom the server blamed."""

    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)

    defended: bool
    forged: bool
    threshold: int
    responders: int
    aborted: bool
    sum_released: bool
    wrong_sum: bool = Field(description="the released sum is off by more than the encoding's rounding bound")
    relative_error: float = Field(float("inf"), description="||released - true sum|| / ||true sum||; inf if none")
    misbehaving: tuple[int, ...] = Field((), description="the holders the server named as forgers")
    reason: str = ""
    ring_sum: npt.NDArray[np.unsignedinteger] | None = Field(
        None, exclude=True, repr=False, description="the released ring sum, or None"
    )

    def rows(self) -> list[MatrixRow]:
        """Matrix rows: a wrong sum released with nobody blamed (1/0), a sum released (1/0), its error."""
        undetected = self.sum_released and self.wrong_sum and not self.misbehaving
        rows = [
            MatrixRow(attack="forged_share", metric="wrong_sum_undetected", value=float(undetected), chance=0),
            MatrixRow(attack="forged_share", metric="sum_released", value=float(self.sum_released)),
        ]
        if self.sum_released:
            rows.append(MatrixRow(attack="forged_share", metric="relative_error", value=self.relative_error))
        return rows


def _forge(share: bytes, delta: int = 1) -> bytes:
    """A different, well-formed share: the point moved by `delta` in GF(p) (the signature no longer fits)."""
    return ((int.from_bytes(share, "big") + delta) % PRIME).to_bytes(SHARE_BYTES, "big")


def unverified_unmask(
    params: SecAggParams,
    survivors: Sequence[int],
    masked: Mapping[int, MaskedInput],
    responses: Mapping[int, UnmaskResponse],
) -> npt.NDArray[np.unsignedinteger]:
    """The pre-issue-12 server's unmask step for a round without dropouts: shares taken unverified.

    Sum the survivors' masked inputs, rebuild each survivor's self-mask seed from the lowest t
    responders' shares as returned, and subtract PRG(seed). With more than t shares a second
    t-subset (the highest ids) must give the same seed, the old check that caught one faulty share
    only when there was a spare.

    Raises:
        AbortError: fewer than t shares of a seed, or two t-subsets disagree (the old detection).
        AttackConfigError: a response carries mask-key shares: a party dropped, which this model
            does not cover (its pairwise masks would be left in the sum).
    """
    if any(r.mask_key_shares for r in responses.values()):
        raise AttackConfigError("the unverified-server model covers rounds without dropouts; deliver every input")
    t = params.threshold
    acc = np.zeros(params.dimension + 1, dtype=ring_dtype(params.encoding.ring_bits))
    for u in survivors:
        np.add(acc, masked[u].vector(), out=acc)  # wraps mod 2^ring_bits, as the server's accumulator does
    seeds: list[bytes] = []
    for u in survivors:
        shares = {h: s.share for h, r in responses.items() for s in r.self_mask_shares if s.peer == u}
        if len(shares) < t:
            raise AbortError(f"unmasking party {u}: {len(shares)} shares, {t} needed; round aborted")
        try:
            seed = reconstruct(shares, t)
            if len(shares) > t and reconstruct({h: shares[h] for h in sorted(shares)[-t:]}, t) != seed:
                raise ValueError("inconsistent")
        except ValueError:
            raise AbortError(f"shares of party {u} are inconsistent; round aborted") from None
        seeds.append(seed)
    MaskAccumulator(params.encoding.ring_bits).apply(acc, plus=[], minus=seeds)
    return acc


class ForgedShare:
    """Run the forged-share attack against our share verification or the unverified control."""

    def __init__(self, config: ForgedShareConfig | None = None) -> None:
        self.config = config or ForgedShareConfig()
        cfg = self.config
        for name, party in (("target", cfg.target), ("forger", cfg.forger)):
            require_client(name, party, cfg.num_clients)

    def run(self, inputs: Sequence[npt.NDArray[np.floating]], *, defended: bool) -> ForgedShareResult:
        """Run one round of `inputs` (one update per client) in the malicious setting, with the forgery.

        Args:
            inputs: one update per client.
            defended: True: the real server checks every share's signature (ours); False: the
                modelled pre-issue-12 server takes the shares as returned (the control).

        Raises:
            AttackConfigError: wrong number of inputs, or more responders than survivors.
        """
        cfg = self.config
        n, clip = cfg.num_clients, cfg.clip_range
        if len(inputs) != n:
            raise AttackConfigError(f"inputs has {len(inputs)} updates; num_clients is {n}")
        params, identities = make_params(n, len(inputs[0]), clip, signed=True)
        t = params.threshold
        count = t + cfg.spare_responders
        if count > n:
            raise AttackConfigError(f"t + spare_responders = {count} exceeds num_clients={n}; lower spare_responders")
        seen: Seen = {}
        clients, server = start_round(
            params, inputs, seen, session=os.urandom(16), round_number=0, identities=identities
        )
        relay(server, clients, seen, until=ServerState.COLLECT_SIGNATURES)  # honest up to the consistency check
        requests = server.close_stage()  # the unmask requests; nobody dropped
        request = requests[0][1]
        assert isinstance(request, UnmaskRequest)
        survivors = request.survivors
        replies = {p: clients[p].handle(m) for p, m in requests}
        responders = [cfg.forger, *[p for p in sorted(replies) if p != cfg.forger]][:count]
        sent: dict[int, UnmaskResponse] = {}
        for p in sorted(responders):
            reply = replies[p]
            assert isinstance(reply, UnmaskResponse)
            sent[p] = reply
        if cfg.forge:
            honest = sent[cfg.forger]
            shares = tuple(
                s.model_copy(update={"share": _forge(s.share)}) if s.peer == cfg.target else s
                for s in honest.self_mask_shares
            )
            forged = decode_message(encode_message(honest.model_copy(update={"self_mask_shares": shares})))
            assert isinstance(forged, UnmaskResponse)  # well formed on the wire: only the signature is wrong
            sent[cfg.forger] = forged
        common: dict[str, Any] = {"defended": defended, "forged": cfg.forge, "threshold": t, "responders": len(sent)}
        truth = sum((clipped(inputs[u], clip) for u in survivors), np.zeros(len(inputs[0])))
        misbehaving: tuple[int, ...] = ()
        try:
            if defended:
                for reply in sent.values():
                    server.receive(reply)
                server.close_stage()
                result = server.result()
                ring_sum, decoded, misbehaving = result.ring_sum, result.decoded, result.misbehaving
            else:
                masked = {p: m for p, m in seen[MaskedInput].items() if isinstance(m, MaskedInput)}
                ring_sum = unverified_unmask(params, survivors, masked, sent)
                decoded = params.encoding.decode(ring_sum, num_inputs=len(survivors))
        except AbortError as exc:
            return ForgedShareResult(
                **common, aborted=True, sum_released=False, wrong_sum=False, reason=f"AbortError: {exc}"
            )
        released = np.asarray(decoded.weighted_sum, dtype=np.float64)
        wrong = bool(np.max(np.abs(released - truth)) > decoded.max_abs_error + 1e-12)
        if not wrong:
            reason = "exact sum" + (f"; forgers named: {list(misbehaving)}" if misbehaving else "")
        else:
            reason = "wrong sum, " + ("forgers named" if misbehaving else "no error, nobody blamed")
        return ForgedShareResult(
            **common,
            aborted=False,
            sum_released=True,
            wrong_sum=wrong,
            relative_error=relative_error(released, truth),
            misbehaving=misbehaving,
            reason=reason,
            ring_sum=ring_sum,
        )
