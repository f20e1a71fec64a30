"""One site's private state folder: its secrets, its ledger, its releases and their session bindings.

Everything here belongs to one client and never goes to the server or into the run folder: the
run folder is what the server may publish, while this folder holds what would undo a client's
privacy if it leaked (the noise seeds regenerate its DP noise; the HMAC secret links its releases
to its data; the identity key lets anyone speak for it). The folder is created mode 0700 and every
file is written 0600, atomically and fsynced (`secure_fedllm.files.atomic_write`).

Layout of `<root>/`:

* `site.json`: format version and whether the site runs in the reproducible (insecure) mode.
* `secret.key`: 32 bytes from the CSPRNG, created once: the HMAC key of the release keys.
* `identity.key` / `identity.pub`: the site's Ed25519 identity (raw 32-byte private key, hex);
  the public half is what a roster pins.
* `ledgers/<population>.json`: the site's lifetime privacy ledgers
  (`secure_fedllm.privacy.PrivacyLedger`), one per population of data subjects, charged by every
  job that trains on that population (`SiteState.ledger_for`); `ledgers/<population>.units`: keyed
  digests of the population's privacy-unit ids, so that a job on overlapping but different data is
  told to charge the existing ledger instead of opening a fresh budget.
* `ledger.json`: a single-run ledger written before lifetime ledgers; the first lifetime ledger
  opened absorbs its events (the file is renamed `ledger.json.migrated`).
* `releases/<tag>.json` (+ `.f32`): per release, its fresh noise seed and the charged DP output,
  so that a re-request of the same release is answered without retraining or a second charge.
* `bindings/<tag>.json`: per release whose masked input (or ciphertext) was sent, the one session
  it was sent to: session id, transcript, and the survivor set it answered for.
* `bindings/tosses/<tag>.json`: per release, the sessions in which the site revealed a SecAgg+
  graph nonce (at most `SecurityPolicy.max_graph_tosses` of them).

A release key (`SiteState.release_key`) is an HMAC-SHA256, under the site secret, of everything the
update depends on (plan digest, global adapter, tokenized data, hyperparameters, template). Two
requests share a release only if all of that is equal; anything else is a new release, charged and
noised afresh. The key never leaves the site; `<tag>` is a hash of (job, round, release key).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from ..errors import ConfigError, ReleaseBindingError, SecureFedLLMError
from ..files import atomic_write

if TYPE_CHECKING:  # the ledger imports the accountants (opacus, torch); a Flower node's Mod must not
    from ..privacy import PrivacyLedger

__all__ = ["BindingBook", "ReleaseBinding", "SiteState", "SiteStateError", "population_id", "release_tag"]

_VERSION = 1
_FILE_MODE = 0o600
_DIR_MODE = 0o700


class SiteStateError(SecureFedLLMError):
    """A site state folder is unreadable, tampered with or opened in another mode; the message names the file."""


@dataclass(frozen=True)
class ReleaseBinding:
    """The one session a release went to: what a site compares every later request against."""

    job: str
    round: int
    session: bytes
    transcript: bytes
    survivors: tuple[int, ...] | None = None


_POPULATION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def population_id(units: Iterable[str]) -> str:
    """The id of a population of data subjects: a digest of its sorted, distinct privacy-unit ids.

    It depends on who is in the data, never on what their records say: correcting a record keeps
    the population (and its budget); the same people give the same ledger whatever the job. Under
    record-level DP without stable record ids the unit ids are positions (`record-<i>`), so the id
    then says "this many records"; a site that adds records names its population explicitly.
    """
    digest = hashlib.sha256(b"secure-fedllm/population/v1")
    for unit in sorted(set(units)):
        digest.update(_field(unit.encode()))
    return "units-" + digest.hexdigest()[:24]


def release_tag(job: str, round_number: int, release_key: bytes) -> str:
    """The name a release is filed under: a hash of (job, round, release key)."""
    digest = hashlib.sha256(b"secure-fedllm/release-tag|" + _field(job.encode()) + struct.pack(">q", round_number))
    digest.update(release_key)
    return digest.hexdigest()[:40]


class BindingBook:
    """Release -> session bindings over a store of JSON records (files in a site folder, or a node's Context).

    One update, one session: `bind` records the session a release's masked input goes to before it
    is sent; `check_binding` refuses every other session, transcript or survivor set afterwards.

    Args:
        load: tag -> the stored record, or None.
        store: write (tag, record) durably before returning.
    """

    def __init__(
        self, load: Callable[[str], dict[str, Any] | None], store: Callable[[str, dict[str, Any]], None]
    ) -> None:
        self._load, self._store = load, store

    def binding(self, job: str, round_number: int, release_key: bytes) -> ReleaseBinding | None:
        """The session this release is bound to, or None if its masked input never left."""
        data = self._load(release_tag(job, round_number, release_key))
        if data is None:
            return None
        try:
            survivors = data.get("survivors")
            return ReleaseBinding(
                job=str(data["job"]),
                round=int(data["round"]),
                session=bytes.fromhex(str(data["session"])),
                transcript=bytes.fromhex(str(data["transcript"])),
                survivors=None if survivors is None else tuple(int(s) for s in survivors),
            )
        except (KeyError, ValueError, TypeError) as exc:
            raise SiteStateError(f"release binding {release_tag(job, round_number, release_key)}: {exc!r}") from exc

    def bind(self, job: str, round_number: int, release_key: bytes, session: bytes, transcript: bytes) -> None:
        """Bind a release to the session its masked input is about to go to (stored BEFORE it is sent).

        Binding the same session again is a no-op (a resent message after a restart).

        Raises:
            ReleaseBindingError: the release is already bound to another session or transcript.
        """
        existing = self.binding(job, round_number, release_key)
        if existing is not None:
            _compare(existing, session, transcript)
            return
        record = {"job": job, "round": round_number, "session": session.hex(), "transcript": transcript.hex()}
        self._store(release_tag(job, round_number, release_key), record)

    def check_binding(
        self,
        job: str,
        round_number: int,
        release_key: bytes,
        *,
        session: bytes,
        transcript: bytes | None = None,
        survivors: tuple[int, ...] | None = None,
    ) -> None:
        """Refuse any session, transcript (roster, parameters) or survivor set other than the bound one.

        An unbound release passes (it may still join a new session with fresh keys). The first
        survivor set answered for is recorded, durably, before the answer leaves; another one is
        refused, whatever state the protocol session was restored from.

        Raises:
            ReleaseBindingError: the request does not match the bound session.
        """
        existing = self.binding(job, round_number, release_key)
        if existing is None:
            return
        _compare(existing, session, transcript)
        if survivors is None:
            return
        chosen = tuple(sorted(survivors))
        if existing.survivors is None:
            tag = release_tag(job, round_number, release_key)
            self._store(tag, {**(self._load(tag) or {}), "survivors": list(chosen)})
        elif existing.survivors != chosen:
            raise ReleaseBindingError(
                f"round {round_number}: this release already answered for survivors {list(existing.survivors)}; "
                f"a request for {list(chosen)} is refused (a second answer would reveal the masks it hides)"
            )

    def graph_tosses(self, job: str, round_number: int, release_key: bytes) -> tuple[bytes, ...]:
        """The sessions in which this release's site revealed a graph nonce, oldest first."""
        tag = _toss_tag(job, round_number, release_key)
        data = self._load(tag)
        if data is None:
            return ()
        try:
            sessions = tuple(bytes.fromhex(str(h)) for h in data["sessions"])
        except (KeyError, ValueError, TypeError) as exc:
            raise SiteStateError(f"graph toss record {tag}: {exc!r}") from exc
        if any(len(x) != 16 for x in sessions) or len(set(sessions)) != len(sessions):
            raise SiteStateError(f"graph toss record {tag}: session ids must be 16 bytes and distinct")
        return sessions

    def record_graph_toss(
        self, job: str, round_number: int, release_key: bytes, session: bytes, *, max_graph_tosses: int
    ) -> int:
        """Count a graph-nonce reveal for this release, durably, BEFORE the reveal is sent.

        A reveal for a session already counted (a message resent after a restart) counts once.

        Returns:
            the number of sessions counted for this release, this one included.

        Raises:
            ReleaseBindingError: the release already revealed in `max_graph_tosses` other sessions.
        """
        if max_graph_tosses < 1:
            raise ValueError(f"max_graph_tosses={max_graph_tosses} must be at least 1")
        sessions = self.graph_tosses(job, round_number, release_key)
        if session in sessions:
            return len(sessions)
        if len(sessions) >= max_graph_tosses:
            raise ReleaseBindingError(
                f"round {round_number}: this release already joined {len(sessions)} SecAgg+ graph tosses, the "
                f"site's max_graph_tosses={max_graph_tosses}; session {session.hex()[:16]}... is refused (a server "
                "that aborts tosses would otherwise choose among as many graphs as it likes); the server must "
                "plan a new round, or the site raise max_graph_tosses in its policy"
            )
        record = {"job": job, "round": round_number, "sessions": [x.hex() for x in (*sessions, session)]}
        self._store(_toss_tag(job, round_number, release_key), record)
        return len(sessions) + 1


def _toss_tag(job: str, round_number: int, release_key: bytes) -> str:
    return "tosses/" + release_tag(job, round_number, release_key)


def _compare(existing: ReleaseBinding, session: bytes, transcript: bytes | None) -> None:
    if existing.session != session:
        raise ReleaseBindingError(
            f"round {existing.round}: this release was sent to session {existing.session.hex()[:16]}... and "
            f"is refused in session {session.hex()[:16]}...: one update goes to one session only (a second "
            "sum without some client would reveal its update); the server must plan a new round"
        )
    if transcript is not None and transcript != existing.transcript:
        raise ReleaseBindingError(
            f"round {existing.round}: session {session.hex()[:16]}... now has another transcript (roster or "
            "parameters) than the one this release was sent under; refused"
        )


class SiteState:
    """A client's private state folder (see the module docstring for its layout).

    Args:
        root: the folder (created 0700 if absent).
        reproducible_seed: derive the site secret (hence every release key and noise seed) from
            this public value instead of the CSPRNG. For reproducible experiments only
            (`privacy.noise_seed`): anyone who knows it can regenerate the noise. Fixed when the
            folder is created; reopening in the other mode raises `SiteStateError`.
    """

    def __init__(self, root: Path, *, reproducible_seed: bytes | None = None) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True, mode=_DIR_MODE)
        os.chmod(root, _DIR_MODE)
        meta_path = root / "site.json"
        mode = "reproducible" if reproducible_seed is not None else "secure"
        if meta_path.exists():
            meta = self._read_json(meta_path)
            if meta.get("version") != _VERSION or meta.get("mode") not in ("secure", "reproducible"):
                raise SiteStateError(f"{meta_path}: unknown site state format {meta!r}")
            if meta["mode"] != mode:
                raise SiteStateError(
                    f"{root} was created in {meta['mode']} mode but is opened in {mode} mode: "
                    "privacy.noise_seed must not change over the life of a site's state"
                )
        else:
            self._write(meta_path, json.dumps({"version": _VERSION, "mode": mode}).encode())
        self.reproducible = reproducible_seed is not None
        secret_path = root / "secret.key"
        if secret_path.exists():
            secret = secret_path.read_bytes()
            if len(secret) != 32:
                raise SiteStateError(f"{secret_path}: the site secret must be 32 bytes, found {len(secret)}")
        else:
            if reproducible_seed is not None:
                secret = hashlib.sha256(b"secure-fedllm/site-secret/reproducible|" + reproducible_seed).digest()
            else:
                secret = os.urandom(32)
            self._write(secret_path, secret)
        self._secret = secret

    @classmethod
    def open(cls, root: str | Path, *, reproducible_seed: bytes | None = None) -> SiteState:
        """Open (creating if needed) the state folder at `root`."""
        return cls(Path(root), reproducible_seed=reproducible_seed)

    # -- identity --------------------------------------------------------------------------------

    @property
    def identity_key(self) -> bytes:
        """The site's raw 32-byte Ed25519 private key (created once, from the CSPRNG)."""
        path = self.root / "identity.key"
        if path.exists():
            try:
                key = bytes.fromhex(path.read_text().strip())
            except ValueError as exc:
                raise SiteStateError(f"{path}: not hex ({exc})") from exc
            if len(key) != 32:
                raise SiteStateError(f"{path}: an Ed25519 private key is 64 hex digits, found {len(key) * 2}")
            return key
        key = os.urandom(32)
        self._write(path, key.hex().encode())
        self._write(self.root / "identity.pub", _public(key).hex().encode(), mode=0o644)
        return key

    @property
    def identity_public_key(self) -> bytes:
        """The raw 32-byte Ed25519 public key, for the roster other sites pin."""
        return _public(self.identity_key)

    @property
    def identity_key_path(self) -> Path:
        """The identity key file (64 hex digits), created if absent (what node_config `secagg-identity-key` names)."""
        _ = self.identity_key
        return self.root / "identity.key"

    # -- the ledger ------------------------------------------------------------------------------

    @property
    def ledger_path(self) -> Path:
        """Where a single-run ledger lived before lifetime ledgers (`ledger_for` migrates it)."""
        return self.root / "ledger.json"

    def ledger_path_for(self, population: str) -> Path:
        """The lifetime ledger file of `population` (a name checked to be a safe file name)."""
        if not _POPULATION_NAME.fullmatch(population):
            raise ConfigError(
                f"privacy population {population!r}: a population name is 1-64 letters, digits, '.', '_' or '-' "
                "(starting with a letter or digit); choose such a name"
            )
        return self.root / "ledgers" / f"{population}.json"

    def ledger_for(
        self,
        population: str,
        *,
        job: str,
        epsilon_budget: float,
        delta: float,
        accountant: str,
        neighbouring: str,
        client: int = 0,
        units: Iterable[str] | None = None,
    ) -> PrivacyLedger:
        """The lifetime ledger of `population` at this site, opened to charge `job`.

        Every job on the same population is composed into this one ledger by the accountant and
        charged against the lifetime `epsilon_budget` fixed when the ledger was created (a job may
        ask for a smaller one, never a larger one). `population` is `population_id(units)` or a name
        from the site's configuration. Given `units` (the privacy-unit ids the job trains on), a
        population that shares a unit with another population's ledger is refused: the people in
        both would otherwise have two budgets.

        Raises:
            ConfigError: a bad population name, a ledger accounted under another relation, units
                shared with another population, or an unreadable ledger (each names the file).
        """
        path = self.ledger_path_for(population)
        keyed = None if units is None else sorted({self._unit_key(u) for u in units})
        if keyed is not None:
            self._check_overlap(population, set(keyed))
        fresh = not path.exists()
        from ..privacy import PrivacyLedger

        ledger = PrivacyLedger.open(
            path,
            client=client,
            epsilon_budget=epsilon_budget,
            delta=delta,
            accountant=accountant,
            neighbouring=neighbouring,
            job=job,
            population=population,
        )
        if ledger.neighbouring != neighbouring:
            raise ConfigError(
                f"client {client}: its ledger {path} accounts privacy.neighbouring={ledger.neighbouring!r} but the "
                f"config says {neighbouring!r}; set privacy.neighbouring to the ledger's relation (a population's "
                "lifetime budget is accounted under one relation)"
            )
        if fresh and self.ledger_path.exists():
            self._migrate(ledger)
        if keyed is not None:
            units_path = path.with_suffix(".units")
            known = set(self._read_units(units_path)) if units_path.exists() else set()
            if not set(keyed) <= known:
                self._write(units_path, json.dumps(sorted(known | set(keyed))).encode())
        return ledger

    lifetime_ledger = ledger_for

    def ledgers(self) -> list[PrivacyLedger]:
        """Every ledger of this site (lifetime ones, then a not yet migrated single-run one), read-only."""
        paths = sorted((self.root / "ledgers").glob("*.json"))
        if self.ledger_path.exists():
            paths.append(self.ledger_path)
        return [_read_ledger(p) for p in paths]

    def _migrate(self, ledger: PrivacyLedger) -> None:
        """Fold the old single-run ledger's events into a new lifetime ledger, then set the old file aside.

        The new ledger is written first: a crash before the rename counts the old events twice
        (conservative), never zero times.
        """
        ledger.absorb(_read_ledger(self.ledger_path).entries)
        os.replace(self.ledger_path, self.ledger_path.with_name("ledger.json.migrated"))

    def _unit_key(self, unit: str) -> str:
        # Keyed by the site secret: the folder never holds person ids in the clear for this purpose.
        return hmac.new(self._secret, b"population-unit|" + unit.encode(), hashlib.sha256).hexdigest()[:24]

    def _read_units(self, path: Path) -> list[str]:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise SiteStateError(f"{path}: unreadable ({exc}); restore it or remove it with its ledger's care") from exc
        if not isinstance(data, list) or not all(isinstance(x, str) for x in data):
            raise SiteStateError(f"{path}: expected a JSON list of unit digests")
        return data

    def _check_overlap(self, population: str, keyed: set[str]) -> None:
        for other in sorted((self.root / "ledgers").glob("*.units")):
            if other.stem == population:
                continue
            shared = keyed & set(self._read_units(other))
            if shared:
                raise ConfigError(
                    f"privacy population {population!r}: {len(shared)} of its privacy units are already in population "
                    f"{other.stem!r} (ledger {other.with_suffix('.json')}); their privacy loss must be charged to one "
                    f"budget: name the population {other.stem!r} in the site's configuration to go on charging it"
                )

    # -- releases --------------------------------------------------------------------------------

    def release_key(self, **parts: bytes | str | int | float | npt.NDArray[Any] | Mapping[str, Any]) -> bytes:
        """HMAC-SHA256 under the site secret of everything the update depends on (names sorted).

        Secret: it never leaves the site. Only public values such as the plan digest enter a transcript.
        """
        mac = hmac.new(self._secret, b"secure-fedllm/release-key/v1", hashlib.sha256)
        for name in sorted(parts):
            mac.update(_field(name.encode()))
            mac.update(_field(_canonical(parts[name])))
        return mac.digest()

    def noise_seed(self, job: str, round_number: int, release_key: bytes) -> bytes:
        """The release's 32-byte noise seed: drawn from os.urandom on first use, then kept here only.

        Never derived from the round or the plan: a server that re-requests a round with any change
        gets fresh noise (and a second charge), never the same noise on other inputs. In
        reproducible mode it is an HMAC of the release key under the (public-seeded) site secret.
        """
        path = self._release_path(job, round_number, release_key, ".json")
        if path.exists():
            record = self._read_json(path)
            try:
                seed = bytes.fromhex(str(record["seed"]))
            except (KeyError, ValueError) as exc:
                raise SiteStateError(f"{path}: no valid noise seed ({exc!r})") from exc
            if len(seed) != 32:
                raise SiteStateError(f"{path}: the noise seed must be 32 bytes")
            return seed
        if self.reproducible:
            seed = hmac.new(self._secret, b"noise-seed|" + release_key, hashlib.sha256).digest()
        else:
            seed = os.urandom(32)
        self._write(path, json.dumps({"job": job, "round": round_number, "seed": seed.hex()}).encode())
        return seed

    def save_output(
        self, job: str, round_number: int, release_key: bytes, output: npt.NDArray[np.float32] | npt.NDArray[np.int64]
    ) -> None:
        """Keep the release's DP output (before it is charged), dropping the outputs of other rounds.

        Only the latest round's outputs are kept: they serve re-requests after a crash or an abort
        before the masked input went out; an older round is never asked for again without a new plan.
        A float update is kept as float32; distributed DP's integer vector as int64 (float32 would
        round integers above 2^24).
        """
        integer = np.issubdtype(np.asarray(output).dtype, np.integer)
        suffix, dtype = (".i64", "<i8") if integer else (".f32", "<f4")
        path = self._release_path(job, round_number, release_key, suffix)
        self._write(path, np.ascontiguousarray(output, dtype=dtype).tobytes())
        for pattern in ("*.f32", "*.i64"):
            for old in (self.root / "releases").glob(pattern):
                if old != path and _round_of(old.with_suffix(".json")) != round_number:
                    old.unlink()

    def load_output(
        self, job: str, round_number: int, release_key: bytes
    ) -> npt.NDArray[np.float32] | npt.NDArray[np.int64] | None:
        """The stored DP output of this release (float32, or int64 for distributed DP), or None if never stored."""
        integer = self._release_path(job, round_number, release_key, ".i64")
        if integer.exists():
            return np.frombuffer(integer.read_bytes(), dtype="<i8").astype(np.int64)
        path = self._release_path(job, round_number, release_key, ".f32")
        if not path.exists():
            return None
        return np.frombuffer(path.read_bytes(), dtype="<f4").astype(np.float32)

    # -- session bindings ------------------------------------------------------------------------

    @property
    def bindings(self) -> BindingBook:
        """The site's release -> session bindings, one fsynced file per bound release."""
        return self.bindings_at(self.root)

    @staticmethod
    def bindings_at(root: Path) -> BindingBook:
        """The bindings of the state folder at `root`, without opening its secrets (what the Flower Mod needs)."""
        folder = root / "bindings"

        def load(tag: str) -> dict[str, Any] | None:
            path = folder / f"{tag}.json"
            return SiteState._read_json(path) if path.exists() else None

        def store(tag: str, record: dict[str, Any]) -> None:
            path = folder / f"{tag}.json"  # a tag may name a subfolder ("tosses/<tag>")
            for parent in (folder, path.parent):
                if not parent.exists():
                    parent.mkdir(parents=True, mode=_DIR_MODE)
            atomic_write(path, json.dumps(record).encode(), mode=_FILE_MODE)

        return BindingBook(load, store)

    def binding(self, job: str, round_number: int, release_key: bytes) -> ReleaseBinding | None:
        """The session this release is bound to, or None if its masked input never left."""
        return self.bindings.binding(job, round_number, release_key)

    def bind(self, job: str, round_number: int, release_key: bytes, session: bytes, transcript: bytes) -> None:
        """Bind a release to the session its masked input is about to go to (fsynced BEFORE it is sent).

        Raises:
            ReleaseBindingError: the release is already bound to another session or transcript.
        """
        self.bindings.bind(job, round_number, release_key, session, transcript)

    def check_binding(
        self,
        job: str,
        round_number: int,
        release_key: bytes,
        *,
        session: bytes,
        transcript: bytes | None = None,
        survivors: tuple[int, ...] | None = None,
    ) -> None:
        """See `BindingBook.check_binding`.

        Raises:
            ReleaseBindingError: the request does not match the bound session.
        """
        self.bindings.check_binding(
            job, round_number, release_key, session=session, transcript=transcript, survivors=survivors
        )

    def is_bound(self, job: str, round_number: int, release_key: bytes) -> bool:
        """True if this release's masked input already went to some session."""
        return self.binding(job, round_number, release_key) is not None

    # -- internals -------------------------------------------------------------------------------

    def _release_path(self, job: str, round_number: int, release_key: bytes, suffix: str) -> Path:
        return self.root / "releases" / (release_tag(job, round_number, release_key) + suffix)

    def _write(self, path: Path, data: bytes, *, mode: int = _FILE_MODE) -> None:
        if not path.parent.exists():
            path.parent.mkdir(parents=True, mode=_DIR_MODE)
        atomic_write(path, data, mode=mode)

    @staticmethod
    def _read_json(path: Path) -> dict[str, Any]:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise SiteStateError(f"{path}: unreadable ({exc})") from exc
        if not isinstance(data, dict):
            raise SiteStateError(f"{path}: expected a JSON object")
        return data


def _read_ledger(path: Path) -> PrivacyLedger:
    """A ledger as stored (its own settings), for reading and migration."""
    from ..privacy import PrivacyLedger

    return PrivacyLedger.open(path, client=0, epsilon_budget=0.0, delta=0.0, accountant="rdp")


def _public(key: bytes) -> bytes:
    return Ed25519PrivateKey.from_private_bytes(key).public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def _field(data: bytes) -> bytes:
    return struct.pack(">Q", len(data)) + data


def _canonical(value: bytes | str | int | float | npt.NDArray[Any] | Mapping[str, Any]) -> bytes:
    if isinstance(value, bytes):
        return b"b" + value
    if isinstance(value, str):
        return b"s" + value.encode()
    if isinstance(value, bool | int):
        return b"i" + str(int(value)).encode()
    if isinstance(value, float):
        return b"f" + float(value).hex().encode()
    if isinstance(value, np.ndarray):
        array = np.ascontiguousarray(value)
        return b"a" + array.dtype.str.encode() + b"|" + repr(array.shape).encode() + b"|" + array.tobytes()
    return b"j" + json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def _round_of(path: Path) -> int | None:
    try:
        return int(json.loads(path.read_text())["round"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
