"""Canary exposure (Carlini, Liu, Erlingsson, Kos, Song, *The Secret Sharer*, USENIX Security 2019).

A canary is a prefix plus a random secret from a known space R (`secure_fedllm.data.CANARY_FORMATS`:
six or four digits) planted `repeats` times in one client's data. After training, the released model
ranks the true secret among other secrets of the same format by log-perplexity
Px(s) = -log2 Pr(secret | chat prompt + prefix); exposure = log2|R| - log2 rank(secret) bits. A model that
never saw the secret ranks it uniformly at random: expected exposure ~ 1/ln 2 ~ 1.44 bits
(`expected_random_exposure`). A model that memorised it ranks it first: exposure log2|R|, and the secret
can be extracted by searching the space.

How it is computed here (the *interpolation* estimate of tensorflow_privacy's
``secret_sharer/exposures.py``, with one correction of the space size):

* m reference secrets are drawn uniformly without replacement from the format's digit space, excluding
  every canary's secret, once per format, shared by all canaries of that format (seeded). When m reaches
  the size of the space the whole space (less the other canaries' secrets) is enumerated and the
  exposure is exact: the 4-digit format has 9,999 references, not 10,000.
* Each canary is ranked among its m + 1 candidates (itself and the references):
  rank = 1 + #{references with Px <= Px(canary)} (ties count against the canary), and
  exposure = log2(m + 1) - log2 rank. With m + 1 = |R| this is the paper's definition; tensorflow_privacy
  writes log2 m, a 1.4e-4 bit difference at m = 10^4. The maximum measurable exposure is log2(m + 1)
  (13.3 bits at m = 10^4); the *extrapolation* estimate (a skew-normal fitted to the reference
  log-perplexities, the paper's method for |R| = 10^9) is reported next to it for secrets beyond that.
* Secrets are scored as the paper scores them, conditioned on exactly the context training used: the
  chat-template prompt of the canary's record followed by the prefix. That shared context (and the
  tokens of the prefix common to every candidate) is run once and its KV cache re-used for every batch
  of candidates; the first secret token's probability comes from the context's last logits for free.

**Repeats and group privacy.** Differential privacy protects one *privacy unit*. Under record-level DP a
canary repeated k times is k units, so the guarantee that applies to it is group privacy:
(k * epsilon, k * e^((k-1) epsilon) * delta), not (epsilon, delta) (`canary_privacy_bound`). Under user-level
DP all repeats belong to one person (the synthetic generator plants a canary in one person's records), so
the canary is covered by (epsilon, delta) itself. Judge a canary's exposure against the bound for its
repeat count, not the run's epsilon.
"""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from secure_fedllm.data import CANARY_FORMATS, Canary, ChatTemplate

from ..errors import AttackConfigError
from ..results import MatrixRow

__all__ = [
    "MIN_REFERENCES",
    "CanaryExposure",
    "CanaryExposureConfig",
    "CanaryProbe",
    "CanaryResult",
    "ExposureResult",
    "canary_privacy_bound",
    "canary_probes",
    "expected_random_exposure",
    "exposure_from_rank",
    "rank_among_references",
]

MIN_REFERENCES = 10_000
"""References per format below which an exposure is not reported (unless the space itself is smaller)."""

_LN2 = math.log(2.0)


# ---------------------------------------------------------------------------------------------------------------
# The exposure formula
# ---------------------------------------------------------------------------------------------------------------


def rank_among_references(canary_log_perplexity: float, reference_log_perplexities: npt.ArrayLike) -> int:
    """1 + the number of references at least as likely as the canary (lower or equal log-perplexity).

    Ties count against the canary (the conservative choice, and tensorflow_privacy's ordering).
    """
    references = np.asarray(reference_log_perplexities, dtype=np.float64)
    return 1 + int(np.count_nonzero(references <= canary_log_perplexity))


def exposure_from_rank(rank: int, candidates: int) -> float:
    """Exposure in bits: log2(candidates) - log2(rank), for a rank among `candidates` secrets (1 = most likely).

    Raises:
        AttackConfigError: rank outside 1..candidates.
    """
    if candidates < 1 or not 1 <= rank <= candidates:
        raise AttackConfigError(f"rank={rank} must lie in 1..candidates={candidates}")
    return math.log2(candidates) - math.log2(rank)


def expected_random_exposure(candidates: int) -> float:
    """E[exposure] of a secret the model never saw: its rank is uniform on 1..n, n = `candidates`.

    E = log2 n - (1/n) * sum_k log2 k = log2 n - log2(n!) / n, computed exactly with lgamma; by Stirling
    it tends to 1/ln 2 = 1.4427 bits from below (1.4419 at n = 10,001). This is the `chance` of the
    matrix rows: what an attacker with no access to the model would "measure".
    """
    if candidates < 1:
        raise AttackConfigError(f"candidates={candidates}: must be >= 1")
    return math.log2(candidates) - math.lgamma(candidates + 1) / (candidates * _LN2)


