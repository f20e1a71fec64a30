"""The ClientApp side: a Flower Mod that turns a train reply into our protocol's messages.

Drop-in for Flower's `secaggplus_mod`: put `secure_aggregation_mod` in a ClientApp's `mods`. Messages
without our `PROTOCOL_RECORD` pass through untouched, so the same ClientApp serves plain rounds too.

The round's first message (stage `setup`) carries the ClientApp's own instruction plus our setup
(the protocol family's name and parameters: SecAgg, SecAgg+, HE-BFV, HE-CKKS or the plaintext
control): the mod rebuilds the `protocols.SessionFamily`, runs the ClientApp (training), takes the
update out of its reply, encodes it into a fresh client session (`family.client`) and answers with
the session's first message (`AdvertiseKeys`, `HEHello`) plus the reply's metrics, never its arrays.
Later messages carry one protocol message each; the mod restores the session from `Context.state`
(`family.restore_client`), handles the message, persists the new state and only then returns the
reply, so a ClientApp process that dies between two messages never rolls a session back
(`min_stage`).

The update is stored once (SecAgg and SecAgg+; HE and plaintext sessions keep their input in their
own state, see `protocols.ClientSession.export_state`): at setup the mod keeps the ClientApp's own
bytes of the update (raw little-endian values of its dtype, float32 staying float32; no copy when the
update is one array) under `UPDATE_RECORD` and names their fingerprint (position-sensitive word
sums, `_fingerprint`) in the session record. The session is persisted without its pending input at every stage
(`export_state(include_input=False)`) and restored with a read-only view of the stored bytes
(`restore_client(..., input=...)`), so no stage re-exports or copies the input. Right before the
protected input leaves, the mod checks the stored bytes against that fingerprint (a missing,
truncated or altered update is a `FlowerIntegrationError`, never a wrong sum); once it has left, the
stored update is dropped. The fingerprint guards against storage faults, not an adversary: whoever
can write `Context.state` can rewrite any digest kept beside the update, and the session's secrets
too, so a cryptographic hash would add cost (SHA-256 is 4x the fingerprint here) and no protection.

What the node decides for itself, not the server: its site policy (node_config `site-policy`, the
path of a `secure_fedllm.site.SitePolicy` file: protocol family, pinned roster, n_C and dropout
assumptions, floors; see `protocols.SecurityPolicy`). With a policy, the node derives what it would
accept for the announced n and refuses weaker parameters (smaller t or k, no identity keys, keys not
in its roster, another protocol family) with an `InsecureParameterError` naming the field, before it
trains: `check_secagg` for masking, `check_he` for HE (refused while the site assumes any corrupt
client, n_C > 0: one key holder), `check_plaintext` for the plaintext control (never without a
policy that chose it). Its Ed25519 identity key comes from the policy (or node_config
`secagg-identity-key`, a file of 64 hex digits) and must be the key the parameters list at its party
index; a node that holds one refuses parameters without identity keys (a downgrade to the
semi-honest setting: for HE, unsigned hellos, which let a server substitute its own key and
intercept the secret key), policy or not. HE's `min_contributions` must reach the site's
`min_honest_survivors`, so the key holder never releases a sum of fewer inputs.
Without a policy a node still refuses `allow_insecure` parameters unless node_config
`secagg-allow-insecure` is true. An `identify` message is answered with the node's public identity
key, so a server learns the keys from the nodes (each node then checks them against its own roster)
instead of shipping keys of its own choosing.

One update, one session: right before the protected input leaves (the reply whose step is
`RoundStep.INPUT`: `MaskedInput` or its `Complaint`, `HEInput`, the plaintext control's input), the
mod binds the release (job, round, release key) to this session id and transcript, durably (the
site state folder named by the ClientApp's `INPUT_RECORD` field `site_state`, fsynced; else a record
in `Context.state`). From
then on the node refuses any setup or step for that release in another session, and an unmask
request (SecAgg's survivors, HE's contributors to the sum the key holder decrypts) for another
survivor set, whatever session state it is restored from, so a server that re-runs a round without
some client cannot difference the two sums. The release key comes from the
ClientApp's reply (`INPUT_RECORD` fields `release_key`, `release_job`, `release_round`: SECRET, it
never enters the reply to the server); a ClientApp that gives none is keyed by an HMAC, under a
node secret, of the update it returned. A node that sent only keys or shares may join a new session.

Graph tosses (malicious SecAgg+): before a `GraphReveal` (step REVEAL) leaves, the mod counts it for the release,
durably, in the same binding book; once the release revealed in `max_graph_tosses` sessions (site
policy, default 3; see `protocols.SecurityPolicy.max_graph_tosses` for the bias this bounds) it
refuses to reveal in another with a `ReleaseBindingError`, so a server that aborts tosses until
it likes the graph gets at most that many tries.

Any protocol error ends the session: the secrets are dropped and the reply is a Flower error, which
the server counts as a dropout.
"""

