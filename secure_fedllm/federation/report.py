"""`report.md` and its plots: what a run did, what it cost, and what its privacy numbers mean."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ..config import RunConfig
from ..privacy import neighbouring_statement
from .checkpoint import RunPaths
from .plan import ClientPolicy
from .record import RoundRecord

__all__ = ["costs_figure", "epsilon_figure", "epsilon_groups", "quality_figure", "write_report"]


_LINESTYLES = ("-", "--", "-.", ":")
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def _round_axis(ax: Axes) -> None:
    """Rounds are whole numbers: ticks only at integers (matplotlib would put one at 0.5 for two rounds)."""
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _save(fig: Figure, paths: RunPaths, name: str) -> str:
    fig.tight_layout()
    fig.savefig(paths.root / name, dpi=110)
    plt.close(fig)
    return name


def _plot_quality(paths: RunPaths, rows: Sequence[RoundRecord]) -> str:
    return _save(quality_figure(rows), paths, "quality.png")


def _plot_epsilon(paths: RunPaths, rows: Sequence[RoundRecord], budget: float) -> str:
    return _save(epsilon_figure(rows, budget), paths, "epsilon.png")


def _plot_costs(paths: RunPaths, rows: Sequence[RoundRecord]) -> str:
    return _save(costs_figure(rows), paths, "costs.png")


def quality_figure(rows: Sequence[RoundRecord]) -> Figure:
    """Held-out loss and perplexity per round (quality.png)."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.2))
    rounds = [r.round for r in rows]
    ax1.plot(rounds, [r.eval_loss for r in rows], marker="o")
    ax1.set(xlabel="round", ylabel="held-out loss", title="Held-out loss")
    ax2.plot(rounds, [r.perplexity for r in rows], marker="o", color="tab:orange")
    ax2.set(xlabel="round", ylabel="perplexity", title="Held-out perplexity")
    for ax in (ax1, ax2):
        _round_axis(ax)
    return fig


def epsilon_groups(rows: Sequence[RoundRecord]) -> list[tuple[list[int], list[float]]]:
    """Clients whose epsilon curves are identical, grouped: (clients, curve), in client order.

    Clients of equal size with the same policy spend exactly the same epsilon every round; drawn
    one by one their lines hide each other and the legend names clients the plot does not show.
    Curves equal to 1e-9 (relative) are one group, drawn once and labelled with every client in it.
    """
    clients = sorted({c for r in rows for c in r.epsilon})
    groups: list[tuple[list[int], list[float]]] = []
    for c in clients:
        curve = [float(r.epsilon.get(c, 0.0)) for r in rows]
        for members, shared in groups:
            if all(math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12) for a, b in zip(curve, shared, strict=True)):
                members.append(c)
                break
        else:
            groups.append(([c], curve))
    return groups


def _clients_label(clients: Sequence[int]) -> str:
    if len(clients) == 1:
        return f"client {clients[0]}"
    if list(clients) == list(range(clients[0], clients[-1] + 1)) and len(clients) > 2:
        return f"clients {clients[0]}-{clients[-1]} (identical)"
    return "clients " + ", ".join(map(str, clients)) + " (identical)"


def epsilon_figure(rows: Sequence[RoundRecord], budget: float) -> Figure:
    """Epsilon spent per client and round (epsilon.png): one line per group of identical curves."""
    fig, ax = plt.subplots(figsize=(5, 3.2))
    rounds = [r.round for r in rows]
    colours = plt.get_cmap("tab10" if len(rows[-1].epsilon) <= 10 else "tab20")
    for i, (clients, curve) in enumerate(epsilon_groups(rows)):
        ax.plot(
            rounds,
            curve,
            color=colours(i % colours.N),
            linestyle=_LINESTYLES[i % len(_LINESTYLES)],
            marker=_MARKERS[i % len(_MARKERS)],
            markersize=4,
            label=_clients_label(clients),
        )
    if math.isfinite(budget):
        ax.axhline(budget, color="grey", linestyle="--", linewidth=0.8, label="budget")
    ax.set(xlabel="round", ylabel="epsilon spent", title="Privacy spent per client")
    _round_axis(ax)
    ax.legend(fontsize=7)
    return fig