def canary_privacy_bound(
    epsilon: float, delta: float, repeats: int, *, unit: Literal["record", "user"] = "record"
) -> tuple[float, float]:
    """The (epsilon, delta) that actually protects a canary repeated `repeats` times.

    Record-level DP: group privacy over k = `repeats` units, (k * epsilon, k * e^((k-1) * epsilon) * delta)
    (Dwork & Roth 2014; Vadhan 2017, Lemma 2.2). User-level DP with all repeats in one person's data:
    (epsilon, delta) unchanged. Why it matters: a 16-times canary under record-level epsilon = 1 is only
    protected at epsilon = 16, where high exposure is no contradiction of the DP claim.

    Raises:
        AttackConfigError: negative epsilon, delta outside [0, 1], or repeats < 1.
    """
    if epsilon < 0 or not 0 <= delta <= 1 or repeats < 1:
        raise AttackConfigError(f"need epsilon >= 0, delta in [0, 1], repeats >= 1 (got {epsilon}, {delta}, {repeats})")
    if unit == "user":
        return epsilon, delta
    k = repeats
    group_delta = k * math.exp((k - 1) * epsilon) * delta if (k - 1) * epsilon < 700 else math.inf
    return k * epsilon, min(1.0, group_delta)


# ---------------------------------------------------------------------------------------------------------------
# Inputs, configuration and results
# ---------------------------------------------------------------------------------------------------------------


class CanaryProbe(BaseModel):
    """A canary plus the prompt its record was trained with (the manifest alone lacks the prompt)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    canary_id: str
    format_name: str
    prefix: str
    secret: str
    repeats: int = Field(ge=0, description="times planted; 0 for a control the model never saw")
    instruction: str
    input: str = ""


def canary_probes(canaries: Iterable[Canary | Mapping[str, Any]], records: Iterable[Any]) -> list[CanaryProbe]:
    """Pair each canary (a `Canary` or a manifest dict) with the instruction of its planted record.

    A planted record is recognised by its output, ``prefix + secret``; `records` may be synthetic
    `Record`s or `TextRecord`s (anything with ``instruction``, ``input`` and ``output``).

    Raises:
        AttackConfigError: a canary's record is not among `records`.
    """
    by_output: dict[str, tuple[str, str]] = {}
    for record in records:
        by_output.setdefault(record.output, (record.instruction, record.input))
    probes = []
    for canary in canaries:
        fields = dict(canary) if isinstance(canary, Mapping) else asdict(canary)
        found = by_output.get(fields["prefix"] + fields["secret"])
        if found is None:
            raise AttackConfigError(f"canary {fields['canary_id']!r}: no record outputs its prefix + secret")
        probes.append(
            CanaryProbe(
                canary_id=fields["canary_id"],
                format_name=fields["format_name"],
                prefix=fields["prefix"],
                secret=fields["secret"],
                repeats=fields["repeats"],
                instruction=found[0],
                input=found[1],
            )
        )
    return probes


class CanaryExposureConfig(BaseModel):
    """How many references, how they are drawn, and how the model is batched."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    references_per_format: int = Field(MIN_REFERENCES, ge=1, description="reference secrets per format")
    batch_size: int = Field(256, ge=1, description="candidates per forward pass (memory: batch x context KV cache)")
    seed: int = Field(0, description="seed of the reference draw")
    extrapolate: bool = Field(True, description="also report the skew-normal extrapolated exposure (needs scipy)")
    formats: dict[str, tuple[str, int]] = Field(
        default_factory=lambda: dict(CANARY_FORMATS), description="format name -> (prefix, secret digits)"
    )
    allow_small: bool = Field(False, description="permit < 10,000 references (formula tests only)")

    @model_validator(mode="after")
    def _enough_references(self) -> CanaryExposureConfig:
        if self.references_per_format < MIN_REFERENCES and not self.allow_small:
            raise ValueError(
                f"references_per_format={self.references_per_format}: use at least {MIN_REFERENCES} "
                "(exposure is capped at log2 of the reference count; allow_small is for tests)"
            )
        return self


