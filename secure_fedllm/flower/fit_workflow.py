"""The legacy-API surface: a `fit_workflow` for Flower's `DefaultWorkflow`, a drop-in for `SecAggPlusWorkflow`.

    workflow = DefaultWorkflow(fit_workflow=SecureFitWorkflow(num_shares=..., reconstruction_threshold=...))
    app = ClientApp(client_fn=client_fn, mods=[secure_aggregation_mod])   # instead of secaggplus_mod

Same knobs where they mean the same thing: `num_shares` (holders of each secret, the client itself
included; an int, or a float fraction of the sampled clients), `reconstruction_threshold` (an int, or
a float fraction of `num_shares`), `max_weight`, `clipping_range` and `timeout` (per stage). The
differences, on purpose:

* Both may be left out (the default): we then derive (k, t) from the sampled n and the assumed
  `dropout_rate` and `corrupt_fraction` (Bell et al. 2020 bounds), which Flower leaves to the user.
* Parameters that miss the 2^-40 security or correctness bound are refused with
  `protocols.InsecureParameterError` naming the fix, instead of a log warning; `allow_insecure=True`
  runs them anyway, and each SuperNode must agree (node_config `secagg-allow-insecure`).
* `num_shares` - 1 neighbours must be even on a sparse graph: an even count is rounded up.
* Quantisation: `ring_bits` (32 or 64) replaces `quantization_range` / `modulus_range`; the ring is
  sized so n_max weighted inputs cannot wrap, and rounding is stochastic and unbiased.
* Masks come from AES-CTR keyed by X25519 + HKDF, not numpy's Mersenne Twister from a 32-bit seed;
  shares are AES-GCM encrypted and, with `malicious=True`, every message is Ed25519-signed and the
  survivor set is agreed before anything is unmasked (the malicious-server setting).
* The server never ships identity keys of its own: with `malicious=True` it asks each sampled node
  for its public key (`collect_identity_keys`) and lists those; every node checks each listed key
  against the roster pinned in its own site policy (node_config `site-policy`) and refuses a key it
  did not pin, a missing key list, or parameters weaker than its policy derives. `policy` (the
  sites' `SecurityPolicy`) makes the server announce exactly what the sites derive.
* Training runs in the first message, not the third; a client that fails or times out before its
  masked input arrives is simply not in the sum.

As in Flower, the strategy's `aggregate_fit` receives one `FitRes` per included client, each holding
the securely aggregated mean (so FedAvg returns it unchanged), with that client's metrics and
example count. The mean comes back in the model's own float dtypes (a float32 model stays float32).
"""

from __future__ import annotations

from collections.abc import Mapping
from logging import INFO, WARNING
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from protocols import AbortError, FixedPointEncoding, SecAggParams, SecurityPolicy

from .grid_round import collect_identity_keys, secure_aggregate
from .records import npy_layout, split_vector

if TYPE_CHECKING:
    from flwr.app import Context
    from flwr.serverapp import Grid

__all__ = ["SecureFitWorkflow"]


