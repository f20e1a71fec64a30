"""Downgrade: a malicious server announces semi-honest parameters to nodes that hold identity keys.

Finding 3(a) of issue 12. Flower nodes used to take their security parameters from the server's
setup message. The server announces plain SecAgg with no identity keys (the semi-honest setting:
no signatures, no consistency round) and a threshold t ~ n/2, which is within the semi-honest
bound, so a node that takes the server's word accepts it. In the unmask step the server splits the
survivor views: half the others are told "T dropped" (they send shares of T's mask key), the other
half "T survived" (they send shares of T's self-mask seed). With t shares of each it strips every
mask from T's masked input: encode(x_T), exactly. This is dropout forging, reached by lowering the
parameters instead of attacking the malicious setting.

What stops it in our protocol: a node with a site policy (`secure_fedllm.site.SitePolicy`, a
`protocols.SecurityPolicy` with its pinned roster and identity key) derives for itself what it
accepts for the announced n and refuses weaker parameters at setup, before it trains, with an
`InsecureParameterError` naming the field ("identity_keys: the server announced no identity keys").
Nothing reaches the server: no keys, no shares, no masked input.

The weakened control is a node with no site policy and no identity key: it accepts whatever the
server announces (the Mod's behaviour before issue 12 for every node).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, ClassVar

import numpy as np
import numpy.typing as npt
from pydantic import Field

from protocols import AbortError, FixedPointEncoding, SecAggParams, SecurityPolicy
from protocols.primitives import ed25519_public
from protocols.secagg import MaskedInput, UnmaskRequest, UnmaskResponse

from ..errors import AttackConfigError
from ._grid import GridOutcome, GridServer, encoded, node_app, recording_grid, site_configs, strip_target
from ._relay import RoundConfig, clipped, relative_error, require_client

__all__ = ["Downgrade", "DowngradeConfig", "DowngradeResult"]

REFUSAL = "InsecureParameterError"


class DowngradeConfig(RoundConfig):
    """The round the server downgrades, and the threshold it announces (default floor((n - 1) / 2))."""

    threshold: Annotated[int, Field(ge=2)] | None = Field(
        None, description="announced t; at most (n - 1) / 2, so each half of the split views holds t shares"
    )


class DowngradeResult(GridOutcome):
    """Whether the split views gave the target's encoded update, or which nodes refused the parameters."""

    attack: ClassVar[str] = "downgrade"

    threshold: int


class Downgrade:
    """Run the downgrade (no identity keys, t ~ n/2, split views) against site policies or policy-less nodes."""

    def __init__(self, config: DowngradeConfig | None = None) -> None:
        self.config = config or DowngradeConfig()
        cfg = self.config
        require_client("target", cfg.target, cfg.num_clients)
        if self.threshold * 2 > cfg.num_clients - 1:
            raise AttackConfigError(
                f"threshold={self.threshold} exceeds (num_clients - 1) / 2 = {(cfg.num_clients - 1) / 2}: "
                "the two halves of the split views cannot both hold t shares; lower threshold"
            )

    @property
    def threshold(self) -> int:
        """The threshold the server announces."""
        return self.config.threshold or (self.config.num_clients - 1) // 2

    def run(self, inputs: Sequence[npt.NDArray[np.floating]], *, defended: bool) -> DowngradeResult:
        """Announce the downgraded parameters, relay honestly up to the unmask step, then split the views.

        Args:
            inputs: one update per client.
            defended: True: every node has a site policy (pinned roster, identity key); False: no
                policy and no identity key (the control).

        Raises:
            AttackConfigError: wrong number of inputs.
        """
        cfg = self.config
        n, target, t = cfg.num_clients, cfg.target, self.threshold
        if len(inputs) != n:
            raise AttackConfigError(f"inputs has {len(inputs)} updates; num_clients is {n}")
        secrets = [os.urandom(32) for _ in range(n)]
        roster = tuple(ed25519_public(k) for k in secrets)
        params = SecAggParams.secagg(n, dimension=len(inputs[0]), clip_range=cfg.clip_range, threshold=t)
        common: dict[str, Any] = {"defended": defended, "threshold": t}
        with tempfile.TemporaryDirectory(prefix="downgrade-") as tmp:
            configs = site_configs(
                Path(tmp),
                range(n),
                secrets if defended else None,
                SecurityPolicy(roster=roster) if defended else None,
            )
            server = GridServer(recording_grid(node_app(inputs), configs)[0], params, {p: p + 1 for p in range(n)}, {},
                                os.urandom(16))  # fmt: skip
            server.setup()
            refused = server.refusals(REFUSAL)
            try:
                outgoing = server.run(until=UnmaskRequest)
            except AbortError as exc:
                return DowngradeResult(
                    **common,
                    aborted=True,
                    recovered=False,
                    masked_input_sent=target in server.seen.get(MaskedInput, {}),
                    refused_by=refused[0] - 1 if refused else None,
                    refusals=len(refused),
                    refused_with=REFUSAL if refused else "",
                    reason=f"AbortError: {exc}; {len(refused)} of {n} nodes refused: "
                    + (server.failures[refused[0]] if refused else "none"),
                )
            template = outgoing[0][1]
            everyone = tuple(range(n))
            without = tuple(p for p in everyone if p != target)
            views = {
                p: (without if i < t else everyone) for i, p in enumerate(without)
            }  # A: "T dropped"; B: "T survived"
            responses = server.send([(p, template.model_copy(update={"survivors": v})) for p, v in views.items()])
        self_mask = {p: e.share for p, r in responses.items() if isinstance(r, UnmaskResponse)
                     for e in r.self_mask_shares if e.peer == target}  # fmt: skip
        mask_key = {p: e.share for p, r in responses.items() if isinstance(r, UnmaskResponse)
                    for e in r.mask_key_shares if e.peer == target}  # fmt: skip
        if len(self_mask) < t or len(mask_key) < t:
            why = f"the split views gave {len(self_mask)} self-mask and {len(mask_key)} mask-key shares, {t} needed"
            return DowngradeResult(**common, aborted=False, recovered=False, masked_input_sent=True, reason=why)
        recovered = strip_target(server, target, self_mask, mask_key)
        encoding: FixedPointEncoding = params.encoding
        exact = bool(np.array_equal(recovered, encoded(encoding, inputs[target], target)))
        estimate = np.asarray(encoding.decode(recovered, num_inputs=1).weighted_sum, dtype=np.float64)
        return DowngradeResult(
            **common,
            aborted=False,
            recovered=exact,
            exact=exact,
            masked_input_sent=True,
            relative_error=relative_error(estimate, clipped(inputs[target], cfg.clip_range)),
            reason="every mask stripped: encode(x_T) bit for bit"
            if exact
            else "unmasked vector differs from encode(x_T)",
            estimate=estimate,
        )
