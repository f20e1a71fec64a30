"""Membership inference against a released (fine-tuned) causal LM: loss, zlib, Min-K% and reference scores.

The question a federation must answer is whether the released adapter reveals *which* records were
trained on. The strongest practical attacks on fine-tuned LMs need only forward passes of the released
model, and, when the base model is public (it is, for LoRA), the base model as a reference
(the project's attack research note, section 2; Mireshghallah et al., EMNLP 2022: AUC 0.66 -> 0.90 from
reference calibration). All scores are computed on the *response* tokens of the chat template, the
tokens the clients' training loss was computed on, so the attack sees exactly what training touched.

Scores (higher = "member"):

* ``loss``: minus the mean response-token NLL (Yeom et al., CSF 2018). Equals
  ``-secure_fedllm.training.per_example_loss``.
* ``zlib``: minus the mean NLL divided by the zlib-compressed size in bytes of the response text
  (Carlini et al., USENIX Security 2021; this is the form of their and Shi et al.'s / MIMIR's code, so
  numbers compare with those; the research note writes the summed NLL, which differs per record by the
  token count). It discounts records that are likely merely because they are repetitive.
* ``min_k``: the mean log-probability of the k% least likely response tokens (Shi et al., ICLR 2024):
  a member has fewer surprising tokens; k is `MembershipConfig.min_k_fraction`.
* ``reference``: NLL under the reference model minus NLL under the target (offline calibration). For a
  peft model with no explicit reference, the frozen base is used by disabling the adapter: the ideal
  reference for a LoRA release, and no second copy of the weights.

Every score gets AUC (DeLong interval), TPR at 1% FPR and, with >= 5,000 non-members, at 0.1% FPR
(Clopper-Pearson intervals), and ROC points for a log-scale plot (`threat_models.stats`).
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np
import numpy.typing as npt
import torch
from pydantic import BaseModel, ConfigDict, Field

from secure_fedllm.data import IGNORE_INDEX, Batch, ChatTemplate, Example, TokenizedDataset

from ..errors import AttackConfigError
from ..results import MatrixRow
from ..stats import (
    AucEstimate,
    OperatingPoint,
    auc_with_ci,
    min_nonmembers_for_fpr,
    require_sample_sizes,
    roc_curve,
    tpr_at_fpr,
)

__all__ = [
    "SCORE_NAMES",
    "MembershipConfig",
    "MembershipInference",
    "MembershipResult",
    "RecordStats",
    "ScoreName",
    "ScoreReport",
]

ScoreName = Literal["loss", "zlib", "min_k", "reference"]
SCORE_NAMES: tuple[ScoreName, ...] = ("loss", "zlib", "min_k", "reference")
LOW_FPR = 0.001
"""The second, optional operating point (0.1% FPR); reported only with enough non-members."""


class InstructionRecord(Protocol):
    """Anything with Alpaca fields: `secure_fedllm.data.TextRecord` and the synthetic `Record` both fit."""

    @property
    def instruction(self) -> str:
        """The user's request."""
        ...

    @property
    def input(self) -> str:
        """Optional context appended to the instruction."""
        ...

    @property
    def output(self) -> str:
        """The response the model was (or was not) trained to give."""
        ...


class MembershipConfig(BaseModel):
    """Which scores to compute and how to report them."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    scores: tuple[ScoreName, ...] = Field(SCORE_NAMES, min_length=1, description="scores to compute")
    min_k_fraction: float = Field(0.2, gt=0, le=1, description="k of Min-K%: fraction of lowest-probability tokens")
    batch_size: int = Field(16, ge=1, description="records per forward pass")
    fpr: float = Field(0.01, gt=0, lt=1, description="the headline operating point")
    confidence: float = Field(0.95, gt=0, lt=1, description="level of every interval")
    auc_method: Literal["delong", "bootstrap"] = Field("delong", description="how the AUC interval is obtained")
    seed: int = Field(0, description="bootstrap seed (auc_method='bootstrap' only)")
    allow_small: bool = Field(False, description="permit < 1,000 members / non-members (tests and smoke runs only)")


class ScoreReport(BaseModel):
    """One score's separation of members from non-members."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    score: ScoreName
    auc: AucEstimate
    tpr_at_fpr: OperatingPoint
    tpr_at_low_fpr: OperatingPoint | None = Field(None, description="at 0.1% FPR; None with < 5,000 non-members")
    roc_fpr: tuple[float, ...]
    roc_tpr: tuple[float, ...]
    member_scores: tuple[float, ...]
    nonmember_scores: tuple[float, ...]


