"""The one error hierarchy of `protocols`.

Hosts need to tell three situations apart, because each calls for a different reaction:

* `LocalProtocolError`: the caller (the host embedding a session) broke the rules, for example by
  feeding a message in the wrong stage. Fix the host.
* `RemoteProtocolError`: a peer sent something invalid. The message is rejected, the session's state
  is unchanged, and the host may treat that peer as dropped. `DecodeError` is the special case of
  bytes that do not parse; `IntegrityError` is the opaque case of a failed tag or signature.
* `AbortError`: the round cannot finish safely (too few survivors, a server caught lying). The
  session moves to a terminal state and reveals nothing more.

`InsecureParameterError` is raised at configuration time for parameters below a security floor.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "AbortError",
    "DecodeError",
    "InsecureParameterError",
    "IntegrityError",
    "InvalidTransitionError",
    "LocalProtocolError",
    "ProtocolError",
    "RemoteProtocolError",
]


class ProtocolError(Exception):
    """Root of every error raised by `protocols`; abstract, so catch it but never raise it."""

    def __init__(self, *args: Any) -> None:
        if type(self) is ProtocolError:
            raise TypeError("ProtocolError is abstract; raise one of its subclasses")
        super().__init__(*args)


class LocalProtocolError(ProtocolError):
    """The embedding host misused a session or passed a bad parameter."""


class InvalidTransitionError(LocalProtocolError):
    """A call or message that the session's current state does not accept; the state is unchanged."""


class InsecureParameterError(LocalProtocolError, ValueError):
    """A parameter below a security floor; the message names the field and the fix."""


class RemoteProtocolError(ProtocolError):
    """A peer's message is invalid; it was rejected and the session's state is unchanged.

    Attributes:
        peer_id: the sender the message claims, when known.
        field: the offending field, when known.
    """

    def __init__(self, message: str, *, peer_id: int | None = None, field: str | None = None) -> None:
        super().__init__(message)
        self.peer_id = peer_id
        self.field = field


class DecodeError(RemoteProtocolError):
    """Bytes that are not a valid encoding of any message of this protocol version."""


class IntegrityError(RemoteProtocolError):
    """A failed authentication tag, signature or key check.

    The message is deliberately fixed: telling an attacker which check failed (and at which byte)
    helps them forge. Only the peer id is attached.
    """

    def __init__(self, *, peer_id: int | None = None) -> None:
        super().__init__("integrity check failed", peer_id=peer_id)


class AbortError(ProtocolError):
    """The round was aborted with nothing revealed; the session is terminal."""
