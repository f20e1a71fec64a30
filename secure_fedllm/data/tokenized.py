"""A client's tokenized records grouped into privacy units, and batching without packing.

DP-SGD samples and clips privacy units: one record under record-level DP, all of one person's
records under user-level DP. `TokenizedDataset` keeps that grouping so the trainer can Poisson-
sample units and sum the per-record gradients of a unit before clipping.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..config import MIN_MAX_LENGTH
from ..errors import ConfigError
from .chat import IGNORE_INDEX, ChatTemplate, Example
from .sources import TextRecord

__all__ = [
    "TRUNCATION_WARNING_FRACTION",
    "Batch",
    "DataTruncationWarning",
    "LengthStats",
    "TokenizedDataset",
    "check_has_records",
    "max_length_warning",
]

TRUNCATION_WARNING_FRACTION = 0.10
"""A run warns at its start when more than this fraction of a client's records (or of all of them) are
truncated or dropped by `data.max_length`."""

_MAX_LENGTH_CEILING = 32768
"""`data.max_length`'s largest allowed value (config.DataConfig)."""


class DataTruncationWarning(UserWarning):
    """`data.max_length` cuts or drops a large share of the records: the model learns from what is left."""


@dataclass(frozen=True)
class LengthStats:
    """How records fit `max_length`: each record's whole length, and how many were cut or dropped.

    A record is *truncated* when it is kept but its response (or its end-of-turn token) is cut, and
    *dropped* when its prompt alone fills `max_length`, leaving no response token to learn from.
    The two are disjoint; `lengths` holds every record's untruncated token count, dropped ones included.
    """

    max_length: int
    lengths: tuple[int, ...] = ()
    truncated: int = 0
    dropped: int = 0

    @property
    def records(self) -> int:
        """Records tokenized (kept or dropped)."""
        return len(self.lengths)

    @property
    def affected(self) -> int:
        """Records that lost text: truncated plus dropped."""
        return self.truncated + self.dropped

    @property
    def affected_fraction(self) -> float:
        """`affected` over `records` (0 for no records)."""
        return self.affected / self.records if self.records else 0.0

    def percentile(self, p: float = 95.0) -> int:
        """The nearest-rank p-th percentile of the untruncated lengths (0 for no records)."""
        if not self.lengths:
            return 0
        ordered = sorted(self.lengths)
        return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]

    def suggested_max_length(self) -> int:
        """The 95th percentile of the lengths rounded up to a multiple of 16, within data.max_length's range."""
        return min(_MAX_LENGTH_CEILING, max(MIN_MAX_LENGTH, 16 * math.ceil(self.percentile(95.0) / 16)))

    @classmethod
    def combine(cls, parts: Sequence[LengthStats]) -> LengthStats:
        """The statistics of several sets of records tokenized with the same `max_length`."""
        if not parts:
            raise ValueError("no statistics to combine")
        return cls(
            parts[0].max_length,
            tuple(n for part in parts for n in part.lengths),
            sum(part.truncated for part in parts),
            sum(part.dropped for part in parts),
        )


def max_length_warning(clients: Sequence[LengthStats], *, fraction: float = TRUNCATION_WARNING_FRACTION) -> str | None:
    """The warning for clients whose records `data.max_length` cuts or drops in more than `fraction`, else None.

    It fires when more than `fraction` of all records, or of any one client's, are truncated or
    dropped, names `data.max_length`, and advises the 95th percentile of the records' lengths
    (rounded up) as a value that keeps 95% of them whole.
    """
    if not clients:
        return None
    total = LengthStats.combine(clients)
    over = [c for c, s in enumerate(clients) if s.affected_fraction > fraction]
    if total.affected_fraction <= fraction and not over:
        return None
    worst = max(range(len(clients)), key=lambda c: clients[c].affected_fraction)
    message = (
        f"data.max_length={total.max_length} truncates the response of {total.truncated} of {total.records} "
        f"records ({total.truncated / max(total.records, 1):.0%}) and drops {total.dropped} "
        f"({total.dropped / max(total.records, 1):.0%}) whose prompt alone fills it"
    )
    if over:
        message += (
            f"; over {fraction:.0%} at client{'s' if len(over) > 1 else ''} {', '.join(map(str, over))} "
            f"(client {worst}: {clients[worst].affected_fraction:.0%})"
        )
    suggested = total.suggested_max_length()
    if suggested > total.max_length:
        message += (
            f"; set data.max_length={suggested} (95% of the records are at most {total.percentile(95.0)} tokens) "
            "or shorten the prompts"
        )
    else:
        message += "; shorten the prompts or system prompt of the longest records"
    return message


