"""An in-process Flower `Grid` for tests and notebooks: real ClientApps, no SuperLink, no threads.

Each node is a ClientApp called in this process with its own persistent `Context`, as a SuperNode
would keep it. Every message and reply goes through Flower's own serialisation (`deflate` /
`inflate`), so nothing an actual link could not carry reaches the other side. `silence` makes a node
stop answering from its k-th message of a round on (k = 0 is the round's first message), which is how
tests play dropouts at every protocol stage. It demonstrates the protocol; it gives no secrecy, since
every party lives in one process.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.proto.message_pb2 import Message as ProtoMessage
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

__all__ = ["LocalGrid"]


class LocalGrid(Grid):
    """A `flwr.serverapp.Grid` that delivers messages to in-process ClientApps.

    Args:
        client_app: the ClientApp every node runs.
        node_configs: one node_config per node (node ids 1..N).
        silence: node id -> index of the first message of each round it no longer answers.
    """

    def __init__(
        self,
        client_app: ClientApp,
        node_configs: Iterable[Mapping[str, Any]],
        *,
        silence: Mapping[int, int] | None = None,
        run_id: int = 1,
    ) -> None:
        self.client_app = client_app
        self.run_id = run_id
        self.contexts = {
            node: Context(run_id=run_id, node_id=node, node_config=dict(cfg), state=RecordDict(), run_config={})
            for node, cfg in enumerate(node_configs, start=1)
        }
        self.silence = dict(silence or {})
        self._seen: dict[tuple[int, str], int] = {}
        self._ids = itertools.count(1)
        self._replies: dict[str, Message] = {}
        self._run = Run.create_empty(run_id)
        if TaskIdentity._run_id is None:  # outside a ServerApp process: act as one, so Message() works
            TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run_id, SUPERLINK_NODE_ID

    # -- the Grid interface ----------------------------------------------------------------------
    def set_run(self, run: Run) -> None:
        """Set the run (Flower's ServerApp runner calls this)."""
        self._run = run

    @property
    def run(self) -> Run:
        """The run this grid serves."""
        return self._run

    def create_message(
        self, content: Any, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        """Build an instruction message (deprecated in Flower; kept for the interface)."""
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        """The in-process nodes' ids (1..N)."""
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Deliver each message now; a silenced node keeps its reply."""
        ids = []
        for message in messages:
            node = message.metadata.dst_node_id
            if node not in self.contexts:
                ids.append("")
                continue
            mid = f"m{next(self._ids)}"
            message.metadata.__dict__["_message_id"] = mid
            ids.append(mid)
            key = (node, message.metadata.group_id)
            index = self._seen.get(key, 0)
            self._seen[key] = index + 1
            if index >= self.silence.get(node, 1 << 30):
                continue  # the node went silent: no reply, ever
            delivered = _wire_copy(message)
            try:
                reply = self.client_app(delivered, self.contexts[node])
            except Exception as exc:  # as a SuperNode does: the server sees an error reply, not a crash
                reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=repr(exc)), reply_to=delivered)
            self._replies[mid] = _wire_copy(reply)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Replies that have arrived for these ids (each is returned once)."""
        return [self._replies.pop(mid) for mid in message_ids if mid in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push then pull (every reply that will ever arrive is already there)."""
        return self.pull_messages(self.push_messages(list(messages)))


def _wire_copy(message: Message) -> Message:
    """What the other end of a link receives: the message serialised to protobuf bytes and parsed again."""
    wire = message_to_proto(message).SerializeToString()
    return message_from_proto(ProtoMessage.FromString(wire))