class SecureFitWorkflow:
    """Our SecAgg / SecAgg+ as the fit step of Flower's `DefaultWorkflow`.

    Args:
        num_shares: holders of each secret (itself included); None derives it from n.
        reconstruction_threshold: shares needed to rebuild a secret; None derives it.
        max_weight: largest `num_examples` a client may report (weights are folded in before masking).
        clipping_range: each coordinate is clipped to [-clipping_range, clipping_range].
        ring_bits: 32 or 64.
        dropout_rate, corrupt_fraction: the assumptions the derived (k, t) and the bounds use.
        malicious: ask every sampled node for its identity key and run the malicious-server setting
            (signatures and the consistency round); nodes verify the keys against their own rosters.
        policy: the sites' security policy: when given, (k, t) and the assumptions come from
            `policy.derive` (what each site will accept) instead of the knobs above.
        timeout: seconds per protocol stage (default 120); `train_timeout` for the first, training,
            stage (default 3600). Unlike Flower's None, a silent node never blocks a round forever.
        allow_insecure: run parameters below the security bound (nodes must agree too).
    """

    def __init__(
        self,
        num_shares: int | float | None = None,
        reconstruction_threshold: int | float | None = None,
        *,
        max_weight: float = 1000.0,
        clipping_range: float = 8.0,
        ring_bits: int = 32,
        dropout_rate: float = 0.1,
        corrupt_fraction: float = 0.05,
        malicious: bool = False,
        policy: SecurityPolicy | None = None,
        timeout: float | None = None,
        train_timeout: float | None = None,
        allow_insecure: bool = False,
    ) -> None:
        if (num_shares is None) != (reconstruction_threshold is None):
            raise ValueError("give both num_shares and reconstruction_threshold, or neither (derived from n)")
        if isinstance(num_shares, float) and not 0 < num_shares <= 1:
            raise ValueError(f"num_shares={num_shares} as a fraction must lie in (0, 1]")
        if isinstance(reconstruction_threshold, float) and not 0 < reconstruction_threshold <= 1:
            raise ValueError(f"reconstruction_threshold={reconstruction_threshold} as a fraction must lie in (0, 1]")
        if max_weight <= 0 or clipping_range <= 0:
            raise ValueError("max_weight and clipping_range must be positive")
        self.num_shares, self.reconstruction_threshold = num_shares, reconstruction_threshold
        self.max_weight, self.clipping_range, self.ring_bits = max_weight, clipping_range, ring_bits
        self.dropout_rate, self.corrupt_fraction = dropout_rate, corrupt_fraction
        self.malicious, self.policy = malicious, policy
        self.timeout, self.train_timeout, self.allow_insecure = timeout, train_timeout, allow_insecure

    def params_for(
        self, nodes: list[int], dimension: int, identity_keys: Mapping[int, bytes] | None = None
    ) -> SecAggParams:
        """The round's public parameters for the sampled `nodes` (sorted) and the flat model size.

        `identity_keys` (node id -> public key) are the keys the nodes themselves reported.
        """
        n = len(nodes)
        encoding = FixedPointEncoding(
            clip_range=self.clipping_range,
            max_parties=n,
            ring_bits=self.ring_bits,  # type: ignore[arg-type]
            max_weight=self.max_weight,
        )
        keys = None
        if identity_keys is not None:
            missing = [nid for nid in nodes if nid not in identity_keys]
            if missing:
                raise ValueError(f"identity_keys has no key for sampled nodes {missing}")
            keys = tuple(identity_keys[nid] for nid in nodes)
        if self.policy is not None:
            return self.policy.derive(n, dimension=dimension, encoding=encoding, identity_keys=keys)
        common: dict[str, Any] = {
            "dimension": dimension,
            "clip_range": self.clipping_range,
            "encoding": encoding,
            "dropout_rate": self.dropout_rate,
            "corrupt_fraction": self.corrupt_fraction,
            "identity_keys": keys,
            "allow_insecure": self.allow_insecure,
        }
        if self.num_shares is None:
            return SecAggParams.secagg_plus(n, **common)
        shares = round(self.num_shares * n) if isinstance(self.num_shares, float) else self.num_shares
        k = min(max(shares - 1, 2), n - 1)
        if k < n - 1 and k % 2:
            k += 1
        k = min(k, n - 1)
        t_raw = self.reconstruction_threshold
        t = max(2, round(t_raw * (k + 1))) if isinstance(t_raw, float) else int(cast(int, t_raw))
        if k == n - 1:
            return SecAggParams.secagg(n, threshold=t, **common)
        return SecAggParams.secagg_plus(n, neighbours=k, threshold=t, **common)

    def __call__(self, grid: Grid, context: Context) -> None:
        """Run one fit round: configure_fit, secure aggregation, aggregate_fit, history."""
        import flwr.compat.common.recorddict_compat as compat
        from flwr.app import ArrayRecord
        from flwr.common import FitRes, ndarrays_to_parameters
        from flwr.server.compat.legacy_context import LegacyContext
        from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
        from flwr.server.workflow.constant import Key as WorkflowKey
        from flwr.supercore import log

        if not isinstance(context, LegacyContext):
            raise TypeError(f"SecureFitWorkflow needs a LegacyContext, got {type(context).__name__}")
        current_round = int(cast(int, context.state.config_records[MAIN_CONFIGS_RECORD][WorkflowKey.CURRENT_ROUND]))
        parameters = compat.arrayrecord_to_parameters(context.state.array_records[MAIN_PARAMS_RECORD], keep_input=True)
        chosen = context.strategy.configure_fit(current_round, parameters, context.client_manager)
        if len(chosen) < 3:
            log(WARNING, "secure aggregation needs at least 3 sampled clients, got %s; round skipped", len(chosen))
            return
        proxies = {proxy.node_id: proxy for proxy, _ in chosen}
        instructions = {proxy.node_id: compat.fitins_to_recorddict(fitins, True) for proxy, fitins in chosen}
        layouts = [_layout(t, parameters.tensor_type) for t in parameters.tensors]  # headers only, no copy
        shapes, dtypes = [shape for shape, _ in layouts], [dtype for _, dtype in layouts]
        keys = None
        if self.malicious:  # the keys come from the nodes, never from the server's own configuration
            keys, unidentified = collect_identity_keys(
                grid, sorted(instructions), timeout=self.timeout if self.timeout is not None else 120.0
            )
            for node, why in unidentified.items():
                log(WARNING, "node %s gave no identity key and sits this round out: %s", node, why)
                del instructions[node]
            if len(instructions) < 3:
                log(WARNING, "only %s sampled clients gave identity keys; round skipped", len(instructions))
                return
        params = self.params_for(sorted(instructions), int(sum(np.prod(s, dtype=np.int64) for s in shapes)), keys)
        log(INFO, "secure aggregation: %s clients, k=%s, t=%s", params.num_parties, params.neighbours, params.threshold)
        try:
            outcome = secure_aggregate(
                grid,
                instructions,
                params,
                round_number=current_round,
                train_timeout=self.train_timeout if self.train_timeout is not None else 3600.0,
                stage_timeout=self.timeout if self.timeout is not None else 120.0,
            )
        except AbortError as exc:
            log(WARNING, "secure aggregation aborted, nothing revealed: %s", exc)
            return
        aggregated = ndarrays_to_parameters(split_vector(outcome.mean(), shapes, dtypes))  # the model's own dtypes
        results = []
        for node in outcome.included_nodes:
            content = outcome.replies[node]
            content["fitres.parameters"] = ArrayRecord()  # placeholder; replaced by the aggregate below
            fitres: FitRes = compat.recorddict_to_fitres(content, keep_input=True)
            fitres.parameters = aggregated
            results.append((proxies[node], fitres))
        failures: list[Any] = [RuntimeError(f"node {n}: {why}") for n, why in outcome.failures.items()]
        log(INFO, "aggregate_fit: received %s results and %s failures", len(results), len(failures))
        params_aggregated, metrics = context.strategy.aggregate_fit(current_round, results, failures)
        if params_aggregated:
            context.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(params_aggregated, True)
            context.history.add_metrics_distributed_fit(server_round=current_round, metrics=metrics)


def _layout(tensor: bytes, tensor_type: str) -> tuple[tuple[int, ...], np.dtype[Any]]:
    """Shape and dtype of one model tensor, from its `.npy` header when it has one (the rest is not read)."""
    from flwr.common import bytes_to_ndarray
    from flwr.common.constant import SType

    if tensor_type == SType.NUMPY:
        shape, dtype, _, _ = npy_layout(tensor)
        return shape, dtype
    array = bytes_to_ndarray(tensor)
    return array.shape, array.dtype
