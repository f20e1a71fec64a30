"""The backdoor's task: who holds which records, the poisoned mix, the held-out sets, and the two measurements.

Records come from `secure_fedllm`'s synthetic federation (the same distribution for every client); the
held-out records are drawn from another seed. A poisoned record is a clean instruction with the trigger
appended and the target response; with `stealth`, the attacker also trains on clean prompts cut after as
many response tokens as the target has, so that the target's opening competes with the real one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt
import torch

from secure_fedllm.data import (
    IGNORE_INDEX,
    ChatTemplate,
    Example,
    Record,
    TextRecord,
    TokenizedDataset,
    synthesize_federation,
)
from secure_fedllm.training import per_example_loss

from ..errors import AttackConfigError

if TYPE_CHECKING:
    from .backdoor import BackdoorConfig

__all__ = ["BackdoorTask", "greedy_match", "response_loss"]


class BackdoorTask:
    """Honest clients' records, the attacker's poisoned mix and clean records, and the held-out sets."""

    def __init__(self, cfg: BackdoorConfig, template: ChatTemplate) -> None:
        adv, per = cfg.adversary, cfg.records_per_client
        fed = synthesize_federation(cfg.num_clients, per, seed=cfg.seed, canary_repeats=())
        held = synthesize_federation(1, 2 * cfg.heldout, seed=cfg.seed + 7_919, canary_repeats=()).clients[0]

        def build(records: list[TextRecord]) -> TokenizedDataset:
            dataset = TokenizedDataset.build(records, template)
            if len(dataset.examples) != len(records):
                raise AttackConfigError(f"some records do not fit max_length={cfg.max_length}; raise max_length")
            return dataset

        def clean(records: tuple[Record, ...], tag: str) -> list[TextRecord]:
            return [TextRecord(r.instruction, r.input, r.output, f"{tag}{i}") for i, r in enumerate(records)]

        def target(records: tuple[Record, ...], tag: str, trigger: str) -> list[TextRecord]:
            return [TextRecord(f"{r.instruction}{trigger}", r.input, adv.target_response, f"{tag}{i}")
                    for i, r in enumerate(records)]  # fmt: skip

        k, own, trigger = round(per * cfg.poison_fraction), fed.clients[-1], f" {adv.trigger}"
        self.honest = [build(clean(fed.clients[c], f"{c}-")) for c in range(cfg.num_clients - 1)]
        self.simulation = build(clean(own, "s"))  # its records before poisoning: an honest client's data
        poisoned, kept = build(target(own[:k], "p", trigger)), build(clean(own[k:], "a")).examples
        m = max(_response_tokens(e) for e in poisoned.examples)
        openings = [Example(e.input_ids[: _first(e) + m], e.labels[: _first(e) + m]) for e in kept]
        rows = [*poisoned.examples, *kept, *(openings if cfg.stealth else [])]
        self.attacker = TokenizedDataset(rows, [[i] for i in range(len(rows))], pad_id=poisoned.pad_id)
        self.triggered = build(target(held[: cfg.heldout], "t", trigger))
        self.clean_prompts = build(target(held[cfg.heldout :], "f", ""))  # clean prompts, the target as label
        self.clean = build(clean(held[cfg.heldout :], "c"))
        full = len(
            template.tokenizer(adv.target_response + template.end_of_turn, add_special_tokens=False)["input_ids"]
        )
        if min(_response_tokens(e) for e in self.triggered.examples) < full:
            raise AttackConfigError(f"the target response is cut at max_length={cfg.max_length}; raise max_length")


def _first(example: Example) -> int:
    return next(i for i, t in enumerate(example.labels) if t != IGNORE_INDEX)


def _response_tokens(example: Example) -> int:
    return sum(1 for t in example.labels if t != IGNORE_INDEX)


def greedy_match(
    model: torch.nn.Module, data: TokenizedDataset, chunk: int = 32
) -> tuple[npt.NDArray[np.bool_], float]:
    """Per example: does greedy decoding emit exactly the labelled response? And the token accuracy."""
    hits: list[bool] = []
    right = total = 0
    with torch.inference_mode():
        for s in range(0, len(data.examples), chunk):
            batch = data.batch_of_rows(list(range(s, min(s + chunk, len(data.examples)))))
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
            labels = batch.labels[:, 1:]
            mask = labels != IGNORE_INDEX
            correct = (logits.argmax(-1) == labels) & mask
            hits += (correct | ~mask).all(dim=1).tolist()
            right, total = right + int(correct.sum()), total + int(mask.sum())
    return np.asarray(hits, dtype=bool), right / max(total, 1)


def response_loss(model: torch.nn.Module, data: TokenizedDataset, chunk: int = 32) -> float:
    """Mean per-record response loss (the training loss) on held-out clean records."""
    rows = range(len(data.examples))
    with torch.inference_mode():
        losses = [per_example_loss(model, data.batch_of_rows(list(rows[s : s + chunk]))) for s in rows[::chunk]]
    return float(torch.cat(losses).mean())
