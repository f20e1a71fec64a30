"""Shared plumbing of the malicious-server attacks on Flower nodes: real ClientApps behind our Mod.

Where `_relay` drives `SecAggClient` sessions directly, these attacks (rerun, downgrade,
sybil_roster) put every honest party behind Flower: a `LocalGrid` node running a ClientApp with
`secure_aggregation_mod`, so what refuses or gives in is the Mod as a SuperNode runs it, with its
site policy, identity key and release bindings read from node config. The server is ours to bend:
`GridServer` sends the setup and protocol records itself and may run sessions of its own (Sybils)
beside the real nodes. Every error reply is kept with its node, so a test can tell "the defense
fired" (a typed refusal) from "the attack broke".

Flower is an optional extra: it is imported inside functions only, so importing
`threat_models.attacks` does not need it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import numpy.typing as npt
from pydantic import Field

from protocols import (
    FixedPointEncoding,
    ProtocolError,
    SecAggClient,
    SecAggParams,
    SecAggServer,
    SecurityPolicy,
    decode_message,
    encode_message,
)
from protocols.primitives import LABEL_PAIRWISE_MASK, MaskAccumulator, derive_key, reconstruct, ring_dtype, x25519_agree
from protocols.secagg import AdvertiseKeys, MaskedInput
from secure_fedllm.flower import INPUT_RECORD, PROTOCOL_RECORD, STEP, RoundSetup
from secure_fedllm.site import SitePolicy

from ..results import MatrixRow
from ._relay import Outcome

if TYPE_CHECKING:
    from flwr.app import RecordDict
    from flwr.clientapp import ClientApp

    from secure_fedllm.flower import LocalGrid

__all__ = [
    "GridOutcome",
    "GridServer",
    "encoded",
    "node_app",
    "recording_grid",
    "ring_difference",
    "rounding_seed",
    "site_configs",
    "strip_target",
]

ROUND = 5
"""The round number every attack's sessions run under (any value works; it only has to match)."""
PLAN = b"plan"
"""The round context the server announces."""


class GridOutcome(Outcome):
    """What each attack on Flower nodes reports: the target's update recovered exactly, or who refused with what.

    `recovered` means the server holds the target's encoded update bit for bit (`exact`); the
    decoded vector is in `estimate` and its error against the clipped input in `relative_error`.
    """

    attack: ClassVar[str] = ""

    exact: bool = Field(False, description="the recovered ring vector equals encode(x_T) bit for bit")
    refusals: int = Field(0, description="honest nodes that refused with `refused_with`")
    refused_with: str = Field("", description="the error type the nodes refused with, e.g. InsecureParameterError")

    def rows(self) -> list[MatrixRow]:
        """Matrix rows: 1 if the target's update was recovered exactly (chance 0), and 1 if nodes refused."""
        return [
            MatrixRow(attack=self.attack, metric="target_recovered", value=float(self.recovered), chance=0),
            MatrixRow(attack=self.attack, metric="refused", value=float(self.refusals > 0)),
        ]


def rounding_seed(party: int) -> bytes:
    """A client's stochastic-rounding seed (fixed, so a test can encode x_T exactly as the client did)."""
    return hashlib.sha256(b"threat_models/rounding|%d" % party).digest()


def encoded(encoding: FixedPointEncoding, x: npt.NDArray[np.floating], party: int) -> npt.NDArray[np.unsignedinteger]:
    """Party `party`'s update as its Mod encodes it (weight 1, its rounding seed): what x_T means exactly."""
    return encoding.encode(np.asarray(x, dtype=np.float64), weight=1.0, rounding_seed=rounding_seed(party))


def ring_difference(
    encoding: FixedPointEncoding, a: npt.NDArray[np.unsignedinteger], b: npt.NDArray[np.unsignedinteger]
) -> npt.NDArray[np.unsignedinteger]:
    """The difference a - b in the ring Z_(2^ring_bits), in the ring's dtype."""
    dtype = ring_dtype(encoding.ring_bits)
    diff = a.astype(dtype) - b.astype(dtype)  # wraps mod 2^(8 * itemsize)
    bits = 8 * dtype.itemsize
    if encoding.ring_bits < bits:
        diff &= dtype.type((1 << encoding.ring_bits) - 1)
    return diff


