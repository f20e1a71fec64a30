"""A site's policy file: the security policy it enforces plus where its identity key and state live.

Each site (client) owns one `SitePolicy` file; the server never writes or sees it. It holds a
`protocols.SecurityPolicy` (protocol family, pinned roster, n_C and dropout assumptions, sigma, eta,
floors) and two local paths: the site's Ed25519 identity key file (64 hex digits, as
`SiteState.identity_key_path` writes it) and its state folder. Relative paths are resolved against
the policy file's folder, so a site's folder can be moved as a whole.

On Flower a SuperNode names the file in node config (`site-policy`); in process each simulated
client gets one derived from the RunConfig (`site_security_policy`).

The file round-trips through TOML or JSON (`from_file` / `to_file`); roster keys are hex strings.
An unknown key is an error, as in `RunConfig`: a misspelt security setting must never be dropped.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from protocols import InsecureParameterError, SecAggParams, SecurityPolicy, SignedRoster
from protocols.primitives import ed25519_public

from ..config import RunConfig, to_toml
from ..errors import ConfigError

__all__ = [
    "SITES_ENV",
    "SitePolicy",
    "check_setting",
    "load_identity_key",
    "site_policy_path",
    "site_security_policy",
]

SITES_ENV = "SECURE_FEDLLM_SITES"
"""Environment variable naming a folder of site state folders (set by the simulation launcher on this
machine, never by the server): a node without node_config `site-policy` reads
`<folder>/client-XXXX/policy.toml`."""

_FAMILY = {"secagg": "secagg", "secagg+": "secagg+", "he-bfv": "he", "he-ckks": "he", "none": "plaintext"}


def load_identity_key(path: str | Path) -> bytes:
    """Read a raw Ed25519 private key file (64 hex digits).

    Raises:
        ConfigError: the file is missing or not 64 hex digits.
    """
    try:
        key = bytes.fromhex(Path(path).read_text().strip())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"identity key {path}: {exc}; need a file of 64 hex digits (an Ed25519 private key)") from exc
    if len(key) != 32:
        raise ConfigError(f"identity key {path}: need 64 hex digits (an Ed25519 private key), found {len(key) * 2}")
    return key


class SitePolicy(BaseModel):
    """One site's policy file (see the module docstring)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["secure-fedllm.site-policy"] = "secure-fedllm.site-policy"
    schema_version: Literal[1] = 1
    security: SecurityPolicy = Field(default_factory=SecurityPolicy)  # type: ignore[arg-type]
    identity_key: str | None = Field(
        None, description="path of this site's Ed25519 private key file (64 hex digits); malicious setting"
    )
    state_dir: str | None = Field(None, description="this site's private state folder")
    base_dir: str | None = Field(None, exclude=True, description="folder relative paths resolve against")

    @model_validator(mode="after")
    def _roster_needs_key(self) -> SitePolicy:
        pins = self.security.roster is not None or self.security.roster_authority is not None
        if pins and self.identity_key is None:
            raise ValueError(
                "security.roster is pinned but identity_key is unset: a site pinning a roster needs its key"
            )
        return self

    # -- files ------------------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: dict[str, object], *, base_dir: str | Path | None = None) -> SitePolicy:
        """Validate a plain mapping.

        Raises:
            ConfigError: naming every bad field (dotted path) and its problem.
        """
        try:
            return cls.model_validate({**data, "base_dir": None if base_dir is None else str(base_dir)})
        except ValidationError as exc:
            problems = []
            for err in exc.errors():
                where = ".".join(str(p) for p in err["loc"]) or "site policy"
                message = err["msg"].removeprefix("Value error, ")
                if err["type"] == "extra_forbidden":
                    message = "unknown key; check its spelling"
                problems.append(f"{where}: {message}")
            raise ConfigError("invalid site policy:\n  " + "\n  ".join(problems)) from None

    @classmethod
    def from_file(cls, path: str | Path) -> SitePolicy:
        """Load a `.toml` or `.json` policy file (relative paths in it resolve against its folder).

        Raises:
            ConfigError: unreadable, unknown format or invalid content.
        """
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise ConfigError(f"site policy {path}: {exc}") from exc
        try:
            if path.suffix == ".toml":
                data = tomllib.loads(text)
            elif path.suffix == ".json":
                data = json.loads(text)
            else:
                raise ConfigError(f"{path}: unknown site policy format {path.suffix!r}; use .toml or .json")
        except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"site policy {path}: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a table")
        return cls.from_dict(data, base_dir=path.resolve().parent)

    def to_file(self, path: str | Path) -> None:
        """Save as TOML or JSON (by suffix); `from_file` gives back an equal policy."""
        path = Path(path)
        data = self.model_dump(mode="json", exclude_none=True)
        if path.suffix == ".toml":
            path.write_text(to_toml(data))
        elif path.suffix == ".json":
            path.write_text(json.dumps(data, indent=1))
        else:
            raise ConfigError(f"{path}: save a site policy as .toml or .json")

    def __eq__(self, other: object) -> bool:
        """Equal when the policy and paths are (where the file was read from does not matter)."""
        if not isinstance(other, SitePolicy):
            return NotImplemented
        return self.model_dump() == other.model_dump()

    # -- the site's identity ----------------------------------------------------------------------

    def _resolve(self, value: str) -> Path:
        path = Path(value)
        return path if path.is_absolute() or self.base_dir is None else Path(self.base_dir) / path

    @property
    def identity_key_path(self) -> Path | None:
        """The identity key file, resolved."""
        return None if self.identity_key is None else self._resolve(self.identity_key)

    @property
    def state_path(self) -> Path | None:
        """The state folder, resolved."""
        return None if self.state_dir is None else self._resolve(self.state_dir)

    def load_identity_key(self) -> bytes | None:
        """This site's Ed25519 private key, or None when it holds none (semi-honest setting)."""
        path = self.identity_key_path
        return None if path is None else load_identity_key(path)

    def check_secagg(
        self,
        params: SecAggParams,
        *,
        party_id: int,
        identity_key: bytes | None,
        signed_roster: SignedRoster | None = None,
    ) -> None:
        """`SecurityPolicy.check_secagg` with this site's own key (its public half is derived here).

        Raises:
            InsecureParameterError: the announced parameters are weaker than this policy allows.
        """
        public = ed25519_public(identity_key) if identity_key is not None else None
        if public is None and self.identity_key is not None:
            raise InsecureParameterError("identity_key: this site's policy names an identity key that was not loaded")
        self.security.check_secagg(params, party_id=party_id, identity_public_key=public, signed_roster=signed_roster)


