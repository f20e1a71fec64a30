"""Where the records come from and how they are split between clients and the server's held-out set.

Sources: the synthetic private-records generator (default; needs nothing outside the repository),
an Alpaca-format JSON or JSON-lines file, or a local Hugging Face dataset folder (`save_to_disk`).
The held-out records are the server's own: they are never part of any client's data, and only the
server evaluates on them. The privacy unit of each record is kept: its person id under user-level
DP, else the record itself.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from ..config import RunConfig
from ..errors import ConfigError
from .synthetic import synthesize_federation

__all__ = [
    "FederationData",
    "TextRecord",
    "load_alpaca",
    "load_federation_data",
    "load_hf_folder",
    "partition",
    "read_json_rows",
    "read_source_rows",
]


@dataclass(frozen=True)
class TextRecord:
    """An instruction record and its privacy unit (a person id, or the record's own id)."""

    instruction: str
    input: str
    output: str
    unit: str


@dataclass
class FederationData:
    """Per-client records, the server's held-out records, and the canary manifest (synthetic only)."""

    clients: list[list[TextRecord]]
    heldout: list[TextRecord]
    canaries: list[dict[str, Any]] = field(default_factory=list)


def load_alpaca(path: str | Path) -> list[dict[str, Any]]:
    """Alpaca-format records (instruction, input, output) from a JSON array or a JSON-lines file.

    Raises:
        ConfigError: the file is missing, malformed, or a record lacks `instruction`/`output`.
    """
    rows = read_json_rows(path)
    for where, row in rows:
        if "instruction" not in row or "output" not in row:
            raise ConfigError(f"data.path={str(path)!r}: {where} needs 'instruction' and 'output' fields")
    return [row for _, row in rows]


def read_json_rows(
    path: str | Path, *, key: str = "data.path", lines: bool | None = None
) -> list[tuple[str, dict[str, Any]]]:
    """The JSON objects of a JSON array or a JSON-lines file, each with where it is ("record 3", "line 7").

    `lines` None guesses from the first character (an array starts with '['). Errors name `key`,
    the file, and the record or line.

    Raises:
        ConfigError: the file is missing, empty, not JSON, or holds something other than objects.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{key}={str(path)!r} is not a file; give the path of the data file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{key}={str(path)!r}: unreadable ({exc}); give a readable UTF-8 file") from exc
    if not text.strip():
        raise ConfigError(f"{key}={str(path)!r}: the file is empty; it must hold at least one record")
    if lines is None:
        lines = not text.lstrip().startswith("[")
    rows = _json_lines(text, path, key) if lines else _json_array(text, path, key)
    if not rows:
        raise ConfigError(f"{key}={str(path)!r}: no records; it must hold at least one")
    for where, row in rows:
        if not isinstance(row, dict):
            raise ConfigError(f"{key}={str(path)!r}: {where} is a {type(row).__name__}, not a JSON object")
    return rows


def _json_lines(text: str, path: Path, key: str) -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((f"line {number}", json.loads(line)))
        except json.JSONDecodeError as exc:
            raise ConfigError(
                f"{key}={str(path)!r}: line {number} is not a JSON object ({exc.msg} at column {exc.colno}); "
                "write one JSON object per line"
            ) from exc
    return rows


def _json_array(text: str, path: Path, key: str) -> list[tuple[str, Any]]:
    try:
        loaded = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{key}={str(path)!r}: not JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}); "
            "write a JSON array of objects or one object per line"
        ) from exc
    if not isinstance(loaded, list):
        raise ConfigError(f"{key}={str(path)!r}: expected a JSON array of records, found {type(loaded).__name__}")
    return [(f"record {i}", row) for i, row in enumerate(loaded)]


def load_hf_folder(path: str, *, key: str = "data.path") -> list[dict[str, Any]]:
    """Rows of a local Hugging Face dataset folder (`save_to_disk`); errors name `key` (the setting or node config)."""
    try:
        import datasets
    except ImportError as exc:
        raise ConfigError(
            f"{key}={path!r}: a Hugging Face dataset folder needs the `datasets` package: pip install datasets"
        ) from exc
    try:
        loaded = datasets.load_from_disk(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"{key}={path!r}: not a Hugging Face dataset folder ({exc}); give a folder written by save_to_disk"
        ) from exc
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise ConfigError(f"{key}={path!r}: the dataset has splits {sorted(loaded)} but no 'train'; save one")
        loaded = loaded["train"]
    return [dict(row) for row in loaded]


def partition(
    rows: Sequence[dict[str, Any]], num_clients: int, *, how: str, seed: int, alpha: float = 0.5, by: str | None = None
) -> list[list[int]]:
    """Row indices per client, by `how`.

    `iid` is a shuffled equal split, `dirichlet` draws client sizes from Dir(alpha) (at least one
    row each: quantity skew), `field` sends all rows with the same value of `by` to one client.
    """
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(rows)).tolist()
    if len(rows) < num_clients:
        raise ConfigError(f"{len(rows)} records cannot be split over federation.clients={num_clients}")
    if how == "iid":
        return [sorted(order[c::num_clients]) for c in range(num_clients)]
    if how == "dirichlet":
        shares = rng.dirichlet([alpha] * num_clients)
        sizes = np.maximum(1, np.floor(shares * (len(rows) - num_clients)).astype(int) + 1)
        cuts = np.cumsum(sizes)[:-1]
        return [sorted(part.tolist()) for part in np.split(np.array(order), cuts)]
    if by is None:
        raise ConfigError("partition='field' needs data.partition_field")
    values = sorted({str(row.get(by)) for row in rows})
    if len(values) < num_clients:
        raise ConfigError(f"data.partition_field={by!r} has {len(values)} values; need >= {num_clients} clients")
    owner = {v: i % num_clients for i, v in enumerate(random.Random(seed).sample(values, len(values)))}
    parts: list[list[int]] = [[] for _ in range(num_clients)]
    for i, row in enumerate(rows):
        parts[owner[str(row.get(by))]].append(i)
    return parts


def load_federation_data(config: RunConfig) -> FederationData:
    """Records for every client and the server's held-out set, as the config describes."""
    data, fed = config.data, config.federation
    heldout_n = config.evaluation.heldout_records
    if data.source == "synthetic":
        try:
            federation = synthesize_federation(
                fed.clients,
                data.records_per_client,
                seed=fed.seed,
                shared_canary_prompts=data.canary_prompts == "shared",
            )
        except ValueError as exc:  # too few records per client for the planted canaries
            raise ConfigError(
                f"data.records_per_client={data.records_per_client}: {exc}; raise data.records_per_client"
            ) from None
        server = synthesize_federation(1, heldout_n, seed=fed.seed + 1_000_003, canary_repeats=())
        by_person = config.privacy.unit == "user"
        clients = [[_synthetic(r, i, by_person) for i, r in enumerate(recs)] for recs in federation.clients]
        heldout = [_synthetic(r, i, False) for i, r in enumerate(server.clients[0])]
        return FederationData(clients, heldout, federation.manifest())
    rows = read_source_rows(config)
    if len(rows) <= heldout_n:
        raise ConfigError(f"{len(rows)} records leave none for clients after evaluation.heldout_records={heldout_n}")
    shuffled = np.random.default_rng(fed.seed).permutation(len(rows)).tolist()
    server_rows = [rows[i] for i in shuffled[:heldout_n]]
    client_rows = [rows[i] for i in shuffled[heldout_n:]]
    user_field = config.privacy.user_field if config.privacy.unit == "user" else None
    parts = _split(client_rows, config, user_field)
    clients = [[_row(client_rows[i], i, user_field) for i in part] for part in parts]
    heldout = [_row(row, i, None, prefix="heldout-") for i, row in enumerate(server_rows)]
    return FederationData(clients, heldout)


def read_source_rows(config: RunConfig) -> list[dict[str, Any]]:
    """The rows of a file source, with `data.fields` applied: each has instruction, output (and input) keys.

    Other columns stay (a partition field or person field may be any column).

    Raises:
        ConfigError: the file is unreadable or malformed, or a row lacks a mapped column (named with
            its line or row, and the setting that maps it).
    """
    data = config.data
    assert data.path is not None  # checked by DataConfig
    labelled: list[tuple[str, dict[str, Any]]]
    if data.source == "file":
        from .site_data import SiteDataSpec, read_site_rows

        try:
            spec = SiteDataSpec(path=Path(data.path), format=data.format)
        except ValidationError as exc:
            message = exc.errors()[0]["msg"].removeprefix("Value error, ").replace("data-format", "data.format")
            raise ConfigError(f"data.path={data.path!r}: {message}") from None
        labelled = read_site_rows(spec, key="data.path")
    elif data.source == "alpaca":
        labelled = read_json_rows(data.path)
    else:
        labelled = [(f"row {i}", row) for i, row in enumerate(load_hf_folder(data.path))]
    rows = []
    for label, row in labelled:
        mapped = dict(row)
        for ours in ("instruction", "input", "output"):
            column = data.fields.get(ours, ours)
            if column in row:
                mapped[ours] = row[column]
            elif ours != "input":
                how = f"data.fields maps {ours} to {column!r}" if ours in data.fields else f"no {ours!r} column"
                raise ConfigError(
                    f"data.path={data.path!r}: {label} has {how}; map {ours} to an existing column with "
                    f"--set 'data.fields={{{ours} = \"<column>\"}}' (columns: {', '.join(map(str, row)) or 'none'})"
                )
        rows.append(mapped)
    return rows


def _split(rows: list[dict[str, Any]], config: RunConfig, user_field: str | None) -> list[list[int]]:
    """Partition rows; under user-level DP, every person's rows go to one client.

    Otherwise a person's privacy loss would add up across the clients holding their records,
    uncounted by any one ledger.
    """
    data, fed = config.data, config.federation
    if user_field is None:
        return partition(rows, fed.clients, how=data.partition, seed=fed.seed, alpha=data.dirichlet_alpha,
                         by=data.partition_field)  # fmt: skip
    for row in rows:
        if user_field not in row:
            raise ConfigError(f"privacy.user_field={user_field!r} is missing from a record; name an existing field")
    if data.partition == "field":
        parts = partition(rows, fed.clients, how="field", seed=fed.seed, by=data.partition_field)
        owner: dict[str, int] = {}
        for client, part in enumerate(parts):
            for i in part:
                if owner.setdefault(str(rows[i][user_field]), client) != client:
                    raise ConfigError(
                        f"data.partition_field={data.partition_field!r} puts person {rows[i][user_field]!r} at two "
                        f"clients; under user-level DP partition by privacy.user_field={user_field!r} instead"
                    )
        return parts
    users = sorted({str(row[user_field]) for row in rows})
    by_user: dict[str, list[int]] = {u: [] for u in users}
    for i, row in enumerate(rows):
        by_user[str(row[user_field])].append(i)
    user_parts = partition([{"u": u} for u in users], fed.clients, how=data.partition, seed=fed.seed,
                           alpha=data.dirichlet_alpha)  # fmt: skip
    return [sorted(i for u in part for i in by_user[users[u]]) for part in user_parts]


def _synthetic(record: Any, index: int, by_person: bool) -> TextRecord:
    unit = str(record.person_id) if by_person else f"record-{index}"
    return TextRecord(record.instruction, record.input, record.output, unit=unit)


def _row(row: dict[str, Any], index: int, user_field: str | None, prefix: str = "") -> TextRecord:
    if user_field is not None and user_field not in row:
        raise ConfigError(f"privacy.user_field={user_field!r} is missing from a record; name an existing field")
    unit = str(row[user_field]) if user_field else f"record-{index}"
    return TextRecord(str(row["instruction"]), str(row.get("input") or ""), str(row["output"]), unit=prefix + unit)
