"""Privacy budgets before and after a run: `budget plan` and `budget show`.

`plan` answers the two questions asked before a run: which noise multiplier reaches a target
epsilon over K joins of `steps` DP-SGD steps at sampling rate q, and which epsilon a given noise
gives. `show` reads the ledgers a run's clients wrote (they, not the metrics, are the record of what
each client spent): each lives in its client's private state folder, `<run>.sites/client-XXXX/` by
default (or a node's `state-dir`), so `show` needs read access to those, never to anything the
server published. A site's ledgers last across jobs (one per population of data subjects,
`<state-dir>/ledgers/<population>.json`); `show_state_dir` reads one site's spending over all of
its jobs.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .config import RunConfig
from .errors import ConfigError
from .privacy import DPSGDEvent, PrivacyLedger, make_accountant, noise_for_epsilon

__all__ = ["format_state_dir", "plan_budget", "plan_distributed_budget", "show_budget", "show_state_dir"]


def plan_budget(
    *,
    sample_rate: float,
    steps_per_round: int,
    rounds: int,
    delta: float,
    epsilon: float | None = None,
    noise_multiplier: float | None = None,
    accountant: str = "pld",
    neighbouring: str = "replace",
) -> dict[str, Any]:
    """Target epsilon -> noise multiplier, or noise multiplier -> epsilon (exactly one of them given).

    Raises:
        ConfigError: neither or both given, or a value out of range.
    """
    if (epsilon is None) == (noise_multiplier is None):
        raise ConfigError(
            "budget plan: both or neither of --epsilon and --noise given; "
            "give exactly one: --epsilon (to get the noise) or --noise (to get epsilon)"
        )
    if not 0 < sample_rate <= 1:
        raise ConfigError(f"sample rate {sample_rate} must be in (0, 1]; q = expected batch / records")
    if not 0 < delta < 1:
        raise ConfigError(f"delta {delta} must be in (0, 1)")
    if steps_per_round < 1 or rounds < 1:
        raise ConfigError("steps per round and rounds must be positive")
    acc = make_accountant(accountant, neighbouring=neighbouring)  # replace-one by default, as a run
    total_steps = steps_per_round * rounds
    if epsilon is not None:
        sigma = noise_for_epsilon(epsilon, delta=delta, sample_rate=sample_rate, steps=total_steps, accountant=acc)
    else:
        assert noise_multiplier is not None
        if noise_multiplier < 0:
            raise ConfigError("--noise must be non-negative")
        sigma = noise_multiplier
    per_round = [
        acc.epsilon([DPSGDEvent(noise_multiplier=sigma, sample_rate=sample_rate, steps=steps_per_round * k)], delta)
        if sigma > 0
        else math.inf
        for k in range(1, rounds + 1)
    ]
    beside: dict[str, Any] = {}
    if accountant != "rdp" and sigma > 0:  # the loose RDP figures, reported beside the tight ones
        rdp = make_accountant("rdp", neighbouring=neighbouring)
        event = DPSGDEvent(noise_multiplier=sigma, sample_rate=sample_rate, steps=total_steps)
        beside["epsilon_rdp"] = rdp.epsilon([event], delta)
        if epsilon is not None:
            beside["noise_multiplier_rdp"] = noise_for_epsilon(
                epsilon, delta=delta, sample_rate=sample_rate, steps=total_steps, accountant=rdp
            )
    return {
        **beside,
        "accountant": accountant,
        "neighbouring": neighbouring,
        "sample_rate": sample_rate,
        "steps_per_round": steps_per_round,
        "rounds": rounds,
        "delta": delta,
        "noise_multiplier": sigma,
        "epsilon": per_round[-1],
        "epsilon_after_round": per_round,
    }


def plan_distributed_budget(
    *,
    epsilon: float,
    sample_rate: float,
    steps: int,
    delta: float,
    clients: int,
    corrupt: int,
    dropouts: int,
    dimension: int,
    clip: float = 1.0,
    neighbouring: str = "replace",
) -> dict[str, Any]:
    """Distributed DP: the central Skellam noise for `epsilon` over `steps` released sums, and each client's share.

    Returns what holds against whom: the charged epsilon (the h = n - n_C - d_max honest shares in
    every released sum, against the server and n_C colluding clients while secure aggregation
    holds) and the epsilon of one share alone (against anyone, if secure aggregation fails).

    Raises:
        ConfigError: no honest share is guaranteed, or a value out of range.
    """
    from .privacy import SkellamRDPAccountant
    from .privacy.distributed import calibrate_distributed

    if not 0 < sample_rate <= 1:
        raise ConfigError(f"sample rate {sample_rate} must be in (0, 1]; q = expected batch / records")
    if not 0 < delta < 1:
        raise ConfigError(f"delta {delta} must be in (0, 1)")
    if steps < 1:
        raise ConfigError("--rounds (DP steps, one per round in distributed mode) must be positive")
    params = calibrate_distributed(
        target_epsilon=epsilon, delta=delta, sample_rate=sample_rate, steps=steps, clip=clip, dimension=dimension,
        parties=clients, corrupt=corrupt, dropouts=dropouts, neighbouring=neighbouring,
    )  # fmt: skip
    accountant = SkellamRDPAccountant(neighbouring=neighbouring)
    event = params.event(steps)
    return {
        "mode": "distributed",
        "accountant": "skellam-rdp",
        "neighbouring": neighbouring,
        "sample_rate": sample_rate,
        "steps": steps,
        "delta": delta,
        "clients": clients,
        "corrupt": corrupt,
        "dropouts": dropouts,
        "honest_shares": params.honest,
        "dimension": dimension,
        "scale": params.scale,
        "l2": params.l2,
        "mu": params.mu,
        "share_mu": params.share_mu,
        "noise_multiplier": params.noise_multiplier,
        "share_noise_multiplier": params.share_noise_multiplier,
        "epsilon": accountant.epsilon([event], delta),
        "epsilon_own_share": accountant.epsilon([event.own_share()], delta),
        "wrap_probability": params.wrap_probability(total_units=max(1, round(clients / sample_rate))),
    }


def show_budget(run_dir: str | Path, *, sites: str | Path | None = None) -> list[dict[str, Any]]:
    """Per client: epsilon spent, delta, rounds joined, remaining budget (from the clients' ledgers).

    Args:
        run_dir: the run folder.
        sites: the folder of the clients' state folders (default `<run_dir>.sites`); a folder of
            run folders written before state moved out of the run keeps its ledgers in `ledger/`.

    Raises:
        ConfigError: `run_dir` is not a run folder.
    """
    root = Path(run_dir)
    if not (root / "config.toml").exists():
        raise ConfigError(f"{root} is not a run folder (no config.toml)")
    config = RunConfig.from_file(root / "config.toml")
    site_root = Path(sites) if sites is not None else root.with_name(root.name + ".sites")
    paths = sorted(site_root.glob("client-*/ledgers/*.json")) + sorted(site_root.glob("client-*/ledger.json"))
    paths = paths or sorted((root / "ledger").glob("client-*.json"))
    out = []
    for path in paths:
        ledger = _read(path)
        spent = ledger.epsilon
        out.append(
            {
                "client": ledger.client,
                "epsilon": spent,
                "delta": ledger.delta,
                "budget": ledger.epsilon_budget,
                "remaining": max(0.0, ledger.epsilon_budget - spent),
                "rounds_joined": [e.round for e in ledger.entries],
                "epsilon_own_share": ledger.epsilon_own_share,  # distributed DP: one noise share alone
                "accountant": ledger.accountant_name,
                "neighbouring": ledger.neighbouring,
                "population": ledger.population,
                "jobs": len(ledger.jobs),
            }
        )
    if not out and config.privacy.mechanism != "none":
        raise ConfigError(
            f"no ledgers under {site_root} (no round was joined yet, or the clients' state lives elsewhere: "
            "pass --sites)"
        )
    return out


def show_state_dir(state_dir: str | Path) -> dict[str, Any]:
    """One site's spending over all of its jobs: per population ledger, each job's rounds and the lifetime epsilon.

    The lifetime epsilon is the accountant's composition of every job's events, not the sum of
    the per-job epsilons (listed as `epsilon_alone` for comparison). Reads the ledger files only:
    it opens no secret and creates nothing.

    Raises:
        ConfigError: `state_dir` is not a site state folder, or a ledger is unreadable (named).
    """
    root = Path(state_dir)
    if not (root / "site.json").is_file():
        raise ConfigError(
            f"--state-dir {str(root)!r}: not a site state folder (no site.json); give a node's state-dir "
            "(or <run>.sites/client-XXXX)"
        )
    paths = sorted((root / "ledgers").glob("*.json"))
    if (root / "ledger.json").exists():
        paths.append(root / "ledger.json")
    return {"state_dir": str(root), "ledgers": [_read(p).summary() for p in paths]}


def format_state_dir(report: dict[str, Any]) -> str:
    """The text `budget show --state-dir` prints for `show_state_dir`'s result."""
    lines = [f"site state {report['state_dir']}"]
    if not report["ledgers"]:
        lines.append("  no ledger yet (no DP round was charged at this site)")
    for led in report["ledgers"]:
        name = led["population"] or "(single-run ledger, not yet migrated)"
        lines.append(
            f"  population {name}: epsilon {led['epsilon']:.3f} of {led['budget']:g} (remaining "
            f"{led['remaining']:.3f}) at delta {led['delta']:.3g}, {led['accountant']}, {led['neighbouring']}"
        )
        for job in led["jobs"]:
            lines.append(
                f"    job {job['job']}: {job['releases']} releases, rounds {job['rounds']}, "
                f"epsilon alone {job['epsilon_alone']:.3f}"
            )
    return "\n".join(lines)


def _read(path: Path) -> PrivacyLedger:
    """A ledger with its own stored settings (`open` lets the file's settings win)."""
    return PrivacyLedger.open(path, client=0, epsilon_budget=0.0, delta=0.0, accountant="rdp")
