"""Resume on the Flower engine: a run stopped, then killed mid-round, finishes as if it had never stopped.

`LocalGrid` with the real ClientApp (training, the secure-aggregation Mod, each node's state folder).
The run stops after round 1 (`stop_after`), is resumed and killed (Ctrl-C) in round 2 after every
node trained and was charged for it but before any masked input left, and is resumed again with a
fresh grid, so that only the folders survive (the server's run folder, each node's state folder).
The finished run must equal an uninterrupted run with the same seed: metrics rows (timings aside),
final perplexity, adapter and each site's lifetime ledger, so the replayed round charged nobody
twice. A finished run resumes as a no-op that says so; another configuration is refused.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("flwr")

from flwr.app import Message
from safetensors.torch import load_file
from test_runner import tiny_config

from secure_fedllm.errors import ConfigError
from secure_fedllm.federation import RunFolderError, RunInterruptedError
from secure_fedllm.federation.federation import Federation, RunResult
from secure_fedllm.flower import LocalGrid
from secure_fedllm.flower.app import client_app
from secure_fedllm.flower.server import GridTransport, run_on_grid
from secure_fedllm.privacy.ledger import PrivacyLedger

CLIENTS = 3


class _Grid(LocalGrid):
    """LocalGrid that counts pushed messages, keeps the nodes' error replies, and can play Ctrl-C on the server
    at one push of one round."""

    def __init__(self, *args: Any, interrupt: tuple[str, int] | None = None, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.interrupt = interrupt  # (group id = round, index of the push in it)
        self.pushed = 0
        self.errors: list[str] = []
        self._pushes: dict[str, int] = {}

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        if messages and messages[0].metadata.message_type == "train":
            group = messages[0].metadata.group_id
            index = self._pushes.get(group, 0)
            self._pushes[group] = index + 1
            if (group, index) == self.interrupt:
                raise KeyboardInterrupt
        self.pushed += len(messages)
        ids = list(super().push_messages(messages))
        self.errors += [r.error.reason for r in map(self._replies.get, ids) if r is not None and r.has_error()]
        return ids


def _config(model_dir: Path) -> Any:
    return tiny_config(
        model_dir,
        'secure_aggregation.protocol="secagg+"',
        "secure_aggregation.dropout_rate=0.3",
        'secure_aggregation.setting="semi-honest"',
    )


def _grid(config: Any, root: Path, **kw: Any) -> _Grid:
    """Nodes reading `root/config.toml` and keeping their state under `root/sites` (which outlive the grid)."""
    root.mkdir(parents=True, exist_ok=True)
    config.to_file(root / "config.toml")
    nodes = [
        {"partition-id": i, "config": str(root / "config.toml"), "state-dir": str(root / "sites")}
        for i in range(CLIENTS)
    ]
    return _Grid(client_app, nodes, **kw)


def _federation(grid: _Grid, config: Any, lines: list[str] | None = None) -> Federation:
    log = lines.append if lines is not None else (lambda _m: None)
    return Federation(GridTransport(grid, config, log=log), log=log)


def _ledger(root: Path, client: int) -> Path:
    (path,) = sorted((root / f"sites/client-{client:04d}/ledgers").glob("*.json"))
    return path


def _rows(result: RunResult) -> list[dict[str, Any]]:
    return [r.model_dump(mode="json", exclude={"seconds"}) for r in result.metrics]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path, RunResult]:
    """The same job on Flower, never interrupted."""
    config, root = _config(tiny_model_dir), tmp_path_factory.mktemp("uninterrupted")
    return config, root, run_on_grid(_grid(config, root), config, out=root / "run", log=lambda _m: None)


@pytest.fixture(scope="module")
def resumed(reference, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, RunResult, dict[str, Any]]:
    """Stopped after round 1, killed in round 2 after training, resumed on a fresh grid; what each step left."""
    config, _, _ = reference
    root = tmp_path_factory.mktemp("interrupted")
    out = root / "run"
    seen: dict[str, Any] = {}
    first = _federation(_grid(config, root), config).run(config, out=out, stop_after=1)
    seen["stopped_rounds"] = [r.round for r in first.metrics]
    # round 2: push 0 is the train stage (every node trains, is charged, answers with its keys); Ctrl-C at push 1
    killed = _grid(config, root, interrupt=("2", 1))
    with pytest.raises(RunInterruptedError, match=rf"after round 1's checkpoint.*--resume {out}") as info:
        _federation(killed, config).run(config, resume=out)
    seen["interrupted"] = str(info.value)
    seen["charged_before_resume"] = [
        [e["round"] for e in json.loads(_ledger(root, c).read_text())["events"]] for c in range(CLIENTS)
    ]
    # another configuration is refused before anything is written or any node is asked
    before, other = _snapshot(out), config.with_overrides(["federation.rounds=3"])
    refused = _grid(other, root / "other")
    with pytest.raises(ConfigError, match="differs") as info_resume:
        _federation(refused, other).run(other, resume=out)
    with pytest.raises(RunFolderError, match="another configuration") as info_out:
        _federation(refused, other).run(other, out=out)
    seen["refusals"] = (str(info_resume.value), str(info_out.value))
    seen["refused_untouched"] = _snapshot(out) == before and refused.pushed == 0
    seen["killed_copy"] = tmp_path_factory.mktemp("forgetful") / "copy"  # for the weakened control
    shutil.copytree(root, seen["killed_copy"])
    # control: the run's own configuration is accepted and the run finishes (fresh grid: only folders survive)
    result = _federation(_grid(config, root), config).run(config, resume=out)
    return root, result, seen


def test_a_flower_run_stopped_and_killed_mid_round_resumes_to_the_uninterrupted_result(reference, resumed) -> None:
    _, _, ref = reference
    _, result, seen = resumed
    assert seen["stopped_rounds"] == [0, 1]
    assert [r.round for r in result.metrics] == [0, 1, 2]
    assert _rows(result) == _rows(ref)  # cohort, included, epsilon, loss, bytes... (timings aside)
    assert result.metrics[-1].perplexity == ref.metrics[-1].perplexity
    assert result.epsilons == ref.epsilons
    ours = load_file(str(result.adapter / "adapter_model.safetensors"))
    theirs = load_file(str(ref.adapter / "adapter_model.safetensors"))
    assert ours.keys() == theirs.keys() and all((ours[k] == theirs[k]).all() for k in ours)
    assert (result.out / "report.md").is_file()


def test_a_resumed_round_charges_no_site_twice(reference, resumed) -> None:
    _, ref_root, _ = reference
    root, _, seen = resumed
    # the kill came after every site was charged for round 2 (a second charge on resume would show)
    assert seen["charged_before_resume"] == [[1, 2]] * CLIENTS
    for client in range(CLIENTS):
        ours, theirs = _ledger(root, client), _ledger(ref_root, client)
        assert ours.name == theirs.name
        assert ours.read_text() == theirs.read_text()  # the lifetime ledger: one event per round, as uninterrupted
        assert [e["round"] for e in json.loads(ours.read_text())["events"]] == [1, 2]


def test_control_a_site_that_forgets_its_charged_releases_breaks_the_resumed_round(
    reference, resumed, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Weakened control: the replay of a charged release is what makes the resume exact and charge-free.

    Sites whose ledger no longer recognises round 2's release (`charged` always False) treat the replayed
    request as a new release: a second charge, which their participation cap and budget (both set for the
    run's rounds) refuse, so round 2 is lost and the run no longer equals the uninterrupted one.
    """
    config, _, ref = reference
    _, _, seen = resumed
    root = seen["killed_copy"]
    monkeypatch.setattr(PrivacyLedger, "charged", lambda self, round_number, release: False)
    grid = _grid(config, root)
    broken = _federation(grid, config).run(config, resume=root / "run")
    assert _rows(broken) != _rows(ref)
    second = broken.metrics[2]
    assert second.included == [] and second.aborted and ref.metrics[2].included == [0, 1, 2]
    # every site refused the "new" release before training: a third participation (cap and budget are the run's)
    assert len(grid.errors) == CLIENTS, grid.errors
    assert all("participation cap 2 reached" in why or "PrivacyBudgetExhausted" in why for why in grid.errors)
    for client in range(CLIENTS):  # refused, not charged twice: the budget held, the round did not
        assert [e["round"] for e in json.loads(_ledger(root, client).read_text())["events"]] == [1, 2]


