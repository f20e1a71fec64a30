"""DAGER-style recovery of the token *set* behind one client's LoRA update (honest-but-curious server).

Why this attack: it is the sharpest known leak of a clear-text LoRA update on a LLaMA-architecture model, and
its success condition is crisp, so the matrix can show exactly where DP-SGD (and only DP-SGD) removes it.
Reference: Petrov et al., *DAGER: Exact Gradient Inversion for Large Language Models*, NeurIPS 2024 (the span
check, step 3 of its attack); the LoRA specifics are in ``shared/research/attacks.md`` sections 1.3-1.4.

The span check. A LoRA layer computes ``h = W x + s B A x``. With ``G = dL/dh`` (one row per position) and
``X`` the layer inputs:

* ``dL/dB = s G^T (X A^T)`` (d_out x r): its rows lie in ``span{A x_t}``, a subspace of R^r;
* ``dL/dA = s B^T G^T X`` (r x d_in): its rows lie in ``span{x_t}``, a subspace of R^d_in (zero while B = 0,
  i.e. on the first step after peft's initialisation).

For the attention projections of layer 0 of a LLaMA model, ``x_t = input_layernorm(embed(token_t))`` depends on
the token only, not its position (RoPE rotates q and k *after* the projection). So the server, which knows A
(it distributed the adapter; in FFA it is the public A0), can test every vocabulary token v: compute ``A x_v``,
normalise it and measure its distance to the row space of the observed B update. The row space's dimension is
the number of distinct visible tokens ``n_vis``, as long as ``n_vis < r``; then the true tokens lie in it up to
float error and a random token is far from it (a distance of order ``sqrt((r - n_vis) / r)``). When
``n_vis >= r`` the row space is all of R^r and the exact test is vacuous; the attack notices (the estimated rank
equals r) and recovers nothing exactly rather than "recovering" the whole vocabulary. What still leaks then is a
soft ranking (distance to the dominant half of the spectrum), scored here as precision@T (tiny model, 39 tokens,
r = 16: 0.28-0.44 against chance 0.15).

The same holds for a sum of SGD steps (a round update, or a SecAgg sum: the row space is then that of the union
of the tokens) because every step's rows lie in the same span. It does *not* hold for:

* **DP-SGD noise**: isotropic Gaussian noise on B makes the update full rank; at realistic noise multipliers the
  signal of one record is buried (the soft ranking falls to chance, `tests/threat_models/test_token_recovery.py`).
* **Adam**: its first step is ``lr * m / (sqrt(v) + eps) ~ lr * sign(g)`` elementwise; the elementwise sign of a
  rank-k matrix is not in its row space (and usually of higher rank), so the exact test recovers nothing even
  without noise (later steps divide by a per-coordinate running scale and are not in the span either). A soft
  ranking keeps some signal (tiny model, q_proj: precision@T 0.21-0.36 against chance 0.05).
* **fedit beyond one step**: once A moves, B's later gradients lie in ``span{A_t x}`` for a changing ``A_t``; the
  check with the distributed A is then only approximate. The lora_A update's check (rows in ``span{x_t}``) stays
  exact for SGD and is used whenever an A update is given and non-zero.
* **LoRA dropout > 0**: the adapter sees ``dropout(x)``, not x; the span check assumes dropout 0 (the default).

Beyond n_vis < r: joint sparse recovery from the lora_A updates (`SparseTokenRecovery`). In fedit, once B != 0,
every SGD step's lora_A update ``-lr s B^T G^T X`` has rows in ``span{x_t}``, so a whole round's update (a sum of
steps, or a SecAgg sum over clients) does too. But it is r x d_in: its row space is at most r-dimensional, a
*slice* of the n_vis-dimensional token span, and a true token is not in it once n_vis > r (the per-token test
above fails for true tokens too). The question becomes a joint-sparse one (multiple measurement vectors): find the
smallest set S of vocabulary tokens whose layer inputs span every row of the stacked layer-0 lora_A updates
(q and v read the same x_t, so their rows stack: 2r measurement vectors in R^d_in). The sparsest S is unique while
``|S| < (spark + rank) / 2`` (Chen and Huo 2006), about ``(d_in + 2r) / 2`` for embeddings in general position
(304 for SmolLM2: d_in = 576, 2r = 32), far more than r. It is found greedily by order-recursive matching pursuit
(ORMP: pick the token whose component orthogonal to the chosen ones best explains the residual, project it out)
until the residual falls to the float32 rounding floor of the training, which the server can compute from the A it
distributed and the number of steps; then tokens whose removal keeps the residual at the floor are pruned. A
residual at the floor *certifies* the answer (up to the uniqueness bound); if it never gets there the attacker
knows it has only a guess. What breaks it is the same as above: DP noise (full rank, no floor), Adam (elementwise
steps), and FFA, where A never moves and is not even sent (only B, whose rows live in R^r).

Positions that receive no gradient do not enter the row space (`visible_tokens`): the last position of a record
(no loss term reads it), padding, and for ``q_proj`` position 0 (a softmax over one key does not depend on the
query). A token whose layer input is exactly zero (the tiny test model's zeroed padding embedding) contributes
nothing either.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import numpy as np
import numpy.typing as npt
import torch
from peft import PeftModel
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from secure_fedllm.data import IGNORE_INDEX, Batch

from ..errors import AttackConfigError
from ..results import MatrixRow
from .updates import dp_step_update, loss_gradient, split_update

__all__ = [
    "SpanCheck",
    "SparseRecoveryConfig",
    "SparseRecoveryResult",
    "SparseTokenRecovery",
    "TokenRecovery",
    "TokenRecoveryConfig",
    "TokenRecoveryResult",
    "dp_step_update",
    "loss_gradient",
    "split_update",
    "visible_tokens",
]

ATTACK = "token_recovery"
"""The `attack` field of every matrix row this module reports."""

_Z95 = 1.959963984540054


class TokenRecoveryConfig(BaseModel):
    """Which adapted projection to attack and how strict the exact test is.

    Constructing it directly raises `AttackConfigError` (naming the field) for invalid values.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    module: Literal["q_proj", "k_proj", "v_proj"] = Field(
        "q_proj", description="the layer-0 attention projection whose LoRA update is attacked (all read x_t)"
    )
    layer: Literal[0] = Field(
        0, description="only layer 0's input is a function of the token alone; deeper layers need sequence search"
    )
    rank_tol: Annotated[float, Field(gt=0, lt=1)] = Field(
        1e-5, description="singular values below rank_tol * largest count as zero (float32 error is ~1e-7)"
    )
    distance_threshold: Annotated[float, Field(gt=0, lt=1)] = Field(
        1e-4, description="a token is recovered when its normalised distance to the row space is below this"
    )
    rank_margin: Annotated[int, Field(ge=0)] = Field(
        1,
        description="the exact test runs only if rank <= max_rank - rank_margin (at max_rank the row space is "
        "the whole space and every token passes; DAGER's rank_cutoff); 0 disables the guard",
    )
    top_t: Annotated[int, Field(ge=1)] | None = Field(
        None, description="T of precision@T; default n_vis when ground truth is given, else the estimated rank"
    )
    soft_rank: Annotated[int, Field(ge=1)] | None = Field(
        None, description="subspace dimension for the soft ranking when the update has full rank; default half"
    )
    use_lora_a: bool = Field(True, description="also test the lora_A update (fedit) when one is given and non-zero")
    chunk_size: Annotated[int, Field(ge=1)] = Field(8192, description="vocabulary rows processed at once")

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" for e in exc.errors())
            raise AttackConfigError(f"invalid TokenRecoveryConfig: {problems}") from None


