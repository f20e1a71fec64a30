"""Federated evaluation as a DP release: each site's clipped, noised held-out sums, securely aggregated.

With `evaluation.mode = "federated"` the server has no held-out data of its own to score the model
on: after each round whose aggregate was released (and at round 0), every willing site evaluates
the new global adapter on its own held-out split and releases two numbers, securely aggregated
like an update (dimension 2, weight 1, its own session and context):

* the sum over its held-out privacy units of each unit's mean token loss, clipped to [0, C]
  (C = `evaluation.loss_clip`; a unit is a record, or under user-level DP a person, whose records
  are then all held out together: `site_split`), and
* the number of those units.

Under add/remove-one (`privacy.neighbouring`) adding or removing a unit moves the pair by (l, 1)
with 0 <= l <= C: L2 sensitivity sqrt(C^2 + 1), and both values get Gaussian noise of std
z * sqrt(C^2 + 1) (z = `evaluation.noise_multiplier`). Under replace-one (the default) the unit count
is the same for both neighbours (it follows from the public N_i, as q_i and delta do), so the count
is released exactly and only the loss sum gets noise, of std z * C: same epsilon, and no negative
counts. The server learns the noised sums over the sites included in the session and reports
perplexity = exp(sum / count).

Each evaluation is a release, charged like a round of training: one Gaussian mechanism, recorded as
`DPSGDEvent(z, sample_rate=1, steps=1)` with mechanism `gaussian` in the site's lifetime ledger,
composed by the accountant with every training event, charged before the values leave, refused
(the site sits the evaluation out) when it would exceed the budget. The ledger is the site's whole
population (training and held-out units: `make_client`), so a held-out person who trains in a
later job is still counted in it. Each site's training noise is raised so that its K training
rounds and rounds + 1 evaluations fit its budget together (`policy_with_evaluation`).

Replays. A site keeps, in its own state folder (`evaluations/`), what it released for each
(job, round): the model digest, its held-out data digest and the noised values. A second request
for the same round with the same model and data gets the identical values, uncharged (a crash
after the values were stored); any other request for that round is refused, as is any round not
after the last one evaluated. The noise comes from a seed drawn from os.urandom per release and kept
by the site (`SiteState.noise_seed`), expanded into Gaussians with ChaCha20 (`gaussian`), never
torch's or numpy's Mersenne Twister. In the reproducible mode (`privacy.noise_seed`) the seed is an
HMAC under a public-seeded secret, so both engines give the same figures (and anyone can predict
them).

What one site can and cannot verify about the model it is asked to score. Under masking a site
never sees the aggregate, so it cannot check that the model is the previous global model plus the
released mean. What it does check:

* round 0's model is exactly this job's starting adapter, which the site computes itself from the
  public seeds (B = 0, A = A0);
* round r's model is within r * clip_range (per coordinate) of that start, and within
  (r - r' + 2) * clip_range of the model it accepted at its last evaluated round r' (every released
  mean is a mean of updates clipped to [-clip_range, clip_range]; the 2 allows round r' to have been
  re-run after a server restart, which may give another aggregate);
* the round is in [0, federation.rounds], after the last one it evaluated for this job, and each
  (job, round) is evaluated at most once (a replay returns the stored values).

What it cannot check: that the model is what the aggregate produced. A server may send a crafted
adapter within those bounds (per-coordinate bounds leave a lot of room), or one made for a single
site only. What bounds the damage is the release itself, not the model check: every unit's loss is
clipped to [0, C] whatever the model, so the sensitivity and hence the DP guarantee of the noised
pair hold for ANY model; each evaluation is charged; and one evaluation per (job, round) caps a
prober at rounds + 1 charged queries per job. A crafted model turns the sum into a membership
oracle only up to that epsilon. The site cannot tell whether the server ran the aggregation it
joined (it learns nothing of the sum), nor whether another site was shown another model; a
session with fewer than three sites (two, under masking, would each learn the other's values) is
not run.

Limitations: the Gaussian is computed in floating point (Box-Muller), which leaks through its
low-order bits in principle (Mironov 2012 for Laplace; Jin et al. 2022 for Gaussians); the
secure-aggregation encoding then rounds each value to a grid of about value_bound * n / 2^31, which
helps but is not a proof. Losses are clipped, so C below the model's real per-unit losses biases
the perplexity down.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from ..config import RunConfig
from ..errors import ConfigError, SecureFedLLMError
from ..files import atomic_write

if TYPE_CHECKING:
    from ..data.sources import TextRecord
    from ..data.tokenized import TokenizedDataset
    from ..privacy import DPSGDEvent
    from .plan import ClientPolicy
    from .record import FederatedEvaluation, RoundRecord

__all__ = [
    "EVALUATION_DIMENSION",
    "EvaluationBook",
    "EvaluationRefusedError",
    "EvaluationRelease",
    "EvaluationSettings",
    "check_model",
    "clipped_sums",
    "evaluate_in_process",
    "evaluation_context",
    "gaussian",
    "ledger_tag",
    "model_digest",
    "policy_with_evaluation",
    "release_noise",
    "rounding_seed",
    "site_split",
    "summarize",
    "unit_losses",
]

EVALUATION_DIMENSION = 2
"""Values per site: (clipped loss sum, unit count), each noised."""

_SLACK = 1e-3
"""Relative slack on the per-round movement bound (quantization, float32 rounding of the global vector)."""


class EvaluationRefusedError(SecureFedLLMError):
    """A site refused to evaluate a model: not this job's, not a released round's, or a round it already scored."""


@dataclass(frozen=True)
class EvaluationSettings:
    """What a site's own configuration says about federated evaluation (the server cannot lower it).

    Args:
        loss_clip: C, the bound each unit's mean token loss is clipped to.
        noise_multiplier: z; the noise std is z times the sensitivity.
        value_bound: the public bound the noised values are clipped to before encoding.
        clip_range: the secure-aggregation clip range (the encoding's; also each round's movement bound).
        rounds: the job's last round.
        batch_size: rows per forward pass.
        neighbouring: the privacy relation ("replace": the count is public and released exactly).
    """

    loss_clip: float
    noise_multiplier: float
    value_bound: float
    clip_range: float
    rounds: int
    batch_size: int
    neighbouring: str = "replace"

    @classmethod
    def of(cls, config: RunConfig) -> EvaluationSettings:
        """The settings of `config` (a site's own copy)."""
        ev = config.evaluation
        return cls(
            loss_clip=ev.loss_clip,
            noise_multiplier=ev.noise_multiplier,
            value_bound=ev.value_bound,
            clip_range=config.secure_aggregation.clip_range,
            rounds=config.federation.rounds,
            batch_size=ev.batch_size,
            neighbouring=config.privacy.neighbouring,
        )

    @property
    def sensitivity(self) -> float:
        """L2 sensitivity of (clipped loss sum, count): C under replace-one (the count is fixed), else sqrt(C^2 + 1)."""
        if self.neighbouring == "replace":
            return self.loss_clip
        return math.sqrt(self.loss_clip**2 + 1.0)

    @property
    def sigma(self) -> float:
        """Std of the Gaussian noise on the loss sum (and, under add/remove-one, on the count)."""
        return self.noise_multiplier * self.sensitivity

    @property
    def scale(self) -> float:
        """Values per unit of the encoding: a value v enters secure aggregation as v / scale."""
        return self.value_bound / self.clip_range

    def event(self) -> DPSGDEvent:
        """One evaluation as the accountants see it: a Gaussian mechanism (no sampling, one step)."""
        from ..privacy import DPSGDEvent

        return DPSGDEvent(noise_multiplier=self.noise_multiplier, sample_rate=1.0, steps=1)

    def encode(self, values: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        """Noised values clipped to [-value_bound, value_bound] and scaled into [-clip_range, clip_range]."""
        return np.clip(np.asarray(values, dtype=np.float64), -self.value_bound, self.value_bound) / self.scale

    def public(self) -> dict[str, float]:
        """The settings that enter the release key."""
        return {
            "loss_clip": self.loss_clip,
            "noise_multiplier": self.noise_multiplier,
            "value_bound": self.value_bound,
            "count_noised": float(self.neighbouring != "replace"),
        }


@dataclass(frozen=True)
class EvaluationRelease:
    """What a site releases for one evaluation, plus the site-private handles its host needs to send it.

    `release_key` and `rounding_seed` are SECRET (they stay with the site). `values` is the noised
    (loss sum, count): it leaves the site only inside its secure-aggregation session, as `scaled`.
    """

    client: int
    round: int
    values: npt.NDArray[np.float64]
    scaled: npt.NDArray[np.float64]
    epsilon: float
    replayed: bool
    release_key: bytes
    rounding_seed: bytes
    context: bytes


def site_split(
    config: RunConfig, records: Sequence[TextRecord], *, fraction: float | None = None
) -> tuple[list[TextRecord], list[TextRecord]]:
    """(training records, held-out records) of one site for federated evaluation.

    Under user-level DP whole persons are held out (`split_heldout` by person): a person on both
    sides would let the held-out loss depend on records that were trained on. Which units are held
    out depends on their ids only, so the split is the same on every engine and from job to job.

    Raises:
        ConfigError: too few units to hold any out.
    """
    from ..data import split_heldout

    share = config.evaluation.site_heldout_fraction if fraction is None else fraction
    try:
        return split_heldout(records, share, by_person=config.privacy.unit == "user")
    except ConfigError as exc:
        raise ConfigError(f"evaluation.site_heldout_fraction={share}: {exc}") from None


def model_digest(vector: npt.ArrayLike) -> str:
    """SHA-256 of the global adapter's float32 little-endian bytes (what a site names a model by)."""
    flat = np.ascontiguousarray(np.asarray(vector, dtype=np.float32).ravel(), dtype="<f4")
    return hashlib.sha256(b"secure-fedllm/model/v1|" + flat.tobytes()).hexdigest()


def evaluation_context(job: str, round_number: int, digest: str, *, value_bound: float, clip_range: float) -> bytes:
    """The public context every party of an evaluation session binds: job, round, model and the encoding scale."""
    canonical = json.dumps(
        {"job": job, "round": round_number, "model": digest, "value_bound": value_bound, "clip_range": clip_range},
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(b"secure-fedllm/evaluation-context/v1|" + canonical.encode()).digest()


def unit_losses(model: Any, data: TokenizedDataset, *, batch_size: int) -> npt.NDArray[np.float64]:
    """Each privacy unit's mean token loss over all its response tokens (unclipped), in unit order."""
    import torch

    from ..data.chat import IGNORE_INDEX
    from ..training import per_example_loss

    model.eval()
    rows = list(range(len(data.examples)))
    loss_sum = np.zeros(len(rows))
    tokens = np.zeros(len(rows))
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            batch = data.batch_of_rows(chunk)
            counts = (batch.labels[:, 1:] != IGNORE_INDEX).sum(dim=1)
            losses = per_example_loss(model, batch).double().cpu()
            loss_sum[chunk] = (losses * counts).numpy()
            tokens[chunk] = counts.numpy()
    out = np.empty(len(data.units))
    for u, members in enumerate(data.units):
        out[u] = loss_sum[members].sum() / max(tokens[members].sum(), 1.0)
    return out


def clipped_sums(losses: npt.ArrayLike, loss_clip: float) -> npt.NDArray[np.float64]:
    """(sum of the unit losses clipped to [0, loss_clip], number of units): the pre-noise release."""
    values = np.asarray(losses, dtype=np.float64)
    if not np.isfinite(values).all():  # NaN would escape a clip; a non-finite loss counts as the bound
        values = np.where(np.isfinite(values), values, loss_clip)
    return np.array([float(np.clip(values, 0.0, loss_clip).sum()), float(values.size)])


def gaussian(seed: bytes, count: int) -> npt.NDArray[np.float64]:
    """`count` standard normal draws from a 32-byte seed: ChaCha20 keystream, 53-bit uniforms, Box-Muller.

    A CSPRNG stream (not a Mersenne Twister): without the seed, no draw predicts another.
    """
    from ..privacy.noise import csprng_gaussian

    if len(seed) < 32:
        raise ValueError(f"the noise seed must be at least 32 bytes, got {len(seed)}")
    key = hmac.new(seed, b"secure-fedllm/evaluation-noise/v1", hashlib.sha256).digest()
    return csprng_gaussian(key, count, dtype=np.float64)


class EvaluationBook:
    """A site's record of its evaluations of one job, in its own state folder (`evaluations/<job tag>.*`).

    Per round: the model digest, the held-out data digest, the ledger tag, the noised values and the
    epsilon of that release. Also the last accepted model (its vector, for the next round's movement
    check). Written 0600, atomically and fsynced, before the values leave.
    """

    def __init__(self, root: Path, job: str) -> None:
        self.job = job
        self.folder = root / "evaluations"
        self.tag = hashlib.sha256(b"secure-fedllm/evaluation-book|" + job.encode()).hexdigest()[:32]
        self.path = self.folder / f"{self.tag}.json"

    def _load(self) -> dict[str, Any]:
        if not self.path.exists():
            return {"job": self.job, "rounds": {}, "anchor": None}
        try:
            data = json.loads(self.path.read_text())
            if not isinstance(data, dict) or data.get("job") != self.job or not isinstance(data.get("rounds"), dict):
                raise ValueError("not an evaluation book of this job")
            return data
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"{self.path}: unreadable evaluation record ({exc}); restore it from a backup (deleting it would "
                "let a server ask for this job's evaluations again)"
            ) from exc

    def entry(self, round_number: int) -> dict[str, Any] | None:
        """What was released for `round_number`, or None."""
        entry = self._load()["rounds"].get(str(round_number))
        return dict(entry) if entry is not None else None

    def last_round(self) -> int | None:
        """The latest evaluated round of this job."""
        rounds = [int(r) for r in self._load()["rounds"]]
        return max(rounds) if rounds else None

    def anchor(self) -> tuple[int, npt.NDArray[np.float32]] | None:
        """(round, vector) of the last accepted model, checked against its recorded digest."""
        anchor = self._load().get("anchor")
        if anchor is None:
            return None
        path = self.folder / str(anchor["file"])
        vector = np.frombuffer(path.read_bytes(), dtype="<f4").astype(np.float32)
        if model_digest(vector) != anchor["model"]:
            raise ConfigError(f"{path}: does not match its recorded digest; the site's evaluation record is damaged")
        return int(anchor["round"]), vector

    def store(self, round_number: int, entry: dict[str, Any], vector: npt.NDArray[np.float32]) -> None:
        """Keep the release and make its model the anchor (vector first: the record never names a missing file)."""
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        name = f"{self.tag}.r{round_number}.f32"
        atomic_write(self.folder / name, np.ascontiguousarray(vector, dtype="<f4").tobytes(), mode=0o600)
        data = self._load()
        old = data.get("anchor")
        data["rounds"][str(round_number)] = entry
        data["anchor"] = {"round": round_number, "model": entry["model"], "file": name}
        atomic_write(self.path, json.dumps(data, indent=1).encode(), mode=0o600)
        if old is not None and old["file"] != name:
            (self.folder / str(old["file"])).unlink(missing_ok=True)


def check_model(
    vector: npt.NDArray[np.float32],
    *,
    start: npt.NDArray[np.float32],
    anchor: tuple[int, npt.NDArray[np.float32]] | None,
    round_number: int,
    clip_range: float,
) -> None:
    """Refuse a model that cannot be this job's global adapter after `round_number` released rounds.

    See the module docstring for what this does and does not establish.

    Raises:
        EvaluationRefusedError: naming the check that failed.
    """
    if vector.shape != start.shape or not np.isfinite(vector).all():
        raise EvaluationRefusedError(
            f"round {round_number}: the model has {vector.size} values (finite: {bool(np.isfinite(vector).all())}) "
            f"but this job's adapter has {start.size} finite values"
        )
    if round_number == 0:
        if not np.array_equal(vector, start):
            raise EvaluationRefusedError(
                "round 0: the model is not this job's starting adapter (A0 from the public seed, B = 0), which the "
                "site computes itself; refused"
            )
        return
    bounds = [(0, start, round_number)]
    if anchor is not None:
        bounds.append((anchor[0], anchor[1], round_number - anchor[0] + 2))
    for since, base, steps in bounds:
        moved = float(np.max(np.abs(vector.astype(np.float64) - base.astype(np.float64)), initial=0.0))
        allowed = steps * clip_range * (1 + _SLACK) + 1e-6 * (1.0 + float(np.max(np.abs(base), initial=0.0)))
        if moved > allowed:
            raise EvaluationRefusedError(
                f"round {round_number}: the model moved {moved:.4g} per coordinate from the round-{since} model the "
                f"site accepted, more than {steps} released means of updates clipped to secure_aggregation."
                f"clip_range={clip_range} can ({allowed:.4g}); it is not this job's global adapter"
            )


def policy_with_evaluation(policy: ClientPolicy, config: RunConfig) -> ClientPolicy:
    """The site's policy with its training noise raised so that training and every evaluation fit its budget.

    K = policy.max_participations joins of DP-SGD and federation.rounds + 1 evaluations, composed
    by the site's accountant, must stay within the budget; the evaluations' noise is fixed by
    `evaluation.noise_multiplier`, so the training noise takes up the rest.

    Raises:
        ConfigError: the evaluations alone would exceed the budget (names evaluation.noise_multiplier).
    """
    if not policy.private or config.evaluation.mode != "federated":
        return policy
    privacy = config.privacy
    sigma = _calibrate(
        max(policy.noise_multiplier, 1e-3),
        policy.epsilon_budget,
        policy.delta,
        policy.sample_rate,
        policy.steps,
        policy.max_participations,
        config.federation.rounds + 1,
        config.evaluation.noise_multiplier,
        privacy.accountant,
        privacy.neighbouring,
    )
    return policy.model_copy(update={"noise_multiplier": max(sigma, policy.noise_multiplier)})


@lru_cache(maxsize=64)
def _calibrate(
    floor: float,
    budget: float,
    delta: float,
    sample_rate: float,
    steps: int,
    joins: int,
    evaluations: int,
    z: float,
    accountant: str,
    neighbouring: str,
) -> float:
    from ..privacy import DPSGDEvent, make_accountant

    acc = make_accountant(accountant, neighbouring=neighbouring)
    evals = [DPSGDEvent(noise_multiplier=z, sample_rate=1.0, steps=1)] * evaluations

    def eps(sigma: float) -> float:
        train = [DPSGDEvent(noise_multiplier=sigma, sample_rate=sample_rate, steps=steps)] * joins
        return acc.epsilon([*train, *evals], delta)

    target = budget * (1 - 1e-4)  # the ledger composes event by event; leave room for numerical differences
    low, high = floor, 2 * floor  # the bracket the training noise lies in: at least the training-only calibration
    while eps(high) > target:
        low, high = high, 2 * high
        if high > 1000.0:
            alone = acc.epsilon(evals, delta)
            raise ConfigError(
                f"evaluation.noise_multiplier={z}: {evaluations} federated evaluations cost epsilon {alone:.3g} of "
                f"privacy.target_epsilon={budget} and leave no room for training; raise evaluation.noise_multiplier"
            )
    while high - low > 1e-5 * high:  # bisection keeps `high` feasible: the result never exceeds the budget
        mid = (low + high) / 2
        if eps(mid) > target:
            low = mid
        else:
            high = mid
    return high


def summarize(
    sums: npt.NDArray[np.float64] | None,
    *,
    sites: Sequence[int],
    sat_out: dict[int, str],
    epsilon: dict[int, float],
    replayed: Sequence[int] = (),
    aborted: str | None = None,
) -> FederatedEvaluation:
    """The record of one federated evaluation (perplexity from the noised sums only; NaN unless count > 0)."""
    from .record import FederatedEvaluation

    if sums is None:
        return FederatedEvaluation(sites=list(sites), sat_out=sat_out, epsilon=epsilon, aborted=aborted)
    loss_sum, count = float(sums[0]), float(sums[1])
    loss = loss_sum / count if count > 0 else float("nan")
    perplexity = math.exp(min(loss, 700.0)) if math.isfinite(loss) else float("nan")
    return FederatedEvaluation(
        loss_sum=loss_sum,
        count=count,
        loss=loss,
        perplexity=perplexity,
        sites=list(sites),
        sat_out=sat_out,
        epsilon=epsilon,
        replayed=list(replayed),
    )


def evaluate_in_process(transport: Any, round_number: int, global_vector: Any, record: RoundRecord) -> None:
    """Every in-process client that is willing evaluates `global_vector`; securely aggregate; fill `record`.

    `transport` is the `InProcessTransport` (its job, clients and audit tap). Sessions run without
    simulated dropouts; each release is bound to its one session before its masked input leaves.
    """
    from ..errors import PrivacyBudgetExhaustedError
    from .aggregation import aggregate_updates
    from .federation import job_id
    from .runner import binding_tap

    job, clients = transport.job, transport.clients
    config: RunConfig = job.config
    settings = EvaluationSettings.of(config)
    digest = model_digest(global_vector)
    sat_out: dict[int, str] = {}
    releases: list[EvaluationRelease] = []
    for client in clients:
        why = client.evaluation_willing(round_number, digest)
        if why is not None:
            sat_out[client.client] = why
            continue
        try:
            release = client.evaluate(job.model, job.manifest, global_vector, round_number, start=job.start)
        except (EvaluationRefusedError, PrivacyBudgetExhaustedError) as exc:
            sat_out[client.client] = str(exc)
            continue
        if (why := client.refuses(release)) is not None:  # its values already went to another session
            sat_out[client.client] = why
            continue
        releases.append(release)
    epsilon = {r.client: r.epsilon for r in releases}
    replayed = [r.client for r in releases if r.replayed]
    parties = [r.client for r in releases]
    minimum = 3 if config.secure_aggregation.protocol != "none" else 1
    if len(releases) < minimum:
        record.federated_evaluation = summarize(
            None, sites=[], sat_out=sat_out, epsilon=epsilon, aborted=f"only {len(releases)} sites can evaluate"
        )
        return
    context = evaluation_context(
        job_id(config), round_number, digest, value_bound=settings.value_bound, clip_range=settings.clip_range
    )
    outcome = aggregate_updates(
        config,
        [r.scaled.astype(np.float32) for r in releases],
        [1.0] * len(releases),
        round_number=round_number,
        context=context,
        drop_at={},
        tap=binding_tap(config, round_number, [clients[c] for c in parties], releases, transport.tap),  # type: ignore[arg-type]
        rounding_seeds=[r.rounding_seed for r in releases],
        identity_keys=[clients[c].site.identity_key for c in parties],
        roster=[c.site.identity_public_key for c in clients],
    )
    if outcome.mean is None:
        record.federated_evaluation = summarize(
            None, sites=[], sat_out=sat_out, epsilon=epsilon, aborted=outcome.aborted or "aborted"
        )
        return
    included = [parties[i] for i in outcome.included]
    sums = np.asarray(outcome.mean, dtype=np.float64) * len(included) * settings.scale
    record.federated_evaluation = summarize(
        sums,
        sites=included,
        sat_out=sat_out,
        epsilon={c: epsilon[c] for c in included},
        replayed=[c for c in replayed if c in included],
    )


def release_noise(seed: bytes, settings: EvaluationSettings) -> npt.NDArray[np.float64]:
    """The noise a release with this seed adds to (loss sum, count): sigma * normals (the count: 0 under replace)."""
    noise = settings.sigma * gaussian(seed, EVALUATION_DIMENSION)
    if settings.neighbouring == "replace":
        noise[1] = 0.0  # the count is the same for both neighbours: nothing to hide, nothing charged for it
    return noise


def rounding_seed(seed: bytes) -> bytes:
    """The stochastic-rounding seed of an evaluation release (derived from its noise seed; stays with the site)."""
    return hashlib.sha256(b"secure-fedllm/evaluation-rounding|" + seed).digest()


def ledger_tag(release_key: bytes) -> str:
    """The ledger's release tag of an evaluation (site-private)."""
    return "evaluation-" + hashlib.sha256(b"secure-fedllm/evaluation-ledger-tag|" + release_key).hexdigest()[:32]