def test_a_resume_with_another_config_is_refused_and_changes_nothing(resumed) -> None:
    root, _, seen = resumed
    by_resume, by_out = seen["refusals"]
    assert f"--resume {root / 'run'}" in by_resume and "config.toml" in by_resume
    assert f"--resume {root / 'run'}" in by_out  # names the fix
    assert seen["refused_untouched"]
    # the control (the run's own config, same folder) was accepted: the fixture's last resume finished the run


def test_resuming_a_finished_flower_run_is_a_no_op_that_says_so(reference, resumed) -> None:
    config, _, _ = reference
    root, result, _ = resumed
    out = root / "run"
    before = _snapshot(out)
    ledgers = [_ledger(root, c).read_bytes() for c in range(CLIENTS)]
    for kw in ({"resume": out}, {"out": out}):  # --resume, or --out of the same finished run
        lines: list[str] = []
        grid = _grid(config, root)
        again = _federation(grid, config, lines).run(config, **kw)
        assert any("nothing to do" in line for line in lines), lines
        assert grid.pushed == 0  # no node was asked anything
        assert _snapshot(out) == before
        assert [_ledger(root, c).read_bytes() for c in range(CLIENTS)] == ledgers
        assert _rows(again) == _rows(result) and again.epsilons == result.epsilons