class CanaryResult(BaseModel):
    """One canary's rank and exposure."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    canary_id: str
    format_name: str
    repeats: int
    secret: str
    log_perplexity_bits: float = Field(
        description="-log2 Pr(secret | prompt + prefix) under the model (the tokens after those every candidate shares)"
    )
    reference_median_bits: float
    rank: int
    candidates: int = Field(description="the canary and its references (m + 1)")
    exhaustive: bool = Field(description="the references are the whole space: exposure is exact")
    exposure: float = Field(description="log2(candidates) - log2(rank), bits")
    max_exposure: float = Field(description="log2(candidates): the highest exposure this measurement resolves")
    space_bits: float = Field(description="log2 of the format's secret space")
    extrapolated_exposure: float | None = Field(None, description="-log2 SkewNormalCDF(Px), capped at space_bits")


class ExposureResult(BaseModel):
    """Every canary's exposure and the chance level they are compared with."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    canaries: tuple[CanaryResult, ...]
    references: dict[str, int]

    def by_repeats(self) -> dict[int, list[CanaryResult]]:
        """Canaries grouped by how often they were planted (ascending)."""
        groups: dict[int, list[CanaryResult]] = {}
        for result in sorted(self.canaries, key=lambda c: c.repeats):
            groups.setdefault(result.repeats, []).append(result)
        return groups

    def rows(self) -> list[MatrixRow]:
        """One row per repeat count: mean exposure (bits) over its canaries, metric ``exposure_bits_x<k>``.

        `chance` is the expected exposure of a never-seen secret among the same number of candidates
        (~1.44 bits). No interval is given: a few canaries per count give a spread, not a confidence
        interval; the per-canary values are in `canaries`.
        """
        rows = []
        for repeats, group in self.by_repeats().items():
            candidates = round(float(np.mean([c.candidates for c in group])))
            rows.append(
                MatrixRow(
                    attack="canary_exposure",
                    metric=f"exposure_bits_x{repeats}",
                    value=float(np.mean([c.exposure for c in group])),
                    chance=expected_random_exposure(candidates),
                )
            )
        return rows


# ---------------------------------------------------------------------------------------------------------------
# The attack
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _References:
    """One format's reference secrets, their tokens (prefix + secret) and whether they are the whole space."""

    secrets: list[str]
    encoded: list[list[int]]
    exhaustive: bool


class CanaryExposure:
    """Rank each canary's secret among reference secrets of its format under a released model; entry point `run`.

    Cost: one forward pass of the prompt per canary, then (digits - 1) tokens for each of its m + 1
    candidates against a KV cache of the prompt; memory grows with `batch_size` x prompt length. A canary
    planted k times is judged against `canary_privacy_bound(epsilon, delta, k)`, not against the run's
    (epsilon, delta).
    """

    def __init__(self, config: CanaryExposureConfig | None = None) -> None:
        self.config = config or CanaryExposureConfig()

    def run(self, model: torch.nn.Module, template: ChatTemplate, probes: Sequence[CanaryProbe]) -> ExposureResult:
        """Exposure of every probe under `model`, prompted with `template` exactly as in training.

        Raises:
            AttackConfigError: no probes, an unknown format, or a secret/prefix that does not fit its format.
        """
        if not probes:
            raise AttackConfigError("probes: nothing to measure; build them with canary_probes(...)")
        for probe in probes:
            if not isinstance(probe, CanaryProbe):
                raise AttackConfigError(
                    f"probes: got {type(probe).__name__}, need CanaryProbe (a canary lacks the prompt its record was "
                    "trained with); build them with canary_probes(federation.canaries, records)"
                )
            self._check(probe)
        references = {
            name: self._references(name, [p.secret for p in probes if p.format_name == name], template)
            for name in sorted({p.format_name for p in probes})
        }
        was_training = model.training
        model.eval()
        try:
            with torch.inference_mode():
                results = tuple(self._measure(model, template, p, references[p.format_name]) for p in probes)
        finally:
            model.train(was_training)
        return ExposureResult(canaries=results, references={k: len(v.secrets) for k, v in references.items()})

    def _check(self, probe: CanaryProbe) -> None:
        if probe.format_name not in self.config.formats:
            raise AttackConfigError(f"canary {probe.canary_id!r}: unknown format {probe.format_name!r}")
        prefix, digits = self.config.formats[probe.format_name]
        if probe.prefix != prefix or len(probe.secret) != digits or not probe.secret.isdigit():
            raise AttackConfigError(
                f"canary {probe.canary_id!r}: expected prefix {prefix!r} and {digits} digits, "
                f"got {probe.prefix!r} and {probe.secret!r}"
            )

    def _references(self, format_name: str, secrets: list[str], template: ChatTemplate) -> _References:
        """Distinct secrets drawn uniformly from the format's space minus the canaries' own, tokenized once."""
        prefix, digits = self.config.formats[format_name]
        space = 10**digits
        excluded = {int(s) for s in secrets}
        available = space - len(excluded)
        m = min(self.config.references_per_format, available)
        exhaustive = m == available
        rng = np.random.default_rng([self.config.seed, digits])
        if exhaustive:
            values = np.arange(space)
        else:
            values = rng.choice(space, size=min(space, m + len(excluded)), replace=False)
        chosen = [f"{v:0{digits}d}" for v in (int(v) for v in values) if v not in excluded][:m]
        encoded = template.tokenizer([prefix + s for s in chosen], add_special_tokens=False)["input_ids"]
        return _References(chosen, encoded, exhaustive)

    def _measure(
        self,
        model: torch.nn.Module,
        template: ChatTemplate,
        probe: CanaryProbe,
        references: _References,
    ) -> CanaryResult:
        context = template.prompt_ids(probe.instruction, probe.input)
        canary: list[int] = template.tokenizer(probe.prefix + probe.secret, add_special_tokens=False)["input_ids"]
        bits = _log_perplexities(model, context, [canary, *references.encoded], self.config.batch_size)
        canary_bits, reference_bits = float(bits[0]), bits[1:]
        candidates = len(references.secrets) + 1
        rank = rank_among_references(canary_bits, reference_bits)
        space_bits = self.config.formats[probe.format_name][1] * math.log2(10)
        return CanaryResult(
            canary_id=probe.canary_id,
            format_name=probe.format_name,
            repeats=probe.repeats,
            secret=probe.secret,
            log_perplexity_bits=canary_bits,
            reference_median_bits=float(np.median(reference_bits)),
            rank=rank,
            candidates=candidates,
            exhaustive=references.exhaustive,
            exposure=exposure_from_rank(rank, candidates),
            max_exposure=math.log2(candidates),
            space_bits=space_bits,
            extrapolated_exposure=_extrapolate(canary_bits, reference_bits, space_bits)
            if self.config.extrapolate
            else None,
        )


