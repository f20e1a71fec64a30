"""The server's evaluation of the global adapter on its own held-out records."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from ..data.chat import IGNORE_INDEX, ChatTemplate
from ..data.sources import TextRecord
from ..data.tokenized import TokenizedDataset
from ..memory import release_memory
from .dp_sgd import per_example_loss
from .precision import autocast_for, model_device

__all__ = ["EvalResult", "evaluate", "generate_samples"]


@dataclass(frozen=True)
class EvalResult:
    """Token-weighted mean loss over all held-out response tokens, and its exponential."""

    loss: float
    perplexity: float
    tokens: int


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    data: TokenizedDataset,
    *,
    batch_size: int,
    tokens_per_pass: int | Literal["auto"] | None = "auto",
) -> EvalResult:
    """Held-out loss and perplexity (every response token counts once).

    Each batch of `batch_size` rows goes through the model in passes of at most `tokens_per_pass`
    tokens ("auto": `CPU_TOKENS_PER_PASS` on the CPU, whole batches elsewhere): the full-vocabulary
    logits of 32 rows would take 0.4 GB at SmolLM2's vocabulary, twice over with the log-softmax.
    The per-row losses, hence the result, are the same as with whole batches.
    """
    model.eval()
    total, tokens = 0.0, 0
    rows = list(range(len(data.examples)))
    for start in range(0, len(rows), batch_size):
        batch = data.batch_of_rows(rows[start : start + batch_size])
        counts = (batch.labels[:, 1:] != IGNORE_INDEX).sum(dim=1)
        losses = per_example_loss(model, batch, tokens_per_pass=tokens_per_pass).cpu()
        total += float((losses * counts).sum())
        tokens += int(counts.sum())
    release_memory()
    loss = total / max(tokens, 1)
    return EvalResult(loss=loss, perplexity=math.exp(loss), tokens=tokens)


@torch.no_grad()
def generate_samples(
    model: torch.nn.Module, template: ChatTemplate, records: list[TextRecord], *, max_new_tokens: int
) -> list[dict[str, str]]:
    """Greedy completions of held-out prompts, rendered with the training template."""
    model.eval()
    out = []
    tokenizer = template.tokenizer
    for record in records:
        prompt = torch.tensor([template.prompt_ids(record.instruction, record.input)], device=model_device(model))
        with autocast_for(model):
            generated = model.generate(
                input_ids=prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        text = tokenizer.decode(generated[0, prompt.shape[1] :], skip_special_tokens=True)
        out.append({"prompt": record.instruction, "reference": record.output, "generated": text.strip()})
    return out