@dataclass(frozen=True)
class SpanCheck:
    """What one update matrix's row space looks like and whether the exact test on it means anything.

    Attributes:
        tensor: "lora_B" (row space in R^r, candidates ``A x_v``) or "lora_A" (row space in R^d, candidates x_v).
        rank: numerical rank of the update (singular values above ``rank_tol`` times the largest).
        max_rank: the largest rank the update could have, ``min(update.shape)``.
        informative: whether ``rank <= max_rank - rank_margin``. If not, the exact test means nothing: for B the
            row space is all of R^r (every token passes); for A it is an r-dimensional slice of a larger token
            span (true tokens fail).
        soft_dim: dimension of the subspace the soft ranking measures distance to.
        singular_values: the update's singular values, largest first, relative to the largest.
    """

    tensor: Literal["lora_A", "lora_B"]
    rank: int
    max_rank: int
    informative: bool
    soft_dim: int
    singular_values: tuple[float, ...]


class _GroundTruthScores:
    """Precision, recall and precision@T of a recovery against its ground truth (both attacks' results).

    Needs `recovered`, `ranking`, `top_t`, `true_tokens` and `vocab_size` on the subclass.
    """

    recovered: frozenset[int]
    top_t: int
    true_tokens: frozenset[int] | None
    vocab_size: int

    @property
    def n_vis(self) -> int | None:
        """Number of distinct tokens that received gradient (the size of the ground truth)."""
        return None if self.true_tokens is None else len(self.true_tokens)

    @property
    def exact_hits(self) -> int | None:
        """Recovered tokens that are in the ground truth."""
        return None if self.true_tokens is None else len(self.recovered & self.true_tokens)

    @property
    def false_positives(self) -> int | None:
        """Recovered tokens that are not in the ground truth."""
        return None if self.true_tokens is None else len(self.recovered - self.true_tokens)

    @property
    def precision(self) -> float | None:
        """Exact hits over recovered tokens; 0.0 when nothing was recovered (the attack claimed nothing)."""
        if self.true_tokens is None:
            return None
        return len(self.recovered & self.true_tokens) / len(self.recovered) if self.recovered else 0.0

    @property
    def recall(self) -> float | None:
        """Exact hits over the ground truth."""
        if self.true_tokens is None:
            return None
        return len(self.recovered & self.true_tokens) / len(self.true_tokens)

    @property
    def top_hits(self) -> int | None:
        """Ground-truth tokens among the T best-ranked candidates."""
        if self.true_tokens is None:
            return None
        return len(set(self.ranking[: self.top_t].tolist()) & self.true_tokens)  # type: ignore[attr-defined]

    @property
    def precision_at_t(self) -> float | None:
        """Fraction of the T best-ranked candidates that are in the ground truth."""
        hits = self.top_hits
        return None if hits is None else hits / self.top_t

    @property
    def chance_precision(self) -> float | None:
        """Precision (exact or @T) of a guess drawn uniformly from the vocabulary: n_vis / |V|.

        With the default T = n_vis this is T / |V|.
        """
        return None if self.true_tokens is None else len(self.true_tokens) / self.vocab_size

    def _score_rows(self, attack: str) -> list[MatrixRow]:
        """Precision, recall and precision@T as matrix rows, with chance levels and 95% Wilson intervals.

        Chance: precision and precision@T of uniform guessing is n_vis/|V|; the recall of a uniform guess of as
        many tokens as were recovered is |recovered|/|V|.

        Raises:
            AttackConfigError: the attack was run without ground truth.
        """
        if self.true_tokens is None:
            raise AttackConfigError(f"rows() needs the ground truth: pass true_tokens to {attack}.run")
        hits = len(self.recovered & self.true_tokens)
        n_vis = len(self.true_tokens)
        chance = n_vis / self.vocab_size
        return [
            _row("precision", hits, len(self.recovered), chance),
            _row("recall", hits, n_vis, len(self.recovered) / self.vocab_size),
            _row("precision_at_T", self.top_hits or 0, self.top_t, chance),
        ]


