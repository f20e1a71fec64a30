"""Provision the three-site deployment example: a roster authority, three sites, the server's config.

Run `python examples/flower_app/make_sites.py DIR` (see README.md, section 2). Every role is
played here, on one machine, so the example runs anywhere; in a real deployment each step runs
where the comment says, and only the files named there cross between parties:

* each **site** creates its own identity key (`site_keys`) and sends only `identity.pub` to the
  authority; its data file, key and state folder never leave it;
* the **roster authority** (someone the sites trust to enrol parties, never the aggregator) signs
  the list of public keys (`sign_roster`) and publishes `roster.json` and `authority.pub`;
* each **site** writes a policy that trusts that authority for one label (`site_policy`): it then
  accepts from the server only a roster the authority signed, so a server that adds keys of its
  own (Sybils) or drops a site is refused before any site trains;
* the **server** gets `config.toml` and `roster.json`, which it relays and cannot forge.

Each site's data is a JSON-lines file of fictional records from the project's synthetic generator
(`secure_fedllm.data.synthetic`): different people, and a different size, at each site.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from protocols import SecurityPolicy, SignedRoster
from protocols.primitives import ed25519_public
from protocols.randomness import OsRandom, SecretSource
from secure_fedllm.config import RunConfig
from secure_fedllm.data.synthetic import Record, synthesize_federation
from secure_fedllm.site import SitePolicy, site_security_policy

__all__ = [
    "DATA_FIELDS",
    "Layout",
    "Site",
    "node_config",
    "provision",
    "sign_roster",
    "site_keys",
    "site_policy",
    "write_site_data",
]

DATA_FIELDS = "instruction=instruction,input=input,output=output,person=person_id"
"""node_config `data-fields` for the files written here: our field = the file's column."""

_SECRET_MODE = 0o600
_DIR_MODE = 0o700


@dataclass(frozen=True)
class Site:
    """One site's files: all of them stay on the site's machine except `identity.pub`."""

    index: int
    root: Path

    @property
    def data(self) -> Path:
        """Its records (JSON lines): never sent anywhere."""
        return self.root / "data.jsonl"

    @property
    def config(self) -> Path:
        """Its own copy of the run configuration; its `[privacy]` section is this site's policy."""
        return self.root / "config.toml"

    @property
    def policy(self) -> Path:
        """Its `SitePolicy`: protocol family, roster authority and label, n_C, floors, its key."""
        return self.root / "policy.toml"

    @property
    def state(self) -> Path:
        """Its private state folder (node_config `state-dir`): ledgers across jobs, seeds, secrets."""
        return self.root / "state"

    @property
    def identity_key(self) -> Path:
        """Its Ed25519 private key (64 hex digits), inside the state folder."""
        return self.state / "identity.key"

    @property
    def identity_pub(self) -> Path:
        """Its public key (64 hex digits): the one file the site sends to the roster authority."""
        return self.root / "identity.pub"


@dataclass(frozen=True)
class Layout:
    """Everything `provision` wrote under one folder."""

    root: Path
    sites: tuple[Site, ...]
    label: str

    @property
    def authority_key(self) -> Path:
        """The roster authority's private key: it stays with the authority (not the server)."""
        return self.root / "authority" / "authority.key"

    @property
    def authority_pub(self) -> Path:
        """The authority's public key, which every site pins in its policy."""
        return self.root / "authority" / "authority.pub"

    @property
    def roster(self) -> Path:
        """The signed roster (`SignedRoster` JSON): published by the authority, relayed by the server."""
        return self.root / "server" / "roster.json"

    @property
    def server_config(self) -> Path:
        """The server's run configuration (`flwr run --run-config config=...`)."""
        return self.root / "server" / "config.toml"


def _write_secret(path: Path, text: str) -> None:
    """Create a private file with 0600 from the start (no window where others may read it)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=_DIR_MODE)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _SECRET_MODE)
    with os.fdopen(fd, "w") as sink:
        sink.write(text)


def site_keys(site: Site, *, randomness: SecretSource | None = None) -> bytes:
    """At the site: create its state folder and identity key; return the public key it publishes.

    Refuses to replace an existing key (`FileExistsError`): the roster already names its public half.
    """
    site.state.mkdir(parents=True, exist_ok=True, mode=_DIR_MODE)
    os.chmod(site.state, _DIR_MODE)
    key = (randomness or OsRandom()).token_bytes(32)
    _write_secret(site.identity_key, key.hex())
    public = ed25519_public(key)
    site.identity_pub.write_text(public.hex())
    return public


def sign_roster(authority_key: bytes, label: str, keys: Sequence[bytes]) -> SignedRoster:
    """At the roster authority: sign every enrolled site's public key for one job label."""
    return SignedRoster.sign(authority_key, label, keys)


