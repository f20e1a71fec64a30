"""Sybil roster: a malicious server announces its own identity keys at every index but the target's.

Finding 3(b) of issue 12. The malicious setting is only as good as the roster of identity keys the
parameters carry. A server that writes that roster itself puts the target's real key at the
target's index (so the target's own check passes) and keys of its own at every other index, then
plays every other party with sessions of its own (Sybils, with inputs it chose). Every signature
verifies, every stage runs, the round completes, and the released sum is x_T plus inputs the server
knows: subtracting them gives encode(x_T), exactly. The real other clients are simply not asked.

What stops it in our protocol: a node with a site policy pins the roster (or a roster authority)
it was enrolled with, and refuses at setup, before it trains, any parameters that list keys it did
not pin, with an `InsecureParameterError` naming the indices ("identity_keys[1, 2, 3, 4]: 4 key(s)
are not ..."). The Sybils may finish a round among themselves; it holds nothing of the target's.

The weakened control is a node that holds its identity key but no site policy: it checks only that
its own index carries its own key (the Mod's check without a policy), which the server satisfies.
The existing `sybil` row is the same attack on bare protocol sessions (signed enrolment vs the
semi-honest setting); this row is the Flower node's side of it, where the roster comes from the
server's setup message.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from protocols import AbortError, SecAggClient, SecAggParams, SecurityPolicy, ServerState
from protocols.primitives import ed25519_public
from protocols.secagg import MaskedInput

from ..errors import AttackConfigError
from ._grid import (
    PLAN,
    ROUND,
    GridOutcome,
    GridServer,
    encoded,
    node_app,
    recording_grid,
    ring_difference,
    rounding_seed,
    site_configs,
)
from ._relay import RoundConfig, clipped, relative_error, require_client

__all__ = ["SybilRoster", "SybilRosterConfig", "SybilRosterResult"]

REFUSAL = "InsecureParameterError"


class SybilRosterConfig(RoundConfig):
    """The round: n parties, of which only the target is a real node (the others are the server's Sybils)."""


class SybilRosterResult(GridOutcome):
    """Whether the sum minus the Sybils' inputs gave encode(x_T), or whether the target refused the roster."""

    attack: ClassVar[str] = "sybil_roster"

    target_included: bool = False


class SybilRoster:
    """Run the Sybil roster against a node pinning its roster or a node checking only its own key."""

    def __init__(self, config: SybilRosterConfig | None = None) -> None:
        self.config = config or SybilRosterConfig()
        require_client("target", self.config.target, self.config.num_clients)

    def run(self, inputs: Sequence[npt.NDArray[np.floating]], *, defended: bool) -> SybilRosterResult:
        """Announce a roster of Sybil keys around the target's real key, run the round honestly, subtract.

        Args:
            inputs: one update per party: the target's, and the inputs the server's Sybils use.
            defended: True: the target's node has a site policy pinning the real roster; False: it
                holds its identity key and no policy (the control).

        Raises:
            AttackConfigError: wrong number of inputs.
        """
        cfg = self.config
        n, target = cfg.num_clients, cfg.target
        if len(inputs) != n:
            raise AttackConfigError(f"inputs has {len(inputs)} updates; num_clients is {n}")
        secrets = [os.urandom(32) for _ in range(n)]  # the real parties' keys: the roster a site pins
        roster = tuple(ed25519_public(k) for k in secrets)
        sybils = {p: os.urandom(32) for p in range(n) if p != target}
        announced = tuple(roster[p] if p == target else ed25519_public(sybils[p]) for p in range(n))
        params = SecAggParams.secagg(n, dimension=len(inputs[0]), clip_range=cfg.clip_range, identity_keys=announced)
        session = os.urandom(16)
        own = {}
        for p, key in sybils.items():
            own[p] = SecAggClient(params, party_id=p, session=session, round_number=ROUND, context=PLAN,
                                  identity_key=key)  # fmt: skip
            own[p].set_input(np.asarray(inputs[p], dtype=np.float64), rounding_seed=rounding_seed(p))
        with tempfile.TemporaryDirectory(prefix="sybil-roster-") as tmp:
            configs = site_configs(Path(tmp), [target], secrets, SecurityPolicy(roster=roster) if defended else None)
            server = GridServer(recording_grid(node_app(inputs), configs)[0], params, {target: 1}, own, session)
            server.setup()
            refused = server.refusals(REFUSAL)
            try:
                server.run()  # honest from here on: the Sybils may finish a round among themselves
            except AbortError as exc:
                aborted = f"AbortError: {exc}"
            else:
                aborted = ""
        common: dict[str, Any] = {
            "defended": defended,
            "masked_input_sent": target in server.seen.get(MaskedInput, {}),
            "refused_by": target if refused else None,
            "refusals": len(refused),
            "refused_with": REFUSAL if refused else "",
        }
        done = server.server.state is ServerState.DONE
        result = server.server.result() if done else None
        if result is None or target not in result.included:
            why = server.failures.get(1, "") if refused else "the target's input is not in the sum"
            return SybilRosterResult(
                **common,
                aborted=bool(aborted),
                recovered=False,
                reason="; ".join(x for x in (aborted, why) if x)
                + ("" if result is None else f"; sum released over {list(result.included)} only"),
            )
        ring = np.asarray(result.ring_sum)
        encoding = params.encoding
        for p in sybils:  # the Sybils' inputs are the server's own
            ring = ring_difference(encoding, ring, encoded(encoding, inputs[p], p))
        exact = bool(np.array_equal(ring, encoded(encoding, inputs[target], target)))
        estimate = np.asarray(encoding.decode(ring, num_inputs=1).weighted_sum, dtype=np.float64)
        return SybilRosterResult(
            **common,
            aborted=False,
            recovered=exact,
            exact=exact,
            target_included=True,
            relative_error=relative_error(estimate, clipped(inputs[target], cfg.clip_range)),
            reason="sum minus the Sybils' inputs = encode(x_T) bit for bit" if exact else "the difference is not x_T",
            estimate=estimate,
        )