@dataclass(frozen=True)
class TokenRecoveryResult(_GroundTruthScores):
    """Recovered tokens, the soft ranking and, with ground truth, how well they match it.

    Attributes:
        module: the attacked projection.
        layer: the attacked layer (0).
        r: the LoRA rank.
        vocab_size: number of candidate tokens (rows of the input embedding).
        checks: the span checks that were run (lora_B, and lora_A when given and non-zero).
        recovered: tokens that passed every informative exact check (empty when none is informative).
        distances: per token, the largest normalised distance over the informative checks (1.0 if none).
        scores: per token, the soft distance used for the ranking (smaller = more likely present).
        top_t: T of precision@T.
        true_tokens: the ground truth (distinct visible tokens), if given.
    """

    module: str
    layer: int
    r: int
    vocab_size: int
    checks: tuple[SpanCheck, ...]
    recovered: frozenset[int]
    distances: npt.NDArray[np.float64]
    scores: npt.NDArray[np.float64]
    top_t: int
    true_tokens: frozenset[int] | None = None

    @property
    def rank(self) -> int:
        """Numerical rank of the first check's update (the B update when given): the attacker's n_vis estimate."""
        return self.checks[0].rank if self.checks else 0

    @property
    def informative(self) -> bool:
        """Whether any exact check could separate tokens (False: the exact test was skipped as vacuous)."""
        return any(c.informative for c in self.checks)

    @property
    def self_consistent(self) -> bool:
        """Whether exactly `rank` tokens were recovered: the check an attacker without ground truth can make."""
        return self.informative and len(self.recovered) == self.rank

    @property
    def ranking(self) -> npt.NDArray[np.int64]:
        """All candidate tokens, most likely present first (stable sort of `scores`)."""
        return np.argsort(self.scores, kind="stable").astype(np.int64)

    def rows(self) -> list[MatrixRow]:
        """Precision, recall and precision@T as matrix rows (see `_GroundTruthScores._score_rows`).

        Raises:
            AttackConfigError: the attack was run without ground truth.
        """
        return self._score_rows("TokenRecovery")


