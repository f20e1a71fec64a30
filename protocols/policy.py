"""A site's security policy: the parameters a client accepts, fixed by the client, never by the server.

The server announces each session's parameters (who takes part, n, k, t, identity keys). Taken at
face value they let it weaken everything it is meant to be kept from: drop the identity keys (no
signatures, no consistency round), lower t to about n / 2 and split survivor views, put keys of its
own at the other parties' indices (Sybils), or announce `corrupt_fraction=0, dropout_rate=0` so that
a 100-party SecAgg+ runs with k = 2. `SecurityPolicy` is what a site decides for itself instead:

* the protocol family (`secagg`, `secagg+`, `he` or `plaintext`), never chosen by the server;
* the pinned `roster`: the Ed25519 public keys of every party the site accepts, issued by someone
  other than the aggregator; every key in the announced parameters must be in it. Instead of a
  pinned list, a site may pin a `roster_authority` (an Ed25519 key that is not the aggregator's) and
  a `roster_label`: it then accepts the roster in a `SignedRoster` the authority signed for that
  label, relayed by the server (one label names one roster, so the server cannot pick among several);
* the assumed corrupt fraction and dropout rate, and the statistical parameters sigma and eta;
* floors: `min_parties`, and `min_honest_survivors`, the honest inputs any released sum must hold;
* `distributed_noise`: the site adds only its share of DP noise, calibrated for n - n_C - d_max
  honest survivors, so it runs full SecAgg only, with t >= n - d_max: every released sum then holds
  at least n - d_max inputs (each client aborts at UNMASK on a smaller survivor set).

n_C, the parties colluding with the server, is counted ONCE over the whole pinned roster,
ceil(corrupt_fraction x roster size), never as a fraction of the announced n: the server picks the
session's members and can fill a small session with the colluders it has. d_max is a fraction of the
announced n (dropouts happen within a session). The policy requires t - n_C >= min_honest_survivors.
The setting is malicious whenever the site holds an identity key (or pins a roster): a client then
refuses parameters without identity keys.

`derive` gives the `SecAggParams` this site would use for an announced n, so an honest server builds
exactly these; `check_secagg` refuses anything weaker with an `InsecureParameterError` that names the
field and the fix; `check_he` refuses HE while n_C > 0 (one key holder: HE protects an update only
when no client colludes with the server).
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .encoding import FixedPointEncoding
from .errors import InsecureParameterError, IntegrityError
from .primitives import ed25519_sign, ed25519_verify
from .secagg._params import ETA, SIGMA, SecAggParams, _bounds, derive_secagg_plus

if TYPE_CHECKING:
    from .he import HEParams

__all__ = ["PROTOCOL_FAMILIES", "SecurityPolicy", "SignedRoster"]

PROTOCOL_FAMILIES = ("secagg", "secagg+", "he", "plaintext")
"""The protocol families a site may choose; the server never chooses one for it."""

_Key = Annotated[bytes, Field(min_length=32, max_length=32)]


def _ceil(x: float) -> int:
    return math.ceil(x - 1e-9)


_ROSTER_DOMAIN = b"secure-fedllm/signed-roster/v1"


class SignedRoster(BaseModel):
    """A roster (every party's Ed25519 public key) signed by a roster authority for one label.

    The authority is whoever the sites trust to enrol parties (never the aggregator). It signs
    SHA-256(domain | u32 len(label) | label | u32 count | keys); a site whose policy pins that
    authority and label accepts the keys as if it had pinned them itself. The server only relays it.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", ser_json_bytes="hex", val_json_bytes="hex")

    label: Annotated[str, Field(min_length=1, max_length=256)] = Field(description="what this roster is for")
    keys: tuple[_Key, ...] = Field(min_length=1, description="every party's Ed25519 public key")
    signature: Annotated[bytes, Field(min_length=64, max_length=64)] = Field(description="the authority's")

    @staticmethod
    def statement(label: str, keys: Sequence[bytes]) -> bytes:
        """The bytes the authority signs."""
        h = hashlib.sha256(_ROSTER_DOMAIN)
        encoded = label.encode()
        h.update(struct.pack("<I", len(encoded)) + encoded + struct.pack("<I", len(keys)))
        for key in keys:
            h.update(key)
        return h.digest()

    @classmethod
    def sign(cls, authority_key: bytes, label: str, keys: Sequence[bytes]) -> SignedRoster:
        """Sign `keys` for `label` with the authority's raw Ed25519 private key."""
        keys = tuple(keys)
        return cls(label=label, keys=keys, signature=ed25519_sign(authority_key, cls.statement(label, keys)))

    def verify(self, authority: bytes, label: str) -> tuple[bytes, ...]:
        """The keys, if `authority` signed them for `label`.

        Raises:
            InsecureParameterError: another label, or a signature that does not verify (field `roster`).
        """
        if self.label != label:
            raise InsecureParameterError(
                f"roster: the relayed roster is for label {self.label!r} but this site accepts only {label!r}"
            )
        try:
            ed25519_verify(authority, self.signature, self.statement(self.label, self.keys))
        except IntegrityError:
            raise InsecureParameterError(
                "roster: the relayed roster is not signed by this site's roster_authority; refused"
            ) from None
        return self.keys


class SecurityPolicy(BaseModel):
    """What one site accepts, whatever the server announces (see the module docstring)."""

    model_config = ConfigDict(frozen=True, extra="forbid", ser_json_bytes="hex", val_json_bytes="hex")

    protocol: Literal["secagg", "secagg+", "he", "plaintext"] = Field(
        "secagg+", description="the protocol family this site runs; the server cannot choose another"
    )
    roster: tuple[_Key, ...] | None = Field(
        None,
        description="Ed25519 public keys of every party this site accepts (issued independently of the "
        "aggregator); None: no pinned roster (semi-honest setting unless the site holds an identity key)",
    )
    roster_authority: _Key | None = Field(
        None,
        description="Ed25519 public key (not the aggregator's) whose SignedRoster for roster_label this site "
        "accepts instead of a pinned roster",
    )
    roster_label: str | None = Field(None, description="the label the roster_authority signs this site's roster for")
    corrupt_fraction: Annotated[float, Field(ge=0, lt=0.5)] = Field(
        0.05, description="fraction of the roster assumed to collude with the server; n_C = ceil(fraction x roster)"
    )
    dropout_rate: Annotated[float, Field(ge=0, lt=1)] = Field(
        0.1, description="fraction of an announced session assumed to drop out; d_max = ceil(rate x n)"
    )
    sigma: Annotated[int, Field(ge=SIGMA, le=128)] = Field(SIGMA, description="security: failure <= 2^-sigma")
    eta: Annotated[int, Field(ge=ETA, le=128)] = Field(ETA, description="correctness: failure <= 2^-eta")
    min_parties: Annotated[int, Field(ge=3)] = Field(3, description="smallest session (n) this site joins")
    min_honest_survivors: Annotated[int, Field(ge=1)] = Field(
        2,
        description="t - n_C must reach this: a released sum holds at least this many honest inputs, so the "
        "server and its colluders cannot subtract their way to one client's update",
    )
    allow_insecure: bool = Field(
        False, description="accept parameters the server marks allow_insecure (below the security bound)"
    )
    distributed_noise: bool = Field(
        False,
        description="this site adds only its share of DP noise, calibrated for n - n_C - d_max honest survivors; "
        "it then requires full SecAgg (every party a neighbour of every other, whatever `protocol` says) and "
        "threshold t >= n - d_max, so every released sum holds at least n - d_max inputs, each client aborting "
        "at UNMASK otherwise; SecAgg+ is refused because its guarantee is per neighbourhood: a malicious server "
        "learns sums over groups of honest survivors",
    )
    """Distributed DP: the noise in a released sum is only the sum of the survivors' shares.

    Each client's share is calibrated so that h = n - n_C - d_max honest shares add up to the target
    noise; a sum of fewer honest inputs carries less noise than the guarantee assumes. Full SecAgg
    with t >= n - d_max makes every client refuse to unmask for a survivor set below n - d_max, of
    which at most n_C collude, so at least h honest shares are in any released sum. SecAgg+ cannot
    give this: a malicious server that drops parties at will learns sums over connected groups of
    honest survivors (Bell et al. 2020), each with fewer than h noise shares. `allow_insecure` does
    not lift these checks: they protect the noise calibration, not the masking bound.
    """
    max_graph_tosses: Annotated[int, Field(ge=1, le=1000)] = Field(
        3,
        description="graph tosses (revealed nonces) this site joins per release in the malicious SecAgg+ "
        "setting; the graph failure bound becomes max_graph_tosses x 2^-sigma",
    )
    """How many SecAgg+ graph tosses this site joins per release (the host counts its reveals).

    The commit-reveal toss gives a uniform graph, but a server (or a colluding client withholding
    its reveal) can abort a toss after seeing its result and start a new session for the same
    update. Capping the reveals per release at m lets such a server choose among at most m graphs,
    so the probability that the graph is bad for this site is at most m x 2^-sigma instead of
    2^-sigma (with the default 3 and sigma = 40: below 2^-38.4). Without a cap the bound would be
    about 2^sigma server-side trials, a computational rather than statistical guarantee. The cost
    is availability: a release whose tosses keep aborting is not sent in a fourth session.
    """

    @model_validator(mode="after")
    def _roster_ok(self) -> SecurityPolicy:
        if self.roster is not None and self.roster_authority is not None:
            raise ValueError("pin either roster or roster_authority, not both")
        if (self.roster_authority is None) != (self.roster_label is None):
            raise ValueError("roster_authority and roster_label go together: the authority signs a roster per label")
        if self.roster is not None:
            if len(set(self.roster)) != len(self.roster):
                raise ValueError("roster repeats a key: every party needs its own identity key")
            if len(self.roster) < self.min_parties:
                raise ValueError(
                    f"roster has {len(self.roster)} keys, below min_parties={self.min_parties}; pin every party"
                )
        return self

    # -- counts -----------------------------------------------------------------------------------

    def max_corrupt(self, num_parties: int) -> int:
        """n_C: ceil(corrupt_fraction x roster size), or x n when no roster is pinned (semi-honest)."""
        population = len(self.roster) if self.roster is not None else num_parties
        return _ceil(self.corrupt_fraction * population)

    def max_dropped(self, num_parties: int) -> int:
        """d_max for an announced session of `num_parties`."""
        return _ceil(self.dropout_rate * num_parties)

    def malicious(self, identity_public_key: bytes | None) -> bool:
        """The malicious-server setting applies whenever the site holds an identity key or pins a roster."""
        return identity_public_key is not None or self.roster is not None or self.roster_authority is not None

    def with_roster(self, signed: SignedRoster | None) -> SecurityPolicy:
        """This policy with the roster its authority signed (itself when it pins a roster or trusts none).

        Raises:
            InsecureParameterError: field `roster`: the site trusts an authority but got no roster, or
                one for another label, or one the authority did not sign.
        """
        if self.roster_authority is None or self.roster_label is None:
            return self
        if signed is None:
            raise InsecureParameterError(
                "roster: this site accepts only a roster signed by its roster_authority and the server relayed none"
            )
        keys = signed.verify(self.roster_authority, self.roster_label)
        try:
            return SecurityPolicy(
                **{**self.model_dump(), "roster": keys, "roster_authority": None, "roster_label": None}
            )
        except ValidationError as exc:
            raise InsecureParameterError(f"roster: the signed roster is unusable: {exc.errors()[0]['msg']}") from None

    # -- what this site would announce ------------------------------------------------------------

    def derive(
        self,
        num_parties: int,
        *,
        dimension: int,
        clip_range: float | None = None,
        encoding: FixedPointEncoding | None = None,
        identity_keys: Sequence[bytes] | None = None,
        signed_roster: SignedRoster | None = None,
    ) -> SecAggParams:
        """The `SecAggParams` this site would use for `num_parties` (an honest server builds exactly these).

        With `distributed_noise` they are full SecAgg (neighbours n - 1) with t >= n - d_max, whatever
        `protocol` says (see the field).

        Args:
            num_parties: the announced n.
            dimension: length of each input.
            clip_range: per-coordinate bound (builds the encoding) unless `encoding` is given.
            encoding: the fixed-point encoding.
            identity_keys: the members' Ed25519 public keys in party order (malicious setting); each
                must be in the roster.
            signed_roster: the roster, when this site trusts a roster authority instead of pinning one.

        Raises:
            InsecureParameterError: this policy cannot run a session of this size (names the field).
        """
        if self.roster_authority is not None:
            return self.with_roster(signed_roster).derive(
                num_parties, dimension=dimension, clip_range=clip_range, encoding=encoding, identity_keys=identity_keys
            )
        self._require_family(("secagg", "secagg+"))
        n = num_parties
        if n < self.min_parties:
            raise InsecureParameterError(
                f"num_parties={n} is below this site's min_parties={self.min_parties}; announce more parties"
            )
        if self.roster is not None and identity_keys is None:
            raise InsecureParameterError(
                "identity_keys: this site pins a roster, so it runs the malicious setting; pass the members' keys"
            )
        if identity_keys is not None:
            self._check_members(tuple(identity_keys), n)
        n_c, d_max = self.max_corrupt(n), self.max_dropped(n)
        k, t = self.thresholds(n, malicious=identity_keys is not None)
        if self.distributed_noise:  # thresholds() already gives (n - 1, n - d_max): the floor, stated here
            k, t = n - 1, max(t, n - d_max)
        if encoding is None:
            if clip_range is None:
                raise InsecureParameterError("derive needs clip_range or encoding")
            encoding = FixedPointEncoding(clip_range=clip_range, max_parties=n)
        params = SecAggParams(
            num_parties=n,
            dimension=dimension,
            threshold=t,
            neighbours=k,
            dropout_rate=self.dropout_rate,
            corrupt_fraction=self.corrupt_fraction,
            encoding=encoding,
            identity_keys=tuple(identity_keys) if identity_keys is not None else None,
            corrupt_parties=n_c,
            dropped_parties=d_max,
        )
        self._require_secure(params, n_c, d_max)
        return params

    def thresholds(self, num_parties: int, *, malicious: bool, roster_size: int | None = None) -> tuple[int, int]:
        """(k, t) this site derives for an announced n, without building parameters.

        Full SecAgg, (n - 1, n - d_max), for protocol='secagg' and whenever `distributed_noise` is set.

        `roster_size` counts n_C over a roster of that size when the policy pins none yet (a job
        checking, before its first round, that its sites can run the malicious setting at all).

        Raises:
            InsecureParameterError: no parameters meet this policy at this n (names the field).
        """
        self._require_family(("secagg", "secagg+"))
        n = num_parties
        if n < self.min_parties:
            raise InsecureParameterError(
                f"num_parties={n} is below this site's min_parties={self.min_parties}; announce more parties"
            )
        n_c = _ceil(self.corrupt_fraction * roster_size) if roster_size is not None else self.max_corrupt(n)
        d_max = self.max_dropped(n)
        if n_c + d_max >= n:
            raise InsecureParameterError(
                f"num_parties={n}: n_C={n_c} ({self._nc_basis(n)}) plus d_max={d_max} leave no honest survivor; "
                "announce a larger session, or lower corrupt_fraction or dropout_rate"
            )
        if self._full_graph:
            k, t = n - 1, n - d_max
            security, _ = _bounds(n, k, t, n_c, d_max, malicious)
            quorum = (n + n_c) // 2 + 1 if malicious else t
            if security > -self.sigma or max(quorum, t) > n - d_max:
                raise InsecureParameterError(
                    f"threshold: SecAgg at num_parties={n} with n_C={n_c} and d_max={d_max} has no secure threshold"
                    f"{' (the malicious setting needs 2t > n + n_C)' if malicious else ''}; lower dropout_rate "
                    "or corrupt_fraction, or announce more parties"
                )
        else:
            k, t = derive_secagg_plus(
                n,
                dropout_rate=self.dropout_rate,
                corrupt_fraction=self.corrupt_fraction,
                malicious=malicious,
                sigma=self.sigma,
                eta=self.eta,
                corrupt_parties=n_c,
                dropped_parties=d_max,
            )
        self._require_honest_survivors(t, n_c, n)
        return k, t

    # -- what this site accepts -------------------------------------------------------------------

    def check_secagg(
        self,
        params: SecAggParams,
        *,
        party_id: int,
        identity_public_key: bytes | None,
        signed_roster: SignedRoster | None = None,
    ) -> None:
        """Refuse announced parameters weaker than what this site derives for their n.

        Args:
            params: the parameters the server announced.
            party_id: this site's index in them.
            identity_public_key: this site's own Ed25519 public key, if it holds one.
            signed_roster: the roster the server relayed, when this site trusts a roster authority.

        Raises:
            InsecureParameterError: naming the offending field (protocol, num_parties, allow_insecure,
                roster, identity_keys, corrupt_parties, neighbours or threshold) and the fix. With
                `distributed_noise`, also any graph but the complete one (neighbours) and any
                threshold below n - d_max (threshold), whatever allow_insecure says.
        """
        if self.roster_authority is not None:
            self.with_roster(signed_roster).check_secagg(
                params, party_id=party_id, identity_public_key=identity_public_key
            )
            return
        self._require_family(("secagg", "secagg+"))
        n = params.num_parties
        if self.protocol == "secagg" and not params.complete:
            raise InsecureParameterError(
                f"neighbours={params.neighbours}: this site runs protocol='secagg' (complete graph, "
                f"neighbours={n - 1}), not SecAgg+; the server must announce SecAgg"
            )
        if self.distributed_noise:
            self._require_survivor_floor(params)
        if n < self.min_parties:
            raise InsecureParameterError(
                f"num_parties={n} is below this site's min_parties={self.min_parties}; announce more parties"
            )
        if not 0 <= party_id < n:
            raise InsecureParameterError(f"party_id={party_id} is outside 0..{n - 1}")
        if params.allow_insecure and not self.allow_insecure:
            raise InsecureParameterError(
                "allow_insecure: the server asks for parameters below the security bound; this site's policy "
                "has allow_insecure=false (set it to true in the site policy to accept them)"
            )
        self._check_identities(params, party_id, identity_public_key)
        n_c, d_max = self.max_corrupt(n), self.max_dropped(n)
        if not (params.allow_insecure and self.allow_insecure):
            # Evaluated under this site's n_C and the larger d_max: a larger announced d_max lowers the
            # survivor floor every SecAgg+ client enforces, so it counts against security.
            self._require_secure(params, n_c, max(d_max, params.max_dropped))
        self._require_honest_survivors(params.threshold, n_c, n)
        if params.max_corrupt < n_c:  # the consistency quorum (n + n_C) // 2 + 1 is computed from it
            raise InsecureParameterError(
                f"corrupt_parties: the parameters assume n_C={params.max_corrupt} but this site assumes "
                f"n_C={n_c} ({self._nc_basis(n)}); announce corrupt_parties >= {n_c}"
            )

    def check_he(self, *, num_parties: int) -> None:
        """Refuse an HE session this site's policy does not allow.

        With a single key holder, HE hides an update from the server only when no client colludes
        with it (the key holder decrypts anything the server hands it), so HE is refused whenever
        this site's n_C > 0; threshold decryption would lift that and is not implemented.

        Raises:
            InsecureParameterError: naming protocol, num_parties or corrupt_fraction.
        """
        self._require_family(("he",))
        if num_parties < self.min_parties:
            raise InsecureParameterError(
                f"num_parties={num_parties} is below this site's min_parties={self.min_parties}; announce more parties"
            )
        n_c = self.max_corrupt(num_parties)
        if self.roster_authority is not None and self.corrupt_fraction > 0:
            n_c = max(n_c, 1)  # the roster is not known here; any positive fraction of it is at least one party
        if n_c > 0:
            raise InsecureParameterError(
                f"corrupt_fraction={self.corrupt_fraction}: HE with a single key holder protects an update only "
                f"when no client colludes with the server, but this site assumes n_C={n_c} "
                f"({self._nc_basis(num_parties)}); use protocol='secagg' or 'secagg+', or set corrupt_fraction=0 "
                "only if no client can collude with the server"
            )

    def check_he_members(self, params: HEParams, *, party_id: int, identity_public_key: bytes | None) -> None:
        """Refuse HE parameters this site would not run, whatever its protocol choice (every host calls it).

        Signed hellos when the site holds an identity key or pins a roster (unsigned, a server could
        substitute its own X25519 key and intercept the secret key); this site's own key at its own
        index; no repeated key; no key outside a pinned roster (Sybil roster); and
        `min_contributions` >= `min_honest_survivors`, so the key holder never releases a sum of
        fewer honest inputs than the site requires (with min_contributions = 1 it would release its
        own update alone).

        Raises:
            InsecureParameterError: naming identity_keys, party_id or min_contributions.
        """
        n = params.num_parties
        if not 0 <= party_id < n:
            raise InsecureParameterError(f"party_id={party_id} is outside 0..{n - 1}")
        if self.malicious(identity_public_key):
            if params.identity_keys is None:
                raise InsecureParameterError(
                    "identity_keys: the server announced HE without identity keys (unsigned hellos: a server could "
                    "substitute its own key and intercept the secret key) but this site holds an identity key / "
                    "pins a roster and runs the malicious setting only; a downgrade is refused"
                )
            if identity_public_key is None:
                raise InsecureParameterError(
                    "identity_keys: this site pins a roster but holds no identity key of its own; configure it"
                )
        keys = params.identity_keys
        if keys is not None:
            if len(set(keys)) != len(keys):
                raise InsecureParameterError("identity_keys repeats a key: every party needs its own identity key")
            if identity_public_key is not None and keys[party_id] != identity_public_key:
                raise InsecureParameterError(
                    f"identity_keys[{party_id}] is not this site's identity key; the server must list each party's "
                    "own key at its own index"
                )
            if self.roster is not None:
                pinned = set(self.roster)
                strangers = [i for i, key in enumerate(keys) if key not in pinned]
                if strangers:
                    raise InsecureParameterError(
                        f"identity_keys{strangers[:8]}: {len(strangers)} key(s) are not in this site's pinned roster; "
                        "the server may only announce parties whose keys the site pinned (Sybil roster refused)"
                    )
        if params.min_contributions < self.min_honest_survivors:
            raise InsecureParameterError(
                f"min_contributions={params.min_contributions} is below this site's min_honest_survivors="
                f"{self.min_honest_survivors}: the key holder could release a sum of fewer inputs; the server "
                f"must announce min_contributions >= {self.min_honest_survivors}"
            )

    def check_plaintext(self) -> None:
        """Refuse to send an update in the clear unless this site chose protocol='plaintext'."""
        self._require_family(("plaintext",))

    # -- helpers ----------------------------------------------------------------------------------

    def _check_identities(self, params: SecAggParams, party_id: int, identity_public_key: bytes | None) -> None:
        """No downgrade to the semi-honest setting, only pinned keys, and this site's own key at its index."""
        n = params.num_parties
        if self.malicious(identity_public_key):
            if params.identity_keys is None:
                raise InsecureParameterError(
                    "identity_keys: the server announced no identity keys (the semi-honest setting) but this site "
                    "holds an identity key / pins a roster and runs the malicious setting only; the server must "
                    "announce every member's identity key (a downgrade is refused)"
                )
            if identity_public_key is None:
                raise InsecureParameterError(
                    "identity_keys: this site pins a roster but holds no identity key of its own; configure it"
                )
        if params.identity_keys is not None:
            self._check_members(params.identity_keys, n)
            if identity_public_key is not None and params.identity_keys[party_id] != identity_public_key:
                raise InsecureParameterError(
                    f"identity_keys[{party_id}] is not this site's identity key; the server must list each party's "
                    "own key at its own index"
                )

    def _require_family(self, families: tuple[str, ...]) -> None:
        if self.protocol not in families:
            raise InsecureParameterError(
                f"protocol: the server asks for {' / '.join(families)} but this site's policy runs "
                f"protocol={self.protocol!r}; the server cannot choose the protocol family"
            )

    def _check_members(self, keys: tuple[bytes, ...], n: int) -> None:
        if len(keys) != n:
            raise InsecureParameterError(f"identity_keys has {len(keys)} keys; need num_parties={n}")
        if len(set(keys)) != len(keys):
            raise InsecureParameterError("identity_keys repeats a key: every party needs its own identity key")
        if self.roster is None:
            return
        pinned = set(self.roster)
        strangers = [i for i, key in enumerate(keys) if key not in pinned]
        if strangers:
            raise InsecureParameterError(
                f"identity_keys{strangers[:8]}: {len(strangers)} key(s) are not in this site's pinned roster; "
                "the server may only announce parties whose keys the site pinned (Sybil roster refused)"
            )

    def _require_honest_survivors(self, threshold: int, n_c: int, n: int) -> None:
        if threshold - n_c < self.min_honest_survivors:
            raise InsecureParameterError(
                f"threshold={threshold} at num_parties={n}: t - n_C = {threshold - n_c} with n_C={n_c} "
                f"({self._nc_basis(n)}) is below min_honest_survivors={self.min_honest_survivors}; announce a "
                "larger session or threshold, or lower corrupt_fraction in the site policy"
            )

    def _require_secure(self, params: SecAggParams, n_c: int, d_max: int) -> None:
        n, k, t = params.num_parties, params.neighbours, params.threshold
        if n_c + d_max >= n:
            raise InsecureParameterError(
                f"num_parties={n}: n_C={n_c} ({self._nc_basis(n)}) plus d_max={d_max} leave no honest survivor; "
                "announce a larger session"
            )
        security, _ = _bounds(n, k, t, n_c, d_max, params.malicious)
        if security <= -self.sigma:
            return
        try:
            want_k, want_t = (
                (n - 1, n - d_max)
                if self._full_graph
                else derive_secagg_plus(
                    n,
                    dropout_rate=self.dropout_rate,
                    corrupt_fraction=self.corrupt_fraction,
                    malicious=params.malicious,
                    sigma=self.sigma,
                    eta=self.eta,
                    corrupt_parties=n_c,
                    dropped_parties=d_max,
                )
            )
            wanted = f"this site derives neighbours={want_k}, threshold={want_t}"
        except InsecureParameterError:
            want_k, want_t, wanted = n - 1, n, "no parameters meet this site's bounds at this n"
        field = "neighbours" if k < want_k else "threshold"
        raise InsecureParameterError(
            f"{field}: neighbours={k}, threshold={t} at num_parties={n} fail with probability "
            f"2^{security:.1f} > 2^-{self.sigma} under this site's n_C={n_c} ({self._nc_basis(n)}) and "
            f"d_max={d_max}; {wanted}; the server must announce at least those"
        )

    @property
    def _full_graph(self) -> bool:
        """Whether this site runs only the complete graph (plain SecAgg)."""
        return self.protocol == "secagg" or self.distributed_noise

    def _require_survivor_floor(self, params: SecAggParams) -> None:
        """Distributed noise: complete graph and t >= n - d_max (this site's d_max), or refuse."""
        n, d_max = params.num_parties, self.max_dropped(params.num_parties)
        if not params.complete:
            raise InsecureParameterError(
                f"neighbours={params.neighbours}: this site adds only its share of DP noise (distributed_noise=true), "
                f"calibrated for n - n_C - d_max honest survivors, and accepts only full SecAgg; SecAgg+'s "
                f"guarantee is per neighbourhood (a malicious server learns sums over groups of honest survivors); "
                f"the server must announce neighbours={n - 1} (SecAgg) and threshold >= n - d_max = {n - d_max}"
            )
        if params.threshold < n - d_max:
            raise InsecureParameterError(
                f"threshold={params.threshold} at num_parties={n}: this site adds only its share of DP noise "
                f"(distributed_noise=true), calibrated for n - n_C - d_max honest survivors with d_max={d_max}, so "
                f"no sum of fewer than n - d_max = {n - d_max} inputs may be released; announce threshold >= n - "
                f"d_max = {n - d_max}"
            )

    def _nc_basis(self, n: int) -> str:
        if self.roster is not None:
            return f"corrupt_fraction={self.corrupt_fraction} of a pinned roster of {len(self.roster)}"
        return f"corrupt_fraction={self.corrupt_fraction} of num_parties={n}"

    def describe(self) -> dict[str, Any]:
        """A short public summary (no keys): for logs and reports."""
        return {
            "protocol": self.protocol,
            "roster_size": None if self.roster is None else len(self.roster),
            "corrupt_fraction": self.corrupt_fraction,
            "dropout_rate": self.dropout_rate,
            "sigma": self.sigma,
            "eta": self.eta,
            "min_parties": self.min_parties,
            "min_honest_survivors": self.min_honest_survivors,
            "allow_insecure": self.allow_insecure,
            "distributed_noise": self.distributed_noise,
        }