def _extrapolate(canary_bits: float, reference_bits: npt.NDArray[np.float64], cap: float) -> float | None:
    """-log2 CDF of a skew-normal fitted to the references, at the canary (tensorflow_privacy's extrapolation)."""
    try:
        from scipy.stats import skewnorm  # type: ignore[import-untyped, unused-ignore]
    except ImportError:  # pragma: no cover - scipy ships with the venv
        return None
    params = skewnorm.fit(reference_bits)
    log_cdf = float(skewnorm.logcdf(canary_bits, *params))
    return float(min(cap, max(0.0, -log_cdf / _LN2)))


def _common_prefix_length(sequences: list[list[int]]) -> int:
    first = sequences[0]
    length = min(len(s) for s in sequences)
    for seq in sequences[1:]:
        i = 0
        while i < length and seq[i] == first[i]:
            i += 1
        length = i
    return length


def _cache_keyword(model: torch.nn.Module) -> str:
    """``cache`` (transformers >= 5.2x) or ``past_key_values`` (earlier): the name of the KV-cache argument."""
    get_base_model = getattr(model, "get_base_model", None)
    base = get_base_model() if callable(get_base_model) else model
    return "cache" if "cache" in inspect.signature(type(base).forward).parameters else "past_key_values"


def _log_perplexities(
    model: torch.nn.Module, context: list[int], encoded: list[list[int]], batch_size: int
) -> npt.NDArray[np.float64]:
    """-log2 Pr(candidate tokens after the shared part | context) for each candidate, sharing one KV cache.

    The candidates (prefix + secret) are tokenized whole, as in training, so a tokenizer that merges the
    prefix's last character with the first digit is scored on the tokens it actually trained on; the
    tokens common to every candidate join the context.
    """
    shared = _common_prefix_length(encoded)
    if any(len(e) == shared for e in encoded):
        raise AttackConfigError("two candidate secrets tokenize identically; the ranking would be undefined")
    cache_name = _cache_keyword(model)
    out = model(input_ids=torch.tensor([context + encoded[0][:shared]]), use_cache=True)
    cache = getattr(out, cache_name)
    first_logp = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
    suffixes = [e[shared:] for e in encoded]
    width = max(len(s) for s in suffixes)
    tokens = torch.zeros((len(suffixes), width), dtype=torch.long)
    valid = torch.zeros((len(suffixes), width), dtype=torch.bool)
    for i, suffix in enumerate(suffixes):
        tokens[i, : len(suffix)] = torch.tensor(suffix)
        valid[i, : len(suffix)] = True
    nats = -first_logp[tokens[:, 0]].double()
    if width > 1:
        for start in range(0, len(suffixes), batch_size):
            chunk = slice(start, start + batch_size)
            rows = tokens[chunk]
            batch_cache = copy.deepcopy(cache)
            batch_cache.batch_repeat_interleave(rows.shape[0])
            # Right padding needs no mask: a padded token comes after every real token of its row.
            logits = model(input_ids=rows[:, :-1], use_cache=True, **{cache_name: batch_cache}).logits
            logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, rows[:, 1:].unsqueeze(-1)).squeeze(-1)
            nats[chunk] -= logp.masked_fill(~valid[chunk, 1:], 0.0).double().sum(dim=1)
    return (nats / _LN2).numpy()