def site_policy_path(sites: str | Path, client: int) -> Path:
    """Where client `client`'s policy file lives under a folder of site state folders.

    The same layout as `secure_fedllm.federation.site_folder` (`client-XXXX`), restated here so the
    Flower Mod can find a policy without importing the federation package (and torch).
    """
    return Path(sites) / f"client-{client:04d}" / "policy.toml"


def site_security_policy(config: RunConfig, *, roster: Sequence[bytes] | None) -> SecurityPolicy:
    """The `SecurityPolicy` a simulated site derives from a RunConfig (in process, and on Flower's simulation).

    The roster is every simulated client's public identity key (malicious setting) or None
    (`secure_aggregation.setting = "semi-honest"`). n_C is then counted over all clients of the job.
    """
    sa = config.secure_aggregation
    return SecurityPolicy(
        protocol=_FAMILY[sa.protocol],  # type: ignore[arg-type]
        roster=tuple(roster) if roster is not None else None,
        corrupt_fraction=sa.corrupt_fraction,
        dropout_rate=sa.dropout_rate,
        distributed_noise=config.privacy.mode == "distributed" and config.privacy.mechanism != "none",
    )


def check_setting(config: RunConfig) -> None:
    """Fail before round 0 when the sites' policy admits no parameters for a full cohort.

    HE with one key holder is refused by every site that assumes a corrupt client (n_C > 0), in
    either setting. In the malicious setting (2t > n + n_C, n_C over all clients) a small federation may have no
    threshold that also tolerates the assumed dropouts; better to say so than to stop after round 0.

    Raises:
        ConfigError: naming the settings to change.
    """
    sa = config.secure_aggregation
    cohort = config.federation.clients_per_round or config.federation.clients
    if sa.protocol.startswith("he-"):
        try:
            site_security_policy(config, roster=None).check_he(num_parties=cohort)
        except InsecureParameterError as exc:
            raise ConfigError(
                f"secure_aggregation.protocol={sa.protocol!r}: every site would refuse it: {exc}. Set "
                "secure_aggregation.corrupt_fraction=0 only if no client can collude with the server; otherwise "
                "use secure_aggregation.protocol='secagg+'"
            ) from exc
        return
    if sa.setting != "malicious" or sa.protocol not in ("secagg", "secagg+"):
        return
    policy = site_security_policy(config, roster=None)
    try:
        policy.thresholds(cohort, malicious=True, roster_size=config.federation.clients)
    except InsecureParameterError as exc:
        raise ConfigError(
            f"secure_aggregation.setting='malicious' with {cohort} clients per round of {config.federation.clients}: "
            f"{exc}. Lower secure_aggregation.dropout_rate or corrupt_fraction, add clients, or set "
            "secure_aggregation.setting='semi-honest' (only against a server that follows the protocol)"
        ) from exc