class MembershipResult(BaseModel):
    """The attack's outcome for every requested score."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    members: int
    nonmembers: int
    reports: dict[ScoreName, ScoreReport]

    def rows(self) -> list[MatrixRow]:
        """Matrix rows: AUC and TPR at each reported FPR per score (attack=``membership_<score>``).

        `chance` is what a coin achieves: AUC 0.5, and TPR equal to the FPR at any operating point.
        """
        rows: list[MatrixRow] = []
        for name, report in self.reports.items():
            attack = f"membership_{name}"
            rows.append(
                MatrixRow(
                    attack=attack,
                    metric="auc",
                    value=report.auc.value,
                    chance=0.5,
                    ci_low=report.auc.ci_low,
                    ci_high=report.auc.ci_high,
                )
            )
            for point in (report.tpr_at_fpr, report.tpr_at_low_fpr):
                if point is None:
                    continue
                rows.append(
                    MatrixRow(
                        attack=attack,
                        metric=f"tpr@{point.target_fpr * 100:g}%fpr",
                        value=point.tpr,
                        chance=point.target_fpr,
                        ci_low=point.tpr_ci_low,
                        ci_high=point.tpr_ci_high,
                    )
                )
        return rows


@dataclass(frozen=True)
class RecordStats:
    """Per-record quantities every score is computed from (one forward pass per model).

    The reference model's are the same for every released adapter of one base: an evaluation of
    several defenses computes them once (`MembershipInference.record_stats`) and passes them to `run`.
    """

    nll_mean: npt.NDArray[np.float64]
    min_k: npt.NDArray[np.float64]
    zlib_bytes: npt.NDArray[np.float64]


class MembershipInference:
    """Score members against non-members on a released model; one entry point, `run`."""

    def __init__(self, config: MembershipConfig | None = None) -> None:
        self.config = config or MembershipConfig()

    def run(
        self,
        model: torch.nn.Module,
        template: ChatTemplate,
        members: Sequence[InstructionRecord],
        nonmembers: Sequence[InstructionRecord],
        *,
        reference_model: torch.nn.Module | None = None,
        reference_stats: RecordStats | None = None,
    ) -> MembershipResult:
        """Compute every configured score for `members` and `nonmembers` and report how well it separates them.

        Args:
            model: the released model (a peft model, or the merged weights).
            template: the chat-template policy the model was trained with; records are rendered exactly
                as in training, so that the attack measures memorisation, not format mismatch.
            members: records that were in the training data.
            nonmembers: records from the same distribution that were not.
            reference_model: the model to calibrate against for the ``reference`` score; when omitted
                and `model` is a peft model, its base (adapter disabled) is used.
            reference_stats: the reference model's `record_stats` of ``[*members, *nonmembers]``,
                computed once for several released models of the same base.

        Raises:
            AttackConfigError: a record has no response token within the template's max_length, the
                samples are too small for a headline number, or ``reference`` is requested with no
                reference available.
        """
        config = self.config
        require_sample_sizes(len(members), len(nonmembers), allow_small=config.allow_small, what="membership")
        wants_reference = "reference" in config.scores
        if reference_stats is not None and reference_stats.nll_mean.shape != (len(members) + len(nonmembers),):
            raise AttackConfigError(
                f"reference_stats cover {reference_stats.nll_mean.shape[0]} records, not the "
                f"{len(members) + len(nonmembers)} members and non-members; compute them with record_stats"
            )
        if (
            wants_reference
            and reference_stats is None
            and reference_model is None
            and not hasattr(model, "disable_adapter")
        ):
            raise AttackConfigError(
                "scores includes 'reference' but no reference_model was given and the model is not a peft "
                "model; pass the base model as reference_model or drop 'reference' from scores"
            )
        dataset = _dataset(template, [*members, *nonmembers])
        target = self._stats(model, dataset, template)
        reference = reference_stats
        if wants_reference and reference is None:
            with _reference_context(model, reference_model) as ref:
                reference = self._stats(ref, dataset, template)
        split = len(members)
        reports: dict[ScoreName, ScoreReport] = {}
        for name in config.scores:
            values = _score(name, target, reference)
            reports[name] = self._report(name, values[:split], values[split:])
        return MembershipResult(members=len(members), nonmembers=len(nonmembers), reports=reports)

    def record_stats(
        self, model: torch.nn.Module, template: ChatTemplate, records: Sequence[InstructionRecord]
    ) -> RecordStats:
        """Per-record statistics of `model` (e.g. the base, for `run(..., reference_stats=...)`)."""
        return self._stats(model, _dataset(template, records), template)

    def _report(self, name: ScoreName, pos: npt.NDArray[np.float64], neg: npt.NDArray[np.float64]) -> ScoreReport:
        config = self.config
        roc = roc_curve(pos, neg)
        low = None
        if neg.size >= min_nonmembers_for_fpr(LOW_FPR):
            low = tpr_at_fpr(pos, neg, LOW_FPR, confidence=config.confidence, allow_small=config.allow_small)
        return ScoreReport(
            score=name,
            auc=auc_with_ci(
                pos,
                neg,
                confidence=config.confidence,
                method=config.auc_method,
                seed=config.seed,
                allow_small=config.allow_small,
            ),
            tpr_at_fpr=tpr_at_fpr(pos, neg, config.fpr, confidence=config.confidence, allow_small=config.allow_small),
            tpr_at_low_fpr=low,
            roc_fpr=tuple(roc.fpr.tolist()),
            roc_tpr=tuple(roc.tpr.tolist()),
            member_scores=tuple(pos.tolist()),
            nonmember_scores=tuple(neg.tolist()),
        )

    def _stats(self, model: torch.nn.Module, dataset: TokenizedDataset, template: ChatTemplate) -> RecordStats:
        """Per-record NLL, Min-K% and zlib size in batches of similar length, without gradients."""
        n = len(dataset.examples)
        nll = np.empty(n)
        min_k = np.empty(n)
        zlib_bytes = np.empty(n)
        order = sorted(range(n), key=lambda i: len(dataset.examples[i].input_ids))
        was_training = model.training
        model.eval()
        try:
            with torch.inference_mode():
                for start in range(0, n, self.config.batch_size):
                    rows = order[start : start + self.config.batch_size]
                    batch = dataset.batch_of_rows(rows)
                    logp, mask, targets = token_logprobs(model, batch)
                    counts = mask.sum(dim=1)
                    nll[rows] = (-(logp.sum(dim=1) / counts)).double().numpy()
                    min_k[rows] = _min_k(logp, mask, self.config.min_k_fraction).double().numpy()
                    for i, row in enumerate(rows):
                        text = str(template.tokenizer.decode(targets[i][mask[i]].tolist(), skip_special_tokens=True))
                        zlib_bytes[row] = max(1, len(zlib.compress(text.encode("utf-8"))))
        finally:
            model.train(was_training)
        return RecordStats(nll_mean=nll, min_k=min_k, zlib_bytes=zlib_bytes)


def token_logprobs(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probability of every response token, computed as `per_example_loss` computes its loss.

    Logits are kept only from the first position that predicts some row's response token (the
    vocabulary projection dominates a small model's cost and prompts carry no loss).

    Returns:
        (logp, mask, targets), each (rows, positions): logp is 0 where mask is False.
    """
    labels = batch.labels
    has_label = (labels[:, 1:] != IGNORE_INDEX).any(dim=0)
    if not bool(has_label.any()):
        raise AttackConfigError("batch has no response token to score")
    first = int(has_label.nonzero()[0])
    positions = torch.arange(first, labels.shape[1] - 1)
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, logits_to_keep=positions)
    targets = labels[:, first + 1 :]
    mask = targets != IGNORE_INDEX
    logp = torch.log_softmax(out.logits.float(), dim=-1)
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return picked.masked_fill(~mask, 0.0), mask, targets


