"""A site's own records: where they are, how their columns map to ours, and its held-out split.

In a deployment every site reads its own file (its node config names it); nothing partitions a
shared source. The file may be JSON (an array of objects), JSON lines, CSV, or a local Hugging Face
dataset folder written by `save_to_disk`; `fields` maps our record fields (instruction, input,
output, person) to the file's columns. Under user-level DP the person column decides the privacy
unit of each record, and the held-out split keeps every person on one side of it (a person's
records on both sides would let the held-out loss depend on records that were trained on).

Errors are `ConfigError`s that name the node-config key, the file, the line or row, and the field.
"""

from __future__ import annotations

import csv
import hashlib
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..errors import ConfigError
from .sources import TextRecord, load_hf_folder, read_json_rows

__all__ = ["SITE_FIELDS", "SiteDataSpec", "load_site_records", "read_site_rows", "split_heldout"]

SITE_FIELDS = ("instruction", "input", "output", "person")
_DEFAULT_FIELDS = {name: name for name in SITE_FIELDS}
_SUFFIX_FORMATS = {".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv"}
_NODE_KEYS = ("data-path", "data-format", "data-fields", "data-heldout-fraction")


class SiteDataSpec(BaseModel):
    """Where a site's records are and how to read them (from its node config: `from_node_config`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    path: Path = Field(description="the data file, or a Hugging Face dataset folder (save_to_disk)")
    format: Literal["json", "jsonl", "csv", "hf"] | None = Field(
        None, description="json | jsonl | csv | hf; default from the suffix (a folder is hf)"
    )
    fields: dict[str, str] = Field(
        default_factory=dict, description="our field -> the file's column (instruction, input, output, person)"
    )
    heldout_fraction: Annotated[float, Field(ge=0, lt=1)] = Field(
        0.0, description="share of the site's privacy units kept out of training for evaluation"
    )

    @field_validator("fields")
    @classmethod
    def _known_fields(cls, value: dict[str, str]) -> dict[str, str]:
        for ours, column in value.items():
            if ours not in SITE_FIELDS:
                raise ValueError(f"unknown field {ours!r}; map one of {', '.join(SITE_FIELDS)} to a column")
            if not column:
                raise ValueError(f"field {ours!r} maps to an empty column name")
        return {**_DEFAULT_FIELDS, **value}

    @model_validator(mode="after")
    def _resolve_format(self) -> SiteDataSpec:
        if self.format is None:
            if self.path.is_dir():
                found = "hf"
            elif self.path.suffix.lower() in _SUFFIX_FORMATS:
                found = _SUFFIX_FORMATS[self.path.suffix.lower()]
            else:
                raise ValueError(
                    f"cannot tell the format of {str(self.path)!r} from its suffix; set data-format to json, jsonl, "
                    "csv or hf"
                )
            object.__setattr__(self, "format", found)
        if not self.fields:
            object.__setattr__(self, "fields", dict(_DEFAULT_FIELDS))
        return self

    def column(self, field: str) -> str:
        """The file's column that holds our `field`."""
        return self.fields.get(field, field)

    @classmethod
    def from_node_config(cls, mapping: Mapping[str, Any]) -> SiteDataSpec | None:
        """The spec a Flower node config describes, or None when it names no `data-path`.

        Keys: `data-path`, `data-format`, `data-fields` ("instruction=colA,input=colB,output=colC,
        person=colD": our field = the file's column), `data-heldout-fraction`.

        Raises:
            ConfigError: a data key without `data-path`, or a malformed value (the key is named).
        """
        path = mapping.get("data-path")
        if path is None or str(path) == "":
            stray = [k for k in _NODE_KEYS[1:] if k in mapping]
            if stray:
                raise ConfigError(
                    f"node config {stray[0]}: given without data-path; add data-path=<file or folder> or drop it"
                )
            return None
        fields = _parse_fields(mapping.get("data-fields"))
        raw_fraction = mapping.get("data-heldout-fraction", 0.0)
        try:
            fraction = float(raw_fraction)
        except (TypeError, ValueError):
            raise ConfigError(
                f"node config data-heldout-fraction={raw_fraction!r}: not a number; give a fraction in [0, 1)"
            ) from None
        raw_format = mapping.get("data-format")
        values: dict[str, Any] = {"path": Path(str(path)), "fields": fields, "heldout_fraction": fraction}
        if raw_format is not None and str(raw_format) != "":
            values["format"] = str(raw_format).lower()
        try:
            return cls(**values)
        except ValidationError as exc:
            error = exc.errors()[0]
            key = {"path": "data-path", "format": "data-format", "fields": "data-fields"}.get(
                str(error["loc"][0]) if error["loc"] else "", "data-heldout-fraction"
            )
            if not error["loc"]:  # the format could not be resolved
                key = "data-format"
            raise ConfigError(f"node config {key} (data-path={str(path)!r}): {error['msg']}") from None