class TokenRecovery:
    """The span check of DAGER against one layer-0 attention projection's LoRA update."""

    def __init__(self, config: TokenRecoveryConfig | None = None) -> None:
        self.config = config if config is not None else TokenRecoveryConfig()

    def run(
        self,
        model: PeftModel,
        update: torch.Tensor | Mapping[str, torch.Tensor],
        *,
        update_a: torch.Tensor | None = None,
        true_tokens: Collection[int] | None = None,
    ) -> TokenRecoveryResult:
        """Test every vocabulary token against the row space of the observed update.

        Args:
            model: the adapted model *as the server distributed it* (its lora_A is the A the client started
                from; in FFA that is A0 forever). Only its embedding, layer-0 norm and lora_A are read.
            update: the lora_B update (or gradient; scale and sign do not matter) of the configured projection,
                shape (d_out, r); or a mapping from parameter names to updates (e.g. `split_update` of a flat
                manifest vector), from which the lora_B and, in fedit, lora_A entries of the projection are taken.
            update_a: the lora_A update, shape (r, d_in), when not inside `update`.
            true_tokens: the distinct visible tokens (`visible_tokens`), for the metrics; None to attack blind.

        Returns:
            The recovered tokens, the soft ranking and, with ground truth, the metrics.

        Raises:
            AttackConfigError: the model has no LoRA on the projection, is not LLaMA-like, the update has the
                wrong shape, or the ground truth is empty.
        """
        cfg = self.config
        embedding, norm, lora_a = _layer_parts(model, cfg.layer, cfg.module)
        a_weight = lora_a.detach().to(torch.float64)
        r, d_in = a_weight.shape
        b_update, a_update = _pick_updates(update, cfg.layer, cfg.module)
        if update_a is not None:
            a_update = update_a
        vocab_size = int(embedding.weight.shape[0])
        truth = None if true_tokens is None else frozenset(int(t) for t in true_tokens)
        if truth is not None and (not truth or min(truth) < 0 or max(truth) >= vocab_size):
            raise AttackConfigError(f"true_tokens must be a non-empty set of token ids in [0, {vocab_size})")

        plans: list[_Plan] = []
        if b_update is not None:
            if b_update.ndim != 2 or b_update.shape[1] != r:
                raise AttackConfigError(
                    f"lora_B update of {cfg.module}: expected shape (d_out, {r}), got {tuple(b_update.shape)}"
                )
            plans.append(self._plan("lora_B", b_update, a_weight))
        if a_update is not None and cfg.use_lora_a:
            if tuple(a_update.shape) != (r, d_in):
                raise AttackConfigError(
                    f"lora_A update of {cfg.module}: expected shape {(r, d_in)}, got {tuple(a_update.shape)}"
                )
            plans.append(self._plan("lora_A", a_update, None))
        if not plans:
            raise AttackConfigError(f"no lora_B or lora_A update of layers.{cfg.layer}.self_attn.{cfg.module} given")
        plans = [p for p in plans if p.check.rank > 0] or plans[:1]  # a zero update (A while B = 0) says nothing

        exact, soft = self._distances(plans, embedding, norm, vocab_size)
        recovered = frozenset(np.flatnonzero(exact < cfg.distance_threshold).tolist())
        if cfg.top_t is not None:
            top_t = cfg.top_t
        else:
            top_t = len(truth) if truth is not None else max(plans[0].check.rank, 1)
        return TokenRecoveryResult(
            module=cfg.module,
            layer=cfg.layer,
            r=r,
            vocab_size=vocab_size,
            checks=tuple(p.check for p in plans),
            recovered=recovered,
            distances=exact,
            scores=soft,
            top_t=min(top_t, vocab_size),
            true_tokens=truth,
        )

    def _plan(self, tensor: Literal["lora_A", "lora_B"], update: torch.Tensor, projector: torch.Tensor | None) -> _Plan:
        """SVD of one update: its numerical rank, the exact-test basis and the soft-ranking basis."""
        matrix = update.detach().to(torch.float64).cpu()
        _, sv, vh = torch.linalg.svd(matrix, full_matrices=False)
        largest = float(sv[0]) if sv.numel() else 0.0
        rank = int((sv > self.config.rank_tol * largest).sum()) if largest > 0 else 0
        max_rank = min(matrix.shape)
        informative = 0 < rank <= max_rank - self.config.rank_margin
        if informative:
            soft_dim = rank
        else:
            soft_dim = min(rank, self.config.soft_rank or max(1, max_rank // 2))
        relative = (sv / largest).tolist() if largest > 0 else [0.0] * sv.numel()
        check = SpanCheck(tensor, rank, max_rank, informative, soft_dim, tuple(float(s) for s in relative))
        return _Plan(check, vh[:rank].T.contiguous(), vh[:soft_dim].T.contiguous(), projector)

    def _distances(
        self, plans: list[_Plan], embedding: torch.nn.Embedding, norm: torch.nn.Module, vocab_size: int
    ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        """Per token: the worst exact distance over informative checks, and the worst soft distance.

        Why the worst (max): a present token lies in every check's row space, so requiring all of them can only
        remove false positives. Tokens whose candidate vector is zero cannot be tested and get distance 1.
        """
        exact = np.ones(vocab_size, dtype=np.float64)
        soft = np.zeros(vocab_size, dtype=np.float64)
        informative = [p for p in plans if p.check.informative]
        ranked = informative or plans
        if informative:
            exact[:] = 0.0
        for start, x in _layer_inputs(embedding, norm, self.config.chunk_size):
            stop = start + x.shape[0]
            for plan in plans:
                cand = x @ plan.projector.T if plan.projector is not None else x
                length = cand.norm(dim=1, keepdim=True)
                unit = cand / length.clamp_min(torch.finfo(torch.float64).tiny)
                dead = (length.squeeze(1) == 0).numpy()
                if plan.check.informative:
                    dist = _residual(unit, plan.exact_basis)
                    dist[dead] = 1.0
                    exact[start:stop] = np.maximum(exact[start:stop], dist)
                if any(plan is q for q in ranked):
                    dist = _residual(unit, plan.soft_basis)
                    dist[dead] = 1.0
                    soft[start:stop] = np.maximum(soft[start:stop], dist)
        return exact, soft


@dataclass(frozen=True, eq=False)
class _Plan:
    check: SpanCheck
    exact_basis: torch.Tensor
    soft_basis: torch.Tensor
    projector: torch.Tensor | None


# --------------------------------------------------------------------------------------------------------------
# Joint sparse recovery from the lora_A updates (fedit, n_vis > r)
# --------------------------------------------------------------------------------------------------------------


class SparseRecoveryConfig(BaseModel):
    """Which layer-0 lora_A updates to stack and when the residual counts as the rounding floor.

    Constructing it directly raises `AttackConfigError` (naming the field) for invalid values.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    modules: tuple[Literal["q_proj", "k_proj", "v_proj"], ...] = Field(
        ("q_proj", "v_proj"),
        min_length=1,
        description="layer-0 projections whose lora_A updates are stacked (all read the same x_t); those without "
        "an update are skipped",
    )
    layer: Literal[0] = Field(0, description="only layer 0's input is a function of the token alone")
    floor_factor: Annotated[float, Field(gt=1)] = Field(
        4.0, description="the residual certifies the answer once it is below floor_factor times the rounding floor"
    )
    max_tokens: Annotated[int, Field(ge=1)] | None = Field(
        None, description="greedy budget; default (d_in + stacked rows) // 2, the uniqueness bound of the sparsest set"
    )
    min_orthogonal: Annotated[float, Field(gt=0, lt=1)] = Field(
        1e-4, description="a candidate whose part orthogonal to the chosen tokens is shorter than this is skipped"
    )
    chunk_size: Annotated[int, Field(ge=1)] = Field(8192, description="vocabulary rows processed at once")

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" for e in exc.errors())
            raise AttackConfigError(f"invalid SparseRecoveryConfig: {problems}") from None


@dataclass(frozen=True)
class SparseRecoveryResult(_GroundTruthScores):
    """The recovered token set, how the greedy search got there and, with ground truth, how well it matches.

    Attributes:
        modules: the projections whose lora_A updates were stacked.
        vocab_size: number of candidate tokens.
        d_in: dimension of the layer input.
        measurements: stacked rows (r per module).
        selected: tokens in the order the greedy search chose them.
        residuals: residual norm after each choice, relative to the update's norm.
        floor: the rounding floor (absolute Frobenius norm) the residual is compared with.
        certified: whether the residual reached ``floor_factor * floor`` within the budget. If not, `recovered` is
            the greedy selection, a guess the attacker knows is unconfirmed.
        recovered: the pruned set when certified, else every selected token.
        ranking: all candidates, most likely present first (recovered in selection order, then the rest).
        top_t: T of precision@T.
        true_tokens: the ground truth, if given.
    """

    modules: tuple[str, ...]
    vocab_size: int
    d_in: int
    measurements: int
    selected: tuple[int, ...]
    residuals: tuple[float, ...]
    floor: float
    certified: bool
    recovered: frozenset[int]
    ranking: npt.NDArray[np.int64]
    top_t: int
    true_tokens: frozenset[int] | None = None

    def rows(self) -> list[MatrixRow]:
        """Precision, recall and precision@T (chance levels as in `TokenRecoveryResult.rows`) and `certified`.

        Raises:
            AttackConfigError: the attack was run without ground truth.
        """
        certified = MatrixRow(attack=ATTACK, metric="certified", value=float(self.certified))
        return [*self._score_rows("SparseTokenRecovery"), certified]


class SparseTokenRecovery:
    """The token set behind stacked layer-0 lora_A updates, by greedy joint-sparse recovery (module docstring)."""

    def __init__(self, config: SparseRecoveryConfig | None = None) -> None:
        self.config = config if config is not None else SparseRecoveryConfig()

    def run(
        self,
        model: PeftModel,
        update: Mapping[str, torch.Tensor],
        *,
        roundings: int,
        extra_std: float = 0.0,
        true_tokens: Collection[int] | None = None,
    ) -> SparseRecoveryResult:
        """Find the fewest vocabulary tokens whose layer inputs span every row of the observed lora_A updates.

        Args:
            model: the adapted model as the server distributed it (its lora_A is the A the clients started from).
            update: parameter name -> update (e.g. `split_update` of what the server received).
            roundings: float32 roundings each coordinate went through: local steps times the number of updates
                summed (each SGD step rounds the float32 parameter once). Public: the run's local steps and cohort.
            extra_std: per-coordinate standard deviation of any further rounding the server knows of (the secure
                aggregation encoding's stochastic rounding: ``sqrt(parties) / (2 * scale)``).
            true_tokens: the distinct visible tokens (union over the modules), for the metrics; None to attack blind.

        Raises:
            AttackConfigError: no lora_A update of the configured projections, a wrong shape, an empty ground truth
                or a negative `roundings` / `extra_std`.
        """
        cfg = self.config
        if roundings < 0 or not extra_std >= 0:
            raise AttackConfigError(f"roundings={roundings} and extra_std={extra_std} must be >= 0")
        rows: list[torch.Tensor] = []
        energy = 0.0
        used: list[str] = []
        embedding = norm = None
        for module in cfg.modules:
            try:
                embedding, norm, lora_a = _layer_parts(model, cfg.layer, module)
            except AttackConfigError:
                continue
            _, a_update = _pick_updates(update, cfg.layer, module)
            if a_update is None:
                continue
            if tuple(a_update.shape) != tuple(lora_a.shape):
                raise AttackConfigError(
                    f"lora_A update of {module}: expected shape {tuple(lora_a.shape)}, got {tuple(a_update.shape)}"
                )
            rows.append(a_update.detach().to(torch.float64).cpu())
            ulp = np.spacing(np.abs(lora_a.detach().float().cpu().numpy()))
            energy += roundings * float((ulp.astype(np.float64) ** 2).sum()) / 12 + extra_std**2 * ulp.size
            used.append(module)
        if not rows or embedding is None or norm is None:
            raise AttackConfigError(
                f"no lora_A update of layers.{cfg.layer}.self_attn.{{{', '.join(cfg.modules)}}} given: the model must "
                "train A (lora.aggregation = 'fedit') and the update must hold it"
            )
        y = torch.cat(rows).T.contiguous()  # d_in x m: the measurement vectors as columns
        if float(y.abs().max()) == 0:
            raise AttackConfigError(
                "the lora_A update is zero (B was 0 throughout, as on the first step after peft's init): it carries "
                "no tokens; attack a round that starts from B != 0"
            )
        d_in, m = y.shape
        vocab_size = int(embedding.weight.shape[0])
        truth = None if true_tokens is None else frozenset(int(t) for t in true_tokens)
        if truth is not None and (not truth or min(truth) < 0 or max(truth) >= vocab_size):
            raise AttackConfigError(f"true_tokens must be a non-empty set of token ids in [0, {vocab_size})")
        floor = math.sqrt(energy)
        target = cfg.floor_factor * floor
        budget = min(cfg.max_tokens or (d_in + m) // 2, d_in, vocab_size)

        x = torch.cat([chunk for _, chunk in _layer_inputs(embedding, norm, cfg.chunk_size)])
        length = x.norm(dim=1)
        live = length > 0
        xn = x / length.clamp_min(torch.finfo(torch.float64).tiny).unsqueeze(1)
        total = float(y.norm())
        selected, residuals, certified = self._pursue(xn, live, y, target, budget)
        residuals = [r / total for r in residuals]
        chosen = self._prune(xn, y, selected, target) if certified else list(selected)
        recovered = frozenset(chosen)
        rest = [v for v in selected if v not in recovered]
        seen = set(selected)
        order = [*chosen, *rest, *(v for v in range(vocab_size) if v not in seen)]
        top_t = len(truth) if truth is not None else max(len(recovered), 1)
        return SparseRecoveryResult(
            modules=tuple(used),
            vocab_size=vocab_size,
            d_in=d_in,
            measurements=m,
            selected=tuple(selected),
            residuals=tuple(residuals),
            floor=floor,
            certified=certified,
            recovered=recovered,
            ranking=np.asarray(order, dtype=np.int64),
            top_t=min(top_t, vocab_size),
            true_tokens=truth,
        )

    def _pursue(
        self, xn: torch.Tensor, live: torch.Tensor, y: torch.Tensor, target: float, budget: int
    ) -> tuple[list[int], list[float], bool]:
        """Order-recursive matching pursuit on all measurement vectors at once.

        Kept incrementally, one (|V| x d_in) product per choice: the residual R (orthogonal to the chosen span),
        the correlations C = Xn R (equal to each candidate's orthogonal part times R, since R is orthogonal to
        the span) and each candidate's squared orthogonal length. The ORMP score ||C_v||^2 / |x_v^perp|^2 is the
        residual energy the candidate would remove; plain OMP (||C_v||^2) over-picks near-duplicates of chosen
        tokens, which the embedding of a real vocabulary has many of.
        """
        d_in = y.shape[0]
        residual = y.clone()
        corr = xn @ residual
        perp2 = live.to(torch.float64)
        open_ = live.clone()
        basis = torch.zeros((d_in, budget), dtype=torch.float64)
        min_perp2 = self.config.min_orthogonal**2
        selected: list[int] = []
        residuals: list[float] = []
        if float(residual.norm()) <= target:
            return selected, residuals, True
        while len(selected) < budget:
            score = (corr * corr).sum(dim=1) / perp2.clamp_min(min_perp2)
            score[~open_ | (perp2 < min_perp2)] = -1.0
            v = int(torch.argmax(score))
            if float(score[v]) < 0:
                break  # every candidate lies in the chosen span
            k = len(selected)
            direction = xn[v].clone()
            for _ in range(2):  # Gram-Schmidt twice: one pass loses orthogonality at this many vectors
                direction -= basis[:, :k] @ (basis[:, :k].T @ direction)
            direction /= direction.norm()
            basis[:, k] = direction
            weights = direction @ residual
            residual -= torch.outer(direction, weights)
            along = xn @ direction
            corr -= torch.outer(along, weights)
            perp2 -= along * along
            open_[v] = False
            selected.append(v)
            residuals.append(float(residual.norm()))
            if residuals[-1] <= target:
                return selected, residuals, True
        return selected, residuals, False

    @staticmethod
    def _prune(xn: torch.Tensor, y: torch.Tensor, selected: list[int], target: float) -> list[int]:
        """Drop, one at a time, the chosen token whose removal raises the residual least, while it stays <= target.

        Why it finds the true set: once the residual is at the floor, every row of the update is a combination of
        the chosen tokens; true tokens carry non-zero coefficients (removing one leaves part of a row
        unexplained), wrong early choices carry coefficients at the noise level.
        """
        kept = list(selected)
        limit = target * target
        while kept:
            a = xn[kept].T  # d_in x s
            q, r = torch.linalg.qr(a)
            coef = torch.linalg.solve_triangular(r, q.T @ y, upper=True)  # s x m
            current = float((y - a @ coef).pow(2).sum())
            r_inv = torch.linalg.solve_triangular(r, torch.eye(r.shape[0], dtype=r.dtype), upper=True)
            gram_inv_diag = (r_inv * r_inv).sum(dim=1)  # diag((A^T A)^-1)
            cost = (coef * coef).sum(dim=1) / gram_inv_diag  # residual energy added by dropping each token
            j = int(torch.argmin(cost))
            if current + float(cost[j]) > limit:
                break
            del kept[j]
        order = {v: i for i, v in enumerate(selected)}
        return sorted(kept, key=order.__getitem__)


# --------------------------------------------------------------------------------------------------------------
# Helpers: the client's update from public APIs, the ground truth, and flat vectors
# --------------------------------------------------------------------------------------------------------------


def visible_tokens(model: PeftModel, batch: Batch, module: str = "q_proj") -> set[int]:
    """The distinct tokens of `batch` whose layer-0 input reaches the projection's gradient: the ground truth.

    Why not simply all tokens: positions that no loss term depends on contribute a zero row. Per row (right or
    left padding via the attention mask), with ``p_max`` the last position whose next token carries a label:

    * positions after ``p_max`` (the final token, padding) are invisible to every projection;
    * for ``q_proj`` the first attended position is invisible (a softmax over one key ignores the query) and,
      in a one-layer model, so is every position that is not itself a loss position;
    * a token whose layer input is exactly zero (a zeroed padding embedding) contributes nothing.

    Raises:
        AttackConfigError: the model is not LLaMA-like or the projection has no LoRA.
    """
    embedding, norm, _ = _layer_parts(model, 0, module)
    layers = sum(1 for name, _ in model.named_modules() if re.search(r"(^|\.)layers\.\d+\.input_layernorm$", name))
    seen: set[int] = set()
    for ids, mask, labels in zip(batch.input_ids, batch.attention_mask, batch.labels, strict=True):
        valid = torch.nonzero(mask).flatten()
        if valid.numel() == 0:
            continue
        first, last = int(valid[0]), int(valid[-1])
        loss_at = [j for j in range(first, last) if int(labels[j + 1]) != IGNORE_INDEX]
        if not loss_at:
            continue
        p_max = max(loss_at)
        if module == "q_proj":
            positions = loss_at if layers == 1 else list(range(first, p_max + 1))
            positions = [j for j in positions if j != first]
        elif module == "k_proj" and p_max == first:
            positions = []  # one query over one key: the key does not matter either
        else:
            positions = list(range(first, p_max + 1))
        seen.update(int(ids[j]) for j in positions)
    if not seen:
        return seen
    order = sorted(seen)
    with torch.no_grad():
        x = norm(embedding.weight[torch.tensor(order)])
    return {t for t, row in zip(order, x, strict=True) if bool(row.abs().max() > 0)}


def _layer_parts(model: PeftModel, layer: int, module: str) -> tuple[torch.nn.Embedding, torch.nn.Module, torch.Tensor]:
    """The input embedding, the layer's input norm and the projection's lora_A weight, or a clear error."""
    modules = dict(model.named_modules())
    if any(name.endswith(("embed_positions", ".wpe")) for name in modules):
        raise AttackConfigError("the model adds absolute position embeddings; this check needs a RoPE (LLaMA) model")
    norm = next((m for n, m in modules.items() if n.endswith(f"layers.{layer}.input_layernorm")), None)
    target = next((m for n, m in modules.items() if n.endswith(f"layers.{layer}.self_attn.{module}")), None)
    embedding = model.get_input_embeddings()
    if norm is None or target is None or not isinstance(embedding, torch.nn.Embedding):
        raise AttackConfigError(
            f"no layers.{layer}.input_layernorm / self_attn.{module} / input embedding: not a LLaMA-architecture model"
        )
    lora_a = getattr(target, "lora_A", None)
    if not isinstance(lora_a, torch.nn.ModuleDict) or len(lora_a) != 1:
        raise AttackConfigError(
            f"layers.{layer}.self_attn.{module} has no (single) LoRA adapter; set module to an adapted projection"
        )
    weight = next(iter(lora_a.values())).weight
    assert isinstance(weight, torch.Tensor)
    return embedding, norm, weight


def _pick_updates(
    update: torch.Tensor | Mapping[str, torch.Tensor], layer: int, module: str
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The lora_B and lora_A updates of the projection from a tensor (B) or a name -> tensor mapping."""
    if isinstance(update, torch.Tensor):
        return update, None
    found: dict[str, list[torch.Tensor]] = {"lora_A": [], "lora_B": []}
    pattern = re.compile(rf"(^|\.)layers\.{layer}\.self_attn\.{module}\.(lora_[AB])\.")
    for name, tensor in update.items():
        match = pattern.search(name)
        if match:
            found[match.group(2)].append(torch.as_tensor(tensor))
    if any(len(v) > 1 for v in found.values()):
        raise AttackConfigError(f"several LoRA updates match layers.{layer}.self_attn.{module}; pass one tensor")
    b = found["lora_B"][0] if found["lora_B"] else None
    a = found["lora_A"][0] if found["lora_A"] else None
    return b, a


def _layer_inputs(
    embedding: torch.nn.Embedding, norm: torch.nn.Module, chunk: int
) -> Iterator[tuple[int, torch.Tensor]]:
    """Layer-0 inputs ``norm(embed(v))`` of the whole vocabulary, in chunks, as float64.

    Computed in the model's own dtype by the model's own norm module, so they equal what the client's forward
    pass fed the adapter (bit for bit in float32), then widened for the projections.
    """
    weight = embedding.weight
    with torch.no_grad():
        for start in range(0, weight.shape[0], chunk):
            yield start, norm(weight[start : start + chunk]).detach().to(torch.float64).cpu()


def _residual(unit: torch.Tensor, basis: torch.Tensor) -> npt.NDArray[np.float64]:
    """Norm of the part of each unit row orthogonal to the orthonormal columns of `basis`."""
    if basis.shape[1] == 0:
        return np.asarray(unit.norm(dim=1).numpy(), dtype=np.float64)
    rest = unit - (unit @ basis) @ basis.T
    return np.asarray(rest.norm(dim=1).numpy(), dtype=np.float64)


def _wilson(successes: int, trials: int) -> tuple[float, float]:
    if trials == 0:
        return 0.0, 1.0
    p = successes / trials
    denom = 1 + _Z95**2 / trials
    centre = (p + _Z95**2 / (2 * trials)) / denom
    half = _Z95 * math.sqrt(p * (1 - p) / trials + _Z95**2 / (4 * trials**2)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def _row(metric: str, successes: int, trials: int, chance: float) -> MatrixRow:
    low, high = _wilson(successes, trials)
    value = successes / trials if trials else 0.0
    return MatrixRow(attack=ATTACK, defense="", metric=metric, value=value, chance=chance, ci_low=low, ci_high=high)