def _min_k(logp: torch.Tensor, mask: torch.Tensor, fraction: float) -> torch.Tensor:
    """Mean of the floor(k * T) smallest of a row's T token log-probs (at least one token, as in MIMIR)."""
    counts = mask.sum(dim=1)
    keep = torch.clamp((counts.double() * fraction).floor().long(), min=1)
    ordered = torch.sort(logp.masked_fill(~mask, float("inf")), dim=1).values
    take = torch.arange(ordered.shape[1]).unsqueeze(0) < keep.unsqueeze(1)
    return ordered.masked_fill(~take, 0.0).sum(dim=1) / keep


def _score(name: ScoreName, target: RecordStats, reference: RecordStats | None) -> npt.NDArray[np.float64]:
    if name == "loss":
        return -target.nll_mean
    if name == "zlib":
        return -target.nll_mean / target.zlib_bytes
    if name == "min_k":
        return target.min_k
    if reference is None:  # pragma: no cover - guarded in run()
        raise AttackConfigError("the reference score needs a reference model")
    return reference.nll_mean - target.nll_mean


def _dataset(template: ChatTemplate, records: Sequence[InstructionRecord]) -> TokenizedDataset:
    """Every record as one example; refuse records that would silently drop out of either sample."""
    examples: list[Example] = []
    for index, record in enumerate(records):
        example = template.example(record.instruction, record.input, record.output)
        if example is None:
            raise AttackConfigError(
                f"record {index} has no response token within max_length={template.max_length}; raise max_length"
            )
        examples.append(example)
    pad = template.tokenizer.pad_token_id
    return TokenizedDataset(examples, [[i] for i in range(len(examples))], pad_id=int(pad) if pad is not None else 0)


@contextlib.contextmanager
def _reference_context(model: torch.nn.Module, reference: torch.nn.Module | None) -> Iterator[torch.nn.Module]:
    """The explicit reference, or the peft model with its adapter disabled (the frozen base)."""
    if reference is not None:
        yield reference
        return
    with model.disable_adapter():  # type: ignore[operator]
        yield model