@dataclass(frozen=True)
class Batch:
    """Right-padded tensors; `unit_index[row]` is the position of the row's unit within the batch."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    unit_index: torch.Tensor
    num_units: int


def check_has_records(stats: LengthStats, where: str) -> None:
    """Refuse a set of records of which none is left after tokenization (before anything divides by its size).

    Raises:
        ConfigError: no records at all, or every record dropped because its prompt fills data.max_length
            (the message gives the value to set).
    """
    if stats.records == 0:
        raise ConfigError(
            f"{where}: has no records; check data.source and data.partition, or give fewer clients "
            "(federation.clients) more records"
        )
    if stats.dropped == stats.records:
        raise ConfigError(
            f"{where}: all {stats.records} records are dropped because each prompt alone fills "
            f"data.max_length={stats.max_length} (95% of the records need at most {stats.percentile(95.0)} tokens); "
            f"set data.max_length={stats.suggested_max_length()} or shorten data.system_prompt"
        )


class TokenizedDataset:
    """Examples plus, for each privacy unit, the rows that belong to it (and, when built from records, its id).

    `unit_ids[u]` is the id of unit `u` (a person id, or `record-<i>`): what a site's population of
    data subjects, hence its lifetime ledger, is named after (`secure_fedllm.site.population_id`).
    """

    def __init__(
        self,
        examples: Sequence[Example],
        units: Sequence[Sequence[int]],
        *,
        pad_id: int,
        dropped: int = 0,
        unit_ids: Sequence[str] | None = None,
        stats: LengthStats | None = None,
    ):
        self.examples = list(examples)
        self.units = [list(rows) for rows in units]
        self.pad_id = pad_id
        self.dropped = dropped
        self.stats = stats
        """How `data.max_length` fit the records (None when built from examples, not records)."""
        if unit_ids is not None and len(unit_ids) != len(self.units):
            raise ValueError(f"{len(unit_ids)} unit ids for {len(self.units)} units")
        self.unit_ids = list(unit_ids) if unit_ids is not None else [f"unit-{u}" for u in range(len(self.units))]

    @classmethod
    def build(cls, records: Sequence[TextRecord], template: ChatTemplate) -> TokenizedDataset:
        """Tokenize `records`; records whose prompt alone fills max_length are dropped (and counted).

        `stats` counts the dropped records and the kept ones whose response was cut.
        """
        examples: list[Example] = []
        by_unit: dict[str, list[int]] = {}
        dropped = truncated = 0
        lengths: list[int] = []
        for record in records:
            example, length = template.encode(record.instruction, record.input, record.output)
            lengths.append(length)
            if example is None:
                dropped += 1
                continue
            truncated += int(length > len(example.input_ids))
            by_unit.setdefault(record.unit, []).append(len(examples))
            examples.append(example)
        pad = template.tokenizer.pad_token_id
        pad_id = int(pad) if pad is not None else 0
        stats = LengthStats(template.max_length, tuple(lengths), truncated, dropped)
        units = list(by_unit.values())
        return cls(examples, units, pad_id=pad_id, dropped=dropped, unit_ids=list(by_unit), stats=stats)

    @property
    def num_units(self) -> int:
        """N_i: the number of privacy units (what the sampling rate and delta refer to)."""
        return len(self.units)

    def batch_of_units(self, units: Sequence[int]) -> Batch:
        """All rows of the given units."""
        rows: list[int] = []
        owner: list[int] = []
        for position, unit in enumerate(units):
            rows.extend(self.units[unit])
            owner.extend([position] * len(self.units[unit]))
        batch = self.batch_of_rows(rows)
        return Batch(batch.input_ids, batch.attention_mask, batch.labels, torch.tensor(owner), len(units))

    def batch_of_rows(self, rows: Sequence[int]) -> Batch:
        """The given rows, right-padded to the longest; each row its own unit."""
        width = max((len(self.examples[r].input_ids) for r in rows), default=0)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        for i, r in enumerate(rows):
            example = self.examples[r]
            n = len(example.input_ids)
            ids[i, :n] = torch.tensor(example.input_ids)
            mask[i, :n] = 1
            labels[i, :n] = torch.tensor(example.labels)
        return Batch(ids, mask, labels, torch.arange(len(rows)), len(rows))