def node_app(inputs: Sequence[npt.NDArray[np.floating]], *, release_dir: Path | None = None) -> ClientApp:
    """A ClientApp that returns `inputs[partition-id]` whenever asked: a deterministic re-run of local training.

    With `release_dir` it hands the Mod a release as our ClientApp does (a secret release key for
    this job and round, and the site's state folder `release_dir/site<i>`, where the binding is kept
    on disk); without it the Mod keys the release itself and keeps the binding in `Context.state`.
    """
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    from secure_fedllm.flower import secure_aggregation_mod

    app = ClientApp(mods=[secure_aggregation_mod])

    @app.train()
    def train(msg: Message, ctx: Context) -> Message:
        i = int(str(ctx.node_config["partition-id"]))
        extra: dict[str, Any] = {"rounding_seed": rounding_seed(i)}
        if release_dir is not None:
            extra.update(
                release_key=hashlib.sha256(b"threat_models/release|%d" % i).digest(),
                release_job="job",
                release_round=ROUND,
                site_state=str(release_dir / f"site{i}"),
            )
        content: dict[str, Any] = {
            "arrays": ArrayRecord([np.asarray(inputs[i], dtype=np.float64)]),
            "metrics": MetricRecord({"num-examples": 1.0}),
            INPUT_RECORD: ConfigRecord(extra),
        }
        return Message(RecordDict(content), reply_to=msg)

    return app


def site_configs(
    folder: Path,
    parties: Sequence[int],
    secrets: Sequence[bytes] | None,
    policy: SecurityPolicy | None,
) -> list[dict[str, Any]]:
    """Node configs for `parties`: a site policy file each (with `policy`), else a bare identity key file, or nothing.

    `secrets[p]` is party p's Ed25519 private key; the files go to `folder`.
    """
    configs: list[dict[str, Any]] = []
    for p in parties:
        config: dict[str, Any] = {"partition-id": p}
        key_file = folder / f"id{p}.key"
        if secrets is not None:
            key_file.write_text(secrets[p].hex())
        if policy is not None:
            site = SitePolicy(security=policy, identity_key=key_file.name if secrets is not None else None)
            site.to_file(folder / f"site{p}.toml")
            config["site-policy"] = str(folder / f"site{p}.toml")
        elif secrets is not None:
            config["secagg-identity-key"] = str(key_file)
        configs.append(config)
    return configs


def recording_grid(app: ClientApp, configs: Sequence[Mapping[str, Any]]) -> tuple[LocalGrid, dict[int, list[str]]]:
    """A LocalGrid (nodes 1..N) and, filled as replies arrive, node id -> the reasons of its error replies.

    `secure_aggregate` raises on an aborted session before it hands back the failures; this keeps them.
    """
    from flwr.app import Message

    from secure_fedllm.flower import LocalGrid

    errors: dict[int, list[str]] = {}

    class RecordingGrid(LocalGrid):
        def pull_messages(self, message_ids: Any) -> list[Message]:
            replies = list(super().pull_messages(message_ids))
            for reply in replies:
                if reply.has_error():
                    errors.setdefault(reply.metadata.src_node_id, []).append(str(reply.error.reason))
            return replies

    return RecordingGrid(app, configs), errors


