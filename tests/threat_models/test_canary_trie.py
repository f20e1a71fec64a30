"""Trie scoring of canary candidates against an independent per-candidate oracle, and its memory bound."""

from __future__ import annotations

import hashlib
import json
import math
import random
import weakref
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers import PreTrainedModel

import threat_models.attacks.canary_exposure as ce
from secure_fedllm.config import ModelConfig
from secure_fedllm.data import ChatTemplate, synthesize_federation
from secure_fedllm.models import load_base_model
from threat_models.attacks.canary_exposure import (
    CanaryExposure,
    CanaryExposureConfig,
    CanaryProbe,
    _log_perplexities,
    _Trie,
    canary_probes,
)

BITS_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path) -> tuple[PreTrainedModel, ChatTemplate]:
    model, tokenizer = load_base_model(ModelConfig(name=str(tiny_model_dir)))
    model.eval()
    return model, ChatTemplate(tokenizer, system_prompt="", max_length=128)


def _oracle_bits(model: torch.nn.Module, context: list[int], encoded: list[list[int]]) -> list[float]:
    """The straightforward computation: one uncached forward of context + candidate per candidate.

    Scores the tokens after those every candidate shares, as the attack defines a log-perplexity.
    """
    shared = 0
    while all(len(e) > shared for e in encoded) and len({e[shared] for e in encoded}) == 1:
        shared += 1
    out = []
    with torch.inference_mode():
        for sequence in encoded:
            ids = context + sequence
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)
            start = len(context) + shared
            nats = -sum(logp[pos - 1, ids[pos]].item() for pos in range(start, len(ids)))
            out.append(nats / math.log(2))
    return out


def _ragged_candidates(seed: int, count: int) -> list[list[int]]:
    """Distinct token sequences of 1-5 tokens after a 2-token shared head, over a 4-token alphabet.

    The byte-level tiny tokenizer never merges digits, so variable-length tokenizations are built from
    ids directly: leaves at different depths, some candidates prefixes of others, dense sharing.
    """
    rng = random.Random(seed)
    alphabet = [48, 49, 50, 51]
    seen: set[tuple[int, ...]] = set()
    out = []
    while len(out) < count:
        tail = tuple(rng.choice(alphabet) for _ in range(rng.randint(1, 5)))
        if tail not in seen:
            seen.add(tail)
            out.append([77, 32, *tail])
    return out


def test_ragged_trie_matches_the_per_candidate_oracle(tiny: tuple[PreTrainedModel, ChatTemplate]) -> None:
    model, template = tiny
    context = template.prompt_ids("What did Vera write in the note?")
    encoded = _ragged_candidates(0, 120)
    lengths = {len(e) for e in encoded}
    assert lengths == {3, 4, 5, 6, 7}  # leaves at five depths
    assert any(a != b and b[: len(a)] == a for a in encoded for b in encoded)  # a candidate inside another's path
    expected = _oracle_bits(model, context, encoded)
    for batch_size in (1, 3, 7, 512):  # single rows, heavy and light chunks split many ways, everything at once
        with torch.inference_mode():
            got = _log_perplexities(model, context, encoded, batch_size)
        np.testing.assert_allclose(got, expected, rtol=0, atol=BITS_TOLERANCE)


def test_digit_candidates_match_the_oracle_through_run(tiny: tuple[PreTrainedModel, ChatTemplate]) -> None:
    """The whole attack path: CanaryExposure.run's canary and reference scores equal the oracle's."""
    model, template = tiny
    probe = CanaryProbe(
        canary_id="c",
        format_name="access-code",
        prefix="My secret access code is ",
        secret="271828",
        repeats=1,
        instruction="What is written in the note?",
    )
    config = CanaryExposureConfig(references_per_format=40, allow_small=True, batch_size=8, extrapolate=False)
    result = CanaryExposure(config).run(model, template, [probe]).canaries[0]
    references = CanaryExposure(config)._references("access-code", [probe.secret], template)
    canary = template.tokenizer(probe.prefix + probe.secret, add_special_tokens=False)["input_ids"]
    oracle = _oracle_bits(model, template.prompt_ids(probe.instruction), [canary, *references.encoded])
    assert result.log_perplexity_bits == pytest.approx(oracle[0], abs=BITS_TOLERANCE)
    assert result.rank == 1 + sum(r <= result.log_perplexity_bits for r in oracle[1:])
    assert result.reference_median_bits == pytest.approx(float(np.median(oracle[1:])), abs=BITS_TOLERANCE)


