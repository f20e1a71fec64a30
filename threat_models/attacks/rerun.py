"""Rerun: a malicious server runs secure aggregation for the same round twice, the second time without T.

Finding 1 of issue 12. Local training is deterministic given the node's data and the global model,
so a node asked twice for the same round returns the same update. The server runs a complete,
honest-looking SecAgg+ session over everyone (sum S1), then a second session for the same round
over everyone but the target T (sum S2), and subtracts: S1 - S2 = encode(x_T), exactly, in the
ring. Every message of both sessions is well formed and correctly signed; no check inside one
session can see it.

What stops it in our protocol: one update, one session. Right before a node's masked input leaves,
`secure_aggregation_mod` binds the release (job, round, release key) to that session, durably (our
ClientApp names the site's state folder, where the binding is fsynced), and from then on refuses
any session for that release (`ReleaseBindingError`: "one update goes to one session only"). Every
node but T refuses the second session at its setup, before it trains, and the session aborts.

The weakened control is a node whose binding does not survive to the second session: its ClientApp
names no state folder, so the Mod keys the release itself and keeps the binding in the node's
`Context.state`, and the node restarts between the two sessions (`restart_nodes`), losing that
state. That is what the Mod before issue 12 did in every case (it kept no binding at all). The
control is a real deployment risk, not a strawman: a third-party ClientApp that gives no release
key and a SuperNode that restarts are exposed exactly this way (with `restart_nodes=False` the
control's `Context.state` binding holds and it refuses too).

Both variants run the real Mod on `LocalGrid` nodes with identity keys, and the server uses the
public `secure_aggregate` for both sessions: the attack is only in which nodes it asks.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt
from pydantic import Field

from protocols import AbortError, FixedPointEncoding, SecAggParams
from protocols.primitives import ed25519_public

from ..errors import AttackConfigError
from ._grid import GridOutcome, encoded, node_app, recording_grid, ring_difference, site_configs
from ._relay import RoundConfig, clipped, relative_error, require_client

__all__ = ["Rerun", "RerunConfig", "RerunResult"]

REFUSAL = "ReleaseBindingError"


class RerunConfig(RoundConfig):
    """The round the server runs twice, and whether the nodes restart in between."""

    restart_nodes: bool = Field(
        True, description="the nodes lose their Context.state between the two sessions (a SuperNode restart)"
    )


class RerunResult(GridOutcome):
    """Whether S1 - S2 gave the target's encoded update bit for bit, or how many nodes refused the rerun."""

    attack: ClassVar[str] = "rerun"

    second_session_completed: bool = False


class Rerun:
    """Run the rerun-and-subtract attack against our release binding or the control without one."""

    def __init__(self, config: RerunConfig | None = None) -> None:
        self.config = config or RerunConfig()
        require_client("target", self.config.target, self.config.num_clients)

    def run(self, inputs: Sequence[npt.NDArray[np.floating]], *, defended: bool) -> RerunResult:
        """Run the round twice, the second time without the target, and subtract the sums.

        Args:
            inputs: one update per client (each node returns the same one whenever asked).
            defended: True: the ClientApp names its site state folder (our ClientApp), so the binding
                is on disk; False: no release key, bindings only in Context.state (the control).

        Raises:
            AttackConfigError: wrong number of inputs.
        """
        cfg = self.config
        n, target = cfg.num_clients, cfg.target
        if len(inputs) != n:
            raise AttackConfigError(f"inputs has {len(inputs)} updates; num_clients is {n}")
        encoding = FixedPointEncoding(clip_range=cfg.clip_range, max_parties=n)  # the same in both sessions
        secrets = [os.urandom(32) for _ in range(n)]
        everyone = list(range(n))
        without = [p for p in everyone if p != target]
        with tempfile.TemporaryDirectory(prefix="rerun-") as tmp:
            folder = Path(tmp)
            configs = site_configs(folder, everyone, secrets, None)  # identity keys; the binding is the question
            app = node_app(inputs, release_dir=folder if defended else None)
            grid, errors = recording_grid(app, configs)
            first = _session(grid, secrets, everyone, encoding, len(inputs[0]))
            if cfg.restart_nodes:
                grid, errors = recording_grid(app, configs)  # fresh Context per node; files on disk stay
            try:
                second = _session(grid, secrets, without, encoding, len(inputs[0]))
            except AbortError as exc:
                refused = sorted(node for node, why in errors.items() if any(REFUSAL in w for w in why))
                return RerunResult(
                    defended=defended,
                    aborted=True,
                    recovered=False,
                    masked_input_sent=True,
                    refused_by=refused[0] - 1 if refused else None,
                    refusals=len(refused),
                    refused_with=REFUSAL if refused else "",
                    reason=f"AbortError: {exc}; {len(refused)} of {len(without)} nodes refused with {REFUSAL}",
                )
        difference = ring_difference(encoding, first, second)
        exact = bool(np.array_equal(difference, encoded(encoding, inputs[target], target)))
        estimate = np.asarray(encoding.decode(difference, num_inputs=1).weighted_sum, dtype=np.float64)
        return RerunResult(
            defended=defended,
            aborted=False,
            recovered=exact,
            exact=exact,
            second_session_completed=True,
            masked_input_sent=True,
            relative_error=relative_error(estimate, clipped(inputs[target], cfg.clip_range)),
            reason="S1 - S2 = encode(x_T) bit for bit" if exact else "S1 - S2 differs from encode(x_T)",
            estimate=estimate,
        )


def _session(
    grid: Any, secrets: Sequence[bytes], parties: Sequence[int], encoding: FixedPointEncoding, dimension: int
) -> npt.NDArray[np.unsignedinteger]:
    """One SecAgg+ session for round 1 over `parties` (node p + 1 plays party p's node); the ring sum."""
    from flwr.app import RecordDict

    from secure_fedllm.flower import secure_aggregate

    params = SecAggParams.secagg_plus(
        len(parties),
        dimension=dimension,
        clip_range=encoding.clip_range,
        dropout_rate=0.0,
        encoding=encoding,
        identity_keys=tuple(ed25519_public(secrets[p]) for p in parties),
    )
    done = secure_aggregate(
        grid,
        {p + 1: RecordDict() for p in parties},
        params,
        round_number=1,
        context=b"plan-1",
        train_timeout=0.05,
        stage_timeout=0.05,
        poll_interval=0.001,
    )
    if len(done.aggregate.included) != len(parties):  # a sum over fewer parties is not what S1 - S2 needs
        raise AttackConfigError(
            f"only {len(done.aggregate.included)} of {len(parties)} parties were summed; the attack needs every "
            "node to answer (check the nodes' errors)"
        )
    return np.asarray(done.aggregate.ring_sum)
