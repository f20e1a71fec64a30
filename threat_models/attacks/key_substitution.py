"""Key substitution: a malicious server puts its own mask keys in the roster it shows the target.

The server relays every client's AdvertiseKeys honestly except in the KeyRoster it forwards to the
target, where it replaces each other party's X25519 mask key with one it generated itself (a man in
the middle on the key exchange). The target then agrees every pairwise mask seed with a key whose
private half the server holds: mask_{target,p} = PRG(KDF(DH(server_sk_p, target_mask_pk))). The
target survives, so the normal unmask step hands the server the shares of its self-mask seed b,
and y_target - PRG(b) -/+ every pairwise mask is the target's encoded input, exactly.

Why only the mask keys, and only towards the target: replacing the target's keys in what the others
see gives the server the others' masks with the target, which are not in y_target; replacing share
keys as well would let it read the target's Shamir shares directly but forces it to re-encrypt every
box in both directions. The minimal substitution is enough. The masks of the others towards the
target no longer cancel, so this round's sum is garbage; the server has what it wanted by then.

What stops it in our protocol: in the malicious setting every AdvertiseKeys is signed with the
party's identity key (pinned in the parameters, issued outside the server) over the transcript and
both keys, and each client re-verifies every roster entry, so the target raises `IntegrityError`
on the roster and never sends its shares or masked input. The weakened control is the semi-honest
setting (no identity keys), same threshold: nothing authenticates the keys the server relays.
"""

from __future__ import annotations

import os

import numpy as np
import numpy.typing as npt

from protocols import OsRandom, SecAggParams, ServerState
from protocols.primitives import (
    LABEL_PAIRWISE_MASK,
    MaskAccumulator,
    derive_key,
    reconstruct,
    ring_dtype,
    x25519_agree,
    x25519_generate,
)
from protocols.secagg import AdvertiseKeys, KeyRoster, MaskedInput, Message, UnmaskResponse

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

__all__ = ["KeySubstitution", "KeySubstitutionConfig", "KeySubstitutionResult"]


class KeySubstitutionConfig(RoundConfig):
    """The round the server attacks."""


class KeySubstitutionResult(Outcome):
    """Whether the server recovered the target's input (relative error against the clipped input), or who refused."""

    def rows(self) -> list[MatrixRow]:
        """Matrix rows: 1 if the target's update was recovered (to within quantization), else 0."""
        return [MatrixRow(attack="key_substitution", metric="target_recovered", value=float(self.recovered), chance=0)]


class KeySubstitution:
    """Run the mask-key man in the middle against our malicious setting or the semi-honest control."""

    def __init__(self, config: KeySubstitutionConfig | None = None) -> None:
        self.config = config or KeySubstitutionConfig()
        require_client("target", self.config.target, self.config.num_clients)

    def run(self, inputs: list[npt.NDArray[np.floating]], *, defended: bool) -> KeySubstitutionResult:
        """Play the malicious server over one round of `inputs` (one update per client).

        Args:
            inputs: one update per client; `config.target` is the victim.
            defended: True: our malicious setting (signed keys); False: semi-honest, same threshold.
        """
        n, clip, target = self.config.num_clients, self.config.clip_range, self.config.target
        if len(inputs) != n:
            raise AttackConfigError(f"inputs has {len(inputs)} updates; num_clients is {n}")
        params, identities = make_params(n, len(inputs[0]), clip, signed=defended)
        seen: Seen = {}
        clients, server = start_round(
            params, inputs, seen, session=os.urandom(16), round_number=0, identities=identities
        )
        fakes = {p: x25519_generate(OsRandom()) for p in range(n) if p != target}  # the server's own key pairs

        def substitute(party: int, message: Message) -> Message:
            if party != target or not isinstance(message, KeyRoster):
                return message
            entries = tuple(
                e if e.sender == target else e.model_copy(update={"mask_public_key": fakes[e.sender][1]})
                for e in message.entries
            )  # the signatures stay: the server cannot re-sign without the parties' identity keys
            return message.model_copy(update={"entries": entries})

        try:
            relay(server, clients, seen, rewrite=substitute, until=ServerState.COLLECT_UNMASK)
        except Refused as refused:
            sent = target in seen.get(MaskedInput, {})
            return KeySubstitutionResult(
                defended=defended,
                aborted=True,
                recovered=False,
                refused_by=refused.party,
                masked_input_sent=sent,
                reason=refused.reason,
            )
        got = self._unmask(params, server.transcript, seen, fakes)
        error = relative_error(got, clipped(inputs[target], clip))
        return KeySubstitutionResult(
            defended=defended,
            aborted=False,
            recovered=error < 1e-6,
            relative_error=error,
            masked_input_sent=True,
            reason="unmasked through the substituted mask keys",
            estimate=got,
        )

    def _unmask(
        self, params: SecAggParams, transcript: bytes, seen: Seen, fakes: dict[int, tuple[bytes, bytes]]
    ) -> npt.NDArray[np.float64]:
        """y_target - PRG(b) -/+ every pairwise mask, each agreed with a key the server holds."""
        target = self.config.target
        masked, advert = seen[MaskedInput][target], seen[AdvertiseKeys][target]
        assert isinstance(masked, MaskedInput) and isinstance(advert, AdvertiseKeys)
        b_shares = {
            r.sender: e.share
            for r in seen[UnmaskResponse].values()
            if isinstance(r, UnmaskResponse)
            for e in r.self_mask_shares
            if e.peer == target
        }
        plus: list[bytes] = []
        minus = [reconstruct(b_shares, params.threshold)]
        for p, (fake_sk, _) in fakes.items():
            secret = x25519_agree(fake_sk, advert.mask_public_key)
            seed = derive_key(
                secret, label=LABEL_PAIRWISE_MASK, transcript=transcript, a=min(p, target), b=max(p, target)
            )
            (minus if target < p else plus).append(seed)  # the target added +mask towards larger ids
        vector = np.frombuffer(masked.data, dtype=ring_dtype(params.encoding.ring_bits)).copy()
        MaskAccumulator(params.encoding.ring_bits).apply(vector, plus=plus, minus=minus)
        return np.asarray(params.encoding.decode(vector, num_inputs=1).weighted_sum, dtype=np.float64)