def site_policy(config: RunConfig, site: Site, *, authority: bytes, label: str) -> SitePolicy:
    """At the site: the run's security assumptions, but the roster only from `authority` for `label`.

    n_C and the dropout rate come from the site's own copy of the configuration; the roster itself is
    not pinned here (the authority may enrol sites later), only who may sign it.
    """
    base = site_security_policy(config, roster=None)
    security = SecurityPolicy(**{**base.model_dump(), "roster_authority": authority, "roster_label": label})
    return SitePolicy(
        security=security,
        identity_key=str(site.identity_key.relative_to(site.root)),
        state_dir=str(site.state.relative_to(site.root)),
    )


def write_site_data(site: Site, records: Sequence[Record]) -> None:
    """At the site: its own records as JSON lines (`instruction`, `input`, `output`, `person_id`)."""
    lines = [
        json.dumps({"instruction": r.instruction, "input": r.input, "output": r.output, "person_id": r.person_id})
        for r in records
    ]
    site.data.write_text("\n".join(lines) + "\n")


def node_config(site: Site) -> dict[str, str | int]:
    """The `flower-supernode --node-config` keys of this site (all paths on the site's machine)."""
    return {
        "partition-id": site.index,
        "config": str(site.config),
        "state-dir": str(site.state),
        "site-policy": str(site.policy),
        "data-path": str(site.data),
        "data-format": "jsonl",
        "data-fields": DATA_FIELDS,
    }


def provision(
    root: str | Path,
    config: RunConfig,
    *,
    records: Sequence[int] = (48, 64, 80),
    seed: int = 7,
    label: str = "secure-fedllm-example",
    randomness: SecretSource | None = None,
) -> Layout:
    """Write the whole example under `root` (which must not exist yet): three sites, authority, server.

    `config` is the job's run configuration; `federation.clients` must equal the number of sites.

    Raises:
        FileExistsError: `root` exists (nothing is overwritten: keys and ledgers must not be replaced).
        ValueError: `federation.clients` is not `len(records)`.
    """
    root = Path(root)
    if config.federation.clients != len(records):
        raise ValueError(
            f"federation.clients={config.federation.clients}: this example has {len(records)} sites; "
            f"set federation.clients={len(records)}"
        )
    root.mkdir(parents=True)
    source = randomness or OsRandom()
    sites = tuple(Site(i, root / f"site-{i}") for i in range(len(records)))
    layout = Layout(root, sites, label)
    # each site: its key (only the public half leaves), its data, its copy of the config
    people = synthesize_federation(len(sites), max(records), seed=seed, canary_repeats=())
    public = []
    for site, count in zip(sites, records, strict=True):
        public.append(site_keys(site, randomness=source))
        write_site_data(site, people.clients[site.index][:count])
        config.to_file(site.config)
    # the authority: its own key, the signed roster
    authority_key = source.token_bytes(32)
    _write_secret(layout.authority_key, authority_key.hex())
    layout.authority_pub.write_text(ed25519_public(authority_key).hex())
    signed = sign_roster(authority_key, label, public)
    # each site: trust the authority for this label
    for site in sites:
        site_policy(config, site, authority=ed25519_public(authority_key), label=label).to_file(site.policy)
    # the server: its config and the roster it relays
    layout.server_config.parent.mkdir(parents=True)
    config.to_file(layout.server_config)
    layout.roster.write_text(signed.model_dump_json())
    return layout


def _main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="where to write the example (must not exist)")
    parser.add_argument("--config", type=Path, help="a RunConfig TOML (secure-fedllm init-config); default: defaults")
    parser.add_argument("--label", default="secure-fedllm-example", help="what the authority signs the roster for")
    args = parser.parse_args(argv)
    config = RunConfig.from_file(args.config) if args.config else RunConfig()
    # three sites, each tolerating no dropout: the malicious setting with n = 3, n_C = 1 needs t = 3
    config = config.with_overrides(["federation.clients=3", "secure_aggregation.dropout_rate=0.0"])
    layout = provision(args.folder, config, label=args.label)
    for site in layout.sites:
        keys = " ".join(f'{k}="{v}"' if isinstance(v, str) else f"{k}={v}" for k, v in node_config(site).items())
        print(f"site {site.index}: --node-config '{keys}'")
    print(f"server: --run-config \"config='{layout.server_config}' signed-roster='{layout.roster}' out='...'\"")
    if shutil.which("flower-supernode") is None:
        print("(install the flower extra first: pip install -e '.[flower]')")


if __name__ == "__main__":
    _main()