def test_control_a_wrong_parent_row_is_caught(
    tiny: tuple[PreTrainedModel, ChatTemplate], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Weakened control: feeding children their parent's sibling's cache breaks agreement with the oracle."""
    model, template = tiny
    context = template.prompt_ids("What did Vera write in the note?")
    encoded = _ragged_candidates(1, 60)
    expected = _oracle_bits(model, context, encoded)
    select = ce._select_rows
    monkeypatch.setattr(ce, "_select_rows", lambda cache, rows: select(cache, rows.flip(0)))
    with torch.inference_mode():
        got = _log_perplexities(model, context, encoded, 4)
    assert np.max(np.abs(got - np.asarray(expected))) > 100 * BITS_TOLERANCE


def test_forwards_are_the_internal_nodes() -> None:
    head = [77, 32]
    exhaustive = [head + [48 + int(c) for c in f"{v:04d}"] for v in range(10**4)]
    assert _Trie(exhaustive).forwards == 1 + 10 + 100 + 1000  # the prompt, then every 1-3 digit prefix
    rng = np.random.default_rng(0)
    sampled = [head + [48 + int(c) for c in f"{v:06d}"] for v in rng.choice(10**6, size=10**4, replace=False)]
    trie = _Trie(sampled)
    prefixes = {tuple(s[2 : 2 + k]) for s in sampled for k in range(1, 6)}
    assert trie.forwards == 1 + len(prefixes)
    assert 16_000 < trie.forwards < 18_000  # not the ~50,000 rows of scoring 5 tokens per candidate
    with pytest.raises(ce.AttackConfigError, match="identically"):
        _Trie([[*head, 48], [*head, 48]])


class _CacheWatcher(torch.nn.Module):
    """Forwards to a model and records the batch rows of each call and the KV rows alive in any cache.

    Live rows are counted after every forward and after every cache selection (where a parent's rows
    and its children's coexist for a moment).
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.caches: weakref.WeakSet[Any] = weakref.WeakSet()
        self.batch_rows: list[int] = []
        self.after_forward: list[int] = []
        self.after_select: list[int] = []

    def live(self) -> int:
        return sum(int(c.layers[0].keys.shape[0]) for c in self.caches)

    def select(self, cache: Any, rows: torch.Tensor) -> Any:
        selected = _SELECT_ROWS(cache, rows)
        self.caches.add(selected)
        self.after_select.append(self.live())
        return selected

    def forward(self, input_ids: torch.Tensor, use_cache: bool = False, cache: Any = None) -> Any:
        self.batch_rows.append(int(input_ids.shape[0]))
        out = self.model(input_ids=input_ids, use_cache=use_cache, cache=cache)
        self.caches.add(out.cache)
        self.after_forward.append(self.live())
        return out


_SELECT_ROWS = ce._select_rows


def test_live_cache_rows_stay_bounded(
    tiny: tuple[PreTrainedModel, ChatTemplate], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A level of the trie is never held whole: live KV rows stay within 2 x batch_size + heavy nodes."""
    model, template = tiny
    context = template.prompt_ids("Code?")
    rng = np.random.default_rng(1)
    encoded = [[77, 32, *(48 + int(c) for c in f"{v:06d}")] for v in rng.choice(10**6, size=2000, replace=False)]
    trie = _Trie(encoded)
    batch_size = 32
    heavy = int(np.count_nonzero(trie.below > batch_size))  # the prompt's row and the 10 heavy digits' rows
    watcher = _CacheWatcher(model)
    monkeypatch.setattr(ce, "_select_rows", watcher.select)
    with torch.inference_mode():
        got = _log_perplexities(watcher, context, encoded, batch_size)
    assert sum(watcher.batch_rows) == trie.forwards
    assert max(watcher.batch_rows) <= batch_size
    assert max(watcher.after_forward) <= batch_size + heavy  # a parent level is freed before its children run
    assert max(watcher.after_select) <= 2 * batch_size + heavy
    assert max(watcher.after_select) < 2000 / 10  # the widest level has ~1,900 nodes
    spot = [0, 999, 1999]
    expected = _oracle_bits(model, context, [encoded[i] for i in spot])
    # the oracle's shared part differs for a subset (fewer candidates may share more): compare differences
    np.testing.assert_allclose(np.diff(got[spot]), np.diff(expected), rtol=0, atol=BITS_TOLERANCE)


# ------------------------------------------------------------------------------------------ shared references


def _probe(canary_id: str, format_name: str, secret: str, instruction: str) -> CanaryProbe:
    prefix = ce.CANARY_FORMATS[format_name][0]
    return CanaryProbe(
        canary_id=canary_id,
        format_name=format_name,
        prefix=prefix,
        secret=secret,
        repeats=1,
        instruction=instruction,
    )


def test_references_are_scored_once_per_format_and_prompt(tiny: tuple[PreTrainedModel, ChatTemplate]) -> None:
    model, template = tiny
    config = CanaryExposureConfig(references_per_format=300, allow_small=True, batch_size=64, extrapolate=False)
    secrets = ["123456", "987654", "555555"]
    shared = [_probe(f"code-{i}", "access-code", s, "What is the code?") for i, s in enumerate(secrets)]
    references = CanaryExposure(config)._references("access-code", secrets, template)
    encoded = template.tokenizer([shared[0].prefix + s for s in secrets], add_special_tokens=False)["input_ids"]
    one_scoring = _Trie([*encoded, *references.encoded]).forwards
    calls: list[tuple[int, int]] = []
    together = CanaryExposure(config).run(model, template, shared, progress=lambda d, t: calls.append((d, t)))
    assert calls[0] == (0, one_scoring) and calls[-1] == (one_scoring, one_scoring)  # once for all three
    assert all(t == one_scoring for _, t in calls) and [d for d, _ in calls] == sorted(d for d, _ in calls)
    assert len({c.reference_median_bits for c in together.canaries}) == 1
    alone = CanaryExposure(config).run(model, template, shared[1:2]).canaries[0]
    assert together.canaries[1].log_perplexity_bits == pytest.approx(alone.log_perplexity_bits, abs=BITS_TOLERANCE)
    # different prompts (a real run's canaries): one scoring each, results in the order given
    distinct = [p.model_copy(update={"instruction": f"What is code {i}?"}) for i, p in enumerate(shared)]
    calls.clear()
    apart = CanaryExposure(config).run(model, template, distinct, progress=lambda d, t: calls.append((d, t)))
    each = sum(_Trie([e, *references.encoded]).forwards for e in encoded)  # a scoring holds its own canary only
    assert each > 2 * one_scoring and calls[-1] == (each, each)
    assert [c.canary_id for c in apart.canaries] == [p.canary_id for p in distinct]
    assert len({c.reference_median_bits for c in apart.canaries}) == 3


def test_results_keep_probe_order_across_formats_and_prompts(tiny: tuple[PreTrainedModel, ChatTemplate]) -> None:
    model, template = tiny
    config = CanaryExposureConfig(references_per_format=30, allow_small=True, batch_size=64)
    probes = [
        _probe("a", "access-code", "111111", "Q1"),
        _probe("b", "card-pin", "2222", "Q1"),
        _probe("c", "access-code", "333333", "Q2"),
        _probe("d", "access-code", "444444", "Q1"),
    ]
    result = CanaryExposure(config).run(model, template, probes)
    assert [c.canary_id for c in result.canaries] == ["a", "b", "c", "d"]
    assert [c.secret for c in result.canaries] == ["111111", "2222", "333333", "444444"]
    a, _, c, d = result.canaries
    assert a.reference_median_bits == d.reference_median_bits != c.reference_median_bits  # shared only by Q1
    assert a.extrapolated_exposure is not None and result.references == {"access-code": 30, "card-pin": 30}


# ----------------------------------------------------------------------------------------- synthetic prompts

DEFAULT_SHA256 = "a42c34d8b1fec969104281299b42e19c4df2d2748672f803245e616654dff206"
"""synthesize_federation(3, 200, seed=0) before shared_canary_prompts existed (records and manifest)."""


def _digest(num_clients: int, per_client: int, **kwargs: Any) -> str:
    federation = synthesize_federation(num_clients, per_client, **kwargs)
    blob = {"clients": [[asdict(r) for r in c] for c in federation.clients], "canaries": federation.manifest()}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


def test_default_synthetic_data_is_unchanged() -> None:
    assert _digest(3, 200, seed=0) == DEFAULT_SHA256
    assert _digest(3, 200, seed=0, shared_canary_prompts=False) == DEFAULT_SHA256
    assert _digest(3, 200, seed=0, shared_canary_prompts=True) != DEFAULT_SHA256  # the digest sees instructions


def test_shared_canary_prompts_give_one_context_per_format() -> None:
    plain = synthesize_federation(3, 200, seed=0)
    shared = synthesize_federation(3, 200, seed=0, shared_canary_prompts=True)
    assert shared.canaries == plain.canaries
    probes = canary_probes(shared.canaries, [r for c in shared.clients for r in c])
    by_format: dict[str, set[str]] = {}
    for probe in probes:
        by_format.setdefault(probe.format_name, set()).add(probe.instruction)
    assert {k: len(v) for k, v in by_format.items()} == {"access-code": 1, "card-pin": 1}
    assert by_format["access-code"] != by_format["card-pin"]
    plain_probes = canary_probes(plain.canaries, [r for c in plain.clients for r in c])
    assert len({p.instruction for p in plain_probes}) > 2  # control: by default each owner is asked by name
    # every record other than the canaries' is the same
    for a, b in zip(plain.clients, shared.clients, strict=True):
        assert len(a) == len(b)
        for ra, rb in zip(a, b, strict=True):
            assert ra.output == rb.output and ra.person_id == rb.person_id
            assert ra.instruction == rb.instruction or ra.output in {c.prefix + c.secret for c in plain.canaries}