from __future__ import annotations

import copy
import enum
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from protocols import (
    ClientSession,
    ClientState,
    HEFamily,
    InsecureParameterError,
    PlaintextFamily,
    ProtocolError,
    RoundStep,
    SecAggFamily,
    SecretSource,
    SecurityPolicy,
)
from protocols.he import HEClientState, HEParams, HESum
from protocols.plaintext import PlaintextClientStage
from protocols.primitives import ed25519_public
from protocols.secagg import UnmaskRequest

from ..errors import ReleaseBindingError
from ..site.policy import SITES_ENV, SitePolicy, site_policy_path
from ..site.state import BindingBook, SiteStateError
from .records import (
    IDENTIFY,
    INPUT_RECORD,
    PROTOCOL_RECORD,
    SETUP,
    STATE_RECORD,
    UPDATE_RECORD,
    ClientUpdate,
    FlowerIntegrationError,
    RoundFamily,
    RoundSetup,
    config_record,
    extract_update,
)

if TYPE_CHECKING:
    from flwr.app import Context, Message
    from flwr.clientapp.typing import ClientAppCallable

__all__ = ["ERROR_CODE", "SecureAggregationMod", "secure_aggregation_mod"]

ERROR_CODE = 4_711
"""Flower `Error.code` of a reply whose session ended in a protocol or integration error."""


