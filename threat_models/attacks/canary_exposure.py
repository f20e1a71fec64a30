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
  chat-template prompt of the canary's record followed by the prefix. That context (and the tokens of
  the prefix common to every candidate) is run once; the candidates' remaining tokens form a trie, and
  only its internal nodes are fed to the model, one token each against their parent's KV cache (a
  candidate's last token is read off its parent's logits, the first off the context's). 10,000 random
  6-digit references are ~17,000 token rows instead of ~50,000; the exhaustive 4-digit space is 1,111.
* The references of a format are scored once per distinct prompt (instruction + input) and shared by
  every canary with that prompt (`synthesize_federation(..., shared_canary_prompts=True)` gives all
  canaries of a format one prompt); canaries with their own prompts (a real run's) each pay a scoring.

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
from collections.abc import Callable, Iterable, Mapping, Sequence
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
    batch_size: int = Field(
        256, ge=1, description="trie nodes per forward pass (memory: up to ~2 x batch rows of prompt-length KV cache)"
    )
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

    Cost: the references of a format are scored once per distinct prompt (instruction + input), together
    with the secrets of every canary sharing that prompt, on their token trie (`_Trie`): one forward pass
    of the prompt, then one token per internal trie node against its parent's KV cache, a candidate's
    last token read off its parent's logits. 10,000 random 6-digit references are about 17,000 token rows
    (not 50,000 scored one candidate at a time), the exhaustive 4-digit space 1,111. Canaries planted
    with one shared prompt (`synthesize_federation(..., shared_canary_prompts=True)`) share that cost; a
    run's canaries, each with its own prompt, pay it per canary. Memory grows with `batch_size` x prompt
    length. A canary planted k times is judged against `canary_privacy_bound(epsilon, delta, k)`, not
    against the run's (epsilon, delta).
    """

    def __init__(self, config: CanaryExposureConfig | None = None) -> None:
        self.config = config or CanaryExposureConfig()

    def run(
        self,
        model: torch.nn.Module,
        template: ChatTemplate,
        probes: Sequence[CanaryProbe],
        *,
        progress: Callable[[int, int], None] | None = None,
    ) -> ExposureResult:
        """Exposure of every probe under `model`, prompted with `template` exactly as in training.

        `progress(done, total)` is called before the first forward pass and after each, counting token
        rows fed to the model (a prompt's forward counts as one).

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
        # one scoring per format and prompt: its references plus the secrets of the canaries that share it
        groups: dict[tuple[str, str, str], list[int]] = {}
        for index, probe in enumerate(probes):
            groups.setdefault((probe.format_name, probe.instruction, probe.input), []).append(index)
        jobs = []
        for (format_name, instruction, input_), members in groups.items():
            secrets = list(dict.fromkeys(probes[i].secret for i in members))
            prefix = self.config.formats[format_name][0]
            encoded = template.tokenizer([prefix + s for s in secrets], add_special_tokens=False)["input_ids"]
            trie = _Trie([*encoded, *references[format_name].encoded])
            jobs.append((template.prompt_ids(instruction, input_), trie, secrets, members))
        total = sum(trie.forwards for _, trie, _, _ in jobs)
        done = 0

        def advance(rows: int) -> None:
            nonlocal done
            done += rows
            if progress is not None:
                progress(done, total)

        if progress is not None:
            progress(0, total)
        measured: dict[int, CanaryResult] = {}
        was_training = model.training
        model.eval()
        try:
            with torch.inference_mode():
                for context, trie, secrets, members in jobs:
                    bits = _score_trie(model, context, trie, self.config.batch_size, advance)
                    canary_bits = dict(zip(secrets, bits[: len(secrets)].tolist(), strict=True))
                    scored = _Scored(bits[len(secrets) :], self.config.extrapolate)
                    for i in members:
                        probe = probes[i]
                        measured[i] = self._result(
                            probe, canary_bits[probe.secret], scored, references[probe.format_name]
                        )
        finally:
            model.train(was_training)
        return ExposureResult(
            canaries=tuple(measured[i] for i in range(len(probes))),
            references={k: len(v.secrets) for k, v in references.items()},
        )

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

    def _result(self, probe: CanaryProbe, canary_bits: float, scored: _Scored, references: _References) -> CanaryResult:
        candidates = len(references.secrets) + 1
        rank = rank_among_references(canary_bits, scored.bits)
        space_bits = self.config.formats[probe.format_name][1] * math.log2(10)
        return CanaryResult(
            canary_id=probe.canary_id,
            format_name=probe.format_name,
            repeats=probe.repeats,
            secret=probe.secret,
            log_perplexity_bits=canary_bits,
            reference_median_bits=scored.median,
            rank=rank,
            candidates=candidates,
            exhaustive=references.exhaustive,
            exposure=exposure_from_rank(rank, candidates),
            max_exposure=math.log2(candidates),
            space_bits=space_bits,
            extrapolated_exposure=scored.extrapolate(canary_bits, space_bits),
        )


class _Scored:
    """One scoring of a format's references, shared by every canary prompted with the same context."""

    def __init__(self, bits: npt.NDArray[np.float64], extrapolate: bool) -> None:
        self.bits = bits
        self.median = float(np.median(bits))
        self._fit = _skewnorm_fit(bits) if extrapolate else None

    def extrapolate(self, canary_bits: float, cap: float) -> float | None:
        """-log2 CDF of the skew-normal fitted to the references, at the canary (tensorflow_privacy's extrapolation)."""
        if self._fit is None:
            return None
        from scipy.stats import skewnorm  # type: ignore[import-untyped, unused-ignore]

        log_cdf = float(skewnorm.logcdf(canary_bits, *self._fit))
        return float(min(cap, max(0.0, -log_cdf / _LN2)))


def _skewnorm_fit(reference_bits: npt.NDArray[np.float64]) -> tuple[float, ...] | None:
    """Skew-normal parameters fitted to the reference log-perplexities, or None without scipy (~0.3 s per fit)."""
    try:
        from scipy.stats import skewnorm  # type: ignore[import-untyped, unused-ignore]
    except ImportError:  # pragma: no cover - scipy ships with the venv
        return None
    return tuple(float(v) for v in skewnorm.fit(reference_bits))


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


class _Trie:
    """The candidates' token trie below the tokens they all share; only its internal nodes cost a forward.

    Node 0 is the context (prompt + shared tokens). A node's score, -ln Pr(its path | context), is its
    parent's score minus the log-probability of its token under the parent's logits, so a node is fed to
    the model only if it has children: a candidate ending there reads its score off its parent's forward.
    Node ids grow with depth along every path (a parent is created before its children).
    """

    def __init__(self, encoded: list[list[int]]) -> None:
        self.shared = _common_prefix_length(encoded)
        if any(len(e) == self.shared for e in encoded):
            raise AttackConfigError("two candidate secrets tokenize identically; the ranking would be undefined")
        self.head = encoded[0][: self.shared]
        self.token = [-1]
        self.parent = [-1]
        self.children: list[dict[int, int]] = [{}]
        self.ends: list[int] = []
        for sequence in encoded:
            node = 0
            for token in sequence[self.shared :]:
                child = self.children[node].get(token)
                if child is None:
                    child = len(self.token)
                    self.children[node][token] = child
                    self.token.append(token)
                    self.parent.append(node)
                    self.children.append({})
                node = child
            self.ends.append(node)
        # candidates ending at or below each node: an upper bound on the nodes of any one level of its subtree
        self.below = np.zeros(len(self.token), dtype=np.int64)
        self.below[np.unique(self.ends)] = 1
        for node in range(len(self.token) - 1, 0, -1):
            self.below[self.parent[node]] += self.below[node]

    @property
    def forwards(self) -> int:
        """Rows this trie feeds to the model: the context's forward plus one per internal node below it."""
        return 1 + sum(1 for node in range(1, len(self.token)) if self.children[node])

    def chunks(self, nodes: list[int], batch_size: int) -> list[list[int]]:
        """`nodes` (one depth) packed into forward batches whose subtrees each fit one batch per level.

        A *light* node has at most `batch_size` candidates below it; light nodes are packed so a chunk holds
        at most `batch_size` candidates, hence at most `batch_size` nodes on every level below it, and its
        descent is one forward per level with nothing split. *Heavy* nodes (more candidates below) are at
        most m / `batch_size` per level and are packed `batch_size` to a chunk.
        """
        chunks: list[list[int]] = []
        heavy: list[int] = []
        light: list[int] = []
        light_below = 0
        for node in nodes:
            below = int(self.below[node])
            if below > batch_size:
                heavy.append(node)
                if len(heavy) == batch_size:
                    chunks.append(heavy)
                    heavy = []
                continue
            if light and light_below + below > batch_size:
                chunks.append(light)
                light, light_below = [], 0
            light.append(node)
            light_below += below
        return chunks + [c for c in (heavy, light) if c]


@dataclass
class _Frame:
    """Nodes of one depth whose KV cache (one row each) is kept until every chunk of their children is built."""

    rows: dict[int, int]
    cache: Any
    chunks: list[list[int]]
    next_chunk: int = 0


def _select_rows(cache: Any, rows: torch.Tensor) -> Any:
    """A new cache holding `rows` of `cache` (repeats allowed) along the batch dimension; `cache` is unchanged.

    transformers' layered caches (``DynamicLayer`` and its sliding-window kind) rebind their key/value
    tensors rather than writing into them, so copies of the layer objects may share the parent's tensors
    until ``batch_select_indices`` replaces them with indexed copies of the selected rows only. Older
    caches (lists of tensors) are deep-copied first.
    """
    layers = getattr(cache, "layers", None)
    if layers is None:
        selected = copy.deepcopy(cache)
    else:
        selected = copy.copy(cache)
        selected.layers = [copy.copy(layer) for layer in layers]
    selected.batch_select_indices(rows)
    return selected


def _score_trie(
    model: torch.nn.Module,
    context: list[int],
    trie: _Trie,
    batch_size: int,
    on_forward: Callable[[int], None] | None = None,
) -> npt.NDArray[np.float64]:
    """-log2 Pr(candidate tokens after the shared part | context) for every candidate of `trie`.

    Depth-first over chunks (`_Trie.chunks`): a chunk's nodes are fed one token each against their
    parents' rows of the previous level's KV cache, and a parent chunk is released as soon as its last
    chunk of children has been copied out of it, before their forward. A light chunk's descent is one
    forward per level, so the KV cache alive during a forward is at most `batch_size` rows plus those of
    the heavy chunks above (one row per heavy node, at most m / `batch_size` per depth), and `batch_size`
    more while a chunk's rows are copied from its parents'. A row holds the context plus the node's depth.
    """
    cache_name = _cache_keyword(model)
    nats = np.zeros(len(trie.token), dtype=np.float64)

    def expand(nodes: list[int], cache: Any, logits: torch.Tensor) -> _Frame | None:
        parents: list[int] = []
        tokens: list[int] = []
        children: list[int] = []
        for row, node in enumerate(nodes):
            for token, child in trie.children[node].items():
                parents.append(row)
                tokens.append(token)
                children.append(child)
        if not children:
            return None
        logp = torch.log_softmax(logits.float(), dim=-1)[torch.tensor(parents), torch.tensor(tokens)]
        nats[children] = nats[[nodes[row] for row in parents]] - logp.double().numpy()
        internal = [child for child in children if trie.children[child]]
        if not internal:
            return None
        return _Frame({node: row for row, node in enumerate(nodes)}, cache, trie.chunks(internal, batch_size))

    out = model(input_ids=torch.tensor([context + trie.head]), use_cache=True)
    if on_forward is not None:
        on_forward(1)
    root = expand([0], getattr(out, cache_name), out.logits[:, -1])
    stack: list[_Frame] = [root] if root is not None else []
    del out, root
    while stack:
        frame = stack[-1]
        chunk = frame.chunks[frame.next_chunk]
        frame.next_chunk += 1
        cache = _select_rows(frame.cache, torch.tensor([frame.rows[trie.parent[node]] for node in chunk]))
        if frame.next_chunk == len(frame.chunks):
            stack.pop()  # the parents' cache is released before the children's forward
        del frame
        tokens = torch.tensor([[trie.token[node]] for node in chunk])
        out = model(input_ids=tokens, use_cache=True, **{cache_name: cache})
        if on_forward is not None:
            on_forward(len(chunk))
        child = expand(chunk, getattr(out, cache_name), out.logits[:, -1])
        del out, cache
        if child is not None:
            stack.append(child)
        del child  # the stack holds the only reference, so popping it frees the cache
    return nats[trie.ends] / _LN2


def _log_perplexities(
    model: torch.nn.Module,
    context: list[int],
    encoded: list[list[int]],
    batch_size: int,
    on_forward: Callable[[int], None] | None = None,
) -> npt.NDArray[np.float64]:
    """-log2 Pr(candidate tokens after the shared part | context) for each candidate, scored on their token trie.

    The candidates (prefix + secret) are tokenized whole, as in training, so a tokenizer that merges the
    prefix's last character with the first digit is scored on the tokens it actually trained on; the
    tokens common to every candidate join the context. Candidates may have different lengths (one may
    even be a prefix of another). `on_forward` is told how many rows each forward pass fed.
    """
    return _score_trie(model, context, _Trie(encoded), batch_size, on_forward)
