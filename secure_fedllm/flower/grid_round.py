"""The ServerApp side for Flower's Message API: one securely aggregated round over a `Grid`.

`secure_aggregate(grid, instructions, family, ...)` sends each node its instruction plus our setup
(the family's name and parameters), then plays the family's server session (`family.server(...)`:
SecAgg, SecAgg+, HE-BFV, HE-CKKS or the plaintext control) over `grid.push_messages` /
`grid.pull_messages`, each stage with its own timeout. A node that answers with an error, answers as
another party, sends a malformed message or stays silent past the timeout is a dropout for the
protocol; the round aborts (with `protocols.AbortError`, nothing revealed) only when fewer than the
threshold remain. The server never holds an individual update: replies carry masked vectors,
ciphertexts and key material only (except for the plaintext control, which a site must choose).

Time and sleeping are passed in (`clock`, `sleep`), as in `protocols`; the session id is public.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from protocols import (
    AbortError,
    AggregateResult,
    HEFamily,
    ProtocolError,
    SecAggFamily,
    SecAggParams,
    SignedRoster,
)
from protocols.he import HEParams

from .records import IDENTIFY, PROTOCOL_RECORD, STEP, FlowerIntegrationError, RoundFamily, RoundSetup, config_record

if TYPE_CHECKING:
    from flwr.app import Message, RecordDict
    from flwr.serverapp import Grid

__all__ = ["GridRoundAbortedError", "GridRoundResult", "collect_identity_keys", "secure_aggregate"]


class GridRoundAbortedError(AbortError):
    """The round aborted (nothing revealed); `failures` names each node that failed and why."""

    def __init__(self, message: str, *, failures: dict[int, str]) -> None:
        super().__init__(message)
        self.failures = failures


@dataclass
class GridRoundResult:
    """What the server learned (the sum over `included`), who dropped and why, and what it cost."""

    aggregate: AggregateResult
    party_nodes: tuple[int, ...]
    replies: dict[int, RecordDict] = field(default_factory=dict)
    failures: dict[int, str] = field(default_factory=dict)
    stage_seconds: list[float] = field(default_factory=list)
    server_seconds: float = 0.0
    upload_bytes: dict[int, int] = field(default_factory=dict)
    download_bytes: dict[int, int] = field(default_factory=dict)

    @property
    def included_nodes(self) -> list[int]:
        """Node ids whose updates are in the sum."""
        return [self.party_nodes[p] for p in self.aggregate.included]

    def mean(self) -> npt.NDArray[np.float64]:
        """The weighted mean of the included updates (sum(w x) / sum(w))."""
        return self.aggregate.decoded.mean()


def secure_aggregate(
    grid: Grid,
    instructions: Mapping[int, RecordDict],
    params: RoundFamily | SecAggParams | HEParams,
    *,
    round_number: int,
    context: bytes = b"",
    session: bytes | None = None,
    message_type: str = "train",
    train_timeout: float | None = 3600.0,
    stage_timeout: float = 120.0,
    poll_interval: float = 0.05,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    signed_roster: SignedRoster | None = None,
) -> GridRoundResult:
    """Run one round: train on every node in `instructions`, then securely sum their updates.

    Args:
        grid: the ServerApp's Grid.
        instructions: node id -> the content its ClientApp gets (model, config); party ids follow
            the sorted node ids. Its size must equal the family's `num_parties`.
        params: the round's session family (`secure_fedllm.federation.aggregation.round_family`), or
            bare `SecAggParams` / `HEParams` (SecAgg(+) / HE family); `dimension` is the flat size of
            each update.
        round_number: the round (bound into every key and signature; never reuse one per session).
        context: bytes every party binds (e.g. a digest of the round's plan and model).
        session: 16-byte public session id (random when omitted).
        message_type: the Flower message type the ClientApp's mod intercepts.
        train_timeout: seconds to wait for the first replies (local training happens there).
        stage_timeout: seconds to wait for each later protocol stage.
        poll_interval: seconds between two pulls while replies are missing.
        clock: the host's monotonic clock (tests pass a fake).
        sleep: the host's sleep (tests pass a fake).
        signed_roster: a roster authority's signed roster, relayed to sites that trust the authority.

    Raises:
        FlowerIntegrationError: `instructions` and `params` disagree.
        AbortError: too few nodes finished; nothing was revealed.
    """
    from flwr.app import ConfigRecord, RecordDict

    family = _family(params)
    if family.reveals_to_client:
        raise FlowerIntegrationError(f"family {family.name!r} releases nothing to the server; it cannot update a model")
    nodes = tuple(sorted(instructions))
    if len(nodes) != family.num_parties:
        raise FlowerIntegrationError(
            f"instructions name {len(nodes)} nodes but params.num_parties is {family.num_parties}; "
            "build the params for the nodes you sample"
        )
    session = session if session is not None else os.urandom(16)
    party_of = {node: party for party, node in enumerate(nodes)}
    server = family.server(session=session, round_number=round_number, context=context)
    out = GridRoundResult(
        aggregate=None,  # type: ignore[arg-type]  # set below
        party_nodes=nodes,
        upload_bytes=dict.fromkeys(nodes, 0),
        download_bytes=dict.fromkeys(nodes, 0),
    )
    exchange = _Exchange(grid, message_type, str(round_number), poll_interval, clock, sleep)

    first = {}
    for node, instruction in instructions.items():
        setup = RoundSetup(family.params, party_of[node], session, round_number, context, signed_roster, family.name)
        content = RecordDict(dict(instruction.items()))
        content[PROTOCOL_RECORD] = ConfigRecord(setup.to_record())
        first[node] = content
    timeout = train_timeout
    while first:
        t = clock()
        replies = exchange.run(first, timeout, out.failures)
        out.stage_seconds.append(clock() - t)
        t = time.perf_counter()
        for node, reply in replies.items():
            payload = _payload(reply, node, out.failures)
            if payload is None:
                continue
            out.upload_bytes[node] += len(payload)
            if not out.replies.get(node):
                out.replies[node] = RecordDict({k: v for k, v in reply.content.items() if k != PROTOCOL_RECORD})
            try:
                message = family.decode(payload)
                if message.sender != party_of[node]:
                    raise FlowerIntegrationError(f"node {node} is party {party_of[node]} but wrote as {message.sender}")
                server.receive(message)
            except (ProtocolError, FlowerIntegrationError) as exc:
                out.failures[node] = f"{type(exc).__name__}: {exc}"
        try:
            outgoing = server.close_stage()
        except AbortError as exc:  # too few remain: say who failed and why, not only the count
            raise GridRoundAbortedError(str(exc), failures=dict(out.failures)) from exc
        first = {}
        for party, message in outgoing:
            wire = family.encode(message)
            out.download_bytes[nodes[party]] += len(wire)
            first[nodes[party]] = RecordDict({PROTOCOL_RECORD: ConfigRecord({"stage": STEP, "payload": wire})})
        out.server_seconds += time.perf_counter() - t
        timeout = stage_timeout
    out.aggregate = server.result()
    return out


def _family(params: RoundFamily | SecAggParams | HEParams) -> RoundFamily:
    if isinstance(params, SecAggParams):
        return SecAggFamily(params)
    if isinstance(params, HEParams):
        return HEFamily(params)
    return params


def collect_identity_keys(
    grid: Grid,
    nodes: Sequence[int],
    *,
    message_type: str = "train",
    timeout: float = 120.0,
    poll_interval: float = 0.05,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> tuple[dict[int, bytes], dict[int, str]]:
    """Ask each node for its public identity key (the `identify` stage of `secure_aggregation_mod`).

    The server lists these keys in the round's parameters; it never supplies keys of its own, and
    every node checks each listed key against the roster it pinned itself, so a key the server made
    up (a Sybil) is refused by every honest node.

    Returns:
        node -> its 32-byte Ed25519 public key, and node -> why it gave none.
    """
    from flwr.app import ConfigRecord, RecordDict

    failures: dict[int, str] = {}
    exchange = _Exchange(grid, message_type, "identify", poll_interval, clock, sleep)
    contents = {node: RecordDict({PROTOCOL_RECORD: ConfigRecord({"stage": IDENTIFY})}) for node in nodes}
    keys: dict[int, bytes] = {}
    for node, reply in exchange.run(contents, timeout, failures).items():
        if reply.has_error():
            failures[node] = f"error reply: {reply.error.reason}"
            continue
        record = config_record(reply.content, PROTOCOL_RECORD)
        key = None if record is None else record.get("identity_public_key")
        if not isinstance(key, bytes) or len(key) != 32:
            failures[node] = "no 32-byte identity_public_key in the identify reply"
            continue
        keys[node] = key
    return keys, failures


def _payload(reply: Message, node: int, failures: dict[int, str]) -> bytes | None:
    if reply.has_error():
        failures[node] = f"error reply: {reply.error.reason}"
        return None
    record = config_record(reply.content, PROTOCOL_RECORD)
    if record is None or not isinstance(record.get("payload"), bytes):
        failures[node] = f"reply without {PROTOCOL_RECORD}.payload: is secure_aggregation_mod in the ClientApp's mods?"
        return None
    return bytes(record["payload"])  # type: ignore[arg-type]


class _Exchange:
    """One stage: push a message per node, pull replies until all are in or the timeout passes."""

    def __init__(
        self,
        grid: Grid,
        message_type: str,
        group_id: str,
        poll_interval: float,
        clock: Callable[[], float],
        sleep: Callable[[float], None],
    ) -> None:
        self.grid, self.message_type, self.group_id = grid, message_type, group_id
        self.poll_interval, self.clock, self.sleep = poll_interval, clock, sleep

    def run(
        self, contents: Mapping[int, RecordDict], timeout: float | None, failures: dict[int, str]
    ) -> dict[int, Message]:
        from flwr.app import Message

        messages = [
            Message(content, dst_node_id=node, message_type=self.message_type, group_id=self.group_id)
            for node, content in contents.items()
        ]
        ids = list(self.grid.push_messages(messages))
        pending = {mid: node for mid, node in zip(ids, contents, strict=True) if mid}
        for node in set(contents) - set(pending.values()):
            failures[node] = "the SuperLink refused the message (node offline?)"
        replies: dict[int, Message] = {}
        deadline = None if timeout is None else self.clock() + timeout
        while pending:
            for reply in self.grid.pull_messages(list(pending)):
                node = pending.pop(reply.metadata.reply_to_message_id, None)
                if node is not None:
                    replies[node] = reply
            if not pending or (deadline is not None and self.clock() >= deadline):
                break
            left = self.poll_interval if deadline is None else min(self.poll_interval, deadline - self.clock())
            self.sleep(max(left, 0.0))
        for node in pending.values():
            failures[node] = f"no reply within {timeout} s"
        return replies