class SecureAggregationMod:
    """A Flower client Mod running our client session (SecAgg, SecAgg+, HE-BFV, HE-CKKS) across messages.

    Args:
        identity_key: raw 32-byte Ed25519 private key; default: the site policy's key file, else the
            file named by node_config `secagg-identity-key`, if any.
        site_policy: the site's policy; default: the file named by node_config `site-policy`, if any.
        allow_insecure: accept parameters below the security bound; default: node_config
            `secagg-allow-insecure` (false).
        rng: the CSPRNG for keys and seeds (os.urandom unless a test injects one).
        max_graph_tosses: graph-nonce reveals per release; default: the site policy's
            `max_graph_tosses`, else `SecurityPolicy`'s default (3).
    """

    def __init__(
        self,
        *,
        identity_key: bytes | None = None,
        allow_insecure: bool | None = None,
        rng: SecretSource | None = None,
        site_policy: SitePolicy | None = None,
        max_graph_tosses: int | None = None,
    ) -> None:
        if max_graph_tosses is not None and max_graph_tosses < 1:
            raise ValueError(f"max_graph_tosses={max_graph_tosses} must be at least 1")
        self.identity_key, self.allow_insecure, self.rng = identity_key, allow_insecure, rng
        self.site_policy = site_policy
        self.max_graph_tosses = max_graph_tosses

    def __call__(self, msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        """Handle our messages; pass every other message to the rest of the ClientApp."""
        record = None if msg.has_error() else config_record(msg.content, PROTOCOL_RECORD)
        if record is None:
            return call_next(msg, context)
        try:
            if record.get("stage") == SETUP:
                return self._setup(msg, context, call_next, RoundSetup.from_record(record))
            if record.get("stage") == IDENTIFY:
                return self._identify(msg, context)
            return self._step(msg, context, bytes(record["payload"]))  # type: ignore[arg-type]
        except (
            ProtocolError,
            FlowerIntegrationError,
            ReleaseBindingError,
            SiteStateError,
            KeyError,
            ValueError,
        ) as exc:
            _forget(context)
            return _error_reply(msg, f"{type(exc).__name__}: {exc}")

    def _setup(self, msg: Message, context: Context, call_next: ClientAppCallable, setup: RoundSetup) -> Message:
        from flwr.app import ConfigRecord, Message, RecordDict

        _forget(context)  # a new round replaces any session left over from an earlier one
        self._check_params(setup, context)  # before training: refused parameters cost the node nothing
        family = self._family(setup, context)
        instruction = RecordDict({k: v for k, v in msg.content.items() if k != PROTOCOL_RECORD})
        inner = Message(content=instruction, metadata=copy.copy(msg.metadata))  # same metadata, our record removed
        reply = call_next(inner, context)
        if reply.has_error():
            return reply
        release = _release_of(reply.content)  # read before extract_update drops INPUT_RECORD from the reply
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
        max_weight = params.max_weight if isinstance(params, HEParams) else params.encoding.max_weight
        if not 0 < update.weight <= max_weight:
            field = "max_weight" if isinstance(params, HEParams) else "encoding.max_weight"
            raise FlowerIntegrationError(
                f"weight {update.weight} is outside (0, {field}={max_weight}]; "
                "raise max_weight on the server or report fewer examples"
            )
        client = family.client(
            setup.party,
            session=setup.session,
            round_number=setup.round_number,
            context=setup.context,
            identity_key=self._identity(context),
            rng=self.rng,
        )
        fingerprint = _fingerprint(update.vector)
        if not release:
            release = _derived_release(context, fingerprint, update.vector, update.weight)
        book = _book(context, release)
        bound = book.binding(*_release_id(release))
        if bound is not None:  # its protected input already went to a session: never into a second one
            raise ReleaseBindingError(
                f"this update was already sent to session {bound.session.hex()[:16]}... (round {bound.round}); "
                f"session {setup.session.hex()[:16]}... is refused: one update goes to one session only"
            )
        client.set_input(update.vector, weight=update.weight, rounding_seed=update.rounding_seed)
        first = client.start()
        if isinstance(family, SecAggFamily) and family.step_of(type(first)) is not RoundStep.INPUT:  # store it once
            _store_update(context, update)
            release = {**release, UPDATE_FINGERPRINT: fingerprint}
        self._before_sending(context, family, client, setup, release, None, first)
        _persist(context, client, setup, release)
        rest[PROTOCOL_RECORD] = ConfigRecord({"payload": family.encode(first)})
        return Message(rest, reply_to=msg)

    def _step(self, msg: Message, context: Context, payload: bytes) -> Message:
        from flwr.app import ConfigRecord, Message, RecordDict

        saved = config_record(context.state, STATE_RECORD)
        if saved is None:
            raise FlowerIntegrationError("no secure-aggregation session on this node: the setup message never came")
        setup = RoundSetup.from_record(saved)
        family = self._family(setup, context)
        fingerprint = saved.get(UPDATE_FINGERPRINT)
        stored = _stored_update(context, setup) if fingerprint is not None else None  # a view, no copy
        client = _restore(
            family,
            bytes(saved["session_state"]),  # type: ignore[arg-type]
            stored,
            context=setup.context,
            identity_key=self._identity(context),
            rng=self.rng,
            min_stage=_stage(family, saved["stage_reached"]),
        )
        release = {k: saved[k] for k in _CARRIED_FIELDS if k in saved}
        book = _book(context, release)
        book.check_binding(*_release_id(release), session=setup.session, transcript=_transcript(client))
        request = family.decode(payload)
        reply = client.handle(request)
        left = stored is not None and family.step_of(type(reply)) is RoundStep.INPUT
        if left:  # the stored bytes went into this reply: they must be the very update of the setup
            _check_stored(stored, bytes(fingerprint))  # type: ignore[arg-type]
            del release[UPDATE_FINGERPRINT]
        self._before_sending(context, family, client, setup, release, request, reply)
        _persist(context, client, setup, release)
        if left:  # the protected input has left: the node keeps no copy of the update
            del context.state[UPDATE_RECORD]
        return Message(RecordDict({PROTOCOL_RECORD: ConfigRecord({"payload": family.encode(reply)})}), reply_to=msg)

    def _before_sending(
        self,
        context: Context,
        family: RoundFamily,
        client: ClientSession,
        setup: RoundSetup,
        release: dict[str, Any],
        request: Any,
        reply: Any,
    ) -> None:
        """What must be on disk BEFORE a reply leaves, by the step the reply belongs to (any family)."""
        step = family.step_of(type(reply))
        book = _book(context, release)
        if step is RoundStep.REVEAL:  # count the graph toss, durably, before the nonce can leave
            book.record_graph_toss(
                *_release_id(release), setup.session, max_graph_tosses=self._max_graph_tosses(context)
            )
        elif step is RoundStep.INPUT:  # bind, durably, before the protected input can leave
            book.bind(*_release_id(release), setup.session, _transcript(client))
        elif step is RoundStep.UNMASK:  # one survivor set (SecAgg) / one contributor set (HE) per release
            survivors = _survivors(request)
            if survivors is not None:
                book.check_binding(*_release_id(release), session=setup.session, survivors=survivors)

    def _family(self, setup: RoundSetup, context: Context) -> RoundFamily:
        """The session family of the setup; the plaintext control only with this site's policy choosing it."""
        policy = self._policy(context) if setup.family == "plaintext" else None
        return setup.session_family(policy=policy.security if policy is not None else None)

    def _check_params(self, setup: RoundSetup, context: Context) -> None:
        """Refuse parameters weaker than this node's own policy allows (the server cannot lower them)."""
        params, identity = setup.params, self._identity(context)
        policy = self._policy(context)
        if isinstance(params, HEParams):
            self._check_he(setup, params, identity, policy)
            return
        if setup.family == "plaintext":
            if policy is None:
                raise InsecureParameterError(
                    "protocol: the server asks for updates in the clear (plaintext) but this node has no site policy "
                    "that chooses protocol='plaintext'; refused"
                )
            policy.security.check_plaintext()
            return
        if policy is not None:
            policy.check_secagg(params, party_id=setup.party, identity_key=identity, signed_roster=setup.signed_roster)
            return
        if identity is not None and params.identity_keys is None:
            raise InsecureParameterError(
                "identity_keys: the server announced no identity keys but this node holds an identity key and runs "
                "the malicious setting only; a downgrade to the semi-honest setting is refused"
            )
        if params.allow_insecure and not self._insecure_ok(context):
            raise FlowerIntegrationError(
                "the server asks for parameters below the security bound (allow_insecure); set node_config "
                "secagg-allow-insecure=true on this SuperNode to accept them"
            )

    def _check_he(self, setup: RoundSetup, params: HEParams, identity: bytes | None, policy: SitePolicy | None) -> None:
        """HE: the site's policy (`check_he`: no HE while n_C > 0), signed hellos, pinned keys, a contribution floor."""
        security = SecurityPolicy.model_validate({})
        if policy is not None:
            if identity is None and policy.identity_key is not None:
                raise InsecureParameterError(
                    "identity_key: this site's policy names an identity key that was not loaded"
                )
            security = policy.security.with_roster(setup.signed_roster)  # a roster authority's roster, checked
            security.check_he(num_parties=params.num_parties)
        public = ed25519_public(identity) if identity is not None else None
        security.check_he_members(params, party_id=setup.party, identity_public_key=public)

    def _identify(self, msg: Message, context: Context) -> Message:
        """Answer with this node's public identity key (what the server lists at its party index)."""
        from flwr.app import ConfigRecord, Message, RecordDict

        identity = self._identity(context)
        if identity is None:
            raise FlowerIntegrationError(
                "the server asks for this node's identity key but it holds none; configure one in its site policy"
            )
        record = ConfigRecord({"identity_public_key": ed25519_public(identity)})
        return Message(RecordDict({PROTOCOL_RECORD: record}), reply_to=msg)

    def _policy(self, context: Context) -> SitePolicy | None:
        """This node's policy: the Mod's own, node_config `site-policy`, or its site folder's `policy.toml`.

        Only node-side settings are read (node config, this machine's environment), never the run
        config, which the server writes.
        """
        if self.site_policy is not None:
            return self.site_policy
        path = context.node_config.get("site-policy")
        if path:
            return SitePolicy.from_file(str(path))
        root = context.node_config.get("state-dir") or os.environ.get(SITES_ENV)
        partition = context.node_config.get("partition-id")
        if root and partition is not None:
            candidate = site_policy_path(str(root), int(str(partition)))
            if candidate.exists():
                return SitePolicy.from_file(candidate)
        return None

    def _max_graph_tosses(self, context: Context) -> int:
        if self.max_graph_tosses is not None:
            return self.max_graph_tosses
        policy = self._policy(context)
        security = policy.security if policy is not None else SecurityPolicy.model_validate({})
        return security.max_graph_tosses

    def _insecure_ok(self, context: Context) -> bool:
        if self.allow_insecure is not None:
            return self.allow_insecure
        value = context.node_config.get("secagg-allow-insecure", False)
        return value is True or str(value).lower() == "true"

    def _identity(self, context: Context) -> bytes | None:
        if self.identity_key is not None:
            return self.identity_key
        policy = self._policy(context)
        if policy is not None and policy.identity_key is not None:
            return policy.load_identity_key()
        path = context.node_config.get("secagg-identity-key")
        if not path:
            return None
        raw = Path(str(path)).read_text().strip()
        key = bytes.fromhex(raw)
        if len(key) != 32:
            raise FlowerIntegrationError(f"secagg-identity-key {path}: need 64 hex digits (an Ed25519 private key)")
        return key


def _persist(context: Context, client: ClientSession, setup: RoundSetup, release: dict[str, Any]) -> None:
    """The session record: setup, session without its pending input, stage reached, release, update fingerprint."""
    from flwr.app import ConfigRecord

    record: dict[str, Any] = setup.to_record()
    record.update(session_state=_export(client), stage_reached=client.stage.name, **release)
    context.state[STATE_RECORD] = ConfigRecord(record)


def _export(client: ClientSession) -> bytes:
    """The session's state without its pending input (stored once, under `UPDATE_RECORD`)."""
    return client.export_state(include_input=False)


def _restore(family: RoundFamily, blob: bytes, stored: Any, **kw: Any) -> ClientSession:
    """The session of `blob`, given back its pending input: the read-only view of the stored bytes, if any."""
    return family.restore_client(blob, input=stored, **kw)


UPDATE_FINGERPRINT = "update_fingerprint"
"""Session-record field: `_fingerprint` of the stored update, present while the input is still to leave."""


_FINGERPRINT_LANES = 512


def _fingerprint(vector: Any) -> bytes:
    """A position-sensitive checksum of the update's raw bytes, read in place (4 MB: 1.0 ms; CRC-32 2.4, SHA-256 4.2).

    Over the 64-bit words w of the bytes (the last one zero-padded), laid out in rows of
    `_FINGERPRINT_LANES`: the plain sum, the sum of row sums weighted by row number and the sum of
    column sums weighted by column number, each mod 2^64. A change confined to one word moves the
    plain sum; swapping two different words moves a weighted sum by (i - j)(w_i - w_j), which is
    zero mod 2^64 only when the words differ in their top bits alone; a change of length is refused
    before (`_stored_update`); random garbage passes with probability about 2^-64. It is a fault
    check, not a MAC (see the module docstring), and its 192 bits keep two different updates of one
    node from sharing a derived release key by accident (`_derived_release`).
    """
    import numpy as np

    raw = memoryview(vector).cast("B")
    words = np.frombuffer(raw, dtype="<u8", count=len(raw) // 8)
    rows = words.size // _FINGERPRINT_LANES
    grid = words[: rows * _FINGERPRINT_LANES].reshape(rows, _FINGERPRINT_LANES)
    tail = words[rows * _FINGERPRINT_LANES :].copy()  # fewer than _FINGERPRINT_LANES words
    if len(raw) % 8:
        tail = np.append(tail, np.uint64(int.from_bytes(raw[8 * words.size :], "little")))
    row_sums, lane_sums = np.add.reduce(grid, axis=1), np.add.reduce(grid, axis=0)
    tail_sum = np.add.reduce(tail, dtype=np.uint64)
    lane_sums[: tail.size] += tail
    with np.errstate(over="ignore"):
        plain = np.add.reduce(row_sums, dtype=np.uint64) + tail_sum
        by_row = np.dot(row_sums, np.arange(1, rows + 1, dtype=np.uint64)) + np.uint64(rows + 1) * tail_sum
        by_lane = np.dot(lane_sums, np.arange(1, _FINGERPRINT_LANES + 1, dtype=np.uint64))
    return b"".join(int(v).to_bytes(8, "big") for v in (plain, by_row, by_lane))


def _store_update(context: Context, update: ClientUpdate) -> None:
    """Keep the update once, as the ClientApp's own bytes (no copy when the update is one array)."""
    import numpy as np
    from flwr.app import ConfigRecord

    vector: Any = update.vector
    if update.buffer is None:  # built by hand, not by extract_update: one copy into bytes of its own
        vector = np.ascontiguousarray(vector)
        buffer, offset = vector.tobytes(), 0
    else:
        buffer, offset = update.buffer, update.offset
    context.state[UPDATE_RECORD] = ConfigRecord(
        {"data": buffer, "offset": offset, "dtype": vector.dtype.str, "count": int(vector.size)}
    )


def _stored_update(context: Context, setup: RoundSetup) -> Any:
    """The update stored at setup, as a read-only view of its bytes, checked for shape and type.

    Its content is checked against the session record's fingerprint when it leaves (`_check_stored`).

    Raises:
        FlowerIntegrationError: the record is missing or does not describe `params.dimension` values
            of an input dtype within its bytes.
    """
    import numpy as np

    from .records import INPUT_DTYPES

    record = config_record(context.state, UPDATE_RECORD)
    if record is None:
        raise FlowerIntegrationError(
            f"the session's update is missing from the node state ({UPDATE_RECORD}): it is needed until the "
            "masked input leaves; the session cannot continue"
        )
    data, offset, count, name = record.get("data"), record.get("offset"), record.get("count"), record.get("dtype")
    dtypes = {t.str: t for t in INPUT_DTYPES}
    if (
        not isinstance(data, bytes)
        or not isinstance(offset, int)
        or not isinstance(count, int)
        or name not in dtypes
        or offset < 0
        or count != setup.params.dimension
        or len(data) - offset != count * dtypes[str(name)].itemsize
    ):
        raise FlowerIntegrationError(
            f"the stored update ({UPDATE_RECORD}) is corrupt: expected {setup.params.dimension} values of "
            f"{sorted(dtypes)} from its offset to the end of its data, got dtype={name!r}, count={count!r}, "
            f"offset={offset!r}, {len(data) if isinstance(data, bytes) else 'no'} bytes"
        )
    return np.frombuffer(data, dtype=dtypes[str(name)], count=count, offset=offset)


def _check_stored(stored: Any, fingerprint: bytes) -> None:
    if _fingerprint(stored) != fingerprint:
        raise FlowerIntegrationError(
            f"the stored update ({UPDATE_RECORD}) is not the update this session was set up with (its "
            "fingerprint differs from the session record's): refusing to send a masked input of altered values"
        )


_STAGES: dict[type[Any], type[enum.Enum]] = {
    HEFamily: HEClientState,
    PlaintextFamily: PlaintextClientStage,
}


def _stage(family: RoundFamily, saved: Any) -> enum.Enum:
    """The stage persisted last (the rollback guard `min_stage`), as the family's own stage enum."""
    stages = _STAGES.get(type(family), ClientState)
    if isinstance(saved, int) and stages is ClientState:  # a record written before issue 13: SecAgg's values
        return ClientState(saved)
    try:
        return stages[str(saved)]
    except KeyError:
        raise FlowerIntegrationError(
            f"{STATE_RECORD}.stage_reached={saved!r} is not a {stages.__name__}; the node state is corrupt"
        ) from None


def _transcript(client: ClientSession) -> bytes:
    """The session's transcript hash (bound with the session id); the plaintext control has none."""
    transcript = getattr(client, "transcript", b"")
    return bytes(transcript)


def _survivors(request: Any) -> tuple[int, ...] | None:
    """Whose inputs the answer to `request` releases: SecAgg's survivors, or the contributors to HE's sum."""
    if isinstance(request, UnmaskRequest):
        return tuple(request.survivors)
    if isinstance(request, HESum):
        return tuple(request.contributors)
    return None


_RELEASE_FIELDS = ("release_key", "release_job", "release_round", "site_state")
_CARRIED_FIELDS = (*_RELEASE_FIELDS, UPDATE_FINGERPRINT)
"""What the session record carries besides the session: the release and, while pending, the update's fingerprint."""
BINDINGS_RECORD = "secure_fedllm.secagg.bindings"
"""ConfigRecord in a node's Context.state: its release bindings (when no site state folder is named) and
the node secret that keys releases of ClientApps that give no release key (SECRET)."""


def _release_of(content: Any) -> dict[str, Any]:
    """The release fields the ClientApp put beside its update (empty if it gave no release key)."""
    extra = config_record(content, INPUT_RECORD)
    if extra is None:
        return {}
    if extra.get("release_key") is None:
        return {}
    key = bytes(extra["release_key"])  # type: ignore[arg-type]
    if len(key) < 16:
        raise FlowerIntegrationError(f"{INPUT_RECORD}.release_key must be at least 16 bytes, got {len(key)}")
    return {
        "release_key": key,
        "release_job": str(extra.get("release_job", "")),
        "release_round": int(extra.get("release_round", 0)),  # type: ignore[arg-type]
        "site_state": str(extra.get("site_state", "")),
    }


def _derived_release(context: Context, fingerprint: bytes, vector: Any, weight: float) -> dict[str, Any]:
    """A release key for a ClientApp that gives none: an HMAC, under a node secret, of the very update it returned.

    Only what the ClientApp returned enters it (the update's `_fingerprint`, dtype and length, and its
    weight), nothing the server chooses (session, round, context, parameters): a server that re-runs a
    round under another context still meets the same binding. What the binding needs is that the same
    update always gives the same key, which any function of the update's bytes does; two different
    updates sharing a key would only make the node refuse the second (availability, never secrecy), and
    the 96-bit fingerprint makes that negligible without hashing the whole update a second time.
    """
    import hashlib
    import hmac
    import os

    from flwr.app import ConfigRecord

    bindings = config_record(context.state, BINDINGS_RECORD)
    if bindings is None:
        bindings = context.state[BINDINGS_RECORD] = ConfigRecord({"_secret": os.urandom(32)})
    secret = bytes(bindings["_secret"])  # type: ignore[arg-type]
    mac = hmac.new(secret, b"secure-fedllm/derived-release/v2|", hashlib.sha256)
    for part in (fingerprint, f"{vector.dtype.str}|{vector.size}".encode(), repr(float(weight)).encode()):
        mac.update(len(part).to_bytes(8, "big") + part)
    return {"release_key": mac.digest(), "release_job": "", "release_round": 0, "site_state": ""}


def _release_id(release: dict[str, Any]) -> tuple[str, int, bytes]:
    return str(release["release_job"]), int(release["release_round"]), bytes(release["release_key"])


def _book(context: Context, release: dict[str, Any]) -> BindingBook:
    """The site's bindings: files in its state folder when the ClientApp names one, else the node's Context.state."""
    import json

    from flwr.app import ConfigRecord

    if not release:
        raise FlowerIntegrationError("the session record lacks its release; was it set up by an older version?")
    if release.get("site_state"):
        from ..site.state import SiteState

        return SiteState.bindings_at(Path(str(release["site_state"])))

    def load(tag: str) -> dict[str, Any] | None:
        record = config_record(context.state, BINDINGS_RECORD)
        if record is None or tag not in record:
            return None
        data: dict[str, Any] = json.loads(bytes(record[tag]))  # type: ignore[arg-type]
        return data

    def store(tag: str, value: dict[str, Any]) -> None:
        bindings = config_record(context.state, BINDINGS_RECORD)
        if bindings is None:
            bindings = context.state[BINDINGS_RECORD] = ConfigRecord({})
        bindings[tag] = json.dumps(value).encode()

    return BindingBook(load, store)


def _forget(context: Context) -> None:
    """Erase the session and its stored update (a new round, or any error)."""
    for name in (STATE_RECORD, UPDATE_RECORD):
        if config_record(context.state, name) is not None:
            del context.state[name]


def _error_reply(msg: Message, reason: str) -> Message:
    from flwr.app import Error, Message

    return Message(Error(code=ERROR_CODE, reason=reason), reply_to=msg)


secure_aggregation_mod = SecureAggregationMod()
"""The default Mod: OS CSPRNG, identity key and insecure policy from the node's config."""