def load_site_records(spec: SiteDataSpec, *, by_person: bool) -> list[TextRecord]:
    """The site's records, in file order, each with its privacy unit.

    The unit is the person column's value under user-level DP (`by_person`), else `record-<i>` (the
    record's position in the file). The input column may be absent (an empty input).

    Raises:
        ConfigError: an unreadable or empty file, a malformed line, a missing column or value
            (named with its line or row), or no person column under user-level DP.
    """
    where = f"data-path={str(spec.path)!r}"
    rows = _read_rows(spec)
    instruction, input_, output, person = (spec.column(f) for f in SITE_FIELDS)
    if rows:
        _check_columns(spec, rows[0][1], where, by_person=by_person, label=rows[0][0])
    records: list[TextRecord] = []
    for index, (label, row) in enumerate(rows):
        texts = []
        for ours, column in (("instruction", instruction), ("output", output)):
            value = row.get(column)
            if value is None:
                raise ConfigError(
                    f"{where}: {label} has no {column!r} column (our field {ours!r}); add it, or map {ours} to another "
                    f"column with data-fields {ours}=<column>"
                )
            texts.append(str(value))
        extra = row.get(input_)
        if by_person:
            who = row.get(person)
            if who is None or str(who).strip() == "":
                raise ConfigError(
                    f"{where}: {label} has no value in the person column {person!r}; under user-level DP every "
                    "record needs the person it is about"
                )
            unit = str(who)
        else:
            unit = f"record-{index}"
        records.append(TextRecord(texts[0], "" if extra is None else str(extra), texts[1], unit=unit))
    return records


def split_heldout(
    records: Sequence[TextRecord], fraction: float, *, by_person: bool, salt: str = ""
) -> tuple[list[TextRecord], list[TextRecord]]:
    """(training records, held-out records): `fraction` of the privacy units held out.

    Under user-level DP (`by_person`) all of a person's records fall on one side. Which units are
    held out is a function of their ids (a hash, salted by `salt`), not of the file's order, so a
    site's held-out people stay held out from job to job and a corrected record stays on its side.
    At least one unit is held out when `fraction` > 0 and at least one is left for training.

    Raises:
        ConfigError: `fraction` outside [0, 1), or too few units to hold any out.
    """
    if not 0 <= fraction < 1:
        raise ConfigError(f"data-heldout-fraction={fraction}: must be in [0, 1)")
    if fraction == 0:
        return list(records), []
    groups: dict[str, list[int]] = {}
    for i, record in enumerate(records):
        groups.setdefault(record.unit if by_person else f"{i}|{record.unit}", []).append(i)
    if len(groups) < 2:
        what = "people" if by_person else "records"
        raise ConfigError(
            f"data-heldout-fraction={fraction}: the site has {len(groups)} {what}; holding some out needs at least "
            "two (set it to 0 or add data)"
        )
    count = min(len(groups) - 1, max(1, math.floor(fraction * len(groups) + 0.5)))

    def rank(key: str) -> bytes:
        return hashlib.sha256(b"secure-fedllm/heldout|" + salt.encode() + b"|" + key.encode()).digest()

    held = set(sorted(groups, key=rank)[:count])
    out = {i for key in held for i in groups[key]}
    return [r for i, r in enumerate(records) if i not in out], [r for i, r in enumerate(records) if i in out]