def costs_figure(rows: Sequence[RoundRecord]) -> Figure:
    """Seconds by phase and protocol bytes per round (costs.png)."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.2))
    phases = ["training", "protocol_client", "protocol_server", "evaluation"]
    rounds = [r.round for r in rows]
    bottom = [0.0] * len(rows)
    for phase in phases:
        values = [float(getattr(r.seconds, phase)) for r in rows]
        ax1.bar(rounds, values, bottom=bottom, label=phase)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax1.set(xlabel="round", ylabel="seconds", title="Time by phase")
    ax1.legend(fontsize=7)
    ax2.bar([x - 0.2 for x in rounds], [r.bytes.upload / 1e6 for r in rows], 0.4, label="up")
    ax2.bar([x + 0.2 for x in rounds], [r.bytes.download / 1e6 for r in rows], 0.4, label="down")
    ax2.set(xlabel="round", ylabel="MB (all clients)", title="Protocol bytes")
    ax2.legend(fontsize=7)
    for ax in (ax1, ax2):
        _round_axis(ax)
    return fig


def _target_modules(target: str | Sequence[str]) -> str:
    """`lora.target_modules` as written: a preset name ("attention", "all-linear") as is, names comma-joined."""
    return target if isinstance(target, str) else ", ".join(target)


def write_report(
    paths: RunPaths,
    config: RunConfig,
    rows: Sequence[RoundRecord],
    ledgers: Sequence[dict[str, Any]],
    policies: Sequence[ClientPolicy],
    sidecar: dict[str, Any],
    data: Sequence[dict[str, int]] = (),
) -> None:
    """Write report.md and quality.png, epsilon.png, costs.png into the run folder."""
    plots = [
        _plot_quality(paths, rows),
        _plot_epsilon(paths, rows, config.privacy.target_epsilon),
        _plot_costs(paths, rows),
    ]
    first, last = rows[0], rows[-1]
    private = config.privacy.mechanism != "none"
    lines = [
        "# secure-fedllm run report",
        "",
        f"Model `{config.model.name}` (base SHA-256 `{sidecar['base_sha256'][:16]}...`), "
        f"LoRA {config.lora.aggregation} r={config.lora.r} on {_target_modules(config.lora.target_modules)}; "
        f"{config.federation.clients} clients, "
        f"{config.federation.rounds} rounds, secure aggregation `{config.secure_aggregation.protocol}`, "
        f"privacy `{config.privacy.mechanism}` ({config.privacy.unit}-level).",
        "",
        "## Utility",
        "",
        f"Held-out perplexity {first.perplexity:.3f} at round 0 (the base model) and {last.perplexity:.3f} after "
        f"round {last.round}: ratio **{last.perplexity / first.perplexity:.3f}**.",
        "",
        "| round | held-out loss | perplexity | joined | included | aborted |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.round} | {r.eval_loss:.4f} | {r.perplexity:.3f} | {r.participants if r.round else '-'} | "
            f"{r.included if r.round else '-'} | {r.aborted or ''} |"
        )
    lines += ["", f"![quality]({plots[0]})", ""]
    if config.evaluation.mode == "federated":
        lines += _federated_section(config, rows)
    if data:
        lines += [
            "Data per client (records whose prompt alone fills data.max_length are dropped before N_i is "
            "counted): "
            + "; ".join(
                f"client {d['client']}: {d['records']} records, {d['units']} units, {d['dropped']} dropped"
                for d in data
            )
            + ".",
            "",
        ]
    clipped = sum(r.clipped_coordinates for r in rows)
    if clipped:
        lines += [
            f"**{clipped:,} update coordinates were clipped** (a simulation diagnostic counted from the "
            f"individual updates) at secure_aggregation.clip_range="
            f"{config.secure_aggregation.clip_range}: raise it (Adam moves a coordinate by up to about "
            "learning_rate per step) or lower the learning rate.",
            "",
        ]
    lines += ["## Privacy", ""]
    if private:
        lines += [
            "| client | N_i (units) | q_i | noise multiplier | delta | delta * N_i | rounds joined | epsilon spent |"
            " budget |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for policy, ledger in zip(policies, ledgers, strict=True):
            joined = [e["round"] for e in ledger.get("events", []) if e.get("mechanism", "dp-sgd") != "gaussian"]
            eps = last.epsilon.get(policy.client, 0.0)
            lines.append(
                f"| {policy.client} | {policy.num_units} | {policy.sample_rate:.4f} | {policy.noise_multiplier:.4f} | "
                f"{policy.delta:.3g} | {policy.delta * policy.num_units:.3g} | {joined} | {eps:.3f} | "
                f"{policy.epsilon_budget} |"
            )
        if config.privacy.mode == "distributed":
            lines += _distributed_section(config, rows, policies, ledgers)
        lines += [
            "",
            (
                f"Accountant `{config.privacy.accountant}`, neighbouring relation `{config.privacy.neighbouring}`; "
                "noise calibrated per client for "
                f"K = min(rounds, max_participations) = {policies[0].max_participations} joins at its own q_i; "
                "a client is charged only for rounds it joins (sampling by the server gives no amplification)."
                if config.privacy.mode == "local"
                else "Accountant: the Skellam mechanism's RDP under Poisson subsampling (the ledger's "
                f"`{config.privacy.accountant}` reads Gaussian events only), neighbouring relation "
                f"`{config.privacy.neighbouring}`; noise calibrated for K = {policies[0].max_participations} released "
                "sums at the common q; a client is charged only for rounds it joins (no amplification is claimed from "
                "the server's choice of clients)."
            ),
            "",
            (
                "- Each client's epsilon is a property of its own DP-SGD noise: it holds even if secure aggregation "
                "fails, and secure aggregation does not reduce it."
                if config.privacy.mode == "local"
                else "- Distributed mode: the epsilons above hold only while secure aggregation holds (see above)."
            ),
            f"- The released adapter carries the largest epsilon of its contributors: "
            f"{sidecar['epsilon_max_over_contributors']:.3f} at delta {sidecar['delta_max_over_contributors']:.3g}.",
            "- Each client's number of privacy units N_i is treated as public: it sets q_i, delta and any "
            "size-based weights, and the plan announces them.",
            f"- {neighbouring_statement(config.privacy.neighbouring, config.privacy.unit)}",
            "- Tuning hyperparameters on private data spends privacy that this ledger does not count.",
            "- Poisson sampling uses torch's Mersenne Twister seeded, per release, from a fresh os.urandom seed kept "
            "in the client's state folder: not a cryptographic RNG.",
            (
                f"- DP-SGD noise generator: `{config.privacy.noise_generator}` "
                + (
                    "(ChaCha20 keystream keyed per release from that seed: unpredictable without it, but floating "
                    "point)."
                    if config.privacy.noise_generator == "csprng"
                    else "(torch's Mersenne Twister: not a cryptographic RNG)."
                )
                if config.privacy.mode == "local"
                else "- Noise: exact integer Skellam shares from a ChaCha20 keystream keyed per release from that seed "
                "(`protocols.dp_noise.SkellamSampler`; no floating point after its table is built)."
            ),
        ]
        if config.privacy.noise_seed is not None:
            lines.append("- **privacy.noise_seed is set: the noise is predictable to anyone who knows it.**")
        if config.privacy.neighbouring == "add_remove":
            lines.append(
                "- **privacy.neighbouring is 'add_remove': these epsilons assume q_i, delta and weights come from a "
                "public N independent of the data, but this run derives them from each client's N_i; the replace-one "
                "epsilon of the same noise is larger.**"
            )
    else:
        lines.append("**No differential privacy**: updates are protected in transit only; the adapter is not private.")
    lines += ["", f"![epsilon]({plots[1]})", "", "## Cost", "", "| round | " + " | ".join(
        ["training s", "protocol client s", "protocol server s", "evaluation s", "upload B", "download B", "clipped"]
    ) + " |", "|---" * 8 + "|"]  # fmt: skip
    for r in rows:
        s, b = r.seconds, r.bytes
        lines.append(
            f"| {r.round} | {s.training:.1f} | {s.protocol_client:.2f} | "
            f"{s.protocol_server:.2f} | {s.evaluation:.1f} | {b.upload:,} | "
            f"{b.download:,} | {r.clipped_coordinates} |"
        )
    lines += ["", f"![costs]({plots[2]})", "", "## Sample generations (last round)", ""]
    for sample in last.samples:
        lines += [
            f"- **{sample.prompt}**",
            f"  - reference: {sample.reference}",
            f"  - generated: {sample.generated}",
        ]
    lines += [
        "",
        "## Files",
        "",
        "`config.toml`, `metrics.jsonl`, `adapter/` (peft; `secure_fedllm_adapter.json` holds the base-model, A0 and "
        "manifest hashes), `checkpoint/`. Each client's ledger, secrets and noise seeds stay in its own state "
        "folder (`<run>.sites/client-XXXX/` in process, the node's `state-dir` on Flower), never in the run folder.",
    ]
    paths.report.write_text("\n".join(lines) + "\n")


def _federated_section(config: RunConfig, rows: Sequence[RoundRecord]) -> list[str]:
    """The federated evaluations: noised sums, perplexity, who evaluated, and each site's epsilon of the release."""
    ev = config.evaluation
    sigma = ev.noise_multiplier * math.sqrt(ev.loss_clip**2 + 1)
    lines = [
        "### Federated evaluation",
        "",
        "The held-out figures above are federated: each site scored the model on its own held-out split "
        f"({ev.site_heldout_fraction:.0%} of its {config.privacy.unit}s, whole persons under user-level DP), clipped "
        f"each unit's mean token loss to [0, {ev.loss_clip}], added Gaussian noise of std {sigma:.3g} "
        f"(evaluation.noise_multiplier={ev.noise_multiplier} times the sensitivity sqrt(loss_clip^2 + 1)) to its loss "
        "sum and its unit count, charged the release to its ledger, and the server learned only the secure sum. "
        "Perplexity is exp(loss sum / count) of the noised sums; the loss is a mean over units, not tokens.",
        "",
        "| round | noised loss sum | noised count | loss | perplexity | sites | epsilon of this release | sat out |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        fe = r.federated_evaluation
        if fe is None:
            continue
        if fe.aborted is not None:
            lines.append(f"| {r.round} | - | - | - | - | - | - | {fe.aborted} |")
            continue
        eps = ", ".join(f"{c}: {e:.3f}" for c, e in sorted(fe.epsilon.items()))
        sat_out = "; ".join(f"{c}: {why}" for c, why in sorted(fe.sat_out.items()))
        lines.append(
            f"| {r.round} | {fe.loss_sum:.2f} | {fe.count:.2f} | {fe.loss:.4f} | {fe.perplexity:.3f} | {fe.sites} | "
            f"{eps} | {sat_out} |"
        )
    lines += [
        "",
        "- A site evaluates only models it can place in this job: round 0's starting adapter exactly, and later "
        "models within the movement that released, clipped means allow; it evaluates each round once (a repeat gets "
        "the same noised values) and not past its budget. Under masking it never sees the sum, so it cannot check "
        "that the model is the aggregate's: the guarantee that holds for any model is the clipping, the noise and "
        "the charge.",
        "",
    ]
    return lines


def _distributed_section(
    config: RunConfig, rows: list[RoundRecord], policies: list[Any], ledgers: list[Any]
) -> list[str]:
    """Distributed DP: the noise in each released sum and which guarantee holds against whom."""
    from ..privacy import IntegerNoiseEvent, mixed_rdp_epsilon, own_share_events

    first = next((p.distributed for p in policies if p.distributed is not None), None)
    if first is None:
        return []
    sa = config.secure_aggregation
    lines = [
        "",
        '### Distributed DP (`privacy.mode = "distributed"`)',
        "",
        f"Each DP-SGD step was one full-SecAgg round ({sa.setting} setting). Every client sampled its units at the "
        f"common q = {first.sample_rate:.4g}, clipped each to L2 norm {first.clip:g}, scaled by s = {first.scale:g} "
        f"and rounded conditionally (sensitivity l2 = {first.l2:.1f} ring units), and added Skellam(mu / h) noise "
        "drawn from a ChaCha20 keystream; the server learned only the exact integer sum and divided it by "
        "s q sum(N_i).",
        "",
        f"- Calibration: h = n - n_C - d_max = {first.parties} - {first.parties - first.honest - _dropouts(first, sa)} "
        f"- {_dropouts(first, sa)} = {first.honest} honest shares guaranteed in every released sum (each site refuses "
        f"any threshold below n - d_max and aborts at UNMASK with fewer survivors); central Skellam mu "
        f"{first.mu:.4g}, noise multiplier {first.noise_multiplier:.4f} (one share alone: "
        f"{first.share_noise_multiplier:.4f}).",
        "",
        "| round | included | noise in the released sum (std / l2) | guaranteed (h shares) |",
        "|---|---|---|---|",
    ]
    for r in rows:
        if r.distributed is None:
            continue
        n = int(r.distributed["included"])
        lines.append(
            f"| {r.round} | {r.included} | {math.sqrt(2 * first.share_mu * n) / first.l2:.4f} "
            f"| {first.noise_multiplier:.4f} |"
        )
    own = []
    for policy, ledger in zip(policies, ledgers, strict=True):
        events = [
            IntegerNoiseEvent(**{k: v for k, v in e.items() if k in IntegerNoiseEvent.model_fields})
            for e in ledger.get("events", [])
            if e.get("mechanism") == "skellam"
        ]
        if events:
            eps = mixed_rdp_epsilon(own_share_events(events), policy.delta, neighbouring=config.privacy.neighbouring)
            own.append(f"client {policy.client}: {eps:.3f}")
    lines += [
        "",
        "Which guarantee holds against whom:",
        "",
        "- **The server, with secure aggregation intact**: the epsilon in the table above (every released sum holds "
        "at least h honest shares).",
        f"- **The server with up to n_C = {first.parties - first.honest - _dropouts(first, sa)} colluding clients**: "
        "the same epsilon; the colluders' shares were never counted.",
        "- **Anyone, if secure aggregation fails** (a client's masked input is unmasked): only that client's own "
        "share protects its records: " + ("; ".join(own) or "no release yet") + " (ledger `epsilon_own_share`).",
        "- Noise is integer (exact Skellam from a ChaCha20 keystream, accounted by its own RDP, Poisson subsampling by "
        "the general Zhu-Wang bound); wrap-around mod 2^b is post-processing and affects accuracy only "
        f"(bound per sum: {first.wrap_probability(total_units=max(1, sum(p.num_units for p in policies))):.2g}).",
    ]
    return lines


def _dropouts(params: Any, sa: Any) -> int:
    return math.ceil(sa.dropout_rate * params.parties - 1e-9)
