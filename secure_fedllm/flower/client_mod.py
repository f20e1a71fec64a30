"""The ClientApp side: a Flower Mod that turns a train reply into our protocol's messages.

Drop-in for Flower's `secaggplus_mod`: put `secure_aggregation_mod` in a ClientApp's `mods`. Messages
without our `PROTOCOL_RECORD` pass through untouched, so the same ClientApp serves plain rounds too.

The round's first message (stage `setup`) carries the ClientApp's own instruction plus our setup:
the mod runs the ClientApp (training), takes the update out of its reply, encodes it into a fresh
`SecAggClient` session and answers with `AdvertiseKeys` plus the reply's metrics, never its arrays.
Later messages carry one protocol message each; the mod restores the session from `Context.state`,
handles the message, persists the new state and only then returns the reply, so a ClientApp process
that dies between two messages never rolls a session back (`min_stage`).

What the node decides for itself, not the server: whether parameters below our security bound
(`allow_insecure`) are acceptable (node_config `secagg-allow-insecure`, default false), and its
Ed25519 identity key for the malicious-server setting (node_config `secagg-identity-key`, a file of
64 hex digits), which must be the key the parameters list at its party index.

Any protocol error ends the session: the secrets are dropped and the reply is a Flower error, which
the server counts as a dropout.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING, Any

from protocols import ClientState, ProtocolError, SecAggClient, SecretSource, decode_message, encode_message

from .records import PROTOCOL_RECORD, SETUP, STATE_RECORD, FlowerIntegrationError, RoundSetup, extract_update

if TYPE_CHECKING:
    from flwr.app import Context, Message
    from flwr.clientapp.typing import ClientAppCallable

__all__ = ["ERROR_CODE", "SecureAggregationMod", "secure_aggregation_mod"]

ERROR_CODE = 4_711
"""Flower `Error.code` of a reply whose session ended in a protocol or integration error."""


class SecureAggregationMod:
    """A Flower client Mod running our SecAgg / SecAgg+ client session across messages.

    Args:
        identity_key: raw 32-byte Ed25519 private key; default: the file named by node_config
            `secagg-identity-key`, if any.
        allow_insecure: accept parameters below the security bound; default: node_config
            `secagg-allow-insecure` (false).
        rng: the CSPRNG for keys and seeds (os.urandom unless a test injects one).
    """

    def __init__(
        self,
        *,
        identity_key: bytes | None = None,
        allow_insecure: bool | None = None,
        rng: SecretSource | None = None,
    ) -> None:
        self.identity_key, self.allow_insecure, self.rng = identity_key, allow_insecure, rng

    def __call__(self, msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        """Handle our messages; pass every other message to the rest of the ClientApp."""
        if msg.has_error() or PROTOCOL_RECORD not in msg.content.config_records:
            return call_next(msg, context)
        record = msg.content.config_records[PROTOCOL_RECORD]
        try:
            if record.get("stage") == SETUP:
                return self._setup(msg, context, call_next, RoundSetup.from_record(record))
            return self._step(msg, context, bytes(record["payload"]))  # type: ignore[arg-type]
        except (ProtocolError, FlowerIntegrationError, KeyError, ValueError) as exc:
            _forget(context)
            return _error_reply(msg, f"{type(exc).__name__}: {exc}")

    def _setup(self, msg: Message, context: Context, call_next: ClientAppCallable, setup: RoundSetup) -> Message:
        from flwr.app import ConfigRecord, Message, RecordDict

        _forget(context)  # a new round replaces any session left over from an earlier one
        if setup.params.allow_insecure and not self._insecure_ok(context):
            raise FlowerIntegrationError(
                "the server asks for parameters below the security bound (allow_insecure); set node_config "
                "secagg-allow-insecure=true on this SuperNode to accept them"
            )
        instruction = RecordDict({k: v for k, v in msg.content.items() if k != PROTOCOL_RECORD})
        inner = Message(content=instruction, metadata=copy.copy(msg.metadata))  # same metadata, our record removed
        reply = call_next(inner, context)
        if reply.has_error():
            return reply
        update, rest = extract_update(reply.content)
        params = setup.params
        if update.context is not None and update.context != setup.context:
            raise FlowerIntegrationError(
                "the round context the server set up differs from the one the ClientApp trained for "
                f"({setup.context.hex()[:16]}... vs {update.context.hex()[:16]}...): refusing to mask for another round"
            )
        if update.vector.shape != (params.dimension,):
            raise FlowerIntegrationError(
                f"the ClientApp returned {update.vector.size} values but params.dimension is {params.dimension}; "
                "the server must size the round to the model it sends"
            )
        if not 0 < update.weight <= params.encoding.max_weight:
            raise FlowerIntegrationError(
                f"weight {update.weight} is outside (0, encoding.max_weight={params.encoding.max_weight}]; "
                "raise max_weight on the server or report fewer examples"
            )
        client = SecAggClient(
            params,
            party_id=setup.party,
            session=setup.session,
            round_number=setup.round_number,
            context=setup.context,
            identity_key=self._identity(context),
            rng=self.rng,
        )
        client.set_input(update.vector, weight=update.weight, rounding_seed=update.rounding_seed)
        advert = client.advertise_keys()
        _persist(context, client, setup)
        rest[PROTOCOL_RECORD] = ConfigRecord({"payload": encode_message(advert)})
        return Message(rest, reply_to=msg)

    def _step(self, msg: Message, context: Context, payload: bytes) -> Message:
        from flwr.app import ConfigRecord, Message, RecordDict

        if STATE_RECORD not in context.state.config_records:
            raise FlowerIntegrationError("no secure-aggregation session on this node: the setup message never came")
        saved = context.state.config_records[STATE_RECORD]
        setup = RoundSetup.from_record(saved)
        client = SecAggClient.from_state(
            bytes(saved["session_state"]),  # type: ignore[arg-type]
            setup.params,
            context=setup.context,
            identity_key=self._identity(context),
            rng=self.rng,
            min_stage=ClientState(int(saved["stage_reached"])),  # type: ignore[arg-type]
        )
        reply = client.handle(decode_message(payload))
        _persist(context, client, setup)
        return Message(RecordDict({PROTOCOL_RECORD: ConfigRecord({"payload": encode_message(reply)})}), reply_to=msg)

    def _insecure_ok(self, context: Context) -> bool:
        if self.allow_insecure is not None:
            return self.allow_insecure
        value = context.node_config.get("secagg-allow-insecure", False)
        return value is True or str(value).lower() == "true"

    def _identity(self, context: Context) -> bytes | None:
        if self.identity_key is not None:
            return self.identity_key
        path = context.node_config.get("secagg-identity-key")
        if not path:
            return None
        raw = Path(str(path)).read_text().strip()
        key = bytes.fromhex(raw)
        if len(key) != 32:
            raise FlowerIntegrationError(f"secagg-identity-key {path}: need 64 hex digits (an Ed25519 private key)")
        return key


def _persist(context: Context, client: SecAggClient, setup: RoundSetup) -> None:
    from flwr.app import ConfigRecord

    record: dict[str, Any] = setup.to_record()
    record.update(session_state=client.export_state(), stage_reached=client.state.value)
    context.state[STATE_RECORD] = ConfigRecord(record)


def _forget(context: Context) -> None:
    if STATE_RECORD in context.state.config_records:
        del context.state[STATE_RECORD]


def _error_reply(msg: Message, reason: str) -> Message:
    from flwr.app import Error, Message

    return Message(Error(code=ERROR_CODE, reason=reason), reply_to=msg)


secure_aggregation_mod = SecureAggregationMod()
"""The default Mod: OS CSPRNG, identity key and insecure policy from the node's config."""