def _parse_fields(raw: Any) -> dict[str, str]:
    if raw is None or str(raw).strip() == "":
        return {}
    fields: dict[str, str] = {}
    for part in str(raw).split(","):
        ours, sep, column = (x.strip() for x in part.partition("="))
        if not sep or not ours or not column:
            raise ConfigError(
                f"node config data-fields={raw!r}: {part.strip()!r} is not field=column; write pairs such as "
                "instruction=question,output=answer,person=patient_id"
            )
        if ours not in SITE_FIELDS:
            raise ConfigError(
                f"node config data-fields={raw!r}: unknown field {ours!r}; our fields are {', '.join(SITE_FIELDS)}"
            )
        if ours in fields:
            raise ConfigError(f"node config data-fields={raw!r}: {ours!r} is mapped twice; map it once")
        fields[ours] = column
    return fields


def read_site_rows(spec: SiteDataSpec, *, key: str = "data-path") -> list[tuple[str, dict[str, Any]]]:
    """The file's rows as read (no field mapping), each with where it is; errors name `key`."""
    return _read_rows(spec, key)


def _read_rows(spec: SiteDataSpec, key: str = "data-path") -> list[tuple[str, dict[str, Any]]]:
    if spec.format in ("json", "jsonl"):
        return read_json_rows(spec.path, key=key, lines=spec.format == "jsonl")
    if spec.format == "hf":
        if not spec.path.is_dir():
            raise ConfigError(f"{key}={str(spec.path)!r} is not a folder; data-format hf reads a save_to_disk folder")
        rows = load_hf_folder(str(spec.path), key=key)
        if not rows:
            raise ConfigError(f"{key}={str(spec.path)!r}: the dataset has no rows; it must hold at least one record")
        return [(f"row {i}", row) for i, row in enumerate(rows)]
    return _read_csv(spec.path, key)


def _read_csv(path: Path, key: str) -> list[tuple[str, dict[str, Any]]]:
    if not path.is_file():
        raise ConfigError(f"{key}={str(path)!r} is not a file; give the path of the data file")
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames:
                raise ConfigError(f"{key}={str(path)!r}: the file is empty; it needs a header row and records")
            rows: list[tuple[str, dict[str, Any]]] = []
            for row in reader:
                line = reader.line_num
                if None in row:
                    raise ConfigError(
                        f"{key}={str(path)!r}: line {line} has more cells than the header's {len(reader.fieldnames)}; "
                        "quote cells that contain commas"
                    )
                if any(value is None for value in row.values()):
                    raise ConfigError(
                        f"{key}={str(path)!r}: line {line} has fewer cells than the header's "
                        f"{len(reader.fieldnames)}; give every column a value (empty is allowed)"
                    )
                rows.append((f"line {line}", dict(row)))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ConfigError(
            f"{key}={str(path)!r}: not a readable CSV file ({exc}); give a UTF-8 CSV with a header"
        ) from exc
    if not rows:
        raise ConfigError(f"{key}={str(path)!r}: a header but no records; it must hold at least one record")
    return rows


def _check_columns(spec: SiteDataSpec, first: dict[str, Any], where: str, *, by_person: bool, label: str) -> None:
    """Name a missing column once, with the columns the file does have."""
    needed = ["instruction", "output", *(["person"] if by_person else [])]
    for ours in needed:
        column = spec.column(ours)
        if column not in first:
            why = " (user-level DP groups records by person)" if ours == "person" else ""
            raise ConfigError(
                f"{where}: {label} has no column {column!r} for our field {ours!r}{why}; its columns are "
                f"{sorted(first)}: map it with data-fields {ours}=<column>"
            )