class GridServer:
    """A server that may deviate: real nodes for some parties, sessions of its own for the others.

    It drives the real `SecAggServer` for the bookkeeping and sends our setup and step records to
    the nodes itself, so it can announce any parameters, show different parties different messages
    and run Sybil parties in process.

    Args:
        grid: the nodes.
        params: what the server announces.
        nodes: party id -> node id of the parties played by real nodes.
        own: party id -> the server's own client session (a Sybil).
        session: the 16-byte session id.
    """

    def __init__(
        self,
        grid: LocalGrid,
        params: SecAggParams,
        nodes: Mapping[int, int],
        own: Mapping[int, SecAggClient],
        session: bytes,
    ) -> None:
        self.grid, self.params, self.nodes, self.own, self.session = grid, params, dict(nodes), dict(own), session
        self.server = SecAggServer(params, session=session, round_number=ROUND, context=PLAN)
        self.seen: dict[type, dict[int, Any]] = {}
        self.failures: dict[int, str] = {}
        """Node id (or minus the party id, for the server's own sessions) -> why it failed."""

    def setup(self) -> None:
        """Send every node its setup (it trains and answers with its keys) and deliver all keys."""
        from flwr.app import ConfigRecord, RecordDict

        contents = {
            node: RecordDict(
                {PROTOCOL_RECORD: ConfigRecord(RoundSetup(self.params, p, self.session, ROUND, PLAN).to_record())}
            )
            for p, node in self.nodes.items()
        }
        replies = self._collect(contents)
        replies.update({p: client.advertise_keys() for p, client in self.own.items()})
        self._deliver(replies)

    def send(self, outgoing: Sequence[tuple[int, Any]]) -> dict[int, Any]:
        """Deliver each (party, message); return party -> reply (real nodes over the grid)."""
        from flwr.app import ConfigRecord, RecordDict

        contents = {
            self.nodes[p]: RecordDict({PROTOCOL_RECORD: ConfigRecord({"stage": STEP, "payload": encode_message(m)})})
            for p, m in outgoing
            if p in self.nodes
        }
        replies = self._collect(contents)
        replies.update({p: self.own[p].handle(m) for p, m in outgoing if p in self.own})
        return replies

    def run(self, *, until: type | None = None) -> list[tuple[int, Any]]:
        """Relay honestly; stop before sending a stage of type `until` and return it ([] at the end).

        Raises:
            AbortError: the server's session aborted (too few parties left).
        """
        while outgoing := self.server.close_stage():
            if until is not None and isinstance(outgoing[0][1], until):
                return outgoing
            self._deliver(self.send(outgoing))
        return []

    def refusals(self, error: str) -> list[int]:
        """The nodes whose failure is a refusal with `error` (an error type name)."""
        return sorted(node for node, why in self.failures.items() if node > 0 and why.startswith(f"{error}: "))

    def _collect(self, contents: Mapping[int, RecordDict]) -> dict[int, Any]:
        from flwr.app import Message

        party_of = {node: p for p, node in self.nodes.items()}
        messages = [
            Message(content, dst_node_id=node, message_type="train", group_id=str(ROUND))
            for node, content in contents.items()
        ]
        out: dict[int, Any] = {}
        for reply in self.grid.send_and_receive(messages, timeout=5.0):
            node = reply.metadata.src_node_id
            if reply.has_error():
                self.failures[node] = str(reply.error.reason)
                continue
            payload = reply.content.config_records[PROTOCOL_RECORD]["payload"]
            out[party_of[node]] = decode_message(bytes(payload))  # type: ignore[arg-type]
        for node in contents:
            if node not in self.failures and party_of[node] not in out:
                self.failures[node] = "no reply"
        return out

    def _deliver(self, replies: Mapping[int, Any]) -> None:
        for p, message in replies.items():
            self.seen.setdefault(type(message), {})[p] = message
            try:
                self.server.receive(message)
            except ProtocolError as exc:
                self.failures[self.nodes.get(p, -p)] = f"{type(exc).__name__}: {exc}"


def strip_target(
    server: GridServer,
    target: int,
    self_mask_shares: Mapping[int, bytes],
    mask_key_shares: Mapping[int, bytes],
) -> npt.NDArray[np.unsignedinteger]:
    """Remove every mask from the target's masked input, given t shares of each of its two secrets.

    The target's mask key (rebuilt from `mask_key_shares`) and each neighbour's advertised mask
    public key give every pairwise seed; `self_mask_shares` give its self-mask seed. What is left
    is encode(x_T).
    """
    params = server.params
    t = params.threshold
    adverts: dict[int, AdvertiseKeys] = server.seen[AdvertiseKeys]
    mask_sk = reconstruct(dict(mask_key_shares), t)
    plus: list[bytes] = []
    minus = [reconstruct(dict(self_mask_shares), t)]
    for peer in sorted(server.server.graph.neighbours_of(target)):
        secret = x25519_agree(mask_sk, adverts[peer].mask_public_key)
        lo, hi = min(target, peer), max(target, peer)
        seed = derive_key(secret, label=LABEL_PAIRWISE_MASK, transcript=server.server.transcript, a=lo, b=hi)
        (minus if target < peer else plus).append(seed)  # undo what the target added or subtracted
    masked: MaskedInput = server.seen[MaskedInput][target]
    vector = np.frombuffer(masked.data, dtype=ring_dtype(params.encoding.ring_bits)).copy()
    MaskAccumulator(params.encoding.ring_bits).apply(vector, plus=plus, minus=minus)
    return vector
