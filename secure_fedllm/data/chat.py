"""One chat-template policy for training, evaluation and generation.

A model learns the format it is trained on; evaluating or prompting it in another format measures
the mismatch, not the model. So one object turns an instruction record into prompt tokens (for
generation) and prompt + response + end-of-turn tokens with labels masked on the prompt (for
training and held-out loss). The system message is always present, even when empty: chat templates
such as SmolLM2's insert their own default system prompt when none is given, which would silently
change what the model is trained on.

Records are never packed together: under DP-SGD one example must be one record (or one user's
records), or clipping would bound the wrong unit.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

__all__ = ["IGNORE_INDEX", "ChatTemplate", "Example"]

IGNORE_INDEX = -100
"""Label of positions that carry no loss (the prompt and padding)."""


@dataclass(frozen=True)
class Example:
    """A tokenized record: `labels` equals `input_ids` on the response and IGNORE_INDEX on the prompt."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]


class ChatTemplate:
    """Renders records with the tokenizer's chat template (or an Alpaca-style fallback)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, *, system_prompt: str, max_length: int) -> None:
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        self.max_length = max_length
        eot = tokenizer.eos_token
        if eot is None:
            raise ValueError("the tokenizer has no eos_token; the end of a response could not be learned")
        self.end_of_turn: str = eot

    def prompt_text(self, instruction: str, input_text: str = "") -> str:
        """The prompt up to where the assistant's response starts."""
        user = instruction if not input_text else f"{instruction}\n\n{input_text}"
        if getattr(self.tokenizer, "chat_template", None):
            messages = [{"role": "system", "content": self.system_prompt}, {"role": "user", "content": user}]
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            return str(text)
        system = f"{self.system_prompt}\n\n" if self.system_prompt else ""
        return f"{system}### Instruction:\n{user}\n\n### Response:\n"

    def prompt_ids(self, instruction: str, input_text: str = "") -> list[int]:
        """Prompt tokens, for generation."""
        ids: list[int] = self.tokenizer(self.prompt_text(instruction, input_text), add_special_tokens=False)[
            "input_ids"
        ]
        return ids

    def example(self, instruction: str, input_text: str, output: str) -> Example | None:
        """Prompt + response + end-of-turn, truncated to `max_length`; None if no response token fits."""
        return self.encode(instruction, input_text, output)[0]

    def encode(self, instruction: str, input_text: str, output: str) -> tuple[Example | None, int]:
        """`example(...)` and the record's untruncated length (prompt + response + end-of-turn tokens).

        The length is what `data.max_length` would have to be for the record to fit whole: the
        truncation statistics (`TokenizedDataset.stats`) and their advice are computed from it.
        """
        prompt = self.prompt_ids(instruction, input_text)
        response: list[int] = self.tokenizer(output + self.end_of_turn, add_special_tokens=False)["input_ids"]
        full = len(prompt) + len(response)
        ids = (prompt + response)[: self.max_length]
        if len(ids) <= len(prompt):
            return None, full
        labels = [IGNORE_INDEX] * len(prompt) + ids[len(prompt) :]
        return Example(tuple(ids), tuple(labels)), full
