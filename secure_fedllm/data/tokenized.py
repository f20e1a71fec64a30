"""A client's tokenized records grouped into privacy units, and batching without packing.

DP-SGD samples and clips privacy units: one record under record-level DP, all of one person's
records under user-level DP. `TokenizedDataset` keeps that grouping so the trainer can Poisson-
sample units and sum the per-record gradients of a unit before clipping.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .chat import IGNORE_INDEX, ChatTemplate, Example
from .sources import TextRecord

__all__ = ["Batch", "TokenizedDataset"]


@dataclass(frozen=True)
class Batch:
    """Right-padded tensors; `unit_index[row]` is the position of the row's unit within the batch."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    unit_index: torch.Tensor
    num_units: int


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
    ):
        self.examples = list(examples)
        self.units = [list(rows) for rows in units]
        self.pad_id = pad_id
        self.dropped = dropped
        if unit_ids is not None and len(unit_ids) != len(self.units):
            raise ValueError(f"{len(unit_ids)} unit ids for {len(self.units)} units")
        self.unit_ids = list(unit_ids) if unit_ids is not None else [f"unit-{u}" for u in range(len(self.units))]

    @classmethod
    def build(cls, records: Sequence[TextRecord], template: ChatTemplate) -> TokenizedDataset:
        """Tokenize `records`; records whose prompt alone fills max_length are dropped (and counted)."""
        examples: list[Example] = []
        by_unit: dict[str, list[int]] = {}
        dropped = 0
        for record in records:
            example = template.example(record.instruction, record.input, record.output)
            if example is None:
                dropped += 1
                continue
            by_unit.setdefault(record.unit, []).append(len(examples))
            examples.append(example)
        pad = template.tokenizer.pad_token_id
        pad_id = int(pad) if pad is not None else 0
        return cls(examples, list(by_unit.values()), pad_id=pad_id, dropped=dropped, unit_ids=list(by_unit))

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
